"""The blockwise XLA path (``backend="xla"``) against the reference.

Small blocks (16 query rows, 32 keys) make the conformance shapes span many
ragged blocks, so the masked, unmasked and padded block paths all run.
"""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from benchmarks.shapes import CONFORMANCE, AttentionShape
from pallas_kernels import blockwise
from pallas_kernels import common
from pallas_kernels import masks as masks_lib
from pallas_kernels.masks import MaskSpec
from tests.conformance import (MASK_KINDS, AttentionConformance, Case,
                               diagonal_cases, jitted_grad, make_inputs,
                               reference_attention)
from tests.tolerances import FORWARD, GRAD, assert_close

SMALL_BLOCKS = blockwise.BlockSizes(block_q=16, block_k=32)


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window",
                                             "scale", "dropout_rate",
                                             "return_lse"))
def _small_block_attention(q, k, v, **kw):
  return pallas_kernels.flash_attention(q, k, v, backend="xla",
                                        block_sizes=SMALL_BLOCKS, **kw)


class TestBlockwise(AttentionConformance):
  # Every mask kind on two shapes, in fp32, bf16 and fp16 (the full product
  # runs past the CPU budget and adds no code path: the same plans recur).
  CASES = (diagonal_cases(masks=MASK_KINDS)
           + diagonal_cases(shapes=CONFORMANCE[3:] + CONFORMANCE[:3],
                            masks=MASK_KINDS,
                            dtypes=("bfloat16", "float16", "float32")))

  def attention(self, q, k, v, **kw):
    # Under jit: one compilation per case instead of op-by-op dispatch.
    return _small_block_attention(q, k, v, **kw)


# Shapes with several examples, for the path that takes them a few at a time.
_BATCHED = (CONFORMANCE[0], CONFORMANCE[2],
            AttentionShape(B=3, T=40, S=56, N=4, K=2, H=16))


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window",
                                             "scale", "dropout_rate",
                                             "return_lse"))
def _one_example_per_step(q, k, v, **kw):
  # Patched while tracing: the compiled program takes one example per step.
  with mock.patch.object(blockwise, "_MAX_STEP_ENTRIES", 1):
    return pallas_kernels.flash_attention(q, k, v, backend="xla",
                                          block_sizes=SMALL_BLOCKS, **kw)


class TestBlockwiseByExamples(AttentionConformance):
  # Per-example masks and dropout bits must follow each example into its
  # step (dropout hashes the example's index in the whole batch).
  CASES = diagonal_cases(shapes=_BATCHED, masks=MASK_KINDS)
  GRAD_CASES = diagonal_cases(shapes=_BATCHED, masks=MASK_KINDS,
                              dtypes=("float32", "bfloat16"),
                              dropouts=(0.0, 0.25))
  DROPOUT_CASES = diagonal_cases(shapes=_BATCHED,
                                 masks=("none", "causal", "all"),
                                 dropouts=(0.3,))

  def attention(self, q, k, v, **kw):
    return _one_example_per_step(q, k, v, **kw)


@pytest.mark.parametrize("B,N,T,expected", [
    (1, 8, 4096, 1),  # one example: never split
    (4, 8, 1024, 1),  # 1024 x 256 blocks of 8 heads: 2M entries each
    (4, 8, 512, 2),  # 512 x 256 forward, 256 x 512 backward: 1M
    (4, 8, 256, 4),
    (6, 8, 256, 3),  # 4 would fit; 3 divides the batch
    (7, 8, 256, 1),  # 524k entries each: no padding
    (1009, 8, 64, 64),  # 32k each: 16 steps, the last padded by 15
    (4, 1, 1024, 4),
])
def test_examples_per_step(B, N, T, expected):
  assert _examples_per_step(B, N, T) == expected


def _examples_per_step(B, N, T, block_sizes=None):
  spec = MaskSpec.full()
  sizes = block_sizes or blockwise.default_block_sizes(spec, T)
  st = blockwise._Static(
      plan=blockwise.plan(spec, T, T, sizes),
      bwd_plan=blockwise.plan(spec, T, T, sizes.backward),
      spec=spec, B=B, K=N, G=1, scale=0.125, dropout_rate=0.0)
  return blockwise._examples_per_step(st)


