"""Batch, head and query-row splitting of the flash kernels
(``pallas_kernels.partitioning``).

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim.

On one device the wrapper steps aside, so these tests replace
``partitioning.call`` with ``partitioning.call_split_by_hand``, which does
on one device what the partitioner does on a mesh: it cuts every operand
by its roles into batch x head x query-row shards, runs the kernel on each
with its :class:`Shard`, and joins the results. A wrong role, a local size
left global or an offset that is not added shows up as a difference from
the unsplit call (forward, log-sum-exp and gradients). The multi-device checks
(``tests/multidevice/partitioning_checks.py``) run the real partitioner.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

import pallas_kernels
from pallas_kernels import partitioning
from tests.tolerances import FORWARD, GRAD, assert_close


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
  if name == "window":  # a band on both sides, and query lengths
    return dict(sliding_window=(5, 3), q_lengths=jnp.array([16, 3, 9, 12])[:B])
  raise ValueError(name)


def _assert_split_equals_whole(backend, masks, *, K, parts):
  """The kernel split by hand into ``parts`` (batch, head, query row)
  shards gives the unsplit call's output, lse and gradients (N=4, T=16,
  dropout, ``masks``)."""
  q, k, v, key = _inputs(K=K)
  kw = dict(_mask_kwargs(masks, 4, 16, 12, 4, key), dropout_rate=0.3,
            dropout_rng=jax.random.key(7))
  (_, want_aux), want_grads = _loss_and_grads(backend, q, k, v, **kw)
  split = functools.partial(partitioning.call_split_by_hand, parts=parts)
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
  _assert_split_equals_whole(backend, masks, K=2, parts=(2, 2, 1))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("K,parts", [(2, (2, 4, 1)), (1, (1, 2, 1))])
def test_query_heads_split_over_shared_kv_heads(backend, K, parts):
  """More head shards than kv heads (N=4; K=2 over 4 shards, MQA over 2):
  each shard reads the one kv head its query heads share, and the kv
  heads' gradients are summed over the shards; with dropout and per-head
  masks, the unsplit call's output, lse and gradients."""
  _assert_split_equals_whole(backend, "per_example_and_head", K=K,
                             parts=parts)


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("backend,masks,K,parts", [
    ("gpu", "per_example_and_head", 2, (2, 2, 2)),
    ("tpu", "per_example_and_head", 2, (1, 1, 2)),
    pytest.param("tpu", "per_example_and_head", 2, (2, 2, 2), marks=_SLOW),
    *(pytest.param(backend, masks, K, parts, marks=_SLOW)
      for backend in ("gpu", "tpu")
      for masks, K, parts in (("shared_mask", 2, (1, 1, 4)),
                              ("window", 2, (2, 1, 4)),
                              ("per_example_and_head", 1, (1, 2, 2))))])
def test_split_over_query_rows_equals_the_whole_call(backend, masks, K,
                                                     parts):
  """Query rows split in 2 or 4 (rows 0-7 and 8-15, or four): each shard
  attends its rows to all the keys at their global positions (causal and
  window bands, query lengths, dropout bits), and the kv gradients are
  summed over the shards (and over head shards sharing one kv head, with
  MQA); the unsplit call's output, lse and gradients."""
  _assert_split_equals_whole(backend, masks, K=K, parts=parts)


def test_split_without_dropout_needs_no_offsets():
  """Without dropout (and with K == N) the kernels ask for no batch or
  head offsets: the shards see static zeros and still agree."""
  q, k, v, _ = _inputs(N=2, K=2)
  (_, want), _ = _loss_and_grads("gpu", q, k, v, causal=True)
  calls = []

  def spy(*args, **kw):
    calls.append(kw["offsets"])
    return partitioning.call_split_by_hand(*args, **kw, parts=(2, 2, 1))

  with mock.patch.object(partitioning, "call", spy):
    (_, got), _ = _loss_and_grads("gpu", q, k, v, causal=True)
  assert calls == [False, False], calls  # forward and backward
  for g, w in zip(got, want):
    assert_close(g, w, FORWARD)


