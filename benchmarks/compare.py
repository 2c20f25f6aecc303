"""Side-by-side timing, FLOP rate and memory of multi-head attention in JAX.

Shape letters: B batch, T query length, S key/value length (``S = T``: self
attention), N heads, H head dim, D model features.

Compares, under ``jax.jit`` on the same inputs:

* ``jaxmha``: the default dispatch, and each XLA path forced with
  :func:`jaxmha.dispatch.use_path` (``jaxmha[xla]``, ``jaxmha[xla_blockwise]``);
* ``keras``: Keras 3's ``MultiHeadAttention`` on the JAX backend, built once
  and run through ``layer.stateless_call`` with its weights as arguments;
* ``flax``: ``flax.linen.MultiHeadDotProductAttention``;
* ``jax.nn.dpa[xla]``: einsum projections around
  ``jax.nn.dot_product_attention(implementation="xla")`` (and ``[cudnn]``, in
  bf16, on GPU).

Two scopes (the full layer: projections, attention and output projection;
the attention core alone), two modes (forward; forward and backward: the
gradient of a squared error against a random target with respect to every
argument, params and input or q, k and v, as in a training step),
full and causal masks. Every implementation of one configuration is compiled
and warmed up first; then each round runs every implementation once, in an
order shuffled anew each round (:mod:`benchmarks.rounds`), so that load from
other processes falls on all of them alike. Times are medians over rounds.
A large fp32 matmul runs in the same rounds and gives the machine's matmul
rate.

Memory is XLA's compiled estimate (``memory_analysis()``: temp + argument +
output bytes). The longest-trainable-sequence sweep compiles the layer's
forward and backward at ``B=1`` for ``T`` doubling until that estimate
passes a limit, then runs the largest lengths that fit in a subprocess,
which reports wall time and peak RSS growth.

Each timed call also counts the process's minor page faults (first touches
of freshly mapped memory). XLA:CPU allocates a call's temporaries as one
buffer, and glibc's ``malloc`` maps a buffer larger than 32 MiB afresh on
every call, so a program whose temporaries pass 32 MiB faults in each 4 KiB
page of them on every call (about 1 us a page on the machine of
``benchmarks/results``). Users' programs pay that cost too, so it stays in
the times; the count shows where it falls. ``GLIBC_TUNABLES`` is recorded
with the results: with ``glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:``
``glibc.malloc.trim_threshold=4000000000`` nothing faults after the first
call (``benchmarks/results/no_page_faults``): read the ratios within such a
run, as the shared machine's speed moves between runs.

Run::

  python -m benchmarks.compare            # full grid, ~25 min on 2 CPU cores
  python -m benchmarks.compare --quick    # T in {256, 1024, 2048}
  python -m benchmarks.compare --smoke --out /tmp/bench   # < 30 s, for CI

It writes ``compare.json``, ``compare.md`` and ``compare.png`` under ``--out``
(default ``benchmarks/results``) and prints PASS/FAIL for each target.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
try:
  import resource  # noqa: E402
except ImportError:  # not on Windows
  resource = None
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxmha  # noqa: E402
from benchmarks import rounds as rounds_lib  # noqa: E402
from benchmarks import shapes  # noqa: E402
from jaxmha import dispatch  # noqa: E402
from pallas_kernels import common  # noqa: E402

_MIB = 2.0**20
_GIB = 2.0**30
_RSS_OVER_ESTIMATE = 1.6
_REFERENCE = "keras"
_DEFAULT = "jaxmha"
_MATMUL = "matmul"
SCOPES = ("layer", "core")
MODES = ("fwd", "fwd+bwd")
MASKS = ("full", "causal")
_DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "results")


# -- settings -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one run measures.

  Attributes:
    name: ``full``, ``quick`` or ``smoke``.
    seq_lengths: the grid's ``T`` (``S = T``).
    batches: the grid's ``B``.
    max_tokens: a ``(B, T)`` point runs only if ``B * T`` is at most this
      (keeps the largest batches to the shorter sequences).
    D, N, H: model features, heads, head dim.
    rounds: timed rounds per configuration, at least; a configuration
      whose round is short gets more, up to ``max_rounds`` or
      ``round_budget_s`` of timed rounds (the short ones are the noisy
      ones on a shared machine).
    max_rounds, round_budget_s: see ``rounds``.
    min_sample_s: a timed sample repeats a call until it lasts this long.
    matmul_size: the ``M`` of the ``(M, M) @ (M, M)`` matmul-rate probe.
    max_run_gib: never run a program whose compiled estimate exceeds this
      (nor 60% of the memory available when it would start).
    sweep_start, sweep_cap: the sweep's first and largest ``T``.
    sweep_limit_gib: the sweep stops once the estimate passes this.
    sweep_run_max_t: the longest ``T`` the sweep actually runs.
    sweep_confirm: how many of the largest fitting lengths it runs.
    sweep_timeout_s: time limit of one sweep run.
    sweep_impls: the implementations the sweep covers (None: all).
    scopes, modes: which scopes and modes the grid measures.
    cover_once: measure each (scope, mode) pair at one (T, mask), chosen
      so that every length and mask still appears (the smoke run: a
      quarter of the compiles).
  """

  name: str
  seq_lengths: tuple
  batches: tuple
  max_tokens: int
  D: int = shapes.LAYER_D
  N: int = shapes.LAYER_N
  H: int = shapes.LAYER_H
  rounds: int = 3
  max_rounds: int = 15
  round_budget_s: float = 20.0
  min_sample_s: float = 0.05
  matmul_size: int = 2048
  max_run_gib: float = 12.0
  sweep_start: int = shapes.SWEEP_START_LENGTH
  sweep_cap: int = shapes.SWEEP_MAX_LENGTH
  sweep_limit_gib: float = 20.0
  sweep_run_max_t: int = shapes.SWEEP_REQUIRED_LENGTH
  sweep_confirm: int = 2
  sweep_timeout_s: float = 3 * 3600.0
  sweep_impls: Optional[tuple] = None
  cover_once: bool = False
  scopes: tuple = SCOPES
  modes: tuple = MODES


FULL = Settings(name="full", seq_lengths=shapes.LAYER_SEQ_LENGTHS,
                batches=shapes.LAYER_BATCHES, max_tokens=4096)
QUICK = Settings(name="quick", seq_lengths=shapes.LAYER_QUICK_SEQ_LENGTHS,
                 batches=shapes.LAYER_BATCHES, max_tokens=4096,
                 sweep_run_max_t=16384, sweep_confirm=1)
