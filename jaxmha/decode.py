"""KV-cache decoding: a fixed-size cache and a decode-specialised attention.

Shape letters: B batch, t new tokens per call, L cache capacity
(``max_length``), N query heads, K key/value heads (query head ``n`` reads
key/value head ``n // (N // K)``), H key head dim, Hv value head dim,
D query features, E output features.

Usage, with the functional API (the Flax modules take the same ``cache=``
and ``new_lengths=`` arguments)::

  cache = jaxmha.init_cache(cfg, batch_size=B, max_length=L)
  out, cache = jaxmha.apply(params, cfg, prompt, prompt, cache=cache,
                            new_lengths=prompt_lengths)   # ragged prefill
  out, cache = jaxmha.apply(params, cfg, x, x, cache=cache)  # one step

Under ``jit``, donate the cache (``jax.jit(step, donate_argnums=...)``) or
carry it through ``lax.scan``/``lax.while_loop``: XLA then writes the new
tokens in place. A jitted step that does not donate it copies the whole
``(B, L, ...)`` cache on every call (at ``L = 8192``, one token: 6-12 ms a
step against 1-4 ms donated, on CPU).

Each call projects its ``t`` new tokens, writes the first ``new_lengths[b]``
of them (default: all ``t``) at example ``b``'s current length, and attends
over everything cached so far. Query ``i`` of example ``b`` sits at absolute
position ``p = lengths[b] + i`` and may attend key ``j`` when ``j`` holds a
token (``j < lengths[b] + new_lengths[b]``), ``j <= p`` (causal: decoding is
causal by construction, whatever ``use_causal_mask`` says) and, with
``cfg.sliding_window = w``, ``|p - j| < w``. For ``lengths = [3, 1]``,
``t = 2``, ``new_lengths = [2, 1]``, ``L = 6``::

  example 0  j: 0 1 2 3 4 5     example 1  j: 0 1 2 3 4 5
  i=0 (p=3)     x x x x . .     i=0 (p=1)     x x . . . .
  i=1 (p=4)     x x x x x .     i=1 (pad)     . . . . . .

A padded query row (``i >= new_lengths[b]``) attends nothing: its context
is zero, so its output is the output bias, as for ``query_mask``.

Other arguments with a cache:

* ``query_mask (B, t)``: ANDed in, as usual.
* ``attention_mask``: ``(B, t, L)`` or ``(B, N, t, L)`` over *cache
  positions* (broadcastable), ANDed in.
* ``value_mask`` / ``key_mask``: ``UnsupportedCallError`` (a padding mask on
  cached keys would have to live in the cache; use ``new_lengths``).
* ``return_attention_scores=True``: ``UnsupportedCallError``; this path never
  materialises the ``(B, N, t, L)`` scores (run the full path to see them).
* ``training=True`` with ``dropout > 0``: ``UnsupportedCallError`` (decoding
  is inference).
* Inputs of rank > 3 (several attention axes): ``UnsupportedCallError``.
* ``flash_attention=True`` (per layer or global): ``UnsupportedCallError``;
  there is no Pallas decode kernel, and a forced path is never ignored.
* ``context_parallel_axis`` (config or :func:`jaxmha.context_parallel`):
  ``UnsupportedCallError``; the cache is not split over devices, and
  context parallelism is never dropped silently.

**A full cache is an error, never a silent overwrite.** When ``lengths``
(and ``new_lengths``) are concrete, a call that would write past
``max_length`` raises ``ValueError`` before anything happens. Under ``jit``
they are traced, so instead: writes past the end are dropped (nothing
cached is overwritten), ``lengths`` stops at ``max_length``, and the
returned cache's ``overflow (B,)`` flag is set for that example and stays
set; the outputs of an overflowing example are then not those of full
attention. Check ``cache.overflow`` on the host, or make the cache with
``init_cache(..., debug_checks=True)`` and run the step under
``jax.experimental.checkify.checkify``: a ``checkify.debug_check`` fails
there, as does one for traced ``new_lengths`` outside ``[0, t]``, which are
otherwise clipped to it. Keep checkify's default
``errors=checkify.user_checks``: its ``index_checks`` flag the writes of
padding tokens, which go deliberately out of range and are dropped.

**Export.** A decode step goes through ``jax.export``, ``KVCache`` in its
arguments and results included, with a symbolic batch size if wanted, and
``Exported.serialize()`` writes it. Debug checks are off by default because
the effects they leave in a program are what ``serialize()`` cannot write.

The attention itself (:func:`cached_attention`) splits the cache into
chunks of ``chunk_size`` keys; each chunk gives a partial ``(out, lse)``
and partials are merged by log-sum-exp, so memory is one chunk's
``(B, t, N, chunk)`` logits, and only the chunks holding allowed keys are
visited: cost is linear in the cached length, not the capacity. K/V heads
are never repeated for grouped-query attention. It is an inference path:
the chunk loop has data-dependent bounds, which reverse-mode autodiff does
not transpose (``jax.grad`` of a cached call fails with JAX's
"Reverse-mode differentiation does not work for lax.while_loop or
lax.fori_loop with dynamic start/stop values"; ``jax.jvp`` works). Train
with the full path.
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
from jax.experimental import checkify

from jaxmha import equations
from jaxmha import functional
from jaxmha.config import MHAConfig, is_int
from pallas_kernels import common as kernel_common
from pallas_kernels import masks as kernel_masks

# Keys per chunk, by platform. On CPU, small chunks keep each chunk's keys
# in cache and measured fastest (benchmarks/decode.py); accelerators prefer
# fewer, larger loop steps.
CHUNK_SIZES = {"cpu": 128}
DEFAULT_CHUNK_SIZE = 512


def default_chunk_size() -> int:
  """Keys per chunk on the default backend."""
  return CHUNK_SIZES.get(jax.default_backend(), DEFAULT_CHUNK_SIZE)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """The keys and values decoded so far; a pytree (pass it through ``jit``).

  Attributes:
    k: ``(B, L, K, H)`` projected keys.
    v: ``(B, L, K, Hv)`` projected values.
    lengths: ``(B,)`` int32, how many positions of each example hold a
      token (positions ``j >= lengths[b]`` are free).
    overflow: ``(B,)`` bool, set (and kept) when a traced call tried to
      write past ``max_length`` for that example (see the module docs).
    debug_checks: static; whether steps check a full cache and
      ``new_lengths`` with ``checkify.debug_check`` (see the module docs).

  >>> cfg = MHAConfig(num_heads=4, key_dim=8, num_key_value_heads=2)
  >>> cache = init_cache(cfg, batch_size=2, max_length=16)
  >>> cache.k.shape, cache.v.shape, cache.max_length
  ((2, 16, 2, 8), (2, 16, 2, 8), 16)
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  overflow: jax.Array
  # Static (pytree metadata): a cache with checks traces a new program.
  debug_checks: bool = dataclasses.field(default=False,
                                         metadata=dict(static=True))

  @property
  def batch_size(self) -> int:
    return self.k.shape[0]

  @property
  def max_length(self) -> int:
    """L, the capacity."""
    return self.k.shape[1]