def test_padded_steps_keep_each_examples_dropout_bits():
  # Five examples, three per step, the last step padded by one: the second
  # step's examples are 3 and 4 of the batch, for the dropout hash and the
  # per-example masks alike.
  shape = AttentionShape(B=5, T=24, S=24, N=2, K=2, H=16)
  q, k, v, kw = make_inputs(Case(shape, "all", dropout=0.3))
  causal = kw.pop("causal", False)
  # SMALL_BLOCKS on T=24: 12 x 24 blocks, 576 entries per example; 4 fit,
  # no divisor of 5 comes close.
  with mock.patch.object(blockwise, "_MAX_STEP_ENTRIES", 2400):
    assert _examples_per_step(5, 2, 24, SMALL_BLOCKS) == 3
    fn = lambda q, k, v: pallas_kernels.flash_attention(
        q, k, v, causal=causal, backend="xla", block_sizes=SMALL_BLOCKS,
        **kw)
    out = jax.jit(fn)(q, k, v)
    grads = jitted_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))))(q, k, v)
  ref = lambda q, k, v: reference_attention(q, k, v, causal=causal, **kw)
  assert_close(out, ref(q, k, v), FORWARD)
  ref_grads = jitted_grad(lambda *a: jnp.sum(jnp.sin(ref(*a))))(q, k, v)
  for g, r in zip(grads, ref_grads):
    assert_close(g, r, GRAD)


# -- block skipping -----------------------------------------------------------


def test_causal_visits_about_half_the_blocks():
  T = 4096
  full = blockwise.plan(MaskSpec.full(), T, T, blockwise.BlockSizes(256, 256))
  causal = blockwise.plan(MaskSpec.causal(), T, T,
                          blockwise.BlockSizes(256, 256))
  n = T // 256
  assert full.num_visited == n * n and not full.masked
  assert causal.num_visited == n * (n + 1) // 2
  # Only the diagonal blocks need a mask.
  assert len(causal.masked) == n
  assert causal.num_visited / full.num_visited < 0.54


