"""XLA:CPU's matmul libraries: the default programs against the same ones
compiled with XLA's YNNPACK fusions turned off.

Shape letters: B batch, T sequence length (``S = T``), N heads, H head dim,
D model features.

XLA:CPU (jaxlib 0.10.2) runs an fp32 matmul through YNNPACK when its left
operand is row-major and contracts its last dim, and through Eigen
otherwise. The per-compile option ``xla_cpu_experimental_ynn_fusion_type``
set to ``""`` sends every matmul to Eigen. This compiles each
implementation's program three times, with the default libraries
(``default``, and again as a ``control``: two identical programs differ by
this much) and with YNNPACK off (``eigen``), and times them in shuffled
rounds (:mod:`benchmarks.rounds`). A program cannot choose per matmul: the
option holds for a whole compiled program, and a matmul written to contract
its left operand's first dim (which YNNPACK refuses) runs slower on Eigen
than either library runs the usual form.

``--matmuls`` times one of the backward's matmuls in the three forms
instead (:func:`matmul_forms`).

Run::

  python -m benchmarks.dot_libraries --impls keras,jaxmha \\
      --seq-lengths 1024 2048 --rounds 11
  python -m benchmarks.dot_libraries --matmuls --seq-lengths 512 1024
"""

from __future__ import annotations

import argparse
import functools
import itertools
from typing import Optional

import jax
import jax.numpy as jnp

from benchmarks import compare
from benchmarks import rounds as rounds_lib

OPTION = "xla_cpu_experimental_ynn_fusion_type"
VERSIONS = {"default": None, "control": None, "eigen": {OPTION: ""}}
# The fusion kind XLA gives the ops it hands to YNNPACK, in compiled HLO.
_YNN_KIND = '"kind":"__ynn_fusion"'


def _compile(fn, args, options: Optional[dict]):
  try:
    return fn.lower(*args).compile(compiler_options=options)
  except Exception as e:  # pylint: disable=broad-except
    if options and OPTION in str(e):
      raise SystemExit(f"This jaxlib ({jax.__version__}) does not take the "
                       f"compiler option {OPTION!r}: {e}") from None
    raise


def run(impls, scope: str, modes, masks, batches, seq_lengths,
        rounds: int, D: int = 512, N: int = 8, H: int = 64) -> list[dict]:
  """Times every (impl, mode, mask, B, T) under each of :data:`VERSIONS`.

  Returns:
    One row per configuration: the median milliseconds of each version,
    their ratios to ``default`` (below 1: faster than the default) and
    how many YNNPACK fusions each compiled program holds.
  """
  by_name = {i.name: i for i in compare.implementations()}
  unknown = [name for name in impls if name not in by_name]
  if unknown:
    raise SystemExit(f"Unknown --impls {unknown}; known: {sorted(by_name)}.")
  models = compare.Models.build(
      D, N, H, need={n for i in impls for n in by_name[i].needs})
  configs = list(itertools.product(impls, modes, masks, batches, seq_lengths))
  programs, arguments, ynn = {}, {}, {}
  for config in configs:
    name, mode, mask, B, T = config
    fn, args = compare.program(by_name[name], models, scope, mode,
                               mask == "causal", B, T)
    arguments[config] = args
    for version, options in VERSIONS.items():
      compiled = _compile(fn, args, options)
      jax.block_until_ready(compiled(*args))  # warm-up
      programs[(config, version)] = compiled
      ynn[(config, version)] = compiled.as_text().count(_YNN_KIND)
  med = rounds_lib.median_times(
      {key: (compiled, arguments[key[0]])
       for key, compiled in programs.items()}, rounds)
  rows = []
  for config in configs:
    ms = {v: med[(config, v)] * 1e3 for v in VERSIONS}
    name, mode, mask, B, T = config
    rows.append(dict(impl=name, scope=scope, mode=mode, mask=mask, B=B, T=T,
                     ms=ms, eigen_ratio=ms["eigen"] / ms["default"],
                     control_ratio=ms["control"] / ms["default"],
                     ynn_fusions={v: ynn[(config, v)] for v in VERSIONS}))
  return rows


