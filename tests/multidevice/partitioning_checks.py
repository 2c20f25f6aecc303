"""The flash kernels split over batch and heads under ``jit`` sharding.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, D model features.

The GPU kernel runs in interpret mode (the TPU interpreter's callbacks
cannot be partitioned; its shard logic is tested on one device in
``tests/test_partitioning.py``). Every result is compared with the same
call on one device, and the compiled program is searched for all-gathers:
before ``pallas_kernels.partitioning``, the kernel ran on operands gathered
to every device.

Run: ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m
tests.multidevice.partitioning_checks [check ...]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmha
import pallas_kernels
from jaxmha import dispatch
from tests.multidevice.harness import check, main
from tests.multidevice.hlo_checks import collectives
from tests.test_partitioning import kernel_step
from tests.tolerances import FORWARD, GRAD, assert_close

AUTO = jax.sharding.AxisType.Auto
EXPLICIT = jax.sharding.AxisType.Explicit


def _kernel_inputs(B=4, T=24, S=20, N=8, K=4, H=16):
  r = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(r[0], (B, T, N, H))
  k = jax.random.normal(r[1], (B, S, K, H))
  v = jax.random.normal(r[2], (B, S, K, H))
  lengths = jnp.array([20, 11, 0, 16] * B)[:B]  # row 2: no key, empty
  masks = dict(causal=True, kv_lengths=lengths,
               mask=jax.random.bernoulli(r[3], 0.8, (B, N, T, S)),
               dropout_rate=0.25, dropout_rng=r[4])
  return (q, k, v), masks


def _gathered(compiled) -> list[str]:
  """The result type of each all-gather in ``compiled``, e.g.
  ``"f32[2,20,4,16]{3,2,0,1}"``."""
  return [line.split("=")[1].split()[0]
          for line in compiled.as_text().splitlines()
          if " all-gather(" in line]


def _assert_same(got, want, what):
  (_, got_aux), got_grads = got
  (_, want_aux), want_grads = want
  for g, w in zip(got_aux, want_aux):
    assert_close(g, w, FORWARD, err_msg=what)
  for g, w in zip(got_grads, want_grads):
    assert_close(g, w, GRAD, err_msg=what)


@check
def kernel_splits_over_batch_and_heads():
  """Batch on a 2-way axis, heads on a 4-way one (GQA N=8, K=4), causal +
  kv_lengths (an empty row) + a per-head mask + dropout: forward, lse and
  grads equal one device's, nothing is gathered, and the results keep the
  inputs' sharding. With K=2 kv heads, or one (MQA), on the 4-way axis the
  query heads still split, each device reading the kv head its query heads
  share from the whole set: still the same numbers and no gather, the kv
  heads' gradients summed over the axis and left whole. On Explicit axes
  (``jax.make_mesh``'s default) the kernel runs with them made Auto and
  splits the same."""
  for kind, K in ((AUTO, 4), (AUTO, 2), (AUTO, 1), (EXPLICIT, 4)):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)
    qkv, masks = _kernel_inputs(K=K)
    step = kernel_step("gpu", **masks)
    want = step(*qkv)
    heads = NamedSharding(mesh, P("data", None, "model", None))
    batch = NamedSharding(mesh, P("data"))
    sharded = [jax.device_put(x, heads if x.shape[2] % 4 == 0 else batch)
               for x in qkv]
    compiled = step.lower(*sharded).compile()
    got = compiled(*sharded)
    _assert_same(got, want, f"{kind}, K={K}")
    found = collectives(compiled)
    assert found["other"].get("all-gather", 0) == 0, (kind, K, found)
    (_, (out, lse)), (dq, dk, dv) = got
    assert out.sharding.spec[:3] == ("data", None, "model"), out.sharding
    assert lse.sharding.spec[:2] == ("data", "model"), lse.sharding
    assert dq.sharding.spec[:3] == ("data", None, "model"), dq.sharding
    kv_axis = "model" if K == 4 else None
    for g in (dk, dv):
      spec = tuple(g.sharding.spec) + (None,) * 4
      assert spec[:3] == ("data", None, kv_axis), (K, g.sharding)


@check
def kernel_under_vmap_and_set_mesh():
  """Under a ``jax.set_mesh`` context the batch splits with no gather;
  ``vmap`` over the kernel (custom partitioning has no batching rule:
  Pallas batches it) gives one device's numbers."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AUTO,))
  qkv, masks = _kernel_inputs(B=8)
  step = kernel_step("gpu", **masks)
  want = step(*qkv)
  spec = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(x, spec) for x in qkv]
    compiled = step.lower(*sharded).compile()
    got = compiled(*sharded)
  _assert_same(got, want, "set_mesh")
  assert " all-gather(" not in compiled.as_text(), collectives(compiled)
  members = [jnp.stack([x, x * 0.5]) for x in qkv]  # (2, B, ...)
  vstep = jax.jit(jax.vmap(step))
  want_v = vstep(*members)
  got_v = vstep(*[jax.device_put(x, NamedSharding(mesh, P(None, "data")))
                  for x in members])
  _assert_same(got_v, want_v, "vmap")
  first = jax.tree.map(lambda x: x[0], got_v)
  _assert_same(first, want, "vmap member 0")


