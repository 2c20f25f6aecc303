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

from jaxmha.config import MHAConfig

_SUBLAYERS = ("query", "key", "value", "gate", "attention_output")
_KERAS_INITIALIZER_NAMES = {
    "GlorotUniform": "glorot_uniform", "GlorotNormal": "glorot_normal",
    "HeUniform": "he_uniform", "HeNormal": "he_normal",
    "LecunUniform": "lecun_uniform", "LecunNormal": "lecun_normal",
    "Zeros": "zeros", "Ones": "ones", "RandomNormal": "random_normal",
    "RandomUniform": "random_uniform", "TruncatedNormal": "truncated_normal",
    "Orthogonal": "orthogonal", "Identity": "identity",
    "VarianceScaling": "variance_scaling",
}


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


def _initializer_name(initializer) -> Any:
  """A Keras initializer object -> a jaxmha name (its defaults) or itself."""
  class_name = type(initializer).__name__
  name = _KERAS_INITIALIZER_NAMES.get(class_name)
  if name is None:
    return "glorot_uniform"
  keras = _keras()
  default = keras.initializers.get(name).get_config()
  config = dict(initializer.get_config())
  config.pop("seed", None)
  default.pop("seed", None)
  if config != default:
    # Non-default arguments: keep Keras's distribution exactly.
    def init(rng, shape, dtype=jnp.float32, _init=initializer):
      del rng  # Keras draws from its own seed; only used to re-initialise
      return jnp.asarray(_init(shape), dtype)
    return init
  return name


def config_from_keras(layer) -> MHAConfig:
  """The :class:`MHAConfig` of a Keras ``MultiHeadAttention`` layer."""
  keras_cfg = layer.get_config()
  if type(layer).__name__ == "GroupedQueryAttention":
    # Keras's GQA repeats each key/value head over N // K consecutive query
    # heads (ops.repeat), which is jaxmha's n -> n // (N // K); its kernels
    # are laid out as jaxmha's, so no transposition is needed.
    flash = getattr(layer, "_flash_attention", None)
    return MHAConfig(
        num_heads=keras_cfg["num_query_heads"], key_dim=keras_cfg["head_dim"],
        dropout=float(keras_cfg.get("dropout", 0.0)),
        use_bias=keras_cfg.get("use_bias", True),
        sliding_window=keras_cfg.get("sliding_window"),
        use_gate=keras_cfg.get("use_gate", False),
        flash_attention=flash if flash in (None, True, False) else None,
        num_key_value_heads=keras_cfg["num_key_value_heads"],
        kernel_initializer=_initializer_name(layer.kernel_initializer),
        bias_initializer=_initializer_name(layer.bias_initializer))
  return MHAConfig(
      num_heads=keras_cfg["num_heads"], key_dim=keras_cfg["key_dim"],
      value_dim=keras_cfg.get("value_dim"),
      dropout=float(keras_cfg.get("dropout", 0.0)),
      use_bias=keras_cfg.get("use_bias", True),
      output_shape=keras_cfg.get("output_shape") or None,
      attention_axes=keras_cfg.get("attention_axes"),
      sliding_window=keras_cfg.get("sliding_window"),
      use_gate=keras_cfg.get("use_gate", False),
      flash_attention=keras_cfg.get("flash_attention"),
      kernel_initializer=_initializer_name(layer._kernel_initializer),
      bias_initializer=_initializer_name(layer._bias_initializer),
      num_key_value_heads=None)


def from_keras(keras_layer) -> tuple[MHAConfig, dict]:
  """``(cfg, params)`` from a built Keras ``MultiHeadAttention`` or
  ``GroupQueryAttention`` layer (the latter gives ``num_key_value_heads``).

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
  init = lambda x: x if isinstance(x, str) else "glorot_uniform"
  kwargs = dict(
      num_heads=cfg.num_heads, key_dim=cfg.key_dim, value_dim=cfg.value_dim,
      dropout=cfg.dropout, use_bias=cfg.use_bias,
      output_shape=cfg.output_shape, attention_axes=cfg.attention_axes,
      use_gate=cfg.use_gate, kernel_initializer=init(cfg.kernel_initializer),
      bias_initializer=init(cfg.bias_initializer))
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
  init = lambda x: x if isinstance(x, str) else "glorot_uniform"
  return dict(head_dim=cfg.key_dim, num_query_heads=cfg.num_heads,
              num_key_value_heads=cfg.kv_heads, dropout=cfg.dropout,
              use_bias=cfg.use_bias, sliding_window=cfg.sliding_window,
              use_gate=cfg.use_gate,
              kernel_initializer=init(cfg.kernel_initializer),
              bias_initializer=init(cfg.bias_initializer))


def to_keras(params: dict, cfg: MHAConfig, keras_layer: Optional[Any] = None):
  """Copies ``params`` into a Keras ``MultiHeadAttention`` layer, or a
  ``GroupQueryAttention`` for a grouped-query config.

  Args:
    params: a jaxmha params tree.
    cfg: its configuration.
    keras_layer: a layer to copy into (built or not); None builds a new one
      from ``cfg`` (a ``GroupQueryAttention`` when ``num_key_value_heads``
      differs from ``num_heads``).

  Returns:
    The Keras layer, holding ``params``.

  Raises:
    ValueError: shapes in ``params`` that do not fit the layer; a
      grouped-query config and a ``MultiHeadAttention`` layer; a config
      ``GroupQueryAttention`` cannot hold (``value_dim != key_dim``, an
      ``output_shape`` or several attention axes).
  """
  keras = _keras()
  gqa = keras.layers.GroupQueryAttention
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
  if not keras_layer.built:
    rank = 3
    if cfg.attention_axes is not None:
      rank = max(3, max(a for a in cfg.attention_axes if a >= 0) + 2
                 if any(a >= 0 for a in cfg.attention_axes) else 3)
    lead = (1,) * (rank - 1)
    keras_layer.build(query_shape=lead + (params["query"]["kernel"].shape[0],),
                      value_shape=lead + (params["value"]["kernel"].shape[0],),
                      key_shape=lead + (params["key"]["kernel"].shape[0],))
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
