"""``jaxmha.nnx.MultiHeadAttention``: the Keras layer as a ``flax.nnx.Module``.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H key head dim, Hv value head dim, D query features,
Dk key features, Dv value features, E output features.

Like the linen module, it owns no attention code: it holds the parameters
as ``nnx.Param`` (``nnx.to_pure_dict(nnx.state(layer, nnx.Param))`` *is* the
functional params tree, with Keras's names and shapes), draws dropout keys,
and calls :func:`jaxmha.functional.apply_with_projections`. So params move
between the functional API, linen and nnx without conversion::

  state = nnx.state(layer, nnx.Param)
  nnx.replace_by_pure_dict(state, params)  # params from anywhere
  nnx.update(layer, state)
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmha import functional
from jaxmha import regularizers
from jaxmha.config import MHAConfig, is_int
from pallas_kernels import dropout as dropout_lib


class DropoutCounter(nnx.Variable):
  """The step counter that ``seed=`` dropout keys are folded with."""


class ActivityRegularization(nnx.Variable):
  """The activity-regularization loss of the layer's most recent call."""


class _Projection(nnx.Module):
  """One projection's ``kernel`` and (optional) ``bias``."""

  def __init__(self, kernel: jax.Array, bias: Optional[jax.Array]):
    self.kernel = nnx.Param(kernel)
    if bias is not None:
      self.bias = nnx.Param(bias)

  def tree(self) -> dict:
    params = {"kernel": self.kernel[...]}
    if hasattr(self, "bias"):
      params["bias"] = self.bias[...]
    return params


