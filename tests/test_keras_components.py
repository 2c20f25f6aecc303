"""Initializers, regularizers and constraints against Keras's own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmha
from jaxmha import initializers
from jaxmha import regularizers
from tests.keras_reference import keras, make_keras_layer

KERNEL_SHAPE = (64, 8, 32)  # (D, N, H): fan_in = 512, fan_out = 2048
UNBOUNDED = ("random_normal", "orthogonal")  # untruncated normal entries


@pytest.mark.parametrize("name", [
    "glorot_uniform", "glorot_normal", "he_normal", "he_uniform",
    "lecun_normal", "lecun_uniform", "random_normal", "random_uniform",
    "truncated_normal", "orthogonal", "variance_scaling"])
def test_initializer_distribution_matches_keras(name):
  ours = np.asarray(initializers.get(name)(jax.random.key(0), KERNEL_SHAPE,
                                           jnp.float32))
  # Keras draws from its global seed, whose state depends on which tests ran
  # before in this worker: seed it, so the test is reproducible.
  keras.utils.set_random_seed(0)
  theirs = np.asarray(keras.initializers.get(name)(KERNEL_SHAPE))
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours.mean(), 0.0, atol=3e-3)
  np.testing.assert_allclose(ours.std(), theirs.std(), rtol=0.03)
  # Same truncation: the share of entries past two standard deviations
  # (4.6% untruncated, 3.4% truncated at 2 sigma, 0 uniform).
  tail = lambda x: np.mean(np.abs(x) > 2 * x.std())
  np.testing.assert_allclose(tail(ours), tail(theirs), atol=0.005)
  if name not in UNBOUNDED:
    # Bounded draws reach the same bound. (The max of an unbounded draw of
    # this size varies by more than 10% between samples.)
    np.testing.assert_allclose(np.abs(ours).max(), np.abs(theirs).max(),
                               rtol=0.1)


def test_glorot_variance_uses_keras_fans():
  fan_in, fan_out = initializers.compute_fans(KERNEL_SHAPE)
  assert (fan_in, fan_out) == (64 * 8, 64 * 32)
  w = initializers.get("glorot_uniform")(jax.random.key(1), KERNEL_SHAPE)
  np.testing.assert_allclose(w.var(), 2.0 / (fan_in + fan_out), rtol=0.03)


def test_initializer_names_callables_and_errors():
  assert float(initializers.get("Ones")(None, (2,)).sum()) == 2.0
  custom = lambda rng, shape, dtype=jnp.float32: jnp.full(shape, 3.0, dtype)
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4, kernel_initializer=custom,
                         bias_initializer="ones")
  params = jaxmha.init_params(jax.random.key(0), cfg, (1, 2, 8), (1, 2, 8))
  assert float(params["query"]["kernel"].mean()) == 3.0
  assert float(params["value"]["bias"].mean()) == 1.0
  with pytest.raises(ValueError, match="Unknown initializer"):
    initializers.get("nope")
  with pytest.raises(TypeError):
    initializers.get(3)


def _keras_and_linen(**reg_kwargs):
  q = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  keras_kwargs = {k: (keras.regularizers.get(v) if isinstance(v, str)
                      and k.endswith("regularizer") else v)
                  for k, v in reg_kwargs.items()}
  layer, cfg, params = make_keras_layer(q, q, num_heads=2, key_dim=3,
                                        **keras_kwargs)
  module = jaxmha.MultiHeadAttention(num_heads=2, key_dim=3, **reg_kwargs)
  return q, layer, cfg, params, module


def test_weight_regularization_losses_equal_keras():
  q, layer, _, params, module = _keras_and_linen(
      kernel_regularizer=keras.regularizers.L1L2(l1=0.01, l2=0.02),
      bias_regularizer=keras.regularizers.L2(0.05))
  _, state = module.apply({"params": params}, q, q, mutable=["losses"])
  expected = sum(float(x) for x in layer.losses)
  np.testing.assert_allclose(jaxmha.regularization_loss(state), expected,
                             rtol=1e-5)


def test_activity_regularization_equals_keras():
  reg = keras.regularizers.L2(0.001)
  q, layer, _, params, module = _keras_and_linen(activity_regularizer=reg)
  layer(q, q, return_attention_scores=True)  # Keras records losses per call
  expected = sum(float(x) for x in layer.losses)
  _, state = module.apply({"params": params}, q, q, mutable=["losses"])
  np.testing.assert_allclose(jaxmha.regularization_loss(state), expected,
                             rtol=1e-5)


def test_regularization_loss_sums_losses_only():
  module = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.1,
                                     seed=0)
  x = jnp.ones((1, 5, 8))
  variables = module.init(jax.random.key(0), x, x)
  assert float(jaxmha.regularization_loss(variables)) == 0.0  # params only
  for _ in range(2):  # the dropout counter is not a loss
    _, state = module.apply(variables, x, x, training=True,
                            mutable=["losses", "dropout_counter"])
    variables = {**variables, **state}
    assert float(jaxmha.regularization_loss(state)) == 0.0
  assert float(jaxmha.regularization_loss({"query": {"x": 2.0}})) == 2.0
  with pytest.raises(ValueError, match="`activity_regularizer`=0.1"):
    jaxmha.MultiHeadAttention(num_heads=2, key_dim=4,
                              activity_regularizer=0.1)
  with pytest.raises(TypeError, match="param_dtype=int32"):
    jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, param_dtype="int32")
  with pytest.raises(TypeError, match="dtype=int8"):
    jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, dtype="int8")
  with pytest.raises(TypeError, match="seed=True"):
    jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, seed=True)


def test_regularizer_names():
  x = jnp.array([1.0, -2.0])
  np.testing.assert_allclose(regularizers.get_regularizer("l1")(x), 0.03)
  np.testing.assert_allclose(regularizers.get_regularizer("l2")(x), 0.05)
  np.testing.assert_allclose(regularizers.get_regularizer("l1_l2")(x), 0.08)
  with pytest.raises(ValueError, match="regularizer"):
    regularizers.get_regularizer("l3")
  assert float(jaxmha.regularization_loss({})) == 0.0


@pytest.mark.parametrize("name", ["non_neg", "max_norm", "unit_norm",
                                  "min_max_norm"])
def test_constraints_equal_keras_projection(name):
  w = np.random.default_rng(0).normal(size=KERNEL_SHAPE).astype(np.float32)
  np.testing.assert_allclose(regularizers.get_constraint(name)(jnp.asarray(w)),
                             keras.constraints.get(name)(w), rtol=1e-5,
                             atol=1e-6)


def test_constraints_transform_keeps_params_constrained():
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4)
  q = jax.random.normal(jax.random.key(0), (2, 5, 8))
  params = jaxmha.init_params(jax.random.key(1), cfg, q.shape, q.shape)
  tx = optax.chain(optax.sgd(0.5), jaxmha.constraints_transform(
      kernel_constraint="non_neg", bias_constraint="max_norm"))
  state = tx.init(params)
  loss = lambda p: jnp.sum(jaxmha.apply(p, cfg, q, q) ** 2)
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  for name, sub in params.items():
    assert float(sub["kernel"].min()) >= 0.0, name
  projected = jaxmha.apply_constraints(params, "non_neg", "max_norm")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               params, projected)


def test_module_constraint_helpers():
  module = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4,
                                     kernel_constraint="unit_norm")
  x = jnp.ones((1, 3, 8))
  params = module.init(jax.random.key(0), x, x)["params"]
  projected = module.apply_constraints(params)
  norms = jnp.sqrt(jnp.sum(projected["query"]["kernel"] ** 2, axis=0))
  np.testing.assert_allclose(norms, 1.0, atol=1e-5)
  assert isinstance(module.constraints_transform(),
                    optax.GradientTransformation)
