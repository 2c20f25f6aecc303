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


_VARIANCE_SCALING = ("glorot_uniform", "glorot_normal", "he_uniform",
                     "he_normal", "lecun_uniform", "lecun_normal",
                     "variance_scaling")


def _keras_layer_kernels(**kwargs) -> dict:
  """The kernels of a Keras MHA built on (D=64 queries, Dv=48 values),
  with N=8, H=32, Hv=16, a gate and E=(6, 10)."""
  keras.utils.set_random_seed(0)
  layer = keras.layers.MultiHeadAttention(
      num_heads=8, key_dim=32, value_dim=16, output_shape=(6, 10),
      use_gate=True, **kwargs)
  layer.build((1, 5, 64), (1, 7, 48))
  _, params = jaxmha.from_keras(layer)
  return {name: np.asarray(sub["kernel"]) for name, sub in params.items()}


@pytest.mark.parametrize("name", _VARIANCE_SCALING)
def test_layer_kernels_have_a_built_keras_layers_spread(name):
  """Keras's EinsumDense gives variance-scaling initializers the kernel's
  input and output axes: fan_in = D and fan_out = N * H for the (D, N, H)
  projections, N * Hv and prod(E) for the output kernel. init_params and
  the linen module draw every kernel with a built Keras layer's spread."""
  theirs = _keras_layer_kernels(kernel_initializer=name)
  cfg = jaxmha.MHAConfig(num_heads=8, key_dim=32, value_dim=16,
                         output_shape=(6, 10), use_gate=True,
                         kernel_initializer=name)
  ours = jaxmha.init_params(jax.random.key(1), cfg, (1, 5, 64), (1, 7, 48))
  layer = jaxmha.MultiHeadAttention(num_heads=8, key_dim=32, value_dim=16,
                                    output_shape=(6, 10), use_gate=True,
                                    kernel_initializer=name)
  linen = layer.init(jax.random.key(2), jnp.ones((1, 5, 64)),
                     jnp.ones((1, 7, 48)))["params"]
  assert sorted(ours) == sorted(theirs) == sorted(linen)
  for sub, kernel in theirs.items():
    for params in (ours, linen):
      np.testing.assert_allclose(np.std(params[sub]["kernel"]),
                                 kernel.std(), rtol=0.06, err_msg=sub)
  # Without axes (a kernel drawn on its own), fans follow Keras's rule for
  # any shape, as keras.initializers.get(name)(shape) draws.
  fan_in, fan_out = initializers.compute_fans(KERNEL_SHAPE)
  assert (fan_in, fan_out) == (64 * 8, 64 * 32)
  assert initializers.compute_fans(KERNEL_SHAPE, (0,), (1, 2)) == (64, 256)


