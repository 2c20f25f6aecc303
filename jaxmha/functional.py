"""The functional core: ``init_params`` and ``apply``, Keras's MHA as pure
functions.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H key head dim, Hv value head dim, D query features,
Dk key features, Dv value features, E output features.

``params`` is a plain nested dict in Keras's layout, identical to the Flax
module's ``"params"`` collection:

==================== ========================== ==================
key                  kernel                     bias
==================== ========================== ==================
``query``            ``(D, N, H)``              ``(N, H)``
``key``              ``(Dk, K, H)``             ``(K, H)``
``value``            ``(Dv, K, Hv)``            ``(K, Hv)``
``attention_output`` ``(N, Hv, *E)``            ``E``
``gate``             ``(D, N, Hv)``             ``(N, Hv)``
==================== ========================== ==================

(``gate`` only with ``use_gate``; no ``bias`` with ``use_bias=False``.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxmha import dispatch
from jaxmha import equations
from jaxmha import initializers
from jaxmha import masks as masks_lib
from jaxmha import ring
from jaxmha.config import MHAConfig, is_int
from pallas_kernels import common
from pallas_kernels import dropout as dropout_lib
from pallas_kernels import partitioning

Params = dict


def _check_cfg(cfg) -> None:
  if not isinstance(cfg, MHAConfig):
    raise TypeError(f"`cfg` must be a jaxmha.MHAConfig; got "
                    f"{type(cfg).__name__}.")


def _shape(name: str, shape) -> tuple:
  """``shape`` as a tuple of ints and ``jax.export`` symbolic dims (always
  positive), checked."""
  try:
    dims = tuple(shape)
  except TypeError:
    dims = None
  if dims is None or not all(is_int(d) or jax.export.is_symbolic_dim(d)
                             for d in dims):
    raise TypeError(f"`{name}` must be a shape (a tuple of ints, or "
                    f"jax.export symbolic dims); got {shape!r}.")
  shape = tuple(int(d) if is_int(d) else d for d in dims)
  if len(shape) < 3:
    raise ValueError(f"`{name}` must have rank >= 3, (B, T, features) or "
                     f"(B, ..., features); got {name}={shape}.")
  if any(is_int(d) and d <= 0 for d in shape):
    raise ValueError(f"`{name}` has a non-positive dim: {name}={shape}.")
  return shape


def _check_shapes(cfg: MHAConfig, query_shape, value_shape, key_shape):
  """Keras's rules on the three input shapes; returns them normalised."""
  query_shape = _shape("query_shape", query_shape)
  value_shape = _shape("value_shape", value_shape)
  key_shape = value_shape if key_shape is None else _shape("key_shape",
                                                           key_shape)
  if value_shape[1:-1] != key_shape[1:-1] or value_shape[0] != key_shape[0]:
    raise ValueError(
        "All dimensions of `value` and `key`, except the last one, must be "
        f"equal. Received: value_shape={value_shape} and "
        f"key_shape={key_shape}")
  if len(value_shape) != len(query_shape):
    raise ValueError(
        f"`query` and `value` must have the same rank; got "
        f"query_shape={query_shape} and value_shape={value_shape}.")
  if query_shape[0] != value_shape[0]:
    raise ValueError(
        f"`query` and `value` must have the same batch size; got "
        f"query_shape={query_shape} and value_shape={value_shape}.")
  axes = equations.normalize_attention_axes(cfg.attention_axes,
                                            len(query_shape))
  for a in range(1, len(query_shape) - 1):
    if a not in axes and query_shape[a] != value_shape[a]:
      raise ValueError(
          f"Axis {a} is not an attention axis (attention_axes={axes}), so "
          f"`query` and `value` must agree on it; got "
          f"query_shape={query_shape} and value_shape={value_shape}.")
  return query_shape, value_shape, key_shape, axes


