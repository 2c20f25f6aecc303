"""Attention core on CPU: reference vs blockwise vs ``jax.nn.dot_product_attention``.

Shape letters: B batch, T query length, S key/value length, N heads, H head
dim. fp32, ``B=1, N=8, H=64, T=S``; full and causal; forward, and forward
plus backward (the gradient of ``0.5 * sum((out - target)**2)`` with
respect to q, k, v, as in a training step: see
:func:`benchmarks.compare.loss_gradient`), each under ``jit``.

Implementations:

* ``reference``: :func:`pallas_kernels.reference.attention_core` with the
  default matmul precision; materialises the ``(B, N, T, S)`` scores.
* ``blockwise``: :mod:`pallas_kernels.blockwise` with its default block
  sizes; memory linear in T.
* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``.

Timings are interleaved (one call of each implementation per round, in a
shuffled order: :mod:`benchmarks.rounds`) and reported as medians.
GFLOP/s count only the attended (query, key) pairs, 4 H FLOPs each forward
and 14 H forward plus backward. The machine's matmul rate is a plain fp32
``jnp.dot`` of two ``(n, n)`` matrices with the same FLOPs (``2 n^3``),
timed in the same rounds. ``temp MB`` is XLA's compiled temporary memory.

``--sweep`` instead times the blockwise path alone over candidate block
sizes (how :func:`pallas_kernels.blockwise.default_block_sizes` was chosen),
all candidates interleaved in each round.

``--profile`` instead traces a few calls of one configuration with the JAX
profiler and says where the time goes, by XLA op kind (matmuls, reductions,
exponentials, data movement, other elementwise work) and by matmul output
shape (:func:`op_profile`). Timing a variant only says *whether* it is
faster; this says what the remaining time is spent on.

Usage::

    python -m benchmarks.attention_core [--quick] [--rounds R] [--out PATH]
    python -m benchmarks.attention_core --sweep [--quick] [--rounds R]
    python -m benchmarks.attention_core --profile [--seq-len T]
        [--mask full|causal] [--pass fwd|fwd+bwd] [--impl NAME]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import statistics
import tempfile

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import compare
from benchmarks import rounds as rounds_lib
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
                  block_sizes=None, blockwise_module=blockwise):
  """``(q, k, v) -> out (B, T, N, H)`` for one implementation
  (``block_sizes``: the blockwise path's, None for its defaults;
  ``blockwise_module``: another version of it, see
  :mod:`benchmarks.blockwise_ab`)."""
  if impl == "reference":
    return lambda q, k, v: reference.attention_core(
        q, k, v, prep, precision=lax.Precision.DEFAULT)[0]
  if impl == "blockwise":
    return lambda q, k, v: blockwise_module.attention(
        q, k, v, prep, block_sizes=block_sizes)[0]
  if impl == "xla":
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla")
  raise ValueError(f"Unknown implementation {impl!r}.")


def _compiled(impl, q, k, v, target, causal, backward, block_sizes=None,
              blockwise_module=blockwise):
  prep = common.prepare(q, k, v, causal=causal)
  attention = _attention_fn(impl, prep, causal, block_sizes, blockwise_module)
  fn = attention
  if backward:
    grad = compare.loss_gradient(attention)
    fn = lambda q, k, v: grad(q, k, v, target)  # (dq, dk, dv)
  return jax.jit(fn).lower(q, k, v).compile()


def _inputs(T: int):
  """Random ``q, k, v`` and the loss's target, each ``(B, T, N, H)``, drawn
  from key T."""
  return tuple(jax.random.normal(r, (B, T, N, H))
               for r in jax.random.split(jax.random.key(T), 4))


def _useful_flops(T: int, causal: bool, backward: bool) -> float:
  pairs = T * (T + 1) / 2 if causal else T * T
  return B * N * pairs * H * (14 if backward else 4)


def run(seq_lengths, rounds: int):
  """Times every configuration; returns a list of result dicts."""
  matmul = jax.jit(jnp.dot)
  results = []
  for T in seq_lengths:
    q, k, v, target = _inputs(T)
    for causal in (False, True):
      for backward in (False, True):
        flops = _useful_flops(T, causal, backward)
        fns = {impl: _compiled(impl, q, k, v, target, causal, backward)
               for impl in IMPLS}
        n = round((flops / 2) ** (1 / 3))
        a = jax.random.normal(jax.random.key(1), (n, n))
        temp = {impl: fns[impl].memory_analysis().temp_size_in_bytes
                for impl in IMPLS}
        runners = {impl: (fns[impl], (q, k, v)) for impl in IMPLS}
        runners["matmul"] = (matmul, (a, a))
        for fn, fn_args in runners.values():  # warm-up
          rounds_lib.time_once(fn, *fn_args)
        med = rounds_lib.median_times(runners, rounds)
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
                    (1024, 256, 256, 512), (1024, 256, 256, 1024),
                    (1024, 256, 128, 1024), (1024, 256, 512, 512),
                    (1024, 512, 256, 1024), (1024, 512, 512, 1024))


def sweep(seq_lengths, rounds: int, candidates=SWEEP_CANDIDATES):
  """Medians (ms) of the blockwise path per block-size candidate."""
  rows = []
  for T in seq_lengths:
    q, k, v, target = _inputs(T)
    for backward in (False, True):
      fns = {(causal, c): _compiled("blockwise", q, k, v, target, causal,
                                    backward, blockwise.BlockSizes(*c))
             for causal in (False, True) for c in candidates}
      for fn in fns.values():  # warm-up
        rounds_lib.time_once(fn, q, k, v)
      med = rounds_lib.median_times(
          {key: (fn, (q, k, v)) for key, fn in fns.items()}, rounds)
      for c in candidates:
        full, causal = (med[(m, c)] * 1e3 for m in (False, True))
        rows.append(dict(T=T, pass_="fwd+bwd" if backward else "fwd",
                         block_sizes=c, full_ms=full, causal_ms=causal))
        print(f"| {T} | {rows[-1]['pass_']} | {c} | {full:.1f} | "
              f"{causal:.1f} | {causal / full:.2f} |", flush=True)
  return rows


# -- where the time goes -------------------------------------------------------

# HLO ops that only move or reinterpret data.
_DATA_MOVEMENT = frozenset((
    "parameter", "constant", "bitcast", "reshape", "broadcast", "iota",
    "slice", "dynamic-slice", "dynamic-update-slice", "transpose", "copy",
    "concatenate", "pad", "get-tuple-element", "tuple", "bitcast-convert"))
# Control flow: its events span the ops inside it, which are counted.
_CONTROL_FLOW = frozenset(("while", "conditional", "call"))
_INSTRUCTION_NAME = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = ")
_OP = re.compile(r"\s*([a-z][\w\-]*)\(")


def _parse_instruction(line: str):
  """``(name, shape, op)`` of an HLO instruction line ``"  [ROOT ]%name =
  shape op(...)"``, or None. The shape may be a (nested) tuple."""
  match = _INSTRUCTION_NAME.match(line)
  if match is None:
    return None
  rest = line[match.end():]
  if rest.startswith("("):  # a tuple shape: up to its matching ")"
    depth = 0
    for end, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
    shape, rest = rest[:end + 1], rest[end + 1:]
  else:
    shape, _, rest = rest.partition(" ")
    rest = " " + rest
  op = _OP.match(rest)
  return (match.group(1), shape, op.group(1)) if op else None


