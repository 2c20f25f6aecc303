"""Greedy generation with and without a KV cache, from a small causal model.

Shape letters: B batch, T sequence length, P prompt length, L cache
capacity, D model features, V vocabulary size.

Builds a two-layer causal transformer around ``jaxmha.MultiHeadAttention``
(the linen module), trains it for a few steps to continue arithmetic
progressions mod V (``7, 10, 13, ...``), then generates greedily from
ragged prompts twice:

* without a cache: every new token re-runs the model over the whole
  (padded) sequence and reads the logits at the last real position;
* with a cache: one ragged prefill (``new_lengths`` = the prompt lengths),
  then one token per step through the module's ``cache=`` argument (the
  same path as ``jaxmha.apply(..., cache=)``).

It checks that both produce the same tokens and prints the timings.

Run: ``python examples/generate_with_cache.py [--train-steps 150]``.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmha

V = 32  # vocabulary
MAX_LEN = 64  # positions (and cache capacity)


class Block(nn.Module):
  """Pre-norm attention + MLP, with an optional KV cache."""
  num_heads: int = 4
  key_dim: int = 16
  num_key_value_heads: int = 2

  @nn.compact
  def __call__(self, x, cache=None, new_lengths=None):
    """``x (B, T, D)`` -> ``((B, T, D), cache or None)``."""
    attention = jaxmha.MultiHeadAttention(
        num_heads=self.num_heads, key_dim=self.key_dim,
        num_key_value_heads=self.num_key_value_heads, name="attention")
    h = nn.LayerNorm()(x)
    if cache is None:
      a = attention(h, h, use_causal_mask=True)
    else:
      a, cache = attention(h, h, cache=cache, new_lengths=new_lengths)
    x = x + a
    h = nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(h)), cache


class TinyLM(nn.Module):
  """Token + position embeddings, ``num_layers`` blocks, logits over V."""
  d_model: int = 64
  num_layers: int = 2

  @nn.compact
  def __call__(self, tokens, caches: Optional[Sequence] = None,
               new_lengths=None):
    """``tokens (B, T)`` -> ``(logits (B, T, V), caches or None)``.

    With ``caches`` (one :class:`jaxmha.KVCache` per layer), ``tokens`` are
    the new tokens and positions continue from the caches' lengths.
    """
    B, T = tokens.shape
    start = (jnp.zeros((B,), jnp.int32) if caches is None
             else caches[0].lengths)
    positions = jnp.minimum(start[:, None] + jnp.arange(T), MAX_LEN - 1)
    x = (nn.Embed(V, self.d_model)(tokens)
         + nn.Embed(MAX_LEN, self.d_model)(positions))  # (B, T, D)
    new_caches = []
    for i in range(self.num_layers):
      x, cache = Block(name=f"block_{i}")(
          x, None if caches is None else caches[i], new_lengths)
      new_caches.append(cache)
    logits = nn.Dense(V)(nn.LayerNorm()(x))  # (B, T, V)
    return logits, (None if caches is None else tuple(new_caches))


def progressions(rng, B: int, T: int):
  """``(B, T)`` sequences ``start + step * i`` mod V, step in 1..3."""
  rng_a, rng_b = jax.random.split(rng)
  start = jax.random.randint(rng_a, (B, 1), 0, V)
  step = jax.random.randint(rng_b, (B, 1), 1, 4)
  return (start + step * jnp.arange(T)) % V


def train(model: TinyLM, steps: int, seed: int = 0):
  """A few Adam steps of next-token prediction; returns the params."""
  rng = jax.random.key(seed)
  params = model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    tokens = progressions(rng, 32, 49)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, tokens[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  loss = jnp.nan
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state,
                                   jax.random.fold_in(rng, i))
  print(f"trained {steps} steps, final loss {float(loss):.3f}")
  return params


@functools.partial(jax.jit, static_argnums=0)
def _full_step(model, params, buffer, lengths):
  """Runs the model over the whole buffer; appends the next token."""
  B = buffer.shape[0]
  logits, _ = model.apply({"params": params}, buffer)  # (B, MAX_LEN, V)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
  token = jnp.argmax(last[:, 0], axis=-1).astype(jnp.int32)  # (B,)
  return buffer.at[jnp.arange(B), lengths].set(token), lengths + 1, token


@functools.partial(jax.jit, static_argnums=0)
def _prefill(model, params, caches, prompts, lengths):
  """Writes the ragged prompts into the caches; returns the first token."""
  logits, caches = model.apply({"params": params}, prompts, caches,
                               new_lengths=lengths)  # (B, P, V)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
  return caches, jnp.argmax(last[:, 0], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _cached_step(model, params, caches, token):
  """One token per example through the caches (updated in place)."""
  logits, caches = model.apply({"params": params}, token[:, None],
                               caches)  # (B, 1, V)
  return caches, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)


def generate_without_cache(model, params, prompts, prompt_lengths, new: int):
  """Re-runs the full model per token over a fixed ``(B, MAX_LEN)`` buffer."""
  B = prompts.shape[0]
  if max(prompt_lengths) + new > MAX_LEN:
    raise ValueError(f"prompts of up to {max(prompt_lengths)} tokens and "
                     f"{new} new ones do not fit MAX_LEN={MAX_LEN} positions")
  buffer = jnp.zeros((B, MAX_LEN), jnp.int32).at[:, :prompts.shape[1]].set(
      prompts)
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  tokens = []
  for _ in range(new):
    buffer, lengths, token = _full_step(model, params, buffer, lengths)
    tokens.append(token)
  return jax.block_until_ready(jnp.stack(tokens, axis=1))  # (B, new)


def generate_with_cache(model, params, prompts, prompt_lengths, new: int):
  """Ragged prefill into per-layer caches, then one token per step."""
  block = Block()
  cfg = jaxmha.MHAConfig(num_heads=block.num_heads, key_dim=block.key_dim,
                         num_key_value_heads=block.num_key_value_heads)
  caches = tuple(jaxmha.init_cache(cfg, batch_size=prompts.shape[0],
                                   max_length=MAX_LEN)
                 for _ in range(model.num_layers))
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  caches, token = _prefill(model, params, caches, prompts, lengths)
  tokens = [token]
  for _ in range(new - 1):
    caches, token = _cached_step(model, params, caches, token)
    tokens.append(token)
  if bool(caches[0].overflow.any()):
    raise RuntimeError("the KV cache overflowed; raise MAX_LEN")
  return jax.block_until_ready(jnp.stack(tokens, axis=1))  # (B, new)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train-steps", type=int, default=150)
  parser.add_argument("--new-tokens", type=int, default=40)
  args = parser.parse_args(argv)
  model = TinyLM()
  params = train(model, args.train_steps)

  prompt_lengths = np.array([3, 7, 5, 4])
  full = progressions(jax.random.key(123), 4, MAX_LEN)
  prompts = jnp.where(jnp.arange(7) < prompt_lengths[:, None], full[:, :7], 0)

  timings = {}
  results = {}
  for name, fn in (("without cache", generate_without_cache),
                   ("with cache", generate_with_cache)):
    for attempt in ("first call (compiles)", "second call"):
      start = time.perf_counter()
      results[name] = fn(model, params, prompts, prompt_lengths,
                         args.new_tokens)
      timings[name, attempt] = time.perf_counter() - start

  same = bool(jnp.all(results["without cache"] == results["with cache"]))
  for b in range(len(prompt_lengths)):
    P = int(prompt_lengths[b])
    expected = full[b, P:P + args.new_tokens]
    accuracy = float(jnp.mean(results["with cache"][b] == expected))
    print(f"prompt {np.asarray(full[b, :P]).tolist()} -> "
          f"{np.asarray(results['with cache'][b, :8]).tolist()}... "
          f"({accuracy:.0%} of {args.new_tokens} continue the progression)")
  for (name, attempt), seconds in timings.items():
    per_token = 1e3 * seconds / args.new_tokens
    print(f"{name:>14}, {attempt:<21}: {seconds:7.3f} s "
          f"({per_token:.2f} ms/token)")
  print(f"identical tokens with and without the cache: {same}")
  if not same:
    raise SystemExit("cached and uncached generation disagree")


if __name__ == "__main__":
  main()
