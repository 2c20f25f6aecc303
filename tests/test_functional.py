"""The functional API and the Flax module: semantics, dropout, transforms,
errors, and property tests against an independent NumPy MHA."""

from __future__ import annotations

from unittest import mock

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

import jaxmha
import pallas_kernels
from tests.keras_reference import naive_mha
from tests.tolerances import KERAS


def _setup(cfg=None, B=2, T=6, S=6, D=16, seed=0):
  cfg = cfg or jaxmha.MHAConfig(num_heads=2, key_dim=8, dropout=0.3)
  rng_p, rng_q, rng_v = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(rng_q, (B, T, D))
  v = jax.random.normal(rng_v, (B, S, D))
  params = jaxmha.init_params(rng_p, cfg, q.shape, v.shape)
  return cfg, params, q, v


# -- semantics ---------------------------------------------------------------


def test_fully_masked_query_rows_give_output_bias_and_finite_grads():
  cfg, params, q, v = _setup(jaxmha.MHAConfig(num_heads=2, key_dim=8))
  params["attention_output"]["bias"] = jnp.arange(16.0)
  query_mask = jnp.ones((2, 6), bool).at[0, 2].set(False)
  value_mask = jnp.ones((2, 6), bool).at[1].set(False)  # example 1: no keys
  kw = dict(query_mask=query_mask, value_mask=value_mask)
  out, scores = jaxmha.apply(params, cfg, q, v, return_attention_scores=True,
                             **kw)
  np.testing.assert_allclose(out[0, 2], jnp.arange(16.0), atol=1e-6)
  np.testing.assert_allclose(out[1], jnp.broadcast_to(jnp.arange(16.0),
                                                      (6, 16)), atol=1e-6)
  np.testing.assert_array_equal(scores[1], 0.0)
  # The path without scores agrees (Keras's fused path would average).
  np.testing.assert_allclose(jaxmha.apply(params, cfg, q, v, **kw), out,
                             atol=1e-6)
  grads = jax.grad(lambda p, q, v: jaxmha.apply(p, cfg, q, v, **kw).sum(),
                   (0, 1, 2))(params, q, v)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_query_mask_is_applied():
  cfg, params, q, v = _setup(jaxmha.MHAConfig(num_heads=2, key_dim=8))
  query_mask = jnp.ones((2, 6), bool).at[:, 0].set(False)
  masked = jaxmha.apply(params, cfg, q, v, query_mask=query_mask)
  plain = jaxmha.apply(params, cfg, q, v)
  assert not np.allclose(masked[:, 0], plain[:, 0])
  np.testing.assert_allclose(masked[:, 1:], plain[:, 1:], atol=1e-6)


def test_numeric_masks_are_cast_like_keras():
  cfg, params, q, v = _setup(jaxmha.MHAConfig(num_heads=2, key_dim=8))
  mask = np.random.default_rng(0).random((2, 6, 6)) > 0.4
  want = jaxmha.apply(params, cfg, q, v, attention_mask=mask)
  for dtype in (np.float32, np.int32, jnp.bfloat16, jnp.float16):
    np.testing.assert_allclose(
        jaxmha.apply(params, cfg, q, v,
                     attention_mask=jnp.asarray(mask, dtype),
                     value_mask=jnp.ones((2, 6), dtype)), want, atol=1e-6,
        err_msg=str(dtype))


# -- dropout -----------------------------------------------------------------


def test_dropout_same_key_same_output_other_key_differs():
  cfg, params, q, v = _setup()
  run = lambda rng: jaxmha.apply(params, cfg, q, v, training=True,
                                 dropout_rng=rng)
  a, b = run(jax.random.key(1)), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, run(jax.random.key(2)))
  # Raw uint32 keys work too, and give the same bits as the typed key.
  np.testing.assert_array_equal(run(jax.random.PRNGKey(1)), a)


def test_no_dropout_when_not_training():
  cfg, params, q, v = _setup()
  plain = jaxmha.apply(params, cfg.replace(dropout=0.0), q, v)
  np.testing.assert_array_equal(
      jaxmha.apply(params, cfg, q, v, training=False,
                   dropout_rng=jax.random.key(0)), plain)


