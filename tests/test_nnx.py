"""The Flax NNX module: the same params tree and numbers as the functional
API and the linen module, dropout keys, regularizers and constraints, and
NNX's transforms (jit, grad, vmap, split/merge, an Optimizer step).

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, D/Dv/Dk input features, E output features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmha
from jaxmha.nnx import DropoutCounter
from jaxmha.nnx import MultiHeadAttention


def _inputs(B=2, T=5, S=7, D=8, Dv=6, seed=0):
  rng_q, rng_v = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(rng_q, (B, T, D)),
          jax.random.normal(rng_v, (B, S, Dv)))


def _pure_params(layer) -> dict:
  return nnx.to_pure_dict(nnx.state(layer, nnx.Param))


def _load(layer, params) -> None:
  state = nnx.state(layer, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(layer, state)


LAYERS = {
    "plain": dict(num_heads=2, key_dim=4),
    "gate_value_dim_output_shape": dict(num_heads=2, key_dim=4, value_dim=3,
                                        use_gate=True, output_shape=(2, 3)),
    "no_bias_gqa": dict(num_heads=4, key_dim=4, use_bias=False,
                        num_key_value_heads=2),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_params_tree_is_the_functional_tree(name):
  kwargs = LAYERS[name]
  q, v = _inputs()
  layer = MultiHeadAttention(**kwargs, query_features=8, value_features=6,
                             rngs=nnx.Rngs(0))
  expected = jaxmha.param_shapes(layer.config, q.shape, v.shape)
  assert jax.tree.map(jnp.shape, _pure_params(layer)) == expected
  assert jax.tree.structure(_pure_params(layer)) == jax.tree.structure(
      layer.params())


@pytest.mark.parametrize("name", list(LAYERS))
def test_nnx_linen_functional_give_identical_outputs(name):
  kwargs = LAYERS[name]
  q, v = _inputs()
  mask = jnp.tril(jnp.ones((5, 7), bool))
  linen = jaxmha.MultiHeadAttention(**kwargs)
  params = linen.init(jax.random.key(3), q, v)["params"]
  layer = MultiHeadAttention(**kwargs, query_features=8, value_features=6,
                             rngs=nnx.Rngs(0))
  _load(layer, params)  # linen -> nnx, no conversion
  jax.tree.map(np.testing.assert_array_equal, _pure_params(layer), params)
  out, scores = layer(q, v, attention_mask=mask, return_attention_scores=True)
  l_out, l_scores = linen.apply({"params": params}, q, v,
                                attention_mask=mask,
                                return_attention_scores=True)
  f_out, f_scores = jaxmha.apply(params, layer.config, q, v,
                                 attention_mask=mask,
                                 return_attention_scores=True)
  for a, b in ((out, l_out), (out, f_out), (scores, l_scores),
               (scores, f_scores)):
    np.testing.assert_array_equal(a, b)


def test_rank4_attention_axes_match_functional():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
  layer = MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2),
                             query_features=8, rngs=nnx.Rngs(0))
  out = layer(x, x, use_causal_mask=True)
  expected = jaxmha.apply(_pure_params(layer), layer.config, x, x,
                          use_causal_mask=True)
  np.testing.assert_array_equal(out, expected)
  assert out.shape == x.shape


def test_dropout_keys_from_rngs_and_from_seed_like_linen():
  q, _ = _inputs()
  layer = MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5,
                             query_features=8, rngs=nnx.Rngs(0, dropout=1))
  a = layer(q, q, training=True)
  b = layer(q, q, training=True)  # the stream advanced
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(layer(q, q), layer(q, q))  # eval: no dropout
  # A key passed to the call wins and is reproducible; it is the same mask
  # the functional API draws from that key.
  key = jax.random.key(7)
  np.testing.assert_array_equal(
      layer(q, q, training=True, rngs=key),
      jaxmha.apply(_pure_params(layer), layer.config, q, q, training=True,
                   dropout_rng=key))
  # seed=: keys fold a DropoutCounter into the seed, as linen does.
  seeded = MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5, seed=3,
                              query_features=8, rngs=nnx.Rngs(0))
  linen = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5,
                                    seed=3)
  variables = {"params": _pure_params(seeded),
               "dropout_counter": {"step": jnp.zeros((), jnp.uint32)}}
  for _ in range(2):
    expected, state = linen.apply(variables, q, q, training=True,
                                  mutable=["dropout_counter"])
    variables = {**variables, **state}
    np.testing.assert_array_equal(seeded(q, q, training=True), expected)
  assert int(seeded.dropout_counter[...]) == 2
  assert list(nnx.to_pure_dict(nnx.state(seeded, DropoutCounter))) == [
      "dropout_counter"]


def test_regularization_loss_matches_linen_and_constraints_apply():
  q, v = _inputs()
  kwargs = dict(num_heads=2, key_dim=4, kernel_regularizer="l2",
                bias_regularizer="l1", activity_regularizer="l2",
                kernel_constraint="non_neg")
  layer = MultiHeadAttention(**kwargs, query_features=8, value_features=6,
                             rngs=nnx.Rngs(0))
  params = jax.tree.map(lambda p: p + 0.1, _pure_params(layer))
  _load(layer, params)
  layer(q, v)
  linen = jaxmha.MultiHeadAttention(**kwargs)
  _, state = linen.apply({"params": params}, q, v, mutable=["losses"])
  np.testing.assert_allclose(layer.regularization_loss(),
                             jaxmha.regularization_loss(state), rtol=1e-6)
  layer.apply_constraints()
  assert all(bool((sub["kernel"] >= 0).all())
             for sub in _pure_params(layer).values())
  np.testing.assert_array_equal(_pure_params(layer)["query"]["bias"],
                                params["query"]["bias"])


def test_a_stack_of_layers_regularizes_and_constrains_each_layer():
  """Layers made with nnx.vmap hold stacked (L, ...) params: the
  regularization loss is a scalar, the sum of the layers' own, and
  constraints act on each layer's kernels (not over the layer axis)."""
  L = 3
  kw = dict(num_heads=2, key_dim=4, query_features=8,
            kernel_regularizer="l2", activity_regularizer="l2",
            kernel_constraint="max_norm")

  @nnx.split_rngs(splits=L)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return MultiHeadAttention(**kw, rngs=rngs)

  layers = create(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  nnx.vmap(lambda layer: layer(x, x), in_axes=(0,))(layers)
  total = layers.regularization_loss()
  per_layer = nnx.vmap(lambda layer: layer.regularization_loss())(layers)
  assert total.shape == ()
  np.testing.assert_allclose(total, per_layer.sum(), rtol=1e-6)
  params = layers.params()
  params["query"]["kernel"] = 10.0 * params["query"]["kernel"]  # past 2
  stacked = jaxmha.apply_constraints(params, "max_norm")
  each = jax.vmap(lambda p: jaxmha.apply_constraints(p, "max_norm"))(params)
  for name in stacked:
    np.testing.assert_allclose(stacked[name]["kernel"], each[name]["kernel"],
                               rtol=1e-6)
  norms = jnp.sqrt(jnp.sum(stacked["query"]["kernel"] ** 2, axis=1))
  assert float(norms.max()) <= 2.0 + 1e-5


def test_train_and_eval_switch_dropout_like_flax_layers():
  """model.train()/eval() reach the layer as they reach nnx.Dropout; an
  explicit training= wins; by default the layer infers, as in Keras."""

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.attn = MultiHeadAttention(num_heads=2, key_dim=4, query_features=8,
                                     dropout=0.5, rngs=rngs)

    def __call__(self, x, **kw):
      return self.attn(x, x, **kw)

  block = Block(nnx.Rngs(0, dropout=1))
  x = jax.random.normal(jax.random.key(2), (2, 5, 8))
  inference = block.attn(x, x, training=False)
  np.testing.assert_array_equal(block(x), inference)  # never set: infers
  block.train()
  assert block.attn.deterministic is False
  assert not np.allclose(block(x), inference)
  np.testing.assert_array_equal(block(x, training=False), inference)
  block.eval()
  np.testing.assert_array_equal(block(x), inference)
  assert not np.allclose(block(x, training=True), inference)


def test_jit_grad_split_merge():
  q, v = _inputs()
  layer = MultiHeadAttention(num_heads=2, key_dim=4, query_features=8,
                             value_features=6, rngs=nnx.Rngs(0))
  eager = layer(q, v, use_causal_mask=True)
  jitted = nnx.jit(lambda m, q, v: m(q, v, use_causal_mask=True))(layer, q, v)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)

  graphdef, state = nnx.split(layer)
  merged = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(merged(q, v, use_causal_mask=True), eager)

  loss = lambda m: jnp.sum(m(q, v, use_causal_mask=True) ** 2)
  grads = nnx.grad(loss)(layer)
  f_grads = jax.grad(lambda p: jnp.sum(jaxmha.apply(
      p, layer.config, q, v, use_causal_mask=True) ** 2))(_pure_params(layer))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               nnx.to_pure_dict(grads), f_grads)


