"""Memory-linear blockwise attention in plain JAX (the ``"xla"`` target).

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads (``N % K == 0``), G query heads per key/value head
(``N // K``), H head dim, Hv value head dim. Inside this module a block of
queries is laid out as ``(B*K, bq*G, H)``: the G query heads that share a key
head are folded into the rows of one matmul, so GQA never repeats K or V.

The online softmax of FlashAttention-2 (arXiv:2307.08691) written with XLA
loops instead of a kernel. The forward scans over query blocks and, for
each, loops over the key blocks a static :class:`BlockPlan` lists, keeping
the running max ``m_i``, normaliser ``l_i`` and unnormalised output of its
rows; it saves only ``out`` and the log-sum-exp. The backward scans over key
blocks, loops over the query blocks that see each, and recomputes the
probabilities from the saved log-sum-exp. Nothing of size ``T x S`` is ever
stored, so memory is linear in the sequence lengths.

Pairs the band (causal, sliding window) rules out are not in the plan at
all, so causal attention does about half the work of full attention. Pairs
the band allows entirely, with no per-example mask, run a body with no mask
code. Per-example masks (segments, lengths, dense) are evaluated per block,
and a block they rule out for every example is skipped at run time.

It runs on any backend and is the CPU default for long sequences.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import common
from pallas_kernels import dropout as dropout_lib
from pallas_kernels import masks as masks_lib

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key block lengths of the blockwise path.

  The defaults were measured on a 2-core AVX-512 CPU (fp32, B=1, N=8,
  H=64, T=S=2048 and 4096, block sizes 128 to 1024): 256 x 256 was the
  fastest or within 5% of it for full and causal attention, forward and
  backward. Larger blocks run each matmul faster, but their ``(N, block_q,
  block_k)`` scores no longer fit in the per-core L2 cache between the
  softmax passes, and causal attention wastes about ``block_q / 2`` keys per
  row on the diagonal blocks. A block longer than the sequence is shortened
  to it, and the blocks of a ragged sequence are balanced so that padding
  stays below one row per block.

  Attributes:
    block_q: query rows per block.
    block_k: keys per block.

  >>> BlockSizes(block_q=256, block_k=512)
  BlockSizes(block_q=256, block_k=512)
  """

  block_q: int = 256
  block_k: int = 256

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int. "
                         f"Received: {name}={value!r}")


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _balanced(length: int, block: int) -> int:
  """The block length that covers ``length`` in as many blocks, evenly."""
  return _cdiv(length, _cdiv(length, min(block, length)))


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """The static block structure of one call: which block pairs are visited.

  Attributes:
    T, S: query and key lengths.
    block_q, block_k: the block lengths actually used.
    num_q_blocks, num_k_blocks: blocks covering ``T`` and ``S`` (the last
      ones padded).
    unmasked: ``(q_block, k_block)`` pairs every entry of which may attend.
    masked: the other visited pairs; a mask is evaluated for them.
  """

  T: int
  S: int
  block_q: int
  block_k: int
  num_q_blocks: int
  num_k_blocks: int
  unmasked: tuple[tuple[int, int], ...]
  masked: tuple[tuple[int, int], ...]

  @property
  def num_visited(self) -> int:
    return len(self.unmasked) + len(self.masked)


@functools.lru_cache(maxsize=128)
def plan(spec: masks_lib.MaskSpec, T: int, S: int,
         block_sizes: Optional[BlockSizes] = None, *,
         has_data_mask: bool = False) -> BlockPlan:
  """Lists the block pairs that ``spec`` does not rule out.

  Args:
    spec: the band.
    T, S: query and key lengths.
    block_sizes: None for the defaults.
    has_data_mask: whether per-example masks apply (then every visited pair
      needs a mask).

  >>> causal = plan(masks_lib.MaskSpec.causal(), 1024, 1024)
  >>> full = plan(masks_lib.MaskSpec.full(), 1024, 1024)
  >>> causal.num_visited, full.num_visited, len(causal.masked)
  (10, 16, 4)
  """
  bs = block_sizes or BlockSizes()
  bq, bk = _balanced(T, bs.block_q), _balanced(S, bs.block_k)
  nq, nk = _cdiv(T, bq), _cdiv(S, bk)
  unmasked, masked = [], []
  for i in range(nq):
    # Extents are those of real rows and keys: padding is never attended.
    q_lo, q_hi = i * bq, min((i + 1) * bq, T)
    lo, hi = spec.kv_block_range(q_lo, q_hi, S, bk)
    for j in range(lo, hi):
      k_lo, k_hi = j * bk, min((j + 1) * bk, S)
      if not spec.block_may_attend(q_lo, q_hi, k_lo, k_hi):
        continue
      # Padded keys (the last block of a ragged S) must be masked out.
      full = (not has_data_mask and k_hi == (j + 1) * bk
              and spec.block_fully_allowed(q_lo, q_hi, k_lo, k_hi))
      (unmasked if full else masked).append((i, j))
  return BlockPlan(T=T, S=S, block_q=bq, block_k=bk, num_q_blocks=nq,
                   num_k_blocks=nk, unmasked=tuple(unmasked),
                   masked=tuple(masked))


