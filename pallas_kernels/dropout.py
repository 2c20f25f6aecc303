"""Counter-based dropout bits shared by the reference, the XLA paths and kernels.

Shape letters: B batch, T query length, S key/value length, N query heads.

Whether attention probability ``(b, n, i, j)`` is kept is a pure function of
``(dropout_rng, b, n, i, j)``: no ``(B, N, T, S)`` random tensor is drawn,
so a kernel that sees one block of the scores can regenerate exactly the bits
the reference uses for that block. Every path (reference, fused XLA,
blockwise XLA, GPU and TPU kernels) calls :func:`keep_mask` with absolute
indices, so all paths drop the same entries for the same key.

The hash is MurmurHash3's 32-bit finaliser applied in a chain, written in
int32 arithmetic (wrapping multiply, logical shifts) because that lowers on
every backend, Mosaic TPU included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _i32(x: int) -> np.int32:
  """A 32-bit constant as a (wrapped) int32."""
  return np.array(x & 0xFFFFFFFF, dtype=np.uint32).view(np.int32)


_M1 = _i32(0x85EBCA6B)
_M2 = _i32(0xC2B2AE35)
_GOLDEN = _i32(0x9E3779B9)
_COL = _i32(0x27D4EB2F)


def _srl(x, n: int):
  return lax.shift_right_logical(x, jnp.int32(n))


def _fmix(h):
  """MurmurHash3 fmix32 on int32 (bitwise identical to the uint32 one)."""
  h = h ^ _srl(h, 16)
  h = h * _M1
  h = h ^ _srl(h, 13)
  h = h * _M2
  h = h ^ _srl(h, 16)
  return h


def as_key(rng, name: str = "dropout_rng",
           what: str = "a PRNG key") -> jax.Array:
  """``rng`` as one typed PRNG key: a new-style key (``jax.random.key``) as
  it is, a raw uint32 key (``jax.random.PRNGKey``) wrapped.

  Raises:
    TypeError: not a PRNG key (an int, floats, ints other than uint32);
      the message says the argument ``name`` must be ``what``.
    ValueError: several keys (split them outside, or ``vmap`` over them).
  """
  dtype = getattr(rng, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if rng.shape:
      raise ValueError(
          f"`{name}` must be a single PRNG key; got a key array of shape "
          f"{rng.shape} (vmap over it, or pick one key).")
    return rng
  if dtype != jnp.uint32:
    raise TypeError(
        f"`{name}` must be {what}, e.g. jax.random.key(0) (or a raw "
        "uint32 key from jax.random.PRNGKey); got "
        f"{type(rng).__name__}"
        + ("" if dtype is None else f" of dtype {dtype}") + ".")
  raw_shape = jax.random.key_data(jax.random.key(0)).shape
  if rng.shape != raw_shape:
    raise ValueError(
        f"`{name}` must be a single raw key of shape {raw_shape}; got "
        f"shape {rng.shape} (vmap over several keys, or pick one).")
  return jax.random.wrap_key_data(rng)


def seed_words(dropout_rng: jax.Array) -> jax.Array:
  """The two int32 words of a PRNG key that seed the hash: ``(2,)`` int32.

  Accepts what :func:`as_key` does, and raises as it does.
  """
  dropout_rng = as_key(dropout_rng)
  data = jax.random.key_data(dropout_rng)
  if data.shape != (2,):
    # Keys of other PRNG implementations: draw two words from them.
    data = jax.random.bits(dropout_rng, (2,), jnp.uint32)
  return lax.bitcast_convert_type(data.astype(jnp.uint32), jnp.int32)


def with_offsets(seeds, batch_offset=0, head_offset=0) -> jax.Array:
  """The kernels' dropout operand: ``(4,)`` int32, the two seed words of
  :func:`seed_words` and the global index of the first batch row and head
  the kernel sees (non-zero when ``jit`` splits a call over devices; see
  :mod:`pallas_kernels.partitioning`). Kernels hash ``b + words[2]`` and
  ``n + words[3]``, so every shard draws the bits of the whole problem."""
  offsets = jnp.stack([jnp.asarray(batch_offset, jnp.int32),
                       jnp.asarray(head_offset, jnp.int32)])
  return jnp.concatenate([jnp.asarray(seeds, jnp.int32), offsets])


def row_hash(seeds, b, n, i):
  """Per-row state of the hash for batch ``b``, head ``n``, query ``i``.

  Args:
    seeds: ``(2,)`` int32 from :func:`seed_words` (or two int32 scalars
      ``seeds[0], seeds[1]`` read inside a kernel).
    b, n, i: int32 scalars or broadcastable arrays (absolute indices).

  Returns:
    int32, broadcast shape of ``b, n, i``.
  """
  s0, s1 = seeds[0], seeds[1]
  h = _fmix(s0 ^ (jnp.asarray(b, jnp.int32) * _GOLDEN))
  h = _fmix(h ^ (n + s1))
  h = _fmix(h + i * _GOLDEN)
  return h


def bits_from_row(h_row, j, seed1):
  """31 random bits for key index ``j`` given the row state: int32 >= 0."""
  h = _fmix(h_row ^ (j * _COL))
  h = _fmix(h + seed1)
  return _srl(h, 1)


def threshold(rate: float) -> int:
  """Keep an entry iff its 31 bits are ``>= threshold(rate)``."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1); got {rate=}.")
  return int(round(rate * 2.0**31))


def keep_mask(seeds, rate: float, b, n, i, j):
  """Boolean keep mask for absolute indices ``(b, n, i, j)`` (broadcasting).

  ``P(keep) = 1 - rate``. Kept probabilities are scaled by ``1 / (1 - rate)``
  by the caller.

  >>> seeds = seed_words(jax.random.key(0))
  >>> b, n = jnp.int32(0), jnp.int32(0)
  >>> i = jnp.arange(256, dtype=jnp.int32)[:, None]
  >>> j = jnp.arange(256, dtype=jnp.int32)[None, :]
  >>> keep = keep_mask(seeds, 0.25, b, n, i, j)
  >>> bool(abs(keep.mean() - 0.75) < 0.01)
  True
  """
  h_row = row_hash(seeds, b, n, i)
  return bits_from_row(h_row, j, seeds[1]) >= threshold(rate)


def keep_mask_block(seeds, rate: float, B: int, N: int, T: int, S: int,
                    q_offset=0, kv_offset=0, head_offset=0) -> jax.Array:
  """The ``(B, N, T, S)`` keep mask of a block at the given offsets."""
  b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
  n = jnp.arange(N, dtype=jnp.int32)[None, :, None, None] + head_offset
  i = jnp.arange(T, dtype=jnp.int32)[None, None, :, None] + q_offset
  j = jnp.arange(S, dtype=jnp.int32)[None, None, None, :] + kv_offset
  return keep_mask(seeds, rate, b, n, i, j)