def param_shapes(cfg: MHAConfig, query_shape, value_shape,
                 key_shape=None) -> dict:
  """The params tree's shapes, ``{name: {"kernel": shape, "bias": shape}}``.

  >>> cfg = MHAConfig(num_heads=2, key_dim=4, output_shape=(3, 5))
  >>> param_shapes(cfg, (1, 7, 16), (1, 9, 8))["attention_output"]
  {'kernel': (2, 4, 3, 5), 'bias': (3, 5)}
  """
  _check_cfg(cfg)
  query_shape, value_shape, key_shape, _ = _check_shapes(
      cfg, query_shape, value_shape, key_shape)
  N, K, H, Hv = cfg.num_heads, cfg.kv_heads, cfg.key_dim, cfg.value_head_dim
  E = cfg.output_shape or (query_shape[-1],)
  shapes = {
      "query": ((query_shape[-1], N, H), (N, H)),
      "key": ((key_shape[-1], K, H), (K, H)),
      "value": ((value_shape[-1], K, Hv), (K, Hv)),
  }
  if cfg.use_gate:
    shapes["gate"] = ((query_shape[-1], N, Hv), (N, Hv))
  shapes["attention_output"] = ((N, Hv) + tuple(E), tuple(E))
  return {name: ({"kernel": k, "bias": b} if cfg.use_bias else {"kernel": k})
          for name, (k, b) in shapes.items()}


def kernel_initializer(init, name: str, kernel_shape):
  """``init`` for the kernel of projection ``name``, given the kernel's
  input and output axes as Keras's ``EinsumDense`` reads them: the query,
  key, value and gate kernels ``(D, N, H)`` contract the input's features,
  the output kernel ``(N, Hv, *E)`` its heads and head dims."""
  num_input_axes = 2 if name == "attention_output" else 1
  return initializers.for_kernel(init, num_input_axes, len(kernel_shape))


def init_params(rng, cfg: MHAConfig, query_shape, value_shape,
                key_shape=None, dtype=jnp.float32) -> Params:
  """Fresh parameters with Keras's initializers and shapes.

  Args:
    rng: a PRNG key.
    cfg: the layer's configuration.
    query_shape: ``(B, T, D)`` or ``(B, ..., D)`` (only ``D`` and the rank
      matter).
    value_shape: ``(B, S, Dv)`` or ``(B, ..., Dv)``.
    key_shape: ``(B, S, Dk)``; default ``value_shape``.
    dtype: the parameters' dtype.

  Returns:
    The params dict (see the module docstring for its layout).

  >>> cfg = MHAConfig(num_heads=2, key_dim=4)
  >>> params = init_params(jax.random.key(0), cfg, (1, 5, 16), (1, 7, 16))
  >>> jax.tree.map(jnp.shape, params["query"])
  {'bias': (2, 4), 'kernel': (16, 2, 4)}
  """
  dtype = float_dtype("dtype", dtype)
  rng = dropout_lib.as_key(rng, "rng")
  shapes = param_shapes(cfg, query_shape, value_shape, key_shape)
  kernel_init = initializers.get(cfg.kernel_initializer)
  bias_init = initializers.get(cfg.bias_initializer)
  params = {}
  rngs = jax.random.split(rng, len(shapes))
  for sub_rng, (name, sub) in zip(rngs, shapes.items()):
    k_rng, b_rng = jax.random.split(sub_rng)
    init = kernel_initializer(kernel_init, name, sub["kernel"])
    params[name] = {"kernel": init(k_rng, sub["kernel"], dtype)}
    if "bias" in sub:
      params[name]["bias"] = bias_init(b_rng, sub["bias"], dtype)
  return params