# -- layout -------------------------------------------------------------------


def _pad_axis(x, axis: int, size: int):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _q_to_blocks(q, K: int, nq: int, bq: int):
  """``(B, T, N, H)`` -> ``(nq, B*K, bq*G, H)``."""
  B, _, N, H = q.shape
  G = N // K
  q = _pad_axis(q, 1, nq * bq).reshape(B, nq, bq, K, G, H)
  q = q.transpose(1, 0, 3, 2, 4, 5)  # (nq, B, K, bq, G, H)
  return q.reshape(nq, B * K, bq * G, H)


def _q_from_blocks(x, B: int, T: int, K: int, G: int):
  """``(nq, B*K, bq*G, Hv)`` -> ``(B, T, N, Hv)``."""
  nq, _, R, Hv = x.shape
  bq = R // G
  x = x.reshape(nq, B, K, bq, G, Hv).transpose(1, 0, 3, 2, 4, 5)
  return x.reshape(B, nq * bq, K * G, Hv)[:, :T]  # (B, T, N, Hv)


def _rows_from_blocks(x, B: int, T: int, K: int, G: int):
  """Per-row ``(nq, B*K, bq*G)`` -> ``(B, N, T)``."""
  nq, _, R = x.shape
  bq = R // G
  x = x.reshape(nq, B, K, bq, G).transpose(1, 2, 4, 0, 3)  # (B, K, G, nq, bq)
  return x.reshape(B, K * G, nq * bq)[:, :, :T]


def _kv_to_blocks(x, nk: int, bk: int):
  """``(B, S, K, H)`` -> ``(nk, B*K, bk, H)``."""
  B, _, K, H = x.shape
  x = _pad_axis(x, 1, nk * bk).reshape(B, nk, bk, K, H)
  x = x.transpose(1, 0, 3, 2, 4)  # (nk, B, K, bk, H)
  return x.reshape(nk, B * K, bk, H)


def _kv_from_blocks(x, B: int, S: int, K: int):
  """``(nk, B*K, bk, H)`` -> ``(B, S, K, H)``."""
  nk, _, bk, H = x.shape
  x = x.reshape(nk, B, K, bk, H).transpose(1, 0, 3, 2, 4)
  return x.reshape(B, nk * bk, K, H)[:, :S]


# -- masks and dropout of one block -----------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about a call that shapes the computation (hashable)."""
  plan: BlockPlan
  spec: masks_lib.MaskSpec
  B: int
  K: int
  G: int
  scale: float
  dropout_rate: float


def _block_data(data: masks_lib.MaskData, st: _Static):
  """Pads and blocks the per-example masks so one block is one index.

  Also summarises each block for the run-time skip test (see
  :func:`_block_live`). Padded keys are masked by position, so the padding
  values themselves never matter.
  """
  p = st.plan
  nq, nk, bq, bk = p.num_q_blocks, p.num_k_blocks, p.block_q, p.block_k
  Tp, Sp = nq * bq, nk * bk
  out = {}
  if data.q_segment_ids is not None:
    # Edge padding keeps each block's id range that of its real entries.
    q_ids = jnp.pad(data.q_segment_ids, ((0, 0), (0, Tp - p.T)), mode="edge")
    kv_ids = jnp.pad(data.kv_segment_ids, ((0, 0), (0, Sp - p.S)),
                     mode="edge")
    q_ids = q_ids.reshape(st.B, nq, bq)
    kv_ids = kv_ids.reshape(st.B, nk, bk)
    out["q_ids"], out["kv_ids"] = q_ids, kv_ids
    out["q_id_range"] = (q_ids.min(-1), q_ids.max(-1))  # (B, nq) each
    out["kv_id_range"] = (kv_ids.min(-1), kv_ids.max(-1))  # (B, nk) each
  if data.q_lengths is not None:
    out["q_lengths"] = data.q_lengths
  if data.kv_lengths is not None:
    out["kv_lengths"] = data.kv_lengths
  if data.mask is not None:
    mask = _pad_axis(_pad_axis(data.mask, 2, Tp), 3, Sp)  # (#B, #N, Tp, Sp)
    out["mask"] = mask
    mB, mN = mask.shape[:2]
    out["mask_any"] = mask.reshape(mB, mN, nq, bq, nk, bk).any(
        axis=(0, 1, 3, 5))  # (nq, nk)
  return out


