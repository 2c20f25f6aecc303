"""Grouped-query attention against ``keras.layers.GroupQueryAttention``
(JAX backend) with copied weights: outputs, scores and gradients, the
query-head -> key/value-head mapping, interop round trips, and the linen and
nnx modules with ``num_key_value_heads``.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads (``G = N // K`` query heads per group), H head dim,
D/Dv/Dk input features.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import jaxmha
from tests.keras_reference import (assert_grads_close, copy_built_layer,
                                   keras_grads)
from tests.tolerances import KERAS


def _keras_gqa(query, value, key=None, **kwargs):
  """A built Keras GQA layer (random biases) and jaxmha's copy of it."""
  layer = keras.layers.GroupQueryAttention(**kwargs)
  layer(query, value, key)  # builds
  return copy_built_layer(layer)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  layer: tuple = ()
  q_shape: tuple = (2, 6, 16)
  v_shape: Optional[tuple] = None
  k_shape: Optional[tuple] = None
  masks: tuple = ()
  causal: bool = False


def _case(name, layer, **kw):
  return Case(name=name, layer=tuple(sorted(layer.items())), **kw)


BASE = dict(head_dim=4, num_query_heads=6, num_key_value_heads=2)
CASES = [
    _case("self", BASE),
    _case("causal", BASE, causal=True),
    _case("mqa_masked", dict(BASE, num_key_value_heads=1),
          masks=("attention", "query", "value")),
    _case("gate_window_causal", dict(BASE, use_gate=True, sliding_window=3),
          causal=True),
    _case("cross_key_features", BASE, q_shape=(2, 5, 16), v_shape=(2, 9, 12),
          k_shape=(2, 9, 7), masks=("attention", "key"), causal=True),
    _case("no_bias_masked_causal", dict(BASE, num_query_heads=4,
                                        use_bias=False),
          masks=("attention",), causal=True),
]


def _inputs(case: Case, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=case.q_shape).astype(np.float32)
  v = q if case.v_shape is None else rng.normal(size=case.v_shape).astype(
      np.float32)
  k = None if case.k_shape is None else rng.normal(size=case.k_shape).astype(
      np.float32)
  B, T, S = q.shape[0], q.shape[1], v.shape[1]
  masks = {}
  if "attention" in case.masks:
    masks["attention_mask"] = rng.random((B, T, S)) > 0.3
  if "query" in case.masks:
    masks["query_mask"] = rng.random((B, T)) > 0.25
  if "value" in case.masks:
    masks["value_mask"] = rng.random((B, S)) > 0.25
  if "key" in case.masks:
    masks["key_mask"] = rng.random((B, S)) > 0.25
  return q, v, k, masks


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_and_scores_match_keras_gqa(case: Case):
  q, v, k, masks = _inputs(case)
  layer, cfg, params = _keras_gqa(q, v, k, **dict(case.layer))
  assert cfg.kv_heads == dict(case.layer)["num_key_value_heads"]
  expected_out, expected_scores = layer(
      q, v, k, use_causal_mask=case.causal, return_attention_scores=True,
      **masks)
  out, scores = jaxmha.apply(params, cfg, q, v, k,
                             use_causal_mask=case.causal,
                             return_attention_scores=True, **masks)
  assert scores.shape == expected_scores.shape == (
      q.shape[0], cfg.num_heads, q.shape[1], v.shape[1])
  np.testing.assert_allclose(out, expected_out, **KERAS)
  np.testing.assert_allclose(scores, expected_scores, **KERAS)
  out_only = jaxmha.apply(params, cfg, q, v, k, use_causal_mask=case.causal,
                          **masks)
  np.testing.assert_allclose(out_only, expected_out, **KERAS)
  if not masks:  # Keras's fused path (no scores) agrees too
    np.testing.assert_allclose(
        out_only, layer(q, v, k, use_causal_mask=case.causal), **KERAS)


