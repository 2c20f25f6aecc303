"""Flash attention for NVIDIA GPUs through Pallas's Triton lowering.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads (``G = N // K`` query heads share one key/value head), H
head dim, Hv value head dim. Padded sizes carry a ``p``: ``Tp``, ``Sp``
(multiples of the blocks), ``Hp``, ``Hvp`` (powers of two, at least 16).

The algorithm is FlashAttention-2 (Dao, arXiv:2307.08691):

* forward: one program per (query block, b, n) streams over key blocks with
  an online softmax in base 2 (running max ``m_i`` and sum ``l_i``), and
  saves ``out`` and the natural-log ``lse``;
* backward: ``delta = rowsum(dO * O) - dlse`` in XLA, then a dK/dV kernel, one
  program per (key block, b, kv head) looping over the ``G`` query heads of
  its group and the query blocks (so GQA sums inside the kernel, no atomics),
  and a dQ kernel, one program per (query block, b, n) looping over key
  blocks. Both recompute ``P = exp(s - lse)``; nothing ``T x S`` is stored.

Block skipping: the band (:class:`~pallas_kernels.masks.MaskSpec`) gives each
program a loop range ``[lo, hi)`` and a middle ``[a, b)`` of blocks that need
no mask at all; ``kv_lengths``/``q_lengths`` shrink the range at run time;
segment ids and the dense mask skip blocks with ``lax.cond`` (disjoint id
ranges, an all-False mask block). Causal attention does about half the work.

Padding happens here, not in the caller: sequences are padded to block
multiples and head dims to powers of two (zeros, sliced off at the end);
padded keys are masked. Keys beyond ``kv_lengths`` (and queries beyond
``q_lengths``) are zeroed when a block straddles them, so garbage, even NaN,
in a padded tail never reaches a result.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels import dropout as dropout_lib
from pallas_kernels import higher_order
from pallas_kernels import masks as masks_lib
from pallas_kernels import partitioning

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Triton's dot needs every tile dim >= 16; tiles are powers of two.
MIN_BLOCK = 16
# Head dims above this do not fit the kernels' tiles in shared memory.
MAX_HEAD_DIM = 256

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(
    plgpu, "TritonCompilerParams")


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and Triton launch parameters of the three kernels.

  Every block is a power of two, at least 16; blocks larger than a (padded)
  sequence are shrunk to fit it. ``None`` warps pick a per-kernel default.

  Attributes:
    block_q, block_k: forward query and key tile.
    block_q_dkv, block_k_dkv: dK/dV kernel tiles (the key tile stays put).
    block_q_dq, block_k_dq: dQ kernel tiles (the query tile stays put).
    num_warps: warps per program, or None (4 for H <= 64, else 8 forward).
    num_stages: software-pipelining stages of the key/query loops.

  >>> BlockSizes(block_q=64, block_k=32).block_k
  32
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 32
  block_k_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 32
  num_warps: Optional[int] = None
  num_stages: int = 2

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if f.name.startswith("block_"):
        common.store_int_field(self, f.name,
                               f"a power of two >= {MIN_BLOCK}",
                               lambda v: _is_pow2(v) and v >= MIN_BLOCK)
    if self.num_warps is not None:
      common.store_int_field(self, "num_warps",
                             "None or a power of two <= 32",
                             lambda v: _is_pow2(v) and v <= 32)
    common.store_int_field(self, "num_stages", "a positive int",
                           lambda v: v >= 1)

  @classmethod
  def get_default(cls, H: int = 64, Hv: Optional[int] = None,
                  dtype: Any = jnp.bfloat16) -> "BlockSizes":
    """Defaults by head dim: big tiles for small heads, fewer stages for 256.

    Registers and shared memory scale with ``block * Hp``: a 256-wide head
    halves the key tiles and drops a pipelining stage to fit.
    """
    Hmax = max(H, H if Hv is None else Hv)
    wide = jnp.dtype(dtype).itemsize >= 4  # fp32 tiles take twice the room
    if Hmax <= 64:
      sizes = cls(128, 64 if wide else 128, 32, 128, 128, 32, 4, 3)
    elif Hmax <= 128:
      sizes = cls(128, 32 if wide else 64, 32, 64, 64, 32, 8, 3)
    else:
      sizes = cls(64, 32, 16, 32, 32, 16, 8, 2)
    return sizes


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call: shapes, blocks, mask band, dropout."""
  spec: masks_lib.MaskSpec
  scale: float
  rate: float
  B: int
  T: int
  S: int
  N: int
  K: int
  H: int
  Hv: int
  Tp: int
  Sp: int
  Hp: int
  Hvp: int
  bq: int
  bk: int
  bq_dkv: int
  bk_dkv: int
  bq_dq: int
  bk_dq: int
  warps_fwd: int
  warps_dkv: int
  warps_dq: int
  stages: int
  fp32: bool
  interpret: bool

  @property
  def G(self) -> int:
    return self.N // self.K

  @property
  def precision(self):
    # fp32 inputs get IEEE fp32 dots (Triton's default would be TF32).
    return lax.Precision.HIGHEST if self.fp32 else None

  @property
  def reverse_q(self) -> bool:
    # With a right bound later query blocks do more work: launch them first
    # so the long programs do not trail at the end of the grid.
    return self.spec.right is not None and self.spec.left is None