def _op_kinds(hlo_text: str) -> dict:
  """``{instruction name: (kind, result shape)}`` for the instructions of an
  optimized HLO module. A fusion takes the kind of what its body computes:
  ``dot`` if it holds a matmul, else ``reduce``, else ``exp``, else ``data
  movement`` if it only moves data, else ``elementwise``."""
  bodies, current = {}, None
  instructions = []  # (name, shape, op, callee or None)
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      # A computation's header: "[ENTRY ]%name (params) -> result {".
      name = line.split()[1 if line.startswith("ENTRY") else 0]
      current = bodies.setdefault(name.lstrip("%"), set())
      continue
    parsed = _parse_instruction(line)
    if parsed is None or current is None:
      continue
    name, shape, op = parsed
    current.add(op)
    callee = re.search(r"calls=%?([\w.\-]+)", line)
    instructions.append((name, shape, op, callee and callee.group(1)))

  def kind(ops):
    if ops & {"dot", "convolution"}:
      return "dot"
    if "reduce" in ops:
      return "reduce"
    if "exponential" in ops:
      return "exp"
    return "data movement" if ops <= _DATA_MOVEMENT else "elementwise"

  return {name: (kind(bodies.get(callee, set()) if callee else {op}), shape)
          for name, shape, op, callee in instructions
          if op not in _CONTROL_FLOW}


