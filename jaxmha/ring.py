"""Ring attention: context (sequence) parallelism over a mesh axis.

Shape letters: B batch, T query length, S key/value length (global), N query
heads, K key/value heads (``N % K == 0``), H head dim, Hv value head dim, P
devices on the ring axis; ``Tl = T / P`` and ``Sl = S / P`` are the local
lengths a device holds.

Ring attention (Liu et al., arXiv:2310.01889) splits the sequence over the P
devices of a mesh axis. Each device keeps its query block; the key/value
blocks travel round the ring with ``jax.lax.ppermute``, one hop per step, and
each step's partial result (output and log-sum-exp from
``pallas_kernels.flash_attention(..., return_lse=True)``) is merged into a
running one::

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

The backward pass is a ring too (a ``jax.custom_vjp`` that saves only the
local q, k, v, the merged output and its log-sum-exp): K/V travel again,
with their dK/dV accumulators (float32) beside them, which arrive home
after P hops. Each step's block gradient comes from the kernel's own VJP,
given the cotangents that the merge assigns to that step's output and
log-sum-exp; that recomputes the block's forward once (the price of going
through the public ``flash_attention`` instead of a kernel's internals).
No device ever holds more than one remote K/V block, so memory per device is
``O(Tl + Sl)`` whatever P is.

Per step each device sends one ``collective-permute`` per rotated array: K
and V (and the key segment ids) forward; K, V, dK and dV backward. Each hop
is issued before the step's attention, so the transfer can overlap it.

Positions are global. With ``layout="contiguous"`` device ``i`` holds
positions ``[i * Tl, (i + 1) * Tl)``; causal attention then visits, per step,
a (query block, key block) pair that is fully visible, on the diagonal, or
skipped (``lax.switch`` on the device's traced ring index, so a skipped pair
costs nothing), and the last device does P times the work of the first.
``layout="zigzag"`` balances that: the sequence is cut into 2P chunks and
device ``i`` holds chunks ``i`` and ``2P - 1 - i`` (:func:`to_zigzag`), so
every off-diagonal step is exactly half a block pair of work on every
device. P = 4, chunks per device::

    contiguous  dev0: [0 1]  dev1: [2 3]  dev2: [4 5]  dev3: [6 7]
    zigzag      dev0: [0 7]  dev1: [1 6]  dev2: [2 5]  dev3: [3 4]

Three ways in:

* :func:`ring_attention` on ``(B, Tl, N, H)`` blocks inside ``shard_map``;
* ``jaxmha.MHAConfig(context_parallel_axis="seq")`` makes :func:`jaxmha.apply`
  use it, inside ``shard_map`` or under ``jax.set_mesh(mesh)`` (then the
  attention core runs in its own ``shard_map`` over that axis alone);
* :func:`context_parallel` wraps any function (e.g. a Flax module's
  ``apply``) so the jaxmha layers it calls do the same.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import pallas_kernels
from jaxmha.config import is_int
from pallas_kernels import api as kernel_api
from pallas_kernels import common
from pallas_kernels import higher_order
from pallas_kernels import masks as kernel_masks
from pallas_kernels import partitioning

_F32 = jnp.float32
_EMPTY = kernel_masks.EMPTY_ROW_LSE
LAYOUTS = ("contiguous", "zigzag")

# What a step does with its (query block, key/value block) pair.
_FULL, _DIAG, _SKIP, _LOWER, _UPPER = range(5)


# -- zigzag -------------------------------------------------------------------


def _zigzag_order(num_shards: int) -> np.ndarray:
  """Chunk order of the zigzag layout: ``[0, 2P-1, 1, 2P-2, ...]``."""
  first = np.arange(num_shards)
  return np.stack([first, 2 * num_shards - 1 - first], axis=1).reshape(-1)


def _check_zigzag(x, num_shards, axis) -> tuple[int, int]:
  if not is_int(num_shards) or num_shards <= 0:
    raise ValueError(f"`num_shards` must be a positive int; got "
                     f"num_shards={num_shards!r}.")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"`axis` must be an axis of x (ndim={x.ndim}); got "
                     f"axis={axis}.")
  axis %= x.ndim
  L = x.shape[axis]
  if L % (2 * num_shards):
    raise ValueError(
        f"The zigzag layout cuts the sequence into 2 * num_shards chunks: "
        f"x.shape[{axis}]={L} must be divisible by {2 * num_shards} "
        f"(num_shards={num_shards}).")
  return axis, L // (2 * num_shards)


def to_zigzag(x, num_shards: int, axis: int = 1):
  """Reorders a global sequence so contiguous shards get zigzag chunks.

  The ``L`` positions along ``axis`` are cut into ``2 * num_shards`` chunks
  and reordered so that shard ``i`` of an even split holds chunks ``i`` and
  ``2 * num_shards - 1 - i``. Apply it to every per-position input (tokens,
  segment ids, positions) before sharding, and :func:`from_zigzag` to the
  outputs.

  Args:
    x: an array with the sequence on ``axis``, e.g. ``(B, T, ...)``.
    num_shards: P, the devices on the ring axis.
    axis: the sequence axis.

  Returns:
    ``x`` reordered along ``axis`` (same shape).

  Raises:
    ValueError: ``x.shape[axis]`` is not a multiple of ``2 * num_shards``.

  >>> to_zigzag(jnp.arange(8), num_shards=2, axis=0)
  Array([0, 1, 6, 7, 2, 3, 4, 5], dtype=int32)
  >>> from_zigzag(to_zigzag(jnp.arange(8), 2, 0), 2, 0)
  Array([0, 1, 2, 3, 4, 5, 6, 7], dtype=int32)
  """
  x = jnp.asarray(x)
  axis, c = _check_zigzag(x, num_shards, axis)
  chunks = x.reshape(x.shape[:axis] + (2 * num_shards, c)
                     + x.shape[axis + 1:])
  chunks = jnp.take(chunks, _zigzag_order(num_shards), axis=axis)
  return chunks.reshape(x.shape)


def from_zigzag(x, num_shards: int, axis: int = 1):
  """The inverse of :func:`to_zigzag`.

  >>> x = jnp.arange(12).reshape(1, 12)
  >>> bool((from_zigzag(to_zigzag(x, 3), 3) == x).all())
  True
  """
  x = jnp.asarray(x)
  axis, c = _check_zigzag(x, num_shards, axis)
  chunks = x.reshape(x.shape[:axis] + (2 * num_shards, c)
                     + x.shape[axis + 1:])
  chunks = jnp.take(chunks, np.argsort(_zigzag_order(num_shards)), axis=axis)
  return chunks.reshape(x.shape)


# -- the ring -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Everything static about one ring call (hashable)."""
  axis_name: Any
  num_shards: int
  causal: bool
  zigzag: bool
  scale: float
  backend: str
  interpret: bool
  block_sizes: Any
  # Blocks through `pallas_kernels.higher_order.attention`: the ring whose
  # derivatives are those of the rules that run the kernels.
  by_reference: bool = False


