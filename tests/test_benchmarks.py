"""The comparison benchmark (``python -m benchmarks.compare``): its smoke run
writes the JSON, the markdown tables and the plot; its FLOP count, fit and
smoke grid are right. The op-kind profile of ``benchmarks.attention_core``
classifies ops and splits a call's time. ``benchmarks.blockwise_ab`` times
two versions of the blockwise path and a control. The forward+backward
programs take the gradient of a loss of the output, as a training step does.

Shape letters: B batch, T query length, N heads, H head dim, D features.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from benchmarks import attention_core
from benchmarks import blockwise_ab
from benchmarks import compare
from benchmarks import dot_libraries

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_smoke_run_writes_json_markdown_and_png(tmp_path):
  env = dict(os.environ, KERAS_BACKEND="jax")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (_ROOT, env.get("PYTHONPATH")) if p)
  # About 25 s on an idle 2-core machine; the limit leaves room for a
  # loaded CI runner.
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.compare", "--smoke", "--out",
       str(tmp_path)], cwd=_ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]

  with open(tmp_path / "compare.json") as f:
    result = json.load(f)
  verdicts = [line for line in proc.stdout.splitlines()
              if line.startswith(("PASS: ", "FAIL: ", "N/A: "))]
  assert len(verdicts) == len(result["checks"]) == 7, proc.stdout[-3000:]
  names = {i.name for i in compare.implementations()}
  assert result["settings"]["name"] == "smoke"
  # The CPU's vector extension is on record (None off x86).
  assert result["environment"]["vector_isa"] in ("AVX-512", "AVX2", "AVX",
                                                 None)
  # So are the XLA flags it ran under (the suite's, inherited).
  assert result["environment"]["xla_flags"] == os.environ.get("XLA_FLAGS")
  if os.environ.get("XLA_FLAGS"):
    assert "XLA_FLAGS=" in (tmp_path / "compare.md").read_text()
  assert len(result["configs"]) == 4
  for c in result["configs"]:
    assert set(c["impls"]) == names, c["impls"].keys()
    assert c["matmul_gflops"] > 0
    for name, e in c["impls"].items():
      assert e["median_ms"] > 0 and e["gflops"] > 0, (name, e)
      assert e["memory"]["peak"] > 0, (name, e)
      assert e["speedup_vs_keras"] > 0, (name, e)
      assert e["faults_per_call"] >= 0, (name, e)
    assert c["impls"]["keras"]["speedup_vs_keras"] == pytest.approx(1.0)
  run = result["sweep"]["jaxmha"]["runs"][0]
  assert run["ok"] and run["finite"] and run["wall_s"] > 0, run
  assert {c["status"] for c in result["checks"]} <= {"PASS", "FAIL", "N/A"}

  md = (tmp_path / "compare.md").read_text()
  assert "## Targets" in md
  assert "| B | T | implementation | path | time ms | x Keras |" in md
  assert "| mem MiB | faults k | rounds |" in md
  assert "## Longest trainable sequence" in md

  with open(tmp_path / "compare.png", "rb") as f:
    assert f.read(8) == _PNG_SIGNATURE
  image = matplotlib.image.imread(tmp_path / "compare.png")
  assert image.ndim == 3 and min(image.shape[:2]) > 300, image.shape


def test_flops_counts_attention_projections_and_backward():
  B, T, N, H, D = 2, 128, 8, 64, 512
  attention = 4 * B * N * T * T * H
  projections = 2 * B * T * D * N * H * 4
  assert compare.flops("core", "fwd", False, B, T, N, H, D) == attention
  assert compare.flops("core", "fwd", True, B, T, N, H, D) == attention / 2
  assert compare.flops("layer", "fwd", False, B, T, N, H, D) == (
      attention + projections)
  assert compare.flops("layer", "fwd+bwd", True, B, T, N, H, D) == 3 * (
      attention / 2 + projections)


def test_linear_fit_slope_r2_and_exponent():
  Ts = [4096, 8192, 16384, 32768]
  linear = compare.linear_fit(Ts, [3 * t + 100 for t in Ts])
  assert linear["slope"] == pytest.approx(3.0)
  assert linear["r2"] == pytest.approx(1.0)
  assert linear["exponent_last_doubling"] == pytest.approx(1.0, abs=0.01)
  quadratic = compare.linear_fit(Ts, [t * t for t in Ts])
  assert quadratic["exponent_last_doubling"] == pytest.approx(2.0)
  assert quadratic["r2"] < 0.99


def test_smoke_grid_covers_every_scope_mode_mask_and_length():
  cells = list(compare.grid(compare.SMOKE))
  assert len(cells) == 4
  assert {c[0] for c in cells} == set(compare.SCOPES)
  assert {c[1] for c in cells} == set(compare.MODES)
  assert {causal for c in cells for causal in c[4]} == {False, True}
  assert {c[3] for c in cells} == set(compare.SMOKE.seq_lengths)
  full = list(compare.grid(compare.FULL))
  # Both masks run in the same rounds, so their time ratio is paired.
  assert all(causals == (False, True) for *_, causals in full)
  assert all(B * T <= compare.FULL.max_tokens for _, _, B, T, _ in full)


_TOY_HLO = """HloModule toy

