"""The conformance suite every attention path passes.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim.

:class:`AttentionConformance` is a base class of tests; each path subclasses
it (``class TestGpuInterpret(AttentionConformance)``), overrides
:meth:`AttentionConformance.attention` and may narrow ``CASES`` and
``GRAD_CASES`` to keep interpret mode within the CI budget. The hook in
``tests/conftest.py`` parametrizes ``case`` and ``grad_case`` from the
subclass's lists. Every test compares against
:func:`pallas_kernels.reference.attention` on random inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from benchmarks.shapes import CONFORMANCE, AttentionShape
from pallas_kernels import masks as masks_lib
from pallas_kernels import reference
from tests.tolerances import FORWARD, GRAD, assert_close

MASK_KINDS = ("none", "causal", "window", "window_lr", "causal_window",
              "segments", "kv_lengths", "q_lengths", "dense", "all")


@dataclasses.dataclass(frozen=True)
class Case:
  shape: AttentionShape
  mask: str = "none"
  dtype: str = "float32"
  dropout: float = 0.0

  @property
  def id(self) -> str:
    s = self.shape
    return (f"T={s.T}_S={s.S}_N={s.N}_K={s.K}_H={s.H}_Hv={s.value_head_dim}"
            f"_{self.mask}_{self.dtype}" + (f"_p={self.dropout}"
                                            if self.dropout else ""))


def product_cases(shapes=CONFORMANCE, masks=MASK_KINDS, dtypes=("float32",),
                  dropouts=(0.0,)) -> tuple[Case, ...]:
  """Every combination of the given axes."""
  return tuple(Case(s, m, d, p) for s, m, d, p in
               itertools.product(shapes, masks, dtypes, dropouts))


def diagonal_cases(shapes=CONFORMANCE, masks=MASK_KINDS, dtypes=("float32",),
                   dropouts=(0.0,)) -> tuple[Case, ...]:
  """Each mask kind once, cycling through shapes, dtypes and dropout.

  Covers every value of every axis with ``max(len(axis))`` cases instead of
  their product: the budget-friendly choice for interpret mode.
  """
  n = max(len(shapes), len(masks), len(dtypes), len(dropouts))
  return tuple(
      Case(shapes[i % len(shapes)], masks[i % len(masks)],
           dtypes[i % len(dtypes)], dropouts[i % len(dropouts)])
      for i in range(n))


def make_inputs(case: Case, seed: int = 0):
  """Random ``q, k, v`` and the mask keyword arguments for ``case``."""
  s = case.shape
  rng_q, rng_k, rng_v, rng_m, rng_d = jax.random.split(jax.random.key(seed), 5)
  dtype = jnp.dtype(case.dtype)
  q = jax.random.normal(rng_q, (s.B, s.T, s.N, s.H), jnp.float32).astype(dtype)
  k = jax.random.normal(rng_k, (s.B, s.S, s.K, s.H), jnp.float32).astype(dtype)
  v = jax.random.normal(rng_v, (s.B, s.S, s.K, s.value_head_dim),
                        jnp.float32).astype(dtype)
  kw: dict[str, Any] = {}
  mask_rngs = jax.random.split(rng_m, 4)
  kinds = ({"causal", "segments", "kv_lengths", "dense"} if case.mask == "all"
           else {case.mask})
  if "causal" in kinds or case.mask == "causal_window":
    kw["causal"] = True
  if case.mask in ("window", "causal_window"):
    kw["sliding_window"] = 5
  if case.mask == "window_lr":
    kw["sliding_window"] = (3, 1)
  if "segments" in kinds:
    # Sorted ids (packed documents), different boundaries for q and kv.
    q_ids = jnp.sort(jax.random.randint(mask_rngs[0], (s.B, s.T), 0, 3),
                     axis=-1)
    kv_ids = jnp.sort(jax.random.randint(mask_rngs[1], (s.B, s.S), 0, 3),
                      axis=-1)
    kw["segment_ids"] = q_ids if (s.T == s.S and case.mask == "segments") \
        else (q_ids, kv_ids)
  if "kv_lengths" in kinds:
    # Example 0 has no keys at all: every one of its rows is empty.
    lengths = jax.random.randint(mask_rngs[2], (s.B,), 1, s.S + 1)
    kw["kv_lengths"] = lengths.at[0].set(0) if s.B > 1 else lengths
  if "q_lengths" in kinds:
    kw["q_lengths"] = jax.random.randint(mask_rngs[2], (s.B,), 0, s.T + 1)
  if "dense" in kinds:
    dense = jax.random.bernoulli(mask_rngs[3], 0.7, (s.B, 1, s.T, s.S))
    dense = dense.at[:, :, s.T // 2, :].set(False)  # a fully masked row
    kw["mask"] = dense
  if case.dropout:
    kw["dropout_rate"] = case.dropout
    kw["dropout_rng"] = rng_d
  return q, k, v, kw


@functools.partial(jax.jit, static_argnames=(
    "causal", "sliding_window", "scale", "dropout_rate", "return_lse"))
def _jitted_reference(q, k, v, **kw):
  return reference.attention(q, k, v, **kw)


def reference_attention(q, k, v, **kw):
  """The reference on the same (possibly low-precision) inputs, in fp32.

  Jitted: one compilation per call signature costs about half the CPU time
  of op-by-op dispatch.
  """
  f32 = lambda x: x.astype(jnp.float32)
  if isinstance(kw.get("sliding_window"), list):  # static args must hash
    kw["sliding_window"] = tuple(kw["sliding_window"])
  return _jitted_reference(f32(q), f32(k), f32(v), **kw)


def jitted_grad(loss):
  """``loss``'s gradients in q, k and v, under one jit: op-by-op dispatch
  of a backward pass costs several times its compilation."""
  return jax.jit(jax.grad(loss, (0, 1, 2)))


def smooth_loss(out, lse=None):
  """``sum(sin(out)) + sum(cos(lse))``, with nonzero second derivatives;
  the LSE of rows that attend nothing (a huge constant) is left out."""
  loss = jnp.sum(jnp.sin(out))
  if lse is not None:
    lse = jnp.where(lse > masks_lib.EMPTY_ROW_LSE / 2, lse, 0.0)
    loss = loss + jnp.sum(jnp.cos(lse))
  return loss


def in_scan(attention):
  """``attention(q, k, v) -> (out, lse)`` as two layers of a ``lax.scan``
  (as Flax's ``nn.scan`` runs a stack of layers), ``-> (out, lse)`` of the
  second. Each layer scales its queries by its own weight and adds the mean
  of its output to them, so every layer's inputs depend on the loop's
  carry and inputs."""
  def layers(q, k, v):
    def layer(q, weight):
      out, lse = attention(q * weight, k, v)
      return q + jnp.mean(out, axis=-1, keepdims=True), (out, lse)
    _, (out, lse) = lax.scan(layer, q, jnp.array([1.0, 0.5]))
    return out[-1], None if lse is None else lse[-1]
  return layers


def second_derivatives(attention, q, k, v, tangents=None):
  """``{kind: (d/dq, d/dk, d/dv)}``, each under one jit.

  With ``grad`` the gradient in ``q, k, v`` of :func:`smooth_loss` of
  ``attention(q, k, v) -> (out, lse)`` (``lse`` may be None): ``"grad of
  grad"``, the gradient of the penalty ``sum(grad**2)``, and with
  ``tangents``, ``"jvp of grad"``, the Hessian-vector product.
  """
  grad = jax.grad(lambda q, k, v: smooth_loss(*attention(q, k, v)),
                  (0, 1, 2))
  penalty = lambda q, k, v: sum(jnp.sum(g**2) for g in grad(q, k, v))
  kinds = {"grad of grad": jax.jit(jax.grad(penalty, (0, 1, 2)))(q, k, v)}
  if tangents is not None:
    kinds["jvp of grad"] = jax.jit(
        lambda q, k, v: jax.jvp(grad, (q, k, v), tangents)[1])(q, k, v)
  return kinds


def assert_second_derivatives_close(got, want, dtype="float32", where=""):
  """:func:`second_derivatives`' results ``got`` are finite and equal
  ``want``'s within the gradient tolerance for ``dtype``; ``where`` ends
  the kind's name in messages."""
  assert got.keys() == want.keys()
  for kind in got:
    for name, x, y in zip(("q", "k", "v"), got[kind], want[kind]):
      assert bool(jnp.all(jnp.isfinite(x))), (kind + where, name)
      assert_close(x, y, GRAD, dtype, f"{kind}{where}, d{name}")


class AttentionConformance:
  """Tests that a path computes the reference's function. Subclass me."""

  CASES: tuple[Case, ...] = product_cases()
  GRAD_CASES: tuple[Case, ...] = diagonal_cases(
      dtypes=("float32", "bfloat16"), dropouts=(0.0, 0.25))
  DROPOUT_CASES: tuple[Case, ...] = diagonal_cases(
      masks=("none", "causal", "all"), dropouts=(0.3,))
  # test_second_derivatives's shape (the paths run their kernels for the
  # values; the reference gives the derivatives).
  SECOND_ORDER_SHAPE = AttentionShape(B=2, T=21, S=35, N=4, K=2, H=16, Hv=8)
  # Whether the path returns a usable, differentiable LSE.
  SUPPORTS_LSE = True

  def attention(self, q, k, v, **kw):
    """The path under test, with ``reference.attention``'s keywords."""
    raise NotImplementedError

  def unsupported_calls(self) -> list[tuple[str, Any]]:
    """``(description, thunk)`` pairs that must raise NotImplementedError."""
    return []

  # -- forward ---------------------------------------------------------------

  def test_forward(self, case: Case):
    q, k, v, kw = make_inputs(case)
    if self.SUPPORTS_LSE:
      out, lse = self.attention(q, k, v, return_lse=True, **kw)
      ref_out, ref_lse = reference_attention(q, k, v, return_lse=True, **kw)
      assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
      assert_close(lse, ref_lse, FORWARD, case.dtype, "lse")
    else:
      out = self.attention(q, k, v, **kw)
      ref_out = reference_attention(q, k, v, **kw)
    assert out.shape == ref_out.shape, (out.shape, ref_out.shape)
    assert out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert_close(out, ref_out, FORWARD, case.dtype, "out")

  def test_dropout_matches_reference_bits(self, dropout_case: Case):
    q, k, v, kw = make_inputs(dropout_case, seed=1)
    out = self.attention(q, k, v, **kw)
    assert_close(out, reference_attention(q, k, v, **kw), FORWARD,
                 dropout_case.dtype)
    # Another key drops other entries.
    kw2 = dict(kw, dropout_rng=jax.random.key(1234))
    assert not np.allclose(out, self.attention(q, k, v, **kw2))

  # -- backward --------------------------------------------------------------

  def test_gradients(self, grad_case: Case):
    q, k, v, kw = make_inputs(grad_case, seed=2)
    s = grad_case.shape
    rng_o, rng_l = jax.random.split(jax.random.key(7))
    d_out = jax.random.normal(rng_o, (s.B, s.T, s.N, s.value_head_dim))
    d_lse = jax.random.normal(rng_l, (s.B, s.N, s.T))

    def loss(fn, q, k, v):
      if self.SUPPORTS_LSE:
        out, lse = fn(q, k, v, return_lse=True, **kw)
        # Empty rows have a constant LSE; weight only real rows' LSE.
        lse_term = jnp.sum(jnp.where(lse > masks_lib.EMPTY_ROW_LSE / 2,
                                     lse, 0.0) * d_lse)
      else:
        out, lse_term = fn(q, k, v, **kw), 0.0
      return jnp.sum(out.astype(jnp.float32) * d_out) + lse_term

    grads = jitted_grad(functools.partial(loss, self.attention))(q, k, v)
    ref = jitted_grad(functools.partial(loss, reference_attention))(q, k, v)
    for name, g, r, x in zip(("dq", "dk", "dv"), grads, ref, (q, k, v)):
      assert g.shape == x.shape and g.dtype == x.dtype, name
      assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))), name
      assert_close(g, r, GRAD, grad_case.dtype, name)

  def test_mixed_input_dtypes_run_in_their_common_dtype(self):
    shape = AttentionShape(B=1, T=21, S=35, N=4, K=2, H=16)
    q, k, v, _ = make_inputs(Case(shape), seed=3)
    k, v = k.astype(jnp.bfloat16), v.astype(jnp.float16)  # q stays fp32
    loss = lambda fn, q, k, v: jnp.sum(fn(q, k, v, causal=True) ** 2)
    out = self.attention(q, k, v, causal=True)
    assert out.dtype == q.dtype
    assert_close(out, reference_attention(q, k, v, causal=True), FORWARD)
    grads = jitted_grad(functools.partial(loss, self.attention))(q, k, v)
    ref = jitted_grad(functools.partial(loss, reference_attention))(q, k, v)
    for name, g, r, x in zip(("dq", "dk", "dv"), grads, ref, (q, k, v)):
      assert g.dtype == x.dtype, name
      # dk and dv are rounded to their inputs' dtypes.
      assert_close(g, r, GRAD, "float32" if name == "dq" else str(x.dtype),
                   name)

  def test_second_derivatives(self):
    """``jax.grad`` of ``jax.grad`` (a gradient penalty) and ``jax.jvp`` of
    ``jax.grad`` (a Hessian-vector product) equal the reference's, with
    every mask kind, empty rows, dropout and GQA."""
    q, k, v, kw = make_inputs(
        Case(self.SECOND_ORDER_SHAPE, "all", dropout=0.25), seed=4)
    tangents = tuple(jax.random.normal(key, x.shape) for key, x in
                     zip(jax.random.split(jax.random.key(8), 3), (q, k, v)))

    assert_second_derivatives_close(
        second_derivatives(self._out_and_lse(self.attention, kw), q, k, v,
                           tangents),
        second_derivatives(self._out_and_lse(reference_attention, kw), q, k,
                           v, tangents))

  def test_second_derivatives_inside_scan(self):
    """``jax.grad`` of ``jax.grad`` with the attention in a ``lax.scan``
    over layers (Flax's ``nn.scan``).

    There, ``jax.jvp`` of ``jax.grad`` fails on the ``jax.custom_vjp``
    paths (``pallas_kernels.higher_order.differentiated_as``)."""
    q, k, v, kw = make_inputs(
        Case(self.SECOND_ORDER_SHAPE, "all", dropout=0.25), seed=5)

    assert_second_derivatives_close(
        second_derivatives(in_scan(self._out_and_lse(self.attention, kw)),
                           q, k, v),
        second_derivatives(in_scan(self._out_and_lse(reference_attention,
                                                     kw)), q, k, v))

  def _out_and_lse(self, attention, kw):
    """``attention`` with ``kw`` as ``(q, k, v) -> (out, lse)``; ``lse`` is
    None where the path returns none."""
    if self.SUPPORTS_LSE:
      return lambda q, k, v: attention(q, k, v, return_lse=True, **kw)
    return lambda q, k, v: (attention(q, k, v, **kw), None)

  # -- the empty-row rule ----------------------------------------------------

  def test_fully_masked_rows(self):
    shape = AttentionShape(B=2, T=9, S=20, N=2, K=1, H=32)
    q, k, v, _ = make_inputs(Case(shape))
    kv_lengths = jnp.array([0, 20])
    mask = jnp.ones((2, 1, 9, 20), bool).at[1, :, 3, :].set(False)
    kw = dict(kv_lengths=kv_lengths, mask=mask)
    if self.SUPPORTS_LSE:
      out, lse = self.attention(q, k, v, return_lse=True, **kw)
      np.testing.assert_array_equal(lse[0], masks_lib.EMPTY_ROW_LSE)
      np.testing.assert_array_equal(lse[1, :, 3], masks_lib.EMPTY_ROW_LSE)
    else:
      out = self.attention(q, k, v, **kw)
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1, 3], 0.0)
    grads = jitted_grad(
        lambda q, k, v: jnp.sum(self.attention(q, k, v, **kw)))(q, k, v)
    for g in grads:
      assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_array_equal(grads[0][0], 0.0)  # dq of empty rows
    np.testing.assert_array_equal(grads[0][1, 3], 0.0)

  def test_nan_in_an_attended_key_reaches_only_its_rows(self):
    """A NaN key is bad input: the rows that attend it are NaN (as in
    Keras), never mistaken for empty rows and zeroed; rows it is masked
    from (causal) are untouched."""
    shape = AttentionShape(B=2, T=9, S=9, N=2, K=1, H=32)
    q, k, v, _ = make_inputs(Case(shape))
    bad = k.at[0, 5].set(jnp.nan)
    out = self.attention(q, bad, v, causal=True)
    assert bool(jnp.all(jnp.isnan(out[0, 5:])))
    clean = reference_attention(q, k, v, causal=True)
    assert_close(out[0, :5], clean[0, :5], FORWARD)
    assert_close(out[1], clean[1], FORWARD)

  # -- determinism and transforms ---------------------------------------------

  def test_deterministic_on_rerun(self):
    case = Case(CONFORMANCE[1], "all", dropout=0.2)
    q, k, v, kw = make_inputs(case)
    first = self.attention(q, k, v, **kw)
    second = self.attention(q, k, v, **kw)
    np.testing.assert_array_equal(first, second)

  def test_jit_and_vmap(self):
    shape = AttentionShape(B=1, T=16, S=24, N=2, K=2, H=32)
    q, k, v, _ = make_inputs(Case(shape))
    stack = lambda x: jnp.stack([x, 0.5 * x, -x])  # (3, B, ...)
    fn = jax.jit(jax.vmap(lambda q, k, v: self.attention(q, k, v,
                                                         causal=True)))
    out = fn(stack(q), stack(k), stack(v))
    ref = jax.vmap(lambda q, k, v: reference_attention(q, k, v, causal=True))(
        stack(q), stack(k), stack(v))
    assert_close(out, ref, FORWARD)

  def test_unsupported_calls_raise(self):
    for description, thunk in self.unsupported_calls():
      with pytest.raises(NotImplementedError):
        thunk()
      del description