def _make_config(prep: common.Prepared, dtype, block_sizes, interpret):
  p = prep.problem
  if max(p.H, p.Hv) > MAX_HEAD_DIM:
    raise common.UnsupportedCallError(
        f"The GPU kernel supports head dims up to {MAX_HEAD_DIM}; got "
        f"H={p.H} and Hv={p.Hv}.")
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(p.H, p.Hv, dtype)
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError("`block_sizes` must be a gpu_triton.BlockSizes or None; "
                    f"got {type(block_sizes).__name__}.")
  fit_t = lambda b: max(MIN_BLOCK, min(b, _next_pow2(p.T)))
  fit_s = lambda b: max(MIN_BLOCK, min(b, _next_pow2(p.S)))
  bs = block_sizes
  bq, bq_dkv, bq_dq = fit_t(bs.block_q), fit_t(bs.block_q_dkv), fit_t(
      bs.block_q_dq)
  bk, bk_dkv, bk_dq = fit_s(bs.block_k), fit_s(bs.block_k_dkv), fit_s(
      bs.block_k_dq)
  Hp = max(MIN_BLOCK, _next_pow2(p.H))
  Hvp = max(MIN_BLOCK, _next_pow2(p.Hv))
  warps = lambda default: default if bs.num_warps is None else bs.num_warps
  # Backward programs hold two fp32 accumulators (dK and dV, or dQ) plus
  # their operand tiles in registers: 8 warps once tiles reach 32x64x128.
  big = lambda a, b: 8 if a * b * max(Hp, Hvp) >= 32 * 64 * 128 else 4
  return _Config(
      spec=prep.spec, scale=prep.scale, rate=prep.dropout_rate, B=p.B, T=p.T,
      S=p.S, N=p.N, K=p.K, H=p.H, Hv=p.Hv,
      Tp=_round_up(p.T, max(bq, bq_dkv, bq_dq)),
      Sp=_round_up(p.S, max(bk, bk_dkv, bk_dq)), Hp=Hp, Hvp=Hvp, bq=bq,
      bk=bk, bq_dkv=bq_dkv, bk_dkv=bk_dkv, bq_dq=bq_dq, bk_dq=bk_dq,
      warps_fwd=warps(4 if max(p.H, p.Hv) <= 64 else 8),
      warps_dkv=warps(big(bq_dkv, bk_dkv)), warps_dq=warps(big(bq_dq, bk_dq)),
      stages=int(bs.num_stages), fp32=jnp.dtype(dtype) == jnp.float32,
      interpret=bool(interpret))


# -- loop bounds (Python ints or traced int32 scalars) ------------------------


def _is_static(*xs) -> bool:
  return all(isinstance(x, (int, np.integer)) for x in xs)


def _min(a, b):
  return min(a, b) if _is_static(a, b) else jnp.minimum(a, b)


def _max(a, b):
  return max(a, b) if _is_static(a, b) else jnp.maximum(a, b)


def _div(a, b: int):
  """Division by a positive int, rounding toward zero: floor for ``a >= 0``.

  Only the dK/dV kernel of a call split over query rows passes a negative
  ``a`` (key positions shifted by the query offset). A negative quotient
  rounded up there can only add one block that is visited with its mask:
  :func:`inner_block_range` clamps its other bounds at 0 or above.
  """
  return a // b if _is_static(a) else lax.div(a, jnp.int32(b))


def _cdiv(a, b: int):
  return _div(a + b - 1, b)


def inner_block_range(spec: masks_lib.MaskSpec, o_lo, o_blk: int, o_len: int,
                      i_blk: int, i_blocks: int, i_valid, o_valid=None,
                      can_split: bool = True):
  """The inner blocks one outer block visits, and those needing no mask.

  The "outer" block is a program's fixed tile (query rows ``[o_lo, o_lo +
  o_blk)`` in the forward and dQ kernels; key rows in the dK/dV kernel, with
  the transposed band); the "inner" blocks are those its loop visits.

  Args:
    spec: the band, outer position as the query, inner as the key.
    o_lo: first outer position (int or traced int32).
    o_blk, o_len: outer tile size and the real (unpadded) outer length.
    i_blk, i_blocks: inner tile size and number of inner blocks.
    i_valid: inner positions at or past it are invalid (padding,
      ``kv_lengths``); blocks starting there are skipped.
    o_valid: outer positions at or past it attend nothing (``q_lengths``;
      keys past ``kv_lengths``), or None.
    can_split: whether a block may run without a mask at all (False when
      segment ids or a dense mask can rule out any pair).

  Returns:
    ``(lo, a, b, hi)`` with ``lo <= a <= b <= hi``: visit ``[lo, hi)``;
    blocks in ``[a, b)`` are fully allowed (no mask needed). ``a`` and ``b``
    are None when ``can_split`` is False.
  """
  o_hi = _min(o_lo + o_blk, o_len)
  lo, hi = 0, i_blocks
  if spec.left is not None:  # first key >= first query - left
    lo = _div(_max(o_lo - spec.left, 0), i_blk)
  if spec.right is not None:  # first key <= last query + right
    hi = _min(hi, _div(o_hi - 1 + spec.right, i_blk) + 1)
  hi = _min(hi, _cdiv(i_valid, i_blk))
  if o_valid is not None:  # a block of empty rows visits nothing
    hi = jnp.where(o_lo < o_valid, hi, 0) if not _is_static(o_lo, o_valid) \
        else (hi if o_lo < o_valid else 0)
  hi = _max(hi, lo)
  if not can_split:
    return lo, None, None, hi
  # Fully allowed: last key <= first query + right and first key >= last
  # query - left, every inner position valid and every outer row too.
  a = 0 if spec.left is None else _cdiv(_max(o_hi - 1 - spec.left, 0), i_blk)
  b = i_blocks if spec.right is None else _div(o_lo + spec.right + 1, i_blk)
  b = _min(b, _div(i_valid, i_blk))
  a = _min(_max(a, lo), hi)
  b = _min(_max(b, a), hi)
  if o_valid is not None:
    full = o_lo + o_blk <= o_valid
    b = (b if full else a) if _is_static(full) else jnp.where(full, b, a)
  return lo, a, b, hi


def _transposed(spec: masks_lib.MaskSpec) -> masks_lib.MaskSpec:
  """The band seen from the keys: key j is attended by i in [j-right, j+left]."""
  return masks_lib.MaskSpec(left=spec.right, right=spec.left)


# -- pieces shared by the kernels ------------------------------------------


