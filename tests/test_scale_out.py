"""Scale out: transforms, sharded parameters, ring attention, multi-process.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, D model features, P devices.

Single-device checks run here: ``jit``, ``grad`` and ``vmap`` (over batch,
over params as an ensemble, nested) of the functional API and the Flax
module, the partition-spec helpers, the zigzag layout and argument errors.
Checks that need several devices (``pmap``, sharded inputs and params, ring
attention on 2/4/8 devices, compiled HLO and memory, two processes) are
scripts in ``tests/multidevice`` run in subprocesses with 8 forced host
devices, since this process's JAX is already initialised with one.
"""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxmha
from jaxmha import ring
from tests.multidevice import harness
from tests.multidevice import multiprocess_checks
from tests.tolerances import FORWARD, GRAD, assert_close


# Jitted: eager initialisation compiles every random op on its own.
_init = jax.jit(jaxmha.init_params, static_argnums=(1, 2, 3))


def _setup(B=3, T=6, D=8, seed=0, cfg=None):
  cfg = cfg or jaxmha.MHAConfig(num_heads=2, key_dim=4,
                                num_key_value_heads=1)
  rng = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(rng[0], (B, T, D))
  y = jax.random.normal(rng[1], (B, T, D))
  params = _init(rng[2], cfg, x.shape, y.shape)
  return cfg, params, x, y


def _assert_trees_close(got, want, table=FORWARD):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w, table)


# -- transforms on one device --------------------------------------------------


def test_vmap_over_batch_equals_the_batched_call():
  cfg, params, x, y = _setup()
  xs, ys = x.reshape(3, 1, 6, 8), y.reshape(3, 1, 6, 8)
  fn = lambda x, y: jaxmha.apply(params, cfg, x, y, use_causal_mask=True)
  both = lambda x, y: jax.value_and_grad(lambda x: jnp.sum(fn(x, y) ** 2))(x)
  values, grads = jax.jit(jax.vmap(both))(xs, ys)  # (3,), (3, 1, T, D)
  want_grads = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, y) ** 2)))(x)
  assert_close(jnp.sum(values), jnp.sum(jax.jit(fn)(x, y) ** 2))
  assert_close(grads.reshape(x.shape), want_grads, GRAD)


def test_vmap_over_params_ensemble_with_grads_and_dropout():
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4, dropout=0.3)
  _, _, x, y = _setup(cfg=cfg)
  members = jax.random.split(jax.random.key(1), 4)
  ensemble = jax.jit(jax.vmap(lambda r: jaxmha.init_params(
      r, cfg, x.shape, y.shape)))(members)
  drop = jax.random.split(jax.random.key(2), 4)

  def loss(params, rng):
    out = jaxmha.apply(params, cfg, x, y, training=True, dropout_rng=rng)
    return jnp.sum(out ** 2)

  values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(ensemble, drop)
  one = jax.jit(jax.value_and_grad(loss))
  for i in range(4):
    member = jax.tree.map(lambda a: a[i], ensemble)
    value, grad = one(member, drop[i])
    assert_close(values[i], value)
    _assert_trees_close(jax.tree.map(lambda g: g[i], grads), grad, GRAD)


def test_nested_vmap_ensemble_of_batches():
  cfg, _, x, y = _setup()
  ensemble = jax.jit(jax.vmap(lambda r: jaxmha.init_params(
      r, cfg, x.shape, y.shape)))(jax.random.split(jax.random.key(1), 2))
  xs = jnp.stack([x, 2 * x]).reshape(2, 3, 1, 6, 8)  # (members, B, 1, T, D)
  inner = lambda p, x: jaxmha.apply(p, cfg, x, x, use_causal_mask=True)
  got = jax.jit(jax.vmap(jax.vmap(inner, in_axes=(None, 0))))(ensemble, xs)
  for i in range(2):
    member = jax.tree.map(lambda a: a[i], ensemble)
    want = jax.jit(inner)(member, xs[i].reshape(3, 6, 8))
    assert_close(got[i].reshape(3, 6, 8), want)