class MultiHeadAttention(nnx.Module):
  """Keras's ``MultiHeadAttention`` as a Flax NNX module.

  Constructor arguments are those of the linen module
  (:class:`jaxmha.MultiHeadAttention`, i.e. Keras's, see
  :class:`jaxmha.MHAConfig`), plus what NNX needs up front:

  Args:
    query_features: D, the query's last dim.
    value_features: Dv, the value's last dim; default ``query_features``.
    key_features: Dk, the key's last dim; default ``value_features``.
    rngs: ``nnx.Rngs``; ``rngs.params()`` initialises the parameters and,
      when ``dropout > 0`` and no ``seed``, the layer keeps a fork of the
      ``dropout`` stream (default stream if absent) for its dropout keys.
    seed: with ``dropout > 0``, dropout keys are
      ``fold_in(jax.random.key(seed), step)``, ``step`` being a
      :class:`DropoutCounter` variable that advances each training call
      (the linen module's behaviour); constructor ``rngs`` then only
      initialise.
    deterministic: what ``model.train()`` (False) and ``model.eval()``
      (True) set; a call with ``training=None`` trains only when it is
      False. Default None: inference, as in Keras.

  Regularizers and constraints: :meth:`regularization_loss` returns the
  kernel/bias regularization of the current params plus the activity
  regularization of the last call (kept in an
  :class:`ActivityRegularization` variable); add it to the training loss.
  :meth:`constraints_transform` (an optax transformation) and
  :meth:`apply_constraints` (in place) apply the constraints.

  Call arguments are those of :func:`jaxmha.apply` minus ``params``,
  ``cfg``, ``dropout_rng`` and ``dtype`` (a constructor argument here),
  plus ``rngs`` (an ``nnx.Rngs``, a stream or a key) for this call's
  dropout key, which wins over the layer's own. ``training`` defaults to
  None: the layer then follows its ``deterministic`` attribute, as Flax's
  NNX layers do, so ``model.train()`` turns dropout on and
  ``model.eval()`` off; an explicit ``training=`` wins.
  Returns ``output``, ``(output, scores)``, or with ``cache=``
  ``(output, cache)``.

  >>> layer = MultiHeadAttention(num_heads=2, key_dim=4, query_features=8,
  ...                            rngs=nnx.Rngs(0))
  >>> params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  >>> jax.tree.map(jnp.shape, params["query"])
  {'bias': (2, 4), 'kernel': (8, 2, 4)}
  >>> x = jnp.ones((1, 3, 8))
  >>> out = layer(x, x, use_causal_mask=True)
  >>> bool(jnp.allclose(out, functional.apply(params, layer.config, x, x,
  ...                                         use_causal_mask=True)))
  True
  """

  def __init__(self, num_heads: int, key_dim: int,
               value_dim: Optional[int] = None, dropout: float = 0.0,
               use_bias: bool = True, output_shape: Any = None,
               attention_axes: Any = None,
               sliding_window: Optional[int] = None, use_gate: bool = False,
               flash_attention: Optional[bool] = None,
               kernel_initializer: Any = "glorot_uniform",
               bias_initializer: Any = "zeros", kernel_regularizer: Any = None,
               bias_regularizer: Any = None,
               activity_regularizer: Any = None,
               kernel_constraint: Any = None, bias_constraint: Any = None,
               seed: Optional[int] = None, dtype: Any = None,
               param_dtype: Any = jnp.float32,
               num_key_value_heads: Optional[int] = None,
               context_parallel_axis: Optional[str] = None, *,
               query_features: int, value_features: Optional[int] = None,
               key_features: Optional[int] = None, rngs: nnx.Rngs,
               deterministic: Optional[bool] = None):
    cfg = MHAConfig(
        num_heads=num_heads, key_dim=key_dim, value_dim=value_dim,
        dropout=dropout, use_bias=use_bias, output_shape=output_shape,
        attention_axes=attention_axes, sliding_window=sliding_window,
        use_gate=use_gate, flash_attention=flash_attention,
        kernel_initializer=kernel_initializer,
        bias_initializer=bias_initializer,
        num_key_value_heads=num_key_value_heads,
        context_parallel_axis=context_parallel_axis)
    functional.check_module_args(seed, dtype, param_dtype)
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"`rngs` must be an nnx.Rngs; got "
                      f"{type(rngs).__name__}.")
    param_dtype = jnp.dtype(param_dtype)
    value_features = query_features if value_features is None else (
        value_features)
    key_features = value_features if key_features is None else key_features
    for name, value in (("query_features", query_features),
                        ("value_features", value_features),
                        ("key_features", key_features)):
      if not is_int(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int. Received: "
                         f"{name}={value!r}")
    query_features, value_features, key_features = (
        int(query_features), int(value_features), int(key_features))
    lead = (1,) * (cfg.min_input_rank - 1)
    params = functional.init_params(
        rngs.params(), cfg, lead + (query_features,),
        lead + (value_features,), lead + (key_features,), dtype=param_dtype)
    self.config = cfg
    self.deterministic = deterministic
    self.query_features = query_features
    self.value_features = value_features
    self.key_features = key_features
    self.seed = seed
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.kernel_regularizer = regularizers.get_regularizer(
        kernel_regularizer, "kernel_regularizer")
    self.bias_regularizer = regularizers.get_regularizer(
        bias_regularizer, "bias_regularizer")
    self.activity_regularizer = regularizers.get_regularizer(
        activity_regularizer, "activity_regularizer")
    self.kernel_constraint = regularizers.get_constraint(
        kernel_constraint, "kernel_constraint")
    self.bias_constraint = regularizers.get_constraint(
        bias_constraint, "bias_constraint")
    self.projection_names = tuple(params)
    for name, sub in params.items():
      setattr(self, name, _Projection(sub["kernel"], sub.get("bias")))
    self.rngs = nnx.data(None)
    if cfg.dropout > 0.0:
      if seed is not None:
        self.dropout_counter = DropoutCounter(jnp.zeros((), jnp.uint32))
      else:
        try:  # the 'dropout' stream, or Rngs' default one
          stream = rngs.dropout
        except AttributeError:
          raise ValueError(
              f"dropout={cfg.dropout} and no seed: the layer keeps a fork of "
              "the 'dropout' stream of `rngs`, which has none (nor a "
              "default). Pass rngs=nnx.Rngs(params=..., dropout=...), or "
              "seed=<int>.") from None
        self.rngs = stream.fork()
    if self.activity_regularizer is not None:
      self.activity_loss = ActivityRegularization(jnp.zeros((), jnp.float32))

  def params(self) -> dict:
    """The params tree (plain arrays), as :func:`jaxmha.apply` takes it."""
    return {name: getattr(self, name).tree()
            for name in self.projection_names}

  def regularization_loss(self) -> jax.Array:
    """Kernel and bias regularization of the current params, plus the
    activity regularization of the most recent call; a float32 scalar.

    Equals :func:`jaxmha.regularization_loss` of the linen module's sown
    ``"losses"`` for the same params and inputs.

    >>> layer = MultiHeadAttention(num_heads=2, key_dim=4, query_features=8,
    ...                            kernel_regularizer="l2", rngs=nnx.Rngs(0))
    >>> float(layer.regularization_loss()) > 0
    True
    """
    params = self.params()
    # A stack of layers (nnx.vmap) holds each variable with leading layer
    # axes: each layer's penalty is summed.
    layers = regularizers.stacked_axes(params["query"]["kernel"])
    total = jnp.zeros((), jnp.float32)
    for sub in params.values():
      for leaf, reg in (("kernel", self.kernel_regularizer),
                        ("bias", self.bias_regularizer)):
        if reg is not None and leaf in sub:
          penalty = regularizers.over_leading_axes(reg, layers)(sub[leaf])
          total = total + jnp.sum(jnp.asarray(penalty, jnp.float32))
    if self.activity_regularizer is not None:
      total = total + jnp.sum(self.activity_loss[...])
    return total

  def constraints_transform(self) -> optax.GradientTransformation:
    """An optax transformation projecting params onto this layer's
    constraints; chain it last in the optimizer."""
    return regularizers.constraints_transform(self.kernel_constraint,
                                              self.bias_constraint)

  def apply_constraints(self) -> None:
    """Projects this layer's params onto its constraints, in place."""
    projected = regularizers.apply_constraints(
        self.params(), self.kernel_constraint, self.bias_constraint)
    for name, sub in projected.items():
      for leaf, value in sub.items():
        getattr(getattr(self, name), leaf)[...] = value

  def _dropout_rng(self, training: bool, rngs):
    cfg = self.config
    if not training or cfg.dropout <= 0.0:
      return None
    if rngs is not None:
      if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
      if isinstance(rngs, nnx.RngStream):
        return rngs()
      return dropout_lib.as_key(
          rngs, "rngs", "an nnx.Rngs, an nnx.RngStream or a PRNG key")
    if self.rngs is not None:
      return self.rngs()
    if self.seed is not None:
      step = self.dropout_counter[...]
      self.dropout_counter[...] = step + 1
      return jax.random.fold_in(jax.random.key(self.seed), step)
    raise ValueError(
        f"training=True with dropout={cfg.dropout} needs a dropout key: pass "
        "rngs= to the call (the layer holds no dropout stream).")

  def __call__(self, query, value, key=None, *, attention_mask=None,
               query_mask=None, value_mask=None, key_mask=None,
               use_causal_mask: bool = False,
               training: Optional[bool] = None,
               return_attention_scores: bool = False, cache=None,
               new_lengths=None, rngs=None):
    """Attends ``query (B, T, D)`` to ``value (B, S, Dv)``.

    See :func:`jaxmha.apply` for the arguments; ``rngs`` overrides the
    layer's dropout key source for this call. ``training=None`` follows
    ``self.deterministic``: training after ``model.train()`` (which sets it
    to False), inference after ``model.eval()`` or when never set.
    """
    if training is None:
      training = self.deterministic is False
    for name, x, expected in (("query", query, self.query_features),
                              ("value", value, self.value_features),
                              ("key", key, self.key_features)):
      if x is not None and jnp.shape(x)[-1:] != (expected,):
        raise ValueError(
            f"`{name}` must have {expected} features (the layer's "
            f"{name}_features); got {name}.shape={jnp.shape(x)}.")
    result = functional.apply_with_projections(
        self.params(), self.config, query, value, key,
        attention_mask=attention_mask, query_mask=query_mask,
        value_mask=value_mask, key_mask=key_mask,
        use_causal_mask=use_causal_mask, training=training,
        dropout_rng=self._dropout_rng(training, rngs),
        return_attention_scores=return_attention_scores, dtype=self.dtype,
        cache=cache, new_lengths=new_lengths)
    output, scores, projections = result[:3]
    if self.activity_regularizer is not None:
      # Keras applies the activity regularizer to each projection's output,
      # divided by that output's batch size (as the linen module sows it).
      self.activity_loss[...] = jnp.asarray(
          sum(self.activity_regularizer(y) / y.shape[0]
              for y in projections.values()), jnp.float32)
    if cache is not None:
      return output, result[3]
    if return_attention_scores:
      return output, scores
    return output