def _vary(x, *like):
  """``x`` marked as varying over every mesh axis ``like`` varies over.

  Inside ``shard_map(check_vma=True)``, arrays made from constants are
  invariant; the branches and loop carries they meet must agree.
  """
  axes = set().union(*(_varying(y) for y in jax.tree.leaves(like)))
  axes -= _varying(x)
  return lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def _varying(x) -> set:
  """The manual mesh axes ``x`` varies over (empty outside shard_map)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return set(manual.varying)
  return set(getattr(aval, "vma", ()))


def _rotate(st: _Ring, tree):
  """One hop round the ring: device ``d`` sends to ``d + 1``."""
  P_ = st.num_shards
  return lax.ppermute(tree, st.axis_name,
                      [(d, (d + 1) % P_) for d in range(P_)])


def _attend(st: _Ring, q, k, v, q_ids, kv_ids, causal: bool):
  """One block pair through the kernel: ``(out (B, Tq, N, Hv), lse)``."""
  seg = None if q_ids is None else (q_ids, kv_ids)
  if st.by_reference:
    prep = common.prepare(q, k, v, causal=causal, segment_ids=seg,
                          scale=st.scale)
    return higher_order.attention(q, k, v, prep)
  return pallas_kernels.flash_attention(
      q, k, v, causal=causal, segment_ids=seg, scale=st.scale,
      block_sizes=st.block_sizes, backend=st.backend,
      interpret=st.interpret, return_lse=True)


def _half(x, axis: int, which: int):
  if x is None:
    return None
  c = x.shape[axis] // 2
  return lax.slice_in_dim(x, which * c, (which + 1) * c, axis=axis)


def _step_kind(st: _Ring, s, ring_index):
  """The pair kind of step ``s``: a Python int, or traced (then switched)."""
  if not st.causal:
    return _FULL
  if isinstance(s, int) and s == 0:
    return _DIAG  # a device's own block: causal within it, in both layouts
  if not st.zigzag:
    # Device i holds key block j = i - s (mod P): visible iff j < i.
    return jnp.where(s <= ring_index, _FULL, _SKIP)
  j = (ring_index - s) % st.num_shards
  # j < i: every query sees the first key chunk only; j > i: the second
  # query chunk sees every key.
  return jnp.where(j < ring_index, _LOWER, _UPPER)


def _dispatch(kind, branches: dict, *operands):
  """``branches[kind](*operands)``; ``lax.switch`` when ``kind`` is traced."""
  if isinstance(kind, int):
    return branches[kind](*operands)
  keys = sorted(branches)
  index = sum(jnp.where(kind == key, n, 0) for n, key in enumerate(keys))
  return lax.switch(index, [branches[key] for key in keys], *operands)


def _block_forward(st: _Ring, kind, q, k, v, q_ids, kv_ids):
  """One step's partial result over all Tl rows, ``(out f32, lse)``."""
  B, Tl, N, _ = q.shape
  Hv = v.shape[-1]

  def empty(*like):
    out = _vary(jnp.zeros((B, Tl, N, Hv), _F32), *like)
    return out, _vary(jnp.full((B, N, Tl), _EMPTY, _F32), *like)

  def run(causal, q, k, v, q_ids, kv_ids):
    out, lse = _attend(st, q, k, v, q_ids, kv_ids, causal)
    return out.astype(_F32), lse

  def upper(q, k, v, q_ids, kv_ids):
    # Only the second half of the query rows sees this key block.
    out, lse = run(False, _half(q, 1, 1), k, v, _half(q_ids, 1, 1), kv_ids)
    out0, lse0 = empty(q, k, v)
    return (jnp.concatenate([_half(out0, 1, 0), out], axis=1),
            jnp.concatenate([_half(lse0, 2, 0), lse], axis=2))

  branches = {
      _FULL: functools.partial(run, False),
      _DIAG: functools.partial(run, True),
      _SKIP: lambda q, k, v, *_: empty(q, k, v),
      _LOWER: lambda q, k, v, q_ids, kv_ids: run(
          False, q, _half(k, 1, 0), _half(v, 1, 0), q_ids,
          _half(kv_ids, 1, 0)),
      _UPPER: upper,
  }
  if not isinstance(kind, int):
    pair = (_LOWER, _UPPER) if st.zigzag else (_FULL, _SKIP)
    branches = {key: branches[key] for key in pair}
  return _dispatch(kind, branches, q, k, v, q_ids, kv_ids)


