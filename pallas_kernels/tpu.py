"""Flash attention for TPU through Mosaic (``jax.experimental.pallas.tpu``).

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, G query heads per key/value head (``N // K``), H head dim,
Hv value head dim. Inside the kernels arrays are heads-major and padded:
``q (B, N, Tp, Hp)``, ``k (B, K, Sp, Hp)``, ``v (B, K, Sp, Hvp)``, with
``Tp``/``Sp`` multiples of the kernel's query/key blocks and ``Hp``/``Hvp``
that is ``H``/``Hv`` rounded up to the 128 lanes of a vector register (zero
padding changes no dot product; padded keys are masked).

The algorithm is FlashAttention-2 (Dao, arXiv:2307.08691):

* forward, grid ``(B, N, Tp/bq, Sp/bk)``: one query block per ``(b, n, i)``,
  the key blocks stream through the innermost ("arbitrary") axis while the
  running max ``m_i``, normaliser ``l_i`` and unnormalised output live in
  VMEM scratch. It saves ``out`` and the natural-log ``lse`` only.
* ``dq``, same grid: recomputes ``P = exp(s - lse)`` per block and
  accumulates ``dQ = scale * dS K`` over the key blocks.
* ``dk``/``dv``, grid ``(B, K, Sp/bk, G, Tp/bq)``: one key block per
  ``(b, kv head, j)``; the G query heads of the group and the query blocks
  are both reduction axes, so GQA gradients are summed in the kernel and
  K/V are never repeated.

Block skipping: a per-kernel table, scalar-prefetched to SMEM, holds for each
row of blocks the range ``[lo, hi)`` of blocks that may hold an allowed
pair (from the band, the lengths, segment-id ranges and a dense mask's
per-block "any"). The index maps clamp the streamed block index into that
range, so a block outside it re-points at a block already in VMEM and is
never copied, and ``pl.when`` skips its computation; inside the range,
blocks whose segment ranges do not meet or whose dense-mask block is all
False are skipped too (loaded, not computed). :func:`visit_stats` counts
both from the same functions the kernels use.

Interpret mode: ``interpret=True`` passes ``pltpu.InterpretParams()`` to every
``pallas_call`` of the forward and backward, so the kernels run on CPU in the
TPU interpreter under ``jit`` and ``grad`` with no context manager; an
enclosing ``pltpu.force_tpu_interpret_mode(params)`` overrides them (the
tests use it to turn on race detection). ``interpret`` may also be an
``InterpretParams``. Under ``vmap`` the interpreted kernels run once per
element (``lax.map``); compiled kernels get Pallas's batched grid.

Per-row statistics (``lse`` and ``delta = rowsum(dO * O) - dlse``) travel as
``(B, N, Tp, 1)`` float32, one value per sublane, which is the layout the
``(bq, bk)`` score tiles broadcast against; the ``m_i``/``l_i`` scratch is
replicated over the 128 lanes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels import dropout as dropout_lib
from pallas_kernels import higher_order
from pallas_kernels import masks as masks_lib
from pallas_kernels import partitioning

_F32 = jnp.float32
_LANES = 128
_SUBLANES = 8
# Estimated VMEM working set above which a call is refused: the scoped VMEM
# default of current chips is 16-32 MiB, and Mosaic needs room of its own.
VMEM_BUDGET_BYTES = 24 * 2**20

# lax.dot_general dimension numbers: "NT" contracts the last dims of both
# (q k^T), "NN" is a plain matmul, "TN" contracts the first dims (p^T dO).
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the forward, ``dk``/``dv`` and ``dq`` kernels.

  Query blocks are multiples of 8 sublanes, key blocks multiples of 128
  lanes. A block longer than the (padded) sequence is shortened to it, and
  the blocks of a ragged sequence are balanced so that padding stays under
  one tile per block. 512 x 512 keeps the MXU busy while a block's
  ``(bq, bk)`` fp32 scores (1 MiB) and the double-buffered q/k/v tiles stay
  far below the scoped VMEM limit for head dims up to 256.

  Attributes:
    block_q, block_k: forward query and key block lengths.
    block_q_dkv, block_k_dkv: the ``dk``/``dv`` kernel's blocks.
    block_q_dq, block_k_dq: the ``dq`` kernel's blocks.

  >>> BlockSizes.uniform(128, 256).block_k_dq
  256
  """

  block_q: int = 512
  block_k: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512

  def __post_init__(self):
    for f in dataclasses.fields(self):
      multiple = _LANES if f.name.startswith("block_k") else _SUBLANES
      common.store_int_field(
          self, f.name, f"a positive multiple of {multiple}",
          lambda v, m=multiple: v > 0 and v % m == 0)

  @classmethod
  def uniform(cls, block_q: int, block_k: int) -> "BlockSizes":
    """The same ``(block_q, block_k)`` for all three kernels."""
    return cls(block_q=block_q, block_k=block_k, block_q_dkv=block_q,
               block_k_dkv=block_k, block_q_dq=block_q, block_k_dq=block_k)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, m: int) -> int:
  return _cdiv(a, m) * m


