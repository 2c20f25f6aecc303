"""Weights in and out of Keras: ``from_keras`` and ``to_keras``.

Shape letters: N heads, H key head dim, Hv value head dim, D, Dk, Dv input
features, E output features.

jaxmha's params use Keras's sub-layer names and kernel shapes, so moving
weights is a copy in both directions. Keras is imported only when these
functions run; ``import jaxmha`` never imports it.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from jaxmha import equations
from jaxmha import initializers
from jaxmha.config import MHAConfig

_SUBLAYERS = ("query", "key", "value", "gate", "attention_output")


def _keras():
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - keras is a test dependency
    raise ImportError("jaxmha.from_keras/to_keras need Keras 3: "
                      "pip install 'keras>=3.15'.") from e
  return keras


def _sublayer(layer, name: str):
  attr = {"query": "_query_dense", "key": "_key_dense",
          "value": "_value_dense", "gate": "_gate_dense",
          "attention_output": "_output_dense"}[name]
  return getattr(layer, attr, None)


def _keras_initializer(init) -> Any:
  """A cfg initializer -> what a Keras layer takes. A jaxmha callable that
  did not come from Keras has no Keras form; Keras's default stands in (the
  weights are copied over it)."""
  if isinstance(init, str):
    return init
  if isinstance(init, initializers.KerasInitializer):
    return _keras().initializers.get(init.get_config())
  return getattr(init, "keras_initializer", "glorot_uniform")


def _flash_attention(layer) -> Optional[bool]:
  """The layer's ``flash_attention`` argument (not in its ``get_config``)."""
  flash = getattr(layer, "_flash_attention", None)
  return flash if flash in (None, True, False) else None


def _query_rank(layer) -> int:
  """The query rank a built Keras layer was built for."""
  inputs = layer._query_dense.equation.split(",")[0]  # e.g. "abc" for rank 3
  return len(inputs)


def _built_axes(axes, rank: int) -> tuple[int, ...]:
  """Attention axes (None, an int or ints) of a rank-``rank`` query as Keras
  stores them once built: non-negative, None spelled out as every axis but
  batch and features."""
  if isinstance(axes, int):
    axes = (axes,)
  return equations.normalize_attention_axes(axes, rank)


def config_from_keras(layer) -> MHAConfig:
  """The :class:`MHAConfig` of a Keras ``MultiHeadAttention`` layer."""
  keras_cfg = layer.get_config()
  if type(layer).__name__ == "GroupedQueryAttention":
    # Keras's GQA repeats each key/value head over N // K consecutive query
    # heads (ops.repeat), which is jaxmha's n -> n // (N // K); its kernels
    # are laid out as jaxmha's, so no transposition is needed.
    return MHAConfig(
        num_heads=keras_cfg["num_query_heads"], key_dim=keras_cfg["head_dim"],
        dropout=float(keras_cfg.get("dropout", 0.0)),
        use_bias=keras_cfg.get("use_bias", True),
        sliding_window=keras_cfg.get("sliding_window"),
        use_gate=keras_cfg.get("use_gate", False),
        flash_attention=_flash_attention(layer),
        num_key_value_heads=keras_cfg["num_key_value_heads"],
        kernel_initializer=initializers.from_keras_object("kernel_initializer",
                                              layer.kernel_initializer),
        bias_initializer=initializers.from_keras_object("bias_initializer",
                                            layer.bias_initializer))
  # Keras stores value_dim=key_dim and, once built, the default attention
  # axes spelled out; jaxmha's canonical form of both is None, so that a
  # round trip through Keras gives back an equal (and equally hashed) cfg.
  value_dim = keras_cfg.get("value_dim")
  if value_dim == keras_cfg["key_dim"]:
    value_dim = None
  axes = keras_cfg.get("attention_axes")
  if axes is not None and layer.built:
    rank = _query_rank(layer)
    if _built_axes(axes, rank) == _built_axes(None, rank):
      axes = None
  return MHAConfig(
      num_heads=keras_cfg["num_heads"], key_dim=keras_cfg["key_dim"],
      value_dim=value_dim,
      dropout=float(keras_cfg.get("dropout", 0.0)),
      use_bias=keras_cfg.get("use_bias", True),
      output_shape=keras_cfg.get("output_shape") or None,
      attention_axes=axes,
      sliding_window=keras_cfg.get("sliding_window"),
      use_gate=keras_cfg.get("use_gate", False),
      flash_attention=_flash_attention(layer),
      kernel_initializer=initializers.from_keras_object("kernel_initializer",
                                            layer._kernel_initializer),
      bias_initializer=initializers.from_keras_object("bias_initializer",
                                          layer._bias_initializer),
      num_key_value_heads=None)