def _merge(acc, part):
  """Merges two partial results through their log-sum-exp."""
  out_a, lse_a = acc  # (B, Tl, N, Hv), (B, N, Tl)
  out_b, lse_b = part
  # Empty rows carry EMPTY_ROW_LSE, finite: exp(EMPTY - lse) is 0 against a
  # real row, and two empty rows stay empty (EMPTY + log 2 == EMPTY in f32).
  lse = jnp.logaddexp(lse_a, lse_b)
  w_a = jnp.exp(lse_a - lse).transpose(0, 2, 1)[..., None]  # (B, Tl, N, 1)
  w_b = jnp.exp(lse_b - lse).transpose(0, 2, 1)[..., None]
  return w_a * out_a + w_b * out_b, lse


def _ring_forward(st: _Ring, q, k, v, q_ids, kv_ids):
  """``(out (B, Tl, N, Hv) f32, lse (B, N, Tl))`` over the whole ring."""
  i = lax.axis_index(st.axis_name)
  n = st.num_shards
  kv = (k, v, kv_ids)
  step = lambda s, kv: _block_forward(st, _step_kind(st, s, i), q, *kv[:2],
                                      q_ids, kv[2])
  if n == 1:
    return step(0, kv)
  # Each hop is issued before the step that works on the block in hand, so
  # the transfer overlaps that step's attention. The loop's last hop is not
  # needed (it brings the blocks home); it keeps the loop body the only
  # copy of the off-diagonal step.
  nxt = _rotate(st, kv)
  acc = step(0, kv)

  def body(s, carry):
    cur, acc = carry
    return _rotate(st, cur), _merge(acc, step(s, cur))

  _, acc = lax.fori_loop(1, n, body, (nxt, acc))
  return acc