def _batched_matmul(a, b, contract_a: int, contract_b: int):
  dims = (((contract_a,), (contract_b,)), ((0,), (0,)))
  return jax.lax.dot_general(a, b, dims)


def matmul_forms(rows: int, cols: int, rounds: int, heads: int = 8,
                 H: int = 64, steps: int = 8) -> dict:
  """GFLOP/s of the blockwise backward's scores ``K Q^T`` of ``cols`` keys
  against ``rows`` query rows (``(heads, cols, H) x (heads, rows, H)``),
  summed over ``steps`` iterations of a loop as in the backward, in three
  forms: ``ynnpack`` (the usual form, by default), ``eigen`` (the same,
  YNNPACK off) and ``eigen, lhs first dim`` (``K^T`` stored ``(heads, H,
  cols)`` and contracted over its first dim, which YNNPACK refuses)."""
  keys = jax.random.split(jax.random.key(0), 2)
  k = jax.random.normal(keys[0], (heads, cols, H))
  q = jax.random.normal(keys[1], (heads, rows, H))

  def loop(lhs, q, contract_lhs):
    def body(i, acc):  # q moves each step, so the product stays in the loop
      return acc + _batched_matmul(lhs, q + i.astype(q.dtype), contract_lhs,
                                   2)
    return jax.lax.fori_loop(0, steps, body, jnp.zeros((heads, cols, rows)))

  forms = {"ynnpack": (k, 2, None), "eigen": (k, 2, {OPTION: ""}),
           "eigen, lhs first dim": (jnp.swapaxes(k, 1, 2), 1, None)}
  programs = {}
  for form, (lhs, contract, options) in forms.items():
    fn = jax.jit(functools.partial(loop, contract_lhs=contract))
    programs[form] = (_compile(fn, (lhs, q), options), (lhs, q))
    jax.block_until_ready(programs[form][0](lhs, q))
  med = rounds_lib.median_times(programs, rounds)
  flops = 2.0 * steps * heads * rows * cols * H
  return {form: flops / t / 1e9 for form, t in med.items()}


def main(argv: Optional[list[str]] = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--impls", default="keras,jaxmha",
                      help="comma-separated names, as in benchmarks.compare")
  parser.add_argument("--scope", choices=compare.SCOPES, default="layer")
  parser.add_argument("--modes", default="fwd,fwd+bwd")
  parser.add_argument("--masks", default="full,causal")
  parser.add_argument("--batches", type=int, nargs="+", default=[1])
  parser.add_argument("--seq-lengths", type=int, nargs="+", default=[1024])
  parser.add_argument("--features", type=int, nargs=3, default=[512, 8, 64],
                      metavar=("D", "N", "H"))
  parser.add_argument("--rounds", type=int, default=11)
  parser.add_argument("--matmuls", action="store_true",
                      help="time the backward's scores in three forms instead")
  a = parser.parse_args(argv)
  D, N, H = a.features
  if a.matmuls:
    print(f"the backward's scores, ({N}, S, {H}) x ({N}, rows, {H}), "
          f"{a.rounds} rounds, medians, GFLOP/s")
    rows = []
    for S, R in itertools.product(a.seq_lengths, (128, 256)):
      rates = matmul_forms(R, S, a.rounds, heads=N, H=H)
      rows.append(dict(S=S, rows=R, gflops=rates))
      print(f"S={S}, rows={R}: " + ", ".join(
          f"{form} {rate:.0f}" for form, rate in rates.items()), flush=True)
    return rows
  rows = run(a.impls.split(","), a.scope, a.modes.split(","),
             a.masks.split(","), a.batches, a.seq_lengths, a.rounds,
             D=D, N=N, H=H)
  print(f"{a.scope}, D={D}, N={N}, H={H}, fp32, {a.rounds} rounds, medians; "
        f"eigen: compiled with {OPTION}=\"\"")
  print("| impl | pass | mask | B | T | default ms | eigen/default "
        "| control/default | YNNPACK fusions |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['impl']} | {r['mode']} | {r['mask']} | {r['B']} | {r['T']} "
          f"| {r['ms']['default']:.1f} | {r['eigen_ratio']:.3f} "
          f"| {r['control_ratio']:.3f} | {r['ynn_fusions']['default']} |")
  return rows


if __name__ == "__main__":
  main()
