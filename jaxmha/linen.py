"""``jaxmha.MultiHeadAttention``: the Keras layer as a ``flax.linen.Module``.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H key head dim, Hv value head dim, D query features,
E output features.

The module owns no attention code: it declares the parameters (its
``"params"`` collection *is* the functional params tree, with Keras's names
and shapes), sows regularization losses, draws dropout keys, and calls
:func:`jaxmha.apply`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmha import functional
from jaxmha import initializers
from jaxmha import regularizers
from jaxmha.config import MHAConfig

# Logical axis names of each parameter's dims (see jaxmha.sharding).
LOGICAL_AXES = {
    "query": (("embed", "heads", "kv"), ("heads", "kv")),
    "key": (("embed", "kv_heads", "kv"), ("kv_heads", "kv")),
    "value": (("embed", "kv_heads", "kv"), ("kv_heads", "kv")),
    "gate": (("embed", "heads", "kv"), ("heads", "kv")),
    "attention_output": (("heads", "kv", "embed"), ("embed",)),
}


def logical_axes(name: str, leaf: str, ndim: int) -> tuple:
  """Logical axis names for parameter ``name/leaf`` of rank ``ndim``."""
  kernel_axes, bias_axes = LOGICAL_AXES[name]
  axes = kernel_axes if leaf == "kernel" else bias_axes
  if len(axes) == ndim:
    return axes
  # A multi-dim output_shape: the extra output dims are embed-like, unsharded.
  if name == "attention_output":
    return (axes[:2] + ("embed",) + (None,) * (ndim - 3) if leaf == "kernel"
            else ("embed",) + (None,) * (ndim - 1))
  return axes + (None,) * (ndim - len(axes))


class _Projection(nn.Module):
  """Declares one projection's ``kernel`` and ``bias``; returns them."""
  kernel_shape: tuple
  bias_shape: Optional[tuple]
  kernel_init: Callable
  bias_init: Callable
  param_dtype: Any
  kernel_regularizer: Optional[Callable] = None
  bias_regularizer: Optional[Callable] = None

  @nn.compact
  def __call__(self):
    # Plain arrays, not boxed: the "params" collection must equal the
    # functional params tree. Logical axes live in LOGICAL_AXES instead.
    params = {"kernel": self.param("kernel", self.kernel_init,
                                   self.kernel_shape, self.param_dtype)}
    if self.bias_shape is not None:
      params["bias"] = self.param("bias", self.bias_init, self.bias_shape,
                                  self.param_dtype)
    for leaf, reg in (("kernel", self.kernel_regularizer),
                      ("bias", self.bias_regularizer)):
      if reg is not None and leaf in params:
        # Overwrite (not append) so repeated calls in one apply count once,
        # like Keras's weight regularization losses.
        self.sow("losses", f"{leaf}_regularization", reg(params[leaf]),
                 init_fn=lambda: 0.0, reduce_fn=lambda _, new: new)
    return params


_REGULARIZER_ARGS = ("kernel_regularizer", "bias_regularizer",
                     "activity_regularizer")
_CONSTRAINT_ARGS = ("kernel_constraint", "bias_constraint")


def _seed_key(seed: int):
  return jax.random.key(seed)