def test_sliding_window_visits_blocks_linear_in_T():
  bs = blockwise.BlockSizes(128, 128)
  spec = MaskSpec.sliding_window(200)
  visited = [blockwise.plan(spec, T, T, bs).num_visited
             for T in (2048, 4096, 8192)]
  # Each query block sees at most ceil((2 * 199 + 128) / 128) + 1 key blocks.
  for T, n in zip((2048, 4096, 8192), visited):
    assert n <= (T // 128) * 6
  assert visited[2] - visited[1] == 2 * (visited[1] - visited[0])


@pytest.mark.parametrize("seed", range(4))
def test_plan_matches_the_dense_band(seed, monkeypatch):
  # Chunks of 4 positions, so small blocks are cut too.
  monkeypatch.setattr(blockwise, "_chunk_width", lambda block: 4)
  rng = np.random.default_rng(seed)
  for _ in range(50):
    T, S = (int(x) for x in rng.integers(1, 90, size=2))
    left, right = (None if rng.random() < 0.3 else int(rng.integers(0, 40))
                   for _ in range(2))
    spec = MaskSpec(left=left, right=right)
    bs = blockwise.BlockSizes(*(int(x) for x in rng.integers(1, 33, size=2)))
    p = blockwise.plan(spec, T, S, bs)
    bq, bk = p.block_q, p.block_k
    dense = np.zeros((p.num_q_blocks * bq, p.num_k_blocks * bk), bool)
    dense[:T, :S] = spec.dense(T, S)
    blocks = dense.reshape(p.num_q_blocks, bq, p.num_k_blocks, bk)
    real_rows = (np.arange(p.num_q_blocks * bq) < T).reshape(-1, bq)
    # Visited: exactly the blocks with an allowed pair.
    any_allowed = {tuple(ij) for ij in np.argwhere(blocks.any(axis=(1, 3)))}
    assert set(p.unmasked) | set(p.masked) == any_allowed
    # Unmasked: every real row may attend every key of the block.
    for i, j in p.unmasked:
      assert blocks[i, real_rows[i], j].all()
    for i, j in p.masked:
      assert not blocks[i, real_rows[i], j].all()
    for by_q in (True, False):
      for data in (False, True):
        _check_schedule(p, spec, dense, by_q, data)


def _schedule_visits(p, spec, by_q, has_data_mask):
  """Per update of the schedule: ``(query slice, key slice, masked)``."""
  st = blockwise._Static(plan=p, bwd_plan=p, spec=spec, B=1, K=1, G=1,
                         scale=1.0, dropout_rate=0.0)
  sched = blockwise._schedule(st, by_q, has_data_mask)
  bq, bk = p.block_q, p.block_k
  n_outer = p.num_q_blocks if by_q else p.num_k_blocks
  b_outer = bq if by_q else bk
  len_inner = p.S if by_q else p.T

  def pair(o, n, masked):
    i, j = (o, n) if by_q else (n, o)
    return (slice(i * bq, (i + 1) * bq), slice(j * bk, (j + 1) * bk),
            masked)

  for o in range(n_outer):
    lo, a, b, hi = sched.ranges[o]
    for n in range(a, b):
      yield pair(o, n, sched.main_masked)
    if sched.kinds is None:
      for n in list(range(lo, a)) + list(range(b, hi)):
        yield pair(o, n, True)
      continue
    base = o * b_outer
    for pc in sched.kinds[sched.kind[o]]:
      # Pieces lie inside the outer block and the real inner positions.
      assert 0 <= pc.lo < pc.hi <= b_outer
      assert 0 <= base + pc.inner_lo < base + pc.inner_hi <= len_inner
      assert sched.span[0] <= pc.inner_lo and pc.inner_hi <= sched.span[1]
      outer = slice(base + pc.lo, base + pc.hi)
      inner = slice(base + pc.inner_lo, base + pc.inner_hi)
      yield (outer, inner, pc.masked) if by_q else (inner, outer, pc.masked)


def _check_schedule(p, spec, dense, by_q, has_data_mask):
  """Every allowed entry is computed exactly once; unmasked updates hold
  allowed entries only (and, in the forward, no padded key)."""
  count = np.zeros(dense.shape, int)
  unmasked = np.zeros(dense.shape, bool)
  for rows, cols, masked in _schedule_visits(p, spec, by_q, has_data_mask):
    count[rows, cols] += 1
    if not masked:
      unmasked[rows, cols] = True
  T, S = p.T, p.S
  np.testing.assert_array_equal(count[:T, :S][dense[:T, :S]], 1)
  assert not has_data_mask or not unmasked.any()
  assert dense[:T, :S][unmasked[:T, :S]].all()
  if by_q:  # forward: a padded key is never unmasked
    assert not unmasked[:T, S:].any()


@pytest.mark.parametrize("T", [1024, 2048, 4096])
def test_causal_schedule_computes_little_more_than_the_triangle(T):
  # With the default blocks, both passes mask about one chunk (64
  # positions) per row and so compute about half of that beyond the
  # triangle, whatever T.
  spec = MaskSpec.causal()
  sizes = blockwise.default_block_sizes(spec, T)
  triangle = T * (T + 1) / 2
  for by_q, p in ((True, blockwise.plan(spec, T, T, sizes)),
                  (False, blockwise.plan(spec, T, T, sizes.backward))):
    computed = masked = 0
    for rows, cols, is_masked in _schedule_visits(p, spec, by_q, False):
      area = (rows.stop - rows.start) * (cols.stop - cols.start)
      computed += area
      masked += area if is_masked else 0
    assert masked <= T * 64, (by_q, masked / T)
    assert computed <= triangle + T * 64 / 2, (by_q, computed - triangle)


# -- the causal diagonal in halving squares -------------------------------------


@pytest.mark.parametrize("b", [512, 1024, 500, 96])
def test_halving_squares_cover_the_triangle_once(b):
  # Leaf triangles (masked) and squares of each level, as the stacked
  # updates slice them: together every entry on or below the diagonal once,
  # and above it only inside the leaves.
  leaf = blockwise._triangle_leaf(b)
  count = np.zeros((b, b), int)
  for i in range(b // leaf):
    count[i * leaf:(i + 1) * leaf, i * leaf:(i + 1) * leaf] += 1
  for n in blockwise._square_counts(b):
    w = b // (2 * n)
    for i in range(n):  # second half's queries, first half's keys
      count[(2 * i + 1) * w:(2 * i + 2) * w, 2 * i * w:(2 * i + 1) * w] += 1
  lower = np.tril(np.ones((b, b), bool))
  np.testing.assert_array_equal(count[lower], 1)
  assert count.max() == 1
  assert count.sum() - lower.sum() == b * (leaf - 1) // 2


def _edges(spec, T, sizes, by_q):
  p = blockwise.plan(spec, T, T, sizes.backward if not by_q else sizes)
  st = blockwise._Static(plan=p, bwd_plan=p, spec=spec, B=1, K=1, G=1,
                         scale=1.0, dropout_rate=0.0)
  return st, blockwise._schedule(st, by_q, False).kinds


def test_triangle_kind_is_the_causal_diagonal_alone():
  spec = MaskSpec.causal()
  sizes = blockwise.default_block_sizes(spec, 2048)
  for by_q in (True, False):
    st, kinds = _edges(spec, 2048, sizes, by_q)
    assert len(kinds) == 2  # no edge (the first block's), the diagonal
    kind = lambda **kw: blockwise._triangle_kind(
        st, kinds[1], by_q, **{"has_data_mask": False, "rate": 0.0, **kw})
    assert kind()
    # Per-example masks or dropout also act on the diagonal: the chunks.
    assert not kind(has_data_mask=True) and not kind(rate=0.1)
    assert not blockwise._triangle_kind(st, kinds[0], by_q, False, 0.0)
  # A window's edges, and blocks shorter than _MIN_TRIANGLE_BLOCK.
  window = MaskSpec.causal() & MaskSpec(left=300, right=None)
  st, kinds = _edges(window, 2048, sizes, True)
  assert not any(blockwise._triangle_kind(st, e, True, False, 0.0)
                 for e in kinds)
  st, kinds = _edges(spec, 256, sizes, True)
  assert st.plan.block_q == 256
  assert not blockwise._triangle_kind(st, kinds[-1], True, False, 0.0)


@pytest.mark.parametrize("shape,dtype,block_sizes", [
    # Both passes by halving squares; grouped heads (G=2).
    (AttentionShape(B=1, T=1024, S=1024, N=4, K=2, H=16), "float32", None),
    # bf16 with a scale that is no power of two: applied to the logits.
    (AttentionShape(B=1, T=1024, S=1024, N=2, K=2, H=32), "bfloat16", None),
    # The last blocks hold one padded row: their diagonal takes the chunks,
    # the others the squares (a switch on the kind), in both passes.
    (AttentionShape(B=1, T=1023, S=1023, N=2, K=1, H=16), "float32", None),
    # T != S (top-left): the forward's diagonals, and the backward's first
    # key blocks; the keys past T are seen by no query.
    (AttentionShape(B=1, T=1024, S=1536, N=2, K=2, H=16), "float32", None),
    # Long sequences' blocks: 1024-position diagonals in both passes, with
    # two key blocks per forward diagonal.
    (AttentionShape(B=1, T=2048, S=2048, N=2, K=1, H=16), "float32",
     blockwise.DEFAULT_LONG_CAUSAL_BLOCK_SIZES),
])
def test_causal_diagonal_by_halving_squares(shape, dtype, block_sizes):
  q, k, v, _ = make_inputs(Case(shape, "causal", dtype=dtype))
  calls = {"_triangle_state": 0, "_triangle_grads": 0}

  def counted(name):
    fn = getattr(blockwise, name)

    def wrapper(*args):
      calls[name] += 1
      return fn(*args)
    return wrapper

  fn = lambda q, k, v: pallas_kernels.flash_attention(
      q, k, v, causal=True, backend="xla", return_lse=True,
      block_sizes=block_sizes)
  ref = lambda q, k, v: reference_attention(q, k, v, causal=True,
                                            return_lse=True)
  target = jax.random.normal(jax.random.key(1), q.shape[:3] + v.shape[3:])

  def loss(fn):
    def of(*args):
      out, lse = fn(*args)
      return (0.5 * jnp.sum((out.astype(jnp.float32) - target) ** 2)
              + jnp.sum(jnp.sin(lse)))
    return of

  with mock.patch.object(blockwise, "_triangle_state",
                         counted("_triangle_state")), \
       mock.patch.object(blockwise, "_triangle_grads",
                         counted("_triangle_grads")):
    out, lse = jax.jit(fn)(q, k, v)
    grads = jitted_grad(loss(fn))(q, k, v)
  assert calls["_triangle_state"] and calls["_triangle_grads"], calls
  ref_out, ref_lse = ref(q, k, v)
  assert_close(out, ref_out, FORWARD, dtype)
  assert_close(lse, ref_lse, FORWARD, dtype)
  ref_grads = jitted_grad(loss(ref))(q, k, v)
  for g, r in zip(grads, ref_grads):
    assert_close(g, r, GRAD, dtype)


@pytest.mark.parametrize("scale", [4.0, 3.0, 0.125])
def test_fp16_queries_near_their_range_with_a_scale(scale):
  """fp16 q of 2e4 with small keys: the logits are small, so no scale may
  overflow q (a power of two above 1 used to be folded into fp16 q: inf,
  zero rows and NaN gradients). Forward and gradients as the reference's."""
  q = jnp.full((1, 4, 1, 16), 2e4, jnp.float16)
  k = (jax.random.normal(jax.random.key(1), (1, 6, 1, 16)) * 1e-4).astype(
      jnp.float16)
  v = jax.random.normal(jax.random.key(2), (1, 6, 1, 16)).astype(jnp.float16)
  out = _small_block_attention(q, k, v, scale=scale)
  want = reference_attention(q, k, v, scale=scale)
  assert_close(out, want, FORWARD, "float16")
  loss = lambda fn: lambda q, k, v: jnp.sum(
      fn(q, k, v, scale=scale).astype(jnp.float32) ** 2)
  grads = jitted_grad(loss(_small_block_attention))(q, k, v)
  for g, r in zip(grads, jitted_grad(loss(reference_attention))(q, k, v)):
    assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
    assert_close(g, r, GRAD, "float16")


def test_padded_key_blocks_are_masked():
  # Ragged S: the last key block holds padding and is masked.
  p = blockwise.plan(MaskSpec.full(), 64, 100, blockwise.BlockSizes(64, 32))
  assert p.block_k == 25 and p.num_k_blocks == 4 and not p.masked
  p = blockwise.plan(MaskSpec.full(), 64, 100, blockwise.BlockSizes(64, 64))
  assert p.block_k == 50 and not p.masked
  p = blockwise.plan(MaskSpec.full(), 64, 101, blockwise.BlockSizes(64, 64))
  assert p.block_k == 51 and p.masked == ((0, 1),)


def test_fully_masked_query_blocks_are_empty_rows():
  # Window with T >> S: queries far past the keys have no key block at all.
  shape = AttentionShape(B=1, T=200, S=20, N=2, K=1, H=16)
  q, k, v, _ = make_inputs(Case(shape))
  out, lse = _small_block_attention(q, k, v, sliding_window=4,
                                    return_lse=True)
  np.testing.assert_array_equal(out[:, 30:], 0.0)
  np.testing.assert_array_equal(lse[:, :, 30:], pallas_kernels.EMPTY_ROW_LSE)
  ref = reference_attention(q, k, v, sliding_window=4)
  assert_close(out, ref, FORWARD)


# -- blocks the per-example masks allow entirely --------------------------------


def _per_example_masks(kind: str, B: int, T: int):
  """Masks that allow some SMALL_BLOCKS blocks entirely for both examples,
  some in part and some not at all."""
  if kind == "kv_lengths":
    return dict(kv_lengths=jnp.array([T, 80]))
  if kind == "q_lengths":
    return dict(q_lengths=jnp.array([T, 80]))
  if kind == "segments":
    ids = np.zeros((B, T), np.int32)
    ids[0, 80:], ids[1, 96:] = 1, 1
    return dict(segment_ids=jnp.asarray(ids))
  dense = np.ones((B, 1, T, T), bool)
  dense[:, :, 80:, 64:] = np.random.default_rng(0).random((B, 1, T - 80,
                                                            T - 64)) < 0.7
  dense[1, :, 40:, :8] = False
  return dict(mask=jnp.asarray(dense))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["kv_lengths", "q_lengths", "segments",
                                  "dense"])
def test_blocks_the_masks_allow_entirely_run_unmasked(kind, causal):
  B, T = 2, 128
  shape = AttentionShape(B=B, T=T, S=T, N=4, K=2, H=16)
  q, k, v, _ = make_inputs(Case(shape))
  kw = _per_example_masks(kind, B, T)
  prep = common.prepare(q, k, v, causal=causal, **kw)
  # What the per-example masks alone allow, (#B, #N, T, S).
  allowed = np.asarray(masks_lib.dense_mask(MaskSpec.full(), prep.data, B,
                                            4, T, T))
  for sizes in (SMALL_BLOCKS, SMALL_BLOCKS.backward):
    p = blockwise.plan(prep.spec, T, T, sizes)
    st = blockwise._Static(plan=p, bwd_plan=p, spec=prep.spec, B=B, K=2,
                           G=2, scale=prep.scale, dropout_rate=0.0)
    blocks = blockwise._block_data(prep.data, st)
    full_seen = set()
    for i, j in p.unmasked + p.masked:
      live, full = (bool(x) for x in blockwise._block_tests(blocks, st, i, j))
      entries = allowed[..., i * p.block_q:(i + 1) * p.block_q,
                        j * p.block_k:(j + 1) * p.block_k]
      # A skipped block has nothing allowed; an unmasked one, nothing not.
      assert live or not entries.any(), (kind, causal, sizes, i, j)
      assert entries.all() or not full, (kind, causal, sizes, i, j)
      if (i, j) in p.unmasked:
        full_seen.add(full)
    # Both kinds of block occur, in both passes' plans.
    assert full_seen == {True, False}, (kind, causal, sizes)

  fn = lambda q, k, v: _small_block_attention(q, k, v, causal=causal, **kw)
  ref = lambda q, k, v: reference_attention(q, k, v, causal=causal, **kw)
  assert_close(fn(q, k, v), ref(q, k, v), FORWARD)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  grads = jitted_grad(loss(fn))(q, k, v)
  for g, r in zip(grads, jitted_grad(loss(ref))(q, k, v)):
    assert_close(g, r, GRAD)


# -- memory -------------------------------------------------------------------


def _train_step_temp_bytes(T: int, B=1, N=2, H=32) -> int:
  q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)

  def loss(q, k, v):
    out = pallas_kernels.flash_attention(q, k, v, causal=True, backend="xla")
    return jnp.sum(out)

  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_sequence_length():
  # Lengths that share their default blocks (causal, long keys).
  lengths = [blockwise.LONG_CAUSAL_MIN_LENGTH * 2**i for i in range(3)]
  temps = [_train_step_temp_bytes(T) for T in lengths]
  for small, big in zip(temps, temps[1:]):
    assert big < 2.6 * small, temps
  # Far below one (T, T) fp32 score matrix per head.
  assert temps[-1] < lengths[-1]**2 * 4 / 16, temps