def _block_live(blocks, st: _Static, qi, kj):
  """False when the per-example masks rule out block ``(qi, kj)`` for every
  example and head (so it can be skipped); None without such masks.

  Each test is a necessary condition for an allowed entry, so their AND is.
  """
  p = st.plan
  live = None

  def _and(a, b):
    return b if a is None else a & b

  if "q_id_range" in blocks:
    # Two blocks share a segment id only if their id ranges overlap.
    q_min, q_max = (x[:, qi] for x in blocks["q_id_range"])  # (B,)
    kv_min, kv_max = (x[:, kj] for x in blocks["kv_id_range"])
    live = jnp.any((q_max >= kv_min) & (kv_max >= q_min))
  if "q_lengths" in blocks:
    live = _and(live, qi * p.block_q < jnp.max(blocks["q_lengths"]))
  if "kv_lengths" in blocks:
    live = _and(live, kj * p.block_k < jnp.max(blocks["kv_lengths"]))
  if "mask_any" in blocks:
    live = _and(live, blocks["mask_any"][qi, kj])
  return live


def _to_block_layout(x, st: _Static, transposed: bool):
  """``(#B, #K, bq, #G, bk)`` -> ``(B*K, bq*G, bk)``, or ``(B*K, bk, bq*G)``
  when ``transposed``."""
  p = st.plan
  bq, bk, B, K, G = p.block_q, p.block_k, st.B, st.K, st.G
  x = jnp.broadcast_to(x, (B, K, bq, G, bk))
  if transposed:
    return jnp.moveaxis(x, 4, 2).reshape(B * K, bk, bq * G)
  return x.reshape(B * K, bq * G, bk)


def _block_allowed(blocks, st: _Static, qi, kj, transposed: bool = False):
  """The mask of block ``(qi, kj)``: band, key padding and the per-example
  masks ANDed.

  Args:
    blocks: from :func:`_block_data`.
    qi, kj: traced block indices.
    transposed: keys first.

  Returns:
    ``(B*K, bq*G, bk)`` bool, or ``(B*K, bk, bq*G)`` if ``transposed``.
  """
  p = st.plan
  bq, bk, B, K, G = p.block_q, p.block_k, st.B, st.K, st.G
  q_pos = qi * bq + jnp.arange(bq, dtype=jnp.int32)  # (bq,)
  k_pos = kj * bk + jnp.arange(bk, dtype=jnp.int32)  # (bk,)
  # Built as (#B, #K, bq, #G, bk); size-1 dims broadcast.
  band = jnp.asarray(st.spec.allows(q_pos[:, None], k_pos[None, :]))
  band = jnp.broadcast_to(band & (k_pos[None, :] < p.S), (bq, bk))
  allowed = band[None, None, :, None, :]
  if "q_ids" in blocks:
    q_ids = lax.dynamic_index_in_dim(blocks["q_ids"], qi, 1, False)  # (B, bq)
    kv_ids = lax.dynamic_index_in_dim(blocks["kv_ids"], kj, 1, False)
    same = q_ids[:, :, None] == kv_ids[:, None, :]  # (B, bq, bk)
    allowed = allowed & same[:, None, :, None, :]
  if "q_lengths" in blocks:
    ok = q_pos[None, :] < blocks["q_lengths"][:, None]  # (B, bq)
    allowed = allowed & ok[:, None, :, None, None]
  if "kv_lengths" in blocks:
    ok = k_pos[None, :] < blocks["kv_lengths"][:, None]  # (B, bk)
    allowed = allowed & ok[:, None, None, None, :]
  if "mask" in blocks:
    mask = blocks["mask"]  # (#B, #N, Tp, Sp)
    mB, mN = mask.shape[:2]
    mask = lax.dynamic_slice(mask, (0, 0, qi * bq, kj * bk),
                             (mB, mN, bq, bk))  # (#B, #N, bq, bk)
    mK, mG = (K, G) if mN > 1 else (1, 1)
    mask = mask.reshape(mB, mK, mG, bq, bk).transpose(0, 1, 3, 2, 4)
    allowed = allowed & mask  # (#B, #K, bq, #G, bk)
  return _to_block_layout(allowed, st, transposed)


