"""Memory-linear blockwise attention in plain JAX (the ``"xla"`` target).

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads (``N % K == 0``), G query heads per key/value head
(``N // K``), H head dim, Hv value head dim. Inside this module q is laid
out in rows, ``(B*K, T*G, H)``, and k and v as ``(B*K, S, H)``: the G query
heads that share a key head are folded into the rows of one matmul, so GQA
never repeats K or V, and a block is a contiguous range of rows. The forward
lays its inputs out so once, and the backward reuses them.

The online softmax of FlashAttention-2 (arXiv:2307.08691) written with XLA
loops instead of a kernel. The forward scans over query blocks and, for
each, loops over the key blocks a static :class:`BlockPlan` lists, keeping
the running max ``m_i``, normaliser ``l_i`` and unnormalised output of its
rows; besides its inputs (in row layout) it saves only ``out`` and the
log-sum-exp. The backward scans over key blocks, loops over the query blocks
that see each, and recomputes the probabilities from the saved log-sum-exp.
Nothing of size ``T x S`` is ever stored, so memory is linear in the
sequence lengths. Each update computes the scores of all its examples'
heads at once; a large batch is taken a few examples at a time, so that
these stay near the size the blocks were tuned at
(:func:`_examples_per_step`). The steps cut the row layout, which is laid
out once for the whole batch and shared by both passes (:func:`_over_steps`).
Under ``vmap`` the vmapped axis is folded into the batch
(:func:`_folding_vmap`), so an ensemble's attention runs as one call.

Pairs the band (causal, sliding window) rules out are not in the plan at
all. Pairs the band allows entirely, with no per-example mask, run a body
with no mask code. The partial pairs in between (the causal diagonal, the
edges of a window) form each outer block's edge, cut into chunks of outer
positions: each chunk visits only the inner positions it may attend, those
it attends entirely in one unmasked piece and only about a chunk's width
with a mask (:func:`_schedule`). So causal attention computes the triangle
plus half a chunk per row, whatever the block sizes. Under a plain causal
mask, diagonal blocks of 512 positions or more are instead cut into halving
squares, stacked into a few wide updates (:func:`_triangle_state`,
:func:`_triangle_grads`). Per-example masks
(segments, lengths, dense) are evaluated per block: a block they rule out
for every example is skipped at run time, and the blocks that the band and
they allow entirely (the first run of them in each outer block) run
without a mask.

It runs on any backend and is the CPU default for long sequences.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import common
from pallas_kernels import dropout as dropout_lib
from pallas_kernels import higher_order
from pallas_kernels import masks as masks_lib

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Block lengths of the blockwise path, forward and backward.

  The forward loops over query blocks of ``block_q`` rows, each over key
  blocks of ``block_k`` keys; the backward loops over key blocks of
  ``block_k_bwd`` keys, each over query blocks of ``block_q_bwd`` rows. Both
  slice their blocks from the same row layout, so the two need not agree.

  The defaults (:func:`default_block_sizes`) were measured on a 2-core
  AVX-512 CPU (fp32, B=1, N=8, H=64, T=S=1024 to 4096, full and causal;
  ``python -m benchmarks.attention_core --sweep``): the CPU's batched
  matmuls run about twice as fast with 1024 rows as with 256, so full
  attention's forward takes tall query blocks; under a band (causal, a
  window) squarer 512 x 512 blocks leave smaller edges to cut. The
  backward's products contract over both rows and keys: for full attention,
  key blocks of 1024 against 256 rows ran its forward+backward 7-9% faster
  than 512 (B=1, T=1024 to 4096; 2% at B=4); under a band they would widen
  the diagonal edge, and 512 stays, but for causal attention over 4096 keys
  or more, where 1024 x 512 forward blocks and 1024-key backward blocks
  pay. Against 1024 keys, 128 rows time the same as 256 and keep 7.5 MiB
  fewer temporaries (B=1; see :func:`default_block_sizes`). A block longer
  than the sequence is shortened to it, and the blocks of a ragged sequence
  are balanced so that padding stays below one row per block.

  Attributes:
    block_q, block_k: forward query rows and keys per block.
    block_q_bwd, block_k_bwd: backward query rows and keys per block; None
      for the forward's.

  >>> BlockSizes(block_q=256, block_k=512).backward
  BlockSizes(block_q=256, block_k=512, block_q_bwd=None, block_k_bwd=None)
  >>> DEFAULT_BLOCK_SIZES.backward
  BlockSizes(block_q=128, block_k=1024, block_q_bwd=None, block_k_bwd=None)
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
      common.store_int_field(self, name, "a positive int", lambda v: v > 0)

  @property
  def backward(self) -> "BlockSizes":
    """The backward's block lengths, as forward ones (what :func:`plan`
    takes)."""
    return BlockSizes(
        self.block_q if self.block_q_bwd is None else self.block_q_bwd,
        self.block_k if self.block_k_bwd is None else self.block_k_bwd)


DEFAULT_BLOCK_SIZES = BlockSizes(block_q=1024, block_k=256, block_q_bwd=128,
                                 block_k_bwd=1024)
DEFAULT_BANDED_BLOCK_SIZES = BlockSizes(block_q=512, block_k=512,
                                        block_q_bwd=256, block_k_bwd=512)
DEFAULT_LONG_CAUSAL_BLOCK_SIZES = BlockSizes(block_q=1024, block_k=512,
                                             block_q_bwd=256,
                                             block_k_bwd=1024)
# Causal attention over at least this many keys takes
# DEFAULT_LONG_CAUSAL_BLOCK_SIZES.
LONG_CAUSAL_MIN_LENGTH = 4096
# Full attention's backward rows per block against keys shortened below
# DEFAULT_BLOCK_SIZES.block_k_bwd (S < 1024).
_SHORT_KEYS_BLOCK_Q_BWD = 256


def default_block_sizes(spec: masks_lib.MaskSpec,
                        S: Optional[int] = None) -> BlockSizes:
  """The block sizes used when none are given: :data:`DEFAULT_BLOCK_SIZES`
  for full attention, :data:`DEFAULT_BANDED_BLOCK_SIZES` under a band, but
  :data:`DEFAULT_LONG_CAUSAL_BLOCK_SIZES` for causal attention over
  ``S >= LONG_CAUSAL_MIN_LENGTH`` keys.

  Full attention's backward takes 128 query rows against its 1024-key
  blocks, but 256 when the keys are fewer (``S < 1024``, its key block
  shortened to S). Measured on the layer's forward+backward (loss gradient,
  fp32, N=8, H=64, D=512; 128 rows over 256): the core timed the same at
  T=1024 to 4096 (0.98-1.02, control 0.97-1.03); at B=1, T=1024 the layer's
  temporaries fell from 32.1 to 24.6 MiB, under the 32 MiB past which glibc
  always maps them afresh and page-faults them in on every call. Timed on
  its own it then ran 9% faster; among other programs (``benchmarks.compare``)
  it could still fault, as glibc's threshold below 32 MiB follows what the
  process freed before. At T=512, 128 rows ran 4-6% slower.

  A causal diagonal block costs about as much as a whole one on CPU (see
  ``_triangle_state``), so short sequences keep 512-position blocks, whose
  diagonal is narrower. Over 4096 keys or more the diagonal is a smaller
  share of the work and the faster matmuls of larger blocks win: against
  512 x 512 forward and (256 rows, 512 keys) backward blocks, 1024 x 512
  and (256, 1024) ran the causal core 4-7% faster at T=4096 (B=1 and 4)
  and 6-10% at T=8192 (B=1), the same at T=3072 and 3-16% slower at
  T=2048 (fp32, N=8, H=64; ``python -m benchmarks.blockwise_ab`` and a
  sweep of six candidates, medians of 7-9 rounds). The layer (B=1, T=4096)
  ran 3% faster forward and 3.5% forward+backward. Their forward+backward
  temporaries grow at T=4096 (core 53 to 92 MiB, layer 82 to 108 MiB) and
  are the same from T=16384 on.

  Args:
    spec: the band.
    S: the key length, or None for long keys.

  >>> causal = masks_lib.MaskSpec.causal()
  >>> default_block_sizes(causal, S=2048).block_q
  512
  >>> default_block_sizes(causal, S=4096) == DEFAULT_LONG_CAUSAL_BLOCK_SIZES
  True
  >>> default_block_sizes(masks_lib.MaskSpec.full(), S=512).block_q_bwd
  256
  """
  if not spec.is_full:
    if spec == masks_lib.MaskSpec.causal() and (
        S is None or S >= LONG_CAUSAL_MIN_LENGTH):
      return DEFAULT_LONG_CAUSAL_BLOCK_SIZES
    return DEFAULT_BANDED_BLOCK_SIZES
  if S is not None and S < DEFAULT_BLOCK_SIZES.block_k_bwd:
    return dataclasses.replace(DEFAULT_BLOCK_SIZES,
                               block_q_bwd=_SHORT_KEYS_BLOCK_Q_BWD)
  return DEFAULT_BLOCK_SIZES


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

  @property
  def padded_T(self) -> int:
    """T padded to whole query blocks."""
    return self.num_q_blocks * self.block_q

  @property
  def padded_S(self) -> int:
    """S padded to whole key blocks."""
    return self.num_k_blocks * self.block_k


@functools.lru_cache(maxsize=128)
def plan(spec: masks_lib.MaskSpec, T: int, S: int,
         block_sizes: Optional[BlockSizes] = None) -> BlockPlan:
  """Lists the block pairs that ``spec`` does not rule out.

  The plan is the band's alone: per-example masks (lengths, segments, a
  boolean mask) are applied by the schedule, which masks every update when
  they are present (see ``_schedule``).

  Args:
    spec: the band.
    T, S: query and key lengths.
    block_sizes: None for the defaults (:func:`default_block_sizes`).

  >>> sizes = BlockSizes(block_q=256, block_k=256)
  >>> causal = plan(masks_lib.MaskSpec.causal(), 1024, 1024, sizes)
  >>> full = plan(masks_lib.MaskSpec.full(), 1024, 1024, sizes)
  >>> causal.num_visited, full.num_visited, len(causal.masked)
  (10, 16, 4)
  """
  bs = block_sizes or default_block_sizes(spec, S)
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
      full = (k_hi == (j + 1) * bk
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


def _rows(x, K: int, length: int):
  """``(B, T, N, H)`` -> ``(B*K, length*G, H)``, zero-padded: each group of
  ``G = N // K`` heads in one batch entry, its rows ordered by (position,
  head). Keys and values (``N == K``) get ``(B*K, length, H)``. Query block
  ``i`` of length ``bq`` is the row range ``[i*bq*G, (i+1)*bq*G)``."""
  B, _, N, H = x.shape
  G = N // K
  x = _pad_axis(x, 1, length).reshape(B, length, K, G, H)
  return x.transpose(0, 2, 1, 3, 4).reshape(B * K, length * G, H)


def _row_values(x, K: int, length: int):
  """Per-row ``(B, N, T)`` -> ``(B*K, length*G)``, zero-padded."""
  return _rows(jnp.swapaxes(x, 1, 2)[..., None], K, length)[..., 0]


def _q_from_blocks(x, T: int, K: int, G: int):
  """``(steps, nq, B*K, bq*G, Hv)`` -> ``(steps*B, T, N, Hv)``."""
  steps, nq, BK, R, Hv = x.shape
  B, bq = BK // K, R // G
  x = x.reshape(steps, nq, B, K, bq, G, Hv).transpose(0, 2, 1, 4, 3, 5, 6)
  return x.reshape(steps * B, nq * bq, K * G, Hv)[:, :T]


def _row_values_from_blocks(x, T: int, K: int, G: int):
  """Per-row ``(steps, nq, B*K, bq*G)`` -> ``(steps*B, N, T)``."""
  steps, nq, BK, R = x.shape
  B, bq = BK // K, R // G
  x = x.reshape(steps, nq, B, K, bq, G).transpose(0, 2, 3, 5, 1, 4)
  return x.reshape(steps * B, K * G, nq * bq)[:, :, :T]


def _kv_from_blocks(x, S: int, K: int):
  """``(steps, nk, B*K, bk, H)`` -> ``(steps*B, S, K, H)``."""
  steps, nk, BK, bk, H = x.shape
  B = BK // K
  x = x.reshape(steps, nk, B, K, bk, H).transpose(0, 2, 1, 4, 3, 5)
  return x.reshape(steps * B, nk * bk, K, H)[:, :S]


# -- masks and dropout of a range of positions ----------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about a call that shapes the computation (hashable).

  ``plan`` is the plan of the pass at hand: the forward's, or in the
  backward ``bwd_plan``. ``B`` is the examples of one step
  (:func:`_examples_per_step`), not always the whole batch.
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
  """Pads the per-example masks to whole blocks.

  Also summarises each block for the run-time tests of
  :func:`_block_tests`. Padded positions are masked by position or never
  visited, so the padding values themselves never matter.
  """
  p = st.plan
  nq, nk, bq, bk = p.num_q_blocks, p.num_k_blocks, p.block_q, p.block_k
  Tp, Sp = p.padded_T, p.padded_S
  out = {}
  if data.q_segment_ids is not None:
    # Edge padding keeps each block's id range that of its real entries.
    q_ids = jnp.pad(data.q_segment_ids, ((0, 0), (0, Tp - p.T)), mode="edge")
    kv_ids = jnp.pad(data.kv_segment_ids, ((0, 0), (0, Sp - p.S)),
                     mode="edge")
    out["q_ids"], out["kv_ids"] = q_ids, kv_ids  # (B, Tp), (B, Sp)
    q_ids = q_ids.reshape(st.B, nq, bq)
    kv_ids = kv_ids.reshape(st.B, nk, bk)
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
    by_block = mask.reshape(mB, mN, nq, bq, nk, bk)
    out["mask_any"] = by_block.any(axis=(0, 1, 3, 5))  # (nq, nk)
    out["mask_all"] = by_block.all(axis=(0, 1, 3, 5))  # (nq, nk)
  return out


def _block_tests(blocks, st: _Static, qi, kj):
  """What the per-example masks say of block ``(qi, kj)``, for every example
  and head at once.

  Returns:
    ``(live, full)``, scalar bools, both None without such masks: ``live``
    is False when they rule out every entry (the block can be skipped);
    ``full`` is True when they allow every entry (it needs no mask of
    theirs). Each test of ``live`` is a necessary condition for an allowed
    entry, and each of ``full`` for a masked one's absence, so both are the
    AND of their tests.
  """
  p = st.plan
  live, full = [], []
  if "q_id_range" in blocks:
    q_min, q_max = (x[:, qi] for x in blocks["q_id_range"])  # (B,)
    kv_min, kv_max = (x[:, kj] for x in blocks["kv_id_range"])
    # Two blocks share a segment id only if their id ranges overlap; they
    # allow every pair only with one id across both.
    live.append(jnp.any((q_max >= kv_min) & (kv_max >= q_min)))
    full.append(jnp.all((q_min == q_max) & (kv_min == kv_max)
                        & (q_min == kv_min)))
  if "q_lengths" in blocks:
    live.append(qi * p.block_q < jnp.max(blocks["q_lengths"]))
    full.append((qi + 1) * p.block_q <= jnp.min(blocks["q_lengths"]))
  if "kv_lengths" in blocks:
    live.append(kj * p.block_k < jnp.max(blocks["kv_lengths"]))
    full.append((kj + 1) * p.block_k <= jnp.min(blocks["kv_lengths"]))
  if "mask_any" in blocks:
    live.append(blocks["mask_any"][qi, kj])
    full.append(blocks["mask_all"][qi, kj])
  both = lambda tests: (functools.reduce(jnp.logical_and, tests) if tests
                        else None)
  return both(live), both(full)


def _masked_step(blocks, st: _Static, qi, kj, masked: bool, step, carry):
  """Runs ``step(masked, carry)`` on block ``(qi, kj)``, skipping it (the
  carry returned unchanged) when it is masked and the per-example masks rule
  it out for every example."""
  if masked and blocks:
    return lax.cond(_block_tests(blocks, st, qi, kj)[0],
                    functools.partial(step, True), lambda c: c, carry)
  return step(masked, carry)


def _full_blocks(blocks, st: _Static, o, by_q: bool):
  """``(n_inner,)`` bool: which inner blocks of outer block ``o`` the
  per-example masks allow entirely, for every example; None without such
  masks."""
  p = st.plan
  n_inner = p.num_k_blocks if by_q else p.num_q_blocks
  if not blocks:
    return None
  pair = (lambda n: (o, n)) if by_q else (lambda n: (n, o))
  return jax.vmap(lambda n: _block_tests(blocks, st, *pair(n))[1])(
      jnp.arange(n_inner, dtype=jnp.int32))


def _to_block_layout(x, st: _Static, rows: int, cols: int,
                     transposed: bool):
  """``(#B, #K, rows, #G, cols)`` -> ``(B*K, rows*G, cols)``, or ``(B*K,
  cols, rows*G)`` when ``transposed``."""
  B, K, G = st.B, st.K, st.G
  x = jnp.broadcast_to(x, (B, K, rows, G, cols))
  if transposed:
    return jnp.moveaxis(x, 4, 2).reshape(B * K, cols, rows * G)
  return x.reshape(B * K, rows * G, cols)


def _allowed(blocks, st: _Static, q0, rows: int, k0, cols: int,
             transposed: bool = False):
  """The mask of queries ``[q0, q0 + rows)`` against keys ``[k0, k0 +
  cols)``: band, key padding and the per-example masks ANDed.

  Args:
    blocks: from :func:`_block_data`.
    q0, k0: traced first positions; the ranges lie inside the padded
      lengths.
    rows, cols: static counts.
    transposed: keys first.

  Returns:
    ``(B*K, rows*G, cols)`` bool, or ``(B*K, cols, rows*G)`` if
    ``transposed``.
  """
  K, G = st.K, st.G
  q_pos = q0 + jnp.arange(rows, dtype=jnp.int32)  # (rows,)
  k_pos = k0 + jnp.arange(cols, dtype=jnp.int32)  # (cols,)
  # Built as (#B, #K, rows, #G, cols); size-1 dims broadcast.
  band = jnp.asarray(st.spec.allows(q_pos[:, None], k_pos[None, :]))
  band = jnp.broadcast_to(band & (k_pos[None, :] < st.plan.S), (rows, cols))
  allowed = band[None, None, :, None, :]
  if "q_ids" in blocks:
    q_ids = lax.dynamic_slice_in_dim(blocks["q_ids"], q0, rows, 1)
    kv_ids = lax.dynamic_slice_in_dim(blocks["kv_ids"], k0, cols, 1)
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
    mask = lax.dynamic_slice(mask, (0, 0, q0, k0),
                             (mB, mN, rows, cols))  # (#B, #N, rows, cols)
    mK, mG = (K, G) if mN > 1 else (1, 1)
    mask = mask.reshape(mB, mK, mG, rows, cols).transpose(0, 1, 3, 2, 4)
    allowed = allowed & mask  # (#B, #K, rows, #G, cols)
  return _to_block_layout(allowed, st, rows, cols, transposed)


class _Seeds(NamedTuple):
  """The dropout hash's inputs for ``B`` examples.

  ``words`` is the ``(2,)`` int32 of :func:`dropout_lib.seed_words`, or
  ``(B, 2)``, one pair per example, when a ``vmap`` over keys was folded
  into the batch (:func:`_folding_vmap`). ``examples`` ``(B,)`` int32 is
  each example's index in its own call's batch, which the hash takes.
  """
  words: jax.Array
  examples: jax.Array


def _keep(seeds: _Seeds, st: _Static, q0, rows: int, k0, cols: int,
          transposed: bool = False):
  """The dropout keep mask of queries ``[q0, q0 + rows)`` against keys
  ``[k0, k0 + cols)``, laid out as :func:`_allowed`'s.

  Absolute indices (batch, query head, query, key) go into the hash, so the
  bits are the reference's.
  """
  K, G = st.K, st.G
  b = seeds.examples[:, None, None, None, None]
  words = seeds.words
  if words.ndim == 2:  # a pair per example: (2, B, 1, 1, 1, 1)
    words = words.T[:, :, None, None, None, None]
  n = (jnp.arange(K, dtype=jnp.int32)[None, :, None, None, None] * G
       + jnp.arange(G, dtype=jnp.int32)[None, None, None, :, None])
  i = q0 + jnp.arange(rows, dtype=jnp.int32)[None, None, :, None, None]
  h_row = dropout_lib.row_hash(words, b, n, i)  # (B, K, rows, G, 1)
  j = k0 + jnp.arange(cols, dtype=jnp.int32)
  # (B, K, rows, G, cols)
  bits = dropout_lib.bits_from_row(h_row, j, words[1])
  keep = bits >= dropout_lib.threshold(st.dropout_rate)
  return _to_block_layout(keep, st, rows, cols, transposed)


# -- the schedule: which block pairs, and which parts of them, to compute -----


def _chunk_width(block: int) -> int:
  """The edges of an outer block are cut into chunks of this many outer
  positions: a quarter of the block, between 8 and 64.

  Measured causal against full (fp32, N=8, H=64, B=1 and 4, T=128 to 4096,
  forward and backward): 64 beat 32 and 128 with the 512-position blocks
  of long sequences; shorter blocks (short sequences) want fewer, wider
  chunks than an eighth, as the pieces get too small to run fast.
  """
  return max(8, min(64, block // 4))


# Unmasked pieces start and end on multiples of this many inner positions
# (relative to the outer block), so masked ones have friendly widths.
_PIECE_ALIGN = 8

# At most this many kinds of edge (each kind is one more copy of the updates
# in the program); past it, partial pairs are computed whole, with a mask.
_MAX_KINDS = 8


@dataclasses.dataclass(frozen=True)
class _Piece:
  """One update of an outer block's edge: its positions ``[lo, hi)`` against
  inner positions ``[inner_lo, inner_hi)``, both relative to the outer
  block's first position."""
  lo: int
  hi: int
  inner_lo: int
  inner_hi: int
  masked: bool