class MultiHeadAttention(nn.Module):
  """Keras's ``MultiHeadAttention`` as a Flax linen module.

  Constructor arguments are Keras's (see :class:`jaxmha.MHAConfig`), plus:

  Attributes:
    kernel_regularizer: Keras name (``"l1"``, ``"l2"``, ``"l1_l2"``) or
      ``array -> scalar``; sown into ``"losses"``.
    bias_regularizer: likewise, for biases.
    activity_regularizer: likewise, on each projection's output divided by
      the batch size (what Keras computes); the last call's, for a layer
      called several times in one ``apply``.
    kernel_constraint, bias_constraint: Keras names or ``array -> array``;
      apply them with :meth:`constraints_transform` in the optimizer or
      :meth:`apply_constraints` after each step.
    seed: with ``training=True`` and no ``"dropout"`` rng, dropout keys come
      from ``seed`` and a step counter kept in the ``"dropout_counter"``
      collection; make it mutable to advance it each call. A supplied
      ``"dropout"`` rng always wins.
    dtype: computation dtype (None: promote inputs and params).
    param_dtype: parameter dtype.
    context_parallel_axis: as :class:`jaxmha.MHAConfig`'s (ring attention
      over that mesh axis); ``init`` attends unsplit, so it needs no mesh.

  Call arguments are those of :func:`jaxmha.apply` minus ``params``,
  ``cfg``, ``dropout_rng`` and ``dtype`` (an attribute here); with
  ``cache=`` (and ``new_lengths=``) it decodes (:mod:`jaxmha.decode`) and
  returns ``(output, cache)``.

  >>> layer = MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5, seed=0)
  >>> x = jnp.ones((1, 3, 8))
  >>> variables = layer.init(jax.random.key(0), x, x)
  >>> sorted(variables["params"])
  ['attention_output', 'key', 'query', 'value']
  >>> step = lambda v: layer.apply(v, x, x, training=True,
  ...                              mutable=["dropout_counter"])
  >>> out1, state = step(variables)
  >>> out2, _ = step({**variables, **state})  # the counter advanced
  >>> bool(jnp.allclose(out1, out2))
  False
  >>> out1b, _ = step(variables)  # reproducible from the seed
  >>> bool(jnp.allclose(out1, out1b))
  True
  """

  num_heads: int
  key_dim: int
  value_dim: Optional[int] = None
  dropout: float = 0.0
  use_bias: bool = True
  output_shape: Any = None
  attention_axes: Any = None
  sliding_window: Optional[int] = None
  use_gate: bool = False
  flash_attention: Optional[bool] = None
  kernel_initializer: Any = "glorot_uniform"
  bias_initializer: Any = "zeros"
  kernel_regularizer: Any = None
  bias_regularizer: Any = None
  activity_regularizer: Any = None
  kernel_constraint: Any = None
  bias_constraint: Any = None
  seed: Optional[int] = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  num_key_value_heads: Optional[int] = None
  context_parallel_axis: Optional[str] = None

  def __post_init__(self):
    # Validate eagerly, at construction, as Keras does.
    self.config  # pylint: disable=pointless-statement
    for name in _REGULARIZER_ARGS:
      regularizers.get_regularizer(getattr(self, name), name)
    for name in _CONSTRAINT_ARGS:
      regularizers.get_constraint(getattr(self, name), name)
    functional.check_module_args(self.seed, self.dtype, self.param_dtype)
    super().__post_init__()

  @property
  def config(self) -> MHAConfig:
    """The functional configuration of this layer."""
    return MHAConfig(
        num_heads=self.num_heads, key_dim=self.key_dim,
        value_dim=self.value_dim, dropout=self.dropout,
        use_bias=self.use_bias, output_shape=self.output_shape,
        attention_axes=self.attention_axes,
        sliding_window=self.sliding_window, use_gate=self.use_gate,
        flash_attention=self.flash_attention,
        kernel_initializer=self.kernel_initializer,
        bias_initializer=self.bias_initializer,
        num_key_value_heads=self.num_key_value_heads,
        context_parallel_axis=self.context_parallel_axis)

  def constraints_transform(self) -> optax.GradientTransformation:
    """An optax transformation projecting params onto this layer's
    constraints; chain it last in the optimizer."""
    return regularizers.constraints_transform(self.kernel_constraint,
                                              self.bias_constraint)

  def apply_constraints(self, params):
    """Projects a params tree onto this layer's constraints."""
    return regularizers.apply_constraints(params, self.kernel_constraint,
                                          self.bias_constraint)

  def _params(self, cfg, query, value, key) -> dict:
    # apply takes nested lists too (and refuses a ShapeDtypeStruct by name).
    shape = lambda x: x.shape if hasattr(x, "shape") else np.shape(x)
    shapes = functional.param_shapes(cfg, shape(query), shape(value),
                                     shape(key))
    kernel_init = initializers.get(cfg.kernel_initializer)
    bias_init = initializers.get(cfg.bias_initializer)
    kreg = regularizers.get_regularizer(self.kernel_regularizer)
    breg = regularizers.get_regularizer(self.bias_regularizer)
    return {
        name: _Projection(kernel_shape=sub["kernel"],
                          bias_shape=sub.get("bias"),
                          kernel_init=functional.kernel_initializer(
                              kernel_init, name, sub["kernel"]),
                          bias_init=bias_init,
                          param_dtype=self.param_dtype,
                          kernel_regularizer=kreg, bias_regularizer=breg,
                          name=name)()
        for name, sub in shapes.items()
    }

  def _dropout_rng(self, cfg: MHAConfig, training: bool):
    if cfg.dropout <= 0.0:
      return None
    if self.seed is not None and self.is_initializing():
      # init makes the counter whatever `training` is, so that the variables
      # it returns carry it into training calls.
      self.variable("dropout_counter", "step",
                    lambda: jnp.zeros((), jnp.uint32))
    if not training:
      return None  # inference needs no counter: {"params": p} is enough
    if self.has_rng("dropout") or (self.seed is None
                                   and self.is_initializing()
                                   and self.has_rng("params")):
      # At init without a 'dropout' stream, Flax's make_rng falls back to
      # 'params' (as nn.Dropout does), so a parent can init in training mode.
      return self.make_rng("dropout")
    if self.seed is None:
      raise ValueError(
          f"training=True with dropout={cfg.dropout} needs a dropout key: "
          "pass rngs={'dropout': key} to init/apply, or construct the layer "
          "with seed=<int>.")
    if not self.has_variable("dropout_counter", "step"):
      raise ValueError(
          f"training=True with seed={self.seed} and no 'dropout' rng draws "
          "dropout from the step counter in the 'dropout_counter' "
          "collection, which the variables passed to apply lack: pass all "
          "the variables init returned (with mutable=['dropout_counter'] to "
          "advance it), or rngs={'dropout': key}.")
    step = self.get_variable("dropout_counter", "step")
    rng = jax.random.fold_in(_seed_key(self.seed), step)
    # init returns the counter at 0, whatever `training` is.
    if (self.is_mutable_collection("dropout_counter")
        and not self.is_initializing()):
      self.put_variable("dropout_counter", "step", step + 1)
    return rng

  @nn.compact
  def __call__(self, query, value, key=None, *, attention_mask=None,
               query_mask=None, value_mask=None, key_mask=None,
               use_causal_mask: bool = False, training: bool = False,
               return_attention_scores: bool = False, cache=None,
               new_lengths=None):
    # Named errors for traced flags (e.g. nn.remat traces call arguments).
    training = functional.static_flag("training", training)
    cfg = self.config
    if self.is_initializing() and cfg.context_parallel_axis is not None:
      # init needs the shapes alone: it attends unsplit, needing no mesh.
      cfg = cfg.replace(context_parallel_axis=None)
    key_input = value if key is None else key
    params = self._params(cfg, query, value, key_input)
    dropout_rng = self._dropout_rng(cfg, training)
    result = functional.apply_with_projections(
        params, cfg, query, value, key, attention_mask=attention_mask,
        query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
        use_causal_mask=use_causal_mask, training=training,
        dropout_rng=dropout_rng,
        return_attention_scores=return_attention_scores, dtype=self.dtype,
        cache=cache, new_lengths=new_lengths)
    output, scores, projections = result[:3]
    activity = regularizers.get_regularizer(self.activity_regularizer)
    if activity is not None:
      # Keras applies the layer's activity regularizer to each projection
      # sub-layer's output, divided by that output's batch size.
      total = sum(activity(y) / y.shape[0] for y in projections.values())
      self.sow("losses", "activity_regularization", total,
               init_fn=lambda: 0.0, reduce_fn=lambda _, new: new)
    if cache is not None:
      return output, result[3]
    if return_attention_scores:
      return output, scores
    return output
