"""Ring attention on 2, 4 and 8 devices against full attention.

Shape letters: B batch, T query length, S key/value length (global), N query
heads, K key/value heads, H head dim, P devices on the ring axis.

Forward (output and log-sum-exp) and gradients (dq, dk, dv, through both)
against :func:`pallas_kernels.reference.attention` on the whole sequence,
for causal and full attention, both layouts, segment ids (with rows that
attend nothing), GQA, cross-attention, fp32 and bf16; second derivatives
(grad of grad, jvp of grad) through the ring; then the layer's path
(``MHAConfig(context_parallel_axis=...)`` and ``jaxmha.context_parallel``)
against the single-device layer.

Run: ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m
tests.multidevice.ring_checks [check ...] [--slow]``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmha
import pallas_kernels
from pallas_kernels import blockwise
from pallas_kernels import gpu_triton
from tests.conformance import (assert_second_derivatives_close, in_scan,
                               second_derivatives)
from tests.multidevice.harness import check, main
from tests.tolerances import FORWARD, GRAD, assert_close

AUTO = jax.sharding.AxisType.Auto


def seq_mesh(n: int, name: str = "seq"):
  return jax.make_mesh((n,), (name,), axis_types=(AUTO,),
                       devices=jax.devices()[:n])


@dataclasses.dataclass(frozen=True)
class RingCase:
  P: int
  causal: bool
  layout: str = "contiguous"
  segments: str = "none"  # "none", "self" (B, T) or "pair" (q, kv ids)
  dtype: str = "float32"
  B: int = 2
  T: int = 64
  S: int = 64
  N: int = 4
  K: int = 2
  H: int = 16
  backend: str = "xla"
  interpret: bool = False

  @property
  def id(self) -> str:
    return (f"P={self.P}_causal={self.causal}_{self.layout}_seg="
            f"{self.segments}_{self.dtype}_T={self.T}_S={self.S}_N={self.N}"
            f"_K={self.K}_{self.backend}")


def _inputs(c: RingCase, seed: int = 0):
  rng = jax.random.split(jax.random.key(seed), 7)
  dtype = jnp.dtype(c.dtype)
  q = jax.random.normal(rng[0], (c.B, c.T, c.N, c.H), dtype)
  k = jax.random.normal(rng[1], (c.B, c.S, c.K, c.H), dtype)
  v = jax.random.normal(rng[2], (c.B, c.S, c.K, c.H), dtype)
  d_out = jax.random.normal(rng[3], (c.B, c.T, c.N, c.H), jnp.float32)
  d_lse = jax.random.normal(rng[4], (c.B, c.N, c.T), jnp.float32)
  ids = None
  if c.segments == "self":
    # Sorted ids: contiguous segments of random lengths.
    ids = jnp.cumsum(jax.random.bernoulli(rng[5], 0.15, (c.B, c.T)), axis=1)
    ids = ids.astype(jnp.int32)
  elif c.segments == "pair":
    # Query ids 0..3, key ids 0..2: queries of segment 3 attend nothing.
    q_ids = jax.random.randint(rng[5], (c.B, c.T), 0, 4)
    kv_ids = jax.random.randint(rng[6], (c.B, c.S), 0, 3)
    ids = (q_ids, kv_ids)
  return q, k, v, ids, d_out, d_lse


def _block_sizes(c: RingCase):
  if c.backend == "xla":
    # Several blocks per shard, so the per-block plans are exercised too.
    return blockwise.BlockSizes(block_q=8, block_k=8)
  if c.backend == "gpu":
    return gpu_triton.BlockSizes(block_q=16, block_k=16, block_q_dkv=16,
                                 block_k_dkv=16, block_q_dq=16, block_k_dq=16)
  return None


def _ring_on_whole_sequences(c: RingCase, ids):
  """The ring over ``c.P`` devices as a function of whole-sequence ``q, k,
  v`` (in order, whatever the layout), returning ``(out, lse)``."""
  mesh = seq_mesh(c.P)
  zig = c.layout == "zigzag"
  to = (lambda x, axis=1: jaxmha.ring.to_zigzag(x, c.P, axis)) if zig else (
      lambda x, axis=1: x)
  back = (lambda x, axis=1: jaxmha.ring.from_zigzag(x, c.P, axis)) if zig \
      else (lambda x, axis=1: x)
  seq = P(None, "seq")

  def ring(q, k, v, ids):
    return jaxmha.ring_attention(
        q, k, v, axis_name="seq", causal=c.causal, segment_ids=ids,
        layout=c.layout, backend=c.backend, interpret=c.interpret,
        block_sizes=_block_sizes(c), return_lse=True)

  sharded = jax.shard_map(
      ring, mesh=mesh, in_specs=(seq, seq, seq, jax.tree.map(lambda _: seq,
                                                            ids)),
      out_specs=(seq, P(None, None, "seq")),
      # The ring and the blockwise path are typed for check_vma; Pallas's
      # interpret mode is not (its HLO interpreter's loop carries).
      check_vma=not c.interpret)

  def ring_global(q, k, v):
    out, lse = sharded(to(q), to(k), to(v), jax.tree.map(to, ids))
    return back(out), back(lse, 2)

  return ring_global


def run_ring_case(c: RingCase) -> None:
  """Ring vs. reference: output, LSE and their gradients."""
  q, k, v, ids, d_out, d_lse = _inputs(c)
  ring_global = _ring_on_whole_sequences(c, ids)

  def reference(q, k, v):
    return pallas_kernels.reference.attention(
        q, k, v, causal=c.causal, segment_ids=ids, return_lse=True)

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v)
    # Empty rows have lse == EMPTY_ROW_LSE (a huge constant): leave them out
    # of the loss so its value stays comparable; their gradient is zero.
    lse = jnp.where(lse > pallas_kernels.EMPTY_ROW_LSE / 2, lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(lse * d_lse), (
        out, lse)

  step = lambda fn: jax.jit(jax.value_and_grad(
      functools.partial(loss, fn), argnums=(0, 1, 2), has_aux=True))
  (_, (out, lse)), grads = step(ring_global)(q, k, v)
  (_, (ref, ref_lse)), ref_grads = step(reference)(q, k, v)
  assert_close(out, ref, FORWARD, c.dtype, err_msg=f"{c.id}: out")
  assert_close(lse, ref_lse, FORWARD, "float32", err_msg=f"{c.id}: lse")
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert g.dtype == jnp.dtype(c.dtype), (name, g.dtype)
    assert_close(g, r, GRAD, c.dtype, err_msg=f"{c.id}: {name}")


@check
def ring_second_derivatives():
  """``jax.grad`` of ``jax.grad`` and ``jax.jvp`` of ``jax.grad`` through
  the ring equal the reference's: the blocks' own rules differentiate as
  the reference (``pallas_kernels.higher_order``). So does ``jax.grad`` of
  ``jax.grad`` with the ring in a ``lax.scan`` over layers."""
  c = RingCase(P=2, causal=True, layout="zigzag", segments="self", B=1,
               T=16, S=16, N=2, K=1)
  q, k, v, ids, _, _ = _inputs(c)
  tangents = _inputs(c, seed=1)[:3]

  def reference(q, k, v):
    return pallas_kernels.reference.attention(
        q, k, v, causal=c.causal, segment_ids=ids, return_lse=True)

  ring = _ring_on_whole_sequences(c, ids)
  assert_second_derivatives_close(
      second_derivatives(ring, q, k, v, tangents),
      second_derivatives(reference, q, k, v, tangents), c.dtype)
  # jax.jvp of jax.grad fails in a scan (higher_order.differentiated_as).
  assert_second_derivatives_close(
      second_derivatives(in_scan(ring), q, k, v),
      second_derivatives(in_scan(reference), q, k, v), c.dtype, " in a scan")


DEFAULT_CASES = (
    RingCase(P=4, causal=True, segments="self"),
    RingCase(P=8, causal=True, layout="zigzag", segments="self",
             dtype="bfloat16", N=2, K=1),
)
SLOW_CASES = (
    RingCase(P=2, causal=False, segments="pair", dtype="bfloat16", T=32,
             S=64),
    RingCase(P=4, causal=False, layout="zigzag", segments="pair", T=64,
             S=32, N=2, K=1),
)


@check
def ring_matches_reference():
  for c in DEFAULT_CASES:
    run_ring_case(c)


@check(slow=True)
def ring_matches_reference_all_cases():
  for c in SLOW_CASES:
    run_ring_case(c)
  for n, causal, layout, segments, dtype in itertools.product(
      (2, 4, 8), (False, True), ("contiguous", "zigzag"),
      ("none", "self"), ("float32", "bfloat16")):
    run_ring_case(RingCase(P=n, causal=causal, layout=layout,
                           segments=segments, dtype=dtype))


@check
def ring_with_gpu_kernel_in_interpret_mode():
  run_ring_case(RingCase(P=2, causal=True, segments="self", B=1, T=32, S=32,
                         N=2, K=1, backend="gpu", interpret=True))


@check(slow=True)
def ring_with_kernels_in_interpret_mode_more_cases():
  for layout in ("contiguous", "zigzag"):
    run_ring_case(RingCase(P=2, causal=True, layout=layout, B=1, T=64, S=64,
                           N=2, K=1, backend="gpu", interpret=True))
  # The TPU kernel in interpret mode, non-causal only: the TPU interpreter
  # synchronises the simulated devices with collectives inside every kernel
  # call, so a causal ring (devices take different lax.switch branches, some
  # calling the kernel, some not) deadlocks in the interpreter. On a TPU the
  # Mosaic kernel has no such collectives.
  run_ring_case(RingCase(P=2, causal=False, B=1, T=64, S=64, N=2, K=1, H=32,
                         backend="tpu", interpret=True))


# -- the layer's path ----------------------------------------------------------


def _layer_setup(T=32, D=16, B=4, seed=0):
  rng = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(rng[0], (B, T, D))
  y = jax.random.normal(rng[1], (B, T, D))
  query_mask = jax.random.bernoulli(rng[2], 0.85, (B, T))
  value_mask = jax.random.bernoulli(rng[3], 0.8, (B, T))
  return x, y, query_mask, value_mask


@check
def layer_config_under_a_mesh_matches_single_device():
  """``MHAConfig(context_parallel_axis=...)`` under ``jax.set_mesh``."""
  x, y, query_mask, value_mask = _layer_setup()
  base = jaxmha.MHAConfig(num_heads=4, key_dim=8, num_key_value_heads=2)
  params = jaxmha.init_params(jax.random.key(1), base, x.shape, x.shape)
  ring_cfg = base.replace(context_parallel_axis="seq")
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AUTO, AUTO))

  def loss(cfg, params, x, y, qm, vm):
    # Cross-attention (y != x) with padding masks: masked queries attend
    # nothing, so some rows are empty on some devices.
    out = jaxmha.apply(params, cfg, x, y, query_mask=qm, value_mask=vm,
                       use_causal_mask=True)
    return jnp.sum(out ** 2), out

  step = lambda cfg: jax.jit(jax.value_and_grad(
      functools.partial(loss, cfg), argnums=(0, 1), has_aux=True))
  (_, want), want_g = step(base)(params, x, y, query_mask, value_mask)
  with jax.set_mesh(mesh):
    explanation = jaxmha.explain(ring_cfg, x, y, query_mask=query_mask,
                                 value_mask=value_mask, use_causal_mask=True)
    assert explanation.path == "ring", explanation
    put = lambda a: jax.device_put(a, NamedSharding(
        mesh, P("data", "seq", *(None,) * (a.ndim - 2))))
    (_, got), got_g = step(ring_cfg)(params, put(x), put(y),
                                     put(query_mask), put(value_mask))
  assert got.sharding.spec[:2] == ("data", "seq"), got.sharding
  assert_close(got, want, err_msg="out")
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    assert_close(g, w, GRAD, err_msg="grads")


@check
def layer_config_with_explicit_mesh_axes():
  """The default ``jax.make_mesh`` axes are Explicit in JAX 0.10: batch- and
  sequence-sharded inputs with a padding mask on the keys alone,
  heads-sharded params, and :func:`jaxmha.context_parallel` given such a
  mesh with no mesh context around the call."""
  x, _, _, value_mask = _layer_setup()
  cfg = jaxmha.MHAConfig(num_heads=4, key_dim=8, num_key_value_heads=2)
  params = jaxmha.init_params(jax.random.key(1), cfg, x.shape, x.shape)
  mesh = jax.make_mesh((2, 2, 2), ("data", "model", "seq"))

  def out(cfg, params, x, vm):
    return jaxmha.apply(params, cfg, x, x, value_mask=vm,
                        use_causal_mask=True)

  step = lambda cfg: jax.jit(jax.value_and_grad(
      lambda p, x, vm: jnp.sum(out(cfg, p, x, vm) ** 2), argnums=(0, 1)))
  want = jax.jit(functools.partial(out, cfg))(params, x, value_mask)
  want_loss, want_g = step(cfg)(params, x, value_mask)
  ring_cfg = cfg.replace(context_parallel_axis="seq")
  with jax.set_mesh(mesh):
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", "seq")))
    heads = jaxmha.shard_params(params, mesh,
                                {"heads": "model", "kv_heads": "model"})
    got_loss, got_g = step(ring_cfg)(heads, put(x), put(value_mask))
  assert_close(got_loss, want_loss, err_msg="loss")
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    assert_close(g, w, GRAD, err_msg="grads")
  ring = jax.jit(jaxmha.context_parallel(functools.partial(out, cfg), "seq",
                                         mesh=mesh))
  assert "collective_permute" in ring.lower(params, x, value_mask).as_text()
  assert_close(ring(params, x, value_mask), want, err_msg="context_parallel")


@check
def layer_config_inside_shard_map_matches_single_device():
  x, y, _, value_mask = _layer_setup()
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=8)
  params = jaxmha.init_params(jax.random.key(1), cfg, x.shape, x.shape)
  mesh = seq_mesh(4)
  ring_cfg = cfg.replace(context_parallel_axis="seq")
  body = lambda p, x, y, vm: jaxmha.apply(p, ring_cfg, x, y, value_mask=vm,
                                          use_causal_mask=True)
  seq = P(None, "seq")
  sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), seq, seq, seq),
                          out_specs=seq, check_vma=False)
  loss = lambda f: jax.jit(jax.value_and_grad(
      lambda p, x, y: jnp.sum(f(p, x, y, value_mask) ** 2), argnums=(0, 1)))
  got, got_g = loss(sharded)(params, x, y)
  want, want_g = loss(lambda p, x, y, vm: jaxmha.apply(
      p, cfg, x, y, value_mask=vm, use_causal_mask=True))(params, x, y)
  assert_close(got, want, err_msg="loss")
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    assert_close(g, w, GRAD, err_msg="grads")


class _Block(nn.Module):
  """A small pre-norm attention block (a model that holds the layer)."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    h = jaxmha.MultiHeadAttention(num_heads=4, key_dim=8, name="attn")(
        h, h, use_causal_mask=True)
    return x + nn.Dense(x.shape[-1])(h)