def op_profile(compiled, args, calls: int = 5) -> dict:
  """Where the time of a compiled call goes, by XLA op kind.

  Traces ``calls`` calls with :func:`jax.profiler.trace` and sums the
  durations of the ops XLA executed, classified from ``compiled``'s
  optimized HLO (:func:`_op_kinds`). Op times are summed over the threads
  that launched them: when they exceed the wall time, ops overlapped (and
  removing one that ran beside another may save nothing); when they nearly
  equal it, ops ran one at a time, each perhaps on several threads inside.
  Small ops read long in a trace: an ``(8, 64, 64)`` masked exp showed about
  140 us here but costs 15-19 us per iteration of a plain ``fori_loop``, so
  decide between variants by interleaved wall times. Matmuls that XLA runs
  on Eigen rather than YNNPACK (:mod:`benchmarks.dot_libraries`: those
  whose left operand contracts its first dim, such as the backward's dQ^T)
  run as tasks on Eigen's threads, and their event can cover little more
  than the launch: with YNNPACK off, the forward's four ``p @ v`` products
  of T=1024 (1.07 GFLOP) read 1.1 ms in all. Read those times as a floor.

  Args:
    compiled: a ``jax.stages.Compiled``.
    args: its arguments.
    calls: traced calls (after one untraced warm-up call).

  Returns:
    ``{"wall_ms": median wall time per call (traced), "op_ms": {kind: ms
    per call}, "dot_ms": {output shape: ms per call}}``.
  """
  kinds = _op_kinds(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        walls.append(rounds_lib.time_once(compiled, *args))
    paths = [os.path.join(root, f) for root, _, files in os.walk(trace_dir)
             for f in files if f.endswith(".xplane.pb")]
    if not paths:
      raise RuntimeError(f"The profiler wrote no trace under {trace_dir}.")
    data = jax.profiler.ProfileData.from_file(paths[0])
  op_ns, dot_ns = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):  # XLA's threads only
        continue
      for event in line.events:
        if event.name in kinds:
          kind, shape = kinds[event.name]
          op_ns[kind] += event.duration_ns
          if kind == "dot":
            dot_ns[shape.split("{")[0]] += event.duration_ns
  per_call = lambda c: {k: v / calls / 1e6 for k, v in c.most_common()}
  return dict(wall_ms=statistics.median(walls) * 1e3, op_ms=per_call(op_ns),
              dot_ms=per_call(dot_ns))


def _print_profile(impl: str, T: int, causal: bool, backward: bool,
                   calls: int) -> dict:
  q, k, v, target = _inputs(T)
  compiled = _compiled(impl, q, k, v, target, causal, backward)
  prof = op_profile(compiled, (q, k, v), calls)
  total = sum(prof["op_ms"].values())
  print(f"{impl}, T={T}, {'causal' if causal else 'full'}, "
        f"{'fwd+bwd' if backward else 'fwd'}: {prof['wall_ms']:.1f} ms per "
        f"call (traced), {total:.1f} ms of op time over all threads\n")
  print("| op kind | ms per call | share of op time |\n|---|---:|---:|")
  for kind, ms in prof["op_ms"].items():
    print(f"| {kind} | {ms:.2f} | {100 * ms / total:.0f}% |")
  print("\n| matmul output shape | ms per call |\n|---|---:|")
  for shape, ms in prof["dot_ms"].items():
    print(f"| {shape} | {ms:.2f} |")
  return prof


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
                      "quick 3); with --profile, traced calls (default 5)")
  parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
  parser.add_argument("--sweep", action="store_true",
                      help="time blockwise block-size candidates instead")
  parser.add_argument("--profile", action="store_true",
                      help="break one configuration's time down by op kind")
  parser.add_argument("--seq-len", type=int, default=2048,
                      help="--profile: T (default 2048)")
  parser.add_argument("--mask", choices=("full", "causal"), default="causal",
                      help="--profile: the mask (default causal)")
  parser.add_argument("--pass", dest="pass_", choices=("fwd", "fwd+bwd"),
                      default="fwd", help="--profile: the pass (default fwd)")
  parser.add_argument("--impl", choices=IMPLS, default="blockwise",
                      help="--profile: the implementation (default "
                      "blockwise)")
  args = parser.parse_args(argv)
  if args.profile:
    _print_profile(args.impl, args.seq_len, args.mask == "causal",
                   args.pass_ == "fwd+bwd", args.rounds or 5)
    return
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
                   long_causal_block_sizes=str(
                       blockwise.DEFAULT_LONG_CAUSAL_BLOCK_SIZES),
                   long_causal_min_length=blockwise.LONG_CAUSAL_MIN_LENGTH,
                   results=results), f, indent=1)
  print(f"\nWrote {args.out}")


if __name__ == "__main__":
  main()
