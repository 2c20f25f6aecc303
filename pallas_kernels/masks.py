"""Attention masks as structure, and the block-skip predicates kernels use.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim. ``#`` marks a broadcastable dim.

A mask says which (query i, key j) pairs *may attend* (True = may attend).
jaxmha has two kinds of mask:

* **Structure** (:class:`MaskSpec`): a band of allowed keys around each query,
  known at trace time. Causal attention is the band with no keys to the
  right; Keras's ``sliding_window=w`` is the symmetric band ``|i - j| < w``.
  Kernels use it to skip whole blocks that it rules out.
* **Data** (:class:`MaskData`): arrays that vary per example: segment ids,
  lengths and an arbitrary dense boolean mask.

All sources are ANDed. Positions are top-left aligned when ``T != S``
(query ``i`` and key ``i`` are the same position), as Keras aligns them.

Causal, ``T = S = 8`` (``MaskSpec.causal()``)::

    i\\j 0 1 2 3 4 5 6 7
     0   x . . . . . . .
     1   x x . . . . . .
     2   x x x . . . . .
     3   x x x x . . . .
     4   x x x x x . . .
     5   x x x x x x . .
     6   x x x x x x x .
     7   x x x x x x x x

Sliding window ``w = 3`` (``MaskSpec.sliding_window(3)``, ``|i - j| < 3``)::

    i\\j 0 1 2 3 4 5 6 7
     0   x x x . . . . .
     1   x x x x . . . .
     2   x x x x x . . .
     3   . x x x x x . .
     4   . . x x x x x .
     5   . . . x x x x x
     6   . . . . x x x x
     7   . . . . . x x x

Both ANDed (``MaskSpec.causal() & MaskSpec.sliding_window(3)``)::

    i\\j 0 1 2 3 4 5 6 7
     0   x . . . . . . .
     1   x x . . . . . .
     2   x x x . . . . .
     3   . x x x . . . .
     4   . . x x x . . .
     5   . . . x x x . .
     6   . . . . x x x .
     7   . . . . . x x x
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

# One mask value for every path: large, finite and negative. Never -inf:
# ``-inf - -inf`` is NaN in the online softmax's rescaling.
MASK_VALUE = float(np.float32(-0.7 * float(np.finfo(np.float32).max)))

# Log-sum-exp reported for a query row that may attend to no key. It is
# finite, and merging it with any real row's LSE gives that row's LSE
# (``exp(MASK_VALUE - lse) == 0``), which is what ring attention needs.
EMPTY_ROW_LSE = MASK_VALUE


def attended(row_max):
  """Whether rows whose largest (masked) logit is ``row_max`` attended any
  key: above ``MASK_VALUE``, or NaN. A NaN in an attended logit (a NaN or
  inf input) must reach the output, as in Keras, not be taken for an empty
  row and zeroed.

  >>> attended(jnp.array([MASK_VALUE, 0.0, jnp.nan]))
  Array([False,  True,  True], dtype=bool)
  """
  return ~(row_max <= MASK_VALUE)


def _min_or_none(a: Optional[int], b: Optional[int]) -> Optional[int]:
  if a is None:
    return b
  if b is None:
    return a
  return min(a, b)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """A band of allowed keys around each query: ``i - left <= j <= i + right``.

  ``None`` on a side means unbounded. It is frozen and hashable, so it can be
  a static argument, and two specs combine with ``&`` (the band
  intersection).

  Attributes:
    left: how many keys before the query's own position it may see, or None.
    right: how many keys after the query's own position it may see, or None.

  >>> spec = MaskSpec.causal() & MaskSpec.sliding_window(3)
  >>> spec
  MaskSpec(left=2, right=0)
  >>> spec.dense(4, 4).astype(int)
  array([[1, 0, 0, 0],
         [1, 1, 0, 0],
         [1, 1, 1, 0],
         [0, 1, 1, 1]])
  """

  left: Optional[int] = None
  right: Optional[int] = None

  def __post_init__(self):
    for name in ("left", "right"):
      value = getattr(self, name)
      if value is not None and (
          not isinstance(value, (int, np.integer)) or isinstance(value, bool)
          or value < 0):
        raise ValueError(
            f"MaskSpec.{name} must be None or a non-negative int. "
            f"Received: {name}={value!r}")

  @classmethod
  def full(cls) -> "MaskSpec":
    """Every key may be attended to."""
    return cls()

  @classmethod
  def causal(cls) -> "MaskSpec":
    """Keys at or before the query's position (``j <= i``), top-left aligned."""
    return cls(left=None, right=0)

  @classmethod
  def sliding_window(cls, window: int) -> "MaskSpec":
    """Keras's symmetric band ``|i - j| < window``."""
    if (not isinstance(window, (int, np.integer)) or isinstance(window, bool)
        or window <= 0):
      raise ValueError(
          "`sliding_window` must be `None` or a positive integer. "
          f"Received: sliding_window={window!r}")
    return cls(left=int(window) - 1, right=int(window) - 1)

  @classmethod
  def from_args(cls, causal: bool = False,
                sliding_window: Any = None) -> "MaskSpec":
    """The spec for ``causal`` and ``sliding_window`` keyword arguments.

    ``sliding_window`` is an int ``w`` (``|i - j| < w``) or a pair
    ``(left, right)`` of non-negative ints (either may be None).
    """
    spec = cls.causal() if causal else cls.full()
    if sliding_window is None:
      return spec
    if isinstance(sliding_window, (tuple, list)):
      if len(sliding_window) != 2:
        raise ValueError(
            "`sliding_window` as a sequence must be a pair (left, right). "
            f"Received: sliding_window={sliding_window!r}")
      try:
        return spec & cls(left=sliding_window[0], right=sliding_window[1])
      except ValueError:
        raise ValueError(
            "`sliding_window` as a pair (left, right) takes non-negative "
            f"ints or None. Received: sliding_window={sliding_window!r}"
        ) from None
    return spec & cls.sliding_window(sliding_window)

  def __and__(self, other: "MaskSpec") -> "MaskSpec":
    if not isinstance(other, MaskSpec):
      return NotImplemented
    return MaskSpec(left=_min_or_none(self.left, other.left),
                    right=_min_or_none(self.right, other.right))

  @property
  def is_full(self) -> bool:
    return self.left is None and self.right is None

  def allows(self, q_idx, k_idx):
    """Elementwise: may query position ``q_idx`` attend key ``k_idx``?

    Works on Python ints, NumPy or JAX arrays (broadcasting), inside kernels
    too.
    """
    ok = True
    if self.right is not None:
      ok = k_idx <= q_idx + self.right
    if self.left is not None:
      ok = (k_idx >= q_idx - self.left) & ok
    return ok

  def dense(self, T: int, S: int) -> np.ndarray:
    """The ``(T, S)`` boolean matrix of this band (for tests and docs)."""
    return np.broadcast_to(
        self.allows(np.arange(T)[:, None], np.arange(S)[None, :]), (T, S))

  def block_may_attend(self, q_lo, q_hi, k_lo, k_hi):
    """Does the block ``[q_lo, q_hi) x [k_lo, k_hi)`` hold an allowed pair?

    False means the whole block can be skipped. Works on ints and on traced
    scalars (for kernels' index maps and ``pl.when``).
    """
    ok = True
    if self.right is not None:  # smallest key <= largest query + right
      ok = k_lo <= q_hi - 1 + self.right
    if self.left is not None:  # largest key >= smallest query - left
      ok = (k_hi - 1 >= q_lo - self.left) & ok
    return ok

  def every_row_attends(self, T: int, S: int, q_offset=0,
                        kv_offset=0) -> bool:
    """Does every query row of a ``(T, S)`` block at these positions hold
    an allowed key (``S >= 1``)? False where an offset is not a Python int.

    >>> MaskSpec.causal().every_row_attends(8, 4)
    True
    >>> MaskSpec.sliding_window(2).every_row_attends(8, 4)  # rows 5 to 7
    False
    """
    if not all(isinstance(x, (int, np.integer))
               for x in (T, S, q_offset, kv_offset)):
      return False
    # The first row sees the first key, and the last row the last key: then
    # every row's band meets the block's keys.
    return (self.right is None or kv_offset <= q_offset + self.right) and (
        self.left is None
        or q_offset + T - 1 - self.left <= kv_offset + S - 1)

  def block_fully_allowed(self, q_lo, q_hi, k_lo, k_hi):
    """Is every pair of the block allowed (so no mask need be applied)?"""
    ok = True
    if self.right is not None:  # largest key <= smallest query + right
      ok = k_hi - 1 <= q_lo + self.right
    if self.left is not None:  # smallest key >= largest query - left
      ok = (k_lo >= q_hi - 1 - self.left) & ok
    return ok

  def kv_block_range(self, q_lo: int, q_hi: int, S: int, block_k: int):
    """The half-open range of key-block indices a query block may attend.

    Python ints only (static shapes). Blocks outside it are skipped.
    """
    num_blocks = -(-S // block_k)
    lo, hi = 0, num_blocks
    if self.left is not None:
      lo = max(0, (q_lo - self.left) // block_k)
    if self.right is not None:
      hi = min(num_blocks, max(0, (q_hi - 1 + self.right) // block_k + 1))
    return lo, max(lo, hi)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskData:
  """Per-example mask arrays, all optional; a pytree.

  Attributes:
    q_segment_ids: ``(B, T)`` int; query i attends key j only if their
      segment ids are equal.
    kv_segment_ids: ``(B, S)`` int.
    q_lengths: ``(B,)`` int; query rows ``i >= q_lengths[b]`` attend nothing
      (their output is zero).
    kv_lengths: ``(B,)`` int; keys ``j >= kv_lengths[b]`` are padding.
    mask: ``(#B, #N, T, S)`` bool, True = may attend.
  """

  q_segment_ids: Optional[jax.Array] = None
  kv_segment_ids: Optional[jax.Array] = None
  q_lengths: Optional[jax.Array] = None
  kv_lengths: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None

  @property
  def is_empty(self) -> bool:
    return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

  def per_example(self, B: int) -> dict:
    """``{field name: array}`` of the arrays with one entry per example of
    a batch of ``B``: all but a mask broadcast over the batch (``#B == 1``
    with ``B > 1``), which every example shares."""
    return {f.name: x for f in dataclasses.fields(self)
            if (x := getattr(self, f.name)) is not None and x.shape[0] == B}


def normalize_mask_data(B: int, T: int, S: int, N: int, *, segment_ids=None,
                        q_lengths=None, kv_lengths=None,
                        mask=None) -> MaskData:
  """Validates the user's mask arrays and packs them into a :class:`MaskData`.

  Args:
    B, T, S, N: batch, query length, key length, query heads.
    segment_ids: ``(B, T)`` ids for self-attention (needs ``T == S``), or a
      pair ``(q_ids (B, T), kv_ids (B, S))``.
    q_lengths: ``(B,)`` valid query rows per example.
    kv_lengths: ``(B,)`` valid keys per example.
    mask: ``(#B, #N, T, S)`` boolean; also ``(#B, T, S)`` (every head, as
      Keras's ``attention_mask``) or ``(T, S)``.

  Raises:
    ValueError: a shape that does not fit ``B, T, S, N``.
    TypeError: a non-integer id/length array or a non-boolean mask.
  """
  q_ids = kv_ids = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      if len(segment_ids) != 2:
        raise ValueError(
            "`segment_ids` must be an array (B, T) or a pair "
            f"(q_ids (B, T), kv_ids (B, S)); got {len(segment_ids)} items.")
      q_ids, kv_ids = (jnp.asarray(x) for x in segment_ids)
    else:
      q_ids = kv_ids = jnp.asarray(segment_ids)
      if T != S:
        raise ValueError(
            f"A single `segment_ids` array needs T == S; got {T=} and {S=}. "
            "Pass a pair (q_ids, kv_ids) for cross-attention.")
    for name, ids, L in (("q_segment_ids", q_ids, T),
                         ("kv_segment_ids", kv_ids, S)):
      if ids.shape != (B, L):
        raise ValueError(
            f"`{name}` must have shape (B, {'T' if L == T else 'S'}) = "
            f"{(B, L)}; got {ids.shape}.")
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be integers; got {ids.dtype}.")
    q_ids = q_ids.astype(jnp.int32)
    kv_ids = kv_ids.astype(jnp.int32)

  def _lengths(name, x):
    if x is None:
      return None
    x = jnp.asarray(x)
    if x.shape != (B,):
      raise ValueError(f"`{name}` must have shape (B,) = {(B,)}; "
                       f"got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"`{name}` must be integers; got {x.dtype}.")
    return x.astype(jnp.int32)

  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"`mask` must be boolean (True = may attend); got "
                      f"{mask.dtype}.")
    expected = (f"`mask` must have shape (#B, #N, T, S) = (#{B}, #{N}, {T}, "
                f"{S}), (#B, T, S) or (T, S); got {mask.shape}.")
    if mask.ndim < 2 or mask.ndim > 4:
      raise ValueError(expected)
    if mask.ndim == 3:
      mask = mask[:, None]  # (#B, T, S): per example, every head
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if any(m not in (1, e) for m, e in zip(mask.shape, (B, N, T, S))) or (
        mask.shape[2:] != (T, S)):
      raise ValueError(expected)
  return MaskData(q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                  q_lengths=_lengths("q_lengths", q_lengths),
                  kv_lengths=_lengths("kv_lengths", kv_lengths), mask=mask)


def dense_mask(spec: MaskSpec, data: MaskData, B: int, N: int, T: int,
               S: int, q_offset: int = 0, kv_offset: int = 0) -> jax.Array:
  """All mask sources ANDed into one ``(#B, #N, T, S)`` boolean array.

  ``q_offset``/``kv_offset`` shift the positions the band is evaluated at
  (a block of a larger sequence). The segment ids, lengths and mask in
  ``data`` are those of the block itself.
  """
  del B, N
  q_pos = jnp.arange(T, dtype=jnp.int32)[:, None] + q_offset
  k_pos = jnp.arange(S, dtype=jnp.int32)[None, :] + kv_offset
  allowed = jnp.broadcast_to(jnp.asarray(spec.allows(q_pos, k_pos)), (T, S))
  allowed = allowed[None, None]  # (1, 1, T, S)
  if data.q_segment_ids is not None:
    allowed = allowed & (data.q_segment_ids[:, None, :, None]
                         == data.kv_segment_ids[:, None, None, :])
  if data.q_lengths is not None:
    allowed = allowed & (jnp.arange(T)[None, None, :, None]
                         < data.q_lengths[:, None, None, None])
  if data.kv_lengths is not None:
    allowed = allowed & (jnp.arange(S)[None, None, None, :]
                         < data.kv_lengths[:, None, None, None])
  if data.mask is not None:
    allowed = allowed & data.mask
  return allowed