def _balanced(length: int, block: int, multiple: int) -> int:
  """A block <= ``block`` covering ``length`` in as few, even blocks."""
  return _round_up(_cdiv(length, _cdiv(length, block)), multiple)


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """One kernel's blocks and padded lengths."""
  bq: int
  bk: int
  Tp: int
  Sp: int
  mask_q_len: bool  # rows past q_lengths[b] are masked
  mask_kv_len: bool  # keys past kv_len[b] (kv_lengths, or padding) exist

  @property
  def nq(self) -> int:
    return self.Tp // self.bq

  @property
  def nk(self) -> int:
    return self.Sp // self.bk


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything that shapes the kernels; a static argument of custom_vjp."""
  problem: common.Problem
  spec: masks_lib.MaskSpec
  scale: float
  dropout_rate: float
  fwd: _Tiling
  dq: _Tiling
  dkv: _Tiling
  segments: bool
  mask_shape: Optional[tuple[int, int]]  # (#B, #N) of the dense mask
  dtype: Any  # the kernels' input dtype: float32 or bfloat16
  Hp: int
  Hvp: int
  interpret: Any  # False or pltpu.InterpretParams

  @property
  def table_heads(self) -> int:
    """Heads of the block tables: N with a per-head dense mask, else 1."""
    return self.mask_shape[1] if self.mask_shape else 1


def _tiling(block_q: int, block_k: int, T: int, S: int, q_lengths: bool,
            kv_lengths: bool) -> _Tiling:
  bq = _balanced(T, block_q, _SUBLANES)
  bk = _balanced(S, block_k, _LANES)
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  # Padded query rows need no mask: they are sliced off, and their zero dO
  # and delta make their backward contributions zero. Padded keys do.
  return _Tiling(bq=bq, bk=bk, Tp=Tp, Sp=Sp, mask_q_len=q_lengths,
                 mask_kv_len=kv_lengths or Sp != S)


def _interpret_params(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  if interpret is False or interpret is None:
    return False
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  raise TypeError("`interpret` must be a bool or a pltpu.InterpretParams; got "
                  f"{type(interpret).__name__}.")


def _static(prep: common.Prepared, dtypes, block_sizes: BlockSizes,
            interpret) -> _Static:
  p, d = prep.problem, prep.data
  tiling = functools.partial(_tiling, T=p.T, S=p.S,
                             q_lengths=d.q_lengths is not None,
                             kv_lengths=d.kv_lengths is not None)
  bs = block_sizes
  # fp16 runs as fp32: Mosaic has no fp16 matmul on most TPU generations.
  dtype = (jnp.dtype(jnp.bfloat16)
           if all(jnp.dtype(x) == jnp.bfloat16 for x in dtypes)
           else jnp.dtype(_F32))
  return _Static(
      problem=p, spec=prep.spec, scale=prep.scale,
      dropout_rate=prep.dropout_rate,
      fwd=tiling(bs.block_q, bs.block_k), dq=tiling(bs.block_q_dq,
                                                    bs.block_k_dq),
      dkv=tiling(bs.block_q_dkv, bs.block_k_dkv),
      segments=d.q_segment_ids is not None,
      mask_shape=None if d.mask is None else tuple(d.mask.shape[:2]),
      dtype=dtype, Hp=_round_up(p.H, _LANES), Hvp=_round_up(p.Hv, _LANES),
      interpret=interpret)


def _vmem_bytes(st: _Static, t: _Tiling, kind: str) -> int:
  """A rough VMEM working set of one kernel: buffers, scratch, temporaries."""
  isz = st.dtype.itemsize
  bq, bk, Hp, Hvp = t.bq, t.bk, st.Hp, st.Hvp
  tiles = (bq * Hp + bk * Hp + bk * Hvp) * isz  # q, k, v
  if kind == "fwd":
    tiles += bq * Hvp * isz + bq * _LANES * 4  # out, lse
    scratch = (2 * bq * _LANES + bq * Hvp) * 4
  elif kind == "dq":
    tiles += (bq * Hvp + bq * Hp) * isz + 2 * bq * _LANES * 4
    scratch = bq * Hp * 4
  else:
    tiles += (bq * Hvp + bk * Hp + bk * Hvp) * isz + 2 * bq * _LANES * 4
    scratch = bk * (Hp + Hvp) * 4
  if st.mask_shape:
    tiles += bq * bk * 4
  if st.segments:
    tiles += (bq * _LANES + _SUBLANES * bk) * 4
  # Double-buffered tiles; about six (bq, bk) fp32 temporaries (s, p, dp,
  # the mask, the dropout bits).
  return 2 * tiles + scratch + 6 * bq * bk * 4


# -- block tables --------------------------------------------------------------


def _block_pred(spec: masks_lib.MaskSpec, t: _Tiling, i, j, q_len, kv_len,
                q_off=0):
  """May block (i, j) hold a pair the band and the lengths allow?

  Elementwise on ints or arrays; ``q_len``/``kv_len`` are already clipped to
  ``q_off + T``/``S`` so padding counts as masked. Query positions start
  at ``q_off`` (:func:`_q_offset`).
  """
  q_lo = q_off + i * t.bq
  q_hi = jnp.minimum(q_lo + t.bq, q_len)
  k_lo = j * t.bk
  k_hi = jnp.minimum(k_lo + t.bk, kv_len)
  return ((q_lo < q_hi) & (k_lo < k_hi)
          & spec.block_may_attend(q_lo, q_hi, k_lo, k_hi))


def _segment_bounds(ids, length: int, block: int, padded: int):
  """Per-block min and max segment id of the real positions: 2x ``(B, n)``."""
  pad = ((0, 0), (0, padded - length))
  big = np.iinfo(np.int32).max
  lo = jnp.pad(ids, pad, constant_values=big).reshape(ids.shape[0], -1, block)
  hi = jnp.pad(ids, pad, constant_values=-big - 1).reshape(lo.shape)
  return lo.min(-1), hi.max(-1)  # (B, n) each


def _padded_mask(mask, t: _Tiling):
  """The dense mask padded with False to ``(#B, #N, Tp, Sp)``."""
  T, S = mask.shape[2:]
  return jnp.pad(mask, ((0, 0), (0, 0), (0, t.Tp - T), (0, t.Sp - S)))


def _tables(st: _Static, t: _Tiling, data: dict, transpose: bool) -> dict:
  """The scalar-prefetch tables of one kernel, flattened to 1-D int32.

  ``lo``/``hi`` give, per ``(b, table head, outer block)``, the range of
  inner blocks that may hold an allowed pair: outer is the query block and
  inner the key block, or the reverse when ``transpose`` (the dk/dv kernel).
  """
  p = st.problem
  B, nq, nk = p.B, t.nq, t.nk
  # Query positions are global: they start at the offset of this call's
  # rows in a split sequence (zero unless split).
  q_off = data["q_offset"][0] if "q_offset" in data else 0
  q_len = (jnp.full((B,), q_off + p.T, jnp.int32) if "q_lengths" not in data
           else jnp.clip(data["q_lengths"], q_off, q_off + p.T))
  kv_len = (jnp.full((B,), p.S, jnp.int32) if "kv_lengths" not in data
            else jnp.clip(data["kv_lengths"], 0, p.S))
  tb = {"q_len": q_len.astype(jnp.int32), "kv_len": kv_len,
        "seeds": data.get("seeds", jnp.zeros((4,), jnp.int32))}
  if "q_offset" in data:
    tb["q_off"] = data["q_offset"]
  i = jnp.arange(nq, dtype=jnp.int32)[None, None, :, None]
  j = jnp.arange(nk, dtype=jnp.int32)[None, None, None, :]
  ok = _block_pred(st.spec, t, i, j, q_len[:, None, None, None],
                   kv_len[:, None, None, None], q_off)  # (B, 1, nq, nk)
  if st.segments:
    qmin, qmax = _segment_bounds(data["q_ids"], p.T, t.bq, t.Tp)  # (B, nq)
    kmin, kmax = _segment_bounds(data["kv_ids"], p.S, t.bk, t.Sp)  # (B, nk)
    tb.update(qseg_min=qmin.reshape(-1), qseg_max=qmax.reshape(-1),
              kseg_min=kmin.reshape(-1), kseg_max=kmax.reshape(-1))
    ok = ok & ((qmin[:, None, :, None] <= kmax[:, None, None, :])
               & (kmin[:, None, None, :] <= qmax[:, None, :, None]))
  if st.mask_shape:
    Mb, Mn = st.mask_shape
    blk = _padded_mask(data["mask"], t).reshape(Mb, Mn, nq, t.bq, nk, t.bk)
    blk = blk.any(axis=(3, 5))  # (#B, #N, nq, nk)
    tb["blk"] = blk.astype(jnp.int32).reshape(-1)
    ok = ok & blk
  ok = jnp.broadcast_to(ok, (B, st.table_heads, nq, nk))
  if transpose:
    ok = jnp.swapaxes(ok, 2, 3)  # (B, Nt, nk, nq)
  n_inner = ok.shape[-1]
  nonempty = ok.any(-1)
  first = jnp.argmax(ok, -1)
  last = n_inner - 1 - jnp.argmax(ok[..., ::-1], -1)
  tb["lo"] = jnp.where(nonempty, first, 0).astype(jnp.int32).reshape(-1)
  tb["hi"] = jnp.where(nonempty, last + 1, 0).astype(jnp.int32).reshape(-1)
  return tb


def _range_index(st: _Static, t: _Tiling, b, n, outer, transpose: bool):
  n_outer = t.nk if transpose else t.nq
  nt = n if st.table_heads > 1 else 0
  return (b * st.table_heads + nt) * n_outer + outer


def _fetch(tb, st: _Static, t: _Tiling, b, n, outer, inner, transpose: bool):
  """The inner block to copy at this grid step: ``inner`` clamped to its range.

  Outside ``[lo, hi)`` it repeats the block of the neighbouring step, so the
  pipeline, which copies only when a block index changes, copies nothing.
  """
  idx = _range_index(st, t, b, n, outer, transpose)
  lo, hi = tb["lo"][idx], tb["hi"][idx]
  return jnp.minimum(jnp.maximum(inner, lo), jnp.maximum(hi - 1, lo))


def _visit(tb, st: _Static, t: _Tiling, b, n, i, j, transpose: bool):
  """Does block (query block i, key block j) of head n need computing?

  Works on refs (inside a kernel: scalar reads from SMEM) and on arrays.
  """
  outer, inner = (j, i) if transpose else (i, j)
  idx = _range_index(st, t, b, n, outer, transpose)
  ok = (inner >= tb["lo"][idx]) & (inner < tb["hi"][idx])
  if st.segments:
    qi, kj = b * t.nq + i, b * t.nk + j
    ok = ok & ((tb["qseg_min"][qi] <= tb["kseg_max"][kj])
               & (tb["kseg_min"][kj] <= tb["qseg_max"][qi]))
  if st.mask_shape:
    Mb, Mn = st.mask_shape
    mb = b if Mb > 1 else 0
    mn = n if Mn > 1 else 0
    ok = ok & (tb["blk"][((mb * Mn + mn) * t.nq + i) * t.nk + j] != 0)
  return ok


def visit_stats(prep: common.Prepared, block_sizes: Optional[BlockSizes] = None,
                ) -> dict[str, dict[str, int]]:
  """How many blocks each kernel computes and copies, from its own tables.

  Replays the kernels' grids with the functions their index maps and
  ``pl.when`` use. ``computed`` counts computed ``(q block, k block)`` pairs
  (per query head); ``copied`` counts copies of the streamed operand (K/V
  blocks in the forward and ``dq``, Q/dO blocks in ``dk``/``dv``): a copy
  happens at a grid step whose block index differs from the previous
  step's. ``total`` is the number of pairs without skipping.

  >>> q = jnp.zeros((1, 1024, 1, 64))
  >>> prep = common.prepare(q, q, q, causal=True)
  >>> visit_stats(prep, BlockSizes.uniform(128, 128))["fwd"]
  {'computed': 36, 'copied': 35, 'total': 64}
  """
  st = _static(prep, (_F32,), block_sizes or BlockSizes(), False)
  data = _data_dict(prep)
  stats = {}
  for kind in ("fwd", "dq", "dkv"):
    computed, copied = _replay_grid(st, kind, data)
    total = st.problem.B * st.problem.N * getattr(st, kind).nq * getattr(
        st, kind).nk
    stats[kind] = {"computed": int(computed), "copied": int(copied),
                   "total": total}
  return stats


@functools.partial(jax.jit, static_argnums=(0, 1))
def _replay_grid(st: _Static, kind: str, data: dict):
  """(computed blocks, streamed copies) of one kernel; see visit_stats."""
  p, t = st.problem, getattr(st, kind)
  G = p.groups
  transpose = kind == "dkv"
  tb = _tables(st, t, data, transpose)
  if transpose:  # grid (b, kv head, j, g, i)
    b, kh, j, g, i = jnp.meshgrid(
        *(jnp.arange(s, dtype=jnp.int32) for s in (p.B, p.K, t.nk, G, t.nq)),
        indexing="ij")
    n = kh * G + g
    key = (b, n, _fetch(tb, st, t, b, n, j, i, True))  # the Q/dO block
  else:  # grid (b, n, i, j)
    b, n, i, j = jnp.meshgrid(
        *(jnp.arange(s, dtype=jnp.int32) for s in (p.B, p.N, t.nq, t.nk)),
        indexing="ij")
    key = (b, _kv_head(n, G), _fetch(tb, st, t, b, n, i, j, False))  # K/V
  visited = _visit(tb, st, t, b, n, i, j, transpose)
  key = jnp.stack([x.reshape(-1) for x in key], -1)  # (steps, 3)
  # The pipeline copies a block when its index differs from the last step's.
  copies = jnp.sum(jnp.any(key[1:] != key[:-1], -1)) + 1
  return visited.sum(), copies


# -- kernels -------------------------------------------------------------------


def _dot(a, b, dims):
  """An MXU matmul with fp32 accumulation (fp32 passes for fp32 inputs)."""
  precision = (lax.Precision.HIGHEST if a.dtype == _F32 and b.dtype == _F32
               else lax.Precision.DEFAULT)
  return lax.dot_general(a, b, dims, precision=(precision, precision),
                         preferred_element_type=_F32)


def _q_offset(r):
  """The global position of local query row 0 (SMEM): nonzero when this
  call is one shard of a problem split over query rows."""
  return r["q_off"][0] if "q_off" in r else 0


def _allowed(r, st: _Static, t: _Tiling, b, i, j):
  """The ``(bq, bk)`` "may attend" mask of block (i, j), or None if all True.

  ANDs the band, the lengths (which also cover padding), the segment ids and
  the dense mask, exactly as ``masks.dense_mask`` does for the reference.
  """
  shape = (t.bq, t.bk)
  q_pos = (_q_offset(r) + i * t.bq
           + lax.broadcasted_iota(jnp.int32, shape, 0))
  k_pos = j * t.bk + lax.broadcasted_iota(jnp.int32, shape, 1)
  ok = st.spec.allows(q_pos, k_pos)
  ok = None if ok is True else ok
  terms = []
  if t.mask_q_len:
    terms.append(q_pos < r["q_len"][b])
  if t.mask_kv_len:
    terms.append(k_pos < r["kv_len"][b])
  if st.segments:
    # q ids are replicated over lanes, kv ids over sublanes (TPU tiles).
    terms.append(r["q_ids"][:, :1] == r["kv_ids"][:1, :])
  if st.mask_shape:
    terms.append(r["mask"][...].astype(jnp.int32) != 0)
  for term in terms:
    ok = term if ok is None else ok & term
  return ok


def _dropout_keep(r, st: _Static, t: _Tiling, b, n, i, j):
  """The block's ``(bq, bk)`` keep mask, with the reference's bits."""
  s0, s1 = r["seeds"][0], r["seeds"][1]
  # Global batch and head (dropout_lib.with_offsets: this call may be one
  # shard of a split problem).
  b, n = b + r["seeds"][2], n + r["seeds"][3]
  # The row part of the hash once per query row (lanes replicated), then
  # one hash per element with the absolute key index.
  rows = (_q_offset(r) + i * t.bq
          + lax.broadcasted_iota(jnp.int32, (t.bq, _LANES), 0))
  h_row = dropout_lib.row_hash((s0, s1), b, n, rows)[:, :1]  # (bq, 1)
  cols = j * t.bk + lax.broadcasted_iota(jnp.int32, (t.bq, t.bk), 1)
  return (dropout_lib.bits_from_row(h_row, cols, s1)
          >= dropout_lib.threshold(st.dropout_rate))


def _apply_dropout(st: _Static, keep, x):
  """``x * Z / (1 - rate)``: kept entries rescaled, dropped ones zero."""
  return jnp.where(keep, x * (1.0 / (1.0 - st.dropout_rate)), 0.0)


def _probs_from_lse(r, st, t, b, i, j):
  """Recomputed ``P = exp(s - lse)`` of block (i, j), zero where masked."""
  s = _dot(r["q"][...], r["k"][...], _NT) * st.scale  # (bq, bk)
  allowed = _allowed(r, st, t, b, i, j)
  # Masked logits get MASK_VALUE, then P is zeroed explicitly: an empty
  # row's lse is MASK_VALUE too, and exp(0) would be 1.
  if allowed is not None:
    s = jnp.where(allowed, s, masks_lib.MASK_VALUE)
  p = jnp.exp(s - r["lse"][...])  # lse: (bq, 1)
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  return p


def _fwd_kernel(*refs, st: _Static, names):
  r = dict(zip(names, refs))
  t = st.fwd
  b, n, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    r["m_i"][...] = jnp.full(r["m_i"].shape, masks_lib.MASK_VALUE, _F32)
    r["l_i"][...] = jnp.zeros(r["l_i"].shape, _F32)
    r["acc"][...] = jnp.zeros(r["acc"].shape, _F32)

  @pl.when(_visit(r, st, t, b, n, i, j, False))
  def _step():
    s = _dot(r["q"][...], r["k"][...], _NT) * st.scale  # (bq, bk)
    allowed = _allowed(r, st, t, b, i, j)
    if allowed is not None:
      s = jnp.where(allowed, s, masks_lib.MASK_VALUE)
    # m_i, l_i are kept replicated over 128 lanes; column 0 is the value.
    m_prev, l_prev = r["m_i"][:, :1], r["l_i"][:, :1]  # (bq, 1)
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    # Rescale what was accumulated under the old max. While a row has seen
    # only masked keys, m stays MASK_VALUE and alpha is exp(0) = 1 on zeros.
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)  # (bq, bk)
    if allowed is not None:
      p = jnp.where(allowed, p, 0.0)  # masked logits may equal m_new
    l_new = alpha * l_prev + p.sum(axis=1, keepdims=True)
    # Dropout acts on normalised probabilities; 1/l_i is applied at the end,
    # and l_i sums the probabilities before dropout.
    if st.dropout_rate > 0.0:
      p = _apply_dropout(st, _dropout_keep(r, st, t, b, n, i, j), p)
    v = r["v"][...]
    r["acc"][...] = alpha * r["acc"][...] + _dot(p.astype(v.dtype), v, _NN)
    r["m_i"][...] = jnp.broadcast_to(m_new, r["m_i"].shape)
    r["l_i"][...] = jnp.broadcast_to(l_new, r["l_i"].shape)

  @pl.when(j == t.nk - 1)
  def _finish():
    l = r["l_i"][:, :1]  # (bq, 1)
    # A row with no allowed key has l_i == 0: output 0 and the fixed LSE.
    nonempty = l > 0.0
    l_safe = jnp.where(nonempty, l, 1.0)
    r["out"][...] = (r["acc"][...] / l_safe).astype(r["out"].dtype)
    r["lse"][...] = jnp.where(nonempty, r["m_i"][:, :1] + jnp.log(l_safe),
                              masks_lib.EMPTY_ROW_LSE)