@check
def layer_with_flash_under_explicit_mesh_gathers_nothing():
  """The layer with the kernel (forced, interpret mode) on ``jax.make_mesh``'s
  Explicit axes: batch-sharded inputs, heads-sharded params. Loss and grads
  equal one device's, and no activation is gathered (before the kernels
  were split: 22 all-gathers in this step)."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(EXPLICIT,) * 2)
  r = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(r[0], (4, 24, 16))
  y = jax.random.normal(r[1], (4, 20, 16))
  cfg = jaxmha.MHAConfig(num_heads=8, key_dim=8, num_key_value_heads=4,
                         dropout=0.2)
  params = jaxmha.init_params(r[2], cfg, x.shape, y.shape)

  def loss(p, x, y):
    out = jaxmha.apply(p, cfg, x, y, use_causal_mask=True, training=True,
                       dropout_rng=jax.random.key(5))
    return jnp.mean(out ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  with dispatch.use_path("flash"):
    assert jaxmha.explain(cfg, x, y, use_causal_mask=True).path == "flash"
    want = step(params, x, y)
    sharded = jaxmha.shard_params(params, mesh,
                                  {"heads": "model", "kv_heads": "model"})
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
      compiled = step.lower(sharded, put(x), put(y)).compile()
      got = compiled(sharded, put(x), put(y))
  assert_close(got[0], want[0])
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    assert_close(g, w, GRAD)
  assert " all-gather(" not in compiled.as_text(), collectives(compiled)


@check
def ring_kernels_split_over_the_other_auto_axes():
  """Context parallelism under ``jax.set_mesh`` with Auto axes: the ring
  runs in a ``shard_map`` manual over its own axis only, and the kernels
  inside it (forced, interpret mode) split over the batch- and
  heads-sharded axes XLA still partitions. Loss and grads equal one
  device's. With K=4 or 2 kv heads nothing is gathered (60 all-gathers
  before, every kernel call's operands); with one kv head the query
  heads are gathered (the shards could not sum the kv head's gradients
  there) and the batch still splits. Explicit axes (``jax.make_mesh``'s
  default) are made Auto around the layer, and split the same."""
  r = jax.random.split(jax.random.key(3), 2)
  x = jax.random.normal(r[0], (4, 32, 16))
  for kind, K in ((AUTO, 4), (AUTO, 2), (AUTO, 1), (EXPLICIT, 2)):
    mesh = jax.make_mesh((2, 2, 2), ("data", "model", "seq"),
                         axis_types=(kind,) * 3)
    cfg = jaxmha.MHAConfig(num_heads=4, key_dim=8, num_key_value_heads=K,
                           flash_attention=True)
    params = jaxmha.init_params(r[1], cfg, x.shape, x.shape)

    def loss(p, x, cfg):
      out = jaxmha.apply(p, cfg, x, x, use_causal_mask=True)
      return jnp.mean(out ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)),
                   static_argnums=2)
    want = step(params, x, cfg)
    axes = {"heads": "model", **({"kv_heads": "model"} if K > 1 else {})}
    ring = cfg.replace(context_parallel_axis="seq")
    with jax.set_mesh(mesh):
      sharded = jaxmha.shard_params(params, mesh, axes)
      xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
      compiled = step.lower(sharded, xs, ring).compile()
      got = compiled(sharded, xs)
    assert_close(got[0], want[0], err_msg=f"{kind}, K={K}")
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      assert_close(g, w, GRAD, err_msg=f"{kind}, K={K}")
    gathers = collectives(compiled)["other"].get("all-gather", 0)
    if K > 1:
      assert gathers == 0, (kind, K, collectives(compiled))
    else:
      # Only the query heads' operands: q, out, d_out and the lse rows.
      assert 0 < gathers < 60, (kind, K, collectives(compiled))


@check
def kernel_splits_over_query_rows():
  """Activations sharded over the sequence (batch on a 2-way axis, T and
  S on a 4-way one): the kernel keeps its query rows where they are, each
  device attending its 6 rows to all 20 keys (gathered) at their global
  positions (causal, an empty row, a per-head mask, dropout); the kv
  gradients are summed over the axis. Forward, lse and grads equal one
  device's; out, lse and dq stay sharded over the rows; only k and v are
  gathered. The same on Explicit axes."""
  qkv, masks = _kernel_inputs()
  step = kernel_step("gpu", **masks)
  want = step(*qkv)
  for kind in (AUTO, EXPLICIT):
    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(kind,) * 2)
    rows = NamedSharding(mesh, P("data", "seq"))
    sharded = [jax.device_put(x, rows) for x in qkv]
    compiled = step.lower(*sharded).compile()
    got = compiled(*sharded)
    _assert_same(got, want, f"query rows, {kind}")
    (_, (out, lse)), (dq, _, _) = got
    assert out.sharding.spec[:2] == ("data", "seq"), out.sharding
    assert dq.sharding.spec[:2] == ("data", "seq"), dq.sharding
    assert tuple(lse.sharding.spec)[:3] == ("data", None, "seq"), (
        lse.sharding)
    # k and v: (2, 20, 4, 16) per data shard, from (2, 5, 4, 16) pieces.
    gathered = _gathered(compiled)
    assert gathered and all(g.startswith("f32[2,20,4,16]")
                            for g in gathered), (kind, gathered)
  try:  # bad input on the Explicit mesh: the kernels' own error
    jax.jit(lambda q: pallas_kernels.flash_attention(q[..., 0], q, q))(
        sharded[0])
  except ValueError as e:
    assert "`q`" in str(e), e
  else:
    raise AssertionError("a rank-3 q should be a ValueError")


@check
def layer_with_sequence_sharded_activations():
  """A training step of the layer with the kernel (forced, interpret mode;
  GQA, causal, dropout) on inputs sharded over batch and sequence: loss
  and grads equal one device's, and only the key and value projections
  are gathered, (2, 32, 2, 8) per batch shard (the query projection too
  before, and every device attended all 32 rows)."""
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AUTO,) * 2)
  r = jax.random.split(jax.random.key(3), 2)
  x = jax.random.normal(r[0], (4, 32, 16))
  cfg = jaxmha.MHAConfig(num_heads=4, key_dim=8, num_key_value_heads=2,
                         dropout=0.2)
  params = jaxmha.init_params(r[1], cfg, x.shape, x.shape)

  def loss(p, x):
    out = jaxmha.apply(p, cfg, x, x, use_causal_mask=True, training=True,
                       dropout_rng=jax.random.key(5))
    return jnp.mean(out ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  with dispatch.use_path("flash"):
    want = step(params, x)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
    compiled = step.lower(params, xs).compile()
    got = compiled(params, xs)
  assert_close(got[0], want[0])
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    assert_close(g, w, GRAD)
  gathered = _gathered(compiled)
  assert len(gathered) == 2 and all(
      g.startswith("f32[2,32,2,8]") for g in gathered), gathered


if __name__ == "__main__":
  main(__name__)
