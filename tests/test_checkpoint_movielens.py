"""The shipped default model, checkpoints/movielens-100k: loads, answers plausibly and
deterministically, and is what its model card says it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import o2v_jax
from o2v_jax import demo

MODEL_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "movielens-100k"
MAX_BYTES = 5 * 2**20  # "a few MB at most"


@pytest.fixture(scope="module")
def model():
    return o2v_jax.load(MODEL_DIR)


def real_pairs(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int32 (n, 1) user ids in 1..943 and item ids in 1..1682 (MovieLens 100k's ranges)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, 944, size=(n, 1)).astype(np.int32)
    items = rng.integers(1, 1683, size=(n, 1)).astype(np.int32)
    return users, items


def test_predictions_finite_and_plausible(model):
    users, items = real_pairs()
    scores = model.predict(users, items)
    assert scores.shape == (len(users), 1)
    assert np.isfinite(scores).all()
    # Ratings are 1..5; an unbounded regression output should still stay near that range.
    assert scores.min() >= 0.0 and scores.max() <= 6.0
    assert 2.5 < scores.mean() < 4.5  # the training mean is 3.52
    assert scores.std() > 0.1  # not a constant predictor


def test_deterministic_across_calls_and_batch_compositions(model):
    users, items = real_pairs(n=200, seed=1)
    first = model.predict(users, items)
    np.testing.assert_array_equal(model.predict(users, items), first)
    # Other batch compositions: reversed order, a subset in its own batch, single rows
    # (different batch-size buckets), lists instead of arrays.
    rev = model.predict(users[::-1], items[::-1])[::-1]
    np.testing.assert_allclose(rev, first, rtol=1e-5, atol=1e-5)
    sub = model.predict(users[5:12], items[5:12])
    np.testing.assert_allclose(sub, first[5:12], rtol=1e-5, atol=1e-5)
    one = model.predict([users[3].tolist()], [items[3].tolist()])
    np.testing.assert_allclose(one, first[3:4], rtol=1e-5, atol=1e-5)


def test_movie_embeddings(model):
    emb = model.embed([[195], [96]], encoder="in1")  # Terminator, Terminator 2
    assert emb.shape == (2, 64) and np.isfinite(emb).all()
    again = model.embed([[96], [1], [195]], encoder="in1")
    np.testing.assert_allclose(again[[2, 0]], emb, rtol=1e-5, atol=1e-6)


def test_model_dir_is_small_complete_and_from_the_preset():
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_BYTES
    assert not (MODEL_DIR / "training").exists()  # train() removes it when it finishes
    # No MovieLens data is shipped (GroupLens terms): the model alone.
    assert not any(p.suffix in (".jsonl", ".tsv", ".data", ".inter", ".item") for p in files)
    manifest = json.loads((MODEL_DIR / "model.json").read_text())
    hp = manifest["hyperparameters"]
    preset = demo.preset_hyperparameters()
    for key in ("enc_dim", "comparator_list", "mlp_layers", "mlp_dim", "mlp_activation",
                "dropout", "optimizer", "learning_rate", "weight_decay", "mini_batch_size",
                "epochs", "enc0_vocab_size", "enc1_vocab_size"):
        want, got = preset[key], hp[key]
        same = float(got) == float(want) if _is_number(want) else got == want
        assert same, (key, got, want)
    assert manifest["metadata"]["seed"] == 0
    assert manifest["metadata"]["epochs_run"] == int(preset["epochs"])
    # Every array has a checksum (o2v_jax.load, in the fixture, verified them).
    assert set(manifest["checksums"]) == {"embed0/embedding", "embed1/embedding", "mlp/0/bias",
                                          "mlp/0/kernel", "output/bias", "output/kernel"}


def test_model_card_names_terms_metrics_and_command():
    card = (MODEL_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    for needle in ("Harper", "Konstan", "research", "RMSE", "o2v train", "seed 0",
                   "presets/movielens.json"):
        assert needle in card, needle


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("manifest, message", [
    (b"[1, 2]", "format 'list', expected 'o2v-jax-model/1'; not an o2v-jax model directory"),
    (b'{"format": "keras", "modelTopology": {}}', "format 'keras', expected"),  # another tool's
    (b'{"format": "o2v-jax-model/1", "hyperparameters": {}}', "incomplete manifest (missing params_dir, metadata)"),
    (b'{"format": "o2v-jax-model/1\xff"}', "not UTF-8 JSON"),
    (b'{"format": ', "model.json:1: not valid JSON"),
])
def test_a_model_json_that_is_not_ours_is_a_clear_error(tmp_path, manifest, message):
    from o2v_jax.checkpoint import ModelDirError

    model_dir = tmp_path / "m"
    shutil.copytree(MODEL_DIR, model_dir)
    (model_dir / "model.json").write_bytes(manifest)
    with pytest.raises(ModelDirError) as e:
        o2v_jax.load(model_dir)
    assert message in str(e.value)
