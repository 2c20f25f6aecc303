"""The public ``flash_attention`` entry point and the choice of target.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim.

Targets, each a module with the same contract (``attention(q, k, v, prep, *,
block_sizes, interpret) -> (out, lse)``, differentiable through
``jax.custom_vjp``, and twice through :mod:`pallas_kernels.higher_order`):

* ``"tpu"``: Mosaic TPU kernels (:mod:`pallas_kernels.tpu`);
* ``"gpu"``: Triton-lowered GPU kernels (:mod:`pallas_kernels.gpu_triton`);
* ``"xla"``: the blockwise online-softmax path in plain JAX
  (:mod:`pallas_kernels.blockwise`), memory-linear on any backend.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import jax

from pallas_kernels import common
from pallas_kernels import partitioning

_TARGET_MODULES = {
    "tpu": "pallas_kernels.tpu",
    "gpu": "pallas_kernels.gpu_triton",
    "xla": "pallas_kernels.blockwise",
}


def target_module(backend: str):
  """The module that implements ``backend`` (imported on first use).

  Raises:
    ValueError: an unknown ``backend``.
    UnsupportedCallError: this JAX cannot import the Pallas backend the
      kernel is written for (JAX 0.11 deprecates Pallas's Triton backend,
      and a later release may drop it). The layer's dispatch then takes the
      blockwise XLA path.
  """
  if backend not in _TARGET_MODULES:
    raise ValueError(f"`backend` must be one of {sorted(_TARGET_MODULES)} or "
                     f"None; got backend={backend!r}.")
  try:
    return importlib.import_module(_TARGET_MODULES[backend])
  except ImportError as e:
    if not (e.name or "").startswith("jax"):
      raise  # not a missing JAX module: a defect to see, not a refusal
    raise common.UnsupportedCallError(
        f"backend={backend!r} needs {e.name}, which JAX {jax.__version__} "
        f"cannot import ({e}); backend='xla' runs the blockwise XLA "
        "path.") from e


def default_backend(interpret: bool = False) -> str:
  """The kernel target for ``jax.default_backend()``.

  Raises:
    UnsupportedCallError: on a platform without a kernel (e.g. CPU), unless
      the caller names ``backend`` explicitly.
  """
  platform = jax.default_backend()
  if platform in ("tpu", "gpu"):
    return platform
  if platform == "cuda" or platform == "rocm":
    return "gpu"
  raise common.UnsupportedCallError(
      f"No flash-attention kernel for platform {platform!r}. Pass "
      "backend='gpu' or backend='tpu' with interpret=True to run a kernel in "
      "interpret mode, or backend='xla' for the blockwise XLA path."
      + ("" if not interpret else
         " (interpret=True needs an explicit backend to know which kernel "
         "to interpret.)"))


def flash_attention(q, k, v, *, causal: bool = False, segment_ids: Any = None,
                    kv_lengths=None, q_lengths=None, sliding_window: Any = None,
                    mask=None, scale: Optional[float] = None,
                    dropout_rate: float = 0.0, dropout_rng=None,
                    block_sizes: Any = None, backend: Optional[str] = None,
                    interpret: bool = False, return_lse: bool = False):
  """Memory-efficient attention (FlashAttention-2, arXiv:2307.08691).

  Computes the same function as :func:`pallas_kernels.reference.attention`
  without storing anything of size ``T x S``; the backward pass recomputes
  the probabilities from the saved log-sum-exp.

  Args:
    q: ``(B, T, N, H)`` queries.
    k: ``(B, S, K, H)`` keys; ``N % K == 0`` (GQA/MQA, never repeated).
    v: ``(B, S, K, Hv)`` values.
    causal: keys at or before the query's position only, top-left aligned.
    segment_ids: ``(B, T)`` for self-attention, or ``(q_ids (B, T), kv_ids
      (B, S))``.
    kv_lengths: ``(B,)``; keys at ``j >= kv_lengths[b]`` are padding.
    q_lengths: ``(B,)``; query rows at ``i >= q_lengths[b]`` attend nothing.
    sliding_window: ``w`` (``|i - j| < w``) or ``(left, right)``.
    mask: ``(#B, #N, T, S)`` boolean, True = may attend; or ``(#B, T, S)``
      for every head (as Keras's ``attention_mask``), or ``(T, S)``.
    scale: logit scale, default ``1 / sqrt(H)``.
    dropout_rate: attention-probability dropout; needs ``dropout_rng``.
    dropout_rng: PRNG key; the bits are a pure function of (key, b, n, i, j).
    block_sizes: the target's ``BlockSizes``, or None for its defaults.
    backend: ``"tpu"``, ``"gpu"``, ``"xla"``, or None for the platform's.
    interpret: run the kernel in its interpret mode (for CPU tests).
    return_lse: also return the natural-log LSE, ``(B, N, T)`` float32
      (differentiable). An empty row's LSE is ``masks.EMPTY_ROW_LSE``.

  Returns:
    ``out (B, T, N, Hv)`` in ``q.dtype``, or ``(out, lse)``.

  Raises:
    ValueError, TypeError: bad arguments (named, with their shapes).
    UnsupportedCallError: the chosen target cannot serve this call, or q, k
      or v have ``jax.export`` symbolic dims (the layer's fused path takes
      them).

  >>> import jax, jax.numpy as jnp
  >>> q = jax.random.normal(jax.random.key(0), (1, 16, 2, 32))
  >>> out = flash_attention(q, q, q, causal=True, backend="xla")
  >>> out.shape
  (1, 16, 2, 32)
  """
  common.refuse_symbolic_shapes(q=q, k=k, v=v)
  common.check_qkv(q, k, v)  # named errors before the specs below
  explicit = partitioning.explicit_mesh(
      (q, k, v, segment_ids, kv_lengths, q_lengths, mask))
  if explicit is not None:
    # Explicit mesh axes: run with them made Auto, so that the kernels'
    # partitioning (XLA's, for "xla") places the call; the results are
    # typed like q's rows and heads.
    P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
    b, t, n, _ = partitioning.type_spec(q)
    specs = (P(b, t, n, None), P(b, n, t)) if return_lse else P(b, t, n, None)

    def attend(q, k, v, segment_ids, kv_lengths, q_lengths, mask,
               dropout_rng):
      return flash_attention(
          q, k, v, causal=causal, segment_ids=segment_ids,
          kv_lengths=kv_lengths, q_lengths=q_lengths,
          sliding_window=sliding_window, mask=mask, scale=scale,
          dropout_rate=dropout_rate, dropout_rng=dropout_rng,
          block_sizes=block_sizes, backend=backend, interpret=interpret,
          return_lse=return_lse)

    return partitioning.call_with_auto_axes(
        attend, *explicit, specs, q, k, v, segment_ids, kv_lengths,
        q_lengths, mask, dropout_rng)
  prep = common.prepare(q, k, v, causal=causal, segment_ids=segment_ids,
                        kv_lengths=kv_lengths, q_lengths=q_lengths,
                        sliding_window=sliding_window, mask=mask, scale=scale,
                        dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  if backend is None:
    backend = default_backend(interpret)
  module = target_module(backend)
  out, lse = module.attention(q, k, v, prep, block_sizes=block_sizes,
                              interpret=interpret)
  return (out, lse) if return_lse else out
