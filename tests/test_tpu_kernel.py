"""The Mosaic TPU kernel, run on CPU in the TPU interpreter.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim.

:class:`TestTpuKernelInterpret` runs the conformance suite through
``flash_attention(..., backend="tpu", interpret=True)`` inside
``pltpu.force_tpu_interpret_mode`` with the interpreter's race detector on and
out-of-bounds reads raising. Small blocks turn small shapes into ragged,
multi-block grids. The module-level tests check the block-skip tables, the
lowering to Mosaic (as far as it goes without a TPU), ``shard_map`` and the
refusals.
"""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from benchmarks.shapes import CONFORMANCE, AttentionShape
from pallas_kernels import common
from pallas_kernels import masks as masks_lib
from pallas_kernels import tpu
from tests.conformance import (MASK_KINDS, AttentionConformance, Case,
                               diagonal_cases, make_inputs,
                               reference_attention)
from tests.multidevice import harness
from tests.tolerances import FORWARD, GRAD, assert_close

# Races between the kernel body and its DMAs are reported; reading out of
# bounds raises; uninitialised VMEM reads as NaN, so a read before a write
# shows in the results.
INTERPRET = pltpu.InterpretParams(detect_races=True,
                                  out_of_bounds_reads="raise",
                                  uninitialized_memory="nan")

# Gradient shapes: smaller than CONFORMANCE (the interpreter runs about 30 ms
# per grid step) yet multi-block, ragged, GQA/MQA, T = 1 and Hv != H.
GRAD_SHAPES = (
    AttentionShape(B=2, T=24, S=200, N=2, K=1, H=64),
    AttentionShape(B=1, T=40, S=7, N=2, K=1, H=80),
    AttentionShape(B=1, T=1, S=300, N=4, K=1, H=32, Hv=64),
    AttentionShape(B=2, T=33, S=140, N=2, K=2, H=128, Hv=32),
)


