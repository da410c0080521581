"""Learning curves (o2v_jax/plots.py): a PNG with one panel per metric, or a note and
no file without matplotlib."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from o2v_jax import plots

ROOT = Path(__file__).resolve().parent.parent

CLASSIFICATION = [{"epoch": e, "train_cross_entropy": 0.7 - 0.1 * e, "train_accuracy": 0.5 + 0.1 * e,
                   "validation_cross_entropy": 0.75 - 0.1 * e, "validation_accuracy": 0.5 + 0.08 * e}
                  for e in range(3)]


def test_a_png_with_one_panel_per_metric(tmp_path):
    pytest.importorskip("matplotlib")
    path = plots.learning_curves(CLASSIFICATION, tmp_path / "run" / plots.FILENAME, kept_epoch=2)
    assert path == tmp_path / "run" / plots.FILENAME
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    regression = [{"epoch": 0, "train_mean_squared_error": 1.0}]
    assert plots.learning_curves(regression, tmp_path / "r.png", reference={"mean": 1.2}) is not None


def test_drawing_leaves_pyplot_alone(tmp_path):
    # A notebook's backend and open figures are the user's: plots never imports pyplot
    # (checked in a fresh interpreter, where no other test can have imported it).
    pytest.importorskip("matplotlib")
    code = ("import sys; from o2v_jax import plots; "
            f"plots.learning_curves([{{'epoch': 0, 'train_accuracy': 0.5}}], {str(tmp_path / 'c.png')!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c.png").is_file()


def test_no_history_metrics_no_file(tmp_path):
    assert plots.learning_curves([], tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_without_matplotlib_a_note_and_no_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with caplog.at_level(logging.INFO, logger="o2v_jax"):
        assert plots.learning_curves(CLASSIFICATION, tmp_path / "c.png") is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / "c.png").exists()