%fused_dot (p0: f32[2,2], p1: f32[2,2]) -> f32[2,2] {
  %p0 = f32[2,2]{1,0} parameter(0)
  %p1 = f32[2,2]{1,0} parameter(1)
  ROOT %d = f32[2,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_move (p0: f32[2,2]) -> f32[2,2] {
  %p0 = f32[2,2]{1,0} parameter(0)
  ROOT %t = f32[2,2]{0,1} transpose(%p0), dimensions={1,0}
}

ENTRY %main (a: f32[2,2]) -> (f32[2,2], f32[2,2]) {
  %a = f32[2,2]{1,0} parameter(0)
  %dot_fusion = f32[2,2]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot
  %move = f32[2,2]{0,1} fusion(%a), kind=kLoop, calls=%fused_move
  %e = f32[2,2]{1,0} exponential(%a)
  %w = (s32[], /*index=1*/f32[2,2]{1,0}) while(%a), condition=%c, body=%b
  ROOT %out = (f32[2,2]{1,0}, f32[2,2]{0,1}) tuple(%dot_fusion, %move)
}
"""


def test_op_kinds_classify_fusions_by_their_bodies():
  kinds = attention_core._op_kinds(_TOY_HLO)
  assert kinds["dot_fusion"] == ("dot", "f32[2,2]{1,0}")
  assert kinds["move"] == ("data movement", "f32[2,2]{0,1}")
  assert kinds["e"] == ("exp", "f32[2,2]{1,0}")
  assert kinds["out"][0] == "data movement"  # a tuple shape parses
  assert "w" not in kinds  # control flow: its ops are counted, not it


def test_op_profile_splits_a_call_by_op_kind():
  B, T, N, H = 1, 256, 2, 16
  q, k, v, target = (jax.random.normal(jax.random.key(i), (B, T, N, H))
                    for i in range(4))
  compiled = attention_core._compiled("blockwise", q, k, v, target,
                                      causal=True, backward=True)
  prof = attention_core.op_profile(compiled, (q, k, v), calls=2)
  assert prof["wall_ms"] > 0
  assert prof["op_ms"]["dot"] > 0 and prof["op_ms"]["exp"] > 0, prof
  assert sum(prof["dot_ms"].values()) == pytest.approx(prof["op_ms"]["dot"])
  # Op times are summed over threads, never counted twice: at most one
  # wall time per thread (plus slack for the traced calls' spread).
  assert sum(prof["op_ms"].values()) <= (
      2 * prof["wall_ms"] * (os.cpu_count() or 1)), prof


def test_blockwise_ab_times_both_versions_and_a_control():
  rows = blockwise_ab.main(["--base", "HEAD", "--batch", "2", "--seq-len",
                            "40", "--heads", "2", "--rounds", "2"])
  assert [(r["pass"], r["mask"]) for r in rows] == [
      ("fwd", "full"), ("fwd", "causal"), ("fwd+bwd", "full"),
      ("fwd+bwd", "causal")]
  for r in rows:
    assert all(ms > 0 for ms in r["ms"].values()), r
    assert r["new/base"] > 0 and r["control/base"] > 0, r
    # The committed version and the working tree compute the same function.
    assert r["max_rel_diff"] < 1e-3, r


def test_blockwise_ab_names_a_bad_revision():
  with pytest.raises(SystemExit, match="no-such-revision"):
    blockwise_ab.main(["--base", "no-such-revision", "--seq-len", "16"])


def test_loss_gradient_is_the_vjp_of_the_error():
  # A training step's backward: d/dargs of 0.5 * sum((fn(args) - target)^2)
  # is the VJP of fn with the error fn(args) - target as its cotangent.
  def fn(w, x):
    return jnp.tanh(x @ w["kernel"]) * w["scale"]

  keys = jax.random.split(jax.random.key(0), 4)
  w = {"kernel": jax.random.normal(keys[0], (5, 3)),
       "scale": jax.random.normal(keys[1], (3,))}
  x = jax.random.normal(keys[2], (4, 5))
  target = jax.random.normal(keys[3], (4, 3))
  got = compare.loss_gradient(fn)(w, x, target)
  out, vjp = jax.vjp(fn, w, x)
  want = vjp(out - target)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_dot_libraries_times_default_control_and_eigen_programs():
  rows = dot_libraries.main(["--impls", "keras,jaxmha", "--modes", "fwd+bwd",
                             "--masks", "causal", "--seq-lengths", "16",
                             "--features", "16", "2", "8", "--rounds", "2"])
  assert [r["impl"] for r in rows] == ["keras", "jaxmha"]
  for r in rows:
    assert set(r["ms"]) == {"default", "control", "eigen"}, r
    assert all(ms > 0 for ms in r["ms"].values()), r
    # The option reached the compiler: nothing is left to YNNPACK.
    assert r["ynn_fusions"]["eigen"] == 0, r
    assert r["ynn_fusions"]["control"] == r["ynn_fusions"]["default"], r


def test_dot_libraries_names_an_unknown_implementation():
  with pytest.raises(SystemExit, match="Unknown --impls.*nope"):
    dot_libraries.main(["--impls", "nope", "--seq-lengths", "16"])


def test_dot_libraries_times_the_three_matmul_forms():
  rows = dot_libraries.main(["--matmuls", "--seq-lengths", "32",
                             "--features", "16", "2", "8", "--rounds", "2"])
  assert [(r["S"], r["rows"]) for r in rows] == [(32, 128), (32, 256)]
  for r in rows:
    assert set(r["gflops"]) == {"ynnpack", "eigen", "eigen, lhs first dim"}
    assert all(rate > 0 for rate in r["gflops"].values()), r