def _block_keep(seeds, st: _Static, qi, kj, transposed: bool = False):
  """The dropout keep mask of block ``(qi, kj)``, laid out as
  :func:`_block_allowed`'s.

  Absolute indices (batch, query head, query, key) go into the hash, so the
  bits are the reference's.
  """
  p = st.plan
  bq, bk, B, K, G = p.block_q, p.block_k, st.B, st.K, st.G
  b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None, None]
  n = (jnp.arange(K, dtype=jnp.int32)[None, :, None, None, None] * G
       + jnp.arange(G, dtype=jnp.int32)[None, None, None, :, None])
  i = qi * bq + jnp.arange(bq, dtype=jnp.int32)[None, None, :, None, None]
  h_row = dropout_lib.row_hash(seeds, b, n, i)  # (B, K, bq, G, 1)
  j = kj * bk + jnp.arange(bk, dtype=jnp.int32)
  bits = dropout_lib.bits_from_row(h_row, j, seeds[1])  # (B, K, bq, G, bk)
  keep = bits >= dropout_lib.threshold(st.dropout_rate)
  return _to_block_layout(keep, st, transposed)


# -- forward and backward -----------------------------------------------------


def _inner_ranges(the_plan: BlockPlan, by_q: bool) -> np.ndarray:
  """Per outer block, the inner blocks to visit as ``(lo, a, b, hi)``.

  The outer blocks are query blocks (``by_q``) or key blocks. Inner blocks
  ``[lo, a)`` and ``[b, hi)`` need a mask, ``[a, b)`` need none. For a band
  the visited blocks of a row (or column) of blocks are contiguous and the
  unmasked ones a contiguous run inside them, so three ranges describe them.
  """
  n_outer = the_plan.num_q_blocks if by_q else the_plan.num_k_blocks
  sets = [([], []) for _ in range(n_outer)]
  for kind, pairs in enumerate((the_plan.masked, the_plan.unmasked)):
    for i, j in pairs:
      outer, inner = (i, j) if by_q else (j, i)
      sets[outer][kind].append(inner)
  ranges = np.zeros((n_outer, 4), np.int32)
  for o, (masked, unmasked) in enumerate(sets):
    visited = sorted(masked + unmasked)
    if not visited:
      continue
    lo, hi = visited[0], visited[-1] + 1
    a = b = hi
    if unmasked:
      a, b = min(unmasked), max(unmasked) + 1
    if (len(visited) != hi - lo or len(unmasked) != b - a):
      raise AssertionError(f"Non-contiguous block plan for block {o}.")
    ranges[o] = lo, a, b, hi
  return ranges


def _mm(a, b, contract_a: int, contract_b: int, dtype):
  """Batched matmul over the leading axis, fp32 accumulation."""
  dims = (((contract_a,), (contract_b,)), ((0,), (0,)))
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                         preferred_element_type=_F32)


def _loop_ranges(the_plan, ranges, body, carry):
  """Runs ``body(masked, inner, carry)`` over one outer block's ranges.

  The two masked ranges share one loop (one copy of the masked body in the
  program); loops of a kind the plan never uses are not traced at all.
  """
  lo, a, b, hi = ranges[0], ranges[1], ranges[2], ranges[3]
  if the_plan.masked:
    n_before = a - lo

    def masked_body(t, c):
      return body(True, jnp.where(t < n_before, lo + t, b + t - n_before), c)

    carry = lax.fori_loop(0, n_before + hi - b, masked_body, carry)
  if the_plan.unmasked:
    carry = lax.fori_loop(a, b, functools.partial(body, False), carry)
  return carry