# -- default block sizes and odd shapes -----------------------------------------


@pytest.mark.parametrize("T,S", [(1, 1), (1000, 1000), (700, 1)])
def test_default_blocks(T, S):
  shape = AttentionShape(B=1, T=T, S=S, N=4, K=2, H=16, Hv=24)
  q, k, v, kw = make_inputs(Case(shape, "all" if T == S else "none"))
  causal = kw.pop("causal", False)
  fn = jax.jit(lambda q, k, v, kw: pallas_kernels.flash_attention(
      q, k, v, causal=causal, backend="xla", return_lse=True, **kw))
  out, lse = fn(q, k, v, kw)
  ref, ref_lse = reference_attention(q, k, v, causal=causal,
                                     return_lse=True, **kw)
  assert_close(out, ref, FORWARD)
  assert_close(lse, ref_lse, FORWARD)
  if T > 1:  # several default blocks: the backward's loops too
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) ** 2)
    grads = jitted_grad(loss(lambda *a: fn(*a, kw)[0]))(q, k, v)
    ref_grads = jitted_grad(loss(lambda *a: reference_attention(
        *a, causal=causal, **kw)))(q, k, v)
    for g, r in zip(grads, ref_grads):
      assert_close(g, r, GRAD)


def _sizes_planned_by_attention(T: int, causal: bool):
  """The block sizes ``blockwise.attention`` plans its two passes with, at
  ``T = S`` and default sizes (traced by shape only)."""
  q = jax.random.normal(jax.random.key(0), (1, T, 1, 8))
  prep = common.prepare(q, q, q, causal=causal)
  with mock.patch.object(blockwise, "plan", wraps=blockwise.plan) as planned:
    jax.eval_shape(lambda q: blockwise.attention(q, q, q, prep), q)
  return [c.args[3] for c in planned.call_args_list]


