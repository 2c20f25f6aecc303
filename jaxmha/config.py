"""``MHAConfig``: the static description of a multi-head attention layer.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H key head dim (``key_dim``), Hv value head dim
(``value_dim``), D query features, E output features.

It carries Keras's constructor arguments with Keras's names, defaults and
validation messages, is frozen and hashable (a static argument to ``jit``),
and round-trips through ``get_config``/``from_config``.

Also here: the global flash-attention switch, as in Keras
(``jaxmha.config.enable_flash_attention()``), except that a per-layer
``flash_attention=False`` always wins.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import numpy as np

from pallas_kernels import common

Initializer = Union[str, Callable[..., Any]]

# None: no preference (use a kernel where the backend has one);
# True/False: set by enable_/disable_flash_attention().
_FLASH_ATTENTION_GLOBAL: Optional[bool] = None


def enable_flash_attention() -> None:
  """Force flash kernels for layers whose ``flash_attention`` is None.

  As Keras's ``keras.config.enable_flash_attention``: such layers behave as
  if built with ``flash_attention=True``, so a call the flash path cannot
  serve (attention scores, a cache) raises ``UnsupportedCallError``, and on
  CPU the kernels run in interpret mode (slow; for testing).
  """
  global _FLASH_ATTENTION_GLOBAL
  _FLASH_ATTENTION_GLOBAL = True


def disable_flash_attention() -> None:
  """Never use flash kernels for layers whose ``flash_attention`` is None."""
  global _FLASH_ATTENTION_GLOBAL
  _FLASH_ATTENTION_GLOBAL = False


def is_flash_attention_enabled() -> Optional[bool]:
  """The global setting: True, False, or None (decide per backend)."""
  return _FLASH_ATTENTION_GLOBAL


def is_int(x) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_positive_int(name: str, value, allow_none: bool = False):
  if value is None and allow_none:
    return
  if not is_int(value) or value <= 0:
    suffix = " or `None`" if allow_none else ""
    raise ValueError(
        f"Received an invalid value for argument `{name}`, expected a "
        f"positive integer{suffix}. Received: {name}={value!r}")


def _normalize_output_shape(output_shape):
  if output_shape is None:
    return None
  original = output_shape
  if is_int(output_shape):
    output_shape = (int(output_shape),)
  try:
    output_shape = tuple(output_shape)
  except TypeError:
    raise ValueError(
        f"Invalid `output_shape`: {output_shape!r}. When specified, the "
        "`output_shape` should be of type tuple, list, or int.") from None
  if not output_shape or any(not is_int(d) or d <= 0 for d in output_shape):
    raise ValueError(
        "`output_shape` must be None, a positive int or a non-empty tuple of "
        f"positive ints. Received: output_shape={original!r}")
  return tuple(int(d) for d in output_shape)


def _normalize_attention_axes(attention_axes):
  if attention_axes is None:
    return None
  if is_int(attention_axes):
    attention_axes = (attention_axes,)
  if not isinstance(attention_axes, (list, tuple)) or not attention_axes or any(
      not is_int(a) for a in attention_axes):
    raise ValueError(
        "`attention_axes` must be an int, list, or tuple of ints. "
        f"Received: attention_axes={attention_axes!r}")
  axes = tuple(int(a) for a in attention_axes)
  if len(set(axes)) != len(axes):
    raise ValueError(f"`attention_axes` has repeated axes. Received: "
                     f"attention_axes={attention_axes!r}")
  return axes


@dataclasses.dataclass(frozen=True)
class MHAConfig:
  """Keras's ``MultiHeadAttention`` arguments, frozen and validated.

  Attributes:
    num_heads: N, the number of attention heads.
    key_dim: H, the size of each head for query and key.
    value_dim: Hv, the size of each head for value (default ``key_dim``).
    dropout: dropout rate on the attention probabilities, in ``[0, 1)``.
    use_bias: whether the projections have biases.
    output_shape: E, the output features besides batch and sequence dims
      (an int or a tuple); default: the query's last dim.
    attention_axes: the axes attention runs over; default all axes but
      batch and features. Negative axes count from the end of the query,
      as in Keras: -1 is the feature axis (so not allowed), -2 the last
      sequence axis.
    sliding_window: Keras's symmetric band ``|i - j| < sliding_window``.
    use_gate: a sigmoid gate from the query on the attention output.
    flash_attention: None (use a kernel where the backend has one and the
      call allows it), True (force; a clear error where impossible), False
      (never).
    kernel_initializer: Keras name, Keras initializer object or a JAX
      initializer ``(rng, shape, dtype)``. Names and the Keras classes
      jaxmha knows draw from the given key with a built Keras layer's fans
      (:mod:`jaxmha.initializers`); callables draw as they are.
    bias_initializer: Keras name, Keras initializer object or a JAX
      initializer.
    num_key_value_heads: K, key/value heads for grouped-query attention
      (``num_heads % num_key_value_heads == 0``); default ``num_heads``.
    context_parallel_axis: a mesh axis name: the sequence is split over it
      and attention runs as ring attention (:mod:`jaxmha.ring`); call the
      layer inside ``shard_map`` over that axis or under a mesh that has
      it. None: no context parallelism.

  >>> cfg = MHAConfig(num_heads=8, key_dim=64)
  >>> cfg.value_head_dim, cfg.kv_heads
  (64, 8)
  >>> MHAConfig.from_config(cfg.get_config()) == cfg
  True
  >>> MHAConfig(num_heads=0, key_dim=64)
  Traceback (most recent call last):
  ...
  ValueError: Received an invalid value for argument `num_heads`, expected a positive integer. Received: num_heads=0
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
  kernel_initializer: Initializer = "glorot_uniform"
  bias_initializer: Initializer = "zeros"
  num_key_value_heads: Optional[int] = None
  context_parallel_axis: Optional[str] = None

  def __post_init__(self):
    _check_positive_int("num_heads", self.num_heads)
    _check_positive_int("key_dim", self.key_dim)
    _check_positive_int("value_dim", self.value_dim, allow_none=True)
    if (not common.is_real_scalar(self.dropout)
        or not 0.0 <= float(self.dropout) < 1.0):
      raise ValueError(
          "Invalid value for argument `dropout`: expected a float in "
          f"[0, 1). Received: dropout={self.dropout!r}")
    if not isinstance(self.use_bias, (bool, np.bool_)):
      raise TypeError(f"`use_bias` must be a bool. Received: "
                      f"use_bias={self.use_bias!r}")
    if not isinstance(self.use_gate, (bool, np.bool_)):
      raise TypeError(f"`use_gate` must be a bool. Received: "
                      f"use_gate={self.use_gate!r}")
    if self.sliding_window is not None and (
        not is_int(self.sliding_window) or self.sliding_window <= 0):
      raise ValueError(
          "`sliding_window` must be `None` or a positive integer. "
          f"Received: sliding_window={self.sliding_window!r}")
    if self.flash_attention not in (None, True, False):
      raise TypeError("`flash_attention` must be None, True or False. "
                      f"Received: flash_attention={self.flash_attention!r}")
    _check_positive_int("num_key_value_heads", self.num_key_value_heads,
                        allow_none=True)
    if self.num_key_value_heads is not None and (
        self.num_heads % self.num_key_value_heads):
      raise ValueError(
          "`num_heads` must be divisible by `num_key_value_heads`. Received: "
          f"num_heads={self.num_heads}, "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.context_parallel_axis is not None and not isinstance(
        self.context_parallel_axis, str):
      raise TypeError(
          "`context_parallel_axis` must be None or a mesh axis name (str). "
          f"Received: context_parallel_axis={self.context_parallel_axis!r}")
    for name in ("kernel_initializer", "bias_initializer"):
      value = getattr(self, name)
      if not (isinstance(value, str) or callable(value)):
        raise TypeError(
            f"`{name}` must be a Keras initializer name or a callable "
            f"(rng, shape, dtype). Received: {name}={value!r}")
      from jaxmha import initializers  # pylint: disable=g-import-not-at-top
      # Raises ValueError for unknown names.
      object.__setattr__(self, name, initializers.canonical(value, name))
    # Canonical forms, so equal configs hash equal.
    for name in ("num_heads", "key_dim", "value_dim", "sliding_window",
                 "num_key_value_heads"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, int(getattr(self, name)))
    object.__setattr__(self, "dropout", float(self.dropout))
    object.__setattr__(self, "use_bias", bool(self.use_bias))
    object.__setattr__(self, "use_gate", bool(self.use_gate))
    object.__setattr__(self, "output_shape",
                       _normalize_output_shape(self.output_shape))
    object.__setattr__(self, "attention_axes",
                       _normalize_attention_axes(self.attention_axes))

  @property
  def value_head_dim(self) -> int:
    """Hv: ``value_dim``, or ``key_dim`` when None (as Keras)."""
    return self.value_dim if self.value_dim else self.key_dim

  @property
  def min_input_rank(self) -> int:
    """The smallest input rank ``attention_axes`` fit: 3, or more for
    axes past the first (axis ``a >= 0`` needs ``a + 2``; ``a < 0``, which
    counts from the feature axis at -1, needs ``1 - a``)."""
    rank = 3
    for a in self.attention_axes or ():
      rank = max(rank, a + 2 if a >= 0 else 1 - a)
    return rank

  @property
  def kv_heads(self) -> int:
    """K: key/value heads (``num_heads`` unless grouped-query)."""
    return self.num_key_value_heads or self.num_heads

  def get_config(self) -> dict:
    """A plain dict of the constructor arguments (Keras's ``get_config``);
    a Keras initializer with arguments in Keras's serialized form, so that
    a config of names and Keras initializers is JSON."""
    from jaxmha import initializers  # pylint: disable=g-import-not-at-top
    config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for name in ("kernel_initializer", "bias_initializer"):
      if isinstance(config[name], initializers.KerasInitializer):
        config[name] = config[name].get_config()
    return config

  @classmethod
  def from_config(cls, config: dict) -> "MHAConfig":
    """The inverse of :meth:`get_config`; also takes a Keras layer's
    ``get_config()``: Keras-only keys are ignored, and serialized Keras
    initializers become names (at their default arguments) or
    ``jaxmha.initializers.KerasInitializer``s."""
    from jaxmha import initializers  # pylint: disable=g-import-not-at-top
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in names}
    for name in ("kernel_initializer", "bias_initializer"):
      if isinstance(kwargs.get(name), dict):
        kwargs[name] = initializers.from_keras_config(name, kwargs[name])
    return cls(**kwargs)

  def replace(self, **changes) -> "MHAConfig":
    return dataclasses.replace(self, **changes)
