"""The reference against an independent, naive NumPy attention, and the suite
run on the reference itself (its self-consistency: gradients finite, empty
rows zero, dropout bits)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.shapes import AttentionShape
from pallas_kernels import common
from pallas_kernels import dropout as dropout_lib
from pallas_kernels import masks as masks_lib
from pallas_kernels import reference
from tests.conformance import AttentionConformance, Case, make_inputs


class TestReference(AttentionConformance):

  def attention(self, q, k, v, **kw):
    return reference.attention(q, k, v, **kw)


def _naive(q, k, v, allowed, scale):
  """Loops over (b, n), NumPy softmax, GQA by head index."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, _ = q.shape
  K = k.shape[2]
  out = np.zeros((B, T, N, v.shape[-1]))
  for b in range(B):
    for n in range(N):
      kn = n // (N // K)
      s = q[b, :, n] @ k[b, :, kn].T * scale
      s = np.where(allowed[b, n], s, -np.inf)
      with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
      p = np.nan_to_num(p)  # empty rows -> zero
      out[b, :, n] = p @ v[b, :, kn]
  return out


def test_reference_equals_naive_numpy():
  shape = AttentionShape(B=2, T=9, S=13, N=4, K=2, H=16, Hv=8)
  q, k, v, kw = make_inputs(Case(shape, "all"))
  B, T, S, N = 2, 9, 13, 4
  allowed = np.ones((B, N, T, S), bool)
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  allowed &= (j <= i)
  q_ids, kv_ids = kw["segment_ids"]
  allowed &= np.asarray(q_ids)[:, None, :, None] == np.asarray(
      kv_ids)[:, None, None, :]
  allowed &= j[None, None] < np.asarray(kw["kv_lengths"])[:, None, None, None]
  allowed &= np.asarray(kw["mask"])
  got = reference.attention(q, k, v, **kw)
  np.testing.assert_allclose(got, _naive(q, k, v, allowed, 16**-0.5),
                             atol=1e-5, rtol=1e-5)


def test_sliding_window_is_keras_band():
  shape = AttentionShape(B=1, T=6, S=6, N=1, K=1, H=8)
  q, k, v, _ = make_inputs(Case(shape))
  i, j = np.arange(6)[:, None], np.arange(6)[None, :]
  allowed = np.broadcast_to(np.abs(i - j) < 3, (1, 1, 6, 6))
  np.testing.assert_allclose(reference.attention(q, k, v, sliding_window=3),
                             _naive(q, k, v, allowed, 8**-0.5), atol=1e-5)


def test_dropout_keep_rate_and_rescaling():
  seeds = dropout_lib.seed_words(jax.random.key(3))
  keep = dropout_lib.keep_mask_block(seeds, 0.3, 2, 2, 64, 64)
  assert abs(float(keep.mean()) - 0.7) < 0.01
  # Rows and heads are not copies of each other.
  assert not np.array_equal(keep[0, 0, 0], keep[0, 0, 1])
  assert not np.array_equal(keep[0, 0], keep[0, 1])
  assert not np.array_equal(keep[0], keep[1])
  # With uniform attention, E[out] = mean(v): the rescaling by 1/(1-p).
  q = jnp.zeros((1, 256, 1, 8))
  v = jax.random.normal(jax.random.key(0), (1, 256, 1, 8))
  out = reference.attention(q, q, v, dropout_rate=0.3,
                            dropout_rng=jax.random.key(1))
  np.testing.assert_allclose(out.mean(axis=1), v.mean(axis=1), atol=0.03)


