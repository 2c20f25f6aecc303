"""GPU check of the Triton flash-attention kernel: correctness, speed, tiles.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim.

Run from the repository root on a CUDA machine (needs only jax and numpy):

    python -m benchmarks.gpu_check            # or: python benchmarks/gpu_check.py
    python -m benchmarks.gpu_check --tiny     # CPU, interpret mode, tiny sizes

Three parts, each written out as soon as it ends (a run cut short keeps what
it has):

1. correctness: the kernel against ``pallas_kernels.reference`` (fp32) on the
   device: forward ``out`` and ``lse`` and ``dq, dk, dv`` through both, for
   bf16, fp16 and fp32, causal, windows, segments, lengths, dense masks,
   ragged sizes, GQA/MQA, ``Hv != H`` and dropout, and the kernel run as
   query-row shards at their offsets (what it does under ``jit`` on
   sequence-sharded inputs, split by hand on one device); PASS/FAIL per
   case;
2. timing: bf16 forward and forward+backward at ``B=4, N=16, H=128``, ``T = S
   in {1024, 4096, 16384}``, causal and not, for the kernel,
   ``jax.nn.dot_product_attention(implementation="xla")`` and ``"cudnn"``:
   medians of interleaved repeats, TFLOP/s (forward ``4 B N T S H``, halved
   for causal; forward+backward counts 3.5 forwards) and kernel/cuDNN;
3. sweep: forward block sizes and Triton launch parameters at ``T = 4096``,
   within a time budget.

Writes ``$OUT/gpu_check.json`` and ``$OUT/gpu_check.md`` (``OUT`` defaults to
``./gpu_check_out``). Exits 1 if a correctness case fails or the kernel
cannot be timed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional
from unittest import mock

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python benchmarks/gpu_check.py` from the root
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.shapes import GPU_TIMING, AttentionShape  # noqa: E402
from pallas_kernels import flash_attention  # noqa: E402
from pallas_kernels import gpu_triton  # noqa: E402
from pallas_kernels import masks as masks_lib  # noqa: E402
from pallas_kernels import partitioning  # noqa: E402
from pallas_kernels import reference  # noqa: E402

# Normwise tolerances, |got - want|_max <= atol + rtol * |want|_max, by
# dtype: the numbers of tests/tolerances.py (elementwise there, on small
# shapes; normwise here, where long rows make single entries tiny).
FORWARD = {"float32": (2e-5, 2e-5), "bfloat16": (2e-2, 2e-2),
           "float16": (4e-3, 4e-3)}
GRAD = {"float32": (5e-5, 5e-5), "bfloat16": (5e-2, 5e-2),
        "float16": (1e-2, 1e-2)}

TOTAL_BUDGET_S = 450.0  # the whole script stays under 8 minutes


@dataclasses.dataclass(frozen=True)
class CheckCase:
  name: str
  shape: AttentionShape
  dtype: str
  masks: tuple[str, ...] = ()
  dropout: float = 0.0
  row_shards: int = 1  # > 1: the kernel runs on that many query-row shards


def correctness_cases(tiny: bool) -> list[CheckCase]:
  S_ = AttentionShape
  if tiny:
    return [
        CheckCase("window_qlen_gqa_fp32", S_(2, 37, 45, 4, 2, 40, 24),
                  "float32", ("window_lr", "q_lengths")),
        CheckCase("all_masks_dropout_bf16", S_(2, 33, 50, 2, 1, 32),
                  "bfloat16", ("causal", "segments", "kv_lengths", "dense"),
                  0.2),
        CheckCase("rows3_window_qlen_dropout_fp32", S_(2, 36, 45, 4, 2, 40),
                  "float32", ("window_lr", "q_lengths"), 0.2, row_shards=3),
    ]
  return [
      CheckCase("causal_fp32", S_(2, 256, 256, 4, 2, 64), "float32",
                ("causal",)),
      CheckCase("causal_ragged_bf16", S_(2, 1000, 1000, 4, 2, 128),
                "bfloat16", ("causal",)),
      CheckCase("full_cross_Hv_bf16", S_(2, 77, 1031, 4, 2, 80, 64),
                "bfloat16"),
      CheckCase("window_kvlen_bf16", S_(2, 513, 513, 4, 4, 64), "bfloat16",
                ("window", "kv_lengths")),
      CheckCase("segments_causal_bf16", S_(2, 700, 700, 4, 2, 128),
                "bfloat16", ("causal", "segments")),
      CheckCase("dense_qlen_fp32", S_(2, 200, 300, 4, 4, 32), "float32",
                ("dense", "q_lengths")),
      CheckCase("dropout_causal_bf16", S_(2, 384, 384, 4, 2, 64), "bfloat16",
                ("causal",), 0.1),
      CheckCase("decode_fp16", S_(2, 1, 4096, 8, 1, 128), "float16",
                ("kv_lengths",)),
      CheckCase("head256_causal_bf16", S_(1, 512, 512, 2, 2, 256),
                "bfloat16", ("causal",)),
      CheckCase("mqa_dropout_fp32", S_(1, 300, 300, 8, 1, 96), "float32",
                ("window_lr", "segments"), 0.2),
      CheckCase("rows4_causal_dropout_bf16", S_(2, 1024, 1024, 4, 2, 64),
                "bfloat16", ("causal", "kv_lengths"), 0.1, row_shards=4),
      CheckCase("rows2_window_qlen_dense_fp32", S_(2, 300, 320, 4, 2, 64),
                "float32", ("window_lr", "q_lengths", "dense"),
                row_shards=2),
  ]


def make_inputs(case: CheckCase, seed: int = 0):
  """Random ``q, k, v`` and the mask/dropout keyword arguments."""
  s = case.shape
  keys = jax.random.split(jax.random.key(seed), 8)
  dt = jnp.dtype(case.dtype)
  q = jax.random.normal(keys[0], (s.B, s.T, s.N, s.H)).astype(dt)
  k = jax.random.normal(keys[1], (s.B, s.S, s.K, s.H)).astype(dt)
  v = jax.random.normal(keys[2], (s.B, s.S, s.K, s.value_head_dim)).astype(dt)
  kw: dict[str, Any] = {}
  if "causal" in case.masks:
    kw["causal"] = True
  if "window" in case.masks:
    kw["sliding_window"] = max(3, min(s.T, s.S) // 8)
  if "window_lr" in case.masks:
    kw["sliding_window"] = (max(3, s.S // 5), 2)
  if "segments" in case.masks:  # sorted ids: packed documents
    kw["segment_ids"] = (
        jnp.sort(jax.random.randint(keys[3], (s.B, s.T), 0, 4), axis=-1),
        jnp.sort(jax.random.randint(keys[4], (s.B, s.S), 0, 4), axis=-1))
  if "kv_lengths" in case.masks:
    lengths = jax.random.randint(keys[5], (s.B,), 1, s.S + 1)
    kw["kv_lengths"] = lengths.at[0].set(0) if s.B > 1 else lengths
  if "q_lengths" in case.masks:
    kw["q_lengths"] = jax.random.randint(keys[5], (s.B,), 0, s.T + 1)
  if "dense" in case.masks:
    mask = jax.random.bernoulli(keys[6], 0.8, (s.B, 1, s.T, s.S))
    kw["mask"] = mask.at[:, :, s.T // 2, :].set(False)  # a fully masked row
  if case.dropout:
    kw["dropout_rate"] = case.dropout
    kw["dropout_rng"] = keys[7]
  return q, k, v, kw


def _compare(got, want, tol, valid=None) -> tuple[bool, float]:
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  if valid is not None:
    got, want = got[valid], want[valid]
  if want.size == 0:
    return True, 0.0
  atol, rtol = tol
  err = float(np.max(np.abs(got - want)))
  ok = bool(np.all(np.isfinite(got))) and err <= atol + rtol * float(
      np.max(np.abs(want)))
  return ok, err


def run_case(case: CheckCase, interpret: bool,
             block_sizes: Optional[gpu_triton.BlockSizes]) -> dict:
  """Forward and gradients of one case against the fp32 reference."""
  q, k, v, kw = make_inputs(case)
  s = case.shape
  r_o, r_l = jax.random.split(jax.random.key(7))
  d_out = jax.random.normal(r_o, (s.B, s.T, s.N, s.value_head_dim))
  d_lse = jax.random.normal(r_l, (s.B, s.N, s.T))
  kernel = functools.partial(flash_attention, backend="gpu",
                             interpret=interpret, block_sizes=block_sizes)
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v, **a: reference.attention(f32(q), f32(k), f32(v), **a)

  def loss_fn(fn):
    def loss(q, k, v):
      out, lse = fn(q, k, v, return_lse=True, **kw)
      # Empty rows have a constant LSE; weight only the real rows'.
      real = lse > masks_lib.EMPTY_ROW_LSE / 2
      value = (jnp.sum(out.astype(jnp.float32) * d_out)
               + jnp.sum(jnp.where(real, lse, 0.0) * d_lse))
      return value, (out, lse)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))

  t0 = time.perf_counter()
  split = contextlib.nullcontext()
  if case.row_shards > 1:
    split = mock.patch.object(partitioning, "call", functools.partial(
        partitioning.call_split_by_hand, parts=(1, 1, case.row_shards)))
  with split:
    (_, (out, lse)), grads = loss_fn(kernel)(q, k, v)
  jax.block_until_ready(grads)
  seconds = time.perf_counter() - t0
  (_, (r_out, r_lse)), r_grads = loss_fn(ref)(q, k, v)
  real = np.asarray(r_lse) > masks_lib.EMPTY_ROW_LSE / 2
  result = {"case": case.name, "shape": dataclasses.asdict(case.shape),
            "dtype": case.dtype, "masks": list(case.masks),
            "dropout": case.dropout, "row_shards": case.row_shards,
            "seconds_incl_compile": round(seconds, 2)}
  checks = {
      "out": _compare(out, r_out, FORWARD[case.dtype]),
      "lse": _compare(lse, r_lse, FORWARD[case.dtype], real),
      # Empty rows: exactly the sentinel, in both.
      "lse_empty": (bool(np.array_equal(np.asarray(lse)[~real],
                                        np.asarray(r_lse)[~real])), 0.0),
  }
  for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
    checks[name] = _compare(g, r, GRAD[case.dtype])
  result["errors"] = {n: e for n, (_, e) in checks.items()}
  result["failed"] = [n for n, (ok, _) in checks.items() if not ok]
  result["pass"] = not result["failed"]
  return result


# -- timing --------------------------------------------------------------------


def attention_flops(B, N, T, S, H, causal: bool, backward: bool) -> float:
  flops = 4.0 * B * N * T * S * H
  if causal:
    flops /= 2
  return flops * (3.5 if backward else 1.0)


def _implementations(interpret: bool, block_sizes=None):
  """name -> attention(q, k, v, causal) for the kernel, XLA and cuDNN."""
  def kernel(q, k, v, causal):
    return flash_attention(q, k, v, causal=causal, backend="gpu",
                           interpret=interpret, block_sizes=block_sizes)

  def xla(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation="xla")

  def cudnn(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                        implementation="cudnn")

  return {"kernel": kernel, "xla": xla, "cudnn": cudnn}


def _fwd_bwd(attn: Callable, causal: bool):
  def f(q, k, v, d_out):
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, causal), q, k, v)
    return out, vjp(d_out)
  return jax.jit(f)


def _short_error(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


def time_interleaved(fns: dict[str, Callable], args, repeats: int,
                     min_sample_s: float) -> dict[str, dict]:
  """Median seconds per call of each fn, repeats interleaved across fns.

  Each sample runs a fn ``n`` times back to back (``n`` calibrated so a
  sample lasts ``min_sample_s``), so dispatch overhead is amortised.
  """
  results, ready = {}, {}
  for name, fn in fns.items():
    try:
      jax.block_until_ready(fn(*args))  # compile
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      once = time.perf_counter() - t0
      ready[name] = max(1, min(100, int(math.ceil(min_sample_s / max(
          once, 1e-6)))))
    except Exception as e:  # noqa: BLE001 - reported per implementation
      results[name] = {"error": _short_error(e)}
  samples = {name: [] for name in ready}
  for _ in range(repeats):
    for name, n in ready.items():
      t0 = time.perf_counter()
      for _ in range(n):
        out = fns[name](*args)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - t0) / n)
  for name, ts in samples.items():
    results[name] = {"median_s": statistics.median(ts), "samples": len(ts),
                     "calls_per_sample": ready[name]}
  return results


def run_timing(shapes, interpret: bool, repeats: int, min_sample_s: float,
               block_sizes=None, xla_max_scores: float = 2.0**33) -> list:
  rows = []
  impls = _implementations(interpret, block_sizes)
  for shape in shapes:
    B, T, S, N, H = shape.B, shape.T, shape.S, shape.N, shape.H
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, S, shape.K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, S, shape.K, H), jnp.bfloat16)
    d_out = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)
    for causal in (False, True):
      for backward in (False, True):
        fns, skipped = {}, {}
        for name, attn in impls.items():
          if name == "xla" and B * N * T * S > xla_max_scores:
            # XLA materialises (B, N, T, S) scores (and probs for backward).
            skipped[name] = {"error": "skipped: (B, N, T, S) scores too big"}
            continue
          if backward:
            fns[name] = _fwd_bwd(attn, causal)
          else:
            fns[name] = jax.jit(functools.partial(attn, causal=causal))
        args = (q, k, v, d_out) if backward else (q, k, v)
        res = time_interleaved(fns, args, repeats, min_sample_s)
        res.update(skipped)
        flops = attention_flops(B, N, T, S, H, causal, backward)
        for r in res.values():
          if "median_s" in r:
            r["tflops"] = flops / r["median_s"] / 1e12
        kern, cud = res.get("kernel", {}), res.get("cudnn", {})
        ratio = (kern["tflops"] / cud["tflops"]
                 if "tflops" in kern and "tflops" in cud else None)
        row = {"B": B, "N": N, "H": H, "T": T, "S": S, "causal": causal,
               "pass": "fwd+bwd" if backward else "fwd", "results": res,
               "kernel_over_cudnn": ratio}
        rows.append(row)
        print(_timing_line(row), flush=True)
        del fns
  return rows


def _timing_line(row) -> str:
  parts = []
  for name in ("kernel", "xla", "cudnn"):
    r = row["results"].get(name, {})
    if "tflops" in r:
      parts.append(f"{name} {r['tflops']:7.2f} TFLOP/s "
                   f"({r['median_s'] * 1e3:8.3f} ms)")
    else:
      parts.append(f"{name} error: {r.get('error', '?')[:60]}")
  ratio = row["kernel_over_cudnn"]
  return (f"T={row['T']:6d} causal={row['causal']!s:5} {row['pass']:7} | "
          + " | ".join(parts)
          + (f" | kernel/cuDNN {ratio:.2f}" if ratio is not None else ""))


# -- block-size sweep ------------------------------------------------------------


def sweep_configs(tiny: bool) -> list[gpu_triton.BlockSizes]:
  if tiny:
    return [gpu_triton.BlockSizes(block_q=32, block_k=16, num_warps=4,
                                  num_stages=2)]
  configs = []
  # Most promising first: the budget may cut the tail.
  for bq, bk in ((128, 64), (128, 128), (64, 64), (128, 32), (64, 128),
                 (64, 32), (256, 64)):
    for warps in (8, 4):
      for stages in (3, 2, 4):
        configs.append(gpu_triton.BlockSizes(block_q=bq, block_k=bk,
                                             num_warps=warps,
                                             num_stages=stages))
  return configs


def run_sweep(shape: AttentionShape, configs, interpret: bool,
              budget_s: float, repeats: int, min_sample_s: float) -> list:
  """Forward time per BlockSizes (non-causal and causal), within budget_s."""
  t_start = time.perf_counter()
  B, T, S, N, H = shape.B, shape.T, shape.S, shape.N, shape.H
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
  k = jax.random.normal(keys[1], (B, S, shape.K, H), jnp.bfloat16)
  v = jax.random.normal(keys[2], (B, S, shape.K, H), jnp.bfloat16)
  rows = []
  for cfg in configs:
    if time.perf_counter() - t_start > budget_s:
      print(f"sweep: budget of {budget_s:.0f}s spent; "
            f"{len(configs) - len(rows) // 2} configs not run", flush=True)
      break
    for causal in (False, True):
      fn = jax.jit(functools.partial(
          flash_attention, causal=causal, backend="gpu", interpret=interpret,
          block_sizes=cfg))
      res = time_interleaved({"kernel": fn}, (q, k, v), repeats,
                             min_sample_s)["kernel"]
      row = {"block_q": cfg.block_q, "block_k": cfg.block_k,
             "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
             "causal": causal, **res}
      if "median_s" in res:
        row["tflops"] = attention_flops(B, N, T, S, H, causal,
                                        False) / res["median_s"] / 1e12
      rows.append(row)
      print("sweep: " + ", ".join(f"{k}={row[k]}" for k in (
          "block_q", "block_k", "num_warps", "num_stages", "causal"))
            + (f": {row['tflops']:.2f} TFLOP/s" if "tflops" in row else
               f": error {row.get('error', '')[:80]}"), flush=True)
  return rows


# -- report ----------------------------------------------------------------------


def _markdown(report: dict) -> str:
  lines = ["# GPU check of the Triton flash-attention kernel", "",
           f"- device: {report['env']['device']}",
           f"- jax {report['env']['jax']}, mode: {report['env']['mode']}",
           f"- elapsed: {report.get('elapsed_s', 0):.0f} s", ""]
  if report.get("correctness"):
    lines += ["## Correctness (vs fp32 reference)", "",
              "| case | dtype | B,T,S,N,K,H,Hv | masks | dropout | result | "
              "max errors (out, lse, dq, dk, dv) |",
              "|---|---|---|---|---|---|---|"]
    for r in report["correctness"]:
      s = r["shape"]
      shape = ",".join(str(s[k]) for k in ("B", "T", "S", "N", "K", "H")) + (
          f",{s['Hv'] or s['H']}")
      if "error" in r:
        errs, verdict = r["error"][:80], "FAIL"
      else:
        errs = ", ".join(f"{r['errors'][n]:.2e}" for n in ("out", "lse", "dq",
                                                           "dk", "dv"))
        verdict = "PASS" if r["pass"] else "FAIL " + ",".join(r["failed"])
      masks = r["masks"] + ([f"rows/{r['row_shards']}"]
                            if r.get("row_shards", 1) > 1 else [])
      lines.append(f"| {r['case']} | {r['dtype']} | {shape} | "
                   f"{'+'.join(masks) or 'none'} | {r['dropout']} | "
                   f"{verdict} | {errs} |")
    lines.append("")
  if report.get("timing"):
    lines += ["## Timing (bf16, TFLOP/s, median of interleaved repeats)", "",
              "forward FLOPs = 4·B·N·T·S·H (halved for causal); fwd+bwd = 3.5x."
              " kernel/cuDNN > 1 means the kernel is faster.", "",
              "| T=S | causal | pass | kernel | xla | cudnn | kernel/cuDNN |",
              "|---|---|---|---|---|---|---|"]
    for row in report["timing"]:
      cells = []
      for name in ("kernel", "xla", "cudnn"):
        r = row["results"].get(name, {})
        cells.append(f"{r['tflops']:.1f} ({r['median_s'] * 1e3:.2f} ms)"
                     if "tflops" in r else "— " + r.get("error", "")[:40])
      ratio = row["kernel_over_cudnn"]
      lines.append(f"| {row['T']} | {row['causal']} | {row['pass']} | "
                   + " | ".join(cells)
                   + f" | {'' if ratio is None else f'{ratio:.2f}'} |")
    lines.append("")
  if report.get("sweep"):
    lines += ["## Forward block-size sweep (bf16, T=S=%d)" %
              report["sweep_shape"]["T"], "",
              "| block_q | block_k | num_warps | num_stages | causal | "
              "TFLOP/s | ms |", "|---|---|---|---|---|---|---|"]
    rows = sorted(report["sweep"], key=lambda r: -r.get("tflops", -1))
    for r in rows:
      cell = (f"{r['tflops']:.1f} | {r['median_s'] * 1e3:.3f}"
              if "tflops" in r else "error | " + r.get("error", "")[:40])
      lines.append(f"| {r['block_q']} | {r['block_k']} | {r['num_warps']} | "
                   f"{r['num_stages']} | {r['causal']} | {cell} |")
    lines.append("")
  return "\n".join(lines)


def _write(report: dict, out_dir: str):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
    f.write(_markdown(report))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true",
                      help="tiny sizes on CPU in interpret mode (a smoke test)")
  parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                      help="output directory (default: $OUT or ./gpu_check_out)")
  parser.add_argument("--skip", default="",
                      help="comma-separated parts to skip: correctness,timing,"
                           "sweep")
  args = parser.parse_args(argv)
  t_start = time.perf_counter()
  skip = set(filter(None, args.skip.split(",")))
  # The fp32 reference (and fp32 kernel) must not fall back to TF32.
  jax.config.update("jax_default_matmul_precision", "highest")
  on_gpu = jax.default_backend() in ("gpu", "cuda")
  if not on_gpu and not args.tiny:
    print(f"No GPU (jax.default_backend()={jax.default_backend()!r}); run "
          "with --tiny for the CPU interpret-mode smoke test.")
    return 2
  interpret = args.tiny and not on_gpu
  report = {"env": {"jax": jax.__version__,
                    "device": str(jax.devices()[0].device_kind),
                    "python": platform.python_version(),
                    "mode": "tiny/interpret" if interpret else (
                        "tiny" if args.tiny else "full")}}
  failures = 0

  # 1. correctness
  tiny_blocks = gpu_triton.BlockSizes(16, 16, 16, 16, 16, 16)
  if "correctness" not in skip:
    report["correctness"] = []
    for case in correctness_cases(args.tiny):
      try:
        r = run_case(case, interpret, tiny_blocks if args.tiny else None)
      except Exception as e:  # noqa: BLE001 - a crash is this case's FAIL
        r = {"case": case.name, "shape": dataclasses.asdict(case.shape),
             "dtype": case.dtype, "masks": list(case.masks),
             "dropout": case.dropout, "row_shards": case.row_shards,
             "pass": False, "error": _short_error(e)}
      report["correctness"].append(r)
      failures += not r["pass"]
      detail = (r.get("error") or ", ".join(
          f"{n}={e:.1e}" for n, e in r["errors"].items() if n != "lse_empty"))
      print(f"{'PASS' if r['pass'] else 'FAIL'} {case.name}: {detail}",
            flush=True)
    _write(report, args.out)

  # 2. timing
  if "timing" not in skip:
    shapes = ([AttentionShape(B=1, T=64, S=64, N=2, K=2, H=32)]
              if args.tiny else list(GPU_TIMING))
    report["timing"] = run_timing(
        shapes, interpret, repeats=3 if args.tiny else 7,
        min_sample_s=0.0 if args.tiny else 0.05,
        block_sizes=tiny_blocks if args.tiny else None)
    for row in report["timing"]:
      if "median_s" not in row["results"].get("kernel", {}):
        failures += 1
        print(f"FAIL kernel timing T={row['T']} causal={row['causal']} "
              f"{row['pass']}: {row['results']['kernel'].get('error')}")
    _write(report, args.out)

  # 3. sweep, with what is left of the budget
  if "sweep" not in skip:
    shape = (AttentionShape(B=1, T=64, S=64, N=2, K=2, H=32) if args.tiny
             else AttentionShape(B=4, T=4096, S=4096, N=16, K=16, H=128))
    report["sweep_shape"] = dataclasses.asdict(shape)
    left = TOTAL_BUDGET_S - (time.perf_counter() - t_start)
    report["sweep"] = run_sweep(shape, sweep_configs(args.tiny), interpret,
                                budget_s=max(0.0, left - 20.0),
                                repeats=3 if args.tiny else 5,
                                min_sample_s=0.0 if args.tiny else 0.03)
  report["elapsed_s"] = time.perf_counter() - t_start
  report["failures"] = failures
  _write(report, args.out)
  print(f"SUMMARY: {failures} failure(s); {report['elapsed_s']:.0f} s; "
        f"report in {os.path.abspath(args.out)}/gpu_check.md", flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