# jax.export serializes pytree types it is told about: the cache's only
# metadata is the debug_checks flag.
jax.export.register_pytree_node_serialization(
    KVCache, serialized_name="jaxmha.decode.KVCache",
    serialize_auxdata=lambda aux: bytes([bool(aux[0])]),
    deserialize_auxdata=lambda data: (bool(data[0]),))


def init_cache(cfg: MHAConfig, batch_size: int, max_length: int,
               dtype=jnp.float32, *, debug_checks: bool = False) -> KVCache:
  """An empty cache for a layer with configuration ``cfg``.

  Args:
    cfg: the layer's configuration (K, H and Hv come from it).
    batch_size: B.
    max_length: L, the most tokens each example can hold.
    dtype: the dtype keys and values are stored in.
    debug_checks: steps on this cache (and the caches they return) check a
      full cache and traced ``new_lengths`` with ``checkify.debug_check``,
      which fail under ``checkify.checkify`` (see the module docs).

  Returns:
    A :class:`KVCache` with zero ``lengths``.

  Raises:
    ValueError: a non-positive ``batch_size`` or ``max_length``.
    TypeError: ``cfg`` is not an :class:`MHAConfig`; ``dtype`` is not a
      floating-point dtype.

  >>> cfg = MHAConfig(num_heads=2, key_dim=4, value_dim=3)
  >>> cache = init_cache(cfg, batch_size=1, max_length=8, dtype=jnp.bfloat16)
  >>> cache.v.shape, cache.v.dtype, cache.lengths
  ((1, 8, 2, 3), dtype(bfloat16), Array([0], dtype=int32))
  """
  if not isinstance(cfg, MHAConfig):
    hint = (" (a jaxmha module's is its .config)"
            if isinstance(getattr(cfg, "config", None), MHAConfig) else "")
    raise TypeError(f"`cfg` must be a jaxmha.MHAConfig{hint}; got "
                    f"{type(cfg).__name__}.")
  dtype = functional.float_dtype("dtype", dtype)
  debug_checks = functional.static_flag("debug_checks", debug_checks)
  for name, value in (("batch_size", batch_size), ("max_length", max_length)):
    if not is_int(value) or value <= 0:
      raise ValueError(f"`{name}` must be a positive integer. Received: "
                       f"{name}={value!r}")
  B, L = int(batch_size), int(max_length)
  K, H, Hv = cfg.kv_heads, cfg.key_dim, cfg.value_head_dim
  return KVCache(k=jnp.zeros((B, L, K, H), dtype),
                 v=jnp.zeros((B, L, K, Hv), dtype),
                 lengths=jnp.zeros((B,), jnp.int32),
                 overflow=jnp.zeros((B,), jnp.bool_),
                 debug_checks=debug_checks)


