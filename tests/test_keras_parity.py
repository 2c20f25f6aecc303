"""Keras equivalence: the product test. Keras 3 on the JAX backend is the
ground truth; weights are copied across and outputs, scores and gradients
compared at fp32 tolerance over the whole argument space."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmha
from jaxmha import initializers
from tests.keras_reference import (assert_grads_close, keras_call, keras_grads,
                                   make_keras_layer)
from tests.tolerances import KERAS


@dataclasses.dataclass(frozen=True)
class ParityCase:
  """One Keras configuration and call."""
  name: str
  layer: tuple = ()  # MHA kwargs as (name, value) pairs
  q_shape: tuple = (2, 6, 16)
  v_shape: Optional[tuple] = None  # default: self-attention
  k_shape: Optional[tuple] = None
  masks: tuple = ()  # which masks to draw: attention, attention4, heads4,
  #                   attention2, query, value, key, empty_row
  causal: bool = False

  @property
  def kwargs(self) -> dict:
    return dict(self.layer)


def _case(name, **kw):
  layer = kw.pop("layer", {})
  return ParityCase(name=name, layer=tuple(sorted(layer.items())), **kw)


BASE = dict(num_heads=3, key_dim=5)
CASES = [
    _case("self", layer=BASE),
    _case("cross_T_ne_S", layer=BASE, q_shape=(2, 5, 16), v_shape=(2, 9, 12)),
    _case("key_own_features", layer=BASE, q_shape=(2, 5, 16),
          v_shape=(2, 9, 12), k_shape=(2, 9, 7)),
    _case("value_dim", layer=dict(BASE, value_dim=7)),
    _case("output_shape_int", layer=dict(BASE, output_shape=11)),
    _case("output_shape_tuple", layer=dict(BASE, value_dim=4,
                                           output_shape=(2, 3))),
    _case("no_bias", layer=dict(BASE, use_bias=False)),
    _case("gate", layer=dict(BASE, use_gate=True, value_dim=6)),
    _case("sliding_window", layer=dict(BASE, sliding_window=2)),
    _case("causal_window", layer=dict(BASE, sliding_window=3), causal=True),
    _case("causal", layer=BASE, causal=True),
    _case("causal_T_lt_S", layer=BASE, q_shape=(2, 4, 16),
          v_shape=(2, 7, 16), causal=True),
    _case("causal_T_gt_S", layer=BASE, q_shape=(2, 7, 16),
          v_shape=(2, 4, 16), causal=True),
    _case("attention_mask", layer=BASE, masks=("attention",)),
    _case("attention_mask_2d", layer=BASE, masks=("attention2",)),
    _case("attention_mask_heads", layer=BASE, masks=("heads4",)),
    _case("attention_mask_4d_with_padding", layer=BASE,
          masks=("attention4", "value", "query")),
    _case("value_mask", layer=BASE, q_shape=(2, 5, 16), v_shape=(2, 8, 16),
          masks=("value",)),
    _case("key_mask_without_key", layer=BASE, masks=("key",)),
    _case("query_mask", layer=BASE, masks=("query",)),
    _case("all_masks_causal", layer=dict(BASE, sliding_window=4),
          q_shape=(2, 6, 16), v_shape=(2, 6, 10), k_shape=(2, 6, 8),
          masks=("attention", "query", "value", "key"), causal=True),
    _case("fully_masked_rows", layer=BASE, masks=("attention", "empty_row")),
    _case("batch1_T1", layer=BASE, q_shape=(1, 1, 16), v_shape=(1, 5, 16)),
    _case("rank4_two_axes", layer=dict(BASE, attention_axes=(1, 2)),
          q_shape=(2, 3, 4, 8)),
    _case("rank4_last_axis", layer=dict(BASE, attention_axes=(2,)),
          q_shape=(2, 3, 4, 8), v_shape=(2, 3, 6, 8)),
    _case("rank4_negative_axis", layer=dict(BASE, attention_axes=(-2,)),
          q_shape=(2, 3, 4, 8)),
    _case("rank4_default_axes", layer=BASE, q_shape=(2, 3, 4, 8),
          v_shape=(2, 2, 5, 8)),
    _case("rank5_axes_1_3", layer=dict(BASE, attention_axes=(1, 3)),
          q_shape=(2, 2, 3, 4, 8), masks=("attention",)),
    _case("rank4_mask", layer=dict(BASE, attention_axes=(1, 2)),
          q_shape=(2, 3, 4, 8), masks=("attention",)),
]


def _inputs(case: ParityCase, seed: int = 0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=case.q_shape).astype(np.float32)
  v = q if case.v_shape is None else rng.normal(size=case.v_shape).astype(
      np.float32)
  k = None if case.k_shape is None else rng.normal(size=case.k_shape).astype(
      np.float32)
  B, T, S = q.shape[0], q.shape[1], v.shape[1]
  N = case.kwargs["num_heads"]
  masks: dict[str, Any] = {}
  axes = case.kwargs.get("attention_axes")
  if "attention" in case.masks:
    if len(case.q_shape) == 3:
      masks["attention_mask"] = rng.random((B, T, S)) > 0.3
    else:  # Keras's multi-axis mask: (B, *other, *attn_T, *attn_S)
      rank = len(case.q_shape)
      ax = tuple(a % rank for a in axes)
      other = [d for i, d in enumerate(q.shape[1:-1], 1) if i not in ax]
      shape = ((B,) + tuple(other) + tuple(q.shape[a] for a in ax)
               + tuple(v.shape[a] for a in ax))
      masks["attention_mask"] = rng.random(shape) > 0.3
  if "attention2" in case.masks:
    masks["attention_mask"] = rng.random((T, S)) > 0.3
  if "attention4" in case.masks:
    masks["attention_mask"] = rng.random((B, 1, T, S)) > 0.3
  if "heads4" in case.masks:
    masks["attention_mask"] = rng.random((B, N, T, S)) > 0.3
  if "empty_row" in case.masks:
    masks["attention_mask"][:, T // 2, :] = False
  if "query" in case.masks:
    masks["query_mask"] = rng.random((B, T)) > 0.25
  if "value" in case.masks:
    masks["value_mask"] = (rng.random((B, S)) > 0.25)
  if "key" in case.masks:
    masks["key_mask"] = (rng.random((B, S)) > 0.25)
  return q, v, k, masks


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_and_scores_match_keras(case: ParityCase):
  q, v, k, masks = _inputs(case)
  layer, cfg, params = make_keras_layer(q, v, k, **case.kwargs)
  expected_out, expected_scores = keras_call(
      layer, q, v, k, use_causal_mask=case.causal, **masks)
  out, scores = jaxmha.apply(params, cfg, q, v, k,
                             use_causal_mask=case.causal,
                             return_attention_scores=True, **masks)
  assert out.shape == expected_out.shape
  assert scores.shape == expected_scores.shape
  np.testing.assert_allclose(out, expected_out, **KERAS)
  np.testing.assert_allclose(scores, expected_scores, **KERAS)
  # The output without scores (the path users take by default) agrees too.
  out_only = jaxmha.apply(params, cfg, q, v, k, use_causal_mask=case.causal,
                          **masks)
  np.testing.assert_allclose(out_only, expected_out, **KERAS)


GRAD_CASES = [c for c in CASES if c.name in (
    "self", "key_own_features", "gate", "output_shape_tuple",
    "all_masks_causal", "fully_masked_rows", "rank4_two_axes", "no_bias")]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_gradients_match_keras(case: ParityCase):
  q, v, k, masks = _inputs(case, seed=1)
  layer, cfg, params = make_keras_layer(q, v, k, **case.kwargs)
  out_shape = jaxmha.apply(params, cfg, q, v, k).shape
  cotangent = np.random.default_rng(5).normal(size=out_shape).astype(
      np.float32)
  keras_masks = dict(masks)
  if "query_mask" in keras_masks:  # fold as Keras would see it
    qm = keras_masks.pop("query_mask")[:, :, None]
    am = keras_masks.get("attention_mask")
    keras_masks["attention_mask"] = qm if am is None else am & qm
  expected_params, expected_inputs = keras_grads(
      layer, q, v, k, cotangent, use_causal_mask=case.causal, **keras_masks)

  def loss(params, *inputs):
    key = inputs[2] if len(inputs) > 2 else None
    out = jaxmha.apply(params, cfg, inputs[0], inputs[1], key,
                       use_causal_mask=case.causal, **masks)
    return jnp.sum(out * cotangent)

  inputs = (q, v) if k is None else (q, v, k)
  grads = jax.grad(loss, argnums=tuple(range(len(inputs) + 1)))(
      params, *inputs)
  assert_grads_close(grads, expected_params, expected_inputs)


def test_from_keras_to_keras_round_trip():
  q = np.random.default_rng(0).normal(size=(2, 5, 12)).astype(np.float32)
  layer, cfg, params = make_keras_layer(q, q, num_heads=2, key_dim=3,
                                        value_dim=4, use_gate=True,
                                        output_shape=(2, 5))
  # A new layer from (cfg, params) computes what the original does.
  new_layer = jaxmha.to_keras(params, cfg)
  np.testing.assert_allclose(new_layer(q, q, return_attention_scores=True)[0],
                             layer(q, q, return_attention_scores=True)[0],
                             **KERAS)
  cfg2, params2 = jaxmha.from_keras(new_layer)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # Copying into an existing layer overwrites its weights.
  other, _, _ = make_keras_layer(q, q, num_heads=2, key_dim=3, value_dim=4,
                                 use_gate=True, output_shape=(2, 5))
  jaxmha.to_keras(params, cfg, other)
  np.testing.assert_allclose(other(q, q, return_attention_scores=True)[0],
                             layer(q, q, return_attention_scores=True)[0],
                             **KERAS)


def test_to_keras_rejects_mismatched_params():
  q = np.ones((1, 3, 8), np.float32)
  _, cfg, params = make_keras_layer(q, q, num_heads=2, key_dim=3)
  wrong = jax.tree.map(lambda x: x, params)
  wrong["query"]["kernel"] = np.ones((8, 2, 4), np.float32)
  import keras  # pylint: disable=g-import-not-at-top
  target = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)
  target(q, q)
  with pytest.raises(ValueError, match=r"params\['query'\]\['kernel'\]"):
    jaxmha.to_keras(wrong, cfg, target)
  del wrong["key"]
  with pytest.raises(ValueError, match=r"lacks the kernels of \['key'\]"):
    jaxmha.to_keras(wrong, cfg)
  with pytest.raises(TypeError, match="got Dense"):
    jaxmha.to_keras(params, cfg, keras.layers.Dense(3))


def test_to_keras_builds_for_the_inputs_given():
  import keras  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)  # rank 4
  v = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
  for axes in (None, (1,), (-3,)):
    cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4, attention_axes=axes)
    params = jaxmha.init_params(jax.random.key(0), cfg, q.shape, v.shape)
    want = jaxmha.apply(params, cfg, q, v)
    for target in (None, keras.layers.MultiHeadAttention(
        num_heads=2, key_dim=4, attention_axes=axes)):
      layer = jaxmha.to_keras(params, cfg, target, query_shape=q.shape,
                              value_shape=v.shape)
      np.testing.assert_allclose(layer(q, v), want, **KERAS)
  # Without shapes: the smallest rank the axes fit ((-3,) needs rank 4).
  layer = jaxmha.to_keras(params, cfg)
  np.testing.assert_allclose(layer(q, v), want, **KERAS)
  with pytest.raises(ValueError, match="already built"):
    jaxmha.to_keras(params, cfg, layer, query_shape=q.shape)
  with pytest.raises(ValueError, match=r"query_shape.*\(2, 3, 4, 9\)"):
    jaxmha.to_keras(params, cfg, query_shape=(2, 3, 4, 9))


def test_to_keras_refuses_a_layer_that_computes_something_else():
  import keras  # pylint: disable=g-import-not-at-top
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4, sliding_window=2,
                         dropout=0.5)
  params = jaxmha.init_params(jax.random.key(0), cfg, (1, 5, 8), (1, 7, 8))
  plain = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
  with pytest.raises(ValueError, match=r"dropout: cfg has 0\.5, the layer "
                     r"0\.0; sliding_window: cfg has 2, the layer None"):
    jaxmha.to_keras(params, cfg, plain)
  rank4 = jaxmha.MHAConfig(num_heads=2, key_dim=4, attention_axes=(2,))
  other_axes = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4,
                                               attention_axes=(1,))
  with pytest.raises(ValueError, match="attention_axes"):
    jaxmha.to_keras(params, rank4, other_axes, query_shape=(1, 3, 5, 8),
                    value_shape=(1, 3, 7, 8))
  # Equal settings spelled differently are the same layer.
  same = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4,
                                         attention_axes=(-2,))
  jaxmha.to_keras(params, jaxmha.MHAConfig(num_heads=2, key_dim=4), same)


def test_config_round_trip_through_keras_is_exact():
  import keras  # pylint: disable=g-import-not-at-top
  for cfg in (jaxmha.MHAConfig(num_heads=2, key_dim=4),
              jaxmha.MHAConfig(num_heads=2, key_dim=4, value_dim=3,
                               output_shape=5)):
    params = jaxmha.init_params(jax.random.key(0), cfg, (1, 5, 8), (1, 7, 8))
    cfg2, _ = jaxmha.from_keras(jaxmha.to_keras(params, cfg))
    assert cfg2 == cfg and hash(cfg2) == hash(cfg)
  # A built Keras layer spells its axes out; those of the default come back
  # as None, which means the same for inputs of that rank.
  for axes in ((1,), (-2,), -2):
    cfg2, _ = jaxmha.from_keras(jaxmha.to_keras(params, cfg.replace(
        attention_axes=axes)))
    assert cfg2 == cfg, axes
  # Other axes come back as the built layer stores them, non-negative.
  rank4 = cfg.replace(attention_axes=(-3,))
  params4 = jaxmha.init_params(jax.random.key(0), rank4, (1, 5, 3, 8),
                               (1, 7, 3, 8))
  cfg2, _ = jaxmha.from_keras(jaxmha.to_keras(params4, rank4))
  assert cfg2 == rank4.replace(attention_axes=(1,))
  # A Keras layer's own get_config() is a config too.
  layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4,
                                          kernel_initializer="he_normal")
  cfg = jaxmha.MHAConfig.from_config(layer.get_config())
  assert cfg == jaxmha.MHAConfig(num_heads=2, key_dim=4, value_dim=4,
                                 kernel_initializer="he_normal")
  custom = keras.layers.MultiHeadAttention(
      num_heads=2, key_dim=4,
      kernel_initializer=keras.initializers.RandomNormal(stddev=0.3),
      flash_attention=True)
  cfg = jaxmha.MHAConfig.from_config(custom.get_config())
  assert cfg.kernel_initializer == initializers.KerasInitializer(
      "random_normal", {"stddev": 0.3})
  # flash_attention is not in Keras's get_config; from_keras reads it, and
  # to_keras passes it on. (Keras keeps a layer's False as None.)
  custom.build((1, 5, 8), (1, 7, 8))
  cfg, params = jaxmha.from_keras(custom)
  assert cfg.flash_attention is True
  back = jaxmha.to_keras(params, cfg)
  assert back._flash_attention is True  # pylint: disable=protected-access


def test_per_example_padding_masks_on_rank4_inputs_repeat_over_other_axes():
  """On (B, A, T, D) inputs attending over axis 2, a (B, S) value_mask is
  per example, repeated over A, as in Keras, also when B == A (right-
  aligned broadcasting read it as one mask per A, silently); a (B, T)
  query_mask likewise."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 2, 4, 8)).astype(np.float32)
  v = rng.normal(size=(2, 2, 5, 8)).astype(np.float32)
  layer, cfg, params = make_keras_layer(q, v, num_heads=2, key_dim=4,
                                        attention_axes=(2,))
  value_mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)  # (B, S)
  want = np.asarray(layer(q, v, value_mask=value_mask))
  np.testing.assert_allclose(
      jaxmha.apply(params, cfg, q, v, value_mask=value_mask), want, **KERAS)
  query_mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool)  # (B, T)
  np.testing.assert_allclose(
      jaxmha.apply(params, cfg, q, v, query_mask=query_mask),
      jaxmha.apply(params, cfg, q, v, query_mask=np.broadcast_to(
          query_mask[:, None], (2, 2, 4))), **KERAS)