def _dq_kernel(*refs, st: _Static, names):
  r = dict(zip(names, refs))
  t = st.dq
  b, n, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    r["dq_acc"][...] = jnp.zeros(r["dq_acc"].shape, _F32)

  @pl.when(_visit(r, st, t, b, n, i, j, False))
  def _step():
    p = _probs_from_lse(r, st, t, b, i, j)  # (bq, bk)
    dp = _dot(r["do"][...], r["v"][...], _NT)  # dO V^T: (bq, bk)
    if st.dropout_rate > 0.0:
      dp = _apply_dropout(st, _dropout_keep(r, st, t, b, n, i, j), dp)
    # delta = rowsum(dO * O) - dlse, so dS = P (dP - D + dlse).
    ds = p * (dp - r["delta"][...])
    k = r["k"][...]
    r["dq_acc"][...] += _dot(ds.astype(k.dtype), k, _NN)

  @pl.when(j == t.nk - 1)
  def _finish():
    r["dq"][...] = (r["dq_acc"][...] * st.scale).astype(r["dq"].dtype)


def _dkv_kernel(*refs, st: _Static, names):
  r = dict(zip(names, refs))
  t = st.dkv
  G = st.problem.groups
  b, kh, j, g, i = (pl.program_id(a) for a in range(5))
  n = kh * G + g  # the query head

  # The G heads of the group and the query blocks are both reductions.
  @pl.when((g == 0) & (i == 0))
  def _init():
    r["dk_acc"][...] = jnp.zeros(r["dk_acc"].shape, _F32)
    r["dv_acc"][...] = jnp.zeros(r["dv_acc"].shape, _F32)

  @pl.when(_visit(r, st, t, b, n, i, j, True))
  def _step():
    p = _probs_from_lse(r, st, t, b, i, j)  # (bq, bk)
    do = r["do"][...]
    dp = _dot(do, r["v"][...], _NT)  # dO V^T: (bq, bk)
    pz = p
    if st.dropout_rate > 0.0:
      # dV sees the dropped probabilities, dP the dropped gradient.
      keep = _dropout_keep(r, st, t, b, n, i, j)
      pz, dp = _apply_dropout(st, keep, p), _apply_dropout(st, keep, dp)
    r["dv_acc"][...] += _dot(pz.astype(do.dtype), do, _TN)  # (bk, Hvp)
    ds = p * (dp - r["delta"][...])
    q = r["q"][...]
    r["dk_acc"][...] += _dot(ds.astype(q.dtype), q, _TN)  # (bk, Hp)

  @pl.when((g == G - 1) & (i == t.nq - 1))
  def _finish():
    r["dk"][...] = (r["dk_acc"][...] * st.scale).astype(r["dk"].dtype)
    r["dv"][...] = r["dv_acc"][...].astype(r["dv"].dtype)