def _round_up(a, m):
  return -(-a // m) * m


def small_blocks(T: int, S: int) -> tpu.BlockSizes:
  """About three query blocks and 128-key blocks; each kernel tiles apart."""
  del S
  bq = _round_up(-(-T // 3), 8)
  return tpu.BlockSizes(block_q=bq, block_k=128,
                        block_q_dkv=_round_up(-(-T // 2), 8), block_k_dkv=128,
                        block_q_dq=bq, block_k_dq=256)


# flash_attention's arguments that are Python values, not arrays.
_STATIC_KWARGS = ("causal", "sliding_window", "scale", "dropout_rate",
                  "return_lse")


def tpu_attention(q, k, v, *, block_sizes, **kw):
  """``flash_attention(backend="tpu", interpret=True)`` under one ``jit``.

  One compilation instead of an eager dispatch per table-building op.
  """
  static = {name: kw.pop(name) for name in _STATIC_KWARGS if name in kw}
  fn = functools.partial(pallas_kernels.flash_attention, backend="tpu",
                         interpret=True, block_sizes=block_sizes, **static)
  return jax.jit(fn)(q, k, v, **kw)


def _interpreter_races_found() -> bool:
  """The interpreter's own flag for its last kernel, where it can be read."""
  try:
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call
  except ImportError:  # moved in a later JAX: the printed report remains
    return False
  races = getattr(interpret_pallas_call, "races", None)
  return bool(getattr(races, "races_found", False))


class TestTpuKernelInterpret(AttentionConformance):
  """The conformance suite on the TPU kernel in the TPU interpreter."""

  # Every mask kind once, cycling through the six CONFORMANCE shapes, fp32
  # and bf16, dropout off and on.
  CASES = diagonal_cases(CONFORMANCE, MASK_KINDS,
                         dtypes=("float32", "bfloat16"), dropouts=(0.0, 0.25))
  GRAD_CASES = diagonal_cases(GRAD_SHAPES,
                              masks=("all", "causal", "window_lr", "q_lengths"),
                              dtypes=("float32", "bfloat16"),
                              dropouts=(0.25, 0.0))
  # test_forward checks dropout bits in five more cases.
  DROPOUT_CASES = diagonal_cases((CONFORMANCE[1],), masks=("all",),
                                 dropouts=(0.3,))
  # One query block per kernel: the interpreter's grid steps dominate.
  SECOND_ORDER_SHAPE = AttentionShape(B=2, T=8, S=35, N=4, K=2, H=16, Hv=8)

  @pytest.fixture(autouse=True)
  def _tpu_interpreter(self, capfd):
    """Each whole test (jax.grad's tracing included) runs interpreted."""
    pltpu.reset_tpu_interpret_mode_state()
    with pltpu.force_tpu_interpret_mode(INTERPRET):
      yield
    out, err = capfd.readouterr()
    sys.stdout.write(out)
    sys.stderr.write(err)
    assert "RACE DETECTED" not in out + err
    assert not _interpreter_races_found()

  def attention(self, q, k, v, **kw):
    return tpu_attention(q, k, v,
                         block_sizes=small_blocks(q.shape[1], k.shape[1]), **kw)

  def unsupported_calls(self):
    q = jnp.zeros((1, 8, 1, 32))
    long = jnp.zeros((1, 2048, 1, 64))
    return [
        ("Mosaic kernels on CPU without interpret=True",
         lambda: pallas_kernels.flash_attention(q, q, q, backend="tpu")),
        ("blocks whose working set exceeds VMEM",
         lambda: pallas_kernels.flash_attention(
             long, long, long, backend="tpu", interpret=True,
             block_sizes=tpu.BlockSizes.uniform(2048, 2048))),
    ]

  def test_skipped_blocks_are_never_computed(self):
    """Keys no query may see hold NaN; a computed block would spread it.

    ``0 * NaN`` is NaN, so a masked-but-computed block poisons the output
    and the gradients. Key blocks of 128 go unseen through the band (keys
    past ``i + 300``: block 3), segment ids (example 0: block 2) and
    ``kv_lengths`` (example 1: blocks 1-3).
    """
    B, T, S = 2, 16, 512
    shape = AttentionShape(B=B, T=T, S=S, N=2, K=1, H=32)
    q, k, v, _ = make_inputs(Case(shape))
    pos = jnp.arange(S)
    q_ids = jnp.ones((B, T), jnp.int32)
    kv_ids = jnp.stack([jnp.where((pos >= 256) & (pos < 384), 2, 1),
                        jnp.ones(S, jnp.int32)])
    kw = dict(sliding_window=(700, 300), kv_lengths=jnp.array([S, 100]),
              segment_ids=(q_ids, kv_ids))
    unseen = jnp.stack([pos >= 256, pos >= 128])[:, :, None, None]  # (B,S,1,1)
    poison = lambda x: jnp.where(unseen, jnp.nan, x)
    clean = lambda x: jnp.where(unseen, 0.0, x)

    def loss(fn, q, k, v):
      out, lse = fn(q, k, v, return_lse=True, **kw)
      return jnp.sum(out * out) + jnp.sum(lse)

    blocks = tpu.BlockSizes.uniform(8, 128)
    kernel = functools.partial(tpu_attention, block_sizes=blocks)
    value, grads = jax.value_and_grad(
        lambda *a: loss(kernel, *a), (0, 1, 2))(q, poison(k), poison(v))
    ref_value, ref = jax.value_and_grad(
        lambda *a: loss(reference_attention, *a), (0, 1, 2))(
            q, clean(k), clean(v))
    assert_close(value, ref_value, FORWARD)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
      assert bool(jnp.all(jnp.isfinite(g))), name
      assert_close(g, r, GRAD, "float32", name)


# -- the race detector itself, and two cores -----------------------------------


def test_race_detector_reports_a_race(capfd):
  """Two cores writing one output block is reported: the check above bites."""
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)

  pltpu.reset_tpu_interpret_mode_state()
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  with pltpu.force_tpu_interpret_mode(params):  # read when the call is built
    racy = pl.pallas_call(
        kernel, grid=(2,),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",)))
    racy(jnp.zeros((8, 128))).block_until_ready()
  assert "RACE DETECTED" in capfd.readouterr().out


def test_no_races_on_two_cores(capfd):
  """Parallel grid axes split over two cores write disjoint blocks.

  The dk/dv kernel sums GQA heads inside one core's reduction axes; were it
  split over cores, two cores would write the same dk block.
  """
  shape = AttentionShape(B=1, T=8, S=256, N=2, K=1, H=32)
  q, k, v, kw = make_inputs(Case(shape))
  blocks = tpu.BlockSizes.uniform(8, 128)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, **kw) ** 2)
  kernel = functools.partial(tpu_attention, block_sizes=blocks)
  pltpu.reset_tpu_interpret_mode_state()
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  with pltpu.force_tpu_interpret_mode(params):
    grads = jax.grad(loss(kernel), (0, 1, 2))(q, k, v)
  assert "RACE DETECTED" not in capfd.readouterr().out
  ref = jax.grad(loss(reference_attention), (0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref):
    assert_close(g, r, GRAD)


# -- block skipping ------------------------------------------------------------


def _blocks_with_allowed_pairs(prep, bq: int, bk: int) -> int:
  """Brute force: ``(b, n, q block, k block)`` holding an allowed pair."""
  p = prep.problem
  allowed = masks_lib.dense_mask(prep.spec, prep.data, p.B, p.N, p.T, p.S)
  allowed = jnp.broadcast_to(allowed, (p.B, p.N, p.T, p.S))
  allowed = allowed.reshape(p.B, p.N, p.T // bq, bq, p.S // bk, bk)
  return int(allowed.any(axis=(3, 5)).sum())


def _skip_case(kind: str):
  """``q (B, T, N, H)`` and mask keywords for the block-skip tests."""
  B, T, N = 2, 1024, 2
  q = jnp.zeros((B, T, N, 64))
  k = jnp.zeros((B, T, 1, 64))
  ids = jnp.stack([jnp.repeat(jnp.arange(4), 256),
                   jnp.repeat(jnp.arange(2), 512)])  # (B, T), sorted
  dense = jax.random.bernoulli(jax.random.key(0), 0.3, (B, 1, T // 128, 1,
                                                        T // 128, 1))
  dense = jnp.broadcast_to(dense, (B, 1, T // 128, 128, T // 128, 128))
  kw = {
      "causal": dict(causal=True),
      "window": dict(sliding_window=100),
      "window_lr": dict(sliding_window=(300, 0)),
      "kv_lengths": dict(kv_lengths=jnp.array([300, 0])),
      "q_lengths": dict(q_lengths=jnp.array([1000, 130])),
      "segments": dict(segment_ids=ids),
      "dense": dict(mask=dense.reshape(B, 1, T, T)),
      "causal_segments": dict(causal=True, segment_ids=ids),
  }[kind]
  return q, k, kw


@pytest.mark.parametrize("kind", ["causal", "window", "window_lr", "kv_lengths",
                                  "q_lengths", "segments", "dense",
                                  "causal_segments"])
def test_kernels_compute_exactly_the_blocks_with_allowed_pairs(kind):
  q, k, kw = _skip_case(kind)
  prep = common.prepare(q, k, k, **kw)
  stats = tpu.visit_stats(prep, tpu.BlockSizes.uniform(128, 128))
  expected = _blocks_with_allowed_pairs(prep, 128, 128)
  for kernel in ("fwd", "dq", "dkv"):
    assert stats[kernel]["computed"] == expected, (kernel, stats)
    # A skipped block is not copied either: at most one extra copy per row
    # of blocks (the first step of a row with nothing to compute). A dense
    # mask's unseen blocks between seen ones are copied, not computed.
    if kind != "dense":
      rows = stats[kernel]["total"] // 8
      assert stats[kernel]["copied"] <= expected + rows, (kernel, stats)


def test_causal_visits_about_half_the_blocks():
  q = jnp.zeros((1, 2048, 1, 64))
  prep = common.prepare(q, q, q, causal=True)
  stats = tpu.visit_stats(prep, tpu.BlockSizes.uniform(128, 128))
  n = 2048 // 128
  for kernel in ("fwd", "dq", "dkv"):
    s = stats[kernel]
    assert s["total"] == n * n
    assert s["computed"] == n * (n + 1) // 2  # the diagonal and below
    assert s["copied"] <= s["computed"]
  # Unmasked attention computes and copies everything.
  full = tpu.visit_stats(common.prepare(q, q, q),
                         tpu.BlockSizes.uniform(128, 128))
  assert full["fwd"]["computed"] == full["fwd"]["copied"] == n * n


# -- lowering to Mosaic, shard_map, sizes --------------------------------------

_LOWERING_CASES = [
    (AttentionShape(B=2, T=256, S=384, N=4, K=2, H=64), "all", "float32", 0.25,
     tpu.BlockSizes.uniform(128, 128)),
    (AttentionShape(B=1, T=200, S=300, N=2, K=1, H=80, Hv=32), "window",
     "bfloat16", 0.0, tpu.BlockSizes()),
    (AttentionShape(B=2, T=1, S=513, N=4, K=4, H=256), "q_lengths", "float16",
     0.1, tpu.BlockSizes()),
]


@pytest.mark.parametrize("shape,mask,dtype,dropout,blocks", _LOWERING_CASES,
                         ids=lambda x: getattr(x, "id", str(x)))
def test_forward_and_backward_lower_to_mosaic(shape, mask, dtype, dropout,
                                              blocks):
  """Pallas lowers all three kernels to Mosaic for TPU, here on CPU.

  This checks block shapes and every primitive's Mosaic lowering rule; the
  Mosaic compiler itself runs only on a TPU host.
  """
  q, k, v, kw = make_inputs(Case(shape, mask, dtype, dropout))

  def loss(q, k, v):
    prep = common.prepare(q, k, v, **kw)
    out, lse = tpu._attention(q, k, v, prep, blocks, interpret=False)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, v).lower(
      lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 3


_SHARD_MAP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import pallas_kernels
    from pallas_kernels import common, reference, tpu
    jax.config.update("jax_default_matmul_precision", "highest")

    def inputs(shape, dtype=jnp.float32):
      B, T, S, N, K, H = shape
      r = jax.random.split(jax.random.key(0), 3)
      return (jax.random.normal(r[0], (B, T, N, H), dtype),
              jax.random.normal(r[1], (B, S, K, H), dtype),
              jax.random.normal(r[2], (B, S, K, H), dtype))

    kw = dict(causal=True, dropout_rate=0.2, dropout_rng=jax.random.key(3))
    blocks = tpu.BlockSizes.uniform(8, 128)
    kernel = lambda q, k, v: pallas_kernels.flash_attention(
        q, k, v, backend="tpu", interpret=True, block_sizes=blocks, **kw)
    ref = lambda q, k, v: reference.attention(q, k, v, **kw)

    # 1. Run in the interpreter under shard_map(check_vma=True) on a
    #    one-device mesh (the interpreter deadlocks with several CPU devices),
    #    forward and backward, with interpret=True and no interpret context.
    mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    sh1 = NamedSharding(mesh1, P("data"))
    q, k, v = (jax.device_put(x, sh1) for x in inputs((2, 16, 130, 2, 1, 32)))
    for fn in (kernel, ref):
      sm = jax.shard_map(fn, mesh=mesh1, in_specs=P("data"),
                         out_specs=P("data"))
      loss = lambda q, k, v: jnp.sum(sm(q, k, v) ** 2)
      out = jax.jit(sm)(q, k, v)
      grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
      if fn is kernel:
        got = (out, *grads)
    for a, b in zip(got, (out, *grads)):
      np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)

    # 2. Lower forward and backward for TPU on a two-device mesh.
    mesh2 = jax.make_mesh((2,), ("data",))
    sh = NamedSharding(mesh2, P("data"))
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=sh)
    q, k, v = inputs((4, 256, 384, 4, 2, 64))
    def attn(q, k, v):
      prep = common.prepare(q, k, v, **kw)
      out, lse = tpu._attention(q, k, v, prep, tpu.BlockSizes.uniform(128, 128),
                                interpret=False)
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
    sm = jax.shard_map(lambda *a: jax.grad(attn, (0, 1, 2))(*a), mesh=mesh2,
                       in_specs=P("data"), out_specs=P("data"))
    text = jax.jit(sm).trace(sds(q), sds(k), sds(v)).lower(
        lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3
    print("OK")
""")


def test_shard_map_with_check_vma():
  """Under ``shard_map`` (``check_vma=True``), in a fresh process.

  The process also shows that ``interpret=True`` alone (no
  ``force_tpu_interpret_mode``) serves the forward and ``jax.grad``.
  The TPU interpreter deadlocks when several forced CPU devices call back
  into it at once, so the kernels run on a one-device mesh and are lowered
  (not run) on a two-device one.
  """
  result = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT],
                          env=harness.env(devices=2), capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="block_k"):
    tpu.BlockSizes(block_k=100)
  with pytest.raises(ValueError, match="block_q_dq"):
    tpu.BlockSizes(block_q_dq=12)
  q = jnp.zeros((1, 8, 1, 32))
  with pytest.raises(TypeError, match="block_sizes"):
    pallas_kernels.flash_attention(q, q, q, backend="tpu", interpret=True,
                                   block_sizes=(128, 128))
  # NumPy ints are stored as Python ints: they size the kernels' grids.
  q = jax.random.normal(jax.random.key(0), (1, 16, 1, 8))
  run = lambda blocks: pallas_kernels.flash_attention(
      q, q, q, backend="tpu", interpret=True, block_sizes=blocks)
  numpy_blocks = tpu.BlockSizes(np.int64(8), np.int32(128), 8, 128, 8, 128)
  assert {type(numpy_blocks.block_q), type(numpy_blocks.block_k)} == {int}
  np.testing.assert_array_equal(run(numpy_blocks),
                                run(tpu.BlockSizes(8, 128, 8, 128, 8, 128)))
  with pytest.raises(ValueError, match="block_q"):
    tpu.BlockSizes(block_q=np.bool_(True))
