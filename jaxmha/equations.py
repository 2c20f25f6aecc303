"""Keras's projection and attention equations for any rank and attention axes.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H key head dim, Hv value head dim, D query features,
E output features.

Keras's ``MultiHeadAttention`` builds einsum equations per input rank. jaxmha
keeps Keras's *parameters* and *results* but computes attention on one
layout: the projections are rank-agnostic einsums (``...d,dnh->...nh``), and
:class:`AttentionLayout` moves every non-attention axis into the batch and
flattens the attention axes (in the order given) into one sequence axis, so
that every attention path sees ``(B*, T, N, H)``. For a rank-3 input this is
the identity. Scores come back in Keras's multi-axis layout
``(B, *other, N, *attn_T, *attn_S)``.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax.numpy as jnp

# Projection equations (Keras's EinsumDense layout, any leading rank).
QUERY_PROJECTION = "...d,dnh->...nh"  # (B, ..., D) -> (B, ..., N, H)


def output_projection(output_rank: int) -> str:
  """``(B, ..., N, Hv) x (N, Hv, *E) -> (B, ..., *E)``."""
  out = string.ascii_uppercase[:output_rank]
  return f"...nh,nh{out}->...{out}"


def normalize_attention_axes(attention_axes, query_rank: int) -> tuple:
  """Keras's attention axes as non-negative axes of the query input.

  Args:
    attention_axes: None (every axis but batch and features), or ints; a
      negative axis counts from the end of the query input, as in Keras.
    query_rank: rank R of the query input ``(B, ..., D)``, R >= 3.

  Raises:
    ValueError: an axis that is the batch or feature axis, or out of range.
  """
  if attention_axes is None:
    return tuple(range(1, query_rank - 1))
  axes = tuple(a + query_rank if a < 0 else a for a in attention_axes)
  for original, a in zip(attention_axes, axes):
    if not 1 <= a <= query_rank - 2:
      raise ValueError(
          f"`attention_axes` must name axes between the batch and the "
          f"feature axis of a rank-{query_rank} query, i.e. in [1, "
          f"{query_rank - 2}] (or [{1 - query_rank}, -2]). Received: "
          f"attention_axes={attention_axes}, invalid axis {original}.")
  if len(set(axes)) != len(axes):
    raise ValueError(f"`attention_axes` names an axis twice: "
                     f"attention_axes={attention_axes}.")
  return axes


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
  """Maps projected tensors to and from the ``(B*, T, N, H)`` layout.

  Attributes:
    query_dims: the query input's shape without features, ``(B, d_1, ...)``.
    value_dims: the value input's shape without features.
    attention_axes: normalised axes (of the query input) attention runs over.
  """

  query_dims: tuple
  value_dims: tuple
  attention_axes: tuple

  @property
  def other_axes(self) -> tuple:
    """Axes besides batch that are not attended over (folded into B*)."""
    return tuple(a for a in range(1, len(self.query_dims))
                 if a not in self.attention_axes)

  @property
  def _perm(self) -> tuple:
    return (0,) + self.other_axes + self.attention_axes

  @property
  def batch_dims(self) -> tuple:
    return (self.query_dims[0],) + tuple(self.query_dims[a]
                                         for a in self.other_axes)

  @property
  def q_attn_dims(self) -> tuple:
    return tuple(self.query_dims[a] for a in self.attention_axes)

  @property
  def kv_attn_dims(self) -> tuple:
    return tuple(self.value_dims[a] for a in self.attention_axes)

  @property
  def flat_batch(self) -> int:
    return math.prod(self.batch_dims)

  @property
  def T(self) -> int:
    return math.prod(self.q_attn_dims)

  @property
  def S(self) -> int:
    return math.prod(self.kv_attn_dims)

  @property
  def is_identity(self) -> bool:
    """True for the common rank-3 case (no transpose, no reshape)."""
    return len(self.query_dims) == 2

  def _to_flat(self, x, L: int, trailing: int):
    """``(B, d_1, ..., *tail)`` -> ``(B*, L, *tail)``; tail has ``trailing``
    dims."""
    if self.is_identity:
      return x
    lead = len(self.query_dims)
    perm = self._perm + tuple(range(lead, lead + trailing))
    x = jnp.transpose(x, perm)  # (B, *other, *attn, *tail)
    return x.reshape((self.flat_batch, L) + x.shape[lead:])

  def queries(self, x):
    """Projected ``(B, d_1, ..., N, H)`` -> ``(B*, T, N, H)``."""
    return self._to_flat(x, self.T, 2)

  def keys(self, x):
    """Projected ``(B, e_1, ..., K, H)`` -> ``(B*, S, K, H)``."""
    return self._to_flat(x, self.S, 2)

  def query_positions(self, mask):
    """A query padding mask ``(B, d_1, ...)`` -> ``(B*, T)``."""
    return self._to_flat(mask, self.T, 0)

  def key_positions(self, mask):
    """A key padding mask ``(B, e_1, ...)`` -> ``(B*, S)``."""
    return self._to_flat(mask, self.S, 0)

  def context(self, x):
    """``(B*, T, N, Hv)`` -> ``(B, d_1, ..., N, Hv)`` (the inverse layout)."""
    if self.is_identity:
      return x
    x = x.reshape(self.batch_dims + self.q_attn_dims + x.shape[2:])
    lead = len(self.query_dims)
    inverse = [0] * lead
    for position, axis in enumerate(self._perm):
      inverse[axis] = position
    return jnp.transpose(x, tuple(inverse) + (lead, lead + 1))

  def scores(self, probs):
    """``(B*, N, T, S)`` -> Keras's ``(B, *other, N, *attn_T, *attn_S)``."""
    if self.is_identity:
      return probs
    N = probs.shape[1]
    return probs.reshape(self.batch_dims + (N,) + self.q_attn_dims
                         + self.kv_attn_dims)

  @property
  def scores_shape_without_heads(self) -> tuple:
    return self.batch_dims + self.q_attn_dims + self.kv_attn_dims