# -- pallas_call plumbing ------------------------------------------------------


def _kv_head(n, groups: int):
  """The key/value head that query head ``n`` reads (GQA in index maps)."""
  return n if groups == 1 else lax.div(n, jnp.int32(groups))


def _heads_major(x, length: int, depth: int):
  """``(B, L, N, D)`` -> zero-padded ``(B, N, length, depth)``."""
  x = jnp.swapaxes(x, 1, 2)  # (B, N, L, D)
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]),
                     (0, depth - x.shape[3])))


def _rows(x, length: int):
  """``(B, N, T)`` fp32 -> ``(B, N, length, 1)``, one value per sublane row."""
  x = jnp.pad(x.astype(_F32), ((0, 0), (0, 0), (0, length - x.shape[2])))
  return x[..., None]


class _Call:
  """Collects a pallas_call's operands by name (prefetch, in, out, scratch)."""

  def __init__(self, st: _Static, t: _Tiling, tables: dict, transpose: bool):
    self.st, self.t, self.transpose = st, t, transpose
    self.prefetch = list(tables.items())
    self.pre_names = tuple(name for name, _ in self.prefetch)
    self.inputs, self.outputs, self.scratch = [], [], []

  def coords(self, *grid_and_refs):
    """Grid indices -> ``(b, query head, q block, k block)`` to copy."""
    st, t = self.st, self.t
    ndim = 5 if self.transpose else 4
    idx, pre = grid_and_refs[:ndim], grid_and_refs[ndim:]
    tb = dict(zip(self.pre_names, pre))
    if self.transpose:
      b, kh, j, g, i = idx
      n = kh * st.problem.groups + g
      return b, n, _fetch(tb, st, t, b, n, j, i, True), j
    b, n, i, j = idx
    return b, n, i, _fetch(tb, st, t, b, n, i, j, False)

  def spec(self, block_shape, index_fn):
    return pl.BlockSpec(block_shape,
                        lambda *a: index_fn(*self.coords(*a)))

  def add_input(self, name, array, block_shape, index_fn):
    self.inputs.append((name, array, self.spec(block_shape, index_fn)))

  def add_output(self, name, shape, dtype, block_shape, index_fn):
    self.outputs.append((name, jax.ShapeDtypeStruct(shape, dtype),
                         self.spec(block_shape, index_fn)))

  def add_mask_inputs(self, data: dict):
    """Segment ids and the dense mask, tiled for this kernel."""
    st, t = self.st, self.t
    p = st.problem
    if st.segments:
      q_ids = jnp.pad(data["q_ids"], ((0, 0), (0, t.Tp - p.T)))
      kv_ids = jnp.pad(data["kv_ids"], ((0, 0), (0, t.Sp - p.S)))
      q_ids = jnp.broadcast_to(q_ids[:, :, None], (p.B, t.Tp, _LANES))
      kv_ids = jnp.broadcast_to(kv_ids[:, None, :], (p.B, _SUBLANES, t.Sp))
      self.add_input("q_ids", q_ids, (None, t.bq, _LANES),
                     lambda b, n, i, j: (b, i, 0))
      self.add_input("kv_ids", kv_ids, (None, _SUBLANES, t.bk),
                     lambda b, n, i, j: (b, 0, j))
    if st.mask_shape:
      Mb, Mn = st.mask_shape
      # int8 tiles are (32, 128); smaller query blocks take int32.
      dtype = jnp.int8 if t.bq % 32 == 0 else jnp.int32
      mask = _padded_mask(data["mask"], t).astype(dtype)
      self.add_input(
          "mask", mask, (None, None, t.bq, t.bk),
          lambda b, n, i, j: (b if Mb > 1 else 0, n if Mn > 1 else 0, i, j))

  def __call__(self, kernel, grid, semantics, name, cost=None):
    st = self.st
    names = (self.pre_names + tuple(n for n, _, _ in self.inputs)
             + tuple(n for n, _, _ in self.outputs)
             + tuple(n for n, _ in self.scratch))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(self.prefetch), grid=grid,
        in_specs=[s for _, _, s in self.inputs],
        out_specs=[s for _, _, s in self.outputs],
        scratch_shapes=[s for _, s in self.scratch])
    args, out_kwargs = _same_varying_axes(
        [a for _, a in self.prefetch] + [a for _, a, _ in self.inputs])
    fn = pl.pallas_call(
        functools.partial(kernel, st=st, names=names), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(s.shape, s.dtype, **out_kwargs)
                   for _, s, _ in self.outputs],
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=st.interpret, cost_estimate=cost, name=name)
    if st.interpret:
      fn = _map_under_vmap(fn)
    return fn(*args)