def from_keras(keras_layer) -> tuple[MHAConfig, dict]:
  """``(cfg, params)`` from a built Keras ``MultiHeadAttention`` or
  ``GroupQueryAttention`` layer (the latter gives ``num_key_value_heads``).

  ``cfg`` is in jaxmha's canonical form: ``value_dim`` equal to ``key_dim``
  and, for a built layer, the default attention axes for its input rank come
  back as None (Keras stores both spelled out).

  Keras's dtype policy is not part of ``cfg``: ``params`` keep the layer's
  variable dtype (float32 under ``"mixed_bfloat16"``), and ``apply`` computes
  in the promoted dtype of its inputs and params. To compute as the layer
  does, pass ``dtype=keras_layer.compute_dtype`` to ``apply``.

  Nor are regularizers and constraints: they are arguments of the linen and
  nnx modules (``kernel_regularizer=``, ``kernel_constraint=``, ...), which
  take Keras's names and objects; pass the layer's there.

  Raises:
    TypeError: not a Keras ``MultiHeadAttention`` or ``GroupQueryAttention``.
    ValueError: the layer is not built (call it once, or ``build`` it).
  """
  keras = _keras()
  if not isinstance(keras_layer, (keras.layers.MultiHeadAttention,
                                  keras.layers.GroupQueryAttention)):
    raise TypeError("`keras_layer` must be a keras.layers.MultiHeadAttention "
                    "or keras.layers.GroupQueryAttention; got "
                    f"{type(keras_layer).__name__}.")
  if not keras_layer.built:
    raise ValueError("`keras_layer` is not built: call it on inputs once, or "
                     "call keras_layer.build(query_shape, value_shape).")
  cfg = config_from_keras(keras_layer)
  params = {}
  for name in _SUBLAYERS:
    dense = _sublayer(keras_layer, name)
    if dense is None:
      continue
    params[name] = {"kernel": jnp.asarray(np.asarray(dense.kernel))}
    if getattr(dense, "bias", None) is not None:
      params[name]["bias"] = jnp.asarray(np.asarray(dense.bias))
  return cfg, params


def _keras_kwargs(cfg: MHAConfig) -> dict:
  kwargs = dict(
      num_heads=cfg.num_heads, key_dim=cfg.key_dim, value_dim=cfg.value_dim,
      dropout=cfg.dropout, use_bias=cfg.use_bias,
      output_shape=cfg.output_shape, attention_axes=cfg.attention_axes,
      use_gate=cfg.use_gate, flash_attention=cfg.flash_attention,
      kernel_initializer=_keras_initializer(cfg.kernel_initializer),
      bias_initializer=_keras_initializer(cfg.bias_initializer))
  if cfg.sliding_window is not None:
    kwargs["sliding_window"] = cfg.sliding_window
  return kwargs


def _keras_gqa_kwargs(cfg: MHAConfig, query_dim: int) -> dict:
  """``keras.layers.GroupQueryAttention`` arguments; ValueError if none fit."""
  unsupported = []
  if cfg.value_dim not in (None, cfg.key_dim):
    unsupported.append(f"value_dim={cfg.value_dim} != key_dim={cfg.key_dim}")
  if cfg.output_shape not in (None, (query_dim,)):
    unsupported.append(f"output_shape={cfg.output_shape}")
  if cfg.attention_axes not in (None, (1,), (-2,)):
    unsupported.append(f"attention_axes={cfg.attention_axes}")
  if unsupported:
    raise ValueError("keras.layers.GroupQueryAttention cannot hold this "
                     f"config: {', '.join(unsupported)}.")
  return dict(head_dim=cfg.key_dim, num_query_heads=cfg.num_heads,
              num_key_value_heads=cfg.kv_heads, dropout=cfg.dropout,
              use_bias=cfg.use_bias, sliding_window=cfg.sliding_window,
              use_gate=cfg.use_gate, flash_attention=cfg.flash_attention,
              kernel_initializer=_keras_initializer(cfg.kernel_initializer),
              bias_initializer=_keras_initializer(cfg.bias_initializer))