def test_vmap_over_inputs_and_over_an_ensemble():
  q, v = _inputs()
  layer = MultiHeadAttention(num_heads=2, key_dim=4, query_features=8,
                             value_features=6, rngs=nnx.Rngs(0))
  per_example = nnx.vmap(lambda m, q, v: m(q[None], v[None])[0],
                         in_axes=(None, 0, 0))(layer, q, v)
  np.testing.assert_allclose(per_example, layer(q, v), atol=1e-6)

  rngs = jax.random.split(jax.random.key(1), 3)
  ensemble = nnx.vmap(lambda r: MultiHeadAttention(
      num_heads=2, key_dim=4, query_features=8, value_features=6,
      rngs=nnx.Rngs(r)))(rngs)
  outs = nnx.vmap(lambda m, q, v: m(q, v), in_axes=(0, None, None))(
      ensemble, q, v)
  stacked = _pure_params(ensemble)
  for i in range(3):
    member = jax.tree.map(lambda x: x[i], stacked)
    np.testing.assert_allclose(outs[i], jaxmha.apply(member, layer.config,
                                                     q, v), atol=1e-5)


def test_optimizer_training_step_lowers_the_loss():
  x = jax.random.normal(jax.random.key(0), (4, 6, 8))
  y = jnp.cumsum(x, axis=1) / 3.0

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.attention = MultiHeadAttention(
          num_heads=2, key_dim=4, dropout=0.1, kernel_regularizer="l2",
          query_features=8, rngs=rngs)
      self.out = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x, training=False):
      h = self.attention(x, x, use_causal_mask=True, training=training)
      return self.out(h)

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      pred = model(x, training=True)
      return (jnp.mean((pred - y) ** 2)
              + 1e-4 * model.attention.regularization_loss())
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.7 * losses[0]