def test_dropout_keep_rate_and_rescaling():
  """E[dropped output] equals the output without dropout (1/(1-p) scale)."""
  cfg, params, q, v = _setup(jaxmha.MHAConfig(num_heads=2, key_dim=8,
                                              dropout=0.3), T=16, S=16)
  rngs = jax.random.split(jax.random.key(0), 256)
  outs = jax.vmap(lambda r: jaxmha.apply(params, cfg, q, v, training=True,
                                         dropout_rng=r))(rngs)
  plain = jaxmha.apply(params, cfg, q, v)
  # Within 5 standard errors of the 256-draw mean, entry by entry: at these
  # keys the largest of the 512 deviations is 3.1, and outputs left
  # unscaled by 1/(1-p) stray 29.
  standard_error = outs.std(0) / np.sqrt(len(rngs))
  np.testing.assert_array_less(np.abs(outs.mean(0) - plain),
                               5 * standard_error + 1e-6)
  # The keep rate, read off the attention weights of a value = identity.
  from pallas_kernels import dropout as dropout_lib
  keep = dropout_lib.keep_mask_block(dropout_lib.seed_words(rngs[0]), 0.3,
                                     2, 2, 16, 16)
  assert abs(float(keep.mean()) - 0.7) < 0.03


def test_training_with_dropout_needs_a_key():
  cfg, params, q, v = _setup()
  with pytest.raises(ValueError, match="dropout_rng"):
    jaxmha.apply(params, cfg, q, v, training=True)


@pytest.mark.parametrize("rng, error, match", [
    (0, TypeError, "got int"),
    (jnp.array([0.3, 0.7]), TypeError, "dtype float32"),
    (jnp.array([3, 4], jnp.int32), TypeError, "dtype int32"),
    (jax.random.split(jax.random.key(0)), ValueError, r"shape \(2,\)"),
    (jnp.zeros((2, 2), jnp.uint32), ValueError, r"shape \(2, 2\)"),
])
def test_dropout_rng_must_be_one_prng_key(rng, error, match):
  cfg, params, q, v = _setup()
  with pytest.raises(error, match=f"dropout_rng.*{match}"):
    jaxmha.apply(params, cfg, q, v, training=True, dropout_rng=rng)
  # A raw uint32 key is one key: the same bits as its typed form.
  raw = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(
      jaxmha.apply(params, cfg, q, v, training=True, dropout_rng=raw),
      jaxmha.apply(params, cfg, q, v, training=True,
                   dropout_rng=jax.random.wrap_key_data(raw)))


# -- transforms ----------------------------------------------------------------


def test_jit_grad_and_vmap_over_params():
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4)
  q = jax.random.normal(jax.random.key(0), (2, 5, 8))
  rngs = jax.random.split(jax.random.key(1), 4)
  ensemble = jax.vmap(lambda r: jaxmha.init_params(r, cfg, q.shape,
                                                   q.shape))(rngs)
  fn = jax.jit(jax.vmap(lambda p: jaxmha.apply(p, cfg, q, q,
                                               use_causal_mask=True)))
  stacked = fn(ensemble)
  for i in range(4):
    member = jax.tree.map(lambda x: x[i], ensemble)
    np.testing.assert_allclose(
        stacked[i], jaxmha.apply(member, cfg, q, q, use_causal_mask=True),
        atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: jaxmha.apply(p, cfg, q, q).sum()))(
      jax.tree.map(lambda x: x[0], ensemble))
  assert jax.tree.structure(grads) == jax.tree.structure(
      jax.tree.map(lambda x: x[0], ensemble))


def test_linen_module_equals_functional():
  layer = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, value_dim=3,
                                    use_gate=True, output_shape=(2, 3))
  q = jax.random.normal(jax.random.key(0), (2, 5, 8))
  v = jax.random.normal(jax.random.key(1), (2, 7, 6))
  variables = layer.init(jax.random.key(2), q, v)
  params = variables["params"]
  expected = jax.tree.map(jnp.shape, jaxmha.init_params(
      jax.random.key(0), layer.config, q.shape, v.shape))
  assert jax.tree.map(jnp.shape, params) == expected
  mask = jnp.tril(jnp.ones((5, 7), bool))
  out, scores = layer.apply(variables, q, v, attention_mask=mask,
                            return_attention_scores=True)
  f_out, f_scores = jaxmha.apply(params, layer.config, q, v,
                                 attention_mask=mask,
                                 return_attention_scores=True)
  np.testing.assert_array_equal(out, f_out)
  np.testing.assert_array_equal(scores, f_scores)
  # Nested lists and NumPy arrays, as apply takes them; shapes are refused.
  q_list, v_list = np.asarray(q).tolist(), np.asarray(v).tolist()
  np.testing.assert_array_equal(
      layer.apply(layer.init(jax.random.key(2), q_list, v_list), q_list,
                  v_list), layer.apply(variables, q, v))
  with pytest.raises(TypeError, match="Only jaxmha.explain takes shapes"):
    layer.init(jax.random.key(2), jax.ShapeDtypeStruct(q.shape, q.dtype), v)