def test_linen_module_under_jit_grad_and_vmap():
  layer = jaxmha.MultiHeadAttention(num_heads=2, key_dim=4)
  _, _, x, y = _setup()
  stacked = jax.jit(jax.vmap(lambda r: layer.init(r, x, y)))(
      jax.random.split(jax.random.key(1), 3))
  loss = lambda v, x: jnp.sum(layer.apply(v, x, y, use_causal_mask=True) ** 2)
  values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss),
                                   in_axes=(0, None)))(stacked, x)
  one = jax.jit(jax.value_and_grad(loss))
  # The module's params are the functional params tree.
  functional = jax.jit(lambda p, x: jnp.sum(jaxmha.apply(
      p, layer.config, x, y, use_causal_mask=True) ** 2))
  for i in range(3):
    member = jax.tree.map(lambda a: a[i], stacked)
    value, grad = one(member, x)
    assert_close(values[i], value)
    _assert_trees_close(jax.tree.map(lambda g: g[i], grads), grad, GRAD)
    assert_close(functional(member["params"], x), value)


# -- partition specs -----------------------------------------------------------


def test_param_partition_specs_follow_the_logical_axes():
  cfg = jaxmha.MHAConfig(num_heads=4, key_dim=8, num_key_value_heads=2,
                         output_shape=(3, 5), use_gate=True)
  params = jax.eval_shape(lambda: jaxmha.init_params(
      jax.random.key(0), cfg, (1, 6, 16), (1, 6, 12)))
  specs = jaxmha.param_partition_specs(
      params, [("heads", "model"), ("kv_heads", "model"),
               ("embed", ("data", "fsdp"))])
  assert specs["query"] == {"kernel": P(("data", "fsdp"), "model", None),
                            "bias": P("model", None)}
  assert specs["value"]["kernel"] == P(("data", "fsdp"), "model", None)
  assert specs["gate"]["bias"] == P("model", None)
  # A multi-dim output_shape: only its first dim is "embed".
  assert specs["attention_output"] == {
      "kernel": P("model", None, ("data", "fsdp"), None),
      "bias": P(("data", "fsdp"), None)}


def test_partition_specs_find_the_layer_inside_a_model_and_optimizer_state():
  import optax  # pylint: disable=g-import-not-at-top

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8, name="query")(x)  # a Dense named like a sub-layer
      return jaxmha.MultiHeadAttention(num_heads=2, key_dim=4, name="attn")(
          x, x)

  variables = jax.eval_shape(Model().init, jax.random.key(0),
                             jnp.ones((1, 4, 8)))
  specs = jaxmha.param_partition_specs(variables, {"heads": "model"})
  assert specs["params"]["attn"]["query"]["kernel"] == P(None, "model", None)
  # No rule for kv_heads: the key projection is replicated.
  assert specs["params"]["attn"]["key"]["kernel"] == P(None, None, None)
  # Not a jaxmha parameter (rank 2): the default, replicated.
  assert specs["params"]["query"]["kernel"] == P()
  state = jax.eval_shape(optax.adam(1e-3).init, variables["params"])
  state_specs = jaxmha.param_partition_specs(state, {"heads": "model"})
  assert state_specs[0].mu["attn"]["query"]["bias"] == P("model", None)
  assert state_specs[0].count == P()


def test_logically_partitioned_boxes_for_flax():
  cfg, params, _, _ = _setup()
  boxed = jaxmha.sharding.logically_partitioned({"params": params})
  box = boxed["params"]["query"]["kernel"]
  assert isinstance(box, nn.LogicallyPartitioned)
  assert box.names == ("embed", "heads", "kv")
  _assert_trees_close(nn.unbox(boxed)["params"], params)
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  with nn.logical_axis_rules([("heads", "model"), ("kv_heads", "model")]):
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed),
                                            mesh)
  assert shardings["params"]["key"]["bias"].spec == P("model", None)


@pytest.mark.parametrize("rules, error, match", [
    ({"head": "model"}, ValueError, "Unknown logical axis 'head'"),
    ({"heads": "model", "kv": "model"}, ValueError, "same mesh axis"),
    ({"heads": 3}, TypeError, "rules\\['heads'\\]"),
    ("heads", TypeError, "`rules` must map"),
])
def test_partition_spec_errors(rules, error, match):
  _, params, _, _ = _setup()
  with pytest.raises(error, match=match):
    jaxmha.param_partition_specs(params, rules)