def _check_params(params, cfg: MHAConfig, query, value, key) -> None:
  expected = param_shapes(cfg, query.shape, value.shape, key.shape)
  if not isinstance(params, dict):
    raise TypeError(f"`params` must be a dict; got {type(params).__name__}.")
  for name, sub in params.items():
    for leaf, x in (sub.items() if isinstance(sub, dict) else ()):
      if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`params['{name}']['{leaf}']` must be a floating-point array; "
            f"got {type(x).__name__}"
            + (f" of dtype {x.dtype}." if hasattr(x, "dtype") else "."))
  got = {name: ({leaf: tuple(jnp.shape(x)) for leaf, x in sub.items()}
                if isinstance(sub, dict) else tuple(jnp.shape(sub)))
         for name, sub in params.items()}
  if got != expected:
    raise ValueError(
        "`params` do not fit this configuration and these inputs "
        f"(query.shape={query.shape}, value.shape={value.shape}, "
        f"key.shape={key.shape}): "
        + "; ".join(_param_differences(got, expected)) + ".")


def _param_differences(got: dict, expected: dict) -> list[str]:
  """What differs between two ``{name: {leaf: shape}}`` trees, one phrase
  per entry: ``params['query']['kernel'] has shape (8, 2, 4), expected (6,
  2, 4)``, or an entry missing or not expected."""
  differences = []
  for name in list(expected) + [n for n in got if n not in expected]:
    if name not in got:
      differences.append(f"params[{name!r}] is missing (expected "
                         f"{expected[name]})")
      continue
    if name not in expected:
      differences.append(f"params[{name!r}] is not expected by this "
                         "configuration")
      continue
    sub, want = got[name], expected[name]
    if not isinstance(sub, dict):
      differences.append(f"params[{name!r}] must be a dict like "
                         f"{want}; got an array of shape {sub}")
      continue
    for leaf in list(want) + [l for l in sub if l not in want]:
      where = f"params[{name!r}][{leaf!r}]"
      if leaf not in sub:
        differences.append(f"{where} is missing (expected shape {want[leaf]})")
      elif leaf not in want:
        differences.append(f"{where} is not expected by this configuration"
                           + (" (use_bias=False)" if leaf == "bias" else ""))
      elif sub[leaf] != want[leaf]:
        differences.append(f"{where} has shape {sub[leaf]}, expected "
                           f"{want[leaf]}")
  return differences


def _dense(x, params: dict, equation: str):
  y = jnp.einsum(equation, x, params["kernel"])
  if "bias" in params:
    y = y + params["bias"]
  return y