def test_default_backward_rows_follow_the_key_length():
  # 128 rows against the backward's 1024-key blocks, 256 against keys
  # shortened below them; a band keeps its own sizes.
  full, causal = MaskSpec.full(), MaskSpec.causal()
  rows = lambda spec, S: blockwise.plan(
      spec, S, S, blockwise.default_block_sizes(spec, S).backward).block_q
  assert [rows(full, S) for S in (512, 1023, 1024, 4096)] == [
      256, 256, 128, 128]
  assert blockwise.default_block_sizes(full) == blockwise.DEFAULT_BLOCK_SIZES
  assert rows(causal, 512) == rows(causal, 4096) == 256
  # attention() plans with the key length: forward+backward at S=1024 runs
  # 128-row backward blocks.
  assert _sizes_planned_by_attention(1024, causal=False) == [
      blockwise.DEFAULT_BLOCK_SIZES, blockwise.DEFAULT_BLOCK_SIZES.backward]


def test_long_causal_sequences_take_larger_blocks():
  # From LONG_CAUSAL_MIN_LENGTH keys on (or unknown, long keys), causal
  # attention alone: a window keeps the banded sizes.
  causal, window = MaskSpec.causal(), MaskSpec(left=300, right=300)
  long_sizes = blockwise.DEFAULT_LONG_CAUSAL_BLOCK_SIZES
  n = blockwise.LONG_CAUSAL_MIN_LENGTH
  assert blockwise.default_block_sizes(causal, n) == long_sizes
  assert blockwise.default_block_sizes(causal) == long_sizes
  assert (blockwise.default_block_sizes(causal, n - 1)
          == blockwise.DEFAULT_BANDED_BLOCK_SIZES)
  assert (blockwise.default_block_sizes(window, 4 * n)
          == blockwise.DEFAULT_BANDED_BLOCK_SIZES)
  # attention() plans both passes with them, and with the banded sizes
  # below the threshold (so it passes the key length on).
  assert _sizes_planned_by_attention(n, causal=True) == [
      long_sizes, long_sizes.backward]
  banded = blockwise.DEFAULT_BANDED_BLOCK_SIZES
  assert _sizes_planned_by_attention(n // 2, causal=True) == [
      banded, banded.backward]