def _block_backward(st: _Ring, kind, q, k, v, q_ids, kv_ids, d_out, lse,
                    delta):
  """One step's ``(dq, dk, dv)`` in f32, given the merged result.

  The step's kernel computed ``(o_s, lse_s)``, merged with weight ``w_s =
  exp(lse_s - lse)``, so its cotangents are ``w_s * d_out`` for ``o_s`` and
  ``w_s * (rowsum(d_out * o_s) - delta)`` for ``lse_s``, where ``delta =
  rowsum(d_out * out) - d_lse``; the kernel's own VJP (which recomputes the
  block's probabilities, never stores them) turns them into dq, dk, dv.
  """

  def run(causal, q, k, v, q_ids, kv_ids, d_out, lse, delta):
    (o_s, lse_s), vjp = jax.vjp(
        lambda q, k, v: _attend(st, q, k, v, q_ids, kv_ids, causal), q, k, v)
    w = jnp.exp(lse_s - lse)  # (B, N, Tq)
    w_rows = w.transpose(0, 2, 1)[..., None]  # (B, Tq, N, 1)
    do_s = (w_rows * d_out).astype(o_s.dtype)
    dot = jnp.sum(d_out * o_s.astype(_F32), axis=-1).transpose(0, 2, 1)
    dlse_s = w * (dot - delta)  # (B, N, Tq)
    return tuple(g.astype(_F32) for g in vjp((do_s, dlse_s)))

  zeros = lambda *xs: tuple(_vary(jnp.zeros(x.shape, _F32), q, k, v, d_out)
                            for x in xs)
  rows = lambda t: (_half(t[0], 1, 1), _half(t[1], 2, 1), _half(t[2], 2, 1))

  def lower(q, k, v, q_ids, kv_ids, *t):
    dq, dk, dv = run(False, q, _half(k, 1, 0), _half(v, 1, 0), q_ids,
                     _half(kv_ids, 1, 0), *t)
    dk0, dv0 = zeros(_half(k, 1, 0), _half(v, 1, 0))
    return (dq, jnp.concatenate([dk, dk0], axis=1),
            jnp.concatenate([dv, dv0], axis=1))

  def upper(q, k, v, q_ids, kv_ids, *t):
    dq, dk, dv = run(False, _half(q, 1, 1), k, v, _half(q_ids, 1, 1), kv_ids,
                     *rows(t))
    (dq0,) = zeros(dq)
    return jnp.concatenate([dq0, dq], axis=1), dk, dv

  branches = {
      _FULL: functools.partial(run, False),
      _DIAG: functools.partial(run, True),
      _SKIP: lambda q, k, v, *_: zeros(q, k, v),
      _LOWER: lower,
      _UPPER: upper,
  }
  if not isinstance(kind, int):
    pair = (_LOWER, _UPPER) if st.zigzag else (_FULL, _SKIP)
    branches = {key: branches[key] for key in pair}
  return _dispatch(kind, branches, q, k, v, q_ids, kv_ids, d_out, lse, delta)


def _ring_backward(st: _Ring, q, k, v, q_ids, kv_ids, out, lse, d_out,
                   d_lse):
  i = lax.axis_index(st.axis_name)
  n = st.num_shards
  d_out = d_out.astype(_F32)
  delta = jnp.sum(d_out * out, axis=-1).transpose(0, 2, 1)  # (B, N, Tl)
  delta = delta - d_lse.astype(_F32)

  def step(s, kv):
    k_, v_, kv_ids_ = kv
    return _block_backward(st, _step_kind(st, s, i), q, k_, v_, q_ids,
                           kv_ids_, d_out, lse, delta)

  kv = (k, v, kv_ids)
  if n == 1:
    return step(0, kv)
  nxt = _rotate(st, kv)
  dq, dk, dv = step(0, kv)
  # The dK/dV accumulators travel with the block they belong to; the loop's
  # last hop brings them home.
  dkv = _rotate(st, (dk, dv))

  def body(s, carry):
    cur, dq, dkv = carry
    gq, gk, gv = step(s, cur)
    return (_rotate(st, cur), dq + gq,
            _rotate(st, (dkv[0] + gk, dkv[1] + gv)))

  _, dq, dkv = lax.fori_loop(1, n, body, (nxt, dq, dkv))
  return dq, dkv[0], dkv[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: _Ring, q, k, v, q_ids, kv_ids):
  out, lse = _ring_forward(st, q, k, v, q_ids, kv_ids)
  return out.astype(q.dtype), lse


