"""``pallas_kernels.higher_order``: the function whose derivatives the
paths' rules take, against the reference.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim.

Every path's second derivatives are checked against the reference by the
conformance suite (``test_second_derivatives``); here, the loop over key
blocks itself, and that its derivatives stay memory-linear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from benchmarks.shapes import AttentionShape
from pallas_kernels import common
from pallas_kernels import higher_order
from pallas_kernels import reference
from tests.conformance import Case, assert_second_derivatives_close
from tests.conformance import make_inputs, second_derivatives, smooth_loss
from tests.tolerances import FORWARD, GRAD, assert_close


@pytest.mark.parametrize("mask,dropout", [
    ("all", 0.25), ("window_lr", 0.0), ("q_lengths", 0.25), ("none", 0.0),
    ("causal", 0.25), ("causal_window", 0.0), ("dense", 0.0)])
def test_attention_over_key_blocks_is_the_reference(mask, dropout):
  # S = 35 in blocks of 8: the last block is padding but for 3 keys. Under a
  # band, the 21 rows run in blocks of 8, each over the key blocks it may
  # attend (rows 16 to 20 of a 6-key window: blocks 1 and 2 of 5).
  shape = AttentionShape(B=2, T=21, S=35, N=4, K=2, H=16, Hv=8)
  q, k, v, kw = make_inputs(Case(shape, mask, dropout=dropout), seed=5)
  prep = common.prepare(q, k, v, **kw)
  blocks, dense = _assert_loops_are_the_reference(q, k, v, prep, block_k=8)
  loss = lambda fn: lambda q, k, v: smooth_loss(*fn(q, k, v))
  grad = lambda fn: jax.jit(jax.grad(loss(fn), (0, 1, 2)))(q, k, v)
  for name, got, want in zip("qkv", grad(blocks), grad(dense)):
    assert_close(got, want, GRAD, "float32", f"d{name}")
  # Their own derivatives, which the paths' second derivatives take.
  tangents = tuple(jax.random.normal(key, x.shape) for key, x in
                   zip(jax.random.split(jax.random.key(7), 3), (q, k, v)))
  assert_second_derivatives_close(
      second_derivatives(blocks, q, k, v, tangents),
      second_derivatives(dense, q, k, v, tangents))


def test_bands_visit_only_the_key_blocks_they_reach():
  """Under a causal mask the rows' blocks skip the key blocks after their
  last row: about half of the pairs at 16 row blocks."""
  q = jnp.zeros((1, 4096, 1, 8))
  count = lambda causal: sum(hi - lo for _, _, lo, hi in higher_order
                             ._row_blocks(common.prepare(q, q, q,
                                                         causal=causal), 256))
  assert count(False) == 16  # one block of every row
  assert count(True) == 16 * 17 // 2


def test_row_blocks_past_every_key_attend_nothing():
  """A window on T > S leaves rows 10 to 39 without a key: their blocks
  visit no key block, and the loops still match the reference."""
  q, k, v = (jax.random.normal(key, shape) for key, shape in zip(
      jax.random.split(jax.random.key(0), 3),
      ((2, 40, 2, 8), (2, 8, 1, 8), (2, 8, 1, 4))))
  prep = common.prepare(q, k, v, causal=True, sliding_window=3,
                        dropout_rate=0.2, dropout_rng=jax.random.key(3))
  assert [hi - lo for *_, lo, hi in higher_order._row_blocks(prep, 4)][3:] \
      == [0] * 7
  _assert_loops_are_the_reference(q, k, v, prep, block_k=4)


def _assert_loops_are_the_reference(q, k, v, prep, block_k: int):
  """:func:`higher_order.attention` and :func:`higher_order.grads` over
  blocks of ``block_k`` keys equal the reference's values and vjp; returns
  ``(blocks, dense)``, the two as functions of ``q, k, v``."""
  blocks = lambda q, k, v: higher_order.attention(q, k, v, prep,
                                                  block_k=block_k)
  dense = lambda q, k, v: reference.attention_core(q, k, v, prep)
  for name, got, want in zip(("out", "lse"), jax.jit(blocks)(q, k, v),
                             dense(q, k, v)):
    assert_close(got, want, FORWARD, "float32", name)
  # The backward over key blocks, from the forward's out and lse.
  out, lse = dense(q, k, v)
  d_out, d_lse = (jax.random.normal(key, x.shape) for key, x in
                  zip(jax.random.split(jax.random.key(6)), (out, lse)))
  got = jax.jit(lambda q, k, v: higher_order.grads(
      q, k, v, prep, out, lse, d_out, d_lse, block_k=block_k))(q, k, v)
  want = jax.vjp(dense, q, k, v)[1]((d_out, d_lse))
  for name, g, w in zip("qkv", got, want):
    assert_close(g, w, GRAD, "float32", f"grads: d{name}")
  return blocks, dense


def _second_derivative_temp_bytes(kind: str, T: int, backend="xla", B=1,
                                  N=2, H=32) -> int:
  """XLA's temporaries of a Hessian-vector product (``kind="jvp of
  grad"``) or a gradient penalty's gradient (``"grad of grad"``) at length
  ``T``, through the blockwise path (``backend="xla"``) or the reference."""
  q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
  attention = (reference.attention if backend == "reference" else
               lambda q, k, v, **kw: pallas_kernels.flash_attention(
                   q, k, v, backend=backend, **kw))
  grad = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(
      attention(q, k, v, causal=True))))
  if kind == "jvp of grad":
    fn = lambda q, k, v: jax.jvp(lambda q: grad(q, k, v), (q,), (q,))[1]
  else:
    fn = jax.grad(lambda q, k, v: jnp.sum(grad(q, k, v) ** 2))
  compiled = jax.jit(fn).lower(q, q, q).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", ["jvp of grad", "grad of grad"])
def test_second_derivatives_are_memory_linear(kind):
  lengths = [1024, 2048, 4096]
  temps = [_second_derivative_temp_bytes(kind, T) for T in lengths]
  for small, big in zip(temps, temps[1:]):
    assert big < 2.2 * small, temps
  # The reference's, which holds (B, N, T, T) scores and grows 4x per
  # doubling, is already larger at T=4096 (2.9x for jvp of grad).
  assert 2 * temps[-1] < _second_derivative_temp_bytes(
      kind, lengths[-1], "reference"), temps