@dataclasses.dataclass(frozen=True)
class _Schedule:
  """How one pass (forward: by query block; backward: by key block) visits
  the block pairs of its plan.

  For a band, the inner blocks an outer block visits are contiguous, and
  those the band allows entirely form a run inside them. That run is the
  *main loop*: whole blocks, no mask (unless per-example masks apply). The
  partial pairs on either side (the causal diagonal, the edges of a window,
  padded keys) form the outer block's *edge*, where computing whole blocks
  wastes work: a query block of 1024 rows on the causal diagonal needs only
  the triangle below it. So the edge is cut into chunks of outer positions,
  and each chunk visits exactly the inner positions it may attend: those it
  attends entirely in one unmasked piece, the rest (about a chunk's width)
  in a masked one. Chunks with the same pieces are merged. An edge is a
  tuple of :class:`_Piece`; outer blocks with the same edge (relative to
  their start) share one *kind*, compiled once.

  Attributes:
    ranges: ``(n_outer, 4)`` int32 ``(lo, a, b, hi)``: inner blocks ``[a,
      b)`` form the main loop, ``[lo, a)`` and ``[b, hi)`` are partial.
    kinds: the distinct edges, ``kinds[0] == ()``; None when there would be
      too many (then partial pairs run whole and masked, in one loop).
    kind: ``(n_outer,)`` int32 index into ``kinds``, or None.
    span: ``[lo, hi)`` inner positions, relative to the outer block, that
      cover every piece of every kind (``(0, 0)`` for none).
    main_masked: whether the main loop needs a mask (per-example masks).
  """
  ranges: np.ndarray
  kinds: Optional[tuple[tuple[_Piece, ...], ...]]
  kind: Optional[np.ndarray]
  span: tuple[int, int]
  main_masked: bool