def _anchor(*trees):
  """A scalar zero that varies over every mesh axis any input varies over.

  Inside ``shard_map`` a loop's state must keep its type, so fresh states
  are made from it (:func:`_fresh`); elsewhere it is a constant zero.
  """
  anchor = jnp.zeros((), _F32)
  for leaf in jax.tree.leaves(trees):
    anchor = anchor + jnp.zeros_like(leaf, _F32, shape=())
  return anchor


def _fresh(anchor, shape, value=0.0):
  """A new fp32 loop state of ``shape``, typed like ``anchor``."""
  return jnp.full_like(anchor, value, shape=shape)


def _prescale(st: _Static, qb):
  """Folds the scale into q when that is exact enough: fp32, or a power of
  two. Returns ``(q, scale still to apply to the logits)``."""
  scale = st.scale
  if qb.dtype == _F32 or math.frexp(scale)[0] == 0.5:
    return (qb.astype(_F32) * scale).astype(qb.dtype), 1.0
  return qb, scale


def _forward(st: _Static, qb, kb, vb, blocks, seeds):
  """Online softmax, query blocks outside, key blocks inside.

  Args:
    qb: ``(nq, B*K, bq*G, H)``; kb: ``(nk, B*K, bk, H)``; vb: ``(nk, B*K,
      bk, Hv)``, all in the matmul dtype.

  Returns:
    ``out (nq, B*K, bq*G, Hv)`` float32 and ``lse (nq, B*K, bq*G)``.
  """
  dtype = qb.dtype
  nq, BK, R, _ = qb.shape
  Hv = vb.shape[-1]
  rate = st.dropout_rate
  qb, logit_scale = _prescale(st, qb)
  ranges = jnp.asarray(_inner_ranges(st.plan, by_q=True))  # (nq, 4)
  anchor = _anchor(qb, kb, vb, blocks, seeds)

  def step(qi, q, masked, kj, carry):
    if masked and blocks:
      # Skip blocks the per-example masks rule out (the state is unchanged
      # by a block with no allowed entry).
      return lax.cond(_block_live(blocks, st, qi, kj),
                      functools.partial(update, qi, q, True, kj),
                      lambda c: c, carry)
    return update(qi, q, masked, kj, carry)

  def update(qi, q, masked, kj, carry):
    m_prev, l_prev, acc_prev = carry  # (BK, R), (BK, R), (BK, R, Hv)
    k = lax.dynamic_index_in_dim(kb, kj, 0, False)  # (BK, bk, H)
    v = lax.dynamic_index_in_dim(vb, kj, 0, False)  # (BK, bk, Hv)
    s = _mm(q, k, 2, 2, dtype)  # (BK, R, bk)
    if logit_scale != 1.0:
      s = s * logit_scale
    if masked:
      allowed = _block_allowed(blocks, st, qi, kj)
      s = jnp.where(allowed, s, masks_lib.MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))  # (BK, R)
    p = jnp.exp(s - m_new[..., None])  # (BK, R, bk)
    if masked:
      # A row with nothing allowed yet has m_new == MASK_VALUE, so its
      # masked entries would get exp(0) == 1: zero them explicitly.
      p = jnp.where(allowed, p, 0.0)
    # Rescale the old state to the new max (exp(MASK_VALUE - m) == 0).
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=-1)
    if rate > 0.0:
      # l_i sums the probabilities before dropout; 1 / (1 - rate) is applied
      # once at the end.
      p = jnp.where(_block_keep(seeds, st, qi, kj), p, 0.0)
    acc_new = alpha[..., None] * acc_prev + _mm(p, v, 2, 1, dtype)
    return m_new, l_new, acc_new

  def q_block(_, xs):
    qi, q, r = xs
    carry = (_fresh(anchor, (BK, R), masks_lib.MASK_VALUE),
             _fresh(anchor, (BK, R)), _fresh(anchor, (BK, R, Hv)))
    m_i, l_i, acc = _loop_ranges(st.plan, r, functools.partial(step, qi, q),
                                 carry)
    # Rows that attended nothing have l_i == 0: zero output and the
    # empty-row LSE, set explicitly (never 0 / 0 or log 0).
    nonempty = l_i > 0.0
    safe_l = jnp.where(nonempty, l_i, 1.0)
    # Kept probabilities are scaled by 1 / (1 - rate); the LSE ignores
    # dropout.
    norm = safe_l * (1.0 - rate) if rate > 0.0 else safe_l
    out = jnp.where(nonempty[..., None], acc / norm[..., None], 0.0)
    lse = jnp.where(nonempty, m_i + jnp.log(safe_l),
                    masks_lib.EMPTY_ROW_LSE)
    return None, (out, lse)

  _, (out, lse) = lax.scan(
      q_block, None, (jnp.arange(nq, dtype=jnp.int32), qb, ranges))
  return out, lse