def test_linen_dropout_rng_stream_and_missing_key():
  layer = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  variables = layer.init(jax.random.key(0), x, x)
  run = lambda r: layer.apply(variables, x, x, training=True,
                              rngs={"dropout": r})
  np.testing.assert_array_equal(run(jax.random.key(3)), run(jax.random.key(3)))
  assert not np.allclose(run(jax.random.key(3)), run(jax.random.key(4)))
  with pytest.raises(ValueError, match="dropout"):
    layer.apply(variables, x, x, training=True)
  # A traced `training` (jit without static_argnames, or nn.remat of the
  # layer, which traces call arguments) is a named error.
  with pytest.raises(TypeError, match="`training` must be a Python bool"):
    jax.jit(lambda t: layer.apply(variables, x, x, training=t,
                                  rngs={"dropout": jax.random.key(3)}))(True)


def test_linen_seed_layer_runs_inference_on_params_alone():
  layer = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5,
                                    seed=7)
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  variables = layer.init(jax.random.key(0), x, x)
  assert "dropout_counter" in variables
  params_only = {"params": variables["params"]}
  np.testing.assert_array_equal(layer.apply(params_only, x, x),
                                layer.apply(variables, x, x))
  # Training from the seed needs the counter: a clear error without it.
  with pytest.raises(ValueError, match="dropout_counter"):
    layer.apply(params_only, x, x, training=True)
  out, state = layer.apply(variables, x, x, training=True,
                           mutable=["dropout_counter"])
  assert int(state["dropout_counter"]["step"]) == 1
  assert not np.allclose(out, layer.apply(variables, x, x))