def _schedule(st: _Static, by_q: bool, has_data_mask: bool) -> _Schedule:
  """The :class:`_Schedule` of ``st.plan`` for the forward (``by_q``) or the
  backward.

  ``st.plan`` is planned for the band alone: its unmasked pairs form the
  main loop, and ``has_data_mask`` (per-example masks) puts a mask into
  every update.
  """
  p, spec = st.plan, st.spec
  n_outer = p.num_q_blocks if by_q else p.num_k_blocks
  b_outer, b_inner = (p.block_q, p.block_k) if by_q else (p.block_k,
                                                          p.block_q)
  len_outer, len_inner = (p.T, p.S) if by_q else (p.S, p.T)
  # Seen from the outer axis, inner position y may pair with outer x iff
  # x - before <= y <= x + after (None: unbounded).
  before, after = (spec.left, spec.right) if by_q else (spec.right,
                                                        spec.left)
  width = _chunk_width(b_outer)

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

  def edge(o):
    """The pieces of outer block ``o``'s partial pairs."""
    lo, a, b, hi = (int(x) for x in ranges[o])
    base = o * b_outer
    regions = [(n0 * b_inner, min(n1 * b_inner, len_inner))
               for n0, n1 in ((lo, a), (b, hi))]
    chunks = []  # [outer lo, outer hi, pieces relative to base]
    for c_lo in range(0, b_outer, width):
      c_hi = min(c_lo + width, b_outer)
      # Real positions only: padding attends nothing it must.
      x0, x1 = base + c_lo, min(base + c_hi, len_outer)
      if x1 <= x0:
        break
      may = (-math.inf if before is None else x0 - before,
             math.inf if after is None else x1 + after)
      # Shrunk to multiples of _PIECE_ALIGN from the block's start.
      n = _PIECE_ALIGN
      full = (-math.inf if before is None
              else base + _cdiv(x1 - 1 - before - base, n) * n,
              math.inf if after is None
              else base + (x0 + after + 1 - base) // n * n)
      pieces = []
      for r0, r1 in regions:
        m0, m1 = max(may[0], r0), min(may[1], r1)
        if m0 >= m1:
          continue
        f0, f1 = max(full[0], m0), min(full[1], m1)
        if has_data_mask or f0 >= f1:
          cuts = [(m0, m1, True)]
        else:
          cuts = [(m0, f0, True), (f0, f1, False), (f1, m1, True)]
        pieces += [(y0 - base, y1 - base, masked) for y0, y1, masked in cuts
                   if y0 < y1]
      if chunks and chunks[-1][2] == pieces:
        chunks[-1][1] = c_hi  # the same pieces as the last chunk: merge
      else:
        chunks.append([c_lo, c_hi, pieces])
    return tuple(_Piece(c_lo, c_hi, y0, y1, masked)
                 for c_lo, c_hi, pieces in chunks
                 for y0, y1, masked in pieces)

  kinds, kind = {(): 0}, np.zeros((n_outer,), np.int32)
  for o in range(n_outer):
    kind[o] = kinds.setdefault(edge(o), len(kinds))
  if len(kinds) > _MAX_KINDS + 1:
    return _Schedule(ranges, None, None, (0, 0), has_data_mask)
  return _Schedule(ranges, tuple(kinds), kind,
                   _span([pc for k in kinds for pc in k]), has_data_mask)


def _span(pieces) -> tuple[int, int]:
  """The ``[lo, hi)`` inner positions that cover ``pieces`` (``(0, 0)`` for
  none)."""
  if not pieces:
    return 0, 0
  return min(pc.inner_lo for pc in pieces), max(pc.inner_hi for pc in pieces)


def _chunks(edge: tuple[_Piece, ...]):
  """``edge``'s pieces grouped by chunk: ``[(lo, hi, pieces), ...]``."""
  return [(lo, hi, tuple(group)) for (lo, hi), group in
          itertools.groupby(edge, key=lambda pc: (pc.lo, pc.hi))]


def _join_chunks(edge: tuple[_Piece, ...], length: int, fresh, run_chunk,
                 carry=None):
  """Runs ``edge`` chunk by chunk, each from a fresh state, and joins the
  chunk states.

  Args:
    edge: the pieces of one outer block.
    length: the outer block's length.
    fresh: ``fresh(n)``, the state of ``n`` outer positions no piece
      touches: a tuple of arrays with the positions on axis 1.
    run_chunk: ``run_chunk(pieces, lo, hi, state, carry) -> (state,
      carry)`` for the chunk at outer positions ``[lo, hi)``, starting from
      ``fresh(hi - lo)``.
    carry: threaded through the chunks.

  Returns:
    ``(state of the whole block, carry)``.
  """
  parts, pos = [], 0
  for lo, hi, pieces in _chunks(edge):
    if lo > pos:
      parts.append(fresh(lo - pos))
    state, carry = run_chunk(pieces, lo, hi, fresh(hi - lo), carry)
    parts.append(state)
    pos = hi
  if pos < length:
    parts.append(fresh(length - pos))
  return tuple(jnp.concatenate(x, axis=1) if len(x) > 1 else x[0]
               for x in zip(*parts)), carry


def _run_edge(sched: _Schedule, o, fn, *operands):
  """``fn(edge, *operands)`` for outer block ``o``'s edge (a static tuple of
  :class:`_Piece`), switching on its kind."""
  if sched.kinds is None:
    return fn((), *operands)
  if np.all(sched.kind == sched.kind[0]):  # one kind: no switch
    return fn(sched.kinds[sched.kind[0]], *operands)
  branches = [functools.partial(fn, edge) for edge in sched.kinds]
  return lax.switch(jnp.asarray(sched.kind)[o], branches, *operands)


def _run_main(sched: _Schedule, o, body, carry, full=None):
  """Runs outer block ``o``'s main loop, ``body(inner, masked, carry)``,
  and, without kinds, its partial pairs whole and masked.

  With per-example masks the main loop is masked, but for its first run of
  blocks that ``full`` (from :func:`_full_blocks`) marks as allowed
  entirely: those run without a mask, in a loop of their own. On CPU the
  select of a masked update is a pass of its own over the scores. Measured
  against masking every block (fp32, N=8, H=64; time ratios forward full,
  causal / forward+backward full, causal): 0.89, 0.88 / 0.92, 0.96 with
  lengths that mask nothing (B=1, T=2048); 0.94, 0.91 / 0.97, 0.95 with
  lengths 1024, 896, 640 and 1024 (B=4, T=1024); 1.00, 0.98 / 1.01, 0.99
  with two packed segments per example, which leave no block whole. A
  conditional per block instead (skip, masked or not) ran 2-6% slower
  there.
  """
  ranges = jnp.asarray(sched.ranges)[o]
  lo, a, b, hi = ranges[0], ranges[1], ranges[2], ranges[3]
  if not sched.main_masked:
    carry = lax.fori_loop(a, b, lambda n, c: body(n, False, c), carry)
  else:
    # Blocks [f0, f1) of [a, b) run unmasked, the others masked.
    f0, f1 = b, b
    if full is not None:
      n = jnp.arange(full.shape[0], dtype=jnp.int32)
      in_main = (n >= a) & (n < b) & full
      f0 = jnp.min(jnp.where(in_main, n, b))
      f1 = jnp.maximum(f0, jnp.min(jnp.where((n >= f0) & ~in_main, n, b)))
      carry = lax.fori_loop(f0, f1, lambda n, c: body(n, False, c), carry)

    def masked_body(t, c):
      return body(jnp.where(t < f0 - a, a + t, f1 + t - (f0 - a)), True, c)

    carry = lax.fori_loop(0, (f0 - a) + (b - f1), masked_body, carry)
  if sched.kinds is not None:
    return carry
  # Partial pairs whole: both sides in one loop (one copy of the body).
  n_before = a - lo

  def partial_body(t, c):
    n = jnp.where(t < n_before, lo + t, b + t - n_before)
    return body(n, True, c)

  return lax.fori_loop(0, n_before + hi - b, partial_body, carry)


# -- forward and backward -----------------------------------------------------


def _mm(a, b, contract_a: int, contract_b: int, dtype):
  """Batched matmul over the leading axis, fp32 accumulation."""
  dims = (((contract_a,), (contract_b,)), ((0,), (0,)))
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                         preferred_element_type=_F32)


