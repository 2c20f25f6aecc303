"""Batch, head and query-sequence parallelism for the Pallas kernels under
``jit``.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim.

A Pallas kernel lowers to one custom call, which XLA's SPMD partitioner
cannot split: under ``jit`` over batch- or head-sharded operands it would
gather them and run the whole problem on every device. :func:`call` wraps a
kernel in ``jax.experimental.custom_partitioning`` instead, so that each
device runs it on its own batch rows, heads and query rows, with no
collective but the sums of kv gradients below:

* batch is split over the mesh axes that shard the leading operand's batch
  dim (``q``'s), heads over those that shard its head dim when both ``N``
  and ``K`` divide by their size (GQA groups stay whole on one device);
* when only ``N`` divides and the size divides by ``K`` (MQA, or fewer kv
  heads than devices on the heads axes), query heads are split and the kv
  heads are not: each device's query heads share one kv head, which it
  slices from the whole set (:func:`one_kv_head`), and the gradients of the
  kv heads are summed over the heads axes (:func:`place_kv_head`);
* query rows are split over the mesh axes that shard the leading operand's
  query-length dim when ``T`` divides by their size (sequence-sharded
  activations): each device runs its rows against all the keys, which are
  gathered, and the kv gradients are summed over those axes. The kernel
  places its rows by ``shard.q_offset`` (causal and window bands, lengths
  and dropout bits are absolute);
* key/value-length and head-dim axes are never split: an operand sharded
  there is gathered first (the kernels need whole rows of keys);
* the kernel gets a :class:`Shard`: its local ``B, T, N, K`` and the global
  index of its first batch row, query row and head, so masks and dropout
  see the absolute ``(b, n, i, j)``, as on one device.

Roles: each operand and result names its dims with one character each:
``"b"`` batch, ``"t"`` query rows, ``"n"`` query heads, ``"k"`` key/value
heads, ``"."`` a dim that is never split (key rows, head dims, a broadcast
dim of size 1).

The wrapper steps aside (calls the kernel on the whole problem) on one
device, inside a ``shard_map`` manual over every mesh axis (the kernel
already sees one shard), under ``vmap`` (custom partitioning has no
batching rule; Pallas batches the kernel itself) and for the TPU
interpreter (its callbacks cannot be partitioned), so the kernels behave
as before there. Inside a ``shard_map`` manual over some axes only (the
ring's, under ``jax.set_mesh`` with Auto axes) it splits over the others
as above, but never sums kv gradients there (:func:`_mesh_from_tiles`): the
backward keeps query rows and shared kv heads whole.

Under a mesh with Explicit axes, :func:`pallas_kernels.flash_attention`
first makes them Auto (:func:`call_with_auto_axes`), so the split above
applies there too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_SPLIT_ROLES = ("b", "t", "n", "k")
# The roles of the layout every kernel shares: q, out, d_out (B, T, N, H);
# k, v, dk, dv (B, S, K, H); lse, d_lse (B, N, T).
QKV_ROLES = ("btn.", "b.k.", "b.k.")
OUT_LSE_ROLES = ("btn.", "bnt")


@dataclasses.dataclass(frozen=True)
class Shard:
  """The part of the problem one kernel call sees.

  Attributes:
    B, T, N, K: local batch, query rows, query heads and key/value heads.
    batch_offset: int32 scalar, the global index of local batch row 0.
    head_offset: int32 scalar, the global index of local query head 0.
    q_offset: int32 scalar, the global index of local query row 0.
  """
  B: int
  T: int
  N: int
  K: int
  batch_offset: Any = 0
  head_offset: Any = 0
  q_offset: Any = 0


def dense_mask_roles(mask, B: int, N: int) -> str:
  """Roles of a ``(#B, #N, T, S)`` mask: its batch and head dims split
  when full, stay whole when broadcast (size 1); its rows split with the
  query rows."""
  nb, nn = mask.shape[:2]
  return ("b" if nb == B else ".") + ("n" if nn == N else ".") + "t."


def mask_data_roles(data, B: int, N: int):
  """Roles of a :class:`~pallas_kernels.masks.MaskData`'s arrays: a
  ``MaskData`` of role strings, None where ``data`` has no array."""
  roles = {"q_segment_ids": "bt", "kv_segment_ids": "b.", "q_lengths": "b",
           "kv_lengths": "b"}
  if data.mask is not None:
    roles["mask"] = dense_mask_roles(data.mask, B, N)
  return dataclasses.replace(data, **{
      name: None if getattr(data, name) is None else role
      for name, role in roles.items()})


def _axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of mesh axis names."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _size(mesh, axes: tuple[str, ...]) -> int:
  """How many shards ``axes`` of ``mesh`` make together."""
  return math.prod(mesh.shape[a] for a in axes)


def _tiles(sharding, ndim: int):
  """How many tiles a sharding cuts each dim into, the replicas last, or
  None unless its devices are numbered in tile order and its extra tile
  dims replicate."""
  try:
    # pylint: disable-next=protected-access
    hlo = sharding._to_xla_hlo_sharding(ndim)
    if not hlo.is_tiled() or hlo.is_manual():
      return None
    tiles = tuple(hlo.tile_assignment_dimensions())
    extra = (["REPLICATED"] if hlo.replicate_on_last_tile_dim()
             else [t.name for t in hlo.subgroup_types()])
    in_order = list(hlo.tile_assignment_devices()) == list(
        range(math.prod(tiles)))
  except (AttributeError, TypeError, ValueError):  # another JAX's API
    return None
  if (not in_order or len(tiles) != ndim + len(extra)
      or any(t != "REPLICATED" for t in extra)):  # manual, unreduced
    return None
  return tiles


def _mesh_from_tiles(sharding, shape) -> tuple[Mesh, PartitionSpec]:
  """``(mesh, spec)`` for a sharding without a named mesh, made from its
  tiles.

  Inside a ``shard_map`` that leaves some mesh axes to XLA (the ring's
  over one axis, under ``jax.set_mesh`` with others Auto), the partitioner
  hands the kernel an empty mesh and a GSPMD sharding whose tiles number
  the devices of one manual group. The mesh made for it has one axis per
  split dim (``"dim0"``, ...) and one for replicas, in the tiles' device
  order; a sharding it cannot read so (a permuted device order) runs
  replicated, as any sharding did before.
  """
  devices = sorted(sharding.device_set, key=lambda d: d.id)
  tiles = _tiles(sharding, len(shape))
  if tiles is None or math.prod(tiles) > len(devices):
    return Mesh(np.array(devices), ("replica",)), PartitionSpec()
  split = [d for d in range(len(shape)) if tiles[d] > 1]
  names = tuple(f"dim{d}" for d in split)
  grid = np.array(devices[:math.prod(tiles)]).reshape(
      tuple(tiles[d] for d in split) + (math.prod(tiles[len(shape):]),))
  spec = [None] * len(shape)
  for d, name in zip(split, names):
    spec[d] = name
  return Mesh(grid, names + ("replica",)), PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The mesh axes each split role goes over (``()``: not split)."""
  batch: tuple[str, ...] = ()
  seq: tuple[str, ...] = ()
  heads: tuple[str, ...] = ()
  kv_heads: tuple[str, ...] = ()

  @property
  def heads_alone(self) -> tuple[str, ...]:
    """The heads axes when query heads split and kv heads do not."""
    return self.heads if self.heads != self.kv_heads else ()

  @property
  def kv_sum(self) -> tuple[str, ...]:
    """The axes that results with kv heads are summed over."""
    return self.heads_alone + self.seq


def _plan(mesh, spec, lead_roles: str, B: int, T: int, N: int, K: int, *,
          may_sum: bool = True) -> _Plan:
  """The mesh axes to split batch, query rows, query heads and kv heads
  over, read from the leading operand's ``spec``.

  ``kv_heads`` is ``heads``, or ``()`` when each device's query heads share
  one kv head of the whole set. That, and splitting query rows, make each
  device hold part of the kv gradients, summed over those axes: neither is
  planned unless ``may_sum``.
  """
  spec = tuple(spec) + (None,) * (len(lead_roles) - len(tuple(spec)))
  batch = _axes(spec[lead_roles.index("b")])
  heads = _axes(spec[lead_roles.index("n")])
  seq = _axes(spec[lead_roles.index("t")]) if "t" in lead_roles else ()
  if B % _size(mesh, batch):
    batch = ()
  if T % _size(mesh, seq) or not may_sum:
    seq = ()
  n = _size(mesh, heads)
  if N % n == 0 and K % n == 0:
    return _Plan(batch, seq, heads, heads)
  if N % n == 0 and n % K == 0 and may_sum:
    return _Plan(batch, seq, heads, ())
  return _Plan(batch, seq)


def one_kv_head(operands, roles, kv_head):
  """``operands`` (a flat list) with only kv head ``kv_head`` (a traced
  int32) of those with a ``"k"`` role: the kv head that a shard's query
  heads share when the kv heads are not split."""
  return [jax.lax.dynamic_slice_in_dim(x, kv_head, 1, r.index("k"))
          if "k" in r else x for x, r in zip(operands, roles)]


def place_kv_head(results, roles, kv_head, K: int):
  """The inverse of :func:`one_kv_head` for results: each one with a
  ``"k"`` role widened to all ``K`` kv heads, zero but at ``kv_head``
  (the partial gradient that the shards sharing that head sum)."""
  def place(x, r):
    axis = r.index("k")
    whole = jnp.zeros(x.shape[:axis] + (K,) + x.shape[axis + 1:], x.dtype)
    return jax.lax.dynamic_update_slice_in_dim(whole, x, kv_head, axis)
  return [place(x, r) if "k" in r else x for x, r in zip(results, roles)]


def _run_shard(kernel, shard: Shard, flat, tree, roles, out_roles, *,
               N: int, K: int, one_kv: bool) -> tuple:
  """``kernel`` on one shard's flat operands (``roles``). With ``one_kv``
  its query heads share one kv head, which it reads from the whole set,
  and its kv results are widened to all ``K`` heads for the sum."""
  if not one_kv:
    return tuple(kernel(shard, *tree.unflatten(flat)))
  kv_head = shard.head_offset // (N // K)
  flat = one_kv_head(flat, roles, kv_head)
  return tuple(place_kv_head(kernel(shard, *tree.unflatten(flat)),
                             out_roles, kv_head, K))


def _sharding(mesh, roles: str, plan: _Plan):
  """The sharding of an operand with ``roles`` under ``plan``."""
  by_role = {"b": plan.batch or None, "t": plan.seq or None,
             "n": plan.heads or None, "k": plan.kv_heads or None}
  return NamedSharding(
      mesh, PartitionSpec(*(by_role.get(r) for r in roles)))


def _sharding_rule(roles: Sequence[str], out_roles: Sequence[str]) -> str:
  """The Shardy rule: batch, query-row, query-head and kv-head factors
  shared across operands and results, every other dim its own factor.

  Query heads are not tied to kv heads as ``(k g)``: Shardy would then
  split the ``K`` kv heads over sub-axes when ``K`` does not divide by the
  heads' axis, which JAX cannot hand to :func:`call`'s plan.
  """
  fresh = (f"x{i}" for i in itertools.count())

  def mapping(r: str) -> str:
    return " ".join(c if c in _SPLIT_ROLES else next(fresh) for c in r)

  return (", ".join(mapping(r) for r in roles) + " -> "
          + ", ".join(mapping(r) for r in out_roles))


def _steps_aside() -> bool:
  """One device, or inside a ``shard_map`` manual over every axis that
  has more than one device: nothing to partition."""
  if jax.device_count() == 1:
    return True
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and all(
      t == jax.sharding.AxisType.Manual or mesh.shape[a] == 1
      for a, t in zip(mesh.axis_names, mesh.axis_types))


def call(kernel: Callable, args: tuple, roles: tuple, out_roles: tuple, *,
         B: int, T: int, N: int, K: int, offsets: bool = False,
         partitionable: bool = True):
  """``kernel(shard, *args)``, run per batch/query-row/head shard under
  ``jit``.

  Args:
    kernel: ``(Shard, *args) -> tuple of arrays`` laid out as ``out_roles``
      says, for the problem ``shard`` describes.
    args: the kernel's array arguments (pytrees; None leaves allowed).
      ``args[0]`` leads: its batch, query-row and head sharding decide the
      split.
    roles: a pytree like ``args`` with a role string for each array.
    out_roles: a role string for each result.
    B, T, N, K: the global batch, query rows, query heads and key/value
      heads.
    offsets: the kernel reads ``shard.batch_offset`` / ``head_offset``
      (dropout); they are zero unless the call is split.
      ``shard.q_offset`` is given whenever query rows are split.
    partitionable: False runs the kernel on the whole problem always (the
      TPU interpreter's callbacks cannot be partitioned).

  Returns:
    The kernel's results for the whole problem.
  """
  leaves, tree = jax.tree.flatten(args)
  role_leaves = tree.flatten_up_to(roles)
  for x, r in zip(leaves, role_leaves):
    if x.ndim != len(r) or any(c not in _SPLIT_ROLES + (".",) for c in r):
      raise ValueError(f"roles {r!r} do not describe an operand of shape "
                       f"{x.shape}.")
  if not partitionable or _steps_aside():
    return kernel(Shard(B, T, N, K), *args)

  lead_roles = role_leaves[0]
  kernel_roles = role_leaves
  # Global indices, split like batch, query rows and heads (row 0 = the
  # offset): for dropout and the masks' positions, and for the kv head
  # that split query heads share.
  leaves = leaves + [jnp.arange(B, dtype=jnp.int32),
                     jnp.arange(T, dtype=jnp.int32),
                     jnp.arange(N, dtype=jnp.int32)]
  role_leaves = role_leaves + ["b", "t", "n"]
  sums_kv = any("k" in r for r in out_roles)
  ids = offsets or K < N

  def local(sizes, plan: _Plan, *flat):
    """The kernel on one shard of ``sizes`` (local B, T, N, K)."""
    *flat, b_ids, t_ids, n_ids = flat
    shard = Shard(*sizes, batch_offset=b_ids[0] if ids else 0,
                  head_offset=n_ids[0] if ids else 0,
                  q_offset=t_ids[0] if plan.seq else 0)
    results = _run_shard(kernel, shard, flat, tree, kernel_roles, out_roles,
                         N=N, K=K, one_kv=bool(plan.heads_alone))
    if not plan.kv_sum:
      return results
    return tuple(jax.lax.psum(x, plan.kv_sum) if "k" in r else x
                 for x, r in zip(results, out_roles))

  @custom_partitioning
  def partitioned(*flat):
    return local((B, T, N, K), _Plan(), *flat)

  def plan_for(mesh, arg_shapes):
    """``(mesh, plan)``."""
    lead = arg_shapes[0]
    named = (isinstance(mesh, Mesh) and not mesh.empty
             and jax.sharding.AxisType.Manual not in mesh.axis_types
             and hasattr(lead.sharding, "spec"))
    mesh, spec = ((mesh, lead.sharding.spec) if named
                  else _mesh_from_tiles(lead.sharding, lead.shape))
    # On a mesh made from tiles (inside a partly manual shard_map), XLA
    # numbers a shard's collective by the devices of one manual group
    # and rejects it: no kv sums there.
    return mesh, _plan(mesh, spec, lead_roles, B, T, N, K,
                       may_sum=named or not sums_kv)

  def result_shardings(mesh, plan):
    return tuple(_sharding(mesh, r, plan) for r in out_roles)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    mesh, plan = plan_for(mesh, arg_shapes)
    sizes = (B // _size(mesh, plan.batch), T // _size(mesh, plan.seq),
             N // _size(mesh, plan.heads),
             1 if plan.heads_alone else K // _size(mesh, plan.kv_heads))
    arg_shardings = tuple(_sharding(mesh, r, plan) for r in role_leaves)
    return (mesh, lambda *flat: local(sizes, plan, *flat),
            result_shardings(mesh, plan), arg_shardings)

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return result_shardings(*plan_for(mesh, arg_shapes))

  partitioned.def_partition(
      partition, infer_sharding_from_operands=infer,
      sharding_rule=_sharding_rule(role_leaves, out_roles))

  # Custom partitioning has no batching rule: under vmap, run the kernel
  # on the whole problem and let Pallas batch it.
  batchable = jax.custom_batching.custom_vmap(partitioned)

  @batchable.def_vmap
  def _vmap_rule(axis_size, in_batched, *flat):
    del axis_size
    axes = [0 if b else None for b in in_batched]
    outs = jax.vmap(lambda *f: local((B, T, N, K), _Plan(), *f),
                    in_axes=axes)(*flat)
    return outs, tuple(True for _ in outs)

  return batchable(*leaves)


def call_split_by_hand(kernel: Callable, args: tuple, roles: tuple,
                       out_roles: tuple, *, B: int, T: int, N: int, K: int,
                       offsets: bool = False, partitionable: bool = True,
                       parts: tuple[int, int, int] = (1, 1, 1)):
  """What :func:`call` does on a mesh, done on one device: ``parts`` =
  (batch, head, query row) shards, each cut from the operands by their
  roles, run with its :class:`Shard`, and the results joined.

  It checks a kernel's per-shard logic without a mesh (tests, and
  ``benchmarks.gpu_check`` on one GPU); pass it in place of :func:`call`.
  When the head shards do not divide the ``K`` kv heads, each shard's query
  heads share one kv head, as under the partitioner: the kv operands stay
  whole, the shard reads its kv head, and the kv heads' results are summed
  over the head shards. Query-row shards see all the keys, and the kv
  results are summed over them too."""
  del partitionable
  nb, nh, nt = parts
  shared_kv = K % nh != 0
  if B % nb or N % nh or T % nt or (shared_kv and nh % K):
    raise ValueError(f"parts={parts} (batch, head, query-row shards) must "
                     f"divide B={B}, N={N} and T={T}, and the head shards "
                     f"divide or be divided by K={K}.")
  leaves, tree = jax.tree.flatten(args)
  role_leaves = tree.flatten_up_to(roles)
  cut = {"b": nb, "n": nh, "t": nt, "k": 1 if shared_kv else nh}

  def piece(x, r, index):
    for axis, role in enumerate(r):
      if cut.get(role, 1) > 1:
        size = x.shape[axis] // cut[role]
        i = index["n" if role == "k" else role]
        x = jax.lax.slice_in_dim(x, i * size, (i + 1) * size, axis=axis)
    return x

  ids = offsets or K < N
  cells = {}
  for bi, hi, ti in itertools.product(range(nb), range(nh), range(nt)):
    shard = Shard(
        B // nb, T // nt, N // nh, 1 if shared_kv else K // nh,
        batch_offset=jnp.int32(bi * B // nb) if ids else 0,
        head_offset=jnp.int32(hi * N // nh) if ids else 0,
        q_offset=jnp.int32(ti * T // nt) if nt > 1 else 0)
    index = {"b": bi, "n": hi, "t": ti}
    local = [piece(x, r, index) for x, r in zip(leaves, role_leaves)]
    cells[bi, hi, ti] = _run_shard(kernel, shard, local, tree, role_leaves,
                                   out_roles, N=N, K=K, one_kv=shared_kv)

  def join(pieces, r: str, role: str):
    """One result's ``pieces`` along ``role``: concatenated where the
    result (roles ``r``) is split, summed where each holds a part."""
    if role in r:
      return jnp.concatenate(pieces, axis=r.index(role))
    return sum(pieces)

  outs = []
  for j, r in enumerate(out_roles):
    heads = "k" if "k" in r and not shared_kv else "n"
    outs.append(join([
        join([join([cells[bi, hi, ti][j] for ti in range(nt)], r, "t")
              for hi in range(nh)], r, heads)
        for bi in range(nb)], r, "b"))
  return tuple(outs)


# -- Explicit mesh axes --------------------------------------------------------
# Under a mesh with Explicit axes (``jax.make_mesh``'s default) an array's
# type carries its sharding, and every op must say how its result is
# sharded. Kernel calls and the layer run with those axes made Auto, so that
# XLA's propagation and :func:`call`'s partitioning place their internals.


def type_sharding(x):
  """The sharding in ``x``'s type (a ``NamedSharding``), or None."""
  if not isinstance(x, jax.Array):
    return None  # NumPy and Python values: unsharded constants
  return getattr(jax.typeof(x), "sharding", None)


def explicit_mesh(tree) -> Any:
  """The Explicit mesh axes a call runs under.

  Args:
    tree: the call's operands.

  Returns:
    ``(mesh, axes)``: the context mesh (``jax.set_mesh``), or else the
    mesh in the types of ``tree``'s arrays (jit of arrays placed on an
    Explicit mesh), and its Explicit axes; None when there are none (no
    mesh, Auto axes, or only Manual ones inside ``shard_map``).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    for leaf in jax.tree.leaves(tree):
      sharding = type_sharding(leaf)
      leaf_mesh = getattr(sharding, "mesh", None)
      if leaf_mesh is not None and not leaf_mesh.empty:
        mesh = leaf_mesh
        break
  if mesh.empty:
    return None
  explicit = jax.sharding.AxisType.Explicit
  axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
               if kind == explicit)
  return (mesh, axes) if axes else None


def type_spec(x) -> tuple:
  """The ``PartitionSpec`` entries in ``x``'s type, one per dim (None for
  an unsharded dim, and for every dim of a NumPy or Python value)."""
  sharding = type_sharding(x)
  spec = tuple(getattr(sharding, "spec", None) or ())
  ndim = len(getattr(x, "shape", ()))
  return (spec + (None,) * ndim)[:ndim]


def call_with_auto_axes(fn, mesh, axes: tuple[str, ...], out_specs, *args):
  """``fn(*args)`` with the Explicit ``axes`` of ``mesh`` made Auto.

  Inside, XLA's sharding propagation places the intermediates (reshapes
  of a sharded heads dim, contractions over sharded heads, loop carries,
  the kernels' custom partitioning), as under an Auto mesh, where Explicit
  axes would need an ``out_sharding`` on each of those ops.

  Args:
    fn: the computation.
    mesh: the (abstract) mesh, from :func:`explicit_mesh`.
    axes: its Explicit axes.
    out_specs: a ``PartitionSpec`` per result of ``fn`` (a tree like its
      results); the results get these Explicit shardings.
    *args: ``fn``'s arguments; only their ``jax.Array`` leaves go through
      ``auto_axes``, other leaves are passed as they are.

  Returns:
    ``fn(*args)``, typed by ``out_specs``.
  """
  leaves, treedef = jax.tree.flatten(args)
  is_array = [isinstance(x, jax.Array) for x in leaves]

  def body(*arrays):
    it = iter(arrays)
    full = [next(it) if a else x for x, a in zip(leaves, is_array)]
    return fn(*jax.tree.unflatten(treedef, full))

  def on_mesh(x):
    # An array not yet typed on the mesh (eager, uncommitted) is put there
    # replicated, as jit would: else its gradient comes back typed on the
    # Auto version of the mesh.
    if (not jax.sharding.get_abstract_mesh().empty
        and getattr(type_sharding(x), "mesh", mesh).empty):
      return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))
    return x

  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), out_specs,
                           is_leaf=lambda s: isinstance(s, PartitionSpec))
  return jax.sharding.auto_axes(body, axes=axes, out_sharding=shardings)(
      *[on_mesh(x) for x, a in zip(leaves, is_array) if a])