def test_shard_params_errors_name_the_parameter_and_sizes():
  _, params, _, _ = _setup()  # K = 1 key/value head
  mesh = jax.make_mesh((1,), ("model",))
  with pytest.raises(ValueError, match="mesh axes \\['data'\\]"):
    jaxmha.shard_params(params, mesh, {"heads": "data"})
  fake = jax.tree.map(lambda a: a, params)
  fake["key"]["kernel"] = jnp.ones((8, 3, 4))  # K = 3 over a 1-device axis
  sharded = jaxmha.shard_params(fake, mesh, {"kv_heads": "model"})
  assert sharded["key"]["kernel"].sharding.spec == P(None, "model", None)


# -- ring attention: layout and errors -----------------------------------------


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_zigzag_round_trip_and_chunks(num_shards):
  L = 4 * num_shards
  x = jnp.arange(2 * L).reshape(2, L)
  z = ring.to_zigzag(x, num_shards)
  np.testing.assert_array_equal(ring.from_zigzag(z, num_shards), x)
  c = L // (2 * num_shards)
  for i in range(num_shards):
    shard = np.asarray(z[0, i * 2 * c:(i + 1) * 2 * c])
    np.testing.assert_array_equal(shard[:c], np.arange(i * c, (i + 1) * c))
    j = 2 * num_shards - 1 - i
    np.testing.assert_array_equal(shard[c:], np.arange(j * c, (j + 1) * c))


def test_zigzag_needs_a_divisible_length():
  with pytest.raises(ValueError, match="x.shape\\[1\\]=10 must be divisible "
                     "by 4"):
    ring.to_zigzag(jnp.ones((1, 10)), 2)


def _one_device_ring(**kwargs):
  mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))

  def run(q, k, v):
    return jax.shard_map(
        lambda q, k, v: jaxmha.ring_attention(q, k, v, axis_name="seq",
                                              **kwargs),
        mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"),
        check_vma=False)(q, k, v)

  return run


@pytest.mark.parametrize("kwargs, shapes, error, match", [
    (dict(causal=True), ((1, 8, 2, 4), (1, 4, 2, 4)), ValueError,
     "Tl=8 and Sl=4"),
    (dict(layout="spiral"), ((1, 8, 2, 4),) * 2, ValueError,
     "layout='spiral'"),
    (dict(causal=True, layout="zigzag"), ((1, 7, 2, 4),) * 2, ValueError,
     "odd block length Tl=7"),
    (dict(backend="cuda"), ((1, 8, 2, 4),) * 2, ValueError,
     "backend='cuda'"),
    (dict(interpret=True), ((1, 8, 2, 4),) * 2, ValueError,
     "interpret=True needs an explicit `backend`"),
])
def test_ring_argument_errors(kwargs, shapes, error, match):
  q, k = (jnp.ones(s) for s in shapes)
  with pytest.raises(error, match=match):
    jax.eval_shape(_one_device_ring(**kwargs), q, k, k)


def test_ring_outside_shard_map_is_a_clear_error():
  q = jnp.ones((1, 8, 2, 4))
  with pytest.raises(ValueError, match="axis_name='seq' is not a bound mesh "
                     "axis"):
    jaxmha.ring_attention(q, q, q, axis_name="seq")


