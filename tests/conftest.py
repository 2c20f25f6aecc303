"""Test setup: Keras on the JAX backend, derandomized hypothesis, fp32 matmuls,
and XLA's CPU code generated without LLVM's optimizations."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

# The suite compiles hundreds of small programs and runs each a few times:
# LLVM's optimization passes took about a third of its time. Level 0 keeps
# XLA's own (HLO) passes and IEEE float semantics, so the numbers the tests
# check are those of the default level up to FMA contraction. Read when the
# CPU backend starts, so it must be set before the first computation;
# subprocesses (notebooks, multi-device checks) inherit it.
_NO_LLVM_OPT = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _NO_LLVM_OPT).strip()

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
