"""Which attention path serves a call, and why the others refused.

Shape letters: B batch (flattened ``B*``), T query length, S key/value
length, N query heads, K key/value heads, H head dim, Hv value head dim.

Paths, tried in order; each either serves the call or refuses with a
``NotImplementedError(reason)`` (an ``UnsupportedCallError`` when the user
forced that path):

0. ``ring``: only, and always, for calls with a ``context_parallel_axis``
   (the config's, or :func:`jaxmha.context_parallel`'s): ring attention
   over that mesh axis (:mod:`jaxmha.ring`). Context parallelism is never
   dropped silently: if the ring cannot serve the call, it is an error.

1. ``flash``: the Pallas kernel of the platform (``pallas_kernels``: TPU
   Mosaic, GPU Triton). On CPU only when forced (``flash_attention=True``),
   then in interpret mode, for testing.
2. ``xla_blockwise``: online softmax over key blocks in plain JAX
   (``pallas_kernels.blockwise``); memory linear in the sequence length.
   The CPU default for long sequences, the fallback on GPU/TPU.
3. ``xla``: the fused XLA path; materialises ``(B, N, T, S)`` scores. The
   only path that returns attention scores; serves every call.

Nothing is swallowed: a refusal is recorded, and re-raised when the user
forced that path. :func:`jaxmha.explain` shows the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Optional

import jax

from jaxmha import config as config_lib
from jaxmha import ring
from pallas_kernels import api as kernel_api
from pallas_kernels import common
from pallas_kernels import reference

# The blockwise path is the CPU default when max(T, S) reaches this length,
# with a causal mask or a window. Measured on a 2-core CPU (fp32, N=8, H=64,
# D=512, B=1 and 4, layer, fwd and fwd+bwd, full and causal; `python -m
# benchmarks.compare`, benchmarks/results/compare.md): at T=256 the
# blockwise layer ran 1.17x to 1.51x Keras against the fused path's 0.74x to
# 1.21x; at T=128, 0.96x to 1.20x against 0.88x to 1.27x, the two within
# noise of each other. Below it the fused path is kept, being the simpler
# program.
BLOCKWISE_MIN_LENGTH = 128
# Without a band (causal, window) the blockwise path has no block to skip,
# and once the fused path kept the attention-value product in the scores'
# order, it ran the layer faster below 256 positions (AMD EPYC, 2 cores, the
# same shapes and B=16, interleaved medians, fused over blockwise time): at
# T=128 and 192, forward 0.76 to 0.95, forward+backward 0.91 to 1.00; at
# T=256 forward 0.74 to 0.88 but forward+backward 0.95 to 1.18.
BLOCKWISE_MIN_LENGTH_FULL = 256


def blockwise_min_length(spec) -> int:
  """The length (``max(T, S)``) from which the blockwise path is the CPU
  default, for a call with this :class:`pallas_kernels.MaskSpec`.

  >>> from pallas_kernels.masks import MaskSpec
  >>> blockwise_min_length(MaskSpec.causal()), blockwise_min_length(MaskSpec())
  (128, 256)
  """
  return BLOCKWISE_MIN_LENGTH_FULL if spec.is_full else BLOCKWISE_MIN_LENGTH


@dataclasses.dataclass(frozen=True)
class Request:
  """One attention call in the ``(B*, T, N, H)`` layout."""
  q: jax.Array  # (B, T, N, H)
  k: jax.Array  # (B, S, K, H)
  v: jax.Array  # (B, S, K, Hv)
  prep: common.Prepared
  need_probs: bool
  flash: Optional[bool]  # the layer's or the global preference
  platform: str
  context_parallel_axis: Optional[str] = None  # ring attention over it


@dataclasses.dataclass(frozen=True)
class Explanation:
  """Which path serves a call and why each other path refused.

  Attributes:
    path: the name of the serving path.
    refusals: ``{path name: reason}`` for every path tried before it.
  """
  path: str
  refusals: dict

  def __str__(self) -> str:
    lines = [f"path: {self.path}"]
    lines += [f"  {name} refused: {why}" for name, why in
              self.refusals.items()]
    return "\n".join(lines)


def context_parallel_axis(cfg) -> Optional[str]:
  """The config's ``context_parallel_axis``, or the enclosing
  :func:`jaxmha.context_parallel`'s."""
  return ring.context_parallel_axis(cfg)