def _dot(a, b, *, ta=False, tb=False, precision=None):
  """``a @ b`` with optional transposes, fp32 accumulation."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def _and(a, b):
  return b if a is None else (a if b is None else a & b)


@dataclasses.dataclass(frozen=True)
class _Tile:
  """Mask inputs of one (query tile, key tile) pair; None where absent."""
  q_pos: Any  # (bq, 1) int32 absolute query positions
  k_pos: Any  # (1, bk) int32 absolute key positions
  q_valid: Any = None  # scalar: rows >= it are empty (q_lengths)
  kv_valid: Any = None  # scalar: keys >= it are padding
  q_seg: Any = None  # (bq,) int32
  kv_seg: Any = None  # (bk,) int32
  mask: Any = None  # (bq, bk) int8


def _allowed(cfg: _Config, t: _Tile):
  """(bq, bk)-broadcastable bool of allowed pairs: every source ANDed."""
  ok = None
  if not cfg.spec.is_full:
    ok = _and(ok, cfg.spec.allows(t.q_pos, t.k_pos))
  if t.kv_valid is not None:
    ok = _and(ok, t.k_pos < t.kv_valid)
  if t.q_valid is not None:
    ok = _and(ok, t.q_pos < t.q_valid)
  if t.q_seg is not None:
    ok = _and(ok, t.q_seg[:, None] == t.kv_seg[None, :])
  if t.mask is not None:
    ok = _and(ok, t.mask != 0)
  return ok


def _may_attend(t: _Tile, q_seg_lo, q_seg_hi):
  """Dynamic skip test: can any pair of the tile be allowed? (or None)."""
  pred = None
  if t.q_seg is not None:
    # Disjoint id ranges share no id (exact for sorted, packed segments).
    pred = _and(pred, (jnp.min(t.kv_seg) <= q_seg_hi)
                & (jnp.max(t.kv_seg) >= q_seg_lo))
  if t.mask is not None:
    m = t.mask.astype(jnp.int32)
    pred = _and(pred, jnp.max(jnp.max(m, axis=1), axis=0) > 0)
  return pred


def _seed_words(r):
  """``(seed0, seed1, batch_offset, head_offset)`` read from the kernel's
  ``seeds`` operand (:func:`dropout_lib.with_offsets`), or None."""
  return tuple(r["seeds"][i] for i in range(4)) if "seeds" in r else None


def _row_hash(seeds, b, n, q_pos):
  """The dropout hash of rows ``q_pos`` of local batch ``b``, head ``n``."""
  return dropout_lib.row_hash(seeds, b + seeds[2], n + seeds[3], q_pos)


def _keep(seeds, rate, h_row, k_pos):
  """Dropout keep mask from the per-row hash ``h_row (bq, 1)``: (bq, bk)."""
  bits = dropout_lib.bits_from_row(h_row, k_pos, seeds[1])
  return bits >= dropout_lib.threshold(rate)


def _zero_rows(x, pos, valid):
  """Zeroes rows of ``x`` at positions >= valid (NaN-safe, unlike 0 * x)."""
  return jnp.where(pos < valid, x, jnp.zeros_like(x))


def _loop(lo, hi, body, carry, zero):
  """``fori_loop`` that traces nothing for a statically empty range.

  A static upper bound becomes a traced one (``zero + hi``, with ``zero =
  program_id(0) * 0`` taken at the kernel's top level): Triton folds it back
  to the same ``scf.for``, and the loop stays a ``while`` rather than a
  ``scan``, whose carry check trips Pallas's interpreter inside
  ``shard_map(check_vma=True)``.
  """
  if _is_static(lo, hi):
    if lo >= hi:
      return carry
    hi = zero + hi
  return lax.fori_loop(lo, hi, body, carry)


def _run_split(lo, a, b, hi, body, carry, zero):
  """Runs ``body(i, carry, masked)`` over ``[lo, hi)``, unmasked on [a, b).

  Three loops rather than a per-block branch: the unmasked middle is the
  bulk of the work and its body carries no mask arithmetic at all.
  """
  masked = functools.partial(body, masked=True)
  if a is None:  # no split: every block may need a mask
    return _loop(lo, hi, masked, carry, zero)
  carry = _loop(lo, a, masked, carry, zero)
  carry = _loop(a, b, functools.partial(body, masked=False), carry, zero)
  return _loop(b, hi, masked, carry, zero)


def _qb(cfg: _Config, i, block: int):
  """Query block handled by grid index ``i`` (reversed for causal bands)."""
  if not cfg.reverse_q:
    return i
  return cfg.Tp // block - 1 - i


def _scalar(refs, name):
  return refs[name][...] if name in refs else None


def _q_offset(refs):
  """The global index of local query row 0: nonzero when this call is one
  shard of a problem split over query rows (``partitioning.Shard``)."""
  return refs["q_off"][0] if "q_off" in refs else 0


# -- forward ---------------------------------------------------------------


def _fwd_kernel(*refs, cfg: _Config, names):
  """One (query block, b, n): online softmax over the key blocks."""
  r = dict(zip(names, refs))
  bq, bk = cfg.bq, cfg.bk
  qb, b, n = _qb(cfg, pl.program_id(0), bq), pl.program_id(1), pl.program_id(2)
  q_off = _q_offset(r)
  q_lo = q_off + qb * bq  # positions are global: bands, lengths, dropout
  q = r["q"][...]  # (bq, Hp)
  q_pos = q_lo + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_valid, kv_valid = _scalar(r, "q_len"), _scalar(r, "kv_len")
  if kv_valid is None and cfg.Sp != cfg.S:
    kv_valid = cfg.S  # padded keys
  q_seg = r["q_seg"][...] if "q_seg" in r else None
  q_seg_lo = jnp.min(q_seg) if q_seg is not None else None
  q_seg_hi = jnp.max(q_seg) if q_seg is not None else None
  seeds = _seed_words(r)
  h_row = (_row_hash(seeds, b, n, q_pos) if seeds is not None
           else None)  # (bq, 1)
  c = cfg.scale * LOG2E  # logits in base 2: exp(x) = exp2(x * log2(e))

  def compute(kb, carry, masked, mask_blk=None, kv_seg=None):
    acc, m_i, l_i = carry
    k_lo = kb * bk
    k = r["k"][pl.ds(k_lo, bk), :]  # (bk, Hp)
    v = r["v"][pl.ds(k_lo, bk), :]  # (bk, Hvp)
    k_pos = k_lo + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    if masked and "kv_len" in r:
      # Keys past kv_lengths may hold garbage: 0 * NaN is NaN in P @ V.
      col = k_lo + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
      k, v = _zero_rows(k, col, kv_valid), _zero_rows(v, col, kv_valid)
    s = _dot(q, k, tb=True, precision=cfg.precision) * c  # (bq, bk)
    allowed = None
    if masked:
      allowed = _allowed(cfg, _Tile(q_pos, k_pos, q_valid, kv_valid, q_seg,
                                    kv_seg, mask_blk))
      if allowed is not None:
        s = jnp.where(allowed, s, masks_lib.MASK_VALUE)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))  # (bq,)
    alpha = jnp.exp2(m_i - m_new)  # rescales the old sum and accumulator
    # s <= m_new, but not always as computed: the interpreter (XLA:CPU)
    # may round the two uses of s apart, and exp2 of a positive exponent
    # overflows fp16 p at large logits. min(., 0) keeps NaN.
    p = jnp.exp2(jnp.minimum(s - m_new[:, None], 0.0))  # (bq, bk)
    if allowed is not None:
      # A row masked so far has m_new == MASK_VALUE and exp2(0) == 1.
      p = jnp.where(allowed, p, 0.0)
    l_i = alpha * l_i + jnp.sum(p, axis=1)
    if seeds is not None:  # dropout acts on P after the softmax's sum
      p = jnp.where(_keep(seeds, cfg.rate, h_row, k_pos), p, 0.0)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v,
                                      precision=cfg.precision)
    return acc, m_new, l_i

  def body(kb, carry, masked):
    if not masked or ("q_seg" not in r and "mask" not in r):
      return compute(kb, carry, masked)
    k_lo = kb * bk
    kv_seg = r["kv_seg"][pl.ds(k_lo, bk)] if "kv_seg" in r else None
    mask_blk = r["mask"][:, pl.ds(k_lo, bk)] if "mask" in r else None
    pred = _may_attend(_Tile(None, None, q_seg=q_seg, kv_seg=kv_seg,
                             mask=mask_blk), q_seg_lo, q_seg_hi)
    return lax.cond(
        pred, lambda cr: compute(kb, cr, True, mask_blk, kv_seg),
        lambda cr: cr, carry)

  lo, a, b_, hi = inner_block_range(
      cfg.spec, q_lo, bq, q_off + cfg.T, bk, cfg.Sp // bk,
      cfg.Sp if kv_valid is None else kv_valid, q_valid,
      can_split="q_seg" not in r and "mask" not in r)
  carry = (jnp.zeros((bq, cfg.Hvp), jnp.float32),
           jnp.full((bq,), masks_lib.MASK_VALUE, jnp.float32),  # never -inf
           jnp.zeros((bq,), jnp.float32))
  acc, m_i, l_i = _run_split(lo, a, b_, hi, body, carry, 0 * qb)
  # A row that may attend to no key has l_i == 0: zero output, and the
  # EMPTY_ROW_LSE sentinel rather than log(0).
  empty = l_i == 0.0
  l_safe = jnp.where(empty, 1.0, l_i)
  inv = 1.0 / l_safe
  if seeds is not None:
    inv = inv * (1.0 / (1.0 - cfg.rate))
  r["o"][...] = (acc * inv[:, None]).astype(r["o"].dtype)
  r["lse"][...] = jnp.where(empty, masks_lib.EMPTY_ROW_LSE,
                            (m_i + jnp.log2(l_safe)) * LN2)


# -- inputs shared by the kernels -------------------------------------------


def _pad(x, axis_sizes: dict[int, int], value=0):
  """Pads ``x`` at the end of the given axes to the given sizes (or not)."""
  widths = [(0, axis_sizes.get(i, d) - d) for i, d in enumerate(x.shape)]
  if all(w == (0, 0) for w in widths):
    return x
  return jnp.pad(x, widths, constant_values=value)


def _pad_edge(x, axis: int, size: int):
  """Pads with the last value (segment ids: keeps each block's id range)."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, mode="edge")


def _mask_operands(cfg: _Config, data: masks_lib.MaskData, seeds,
                   q_offset=0):
  """Padded kernel-ready mask arrays by name (absent ones left out).

  ``q_offset`` (int32 scalar) places the call's query rows in a longer
  sequence: the kernels then read it as ``"q_off"``.
  """
  ops = {}
  if seeds is not None:
    ops["seeds"] = seeds.astype(jnp.int32)
  if not (_is_static(q_offset) and q_offset == 0):
    ops["q_off"] = jnp.reshape(q_offset, (1,)).astype(jnp.int32)
  if data.q_lengths is not None:
    # Global, like the rows' positions: [q_offset, q_offset + T].
    ops["q_len"] = jnp.clip(data.q_lengths, q_offset,
                            q_offset + cfg.T).astype(jnp.int32)
  if data.kv_lengths is not None:
    ops["kv_len"] = jnp.clip(data.kv_lengths, 0, cfg.S).astype(jnp.int32)
  if data.q_segment_ids is not None:
    ops["q_seg"] = _pad_edge(data.q_segment_ids.astype(jnp.int32), 1, cfg.Tp)
    ops["kv_seg"] = _pad_edge(data.kv_segment_ids.astype(jnp.int32), 1,
                              cfg.Sp)
  if data.mask is not None:
    # int8, not bool: Triton loads bytes; padded pairs are disallowed.
    ops["mask"] = _pad(data.mask.astype(jnp.int8), {2: cfg.Tp, 3: cfg.Sp})
  return ops


def _out_struct(shape, dtype, axes: frozenset):
  """An output type that ``shard_map(check_vma=True)`` accepts."""
  mat_cls = getattr(jax.sharding, "ManualAxisType", None)
  if mat_cls is not None:
    return jax.ShapeDtypeStruct(shape, dtype,
                                manual_axis_type=mat_cls(varying=axes))
  if axes:
    return jax.ShapeDtypeStruct(shape, dtype, vma=axes)
  return jax.ShapeDtypeStruct(shape, dtype)


def _call(kernel, cfg: _Config, name: str, grid, operands, out_specs,
          out_shapes, num_warps: int):
  """``pallas_call`` on named ``(array, BlockSpec)`` operands."""
  names = tuple(operands) + tuple(out_specs)
  arrays = [a for a, _ in operands.values()]
  axes = common.varying_axes(arrays)
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg, names=names),
      grid=grid,
      in_specs=[s for _, s in operands.values()],
      out_specs=list(out_specs.values()),
      out_shape=[_out_struct(s, d, axes) for s, d in out_shapes],
      compiler_params=_CompilerParams(num_warps=num_warps,
                                      num_stages=cfg.stages),
      interpret=cfg.interpret,
      name=name,
  )(*arrays)


