"""Keras 3 (JAX backend) as the ground truth, and an independent NumPy MHA.

Shape letters: B batch, T query length, S key/value length, N heads,
H key head dim, Hv value head dim, D/Dk/Dv input features, E output features.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import jaxmha  # noqa: E402


def make_keras_layer(query, value, key=None, **kwargs):
  """A built Keras MHA and jaxmha's ``(cfg, params)`` copied from it.

  Biases are randomised (Keras initialises them to zero), so that tests
  see them.
  """
  layer = keras.layers.MultiHeadAttention(**kwargs)
  layer(query, value, key, return_attention_scores=True)  # builds
  return copy_built_layer(layer)


def copy_built_layer(layer):
  """``(layer, cfg, params)``: a built Keras attention layer with its biases
  randomised (Keras initialises them to zero, and tests should see them),
  and jaxmha's copy of it."""
  rng = np.random.default_rng(0)
  for w in layer.weights:
    if w.path.endswith("bias"):
      w.assign(rng.normal(size=w.shape).astype("float32") * 0.1)
  cfg, params = jaxmha.from_keras(layer)
  return layer, cfg, params


def keras_call(layer, query, value, key=None, *, attention_mask=None,
               query_mask=None, value_mask=None, key_mask=None,
               use_causal_mask=False):
  """Keras's scores path (``return_attention_scores=True``).

  Keras ignores an explicit ``query_mask`` argument (it reads only the mask
  attached to the query tensor), so the query mask is folded into
  ``attention_mask`` the way Keras itself combines it: ``(B, T, 1)``. A 4-D
  ``attention_mask`` is pre-combined with the padding masks, because Keras
  mis-broadcasts that combination.
  """
  am = None if attention_mask is None else np.asarray(attention_mask, bool)
  pads = []
  if query_mask is not None:
    pads.append(np.asarray(query_mask, bool)[:, :, None])
  if am is not None and am.ndim == 4:
    for m in (value_mask, key_mask):
      if m is not None:
        pads.append(np.asarray(m, bool)[:, None, :])
    value_mask = key_mask = None
    for p in pads:
      am = am & p[:, None]
  else:
    for p in pads:
      am = p if am is None else am & p
  out, scores = layer(query, value, key, attention_mask=am,
                      value_mask=value_mask, key_mask=key_mask,
                      use_causal_mask=use_causal_mask,
                      return_attention_scores=True)
  return np.asarray(out), np.asarray(scores)


def keras_grads(layer, query, value, key=None, cotangent=None, **call_kwargs):
  """Gradients of ``sum(out * cotangent)`` w.r.t. Keras's weights and inputs.

  Returns:
    ``(param_grads, input_grads)``: a jaxmha-shaped params tree and a tuple
    ``(d_query, d_value[, d_key])``.
  """
  trainable = [v.value for v in layer.trainable_variables]
  names = [tuple(v.path.split("/")[-2:]) for v in layer.trainable_variables]
  inputs = (query, value) if key is None else (query, value, key)

  def loss(weights, *inputs):
    q, v = inputs[0], inputs[1]
    k = inputs[2] if len(inputs) > 2 else None
    (out, _), _ = layer.stateless_call(weights, [], q, v, k,
                                       return_attention_scores=True,
                                       **call_kwargs)
    return (out * cotangent).sum()

  grads = jax.grad(loss, argnums=tuple(range(len(inputs) + 1)))(
      trainable, *inputs)
  params = {}
  for (sub, leaf), g in zip(names, grads[0]):
    params.setdefault(sub, {})[leaf] = np.asarray(g)
  return params, tuple(np.asarray(g) for g in grads[1:])


def assert_grads_close(grads, expected_params, expected_inputs):
  """``grads = (param_grads, *input_grads)`` against :func:`keras_grads`."""
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4,
                                                       rtol=1e-4),
               grads[0], expected_params)
  assert len(grads) - 1 == len(expected_inputs)
  for g, e in zip(grads[1:], expected_inputs):
    np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-4)


def naive_mha(params, query, value, key, allowed, use_gate=False):
  """Rank-3 MHA in float64 NumPy; ``allowed (B, N|1, T, S)`` bool.

  Empty rows give a zero context (jaxmha's rule).
  """
  f64 = lambda x: np.asarray(x, np.float64)
  p = jax.tree.map(f64, params)

  def dense(x, sub):
    y = np.einsum("btd,dnh->btnh", f64(x), p[sub]["kernel"])
    return y + p[sub]["bias"] if "bias" in p[sub] else y

  q, k, v = dense(query, "query"), dense(key, "key"), dense(value, "value")
  H = q.shape[-1]
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  logits = np.where(allowed, logits, -np.inf)
  with np.errstate(invalid="ignore"):
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = np.nan_to_num(w / w.sum(-1, keepdims=True))
  ctx = np.einsum("bnts,bsnh->btnh", w, v)
  if use_gate:
    ctx = ctx / (1.0 + np.exp(-dense(query, "gate")))
  kernel = p["attention_output"]["kernel"]
  out = np.einsum("btnh,nhe->bte", ctx, kernel.reshape(
      kernel.shape[0], kernel.shape[1], -1))
  out = out.reshape(out.shape[:2] + kernel.shape[2:])
  if "bias" in p["attention_output"]:
    out = out + p["attention_output"]["bias"]
  return out, w