def _logit_scale(st: _Static, dtype) -> float:
  """The scale still to apply to the logits of q prescaled by
  :func:`_prescale`: none when folding it into q is exact enough (fp32, or a
  power of two no larger than 1: a larger one could overflow fp16's q)."""
  if dtype == _F32 or (math.frexp(st.scale)[0] == 0.5 and st.scale <= 1.0):
    return 1.0
  return st.scale


def _prescale(st: _Static, q):
  """``q`` times the part of the scale that :func:`_logit_scale` leaves
  out."""
  if _logit_scale(st, q.dtype) == 1.0:
    return (q.astype(_F32) * st.scale).astype(q.dtype)
  return q


def _scores(q, k, allowed, logit_scale: float, dtype):
  """The logits of rows ``q (X, rows, H)`` against keys ``k (X, cols, H)``,
  ``(X, rows, cols)`` float32, MASK_VALUE where ``allowed`` (or None: all
  allowed) is False."""
  s = _mm(q, k, 2, 2, dtype)
  if logit_scale != 1.0:
    s = s * logit_scale
  if allowed is not None:
    s = jnp.where(allowed, s, masks_lib.MASK_VALUE)
  return s


def _grad_terms(k, v, q, d_out, lse, delta, allowed, keep, rate: float,
                logit_scale: float, dtype, dq_transposed: bool):
  """FlashAttention-2's backward terms of keys ``k, v`` against rows ``q``.

  Computed keys-first (``S^T = K Q^T``) so that dK and dV, the products
  summed over rows, are plain matmuls; on CPU a matmul contracting its left
  operand's leading dim runs at about half speed.

  Args:
    k: ``(X, cols, H)``, v: ``(X, cols, Hv)``; q, d_out: ``(X, rows, H |
      Hv)``, q prescaled (:func:`_prescale`); lse, delta: ``(X, rows)``.
    allowed, keep: ``(X, cols, rows)`` bool masks, or None: masked entries
      (and every entry of an empty row, whose lse is EMPTY_ROW_LSE) get
      probability zero; ``keep`` is the dropout mask of ``rate``.
    dq_transposed: return dQ^T ``(X, H, rows)`` rather than dQ ``(X, rows,
      H)``.

  Returns:
    dQ (or dQ^T), dK ``(X, cols, H)`` and dV ``(X, cols, Hv)``, unscaled:
    q's prescale gives dK the one factor of the scale it needs (or
    ``logit_scale`` is applied to dK by the caller), and dQ takes it at the
    end.
  """
  # The mask goes on the probabilities, not the logits: an empty row's lse
  # is EMPTY_ROW_LSE == MASK_VALUE, which masked logits would cancel.
  s_t = _scores(k, q, None, logit_scale, dtype)  # (X, cols, rows)
  # s <= lse, but the recomputed s may round above it at huge logits, and
  # exp of a positive exponent overflows; min(., 0) keeps NaN.
  p_t = jnp.exp(jnp.minimum(s_t - lse[:, None, :], 0.0))
  if allowed is not None:
    p_t = jnp.where(allowed, p_t, 0.0)
  dp_t = _mm(v, d_out, 2, 2, dtype)  # (X, cols, rows)
  pz_t = p_t
  if keep is not None:
    pz_t = jnp.where(keep, p_t * (1.0 / (1.0 - rate)), 0.0)
    dp_t = jnp.where(keep, dp_t * (1.0 / (1.0 - rate)), 0.0)
  ds_t = p_t * (dp_t - delta[:, None, :])  # (X, cols, rows)
  dq = (_mm(k, ds_t, 1, 1, dtype) if dq_transposed
        else _mm(ds_t, k, 1, 1, dtype))
  return dq, _mm(ds_t, q, 2, 1, dtype), _mm(pz_t, d_out, 2, 1, dtype)


# -- the causal diagonal, in halving squares ----------------------------------
#
# Under a causal mask, each outer block's edge is the triangle of its
# diagonal block (but for a ragged last block). The chunks of
# :func:`_schedule` cover it in two updates per chunk, most of them narrow,
# and on CPU a narrow update costs much more per entry than a wide one. Here
# the triangle of ``b`` positions is the triangles of its two halves plus
# one square, the second half's queries against the first half's keys; the
# halves' triangles are cut the same way, down to triangles of
# :func:`_triangle_leaf` positions. The squares of one size and the leaf
# triangles are each stacked along the batch axis (a free reshape of the
# row layout), so the whole triangle takes one update per size: 5 for a
# 512-position block, against 15 chunk pieces, and it computes the triangle
# plus half a leaf per row (16 positions) where the chunks add half a chunk
# (32).