def _mask_spec_fwd(cfg: _Config, ops, bq, qmap):
  """BlockSpecs of the optional mask inputs for (query block, b, n) grids."""
  specs = {}
  if "seeds" in ops:
    specs["seeds"] = pl.BlockSpec((4,), lambda i, b, n: (0,))
  if "q_off" in ops:
    specs["q_off"] = pl.BlockSpec((1,), lambda i, b, n: (0,))
  for name in ("q_len", "kv_len"):
    if name in ops:
      specs[name] = pl.BlockSpec((None,), lambda i, b, n: (b,))
  if "q_seg" in ops:
    specs["q_seg"] = pl.BlockSpec((None, bq), lambda i, b, n: (b, qmap(i)))
    specs["kv_seg"] = pl.BlockSpec((None, cfg.Sp), lambda i, b, n: (b, 0))
  if "mask" in ops:
    mb, mn = ops["mask"].shape[:2]
    specs["mask"] = pl.BlockSpec(
        (None, None, bq, cfg.Sp),
        lambda i, b, n: (b if mb > 1 else 0, n if mn > 1 else 0, qmap(i), 0))
  return {k: (ops[k], specs[k]) for k in ops}


def _forward(cfg: _Config, q, k, v, data, seeds, q_offset=0):
  """Padded forward: ``out (B, T, N, Hv)``, ``lse (B, N, T)`` float32;
  ``q_offset`` as in :func:`_mask_operands`."""
  G = cfg.G
  qp = _pad(q, {1: cfg.Tp, 3: cfg.Hp})  # (B, Tp, N, Hp)
  kp = _pad(k, {1: cfg.Sp, 3: cfg.Hp})  # (B, Sp, K, Hp)
  vp = _pad(v, {1: cfg.Sp, 3: cfg.Hvp})  # (B, Sp, K, Hvp)
  qmap = functools.partial(_qb, cfg, block=cfg.bq)
  kvh = lambda n: lax.div(n, G)  # GQA: the kv head of query head n
  operands = {
      "q": (qp, pl.BlockSpec((None, cfg.bq, None, cfg.Hp),
                             lambda i, b, n: (b, qmap(i), n, 0))),
      "k": (kp, pl.BlockSpec((None, cfg.Sp, None, cfg.Hp),
                             lambda i, b, n: (b, 0, kvh(n), 0))),
      "v": (vp, pl.BlockSpec((None, cfg.Sp, None, cfg.Hvp),
                             lambda i, b, n: (b, 0, kvh(n), 0))),
  }
  operands.update(_mask_spec_fwd(
      cfg, _mask_operands(cfg, data, seeds, q_offset), cfg.bq, qmap))
  out_specs = {
      "o": pl.BlockSpec((None, cfg.bq, None, cfg.Hvp),
                        lambda i, b, n: (b, qmap(i), n, 0)),
      "lse": pl.BlockSpec((None, None, cfg.bq),
                          lambda i, b, n: (b, n, qmap(i))),
  }
  out, lse = _call(
      _fwd_kernel, cfg, "flash_attention_fwd", (cfg.Tp // cfg.bq, cfg.B,
                                                cfg.N), operands, out_specs,
      [((cfg.B, cfg.Tp, cfg.N, cfg.Hvp), q.dtype),
       ((cfg.B, cfg.N, cfg.Tp), jnp.float32)], cfg.warps_fwd)
  return out[:, :cfg.T, :, :cfg.Hv], lse[:, :, :cfg.T]