def _map_under_vmap(fn):
  """``fn``, batched by a sequential ``lax.map`` under ``vmap``.

  Pallas batches a pallas_call by adding a leading grid axis, which the TPU
  interpreter of JAX 0.10 rejects (it pairs the grid with the unbatched
  dimension_semantics). Compiled kernels keep Pallas's batching.
  """
  fn = jax.custom_batching.custom_vmap(fn)

  @fn.def_vmap
  def _rule(axis_size, in_batched, *args):
    del axis_size
    batched = [a for a, is_b in zip(args, in_batched) if is_b]

    def one(xs):
      xs = iter(xs)
      return fn(*(next(xs) if is_b else a for a, is_b in zip(args, in_batched)))

    outs = lax.map(one, batched)
    return outs, jax.tree.map(lambda _: True, outs)

  return fn


def _same_varying_axes(arrays):
  """Makes every operand vary over the same mesh axes (``check_vma``).

  Inside ``shard_map(check_vma=True)`` a pallas_call's outputs must say
  which mesh axes they vary over; they vary over the union of the
  operands'. Returns the operands, cast to that union
  (:func:`common.vary_alike`), and the ``ShapeDtypeStruct`` keyword that
  declares it.
  """
  arrays, axes = common.vary_alike(arrays)
  aval = jax.typeof(arrays[0])
  params = inspect.signature(jax.ShapeDtypeStruct).parameters
  if "manual_axis_type" in params:
    return arrays, {"manual_axis_type": aval.manual_axis_type}
  if "vma" in params:
    return arrays, {"vma": axes}
  return arrays, {}


