"""What ring attention compiles to: shapes, collectives, memory.

Shape letters: B batch, T = S sequence length (global), N heads, H head dim,
P devices on the ring axis, ``Tl = T / P``.

* No device's compiled program (forward and backward) holds an array with
  the global length S: K/V only ever exist in ``Sl``-blocks. A gathered
  baseline (``all_gather`` K/V, then attention) is the positive control.
* The collectives: only ``collective-permute``, one per rotated array per
  ring step: K and V forward; K, V, dK and dV backward (plus the key segment
  ids when given). No all-gather, all-reduce or all-to-all.
* Compiled memory per device (``memory_analysis``): ring below gathered.

``python -m tests.multidevice.hlo_checks memory_report`` prints the
memory table at T=32768, B=1, N=8, H=64 on 8 devices.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jaxmha
import pallas_kernels
from tests.multidevice.harness import check, main

AUTO = jax.sharding.AxisType.Auto
SEQ = P(None, "seq")
OTHER_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all",
                     "reduce-scatter", "collective-broadcast")


def _mesh(n: int):
  return jax.make_mesh((n,), ("seq",), axis_types=(AUTO,),
                       devices=jax.devices()[:n])


def _ring(n: int, causal: bool, with_ids: bool):
  def body(q, k, v, ids):
    return jaxmha.ring_attention(q, k, v, axis_name="seq", causal=causal,
                                 segment_ids=ids if with_ids else None,
                                 backend="xla")
  return jax.shard_map(body, mesh=_mesh(n), in_specs=(SEQ,) * 4,
                       out_specs=SEQ, check_vma=False)


def _gathered(n: int):
  """The baseline: every device gathers the whole K/V, then attends."""
  def body(q, k, v, ids):
    del ids
    k = jax.lax.all_gather(k, "seq", axis=1, tiled=True)  # (B, S, K, H)
    v = jax.lax.all_gather(v, "seq", axis=1, tiled=True)
    return pallas_kernels.flash_attention(q, k, v, backend="xla")
  return jax.shard_map(body, mesh=_mesh(n), in_specs=(SEQ,) * 4,
                       out_specs=SEQ, check_vma=False)


def _compile(fn, B, T, N, H, dtype=jnp.float32, grad=False):
  x = jax.ShapeDtypeStruct((B, T, N, H), dtype)
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
  if grad:
    forward = fn
    loss = lambda q, k, v, ids: jnp.sum(forward(q, k, v, ids).astype(
        jnp.float32))
    fn = jax.grad(loss, argnums=(0, 1, 2))
  return jax.jit(fn).lower(x, x, x, ids).compile()


def _computations(hlo: str) -> dict[str, list[str]]:
  """HLO text split into ``{computation name: instruction lines}``."""
  comps, name = {}, None
  for line in hlo.splitlines():
    start = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if start:
      name = start.group(1)
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def _op_count(lines, op: str) -> int:
  return sum(bool(re.search(rf"\s{op}(-start)?\(", line)) for line in lines)


def collectives(compiled) -> dict:
  """Collective-permutes per while-loop body, and in all; other collectives."""
  hlo = compiled.as_text()
  comps = _computations(hlo)
  loops = []
  for lines in comps.values():
    for line in lines:
      body = re.search(r"\swhile\(.*body=%?([\w.\-]+)", line)
      if body:
        count = _op_count(comps[body.group(1)], "collective-permute")
        if count:
          loops.append(count)
  return {
      "loop_bodies": sorted(loops),
      "total": _op_count(hlo.splitlines(), "collective-permute"),
      "other": {op: _op_count(hlo.splitlines(), op)
                for op in OTHER_COLLECTIVES
                if _op_count(hlo.splitlines(), op)},
  }


def _has_length(hlo: str, length: int) -> bool:
  """Whether any array shape in ``hlo`` has a dim equal to ``length``."""
  return bool(re.search(rf"\[(?:\d+,)*{length}(?:,\d+)*\]", hlo))


@check
def shapes_and_collectives():
  """A compiled forward+backward per case: its shapes and collectives."""
  n, B, S, N, H = 8, 1, 768, 2, 16  # Sl = 96; 768 appears nowhere else
  for causal, with_ids in ((True, True), (False, False)):
    rotated = 3 if with_ids else 2  # K, V (and the key segment ids)
    compiled = _compile(_ring(n, causal, with_ids), B, S, N, H, grad=True)
    hlo = compiled.as_text()
    found = collectives(compiled)
    what = f"{causal=} {with_ids=}: {found}"
    assert not _has_length(hlo, S), f"{what}: an array of length S={S}"
    assert _has_length(hlo, S // n)
    # Two ring loops (forward, backward), one collective-permute per rotated
    # array per step; backward also rotates the dK, dV accumulators.
    assert found["loop_bodies"] == [rotated, rotated + 2], what
    assert not found["other"], what
  # The shape check can see a gathered K/V.
  assert _has_length(_compile(_gathered(n), B, S, N, H).as_text(), S)


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)
  return {"argument": m.argument_size_in_bytes,
          "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
          "peak": peak}


@check
def ring_needs_less_memory_than_gathered():
  n, B, T, N, H = 8, 1, 4096, 4, 32
  ring = memory(_compile(_ring(n, False, False), B, T, N, H, grad=True))
  gathered = memory(_compile(_gathered(n), B, T, N, H, grad=True))
  assert ring["peak"] < gathered["peak"], (ring, gathered)


@check(slow=True)
def memory_report():
  """The table for the report: T=32768, B=1, N=8, H=64 on 8 devices."""
  n, B, T, N, H = 8, 1, 32768, 8, 64
  mib = lambda b: f"{b / 2**20:8.1f}"
  print(f"per-device compiled memory (MiB), B={B} T=S={T} N={N} H={H} "
        f"fp32, P={n} (Tl={T // n}), blockwise XLA per block")
  print(f"{'':22s}{'argument':>9s}{'output':>9s}{'temp':>9s}{'peak':>9s}")
  rows = collections.OrderedDict()
  for grad in (False, True):
    for name, fn in (("ring", _ring(n, False, False)),
                     ("gathered", _gathered(n))):
      compiled = _compile(fn, B, T, N, H, grad=grad)
      m = memory(compiled)
      label = f"{name} {'fwd+bwd' if grad else 'fwd'}"
      rows[label] = m
      print(f"{label:22s}" + "".join(
          f"{mib(m[k]):>9s}" for k in ("argument", "output", "temp",
                                        "peak")))
      if name == "ring":
        print(f"{'':22s}collective-permutes: {collectives(compiled)}")


if __name__ == "__main__":
  main(__name__)
