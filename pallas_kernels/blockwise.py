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
all. Pairs the band allows entirely, with no per-example mask, run a body
with no mask code. The partial pairs in between (the causal diagonal, the
edges of a window) are cut along the outer block into windows: positions
that attend nothing are skipped, those the band allows entirely run without
a mask, and only the rest pay for one (:func:`_schedule`). So the forward's
tall query blocks waste little on the causal diagonal, and causal attention
does a little over half the work of full attention. Per-example masks
(segments, lengths, dense) are evaluated per block, and a block they rule
out for every example is skipped at run time.

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
  """Block lengths of the blockwise path, forward and backward.

  The forward loops over query blocks of ``block_q`` rows, each over key
  blocks of ``block_k`` keys; the backward loops over key blocks of
  ``block_k_bwd`` keys, each over query blocks of ``block_q_bwd`` rows. The
  backward re-blocks its inputs, so the two need not agree.

  The defaults were measured on a 2-core AVX-512 CPU (fp32, B=1, N=8, H=64,
  T=S=1024 to 4096, full and causal; ``python -m benchmarks.attention_core
  --sweep``): the CPU's batched matmuls run about twice as fast with 1024
  rows as with 256, so the forward takes tall query blocks; the backward's
  products contract over both rows and keys and prefer squarer blocks, and
  its smaller query blocks waste fewer entries on the causal diagonal. A
  block longer than the sequence is shortened to it, and the blocks of a
  ragged sequence are balanced so that padding stays below one row per
  block.

  Attributes:
    block_q, block_k: forward query rows and keys per block.
    block_q_bwd, block_k_bwd: backward query rows and keys per block; None
      for the forward's.

  >>> BlockSizes(block_q=256, block_k=512).backward
  BlockSizes(block_q=256, block_k=512, block_q_bwd=None, block_k_bwd=None)
  >>> DEFAULT_BLOCK_SIZES.backward
  BlockSizes(block_q=256, block_k=512, block_q_bwd=None, block_k_bwd=None)
  """

  block_q: int
  block_k: int
  block_q_bwd: Optional[int] = None
  block_k_bwd: Optional[int] = None

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
      value = getattr(self, name)
      if value is None and name.endswith("_bwd"):
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int. "
                         f"Received: {name}={value!r}")

  @property
  def backward(self) -> "BlockSizes":
    """The backward's block lengths, as forward ones (what :func:`plan`
    takes)."""
    return BlockSizes(
        self.block_q if self.block_q_bwd is None else self.block_q_bwd,
        self.block_k if self.block_k_bwd is None else self.block_k_bwd)