def effective_flash_preference(layer_setting: Optional[bool]) -> Optional[bool]:
  """The layer's setting wins; None defers to the global switch."""
  if layer_setting is not None:
    return layer_setting
  return config_lib.is_flash_attention_enabled()


def _kernel_target(platform: str) -> Optional[str]:
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  return None


class FlashPath:
  name = "flash"

  def _target(self, req: Request):
    target = _kernel_target(req.platform)
    if target is not None:
      return target, False
    return "gpu", True  # forced on CPU: interpret the GPU kernel

  def check(self, req: Request) -> None:
    if req.flash is False:
      raise common.UnsupportedCallError("flash_attention=False")
    if req.need_probs:
      raise common.UnsupportedCallError(
          "return_attention_scores=True needs the (B, N, T, S) scores, which "
          "flash kernels never materialise")
    common.refuse_symbolic_shapes(q=req.q, k=req.k, v=req.v)
    forced = req.flash is True or forced_path() == self.name
    if _kernel_target(req.platform) is None and not forced:
      raise common.UnsupportedCallError(
          f"no flash kernel for platform {req.platform!r} (set "
          "flash_attention=True to run one in interpret mode)")
    target, interpret = self._target(req)
    module = kernel_api.target_module(target)
    # Trace only: kernels raise NotImplementedError for calls they cannot
    # serve (e.g. an unsupported head dim) while tracing.
    jax.eval_shape(
        lambda q, k, v: module.attention(q, k, v, req.prep,
                                         interpret=interpret),
        req.q, req.k, req.v)

  def run(self, req: Request):
    target, interpret = self._target(req)
    module = kernel_api.target_module(target)
    out, _ = module.attention(req.q, req.k, req.v, req.prep,
                              interpret=interpret)
    return out, None


class BlockwisePath:
  name = "xla_blockwise"

  def check(self, req: Request) -> None:
    if req.need_probs:
      raise common.UnsupportedCallError(
          "return_attention_scores=True needs the (B, N, T, S) scores, which "
          "the blockwise path never materialises")
    common.refuse_symbolic_shapes(q=req.q, k=req.k, v=req.v)
    p = req.prep.problem
    min_length = blockwise_min_length(req.prep.spec)
    if forced_path() != self.name and max(p.T, p.S) < min_length:
      band = ", with no causal mask or window" if req.prep.spec.is_full else ""
      raise common.UnsupportedCallError(
          f"short sequences (T={p.T}, S={p.S} < {min_length}{band}) go to "
          "the fused XLA path")

  def run(self, req: Request):
    from pallas_kernels import blockwise  # pylint: disable=g-import-not-at-top
    out, _ = blockwise.attention(req.q, req.k, req.v, req.prep)
    return out, None


class FusedXlaPath:
  name = "xla"

  def check(self, req: Request) -> None:
    del req

  def run(self, req: Request):
    if req.need_probs:
      out, _, probs = reference.attention_core(
          req.q, req.k, req.v, req.prep, precision=None, return_probs=True)
      return out, probs
    out, _ = reference.attention_core(req.q, req.k, req.v, req.prep,
                                      precision=None)
    return out, None


PATHS = (FlashPath(), BlockwisePath(), FusedXlaPath())
PATH_NAMES = tuple(p.name for p in PATHS)

_forced = threading.local()