# -- backward: dK and dV ----------------------------------------------------


def _dkv_kernel(*refs, cfg: _Config, names):
  """One (key block, b, kv head): loops over its G query heads and blocks."""
  r = dict(zip(names, refs))
  bq, bk, G = cfg.bq_dkv, cfg.bk_dkv, cfg.G
  kb, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k_lo = kb * bk
  k = r["k"][...]  # (bk, Hp)
  v = r["v"][...]  # (bk, Hvp)
  k_pos = k_lo + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  q_valid, kv_valid = _scalar(r, "q_len"), _scalar(r, "kv_len")
  if "kv_len" in r:  # zero garbage keys past kv_lengths (see forward)
    col = k_lo + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    k, v = _zero_rows(k, col, kv_valid), _zero_rows(v, col, kv_valid)
  elif cfg.Sp != cfg.S:
    kv_valid = cfg.S
  kv_seg = r["kv_seg"][...] if "kv_seg" in r else None  # (bk,)
  kv_seg_lo = jnp.min(kv_seg) if kv_seg is not None else None
  kv_seg_hi = jnp.max(kv_seg) if kv_seg is not None else None
  seeds = _seed_words(r)
  c = cfg.scale * LOG2E
  split = "q_seg" not in r and "mask" not in r
  # The query blocks are local and their positions start at q_off: in key
  # positions shifted by -q_off the band is the same, and the range of
  # local query blocks comes out directly.
  q_off = _q_offset(r)
  lo, a, b_, hi = inner_block_range(
      _transposed(cfg.spec), k_lo - q_off, bk, cfg.S - q_off, bq,
      cfg.Tp // bq, cfg.T if q_valid is None else q_valid - q_off,
      None if kv_valid is None else kv_valid - q_off, can_split=split)

  def per_head(g, carry):
    n = kh * G + g

    def compute(qb, carry, masked, mask_blk=None, q_seg=None):
      dk, dv = carry
      q_lo = qb * bq
      rows = pl.ds(q_lo, bq)
      q = r["q"][rows, g, :]  # (bq, Hp)
      do = r["do"][rows, g, :]  # (bq, Hvp)
      lse2 = r["lse2"][g, rows]  # (bq,) base-2 lse
      delta = r["delta"][g, rows]  # (bq,) rowsum(dO * O) - dlse
      q_pos = q_off + q_lo + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
      if masked and "q_len" in r:  # rows past q_lengths may be garbage
        q = _zero_rows(q, q_pos, q_valid)
      s = _dot(q, k, tb=True, precision=cfg.precision) * c  # (bq, bk)
      # P recomputed from the saved lse; <= 1, as in the forward.
      p = jnp.exp2(jnp.minimum(s - lse2[:, None], 0.0))
      if masked:
        allowed = _allowed(cfg, _Tile(q_pos, k_pos, q_valid, kv_valid, q_seg,
                                      kv_seg, mask_blk))
        if allowed is not None:  # masked logits must give exactly 0
          p = jnp.where(allowed, p, 0.0)
      dp = _dot(do, v, tb=True, precision=cfg.precision)  # (bq, bk) dO V^T
      pz = p
      if seeds is not None:
        keep = _keep(seeds, cfg.rate, _row_hash(seeds, b, n, q_pos),
                     k_pos)
        inv = 1.0 / (1.0 - cfg.rate)
        pz = jnp.where(keep, p * inv, 0.0)  # P o Z
        dp = jnp.where(keep, dp * inv, 0.0)  # (dO V^T) o Z
      dv = dv + _dot(pz.astype(do.dtype), do, ta=True,
                     precision=cfg.precision)  # (bk, Hvp)
      ds = p * (dp - delta[:, None])  # dS = P o (dP - D + dlse)
      dk = dk + _dot(ds.astype(q.dtype), q, ta=True,
                     precision=cfg.precision)  # (bk, Hp)
      return dk, dv

    def body(qb, carry, masked):
      if not masked or split:
        return compute(qb, carry, masked)
      rows = pl.ds(qb * bq, bq)
      q_seg = r["q_seg"][rows] if "q_seg" in r else None
      if "mask" in r:
        mask_blk = (r["mask"][g, rows, :] if r["mask"].ndim == 3 else
                    r["mask"][rows, :])
      else:
        mask_blk = None
      # Roles swapped: the query tile's ids against the key tile's range.
      pred = _may_attend(_Tile(None, None, q_seg=kv_seg, kv_seg=q_seg,
                               mask=mask_blk), kv_seg_lo, kv_seg_hi)
      return lax.cond(pred,
                      lambda cr: compute(qb, cr, True, mask_blk, q_seg),
                      lambda cr: cr, carry)

    return _run_split(lo, a, b_, hi, body, carry, zero)

  zero = 0 * kb
  dk, dv = _loop(0, G, per_head, (jnp.zeros((bk, cfg.Hp), jnp.float32),
                                  jnp.zeros((bk, cfg.Hvp), jnp.float32)),
                 zero)
  r["dk"][...] = (dk * cfg.scale).astype(r["dk"].dtype)
  r["dv"][...] = dv.astype(r["dv"].dtype)