def _reject_shape_struct(name: str, x):
  """A TypeError for a ``jax.ShapeDtypeStruct`` where an array is needed
  (only :func:`explain` takes shapes in place of arrays)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    raise TypeError(
        f"`{name}` must be an array; got jax.ShapeDtypeStruct(shape="
        f"{x.shape}, dtype={x.dtype}). Only jaxmha.explain takes shapes in "
        "place of arrays.")


def _as_array(name: str, x):
  _reject_shape_struct(name, x)
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    try:
      x = jnp.asarray(x)
    except TypeError:
      raise TypeError(f"`{name}` must be an array; got "
                      f"{type(x).__name__}.") from None
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"`{name}` must be a floating-point array; got "
                    f"{name}.dtype={x.dtype}.")
  return x


def static_flag(name: str, value) -> bool:
  """``value`` as a Python bool, or a TypeError naming ``name`` when it is
  traced: these flags choose the program, so under ``jit`` they are static
  arguments."""
  try:
    return bool(value)
  except jax.errors.ConcretizationTypeError:
    raise TypeError(
        f"`{name}` must be a Python bool, fixed when the call is traced; got "
        f"a traced value. Under jax.jit, mark it static (static_argnames="
        f"['{name}']) or choose between two calls with jax.lax.cond."
    ) from None


def float_dtype(name: str, dtype) -> jnp.dtype:
  """``dtype`` as a floating-point dtype, or a TypeError naming ``name``."""
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"`{name}` must be a floating-point dtype; got "
                    f"{name}={dtype!r}.") from None
  if not jnp.issubdtype(resolved, jnp.floating):
    raise TypeError(f"`{name}` must be a floating-point dtype (float32, "
                    f"bfloat16, float16); got {name}={resolved}.")
  return resolved


def check_module_args(seed, dtype, param_dtype) -> None:
  """The checks the Flax modules share: ``seed`` None or an int, ``dtype``
  None or a float dtype, ``param_dtype`` a float dtype."""
  if seed is not None and (not isinstance(seed, int)
                           or isinstance(seed, bool)):
    raise TypeError(f"`seed` must be None or an int. Received: "
                    f"seed={seed!r}")
  float_dtype("param_dtype", param_dtype)
  if dtype is not None:
    float_dtype("dtype", dtype)


@dataclasses.dataclass(frozen=True)
class _Call:
  """A validated call: projected inputs in the kernel layout."""
  request: dispatch.Request
  layout: equations.AttentionLayout
  gate: Optional[jax.Array]  # (B, ..., N, Hv)
  dtype: Any
  # Each projection's output, for activity regularizers: name -> array.
  projections: Optional[dict] = None


def _prepare_call(params, cfg, query, value, key, *, attention_mask=None,
                  query_mask=None, value_mask=None, key_mask=None,
                  use_causal_mask=False, training=False, dropout_rng=None,
                  return_attention_scores=False, dtype=None,
                  abstract: bool = False) -> _Call:
  _check_cfg(cfg)
  for name, mask in (("attention_mask", attention_mask),
                     ("query_mask", query_mask), ("value_mask", value_mask),
                     ("key_mask", key_mask)):
    _reject_shape_struct(name, mask)
  training = static_flag("training", training)
  use_causal_mask = static_flag("use_causal_mask", use_causal_mask)
  return_attention_scores = static_flag("return_attention_scores",
                                        return_attention_scores)
  query = _as_array("query", query)
  value = _as_array("value", value)
  key = value if key is None else _as_array("key", key)
  query_shape, value_shape, _, axes = _check_shapes(
      cfg, query.shape, value.shape, key.shape)
  if not abstract:
    _check_params(params, cfg, query, value, key)
  if dtype is None:
    leaves = [] if abstract else jax.tree_util.tree_leaves(params)
    dtype = jnp.result_type(query.dtype, value.dtype, key.dtype, *leaves)
  dtype = float_dtype("dtype", dtype)

  N, K, H, Hv = cfg.num_heads, cfg.kv_heads, cfg.key_dim, cfg.value_head_dim
  layout = equations.AttentionLayout(query_dims=query_shape[:-1],
                                     value_dims=value_shape[:-1],
                                     attention_axes=axes)
  gate = None
  if abstract:
    q = jax.ShapeDtypeStruct(query_shape[:-1] + (N, H), dtype)
    k = jax.ShapeDtypeStruct(value_shape[:-1] + (K, H), dtype)
    v = jax.ShapeDtypeStruct(value_shape[:-1] + (K, Hv), dtype)
    q4 = jax.ShapeDtypeStruct((layout.flat_batch, layout.T, N, H), dtype)
    k4 = jax.ShapeDtypeStruct((layout.flat_batch, layout.S, K, H), dtype)
    v4 = jax.ShapeDtypeStruct((layout.flat_batch, layout.S, K, Hv), dtype)
  else:
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
    p = cast(params)
    query, value, key = (x.astype(dtype) for x in (query, value, key))
    if cfg.use_gate:
      gate = jax.nn.sigmoid(_dense(query, p["gate"],
                                   equations.QUERY_PROJECTION))
    q = _dense(query, p["query"], equations.QUERY_PROJECTION)  # (B,..,N,H)
    k = _dense(key, p["key"], equations.QUERY_PROJECTION)  # (B,..,K,H)
    v = _dense(value, p["value"], equations.QUERY_PROJECTION)  # (B,..,K,Hv)
    q4 = layout.queries(q)  # (B*, T, N, H)
    k4 = layout.keys(k)  # (B*, S, K, H)
    v4 = layout.keys(v)  # (B*, S, K, Hv)

  context_parallel_axis = dispatch.context_parallel_axis(cfg)
  if context_parallel_axis is not None and attention_mask is not None:
    # Refused before its shape is checked against the local blocks.
    raise dispatch.ring_refusal(context_parallel_axis,
                                ring.ATTENTION_MASK_REFUSAL)
  spec, data = masks_lib.build(
      layout, N, attention_mask=attention_mask, query_mask=query_mask,
      value_mask=value_mask, key_mask=key_mask,
      use_causal_mask=use_causal_mask, sliding_window=cfg.sliding_window)
  dropout_active = bool(training) and cfg.dropout > 0.0
  seeds = None
  if dropout_active:
    if dropout_rng is None:
      raise ValueError(
          f"training=True with dropout={cfg.dropout} needs `dropout_rng` (a "
          "PRNG key, e.g. jax.random.key(0)); got dropout_rng=None.")
    seeds = dropout_lib.seed_words(dropout_rng)
  problem = common.Problem(B=layout.flat_batch, T=layout.T, S=layout.S, N=N,
                           K=K, H=H, Hv=Hv)
  prep = common.Prepared(problem=problem, spec=spec, data=data,
                         scale=1.0 / math.sqrt(H),
                         dropout_rate=cfg.dropout if dropout_active else 0.0,
                         seeds=seeds)
  request = dispatch.Request(
      q=q4, k=k4, v=v4, prep=prep, need_probs=bool(return_attention_scores),
      flash=dispatch.effective_flash_preference(cfg.flash_attention),
      platform=jax.default_backend(),
      context_parallel_axis=context_parallel_axis)
  projections = None if abstract else {"query": q, "key": k, "value": v}
  if gate is not None:
    projections["gate"] = gate
  return _Call(request=request, layout=layout, gate=gate, dtype=dtype,
               projections=projections)


def apply(params: Params, cfg: MHAConfig, query, value, key=None, *,
          attention_mask=None, query_mask=None, value_mask=None,
          key_mask=None, use_causal_mask: bool = False,
          training: bool = False, dropout_rng=None,
          return_attention_scores: bool = False, dtype=None, cache=None,
          new_lengths=None):
  """Multi-head attention, Keras's ``MultiHeadAttention.call`` as a function.

  Args:
    params: the params dict (from :func:`init_params`, the Flax module or
      :func:`jaxmha.from_keras`).
    cfg: the layer's configuration.
    query: ``(B, T, D)``, or ``(B, ..., D)`` with ``attention_axes``.
    value: ``(B, S, Dv)``.
    key: ``(B, S, Dk)``; default ``value``.
    attention_mask: ``(B, T, S)`` or ``(B, N, T, S)``, broadcastable; True
      = may attend.
    query_mask: ``(B, T)``; False rows attend nothing (zero context).
    value_mask: ``(B, S)``; False keys are padding.
    key_mask: ``(B, S)``; ANDed with ``value_mask``.
    use_causal_mask: query ``i`` attends keys ``j <= i`` (top-left).
    training: apply dropout (when ``cfg.dropout > 0``).
    dropout_rng: PRNG key for dropout; required when it applies.
    return_attention_scores: also return the ``(B, N, T, S)`` probabilities
      (post softmax, pre dropout).
    dtype: computation dtype; default the promoted dtype of the inputs and
      params. Logits and softmax are float32 whatever it is.
    cache: a :class:`jaxmha.decode.KVCache` (from :func:`jaxmha.init_cache`)
      for causal decoding: ``query``/``value`` are the ``t`` new tokens,
      written at each example's length and attended with everything cached
      (see :mod:`jaxmha.decode` for masks and the full-cache rule). An
      inference path: ``jax.grad`` of a cached call fails with JAX's
      "Reverse-mode differentiation does not work for lax.while_loop"
      (its loop skips the chunks that hold no keys); train without it.
    new_lengths: with ``cache``, ``(B,)`` int, how many of the ``t`` new
      tokens are real per example (ragged prefill); default all.

  Returns:
    ``attention_output (B, T, *E)``, or ``(attention_output, scores)``; with
    ``cache``, ``(attention_output, updated_cache)``.

  Raises:
    ValueError, TypeError: bad inputs, naming the argument and the shapes.
    UnsupportedCallError: (a ValueError) ``flash_attention=True``, or a
      context-parallel or cached call, that its path cannot serve.

  >>> cfg = MHAConfig(num_heads=2, key_dim=4)
  >>> x = jnp.ones((1, 5, 16))
  >>> params = init_params(jax.random.key(0), cfg, x.shape, x.shape)
  >>> out, scores = apply(params, cfg, x, x, use_causal_mask=True,
  ...                     return_attention_scores=True)
  >>> out.shape, scores.shape
  ((1, 5, 16), (1, 2, 5, 5))
  """
  output, scores, _, *new_cache = apply_with_projections(
      params, cfg, query, value, key, attention_mask=attention_mask,
      query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
      use_causal_mask=use_causal_mask, training=training,
      dropout_rng=dropout_rng,
      return_attention_scores=return_attention_scores, dtype=dtype,
      cache=cache, new_lengths=new_lengths)
  if cache is not None:
    return output, new_cache[0]
  return (output, scores) if return_attention_scores else output


def apply_with_projections(params: Params, cfg: MHAConfig, query, value,
                           key=None, *, cache=None, new_lengths=None,
                           **kwargs):
  """:func:`apply`, also returning each projection's output.

  Returns:
    ``(output, scores or None, projections)``, where ``projections`` maps
    ``"query"``, ``"key"``, ``"value"``, ``"gate"`` and
    ``"attention_output"`` to that projection's output (what Keras's
    activity regularizers see). With ``cache``, a fourth element: the
    updated cache (the decode path, :mod:`jaxmha.decode`).

  Under a mesh with Explicit axes (``jax.make_mesh``'s default), a call
  runs with those axes made Auto (``jax.sharding.auto_axes``), so XLA's
  propagation places its internals (as under an Auto mesh; ring attention
  then runs manual over its sequence axis alone, its kernels split over
  the others). The results keep their input's sharding on the
  batch and query dims (the query's for the output and scores, each
  input's for its projection), none on heads and features; the updated
  cache keeps the cache's.
  """
  operands = (params, query, value, key, cache, new_lengths, kwargs)
  explicit = partitioning.explicit_mesh(operands)
  out_specs = explicit and _explicit_out_specs(cfg, *operands)
  if out_specs is not None:

    def body(params, query, value, key, cache, new_lengths, kwargs):
      return apply_with_projections(params, cfg, query, value, key,
                                    cache=cache, new_lengths=new_lengths,
                                    **kwargs)

    return partitioning.call_with_auto_axes(body, *explicit, out_specs,
                                            *operands)
  if cache is not None:
    from jaxmha import decode  # pylint: disable=g-import-not-at-top
    return decode.apply_with_projections(params, cfg, query, value, key,
                                         cache=cache, new_lengths=new_lengths,
                                         **kwargs)
  if new_lengths is not None:
    raise ValueError("`new_lengths` needs a `cache` (jaxmha.init_cache); got "
                     "cache=None.")
  call = _prepare_call(params, cfg, query, value, key, **kwargs)
  out4, probs, _ = dispatch.attend(call.request)  # (B*, T, N, Hv)
  context = call.layout.context(out4.astype(call.dtype))  # (B, ..., N, Hv)
  if call.gate is not None:
    context = context * call.gate
  p_out = jax.tree.map(lambda x: jnp.asarray(x, call.dtype),
                       params["attention_output"])
  E_rank = p_out["kernel"].ndim - 2
  output = _dense(context, p_out, equations.output_projection(E_rank))
  projections = dict(call.projections, attention_output=output)
  scores = None
  if probs is not None:
    scores = call.layout.scores(probs.astype(call.dtype))
  return output, scores, projections


def _explicit_out_specs(cfg, params, query, value, key, cache, new_lengths,
                        kwargs):
  """The specs of :func:`apply_with_projections`' results under Explicit
  mesh axes (see there); None for invalid inputs (the call says why)."""
  del params, new_lengths
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  spec = partitioning.type_spec
  try:
    q = spec(query)  # (B, ..., D)
    v = spec(value)
    k = v if key is None else spec(key)
    out = P(*q[:-1])  # (B, ..., *E): trailing dims unsharded
    projections = {"query": out, "key": P(*k[:-1]), "value": P(*v[:-1]),
                   "attention_output": out}
    if cfg.use_gate:
      projections["gate"] = out
    if cache is not None:
      cache_specs = jax.tree.map(lambda x: P(*spec(x)), cache)
      return out, None, projections, cache_specs
    scores = None
    if kwargs.get("return_attention_scores"):
      _, _, _, axes = _check_shapes(cfg, query.shape, value.shape,
                                    None if key is None else key.shape)
      other = [a for a in range(1, len(q) - 1) if a not in axes]
      # (B, *other, N, *attn_T, *attn_S)
      scores = P(q[0], *(q[a] for a in other), None, *(q[a] for a in axes))
    return out, scores, projections
  except (TypeError, ValueError, AttributeError, IndexError):
    return None


def explain(cfg: MHAConfig, query, value, key=None, *, attention_mask=None,
            query_mask=None, value_mask=None, key_mask=None,
            use_causal_mask: bool = False, training: bool = False,
            dropout_rng=None, return_attention_scores: bool = False,
            dtype=None) -> dispatch.Explanation:
  """Which attention path a call of :func:`apply` takes, and why.

  Takes ``apply``'s arguments without ``params``; ``query``, ``value`` and
  ``key`` and the masks may be arrays (or nested lists) or
  ``jax.ShapeDtypeStruct``.
  Calls with a ``cache`` always take the decode path (:mod:`jaxmha.decode`),
  so ``cache`` is not an argument here.

  >>> cfg = MHAConfig(num_heads=2, key_dim=4)
  >>> x = jax.ShapeDtypeStruct((1, 5, 16), jnp.float32)
  >>> print(explain(cfg, x, x, return_attention_scores=True))  # on CPU
  path: xla
    flash refused: return_attention_scores=True needs the (B, N, T, S) scores, which flash kernels never materialise
    xla_blockwise refused: return_attention_scores=True needs the (B, N, T, S) scores, which the blockwise path never materialises
  """
  if dropout_rng is None and training and cfg.dropout > 0:
    dropout_rng = jax.random.key(0)  # only shapes matter here
  given = dict(query=query, value=value, key=key,
               attention_mask=attention_mask, query_mask=query_mask,
               value_mask=value_mask, key_mask=key_mask)
  # Shapes are traced as arrays of their shape; all else is used as given.
  shapes = {name: x for name, x in given.items()
            if isinstance(x, jax.ShapeDtypeStruct)}
  explanations = []

  def choose(traced):
    a = {**given, **traced}
    call = _prepare_call(
        None, cfg, a["query"], a["value"], a["key"],
        attention_mask=a["attention_mask"], query_mask=a["query_mask"],
        value_mask=a["value_mask"], key_mask=a["key_mask"],
        use_causal_mask=use_causal_mask, training=training,
        dropout_rng=dropout_rng,
        return_attention_scores=return_attention_scores,
        dtype=dtype, abstract=True)
    explanations.append(dispatch.choose(call.request)[1])

  jax.eval_shape(choose, shapes)
  return explanations[0]
