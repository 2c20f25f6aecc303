"""Keras's initializers by name, as JAX initializers ``(rng, shape, dtype)``.

Fans are computed as Keras computes them for any kernel shape: for a 2-D
``(fan_in, fan_out)`` kernel the obvious ones; for a kernel of shape
``(d_0, ..., d_{r-3}, a, b)`` the receptive field ``d_0 * ... * d_{r-3}``
multiplies ``fan_in = a`` and ``fan_out = b``. So the query kernel
``(D, N, H)`` has ``fan_in = D * N`` and ``fan_out = D * H``, exactly as in
Keras, and initial weights have Keras's distributions.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.nn import initializers as jinit

InitializerFn = Callable[[jax.Array, tuple, Any], jax.Array]


def compute_fans(shape) -> tuple[int, int]:
  """Keras's ``compute_fans``: ``(fan_in, fan_out)`` for a kernel shape."""
  shape = tuple(int(d) for d in shape)
  if not shape:
    return 1, 1
  if len(shape) == 1:
    return shape[0], shape[0]
  receptive_field = 1
  for d in shape[:-2]:
    receptive_field *= d
  return shape[-2] * receptive_field, shape[-1] * receptive_field


def _variance_scaling(scale: float, mode: str, distribution: str):
  """Keras's ``VarianceScaling`` with Keras's fans for any rank."""

  def init(rng, shape, dtype=jnp.float32):
    fan_in, fan_out = compute_fans(shape)
    n = {"fan_in": fan_in, "fan_out": fan_out,
         "fan_avg": (fan_in + fan_out) / 2.0}[mode]
    variance = scale / max(1.0, n)
    if distribution == "uniform":
      limit = (3.0 * variance) ** 0.5
      return jax.random.uniform(rng, shape, dtype, -limit, limit)
    # Truncated at two standard deviations; the constant is the stddev of
    # a standard normal truncated to [-2, 2], as in Keras.
    stddev = variance ** 0.5 / 0.87962566103423978
    return stddev * jax.random.truncated_normal(rng, -2.0, 2.0, shape, dtype)

  return init


def _orthogonal(rng, shape, dtype=jnp.float32):
  if len(shape) < 2:
    raise ValueError(f"The 'orthogonal' initializer needs a kernel of rank "
                     f">= 2; got shape={shape}.")
  return jinit.orthogonal(scale=1.0, column_axis=-1)(rng, shape, dtype)


def _identity(rng, shape, dtype=jnp.float32):
  del rng
  if len(shape) != 2:
    raise ValueError(f"The 'identity' initializer needs a 2-D kernel; got "
                     f"shape={shape}.")
  return jnp.eye(*shape, dtype=dtype)


_REGISTRY: dict[str, Callable[[], InitializerFn]] = {
    "glorot_uniform": lambda: _variance_scaling(1.0, "fan_avg", "uniform"),
    "glorot_normal": lambda: _variance_scaling(1.0, "fan_avg",
                                               "truncated_normal"),
    "he_uniform": lambda: _variance_scaling(2.0, "fan_in", "uniform"),
    "he_normal": lambda: _variance_scaling(2.0, "fan_in", "truncated_normal"),
    "lecun_uniform": lambda: _variance_scaling(1.0, "fan_in", "uniform"),
    "lecun_normal": lambda: _variance_scaling(1.0, "fan_in",
                                              "truncated_normal"),
    "variance_scaling": lambda: _variance_scaling(1.0, "fan_in",
                                                  "truncated_normal"),
    "zeros": lambda: jinit.zeros,
    "ones": lambda: jinit.ones,
    "random_normal": lambda: jinit.normal(stddev=0.05),
    "random_uniform": lambda: (
        lambda rng, shape, dtype=jnp.float32: jax.random.uniform(
            rng, shape, dtype, -0.05, 0.05)),
    "truncated_normal": lambda: jinit.truncated_normal(stddev=0.05),
    "orthogonal": lambda: _orthogonal,
    "identity": lambda: _identity,
}
_ALIASES = {"zero": "zeros", "one": "ones", "normal": "random_normal",
            "uniform": "random_uniform"}


# The arguments of Keras's initializers at their defaults (seed aside): a
# serialized Keras initializer with these is the jaxmha name.
_KERAS_DEFAULT_ARGS = {
    "variance_scaling": {"scale": 1.0, "mode": "fan_in",
                         "distribution": "truncated_normal"},
    "random_normal": {"mean": 0.0, "stddev": 0.05},
    "random_uniform": {"minval": -0.05, "maxval": 0.05},
    "truncated_normal": {"mean": 0.0, "stddev": 0.05},
    "orthogonal": {"gain": 1.0},
    "identity": {"gain": 1.0},
}


def from_keras_config(name: str, serialized: dict) -> str:
  """The jaxmha name of a serialized Keras initializer (the dict that
  ``layer.get_config()`` holds), if it has Keras's default arguments.

  Raises:
    ValueError: an initializer jaxmha has no name for, or other arguments
      (``jaxmha.from_keras(layer)`` keeps those exactly).

  >>> from_keras_config("kernel_initializer",
  ...                   {"class_name": "GlorotUniform",
  ...                    "config": {"seed": None}})
  'glorot_uniform'
  """
  class_name = serialized.get("class_name")
  known = _snake(class_name) if isinstance(class_name, str) else None
  # Arguments left at None (seed, axes) and absent ones are Keras's defaults.
  args = {k: v for k, v in (serialized.get("config") or {}).items()
          if v is not None and k != "seed"}
  defaults = _KERAS_DEFAULT_ARGS.get(known, {})
  if known in _REGISTRY and all(k in defaults and defaults[k] == v
                                for k, v in args.items()):
    return known
  raise ValueError(
      f"`{name}`={serialized!r} is not a Keras initializer at its default "
      "arguments that jaxmha names; pass a name or a callable (rng, shape, "
      "dtype), or take the config from the layer with jaxmha.from_keras, "
      "which keeps Keras's initializer.")


def names() -> tuple[str, ...]:
  """The Keras initializer names that :func:`get` knows."""
  return tuple(sorted(_REGISTRY)) + tuple(sorted(_ALIASES))


def _snake(name: str) -> str:
  return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def get(identifier) -> InitializerFn:
  """The JAX initializer for a Keras name (``"glorot_uniform"``,
  ``"GlorotUniform"``) or a callable ``(rng, shape, dtype)``.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
    TypeError: neither a string nor a callable.

  >>> init = get("glorot_uniform")
  >>> init(jax.random.key(0), (16, 4, 8), jnp.float32).shape
  (16, 4, 8)
  """
  if callable(identifier):
    return identifier
  if not isinstance(identifier, str):
    raise TypeError(f"An initializer must be a Keras name or a callable "
                    f"(rng, shape, dtype); got {identifier!r}.")
  name = _snake(identifier) if identifier[:1].isupper() else identifier
  name = _ALIASES.get(name, name)
  if name not in _REGISTRY:
    raise ValueError(f"Unknown initializer: {identifier!r}. Known: "
                     f"{', '.join(names())}, or a callable (rng, shape, "
                     "dtype).")
  return _REGISTRY[name]()
