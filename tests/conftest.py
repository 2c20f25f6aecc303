"""Test setup: Keras on the JAX backend, derandomized hypothesis, fp32 matmuls,
and XLA's CPU compiler set for fast compilation."""

import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

# The suite compiles hundreds of small programs and runs each a few times, so
# compilation is most of its time. Two XLA CPU flags halve it:
# - optimization level 0 skips LLVM's optimization passes (a third of the
#   suite's time), keeping XLA's own (HLO) passes;
# - XLA's older loop emitters for fusions compile about twice as fast as its
#   MLIR fusion emitters (the blockwise tests: 233 s -> 122 s on 2 cores).
# Neither changes what is computed, only the code computing it: the numbers
# the tests check are the default settings' up to rounding (FMA contraction,
# the elementwise functions' approximations). XLA reads its flags when the CPU
# backend starts, so they are set before the first computation; subprocesses
# (notebooks, multi-device checks) inherit them. An XLA that does not know a
# flag aborts, so they are tried in a subprocess first.
_FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=0",  # for an XLA without the older ones
)


def _xla_accepts(flags: str) -> bool:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
  return subprocess.run([sys.executable, "-c", probe], env=env,
                        capture_output=True, check=False).returncode == 0


# Set once, by the first process; pytest-xdist's workers inherit them.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  for fast in _FAST_COMPILE:
    flags = (os.environ.get("XLA_FLAGS", "") + " " + fast).strip()
    if _xla_accepts(flags):
      os.environ["XLA_FLAGS"] = flags
      break

import hypothesis  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

hypothesis.settings.register_profile(
    "jaxmha", derandomize=True, deadline=None, max_examples=25,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile("jaxmha")


def pytest_generate_tests(metafunc):
  """Parametrizes the conformance suite from each subclass's case lists."""
  cls = metafunc.cls
  for fixture, attr in (("case", "CASES"), ("grad_case", "GRAD_CASES"),
                        ("dropout_case", "DROPOUT_CASES")):
    if fixture in metafunc.fixturenames and cls is not None:
      cases = getattr(cls, attr)
      metafunc.parametrize(fixture, cases, ids=[c.id for c in cases])