def _cost(st: _Static, t: _Tiling, matmuls: int, arrays) -> pl.CostEstimate:
  """XLA's cost hint: ``matmuls`` (T x S) products, half over H, half Hv."""
  p = st.problem
  pairs = p.B * p.N * t.Tp * t.Sp
  depth = st.Hp * (matmuls // 2) + st.Hvp * (matmuls - matmuls // 2)
  flops = 2 * pairs * depth
  return pl.CostEstimate(
      flops=int(flops), transcendentals=int(pairs),
      bytes_accessed=int(sum(a.size * a.dtype.itemsize for a in arrays)))


def _forward(st: _Static, q, k, v, data):
  p, t = st.problem, st.fwd
  G = p.groups
  qh = _heads_major(q.astype(st.dtype), t.Tp, st.Hp)  # (B, N, Tp, Hp)
  kh = _heads_major(k.astype(st.dtype), t.Sp, st.Hp)  # (B, K, Sp, Hp)
  vh = _heads_major(v.astype(st.dtype), t.Sp, st.Hvp)  # (B, K, Sp, Hvp)
  call = _Call(st, t, _tables(st, t, data, False), transpose=False)
  q_blk = lambda b, n, i, j: (b, n, i, 0)
  kv_blk = lambda b, n, i, j: (b, _kv_head(n, G), j, 0)
  call.add_input("q", qh, (None, None, t.bq, st.Hp), q_blk)
  call.add_input("k", kh, (None, None, t.bk, st.Hp), kv_blk)
  call.add_input("v", vh, (None, None, t.bk, st.Hvp), kv_blk)
  call.add_mask_inputs(data)
  call.add_output("out", (p.B, p.N, t.Tp, st.Hvp), st.dtype,
                  (None, None, t.bq, st.Hvp), q_blk)
  call.add_output("lse", (p.B, p.N, t.Tp, 1), _F32, (None, None, t.bq, 1),
                  q_blk)
  call.scratch = [("m_i", pltpu.VMEM((t.bq, _LANES), _F32)),
                  ("l_i", pltpu.VMEM((t.bq, _LANES), _F32)),
                  ("acc", pltpu.VMEM((t.bq, st.Hvp), _F32))]
  out, lse = call(_fwd_kernel, (p.B, p.N, t.nq, t.nk),
                  ("parallel", "parallel", "parallel", "arbitrary"),
                  "flash_attention_fwd", _cost(st, t, 2, (qh, kh, vh)))
  out = jnp.swapaxes(out[:, :, :p.T, :p.Hv], 1, 2)  # (B, T, N, Hv)
  return out.astype(q.dtype), lse[:, :, :p.T, 0]  # lse: (B, N, T)


def _backward(st: _Static, q, k, v, data, out, lse, d_out, d_lse):
  p = st.problem
  G = p.groups
  # D = rowsum(dO * O); the LSE's own cotangent enters dS with the other
  # sign, so the kernels take delta = D - dlse.
  d = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)  # (B, T, N)
  delta = jnp.swapaxes(d, 1, 2) - d_lse.astype(_F32)  # (B, N, T)

  def operands(t):
    return (_heads_major(q.astype(st.dtype), t.Tp, st.Hp),
            _heads_major(k.astype(st.dtype), t.Sp, st.Hp),
            _heads_major(v.astype(st.dtype), t.Sp, st.Hvp),
            _heads_major(d_out.astype(st.dtype), t.Tp, st.Hvp),
            _rows(lse, t.Tp), _rows(delta, t.Tp))

  q_blk = lambda b, n, i, j: (b, n, i, 0)
  kv_blk = lambda b, n, i, j: (b, _kv_head(n, G), j, 0)

  def add_operands(call, t, arrays):
    qh, kh, vh, doh, lse_r, delta_r = arrays
    call.add_input("q", qh, (None, None, t.bq, st.Hp), q_blk)
    call.add_input("k", kh, (None, None, t.bk, st.Hp), kv_blk)
    call.add_input("v", vh, (None, None, t.bk, st.Hvp), kv_blk)
    call.add_input("do", doh, (None, None, t.bq, st.Hvp), q_blk)
    call.add_input("lse", lse_r, (None, None, t.bq, 1), q_blk)
    call.add_input("delta", delta_r, (None, None, t.bq, 1), q_blk)
    call.add_mask_inputs(data)

  # dq: grid (B, N, nq, nk), key blocks innermost.
  t = st.dq
  arrays = operands(t)
  call = _Call(st, t, _tables(st, t, data, False), transpose=False)
  add_operands(call, t, arrays)
  call.add_output("dq", (p.B, p.N, t.Tp, st.Hp), _F32,
                  (None, None, t.bq, st.Hp), q_blk)
  call.scratch = [("dq_acc", pltpu.VMEM((t.bq, st.Hp), _F32))]
  (dq,) = call(_dq_kernel, (p.B, p.N, t.nq, t.nk),
               ("parallel", "parallel", "parallel", "arbitrary"),
               "flash_attention_dq", _cost(st, t, 3, arrays[:4]))
  dq = jnp.swapaxes(dq[:, :, :p.T, :p.H], 1, 2)  # (B, T, N, H)

  # dk, dv: grid (B, K, nk, G, nq), the group's heads and query blocks
  # innermost, so each (b, kv head, key block) is written once.
  t = st.dkv
  arrays = operands(t)
  call = _Call(st, t, _tables(st, t, data, True), transpose=True)
  add_operands(call, t, arrays)
  call.add_output("dk", (p.B, p.K, t.Sp, st.Hp), _F32,
                  (None, None, t.bk, st.Hp), kv_blk)
  call.add_output("dv", (p.B, p.K, t.Sp, st.Hvp), _F32,
                  (None, None, t.bk, st.Hvp), kv_blk)
  call.scratch = [("dk_acc", pltpu.VMEM((t.bk, st.Hp), _F32)),
                  ("dv_acc", pltpu.VMEM((t.bk, st.Hvp), _F32))]
  dk, dv = call(_dkv_kernel, (p.B, p.K, t.nk, G, t.nq),
                ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
                "flash_attention_dkv", _cost(st, t, 4, arrays[:4]))
  dk = jnp.swapaxes(dk[:, :, :p.S, :p.H], 1, 2)  # (B, S, K, H)
  dv = jnp.swapaxes(dv[:, :, :p.S, :p.Hv], 1, 2)  # (B, S, K, Hv)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _local(st: _Static, shard: partitioning.Shard, data: dict):
  """The static config and per-call arrays of one batch/query-row/head
  shard."""
  mask = data.get("mask")

  def rows(t: _Tiling) -> _Tiling:  # blocks over the shard's T rows
    bq = _balanced(shard.T, t.bq, _SUBLANES)
    return dataclasses.replace(t, bq=bq, Tp=_round_up(shard.T, bq))

  st = dataclasses.replace(
      st, problem=dataclasses.replace(st.problem, B=shard.B, T=shard.T,
                                      N=shard.N, K=shard.K),
      fwd=rows(st.fwd), dq=rows(st.dq), dkv=rows(st.dkv),
      mask_shape=None if mask is None else tuple(mask.shape[:2]))
  if "seeds" in data:
    data = dict(data, seeds=dropout_lib.with_offsets(
        data["seeds"], shard.batch_offset, shard.head_offset))
  if not (isinstance(shard.q_offset, int) and shard.q_offset == 0):
    data = dict(data, q_offset=jnp.reshape(shard.q_offset, (1,)).astype(
        jnp.int32))
  return st, data