# -- backward: dQ -----------------------------------------------------------


def _dq_kernel(*refs, cfg: _Config, names):
  """One (query block, b, n): dQ = scale * dS K over the key blocks."""
  r = dict(zip(names, refs))
  bq, bk = cfg.bq_dq, cfg.bk_dq
  qb, b, n = _qb(cfg, pl.program_id(0), bq), pl.program_id(1), pl.program_id(2)
  q_off = _q_offset(r)
  q_lo = q_off + qb * bq  # global, as in the forward
  q = r["q"][...]  # (bq, Hp)
  do = r["do"][...]  # (bq, Hvp)
  lse2 = r["lse2"][...]  # (bq,)
  delta = r["delta"][...]  # (bq,)
  q_pos = q_lo + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_valid, kv_valid = _scalar(r, "q_len"), _scalar(r, "kv_len")
  if kv_valid is None and cfg.Sp != cfg.S:
    kv_valid = cfg.S
  q_seg = r["q_seg"][...] if "q_seg" in r else None
  seeds = _seed_words(r)
  h_row = (_row_hash(seeds, b, n, q_pos) if seeds is not None
           else None)
  c = cfg.scale * LOG2E
  split = "q_seg" not in r and "mask" not in r

  def compute(kb, dq, masked, mask_blk=None, kv_seg=None):
    k_lo = kb * bk
    k = r["k"][pl.ds(k_lo, bk), :]  # (bk, Hp)
    v = r["v"][pl.ds(k_lo, bk), :]  # (bk, Hvp)
    k_pos = k_lo + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    if masked and "kv_len" in r:  # garbage keys past kv_lengths
      col = k_lo + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
      k, v = _zero_rows(k, col, kv_valid), _zero_rows(v, col, kv_valid)
    s = _dot(q, k, tb=True, precision=cfg.precision) * c  # (bq, bk)
    p = jnp.exp2(jnp.minimum(s - lse2[:, None], 0.0))  # <= 1, as above
    if masked:
      allowed = _allowed(cfg, _Tile(q_pos, k_pos, q_valid, kv_valid, q_seg,
                                    kv_seg, mask_blk))
      if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
    dp = _dot(do, v, tb=True, precision=cfg.precision)  # (bq, bk)
    if seeds is not None:
      keep = _keep(seeds, cfg.rate, h_row, k_pos)
      dp = jnp.where(keep, dp * (1.0 / (1.0 - cfg.rate)), 0.0)
    ds = p * (dp - delta[:, None])  # (bq, bk)
    return dq + _dot(ds.astype(k.dtype), k, precision=cfg.precision)

  def body(kb, dq, masked):
    if not masked or split:
      return compute(kb, dq, masked)
    k_lo = kb * bk
    kv_seg = r["kv_seg"][pl.ds(k_lo, bk)] if "kv_seg" in r else None
    mask_blk = r["mask"][:, pl.ds(k_lo, bk)] if "mask" in r else None
    pred = _may_attend(_Tile(None, None, q_seg=q_seg, kv_seg=kv_seg,
                             mask=mask_blk),
                       jnp.min(q_seg) if q_seg is not None else None,
                       jnp.max(q_seg) if q_seg is not None else None)
    return lax.cond(pred, lambda d: compute(kb, d, True, mask_blk, kv_seg),
                    lambda d: d, dq)

  lo, a, b_, hi = inner_block_range(
      cfg.spec, q_lo, bq, q_off + cfg.T, bk, cfg.Sp // bk,
      cfg.Sp if kv_valid is None else kv_valid, q_valid, can_split=split)
  dq = _run_split(lo, a, b_, hi, body, jnp.zeros((bq, cfg.Hp), jnp.float32),
                  0 * qb)
  r["dq"][...] = (dq * cfg.scale).astype(r["dq"].dtype)


