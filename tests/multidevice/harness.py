"""A tiny runner for the multi-device scripts: named checks, one process.

``@check`` registers a function; :func:`main` runs the checks named on the
command line (default: every check not marked ``slow``; ``--slow`` adds
those), prints one line per check with its time, and exits non-zero if any
failed, after running the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from typing import Callable

DEVICES = 8
XLA_FLAGS = f"--xla_force_host_platform_device_count={DEVICES}"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

_CHECKS: dict[str, dict[str, tuple[Callable, bool]]] = {}


def check(fn: Callable = None, *, slow: bool = False):
  """Registers ``fn`` as a check of its module (``slow``: only with --slow)."""
  if fn is None:
    return lambda f: check(f, slow=slow)
  _CHECKS.setdefault(fn.__module__, {})[fn.__name__] = (fn, slow)
  return fn


def env(devices: int = DEVICES) -> dict:
  """The environment of a script: forced host devices, repo on the path."""
  out = dict(os.environ)
  out["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      + out.get("XLA_FLAGS", "")).strip()
  out["JAX_PLATFORMS"] = "cpu"
  out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
  out["PYTHONWARNINGS"] = "error::DeprecationWarning"
  return out


def run_script(module: str, *args: str, timeout: float = 600,
               devices: int = DEVICES) -> subprocess.CompletedProcess:
  """Runs ``python -m <module> <args>`` with :func:`env`; returns it."""
  return subprocess.run(
      [sys.executable, "-m", module, *args], cwd=REPO, env=env(devices),
      capture_output=True, text=True, timeout=timeout)


def main(module_name: str) -> None:
  """Runs the registered checks of ``module_name`` (its ``__name__``)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  if jax.device_count() < DEVICES:
    sys.exit(f"needs {DEVICES} devices (XLA_FLAGS={XLA_FLAGS}); "
             f"got {jax.device_count()}.")
  checks = _CHECKS.get(module_name, {})
  args = sys.argv[1:]
  slow = "--slow" in args
  names = [a for a in args if not a.startswith("--")]
  unknown = sorted(set(names) - set(checks))
  if unknown:
    sys.exit(f"unknown checks {unknown}; known: {sorted(checks)}")
  selected = names or [n for n, (_, is_slow) in checks.items()
                       if slow or not is_slow]
  failed = []
  start = time.perf_counter()
  for name in selected:
    t = time.perf_counter()
    try:
      checks[name][0]()
    except Exception:  # pylint: disable=broad-except
      failed.append(name)
      print(f"FAIL {name} ({time.perf_counter() - t:.1f}s)", flush=True)
      traceback.print_exc()
    else:
      print(f"ok   {name} ({time.perf_counter() - t:.1f}s)", flush=True)
  print(f"{len(selected) - len(failed)}/{len(selected)} checks passed in "
        f"{time.perf_counter() - start:.1f}s", flush=True)
  if failed:
    sys.exit(f"failed: {failed}")