SMOKE = Settings(name="smoke", seq_lengths=shapes.LAYER_SMOKE_SEQ_LENGTHS,
                 batches=(1,), max_tokens=1 << 30, D=shapes.SMOKE_D,
                 N=shapes.SMOKE_N, H=shapes.SMOKE_H, rounds=2, max_rounds=2,
                 min_sample_s=0.002, matmul_size=256, max_run_gib=1.0,
                 sweep_start=256, sweep_cap=512, sweep_limit_gib=1.0,
                 sweep_run_max_t=512, sweep_confirm=1, sweep_timeout_s=120.0,
                 sweep_impls=(_DEFAULT,), cover_once=True)


def flops(scope: str, mode: str, causal: bool, B: int, T: int, N: int,
          H: int, D: int) -> float:
  """Nominal FLOPs: attention ``4 B N T S H`` (halved when causal), plus
  the four projections ``2 B T D N H`` each for the layer; the backward
  counts twice the forward."""
  attention = 4.0 * B * N * T * T * H * (0.5 if causal else 1.0)
  projections = 2.0 * B * T * D * N * H * 4 if scope == "layer" else 0.0
  return (attention + projections) * (3.0 if mode == "fwd+bwd" else 1.0)


# -- implementations ----------------------------------------------------------


@dataclasses.dataclass
class Models:
  """Weights built once per run: jaxmha's params (also used by the einsum
  MHA: same layout), the built Keras layer and its weights, Flax's."""
  cfg: Any
  params: dict
  keras_layer: Any = None
  keras_weights: Any = None
  flax_module: Any = None
  flax_variables: Any = None

  @classmethod
  def build(cls, D: int, N: int, H: int, need=("keras", "flax")):
    cfg = jaxmha.MHAConfig(num_heads=N, key_dim=H)
    x = np.zeros((1, 4, D), np.float32)
    params = jaxmha.init_params(jax.random.key(1), cfg, x.shape, x.shape)
    models = cls(cfg=cfg, params=params)
    if "keras" in need:
      import keras  # pylint: disable=g-import-not-at-top
      if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras must run on the JAX backend; got "
                           f"KERAS_BACKEND={keras.backend.backend()!r}.")
      layer = keras.layers.MultiHeadAttention(num_heads=N, key_dim=H)
      layer(x, x)  # builds
      models.keras_layer = layer
      models.keras_weights = (
          [jnp.asarray(v.value) for v in layer.trainable_variables],
          [jnp.asarray(v.value) for v in layer.non_trainable_variables])
    if "flax" in need:
      from flax import linen as nn  # pylint: disable=g-import-not-at-top
      module = nn.MultiHeadDotProductAttention(num_heads=N,
                                               qkv_features=N * H)
      models.flax_module = module
      models.flax_variables = module.init(jax.random.key(2), x, x)
    return models


def _forced(path: Optional[str]):
  return (dispatch.use_path(path) if path is not None
          else contextlib.nullcontext())


def _jaxmha_layer(path, models, causal):
  cfg = models.cfg

  def fn(params, x):  # x: (B, T, D)
    with _forced(path):  # active while jit traces fn
      return jaxmha.apply(params, cfg, x, x, use_causal_mask=causal)
  return fn, models.params


def _jaxmha_core(path, causal):
  def fn(q, k, v):  # (B, T, N, H)
    with _forced(path):
      prep = common.prepare(q, k, v, causal=causal)
      req = dispatch.Request(
          q=q, k=k, v=v, prep=prep, need_probs=False,
          flash=dispatch.effective_flash_preference(None),
          platform=jax.default_backend())
      out, _, _ = dispatch.attend(req)
    return out  # (B, T, N, H)
  return fn


def _keras_layer(models, causal):
  layer = models.keras_layer
  trainable, non_trainable = models.keras_weights

  def fn(weights, x):
    out, _ = layer.stateless_call(weights, non_trainable, x, x,
                                  use_causal_mask=causal)
    return out  # (B, T, D)
  return fn, trainable


def _keras_core(models, causal):
  layer = models.keras_layer

  def fn(q, k, v):
    # The layer's own attention step (ops.dot_product_attention, which is
    # jax.nn.dot_product_attention on this backend).
    kwargs = {"use_causal_mask": True} if causal else {}
    out, _ = layer._compute_attention(q, k, v, None, False, False, **kwargs)  # pylint: disable=protected-access
    return out
  return fn


def _flax_mask(x, causal):
  if not causal:
    return None
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  return nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))  # (B,1,T,T)


def _flax_layer(models, causal):
  module = models.flax_module

  def fn(variables, x):
    return module.apply(variables, x, x, mask=_flax_mask(x, causal),
                        deterministic=True)
  return fn, models.flax_variables


def _flax_core(models, causal):
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  def fn(q, k, v):
    return nn.dot_product_attention(q, k, v, mask=_flax_mask(q, causal),
                                    deterministic=True)
  return fn


def _dpa(implementation, q, k, v, causal):
  if implementation == "cudnn":
    # cuDNN's fused attention takes fp16/bf16 only.
    out = jax.nn.dot_product_attention(
        q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
        v.astype(jnp.bfloat16), is_causal=causal, implementation="cudnn")
    return out.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                      implementation=implementation)


def _dpa_layer(implementation, models, causal):
  def fn(p, x):
    def dense(name):
      y = jnp.einsum("btd,dnh->btnh", x, p[name]["kernel"])
      return y + p[name]["bias"]  # (B, T, N, H)
    out = _dpa(implementation, dense("query"), dense("key"), dense("value"),
               causal)  # (B, T, N, H)
    o = p["attention_output"]
    return jnp.einsum("btnh,nhd->btd", out, o["kernel"]) + o["bias"]
  return fn, models.params


@dataclasses.dataclass(frozen=True)
class Impl:
  """One implementation: how to build its layer and its attention core.

  Attributes:
    name: the label in tables.
    layer: ``(models, causal) -> (fn(weights, x (B, T, D)), weights)``.
    core: ``(models, causal) -> fn(q, k, v)``, all ``(B, T, N, H)``.
    path: the jaxmha path it forces (None: not jaxmha, or the default).
    needs: which of :class:`Models`' weights it needs.
  """
  name: str
  layer: Callable
  core: Callable
  path: Optional[str] = None
  needs: tuple = ()


def implementations() -> tuple:
  impls = [
      Impl(_REFERENCE, _keras_layer, _keras_core, needs=("keras",)),
      Impl(_DEFAULT, functools.partial(_jaxmha_layer, None),
           lambda m, c: _jaxmha_core(None, c)),
  ]
  for path in ("xla", "xla_blockwise"):
    impls.append(Impl(f"jaxmha[{path}]",
                      functools.partial(_jaxmha_layer, path),
                      lambda m, c, path=path: _jaxmha_core(path, c),
                      path=path))
  impls.append(Impl("flax", _flax_layer, _flax_core, needs=("flax",)))
  impl_names = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
  for name in impl_names:
    impls.append(Impl(
        f"jax.nn.dpa[{name}]", functools.partial(_dpa_layer, name),
        lambda m, c, name=name: (lambda q, k, v: _dpa(name, q, k, v, c))))
  return tuple(impls)


