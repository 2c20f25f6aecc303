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
function of the same arguments, built on :func:`attention` and
:func:`grads`: the reference's function and FlashAttention-2's backward over
blocks of keys, in loops JAX differentiates in both modes without the
``(B, N, T, S)`` scores. First derivatives keep the paths' speed and memory;
second ones hold one block of scores at a time.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim.
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

  Inside a ``lax.scan``, JAX's reverse mode partially evaluates the loop's
  body to hoist what does not change between steps, and that inlines a
  ``jax.custom_jvp`` function whose arguments vary, dropping its rule. So
  ``fast`` is itself a ``jax.custom_vjp`` function whose backward is
  ``differentiable``'s: a second reverse pass (``jax.grad`` of ``jax.grad``)
  still finds it there, but a forward one (``jax.jvp`` of ``jax.grad``)
  cannot differentiate it in a scan.

  >>> fast = lambda x: jnp.round(x * 8) / 8  # values without derivatives
  >>> f = differentiated_as(lambda x: x, fast)
  >>> x = jnp.float32(0.3)
  >>> float(f(x)), float(jax.grad(f)(x)), float(jax.grad(jax.grad(f))(x))
  (0.25, 1.0, 0.0)
  """
  values = jax.custom_vjp(fast)

  def values_fwd(*args):
    # Copies: residuals that are the arguments themselves are looked up by
    # position, and after the partial evaluation above the positions are
    # off by the constants it hoisted (JAX 0.10).
    return fast(*args), jax.tree.map(lambda x: jnp.array(x, copy=True), args)

  def values_bwd(args, cotangents):
    out, pullback = jax.vjp(differentiable, *args)
    return pullback(jax.tree.map(lambda c, x: c.astype(x.dtype), cotangents,
                                 out))

  values.defvjp(values_fwd, values_bwd)
  wrapped = jax.custom_jvp(values)

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
  keeps.

  >>> q = jnp.ones((1, 4, 2, 8))
  >>> prep = prepared(q, q, q, masks_lib.MaskSpec(), masks_lib.MaskData(),
  ...                 scale=0.5, dropout_rate=0.0, seeds=None)
  >>> prep.problem.T, prep.scale
  (4, 0.5)
  """
  return common.Prepared(problem=common.check_qkv(q, k, v), spec=spec,
                         data=data, scale=scale, dropout_rate=dropout_rate,
                         seeds=seeds if dropout_rate > 0.0 else None)


# Keys per step of the loops below. Reverse mode keeps each step's loop
# state: about ``(B, T, N, H + 2)`` floats per block.
KEY_BLOCK = 512


