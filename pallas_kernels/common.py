"""Argument checking and normalisation shared by every attention path.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim.

Every path (reference, blockwise XLA, GPU and TPU kernels) takes the same
keyword arguments; :func:`prepare` validates them once and turns them into
the static :class:`~pallas_kernels.masks.MaskSpec`, the per-example
:class:`~pallas_kernels.masks.MaskData`, the scale and the dropout seeds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dropout as dropout_lib
from pallas_kernels import masks as masks_lib

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class UnsupportedCallError(ValueError, NotImplementedError):
  """A call that the chosen (or forced) attention path cannot serve.

  A ``ValueError``, as every bad input is, and a ``NotImplementedError``,
  as a path's refusal: ``except`` either catches it.
  """


@dataclasses.dataclass(frozen=True)
class Problem:
  """Static sizes of one attention call."""
  B: int
  T: int
  S: int
  N: int
  K: int
  H: int
  Hv: int

  @property
  def groups(self) -> int:
    """Query heads per key/value head (``N // K``)."""
    return self.N // self.K


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Everything a path needs besides q, k, v."""
  problem: Problem
  spec: masks_lib.MaskSpec
  data: masks_lib.MaskData
  scale: float
  dropout_rate: float
  seeds: Optional[jax.Array]  # (2,) int32, or None without dropout


def check_qkv(q, k, v) -> Problem:
  """Checks ``q (B, T, N, H)``, ``k (B, S, K, H)``, ``v (B, S, K, Hv)``."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"`{name}` must be an array; got {type(x).__name__}.")
    if x.ndim != 4:
      raise ValueError(
          f"`{name}` must have rank 4 ({'(B, T, N, H)' if name == 'q' else '(B, S, K, H)'}); "
          f"got shape {x.shape}.")
    if not any(x.dtype == d for d in SUPPORTED_DTYPES):
      raise TypeError(f"`{name}` must be float32, bfloat16 or float16; got "
                      f"{x.dtype}.")
  B, T, N, H = q.shape
  Bk, S, K, Hk = k.shape
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(
        "`k` (B, S, K, H) and `v` (B, S, K, Hv) must agree on B, S and K; "
        f"got k.shape={k.shape} and v.shape={v.shape}.")
  if Bk != B:
    raise ValueError(f"`q` and `k` must have the same batch size; got "
                     f"q.shape={q.shape} and k.shape={k.shape}.")
  if Hk != H:
    raise ValueError(f"`q` and `k` must have the same head dim H; got "
                     f"q.shape={q.shape} and k.shape={k.shape}.")
  if K == 0 or N % K:
    raise ValueError(
        f"The query heads N must be a multiple of the key/value heads K "
        f"(N % K == 0); got {N=} and {K=}.")
  if min(B, T, S, N, H, v.shape[3]) == 0:
    raise ValueError(f"Empty dimension: q.shape={q.shape}, k.shape={k.shape},"
                     f" v.shape={v.shape}.")
  return Problem(B=B, T=T, S=S, N=N, K=K, H=H, Hv=v.shape[3])


def varying_axes(*xs) -> frozenset:
  """The ``shard_map`` mesh axes any of ``xs`` varies over (empty outside
  ``shard_map``)."""
  axes = set()
  for x in jax.tree.leaves(xs):
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
    if mat is not None:
      axes |= set(mat.varying)
    else:
      axes |= set(getattr(aval, "vma", ()))  # older JAX
  return frozenset(axes)


def vary_alike(arrays: list) -> tuple[list, frozenset]:
  """``(arrays, axes)``: every array cast to vary over the union ``axes`` of
  the mesh axes they vary over (``shard_map(check_vma=True)``).

  A kernel's outputs vary over that union.
  """
  axes = varying_axes(arrays)
  if axes:
    arrays = [a if varying_axes(a) == axes else
              jax.lax.pcast(a, tuple(sorted(axes - varying_axes(a))),
                            to="varying") for a in arrays]
  return arrays, axes


def anchor(*trees):
  """A scalar fp32 zero that varies over every mesh axis any leaf of
  ``trees`` varies over.

  Inside ``shard_map`` a loop's state must keep its type, so fresh states
  are made from it (:func:`fresh`); elsewhere it is a constant zero.
  """
  zero = jnp.zeros((), jnp.float32)
  for leaf in jax.tree.leaves(trees):
    zero = zero + jnp.zeros_like(leaf, jnp.float32, shape=())
  return zero


def fresh(anchor_, shape, value=0.0):
  """A new fp32 loop state of ``shape``, typed like ``anchor_``
  (:func:`anchor`)."""
  return jnp.full_like(anchor_, value, shape=shape)


def store_int_field(obj, name: str, requirement: str, ok) -> None:
  """Checks that dataclass field ``name`` of ``obj`` is an int (Python or
  NumPy, not a bool) for which ``ok`` holds, and stores it as a Python int
  (a NumPy int would reach a kernel's grid as an array); else a ValueError
  that says ``requirement``."""
  value = getattr(obj, name)
  if (not isinstance(value, (int, np.integer))
      or isinstance(value, (bool, np.bool_)) or not ok(int(value))):
    raise ValueError(f"{type(obj).__name__}.{name} must be {requirement}. "
                     f"Received: {name}={value!r}")
  object.__setattr__(obj, name, int(value))


def is_real_scalar(x) -> bool:
  """One real number: a Python, NumPy or 0-d JAX scalar; not a bool, a
  string, or an array of another shape."""
  if isinstance(x, (bool, np.bool_)):
    return False
  if isinstance(x, (int, float)):
    return True
  dtype = getattr(x, "dtype", None)
  return (dtype is not None and np.ndim(x) == 0
          and jnp.issubdtype(dtype, jnp.number))  # bfloat16 included


def refuse_symbolic_shapes(**arrays) -> None:
  """Raises UnsupportedCallError when an array has ``jax.export`` symbolic
  dims: the blockwise path, the kernels and the ring size their blocks,
  steps and shards from the shapes. The fused XLA path takes them."""
  symbolic = [f"{name}.shape={x.shape}" for name, x in arrays.items()
              if any(jax.export.is_symbolic_dim(d) for d in x.shape)]
  if symbolic:
    raise UnsupportedCallError(
        f"symbolic shapes ({', '.join(symbolic)}) need the fused XLA path, "
        "whose program does not depend on the sizes")


def in_common_dtype(q, k, v):
  """``(q, k, v)`` cast to their common dtype, in which the matmuls run
  (with float32 accumulation), not rounded to each operand's own."""
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  return tuple(x.astype(dtype) for x in (q, k, v))


def _real(name: str, x, what: str) -> float:
  """``x`` as a float, or a TypeError naming ``name``."""
  if not is_real_scalar(x):
    raise TypeError(f"`{name}` must be {what}; got {name}={x!r}.")
  try:
    return float(x)
  except jax.errors.ConcretizationTypeError:
    raise TypeError(
        f"`{name}` must be {what}, a Python or NumPy scalar known while "
        f"tracing; got a traced value, {name}={x}.") from None


def _flag(name: str, x) -> bool:
  """``x`` as a bool, or a TypeError naming ``name`` (strings, arrays and
  traced values are refused: a flag decides which blocks run)."""
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  raise TypeError(f"`{name}` must be a Python bool, known while tracing; "
                  f"got {name}={x!r}.")


def prepare(q, k, v, *, causal: bool = False, segment_ids: Any = None,
            kv_lengths=None, q_lengths=None, sliding_window: Any = None,
            mask=None, scale: Optional[float] = None,
            dropout_rate: float = 0.0, dropout_rng=None) -> Prepared:
  """Validates a call's arguments; see ``pallas_kernels.flash_attention``."""
  problem = check_qkv(q, k, v)
  spec = masks_lib.MaskSpec.from_args(causal=_flag("causal", causal),
                                      sliding_window=sliding_window)
  data = masks_lib.normalize_mask_data(
      problem.B, problem.T, problem.S, problem.N, segment_ids=segment_ids,
      q_lengths=q_lengths, kv_lengths=kv_lengths, mask=mask)
  if scale is None:
    scale = 1.0 / math.sqrt(problem.H)
  scale = _real("scale", scale, "a float, or None for 1/sqrt(H)")
  if not math.isfinite(scale):
    raise ValueError(f"`scale` must be finite; got {scale=}.")
  dropout_rate = _real("dropout_rate", dropout_rate, "a float in [0, 1)")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"`dropout_rate` must be in [0, 1); got {dropout_rate=}.")
  seeds = None
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("`dropout_rate > 0` needs `dropout_rng` (a PRNG key); "
                       f"got {dropout_rate=} and dropout_rng=None.")
    seeds = dropout_lib.seed_words(dropout_rng)
  return Prepared(problem=problem, spec=spec, data=data, scale=scale,
                  dropout_rate=float(dropout_rate), seeds=seeds)
