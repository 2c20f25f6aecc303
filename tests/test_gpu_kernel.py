"""The GPU (Triton) flash-attention kernel, run on CPU in interpret mode.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim.

The conformance suite runs against the reference with small block sizes
(16 and 32), so ragged, multi-block paths run at small T and S. Interpret
mode clamps out-of-bounds reads silently, so padded tails get their own
poison tests; block skipping is checked on the loop bounds and end to end
(a NaN in a block that must be skipped never shows up); and every kernel is
lowered to Triton IR for a CUDA target, which CPU CI can do without a GPU.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from benchmarks.shapes import CONFORMANCE, AttentionShape
from pallas_kernels import gpu_triton
from pallas_kernels import masks as masks_lib
from pallas_kernels.masks import MaskSpec
from tests.conformance import (AttentionConformance, Case, diagonal_cases,
                               jitted_grad, make_inputs, reference_attention)
from tests.multidevice import harness
from tests.tolerances import FORWARD, GRAD, assert_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small tiles: several blocks (ragged last ones) even at T, S ~ 30.
SMALL = gpu_triton.BlockSizes(block_q=16, block_k=32, block_q_dkv=32,
                              block_k_dkv=16, block_q_dq=16, block_k_dq=32)
# Fewer, larger tiles for the long shapes (interpret mode runs the grid in
# sequence, so the number of programs sets the run time).
MEDIUM = gpu_triton.BlockSizes(block_q=64, block_k=32, block_q_dkv=32,
                               block_k_dkv=64, block_q_dq=64, block_k_dq=32)


# Under jit, each interpret-mode kernel compiles once as part of one XLA
# program; called eagerly, every pallas_call and pad compiles on its own
# (about 3x slower on CPU).
@functools.partial(jax.jit, static_argnames=(
    "causal", "sliding_window", "scale", "dropout_rate", "block_sizes",
    "return_lse"))
def _jitted(q, k, v, **kw):
  return pallas_kernels.flash_attention(q, k, v, backend="gpu",
                                        interpret=True, **kw)


@functools.partial(jax.jit, static_argnames=(
    "causal", "sliding_window", "return_lse"))
def ref_attention(q, k, v, **kw):
  """The fp32 reference, jitted (the tests below call it many times)."""
  return reference_attention(q, k, v, **kw)


def gpu_attention(q, k, v, block_sizes=None, **kw):
  if block_sizes is None:
    block_sizes = SMALL if max(q.shape[1], k.shape[1]) <= 256 else MEDIUM
  return _jitted(q, k, v, block_sizes=block_sizes, **kw)


class TestGpuKernelInterpret(AttentionConformance):
  # Every mask kind, every conformance shape (T, S in {1, 7, 128, 200, 513};
  # H in {32, 64, 80, 128}; N/K in {1, 2, 4}; Hv != H), fp32 and bf16.
  CASES = diagonal_cases(dtypes=("float32", "bfloat16"))
  # Gradients (dq, dk, dv, through out and lse) on every shape, with and
  # without dropout, fp32 and bf16.
  # Gradients (dq, dk, dv, through out and lse): T, S in {1, 7, 128, 200,
  # 513}, N/K in {1, 2, 4}, fp32 and bf16, dropout on and off. Dense masks
  # and q_lengths get gradient tests of their own below.
  GRAD_CASES = (
      Case(CONFORMANCE[0], "causal", "float32"),
      Case(CONFORMANCE[1], "all", "bfloat16", 0.25),
      Case(CONFORMANCE[2], "window_lr", "float32", 0.25),
      Case(CONFORMANCE[3], "segments", "bfloat16"),
      Case(CONFORMANCE[5], "kv_lengths", "float32"),
  )
  DROPOUT_CASES = diagonal_cases(shapes=CONFORMANCE[1:3],
                                 masks=("causal", "all"), dropouts=(0.3,))

  def attention(self, q, k, v, **kw):
    return gpu_attention(q, k, v, **kw)

  def unsupported_calls(self):
    big = jnp.zeros((1, 8, 1, 512))
    wide_v = jnp.zeros((1, 8, 1, 320))
    small = jnp.zeros((1, 8, 1, 32))
    return [
        ("H > 256", lambda: gpu_attention(big, big, big)),
        ("Hv > 256", lambda: gpu_attention(small, small, wide_v)),
    ]


# -- padded tails: garbage past the valid region never leaks --------------


def _poisoned(x, axis, valid, value):
  """``x`` with positions ``>= valid[b]`` along ``axis`` set to ``value``."""
  pos = jnp.arange(x.shape[axis]).reshape(
      (1,) + (1,) * (axis - 1) + (-1,) + (1,) * (x.ndim - axis - 1))
  bad = pos >= valid.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(bad, jnp.asarray(value, x.dtype), x)


def test_poison_past_lengths_does_not_leak():
  # Ragged T and S (padded inside to 48 and 64) and lengths that end inside
  # a block: the kernel reads the poisoned tails in its straddling blocks.
  shape = AttentionShape(B=2, T=37, S=45, N=2, K=1, H=40, Hv=24)
  q, k, v, _ = make_inputs(Case(shape))
  kv_lengths, q_lengths = jnp.array([21, 45]), jnp.array([30, 10])
  kw = dict(kv_lengths=kv_lengths, q_lengths=q_lengths, causal=True)
  clean = (_poisoned(q, 1, q_lengths, 0.0), _poisoned(k, 1, kv_lengths, 0.0),
           _poisoned(v, 1, kv_lengths, 0.0))
  # NaN: any read of a poisoned entry that reaches a result shows.
  dirty = (_poisoned(q, 1, q_lengths, np.nan),
           _poisoned(k, 1, kv_lengths, np.nan),
           _poisoned(v, 1, kv_lengths, np.nan))
  d_out = jax.random.normal(jax.random.key(3), (2, 37, 2, 24))

  def loss(fn, q, k, v):
    out, lse = fn(q, k, v, return_lse=True, **kw)
    return jnp.sum(out * d_out) + jnp.sum(
        jnp.where(lse > masks_lib.EMPTY_ROW_LSE / 2, lse, 0.0))

  out, lse = gpu_attention(*dirty, return_lse=True, **kw)
  ref_out, ref_lse = ref_attention(*clean, return_lse=True, **kw)
  assert_close(out, ref_out, FORWARD, "float32", "out")
  assert_close(lse, ref_lse, FORWARD, "float32", "lse")
  grads = jitted_grad(functools.partial(loss, gpu_attention))(*dirty)
  ref = jitted_grad(functools.partial(loss, reference_attention))(*clean)
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
    assert bool(jnp.all(jnp.isfinite(g))), name
    assert_close(g, r, GRAD, "float32", name)


def test_ragged_tails_padded_inside():
  # T, S and H all off the tiles (T=19 -> 32, S=33 -> 64, H=24 -> 32); the
  # padded keys must be masked (they would otherwise add exp(0 - m) to l_i).
  shape = AttentionShape(B=1, T=19, S=33, N=2, K=2, H=24, Hv=40)
  q, k, v, _ = make_inputs(Case(shape))
  out, lse = gpu_attention(q, k, v, return_lse=True)
  ref_out, ref_lse = ref_attention(q, k, v, return_lse=True)
  assert out.shape == (1, 19, 2, 40) and lse.shape == (1, 2, 19)
  assert_close(out, ref_out, FORWARD, "float32", "out")
  assert_close(lse, ref_lse, FORWARD, "float32", "lse")


# -- block skipping ---------------------------------------------------------


@pytest.mark.parametrize("spec", [MaskSpec(), MaskSpec.causal(),
                                  MaskSpec.sliding_window(5),
                                  MaskSpec(left=3, right=1),
                                  MaskSpec(left=40, right=0),
                                  MaskSpec(left=0, right=None)],
                         ids=str)
@pytest.mark.parametrize("T,S,bq,bk", [(128, 128, 16, 32), (37, 200, 32, 16),
                                       (200, 7, 16, 16), (1, 513, 16, 64)])
def test_loop_bounds_match_mask_spec(spec, T, S, bq, bk):
  Sp = -(-S // bk) * bk
  dense = spec.dense(T, S)
  for q_lo in range(0, T, bq):
    lo, a, b, hi = gpu_triton.inner_block_range(spec, q_lo, bq, T, bk,
                                                Sp // bk, S)
    # The visited range is MaskSpec's own (with q_hi clipped to T).
    assert (lo, hi) == spec.kv_block_range(q_lo, min(q_lo + bq, T), S, bk)
    assert lo <= a <= b <= hi
    rows = dense[q_lo:q_lo + bq]
    for kb in range(Sp // bk):
      block = rows[:, kb * bk:(kb + 1) * bk]
      visited = lo <= kb < hi
      # Skipped blocks hold no allowed pair; unmasked ones only allowed ones
      # (and no padded key).
      assert visited or not block.any(), (q_lo, kb)
      if a <= kb < b:
        assert block.all() and (kb + 1) * bk <= S, (q_lo, kb)


def test_causal_does_about_half_the_work():
  T = S = 1024
  bq, bk = 128, 64
  visits = lambda spec: sum(
      np.subtract(*gpu_triton.inner_block_range(spec, q_lo, bq, T, bk,
                                                S // bk, S)[::-3])
      for q_lo in range(0, T, bq))
  full, causal = visits(MaskSpec()), visits(MaskSpec.causal())
  assert full == (T // bq) * (S // bk)
  assert 0.5 <= causal / full <= 0.5 + bq / S  # the diagonal blocks
  window = visits(MaskSpec.sliding_window(64))
  assert window <= 4 * (T // bq)  # O(T), not O(T * S)


def test_dynamic_bounds_lengths():
  spec = MaskSpec()
  # kv_lengths = 40 with 16-key blocks: blocks 0, 1 unmasked, 2 masked.
  lo, a, b, hi = gpu_triton.inner_block_range(spec, jnp.int32(0), 16, 64, 16,
                                              8, jnp.int32(40))
  assert (int(lo), int(a), int(b), int(hi)) == (0, 0, 2, 3)
  # A query block past q_lengths visits nothing.
  lo, a, b, hi = gpu_triton.inner_block_range(
      spec, jnp.int32(32), 16, 64, 16, 8, 128, o_valid=jnp.int32(30))
  assert int(hi) == int(lo)
  # A block straddling q_lengths runs every key block masked.
  lo, a, b, hi = gpu_triton.inner_block_range(
      spec, jnp.int32(16), 16, 64, 16, 8, 128, o_valid=jnp.int32(20))
  assert int(a) == int(b) and int(hi) == 8


def test_skipped_blocks_are_not_read():
  # A NaN value at key 40: a query attending it legitimately gets NaN, but
  # the window (|i - j| < 3) keeps queries < 37 and > 42 from it; with
  # 16 x 16 tiles they share no tile with key 40 only if that tile is
  # skipped (0 * NaN is NaN in P @ V, dP = dO V^T, dK = dS^T Q).
  shape = AttentionShape(B=1, T=96, S=96, N=1, K=1, H=32)
  q, k, v, _ = make_inputs(Case(shape))
  v = v.at[0, 40].set(jnp.nan)
  bs = gpu_triton.BlockSizes(16, 16, 16, 16, 16, 16)
  out = gpu_attention(q, k, v, block_sizes=bs, sliding_window=3)
  # Query tiles 0, 4 and 5 see no key of tile 2 ([32, 48)): 15 + 2 < 32
  # and 64 - 2 > 47; tiles 1 and 3 do (query 31 sees key 33).
  far = np.r_[0:16, 64:96]
  assert bool(jnp.all(jnp.isfinite(out[0, far])))
  assert not bool(jnp.all(jnp.isfinite(out[0, 40])))
  # Segment ids: tiles of different documents are skipped at run time.
  ids = jnp.repeat(jnp.arange(6), 16)[None]  # (1, 96), 16 per document
  out = gpu_attention(q, k, v, block_sizes=bs, segment_ids=ids)
  assert bool(jnp.all(jnp.isfinite(out[0, far])))
  d_out = jnp.ones_like(out)
  dq = jax.grad(lambda q: jnp.sum(
      gpu_attention(q, k, v, block_sizes=bs, segment_ids=ids) * d_out))(q)
  assert bool(jnp.all(jnp.isfinite(dq[0, far])))


# -- dtypes, blocks, lowering, transforms -----------------------------------


def _value_and_grads(fn, q, k, v, **kw):
  """(out, (dq, dk, dv)) of ``sum(out ** 2)``: one compile for both."""
  def loss(q, k, v):
    out = fn(q, k, v, **kw)
    return jnp.sum(out.astype(jnp.float32) ** 2), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2),
                                               has_aux=True))(q, k, v)
  return out, grads


def test_float16_forward_and_grad():
  shape = AttentionShape(B=1, T=40, S=24, N=2, K=1, H=32)
  q, k, v, kw = make_inputs(Case(shape, "causal", "float16"))
  out, grads = _value_and_grads(gpu_attention, q, k, v, **kw)
  ref_out, ref_grads = _value_and_grads(reference_attention, q, k, v, **kw)
  assert out.dtype == jnp.float16
  assert_close(out, ref_out, FORWARD, "float16")
  for g, r in zip(grads, ref_grads):
    assert g.dtype == jnp.float16
    assert_close(g, r, GRAD, "float16")


def test_float16_large_logits_stay_finite():
  """fp16 q and k whose logits reach 1e8 (forward) or 4e4 (gradients):
  probabilities are capped at 1, so fp16 p never overflows (XLA:CPU
  rounded the two uses of the scores apart: inf outputs, dq off by 0.1)."""
  bq, bk, bv = (jax.random.normal(jax.random.key(i), (1, 16, 1, 64))
                for i in range(3))
  v = bv.astype(jnp.float16)
  q = (jnp.sign(bq) * 3e4).astype(jnp.float16)
  k = (bk * 1e4).astype(jnp.float16)
  # At 1e8 a logit's fp32 rounding (8) decides which key wins, so only
  # check that every row is finite and an average of the values.
  out = gpu_attention(q, k, v).astype(jnp.float32)
  assert bool(jnp.all(jnp.isfinite(out)))
  assert bool(jnp.all((out >= v.min(1, keepdims=True) - 1e-2)
                      & (out <= v.max(1, keepdims=True) + 1e-2)))
  q, k = (bq * 200).astype(jnp.float16), (bk * 67).astype(jnp.float16)
  _, grads = _value_and_grads(gpu_attention, q, k, v)
  _, ref_grads = _value_and_grads(reference_attention, q, k, v)
  for g, r in zip(grads, ref_grads):
    assert_close(g, r, GRAD, "float16")


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="block_k"):
    gpu_triton.BlockSizes(block_k=48)
  with pytest.raises(ValueError, match="block_q"):
    gpu_triton.BlockSizes(block_q=8)
  with pytest.raises(ValueError, match="num_warps"):
    gpu_triton.BlockSizes(num_warps=3)
  with pytest.raises(TypeError, match="block_sizes"):
    gpu_attention(*([jnp.zeros((1, 8, 1, 32))] * 3), block_sizes=(64, 64))
  for H in (32, 80, 128, 256):
    sizes = gpu_triton.BlockSizes.get_default(H, H, jnp.bfloat16)
    assert sizes.num_warps == (4 if H <= 64 else 8)


@pytest.mark.parametrize("mask,dtype,dropout", [
    ("all", "bfloat16", 0.2), ("dense", "float32", 0.0)])
def test_lowers_to_triton(mask, dtype, dropout):
  # The Pallas -> Triton IR lowering runs on CPU for a CUDA target; it
  # rejects what Triton cannot express (non power-of-two tiles, unsupported
  # ops) without a GPU. Default block sizes, as on the GPU.
  shape = AttentionShape(B=2, T=200, S=300, N=4, K=2, H=80, Hv=64)
  if mask == "dense":  # per-head dense mask: the (None, G, Tp, bk) blocks
    shape = AttentionShape(B=1, T=64, S=64, N=4, K=2, H=64)
  q, k, v, kw = make_inputs(Case(shape, mask, dtype, dropout))
  if mask == "dense":  # with a band and q_lengths, fp32 (IEEE dots)
    kw["mask"] = jnp.broadcast_to(kw["mask"], (1, 4, 64, 64))
    kw.update(q_lengths=jnp.array([50]), sliding_window=(9, 2))

  def loss(q, k, v):
    out, lse = pallas_kernels.flash_attention(q, k, v, backend="gpu",
                                              return_lse=True, **kw)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

  lowered = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(
      q, k, v).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  for name in ("flash_attention_fwd", "flash_attention_dkv",
               "flash_attention_dq"):
    assert name in text, name


def test_per_head_dense_mask_gqa():
  # A (B, N, T, S) mask with G = 2 heads per kv head: the dK/dV kernel reads
  # the group's two mask slices.
  shape = AttentionShape(B=1, T=24, S=40, N=4, K=2, H=32)
  q, k, v, _ = make_inputs(Case(shape))
  mask = jax.random.bernoulli(jax.random.key(5), 0.6, (1, 4, 24, 40))
  out, grads = _value_and_grads(gpu_attention, q, k, v, mask=mask)
  ref_out, ref_grads = _value_and_grads(reference_attention, q, k, v,
                                        mask=mask)
  assert_close(out, ref_out, FORWARD)
  for g, r in zip(grads, ref_grads):
    assert_close(g, r, GRAD)


def test_shard_map_two_devices():
  # shard_map with its default check_vma=True, batch sharded over 2 forced
  # host devices; in a subprocess since the device count is fixed at start.
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from jax.sharding import PartitionSpec as P
      jax.config.update("jax_default_matmul_precision", "highest")
      import pallas_kernels
      from pallas_kernels import gpu_triton, reference
      bs = gpu_triton.BlockSizes(16, 16, 16, 16, 16, 16)
      mesh = jax.make_mesh((2,), ("x",))
      q = jax.random.normal(jax.random.key(0), (2, 24, 2, 32))
      q = jax.device_put(q, jax.sharding.NamedSharding(mesh, P("x")))
      rng = jax.random.key(1)
      def f(q, k, v):
        return pallas_kernels.flash_attention(
            q, k, v, causal=True, backend="gpu", interpret=True,
            block_sizes=bs, dropout_rate=0.1, dropout_rng=rng)
      def loss(fn, q):
        return jnp.sum(jax.shard_map(fn, mesh=mesh, in_specs=P("x"),
                                     out_specs=P("x"))(q, q, q) ** 2)
      def ref(q, k, v):
        return reference.attention(q, k, v, causal=True, dropout_rate=0.1,
                                   dropout_rng=rng)
      with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(lambda q: loss(f, q)))(q)
        want = jax.jit(jax.value_and_grad(lambda q: loss(ref, q)))(q)
      for a, b in zip(got, want):
        assert jnp.allclose(a, b, atol=1e-4, rtol=1e-4), (a, b)
      print("OK")
  """)
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          env=harness.env(devices=2),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_a_jax_without_pallas_triton_falls_back_to_blockwise():
  # JAX 0.11 deprecates Pallas's Triton backend. Where JAX cannot import it,
  # the kernel refuses by name, the layer takes the blockwise path on a GPU
  # and the ring says how to run without the kernel. In a subprocess: the import is blocked before anything imports it.
  code = textwrap.dedent("""
      import sys
      sys.modules["jax.experimental.pallas.triton"] = None  # import fails
      from unittest import mock
      import jax, jax.numpy as jnp, numpy as np
      import jaxmha, pallas_kernels
      q = jax.random.normal(jax.random.key(0), (1, 16, 2, 32))
      try:
        pallas_kernels.flash_attention(q, q, q, backend="gpu", interpret=True)
        raise AssertionError("the kernel ran without its Pallas backend")
      except pallas_kernels.UnsupportedCallError as e:
        assert "jax.experimental.pallas.triton" in str(e), e
      cfg = jaxmha.MHAConfig(num_heads=2, key_dim=16)
      x = jax.random.normal(jax.random.key(1), (2, 256, 32))
      params = jaxmha.init_params(jax.random.key(2), cfg, x.shape, x.shape)
      want = jaxmha.apply(params, cfg, x, x, use_causal_mask=True)
      with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        how = jaxmha.explain(cfg, x, x, use_causal_mask=True)
        assert how.path == "xla_blockwise", how
        assert "pallas.triton" in how.refusals["flash"], how
        got = jaxmha.apply(params, cfg, x, x, use_causal_mask=True)
        np.testing.assert_array_equal(got, want)
        forced = dict(cfg.get_config(), flash_attention=True)
        try:
          jaxmha.apply(params, jaxmha.MHAConfig(**forced), x, x)
          raise AssertionError("forced flash ran without its Pallas backend")
        except jaxmha.UnsupportedCallError as e:
          assert "pallas.triton" in str(e), e
        with jax.set_mesh(jax.make_mesh((1,), ("seq",))):
          ring = dict(cfg.get_config(), context_parallel_axis="seq")
          try:
            jaxmha.apply(params, jaxmha.MHAConfig(**ring), x, x)
            raise AssertionError("the ring ran without its Pallas backend")
          except jaxmha.UnsupportedCallError as e:
            assert "flash_attention=False" in str(e), e
          ring["flash_attention"] = False
          got = jaxmha.apply(params, jaxmha.MHAConfig(**ring), x, x,
                             use_causal_mask=True)
          np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
      print("OK")
  """)
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          env=harness.env(devices=1),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_gpu_check_tiny(tmp_path):
  # The GPU check script's --tiny mode: every part at tiny sizes, on CPU
  # (about 35 s of CPU, 90 s and more of wall time on a busy 2-core box).
  out_dir = str(tmp_path)
  env = dict(os.environ, OUT=out_dir, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check",
                           "--tiny"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(os.path.join(out_dir, "gpu_check.json")) as f:
    report = json.load(f)
  assert report["correctness"] and all(r["pass"]
                                       for r in report["correctness"])
  assert any(r["row_shards"] > 1 for r in report["correctness"])
  # Every (causal, pass) timing row has the kernel and XLA; cuDNN may fail.
  assert len(report["timing"]) == 4
  for row in report["timing"]:
    assert "tflops" in row["results"]["kernel"]
    assert "tflops" in row["results"]["xla"]
  assert all("tflops" in r for r in report["sweep"])
  with open(os.path.join(out_dir, "gpu_check.md")) as f:
    assert "| kernel/cuDNN |" in f.read()