def _backward(cfg: _Config, res, cotangents, q_offset=0):
  q, k, v, data, seeds, out, lse = res
  d_out, d_lse = cotangents
  G = cfg.G
  # D = rowsum(dO * O); dlse enters dS = P o (dP - D + dlse) with D's sign.
  delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32),
                     out.astype(jnp.float32))  # (B, N, T)
  delta = delta - d_lse.astype(jnp.float32)
  # Base-2 lse; empty rows get 0 (their P is zeroed by the mask anyway).
  lse2 = jnp.where(lse == masks_lib.EMPTY_ROW_LSE, 0.0, lse * LOG2E)
  qp = _pad(q, {1: cfg.Tp, 3: cfg.Hp})  # (B, Tp, N, Hp)
  kp = _pad(k, {1: cfg.Sp, 3: cfg.Hp})  # (B, Sp, K, Hp)
  vp = _pad(v, {1: cfg.Sp, 3: cfg.Hvp})  # (B, Sp, K, Hvp)
  dop = _pad(d_out.astype(q.dtype), {1: cfg.Tp, 3: cfg.Hvp})  # (B, Tp, N, Hvp)
  lse2 = _pad(lse2, {2: cfg.Tp})  # (B, N, Tp)
  delta = _pad(delta, {2: cfg.Tp})  # (B, N, Tp)
  ops = _mask_operands(cfg, data, seeds, q_offset)

  # dK, dV: grid (key block, b, kv head); the G query heads of kv head h are
  # the contiguous heads [h * G, (h + 1) * G).
  bq, bk = cfg.bq_dkv, cfg.bk_dkv
  operands = {
      "q": (qp, pl.BlockSpec((None, cfg.Tp, G, cfg.Hp),
                             lambda j, b, h: (b, 0, h, 0))),
      "k": (kp, pl.BlockSpec((None, bk, None, cfg.Hp),
                             lambda j, b, h: (b, j, h, 0))),
      "v": (vp, pl.BlockSpec((None, bk, None, cfg.Hvp),
                             lambda j, b, h: (b, j, h, 0))),
      "do": (dop, pl.BlockSpec((None, cfg.Tp, G, cfg.Hvp),
                               lambda j, b, h: (b, 0, h, 0))),
      "lse2": (lse2, pl.BlockSpec((None, G, cfg.Tp), lambda j, b, h: (b, h, 0))),
      "delta": (delta, pl.BlockSpec((None, G, cfg.Tp),
                                    lambda j, b, h: (b, h, 0))),
  }
  specs = {}
  if "seeds" in ops:
    specs["seeds"] = pl.BlockSpec((4,), lambda j, b, h: (0,))
  if "q_off" in ops:
    specs["q_off"] = pl.BlockSpec((1,), lambda j, b, h: (0,))
  for name in ("q_len", "kv_len"):
    if name in ops:
      specs[name] = pl.BlockSpec((None,), lambda j, b, h: (b,))
  if "q_seg" in ops:
    specs["q_seg"] = pl.BlockSpec((None, cfg.Tp), lambda j, b, h: (b, 0))
    specs["kv_seg"] = pl.BlockSpec((None, bk), lambda j, b, h: (b, j))
  if "mask" in ops:
    mb, mn = ops["mask"].shape[:2]
    if mn > 1:  # per head: the group's G heads
      specs["mask"] = pl.BlockSpec(
          (None, G, cfg.Tp, bk), lambda j, b, h: (b if mb > 1 else 0, h, 0, j))
    else:
      specs["mask"] = pl.BlockSpec(
          (None, None, cfg.Tp, bk),
          lambda j, b, h: (b if mb > 1 else 0, 0, 0, j))
  operands.update({name: (ops[name], specs[name]) for name in ops})
  dk, dv = _call(
      _dkv_kernel, cfg, "flash_attention_dkv", (cfg.Sp // bk, cfg.B, cfg.K),
      operands, {
          "dk": pl.BlockSpec((None, bk, None, cfg.Hp),
                             lambda j, b, h: (b, j, h, 0)),
          "dv": pl.BlockSpec((None, bk, None, cfg.Hvp),
                             lambda j, b, h: (b, j, h, 0)),
      }, [((cfg.B, cfg.Sp, cfg.K, cfg.Hp), k.dtype),
          ((cfg.B, cfg.Sp, cfg.K, cfg.Hvp), v.dtype)], cfg.warps_dkv)

  # dQ: grid (query block, b, n), like the forward.
  bq = cfg.bq_dq
  qmap = functools.partial(_qb, cfg, block=bq)
  kvh = lambda n: lax.div(n, G)
  q_spec = lambda width: pl.BlockSpec((None, bq, None, width),
                                      lambda i, b, n: (b, qmap(i), n, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, qmap(i)))
  operands = {
      "q": (qp, q_spec(cfg.Hp)),
      "k": (kp, pl.BlockSpec((None, cfg.Sp, None, cfg.Hp),
                             lambda i, b, n: (b, 0, kvh(n), 0))),
      "v": (vp, pl.BlockSpec((None, cfg.Sp, None, cfg.Hvp),
                             lambda i, b, n: (b, 0, kvh(n), 0))),
      "do": (dop, q_spec(cfg.Hvp)),
      "lse2": (lse2, row_spec),
      "delta": (delta, row_spec),
  }
  operands.update(_mask_spec_fwd(cfg, ops, bq, qmap))
  (dq,) = _call(_dq_kernel, cfg, "flash_attention_dq",
                (cfg.Tp // bq, cfg.B, cfg.N), operands,
                {"dq": q_spec(cfg.Hp)},
                [((cfg.B, cfg.Tp, cfg.N, cfg.Hp), q.dtype)], cfg.warps_dq)
  return (dq[:, :cfg.T, :, :cfg.H], dk[:, :cfg.S, :, :cfg.H],
          dv[:, :cfg.S, :, :cfg.Hv])


# -- custom_vjp wiring ---------------------------------------------------------


def _local(cfg: _Config, shard: partitioning.Shard, seeds):
  """The config of one batch/query-row/head shard, and its dropout
  operand."""
  Tp = _round_up(shard.T, max(cfg.bq, cfg.bq_dkv, cfg.bq_dq))
  cfg = dataclasses.replace(cfg, B=shard.B, T=shard.T, Tp=Tp, N=shard.N,
                            K=shard.K)
  if seeds is not None:
    seeds = dropout_lib.with_offsets(seeds, shard.batch_offset,
                                     shard.head_offset)
  return cfg, seeds


def _roles(cfg: _Config, data, seeds):
  """Roles (:mod:`partitioning`) of ``q, k, v, data, seeds``."""
  return (*partitioning.QKV_ROLES,
          partitioning.mask_data_roles(data, cfg.B, cfg.N),
          None if seeds is None else ".")


def _sharded_forward(cfg: _Config, q, k, v, data, seeds):
  """:func:`_forward`, split over batch, query rows and heads under
  ``jit``."""
  def kernel(shard, q, k, v, data, seeds):
    local_cfg, seeds = _local(cfg, shard, seeds)
    return _forward(local_cfg, q, k, v, data, seeds, shard.q_offset)

  return partitioning.call(
      kernel, (q, k, v, data, seeds), _roles(cfg, data, seeds),
      partitioning.OUT_LSE_ROLES, B=cfg.B, T=cfg.T, N=cfg.N, K=cfg.K,
      offsets=seeds is not None)


def _sharded_backward(cfg: _Config, res, cotangents):
  """:func:`_backward`, split over batch, query rows and heads under
  ``jit``."""
  q, k, v, data, seeds, out, lse = res

  def kernel(shard, q, k, v, data, seeds, out, lse, d_out, d_lse):
    local_cfg, seeds = _local(cfg, shard, seeds)
    return _backward(local_cfg, (q, k, v, data, seeds, out, lse),
                     (d_out, d_lse), shard.q_offset)

  # out, lse, then their cotangents
  roles = _roles(cfg, data, seeds) + 2 * partitioning.OUT_LSE_ROLES
  return partitioning.call(
      kernel, (*res, *cotangents), roles, partitioning.QKV_ROLES,
      B=cfg.B, T=cfg.T, N=cfg.N, K=cfg.K, offsets=seeds is not None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, data, seeds):
  return _sharded_forward(cfg, q, k, v, data, seeds)


def _call_prep(cfg: _Config, q, k, v, data, seeds) -> common.Prepared:
  return higher_order.prepared(q, k, v, cfg.spec, data, cfg.scale, cfg.rate,
                               seeds)


def _differentiable_forward(cfg: _Config, q, k, v, data, seeds):
  prep = _call_prep(cfg, q, k, v, data, seeds)
  return higher_order.attention(q, k, v, prep)


def _differentiable_backward(cfg: _Config, res, cotangents):
  q, k, v, data, seeds, out, lse = res
  prep = _call_prep(cfg, q, k, v, data, seeds)
  return higher_order.grads(q, k, v, prep, out, lse, *cotangents)


# The rules run the kernels; their own derivatives (second derivatives of
# the attention) are those of `higher_order`'s loops over key blocks.
def _flash_fwd(cfg, q, k, v, data, seeds):
  out, lse = higher_order.differentiated_as(
      functools.partial(_differentiable_forward, cfg),
      functools.partial(_sharded_forward, cfg))(q, k, v, data, seeds)
  return (out, lse), (q, k, v, data, seeds, out, lse)


def _flash_bwd(cfg, res, cotangents):
  dq, dk, dv = higher_order.differentiated_as(
      functools.partial(_differentiable_backward, cfg),
      functools.partial(_sharded_backward, cfg))(res, cotangents)
  data, seeds = res[3], res[4]
  zeros = lambda tree: jax.tree.map(
      lambda x: np.zeros(x.shape, jax.dtypes.float0), tree)
  return dq, dk, dv, zeros(data), zeros(seeds)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, prep: common.Prepared, *, block_sizes=None,
              interpret: bool = False):
  """Flash attention with the GPU (Triton) kernels.

  Args:
    q: ``(B, T, N, H)``.
    k: ``(B, S, K, H)``; query head ``n`` reads kv head ``n // (N // K)``.
    v: ``(B, S, K, Hv)``.
    prep: from :func:`pallas_kernels.common.prepare`.
    block_sizes: a :class:`BlockSizes`, or None for
      :meth:`BlockSizes.get_default`.
    interpret: run the kernels in Pallas's interpret mode (CPU tests).

  Returns:
    ``(out (B, T, N, Hv) in q.dtype, lse (B, N, T) float32)``; ``lse`` is the
    natural-log log-sum-exp, differentiable.

  Raises:
    UnsupportedCallError: ``H`` or ``Hv`` above :data:`MAX_HEAD_DIM`.
    TypeError: ``block_sizes`` of the wrong type.

  >>> from pallas_kernels import common
  >>> q = jnp.ones((1, 20, 2, 40))
  >>> prep = common.prepare(q, q, q, causal=True)
  >>> out, lse = attention(q, q, q, prep, interpret=True)
  >>> out.shape, lse.shape
  ((1, 20, 2, 40), (1, 2, 20))
  """
  out_dtype = q.dtype
  q, k, v = common.in_common_dtype(q, k, v)
  cfg = _make_config(prep, q.dtype, block_sizes, interpret)
  out, lse = _flash(cfg, q, k, v, prep.data, prep.seeds)
  return out.astype(out_dtype), lse