# The rules' own derivatives (second derivatives of the attention) are those
# of the same ring with blocks that JAX differentiates (`higher_order`).
def _differentiable(st: _Ring, ring_pass):
  return higher_order.differentiated_as(
      functools.partial(ring_pass, dataclasses.replace(st, by_reference=True)),
      functools.partial(ring_pass, st))


def _ring_fwd(st, q, k, v, q_ids, kv_ids):
  out, lse = _differentiable(st, _ring_forward)(q, k, v, q_ids, kv_ids)
  return (out.astype(q.dtype), lse), (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(st, residuals, cotangents):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = _differentiable(st, _ring_backward)(
      q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _default_backend(interpret: bool) -> str:
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  if interpret:
    raise ValueError("interpret=True needs an explicit `backend` ('gpu' or "
                     "'tpu'): there is no kernel for platform "
                     f"{platform!r} to interpret.")
  return "xla"


def ring_attention(q, k, v, *, axis_name, causal: bool = False,
                   segment_ids=None, scale: Optional[float] = None,
                   layout: str = "contiguous", backend: Optional[str] = None,
                   interpret: bool = False, block_sizes: Any = None,
                   return_lse: bool = False):
  """Attention over a sequence sharded on ``axis_name``, as a ring.

  Call it inside ``jax.shard_map`` (or ``pmap``) with the sequence axis of
  ``q``, ``k``, ``v`` (and segment ids) split evenly over ``axis_name``;
  each device passes its own blocks. The result equals
  :func:`pallas_kernels.reference.attention` on the whole sequence, sharded
  the same way; no device gathers more than one remote K/V block. (The
  sequence split is ``shard_map``'s: it requires T divisible by P; uneven
  shards are not supported.)

  The ring and the blockwise XLA path type-check under ``shard_map``'s
  default ``check_vma=True``; kernels in interpret mode need
  ``check_vma=False`` (JAX 0.10.2's Pallas interpreter does not type its
  loop carries as varying over the mesh axis).

  Args:
    q: ``(B, Tl, N, H)``, this device's queries.
    k: ``(B, Sl, K, H)``, this device's keys (``N % K == 0``).
    v: ``(B, Sl, K, Hv)``, this device's values.
    axis_name: the mesh axis the sequence is split over (P devices).
    causal: causal over global positions (``j <= i``); needs ``Tl == Sl``.
    segment_ids: ``(B, Tl)`` for self-attention, or ``(q_ids (B, Tl),
      kv_ids (B, Sl))``; the key ids travel with K/V.
    scale: logit scale, default ``1 / sqrt(H)``.
    layout: ``"contiguous"`` (device i holds positions ``[i*Tl, (i+1)*Tl)``)
      or ``"zigzag"`` (device i holds chunks i and 2P-1-i of 2P; see
      :func:`to_zigzag`), which balances causal work.
    backend: per-block attention: ``"gpu"``/``"tpu"`` (flash kernels) or
      ``"xla"`` (blockwise); default the platform's kernel, ``"xla"`` on CPU.
    interpret: run the kernel in interpret mode (CPU tests). The TPU
      interpreter synchronises devices inside each kernel call, so with
      ``backend="tpu"`` it serves non-causal rings only (a causal ring's
      devices skip different steps).
    block_sizes: the backend's ``BlockSizes``, or None.
    return_lse: also return the global ``(B, N, Tl)`` log-sum-exp.

  Returns:
    ``out (B, Tl, N, Hv)`` in ``q.dtype``, or ``(out, lse)``.

  Raises:
    ValueError, TypeError: bad arguments, naming them and the shapes.

  >>> from jax.sharding import PartitionSpec as P
  >>> mesh = jax.make_mesh((1,), ("seq",),
  ...                      axis_types=(jax.sharding.AxisType.Auto,))
  >>> x = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
  >>> ring = jax.shard_map(
  ...     lambda q: ring_attention(q, q, q, axis_name="seq", causal=True),
  ...     mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"))
  >>> out = jax.jit(ring)(x)
  >>> ref = pallas_kernels.reference.attention(x, x, x, causal=True)
  >>> bool(jnp.allclose(out, ref, atol=1e-5))
  True
  """
  problem = common.check_qkv(q, k, v)
  Tl, Sl = problem.T, problem.S
  if layout not in LAYOUTS:
    raise ValueError(f"`layout` must be one of {LAYOUTS}; got "
                     f"layout={layout!r}.")
  try:
    num_shards = lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
        f"axis_name={axis_name!r} is not a bound mesh axis: call "
        "ring_attention inside jax.shard_map (or pmap) over that axis."
    ) from None
  causal = bool(causal)
  zigzag = layout == "zigzag"
  if causal and Tl != Sl:
    raise ValueError(
        "causal=True over a ring needs query and key blocks of one length "
        f"(self-attention); got Tl={Tl} and Sl={Sl}.")
  if zigzag and causal and Tl % 2:
    raise ValueError(f"layout='zigzag' splits each block in two chunks; got "
                     f"an odd block length Tl={Tl}.")
  q_ids = kv_ids = None
  if segment_ids is not None:
    data = kernel_masks.normalize_mask_data(
        problem.B, Tl, Sl, problem.N, segment_ids=segment_ids)
    q_ids, kv_ids = data.q_segment_ids, data.kv_segment_ids
  if scale is None:
    scale = 1.0 / float(np.sqrt(problem.H))
  if backend is None:
    backend = _default_backend(interpret)
  kernel_api.target_module(backend)  # validates the name
  st = _Ring(axis_name=axis_name, num_shards=int(num_shards), causal=causal,
             zigzag=zigzag, scale=float(scale), backend=backend,
             interpret=bool(interpret), block_sizes=block_sizes)
  out, lse = _ring(st, q, k, v, q_ids, kv_ids)
  return (out, lse) if return_lse else out


# -- the layer's path ----------------------------------------------------------

# (axis, mesh or None) set by context_parallel() while its function traces.
_SCOPE: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar(
    "jaxmha_context_parallel", default=None)


def context_parallel_axis(cfg) -> Optional[str]:
  """The ring axis a call with ``cfg`` uses: its own, or the scope's."""
  axis = getattr(cfg, "context_parallel_axis", None)
  if axis is None and _SCOPE.get() is not None:
    axis = _SCOPE.get()[0]
  return axis


def context_parallel(fn: Callable, axis: str = "seq", *,
                     mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """``fn`` with context parallelism on for every jaxmha layer it calls.

  Attention calls traced inside ``fn`` whose config has no
  ``context_parallel_axis`` run as :func:`ring_attention` over ``axis``:
  the way to turn it on for code you do not want to edit, such as a Flax
  model holding :class:`jaxmha.MultiHeadAttention` layers. The setting is
  read while ``fn`` is traced, so wrap ``fn`` before ``jax.jit``, not a
  function that is already jitted.

  Call the result inside ``jax.shard_map`` over ``axis`` (inputs are local
  blocks), or under jit with a mesh that has ``axis`` (``mesh=`` here, or
  ``jax.set_mesh``): the attention core then runs in its own ``shard_map``
  over ``axis``, and the rest of ``fn`` is partitioned as usual.

  Args:
    fn: any function, e.g. ``model.apply``.
    axis: the mesh axis the sequence is split over.
    mesh: a mesh to trace ``fn`` under; default the current one.

  Returns:
    The wrapped function, same signature.

  >>> import jaxmha
  >>> layer = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4)
  >>> x = jnp.ones((1, 8, 8))
  >>> variables = layer.init(jax.random.key(0), x, x)
  >>> mesh = jax.make_mesh((1,), ("seq",),
  ...                      axis_types=(jax.sharding.AxisType.Auto,))
  >>> def self_attention(variables, x):
  ...   return layer.apply(variables, x, x, use_causal_mask=True)
  >>> ring = jax.jit(context_parallel(self_attention, "seq", mesh=mesh))
  >>> bool(jnp.allclose(ring(variables, x), self_attention(variables, x),
  ...                   atol=1e-5))
  True
  """
  if not isinstance(axis, str):
    raise TypeError(f"`axis` must be a mesh axis name (str); got "
                    f"axis={axis!r}.")

  if mesh is not None and axis not in mesh.axis_names:
    raise ValueError(f"`axis`={axis!r} is not an axis of `mesh` (axes: "
                     f"{mesh.axis_names}).")

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    token = _SCOPE.set((axis, mesh))
    try:
      return fn(*args, **kwargs)
    finally:
      _SCOPE.reset(token)

  return wrapped


def _block_target(req) -> tuple[str, bool]:
  """The per-block backend of a layer call: ``(backend, interpret)``."""
  if req.flash is not False:
    if req.platform == "tpu":
      return "tpu", False
    if req.platform in ("gpu", "cuda", "rocm"):
      return "gpu", False
    if req.flash is True:
      return "gpu", True  # forced on CPU: interpret the GPU kernel
  return "xla", False


def _axis_mode(axis: str):
  """``(mesh, manual)``: the mesh to ring over, and whether ``axis`` is
  already manual here (inside ``shard_map``)."""
  mesh = jax.sharding.get_abstract_mesh()
  if axis in getattr(mesh, "manual_axes", ()):
    return mesh, True
  scope = _SCOPE.get()
  if (scope is not None and scope[1] is not None and scope[0] == axis
      and (mesh.empty or axis not in mesh.axis_names)):
    return scope[1], False
  if mesh.empty or axis not in mesh.axis_names:
    raise ValueError(
        f"context_parallel_axis={axis!r} is not an axis of the current mesh "
        f"(axes: {tuple(getattr(mesh, 'axis_names', ()))}): call the layer "
        f"inside jax.shard_map over a mesh with axis {axis!r}, or under jit "
        "with `jax.set_mesh(mesh)` (or jaxmha.context_parallel(fn, axis, "
        "mesh=mesh)).")
  return mesh, False


def _explicit_entries(x, mesh, axis: str) -> tuple:
  """The Explicit axes of ``mesh``, but ``axis``, that shard each dim of
  ``x``."""
  explicit = set(getattr(mesh, "explicit_axes", ()))

  def keep(entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    names = tuple(a for a in names if a in explicit and a != axis)
    return names if len(names) > 1 else (names[0] if names else None)

  return tuple(keep(e) for e in partitioning.type_spec(x))


def _ring_specs(q, k, v, axis: str, mesh) -> tuple[P, P]:
  """``(qkv_spec, ids_spec)``: one spec for the (B, L, N, H) operands and
  one for the (B, L) segment ids, the sequence (dim 1) on ``axis``.

  The batch dim keeps the Explicit axes that shard ``q``'s, so that every
  operand has the same local batch; the heads dim keeps those shared by
  ``q``, ``k`` and ``v`` (else none: a query head must find its kv head in
  the same shard). Nothing else is split: a ring block needs whole head
  dims.
  """
  entries = [_explicit_entries(x, mesh, axis) for x in (q, k, v)]
  batch = entries[0][0]
  heads = {e[2] for e in entries}
  heads = heads.pop() if len(heads) == 1 else None
  return P(batch, axis, heads, None), P(batch, axis)


ATTENTION_MASK_REFUSAL = (
    "an explicit attention_mask (B, T, S) spans the whole sequence; use "
    "query_mask/value_mask (padding) or use_causal_mask")


class RingPath:
  """The dispatch path of ``context_parallel_axis`` calls: ring attention.

  It serves self- or cross-attention with ``use_causal_mask`` (when ``T ==
  S``), ``query_mask``, ``value_mask`` and ``key_mask`` (as segment ids
  that travel with K/V); it refuses what needs the whole sequence in one
  place or absolute positions the blocks do not see: returned scores,
  ``attention_mask``, ``sliding_window`` and dropout.
  """

  name = "ring"

  def check(self, req) -> None:
    common.refuse_symbolic_shapes(q=req.q, k=req.k, v=req.v)
    prep = req.prep
    p = prep.problem
    axis = req.context_parallel_axis
    if req.need_probs:
      raise common.UnsupportedCallError(
          "return_attention_scores=True needs the (B, N, T, S) scores, which "
          "a ring never gathers")
    if prep.dropout_rate > 0.0:
      raise common.UnsupportedCallError(
          f"dropout={prep.dropout_rate} while training: dropout bits are "
          "keyed by absolute positions, which per-block kernels do not see")
    if prep.data.mask is not None:
      raise common.UnsupportedCallError(ATTENTION_MASK_REFUSAL)
    causal = prep.spec == kernel_masks.MaskSpec.causal()
    if not (causal or prep.spec.is_full):
      raise common.UnsupportedCallError(
          f"sliding_window (mask band {prep.spec}) is not supported by ring "
          "attention")
    if (prep.data.q_lengths is not None
        or prep.data.kv_lengths is not None):
      raise common.UnsupportedCallError(
          "q_lengths/kv_lengths are not supported by ring attention")
    mesh, manual = _axis_mode(axis)
    if manual:
      Tl, Sl = p.T, p.S
    else:
      n = mesh.shape[axis]
      if p.T % n or p.S % n:
        raise ValueError(
            f"context_parallel_axis={axis!r} splits the sequence over {n} "
            f"devices: T={p.T} and S={p.S} must be divisible by {n}.")
      Tl, Sl = p.T // n, p.S // n
    if causal and Tl != Sl:
      raise common.UnsupportedCallError(
          f"use_causal_mask=True over a ring needs T == S; got T={p.T} and "
          f"S={p.S}")
    backend, interpret = _block_target(req)
    if backend != "xla":
      q = jax.ShapeDtypeStruct((p.B, Tl, p.N, p.H), req.q.dtype)
      k = jax.ShapeDtypeStruct((p.B, Sl, p.K, p.H), req.k.dtype)
      v = jax.ShapeDtypeStruct((p.B, Sl, p.K, p.Hv), req.v.dtype)
      # Trace only: a kernel refuses what it cannot serve while tracing.
      try:
        jax.eval_shape(functools.partial(
            pallas_kernels.flash_attention, causal=causal, backend=backend,
            interpret=interpret), q, k, v)
      except NotImplementedError as e:
        raise common.UnsupportedCallError(
            f"{e} (with flash_attention=False the ring runs blockwise XLA "
            "blocks)") from e

  def run(self, req):
    prep = req.prep
    axis = req.context_parallel_axis
    backend, interpret = _block_target(req)
    kwargs = dict(axis_name=axis,
                  causal=prep.spec == kernel_masks.MaskSpec.causal(),
                  scale=prep.scale, backend=backend, interpret=interpret)
    ids = None
    if prep.data.q_segment_ids is not None:
      ids = (prep.data.q_segment_ids, prep.data.kv_segment_ids)
    mesh, manual = _axis_mode(axis)
    if manual:
      return ring_attention(req.q, req.k, req.v, segment_ids=ids,
                            **kwargs), None

    def attend(q, k, v, ids):
      return ring_attention(q, k, v, segment_ids=ids, **kwargs)

    operands = (req.q, req.k, req.v, ids)
    qkv_spec, ids_spec = _ring_specs(req.q, req.k, req.v, axis, mesh)
    specs = (qkv_spec,) * 3 + (None if ids is None else (ids_spec,) * 2,)
    if axis in getattr(mesh, "explicit_axes", ()):
      # A NamedSharding, not a bare spec: `mesh` may be the one given to
      # `context_parallel`, with no mesh context around this call.
      operands = jax.tree.map(
          lambda x, s: jax.sharding.reshard(x, NamedSharding(mesh, s)),
          operands, specs)
    manual_axes = {axis} | set(getattr(mesh, "explicit_axes", ()))
    # Interpret-mode kernels (forced flash on CPU) do not type their loop
    # carries as varying over the manual axis: no check_vma for them.
    out = jax.shard_map(attend, mesh=mesh, in_specs=specs,
                        out_specs=specs[0], axis_names=manual_axes,
                        check_vma=not interpret)(*operands)
    return out, None


RING_PATH = RingPath()
