"""The MovieLens demo: preset, baselines, neighbours, plot, and the whole path end to end
on a tiny synthetic u.data (--quick, no network)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from o2v_jax import demo
from o2v_jax.cli import main
from o2v_jax.config import from_hyperparameters


def write_udata(path: Path, users: int = 30, per_user: int = 25, items: int = 40,
                seed: int = 0) -> Path:
    """u.data rows (user item rating timestamp, tab-separated) with learnable structure:
    odd users like odd items. No u.item beside it, so the demo has no titles."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, users + 1):
        for i in rng.choice(np.arange(1, items + 1), size=per_user, replace=False):
            rating = 4 + rng.integers(0, 2) if (u + i) % 2 == 0 else 1 + rng.integers(0, 2)
            lines.append(f"{u}\t{i}\t{rating}\t{880000000 + len(lines)}")
    rng.shuffle(lines)  # u.data is not grouped by user; the ua split walks file order
    path.write_text("\n".join(lines) + "\n")
    return path




def test_demo_end_to_end_quick(tmp_path, capsys):
    import o2v_jax

    source = write_udata(tmp_path / "u.data")
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--from", str(source), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out

    # RMSE next to both baselines, as numbers.
    numbers = {}
    for name in ("global mean", "per-user mean", "Object2Vec, epoch 1 (last)"):
        m = re.search(re.escape(name) + r"\s+(\d+\.\d{4})", text)
        assert m, f"no '{name}' RMSE line in:\n{text}"
        numbers[name] = float(m.group(1))
    assert all(0 < v < 5 for v in numbers.values())
    assert "#quality_metric: host=algo-1, epoch=1, validation mean_squared_error" in text

    # Neighbours: no titles in a bare u.data, so the most-rated items are the queries.
    block = text.split("== Nearest movies by cosine similarity")[1]
    assert len(re.findall(r"^  item \d+:$", block, flags=re.M)) == 3
    assert len(re.findall(r"item \d+ -?\d\.\d\d", block)) == 3 * demo.NEIGHBOURS

    # The run's record (metrics.jsonl, learning curves) in the model directory, and
    # serving hints.
    png = out / "model" / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Learning curves: {png}" in text
    epochs = [json.loads(line) for line in (out / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert "validation_mean_squared_error" in epochs[-1]
    assert f"o2v serve --model-dir {out / 'model'}" in text
    assert "curl -s http://127.0.0.1:8080/invocations" in text

    # The model loads and scores; demo.json has the printed numbers.
    model = o2v_jax.load(out / "model")
    scores = model.predict([[1], [2]], [[3], [4]])
    assert scores.shape == (2, 1) and np.isfinite(scores).all()
    assert not (out / "model" / "training").exists()
    summary = json.loads((out / "demo.json").read_text())
    assert summary["rmse"] == pytest.approx(numbers["Object2Vec, epoch 1 (last)"], abs=1e-4)
    assert summary["baselines"]["per-user mean"] == pytest.approx(numbers["per-user mean"], abs=1e-4)
    assert summary["hyperparameters"]["enc_dim"] == demo.QUICK["enc_dim"]
    assert summary["epochs_run"] == 2


def test_preset_is_package_data_and_valid():
    hp = demo.preset_hyperparameters()
    assert all(isinstance(v, str) for v in hp.values())  # a SageMaker map: strings only
    config = from_hyperparameters(hp)
    assert config.is_regression
    assert config.enc0.network == config.enc1.network == "pooled_embedding"
    # pooled_embedding forces token dim = enc_dim; the preset says so itself (no warning).
    assert int(hp["enc0_token_embedding_dim"]) == int(hp["enc1_token_embedding_dim"]) == config.enc_dim
    assert (config.enc0.vocab_size, config.enc1.vocab_size) == (944, 1683)


def test_demo_hyperparameters_overrides():
    hp = demo.demo_hyperparameters(vocab_sizes=(31, 41), epochs=3, quick=True,
                                   overrides={"output_layer": "softmax"})
    assert hp["enc0_vocab_size"] == "31" and hp["enc1_vocab_size"] == "41"
    assert hp["epochs"] == "3"  # --epochs wins over QUICK
    assert hp["enc_dim"] == demo.QUICK["enc_dim"]
    assert hp["output_layer"] == "softmax"
    assert demo.demo_hyperparameters()["epochs"] == demo.preset_hyperparameters()["epochs"]


def test_baselines_by_hand():
    users = np.array([1, 1, 2, 2])
    ratings = np.array([5.0, 3.0, 2.0, 2.0])  # mean 3; user 1: 4, user 2: 2
    val_users = np.array([1, 2, 3])  # user 3 has no train ratings: global mean
    val = np.array([4.0, 4.0, 3.0])
    got = demo.baselines(users, ratings, val_users, val)
    assert got["global mean"] == pytest.approx(np.sqrt((1 + 1 + 0) / 3))
    assert got["per-user mean"] == pytest.approx(np.sqrt((0 + 4 + 0) / 3))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_excludes_the_query_and_orders(metric):
    vectors = np.array([[0, 0], [1, 0], [2, 0.1], [0, 1], [1.1, 0.05], [-1, 0]], np.float32)
    ids, scores = demo.nearest(vectors, np.array([1, 3]), np.arange(1, 6), 2, metric)
    assert 1 not in ids[0] and 3 not in ids[1]
    assert ids[0].tolist() == [4, 2]
    if metric == "cosine":
        assert (np.diff(scores, axis=1) <= 0).all() and scores[0, 0] == pytest.approx(
            np.dot([1, 0], [1.1, 0.05]) / np.linalg.norm([1.1, 0.05]))
    else:
        assert (np.diff(scores, axis=1) >= 0).all()
    with pytest.raises(ValueError, match="metric"):
        demo.nearest(vectors, np.array([1]), np.arange(1, 6), 2, "manhattan")


def test_read_titles(tmp_path):
    path = tmp_path / "movies.tsv"
    path.write_text("item_id\ttitle\tgenres\n1\tToy Story (1995)\tAnimation\n195\tTerminator, The (1984)\t\n")
    assert demo.read_titles(path) == {1: "Toy Story (1995)", 195: "Terminator, The (1984)"}
    assert demo.read_titles(None) == {} and demo.read_titles(tmp_path / "missing.tsv") == {}