def test_linen_seed_layer_initialises_in_training_mode():
  """init with ``training=True`` and no dropout rng (as a parent module
  that initialises in training mode does) returns the variables it returns
  in inference mode, the counter at 0."""
  layer = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5,
                                    seed=7)
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  trained = layer.init(jax.random.key(0), x, x, training=True)
  inferred = layer.init(jax.random.key(0), x, x)
  assert int(trained["dropout_counter"]["step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, trained, inferred)
  # Without a seed, init falls back to the 'params' stream for dropout, as
  # Flax's own layers do; apply still needs a 'dropout' key.
  plain = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5)
  variables = plain.init(jax.random.key(0), x, x, training=True)
  jax.tree.map(np.testing.assert_array_equal, variables,
               plain.init(jax.random.key(0), x, x))
  with pytest.raises(ValueError, match="rngs=\\{'dropout': key\\}"):
    plain.apply(variables, x, x, training=True)


def test_modules_take_context_parallel_axis():
  """linen's and nnx's ``context_parallel_axis`` reach the config: their
  calls take the ring over that axis of the mesh (one device here; the
  multi-device checks cover the ring itself), but linen's init needs no
  mesh."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  kwargs = dict(num_heads=2, key_dim=4, context_parallel_axis="seq")
  x = jax.random.normal(jax.random.key(0), (2, 8, 8))
  linen = jaxmha.MultiHeadAttention(**kwargs)
  variables = linen.init(jax.random.key(1), x, x)
  nnx_layer = jaxmha.nnx.MultiHeadAttention(**kwargs, query_features=8,
                                            rngs=nnx.Rngs(1))
  layers = [
      ("linen", linen, variables["params"],
       lambda x: linen.apply(variables, x, x, use_causal_mask=True)),
      ("nnx", nnx_layer, nnx.to_pure_dict(nnx.state(nnx_layer, nnx.Param)),
       lambda x: nnx_layer(x, x, use_causal_mask=True))]
  for name, layer, params, call in layers:
    cfg = layer.config
    assert cfg.context_parallel_axis == "seq", name
    with pytest.raises(ValueError, match="context_parallel_axis='seq'"):
      call(x)  # no mesh: no axis to ring over
    with jax.set_mesh(jax.make_mesh((1,), ("seq",),
                                    axis_types=(AxisType.Auto,))):
      got = jax.jit(call)(x)
    want = jaxmha.apply(params, cfg.replace(context_parallel_axis=None), x,
                        x, use_causal_mask=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_linen_dtype_and_param_dtype():
  layer = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4,
                                    dtype=jnp.bfloat16,
                                    param_dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  variables = layer.init(jax.random.key(0), x, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = layer.apply(variables, x, x)
  assert out.dtype == jnp.bfloat16
  ref = jaxmha.apply(variables["params"], layer.config, x, x)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


def test_module_inside_a_model_trains():
  """The module composes with flax and optax in a jitted step."""
  import optax

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, training=False):
      x = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.1)(
          x, x, use_causal_mask=True, training=training)
      return nn.Dense(1)(x)

  model = Model()
  x = jax.random.normal(jax.random.key(0), (4, 6, 8))
  y = jnp.cumsum(x[..., :1], axis=1)
  params = model.init(jax.random.key(1), x)["params"]
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    def loss_fn(p):
      pred = model.apply({"params": p}, x, training=True,
                         rngs={"dropout": rng})
      return jnp.mean((pred - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(30):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0]


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=0, key_dim=4), "num_heads=0"),
    (dict(num_heads=2, key_dim=-1), "key_dim=-1"),
    (dict(num_heads=2, key_dim=4, value_dim=0), "value_dim=0"),
    (dict(num_heads=2, key_dim=4, dropout=1.5), "dropout=1.5"),
    (dict(num_heads=2, key_dim=4, output_shape=0), "output_shape=0"),
    (dict(num_heads=2, key_dim=4, sliding_window=0), "sliding_window=0"),
    (dict(num_heads=2, key_dim=4, attention_axes="x"), "attention_axes"),
    (dict(num_heads=2, key_dim=4, kernel_initializer="glorot_bogus"),
     "glorot_bogus"),
    (dict(num_heads=4, key_dim=4, num_key_value_heads=3),
     "num_key_value_heads"),
])
def test_config_errors_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jaxmha.MHAConfig(**kwargs)


def test_config_takes_numpy_and_jax_scalars_for_dropout():
  for rate in (np.float32(0.25), jnp.float32(0.25), np.float64(0.25),
               jnp.bfloat16(0.25)):
    cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4, dropout=rate)
    assert cfg.dropout == 0.25
  for rate in (True, None, jnp.array([0.1])):
    with pytest.raises(ValueError, match="dropout"):
      jaxmha.MHAConfig(num_heads=2, key_dim=4, dropout=rate)


def test_config_type_errors():
  with pytest.raises(TypeError, match="flash_attention"):
    jaxmha.MHAConfig(num_heads=2, key_dim=4, flash_attention="yes")
  with pytest.raises(TypeError, match="use_bias"):
    jaxmha.MHAConfig(num_heads=2, key_dim=4, use_bias=None)


def test_config_is_hashable_and_round_trips():
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4, output_shape=[3, 2],
                         attention_axes=1)
  assert cfg.output_shape == (3, 2) and cfg.attention_axes == (1,)
  assert hash(cfg) == hash(jaxmha.MHAConfig.from_config(cfg.get_config()))
  assert {cfg: 1}[jaxmha.MHAConfig.from_config(cfg.get_config())] == 1


def test_call_errors_name_the_argument_and_shapes():
  cfg, params, q, v = _setup(jaxmha.MHAConfig(num_heads=2, key_dim=8))
  cases = [
      (dict(query=q[0]), ValueError, "rank >= 3"),
      (dict(value=v[:1]), ValueError, "batch size"),
      (dict(value=v[..., :8]), ValueError, "value"),
      (dict(key=v[:, :3]), ValueError, "key_shape"),
      (dict(attention_mask=jnp.ones((2, 6, 5), bool)), ValueError,
       "attention_mask"),
      (dict(query_mask=jnp.ones((2, 5), bool)), ValueError, "query_mask"),
      (dict(value_mask=jnp.ones((3, 6), bool)), ValueError, "value_mask"),
      (dict(query=q.astype(jnp.int32)), TypeError, "query"),
      # The shape the user passed, not a reshaped one.
      (dict(attention_mask=jnp.ones((6, 5), bool)), ValueError,
       r"attention_mask.shape=\(6, 5\)"),
      (dict(attention_mask=np.full((2, 6, 6), "a")), TypeError,
       r"attention_mask.dtype=<U1, attention_mask.shape=\(2, 6, 6\)"),
      (dict(dtype=jnp.int32), TypeError, "dtype=int32"),
      (dict(dtype=jnp.bool_), TypeError, "dtype=bool"),
      (dict(dtype="bogus"), TypeError, "dtype='bogus'"),
      (dict(attention_mask=jnp.ones((2, 6, 6), jnp.complex64)), None, None),
  ]
  for overrides, error, match in cases:
    kw = dict(query=q, value=v)
    kw.update(overrides)
    query, value = kw.pop("query"), kw.pop("value")
    if error is None:
      jaxmha.apply(params, cfg, query, value, **kw)  # numeric mask: fine
      continue
    with pytest.raises(error, match=match):
      jaxmha.apply(params, cfg, query, value, **kw)
  with pytest.raises(TypeError, match="cfg"):
    jaxmha.apply(params, {"num_heads": 2}, q, v)
  # An entry the config does not have is not silently ignored.
  for extra in (jnp.ones(3), {"kernel": jnp.ones(3)}):
    with pytest.raises(ValueError, match="'extra'"):
      jaxmha.apply(dict(params, extra=extra), cfg, q, v)
  # Each entry that differs is named with its shape and the one expected.
  with pytest.raises(ValueError, match=(
      r"params\['query'\]\['kernel'\] has shape \(16, 2, 8\), expected "
      r"\(12, 2, 8\); params\['attention_output'\]\['kernel'\] has shape "
      r"\(2, 8, 16\), expected \(2, 8, 12\)")):
    jaxmha.apply(params, cfg, q[..., :12], v)
  with pytest.raises(ValueError, match=(
      r"params\['key'\]\['bias'\] is not expected by this configuration "
      r"\(use_bias=False\)")):
    jaxmha.apply(params, cfg.replace(use_bias=False), q, v)
  with pytest.raises(ValueError, match=(
      r"params\['value'\]\['bias'\] is missing \(expected shape \(2, 8\)\)")):
    jaxmha.apply(dict(params, value={"kernel": params["value"]["kernel"]}),
                 cfg, q, v)
  with pytest.raises(ValueError, match="attention_axes"):
    jaxmha.apply(params, cfg.replace(attention_axes=(2,)), q, v)


def test_traced_flags_and_bad_init_keys_are_named():
  """Flags that choose the program must be static under jit; init_params
  takes one PRNG key."""
  cfg, params, q, v = _setup()
  for flag in ("training", "use_causal_mask", "return_attention_scores"):
    call = jax.jit(lambda f, flag=flag: jaxmha.apply(
        params, cfg, q, v, dropout_rng=jax.random.key(0), **{flag: f}))
    with pytest.raises(TypeError, match=f"`{flag}` must be a Python bool"):
      call(True)
  with pytest.raises(TypeError, match="`rng` must be a PRNG key"):
    jaxmha.init_params(0, cfg, q.shape, v.shape)
  # Shapes are ints (8.7 features used to become 8); params leaves are
  # float arrays; a padding mask is not a scalar.
  with pytest.raises(TypeError, match="`query_shape` must be a shape"):
    jaxmha.init_params(jax.random.key(0), cfg, (2.0, 6.0, 16.7), v.shape)
  lists = {name: {leaf: np.asarray(x).tolist() for leaf, x in sub.items()}
           for name, sub in params.items()}
  with pytest.raises(TypeError, match=r"params\['query'\]\['kernel'\]"):
    jaxmha.apply(lists, cfg, q, v)
  with pytest.raises(ValueError, match="`value_mask` must have shape"):
    jaxmha.apply(params, cfg, q, v, value_mask=0)
  with pytest.raises(ValueError, match="`rng` must be a single PRNG key"):
    jaxmha.init_params(jax.random.split(jax.random.key(0)), cfg, q.shape,
                       v.shape)
  # A raw uint32 key is one key.
  raw = jaxmha.init_params(jax.random.PRNGKey(3), cfg, q.shape, v.shape)
  typed = jaxmha.init_params(jax.random.key(3), cfg, q.shape, v.shape)
  np.testing.assert_array_equal(raw["query"]["kernel"],
                                typed["query"]["kernel"])


def test_forced_flash_refusal_is_a_clear_error():
  cfg, params, q, v = _setup(jaxmha.MHAConfig(num_heads=2, key_dim=8,
                                              flash_attention=True))
  # A ValueError, as every bad input is, and a NotImplementedError.
  for error in (jaxmha.UnsupportedCallError, ValueError, NotImplementedError):
    with pytest.raises(error, match="return_attention_scores"):
      jaxmha.apply(params, cfg, q, v, return_attention_scores=True)


def test_context_parallel_attention_mask_is_refused_before_its_shape():
  cfg, params, q, v = _setup(jaxmha.MHAConfig(
      num_heads=2, key_dim=8, context_parallel_axis="seq"))
  for mask in (jnp.ones((2, 6, 6), bool), jnp.ones((2, 3, 6), bool)):
    with pytest.raises(jaxmha.UnsupportedCallError,
                       match="context_parallel_axis='seq'.*attention_mask"):
      jaxmha.apply(params, cfg, q, v, attention_mask=mask)


def test_global_flash_switch_and_per_layer_false():
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=8)
  x = jax.ShapeDtypeStruct((1, 5, 16), jnp.float32)
  try:
    jaxmha.config.disable_flash_attention()
    assert jaxmha.config.is_flash_attention_enabled() is False
    assert "flash_attention=False" in jaxmha.explain(cfg, x, x).refusals[
        "flash"]
    jaxmha.config.enable_flash_attention()
    # A per-layer False really means False, whatever the global switch.
    explanation = jaxmha.explain(cfg.replace(flash_attention=False), x, x)
    assert explanation.path == "xla"
    assert explanation.refusals["flash"] == "flash_attention=False"
  finally:
    jaxmha.config._FLASH_ATTENTION_GLOBAL = None  # pylint: disable=protected-access


def test_flash_serves_under_a_mesh_that_jit_partitions_over():
  """The kernels are split per batch/head shard under jit
  (``pallas_kernels.partitioning``), so a mesh, of any axis type, does not
  turn the default away from the flash kernel."""
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=64)
  x = jax.ShapeDtypeStruct((2, 256, 128), jnp.float32)
  mesh = lambda n, kind: jax.sharding.use_abstract_mesh(
      AbstractMesh((n,), ("data",), axis_types=(kind,)))
  with mock.patch.object(jax, "default_backend", lambda: "gpu"):
    assert jaxmha.explain(cfg, x, x).path == "flash"
    for kind in (AxisType.Auto, AxisType.Explicit, AxisType.Manual):
      with mesh(2, kind):
        explanation = jaxmha.explain(cfg, x, x)
        assert explanation.path == "flash", (kind, explanation)


def test_explain_names_the_blockwise_path_for_long_sequences():
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=8)
  x = jax.ShapeDtypeStruct((1, 4096, 16), jnp.float32)
  assert jaxmha.explain(cfg, x, x).path == "xla_blockwise"
  lists = np.ones((1, 5, 16)).tolist()  # as apply, explain takes lists
  assert jaxmha.explain(cfg, lists, lists).path == "xla"
  # Without a band, the fused path serves up to 256 positions.
  x = jax.ShapeDtypeStruct((1, 192, 16), jnp.float32)
  assert jaxmha.explain(cfg, x, x, use_causal_mask=True).path == (
      "xla_blockwise")
  how = jaxmha.explain(cfg, x, x)
  assert how.path == "xla", how
  assert "< 256, with no causal mask or window" in how.refusals[
      "xla_blockwise"], how
  x = jax.ShapeDtypeStruct((1, 256, 16), jnp.float32)
  assert jaxmha.explain(cfg, x, x).path == "xla_blockwise"


def test_explain_takes_shapes_for_masks_and_apply_refuses_shapes():
  """A mask given to explain as a ``jax.ShapeDtypeStruct`` is checked and
  dispatched as an array of its shape would be; apply names any shape it is
  given where it needs an array."""
  cfg, params, q, v = _setup(jaxmha.MHAConfig(num_heads=2, key_dim=64),
                             B=2, T=256, S=192)
  shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  masks = dict(attention_mask=jnp.ones((2, 256, 192), bool),
               query_mask=jnp.ones((2, 256), bool),
               value_mask=jnp.ones((1, 192), jnp.int32))
  with mock.patch.object(jax, "default_backend", lambda: "gpu"):
    for name, mask in masks.items():
      by_array = jaxmha.explain(cfg, q, v, **{name: mask})
      by_shape = jaxmha.explain(cfg, shape(q), shape(v), **{name: shape(mask)})
      assert by_shape == by_array, name
  bad = jax.ShapeDtypeStruct((7, 9), jnp.bool_)
  for name in masks:
    with pytest.raises(ValueError, match=rf"`{name}`.*\(7, 9\)"):
      jaxmha.explain(cfg, q, v, **{name: bad})
    with pytest.raises(TypeError, match=rf"`{name}` must be an array.*"
                       r"ShapeDtypeStruct\(shape=\(7, 9\)"):
      jaxmha.apply(params, cfg, q, v, **{name: bad})
  with pytest.raises(TypeError, match="`query` must be an array"):
    jaxmha.apply(params, cfg, shape(q), v)


def test_symbolic_shapes_export_on_the_fused_path():
  """jax.export with a symbolic batch and length: the fused path serves it
  (the blockwise path and the kernels size blocks from the shapes, and say
  so), with masks, dropout and GQA, forward and gradient."""
  cfg = jaxmha.MHAConfig(num_heads=4, key_dim=8, num_key_value_heads=2,
                         dropout=0.1)
  cfg, params, q, _ = _setup(cfg, B=2, T=160, S=160)
  value_mask = jnp.arange(160) < jnp.array([[150], [90]])  # (B, S)
  rng = jax.random.key(7)

  def loss(params, x, value_mask):
    out = jaxmha.apply(params, cfg, x, x, value_mask=value_mask,
                       use_causal_mask=True, training=True, dropout_rng=rng)
    return jnp.sum(out ** 2)

  b, t = jax.export.symbolic_shape("b, t")
  x_spec = jax.ShapeDtypeStruct((b, t, q.shape[-1]), q.dtype)
  mask_spec = jax.ShapeDtypeStruct((b, t), jnp.bool_)
  how = jaxmha.explain(cfg, x_spec, x_spec, value_mask=mask_spec,
                       use_causal_mask=True)
  assert how.path == "xla", how
  assert "symbolic shapes" in how.refusals["xla_blockwise"], how
  fn = jax.value_and_grad(loss, argnums=(0, 1))
  exported = jax.export.export(jax.jit(fn))(params, x_spec, mask_spec)
  got = exported.call(params, q, value_mask)
  want = jax.jit(fn)(params, q, value_mask)  # T=160: blockwise
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  flash = cfg.replace(flash_attention=True)
  with pytest.raises(jaxmha.UnsupportedCallError, match="symbolic shapes"):
    jax.export.export(jax.jit(
        lambda p, x: jaxmha.apply(p, flash, x, x)))(params, x_spec)
  qkv = jax.ShapeDtypeStruct((b, t, 2, 8), jnp.float32)
  with pytest.raises(jaxmha.UnsupportedCallError, match="symbolic shapes"):
    jax.export.export(jax.jit(lambda q: pallas_kernels.flash_attention(
        q, q, q, backend="xla")))(qkv)


def test_apply_with_projections_takes_apply_defaults():
  """Called with apply's positional arguments alone, it returns apply's
  output and each projection's."""
  cfg, params, q, v = _setup(jaxmha.MHAConfig(num_heads=2, key_dim=8))
  out, scores, projections = jaxmha.functional.apply_with_projections(
      params, cfg, q, v)
  np.testing.assert_array_equal(out, jaxmha.apply(params, cfg, q, v))
  assert scores is None
  np.testing.assert_array_equal(projections["attention_output"], out)
  np.testing.assert_allclose(
      projections["query"],
      jnp.einsum("btd,dnh->btnh", q, params["query"]["kernel"])
      + params["query"]["bias"], rtol=1e-6, atol=1e-6)


def test_forward_mode_autodiff_on_the_fused_path():
  """The README's rule: jvp of the custom_vjp blockwise path fails, with an
  error that says so, and ``use_path("xla")`` gives it at any length;
  forward over reverse works on the blockwise path."""
  cfg, params, q, v = _setup(jaxmha.MHAConfig(num_heads=2, key_dim=8), B=1,
                             T=160, S=160)
  f = lambda x: jaxmha.apply(params, cfg, x, v, use_causal_mask=True)
  t = jax.random.normal(jax.random.key(9), q.shape)
  # Each transform under its own jit: the path is picked when it traces.
  jvp = lambda f: jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))
  # Blockwise from 128 positions. Called eagerly, JAX raises its error
  # while jaxmha traces, which names the path and the way out, for jvp and
  # jacfwd alike; under jit, when it lowers the program.
  refusal = (r"cannot differentiate the 'xla_blockwise' attention path .*"
             r"T=160, S=160.*use_path\(\"xla\"\)")
  with pytest.raises(TypeError, match=refusal):
    jax.jvp(f, (q,), (t,))
  with pytest.raises(TypeError, match=refusal):
    jax.jacfwd(lambda x: f(x)[0, -1, 0])(q)
  with pytest.raises(TypeError, match="forward-mode autodiff"):
    jvp(f)(q, t)
  with jaxmha.dispatch.use_path("xla"):
    out, tangent = jvp(f)(q, t)
  np.testing.assert_allclose(out, jax.jit(f)(q), rtol=1e-5, atol=1e-5)
  # The tangent equals the blockwise path's linearisation, by reverse mode.
  cot = jax.random.normal(jax.random.key(10), out.shape)
  vjp = jax.jit(lambda x, cot: jax.vjp(f, x)[1](cot)[0])
  np.testing.assert_allclose(jnp.vdot(tangent, cot), jnp.vdot(t, vjp(q, cot)),
                             rtol=1e-4)
  # Forward over reverse (a Hessian-vector product) on the blockwise path.
  grad = jax.grad(lambda x: jnp.sum(f(x) ** 2))
  hvp = jvp(grad)(q, t)[1]
  with jaxmha.dispatch.use_path("xla"):
    want = jvp(grad)(q, t)[1]
  np.testing.assert_allclose(hvp, want, rtol=1e-3, atol=1e-3)