def default_path(models, B: int, T: int, causal: bool) -> str:
  """The path jaxmha's default dispatch takes for the layer (and core)."""
  x = jax.ShapeDtypeStruct((B, T, models.params["query"]["kernel"].shape[0]),
                           jnp.float32)
  return jaxmha.explain(models.cfg, x, x, use_causal_mask=causal).path


# -- programs -----------------------------------------------------------------


def loss_gradient(fn):
  """The gradient of ``0.5 * sum((fn(*args) - target)**2)`` with respect to
  every argument of ``fn``, taking ``target`` as one more argument.

  This is a training step's backward: it starts from the forward's output.
  A bare VJP with the output's cotangent given as an input is not: XLA may
  then run the backward's matmuls that need only inputs and that cotangent
  (``dP = dO V^T``, the recomputed scores) during the forward, and keep
  more memory live. Measured on the layer at B=4, T=256 (fp32, N=8, H=64,
  D=512): jaxmha's compiled temporaries are 38 MiB as a VJP and 28 MiB as
  a loss gradient, Keras's 45 and 39 MiB.
  """
  def grad_fn(*args):
    *args, target = args
    loss = lambda *a: 0.5 * jnp.sum(jnp.square(fn(*a) - target))
    return jax.grad(loss, argnums=tuple(range(len(args))))(*args)
  return grad_fn


def program(impl: Impl, models: Models, scope: str, mode: str, causal: bool,
            B: int, T: int, *, abstract: bool = False, seed: int = 0):
  """``(jitted function, arguments)`` of one configuration.

  With ``abstract``, the activations are ``ShapeDtypeStruct`` (for compiling
  only); weights are always real arrays.
  """
  D, N, H = models.params["query"]["kernel"].shape
  keys = jax.random.split(jax.random.key(seed), 4)

  def array(key, shape):
    if abstract:
      return jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.random.normal(key, shape, jnp.float32)

  if scope == "layer":
    fn, weights = impl.layer(models, causal)
    args = (weights, array(keys[0], (B, T, D)))  # x: (B, T, D)
    out_shape = (B, T, D)
  else:
    fn = impl.core(models, causal)
    args = tuple(array(k, (B, T, N, H)) for k in keys[:3])  # q, k, v
    out_shape = (B, T, N, H)
  if mode == "fwd+bwd":
    fn = loss_gradient(fn)
    args = args + (array(keys[3], out_shape),)  # the loss's target
  return jax.jit(fn), args


def memory(compiled) -> dict:
  """XLA's compiled memory estimate, in bytes."""
  try:
    ma = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"}
  if ma is None:
    return {"error": "memory_analysis() returned None"}
  out = {name: int(getattr(ma, f"{name}_size_in_bytes", 0) or 0)
         for name in ("temp", "argument", "output", "alias",
                      "generated_code")}
  out["peak"] = out["temp"] + out["argument"] + out["output"]
  return out


def _mem_available() -> float:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return float("inf")


def _fits(peak_bytes: float, settings: Settings) -> Optional[str]:
  """None if a program of this estimate may run now, else why not."""
  limit = min(settings.max_run_gib * _GIB, 0.6 * _mem_available())
  if peak_bytes > limit:
    return (f"skipped: estimate {peak_bytes / _GIB:.1f} GiB > "
            f"{limit / _GIB:.1f} GiB allowed now")
  return None


@functools.lru_cache(maxsize=None)
def _matmul_program(M: int):
  a = jax.random.normal(jax.random.key(7), (M, M), jnp.float32)
  b = jax.random.normal(jax.random.key(8), (M, M), jnp.float32)
  return jax.jit(jnp.dot).lower(a, b).compile(), (a, b)


# -- timing -------------------------------------------------------------------


