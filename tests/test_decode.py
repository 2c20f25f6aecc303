"""KV-cache decoding: the chunked attention core against the reference, and
prefill + step-by-step decoding against full causal attention (ragged
batches, causal and sliding window; functional, linen and nnx), compile
counts under ``jit``, and the full-cache rule.

Shape letters: B batch, T sequence length, t new tokens per call, L cache
capacity, N query heads, K key/value heads, H head dim, D features.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import jaxmha
from jaxmha import decode
from pallas_kernels import masks as kernel_masks
from pallas_kernels import reference
from tests.multidevice import harness
from tests.tolerances import FORWARD, assert_close

D = 12


@functools.lru_cache(maxsize=None)
def _model(cfg, B=3, T=11, seed=0):
  """``(params, x, full causal output)``, cached: compiling dominates here."""
  rng_p, rng_x = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(rng_x, (B, T, D))
  params = jaxmha.init_params(rng_p, cfg, x.shape, x.shape)
  params = jax.tree.map(lambda p: p + 0.05, params)  # nonzero biases
  full = jax.jit(lambda p, x: jaxmha.apply(p, cfg, x, x,
                                           use_causal_mask=True))(params, x)
  return params, x, full


def _prefill_and_decode(call, cache, x, prompt_lengths, chunk=1):
  """Ragged prefill, then ``chunk`` tokens per call until every example
  holds all ``T`` tokens; returns the ``(B, T, E)`` outputs per position."""
  B, T, _ = x.shape
  x = np.asarray(x)
  prompt_lengths = np.asarray(prompt_lengths, np.int32)
  P = max(int(prompt_lengths.max()), 1)
  out, cache = call(x[:, :P], cache, prompt_lengths)
  got = np.full(out.shape[:1] + (T,) + out.shape[2:], np.nan, np.float32)
  for b in range(B):
    got[b, :prompt_lengths[b]] = out[b, :prompt_lengths[b]]
  np.testing.assert_array_equal(cache.lengths, prompt_lengths)
  while True:
    lengths = np.asarray(cache.lengths)
    if (lengths >= T).all():
      break
    n = np.minimum(chunk, T - lengths).astype(np.int32)  # ragged steps
    idx = np.minimum(lengths[:, None] + np.arange(chunk), T - 1)  # (B, t)
    xt = np.take_along_axis(x, idx[..., None], axis=1)  # (B, t, D)
    out, cache = call(xt, cache, n)
    for b in range(B):
      got[b, lengths[b]:lengths[b] + n[b]] = out[b, :n[b]]
  return got, cache


def _functional_call(params, cfg):
  return jax.jit(lambda xt, c, n: jaxmha.apply(params, cfg, xt, xt, cache=c,
                                               new_lengths=n))


CONFIGS = {
    "mha": jaxmha.MHAConfig(num_heads=2, key_dim=4),
    "gqa": jaxmha.MHAConfig(num_heads=4, key_dim=4, num_key_value_heads=2),
    "mqa_window": jaxmha.MHAConfig(num_heads=4, key_dim=4,
                                   num_key_value_heads=1, sliding_window=3),
    "gqa_window_gate": jaxmha.MHAConfig(
        num_heads=4, key_dim=4, value_dim=3, num_key_value_heads=2,
        sliding_window=4, use_gate=True, output_shape=(2, 5)),
}


# -- the chunked core against the reference ------------------------------------


@pytest.mark.parametrize("L, chunk, window", [(13, 4, None), (13, 4, 3),
                                               (9, 64, 2)],
                         ids=lambda v: str(v))
def test_cached_attention_matches_reference(L, chunk, window):
  B, t, N, K, H = 3, 3, 4, 2, 8
  rng = np.random.default_rng(L + chunk)
  q = jnp.asarray(rng.normal(size=(B, t, N, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, L, K, H)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, L, K, 5)), jnp.float32)
  start = np.array([0, 4, L - t])  # each example's first query position
  pos = start[:, None] + np.arange(t)  # (B, t)
  kv_lengths = start + t
  q_valid = np.ones((B, t), bool)
  q_valid[1, 1] = False
  mask = rng.random((B, N, t, L)) > 0.2
  out, lse = decode.cached_attention(
      q, k, v, q_positions=pos, kv_lengths=kv_lengths, sliding_window=window,
      q_valid=q_valid, mask=mask, chunk_size=chunk)
  j = np.arange(L)
  allowed = (j <= pos[:, :, None]) & (j < kv_lengths[:, None, None])
  if window:
    allowed &= np.abs(pos[:, :, None] - j) < window
  allowed = (allowed & q_valid[:, :, None])[:, None] & mask  # (B, N, t, L)
  ref_out, ref_lse = reference.attention(q, k, v, mask=jnp.asarray(allowed),
                                         return_lse=True)
  assert_close(out, ref_out)
  assert_close(lse, ref_lse)
  np.testing.assert_array_equal(out[1, 1], 0.0)  # an invalid query row
  assert float(lse[1, 0, 1]) == kernel_masks.EMPTY_ROW_LSE


# -- prefill + decode equals full causal attention -----------------------------


@pytest.mark.parametrize("name, chunk", [("mha", 1), ("gqa", 3),
                                         ("mqa_window", 1),
                                         ("gqa_window_gate", 3)])
def test_functional_decode_equals_full_attention(name, chunk):
  cfg = CONFIGS[name]
  params, x, full = _model(cfg)
  cache = jaxmha.init_cache(cfg, batch_size=3, max_length=x.shape[1])
  got, cache = _prefill_and_decode(_functional_call(params, cfg), cache, x,
                                   prompt_lengths=[5, 0, 2], chunk=chunk)
  assert_close(got, full)
  np.testing.assert_array_equal(cache.lengths, [11, 11, 11])
  assert not cache.overflow.any()


def test_decode_over_many_chunks():
  """A cache longer than one chunk, and not a multiple of it."""
  cfg = CONFIGS["mqa_window"].replace(sliding_window=6)
  params, x, full = _model(cfg, T=13)
  call = jax.jit(lambda xt, c, n: decode.apply_with_projections(
      params, cfg, xt, xt, cache=c, new_lengths=n, chunk_size=4)[::3])
  cache = jaxmha.init_cache(cfg, batch_size=3, max_length=13)
  got, _ = _prefill_and_decode(call, cache, x, prompt_lengths=[9, 1, 4],
                               chunk=2)
  assert_close(got, full)


def test_linen_decode_equals_full_attention():
  layer = jaxmha.MultiHeadAttention(num_heads=4, key_dim=4,
                                    num_key_value_heads=2, sliding_window=4)
  _, x, _ = _model(layer.config)
  variables = layer.init(jax.random.key(1), x, x)
  full = layer.apply(variables, x, x, use_causal_mask=True)
  call = jax.jit(lambda xt, c, n: layer.apply(variables, xt, xt, cache=c,
                                              new_lengths=n))
  cache = jaxmha.init_cache(layer.config, batch_size=3, max_length=11)
  got, _ = _prefill_and_decode(call, cache, x, prompt_lengths=[4, 7, 1],
                               chunk=2)
  assert_close(got, full)


def test_nnx_decode_equals_full_attention():
  layer = jaxmha.nnx.MultiHeadAttention(
      num_heads=4, key_dim=4, num_key_value_heads=2, query_features=D,
      rngs=nnx.Rngs(0))
  _, x, _ = _model(layer.config)
  full = layer(x, x, use_causal_mask=True)

  @nnx.jit
  def step(m, xt, c, n):
    return m(xt, xt, cache=c, new_lengths=n)

  cache = jaxmha.init_cache(layer.config, batch_size=3, max_length=11)
  got, _ = _prefill_and_decode(lambda xt, c, n: step(layer, xt, c, n), cache,
                               x, prompt_lengths=[3, 3, 6])
  assert_close(got, full)


def test_padded_prefill_rows_give_the_output_bias():
  cfg = CONFIGS["gqa"]
  params, x, _ = _model(cfg)
  cache = jaxmha.init_cache(cfg, batch_size=3, max_length=11)
  out, _ = jaxmha.apply(params, cfg, x[:, :4], x[:, :4], cache=cache,
                        new_lengths=jnp.array([4, 1, 0]))
  bias = params["attention_output"]["bias"]
  np.testing.assert_allclose(out[1, 1:], jnp.broadcast_to(bias, (3, D)),
                             atol=1e-6)
  np.testing.assert_allclose(out[2], jnp.broadcast_to(bias, (4, D)),
                             atol=1e-6)


def test_masks_with_a_cache_match_the_full_path():
  """``attention_mask`` over cache positions and ``query_mask`` AND in."""
  cfg = CONFIGS["gqa"]
  params, x, _ = _model(cfg, T=6)
  rng = np.random.default_rng(0)
  attention_mask = rng.random((3, 6, 6)) > 0.3
  query_mask = rng.random((3, 6)) > 0.2
  kw = dict(attention_mask=attention_mask, query_mask=query_mask)
  full = jaxmha.apply(params, cfg, x, x, use_causal_mask=True, **kw)
  cache = jaxmha.init_cache(cfg, batch_size=3, max_length=6)
  out, _ = jaxmha.apply(params, cfg, x, x, cache=cache, **kw)
  assert_close(out, full)


def test_bfloat16_cache():
  cfg = CONFIGS["gqa"]
  params, x, full = _model(cfg)
  cache = jaxmha.init_cache(cfg, batch_size=3, max_length=11,
                            dtype=jnp.bfloat16)
  got, cache = _prefill_and_decode(_functional_call(params, cfg), cache, x,
                                   prompt_lengths=[6, 6, 6], chunk=5)
  assert cache.k.dtype == jnp.bfloat16
  assert_close(got, full, table=FORWARD, dtype=jnp.bfloat16)


# -- compilation ---------------------------------------------------------------


def test_jitted_decode_step_compiles_once():
  cfg = CONFIGS["mqa_window"]
  params, x, full = _model(cfg, B=2, T=20)
  traces = []

  @jax.jit
  def step(params, cache, xt):
    traces.append(1)  # runs only while tracing
    return jaxmha.apply(params, cfg, xt, xt, cache=cache)

  cache = jaxmha.init_cache(cfg, batch_size=2, max_length=20)
  for i in range(20):
    out, cache = step(params, cache, x[:, i:i + 1])
  assert len(traces) == 1
  assert step._cache_size() == 1  # pylint: disable=protected-access
  np.testing.assert_array_equal(cache.lengths, [20, 20])
  assert_close(out[:, 0], full[:, -1])


# -- the full-cache rule -------------------------------------------------------


def test_full_cache_is_an_eager_error():
  cfg = CONFIGS["gqa"]
  params, x, _ = _model(cfg)
  cache = jaxmha.init_cache(cfg, batch_size=3, max_length=6)
  _, cache = jaxmha.apply(params, cfg, x[:, :4], x[:, :4], cache=cache,
                          new_lengths=jnp.array([4, 2, 3]))
  with pytest.raises(ValueError, match=r"example 0 holds lengths\[0\]=4 of "
                     r"max_length=6 tokens and this call writes 3 more"):
    jaxmha.apply(params, cfg, x[:, :3], x[:, :3], cache=cache)
  # Ragged writes that fit are fine.
  _, cache = jaxmha.apply(params, cfg, x[:, :3], x[:, :3], cache=cache,
                          new_lengths=jnp.array([2, 3, 3]))
  np.testing.assert_array_equal(cache.lengths, [6, 5, 6])


def test_full_cache_under_jit_sets_overflow_and_never_overwrites():
  cfg = CONFIGS["gqa"]
  params, x, _ = _model(cfg)
  step = jax.jit(lambda c, xt: jaxmha.apply(params, cfg, xt, xt, cache=c))
  cache = jaxmha.init_cache(cfg, batch_size=3, max_length=4)
  _, cache = jaxmha.apply(params, cfg, x[:, :3], x[:, :3], cache=cache,
                          new_lengths=jnp.array([3, 1, 2]))
  before = cache
  _, cache = step(cache, x[:, 3:5])  # example 0 has room for one of two
  np.testing.assert_array_equal(cache.overflow, [True, False, False])
  np.testing.assert_array_equal(cache.lengths, [4, 3, 4])
  np.testing.assert_array_equal(cache.k[0, :3], before.k[0, :3])
  _, cache = step(cache, x[:, 5:7])
  np.testing.assert_array_equal(cache.overflow, [True, True, True])  # sticky
  np.testing.assert_array_equal(cache.lengths, [4, 4, 4])
  # Without debug checks (the default), checkify sees no error; with them
  # the same overflow is one.
  checked = checkify.checkify(step)
  err, _ = checked(before, x[:, 3:5])
  err.throw()
  checking = dataclasses.replace(before, debug_checks=True)
  err, (_, after) = checked(checking, x[:, 3:5])
  with pytest.raises(checkify.JaxRuntimeError, match="KV cache is full"):
    err.throw()
  assert after.debug_checks  # the returned cache keeps checking


def test_traced_new_lengths_out_of_range_fail_under_checkify():
  """Traced new_lengths outside [0, t] are clipped, and checkify says so;
  a valid ragged write (padding dropped out of range) passes checkify."""
  cfg = CONFIGS["gqa"]
  params, x, _ = _model(cfg)
  step = jax.jit(checkify.checkify(
      lambda c, n: jaxmha.apply(params, cfg, x[:, :3], x[:, :3], cache=c,
                                new_lengths=n)))
  cache = jaxmha.init_cache(cfg, batch_size=3, max_length=8,
                            debug_checks=True)
  err, (_, valid) = step(cache, jnp.array([3, 1, 0]))
  err.throw()
  np.testing.assert_array_equal(valid.lengths, [3, 1, 0])
  err, (_, clipped) = step(cache, jnp.array([5, -1, 2]))
  with pytest.raises(checkify.JaxRuntimeError,
                     match=r"`new_lengths` must be in \[0, t\] with t=3"):
    err.throw()
  np.testing.assert_array_equal(clipped.lengths, [3, 0, 2])


def test_a_decode_step_exports_and_serializes_with_a_symbolic_batch():
  """jax.export of a jitted step: KVCache round-trips through serialize()
  (default: no debug checks, whose effects it cannot write), the batch may
  be symbolic, and the deserialized step decodes as full causal attention."""
  cfg = CONFIGS["gqa"]
  params, x, _ = _model(cfg)
  B, T, D = x.shape
  step = jax.jit(lambda p, c, xt: jaxmha.apply(p, cfg, xt, xt, cache=c),
                 donate_argnums=1)
  b, = jax.export.symbolic_shape("b")
  spec = lambda a: jax.ShapeDtypeStruct((b,) + a.shape[1:], a.dtype)
  cache = jaxmha.init_cache(cfg, batch_size=B, max_length=T)
  exported = jax.export.export(step)(
      params, jax.tree.map(spec, cache), spec(x[:, :1]))
  assert not exported.unordered_effects and not exported.ordered_effects
  served = jax.export.deserialize(exported.serialize())
  outs = []
  for i in range(T):
    out, cache = served.call(params, cache, x[:, i:i + 1])
    outs.append(out)
  assert isinstance(cache, jaxmha.decode.KVCache) and not cache.debug_checks
  want = jaxmha.apply(params, cfg, x, x, use_causal_mask=True)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=2e-5,
                             rtol=2e-5)
  # With debug checks, the program holds checkify's effects.
  checking = jaxmha.init_cache(cfg, batch_size=B, max_length=T,
                               debug_checks=True)
  assert jax.export.export(step)(params, checking,
                                 x[:, :1]).unordered_effects


def test_example_generates_the_same_tokens_with_and_without_a_cache():
  """examples/generate_with_cache.py, briefly trained: it exits non-zero
  when cached and uncached generation disagree."""
  result = subprocess.run(
      [sys.executable, "-W", "error", "examples/generate_with_cache.py",
       "--train-steps", "5", "--new-tokens", "8"], cwd=harness.REPO,
      env=harness.env(devices=1), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  assert "identical tokens with and without the cache: True" in result.stdout


# -- errors --------------------------------------------------------------------


def test_unsupported_arguments_with_a_cache_are_clear_errors():
  cfg = CONFIGS["mha"]
  params, x, _ = _model(cfg)
  cache = jaxmha.init_cache(cfg, batch_size=3, max_length=11)
  cases = [
      (dict(return_attention_scores=True), NotImplementedError, "scores"),
      (dict(value_mask=jnp.ones((3, 2), bool)), NotImplementedError,
       "value_mask"),
      (dict(new_lengths=jnp.array([3, 0, 1])), ValueError,
       r"new_lengths=\[3 0 1\]"),
      (dict(new_lengths=jnp.array([1, 1])), ValueError, r"\(B,\) = \(3,\)"),
  ]
  for kw, error, match in cases:
    with pytest.raises(error, match=match):
      jaxmha.apply(params, cfg, x[:, :2], x[:, :2], cache=cache, **kw)
  with pytest.raises(NotImplementedError, match="training=True"):
    jaxmha.apply(params, cfg.replace(dropout=0.1), x[:, :2], x[:, :2],
                 cache=cache, training=True, dropout_rng=jax.random.key(0))
  with pytest.raises(NotImplementedError, match="flash_attention=True"):
    jaxmha.apply(params, cfg.replace(flash_attention=True), x[:, :2],
                 x[:, :2], cache=cache)
  with pytest.raises(ValueError, match="same t new tokens"):
    jaxmha.apply(params, cfg, x[:, :2], x[:, :3], cache=cache)
  # Context parallelism is refused, never dropped silently.
  with pytest.raises(jaxmha.UnsupportedCallError,
                     match="context_parallel_axis='seq' with a cache"):
    jaxmha.apply(params, cfg.replace(context_parallel_axis="seq"), x[:, :2],
                 x[:, :2], cache=cache)
  with pytest.raises(ValueError, match="needs a `cache`"):
    jaxmha.apply(params, cfg, x, x, new_lengths=jnp.array([1, 1, 1]))
  other = jaxmha.init_cache(cfg.replace(key_dim=8), batch_size=3,
                            max_length=11)
  with pytest.raises(ValueError, match=r"K=2, H=4"):
    jaxmha.apply(params, cfg, x[:, :2], x[:, :2], cache=other)
  with pytest.raises(ValueError, match="max_length=0"):
    jaxmha.init_cache(cfg, batch_size=1, max_length=0)
  # An integer cache would truncate the keys and values it stores.
  with pytest.raises(TypeError, match="`dtype` must be a floating-point"):
    jaxmha.init_cache(cfg, batch_size=1, max_length=8, dtype=jnp.int8)
  with pytest.raises(TypeError, match=r"its \.config"):
    jaxmha.init_cache(jaxmha.MultiHeadAttention(num_heads=2, key_dim=4),
                      batch_size=1, max_length=8)


def test_sizes_take_numpy_ints_and_refuse_bools():
  cache = jaxmha.init_cache(CONFIGS["mha"], batch_size=np.int64(3),
                            max_length=np.int32(11))
  assert cache.k.shape[:2] == (3, 11)
  with pytest.raises(ValueError, match="`batch_size` must be a positive"):
    jaxmha.init_cache(CONFIGS["mha"], batch_size=True, max_length=11)
  q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 4)),
                  jnp.float32)
  kw = dict(q_positions=jnp.array([[3, 4]]), kv_lengths=jnp.array([5]))
  k = jnp.concatenate([q, q, q[:, :1]], axis=1)  # (1, 5, 2, 4)
  want, _ = decode.cached_attention(q, k, k, chunk_size=2, **kw)
  got, _ = decode.cached_attention(q, k, k, chunk_size=np.int64(2), **kw)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="`chunk_size` must be a positive"):
    decode.cached_attention(q, k, k, chunk_size=True, **kw)