@pytest.mark.parametrize("mask", ["causal_window", "all"])
def test_backward_blocks_differ_from_forward(mask):
  # Tall forward blocks, wide backward ones: the backward re-blocks q, out,
  # lse and the masks with its own plan.
  sizes = blockwise.BlockSizes(block_q=48, block_k=16, block_q_bwd=16,
                               block_k_bwd=40)
  shape = AttentionShape(B=2, T=100, S=100, N=4, K=2, H=16, Hv=8)
  q, k, v, kw = make_inputs(Case(shape, mask))
  causal = kw.pop("causal", False)
  fn = lambda q, k, v: pallas_kernels.flash_attention(
      q, k, v, causal=causal, backend="xla", block_sizes=sizes,
      dropout_rate=0.25, dropout_rng=jax.random.key(3), **kw)
  ref = lambda q, k, v: reference_attention(
      q, k, v, causal=causal, dropout_rate=0.25,
      dropout_rng=jax.random.key(3), **kw)
  assert_close(jax.jit(fn)(q, k, v), ref(q, k, v), FORWARD)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  grads = jitted_grad(loss(fn))(q, k, v)
  ref_grads = jitted_grad(loss(ref))(q, k, v)
  for g, r in zip(grads, ref_grads):
    assert_close(g, r, GRAD)


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="block_q"):
    blockwise.BlockSizes(block_q=0, block_k=8)
  with pytest.raises(ValueError, match="block_k_bwd"):
    blockwise.BlockSizes(block_q=8, block_k=8, block_k_bwd=-1)
  q = jnp.zeros((1, 8, 1, 8))
  with pytest.raises(TypeError, match="BlockSizes"):
    pallas_kernels.flash_attention(q, q, q, backend="xla",
                                   block_sizes=(16, 16))