def _data_roles(st: _Static, data: dict) -> dict:
  """Roles (:mod:`partitioning`) of the arrays of :func:`_data_dict`."""
  roles = {"q_ids": "bt", "kv_ids": "b.", "q_lengths": "b",
           "kv_lengths": "b", "seeds": "."}
  if "mask" in data:
    roles["mask"] = partitioning.dense_mask_roles(
        data["mask"], st.problem.B, st.problem.N)
  return {name: roles[name] for name in data}


def _sharded(st: _Static, fn, arrays, roles, out_roles):
  """``fn(st, *arrays)`` (``arrays[3]`` the data dict), split over batch,
  query rows and heads under ``jit``."""
  def kernel(shard, *arrays):
    local_st, data = _local(st, shard, arrays[3])
    return fn(local_st, *arrays[:3], data, *arrays[4:])

  p = st.problem
  return partitioning.call(kernel, arrays, roles, out_roles, B=p.B, T=p.T,
                           N=p.N, K=p.K, offsets="seeds" in arrays[3],
                           partitionable=not st.interpret)


def _sharded_forward(st: _Static, q, k, v, data):
  return _sharded(st, _forward, (q, k, v, data),
                  (*partitioning.QKV_ROLES, _data_roles(st, data)),
                  partitioning.OUT_LSE_ROLES)