def _backward(st: _Static, qb, kb, vb, blocks, seeds, out, lse, d_out,
              d_lse):
  """FlashAttention-2's backward, key blocks outside, query blocks inside.

  With ``Z`` the dropout mask scaled by ``1 / (1 - rate)``: ``dV = (P Z)^T
  dO``, ``dP = (dO V^T) Z``, ``dS = P (dP - D + dlse)`` with ``D =
  rowsum(dO O)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``. dK and dV of
  the outer key block stay in the loop state; dQ^T is accumulated in place.
  """
  dtype = qb.dtype
  nk = kb.shape[0]
  rate = st.dropout_rate
  qb, logit_scale = _prescale(st, qb)
  # D - dlse per row, (nq, BK, R): the LSE's cotangent enters dS like -D.
  delta = jnp.sum(d_out * out, axis=-1) - d_lse
  ranges = jnp.asarray(_inner_ranges(st.plan, by_q=False))  # (nk, 4)
  anchor = _anchor(qb, kb, vb, blocks, seeds, out, lse, d_out, d_lse)

  def contributions(kj, k, v, masked, qi):
    """Block ``(qi, kj)``'s terms of dQ^T, dK and dV.

    Computed keys-first (``S^T = K Q^T``) so that dK and dV, the products
    summed over queries, are plain matmuls; on CPU a matmul contracting its
    left operand's leading dim runs at about half speed.
    """
    q = lax.dynamic_index_in_dim(qb, qi, 0, False)  # (BK, R, H)
    do = lax.dynamic_index_in_dim(d_out, qi, 0, False)  # (BK, R, Hv)
    lse_i = lax.dynamic_index_in_dim(lse, qi, 0, False)  # (BK, R)
    delta_i = lax.dynamic_index_in_dim(delta, qi, 0, False)
    s_t = _mm(k, q, 2, 2, dtype)  # (BK, bk, R)
    if logit_scale != 1.0:
      s_t = s_t * logit_scale
    p_t = jnp.exp(s_t - lse_i[:, None, :])
    if masked:
      # Masked entries, and every entry of an empty row (lse ==
      # EMPTY_ROW_LSE), get probability zero.
      p_t = jnp.where(_block_allowed(blocks, st, qi, kj, True), p_t, 0.0)
    dp_t = _mm(v, do, 2, 2, dtype)  # (BK, bk, R)
    pz_t = p_t
    if rate > 0.0:
      keep = _block_keep(seeds, st, qi, kj, True)
      pz_t = jnp.where(keep, p_t * (1.0 / (1.0 - rate)), 0.0)
      dp_t = jnp.where(keep, dp_t * (1.0 / (1.0 - rate)), 0.0)
    ds_t = p_t * (dp_t - delta_i[:, None, :])  # (BK, bk, R), unscaled
    # q is prescaled (or logit_scale is applied to dK below), so dS^T q
    # carries the one factor of the scale that dK needs.
    return (_mm(k, ds_t, 1, 1, dtype),  # dQ^T: (BK, H, R)
            _mm(ds_t, q, 2, 1, dtype),  # dK: (BK, bk, H)
            _mm(pz_t, do, 2, 1, dtype))  # dV: (BK, bk, Hv)

  def step(kj, k, v, masked, qi, carry):
    dq_all, dk, dv = carry  # (nq, BK, H, R), (BK, bk, H), (BK, bk, Hv)
    dq_i = lax.dynamic_index_in_dim(dq_all, qi, 0, False)  # (BK, H, R)

    def update(state):
      dq_c, dk_c, dv_c = contributions(kj, k, v, masked, qi)
      return state[0] + dq_c, state[1] + dk_c, state[2] + dv_c

    if masked and blocks:
      # Skip blocks the per-example masks rule out. Only block-sized values
      # pass through the cond, never the whole dQ.
      dq_i, dk, dv = lax.cond(_block_live(blocks, st, qi, kj), update,
                              lambda state: state, (dq_i, dk, dv))
    else:
      dq_i, dk, dv = update((dq_i, dk, dv))
    return lax.dynamic_update_index_in_dim(dq_all, dq_i, qi, 0), dk, dv

  def k_block(dq_all, xs):
    kj, k, v, r = xs
    carry = (dq_all, _fresh(anchor, k.shape), _fresh(anchor, v.shape))
    dq_all, dk, dv = _loop_ranges(st.plan, r,
                                  functools.partial(step, kj, k, v), carry)
    return dq_all, (dk * logit_scale, dv)

  nq, BK, R, H = qb.shape
  dq_t, (dk, dv) = lax.scan(
      k_block, _fresh(anchor, (nq, BK, H, R)),
      (jnp.arange(nk, dtype=jnp.int32), kb, vb, ranges))
  return jnp.swapaxes(dq_t, 2, 3) * st.scale, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_blocks(st: _Static, qb, kb, vb, blocks, seeds):
  return _forward(st, qb, kb, vb, blocks, seeds)