def _build_shapes(params: dict, cfg: MHAConfig, query_shape, value_shape,
                  key_shape) -> dict:
  """Keras ``build`` arguments for an unbuilt layer: the given shapes, or
  inputs of the smallest rank ``cfg.attention_axes`` fits."""
  features = {name: params[name]["kernel"].shape[0]
              for name in ("query", "value", "key")}
  if query_shape is None:
    if value_shape is not None or key_shape is not None:
      raise ValueError("Pass `query_shape` with `value_shape`/`key_shape`; "
                       "got only the latter.")
    lead = (1,) * (cfg.min_input_rank - 1)
    return {f"{name}_shape": lead + (features[name],) for name in features}
  value_shape = query_shape if value_shape is None else value_shape
  key_shape = value_shape if key_shape is None else key_shape
  shapes = {"query": tuple(query_shape), "value": tuple(value_shape),
            "key": tuple(key_shape)}
  for name, shape in shapes.items():
    if len(shape) < 3 or shape[-1] != features[name]:
      raise ValueError(
          f"`{name}_shape`={shape} must be (B, ..., {features[name]}): rank "
          f"3 or more, with the {features[name]} features of "
          f"params['{name}']['kernel'].shape={params[name]['kernel'].shape}.")
  return {f"{name}_shape": shape for name, shape in shapes.items()}


def _config_mismatches(cfg: MHAConfig, layer) -> list[str]:
  """The settings a built Keras layer holds that ``cfg`` contradicts, beyond
  what the weights' shapes show."""
  keras_cfg = layer.get_config()
  wanted = {"dropout": cfg.dropout, "sliding_window": cfg.sliding_window}
  if "attention_axes" in keras_cfg:
    rank = _query_rank(layer)
    wanted["attention_axes"] = _built_axes(cfg.attention_axes, rank)
    keras_cfg["attention_axes"] = _built_axes(keras_cfg["attention_axes"],
                                              rank)
  return [f"{field}: cfg has {value!r}, the layer {keras_cfg.get(field)!r}"
          for field, value in wanted.items()
          if keras_cfg.get(field) != value]


def _check_params_tree(params, cfg: MHAConfig) -> None:
  """A ValueError unless ``params`` has a kernel for every projection of
  ``cfg`` (shapes are checked against the Keras layer later)."""
  names = ["query", "key", "value"] + (["gate"] if cfg.use_gate else [])
  names.append("attention_output")
  if not isinstance(params, dict):
    raise TypeError(f"`params` must be a dict; got {type(params).__name__}.")
  missing = [name for name in names if not isinstance(params.get(name), dict)
             or "kernel" not in params[name]]
  if missing:
    raise ValueError(
        f"`params` lacks the kernels of {missing}: this cfg needs "
        f"{{name: {{'kernel', 'bias'}}}} for {names}, as "
        f"jaxmha.init_params makes; got keys {sorted(params)}.")