DEFAULT_BLOCK_SIZES = BlockSizes(block_q=1024, block_k=256, block_q_bwd=256,
                                 block_k_bwd=512)


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

  >>> sizes = BlockSizes(block_q=256, block_k=256)
  >>> causal = plan(masks_lib.MaskSpec.causal(), 1024, 1024, sizes)
  >>> full = plan(masks_lib.MaskSpec.full(), 1024, 1024, sizes)
  >>> causal.num_visited, full.num_visited, len(causal.masked)
  (10, 16, 4)
  """
  bs = block_sizes or DEFAULT_BLOCK_SIZES
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
  """Everything about a call that shapes the computation (hashable).

  ``plan`` is the plan of the pass at hand: the forward's, or in the
  backward ``bwd_plan``.
  """
  plan: BlockPlan
  bwd_plan: BlockPlan
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


def _to_block_layout(x, st: _Static, rows: int, cols: int,
                     transposed: bool):
  """``(#B, #K, rows, #G, cols)`` -> ``(B*K, rows*G, cols)``, or ``(B*K,
  cols, rows*G)`` when ``transposed``."""
  B, K, G = st.B, st.K, st.G
  x = jnp.broadcast_to(x, (B, K, rows, G, cols))
  if transposed:
    return jnp.moveaxis(x, 4, 2).reshape(B * K, cols, rows * G)
  return x.reshape(B * K, rows * G, cols)


def _block_allowed(blocks, st: _Static, qi, kj, transposed: bool = False,
                   q_window: Optional[tuple[int, int]] = None,
                   k_window: Optional[tuple[int, int]] = None):
  """The mask of block ``(qi, kj)``: band, key padding and the per-example
  masks ANDed.

  Args:
    blocks: from :func:`_block_data`.
    qi, kj: traced block indices.
    transposed: keys first.
    q_window, k_window: static ``[lo, hi)`` rows of the query block and keys
      of the key block to cover; None for all.

  Returns:
    ``(B*K, rows*G, cols)`` bool, or ``(B*K, cols, rows*G)`` if
    ``transposed``.
  """
  p = st.plan
  bq, bk, K, G = p.block_q, p.block_k, st.K, st.G
  r0, r1 = q_window or (0, bq)
  c0, c1 = k_window or (0, bk)
  rows, cols = r1 - r0, c1 - c0
  q_pos = qi * bq + r0 + jnp.arange(rows, dtype=jnp.int32)  # (rows,)
  k_pos = kj * bk + c0 + jnp.arange(cols, dtype=jnp.int32)  # (cols,)
  # Built as (#B, #K, rows, #G, cols); size-1 dims broadcast.
  band = jnp.asarray(st.spec.allows(q_pos[:, None], k_pos[None, :]))
  band = jnp.broadcast_to(band & (k_pos[None, :] < p.S), (rows, cols))
  allowed = band[None, None, :, None, :]
  if "q_ids" in blocks:
    q_ids = lax.dynamic_index_in_dim(blocks["q_ids"], qi, 1, False)[:, r0:r1]
    kv_ids = lax.dynamic_index_in_dim(blocks["kv_ids"], kj, 1,
                                      False)[:, c0:c1]
    same = q_ids[:, :, None] == kv_ids[:, None, :]  # (B, rows, cols)
    allowed = allowed & same[:, None, :, None, :]
  if "q_lengths" in blocks:
    ok = q_pos[None, :] < blocks["q_lengths"][:, None]  # (B, rows)
    allowed = allowed & ok[:, None, :, None, None]
  if "kv_lengths" in blocks:
    ok = k_pos[None, :] < blocks["kv_lengths"][:, None]  # (B, cols)
    allowed = allowed & ok[:, None, None, None, :]
  if "mask" in blocks:
    mask = blocks["mask"]  # (#B, #N, Tp, Sp)
    mB, mN = mask.shape[:2]
    mask = lax.dynamic_slice(mask, (0, 0, qi * bq + r0, kj * bk + c0),
                             (mB, mN, rows, cols))  # (#B, #N, rows, cols)
    mK, mG = (K, G) if mN > 1 else (1, 1)
    mask = mask.reshape(mB, mK, mG, rows, cols).transpose(0, 1, 3, 2, 4)
    allowed = allowed & mask  # (#B, #K, rows, #G, cols)
  return _to_block_layout(allowed, st, rows, cols, transposed)


def _block_keep(seeds, st: _Static, qi, kj, transposed: bool = False,
                q_window: Optional[tuple[int, int]] = None,
                k_window: Optional[tuple[int, int]] = None):
  """The dropout keep mask of block ``(qi, kj)``, laid out as
  :func:`_block_allowed`'s.

  Absolute indices (batch, query head, query, key) go into the hash, so the
  bits are the reference's.
  """
  p = st.plan
  bq, bk, B, K, G = p.block_q, p.block_k, st.B, st.K, st.G
  r0, r1 = q_window or (0, bq)
  c0, c1 = k_window or (0, bk)
  b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None, None]
  n = (jnp.arange(K, dtype=jnp.int32)[None, :, None, None, None] * G
       + jnp.arange(G, dtype=jnp.int32)[None, None, None, :, None])
  i = (qi * bq + r0
       + jnp.arange(r1 - r0, dtype=jnp.int32)[None, None, :, None, None])
  h_row = dropout_lib.row_hash(seeds, b, n, i)  # (B, K, rows, G, 1)
  j = kj * bk + c0 + jnp.arange(c1 - c0, dtype=jnp.int32)
  bits = dropout_lib.bits_from_row(h_row, j, seeds[1])  # (B, K, rows, G, cols)
  keep = bits >= dropout_lib.threshold(st.dropout_rate)
  return _to_block_layout(keep, st, r1 - r0, c1 - c0, transposed)


# -- the schedule: which block pairs, and which parts of them, to compute -----

def _window_step(block: int) -> int:
  """Partial block pairs are cut along their outer block (rows in the
  forward, keys in the backward) at multiples of this many positions: an
  eighth of the block, between 8 and 64."""
  return max(8, min(64, block // 8))

# At most this many kinds of partial pair get their own windowed updates (each
# kind is one more copy of the update in the program); past it, partial pairs
# are computed whole, with a mask.
_MAX_SLOTS = 8


@dataclasses.dataclass(frozen=True)
class _Window:
  """Outer positions ``[lo, hi)`` of a block pair that one update covers."""
  lo: int
  hi: int
  masked: bool


@dataclasses.dataclass(frozen=True)
class _Schedule:
  """How one pass (forward: by query block; backward: by key block) visits
  the block pairs of its plan.

  For a band, the inner blocks an outer block visits are contiguous, and
  those the band allows entirely form a run inside them. That run is the
  main loop: whole blocks, no mask (unless per-example masks apply). The
  *partial* pairs on either side of it (the causal diagonal, the edges of a
  window, key padding) are where the work is wasted if computed whole: a
  query block of 1024 rows on the causal diagonal attends only some keys of
  each key block, and many of its rows all of them. So each partial pair is
  cut along the outer block into windows (positions that attend nothing are
  skipped, those the band allows entirely run unmasked, the rest masked).
  Pairs cut alike form a *slot*; every outer block has at most one pair per
  slot, at the inner block ``table[outer, slot]`` (-1: none).

  Attributes:
    ranges: ``(n_outer, 4)`` int32 ``(lo, a, b, hi)``: inner blocks ``[a,
      b)`` form the main loop, ``[lo, a)`` and ``[b, hi)`` are partial.
    slots: per slot, its windows; None when there would be too many slots
      (then partial pairs run whole and masked, in one loop).
    table: ``(n_outer, len(slots))`` int32, or None.
    main_masked: whether the main loop needs a mask (per-example masks).
  """
  ranges: np.ndarray
  slots: Optional[tuple[tuple[_Window, ...], ...]]
  table: Optional[np.ndarray]
  main_masked: bool


def _schedule(st: _Static, by_q: bool, has_data_mask: bool) -> _Schedule:
  """The :class:`_Schedule` of ``st.plan`` for the forward (``by_q``) or the
  backward.

  ``st.plan`` is planned for the band alone (``has_data_mask=False``): its
  unmasked pairs form the main loop, and ``has_data_mask`` puts the mask
  back into every update.
  """
  p, spec = st.plan, st.spec
  bq, bk = p.block_q, p.block_k
  n_outer = p.num_q_blocks if by_q else p.num_k_blocks
  b_outer = bq if by_q else bk
  len_outer = p.T if by_q else p.S
  step = _window_step(b_outer)

  def extent(i, j):
    """Real positions of block pair (i, j): padding is never attended."""
    return i * bq, min((i + 1) * bq, p.T), j * bk, min((j + 1) * bk, p.S)

  main, partial = ([[] for _ in range(n_outer)] for _ in range(2))
  for pairs, lists in ((p.unmasked, main), (p.masked, partial)):
    for i, j in sorted(pairs):
      o, n = (i, j) if by_q else (j, i)
      lists[o].append(n)

  ranges = np.zeros((n_outer, 4), np.int32)
  for o in range(n_outer):
    visited = sorted(main[o] + partial[o])
    if not visited:
      continue
    lo, hi = visited[0], visited[-1] + 1
    a, b = (min(main[o]), max(main[o]) + 1) if main[o] else (hi, hi)
    if len(visited) != hi - lo or len(main[o]) != b - a:
      raise AssertionError(f"Non-contiguous block plan for block {o}.")
    ranges[o] = lo, a, b, hi

  def windows(o, n):
    """The windows of partial pair (outer o, inner n)."""
    i, j = (o, n) if by_q else (n, o)
    q_lo, q_hi, k_lo, k_hi = extent(i, j)
    # Padded keys must be masked in the forward, where they are the inner
    # block; in the backward they are outer positions whose gradients are
    # dropped, and (being zero) they add nothing to dQ: no mask needed.
    k_padded = by_q and (j + 1) * bk > p.S
    steps = []  # per step: 0 attends nothing, 1 some, 2 everything
    for lo in range(0, b_outer, step):
      x_lo = o * b_outer + lo
      x_hi = min(x_lo + step, (o + 1) * b_outer, len_outer)
      if x_hi <= x_lo:  # padding only
        steps.append(0)
        continue
      ext = (x_lo, x_hi, k_lo, k_hi) if by_q else (q_lo, q_hi, x_lo, x_hi)
      if not spec.block_may_attend(*ext):
        steps.append(0)
      elif not k_padded and spec.block_fully_allowed(*ext):
        steps.append(2)
      else:
        steps.append(1)
    need = [u for u, c in enumerate(steps) if c]
    full = [u for u, c in enumerate(steps) if c == 2]
    n_lo, n_hi = need[0], need[-1] + 1
    if not full or (full[0] != n_lo and full[-1] + 1 != n_hi):
      full = []  # none, or inside the masked ones: cover all, masked
    masked = [u for u in range(n_lo, n_hi) if u not in full]
    to_pos = lambda u: min(u * step, b_outer)
    out = []
    for us, is_masked in ((masked, True), (full, False)):
      if us:
        out.append(_Window(to_pos(us[0]), to_pos(us[-1] + 1),
                           is_masked or has_data_mask))
    return tuple(sorted(out, key=lambda w: w.lo))

  slots, rows = {}, []
  for o in range(n_outer):
    row = {}
    for n in partial[o]:
      key = windows(o, n)
      s = slots.setdefault(key, len(slots))
      if s in row:  # two pairs alike in one outer block: no slots
        slots = None
        break
      row[s] = n
    if slots is None or len(slots) > _MAX_SLOTS:
      return _Schedule(ranges, None, None, has_data_mask)
    rows.append(row)
  table = np.full((n_outer, len(slots)), -1, np.int32)
  for o, row in enumerate(rows):
    for s, n in row.items():
      table[o, s] = n
  return _Schedule(ranges, tuple(slots), table, has_data_mask)


def _run_schedule(sched: _Schedule, o, body, carry):
  """Runs one outer block ``o``'s updates: ``body(inner, window, carry)``
  with ``window`` None (the whole pair) or a :class:`_Window`, and a static
  ``masked`` flag (see :func:`_schedule`)."""
  ranges = jnp.asarray(sched.ranges)[o]
  lo, a, b, hi = ranges[0], ranges[1], ranges[2], ranges[3]
  carry = lax.fori_loop(
      a, b, lambda n, c: body(n, None, sched.main_masked, c), carry)
  if sched.slots is None:
    # Partial pairs whole: both sides in one loop (one copy of the body).
    n_before = a - lo

    def partial_body(t, c):
      n = jnp.where(t < n_before, lo + t, b + t - n_before)
      return body(n, None, True, c)

    return lax.fori_loop(0, n_before + hi - b, partial_body, carry)
  table = jnp.asarray(sched.table)[o]
  for s, windows in enumerate(sched.slots):
    n = table[s]

    def run_slot(c, n=n, windows=windows):
      for w in windows:
        c = body(n, w, w.masked, c)
      return c

    carry = lax.cond(n >= 0, run_slot, lambda c: c, carry)
  return carry


# -- forward and backward -----------------------------------------------------


def _mm(a, b, contract_a: int, contract_b: int, dtype):
  """Batched matmul over the leading axis, fp32 accumulation."""
  dims = (((contract_a,), (contract_b,)), ((0,), (0,)))
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                         preferred_element_type=_F32)


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


def _window_slice(x, axis: int, window: Optional[_Window], G: int = 1):
  """``x``'s positions ``[window.lo, window.hi)`` (times ``G`` rows each)
  along ``axis``; all of ``x`` for None."""
  if window is None:
    return x
  return lax.slice_in_dim(x, window.lo * G, window.hi * G, axis=axis)


def _window_update(x, new, axis: int, window: Optional[_Window], G: int = 1):
  """``x`` with its window along ``axis`` replaced by ``new``."""
  if window is None:
    return new
  return lax.dynamic_update_slice_in_dim(x, new, window.lo * G, axis=axis)


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
  G = st.G
  Hv = vb.shape[-1]
  rate = st.dropout_rate
  qb, logit_scale = _prescale(st, qb)
  sched = _schedule(st, by_q=True, has_data_mask=bool(blocks))
  anchor = _anchor(qb, kb, vb, blocks, seeds)

  def step(qi, q, kj, window, masked, carry):
    if masked and blocks:
      # Skip blocks the per-example masks rule out (the state is unchanged
      # by a block with no allowed entry).
      return lax.cond(_block_live(blocks, st, qi, kj),
                      functools.partial(update, qi, q, kj, window, masked),
                      lambda c: c, carry)
    return update(qi, q, kj, window, masked, carry)

  def update(qi, q, kj, window, masked, carry):
    rows = None if window is None else (window.lo, window.hi)
    m_all, l_all, acc_all = carry  # (BK, R), (BK, R), (BK, R, Hv)
    m_prev, l_prev, acc_prev = (_window_slice(x, 1, window, G)
                                for x in carry)
    q = _window_slice(q, 1, window, G)  # (BK, rows*G, H)
    k = lax.dynamic_index_in_dim(kb, kj, 0, False)  # (BK, bk, H)
    v = lax.dynamic_index_in_dim(vb, kj, 0, False)  # (BK, bk, Hv)
    s = _mm(q, k, 2, 2, dtype)  # (BK, rows*G, bk)
    if logit_scale != 1.0:
      s = s * logit_scale
    if masked:
      allowed = _block_allowed(blocks, st, qi, kj, q_window=rows)
      s = jnp.where(allowed, s, masks_lib.MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))  # (BK, rows*G)
    # A row with nothing allowed yet has m_new == MASK_VALUE, so its masked
    # entries get exp(0) == 1 here. No pass zeroes them: the first allowed
    # entry raises the max and alpha == exp(MASK_VALUE - m) == 0 wipes them
    # out, and a row that never sees one is empty and is zeroed at the end.
    p = jnp.exp(s - m_new[..., None])  # (BK, rows*G, bk)
    # Rescale the old state to the new max (exp(MASK_VALUE - m) == 0).
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=-1)
    if rate > 0.0:
      # l_i sums the probabilities before dropout; 1 / (1 - rate) is applied
      # once at the end.
      p = jnp.where(_block_keep(seeds, st, qi, kj, q_window=rows), p, 0.0)
    acc_new = alpha[..., None] * acc_prev + _mm(p, v, 2, 1, dtype)
    return (_window_update(m_all, m_new, 1, window, G),
            _window_update(l_all, l_new, 1, window, G),
            _window_update(acc_all, acc_new, 1, window, G))

  def q_block(_, xs):
    qi, q = xs
    carry = (_fresh(anchor, (BK, R), masks_lib.MASK_VALUE),
             _fresh(anchor, (BK, R)), _fresh(anchor, (BK, R, Hv)))
    m_i, l_i, acc = _run_schedule(sched, qi, functools.partial(step, qi, q),
                                  carry)
    # Rows that attended nothing kept m_i == MASK_VALUE (and l_i == 0, or
    # the count of masked entries seen): zero output and the empty-row LSE,
    # set explicitly.
    nonempty = m_i > masks_lib.MASK_VALUE
    safe_l = jnp.where(nonempty, l_i, 1.0)
    # Kept probabilities are scaled by 1 / (1 - rate); the LSE ignores
    # dropout.
    norm = safe_l * (1.0 - rate) if rate > 0.0 else safe_l
    out = jnp.where(nonempty[..., None], acc / norm[..., None], 0.0)
    lse = jnp.where(nonempty, m_i + jnp.log(safe_l),
                    masks_lib.EMPTY_ROW_LSE)
    return None, (out, lse)

  _, (out, lse) = lax.scan(q_block, None,
                           (jnp.arange(nq, dtype=jnp.int32), qb))
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
  sched = _schedule(st, by_q=False, has_data_mask=bool(blocks))
  anchor = _anchor(qb, kb, vb, blocks, seeds, out, lse, d_out, d_lse)

  def contributions(kj, k, v, window, masked, qi):
    """Block ``(qi, kj)``'s terms of dQ^T, dK and dV (the latter for the
    keys of ``window``).

    Computed keys-first (``S^T = K Q^T``) so that dK and dV, the products
    summed over queries, are plain matmuls; on CPU a matmul contracting its
    left operand's leading dim runs at about half speed.
    """
    cols = None if window is None else (window.lo, window.hi)
    k = _window_slice(k, 1, window)  # (BK, cols, H)
    v = _window_slice(v, 1, window)  # (BK, cols, Hv)
    q = lax.dynamic_index_in_dim(qb, qi, 0, False)  # (BK, R, H)
    do = lax.dynamic_index_in_dim(d_out, qi, 0, False)  # (BK, R, Hv)
    lse_i = lax.dynamic_index_in_dim(lse, qi, 0, False)  # (BK, R)
    delta_i = lax.dynamic_index_in_dim(delta, qi, 0, False)
    s_t = _mm(k, q, 2, 2, dtype)  # (BK, cols, R)
    if logit_scale != 1.0:
      s_t = s_t * logit_scale
    p_t = jnp.exp(s_t - lse_i[:, None, :])
    if masked:
      # Masked entries, and every entry of an empty row (lse ==
      # EMPTY_ROW_LSE), get probability zero.
      p_t = jnp.where(
          _block_allowed(blocks, st, qi, kj, True, k_window=cols), p_t, 0.0)
    dp_t = _mm(v, do, 2, 2, dtype)  # (BK, cols, R)
    pz_t = p_t
    if rate > 0.0:
      keep = _block_keep(seeds, st, qi, kj, True, k_window=cols)
      pz_t = jnp.where(keep, p_t * (1.0 / (1.0 - rate)), 0.0)
      dp_t = jnp.where(keep, dp_t * (1.0 / (1.0 - rate)), 0.0)
    ds_t = p_t * (dp_t - delta_i[:, None, :])  # (BK, cols, R), unscaled
    # q is prescaled (or logit_scale is applied to dK below), so dS^T q
    # carries the one factor of the scale that dK needs.
    return (_mm(k, ds_t, 1, 1, dtype),  # dQ^T: (BK, H, R)
            _mm(ds_t, q, 2, 1, dtype),  # dK: (BK, cols, H)
            _mm(pz_t, do, 2, 1, dtype))  # dV: (BK, cols, Hv)

  def step(kj, k, v, qi, window, masked, carry):
    dq_all, dk, dv = carry  # (nq, BK, H, R), (BK, bk, H), (BK, bk, Hv)
    dq_i = lax.dynamic_index_in_dim(dq_all, qi, 0, False)  # (BK, H, R)

    def update(state):
      dq_i, dk, dv = state
      dq_c, dk_c, dv_c = contributions(kj, k, v, window, masked, qi)
      return (dq_i + dq_c,
              _window_update(dk, _window_slice(dk, 1, window) + dk_c, 1,
                             window),
              _window_update(dv, _window_slice(dv, 1, window) + dv_c, 1,
                             window))

    if masked and blocks:
      # Skip blocks the per-example masks rule out. Only block-sized values
      # pass through the cond, never the whole dQ.
      dq_i, dk, dv = lax.cond(_block_live(blocks, st, qi, kj), update,
                              lambda state: state, (dq_i, dk, dv))
    else:
      dq_i, dk, dv = update((dq_i, dk, dv))
    return lax.dynamic_update_index_in_dim(dq_all, dq_i, qi, 0), dk, dv

  def k_block(dq_all, xs):
    kj, k, v = xs
    carry = (dq_all, _fresh(anchor, k.shape), _fresh(anchor, v.shape))
    dq_all, dk, dv = _run_schedule(
        sched, kj,
        lambda qi, window, masked, c: step(kj, k, v, qi, window, masked, c),
        carry)
    return dq_all, (dk * logit_scale, dv)

  nq, BK, R, H = qb.shape
  dq_t, (dk, dv) = lax.scan(
      k_block, _fresh(anchor, (nq, BK, H, R)),
      (jnp.arange(nk, dtype=jnp.int32), kb, vb))
  return jnp.swapaxes(dq_t, 2, 3) * st.scale, dk, dv


def _run_forward(st: _Static, q, k, v, data, seeds):
  """Blocks the inputs with the forward plan and runs :func:`_forward`.

  Returns:
    ``out (B, T, N, Hv)`` float32 and ``lse (B, N, T)``.
  """
  p = st.plan
  qb = _q_to_blocks(q, st.K, p.num_q_blocks, p.block_q)
  kb = _kv_to_blocks(k, p.num_k_blocks, p.block_k)
  vb = _kv_to_blocks(v, p.num_k_blocks, p.block_k)
  out, lse = _forward(st, qb, kb, vb, _block_data(data, st), seeds)
  return (_q_from_blocks(out, st.B, p.T, st.K, st.G),
          _rows_from_blocks(lse, st.B, p.T, st.K, st.G))


def _rows_to_blocks(x, K: int, nq: int, bq: int):
  """Per-row ``(B, N, T)`` -> ``(nq, B*K, bq*G)``."""
  return _q_to_blocks(jnp.swapaxes(x, 1, 2)[..., None], K, nq, bq)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, data, seeds):
  return _run_forward(st, q, k, v, data, seeds)


def _attention_fwd(st, q, k, v, data, seeds):
  out, lse = _run_forward(st, q, k, v, data, seeds)
  return (out, lse), (q, k, v, data, seeds, out, lse)


def _attention_bwd(st, residuals, cotangents):
  """Re-blocks everything with the backward plan and runs
  :func:`_backward`."""
  q, k, v, data, seeds, out, lse = residuals
  d_out, d_lse = cotangents
  sb = dataclasses.replace(st, plan=st.bwd_plan)
  p = sb.plan
  nq, bq, nk, bk = p.num_q_blocks, p.block_q, p.num_k_blocks, p.block_k
  dq, dk, dv = _backward(
      sb, _q_to_blocks(q, st.K, nq, bq), _kv_to_blocks(k, nk, bk),
      _kv_to_blocks(v, nk, bk), _block_data(data, sb), seeds,
      _q_to_blocks(out, st.K, nq, bq),
      # Empty rows: their LSE is finite (EMPTY_ROW_LSE) and every one of
      # their entries is masked, so their probabilities are zero.
      _rows_to_blocks(lse, st.K, nq, bq),
      _q_to_blocks(d_out.astype(_F32), st.K, nq, bq),
      _rows_to_blocks(d_lse.astype(_F32), st.K, nq, bq))
  dq = _q_from_blocks(dq, st.B, p.T, st.K, st.G)
  dk = _kv_from_blocks(dk, st.B, p.S, st.K)
  dv = _kv_from_blocks(dv, st.B, p.S, st.K)
  # Integer and boolean inputs (masks, seeds) get no cotangent.
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          jax.tree.map(lambda _: None, data), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


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
    block_sizes = DEFAULT_BLOCK_SIZES
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError("`block_sizes` for backend='xla' must be a "
                    "pallas_kernels.blockwise.BlockSizes or None; got "
                    f"{type(block_sizes).__name__}.")
  pr = prep.problem
  # Planned for the band alone: the per-example masks are applied by the
  # schedule (see _schedule).
  st = _Static(
      plan=plan(prep.spec, pr.T, pr.S, block_sizes),
      bwd_plan=plan(prep.spec, pr.T, pr.S, block_sizes.backward),
      spec=prep.spec, B=pr.B, K=pr.K, G=pr.groups, scale=prep.scale,
      dropout_rate=prep.dropout_rate)
  # Matmuls run in the inputs' common dtype with fp32 accumulation.
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  out, lse = _attention(st, q.astype(dtype), k.astype(dtype),
                        v.astype(dtype), prep.data, prep.seeds)
  return out.astype(q.dtype), lse
