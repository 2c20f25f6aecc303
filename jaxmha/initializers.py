"""Keras's initializers, drawn with JAX: ``init(rng, shape, dtype)``.

Shape letters: D input features, N heads, H head dim, E output features.

Fans are those of Keras's ``EinsumDense`` (Keras >= 3.15), which gives its
variance-scaling initializers the kernel's input and output axes: the query
kernel ``(D, N, H)`` has ``fan_in = D`` and ``fan_out = N * H``, the output
kernel ``(N, H, *E)`` has ``fan_in = N * H`` and ``fan_out = prod(E)``.
``jaxmha.init_params`` and the modules pass the same axes
(:func:`for_kernel`), so initial weights have the distributions of a built
Keras layer. Without axes, fans follow Keras's rule for any shape (the last
two dims, times the others as a receptive field).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.nn import initializers as jinit

InitializerFn = Callable[[jax.Array, tuple, Any], jax.Array]

# (scale, mode, distribution) of the variance-scaling classes without
# arguments of their own.
_FIXED_VARIANCE_SCALING = {
    "glorot_uniform": (1.0, "fan_avg", "uniform"),
    "glorot_normal": (1.0, "fan_avg", "truncated_normal"),
    "he_uniform": (2.0, "fan_in", "uniform"),
    "he_normal": (2.0, "fan_in", "truncated_normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    "lecun_normal": (1.0, "fan_in", "truncated_normal"),
}
_AXES = {"input_axes": None, "output_axes": None}
# Every class's arguments (its seed aside) and Keras's defaults for them.
_DEFAULT_ARGS: dict[str, dict[str, Any]] = {
    **{name: dict(_AXES) for name in _FIXED_VARIANCE_SCALING},
    "variance_scaling": {"scale": 1.0, "mode": "fan_in",
                         "distribution": "truncated_normal", **_AXES},
    "random_normal": {"mean": 0.0, "stddev": 0.05},
    "random_uniform": {"minval": -0.05, "maxval": 0.05},
    "truncated_normal": {"mean": 0.0, "stddev": 0.05},
    "constant": {"value": 0.0},
    "zeros": {},
    "ones": {},
    "orthogonal": {"gain": 1.0},
    "identity": {"gain": 1.0},
}
_ALIASES = {"zero": "zeros", "one": "ones", "normal": "random_normal",
            "uniform": "random_uniform"}
_MODES = ("fan_in", "fan_out", "fan_avg")
_DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")
# The standard deviation of a standard normal truncated to [-2, 2]: Keras
# divides by it so that truncated draws keep the intended variance.
_TRUNCATED_STDDEV = 0.87962566103423978


def compute_fans(shape, input_axes=None, output_axes=None) -> tuple[int, int]:
  """Keras's ``compute_fans``: ``(fan_in, fan_out)`` for a kernel shape.

  With ``input_axes`` and ``output_axes`` (as ``EinsumDense`` gives them),
  the products of those dims; else the last two dims, each times the
  product of the others (a convolution's receptive field).

  >>> compute_fans((64, 8, 32), input_axes=(0,), output_axes=(1, 2))
  (64, 256)
  >>> compute_fans((64, 8, 32))
  (512, 2048)
  """
  shape = tuple(int(d) for d in shape)
  if input_axes is not None and output_axes is not None:
    return (math.prod(shape[a] for a in input_axes),
            math.prod(shape[a] for a in output_axes))
  if not shape:
    return 1, 1
  if len(shape) == 1:
    return shape[0], shape[0]
  receptive_field = math.prod(shape[:-2])
  return shape[-2] * receptive_field, shape[-1] * receptive_field


def _as_hashable(value):
  if isinstance(value, (list, tuple)):
    return tuple(_as_hashable(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class KerasInitializer:
  """A Keras initializer class and its arguments, drawn with JAX.

  A JAX initializer ``init(rng, shape, dtype)``, frozen and hashable, so
  configs holding one compare and hash by value. Variance-scaling ones also
  take the kernel's ``input_axes`` and ``output_axes`` as keywords (as
  Keras's ``EinsumDense`` passes them); axes set in ``args`` win, as in
  Keras.

  Attributes:
    name: Keras's snake-case name: ``"glorot_uniform"``,
      ``"variance_scaling"``, ``"random_normal"``, ``"constant"``, ...
    args: the arguments that differ from Keras's defaults, as sorted
      ``(name, value)`` pairs; given as a dict or pairs.

  >>> init = KerasInitializer("random_normal", {"stddev": 2.0})
  >>> init == KerasInitializer("random_normal", (("stddev", 2.0),
  ...                                            ("mean", 0.0)))
  True
  >>> init(jax.random.key(0), (2, 3)).shape
  (2, 3)
  """

  name: str
  args: Any = ()

  def __post_init__(self):
    name = _canonical_name(self.name)
    given = dict(self.args)
    defaults = _DEFAULT_ARGS[name]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
      raise ValueError(
          f"Unknown arguments {unknown} for the {name!r} initializer; it "
          f"takes {sorted(defaults)}.")
    args = {k: _as_hashable(v) for k, v in given.items()
            if v != defaults[k]}
    merged = {**defaults, **args}
    if name == "variance_scaling":
      if not (isinstance(merged["scale"], (int, float))
              and merged["scale"] > 0):
        raise ValueError("`scale` must be a positive float; got "
                         f"scale={merged['scale']!r}.")
      if merged["mode"] not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}; got "
                         f"mode={merged['mode']!r}.")
      if merged["distribution"] not in _DISTRIBUTIONS:
        raise ValueError(f"`distribution` must be one of {_DISTRIBUTIONS}; "
                         f"got distribution={merged['distribution']!r}.")
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "args", tuple(sorted(args.items())))

  @property
  def arguments(self) -> dict[str, Any]:
    """All of the class's arguments: Keras's defaults updated by ``args``."""
    return {**_DEFAULT_ARGS[self.name], **dict(self.args)}

  @property
  def keras_class_name(self) -> str:
    """Keras's class name: ``"GlorotUniform"``, ``"RandomNormal"``, ..."""
    return "".join(part.capitalize() for part in self.name.split("_"))

  def get_config(self) -> dict:
    """Keras's serialized form, ``{"class_name": ..., "config": ...}``."""
    return {"class_name": self.keras_class_name, "config": self.arguments}

  def __call__(self, rng, shape, dtype=jnp.float32, *,
               input_axes: Optional[tuple[int, ...]] = None,
               output_axes: Optional[tuple[int, ...]] = None):
    shape = tuple(int(d) for d in shape)
    a = self.arguments
    if self.name in _FIXED_VARIANCE_SCALING or self.name == "variance_scaling":
      if self.name == "variance_scaling":
        scale, mode, distribution = a["scale"], a["mode"], a["distribution"]
      else:
        scale, mode, distribution = _FIXED_VARIANCE_SCALING[self.name]
      if a["input_axes"] is not None and a["output_axes"] is not None:
        input_axes, output_axes = a["input_axes"], a["output_axes"]
      return _variance_scaling(rng, shape, dtype, scale, mode, distribution,
                               compute_fans(shape, input_axes, output_axes))
    if self.name == "random_normal":
      return a["mean"] + a["stddev"] * jax.random.normal(rng, shape, dtype)
    if self.name == "random_uniform":
      return jax.random.uniform(rng, shape, dtype, a["minval"], a["maxval"])
    if self.name == "truncated_normal":
      # Keras truncates at two standard deviations.
      return a["mean"] + a["stddev"] * jax.random.truncated_normal(
          rng, -2.0, 2.0, shape, dtype)
    if self.name in ("constant", "zeros", "ones"):
      value = {"zeros": 0.0, "ones": 1.0}.get(self.name, a.get("value"))
      return jnp.full(shape, value, dtype)
    if self.name == "orthogonal":
      if len(shape) < 2:
        raise ValueError(f"The 'orthogonal' initializer needs a kernel of "
                         f"rank >= 2; got shape={shape}.")
      # Orthogonal over (prod(shape[:-1]), shape[-1]), as in Keras.
      return a["gain"] * jinit.orthogonal(column_axis=-1)(rng, shape, dtype)
    if len(shape) != 2:
      raise ValueError(f"The 'identity' initializer needs a 2-D kernel; got "
                       f"shape={shape}.")
    return a["gain"] * jnp.eye(*shape, dtype=dtype)


def _variance_scaling(rng, shape, dtype, scale: float, mode: str,
                      distribution: str, fans: tuple[int, int]):
  fan_in, fan_out = fans
  n = {"fan_in": fan_in, "fan_out": fan_out,
       "fan_avg": (fan_in + fan_out) / 2.0}[mode]
  variance = scale / max(1.0, n)
  if distribution == "uniform":
    limit = (3.0 * variance) ** 0.5
    return jax.random.uniform(rng, shape, dtype, -limit, limit)
  if distribution == "untruncated_normal":
    return variance ** 0.5 * jax.random.normal(rng, shape, dtype)
  stddev = variance ** 0.5 / _TRUNCATED_STDDEV
  return stddev * jax.random.truncated_normal(rng, -2.0, 2.0, shape, dtype)


def _snake(name: str) -> str:
  return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _canonical_name(identifier: str) -> str:
  """A Keras name (``"glorot_uniform"``, ``"GlorotUniform"``, an alias such
  as ``"normal"``) -> its snake-case class name; ValueError if unknown."""
  name = _snake(identifier) if identifier[:1].isupper() else identifier
  name = _ALIASES.get(name, name)
  if name not in _DEFAULT_ARGS:
    raise ValueError(f"Unknown initializer: {identifier!r}. Known: "
                     f"{', '.join(names())}, or a callable (rng, shape, "
                     "dtype).")
  return name


def canonical(identifier, name: str = "initializer"):
  """The form a config keeps: a name as Keras's snake-case class name
  (``"GlorotUniform"`` and ``"glorot_uniform"`` are one initializer, as
  are the aliases ``"normal"`` and ``"random_normal"``); a Keras
  initializer object as :func:`from_keras_object` gives it (``name`` is
  the argument it came in); any other callable as given."""
  if isinstance(identifier, str):
    return _canonical_name(identifier)
  if is_keras_object(identifier):
    return from_keras_object(name, identifier)
  return identifier


def is_keras_object(value) -> bool:
  """Whether ``value`` is a Keras initializer object (Keras not imported)."""
  return (type(value).__module__.split(".")[0] == "keras"
          and callable(getattr(value, "get_config", None)))


def from_keras_object(name: str, initializer):
  """A Keras initializer object -> jaxmha's form: a name (Keras's default
  arguments), a :class:`KerasInitializer` (a class jaxmha knows, other
  arguments), or, for a class jaxmha does not know, a callable that calls
  it. ``name`` is the argument it came in, for errors."""
  config = dict(initializer.get_config())
  if "gain" not in config and hasattr(initializer, "gain"):
    config["gain"] = initializer.gain  # Identity's, not in its get_config
  try:
    return from_keras(name, type(initializer).__name__, config)
  except ValueError:
    pass

  # Keep an unknown class's draws exactly. Keras draws from its own seed,
  # so `rng` is unused: every kernel re-initialised from the cfg is the
  # same draw.
  def init(rng, shape, dtype=jnp.float32):
    del rng
    return jnp.asarray(initializer(shape), dtype)
  init.keras_initializer = initializer  # to_keras hands it back to Keras
  return init


def from_keras(name: str, class_name: str, config: dict):
  """The jaxmha form of a Keras initializer, from its class name and
  arguments: a name if they are Keras's defaults, else a
  :class:`KerasInitializer`. The seed is dropped: jaxmha draws from the
  ``rng`` it is given.

  Raises:
    ValueError: a class jaxmha does not know (``name`` is the argument).
  """
  known = _snake(class_name)
  known = {"identity_initializer": "identity"}.get(known, known)
  if known not in _DEFAULT_ARGS:
    raise ValueError(
        f"`{name}`: jaxmha has no Keras initializer {class_name!r}; it "
        f"knows {', '.join(sorted(_DEFAULT_ARGS))}. Pass a callable (rng, "
        "shape, dtype) instead.")
  args = {k: v for k, v in config.items() if k != "seed"}
  init = KerasInitializer(known, args)
  return init.name if not init.args else init


def from_keras_config(name: str, serialized: dict):
  """The jaxmha form of a serialized Keras initializer (the dict that
  ``layer.get_config()`` holds): see :func:`from_keras`.

  >>> from_keras_config("kernel_initializer",
  ...                   {"class_name": "GlorotUniform",
  ...                    "config": {"seed": None}})
  'glorot_uniform'
  >>> from_keras_config("kernel_initializer",
  ...                   {"class_name": "RandomNormal",
  ...                    "config": {"seed": None, "stddev": 0.3}})
  KerasInitializer(name='random_normal', args=(('stddev', 0.3),))
  """
  class_name = serialized.get("class_name")
  if not isinstance(class_name, str):
    raise ValueError(f"`{name}`={serialized!r} is not a serialized Keras "
                     "initializer (no 'class_name').")
  return from_keras(name, class_name, serialized.get("config") or {})


def names() -> tuple[str, ...]:
  """The Keras initializer names that :func:`get` knows."""
  return tuple(sorted(_DEFAULT_ARGS)) + tuple(sorted(_ALIASES))


def get(identifier) -> InitializerFn:
  """The JAX initializer for a Keras name (``"glorot_uniform"``,
  ``"GlorotUniform"``), a Keras initializer object (see
  :func:`from_keras_object`) or a callable ``(rng, shape, dtype)``.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
    TypeError: neither a string nor a callable.

  >>> init = get("glorot_uniform")
  >>> init(jax.random.key(0), (16, 4, 8), jnp.float32).shape
  (16, 4, 8)
  """
  if is_keras_object(identifier):
    return from_keras_object("initializer", identifier)
  if callable(identifier):
    return identifier
  if not isinstance(identifier, str):
    raise TypeError(f"An initializer must be a Keras name or a callable "
                    f"(rng, shape, dtype); got {identifier!r}.")
  return KerasInitializer(identifier)


def for_kernel(init: InitializerFn, num_input_axes: int,
               ndim: int) -> InitializerFn:
  """``init`` for a kernel of rank ``ndim`` whose first ``num_input_axes``
  dims contract with the input (the rest are its output axes), as
  ``EinsumDense`` reads them off its equation: a :class:`KerasInitializer`
  is given those axes; other callables draw as they are.

  >>> for_kernel(get("glorot_uniform"), 2, 4).keywords
  {'input_axes': (0, 1), 'output_axes': (2, 3)}
  """
  if not isinstance(init, KerasInitializer):
    return init
  return functools.partial(init, input_axes=tuple(range(num_input_axes)),
                           output_axes=tuple(range(num_input_axes, ndim)))