def to_keras(params: dict, cfg: MHAConfig, keras_layer: Optional[Any] = None,
             *, query_shape=None, value_shape=None, key_shape=None):
  """Copies ``params`` into a Keras ``MultiHeadAttention`` layer, or a
  ``GroupQueryAttention`` for a grouped-query config.

  Args:
    params: a jaxmha params tree.
    cfg: its configuration.
    keras_layer: a layer to copy into (built or not); None builds a new one
      from ``cfg`` (a ``GroupQueryAttention`` when ``num_key_value_heads``
      differs from ``num_heads``).
    query_shape: ``(B, ..., D)``, the inputs an unbuilt layer is built for,
      as in ``init_params`` (only the rank and ``D`` matter). Keras layers
      serve one input rank; the default is rank 3, or the smallest rank
      ``cfg.attention_axes`` fits, so pass this for inputs of higher rank.
    value_shape: ``(B, ..., Dv)``; default ``query_shape``.
    key_shape: ``(B, ..., Dk)``; default ``value_shape``.

  A new layer takes Keras's global dtype policy
  (``keras.config.dtype_policy()``, float32 by default), whatever the dtype
  of ``params``: they are cast to its variable dtype (bfloat16 params into a
  float32 layer exactly, float32 ones into a bfloat16 layer rounded). For
  another policy, pass a ``keras_layer`` built with ``dtype=``.

  Returns:
    The Keras layer, holding ``params``.

  Raises:
    TypeError: a ``keras_layer`` that is not an attention layer.
    ValueError: ``params`` without a projection ``cfg`` has; shapes in
      ``params`` that do not fit the layer; a layer whose
      dropout, sliding window or attention axes differ from ``cfg``'s; input
      shapes for a layer that is already built, or whose features differ from
      ``params``'; a grouped-query config and a ``MultiHeadAttention`` layer;
      a config ``GroupQueryAttention`` cannot hold (``value_dim != key_dim``,
      an ``output_shape`` or several attention axes).
  """
  keras = _keras()
  _check_params_tree(params, cfg)
  gqa = keras.layers.GroupQueryAttention
  if keras_layer is not None and not isinstance(
      keras_layer, (gqa, keras.layers.MultiHeadAttention)):
    raise TypeError("`keras_layer` must be a keras.layers.MultiHeadAttention "
                    "or GroupQueryAttention (or None); got "
                    f"{type(keras_layer).__name__}.")
  if keras_layer is None:
    if cfg.kv_heads != cfg.num_heads:
      query_dim = params["query"]["kernel"].shape[0]
      keras_layer = gqa(**_keras_gqa_kwargs(cfg, query_dim))
    else:
      keras_layer = keras.layers.MultiHeadAttention(**_keras_kwargs(cfg))
  elif isinstance(keras_layer, gqa):
    _keras_gqa_kwargs(cfg, params["query"]["kernel"].shape[0])
  elif cfg.kv_heads != cfg.num_heads:
    raise ValueError("A grouped-query config (num_key_value_heads="
                     f"{cfg.num_key_value_heads}) does not fit "
                     "keras.layers.MultiHeadAttention; pass a "
                     "keras.layers.GroupQueryAttention (or keras_layer=None).")
  given = (query_shape, value_shape, key_shape)
  if keras_layer.built and any(s is not None for s in given):
    raise ValueError("`keras_layer` is already built, for the inputs it was "
                     "built for; `query_shape`/`value_shape`/`key_shape` only "
                     "build an unbuilt layer.")
  if not keras_layer.built:
    keras_layer.build(**_build_shapes(params, cfg, *given))
  mismatches = _config_mismatches(cfg, keras_layer)
  if mismatches:
    raise ValueError("`keras_layer` does not compute what `cfg` describes: "
                     + "; ".join(mismatches) + ".")
  for name in _SUBLAYERS:
    dense = _sublayer(keras_layer, name)
    if (dense is None) != (name not in params):
      raise ValueError(f"`params` {'lacks' if dense is not None else 'has'} "
                       f"the '{name}' projection that the Keras layer "
                       f"{'has' if dense is not None else 'lacks'}.")
    if dense is None:
      continue
    for leaf in ("kernel", "bias"):
      variable = getattr(dense, leaf, None)
      if (variable is None) != (leaf not in params[name]):
        raise ValueError(f"`params['{name}']` and the Keras layer disagree "
                         f"on having a '{leaf}' (use_bias).")
      if variable is None:
        continue
      value = np.asarray(params[name][leaf])
      if tuple(variable.shape) != value.shape:
        raise ValueError(
            f"params['{name}']['{leaf}'].shape={value.shape} does not fit "
            f"the Keras layer's {tuple(variable.shape)}.")
      variable.assign(value.astype(variable.dtype))
  return keras_layer