def test_from_keras_keeps_initializers_jaxmha_has_no_name_for():
  """A class jaxmha knows comes over with its arguments (Constant); one it
  does not know (a user's subclass) is called as it is."""
  import keras  # pylint: disable=g-import-not-at-top

  class Halves(keras.initializers.Initializer):
    def __call__(self, shape, dtype=None):
      return keras.ops.full(shape, 0.5, dtype=dtype)

  layer = keras.layers.MultiHeadAttention(
      num_heads=2, key_dim=4,
      kernel_initializer=keras.initializers.Constant(0.5),
      bias_initializer=Halves())
  layer.build((1, 5, 8), (1, 7, 8))
  cfg, params = jaxmha.from_keras(layer)
  fresh = jaxmha.init_params(jax.random.key(0), cfg, (1, 5, 8), (1, 7, 8))
  np.testing.assert_array_equal(fresh["query"]["kernel"],
                                np.full((8, 2, 4), 0.5, np.float32))
  np.testing.assert_array_equal(fresh["query"]["bias"],
                                np.full((2, 4), 0.5, np.float32))
  # ... and hands both back to Keras.
  back = jaxmha.to_keras(params, cfg)
  # pylint: disable=protected-access
  assert isinstance(back._kernel_initializer, keras.initializers.Constant)
  assert back._kernel_initializer.get_config() == {"value": 0.5}
  assert isinstance(back._bias_initializer, Halves)


def test_flash_forced_matches_keras_in_interpret_mode():
  """``flash_attention=True`` on CPU runs a kernel in interpret mode."""
  pytest.importorskip("pallas_kernels.gpu_triton")
  case = next(c for c in CASES if c.name == "all_masks_causal")
  q, v, k, masks = _inputs(case)
  layer, cfg, params = make_keras_layer(q, v, k, **case.kwargs)
  expected_out, _ = keras_call(layer, q, v, k, use_causal_mask=True, **masks)
  out = jaxmha.apply(params, cfg.replace(flash_attention=True), q, v, k,
                     use_causal_mask=True, **masks)
  np.testing.assert_allclose(out, expected_out, **KERAS)