def _attention_blocks_fwd(st, qb, kb, vb, blocks, seeds):
  out, lse = _forward(st, qb, kb, vb, blocks, seeds)
  return (out, lse), (qb, kb, vb, blocks, seeds, out, lse)


def _attention_blocks_bwd(st, residuals, cotangents):
  qb, kb, vb, blocks, seeds, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = _backward(st, qb, kb, vb, blocks, seeds, out, lse,
                         d_out.astype(_F32), d_lse.astype(_F32))
  # Integer and boolean inputs (masks, seeds) get no cotangent.
  return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype),
          jax.tree.map(lambda _: None, blocks), None)


_attention_blocks.defvjp(_attention_blocks_fwd, _attention_blocks_bwd)


def attention(q, k, v, prep: common.Prepared, *,
              block_sizes: Optional[BlockSizes] = None,
              interpret: bool = False):
  """Blockwise attention; computes :func:`pallas_kernels.reference.attention`.

  Args:
    q: ``(B, T, N, H)``.
    k: ``(B, S, K, H)``.
    v: ``(B, S, K, Hv)``.
    prep: from :func:`pallas_kernels.common.prepare`.
    block_sizes: a :class:`BlockSizes`, or None for the defaults.
    interpret: accepted for the common target signature; it has no meaning
      here.

  Returns:
    ``(out (B, T, N, Hv) in q.dtype, lse (B, N, T) float32)``.

  >>> import pallas_kernels
  >>> q = jax.random.normal(jax.random.key(0), (1, 100, 2, 16))
  >>> prep = common.prepare(q, q, q, causal=True)
  >>> out, lse = attention(q, q, q, prep, block_sizes=BlockSizes(32, 32))
  >>> ref, ref_lse = pallas_kernels.reference.attention_core(q, q, q, prep)
  >>> bool(jnp.allclose(out, ref, atol=1e-5))
  True
  """
  del interpret
  if block_sizes is None:
    block_sizes = BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError("`block_sizes` for backend='xla' must be a "
                    "pallas_kernels.blockwise.BlockSizes or None; got "
                    f"{type(block_sizes).__name__}.")
  pr = prep.problem
  B, T, S, K, G = pr.B, pr.T, pr.S, pr.K, pr.groups
  the_plan = plan(prep.spec, T, S, block_sizes,
                  has_data_mask=not prep.data.is_empty)
  st = _Static(plan=the_plan, spec=prep.spec, B=B, K=K, G=G,
               scale=prep.scale, dropout_rate=prep.dropout_rate)
  # Matmuls run in the inputs' common dtype with fp32 accumulation.
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  nq, bq = the_plan.num_q_blocks, the_plan.block_q
  nk, bk = the_plan.num_k_blocks, the_plan.block_k
  qb = _q_to_blocks(q.astype(dtype), K, nq, bq)
  kb = _kv_to_blocks(k.astype(dtype), nk, bk)
  vb = _kv_to_blocks(v.astype(dtype), nk, bk)
  blocks = _block_data(prep.data, st)
  out, lse = _attention_blocks(st, qb, kb, vb, blocks, prep.seeds)
  out = _q_from_blocks(out, B, T, K, G).astype(q.dtype)
  return out, _rows_from_blocks(lse, B, T, K, G)
