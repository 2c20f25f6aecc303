"""The demo (``python -m jaxmha.demo``) run in-process: it trains, writes its
two figures and returns finite metrics."""

import math

import matplotlib.image
import numpy as np
import pytest

from jaxmha import demo

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path: str) -> None:
  with open(path, "rb") as f:
    assert f.read(8) == _PNG_SIGNATURE, path
  image = matplotlib.image.imread(path)  # decodes the whole file
  assert image.ndim == 3 and min(image.shape[:2]) > 100, image.shape


def _check_outputs(metrics: dict, tmp_path) -> None:
  for name in ("loss_curve_path", "attention_map_path"):
    path = metrics[name]
    assert str(path).startswith(str(tmp_path)), path
    _check_png(path)
  for name in ("token_accuracy", "sequence_accuracy", "seconds"):
    assert math.isfinite(metrics[name]), (name, metrics[name])
  assert 0.0 <= metrics["token_accuracy"] <= 1.0
  assert 0.0 <= metrics["sequence_accuracy"] <= 1.0
  assert np.isfinite(metrics["losses"]).all()


def test_demo_small_run_learns_and_writes_figures(tmp_path, capsys):
  steps = 80
  metrics = demo.main(["--steps", str(steps), "--seq-len", "5", "--vocab",
                       "6", "--batch-size", "32", "--seed", "3", "--out",
                       str(tmp_path), "--quiet"])
  losses = np.asarray(metrics["losses"])
  assert losses.shape == (steps,)
  assert losses[-10:].mean() < losses[:10].mean(), losses
  _check_outputs(metrics, tmp_path)
  out = capsys.readouterr().out
  assert metrics["loss_curve_path"] in out
  assert metrics["attention_map_path"] in out


def test_demo_rejects_non_positive_sizes(capsys):
  with pytest.raises(SystemExit):
    demo.main(["--steps", "0"])
  assert "--steps" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_default_config_reverses(tmp_path):
  metrics = demo.main(["--out", str(tmp_path), "--quiet"])
  _check_outputs(metrics, tmp_path)
  assert metrics["token_accuracy"] > 0.95, metrics["token_accuracy"]
  assert metrics["sequence_accuracy"] > 0.8, metrics["sequence_accuracy"]