# -- transforms -----------------------------------------------------------------


# T=1024 with the default blocks computes the diagonal by halving squares.
@pytest.mark.parametrize("T,block_sizes", [(48, SMALL_BLOCKS), (1024, None)])
def test_shard_map_over_heads(T, block_sizes):
  from jax.sharding import Mesh, PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:1]), ("heads",))
  shape = AttentionShape(B=1, T=T, S=T, N=4, K=2, H=16)
  q, k, v, _ = make_inputs(Case(shape))
  spec = P(None, None, "heads", None)

  @jax.jit
  def fn(q, k, v):
    return jax.shard_map(
        lambda q, k, v: pallas_kernels.flash_attention(
            q, k, v, causal=True, backend="xla", block_sizes=block_sizes),
        mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)

  assert_close(fn(q, k, v), reference_attention(q, k, v, causal=True),
               FORWARD)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a)), (0, 1, 2))(q, k, v)
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))


def test_vmap_of_gradient_with_batched_lengths():
  shape = AttentionShape(B=1, T=40, S=40, N=2, K=2, H=16)
  q, k, v, _ = make_inputs(Case(shape))
  lengths = jnp.array([[0], [13], [40]])  # (3, B): one all-padding example

  def loss(fn, q, k, v, kv_lengths):
    return jnp.sum(fn(q, k, v, kv_lengths=kv_lengths) ** 2)

  ours = lambda q, k, v, **kw: pallas_kernels.flash_attention(
      q, k, v, backend="xla", block_sizes=SMALL_BLOCKS, **kw)
  grad = lambda fn: jax.vmap(jax.grad(lambda *a: loss(fn, *a), (0, 1, 2)),
                             in_axes=(None, None, None, 0))
  got = jax.jit(grad(ours))(q, k, v, lengths)
  ref = grad(reference_attention)(q, k, v, lengths)
  for g, r in zip(got, ref):
    assert_close(g, r, GRAD)