def _minor_faults() -> int:
  """This process's minor page faults so far (0 where not counted)."""
  if resource is None:
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sample(call, reps: int) -> float:
  """Seconds per call: ``reps`` calls, then wait for the last result."""
  start = time.perf_counter()
  out = None
  for _ in range(reps):
    out = call()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def measure_config(settings: Settings, models: Models, impls, scope: str,
                   mode: str, B: int, T: int, causals, log) -> list:
  """Compiles, warms up and times every implementation of one config.

  Both masks (``causals``) run in the same rounds, so that their ratio is
  measured under the same load. Returns one result per mask.
  """
  D, N, H = settings.D, settings.N, settings.H
  paths = {causal: default_path(models, B, T, causal) for causal in causals}
  has_default = any(impl.name == _DEFAULT for impl in impls)
  entries, runners = {}, {}
  round_s = 0.0  # the expected length of one timed round
  for causal in causals:
    path = paths[causal]
    for impl in impls:
      key = (impl.name, causal)
      # A forced path equal to the default's is the same program: time once.
      if has_default and impl.path is not None and impl.path == path:
        entries[key] = {"alias_of": _DEFAULT}
        continue
      entry = entries[key] = {"path": impl.path or (
          path if impl.name == _DEFAULT else None)}
      try:
        jitted, args = program(impl, models, scope, mode, causal, B, T)
        start = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        entry["compile_s"] = time.perf_counter() - start
        entry["memory"] = memory(compiled)
        why = _fits(entry["memory"].get("peak", 0), settings)
        if why:
          entry["skipped"] = why
          continue
        call = functools.partial(compiled, *args)
        per_call = _sample(call, 1)  # warm-up: allocation, first-touch
        if per_call < 1.0:
          per_call = min(per_call, _sample(call, 1))
        reps = max(1, min(50, math.ceil(settings.min_sample_s /
                                        max(per_call, 1e-6))))
        entry["reps"] = reps
        runners[key] = (call, reps)
        round_s += reps * per_call
      except Exception as e:  # pylint: disable=broad-except
        entry["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        log(f"  {impl.name}: {entry['error']}")
  mm_compiled, mm_args = _matmul_program(settings.matmul_size)
  mm_call = functools.partial(mm_compiled, *mm_args)
  round_s += _sample(mm_call, 1)
  runners[_MATMUL] = (mm_call, 1)

  rounds = max(settings.rounds, min(
      settings.max_rounds, int(settings.round_budget_s / max(round_s, 1e-6))))
  times = {key: [] for key in runners}
  faults = {key: [] for key in runners}
  for order in rounds_lib.orders(list(runners), rounds):
    for key in order:
      call, reps = runners[key]
      before = _minor_faults()
      times[key].append(_sample(call, reps))
      faults[key].append((_minor_faults() - before) / reps)
  del runners

  M = settings.matmul_size
  mm_rates = [2.0 * M**3 / t / 1e9 for t in times.pop(_MATMUL)]
  mm_rate = float(np.median(mm_rates))
  results = []
  for causal in causals:
    work = flops(scope, mode, causal, B, T, N, H, D)
    ref = times.get((_REFERENCE, causal))
    out = {}
    for impl in impls:
      e = out[impl.name] = entries[(impl.name, causal)]
      ts = times.get((impl.name, causal))
      if not ts:
        continue
      e["times_ms"] = [t * 1e3 for t in ts]
      e["median_ms"] = float(np.median(ts) * 1e3)
      e["faults_per_call"] = float(np.median(faults[(impl.name, causal)]))
      e["gflops"] = work / float(np.median(ts)) / 1e9
      e["pct_matmul"] = 100.0 * e["gflops"] / mm_rate
      if ref:
        e["speedup_vs_keras"] = float(np.median(ref) / np.median(ts))
        # Paired by round (same load): the spread says how noisy it was.
        e["paired_speedup"] = [float(p) for p in
                               np.asarray(ref) / np.asarray(ts)]
    for name, e in out.items():
      if "alias_of" in e:
        out[name] = dict(out[e["alias_of"]], alias_of=e["alias_of"],
                         path=paths[causal])
    results.append({
        "scope": scope, "mode": mode, "mask": "causal" if causal else "full",
        "B": B, "T": T, "rounds": rounds, "default_path": paths[causal],
        "flops": work,
        "matmul_gflops": mm_rate, "matmul_gflops_rounds": mm_rates,
        "impls": out})
  return results


def grid(settings: Settings):
  """``(scope, mode, B, T, causals)`` of every configuration to measure."""
  lengths = settings.seq_lengths
  for s, scope in enumerate(SCOPES):
    for m, mode in enumerate(MODES):
      if scope not in settings.scopes or mode not in settings.modes:
        continue
      for B in settings.batches:
        for T in lengths:
          if B * T > settings.max_tokens:
            continue
          if settings.cover_once:
            if T != lengths[(s + m) % len(lengths)]:
              continue
            yield scope, mode, B, T, (MASKS[m % len(MASKS)] == "causal",)
          else:
            yield scope, mode, B, T, (False, True)


# -- longest trainable sequence ---------------------------------------------


def _rss_mib() -> dict:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(("VmRSS:", "VmHWM:")):
        key, value = line.split(":")
        out[key] = float(value.split()[0]) / 1024
  return out


def worker(spec: dict) -> dict:
  """Runs one program once in this (fresh) process; reports wall time and
  peak RSS growth over the RSS just before the call."""
  impl = {i.name: i for i in implementations()}[spec["impl"]]
  models = Models.build(spec["D"], spec["N"], spec["H"], need=impl.needs)
  jitted, args = program(impl, models, spec["scope"], spec["mode"],
                         spec["causal"], spec["B"], spec["T"])
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(args)
  base = _rss_mib()["VmRSS"]
  try:
    # Resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    hwm_reset = True
  except OSError:
    hwm_reset = False
  start = time.perf_counter()
  out = compiled(*args)
  jax.block_until_ready(out)
  wall = time.perf_counter() - start
  finite = bool(all(jnp.isfinite(x).all() for x in jax.tree.leaves(out)))
  peak = _rss_mib()["VmHWM"]
  return {"ok": True, "wall_s": wall, "compile_s": compile_s,
          "rss_base_mib": base, "rss_peak_mib": peak,
          "rss_growth_mib": peak - base, "hwm_reset": hwm_reset,
          "finite": finite, "memory": memory(compiled)}


def _run_worker(spec: dict, timeout_s: float) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.compare", "--worker",
         json.dumps(spec)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, KERAS_BACKEND="jax")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (root, env.get("PYTHONPATH")) if p)
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
  elapsed = time.perf_counter() - start
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      result = json.loads(line)
      result["process_s"] = elapsed
      return result
  error = (proc.stderr or proc.stdout)[-1500:]
  if proc.returncode < 0:
    error = f"killed by signal {-proc.returncode}" + (
        " (out of memory?)" if proc.returncode == -9 else "") + (
            f": {error}" if error else "")
  return {"ok": False, "returncode": proc.returncode, "error": error}


def linear_fit(xs, ys) -> dict:
  """Least-squares ``y = slope x + intercept`` and its R^2."""
  x, y = np.asarray(xs, float), np.asarray(ys, float)
  if len(x) < 2:
    return {}
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (slope * x + intercept)
  total = np.sum((y - y.mean())**2)
  r2 = 1.0 - np.sum(residual**2) / total if total > 0 else 1.0
  # The exponent of y ~ x^p over the last doubling (1: linear, 2: quadratic).
  p = (math.log(y[-1] / y[-2]) / math.log(x[-1] / x[-2])
       if y[-2] > 0 and y[-1] > 0 else float("nan"))
  return {"slope": float(slope), "intercept": float(intercept),
          "r2": float(r2), "exponent_last_doubling": p, "n": len(x)}