def test_the_plan_follows_the_leading_operand():
  mesh = AbstractMesh((2, 4), ("data", "model"))

  def plan(spec, *sizes, **kw):
    # pylint: disable-next=protected-access
    found = partitioning._plan(mesh, spec, "btn.", *sizes, **kw)
    return dataclasses.astuple(found)

  # (batch, query rows, heads, kv heads) for B, T, N, K.
  assert plan(P("data", None, "model"), 4, 16, 8, 4) == (
      ("data",), (), ("model",), ("model",))
  # K=2 kv heads do not split 4 ways: the query heads do, each pair of
  # devices sharing one kv head; so does MQA (K=1).
  assert plan(P("data", None, "model"), 4, 16, 8, 2) == (
      ("data",), (), ("model",), ())
  assert plan(P("data", None, "model"), 4, 16, 8, 1) == (
      ("data",), (), ("model",), ())
  # Query rows split over the axes that shard them when T divides.
  assert plan(P("data", "model"), 4, 16, 8, 1) == (
      ("data",), ("model",), (), ())
  assert plan(P("data", "model"), 4, 18, 8, 1) == (("data",), (), (), ())
  # Where the shards may not sum kv gradients (inside a partly manual
  # shard_map), shared kv heads and query rows stay whole.
  assert plan(P("data", None, "model"), 4, 16, 8, 1, may_sum=False) == (
      ("data",), (), (), ())
  assert plan(P("data", "model"), 4, 16, 8, 1, may_sum=False) == (
      ("data",), (), (), ())
  # K=3 kv heads neither split 4 ways nor divide them: heads stay whole,
  # batch still splits; so do N=6 query heads.
  assert plan(P("data", None, "model"), 4, 16, 12, 3) == (
      ("data",), (), (), ())
  assert plan(P("data", None, "model"), 4, 16, 6, 2) == (
      ("data",), (), (), ())
  # An odd batch does not split; both axes on the batch do.
  assert plan(P("data", None, "model"), 3, 16, 8, 8) == (
      (), (), ("model",), ("model",))
  assert plan(P(("data", "model")), 8, 16, 8, 8) == (
      ("data", "model"), (), (), ())
  assert plan(P(), 8, 16, 8, 8) == ((), (), (), ())


def test_tiles_read_from_a_gspmd_sharding():
  """Inside a partly manual shard_map the kernels get GSPMD shardings:
  their tiles give the split when the devices are in tile order and the
  extra tile dims replicate, else nothing (the kernel runs unsplit)."""
  def sharding(dims, devices=None, last_replicated=False, subgroups=(),
               manual=False):
    hlo = types.SimpleNamespace(
        is_tiled=lambda: True, is_manual=lambda: manual,
        tile_assignment_dimensions=lambda: list(dims),
        tile_assignment_devices=lambda: list(
            range(math.prod(dims)) if devices is None else devices),
        replicate_on_last_tile_dim=lambda: last_replicated,
        subgroup_types=lambda: [types.SimpleNamespace(name=t)
                                for t in subgroups])
    return types.SimpleNamespace(_to_xla_hlo_sharding=lambda ndim: hlo)

  tiles = partitioning._tiles  # pylint: disable=protected-access
  assert tiles(sharding((2, 1, 4, 1)), 4) == (2, 1, 4, 1)
  assert tiles(sharding((2, 1, 1, 1, 4), last_replicated=True), 4) == (
      2, 1, 1, 1, 4)
  assert tiles(sharding((2, 1, 1, 1, 4), subgroups=("REPLICATED",)), 4) == (
      2, 1, 1, 1, 4)
  assert tiles(sharding((2, 1, 1, 1, 4), subgroups=("MANUAL",)), 4) is None
  assert tiles(sharding((2, 1, 4, 1), devices=[0, 2, 4, 6, 1, 3, 5, 7]),
               4) is None
  assert tiles(sharding((2, 1, 4, 1), manual=True), 4) is None
  assert tiles(object(), 4) is None


def test_sharding_rule_shares_batch_row_and_head_factors():
  rule = partitioning._sharding_rule(  # pylint: disable=protected-access
      ["btn.", "b.k.", "b.k.", "bt", "."], ["btn.", "bnt"])
  assert rule == ("b t n x0, b x1 k x2, b x3 k x4, b t, x5 -> "
                  "b t n x6, b n t")


def test_roles_must_describe_the_operands():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="roles 'b..' do not describe"):
    partitioning.call(lambda s, x: (x,), (x,), ("b..",), ("b.",), B=2, T=3,
                      N=1, K=1)


def test_steps_aside_inside_shard_map():
  """Inside shard_map (Manual axes) the kernel already sees one shard."""
  manual = AbstractMesh((2,), ("data",), axis_types=(AxisType.Manual,))
  with mock.patch.object(jax, "device_count", lambda: 8):
    with jax.sharding.use_abstract_mesh(manual):
      assert partitioning._steps_aside()  # pylint: disable=protected-access
    assert not partitioning._steps_aside()  # pylint: disable=protected-access