def test_reverse_over_reverse_on_the_blockwise_path():
  """``jax.grad`` of ``jax.grad`` (a gradient penalty, as in WGAN-GP or
  MAML) runs on the blockwise path, the CPU default from 128 positions, and
  equals the fused path's, also under ``vmap`` over models with dropout."""
  cfg, params, x, _ = _setup(B=2, T=160, S=160)  # dropout 0.3
  models = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p]), params)
  keys = jax.random.split(jax.random.key(3), 2)

  def penalty(params, key):
    f = lambda x: jnp.sum(jnp.sin(jaxmha.apply(
        params, cfg, x, x, use_causal_mask=True, training=True,
        dropout_rng=key)))
    return jnp.sum(jax.grad(f)(x) ** 2)

  # Each under its own jit: the path is picked when it traces.
  second = lambda: jax.jit(jax.vmap(jax.grad(penalty)))(models, keys)
  assert jaxmha.explain(cfg, x, x, use_causal_mask=True).path == (
      "xla_blockwise")
  got = second()
  with jaxmha.dispatch.use_path("xla"):
    want = second()
  _assert_gradients_close(got, want)


def test_second_derivatives_of_layers_under_nn_scan():
  """In a stack of layers under Flax's ``nn.scan``, ``jax.grad`` of
  ``jax.grad`` runs on the default (blockwise) path and equals the fused
  path's. ``jax.jvp`` of ``jax.grad`` there needs the fused path, and the
  default path says so with JAX's forward-mode error."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      y = jaxmha.linen.MultiHeadAttention(num_heads=2, key_dim=8)(
          x, x, use_causal_mask=True)
      return x + y, None

  x = jax.random.normal(jax.random.key(0), (2, 160, 16))

  def programs():
    """``(gradient of a gradient penalty, Hessian-vector product in x)``,
    jitted, traced afresh: the path is picked when they trace."""
    stack = nn.scan(Block, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=2)()
    grad_x = jax.grad(lambda params, x: jnp.sum(jnp.sin(
        stack.apply(params, x, None)[0])), 1)
    penalty = lambda params: jnp.sum(grad_x(params, x) ** 2)
    hvp = lambda params: jax.jvp(lambda x: grad_x(params, x), (x,), (x,))[1]
    return (stack.init(jax.random.key(1), x, None), jax.jit(jax.grad(penalty)),
            jax.jit(hvp))

  assert jaxmha.explain(jaxmha.MHAConfig(num_heads=2, key_dim=8), x, x,
                        use_causal_mask=True).path == "xla_blockwise"
  params, grad_penalty, hvp = programs()
  got = grad_penalty(params)
  with pytest.raises(TypeError, match="forward-mode"):
    hvp(params)
  with jaxmha.dispatch.use_path("xla"):
    params, grad_penalty, hvp = programs()
    want = grad_penalty(params)
    assert bool(jnp.all(jnp.isfinite(hvp(params))))
  _assert_gradients_close(got, want)


def _assert_gradients_close(got, want):
  """Parameter gradients, leaf by leaf, on the scale of the whole gradient:
  the key bias's is zero but for rounding (softmax ignores a shift shared by
  a row)."""
  scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale)


# -- property test against an independent implementation ------------------------


@hypothesis.given(
    B=st.integers(1, 2), T=st.integers(1, 7), S=st.integers(1, 7),
    N=st.integers(1, 3), H=st.sampled_from([2, 5]),
    causal=st.booleans(), window=st.sampled_from([None, 1, 3]),
    use_query=st.booleans(), use_value=st.booleans(),
    use_attention=st.booleans(), gate=st.booleans(),
    seed=st.integers(0, 2**16))
def test_random_shapes_and_masks_match_numpy(B, T, S, N, H, causal, window,
                                             use_query, use_value,
                                             use_attention, gate, seed):
  rng = np.random.default_rng(seed)
  cfg = jaxmha.MHAConfig(num_heads=N, key_dim=H, sliding_window=window,
                         use_gate=gate)
  q = rng.normal(size=(B, T, 6)).astype(np.float32)
  v = rng.normal(size=(B, S, 5)).astype(np.float32)
  params = jaxmha.init_params(jax.random.key(seed), cfg, q.shape, v.shape)
  params = jax.tree.map(lambda x: x + 0.1, params)  # nonzero biases
  allowed = np.ones((B, 1, T, S), bool)
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  kw = {}
  if causal:
    allowed &= j <= i
  if window:
    allowed &= np.abs(i - j) < window
  if use_query:  # includes fully masked rows
    kw["query_mask"] = rng.random((B, T)) > 0.3
    allowed &= kw["query_mask"][:, None, :, None]
  if use_value:  # may mask every key of an example
    kw["value_mask"] = rng.random((B, S)) > 0.4
    allowed &= kw["value_mask"][:, None, None, :]
  if use_attention:
    kw["attention_mask"] = rng.random((B, T, S)) > 0.3
    allowed &= kw["attention_mask"][:, None]
  # Under jit: each example is one compilation instead of one per op.
  layer = jax.jit(lambda params, q, v, kw: jaxmha.apply(
      params, cfg, q, v, use_causal_mask=causal, return_attention_scores=True,
      **kw))
  out, scores = layer(params, q, v, kw)
  expected, weights = naive_mha(params, q, v, v, allowed, use_gate=gate)
  assert out.shape == (B, T, 6) and scores.shape == (B, N, T, S)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, expected, **KERAS)
  np.testing.assert_allclose(scores, weights, **KERAS)
