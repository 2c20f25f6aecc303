"""Interleaved A/B timing of two versions of the blockwise path.

Shape letters: B batch, T sequence length (``S = T``), N heads, H head dim.

Loads ``pallas_kernels/blockwise.py`` as of a git revision (``--base``, or a
file with ``--base-file``) next to the working tree's, compiles both for the
attention core (forward, and forward+backward with the gradient of q, k and
v), full and causal, and times them on the same inputs in rounds of shuffled
order (:mod:`benchmarks.rounds`), so that other load on the machine falls on
both alike. It prints median times and the ratio new/base (<1: the working
tree is faster).

A third column times a control: the base module loaded a second time and
compiled separately. A new/base ratio no farther from 1 than control/base
is noise.

Run::

  python -m benchmarks.blockwise_ab --base HEAD~1 --batch 1 4 \\
      --seq-len 1024 2048 --rounds 15

Before timing, each version's outputs are compared with the base's: a
difference beyond fp32 rounding is reported, as the two then compute
different things.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp

from benchmarks import attention_core
from benchmarks import rounds as rounds_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULE = "pallas_kernels/blockwise.py"
VERSIONS = ("base", "new", "control")


def load_module(name: str, path: str):
  """Imports the file at ``path`` as a module called ``name``."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  # Registered before it runs: dataclasses look their module up by name.
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def source_at(revision: str) -> str:
  """The text of the blockwise module at a git ``revision``."""
  proc = subprocess.run(["git", "show", f"{revision}:{_MODULE}"], cwd=_ROOT,
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"--base {revision!r}: git show failed: "
                     f"{proc.stderr.strip()}")
  return proc.stdout


def _max_relative_difference(a, b) -> float:
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(jnp.max(jnp.abs(y))) or 1.0
    worst = max(worst, float(jnp.max(jnp.abs(x - y))) / scale)
  return worst


def compare(modules: dict, B: int, T: int, rounds: int, N: int = 8,
            H: int = 64) -> list[dict]:
  """Times every version of one shape; one row per (pass, mask).

  Args:
    modules: version name (:data:`VERSIONS`) -> blockwise module.
    B, T, N, H: the shape of q, k and v, ``(B, T, N, H)``, fp32.
    rounds: timed rounds (each runs every program once).

  Returns:
    Rows with the median milliseconds of each version, their ratios to the
    base and the largest output difference from the base.
  """
  q, k, v, target = (jax.random.normal(r, (B, T, N, H), jnp.float32)
                    for r in jax.random.split(jax.random.key(0), 4))
  cases = list(itertools.product(("fwd", "fwd+bwd"), ("full", "causal")))
  programs = {
      (p, m, ver): attention_core._compiled(
          "blockwise", q, k, v, target, m == "causal", p == "fwd+bwd",
          blockwise_module=modules[ver])
      for p, m in cases for ver in VERSIONS}
  differences = {}
  for p, m in cases:
    base = programs[(p, m, "base")](q, k, v)
    differences[(p, m)] = max(
        _max_relative_difference(programs[(p, m, ver)](q, k, v), base)
        for ver in VERSIONS[1:])
  med = rounds_lib.median_times(
      {key: (fn, (q, k, v)) for key, fn in programs.items()}, rounds)
  rows = []
  for p, m in cases:
    ms = {ver: med[(p, m, ver)] * 1e3 for ver in VERSIONS}
    rows.append({"B": B, "T": T, "pass": p, "mask": m, "ms": ms,
                 "new/base": ms["new"] / ms["base"],
                 "control/base": ms["control"] / ms["base"],
                 "max_rel_diff": differences[(p, m)]})
  return rows


def main(argv: Optional[list[str]] = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  base = parser.add_mutually_exclusive_group(required=True)
  base.add_argument("--base", help="git revision of the base version")
  base.add_argument("--base-file", help="path of the base version's file")
  parser.add_argument("--batch", type=int, nargs="+", default=[1])
  parser.add_argument("--seq-len", type=int, nargs="+", default=[1024])
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=15)
  a = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    base_path = a.base_file
    if base_path is None:
      base_path = os.path.join(tmp, "blockwise_base.py")
      with open(base_path, "w") as f:
        f.write(source_at(a.base))
    new_path = os.path.join(_ROOT, _MODULE)
    modules = {"base": load_module("blockwise_ab_base", base_path),
               "new": load_module("blockwise_ab_new", new_path),
               "control": load_module("blockwise_ab_control", base_path)}
  print(f"base: {a.base or a.base_file}; new: the working tree; "
        f"N={a.heads}, H=64, fp32, {a.rounds} rounds, medians")
  print("| B | T | pass | mask | base ms | new/base | control/base |")
  print("|---:|---:|---|---|---:|---:|---:|")
  rows = []
  for B, T in itertools.product(a.batch, a.seq_len):
    for row in compare(modules, B, T, a.rounds, N=a.heads):
      rows.append(row)
      note = ("" if row["max_rel_diff"] < 1e-4 else
              f" (outputs differ: {row['max_rel_diff']:.1e} of the largest)")
      print(f"| {B} | {T} | {row['pass']} | {row['mask']} | "
            f"{row['ms']['base']:.1f} | {row['new/base']:.3f} | "
            f"{row['control/base']:.3f} |{note}", flush=True)
  return rows


if __name__ == "__main__":
  main()
