"""The pure-JAX specification of attention that every path is tested against.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads (``N % K == 0``; query head ``n`` reads key/value head
``n // (N // K)``), H head dim, Hv value head dim.

It materialises the ``(B, N, T, S)`` scores, computes in fp32 whatever the
input dtype, and defines:

* the mask: every source ANDed (see :mod:`pallas_kernels.masks`);
* the empty-row rule: a query row that may attend to no key gets a zero
  output, ``lse == EMPTY_ROW_LSE`` and zero gradients, never NaN;
* dropout: the counter-based bits of :mod:`pallas_kernels.dropout`, applied
  to the normalised probabilities and rescaled by ``1 / (1 - rate)``;
* ``lse``: the natural-log log-sum-exp of the scaled, masked logits per row,
  ``(B, N, T)`` float32, differentiable.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common
from pallas_kernels import dropout as dropout_lib
from pallas_kernels import masks as masks_lib


def attention_core(q, k, v, prep: common.Prepared, *, q_offset=0,
                   kv_offset=0, precision=lax.Precision.HIGHEST,
                   return_probs: bool = False):
  """Attention on prepared arguments; the body of :func:`attention`.

  Args:
    q: ``(B, T, N, H)``.
    k: ``(B, S, K, H)``.
    v: ``(B, S, K, Hv)``.
    prep: from :func:`pallas_kernels.common.prepare`.
    q_offset, kv_offset: absolute position of ``q[:, 0]`` and ``k[:, 0]``,
      for the band mask and the dropout bits (blocks of a longer sequence).
    precision: matmul precision of the two einsums.
    return_probs: also return the ``(B, N, T, S)`` probabilities (post
      softmax, pre dropout).

  Returns:
    ``(out (B, T, N, Hv) in q.dtype, lse (B, N, T) float32[, probs])``.
  """
  p_ = prep.problem
  B, T, N, K, G = p_.B, p_.T, p_.N, p_.K, p_.groups
  # Scaling the (T, H) queries is cheaper than scaling the (T, S) logits.
  qf = q.astype(jnp.float32) * prep.scale
  if G == 1:
    # The plain MHA einsum lets XLA produce the scores in their final layout
    # (a grouped one makes CPU XLA transpose the whole (T, S) array).
    logits = jnp.einsum("btnh,bsnh->bnts", qf, k.astype(jnp.float32),
                        precision=precision)
  else:
    logits = jnp.einsum("btkgh,bskh->bkgts",
                        qf.reshape(B, T, K, G, p_.H), k.astype(jnp.float32),
                        precision=precision)
  logits = logits.reshape(B, N, T, p_.S)  # (B, N, T, S)
  allowed = masks_lib.dense_mask(prep.spec, prep.data, B, N, T, p_.S,
                                 q_offset, kv_offset)  # (#B, #N, T, S)
  logits = jnp.where(allowed, logits, masks_lib.MASK_VALUE)
  # The max only shifts the exponent (the result does not depend on it), so
  # it gets no gradient: differentiating it would cost passes over (T, S).
  m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # (B,N,T,1)
  # A masked entry of a row with any allowed one underflows to exactly 0.
  # In a fully masked row every logit equals MASK_VALUE (so does its max),
  # and the weights come out uniform; such rows are zeroed in the output,
  # which costs one pass over (T, Hv) instead of (T, S).
  unnormalized = jnp.exp(logits - m)
  l = jnp.sum(unnormalized, axis=-1, keepdims=True)  # (B, N, T, 1), >= 1
  nonempty = masks_lib.attended(m)  # (B, N, T, 1)
  lse = jnp.where(nonempty, m + jnp.log(l), masks_lib.EMPTY_ROW_LSE)
  lse = lse[..., 0]  # (B, N, T)
  weights = unnormalized
  if prep.dropout_rate > 0.0:
    keep = dropout_lib.keep_mask_block(prep.seeds, prep.dropout_rate, B, N, T,
                                       p_.S, q_offset, kv_offset)
    weights = jnp.where(keep, unnormalized, 0.0)
  # The rows are normalised after the product, over (T, Hv) instead of
  # (T, S): fewer divisions, and XLA:CPU no longer fuses the softmax and
  # both products into one YNNPACK call, which is slow: the core's forward
  # took 0.68-0.75 of the time at B=64, T=128 and B=256, T=64 this way.
  # The product stays in the scores' (B, N, T) order until the rows are
  # normalised; produced as (B, T, N), it made XLA:CPU transpose the output
  # projection's kernel on every call.
  if G == 1:
    out = jnp.einsum("bnts,bsnh->bnth", weights, v.astype(jnp.float32),
                     precision=precision)
  else:
    out = jnp.einsum("bkgts,bskh->bkgth", weights.reshape(B, K, G, T, p_.S),
                     v.astype(jnp.float32), precision=precision)
  out = out.reshape(B, N, T, p_.Hv) / (l * (1.0 - prep.dropout_rate))
  may_be_empty = not (prep.data.is_empty and prep.spec.every_row_attends(
      T, p_.S, q_offset, kv_offset))
  if may_be_empty:
    # `where`, not a product with 0: an empty row's product with v may hold
    # NaN (garbage in masked keys' values).
    out = jnp.where(nonempty, out, 0.0)
  out = jnp.swapaxes(out, 1, 2).astype(q.dtype)  # (B, T, N, Hv)
  if return_probs:
    probs = unnormalized / l
    return out, lse, jnp.where(nonempty, probs, 0.0) if may_be_empty else probs
  return out, lse


def attention(q, k, v, *, causal: bool = False, segment_ids=None,
              kv_lengths=None, q_lengths=None, sliding_window=None,
              mask=None, scale: Optional[float] = None,
              dropout_rate: float = 0.0, dropout_rng=None,
              return_lse: bool = False):
  """Reference attention with the mask, scale, dropout and ``return_lse``
  arguments of ``flash_attention`` (none of its block, backend or
  interpret ones).

  Args:
    q: ``(B, T, N, H)`` queries.
    k: ``(B, S, K, H)`` keys, ``N % K == 0``.
    v: ``(B, S, K, Hv)`` values.
    causal: keys at or before the query's position only (``j <= i``,
      top-left aligned when ``T != S``, as Keras).
    segment_ids: ``(B, T)`` (self-attention) or a pair ``(q_ids (B, T),
      kv_ids (B, S))``; queries attend keys of their own segment only.
    kv_lengths: ``(B,)``; keys ``j >= kv_lengths[b]`` are padding.
    q_lengths: ``(B,)``; query rows ``i >= q_lengths[b]`` attend nothing.
    sliding_window: ``w`` for Keras's band ``|i - j| < w``, or a pair
      ``(left, right)`` for ``i - left <= j <= i + right``.
    mask: ``(#B, #N, T, S)`` boolean, True = may attend.
    scale: logit scale; default ``1 / sqrt(H)``.
    dropout_rate: probability of dropping an attention probability.
    dropout_rng: PRNG key, required when ``dropout_rate > 0``.
    return_lse: also return the ``(B, N, T)`` float32 log-sum-exp.

  Returns:
    ``out (B, T, N, Hv)`` in ``q.dtype``, or ``(out, lse)``.

  Raises:
    ValueError, TypeError: bad shapes, dtypes or values, naming the argument.

  >>> q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
  >>> out, lse = attention(q, q, q, causal=True, return_lse=True)
  >>> out.shape, lse.shape
  ((1, 4, 2, 8), (1, 2, 4))
  """
  prep = common.prepare(q, k, v, causal=causal, segment_ids=segment_ids,
                        kv_lengths=kv_lengths, q_lengths=q_lengths,
                        sliding_window=sliding_window, mask=mask, scale=scale,
                        dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  out, lse = attention_core(q, k, v, prep)
  return (out, lse) if return_lse else out
