"""Decode step time against cache length: one new token, jitted.

Shape letters: B batch, L cache length, N query heads, K key/value heads,
H head dim, D model features.

For each cache length ``L`` (the cache filled to ``L - 1``, so the new
token attends to all ``L`` keys) it times, as medians:

* ``step``: ``jaxmha.apply(params, cfg, x, x, cache=cache)`` under ``jit``
  with the cache donated (projections, cache write, chunked attention,
  output projection);
* ``attention``: :func:`jaxmha.decode.cached_attention` alone;
* ``read k, v``: ``k.sum() + v.sum()``, the time to stream the cache from
  memory once, the floor any decode step pays.

Decoding a token reads the whole cache once, so all three grow linearly in
``L``; on CPU the per-key cost steps up where the cache leaves the last
level cache, for the memory floor as much as for decoding.

Run: ``python -m benchmarks.decode [--lengths 256 1024 4096 16384]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

import jaxmha
from jaxmha import decode


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def bench(L: int, *, B: int = 1, N: int = 8, K: int = 8, H: int = 64,
          D: int = 512, repeats: int = 50) -> dict:
  """Median times in milliseconds for cache length ``L``."""
  cfg = jaxmha.MHAConfig(num_heads=N, key_dim=H,
                         num_key_value_heads=None if K == N else K)
  rng_p, rng_x, rng_k, rng_v = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(rng_x, (B, 1, D))
  params = jaxmha.init_params(rng_p, cfg, x.shape, x.shape)
  lengths = jnp.full((B,), L - 1, jnp.int32)
  k = jax.random.normal(rng_k, (B, L, K, H))
  v = jax.random.normal(rng_v, (B, L, K, H))
  q = jax.random.normal(rng_x, (B, 1, N, H))

  core = jax.jit(lambda q, k, v, lengths: decode.cached_attention(
      q, k, v, q_positions=lengths[:, None], kv_lengths=lengths + 1))
  read = jax.jit(lambda k, v: k.sum() + v.sum())
  times = {
      "attention": _median_ms(
          lambda: jax.block_until_ready(core(q, k, v, lengths)), repeats),
      "read": _median_ms(lambda: jax.block_until_ready(read(k, v)), repeats),
  }

  step = jax.jit(lambda p, c, x: jaxmha.apply(p, cfg, x, x, cache=c),
                 donate_argnums=1)
  state = {"cache": decode.KVCache(k=k + 0, v=v + 0, lengths=lengths + 0,
                                   overflow=jnp.zeros((B,), jnp.bool_))}

  def run_step():
    out, cache = step(params, state["cache"], x)
    jax.block_until_ready(out)
    # Rewind so every step writes position L - 1 of the same buffers (the
    # old lengths were donated with the rest of the cache).
    state["cache"] = dataclasses.replace(
        cache, lengths=jnp.full((B,), L - 1, jnp.int32))

  times["step"] = _median_ms(run_step, repeats)
  return times


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[256, 1024, 4096, 16384, 65536])
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--kv-heads", type=int, default=8)
  args = parser.parse_args(argv)
  print(f"backend={jax.default_backend()}, B=1, N=8, K={args.kv_heads}, "
        f"H=64, D=512, one new token, median of {args.repeats}, "
        f"chunk={decode.default_chunk_size()}")
  print("| L | step (ms) | attention (ms) | read k, v (ms) | "
        "step per 1k keys (ms) |")
  print("|---:|---:|---:|---:|---:|")
  for L in args.lengths:
    r = bench(L, K=args.kv_heads, repeats=args.repeats)
    print(f"| {L} | {r['step']:.3f} | {r['attention']:.3f} | "
          f"{r['read']:.3f} | {r['step'] * 1e3 / L:.3f} |", flush=True)


if __name__ == "__main__":
  main()