def _concrete(x) -> Optional[np.ndarray]:
  """``x`` as a NumPy array, or None when it is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def update_cache(cache: KVCache, k, v, new_lengths=None):
  """Writes ``t`` new keys and values at each example's current length.

  Args:
    cache: the cache.
    k: ``(B, t, K, H)`` new keys.
    v: ``(B, t, K, Hv)`` new values.
    new_lengths: ``(B,)`` int, how many of the ``t`` tokens are real for
      each example (the rest are padding and are not written); default all.

  Returns:
    ``(cache, q_positions (B, t) int32, n_new (B,) int32)``: the updated
    cache, the absolute position of each new token, and how many were
    written (before any overflow).

  Raises:
    ValueError: shapes that do not fit the cache; concrete ``new_lengths``
      outside ``[0, t]``; a concrete write past ``max_length``.

  >>> cfg = MHAConfig(num_heads=2, key_dim=4)
  >>> cache = init_cache(cfg, batch_size=2, max_length=4)
  >>> kv = jnp.ones((2, 3, 2, 4))
  >>> cache, pos, n = update_cache(cache, kv, kv, new_lengths=jnp.array([3, 1]))
  >>> cache.lengths
  Array([3, 1], dtype=int32)
  >>> _, pos, _ = update_cache(cache, kv[:, :1], kv[:, :1])
  >>> pos
  Array([[3],
         [1]], dtype=int32)
  >>> update_cache(cache, kv[:, :2], kv[:, :2])
  Traceback (most recent call last):
  ...
  ValueError: The KV cache is full: example 0 holds lengths[0]=3 of ...
  """
  if not isinstance(cache, KVCache):
    raise TypeError(f"`cache` must be a jaxmha.decode.KVCache (from "
                    f"jaxmha.init_cache); got {type(cache).__name__}.")
  B, L = cache.k.shape[:2]
  if k.ndim != 4 or k.shape[0] != B or k.shape[2:] != cache.k.shape[2:]:
    raise ValueError(
        f"New keys (B, t, K, H) must fit the cache's k (B, L, K, H) = "
        f"{cache.k.shape}; got k.shape={k.shape}.")
  t = k.shape[1]
  if v.shape[:2] != (B, t) or v.shape[2:] != cache.v.shape[2:]:
    raise ValueError(
        f"New values (B, t, K, Hv) must fit the cache's v (B, L, K, Hv) = "
        f"{cache.v.shape} and the new keys {k.shape}; got v.shape={v.shape}.")
  if t > L:
    raise ValueError(f"This call writes t={t} tokens into a cache of "
                     f"max_length={L}; allocate a longer cache.")
  if new_lengths is None:
    n_new = jnp.full((B,), t, jnp.int32)
  else:
    n_new = jnp.asarray(new_lengths)
    if n_new.shape != (B,) or not jnp.issubdtype(n_new.dtype, jnp.integer):
      raise ValueError(f"`new_lengths` must be (B,) = ({B},) integers; got "
                       f"new_lengths.shape={n_new.shape}, dtype={n_new.dtype}.")
    concrete = _concrete(n_new)
    if concrete is not None and ((concrete < 0) | (concrete > t)).any():
      raise ValueError(f"`new_lengths` must be in [0, t] with t={t} (the "
                       f"number of new tokens); got new_lengths={concrete}.")
    if cache.debug_checks:
      checkify.debug_check(
          jnp.all((n_new >= 0) & (n_new <= t)),
          f"`new_lengths` must be in [0, t] with t={t}; got "
          "new_lengths={new_lengths} (clipped to it).", new_lengths=n_new)
    n_new = jnp.clip(n_new.astype(jnp.int32), 0, t)
  lengths = cache.lengths
  total = lengths + n_new  # (B,)
  concrete_total = _concrete(total)
  if concrete_total is not None:
    full = np.flatnonzero(concrete_total > L)
    if full.size:
      b = int(full[0])
      raise ValueError(
          f"The KV cache is full: example {b} holds lengths[{b}]="
          f"{int(np.asarray(lengths)[b])} of max_length={L} tokens and this "
          f"call writes {int(np.asarray(n_new)[b])} more. Allocate a longer "
          "cache (jaxmha.init_cache(..., max_length=...)).")
  overflow = total > L  # (B,)
  if cache.debug_checks:
    checkify.debug_check(
        ~jnp.any(overflow),
        f"The KV cache is full: a write past max_length={L} was dropped "
        "(lengths={lengths}, new_lengths={n_new}).", lengths=lengths,
        n_new=n_new)
  q_positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)  # (B, t)
  written = jnp.arange(t)[None, :] < n_new[:, None]  # (B, t)
  # Out-of-range rows (padding, or past the end) go to index L, which
  # mode="drop" discards: nothing cached is ever overwritten.
  rows = jnp.where(written & (q_positions < L), q_positions, L)  # (B, t)
  batch = jnp.arange(B)[:, None]  # (B, 1)
  new_k = cache.k.at[batch, rows].set(k.astype(cache.k.dtype), mode="drop")
  new_v = cache.v.at[batch, rows].set(v.astype(cache.v.dtype), mode="drop")
  new_cache = KVCache(k=new_k, v=new_v,
                      lengths=jnp.minimum(total, L).astype(jnp.int32),
                      overflow=cache.overflow | overflow,
                      debug_checks=cache.debug_checks)
  return new_cache, q_positions, n_new


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Merges two partial attention results over disjoint key sets.

  Args:
    out_a, out_b: ``(..., Hv)`` float32 outputs, each normalised over its
      own keys (zero for a row with no allowed key).
    lse_a, lse_b: ``(...)`` float32 log-sum-exp of each part's logits
      (``EMPTY_ROW_LSE`` for a row with no allowed key).

  Returns:
    ``(out, lse)`` of attention over the union of the two key sets.

  >>> out, lse = merge_partials(jnp.ones((1, 2)), jnp.zeros(1),
  ...                           3 * jnp.ones((1, 2)), jnp.zeros(1))
  >>> out, lse
  (Array([[2., 2.]], dtype=float32), Array([0.6931472], dtype=float32))
  """
  lse = jnp.logaddexp(lse_a, lse_b)
  # exp(EMPTY_ROW_LSE - lse) underflows to exactly 0 for any real row, so an
  # empty part contributes nothing; two empty parts stay (near) empty.
  w_a = jnp.exp(lse_a - lse)[..., None]
  w_b = jnp.exp(lse_b - lse)[..., None]
  return w_a * out_a + w_b * out_b, lse


