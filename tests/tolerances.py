"""One tolerance table, by dtype name. Tolerances only ever tighten."""

import jax.numpy as jnp
import numpy as np

# Forward outputs and LSE against the fp32 reference.
FORWARD = {
    "float32": dict(atol=2e-5, rtol=2e-5),
    "bfloat16": dict(atol=2e-2, rtol=2e-2),
    "float16": dict(atol=4e-3, rtol=4e-3),
}
# Gradients (dq, dk, dv; params) against the fp32 reference.
GRAD = {
    "float32": dict(atol=5e-5, rtol=5e-5),
    "bfloat16": dict(atol=5e-2, rtol=5e-2),
    "float16": dict(atol=1e-2, rtol=1e-2),
}
# Keras parity (same weights, same inputs, fp32).
KERAS = dict(atol=1e-5, rtol=1e-5)


def assert_close(actual, expected, table=FORWARD, dtype=jnp.float32,
                 err_msg=""):
  """Compares in fp32 with ``table``'s tolerance for ``dtype``."""
  tol = table[jnp.dtype(dtype).name] if "float32" in table else table
  np.testing.assert_allclose(np.asarray(actual, np.float32),
                             np.asarray(expected, np.float32),
                             err_msg=err_msg, **tol)