def sweep(settings: Settings, models: Models, impls, log) -> dict:
  """Longest trainable sequence: forward and backward of the layer, B=1."""
  limit = settings.sweep_limit_gib * _GIB
  results = {}
  paths_seen = {}
  for impl in impls:
    if settings.sweep_impls and impl.name not in settings.sweep_impls:
      continue
    points = []
    T = settings.sweep_start
    while T <= settings.sweep_cap:
      jitted, args = program(impl, models, "layer", "fwd+bwd", False, 1, T,
                             abstract=True)
      try:
        start = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        mem = memory(compiled)
        del compiled
      except Exception as e:  # pylint: disable=broad-except
        points.append({"T": T, "error": f"{type(e).__name__}: {e}"[:300]})
        break
      path = None  # the jaxmha path that serves this length
      if impl.name.startswith("jaxmha"):
        path = impl.path or default_path(models, 1, T, False)
      points.append({"T": T, "memory": mem, "path": path,
                     "fits": mem.get("peak", math.inf) <= limit,
                     "compile_s": time.perf_counter() - start})
      if not points[-1]["fits"]:
        break
      T *= 2
    fitting = [p for p in points if p.get("fits")]
    entry = {"points": points,
             "longest_fitting_T": fitting[-1]["T"] if fitting else None}
    # The fit takes every compiled length, the first over the limit too.
    compiled_points = [p for p in points if "memory" in p]
    if len(compiled_points) >= 2:
      Ts = [p["T"] for p in compiled_points]
      entry["temp_fit"] = linear_fit(Ts, [p["memory"]["temp"]
                                          for p in compiled_points])
      entry["peak_fit"] = linear_fit(Ts, [p["memory"]["peak"]
                                          for p in compiled_points])
    # Confirm runs: the largest lengths that fit (and that we are willing to
    # wait for), each in a fresh subprocess, unless the same jaxmha path
    # already ran at that length.
    runs = [p for p in fitting if p["T"] <= settings.sweep_run_max_t]
    entry["runs"] = []
    for p in runs[-settings.sweep_confirm:]:
      key = (p["path"], p["T"]) if p["path"] else None
      if key in paths_seen:
        entry["runs"].append({"T": p["T"], "alias_of": paths_seen[key]})
        continue
      # The estimate misses some of the RSS of the materialising paths
      # (measured: 1.2-1.6x at T=8192), so leave that much headroom.
      need = _RSS_OVER_ESTIMATE * p["memory"]["peak"]
      available = _mem_available()
      why = None
      if need > 0.8 * available:
        why = (f"skipped: needs ~{need / _GIB:.1f} GiB RSS, "
               f"{available / _GIB:.1f} GiB available")
      if why:
        entry["runs"].append({"T": p["T"], "ok": False, "skipped": why})
        log(f"  sweep {impl.name} T={p['T']}: {why}")
        continue
      spec = {"impl": impl.name, "scope": "layer", "mode": "fwd+bwd",
              "causal": False, "B": 1, "T": p["T"], "D": settings.D,
              "N": settings.N, "H": settings.H}
      log(f"  sweep {impl.name} T={p['T']}: running (estimate "
          f"{p['memory']['peak'] / _MIB:.0f} MiB)")
      run = _run_worker(spec, settings.sweep_timeout_s)
      run["T"] = p["T"]
      entry["runs"].append(run)
      if key is not None:
        paths_seen[key] = impl.name
      log(f"  sweep {impl.name} T={p['T']}: " + (
          f"{run['wall_s']:.1f} s, RSS growth {run['rss_growth_mib']:.0f} MiB"
          if run.get("ok") else f"FAILED {run.get('error', '')[-300:]}"))
    results[impl.name] = entry
    log(f"sweep {impl.name}: longest fitting T={entry['longest_fitting_T']}"
        + (f", temp slope {entry['temp_fit']['slope'] / 1024:.1f} KiB/token "
           f"R2={entry['temp_fit']['r2']:.4f}" if "temp_fit" in entry
           else ""))
  return results


# -- targets ------------------------------------------------------------------


@dataclasses.dataclass
class Check:
  name: str
  status: str  # PASS, FAIL or N/A
  detail: str


def _layer_rows(configs, **match):
  for c in configs:
    if c["scope"] == "layer" and all(c[k] == v for k, v in match.items()):
      yield c


def _pass(ok: bool) -> str:
  return "PASS" if ok else "FAIL"


def check_targets(configs, sweep_results, settings: Settings,
                  noise: float = 0.05) -> list:
  """The issue's targets, from the measurements."""
  checks = []

  def speedups(rows):
    out = []
    for c in rows:
      e = c["impls"].get(_DEFAULT, {})
      if "speedup_vs_keras" in e:
        out.append((e["speedup_vs_keras"], c))
    return out

  def where(c):
    return f"{c['mode']} {c['mask']} B={c['B']} T={c['T']}"

  # 1. >= 2x Keras for T >= 1024, forward and forward+backward, both masks.
  long = speedups(c for c in _layer_rows(configs) if c["T"] >= 1024)
  if long:
    worst = min(long, key=lambda s: s[0])
    fails = [f"{where(c)}: {s:.2f}x" for s, c in long if s < 2.0]
    checks.append(Check(
        "layer >= 2x faster than Keras for T >= 1024 (fwd, fwd+bwd; full, "
        "causal)", _pass(not fails),
        f"min {worst[0]:.2f}x at {where(worst[1])}; {len(long) - len(fails)}"
        f"/{len(long)} meet it" + (f"; below: {', '.join(fails)}"
                                   if fails else "")))
  else:
    checks.append(Check("layer >= 2x faster than Keras for T >= 1024",
                         "N/A", "no T >= 1024 measured"))

  # 2. Causal at most 0.6x the time of full (T >= 1024): layer and core.
  for scope in SCOPES:
    ratios = []
    for c in configs:
      if c["scope"] != scope or c["mask"] != "causal" or c["T"] < 1024:
        continue
      full = [f for f in configs if f["scope"] == scope and
              f["mask"] == "full" and f["mode"] == c["mode"] and
              f["B"] == c["B"] and f["T"] == c["T"]]
      ec = c["impls"].get(_DEFAULT, {})
      ef = full[0]["impls"].get(_DEFAULT, {}) if full else {}
      if "median_ms" in ec and "median_ms" in ef:
        ideal = (flops(scope, c["mode"], True, c["B"], c["T"], settings.N,
                       settings.H, settings.D) /
                 flops(scope, c["mode"], False, c["B"], c["T"], settings.N,
                       settings.H, settings.D))
        # Both masks ran in the same rounds: the median of per-round ratios.
        paired = np.asarray(ec["times_ms"]) / np.asarray(ef["times_ms"])
        ratios.append((float(np.median(paired)), ideal, c))
    name = f"{scope}: causal <= 0.6x the time of full (T >= 1024)"
    if not ratios:
      checks.append(Check(name, "N/A", "no T >= 1024 measured"))
      continue
    fails = [f"{c['mode']} B={c['B']} T={c['T']}: {r:.2f} (FLOP ratio "
             f"{i:.2f})" for r, i, c in ratios if r > 0.6]
    worst = max(ratios, key=lambda x: x[0])
    checks.append(Check(
        name, _pass(not fails),
        f"max {worst[0]:.2f} at {worst[2]['mode']} B={worst[2]['B']} "
        f"T={worst[2]['T']}" + (f"; above: {', '.join(fails)}"
                                if fails else "")))

  # 3. Never slower than Keras for T <= 256 (within noise).
  short = speedups(c for c in _layer_rows(configs) if c["T"] <= 256)
  if short:
    worst = min(short, key=lambda s: s[0])
    fails = [f"{where(c)}: {s:.2f}x" for s, c in short if s < 1.0 - noise]
    checks.append(Check(
        f"layer never slower than Keras for T <= 256 (speedup >= "
        f"{1 - noise:.2f}, {noise:.0%} noise allowance)", _pass(not fails),
        f"min {worst[0]:.2f}x at {where(worst[1])}" +
        (f"; below: {', '.join(fails)}" if fails else "")))
  else:
    checks.append(Check("layer never slower than Keras for T <= 256", "N/A",
                        "no T <= 256 measured"))

  # 4. Forward+backward at the required length completes (jaxmha default).
  required = shapes.SWEEP_REQUIRED_LENGTH
  entry = (sweep_results or {}).get(_DEFAULT, {})
  runs = [r for r in entry.get("runs", []) if r.get("T") == required]
  name = f"jaxmha fwd+bwd at T={required} (B=1) completes"
  if runs and runs[0].get("ok"):
    r = runs[0]
    checks.append(Check(name, _pass(r.get("finite", False)),
                        f"{r['wall_s']:.1f} s, peak RSS growth "
                        f"{r['rss_growth_mib']:.0f} MiB, finite="
                        f"{r.get('finite')}"))
  elif runs:
    checks.append(Check(name, "FAIL", str(runs[0].get("error") or
                                          runs[0].get("skipped"))[-300:]))
  elif not sweep_results:
    checks.append(Check(name, "N/A", "no sweep in this run"))
  elif settings.sweep_run_max_t < required:
    checks.append(Check(name, "N/A", f"this run ({settings.name}) runs up "
                        f"to T={settings.sweep_run_max_t} only"))
  else:
    checks.append(Check(name, "FAIL", "not run"))

  # 5. Memory grows linearly in T (jaxmha default, compiled temp bytes).
  fit = entry.get("temp_fit")
  name = ("jaxmha memory linear in T (fwd+bwd temp, B=1: >= 3 lengths, "
          "R^2 >= 0.99, last doubling exponent <= 1.2)")
  if fit:
    ok = (fit["n"] >= 3 and fit["r2"] >= 0.99 and
          fit["exponent_last_doubling"] <= 1.2)
    Ts = [p["T"] for p in entry["points"] if "memory" in p]
    checks.append(Check(name, _pass(ok),
                        f"slope {fit['slope'] / 1024:.2f} KiB/token, R^2="
                        f"{fit['r2']:.5f}, exponent "
                        f"{fit['exponent_last_doubling']:.2f}, over T="
                        f"{Ts[0]}..{Ts[-1]}"))
  else:
    checks.append(Check(name, "N/A", "no sweep"))

  # 6. >= 70% of the matmul rate at T >= 2048 (jaxmha default, layer).
  rows = [c for c in _layer_rows(configs) if c["T"] >= 2048 and
          "pct_matmul" in c["impls"].get(_DEFAULT, {})]
  name = ">= 70% of the measured matmul rate at T >= 2048 (jaxmha layer)"
  if rows:
    pcts = [(c["impls"][_DEFAULT]["pct_matmul"], c) for c in rows]
    worst = min(pcts, key=lambda x: x[0])
    fails = [f"{where(c)}: {p:.0f}%" for p, c in pcts if p < 70.0]
    checks.append(Check(name, _pass(not fails),
                        f"min {worst[0]:.0f}% at {where(worst[1])}" +
                        (f"; below: {', '.join(fails)}" if fails else "")))
  else:
    checks.append(Check(name, "N/A", "no T >= 2048 measured"))
  return checks


