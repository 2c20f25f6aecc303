"""Keras's regularizers and constraints, as pure functions on arrays.

* A regularizer is ``array -> scalar`` (``l1``, ``l2``, ``l1_l2`` by name, or
  any callable). The Flax module sows the values into its ``"losses"``
  collection; :func:`regularization_loss` sums them for a training loss.
* A constraint is ``array -> array``, a projection applied after each
  optimizer update (``non_neg``, ``max_norm``, ``unit_norm``,
  ``min_max_norm`` by name, or any callable). :func:`apply_constraints`
  projects a params tree; :func:`constraints_transform` is an optax
  transformation that does it inside an optimizer chain.

Norm constraints reduce over ``axis=0`` as Keras does: for the projection
kernels ``(D, N, H)`` that is the input-feature axis. Params of a stack of
layers (``nn.scan``, ``nnx.vmap``), with leading layer axes, are
constrained layer by layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

_EPSILON = 1e-7  # keras.backend.epsilon()


# -- regularizers --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class L1L2:
  """``l1 * sum(|x|) + l2 * sum(x**2)``, Keras's ``L1L2``.

  >>> L1L2(l2=0.5)(jnp.array([1.0, -2.0]))
  Array(2.5, dtype=float32)
  """
  l1: float = 0.0
  l2: float = 0.0

  def __post_init__(self):
    for name in ("l1", "l2"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"Invalid value for argument {name}: expected a "
                         f"non-negative float. Received: {name}={value!r}")

  def __call__(self, x):
    x = jnp.asarray(x)
    total = jnp.zeros((), x.dtype)
    if self.l1:
      total = total + jnp.asarray(self.l1, x.dtype) * jnp.sum(jnp.abs(x))
    if self.l2:
      total = total + jnp.asarray(self.l2, x.dtype) * jnp.sum(jnp.square(x))
    return total


def l1(l1: float = 0.01) -> L1L2:  # pylint: disable=redefined-outer-name
  return L1L2(l1=l1)


def l2(l2: float = 0.01) -> L1L2:  # pylint: disable=redefined-outer-name
  return L1L2(l2=l2)


def l1_l2(l1: float = 0.01, l2: float = 0.01) -> L1L2:  # pylint: disable=redefined-outer-name
  return L1L2(l1=l1, l2=l2)


_REGULARIZERS = {"l1": l1, "l2": l2, "l1_l2": l1_l2, "l1l2": l1_l2}


def get_regularizer(identifier, name: str = "regularizer"
                    ) -> Optional[Callable[[jax.Array], jax.Array]]:
  """None, a Keras name (``"l1"``, ``"l2"``, ``"l1_l2"``) or a callable.

  Names take Keras's documented defaults (0.01). Note: Keras's own
  ``regularizers.get("l1l2")`` builds ``L1L2()`` with both factors 0 (no
  penalty); jaxmha's ``"l1_l2"`` and ``"l1l2"`` mean 0.01 and 0.01.

  Raises:
    ValueError: an unknown name; the message names the argument ``name``.
  """
  if identifier is None or callable(identifier):
    return identifier
  if isinstance(identifier, str) and identifier.lower() in _REGULARIZERS:
    return _REGULARIZERS[identifier.lower()]()
  raise ValueError(
      f"Could not interpret `{name}`={identifier!r}. Use None, one of "
      f"{sorted(_REGULARIZERS)} or a callable array -> scalar.")


# Collections a variables or state dict may hold besides "losses".
_OTHER_COLLECTIONS = ("params", "dropout_counter", "batch_stats", "cache",
                      "intermediates")


def regularization_loss(variables_or_state: Any) -> jax.Array:
  """Sums every value sown into a ``"losses"`` collection.

  Accepts the mutated-state dict returned by ``layer.apply(...,
  mutable=["losses", ...])``, a full variables dict, or the ``"losses"``
  collection itself. A dict with other collections (``"params"``,
  ``"dropout_counter"``, ...) and no ``"losses"`` has no losses: 0.0.

  Returns:
    A float32 scalar (0.0 when there is nothing).
  """
  tree = variables_or_state
  if isinstance(tree, Mapping):
    if "losses" in tree:
      tree = tree["losses"]
    elif any(name in tree for name in _OTHER_COLLECTIONS):
      tree = {}
  leaves = jax.tree_util.tree_leaves(tree)
  total = jnp.zeros((), jnp.float32)
  for leaf in leaves:
    total = total + jnp.sum(jnp.asarray(leaf, jnp.float32))
  return total


# -- constraints -----------------------------------------------------------------


def _norms(w, axis):
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=axis, keepdims=True))


@dataclasses.dataclass(frozen=True)
class NonNeg:
  """Zeroes negative weights."""

  def __call__(self, w):
    return w * (w >= 0).astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class MaxNorm:
  """Rescales so the norm over ``axis`` is at most ``max_value``."""
  max_value: float = 2.0
  axis: Any = 0

  def __call__(self, w):
    norms = _norms(w, self.axis)
    desired = jnp.clip(norms, 0, self.max_value)
    return w * (desired / (_EPSILON + norms))


@dataclasses.dataclass(frozen=True)
class UnitNorm:
  """Rescales to unit norm over ``axis``."""
  axis: Any = 0

  def __call__(self, w):
    return w / (_EPSILON + _norms(w, self.axis))


@dataclasses.dataclass(frozen=True)
class MinMaxNorm:
  """Rescales the norm over ``axis`` into ``[min_value, max_value]``."""
  min_value: float = 0.0
  max_value: float = 1.0
  rate: float = 1.0
  axis: Any = 0

  def __call__(self, w):
    norms = _norms(w, self.axis)
    desired = (self.rate * jnp.clip(norms, self.min_value, self.max_value)
               + (1 - self.rate) * norms)
    return w * (desired / (_EPSILON + norms))


_CONSTRAINTS = {"non_neg": NonNeg, "max_norm": MaxNorm,
                "unit_norm": UnitNorm, "min_max_norm": MinMaxNorm}


def get_constraint(identifier, name: str = "constraint"
                   ) -> Optional[Callable[[jax.Array], jax.Array]]:
  """None, a Keras name (``"non_neg"``, ``"max_norm"``, ``"unit_norm"``,
  ``"min_max_norm"``) or a callable ``array -> array``.

  Raises:
    ValueError: an unknown name.
  """
  if identifier is None or callable(identifier):
    return identifier
  if isinstance(identifier, str):
    key = identifier.lower()
    aliases = {"nonneg": "non_neg", "maxnorm": "max_norm",
               "unitnorm": "unit_norm", "minmaxnorm": "min_max_norm"}
    key = aliases.get(key, key)
    if key in _CONSTRAINTS:
      return _CONSTRAINTS[key]()
  raise ValueError(
      f"Could not interpret `{name}`={identifier!r}. Use None, one of "
      f"{sorted(_CONSTRAINTS)} or a callable array -> array.")


def apply_constraints(params: Any, kernel_constraint=None,
                      bias_constraint=None) -> Any:
  """Projects every ``kernel`` and ``bias`` leaf of a params tree.

  Args:
    params: a jaxmha params tree (``{"query": {"kernel", "bias"}, ...}``), or
      any tree whose leaves are named ``kernel`` / ``bias``.
    kernel_constraint: name or callable for kernels, or None.
    bias_constraint: name or callable for biases, or None.

  Returns:
    A tree of the same structure.

  >>> params = {"query": {"kernel": -jnp.ones((2, 1, 1)), "bias": jnp.ones((1, 1))}}
  >>> apply_constraints(params, kernel_constraint="non_neg")["query"]["kernel"].sum()
  Array(0., dtype=float32)
  """
  kc = get_constraint(kernel_constraint, "kernel_constraint")
  bc = get_constraint(bias_constraint, "bias_constraint")
  names = lambda path: tuple(getattr(k, "key", None) for k in path)
  # The leading axes stacked onto each jaxmha layer's params (nn.scan,
  # nnx.vmap), keyed by the layer's path. Constraints act on each layer's
  # kernels, as Keras's would.
  stacked = {names(path)[:-2]: stacked_axes(leaf)
             for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if names(path)[-2:] == ("query", "kernel")}

  def project(path, leaf):
    key = names(path)
    constraint = {"kernel": kc, "bias": bc}.get(key[-1]) if key else None
    if constraint is None:
      return leaf
    layer = next((stacked[key[:i]] for i in range(len(key) - 1, -1, -1)
                  if key[:i] in stacked), 0)
    return over_leading_axes(constraint, layer)(leaf)

  return jax.tree_util.tree_map_with_path(project, params)


def stacked_axes(query_kernel) -> int:
  """How many leading (layer) axes are stacked onto a jaxmha layer's
  params, read off its query kernel, ``(D, N, H)`` on its own."""
  return max(0, jnp.ndim(query_kernel) - 3)


def over_leading_axes(fn: Callable, n: int) -> Callable:
  """``fn`` mapped over ``n`` leading axes of its argument."""
  for _ in range(n):
    fn = jax.vmap(fn)
  return fn


def constraints_transform(kernel_constraint=None,
                          bias_constraint=None) -> optax.GradientTransformation:
  """An optax transformation that keeps params constrained after updates.

  Put it **last** in a chain: it rewrites the updates ``u`` so that
  ``params + u == constrain(params + u_in)``, which is what Keras does when
  it applies constraints after each optimizer step.

  >>> tx = optax.chain(optax.sgd(0.1), constraints_transform("non_neg"))
  >>> params = {"k": {"kernel": jnp.array([0.05, 1.0])}}
  >>> grads = {"k": {"kernel": jnp.array([1.0, 1.0])}}
  >>> updates, _ = tx.update(grads, tx.init(params), params)
  >>> optax.apply_updates(params, updates)["k"]["kernel"]
  Array([0. , 0.9], dtype=float32)
  """
  kc = get_constraint(kernel_constraint, "kernel_constraint")
  bc = get_constraint(bias_constraint, "bias_constraint")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("constraints_transform needs `params` in update().")
    new_params = optax.apply_updates(params, updates)
    constrained = apply_constraints(new_params, kc, bc)
    updates = jax.tree_util.tree_map(lambda c, p: c - p, constrained, params)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)