def _key_blocks(k, v, prep: common.Prepared, block_k: int):
  """``(bk, per_block)``: ``k``, ``v`` (float32), their first positions and
  the per-key mask data in blocks of ``bk`` keys, zero-padded to whole
  blocks, each led by the block axis: the ``xs`` of a ``lax.scan``."""
  S = prep.problem.S
  bk = min(block_k, S)
  nk = -(-S // bk)

  def blocks(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, nk * bk - S)
    x = jnp.pad(x, widths)
    x = x.reshape(x.shape[:axis] + (nk, bk) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  data = prep.data
  return bk, dict(
      k=blocks(k.astype(jnp.float32), 1), v=blocks(v.astype(jnp.float32), 1),
      start=jnp.arange(nk, dtype=jnp.int32) * bk,
      kv_segment_ids=(None if data.kv_segment_ids is None
                      else blocks(data.kv_segment_ids, 1)),
      mask=None if data.mask is None else blocks(data.mask, 3))


def _block_logits(q, xs, prep: common.Prepared, bk: int, q0: int):
  """The ``(B, N, T, bk)`` masked logits of prescaled, grouped ``q (B, T, K,
  G, H)``, the rows of :func:`_row_prep` from position ``q0``, against one
  key block of :func:`_key_blocks`, whether each entry is allowed, and its
  dropout keep mask (None without dropout)."""
  p_ = prep.problem
  B, N, T = p_.B, p_.N, p_.T
  start = xs["start"]
  logits = jnp.einsum("btkgh,bskh->bkgts", q, xs["k"],
                      precision=lax.Precision.HIGHEST).reshape(B, N, T, bk)
  data = prep.data
  block_data = dataclasses.replace(
      data, kv_segment_ids=xs["kv_segment_ids"], mask=xs["mask"],
      kv_lengths=(None if data.kv_lengths is None
                  else data.kv_lengths - start))
  allowed = masks_lib.dense_mask(prep.spec, block_data, B, N, T, bk, q0,
                                 start)
  allowed = allowed & (start + jnp.arange(bk) < p_.S)  # not padding
  keep = None
  if prep.dropout_rate > 0.0:
    keep = dropout_lib.keep_mask_block(prep.seeds, prep.dropout_rate, B, N,
                                       T, bk, q0, start)
  return jnp.where(allowed, logits, masks_lib.MASK_VALUE), allowed, keep


# Under a band (causal, window), the rows are cut into at most this many
# blocks, each visiting only the key blocks its band reaches.
_MAX_ROW_BLOCKS = 16


def _row_blocks(prep: common.Prepared, bk: int):
  """``[(q0, q1, lo, hi)]``: blocks of rows ``[q0, q1)``, each with the
  half-open range ``[lo, hi)`` of the key blocks of ``bk`` keys that its
  band may attend. One block of every row and key without a band."""
  T, S = prep.problem.T, prep.problem.S
  nk = -(-S // bk)
  if prep.spec.is_full:
    return [(0, T, 0, nk)]
  bq = max(bk, -(-T // _MAX_ROW_BLOCKS))
  blocks = []
  for q0 in range(0, T, bq):
    q1 = min(T, q0 + bq)
    lo, hi = prep.spec.kv_block_range(q0, q1, S, bk)
    # Rows whose band starts past the last key attend nothing: [nk, nk).
    lo, hi = min(lo, nk), min(hi, nk)
    blocks.append((q0, q1, lo, max(lo, hi)))
  return blocks


def _row_prep(prep: common.Prepared, q0: int, q1: int) -> common.Prepared:
  """``prep`` for rows ``[q0, q1)``: its size and per-row mask data cut to
  them (the dense mask is cut in the key blocks' ``xs``)."""
  if (q0, q1) == (0, prep.problem.T):
    return prep
  data = prep.data
  cut = lambda x: None if x is None else x[:, q0:q1]
  return dataclasses.replace(
      prep, problem=dataclasses.replace(prep.problem, T=q1 - q0),
      data=dataclasses.replace(
          data, q_segment_ids=cut(data.q_segment_ids), mask=None,
          q_lengths=(None if data.q_lengths is None
                     else data.q_lengths - q0)))


def _row_xs(per_block: dict, q0: int, q1: int, lo: int, hi: int) -> dict:
  """The key blocks ``[lo, hi)`` of :func:`_key_blocks`, their dense mask
  cut to rows ``[q0, q1)``."""
  xs = {name: None if x is None else x[lo:hi]
        for name, x in per_block.items()}
  if xs["mask"] is not None:  # (blocks, #B, #N, T, bk)
    xs["mask"] = xs["mask"][:, :, :, q0:q1]
  return xs


def _grouped(x, prep: common.Prepared):
  """``(B, T, N, X)`` -> ``(B, T, K, G, X)``, float32."""
  p_ = prep.problem
  return x.astype(jnp.float32).reshape(p_.B, p_.T, p_.K, p_.groups,
                                       x.shape[-1])


def attention(q, k, v, prep: common.Prepared, *, block_k: int = KEY_BLOCK):
  """:func:`reference.attention_core`'s ``(out, lse)``, computed over
  blocks of keys with an online softmax that JAX differentiates again.

  The loop is a ``lax.scan`` with a static trip count and a
  ``jax.checkpoint``-ed body, so every derivative of it, in either mode and
  of any order, holds ``(B, N, T, block_k)`` scores at a time rather than
  ``(B, N, T, S)``. Under a band (causal, window), the rows run in blocks
  (:func:`_row_blocks`), each its own loop over the key blocks its band
  reaches; the blocks per-example masks rule out are still computed, as a
  static trip count needs.

  Args:
    q: ``(B, T, N, H)``.
    k: ``(B, S, K, H)``.
    v: ``(B, S, K, Hv)``.
    prep: from :func:`pallas_kernels.common.prepare`.
    block_k: keys per step.

  Returns:
    ``(out (B, T, N, Hv) in q.dtype, lse (B, N, T) float32)``.

  >>> from pallas_kernels import reference
  >>> q = jax.random.normal(jax.random.key(0), (1, 40, 2, 8))
  >>> prep = common.prepare(q, q, q, causal=True)
  >>> out, lse = attention(q, q, q, prep, block_k=16)
  >>> ref, ref_lse = reference.attention_core(q, q, q, prep)
  >>> bool(jnp.allclose(out, ref, atol=1e-5))
  True
  """
  bk, per_block = _key_blocks(k, v, prep, block_k)
  grouped = _grouped(q, prep) * prep.scale
  # Typed like the inputs inside shard_map (the ring's blocks).
  anchor = common.anchor(grouped, per_block, prep.data, prep.seeds)
  outs, lses = zip(*(
      _attend_rows(grouped[:, q0:q1], _row_xs(per_block, q0, q1, lo, hi),
                   _row_prep(prep, q0, q1), bk, q0, anchor)
      for q0, q1, lo, hi in _row_blocks(prep, bk)))
  return (jnp.concatenate(outs, axis=1).astype(q.dtype),
          jnp.concatenate(lses, axis=2))


def _attend_rows(q, xs, prep: common.Prepared, bk: int, q0: int, anchor):
  """:func:`attention` of the grouped, prescaled rows ``q (B, T, K, G, H)``
  of :func:`_row_prep` against key blocks ``xs``: ``(out (B, T, N, Hv)
  float32, lse (B, N, T))``."""
  p_ = prep.problem
  B, T, N, K, G, Hv = p_.B, p_.T, p_.N, p_.K, p_.groups, p_.Hv

  @jax.checkpoint
  def step(carry, xs):
    m, l, acc = carry  # (B, N, T), (B, N, T), (B, T, N, Hv)
    logits, _, keep = _block_logits(q, xs, prep, bk, q0)
    # As in the reference, the running max only shifts the exponents.
    m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
    unnormalized = jnp.exp(logits - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(unnormalized, axis=-1)
    if keep is not None:
      unnormalized = jnp.where(keep, unnormalized, 0.0)
    pv = jnp.einsum("bkgts,bskh->btkgh",
                    unnormalized.reshape(B, K, G, T, bk), xs["v"],
                    precision=lax.Precision.HIGHEST).reshape(B, T, N, Hv)
    acc = acc * jnp.swapaxes(alpha, 1, 2)[..., None] + pv
    return (m_new, l, acc), None

  init = (common.fresh(anchor, (B, N, T), masks_lib.MASK_VALUE),
          common.fresh(anchor, (B, N, T)), common.fresh(anchor, (B, T, N, Hv)))
  (m, l, acc), _ = lax.scan(step, init, xs)
  nonempty = masks_lib.attended(m)
  lse = jnp.where(nonempty, m + jnp.log(l), masks_lib.EMPTY_ROW_LSE)
  norm = jnp.swapaxes(l * (1.0 - prep.dropout_rate), 1, 2)[..., None]
  out = jnp.where(jnp.swapaxes(nonempty, 1, 2)[..., None], acc / norm, 0.0)
  return out, lse


def grads(q, k, v, prep: common.Prepared, out, lse, d_out, d_lse, *,
          block_k: int = KEY_BLOCK):
  """``(dq, dk, dv)`` of :func:`attention` at ``q, k, v`` for the cotangents
  ``d_out`` and ``d_lse``, from its ``out`` and ``lse``.

  FlashAttention-2's backward over blocks of keys, in a loop like
  :func:`attention`'s. With ``Z`` the dropout mask scaled by ``1 / (1 -
  rate)``: ``P = exp(S - lse)``, ``dV = (P Z)^T dO``, ``dP = (dO V^T) Z``,
  ``dS = P (dP - D)`` with ``D = rowsum(dO O) - dlse``.

  Args:
    q, k, v, prep: as for :func:`attention`.
    out: ``(B, T, N, Hv)``; lse: ``(B, N, T)``: :func:`attention`'s.
    d_out: ``(B, T, N, Hv)``; d_lse: ``(B, N, T)``: their cotangents.
    block_k: keys per step.

  Returns:
    ``dq``, ``dk``, ``dv`` in the dtypes of ``q``, ``k``, ``v``.

  >>> q = jax.random.normal(jax.random.key(0), (1, 40, 2, 8))
  >>> prep = common.prepare(q, q, q, causal=True)
  >>> out, lse = attention(q, q, q, prep)
  >>> d_out, d_lse = jnp.cos(out), jnp.zeros_like(lse)
  >>> dq, dk, dv = grads(q, q, q, prep, out, lse, d_out, d_lse, block_k=16)
  >>> _, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, prep), q, q, q)
  >>> bool(jnp.allclose(dk, vjp((d_out, d_lse))[1], atol=1e-5))
  True
  """
  p_ = prep.problem
  B, S = p_.B, p_.S
  bk, per_block = _key_blocks(k, v, prep, block_k)
  qs = _grouped(q, prep) * prep.scale
  d_out_g = _grouped(d_out, prep)
  delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32),
                     out.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST) - d_lse  # (B, N, T)
  lse = lse.astype(jnp.float32)
  anchor = common.anchor(qs, per_block, prep.data, prep.seeds, d_out, lse)
  nk = per_block["k"].shape[0]
  dqs, dks, dvs = [], [], []
  for q0, q1, lo, hi in _row_blocks(prep, bk):
    dq_rows, (dk_rows, dv_rows) = _grad_rows(
        qs[:, q0:q1], d_out_g[:, q0:q1], delta[:, :, q0:q1],
        lse[:, :, q0:q1], _row_xs(per_block, q0, q1, lo, hi),
        _row_prep(prep, q0, q1), bk, q0, anchor)
    dqs.append(dq_rows)
    # (blocks, B, bk, K, X), placed at the key blocks the rows visit.
    widths = ((lo, nk - hi),) + ((0, 0),) * (dk_rows.ndim - 1)
    dks.append(jnp.pad(dk_rows, widths))
    dvs.append(jnp.pad(dv_rows, widths))
  dq, dk, dv = jnp.concatenate(dqs, axis=1), sum(dks), sum(dvs)
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(
      (B, -1) + x.shape[3:])[:, :S]
  return ((dq * prep.scale).reshape(q.shape).astype(q.dtype),
          unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype))


def _grad_rows(qs, d_out_g, delta, lse, xs, prep: common.Prepared, bk: int,
               q0: int, anchor):
  """:func:`grads` of the grouped rows of :func:`_row_prep` (``qs``
  prescaled, ``d_out_g``; ``delta``, ``lse (B, N, T)``) against key blocks
  ``xs``: ``(dq (B, T, K, G, H) unscaled, (dk, dv) per key block)``."""
  p_ = prep.problem
  B, T, K, G = p_.B, p_.T, p_.K, p_.groups
  lse = lse[..., None]

  @jax.checkpoint
  def step(dq, xs):
    logits, allowed, keep = _block_logits(qs, xs, prep, bk, q0)
    # Empty rows' lse equals the masked logits: `allowed` zeroes them.
    p = jnp.where(allowed, jnp.exp(logits - lse), 0.0)  # (B, N, T, bk)
    d_p = jnp.einsum("btkgh,bskh->bkgts", d_out_g, xs["v"],
                     precision=lax.Precision.HIGHEST).reshape(p.shape)
    p_kept = p
    if keep is not None:
      z = 1.0 / (1.0 - prep.dropout_rate)
      p_kept = jnp.where(keep, p * z, 0.0)
      d_p = jnp.where(keep, d_p * z, 0.0)
    d_s = (p * (d_p - delta[..., None])).reshape(B, K, G, T, bk)
    dv = jnp.einsum("bkgts,btkgh->bskh", p_kept.reshape(B, K, G, T, bk),
                    d_out_g, precision=lax.Precision.HIGHEST)
    dk = jnp.einsum("bkgts,btkgh->bskh", d_s, qs,
                    precision=lax.Precision.HIGHEST)
    dq = dq + jnp.einsum("bkgts,bskh->btkgh", d_s, xs["k"],
                         precision=lax.Precision.HIGHEST)
    return dq, (dk, dv)

  return lax.scan(step, common.fresh(anchor, qs.shape), xs)
