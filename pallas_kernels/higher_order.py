"""Second and higher derivatives through the paths' ``jax.custom_vjp`` rules.

The blockwise path and the flash kernels are ``jax.custom_vjp`` functions.
Their forward and backward rules run Pallas kernels, or loops whose bounds
are traced (blocks that masks rule out are skipped): JAX runs those, but
cannot differentiate them in reverse mode, and not kernels at all. A second
derivative differentiates the rules themselves: ``jax.grad`` of
``jax.grad`` (gradient penalties, MAML), ``jax.hessian``, ``jax.jvp`` of
``jax.grad``.

:func:`differentiated_as` wraps a rule so that it still runs its own code
for its values, while every derivative of it is that of a differentiable
function of the same arguments, built on :func:`attention`: the
reference's function over blocks of keys, in a loop JAX differentiates in
both modes without the ``(B, N, T, S)`` scores. First derivatives keep the
paths' speed and memory; second ones hold one block of scores at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common
from pallas_kernels import dropout as dropout_lib
from pallas_kernels import masks as masks_lib


def differentiated_as(differentiable: Callable, fast: Callable) -> Callable:
  """``fast``, whose derivatives of every order and mode are
  ``differentiable``'s.

  Args:
    differentiable: a function of the same arguments that JAX
      differentiates, computing the same values (up to rounding) in the same
      tree of outputs.
    fast: the function that computes the values.

  Returns:
    A ``jax.custom_jvp`` function of ``fast``'s arguments (arrays or pytrees
    of them; integer and boolean leaves get no tangent). Its tangents are
    cast to the dtypes of ``fast``'s outputs.
  """
  wrapped = jax.custom_jvp(fast)

  @wrapped.defjvp
  def jvp(primals, tangents):
    # The values come from `wrapped` itself, so that a third derivative
    # finds the same rule again.
    out = wrapped(*primals)
    _, out_dot = jax.jvp(differentiable, primals, tangents)
    return out, jax.tree.map(lambda t, x: t.astype(x.dtype), out_dot, out)

  return wrapped


def prepared(q, k, v, spec: masks_lib.MaskSpec, data: masks_lib.MaskData,
             scale: float, dropout_rate: float,
             seeds: Optional[jax.Array]) -> common.Prepared:
  """The :class:`~pallas_kernels.common.Prepared` of a call on ``q (B, T, N,
  H)``, ``k (B, S, K, H)`` and ``v (B, S, K, Hv)``, from the parts a path
  keeps."""
  return common.Prepared(problem=common.check_qkv(q, k, v), spec=spec,
                         data=data, scale=scale, dropout_rate=dropout_rate,
                         seeds=seeds if dropout_rate > 0.0 else None)


def grads(q, k, v, prep: common.Prepared, d_out, d_lse):
  """``(dq, dk, dv)`` of :func:`attention` at ``q, k, v`` for the cotangents
  ``d_out (B, T, N, Hv)`` and ``d_lse (B, N, T)``."""
  (out, lse), vjp = jax.vjp(lambda q, k, v: attention(q, k, v, prep), q, k,
                            v)
  return vjp((jnp.asarray(d_out, out.dtype), jnp.asarray(d_lse, lse.dtype)))


# Keys per step of `attention`'s loop. Reverse mode keeps each step's loop
# state: ``(B, T, N, Hv + 2)`` floats per block.
KEY_BLOCK = 512


def attention(q, k, v, prep: common.Prepared, *, block_k: int = KEY_BLOCK):
  """:func:`reference.attention_core`'s ``(out, lse)``, computed over
  blocks of keys with an online softmax that JAX differentiates again.

  The loop is a ``lax.scan`` with a static trip count (no block is
  skipped) and a ``jax.checkpoint``-ed body, so every derivative of it, in
  either mode and of any order, holds ``(B, N, T, block_k)`` scores at a
  time rather than ``(B, N, T, S)``.

  Args:
    q: ``(B, T, N, H)``.
    k: ``(B, S, K, H)``.
    v: ``(B, S, K, Hv)``.
    prep: from :func:`pallas_kernels.common.prepare`.
    block_k: keys per step.

  Returns:
    ``(out (B, T, N, Hv) in q.dtype, lse (B, N, T) float32)``.
  """
  p_ = prep.problem
  B, T, S, N, K, G, H, Hv = (p_.B, p_.T, p_.S, p_.N, p_.K, p_.groups, p_.H,
                             p_.Hv)
  bk = min(block_k, S)
  nk = -(-S // bk)
  f32 = jnp.float32

  def blocks(x, axis):
    """Splits axis ``axis`` (length S) into ``nk`` blocks, zero-padded, led
    by the block axis."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, nk * bk - S)
    x = jnp.pad(x, widths)
    x = x.reshape(x.shape[:axis] + (nk, bk) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  out_dtype, data = q.dtype, prep.data
  per_block = dict(
      k=blocks(k.astype(f32), 1), v=blocks(v.astype(f32), 1),
      start=jnp.arange(nk, dtype=jnp.int32) * bk,
      kv_segment_ids=(None if data.kv_segment_ids is None
                      else blocks(data.kv_segment_ids, 1)),
      mask=None if data.mask is None else blocks(data.mask, 3))
  q = q.astype(f32) * prep.scale
  q = q.reshape(B, T, K, G, H)

  @jax.checkpoint
  def step(carry, xs):
    m, l, acc = carry  # (B, N, T), (B, N, T), (B, T, N, Hv)
    start = xs["start"]
    logits = jnp.einsum("btkgh,bskh->bkgts", q, xs["k"],
                        precision=lax.Precision.HIGHEST)
    logits = logits.reshape(B, N, T, bk)
    block_data = dataclasses.replace(
        data, kv_segment_ids=xs["kv_segment_ids"], mask=xs["mask"],
        kv_lengths=(None if data.kv_lengths is None
                    else data.kv_lengths - start))
    allowed = masks_lib.dense_mask(prep.spec, block_data, B, N, T, bk, 0,
                                   start)
    allowed = allowed & (start + jnp.arange(bk) < S)  # not padding
    logits = jnp.where(allowed, logits, masks_lib.MASK_VALUE)
    # As in the reference, the running max only shifts the exponents.
    m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
    unnormalized = jnp.exp(logits - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(unnormalized, axis=-1)
    if prep.dropout_rate > 0.0:
      keep = dropout_lib.keep_mask_block(prep.seeds, prep.dropout_rate, B, N,
                                         T, bk, 0, start)
      unnormalized = jnp.where(keep, unnormalized, 0.0)
    pv = jnp.einsum("bkgts,bskh->btkgh",
                    unnormalized.reshape(B, K, G, T, bk), xs["v"],
                    precision=lax.Precision.HIGHEST).reshape(B, T, N, Hv)
    acc = acc * jnp.swapaxes(alpha, 1, 2)[..., None] + pv
    return (m_new, l, acc), None

  # Typed like the inputs inside shard_map (the ring's blocks).
  anchor = common.anchor(q, per_block, data, prep.seeds)
  init = (common.fresh(anchor, (B, N, T), masks_lib.MASK_VALUE),
          common.fresh(anchor, (B, N, T)), common.fresh(anchor, (B, T, N, Hv)))
  (m, l, acc), _ = lax.scan(step, init, per_block)
  nonempty = masks_lib.attended(m)
  lse = jnp.where(nonempty, m + jnp.log(l), masks_lib.EMPTY_ROW_LSE)
  norm = jnp.swapaxes(l * (1.0 - prep.dropout_rate), 1, 2)[..., None]
  out = jnp.where(jnp.swapaxes(nonempty, 1, 2)[..., None], acc / norm, 0.0)
  return out.astype(out_dtype), lse