@contextlib.contextmanager
def use_path(name: str):
  """Forces one attention path while tracing (for benchmarks and tests, and
  ``"xla"`` for forward-mode autodiff, which the ``jax.custom_vjp`` paths
  do not support).

  The path's own refusals still apply (e.g. ``xla_blockwise`` cannot return
  scores) and are raised, but the blockwise length threshold is waived.
  It holds for what is traced inside the block: a jitted function that has
  already traced these shapes outside it keeps the path it chose then.

  >>> import jax, jax.numpy as jnp, jaxmha
  >>> cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4)
  >>> x = jax.ShapeDtypeStruct((1, 8, 16), jnp.float32)
  >>> with use_path("xla_blockwise"):
  ...   print(jaxmha.explain(cfg, x, x).path)
  xla_blockwise
  """
  if name not in PATH_NAMES:
    raise ValueError(f"`name` must be one of {PATH_NAMES}; got {name!r}.")
  previous = getattr(_forced, "name", None)
  _forced.name = name
  try:
    yield
  finally:
    _forced.name = previous


def forced_path() -> Optional[str]:
  """The path forced by :func:`use_path`, or None."""
  return getattr(_forced, "name", None)


def ring_refusal(axis: str, reason: str) -> common.UnsupportedCallError:
  """The error for a context-parallel call that ring attention refuses."""
  return common.UnsupportedCallError(
      f"context_parallel_axis={axis!r}, but ring attention cannot serve this "
      f"call: {reason}")


def choose(req: Request) -> tuple[object, Explanation]:
  """The first path that accepts ``req``.

  Raises:
    UnsupportedCallError: the user forced flash (``flash_attention=True``)
      or a path (:func:`use_path`) and it refused, or ring attention cannot
      serve a context-parallel call; the message says why.
  """
  if req.context_parallel_axis is not None:
    try:
      ring.RING_PATH.check(req)
    except NotImplementedError as e:
      raise ring_refusal(req.context_parallel_axis, str(e)) from e
    return ring.RING_PATH, Explanation(path=ring.RING_PATH.name, refusals={})
  refusals = {}
  forced = forced_path()
  for path in PATHS:
    if forced is not None and path.name != forced:
      refusals[path.name] = f"use_path({forced!r}) is in effect"
      continue
    try:
      path.check(req)
    except NotImplementedError as e:
      if path.name == "flash" and req.flash is True:
        raise common.UnsupportedCallError(
            f"flash_attention=True (set on the layer or globally), but the "
            f"flash path cannot serve this call: {e}") from e
      if forced is not None:
        raise common.UnsupportedCallError(
            f"use_path({forced!r}), but that path cannot serve this call: "
            f"{e}") from e
      refusals[path.name] = str(e)
      continue
    return path, Explanation(path=path.name, refusals=refusals)
  raise AssertionError("unreachable: the fused XLA path serves every call")


def attend(req: Request):
  """Runs the chosen path: ``(out (B, T, N, Hv), probs or None, name)``."""
  path, explanation = choose(req)
  try:
    out, probs = path.run(req)
  except TypeError as e:
    if _JVP_OF_CUSTOM_VJP not in str(e):
      raise
    raise _forward_mode_refusal(path.name, req) from e
  return out, probs, explanation.path


# JAX's TypeError when forward mode meets a `jax.custom_vjp` function.
_JVP_OF_CUSTOM_VJP = "forward-mode autodiff (jvp) to a custom_vjp"


def _forward_mode_refusal(name: str, req: Request) -> TypeError:
  """The error for ``jax.jvp`` or ``jax.jacfwd`` through path ``name``, a
  ``jax.custom_vjp`` function: which path, and what serves the call."""
  p = req.prep.problem
  reverse = "use reverse mode (jax.grad, jax.vjp, jax.jacrev)"
  instead = reverse.capitalize()
  if name != ring.RING_PATH.name:
    instead = ("For forward mode, trace the call inside `with jaxmha."
               "dispatch.use_path(\"xla\"):` (the fused XLA path, which holds "
               f"the (B, N, T, S) scores), or {reverse}")
  return TypeError(
      f"jax.jvp and jax.jacfwd cannot differentiate the {name!r} attention "
      f"path that this call takes (B={p.B}, T={p.T}, S={p.S}, N={p.N}; "
      "jaxmha.explain says why): it is a jax.custom_vjp function, which JAX "
      f"differentiates in reverse mode only. {instead}.")