def test_dropout_bits_are_the_uint32_murmur_chain():
  """The int32 hash equals the same chain written in NumPy uint32."""
  def fmix(h):
    h = np.uint32(h)
    h ^= h >> np.uint32(16)
    h = np.uint32((int(h) * 0x85EBCA6B) & 0xFFFFFFFF)
    h ^= h >> np.uint32(13)
    h = np.uint32((int(h) * 0xC2B2AE35) & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    return h
  s0, s1 = 12345, 0xDEADBEEF
  seeds = jnp.array([s0, s1], jnp.uint32).view(jnp.int32)
  b, n, i, j = 3, 5, 77, 1001
  m = lambda a, c: (a * c) & 0xFFFFFFFF
  h = fmix(s0 ^ m(b, 0x9E3779B9))
  h = fmix(int(h) ^ ((n + s1) & 0xFFFFFFFF))
  h = fmix((int(h) + m(i, 0x9E3779B9)) & 0xFFFFFFFF)
  h = fmix(int(h) ^ m(j, 0x27D4EB2F))
  h = fmix((int(h) + s1) & 0xFFFFFFFF)
  expected = int(h) >> 1
  h_row = dropout_lib.row_hash(seeds, jnp.int32(b), jnp.int32(n), jnp.int32(i))
  got = dropout_lib.bits_from_row(h_row, jnp.int32(j), seeds[1])
  assert int(got) == expected


def test_kernel_api_argument_errors_name_the_argument():
  import pytest  # pylint: disable=g-import-not-at-top
  import pallas_kernels  # pylint: disable=g-import-not-at-top
  q = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
  call = lambda **kw: pallas_kernels.flash_attention(q, q, q, **kw)
  key = jax.random.key(1)
  cases = [
      (dict(scale="a"), TypeError, "scale='a'"),
      (dict(scale=float("nan")), ValueError, "scale"),
      (dict(dropout_rate=[0.1], dropout_rng=key), TypeError, "dropout_rate"),
      (dict(dropout_rate=1.5, dropout_rng=key), ValueError, "dropout_rate"),
      (dict(dropout_rate=0.1, dropout_rng=0), TypeError, "dropout_rng"),
      (dict(sliding_window=(-1, 2)), ValueError, r"sliding_window=\(-1, 2\)"),
      (dict(mask=jnp.ones((16, 15), bool)), ValueError, r"got \(16, 15\)"),
      (dict(causal="False"), TypeError, "causal='False'"),
      (dict(causal=jnp.array(True)), TypeError, "causal"),
      # (backend="gpu" without interpret stays legal off a GPU: it lowers
      # for a CUDA target ahead of time, see test_lowers_to_triton.)
      (dict(backend="tpu"), pallas_kernels.UnsupportedCallError,
       "interpret=True"),
  ]
  for kwargs, error, match in cases:
    with pytest.raises(error, match=match):
      call(**{"backend": "xla", **kwargs})
  # Traced where a value is needed while tracing.
  traced = [("scale", lambda x: call(backend="xla", scale=x)),
            ("dropout_rate", lambda x: call(backend="xla", dropout_rate=x,
                                            dropout_rng=key)),
            ("causal", lambda x: call(backend="xla", causal=x > 0))]
  for name, fn in traced:
    with pytest.raises(TypeError,
                       match=f"`{name}` must be .*known while tracing"):
      jax.jit(fn)(0.5)
  # NumPy and concrete JAX scalars are numbers too.
  want = call(backend="xla", scale=0.5, dropout_rate=0.25, dropout_rng=key)
  for scalar in (np.float32, jnp.float32, jnp.bfloat16):
    got = call(backend="xla", scale=scalar(0.5), dropout_rate=scalar(0.25),
               dropout_rng=key)
    np.testing.assert_array_equal(got, want)


def test_three_dim_mask_is_per_example():
  """A ``(#B, T, S)`` mask holds for every head of its example, as Keras's
  ``attention_mask``, whatever ``N`` is."""
  for N in (2, 3):
    q = jax.random.normal(jax.random.key(N), (2, 8, N, 16))
    mask = np.ones((2, 8, 8), bool)
    mask[1] = np.tril(mask[1])  # example 0: full; example 1: causal
    got = reference.attention(q, q, q, mask=jnp.asarray(mask))
    want = reference.attention(q, q, q, mask=jnp.asarray(mask)[:, None])
    np.testing.assert_array_equal(got, want)
    # A batch of one runs other matmul kernels: equal to rounding.
    np.testing.assert_allclose(
        got[1], reference.attention(q[1:], q[1:], q[1:], causal=True)[0],
        rtol=1e-6, atol=1e-6)


def test_every_row_attends_matches_the_dense_band():
  """``MaskSpec.every_row_attends``, which lets the fused path skip the
  empty-row ``where``, against the band evaluated at every position."""
  specs = [masks_lib.MaskSpec(left, right) for left in (None, 0, 1, 3)
           for right in (None, 0, 2)]
  for spec, T, S, q_offset, kv_offset in itertools.product(
      specs, (1, 2, 5), (1, 3, 6), (0, 2, 7), (0, 1, 4, 9)):
    allowed = spec.allows(q_offset + np.arange(T)[:, None],
                          kv_offset + np.arange(S)[None, :])
    want = bool(np.all(np.any(np.broadcast_to(allowed, (T, S)), axis=1)))
    assert spec.every_row_attends(T, S, q_offset, kv_offset) == want, (
        spec, T, S, q_offset, kv_offset)
  assert not masks_lib.MaskSpec().every_row_attends(4, 4, jnp.int32(0))


def test_a_block_of_rows_with_no_key_is_zero_despite_nan_values():
  """A causal block whose keys all follow its queries (a ring step) and
  values that hold NaN: the rows attend nothing, and their output is zero."""
  q, k, v, _ = make_inputs(Case(AttentionShape(B=1, T=4, S=4, N=2, K=2,
                                               H=8)), seed=2)
  v = v.at[:, 1].set(jnp.nan)
  prep = common.prepare(q, k, v, causal=True)
  out, lse = reference.attention_core(q, k, v, prep, q_offset=0, kv_offset=4)
  assert bool(jnp.all(out == 0.0))
  assert bool(jnp.all(lse == masks_lib.EMPTY_ROW_LSE))