@check
def context_parallel_wrapper_on_a_flax_model():
  x, _, _, _ = _layer_setup(T=64)
  model = _Block()
  variables = model.init(jax.random.key(0), x)
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AUTO, AUTO))
  loss = lambda fn: jax.jit(jax.value_and_grad(
      lambda v, x: jnp.sum(fn(v, x) ** 2)))
  want, want_g = loss(model.apply)(variables, x)
  xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
  wrapped = jaxmha.context_parallel(model.apply, "seq", mesh=mesh)
  got, got_g = loss(wrapped)(variables, xs)
  hlo = jax.jit(wrapped).lower(variables, xs).as_text()
  assert "collective_permute" in hlo, "no ring in the lowered program"
  assert_close(got, want, err_msg="loss")
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    assert_close(g, w, GRAD, err_msg="grads")


@check
def layer_errors_name_the_numbers():
  x = jnp.ones((2, 30, 8))
  cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4, context_parallel_axis="seq")
  params = jaxmha.init_params(jax.random.key(0), cfg, x.shape, x.shape)
  mesh = seq_mesh(4)
  with jax.set_mesh(mesh):
    try:
      jaxmha.apply(params, cfg, x, x)
    except ValueError as e:
      assert "T=30" in str(e) and "4" in str(e), e
    else:
      raise AssertionError("T=30 over 4 devices should be a ValueError")


if __name__ == "__main__":
  main(__name__)
