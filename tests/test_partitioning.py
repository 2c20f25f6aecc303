"""Batch/head splitting of the flash kernels (``pallas_kernels.partitioning``).

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim.

On one device the wrapper steps aside, so these tests replace
``partitioning.call`` with :func:`_split_call`, which does on one device
what the partitioner does on a mesh: it cuts every operand by its roles
into batch x head shards, runs the kernel on each with its :class:`Shard`,
and concatenates the results. A wrong role, a local size left global or a
dropout offset that is not added shows up as a difference from the unsplit
call (forward, log-sum-exp and gradients). The multi-device checks
(``tests/multidevice/partitioning_checks.py``) run the real partitioner.
"""

from __future__ import annotations

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

import pallas_kernels
from pallas_kernels import partitioning
from tests.tolerances import FORWARD, GRAD, assert_close


def _split_call(kernel, args, roles, out_roles, *, B, N, K, offsets=False,
                partitionable=True, parts=(2, 2)):
  """``partitioning.call`` done by hand: ``parts`` = (batch, head) shards.

  When the head shards do not divide the ``K`` kv heads, each shard's query
  heads share one kv head, as under the partitioner: the kv operands stay
  whole, the shard reads its kv head, and the kv heads' results are summed
  over the head shards."""
  del partitionable
  nb, nh = parts
  shared_kv = K % nh != 0
  assert B % nb == 0 and N % nh == 0, (B, N, parts)
  assert not shared_kv or nh % K == 0, (K, parts)
  leaves, tree = jax.tree.flatten(args)
  role_leaves = tree.flatten_up_to(roles)

  def piece(x, r, bi, hi):
    for axis, role in enumerate(r):
      if role in ("bn" if shared_kv else "bnk"):
        cut = nb if role == "b" else nh
        size = x.shape[axis] // cut
        x = jax.lax.slice_in_dim(x, (bi if role == "b" else hi) * size,
                                 ((bi if role == "b" else hi) + 1) * size,
                                 axis=axis)
    return x

  grid = []
  for bi in range(nb):
    row = []
    for hi in range(nh):
      shard = partitioning.Shard(
          B // nb, N // nh, 1 if shared_kv else K // nh,
          batch_offset=jnp.int32(bi * B // nb) if offsets else 0,
          head_offset=(jnp.int32(hi * N // nh) if offsets or shared_kv
                       else 0))
      local = [piece(x, r, bi, hi) for x, r in zip(leaves, role_leaves)]
      if shared_kv:
        kv_head = shard.head_offset // (N // K)
        local = partitioning.one_kv_head(local, role_leaves, kv_head)
        row.append(partitioning.place_kv_head(
            kernel(shard, *tree.unflatten(local)), out_roles, kv_head, K))
      else:
        row.append(kernel(shard, *tree.unflatten(local)))
    grid.append(row)
  outs = []
  for j, r in enumerate(out_roles):
    head_axis = next(i for i, c in enumerate(r) if c in "nk")
    if shared_kv and "k" in r:  # partial sums of every kv head
      rows = [sum(cell[j] for cell in row) for row in grid]
    else:
      rows = [jnp.concatenate([cell[j] for cell in row], axis=head_axis)
              for row in grid]
    outs.append(jnp.concatenate(rows, axis=r.index("b")))
  return tuple(outs)


def _inputs(B=4, T=16, S=12, N=4, K=2, H=8, seed=0):
  r = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(r[0], (B, T, N, H))
  k = jax.random.normal(r[1], (B, S, K, H))
  v = jax.random.normal(r[2], (B, S, K, H))
  return q, k, v, r[3]


def kernel_step(backend, **kw):
  """A jitted ``value_and_grad`` (over q, k, v) of a loss of a kernel's
  output and lse, with the pair as aux; empty rows' sentinel lse is kept
  out of the loss."""
  def loss(q, k, v):
    out, lse = pallas_kernels.flash_attention(
        q, k, v, backend=backend, interpret=True, return_lse=True, **kw)
    finite = lse > pallas_kernels.EMPTY_ROW_LSE / 2
    return (jnp.sum(out * jnp.cos(out))
            + jnp.sum(jnp.where(finite, jnp.sin(lse), 0.0))), (out, lse)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _loss_and_grads(backend, q, k, v, **kw):
  return kernel_step(backend, **kw)(q, k, v)


def _mask_kwargs(name, B, T, S, N, key):
  r = jax.random.split(key, 3)
  if name == "per_example_and_head":  # every array split with the call
    return dict(causal=True, kv_lengths=jnp.array([12, 9, 0, 5])[:B],
                q_lengths=jnp.array([16, 5, 11, 16])[:B], segment_ids=(
                    jnp.sort(jax.random.randint(r[0], (B, T), 0, 3), axis=1),
                    jnp.sort(jax.random.randint(r[1], (B, S), 0, 3), axis=1)),
                mask=jax.random.bernoulli(r[2], 0.7, (B, N, T, S)))
  if name == "shared_mask":  # a (T, S) mask that every shard reads whole
    return dict(mask=jax.random.bernoulli(r[2], 0.7, (T, S)), causal=True)
  raise ValueError(name)


def _assert_split_equals_whole(backend, masks, *, K, parts):
  """The kernel split by hand into ``parts`` (batch, head) shards gives the
  unsplit call's output, lse and gradients (N=4, dropout, ``masks``)."""
  q, k, v, key = _inputs(K=K)
  kw = dict(_mask_kwargs(masks, 4, 16, 12, 4, key), dropout_rate=0.3,
            dropout_rng=jax.random.key(7))
  (_, want_aux), want_grads = _loss_and_grads(backend, q, k, v, **kw)
  split = functools.partial(_split_call, parts=parts)
  with mock.patch.object(partitioning, "call", split):
    (_, got_aux), got_grads = _loss_and_grads(backend, q, k, v, **kw)
  for got, want in zip(got_aux, want_aux):
    assert_close(got, want, FORWARD)
  for got, want in zip(got_grads, want_grads):
    assert_close(got, want, GRAD)


@pytest.mark.parametrize("backend,masks", [
    ("gpu", "per_example_and_head"), ("gpu", "shared_mask"),
    ("tpu", "per_example_and_head")])
def test_split_over_batch_and_heads_equals_the_whole_call(backend, masks):
  """GQA (N=4, K=2), dropout, masks split with the batch and heads or
  shared by all: 2 x 2 shards give the unsplit call's output, lse and
  gradients, dropout bits included."""
  _assert_split_equals_whole(backend, masks, K=2, parts=(2, 2))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("K,parts", [(2, (2, 4)), (1, (1, 2))])
def test_query_heads_split_over_shared_kv_heads(backend, K, parts):
  """More head shards than kv heads (N=4; K=2 over 4 shards, MQA over 2):
  each shard reads the one kv head its query heads share, and the kv
  heads' gradients are summed over the shards; with dropout and per-head
  masks, the unsplit call's output, lse and gradients."""
  _assert_split_equals_whole(backend, "per_example_and_head", K=K,
                             parts=parts)


def test_split_without_dropout_needs_no_offsets():
  """Without dropout the kernels ask for no offsets (no iota operands):
  the shards see zero offsets and still agree."""
  q, k, v, _ = _inputs(N=2, K=2)
  (_, want), _ = _loss_and_grads("gpu", q, k, v, causal=True)
  calls = []

  def spy(*args, **kw):
    calls.append(kw["offsets"])
    return _split_call(*args, **kw)

  with mock.patch.object(partitioning, "call", spy):
    (_, got), _ = _loss_and_grads("gpu", q, k, v, causal=True)
  assert calls == [False, False], calls  # forward and backward
  for g, w in zip(got, want):
    assert_close(g, w, FORWARD)


def test_the_plan_follows_the_leading_operand():
  mesh = AbstractMesh((2, 4), ("data", "model"))
  plan = functools.partial(partitioning._plan, mesh)  # pylint: disable=protected-access
  assert plan(P("data", None, "model"), "b.n.", 4, 8, 4) == (
      ("data",), ("model",), ("model",))
  # K=2 kv heads do not split 4 ways: the query heads do, each pair of
  # devices sharing one kv head; so does MQA (K=1).
  assert plan(P("data", None, "model"), "b.n.", 4, 8, 2) == (
      ("data",), ("model",), ())
  assert plan(P("data", None, "model"), "b.n.", 4, 8, 1) == (
      ("data",), ("model",), ())
  # Where the shards may not sum the kv heads' gradients (inside a partly
  # manual shard_map), such heads stay whole.
  assert plan(P("data", None, "model"), "b.n.", 4, 8, 1,
              sum_kv_heads=False) == (("data",), (), ())
  # K=3 kv heads neither split 4 ways nor divide them: heads stay whole,
  # batch still splits; so do N=6 query heads.
  assert plan(P("data", None, "model"), "b.n.", 4, 12, 3) == (
      ("data",), (), ())
  assert plan(P("data", None, "model"), "b.n.", 4, 6, 2) == (
      ("data",), (), ())
  # An odd batch does not split; both axes on the batch do.
  assert plan(P("data", None, "model"), "b.n.", 3, 8, 8) == (
      (), ("model",), ("model",))
  assert plan(P(("data", "model")), "b.n.", 8, 8, 8) == (
      ("data", "model"), (), ())
  assert plan(P(), "b.n.", 8, 8, 8) == ((), (), ())


def test_sharding_rule_shares_batch_and_head_factors():
  rule = partitioning._sharding_rule(  # pylint: disable=protected-access
      ["b.n.", "b.k.", "b.k.", "b..", "."], ["b.n.", "bn."])
  assert rule == ("b x0 n x1, b x2 k x3, b x4 k x5, b x6 x7, x8 -> "
                  "b x9 n x10, b n x11")


def test_roles_must_describe_the_operands():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="roles 'b..' do not describe"):
    partitioning.call(lambda s, x: (x,), (x,), ("b..",), ("b.",), B=2, N=1,
                      K=1)


def test_steps_aside_inside_shard_map():
  """Inside shard_map (Manual axes) the kernel already sees one shard."""
  manual = AbstractMesh((2,), ("data",), axis_types=(AxisType.Manual,))
  with mock.patch.object(jax, "device_count", lambda: 8):
    with jax.sharding.use_abstract_mesh(manual):
      assert partitioning._steps_aside()  # pylint: disable=protected-access
    assert not partitioning._steps_aside()  # pylint: disable=protected-access