# Measured against the chunks (fp32, N=8, H=64, causal, blocks of 512; with
# `python -m benchmarks.blockwise_ab`, new/base time, medians of 9 rounds):
# forward 0.96, 0.87, 0.90, 0.91 and forward+backward 0.97, 0.93, 0.97, 1.00
# at B=1, T=1024 and 2048 and B=4, T=1024 and 2048, where a control read
# 0.93-1.03. Leaves of 32 took 0.92-1.02 of the time of leaves of 64.
# Blocks of 256 (T=256) have only four chunks, and the halving ran their
# forward+backward 10% slower (21 rounds, control 0.98-1.08): smaller
# blocks keep the chunks.
_MIN_LEAF = 32
_MIN_TRIANGLE_BLOCK = 512


def _triangle_leaf(b: int) -> int:
  """The side of the smallest triangles a diagonal block of ``b``
  positions is cut into: ``b`` halved while it stays whole and no shorter
  than ``_MIN_LEAF``.

  >>> _triangle_leaf(512), _triangle_leaf(16), _triangle_leaf(500)
  (32, 16, 125)
  """
  leaf = b
  while leaf % 2 == 0 and leaf // 2 >= _MIN_LEAF:
    leaf //= 2
  return leaf


def _triangle_kind(st: _Static, edge: tuple[_Piece, ...], by_q: bool,
                   has_data_mask: bool, rate: float) -> bool:
  """Whether ``edge`` is exactly the causal triangle of a whole ``b x b``
  diagonal block (``b`` the outer block's length), with nothing else to
  mask, so that the halving squares can compute it.

  In the forward (``by_q``) the chunk of rows ``[lo, hi)`` must see keys
  ``[0, hi)`` of the block; in the backward the chunk of keys ``[lo, hi)``
  must be seen by rows ``[lo, b)``.
  """
  b = st.plan.block_q if by_q else st.plan.block_k
  if (b < _MIN_TRIANGLE_BLOCK or st.spec != masks_lib.MaskSpec.causal()
      or not edge or has_data_mask or rate > 0.0):
    return False
  pos = 0
  for lo, hi, pieces in _chunks(edge):
    spans = sorted((pc.inner_lo, pc.inner_hi) for pc in pieces)
    if lo != pos or any(a[1] != c[0] for a, c in zip(spans, spans[1:])):
      return False
    if (spans[0][0], spans[-1][1]) != ((0, hi) if by_q else (lo, b)):
      return False
    pos = hi
  return pos == b


def _halves(x, n: int, which: int, *tail: int):
  """Of ``x (BK, 2*n*w, *tail)``: the first (``which=0``) or second half of
  each of its ``n`` pieces, stacked as ``(BK*n, w, *tail)``."""
  BK, length = x.shape[:2]
  w = length // (2 * n)
  return x.reshape(BK, n, 2, w, *tail)[:, :, which].reshape(BK * n, w, *tail)


