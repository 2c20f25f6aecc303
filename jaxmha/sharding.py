"""Sharded parameters: partition specs for the params tree, by logical axis.

Shape letters: D query features, Dk key features, Dv value features, N query
heads, K key/value heads, H key head dim, Hv value head dim, E output
features.

Every parameter dim has a logical axis name (:data:`jaxmha.linen.LOGICAL_AXES`):

==================== ============================ ==================
key                  kernel                       bias
==================== ============================ ==================
``query``, ``gate``  ``(embed, heads, kv)``       ``(heads, kv)``
``key``, ``value``   ``(embed, kv_heads, kv)``    ``(kv_heads, kv)``
``attention_output`` ``(heads, kv, embed, ...)``  ``(embed, ...)``
==================== ============================ ==================

A *rules* mapping sends logical names to mesh axes; tensor parallelism over
heads is ``{"heads": "model", "kv_heads": "model"}``: each device then holds
N/M query heads and K/M key/value heads of every projection, the attention
of its heads runs where they are, and the output projection's contraction
over heads ends in one all-reduce, which XLA's partitioner inserts (this
module only annotates; ``jax.jit`` does the rest). Logical names a rule
omits stay replicated. The mesh's axes may be Auto or Explicit
(``jax.make_mesh``'s default): under Explicit axes ``jaxmha.apply`` runs
its attention with them made Auto, and types its output like the query.

The params tree stays plain arrays (it is the Flax module's ``"params"``
collection). For Flax's own logical-partitioning machinery,
:func:`logically_partitioned` boxes a copy in ``nn.LogicallyPartitioned``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmha.linen import LOGICAL_AXES
from jaxmha.linen import logical_axes as _logical_axes

MeshAxes = Union[None, str, Sequence[str]]
Rules = Union[Mapping[str, MeshAxes], Sequence[tuple[str, MeshAxes]]]
LOGICAL_NAMES = ("embed", "heads", "kv_heads", "kv")
# Rank of kernel and bias per sub-layer; ``attention_output``'s grow with a
# multi-dim ``output_shape`` (at least these).
_RANKS = {name: (len(k), len(b)) for name, (k, b) in LOGICAL_AXES.items()}


def _key_name(entry) -> Optional[str]:
  for attr in ("key", "name"):
    value = getattr(entry, attr, None)
    if isinstance(value, str):
      return value
  return None


def _leaf_axes(path, leaf) -> Optional[tuple]:
  """Logical axes of a jaxmha parameter at ``path``, or None for others."""
  if len(path) < 2 or not hasattr(leaf, "ndim"):
    return None
  name, kind = _key_name(path[-2]), _key_name(path[-1])
  if name not in LOGICAL_AXES or kind not in ("kernel", "bias"):
    return None
  rank = _RANKS[name][0 if kind == "kernel" else 1]
  fits = (leaf.ndim >= rank if name == "attention_output"
          else leaf.ndim == rank)
  return _logical_axes(name, kind, leaf.ndim) if fits else None


def _path_str(path) -> str:
  return "/".join(str(_key_name(e) if _key_name(e) is not None else e)
                  for e in path)


def _normalize_rules(rules: Rules) -> dict:
  items = rules.items() if isinstance(rules, Mapping) else rules
  try:
    items = [(name, axes) for name, axes in items]
  except (TypeError, ValueError):
    raise TypeError(
        "`rules` must map logical axis names to mesh axes, e.g. "
        "{'heads': 'model'} or [('heads', 'model')]; got "
        f"rules={rules!r}.") from None
  out = {}
  for name, axes in items:
    if name not in LOGICAL_NAMES:
      raise ValueError(f"Unknown logical axis {name!r} in `rules`; the "
                       f"logical axes are {LOGICAL_NAMES}.")
    if axes is not None and not isinstance(axes, str):
      if (not isinstance(axes, (tuple, list))
          or not all(isinstance(a, str) for a in axes)):
        raise TypeError(f"`rules[{name!r}]` must be None, a mesh axis name or "
                        f"a tuple of them; got {axes!r}.")
      axes = tuple(axes)
    out[name] = axes
  return out


def _spec(path, axes: tuple, rules: dict) -> P:
  entries = tuple(rules.get(a) if a is not None else None for a in axes)
  used = [m for e in entries if e is not None
          for m in ((e,) if isinstance(e, str) else e)]
  if len(used) != len(set(used)):
    raise ValueError(
        f"`rules` shard two dims of parameter {_path_str(path)!r} (logical "
        f"axes {axes}) over the same mesh axis: {entries}.")
  return P(*entries)


def param_logical_axes(params) -> Any:
  """The logical axis names of each parameter's dims.

  Args:
    params: a jaxmha params tree, a Flax ``variables`` dict, or any tree
      holding them (sub-layers are recognised by their names and ranks:
      ``query``, ``key``, ``value``, ``gate``, ``attention_output``).

  Returns:
    A tree like ``params`` whose leaves are tuples of logical names (None
    for an unnamed dim), or None for leaves that are not jaxmha
    parameters.

  >>> import jaxmha
  >>> cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4)
  >>> params = jaxmha.init_params(jax.random.key(0), cfg, (1, 3, 8), (1, 3, 8))
  >>> param_logical_axes(params)["query"]
  {'bias': ('heads', 'kv'), 'kernel': ('embed', 'heads', 'kv')}
  """
  return jax.tree_util.tree_map_with_path(_leaf_axes, params)


def param_partition_specs(params, rules: Rules, *,
                          default: P = P()) -> Any:
  """The ``PartitionSpec`` tree of ``params`` under logical-axis ``rules``.

  Args:
    params: a params tree (or a tree holding one; see
      :func:`param_logical_axes`); arrays or ``jax.ShapeDtypeStruct``.
    rules: logical axis name -> mesh axis (a name, a tuple of names, or
      None), as a mapping or a sequence of pairs (Flax's rule format).
    default: the spec of leaves that are not jaxmha parameters.

  Returns:
    A tree like ``params`` with a ``PartitionSpec`` per leaf.

  Raises:
    ValueError: an unknown logical name, or two dims of one parameter on
      the same mesh axis.

  >>> import jaxmha
  >>> cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4)
  >>> params = jaxmha.init_params(jax.random.key(0), cfg, (1, 3, 8), (1, 3, 8))
  >>> specs = param_partition_specs(params, {"heads": "model",
  ...                                        "kv_heads": "model"})
  >>> specs["query"]["kernel"], specs["attention_output"]["kernel"]
  (P(None, 'model', None), P('model', None, None))
  """
  rules = _normalize_rules(rules)

  def leaf_spec(path, leaf):
    axes = _leaf_axes(path, leaf)
    return default if axes is None else _spec(path, axes, rules)

  return jax.tree_util.tree_map_with_path(leaf_spec, params)


def shard_params(params, mesh: jax.sharding.Mesh, rules: Rules, *,
                 default: P = P()):
  """``params`` placed on ``mesh`` by :func:`param_partition_specs`.

  Args:
    params: a params tree (or a tree holding one).
    mesh: the device mesh; the mesh axes in ``rules`` must be its axes.
    rules: logical axis name -> mesh axes.
    default: the spec of leaves that are not jaxmha parameters.

  Returns:
    The same tree, each array a ``jax.Array`` with a ``NamedSharding``.

  Raises:
    ValueError: a rule names an axis the mesh lacks, or a sharded dim is
      not divisible by its mesh axes' size (e.g. K=2 key/value heads over
      a model axis of 4: map ``"kv_heads"`` to None).

  >>> import jaxmha
  >>> cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4)
  >>> params = jaxmha.init_params(jax.random.key(0), cfg, (1, 3, 8), (1, 3, 8))
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> sharded = shard_params(params, mesh, {"heads": "model"})
  >>> sharded["query"]["kernel"].sharding.spec
  P(None, 'model', None)
  """
  specs = param_partition_specs(params, rules, default=default)

  def check(path, leaf, spec):
    for dim, (size, entry) in enumerate(zip(leaf.shape, tuple(spec))):
      if entry is None:
        continue
      names = (entry,) if isinstance(entry, str) else tuple(entry)
      missing = [a for a in names if a not in mesh.axis_names]
      if missing:
        raise ValueError(
            f"`rules` name mesh axes {missing} that `mesh` does not have "
            f"(axes: {mesh.axis_names}).")
      n = math.prod(mesh.shape[a] for a in names)
      if size % n:
        raise ValueError(
            f"Cannot shard parameter {_path_str(path)!r} of shape "
            f"{tuple(leaf.shape)}: dim {dim} (size {size}) over mesh axes "
            f"{names} (size {n}) needs {size} % {n} == 0.")
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(check, params, specs)
  return jax.device_put(params, shardings)


def logically_partitioned(params) -> Any:
  """A copy of ``params`` with jaxmha leaves in ``nn.LogicallyPartitioned``.

  For Flax's logical-partitioning tools: ``nn.get_partition_spec`` of the
  result gives the logical specs, ``nn.logical_to_mesh_sharding(specs, mesh,
  rules)`` the shardings, and ``nn.unbox`` the plain arrays back. The
  module's own ``"params"`` collection stays unboxed.

  >>> import flax.linen as nn
  >>> import jaxmha
  >>> cfg = jaxmha.MHAConfig(num_heads=2, key_dim=4)
  >>> params = jaxmha.init_params(jax.random.key(0), cfg, (1, 3, 8), (1, 3, 8))
  >>> boxed = logically_partitioned(params)
  >>> nn.get_partition_spec(boxed)["key"]["kernel"]
  P('embed', 'kv_heads', 'kv')
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> shardings = nn.logical_to_mesh_sharding(
  ...     nn.get_partition_spec(boxed), mesh, [("heads", "model")])
  >>> shardings["query"]["kernel"].spec
  P(None, 'model', None)
  """

  def box(path, leaf):
    axes = _leaf_axes(path, leaf)
    if axes is None:
      return leaf
    return nn.LogicallyPartitioned(leaf, names=axes)

  return jax.tree_util.tree_map_with_path(box, params)
