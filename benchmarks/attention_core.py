"""Attention core on CPU: reference vs blockwise vs ``jax.nn.dot_product_attention``.

Shape letters: B batch, T query length, S key/value length, N heads, H head
dim. fp32, ``B=1, N=8, H=64, T=S``; full and causal; forward, and forward
plus backward (the gradient of ``sum(out * d_out)`` with respect to q, k, v),
each under ``jit``.

Implementations:

* ``reference``: :func:`pallas_kernels.reference.attention_core` with the
  default matmul precision; materialises the ``(B, N, T, S)`` scores.
* ``blockwise``: :mod:`pallas_kernels.blockwise` with its default block
  sizes; memory linear in T.
* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``.

Timings are interleaved (one call of each implementation per round, so load
from other processes hits all of them alike) and reported as medians.
GFLOP/s count only the attended (query, key) pairs, 4 H FLOPs each forward
and 14 H forward plus backward. The machine's matmul rate is a plain fp32
``jnp.dot`` of two ``(n, n)`` matrices with the same FLOPs (``2 n^3``),
timed in the same rounds. ``temp MB`` is XLA's compiled temporary memory.

``--sweep`` instead times the blockwise path alone over candidate block
sizes (how :func:`pallas_kernels.blockwise.default_block_sizes` was chosen),
all candidates interleaved in each round.

Usage::

    python -m benchmarks.attention_core [--quick] [--rounds R] [--out PATH]
    python -m benchmarks.attention_core --sweep [--quick] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import blockwise
from pallas_kernels import common
from pallas_kernels import reference

B, N, H = 1, 8, 64
SEQ_LENGTHS = (256, 1024, 2048, 4096)
QUICK_SEQ_LENGTHS = (256, 1024)
IMPLS = ("reference", "blockwise", "xla")
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results",
                           "attention_core.json")


def _attention_fn(impl: str, prep: common.Prepared, causal: bool,
                  block_sizes=None):
  """``(q, k, v) -> out (B, T, N, H)`` for one implementation
  (``block_sizes``: the blockwise path's, None for its defaults)."""
  if impl == "reference":
    return lambda q, k, v: reference.attention_core(
        q, k, v, prep, precision=lax.Precision.DEFAULT)[0]
  if impl == "blockwise":
    return lambda q, k, v: blockwise.attention(
        q, k, v, prep, block_sizes=block_sizes)[0]
  if impl == "xla":
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla")
  raise ValueError(f"Unknown implementation {impl!r}.")


def _compiled(impl, q, k, v, d_out, causal, backward, block_sizes=None):
  prep = common.prepare(q, k, v, causal=causal)
  attention = _attention_fn(impl, prep, causal, block_sizes)
  fn = attention
  if backward:
    loss = lambda q, k, v: jnp.sum(attention(q, k, v) * d_out)
    fn = jax.grad(loss, (0, 1, 2))
  return jax.jit(fn).lower(q, k, v).compile()


def _time_once(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _useful_flops(T: int, causal: bool, backward: bool) -> float:
  pairs = T * (T + 1) / 2 if causal else T * T
  return B * N * pairs * H * (14 if backward else 4)


def run(seq_lengths, rounds: int):
  """Times every configuration; returns a list of result dicts."""
  matmul = jax.jit(jnp.dot)
  results = []
  for T in seq_lengths:
    rng_q, rng_k, rng_v, rng_o = jax.random.split(jax.random.key(T), 4)
    q = jax.random.normal(rng_q, (B, T, N, H))
    k = jax.random.normal(rng_k, (B, T, N, H))
    v = jax.random.normal(rng_v, (B, T, N, H))
    d_out = jax.random.normal(rng_o, (B, T, N, H))
    for causal in (False, True):
      for backward in (False, True):
        flops = _useful_flops(T, causal, backward)
        fns = {impl: _compiled(impl, q, k, v, d_out, causal, backward)
               for impl in IMPLS}
        n = round((flops / 2) ** (1 / 3))
        a = jax.random.normal(jax.random.key(1), (n, n))
        temp = {impl: fns[impl].memory_analysis().temp_size_in_bytes
                for impl in IMPLS}
        times = {impl: [] for impl in IMPLS + ("matmul",)}
        for impl in IMPLS:  # warm-up
          _time_once(fns[impl], q, k, v)
        _time_once(matmul, a, a)
        for _ in range(rounds):
          for impl in IMPLS:
            times[impl].append(_time_once(fns[impl], q, k, v))
          times["matmul"].append(_time_once(matmul, a, a))
        med = {impl: statistics.median(ts) for impl, ts in times.items()}
        row = dict(
            T=T, S=T, B=B, N=N, H=H, mask="causal" if causal else "full",
            pass_="fwd+bwd" if backward else "fwd", rounds=rounds,
            matmul_n=n, matmul_gflops=2 * n**3 / med["matmul"] / 1e9,
            useful_gflop=flops / 1e9)
        for impl in IMPLS:
          row[f"{impl}_ms"] = med[impl] * 1e3
          row[f"{impl}_gflops"] = flops / med[impl] / 1e9
          row[f"{impl}_temp_mb"] = temp[impl] / 2**20
        results.append(row)
        print(_row_markdown(row), flush=True)
  return results


# (block_q, block_k, block_q_bwd, block_k_bwd) candidates for --sweep.
SWEEP_CANDIDATES = ((256, 256, 256, 256), (512, 256, 256, 512),
                    (512, 512, 256, 512), (512, 512, 512, 512),
                    (1024, 256, 256, 512),
                    (1024, 256, 512, 512), (1024, 512, 512, 1024))


def sweep(seq_lengths, rounds: int, candidates=SWEEP_CANDIDATES):
  """Medians (ms) of the blockwise path per block-size candidate."""
  rows = []
  for T in seq_lengths:
    rng_q, rng_k, rng_v, rng_o = jax.random.split(jax.random.key(T), 4)
    q, k, v, d_out = (jax.random.normal(r, (B, T, N, H))
                      for r in (rng_q, rng_k, rng_v, rng_o))
    for backward in (False, True):
      fns = {(causal, c): _compiled("blockwise", q, k, v, d_out, causal,
                                    backward, blockwise.BlockSizes(*c))
             for causal in (False, True) for c in candidates}
      times = {key: [] for key in fns}
      for fn in fns.values():  # warm-up
        _time_once(fn, q, k, v)
      for _ in range(rounds):
        for key, fn in fns.items():
          times[key].append(_time_once(fn, q, k, v))
      for c in candidates:
        full, causal = (statistics.median(times[(m, c)]) * 1e3
                        for m in (False, True))
        rows.append(dict(T=T, pass_="fwd+bwd" if backward else "fwd",
                         block_sizes=c, full_ms=full, causal_ms=causal))
        print(f"| {T} | {rows[-1]['pass_']} | {c} | {full:.1f} | "
              f"{causal:.1f} | {causal / full:.2f} |", flush=True)
  return rows


_HEADER = ("| T | mask | pass | reference ms | blockwise ms | xla ms "
           "| ref/blockwise | xla/blockwise | blockwise GFLOP/s "
           "| matmul GFLOP/s | blockwise % of matmul "
           "| temp MB ref / blockwise / xla |\n"
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def _row_markdown(r) -> str:
  return (
      f"| {r['T']} | {r['mask']} | {r['pass_']} | {r['reference_ms']:.1f} "
      f"| {r['blockwise_ms']:.1f} | {r['xla_ms']:.1f} "
      f"| {r['reference_ms'] / r['blockwise_ms']:.2f}x "
      f"| {r['xla_ms'] / r['blockwise_ms']:.2f}x "
      f"| {r['blockwise_gflops']:.0f} | {r['matmul_gflops']:.0f} "
      f"| {100 * r['blockwise_gflops'] / r['matmul_gflops']:.0f}% "
      f"| {r['reference_temp_mb']:.0f} / {r['blockwise_temp_mb']:.0f} / "
      f"{r['xla_temp_mb']:.0f} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"T in {QUICK_SEQ_LENGTHS} only")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed rounds per configuration (default 5, "
                      "quick 3)")
  parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
  parser.add_argument("--sweep", action="store_true",
                      help="time blockwise block-size candidates instead")
  args = parser.parse_args(argv)
  seq_lengths = QUICK_SEQ_LENGTHS if args.quick else SEQ_LENGTHS
  rounds = args.rounds or (3 if args.quick else 5)
  if args.sweep:
    print("| T | pass | (block_q, block_k, block_q_bwd, block_k_bwd) | full "
          "ms | causal ms | causal / full |\n|---:|---|---|---:|---:|---:|",
          flush=True)
    sweep([t for t in seq_lengths if t >= 1024], rounds)
    return
  print(f"jax {jax.__version__}, {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, fp32 B={B} N={N} H={H}; medians of "
        f"{rounds} interleaved rounds\n")
  print(_HEADER, flush=True)
  results = run(seq_lengths, rounds)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(jax_version=jax.__version__,
                   backend=jax.default_backend(), cpu_count=os.cpu_count(),
                   machine=platform.processor() or platform.machine(),
                   block_sizes=str(blockwise.DEFAULT_BLOCK_SIZES),
                   banded_block_sizes=str(
                       blockwise.DEFAULT_BANDED_BLOCK_SIZES),
                   results=results), f, indent=1)
  print(f"\nWrote {args.out}")


if __name__ == "__main__":
  main()