def test_context_parallel_config_validation_and_refusals():
  with pytest.raises(TypeError, match="context_parallel_axis=3"):
    jaxmha.MHAConfig(num_heads=2, key_dim=4, context_parallel_axis=3)
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4, context_parallel_axis="seq")
  assert jaxmha.MHAConfig.from_config(cfg.get_config()) == cfg
  x = jax.ShapeDtypeStruct((1, 8, 8), jnp.float32)
  with pytest.raises(ValueError, match="not an axis of the current mesh"):
    jaxmha.explain(cfg, x, x)
  mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert jaxmha.explain(cfg, x, x, use_causal_mask=True).path == "ring"
    for kwargs, match in (
        (dict(return_attention_scores=True), "scores"),
        (dict(attention_mask=jnp.ones((1, 8, 8), bool)), "attention_mask"),
        (dict(training=True), "dropout=0.5"),
    ):
      c = cfg.replace(dropout=0.5) if "training" in kwargs else cfg
      with pytest.raises(NotImplementedError,
                         match=f"context_parallel_axis='seq'.*{match}"):
        jaxmha.explain(c, x, x, **kwargs)
    with pytest.raises(NotImplementedError, match="sliding_window"):
      jaxmha.explain(cfg.replace(sliding_window=3), x, x)
    y = jax.ShapeDtypeStruct((1, 4, 8), jnp.float32)
    with pytest.raises(NotImplementedError, match="T == S; got T=8 and S=4"):
      jaxmha.explain(cfg, x, y, use_causal_mask=True)


# -- several devices, in subprocesses ------------------------------------------


def _run(module: str, *checks: str, timeout: float = 900):
  result = harness.run_script(f"tests.multidevice.{module}", *checks,
                              timeout=timeout)
  assert result.returncode == 0, (
      f"{module} {' '.join(checks)} failed:\n{result.stdout[-6000:]}\n"
      f"{result.stderr[-6000:]}")
  return result.stdout


# Grouped to start few processes (each pays for importing JAX and Flax).
MULTIDEVICE = {
    "ring": ("ring_checks", (
        "ring_matches_reference", "ring_with_gpu_kernel_in_interpret_mode",
        "ring_second_derivatives",
        "layer_config_under_a_mesh_matches_single_device",
        "layer_config_with_explicit_mesh_axes",
        "layer_errors_name_the_numbers")),
    "sharded_params_and_pmap": ("transform_checks", (
        "heads_sharded_train_step_equals_unsharded",
        "heads_sharded_params_under_explicit_mesh_axes",
        "pmap_data_parallel_grads_equal_full_batch")),
    "hlo": ("hlo_checks", ("shapes_and_collectives",
                           "ring_needs_less_memory_than_gathered")),
    "kernel_partitioning": ("partitioning_checks", (
        "kernel_splits_over_batch_and_heads",
        "layer_with_flash_under_explicit_mesh_gathers_nothing")),
    "kernel_partitioning_sequence": ("partitioning_checks", (
        "ring_kernels_split_over_the_other_auto_axes",
        "kernel_splits_over_query_rows",
        "layer_with_sequence_sharded_activations")),
}
SLOW_MULTIDEVICE = {
    "ring_more": ("ring_checks", (
        "layer_config_inside_shard_map_matches_single_device",
        "context_parallel_wrapper_on_a_flax_model")),
    "ring_all_cases": ("ring_checks", ("ring_matches_reference_all_cases",)),
    "ring_kernels": ("ring_checks", (
        "ring_with_kernels_in_interpret_mode_more_cases",)),
    "named_sharding": ("transform_checks", (
        "jit_with_named_sharding_inputs_equals_single_device",)),
    "memory_report": ("hlo_checks", ("memory_report",)),
    "kernel_partitioning_more": ("partitioning_checks", (
        "kernel_under_vmap_and_set_mesh",)),
}


@pytest.mark.parametrize("group", sorted(MULTIDEVICE))
def test_on_8_devices(group):
  module, checks = MULTIDEVICE[group]
  _run(module, *checks)


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(SLOW_MULTIDEVICE))
def test_on_8_devices_slow(group):
  module, checks = SLOW_MULTIDEVICE[group]
  print(_run(module, *checks, timeout=1800))


@pytest.mark.slow
def test_example_trains_with_data_and_context_parallelism():
  result = subprocess.run(
      [sys.executable, "-W", "error", "examples/train_data_parallel.py",
       "--steps", "60"], cwd=harness.REPO, env=harness.env(),
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  assert "ring ppermutes" in result.stdout


def test_two_processes_with_jax_distributed():
  results = multiprocess_checks.launch(timeout=300)
  for i, (code, output) in enumerate(results):
    assert code == 0, f"process {i} exited with {code}:\n{output[-6000:]}"
    assert f"process {i}: ok" in output, output[-2000:]
