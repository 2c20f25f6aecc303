"""Test setup: Keras on the JAX backend, derandomized hypothesis, fp32 matmuls."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

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