def test_cache_argument_returns_output_and_cache():
  x, _ = _inputs(T=6)
  layer = MultiHeadAttention(num_heads=4, key_dim=4, num_key_value_heads=2,
                             query_features=8, rngs=nnx.Rngs(0))
  cache = jaxmha.init_cache(layer.config, batch_size=2, max_length=6)
  out, cache = layer(x, x, cache=cache, new_lengths=jnp.array([6, 3]))
  np.testing.assert_array_equal(cache.lengths, [6, 3])
  np.testing.assert_allclose(out, layer(x, x, use_causal_mask=True)
                             .at[1, 3:].set(out[1, 3:]), atol=2e-5)


def test_errors_name_the_argument():
  # NumPy ints are sizes, as in MHAConfig; bools are not.
  layer = MultiHeadAttention(num_heads=2, key_dim=4,
                             query_features=np.int64(8), rngs=nnx.Rngs(0))
  assert type(layer.query_features) is int and layer.key_features == 8
  with pytest.raises(ValueError, match="value_features=True"):
    MultiHeadAttention(num_heads=2, key_dim=4, query_features=8,
                       value_features=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="query_features=0"):
    MultiHeadAttention(num_heads=2, key_dim=4, query_features=0,
                       rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads=0"):
    MultiHeadAttention(num_heads=0, key_dim=4, query_features=8,
                       rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="seed"):
    MultiHeadAttention(num_heads=2, key_dim=4, seed="x", query_features=8,
                       rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="param_dtype=int32"):
    MultiHeadAttention(num_heads=2, key_dim=4, query_features=8,
                       param_dtype="int32", rngs=nnx.Rngs(0))
  layer = MultiHeadAttention(num_heads=2, key_dim=4, query_features=8,
                             rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"query_features.*\(2, 5, 6\)"):
    layer(jnp.ones((2, 5, 6)), jnp.ones((2, 5, 8)))
  for kw, error, match in (
      (dict(kernel_regularizer="l3"), ValueError, "`kernel_regularizer`='l3'"),
      (dict(bias_constraint=3), ValueError, "`bias_constraint`=3"),
      (dict(param_dtype="int32"), TypeError, "param_dtype=int32"),
      (dict(dtype="nope"), TypeError, "dtype='nope'")):
    with pytest.raises(error, match=match):
      MultiHeadAttention(num_heads=2, key_dim=4, query_features=8,
                         rngs=nnx.Rngs(0), **kw)
  # Dropout without a seed needs a stream to fork; Rngs' default one will do.
  with pytest.raises(ValueError, match="'dropout' stream"):
    MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.3, query_features=8,
                       rngs=nnx.Rngs(params=0))
  dropping = MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.3,
                                query_features=8, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 5, 8))
  with pytest.raises(TypeError, match="`rngs` must be"):
    dropping(x, x, training=True, rngs=5)
