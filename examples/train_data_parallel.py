"""Data- and context-parallel training of a small causal model on 8 devices.

Shape letters: B batch, T sequence length, D model features, V vocabulary
size; the mesh is ``("data", "seq")`` = (2, 4).

A one-block causal transformer around ``jaxmha.MultiHeadAttention`` learns
to continue arithmetic progressions mod V (``5, 8, 11, ...``). The batch is
split over ``data`` and the sequence over ``seq``: each device holds B/2
examples and T/4 positions. The model code is unchanged:
``jaxmha.context_parallel(model.apply, "seq", mesh=mesh)`` makes its
attention a ring over ``seq`` (K/V blocks travel with ``ppermute``; no
device ever holds the whole sequence), and ``jax.jit`` partitions the rest
(embeddings, MLP, loss, gradients and their all-reduce over both axes) from
the input shardings. The functional API does the same with
``jaxmha.MHAConfig(..., context_parallel_axis="seq")``.

On CPU it forces 8 host devices. Run: ``python
examples/train_data_parallel.py [--steps 60]``.
"""

from __future__ import annotations

import os

# Before JAX is imported: 8 CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxmha  # noqa: E402

V, T, D = 32, 64, 64  # vocabulary, sequence length, model features
B = 16  # global batch


class Block(nn.Module):
  """Embeddings, one pre-norm attention block with an MLP, logits."""

  @nn.compact
  def __call__(self, tokens):  # (B, T) int
    x = nn.Embed(V, D)(tokens)  # (B, T, D)
    x = x + nn.Embed(T, D)(jnp.arange(tokens.shape[1]))[None]
    h = nn.LayerNorm()(x)
    x = x + jaxmha.MultiHeadAttention(num_heads=4, key_dim=16, name="attn")(
        h, h, use_causal_mask=True)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(D)(nn.gelu(nn.Dense(4 * D)(h)))
    return nn.Dense(V)(nn.LayerNorm()(x))  # (B, T, V)


def batch(rng: np.random.Generator):
  """Arithmetic progressions mod V: ``(tokens (B, T), targets (B, T))``."""
  start = rng.integers(0, V, (B, 1))
  stride = rng.integers(1, V // 2, (B, 1))
  seq = (start + stride * np.arange(T + 1)) % V  # (B, T + 1)
  return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)


def main(steps: int) -> None:
  mesh = jax.make_mesh((2, 4), ("data", "seq"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  print(f"{jax.device_count()} devices, mesh {dict(mesh.shape)}: each holds "
        f"{B // 2} examples x {T // 4} positions")
  model = Block()
  params = model.init(jax.random.key(0), jnp.zeros((B, T), jnp.int32))
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)
  apply = jaxmha.context_parallel(model.apply, "seq", mesh=mesh)

  def loss_fn(params, tokens, targets):
    logits = apply(params, tokens)  # (B, T, V), sharded like the tokens
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  @jax.jit
  def step(params, opt_state, tokens, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  data = NamedSharding(mesh, P("data", "seq"))  # batch and sequence split
  replicated = NamedSharding(mesh, P())
  params, opt_state = jax.device_put((params, opt_state), replicated)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  losses = []
  for i in range(steps):
    tokens, targets = (jax.device_put(a, data) for a in batch(rng))
    params, opt_state, loss = step(params, opt_state, tokens, targets)
    losses.append(float(loss))
    print(f"step {i:3d}  loss {losses[-1]:.4f}"
          + (f"  (compiled in {time.perf_counter() - start:.1f}s)"
             if i == 0 else ""), flush=True)
  hlo = step.lower(params, opt_state, tokens, targets).as_text()
  print(f"{steps} steps in {time.perf_counter() - start:.1f}s; loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}; the step program holds "
        f"{hlo.count('collective_permute')} ring ppermutes")
  if not losses[-1] < 0.5 * losses[0]:
    raise SystemExit("the loss did not halve")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  main(parser.parse_args().steps)