def test_query_head_n_reads_kv_head_n_div_groups():
  """Keras *repeats* each kv head over G consecutive query heads (not tile).

  Recomputes each query head's scores from Keras's projections with kv
  head ``n // G`` and with ``n % K``: only the first matches Keras, and
  jaxmha's scores equal Keras's.
  """
  N, K, H = 6, 3, 4
  G = N // K
  q = np.random.default_rng(1).normal(size=(1, 5, 8)).astype(np.float32)
  layer, cfg, params = _keras_gqa(q, q, head_dim=H, num_query_heads=N,
                                  num_key_value_heads=K)
  _, keras_scores = layer(q, q, return_attention_scores=True)
  keras_scores = np.asarray(keras_scores)
  p = jax.tree.map(np.asarray, params)
  qp = np.einsum("btd,dnh->btnh", q, p["query"]["kernel"]) + p["query"]["bias"]
  kp = np.einsum("btd,dkh->btkh", q, p["key"]["kernel"]) + p["key"]["bias"]

  def head_scores(n, j):
    logits = np.einsum("th,sh->ts", qp[0, :, n], kp[0, :, j]) / np.sqrt(H)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  for n in range(N):
    np.testing.assert_allclose(keras_scores[0, n], head_scores(n, n // G),
                               atol=1e-5)
    if n // G != n % K:
      assert not np.allclose(keras_scores[0, n], head_scores(n, n % K),
                             atol=1e-3)
  _, scores = jaxmha.apply(params, cfg, q, q, return_attention_scores=True)
  np.testing.assert_allclose(scores, keras_scores, **KERAS)


def test_gradients_match_keras_gqa():
  case = next(c for c in CASES if c.name == "cross_key_features")
  q, v, k, masks = _inputs(case, seed=1)
  layer, cfg, params = _keras_gqa(q, v, k, **dict(case.layer))
  cotangent = np.random.default_rng(5).normal(size=q.shape).astype(np.float32)
  expected_params, expected_inputs = keras_grads(
      layer, q, v, k, cotangent, use_causal_mask=True, **masks)

  def loss(params, q, v, k):
    out = jaxmha.apply(params, cfg, q, v, k, use_causal_mask=True, **masks)
    return jnp.sum(out * cotangent)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(params, q, v, k)
  assert_grads_close(grads, expected_params, expected_inputs)


def test_from_keras_to_keras_round_trip_gqa():
  q = np.random.default_rng(0).normal(size=(2, 5, 12)).astype(np.float32)
  layer, cfg, params = _keras_gqa(q, q, head_dim=3, num_query_heads=4,
                                  num_key_value_heads=2, use_gate=True,
                                  sliding_window=2)
  assert cfg.use_gate and cfg.sliding_window == 2
  new_layer = jaxmha.to_keras(params, cfg)
  assert isinstance(new_layer, keras.layers.GroupQueryAttention)
  np.testing.assert_allclose(new_layer(q, q, use_causal_mask=True),
                             layer(q, q, use_causal_mask=True), **KERAS)
  cfg2, params2 = jaxmha.from_keras(new_layer)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  with pytest.raises(ValueError, match="value_dim=5 != key_dim=3"):
    jaxmha.to_keras(params, cfg.replace(value_dim=5))
  with pytest.raises(ValueError, match="GroupQueryAttention"):
    jaxmha.to_keras(params, cfg,
                    keras.layers.MultiHeadAttention(num_heads=4, key_dim=3))


def test_modules_take_num_key_value_heads():
  case = next(c for c in CASES if c.name == "mqa_masked")
  q, v, _, masks = _inputs(case)
  layer, cfg, params = _keras_gqa(q, v, **dict(case.layer))
  expected, _ = layer(q, v, return_attention_scores=True, **masks)
  kwargs = dict(num_heads=cfg.num_heads, key_dim=cfg.key_dim,
                num_key_value_heads=cfg.num_key_value_heads)
  linen = jaxmha.MultiHeadAttention(**kwargs)
  shapes = jax.tree.map(jnp.shape, linen.init(jax.random.key(0), q, v)[
      "params"])
  assert shapes == jax.tree.map(jnp.shape, params)
  assert shapes["key"]["kernel"] == (16, 1, 4)
  np.testing.assert_allclose(
      linen.apply({"params": params}, q, v, **masks), expected, **KERAS)
  module = jaxmha.nnx.MultiHeadAttention(**kwargs, query_features=16,
                                         rngs=nnx.Rngs(0))
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)
  np.testing.assert_allclose(module(q, v, **masks), expected, **KERAS)