def _widen(x, n: int, which: int, fill):
  """The inverse of :func:`_halves`: ``x (BK*n, w, *tail)`` placed as the
  ``which`` half of each of ``n`` pieces of ``(BK, 2*n*w, *tail)``, the
  other halves ``fill``."""
  X, w = x.shape[:2]
  tail = x.shape[2:]
  x = x.reshape(X // n, n, 1, w, *tail)
  other = jnp.full_like(x, fill)
  x = jnp.concatenate([x, other] if which == 0 else [other, x], axis=2)
  return x.reshape(X // n, 2 * n * w, *tail)


def _square_counts(b: int) -> list[int]:
  """How many squares each level of the halving of a ``b``-position block
  has, largest squares first: ``[1, 2, 4, ...]``; those of count ``n`` have
  side ``b / (2 n)``.

  >>> _square_counts(512)
  [1, 2, 4, 8]
  """
  return [2**i for i in range((b // _triangle_leaf(b)).bit_length() - 1)]


def _leaf_allowed(leaf: int, G: int, transposed: bool):
  """The causal mask of a leaf triangle, ``(leaf*G, leaf)`` (or transposed):
  row ``r`` is position ``r // G``."""
  rows = jnp.arange(leaf * G, dtype=jnp.int32) // G
  cols = jnp.arange(leaf, dtype=jnp.int32)
  if transposed:
    return rows[None, :] >= cols[:, None]
  return rows[:, None] >= cols[None, :]


def _triangle_state(q, k, v, G: int, logit_scale: float, dtype):
  """The online-softmax state of a diagonal block's rows after its causal
  triangle.

  Args:
    q: ``(BK, b*G, H)``, the block's rows; k: ``(BK, b, H)`` and v: ``(BK,
      b, Hv)``, its diagonal keys.
    G, logit_scale, dtype: as in :func:`_forward`.

  Returns:
    ``m, l (BK, b*G)`` and ``acc (BK, b*G, Hv)``, float32.
  """
  BK, R, H = q.shape
  b, Hv = k.shape[1], v.shape[-1]
  leaf = _triangle_leaf(b)

  def part(qx, kx, vx, allowed):
    """The max, normaliser and unnormalised output of one stacked update."""
    s = _scores(qx, kx, allowed, logit_scale, dtype)  # (X, rows, cols)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    return m, jnp.sum(p, axis=-1), _mm(p, vx, 2, 1, dtype)

  n = b // leaf
  m, l, acc = part(q.reshape(BK * n, leaf * G, H), k.reshape(BK * n, leaf, H),
                   v.reshape(BK * n, leaf, Hv), _leaf_allowed(leaf, G, False))
  parts = [(m.reshape(BK, R), l.reshape(BK, R), acc.reshape(BK, R, Hv))]
  for n in _square_counts(b):
    m, l, acc = part(_halves(q, n, 1, H), _halves(k, n, 0, H),
                     _halves(v, n, 0, Hv), None)
    parts.append((_widen(m, n, 1, masks_lib.MASK_VALUE), _widen(l, n, 1, 0.0),
                  _widen(acc, n, 1, 0.0)))
  # Every row sees its own key, so the joint max is finite and rows a part
  # does not touch (max MASK_VALUE) get weight exp(MASK_VALUE - m) == 0.
  m = functools.reduce(jnp.maximum, [pm for pm, _, _ in parts])
  l, acc = 0.0, 0.0
  for pm, pl, pacc in parts:
    weight = jnp.exp(pm - m)
    l, acc = l + weight * pl, acc + weight[..., None] * pacc
  return m, l, acc


def _triangle_grads(k, v, q, d_out, lse, delta, G: int, logit_scale: float,
                    dtype):
  """dQ, dK and dV of a diagonal block's causal triangle.

  Args:
    k: ``(BK, b, H)``, v: ``(BK, b, Hv)``: the block's keys; q, d_out:
      ``(BK, b*G, H | Hv)``, lse, delta: ``(BK, b*G)``: its diagonal rows,
      as in :func:`_backward`.

  Returns:
    ``dq (BK, b*G, H)``, ``dk (BK, b, H)``, ``dv (BK, b, Hv)``, float32,
    scaled as :func:`_backward`'s contributions are.
  """
  BK, b, H = k.shape
  Hv = v.shape[-1]
  leaf = _triangle_leaf(b)

  def part(kx, vx, qx, dox, lsex, deltax, allowed):
    """dQ, dK and dV of one stacked update."""
    return _grad_terms(kx, vx, qx, dox, lsex, deltax, allowed, None, 0.0,
                       logit_scale, dtype, dq_transposed=False)

  n = b // leaf
  stack = lambda x, w, *tail: x.reshape(BK * n, w, *tail)
  dq, dk, dv = part(stack(k, leaf, H), stack(v, leaf, Hv),
                    stack(q, leaf * G, H), stack(d_out, leaf * G, Hv),
                    stack(lse, leaf * G), stack(delta, leaf * G),
                    _leaf_allowed(leaf, G, True))
  dq, dk, dv = (dq.reshape(BK, b * G, H), dk.reshape(BK, b, H),
                dv.reshape(BK, b, Hv))
  for n in _square_counts(b):
    dq_p, dk_p, dv_p = part(
        _halves(k, n, 0, H), _halves(v, n, 0, Hv), _halves(q, n, 1, H),
        _halves(d_out, n, 1, Hv), _halves(lse, n, 1), _halves(delta, n, 1),
        None)
    dq = dq + _widen(dq_p, n, 1, 0.0)
    dk, dv = dk + _widen(dk_p, n, 0, 0.0), dv + _widen(dv_p, n, 0, 0.0)
  return dq, dk, dv


def _forward(st: _Static, q_all, k_all, v_all, blocks, seeds):
  """Online softmax, query blocks outside, key blocks inside.

  Args:
    q_all: ``(B*K, Tr*G, H)``, prescaled (:func:`_prescale`); k_all:
      ``(B*K, Sr, H)``; v_all: ``(B*K, Sr, Hv)``, all in the matmul dtype
      (``Tr``, ``Sr``: T and S padded to whole blocks, or longer).

  Returns:
    ``out (nq, B*K, bq*G, Hv)`` float32 and ``lse (nq, B*K, bq*G)``.
  """
  dtype = q_all.dtype
  BK = q_all.shape[0]
  G, bq, bk = st.G, st.plan.block_q, st.plan.block_k
  nq = st.plan.num_q_blocks
  Hv = v_all.shape[-1]
  rate = st.dropout_rate
  logit_scale = _logit_scale(st, dtype)
  sched = _schedule(st, by_q=True, has_data_mask=bool(blocks))
  anchor = common.anchor(q_all, k_all, v_all, blocks, seeds)

  def fresh(rows):
    """The state of ``rows`` query positions that have seen no key."""
    return (common.fresh(anchor, (BK, rows * G), masks_lib.MASK_VALUE),
            common.fresh(anchor, (BK, rows * G)),
            common.fresh(anchor, (BK, rows * G, Hv)))

  def update(q, q0, k, v, k0, masked, state):
    """Folds keys ``k, v`` (positions from ``k0``) into the state of
    ``q``'s rows (positions from ``q0``)."""
    m_prev, l_prev, acc_prev = state  # (BK, r), (BK, r), (BK, r, Hv)
    rows, cols = q.shape[1] // G, k.shape[1]
    allowed = _allowed(blocks, st, q0, rows, k0, cols) if masked else None
    s = _scores(q, k, allowed, logit_scale, dtype)  # (BK, rows*G, cols)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))  # (BK, rows*G)
    # A row with nothing allowed yet has m_new == MASK_VALUE, so its masked
    # entries get exp(0) == 1 here. No pass zeroes them: the first allowed
    # entry raises the max and alpha == exp(MASK_VALUE - m) == 0 wipes them
    # out, and a row that never sees one is empty and is zeroed at the end.
    p = jnp.exp(s - m_new[..., None])  # (BK, rows*G, cols)
    # Rescale the old state to the new max (exp(MASK_VALUE - m) == 0).
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=-1)
    if rate > 0.0:
      # l_i sums the probabilities before dropout; 1 / (1 - rate) is applied
      # once at the end.
      p = jnp.where(_keep(seeds, st, q0, rows, k0, cols), p, 0.0)
    acc_new = alpha[..., None] * acc_prev + _mm(p, v, 2, 1, dtype)
    return m_new, l_new, acc_new

  def edge_state(edge, qi, q):
    """The state of query block ``qi`` after its edge: each chunk starts
    fresh, and the chunks are joined."""
    q_start = qi * bq
    if _triangle_kind(st, edge, True, bool(blocks), rate):
      k_diag, v_diag = (lax.dynamic_slice_in_dim(x, q_start, bq, 1)
                        for x in (k_all, v_all))
      return _triangle_state(q, k_diag, v_diag, G, logit_scale, dtype)
    # One dynamic slice of the keys per block (in bounds: this edge's own
    # span); the pieces slice it statically.
    span_lo, span_hi = _span(edge)
    k_span, v_span = (lax.dynamic_slice_in_dim(
        x, q_start + span_lo, span_hi - span_lo, 1) for x in (k_all, v_all))

    def run_chunk(pieces, lo, hi, state, carry):
      for pc in pieces:
        y0, y1 = pc.inner_lo - span_lo, pc.inner_hi - span_lo
        state = update(q[:, lo * G:hi * G], q_start + lo, k_span[:, y0:y1],
                       v_span[:, y0:y1], q_start + pc.inner_lo, pc.masked,
                       state)
      return state, carry

    return _join_chunks(edge, bq, fresh, run_chunk)[0]

  def q_block(_, xs):
    qi, q = xs

    def main_step(kj, masked, carry):
      k0 = kj * bk
      step = functools.partial(
          update, q, qi * bq, lax.dynamic_slice_in_dim(k_all, k0, bk, 1),
          lax.dynamic_slice_in_dim(v_all, k0, bk, 1), k0)
      # A skipped block leaves the state as it is: it has no allowed entry.
      return _masked_step(blocks, st, qi, kj, masked, step, carry)

    carry = _run_edge(sched, qi, edge_state, qi, q)
    m_i, l_i, acc = _run_main(sched, qi, main_step, carry,
                              _full_blocks(blocks, st, qi, by_q=True))
    # Rows that attended nothing kept m_i == MASK_VALUE (and l_i == 0, or
    # the count of masked entries seen): zero output and the empty-row LSE,
    # set explicitly.
    nonempty = masks_lib.attended(m_i)
    safe_l = jnp.where(nonempty, l_i, 1.0)
    # Kept probabilities are scaled by 1 / (1 - rate); the LSE ignores
    # dropout.
    norm = safe_l * (1.0 - rate) if rate > 0.0 else safe_l
    out = jnp.where(nonempty[..., None], acc / norm[..., None], 0.0)
    lse = jnp.where(nonempty, m_i + jnp.log(safe_l),
                    masks_lib.EMPTY_ROW_LSE)
    return None, (out, lse)

  # The query blocks as scan inputs, (nq, B*K, bq*G, H): a copy, but one
  # that XLA fuses with the layout into rows; slicing q_all per block instead
  # measured 5% slower (causal, T=1024).
  qb = q_all[:, :st.plan.padded_T * G].reshape(BK, nq, bq * G, -1)
  qb = jnp.moveaxis(qb, 1, 0)
  _, (out, lse) = lax.scan(q_block, None,
                           (jnp.arange(nq, dtype=jnp.int32), qb))
  return out, lse


def _backward(st: _Static, q_all, k_all, v_all, blocks, seeds, lse_all,
              d_out_all, delta_all):
  """FlashAttention-2's backward, key blocks outside, query blocks inside.

  With ``Z`` the dropout mask scaled by ``1 / (1 - rate)``: ``dV = (P Z)^T
  dO``, ``dP = (dO V^T) Z``, ``dS = P (dP - D + dlse)`` with ``D =
  rowsum(dO O)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``. dK and dV of
  the outer key block stay in the loop state; dQ^T is accumulated in place.

  Args:
    q_all, d_out_all: ``(B*K, Tr*G, H or Hv)``, q prescaled
      (:func:`_prescale`); k_all, v_all: ``(B*K, Sr, H or Hv)``; lse_all and
      delta_all (``D - dlse``): ``(B*K, Tr*G)``. ``Tr``, ``Sr``: T and S
      padded to whole blocks, or longer.

  Returns:
    ``dq (B*K, Tp*G, H)`` (``Tp``: T padded to whole blocks of this plan),
    ``dk (nk, B*K, bk, H)``, ``dv (nk, B*K, bk, Hv)``, float32.
  """
  dtype = q_all.dtype
  BK, _, H = q_all.shape
  G, p = st.G, st.plan
  bq, bk, nk = p.block_q, p.block_k, p.num_k_blocks
  Tp = p.padded_T
  rate = st.dropout_rate
  logit_scale = _logit_scale(st, dtype)
  sched = _schedule(st, by_q=False, has_data_mask=bool(blocks))
  anchor = common.anchor(q_all, k_all, v_all, blocks, seeds, lse_all,
                         d_out_all, delta_all)
  # dQ^T is accumulated in (BK, H, (pad + Tp + pad) * G): the edge updates
  # one window of it per key block, and the margins keep every window in
  # bounds (a dynamic slice would otherwise be clamped and shift).
  span_lo, span_hi = sched.span
  pad_lo = pad_hi = 0
  if sched.kinds is not None and span_hi > span_lo:
    edged = np.nonzero(sched.kind)[0] * bk
    pad_lo = max(0, -int(edged.min() + span_lo))
    pad_hi = max(0, int(edged.max() + span_hi) - Tp)

  def contributions(k, v, k0, q0, rows, masked):
    """The terms of dQ^T, dK and dV of keys ``k, v`` (positions from
    ``k0``) against queries ``[q0, q0 + rows)`` (:func:`_grad_terms`)."""
    cols = k.shape[1]
    sl = lambda x: lax.dynamic_slice_in_dim(x, q0 * G, rows * G, 1)
    allowed = (_allowed(blocks, st, q0, rows, k0, cols, True) if masked
               else None)
    keep = (_keep(seeds, st, q0, rows, k0, cols, True) if rate > 0.0
            else None)
    return _grad_terms(k, v, sl(q_all), sl(d_out_all), sl(lse_all),
                       sl(delta_all), allowed, keep, rate, logit_scale, dtype,
                       dq_transposed=True)

  def edge_grads(edge, kj, k, v, dq_win):
    """Key block ``kj``'s edge: its dK and dV (each chunk from zero, then
    joined) and its terms added to ``dq_win``, the window of dQ^T at
    ``span``."""
    k_start = kj * bk
    if _triangle_kind(st, edge, False, bool(blocks), rate):
      sl = lambda x: lax.dynamic_slice_in_dim(x, k_start * G, bk * G, 1)
      dq, dk, dv = _triangle_grads(k, v, sl(q_all), sl(d_out_all),
                                   sl(lse_all), sl(delta_all), G,
                                   logit_scale, dtype)
      at = -span_lo * G  # the triangle's rows start at the block's start
      dq_win = dq_win.at[:, :, at:at + bk * G].add(jnp.swapaxes(dq, 1, 2))
      return dq_win, dk, dv

    def fresh(n):
      return (common.fresh(anchor, (BK, n, H)),
              common.fresh(anchor, (BK, n, v.shape[-1])))

    def run_chunk(pieces, lo, hi, state, dq_win):
      dk_c, dv_c = state
      for pc in pieces:
        rows = pc.inner_hi - pc.inner_lo
        dq_p, dk_p, dv_p = contributions(
            k[:, lo:hi], v[:, lo:hi], k_start + lo, k_start + pc.inner_lo,
            rows, pc.masked)
        at = (pc.inner_lo - span_lo) * G
        dq_win = dq_win.at[:, :, at:at + rows * G].add(dq_p)
        dk_c, dv_c = dk_c + dk_p, dv_c + dv_p
      return (dk_c, dv_c), dq_win

    (dk, dv), dq_win = _join_chunks(edge, bk, fresh, run_chunk, dq_win)
    return dq_win, dk, dv

  def k_block(dq_t, kj):
    k, v = (lax.dynamic_slice_in_dim(x, kj * bk, bk, 1) for x in (k_all, v_all))

    def main_step(qi, masked, carry):
      dq_t, dk, dv = carry
      at = (pad_lo + qi * bq) * G
      dq_i = lax.dynamic_slice_in_dim(dq_t, at, bq * G, 2)  # (BK, H, R)

      def step(masked, state):
        dq_i, dk, dv = state
        dq_c, dk_c, dv_c = contributions(k, v, kj * bk, qi * bq, bq, masked)
        return dq_i + dq_c, dk + dk_c, dv + dv_c

      # Only block-sized values pass through the branches, never all of dQ.
      dq_i, dk, dv = _masked_step(blocks, st, qi, kj, masked, step,
                                  (dq_i, dk, dv))
      return lax.dynamic_update_slice_in_dim(dq_t, dq_i, at, 2), dk, dv

    if span_hi > span_lo:
      at = (pad_lo + kj * bk + span_lo) * G
      dq_win = lax.dynamic_slice_in_dim(dq_t, at, (span_hi - span_lo) * G, 2)
      dq_win, dk, dv = _run_edge(sched, kj, edge_grads, kj, k, v, dq_win)
      dq_t = lax.dynamic_update_slice_in_dim(dq_t, dq_win, at, 2)
    else:
      dk, dv = common.fresh(anchor, k.shape), common.fresh(anchor, v.shape)
    dq_t, dk, dv = _run_main(sched, kj, main_step, (dq_t, dk, dv),
                             _full_blocks(blocks, st, kj, by_q=False))
    return dq_t, (dk * logit_scale, dv)

  dq_t, (dk, dv) = lax.scan(
      k_block, common.fresh(anchor, (BK, H, (pad_lo + Tp + pad_hi) * G)),
      jnp.arange(nk, dtype=jnp.int32))
  dq_t = dq_t[:, :, pad_lo * G:(pad_lo + Tp) * G]
  return jnp.swapaxes(dq_t, 1, 2) * st.scale, dk, dv


def _padded_lengths(st: _Static) -> tuple[int, int]:
  """``(Tr, Sr)``: T and S padded to whole blocks of both passes' plans, the
  lengths of the row-layout inputs both passes share."""
  f, b = st.plan, st.bwd_plan
  return max(f.padded_T, b.padded_T), max(f.padded_S, b.padded_S)


def _over_steps(st: _Static, fn, rows, data: masks_lib.MaskData, seeds):
  """Runs ``fn`` on each step of ``st.B`` examples, one after another.

  Args:
    st: the statics of one step.
    fn: ``fn(rows, blocks, seeds)`` of one step's row-layout arrays, its
      :func:`_block_data` and its :class:`_Seeds` (or None); returns arrays.
    rows: row-layout arrays of the whole batch, ``(steps*B*K, ...)``: the
      rows of a step are a contiguous range, so cutting them moves nothing.
    data: the per-example masks of the whole batch.
    seeds: the :class:`_Seeds` of the whole batch, or None.

  Returns:
    ``fn``'s results, stacked over a leading ``steps`` axis.
  """
  steps = rows[0].shape[0] // (st.B * st.K)
  if steps == 1:
    out = fn(rows, _block_data(data, st), seeds)
    return jax.tree.map(lambda x: x[None], out)
  split = lambda x: x.reshape((steps, x.shape[0] // steps) + x.shape[1:])
  # Per-example arrays are cut with the batch; a mask broadcast over it
  # (#B == 1) and seed words shared by every example are the same for every
  # step.
  per_example = {name: split(x)
                 for name, x in data.per_example(steps * st.B).items()}
  step_seeds = shared_words = None
  if seeds is not None:
    if seeds.words.ndim == 1 or seeds.words.shape[0] == 1:
      shared_words = seeds.words
    step_seeds = _Seeds(None if shared_words is not None
                        else split(seeds.words), split(seeds.examples))

  def step(xs):
    rows, arrays, step_seeds = xs
    blocks = _block_data(dataclasses.replace(data, **arrays), st)
    if shared_words is not None:
      step_seeds = step_seeds._replace(words=shared_words)
    return fn(rows, blocks, step_seeds)

  return lax.map(step, (tuple(split(x) for x in rows), per_example,
                        step_seeds))


def _run_forward(st: _Static, q, k, v, data, seeds):
  """Lays out the inputs in rows and runs :func:`_forward`, ``st.B``
  examples at a time.

  Args:
    q, k, v: ``(steps*B, T, N, H)``, ``(steps*B, S, K, H | Hv)``.

  Returns:
    ``out (steps*B, T, N, Hv)`` float32, ``lse (steps*B, N, T)`` and the
    row-layout inputs ``(q_all, k_all, v_all)`` that the backward reuses.
  """
  p = st.plan
  laid_out = _lay_out(st, q, k, v)
  out, lse = _over_steps(
      st, lambda rows, blocks, seeds: _forward(st, *rows, blocks, seeds),
      laid_out, data, seeds)
  return (_q_from_blocks(out, p.T, st.K, st.G),
          _row_values_from_blocks(lse, p.T, st.K, st.G), laid_out)


def _lay_out(st: _Static, q, k, v):
  """``(q_all (B*K, Tr*G, H), k_all (B*K, Sr, H), v_all (B*K, Sr, Hv))``:
  the row layout both passes share, q prescaled (:func:`_prescale`)."""
  Tr, Sr = _padded_lengths(st)
  return (_prescale(st, _rows(q, st.K, Tr)),
          *(_rows(x, st.K, Sr) for x in (k, v)))


def _from_layout(st: _Static, laid_out):
  """:func:`_lay_out`'s inverse, but for q's prescale: ``(q (B, T, N, H)``
  prescaled, ``k (B, S, K, H)``, ``v (B, S, K, Hv))``."""
  q_all, k_all, v_all = laid_out
  return (_q_from_blocks(q_all[None, None], st.plan.T, st.K, st.G),
          *(_kv_from_blocks(x[None, None], st.plan.S, st.K)
            for x in (k_all, v_all)))


def _folding_vmap(fn, batch: int):
  """``fn`` as a function that ``jax.vmap`` folds into its batch.

  ``fn(arrays, data, seeds)`` takes a tuple of arrays that lead with its
  ``batch`` examples (or example-major rows, ``batch * K``), their
  ``MaskData`` and :class:`_Seeds` (or None), and returns a tree of such
  arrays. Batched as JAX batches any function, every block update would
  carry the vmapped axis beside the examples, past the size the blocks and
  the steps were tuned at (:func:`_examples_per_step`). Folded, a ``vmap``
  over models or examples runs one call on ``axis_size * batch`` examples,
  taken a step at a time. Each instance keeps its own dropout bits: the hash
  takes each example's index in its own batch and its instance's key.
  """
  folding = jax.custom_batching.custom_vmap(fn)

  @folding.def_vmap
  def rule(axis_size, in_batched, arrays, data, seeds):
    M = axis_size
    arrays_batched, data_batched, seeds_batched = in_batched

    def fold(x, batched):
      """``(M, X, ...)``, or ``(X, ...)`` for every instance, -> ``(M*X,
      ...)``."""
      x = x if batched else jnp.broadcast_to(x, (M,) + x.shape)
      return x.reshape((M * x.shape[1],) + x.shape[2:])

    def fold_per_example(x, batched):
      """Like :func:`fold`, but a leading 1 (one mask or key for every
      example of an instance) is first broadcast to the batch."""
      if not batched:
        if x.shape[0] == 1:
          return x  # the same for every example of every instance
        x = x[None]
      x = jnp.broadcast_to(x, (M, batch) + x.shape[2:])
      return x.reshape((M * batch,) + x.shape[2:])

    arrays = tuple(map(fold, arrays, arrays_batched))
    data = jax.tree.map(fold_per_example, data, data_batched)
    if seeds is not None:
      words = seeds.words
      if seeds_batched.words and words.ndim == 2:  # (M, 2): a key each
        words = words[:, None]
      if seeds_batched.words or words.ndim == 2:  # then a pair per example
        words = fold_per_example(words, seeds_batched.words)
      seeds = _Seeds(words, fold(seeds.examples, seeds_batched.examples))
    out = _folding_vmap(fn, M * batch)(arrays, data, seeds)
    out = jax.tree.map(lambda y: y.reshape((M, -1) + y.shape[1:]), out)
    return out, jax.tree.map(lambda _: True, out)

  return folding


def _forward_rows(st: _Static, q, k, v, data, seeds):
  """:func:`_run_forward`, folded into the batch under ``vmap``."""
  run = lambda arrays, data, seeds: _run_forward(st, *arrays, data, seeds)
  return _folding_vmap(run, q.shape[0])((q, k, v), data, seeds)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, data, seeds):
  return _forward_rows(st, q, k, v, data, seeds)[:2]


def _call_prep(st: _Static, q, k, v, data, seeds,
               scale: float) -> common.Prepared:
  """The :class:`~pallas_kernels.common.Prepared` of a call, from the
  rules' arguments (the seeds of the whole batch: ``examples`` is its
  ``arange``)."""
  return higher_order.prepared(q, k, v, st.spec, data, scale,
                               st.dropout_rate,
                               None if seeds is None else seeds.words)


def _differentiable_forward(st: _Static, q, k, v, data, seeds):
  """:func:`_forward_rows` by :func:`higher_order.attention`: ``out``
  float32, ``lse`` and the row layout."""
  prep = _call_prep(st, q, k, v, data, seeds, st.scale)
  out, lse = higher_order.attention(q, k, v, prep)
  return out, lse, _lay_out(st, q, k, v)


def _differentiable_backward(st: _Static, arrays, data, seeds):
  """:func:`_run_backward` by :func:`higher_order.grads`, from the row
  layout."""
  q, k, v = _from_layout(st, arrays[:3])
  # The layout's q holds the scale but for `_logit_scale`'s part.
  logit_scale = _logit_scale(st, q.dtype)
  prep = _call_prep(st, q, k, v, data, seeds, logit_scale)
  dq, dk, dv = higher_order.grads(q, k, v, prep, *arrays[3:])
  return dq * (st.scale / logit_scale), dk, dv


# The rules run blocks in loops with traced bounds, which JAX cannot
# differentiate in reverse mode; their own derivatives (second derivatives
# of the attention) are those of `higher_order`'s loops over key blocks.
def _attention_fwd(st, q, k, v, data, seeds):
  out, lse, laid_out = higher_order.differentiated_as(
      functools.partial(_differentiable_forward, st),
      functools.partial(_forward_rows, st))(q, k, v, data, seeds)
  # The backward reuses the forward's row layout of q, k and v rather than
  # laying them out again; out is only needed for D = rowsum(dO * O), taken
  # in its own layout.
  return (out, lse), (laid_out, data, seeds, out, lse)


def _run_backward(st: _Static, arrays, data, seeds):
  """Runs :func:`_backward`, ``st.B`` examples at a time.

  Args:
    arrays: the forward's row layout ``(q_all, k_all, v_all)``, then ``out
      (B, T, N, Hv)``, ``lse (B, N, T)`` and their cotangents.

  Returns:
    ``dq (B, T, N, H)``, ``dk (B, S, K, H)``, ``dv (B, S, K, Hv)``, float32.
  """
  q_all, k_all, v_all, out, lse, d_out, d_lse = arrays
  p = st.plan
  d_out = d_out.astype(_F32)
  # D - dlse per row: the LSE's cotangent enters dS like -D. (As a batched
  # dot: XLA's CPU reduction over a short minor axis is about 10x slower.)
  delta = jnp.einsum("btnh,btnh->btn", d_out, out,
                     preferred_element_type=_F32)
  delta = jnp.swapaxes(delta, 1, 2) - d_lse  # (B, N, T)
  # Empty rows: their LSE is finite (EMPTY_ROW_LSE) and every one of their
  # entries is masked, so their probabilities are zero.
  rows = (q_all, k_all, v_all, _row_values(lse, st.K, p.padded_T),
          _rows(d_out, st.K, p.padded_T), _row_values(delta, st.K, p.padded_T))
  dq, dk, dv = _over_steps(
      st, lambda rows, blocks, seeds: _backward(st, *rows[:3], blocks, seeds,
                                                *rows[3:]),
      rows, data, seeds)
  return (_q_from_blocks(dq[:, None], p.T, st.K, st.G),
          _kv_from_blocks(dk, p.S, st.K), _kv_from_blocks(dv, p.S, st.K))


def _attention_bwd(st, residuals, cotangents):
  """Runs :func:`_backward` with the backward plan on the forward's row
  layout, folded into the batch under ``vmap``."""
  laid_out, data, seeds, out, lse = residuals
  sb = dataclasses.replace(st, plan=st.bwd_plan)
  run = lambda arrays, data, seeds: _run_backward(sb, arrays, data, seeds)
  dq, dk, dv = higher_order.differentiated_as(
      functools.partial(_differentiable_backward, st),
      _folding_vmap(run, out.shape[0]))(
          (*laid_out, out, lse, *cotangents), data, seeds)
  q_all, k_all, v_all = laid_out
  # Integer and boolean inputs (masks, seeds) get no cotangent.
  return (dq.astype(q_all.dtype), dk.astype(k_all.dtype),
          dv.astype(v_all.dtype),
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
    block_sizes: a :class:`BlockSizes`, or None for the defaults
      (:func:`default_block_sizes`).
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
    block_sizes = default_block_sizes(prep.spec, prep.problem.S)
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError("`block_sizes` for backend='xla' must be a "
                    "pallas_kernels.blockwise.BlockSizes or None; got "
                    f"{type(block_sizes).__name__}.")
  pr = prep.problem
  st = _Static(
      plan=plan(prep.spec, pr.T, pr.S, block_sizes),
      bwd_plan=plan(prep.spec, pr.T, pr.S, block_sizes.backward),
      spec=prep.spec, B=pr.B, K=pr.K, G=pr.groups, scale=prep.scale,
      dropout_rate=prep.dropout_rate)
  out_dtype = q.dtype
  q, k, v = common.in_common_dtype(q, k, v)
  step = _examples_per_step(st)
  # A batch that no step size divides is padded with zero examples to whole
  # steps; their outputs are dropped.
  padded = _cdiv(st.B, step) * step
  q, k, v = (_pad_axis(x, 0, padded) for x in (q, k, v))
  data = dataclasses.replace(prep.data, **{
      name: _pad_axis(x, 0, padded)
      for name, x in prep.data.per_example(st.B).items()})
  seeds = None
  if prep.seeds is not None:
    seeds = _Seeds(prep.seeds, jnp.arange(padded, dtype=jnp.int32))
  out, lse = _attention(dataclasses.replace(st, B=step), q, k, v, data,
                        seeds)
  out, lse = out[:st.B], lse[:st.B]
  return out.astype(out_dtype), lse


# Each update computes the scores of all its examples' heads at once: (examples
# * N, rows, cols) entries. Past this many (fp32: 8 MiB, their size at B=1, N=8,
# where the default blocks were tuned) the batch is taken a group of examples at
# a time. Measured with `python -m benchmarks.blockwise_ab` against all examples
# at once (fp32, N=8, H=64; time ratios forward full, causal / forward+backward
# full, causal; the control stayed within 4%): B=4, T=1024 (one example per
# step): 0.91, 0.91 / 0.95, 0.90 (0.92, 0.88 / 0.90, 0.95 with forward+backward
# as a loss gradient, control 0.99-1.08). B=4, T=512 (two per step full, one
# causal): 0.80, 0.63 / 1.04, 0.78. B=7, T=256 (one per step): 1.01, 0.76 /
# 0.85, 0.82. B=2, T=1024 (one per step): 0.90, 1.03 / 1.01, 1.02. B=1009, T=64
# (64 per step, the last padded): 0.95, 0.84 / 1.16, 1.02. Splitting one
# example's heads instead was slower (B=1, T=2048: by 5-12%). Half this budget
# ran the layer's forward+backward (as a VJP of an input cotangent) at B=4,
# T=256 1.3x faster, only because it kept the program's temporaries (38 MiB)
# under 32 MiB, past which glibc maps them afresh, and they are page-faulted in,
# on every call (see benchmarks/compare.py); as a loss gradient they are 28 MiB
# with this budget. It was 4-9% slower at B=2, T=512 and B=16, T=128: the budget
# stays.
_MAX_STEP_ENTRIES = 1 << 21


def _examples_per_step(st: _Static) -> int:
  """How many examples each step takes: the most, dividing B, whose scores
  per update (forward and backward blocks) stay within
  ``_MAX_STEP_ENTRIES``. When no divisor comes within a quarter of it (a
  prime B of short sequences), B is cut into balanced steps instead and the
  last one padded: many tiny steps would cost more than the padding."""
  f, b = st.plan, st.bwd_plan
  per_example = st.K * st.G * max(f.block_q * f.block_k,
                                  b.block_q * b.block_k)
  fits = max(1, _MAX_STEP_ENTRIES // per_example)
  step = max(d for d in range(1, min(fits, st.B) + 1) if st.B % d == 0)
  if 4 * step * per_example < _MAX_STEP_ENTRIES:
    step = _balanced(st.B, fits)
  return step