def _normalize_mask(mask, B: int, N: int, K: int, t: int, L: int):
  """A ``(#B, #N, t, L)`` mask (or without heads) -> ``(#B, t, #K, #G, L)``."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    if not jnp.issubdtype(mask.dtype, jnp.number):
      raise TypeError(f"`attention_mask` must be boolean or numeric; got "
                      f"{mask.dtype}.")
    mask = mask != 0
  expected = (f"(B, t, L) = ({B}, {t}, {L}) or (B, N, t, L) = "
              f"({B}, {N}, {t}, {L})")
  given = mask.shape
  if mask.ndim == 2:
    mask = mask[None, None]
  elif mask.ndim == 3:
    mask = mask[:, None]
  if mask.ndim != 4 or any(m not in (1, f) for m, f in zip(
      mask.shape, (B, N, t, L))):
    raise ValueError(
        f"With a cache, `attention_mask` is over cache positions: it must "
        f"broadcast to {expected}; got attention_mask.shape={given}.")
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, L))
  heads = (K, N // K) if mask.shape[1] == N else (1, 1)
  mask = jnp.moveaxis(mask, 1, 2)  # (#B, t, #N, L)
  return mask.reshape(mask.shape[:2] + heads + (L,))  # (#B, t, #K, #G, L)


def cached_attention(q, k, v, *, q_positions, kv_lengths, causal: bool = True,
                     sliding_window: Optional[int] = None, q_valid=None,
                     mask=None, scale: Optional[float] = None,
                     chunk_size: Optional[int] = None):
  """Attention of a few queries over a KV cache, chunk by chunk.

  Args:
    q: ``(B, t, N, H)`` queries.
    k: ``(B, L, K, H)`` cached keys, ``N % K == 0``.
    v: ``(B, L, K, Hv)`` cached values.
    q_positions: ``(B, t)`` int, each query's absolute position.
    kv_lengths: ``(B,)`` int; keys ``j >= kv_lengths[b]`` are empty.
    causal: queries see keys ``j <= q_positions`` only.
    sliding_window: ``w`` for the band ``|q_position - j| < w``.
    q_valid: ``(B, t)`` bool; False rows attend nothing (zero output).
    mask: ``(#B, #N, t, L)`` bool over cache positions, True = may attend.
    scale: logit scale; default ``1 / sqrt(H)``.
    chunk_size: keys per chunk; default :func:`default_chunk_size`.

  Returns:
    ``(out (B, t, N, Hv) in q.dtype, lse (B, N, t) float32)``, equal to
    ``pallas_kernels.reference.attention`` with the same mask.

  >>> q = jnp.ones((1, 1, 4, 8)); kv = jnp.ones((1, 32, 2, 8))
  >>> out, lse = cached_attention(q, kv, kv, q_positions=jnp.array([[9]]),
  ...                             kv_lengths=jnp.array([10]), chunk_size=8)
  >>> out.shape, lse.shape
  ((1, 1, 4, 8), (1, 4, 1))
  """
  B, t, N, H = q.shape
  _, L, K, _ = k.shape
  if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != H:
    raise ValueError(f"`q` (B, t, N, H), `k` (B, L, K, H) and `v` (B, L, K, "
                     f"Hv) disagree: q.shape={q.shape}, k.shape={k.shape}, "
                     f"v.shape={v.shape}.")
  if N % K:
    raise ValueError(f"N % K must be 0; got {N=} and {K=}.")
  if chunk_size is None:
    chunk_size = default_chunk_size()
  if not is_int(chunk_size) or chunk_size <= 0:
    raise ValueError(f"`chunk_size` must be a positive int; got "
                     f"{chunk_size=}.")
  scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
  q_positions = jnp.broadcast_to(jnp.asarray(q_positions, jnp.int32), (B, t))
  kv_lengths = jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32), (B,))
  if q_valid is None:
    q_valid = jnp.ones((B, t), jnp.bool_)
  q_valid = jnp.broadcast_to(jnp.asarray(q_valid, jnp.bool_), (B, t))
  if mask is not None:
    mask = _normalize_mask(mask, B, N, K, t, L)  # (#B, t, #K, #G, L)
  return _attend(q, k, v, q_positions, kv_lengths, q_valid, mask,
                 causal=bool(causal), sliding_window=sliding_window,
                 scale=scale, chunk_size=int(chunk_size))


# Jitted so that eager calls compile once per shape, not per loop trip count.
@functools.partial(jax.jit, static_argnames=("causal", "sliding_window",
                                             "scale", "chunk_size"))
def _attend(q, k, v, q_positions, kv_lengths, q_valid, mask, *, causal,
            sliding_window, scale, chunk_size):
  """The chunk loop of :func:`cached_attention` on checked arguments."""
  B, t, N, H = q.shape
  _, L, K, _ = k.shape
  Hv = v.shape[-1]
  G = N // K
  C = min(chunk_size, L)
  num_chunks = -(-L // C)
  qf = q.astype(jnp.float32).reshape(B, t, K, G, H) * scale

  # Only chunks that can hold an allowed key are visited.
  hi = jnp.max(kv_lengths)
  if causal:
    hi = jnp.minimum(hi, jnp.max(q_positions) + 1)
  lo = jnp.zeros((), jnp.int32)
  if sliding_window is not None:
    lo = jnp.maximum(jnp.min(q_positions) - (sliding_window - 1), 0)
    if not causal:
      hi = jnp.minimum(hi, jnp.max(q_positions) + sliding_window)
  first = lo // C
  last = jnp.clip((hi + C - 1) // C, 0, num_chunks)

  def body(c, carry):
    out, lse = carry
    nominal = c * C
    # The last chunk of a cache whose L is not a multiple of C is slid back
    # to fit; keys before `nominal` were seen by the previous chunk.
    start = jnp.minimum(nominal, L - C)
    k_c = lax.dynamic_slice_in_dim(k, start, C, axis=1)  # (B, C, K, H)
    v_c = lax.dynamic_slice_in_dim(v, start, C, axis=1)  # (B, C, K, Hv)
    logits = jnp.einsum("btkgh,bckh->btkgc", qf,
                        k_c.astype(jnp.float32))  # (B, t, K, G, C)
    pos = start + jnp.arange(C, dtype=jnp.int32)  # (C,)
    allowed = ((pos >= nominal)[None, None, :]
               & (pos[None, None, :] < kv_lengths[:, None, None])
               & q_valid[:, :, None])  # (B, t, C)
    qp = q_positions[:, :, None]  # (B, t, 1)
    if causal:
      allowed &= pos <= qp
    if sliding_window is not None:
      allowed &= jnp.abs(qp - pos) < sliding_window
    allowed = allowed[:, :, None, None, :]  # (B, t, 1, 1, C)
    if mask is not None:
      allowed = allowed & lax.dynamic_slice_in_dim(mask, start, C, axis=4)
    logits = jnp.where(allowed, logits, kernel_masks.MASK_VALUE)
    m = jnp.max(logits, axis=-1)  # (B, t, K, G)
    # Zeroed explicitly: in a fully masked row every logit is MASK_VALUE,
    # and exp(logit - m) would be 1, not 0.
    p = jnp.where(allowed, jnp.exp(logits - m[..., None]), 0.0)
    l = jnp.sum(p, axis=-1)  # (B, t, K, G)
    nonempty = l > 0.0
    safe_l = jnp.where(nonempty, l, 1.0)
    out_c = jnp.einsum("btkgc,bckh->btkgh", p, v_c.astype(jnp.float32))
    out_c = out_c / safe_l[..., None]  # (B, t, K, G, Hv)
    lse_c = jnp.where(nonempty, m + jnp.log(safe_l),
                      kernel_masks.EMPTY_ROW_LSE)  # (B, t, K, G)
    return merge_partials(out, lse, out_c, lse_c)

  init = (jnp.zeros((B, t, K, G, Hv), jnp.float32),
          jnp.full((B, t, K, G), kernel_masks.EMPTY_ROW_LSE, jnp.float32))
  out, lse = lax.fori_loop(first, last, body, init)
  # Merging empty parts adds log(2) per chunk to EMPTY_ROW_LSE; snap back.
  lse = jnp.where(lse > 0.5 * kernel_masks.EMPTY_ROW_LSE, lse,
                  kernel_masks.EMPTY_ROW_LSE)
  out = out.reshape(B, t, N, Hv).astype(q.dtype)  # (B, t, N, Hv)
  lse = jnp.moveaxis(lse.reshape(B, t, N), 1, 2)  # (B, N, t)
  return out, lse


def apply_with_projections(params, cfg: MHAConfig, query, value, key=None,
                           *, cache: KVCache, new_lengths=None,
                           attention_mask=None, query_mask=None,
                           value_mask=None, key_mask=None,
                           use_causal_mask: bool = False,
                           training: bool = False, dropout_rng=None,
                           return_attention_scores: bool = False, dtype=None,
                           chunk_size: Optional[int] = None):
  """:func:`jaxmha.functional.apply_with_projections` with a KV cache.

  Reached through ``jaxmha.apply(..., cache=cache)``; see the module docs
  for the semantics. ``use_causal_mask`` and ``dropout_rng`` change
  nothing here (decoding is causal; dropout is refused).

  Args:
    params, cfg: as :func:`jaxmha.apply`.
    query: ``(B, t, D)``, the new tokens.
    value: ``(B, t, Dv)``, the same tokens (self-attention decoding).
    key: ``(B, t, Dk)``; default ``value``.
    cache: from :func:`init_cache` or a previous call.
    new_lengths: ``(B,)`` int, real tokens per example (ragged prefill).
    chunk_size: keys per chunk of :func:`cached_attention`; default
      :func:`default_chunk_size`.
    attention_mask, query_mask, value_mask, key_mask, training,
    return_attention_scores, dtype: as :func:`jaxmha.apply` (the module
      docs say how masks meet the cache).

  Returns:
    ``(output (B, t, *E), None, projections, cache)``.

  Raises:
    ValueError, TypeError: bad inputs, or a concrete write past
      ``max_length``.
    UnsupportedCallError: an argument this path cannot serve (listed in the
      module docs).

  >>> cfg = MHAConfig(num_heads=2, key_dim=4)
  >>> x = jnp.ones((1, 3, 8))
  >>> params = functional.init_params(jax.random.key(0), cfg, x.shape, x.shape)
  >>> out, _, _, cache = apply_with_projections(
  ...     params, cfg, x, x, cache=init_cache(cfg, batch_size=1, max_length=8))
  >>> out.shape, cache.lengths
  ((1, 3, 8), Array([3], dtype=int32))
  """
  del use_causal_mask, dropout_rng
  if not isinstance(cache, KVCache):
    raise TypeError(f"`cache` must be a jaxmha.decode.KVCache (from "
                    f"jaxmha.init_cache); got {type(cache).__name__}.")
  training = functional.static_flag("training", training)
  if functional.static_flag("return_attention_scores",
                            return_attention_scores):
    raise kernel_common.UnsupportedCallError(
        "return_attention_scores=True with a cache: the decode path never "
        "materialises the (B, N, t, L) scores; call without `cache` to get "
        "them.")
  for name, m in (("value_mask", value_mask), ("key_mask", key_mask)):
    if m is not None:
      raise kernel_common.UnsupportedCallError(
          f"`{name}` with a cache: cached keys carry no padding mask; use "
          "`new_lengths` for ragged inputs, or `attention_mask` (B, t, L).")
  if training and cfg.dropout > 0.0:
    raise kernel_common.UnsupportedCallError(
        f"training=True with dropout={cfg.dropout} and a cache: cached "
        "decoding is inference only; call with training=False.")
  q_shape = jnp.shape(query)
  v_shape = jnp.shape(value)
  if len(q_shape) != 3:
    raise kernel_common.UnsupportedCallError(
        f"A cache serves rank-3 inputs (B, t, D) only; got "
        f"query.shape={q_shape}.")
  if len(v_shape) == 3 and v_shape[1] != q_shape[1]:
    raise ValueError(
        f"With a cache, `value` holds the same t new tokens as `query`; got "
        f"query.shape={q_shape} and value.shape={v_shape}.")
  call = functional._prepare_call(  # pylint: disable=protected-access
      params, cfg, query, value, key, attention_mask=None, query_mask=None,
      value_mask=None, key_mask=None, use_causal_mask=False, training=False,
      dropout_rng=None, return_attention_scores=False, dtype=dtype)
  req = call.request
  if req.flash is True:
    raise kernel_common.UnsupportedCallError(
        "flash_attention=True (set on the layer or globally), but there is no "
        "flash decode kernel; decode with flash_attention=None or False.")
  if req.context_parallel_axis is not None:
    # Context parallelism is never dropped silently (see jaxmha.dispatch).
    raise kernel_common.UnsupportedCallError(
        f"context_parallel_axis={req.context_parallel_axis!r} with a cache: "
        "the cache holds whole sequences and decoding does not split them "
        "over devices; decode with a config without context_parallel_axis "
        "(the params are the same).")
  B, t = q_shape[:2]
  if cache.k.shape[0] != B:
    raise ValueError(f"The cache holds batch_size={cache.k.shape[0]} "
                     f"examples; got query.shape={q_shape}.")
  if cache.k.shape[2:] != (cfg.kv_heads, cfg.key_dim) or (
      cache.v.shape[2:] != (cfg.kv_heads, cfg.value_head_dim)):
    raise ValueError(
        f"The cache does not fit this config: cache.k.shape={cache.k.shape}, "
        f"cache.v.shape={cache.v.shape}, expected (B, L, K, H) with "
        f"K={cfg.kv_heads}, H={cfg.key_dim} and (B, L, K, Hv) with "
        f"Hv={cfg.value_head_dim}.")
  new_cache, q_positions, n_new = update_cache(cache, req.k, req.v,
                                               new_lengths)
  q_valid = jnp.arange(t)[None, :] < n_new[:, None]  # (B, t)
  if query_mask is not None:
    qm = jnp.asarray(query_mask)
    qm = qm if qm.dtype == jnp.bool_ else qm != 0
    try:
      q_valid = q_valid & jnp.broadcast_to(qm, (B, t))
    except ValueError:
      raise ValueError(f"`query_mask` must have shape (B, t) = {(B, t)}; got "
                       f"query_mask.shape={qm.shape}.") from None
  out4, _ = cached_attention(
      req.q, new_cache.k, new_cache.v, q_positions=q_positions,
      kv_lengths=new_cache.lengths, causal=True,
      sliding_window=cfg.sliding_window, q_valid=q_valid,
      mask=attention_mask, scale=req.prep.scale,
      chunk_size=chunk_size)  # (B, t, N, Hv)
  context = out4.astype(call.dtype)
  if call.gate is not None:
    context = context * call.gate
  p_out = jax.tree.map(lambda x: jnp.asarray(x, call.dtype),
                       params["attention_output"])
  E_rank = p_out["kernel"].ndim - 2
  output = functional._dense(  # pylint: disable=protected-access
      context, p_out, equations.output_projection(E_rank))  # (B, t, *E)
  projections = dict(call.projections, attention_output=output)
  return output, None, projections, new_cache