def _sharded_backward(st: _Static, q, k, v, data, out, lse, d_out, d_lse):
  # out, lse, then their cotangents
  return _sharded(st, _backward, (q, k, v, data, out, lse, d_out, d_lse),
                  (*partitioning.QKV_ROLES, _data_roles(st, data))
                  + 2 * partitioning.OUT_LSE_ROLES,
                  partitioning.QKV_ROLES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, data):
  return _sharded_forward(st, q, k, v, data)


def _call_prep(st: _Static, q, k, v, data: dict) -> common.Prepared:
  """The :class:`~pallas_kernels.common.Prepared` of a call, from
  :func:`_data_dict`'s arrays."""
  mask_data = masks_lib.MaskData(
      q_segment_ids=data.get("q_ids"), kv_segment_ids=data.get("kv_ids"),
      q_lengths=data.get("q_lengths"), kv_lengths=data.get("kv_lengths"),
      mask=data.get("mask"))
  return higher_order.prepared(q, k, v, st.spec, mask_data, st.scale,
                               st.dropout_rate, data.get("seeds"))


def _differentiable_forward(st: _Static, q, k, v, data):
  return higher_order.attention(q, k, v, _call_prep(st, q, k, v, data))


def _differentiable_backward(st: _Static, q, k, v, data, out, lse, d_out,
                             d_lse):
  return higher_order.grads(q, k, v, _call_prep(st, q, k, v, data), out,
                            lse, d_out, d_lse)


# The rules run the kernels; their own derivatives (second derivatives of
# the attention) are those of `higher_order`'s loops over key blocks.
def _flash_fwd(st, q, k, v, data):
  out, lse = higher_order.differentiated_as(
      functools.partial(_differentiable_forward, st),
      functools.partial(_sharded_forward, st))(q, k, v, data)
  return (out, lse), (q, k, v, data, out, lse)


def _flash_bwd(st, residuals, cotangents):
  q, k, v, data, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = higher_order.differentiated_as(
      functools.partial(_differentiable_backward, st),
      functools.partial(_sharded_backward, st))(q, k, v, data, out, lse,
                                                d_out, d_lse)
  return dq, dk, dv, jax.tree.map(lambda _: None, data)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _data_dict(prep: common.Prepared) -> dict:
  """The per-call arrays the kernels read (nothing differentiable)."""
  d = prep.data
  data = {}
  if d.q_segment_ids is not None:
    data["q_ids"] = d.q_segment_ids.astype(jnp.int32)
    data["kv_ids"] = d.kv_segment_ids.astype(jnp.int32)
  if d.q_lengths is not None:
    data["q_lengths"] = d.q_lengths.astype(jnp.int32)
  if d.kv_lengths is not None:
    data["kv_lengths"] = d.kv_lengths.astype(jnp.int32)
  if d.mask is not None:
    data["mask"] = d.mask
  if prep.dropout_rate > 0.0:
    data["seeds"] = prep.seeds.astype(jnp.int32)
  return data


def _attention(q, k, v, prep: common.Prepared, block_sizes, interpret):
  """:func:`attention` without the platform check (lowering tests use it)."""
  if block_sizes is None:
    block_sizes = BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError("`block_sizes` for backend='tpu' must be a "
                    "pallas_kernels.tpu.BlockSizes; got "
                    f"{type(block_sizes).__name__}.")
  st = _static(prep, (q.dtype, k.dtype, v.dtype), block_sizes,
               _interpret_params(interpret))
  for kind in ("fwd", "dq", "dkv"):
    t = getattr(st, kind)
    need = _vmem_bytes(st, t, kind)
    if need > VMEM_BUDGET_BYTES:
      p = st.problem
      raise common.UnsupportedCallError(
          f"The TPU {kind} kernel would need about {need / 2**20:.1f} MiB of "
          f"VMEM (budget {VMEM_BUDGET_BYTES / 2**20:.0f} MiB) with blocks "
          f"bq={t.bq}, bk={t.bk} and H={p.H}, Hv={p.Hv}; pass smaller "
          "block_sizes.")
  return _flash(st, q, k, v, _data_dict(prep))


def attention(q, k, v, prep: common.Prepared, *,
              block_sizes: Optional[BlockSizes] = None, interpret: Any = False):
  """Flash attention on TPU; the ``"tpu"`` target of ``flash_attention``.

  Computes :func:`pallas_kernels.reference.attention_core`'s function with
  Mosaic kernels, differentiable through ``jax.custom_vjp``.

  Args:
    q: ``(B, T, N, H)``.
    k: ``(B, S, K, H)``, ``N % K == 0``.
    v: ``(B, S, K, Hv)``.
    prep: from :func:`pallas_kernels.common.prepare`.
    block_sizes: a :class:`BlockSizes`, or None for the defaults.
    interpret: True (or a ``pltpu.InterpretParams``) runs the kernels in
      the TPU interpreter, e.g. on CPU; forward and backward both.

  Returns:
    ``out (B, T, N, Hv)`` in ``q.dtype`` and ``lse (B, N, T)`` float32.

  Raises:
    UnsupportedCallError: no TPU and ``interpret`` is False, or the blocks
      would not fit in VMEM.
    TypeError: ``block_sizes`` or ``interpret`` of the wrong type.

  >>> q = jax.random.normal(jax.random.key(0), (1, 8, 2, 32))
  >>> prep = common.prepare(q, q, q, causal=True)
  >>> out, lse = attention(q, q, q, prep, interpret=True)
  >>> out.shape, lse.shape
  ((1, 8, 2, 32), (1, 2, 8))
  """
  if not _interpret_params(interpret) and jax.default_backend() != "tpu":
    raise common.UnsupportedCallError(
        "The Mosaic TPU kernels need a TPU; jax.default_backend() is "
        f"{jax.default_backend()!r}. Pass interpret=True to run them in the "
        "TPU interpreter.")
  return _attention(q, k, v, prep, block_sizes, interpret)