def _most_dot_batch_dims(jaxpr) -> int:
  """The most batch dims of any ``dot_general`` in ``jaxpr`` or the jaxprs
  its equations hold."""
  most = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (_, (batch_dims, _)) = eqn.params["dimension_numbers"]
      most = max(most, len(batch_dims))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          most = max(most, _most_dot_batch_dims(sub))
  return most


def _folded(vmapped, args, one, one_args) -> bool:
  """Whether ``vmapped`` runs as ``one`` does on a larger batch: none of its
  matmuls has more batch dims than ``one``'s (vmap's own batching adds one
  per vmap to every matmul of two batched operands)."""
  dims = lambda fn, args: _most_dot_batch_dims(jax.make_jaxpr(fn)(*args).jaxpr)
  return dims(vmapped, args) == dims(one, one_args)


@pytest.mark.parametrize("shared", ["kv_and_key", "nothing"])
def test_vmap_folds_instances_into_the_batch(shared):
  # Three instances (an ensemble's models, say) of a call on two examples,
  # each with its own kv_lengths and, unless shared, its own k, v and
  # dropout key; the dense mask is one for all. vmap runs them as one call
  # on six examples, a step of one at a time, and each instance still gets
  # what its own call gives, dropout bits included.
  M = 3
  shape = AttentionShape(B=2, T=40, S=56, N=4, K=2, H=16)
  q, k, v, kw = make_inputs(Case(shape, "all", dropout=0.25))
  rngs = jax.random.split(jax.random.key(7), 5)
  qs = jax.random.normal(rngs[0], (M,) + q.shape)
  lengths = jax.random.randint(rngs[1], (M, shape.B), 0, shape.S + 1)
  keys = kw.pop("dropout_rng")
  kv_axis = None
  if shared == "nothing":
    k = jax.random.normal(rngs[2], (M,) + k.shape)
    v = jax.random.normal(rngs[3], (M,) + v.shape)
    keys = jax.random.split(rngs[4], M)
    kv_axis = 0
  kw.pop("kv_lengths")

  def fn(q, k, v, lengths, key):
    return pallas_kernels.flash_attention(
        q, k, v, backend="xla", block_sizes=SMALL_BLOCKS, kv_lengths=lengths,
        dropout_rng=key, **kw)

  def loss(*args):
    return jnp.sum(jnp.sin(fn(*args)))

  axes = (0, kv_axis, kv_axis, 0, kv_axis)
  args = (qs, k, v, lengths, keys)
  # Instance m's own arguments.
  own = lambda m: tuple(x if axis is None else x[m]
                        for x, axis in zip(args, axes))
  with mock.patch.object(blockwise, "_MAX_STEP_ENTRIES", 1):
    out = jax.jit(jax.vmap(fn, in_axes=axes))(*args)
    grad = jax.vmap(jax.grad(loss, (0, 1, 2)), in_axes=axes)
    assert _folded(grad, args, jax.grad(loss, (0, 1, 2)), own(0))
    grads = jax.jit(grad)(*args)
    for m in range(M):
      assert_close(out[m], jax.jit(fn)(*own(m)), FORWARD)
      # A shared k or v gets one gradient per instance.
      for g, r in zip(grads, jitted_grad(loss)(*own(m))):
        assert_close(g[m], r, GRAD)


def test_nested_vmaps_fold_into_the_batch():
  shape = AttentionShape(B=1, T=24, S=24, N=2, K=2, H=16)
  _, _, _, kw = make_inputs(Case(shape, "causal", dropout=0.3))
  q, k, v = (jax.random.normal(key, (2, 3, 1, 24, 2, 16))
             for key in jax.random.split(jax.random.key(3), 3))
  fn = lambda q, k, v: pallas_kernels.flash_attention(
      q, k, v, backend="xla", block_sizes=SMALL_BLOCKS, **kw)
  nested = jax.vmap(jax.vmap(fn))
  assert _folded(nested, (q, k, v), fn, (q[0, 0], k[0, 0], v[0, 0]))
  out = jax.jit(nested)(q, k, v)
  for i in range(2):
    for j in range(3):
      assert_close(out[i, j], jax.jit(fn)(q[i, j], k[i, j], v[i, j]),
                   FORWARD)

def test_prepared_call_ignores_interpret():
  q = jax.random.normal(jax.random.key(0), (1, 33, 2, 8))
  prep = common.prepare(q, q, q, causal=True)
  a = jax.jit(lambda q: blockwise.attention(q, q, q, prep, interpret=True))(q)
  b = jax.jit(lambda q: blockwise.attention(q, q, q, prep))(q)
  np.testing.assert_array_equal(a[0], b[0])
