"""Keras's mask arguments, turned into the kernels' mask structure and data.

Shape letters: B batch, T query length, S key/value length, N heads;
``B*``, ``T`` and ``S`` are the flattened batch and sequence lengths of
:class:`jaxmha.equations.AttentionLayout` (for rank-3 inputs, just B, T, S).

Keras ANDs every mask source; so does jaxmha (True = may attend):

* ``query_mask (B, T)``: False rows attend nothing (their context is zero).
* ``value_mask (B, S)`` and ``key_mask (B, S)``: False keys are padding.
  ``key_mask`` is applied even when ``key`` is None, as Keras's code does.
* ``attention_mask (B, T, S)``, broadcastable, with an optional heads axis
  ``(B, N, T, S)``; Keras inserts the heads axis before the attention axes.
* ``use_causal_mask``: ``j <= i``, top-left aligned when ``T != S``::

      T=4, S=6     j: 0 1 2 3 4 5
               i=0    x . . . . .
               i=1    x x . . . .
               i=2    x x x . . .
               i=3    x x x x . .

* ``sliding_window=w``: ``|i - j| < w``.

Causal and window masks are structure (a
:class:`pallas_kernels.masks.MaskSpec` that kernels skip blocks with).
Padding masks become segment ids (valid queries and keys share segment 0;
masked ones get ids that match nothing), which keeps memory linear in the
sequence length. Only an explicit ``attention_mask`` is a dense array.
With several attention axes, positions are the row-major flattening of the
attention axes, in the order given.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from jaxmha.equations import AttentionLayout
from pallas_kernels import masks as kernel_masks


def _as_bool(name: str, mask):
  if not hasattr(mask, "dtype"):
    mask = np.asarray(mask)  # NumPy first: jnp rejects strings unnamed
  # jnp.issubdtype: NumPy's does not count bfloat16 as a number.
  if not (mask.dtype == np.bool_ or jnp.issubdtype(mask.dtype, jnp.number)):
    raise TypeError(f"`{name}` must be boolean or numeric; got "
                    f"{name}.dtype={mask.dtype}, {name}.shape={mask.shape}.")
  mask = jnp.asarray(mask)
  if mask.dtype == jnp.bool_:
    return mask
  return mask != 0  # Keras casts to bool: nonzero means "may attend"


def _padding(name: str, mask, dims: tuple, attention_axes: tuple):
  """A padding mask broadcast to ``dims`` (an input's shape sans features).

  A mask of one dim per example and attention axis, ``(B, *attention
  dims)``, for inputs with more axes is read as Keras reads it: per example,
  repeated over the other axes (right-aligned broadcasting would take its
  batch dim for another axis of the same size)."""
  mask = _as_bool(name, mask)
  if mask.ndim == 0:
    raise ValueError(f"`{name}` must have shape {dims} (the input's shape "
                     f"without its feature axis); got a scalar.")
  if mask.ndim == 1 + len(attention_axes) < len(dims):
    shape = [1] * len(dims)
    for axis, size in zip((0,) + tuple(attention_axes), mask.shape):
      shape[axis] = size
    mask = mask.reshape(shape)
  try:
    return jnp.broadcast_to(mask, dims)
  except ValueError:
    raise ValueError(
        f"`{name}` must have shape {dims} (the input's shape without its "
        f"feature axis) or broadcast to it; got {name}.shape={mask.shape}."
    ) from None


def _attention_mask(mask, layout: AttentionLayout, num_heads: int):
  """Keras's broadcast rules, then flattened to ``(#B*, #N, T, S)``."""
  mask = _as_bool("attention_mask", mask)
  L = len(layout.attention_axes)
  full = (layout.batch_dims + (num_heads,) + layout.q_attn_dims
          + layout.kv_attn_dims)
  expected = (f"{layout.batch_dims + layout.q_attn_dims + layout.kv_attn_dims}"
              f" or {full} with the heads axis")
  given = mask.shape
  if mask.ndim < 2 * L or mask.ndim > len(full):
    raise ValueError(f"`attention_mask` must have shape {expected}, or "
                     f"broadcast to it; got attention_mask.shape={given}.")
  while mask.ndim < len(full):
    # Keras inserts missing axes just before the attention axes.
    mask = jnp.expand_dims(mask, mask.ndim - 2 * L)
  if any(m not in (1, f) for m, f in zip(mask.shape, full)):
    raise ValueError(f"`attention_mask` must have shape {expected}, or "
                     f"broadcast to it; got attention_mask.shape={given}.")
  nb = len(layout.batch_dims)
  batch_is_broadcast = all(d == 1 for d in mask.shape[:nb])
  batch = (1,) * nb if batch_is_broadcast else layout.batch_dims
  heads = mask.shape[nb]
  mask = jnp.broadcast_to(mask, batch + (heads,) + full[nb + 1:])
  return mask.reshape(
      (1 if batch_is_broadcast else layout.flat_batch, heads, layout.T,
       layout.S))  # (#B*, #N, T, S)


def build(layout: AttentionLayout, num_heads: int, *, attention_mask=None,
          query_mask=None, value_mask=None, key_mask=None,
          use_causal_mask: bool = False,
          sliding_window: Optional[int] = None):
  """The mask structure and data for one call.

  Returns:
    ``(spec, data)``: a :class:`pallas_kernels.masks.MaskSpec` and a
    :class:`pallas_kernels.masks.MaskData` in the ``(B*, T, S)`` layout.

  Raises:
    ValueError: a mask that does not broadcast, naming it and the shapes.
    TypeError: a mask that is not boolean or numeric.
  """
  spec = kernel_masks.MaskSpec.from_args(causal=bool(use_causal_mask),
                                         sliding_window=sliding_window)
  q_valid = kv_valid = None
  if query_mask is not None:
    q_valid = layout.query_positions(
        _padding("query_mask", query_mask, layout.query_dims,
                 layout.attention_axes))  # (B*, T)
  for name, m in (("value_mask", value_mask), ("key_mask", key_mask)):
    if m is not None:
      valid = layout.key_positions(_padding(name, m, layout.value_dims,
                                            layout.attention_axes))
      kv_valid = valid if kv_valid is None else kv_valid & valid  # (B*, S)
  q_ids = kv_ids = None
  if q_valid is not None or kv_valid is not None:
    # Valid queries and keys share segment 0; a masked query (-1) or key
    # (-2) matches nothing.
    B = layout.flat_batch
    q_ids = (jnp.zeros((B, layout.T), jnp.int32) if q_valid is None else
             jnp.where(q_valid, 0, -1).astype(jnp.int32))
    kv_ids = (jnp.zeros((B, layout.S), jnp.int32) if kv_valid is None else
              jnp.where(kv_valid, 0, -2).astype(jnp.int32))
  dense = None
  if attention_mask is not None:
    dense = _attention_mask(attention_mask, layout, num_heads)
  data = kernel_masks.MaskData(q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                               mask=dense)
  return spec, data