def test_keras_initializers_with_arguments_draw_from_the_rng():
  """A Keras initializer with arguments of its own comes over as a
  KerasInitializer: drawn from the key (so every kernel and every key
  differ, as in Keras, where each projection clones it), with the built
  layer's spread; hashable, JSON through get_config, and handed back to
  Keras as the same class."""
  import json  # pylint: disable=g-import-not-at-top
  kinit = keras.initializers.VarianceScaling(scale=3.0, mode="fan_out",
                                             distribution="uniform")
  theirs = _keras_layer_kernels(kernel_initializer=kinit)
  keras.utils.set_random_seed(0)
  layer = keras.layers.MultiHeadAttention(
      num_heads=8, key_dim=32, value_dim=16, output_shape=(6, 10),
      use_gate=True, kernel_initializer=kinit,
      bias_initializer=keras.initializers.RandomNormal(stddev=0.3))
  layer.build((1, 5, 64), (1, 7, 48))
  cfg, _ = jaxmha.from_keras(layer)
  assert cfg.kernel_initializer == initializers.KerasInitializer(
      "variance_scaling", {"scale": 3.0, "mode": "fan_out",
                           "distribution": "uniform"})
  assert cfg == jaxmha.from_keras(layer)[0]
  hash(cfg)
  a = jaxmha.init_params(jax.random.key(0), cfg, (1, 5, 64), (1, 7, 48))
  b = jaxmha.init_params(jax.random.key(1), cfg, (1, 5, 64), (1, 7, 48))
  assert not np.allclose(a["query"]["kernel"], b["query"]["kernel"])
  assert not np.allclose(a["query"]["kernel"][..., :16], a["gate"]["kernel"])
  for sub, kernel in theirs.items():
    np.testing.assert_allclose(np.std(a[sub]["kernel"]), kernel.std(),
                               rtol=0.06, err_msg=sub)
  np.testing.assert_allclose(np.std(a["query"]["bias"]), 0.3, rtol=0.2)
  back = jaxmha.MHAConfig.from_config(json.loads(json.dumps(
      cfg.get_config())))
  assert back == cfg
  keras_layer = jaxmha.to_keras(a, cfg)
  # pylint: disable=protected-access
  assert keras_layer._kernel_initializer.get_config() == kinit.get_config()
  assert keras_layer._bias_initializer.get_config()["stddev"] == 0.3


def test_keras_initializer_objects_in_constructors_draw_from_the_rng():
  """A Keras initializer object given to MHAConfig or a module constructor,
  as to Keras's, comes in as from_keras brings it: drawn from the key, as
  its jaxmha form draws."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  objects = dict(kernel_initializer=keras.initializers.HeNormal(seed=1),
                 bias_initializer=keras.initializers.RandomNormal(stddev=0.3))
  forms = dict(kernel_initializer="he_normal",
               bias_initializer=initializers.KerasInitializer(
                   "random_normal", {"stddev": 0.3}))
  x = jnp.ones((1, 4, 16))
  builds = {
      "functional": lambda kw, seed: jaxmha.init_params(
          jax.random.key(seed), jaxmha.MHAConfig(num_heads=2, key_dim=8, **kw),
          x.shape, x.shape),
      "linen": lambda kw, seed: jaxmha.MultiHeadAttention(
          num_heads=2, key_dim=8, **kw).init(jax.random.key(seed), x,
                                             x)["params"],
      "nnx": lambda kw, seed: jaxmha.nnx.MultiHeadAttention(
          num_heads=2, key_dim=8, **kw, query_features=16,
          rngs=nnx.Rngs(seed)).params(),
  }
  assert jaxmha.MHAConfig(num_heads=2, key_dim=8, **objects) == (
      jaxmha.MHAConfig(num_heads=2, key_dim=8, **forms))
  for name, build in builds.items():
    got = build(objects, 0)
    jax.tree.map(np.testing.assert_array_equal, got, build(forms, 0))
    assert not np.allclose(got["query"]["kernel"],
                           build(objects, 1)["query"]["kernel"]), name
    np.testing.assert_allclose(np.std(got["query"]["bias"]), 0.3, rtol=0.5)


def test_keras_initializer_arguments_are_checked():
  with pytest.raises(ValueError, match="mode"):
    initializers.KerasInitializer("variance_scaling", {"mode": "fan_sum"})
  with pytest.raises(ValueError, match=r"Unknown arguments \['stdev'\]"):
    initializers.KerasInitializer("random_normal", {"stdev": 1.0})
  with pytest.raises(ValueError, match="kernel_initializer.*MyInit"):
    initializers.from_keras_config("kernel_initializer",
                                   {"class_name": "MyInit", "config": {}})
  # Names are kept in Keras's snake case, so spellings compare equal.
  assert jaxmha.MHAConfig(num_heads=2, key_dim=4,
                          kernel_initializer="GlorotUniform",
                          bias_initializer="normal") == jaxmha.MHAConfig(
                              num_heads=2, key_dim=4,
                              bias_initializer="random_normal")


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
