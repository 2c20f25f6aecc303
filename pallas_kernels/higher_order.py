"""Second and higher derivatives through the paths' ``jax.custom_vjp`` rules.

The blockwise path and the flash kernels are ``jax.custom_vjp`` functions.
Their forward and backward rules run Pallas kernels, or loops whose bounds
are traced (blocks that masks rule out are skipped): JAX runs those, but
cannot differentiate them in reverse mode, and not kernels at all. A second
derivative differentiates the rules themselves: ``jax.grad`` of
``jax.grad`` (gradient penalties, MAML), ``jax.hessian``, ``jax.jvp`` of
``jax.grad``.

:func:`differentiated_as` wraps a rule so that it still runs its own code
for its values, while every derivative of it is that of the pure-JAX
reference (:mod:`pallas_kernels.reference`), which materialises the
``(B, N, T, S)`` scores. First derivatives keep the paths' speed and memory;
second ones cost what the fused XLA path's do. The rules compute the same
function as the reference, so the derivatives are those of the function
the path computes.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels import masks as masks_lib
from pallas_kernels import reference as reference_lib


def differentiated_as(reference: Callable, fast: Callable) -> Callable:
  """``fast``, whose derivatives of every order and mode are
  ``reference``'s.

  Args:
    reference: a differentiable function of the same arguments, computing
      the same values (up to rounding) in the same tree of outputs.
    fast: the function that computes the values.

  Returns:
    A ``jax.custom_jvp`` function of ``fast``'s arguments (arrays or pytrees
    of them; integer and boolean leaves get no tangent). Its tangents are
    cast to the dtypes of ``fast``'s outputs.
  """
  wrapped = jax.custom_jvp(fast)

  @wrapped.defjvp
  def jvp(primals, tangents):
    # The values come from `wrapped` itself, so that a third derivative
    # finds the same rule again.
    out = wrapped(*primals)
    _, out_dot = jax.jvp(reference, primals, tangents)
    return out, jax.tree.map(lambda t, x: t.astype(x.dtype), out_dot, out)

  return wrapped


def prepared(q, k, v, spec: masks_lib.MaskSpec, data: masks_lib.MaskData,
             scale: float, dropout_rate: float,
             seeds: Optional[jax.Array]) -> common.Prepared:
  """The :class:`~pallas_kernels.common.Prepared` of a call on ``q (B, T, N,
  H)``, ``k (B, S, K, H)`` and ``v (B, S, K, Hv)``, from the parts a path
  keeps."""
  return common.Prepared(problem=common.check_qkv(q, k, v), spec=spec,
                         data=data, scale=scale, dropout_rate=dropout_rate,
                         seeds=seeds if dropout_rate > 0.0 else None)


def reference_grads(q, k, v, prep: common.Prepared, d_out, d_lse):
  """``(dq, dk, dv)`` of :func:`reference.attention_core` at ``q, k, v``
  for the cotangents ``d_out (B, T, N, Hv)`` and ``d_lse (B, N, T)``."""
  (out, lse), vjp = jax.vjp(
      lambda q, k, v: reference_lib.attention_core(q, k, v, prep), q, k, v)
  return vjp((jnp.asarray(d_out, out.dtype), jnp.asarray(d_lse, lse.dtype)))