# -- report -------------------------------------------------------------------


def _impl_order(configs):
  names = []
  for c in configs:
    for name in c["impls"]:
      if name not in names:
        names.append(name)
  return names


def _fmt(x, spec):
  return "" if x is None else format(x, spec)


def summary(result: dict) -> str:
  """One markdown table: per scope, B and T, jaxmha's speedup over Keras
  (forward and forward+backward, full and causal masks) and its causal /
  full time ratio (medians of per-round ratios)."""
  configs = result["configs"]
  lines = ["| scope | B | T | path | fwd full | fwd causal | fwd+bwd full | "
           "fwd+bwd causal | causal/full fwd | causal/full fwd+bwd |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
  keys = sorted({(c["scope"], c["B"], c["T"]) for c in configs},
                key=lambda k: (SCOPES.index(k[0]), k[1], k[2]))
  for scope, B, T in keys:
    found = {(c["mode"], c["mask"]): c for c in configs
             if (c["scope"], c["B"], c["T"]) == (scope, B, T)}
    cells, ratios, path = [], [], ""
    for mode in MODES:
      for mask in MASKS:
        e = found.get((mode, mask), {}).get("impls", {}).get(_DEFAULT, {})
        sp = e.get("speedup_vs_keras")
        cells.append(f"{sp:.2f}x" if sp else "")
        path = path or found.get((mode, mask), {}).get("default_path", "")
      full = found.get((mode, "full"), {}).get("impls", {}).get(_DEFAULT, {})
      causal = found.get((mode, "causal"), {}).get("impls", {}).get(
          _DEFAULT, {})
      if "times_ms" in full and "times_ms" in causal:
        ratio = np.median(np.asarray(causal["times_ms"]) /
                          np.asarray(full["times_ms"]))
        ratios.append(f"{ratio:.2f}")
      else:
        ratios.append("")
    lines.append(f"| {scope} | {B} | {T} | {path} | " + " | ".join(cells) +
                 " | " + " | ".join(ratios) + " |")
  return "\n".join(lines)


def _thousands(x: Optional[float]) -> Optional[float]:
  return None if x is None else x / 1000.0


def markdown(result: dict) -> str:
  s = result["settings"]
  env = result["environment"]
  lines = [
      "# Multi-head attention in JAX: jaxmha vs Keras 3, Flax and "
      "jax.nn.dot_product_attention", "",
      f"Run `{result['command']}` ({s['name']}) on {env['date']}: "
      f"{env['cpu']}"
      + (f" ({env['vector_isa']})" if env.get("vector_isa") else "")
      + f", {env['cores']} cores, jax {env['jax']}, keras "
      f"{env['keras']}, flax {env['flax']}, backend {env['backend']}"
      + (f", GLIBC_TUNABLES={env['glibc_tunables']}"
         if env.get("glibc_tunables") else "")
      + (f", XLA_FLAGS={env['xla_flags']}" if env.get("xla_flags") else "")
      + ".", "",
      f"N={s['N']}, H={s['H']}, D={s['D']}, fp32, self-attention (S=T). "
      f"Times are medians of {s['rounds']} to {s['max_rounds']} interleaved "
      "rounds (more for short configurations; each round runs every "
      "implementation and both masks once, order shuffled; compile and "
      "warm-up excluded); `x Keras` is Keras's median time over this one's "
      "(>1: faster). GFLOP/s counts attention 4BNTSH (halved when causal) "
      "plus projections 2BTDNH x4 (layer only), backward 2x forward; "
      "`% mm` is that over the fp32 matmul rate measured in the same rounds. "
      "`mem` is XLA's compiled estimate (temp + arguments + outputs); "
      "`faults k` is minor page faults per call, in thousands: glibc maps "
      "temporaries over 32 MiB afresh on every call, and each 4 KiB page "
      "faults when first touched.", "",
      f"Matmul rate ({s['matmul_size']}^3 fp32): median "
      f"{result['matmul_gflops']['median']:.1f} GFLOP/s over all rounds "
      f"(range {result['matmul_gflops']['min']:.1f}-"
      f"{result['matmul_gflops']['max']:.1f}; the machine was shared).", "",
      "## Targets", "",
      "| target | result | detail |", "|---|---|---|"]
  for c in result["checks"]:
    lines.append(f"| {c['name']} | **{c['status']}** | {c['detail']} |")
  lines.append("")
  if result["configs"]:
    lines += ["## Summary", "", summary(result), ""]
  configs = result["configs"]
  order = _impl_order(configs)
  for scope in SCOPES:
    for mode in MODES:
      for mask in MASKS:
        rows = [c for c in configs if c["scope"] == scope and
                c["mode"] == mode and c["mask"] == mask]
        if not rows:
          continue
        title = "layer" if scope == "layer" else "attention core"
        lines += [f"## {title}, {'forward' if mode == 'fwd' else 'forward + backward'}, {mask} mask", "",
                  "| B | T | implementation | path | time ms | x Keras | "
                  "GFLOP/s | % mm | mem MiB | faults k | rounds |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in rows:
          for name in order:
            e = c["impls"].get(name)
            if e is None:
              continue
            mem = e.get("memory", {}).get("peak")
            path = e.get("path") or ""
            if "alias_of" in e:
              path += f" (= {e['alias_of']})"
            if "median_ms" not in e:
              why = e.get("skipped") or e.get("error", "")
              lines.append(f"| {c['B']} | {c['T']} | {name} | {path} | "
                           f"{why[:80]} | | | | "
                           f"{_fmt(mem and mem / _MIB, '.1f')} | | |")
              continue
            lines.append(
                f"| {c['B']} | {c['T']} | {name} | {path} | "
                f"{e['median_ms']:.1f} | "
                f"{_fmt(e.get('speedup_vs_keras'), '.2f')} | "
                f"{e['gflops']:.1f} | {e['pct_matmul']:.0f} | "
                f"{_fmt(mem and mem / _MIB, '.1f')} | "
                f"{_fmt(_thousands(e.get('faults_per_call')), '.1f')} | "
                f"{c.get('rounds', '')} |")
        lines.append("")
  sw = result.get("sweep")
  if sw:
    lines += ["## Longest trainable sequence (layer, forward + backward, "
              f"B=1, full mask; limit {s['sweep_limit_gib']:g} GiB)", "",
              "| implementation | longest T within limit | estimate MiB | "
              "temp slope KiB/token | R^2 (n) | exponent (last doubling) | "
              "runs: T, wall s, RSS growth MiB |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, e in sw.items():
      fitting = [p for p in e["points"] if p.get("fits")]
      est = fitting[-1]["memory"]["peak"] / _MIB if fitting else None
      fit = e.get("temp_fit", {})
      runs = []
      for r in e.get("runs", []):
        if "alias_of" in r:
          runs.append(f"T={r['T']}: as {r['alias_of']}")
        elif r.get("ok"):
          runs.append(f"T={r['T']}: {r['wall_s']:.1f} s, "
                      f"{r['rss_growth_mib']:.0f} MiB")
        else:
          runs.append(f"T={r['T']}: {(r.get('skipped') or 'failed')[:60]}")
      lines.append(
          f"| {name} | {e['longest_fitting_T']} | {_fmt(est, '.0f')} | "
          f"{_fmt(fit.get('slope') and fit['slope'] / 1024, '.2f')} | "
          f"{_fmt(fit.get('r2'), '.4f')} ({fit.get('n', 0)}) | "
          f"{_fmt(fit.get('exponent_last_doubling'), '.2f')} | "
          f"{'; '.join(runs)} |")
    lines += ["", "Estimates per T (MiB, compiled temp + arguments + "
              "outputs; `>` marks the first over the limit):", "",
              "| implementation | " + " | ".join(
                  f"T={p['T']}" for p in max(
                      sw.values(), key=lambda e: len(e["points"]))["points"])
              + " |"]
    lines.append("|---|" + "---:|" * max(len(e["points"])
                                         for e in sw.values()))
    for name, e in sw.items():
      cells = []
      for p in e["points"]:
        if "memory" in p:
          cells.append(("" if p["fits"] else ">") +
                       f"{p['memory']['peak'] / _MIB:.0f}")
        else:
          cells.append("error")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  configs = result["configs"]
  B = min((c["B"] for c in configs), default=1)
  order = _impl_order(configs)
  fig, axes = plt.subplots(2, 2, figsize=(13, 10))
  panels = [(axes[0, 0], "fwd", "time"), (axes[0, 1], "fwd+bwd", "time"),
            (axes[1, 0], "fwd+bwd", "memory")]
  for ax, mode, what in panels:
    # The full mask where measured (the smoke run has one mask per mode).
    mask = "full" if any(c["mask"] == "full" and c["mode"] == mode and
                         c["scope"] == "layer" for c in configs) else "causal"
    for name in order:
      pts = []
      for c in configs:
        if (c["scope"], c["mode"], c["mask"], c["B"]) != ("layer", mode,
                                                          mask, B):
          continue
        e = c["impls"].get(name, {})
        y = (e.get("median_ms") if what == "time" else
             (e.get("memory", {}).get("peak") or 0) / _MIB or None)
        if y:
          pts.append((c["T"], y))
      if pts:
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("time per call (ms)" if what == "time"
                  else "compiled memory estimate (MiB)")
    ax.set_title(f"layer, {mode}, {mask} mask, B={B}: "
                 f"{'time' if what == 'time' else 'memory'}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize=8)
  ax = axes[1, 1]
  sw = result.get("sweep") or {}
  for name, e in sw.items():
    pts = [(p["T"], p["memory"]["peak"] / _MIB) for p in e["points"]
           if "memory" in p]
    if pts:
      xs, ys = zip(*pts)
      line, = ax.plot(xs, ys, marker="o", label=f"{name} (estimate)")
      rss = [(r["T"], r["rss_growth_mib"]) for r in e.get("runs", [])
             if r.get("ok")]
      if rss:
        rx, ry = zip(*rss)
        ax.scatter(rx, ry, marker="x", s=80, color=line.get_color(),
                   label=f"{name} (measured RSS growth)")
  if sw:
    ax.axhline(result["settings"]["sweep_limit_gib"] * 1024, color="k",
               ls="--", lw=1, label="sweep limit")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length T (tokens)")
  ax.set_ylabel("memory (MiB)")
  ax.set_title("longest trainable sequence: layer fwd+bwd, B=1")
  ax.grid(True, which="both", alpha=0.3)
  if ax.get_lines():
    ax.legend(fontsize=7)
  fig.suptitle(f"jaxmha vs Keras 3, Flax, jax.nn.dot_product_attention "
               f"(N={result['settings']['N']}, H={result['settings']['H']}, "
               f"D={result['settings']['D']}, fp32, "
               f"{result['environment']['backend']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# -- main ---------------------------------------------------------------------


def vector_isa(flags: set) -> Optional[str]:
  """The widest x86 vector extension in a ``/proc/cpuinfo`` flag set, or
  None. The CPU's matmuls and exponentials run about twice as wide with
  AVX-512 as with AVX2, and the paths do not gain alike (README, "A second
  machine").

  >>> vector_isa({"fma", "avx2", "avx"})
  'AVX2'
  >>> vector_isa({"asimd"}) is None
  True
  """
  for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                     ("avx", "AVX")):
    if flag in flags:
      return name
  return None


def _environment() -> dict:
  model, flags = None, set()
  try:
    with open("/proc/cpuinfo") as f:  # the first processor's lines
      for line in f:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
          model = value
        elif key == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  cpu = model or platform.processor() or platform.machine()
  versions = {}
  for mod in ("keras", "flax"):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception:  # pylint: disable=broad-except
      versions[mod] = "missing"
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "cpu": cpu, "vector_isa": vector_isa(flags),
          "cores": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "python": platform.python_version(),
          # Changes the allocator's page faults (see the module docstring).
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
          # XLA's code generation: the test suite's fast-compile flags, for
          # one, run the blockwise forward 1.5-1.8x slower.
          "xla_flags": os.environ.get("XLA_FLAGS"),
          **versions}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_true",
                     help="T in {256, 1024, 2048}")
  group.add_argument("--smoke", action="store_true",
                     help="T in {64, 128}, tiny D; seconds, for CI")
  parser.add_argument("--out", default=_DEFAULT_OUT,
                      help="output folder (default benchmarks/results)")
  parser.add_argument("--rounds", type=int, help="timed rounds per config")
  parser.add_argument("--batches", help="comma-separated B, e.g. 1,4")
  parser.add_argument("--seq-lengths", help="comma-separated T")
  parser.add_argument("--impls", help="comma-separated implementation "
                      "names (default: all; keep keras for the ratios)")
  parser.add_argument("--scopes", help="comma-separated, of layer,core")
  parser.add_argument("--modes", help="comma-separated, of fwd,fwd+bwd")
  parser.add_argument("--no-sweep", action="store_true",
                      help="skip the longest-trainable-sequence sweep")
  parser.add_argument("--sweep-only", action="store_true",
                      help="only the sweep (the grid is skipped)")
  parser.add_argument("--summary", metavar="JSON",
                      help="print the summary table of an earlier run's "
                      "compare.json and exit")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.summary:
    with open(args.summary) as f:
      result = json.load(f)
    print(summary(result))
    return result
  if args.worker:
    try:
      result = worker(json.loads(args.worker))
    except Exception as e:  # pylint: disable=broad-except
      result = {"ok": False, "error": f"{type(e).__name__}: {e}"[-1500:]}
    print(json.dumps(result), flush=True)
    return result

  settings = SMOKE if args.smoke else QUICK if args.quick else FULL
  if args.rounds:
    settings = dataclasses.replace(settings, rounds=args.rounds)
  if args.batches:
    settings = dataclasses.replace(
        settings, batches=tuple(int(b) for b in args.batches.split(",")))
  if args.seq_lengths:
    settings = dataclasses.replace(settings, seq_lengths=tuple(
        int(t) for t in args.seq_lengths.split(",")))
  for flag, allowed in (("scopes", SCOPES), ("modes", MODES)):
    value = getattr(args, flag)
    if value:
      chosen = tuple(value.split(","))
      if not set(chosen) <= set(allowed):
        parser.error(f"--{flag} must be a subset of {allowed}; got {value}")
      settings = dataclasses.replace(settings, **{flag: chosen})
  os.makedirs(args.out, exist_ok=True)
  started = time.perf_counter()

  def log(msg):
    print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

  impls = implementations()
  if args.impls:
    wanted = args.impls.split(",")
    unknown = set(wanted) - {i.name for i in impls}
    if unknown:
      parser.error(f"unknown --impls {sorted(unknown)}; known: "
                   f"{[i.name for i in impls]}")
    impls = tuple(i for i in impls if i.name in wanted)
  models = Models.build(settings.D, settings.N, settings.H)
  command = "python -m benchmarks.compare " + " ".join(
      sys.argv[1:] if argv is None else argv)
  log(f"{settings.name}: {jax.default_backend()}, impls "
      f"{[i.name for i in impls]}")
  configs = []
  if not args.sweep_only:
    for scope, mode, B, T, causals in grid(settings):
      for c in measure_config(settings, models, impls, scope, mode, B, T,
                              causals, log):
        configs.append(c)
        timings = ", ".join(
            f"{n}={e['median_ms']:.1f}" for n, e in c["impls"].items()
            if "median_ms" in e and "alias_of" not in e)
        sp = c["impls"].get(_DEFAULT, {}).get("speedup_vs_keras")
        log(f"{scope} {mode} {c['mask']} B={B} T={T} "
            f"[{c['default_path']}]: {timings} ms; jaxmha x{_fmt(sp, '.2f')}"
            f" vs keras; matmul {c['matmul_gflops']:.1f} GFLOP/s")
  sweep_results = None
  if not args.no_sweep:
    sweep_results = sweep(settings, models, impls, log)
  rates = [r for c in configs for r in c["matmul_gflops_rounds"]]
  checks = check_targets(configs, sweep_results, settings)
  result = {
      "command": command, "settings": dataclasses.asdict(settings),
      "environment": _environment(),
      "matmul_gflops": {"median": float(np.median(rates)) if rates else 0.0,
                        "min": float(min(rates)) if rates else 0.0,
                        "max": float(max(rates)) if rates else 0.0},
      "configs": configs, "sweep": sweep_results,
      "checks": [dataclasses.asdict(c) for c in checks],
      "seconds": time.perf_counter() - started}
  with open(os.path.join(args.out, "compare.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "compare.md"), "w") as f:
    f.write(markdown(result))
  if configs or sweep_results:
    plot(result, os.path.join(args.out, "compare.png"))
  for c in checks:
    print(f"{c.status}: {c.name}: {c.detail}", flush=True)
  log(f"wrote {args.out}/compare.{{json,md,png}}")
  return result


if __name__ == "__main__":
  main()
