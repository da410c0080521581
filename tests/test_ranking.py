"""A model's retrieval quality on pairs files, and objective=contrastive's validation
metric and early stopping (o2v_jax/ranking.py, issue 21)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import group_pairs, tiny_hp, write_jsonl

from o2v_jax import lexical, ranking, retrieval


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory):
    """One tiny contrastive model trained with validation and test channels: its model
    directory, the files, the emitted lines and the TrainResult."""
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.data import read_channel
    from o2v_jax.training import train

    root = tmp_path_factory.mktemp("contrastive")
    config = from_hyperparameters(tiny_hp(objective="contrastive", epochs=6,
                                          early_stopping_patience=1, mini_batch_size=16))
    files = {name: write_jsonl(root / f"{name}.jsonl", group_pairs(n, seed, max_len=4))
             for name, n, seed in (("train", 64, 0), ("validation", 24, 1), ("test", 24, 2))}
    channels = {name: read_channel(path, config, name=name) for name, path in files.items()}
    lines: list[str] = []
    result = train(config, channels["train"], model_dir=root / "model",
                   validation=channels["validation"], test=channels["test"],
                   emit=lines.append, progress=False)
    return root / "model", files, lines, result


def test_validation_lines_and_the_kept_epoch_follow_validation_mrr(contrastive_run):
    model_dir, _, lines, result = contrastive_run
    for epoch in range(result.epochs_run):
        for name in retrieval.METRIC_NAMES:  # <score>: higher is better (HPO regexes)
            assert sum(f"epoch={epoch}, validation {name} <score>=" in line for line in lines) == 1
        assert sum(f"epoch={epoch}, train contrastive_loss <loss>=" in line for line in lines) == 1
    mrrs = [h["validation_mrr"] for h in result.history]
    assert result.best_epoch == int(np.argmax(mrrs))
    assert any(f"Best validation mrr: {mrrs[result.best_epoch]:.4f}" in line for line in lines)
    assert sum(" test hits@10 <score>=" in line for line in lines) == 1


def test_evaluate_retrieval_scores_the_kept_parameters(contrastive_run):
    # Training scores its channels with a jitted encode of the parameters in training
    # (ranking.Embedder); the saved model, loaded for inference, must score the same.
    from o2v_jax.checkpoint import read_config
    from o2v_jax.data import read_channel

    model_dir, files, _, result = contrastive_run
    got = ranking.evaluate_retrieval(model_dir, files["test"], baselines=["bm25", "tfidf"])
    for name in retrieval.METRIC_NAMES:
        assert got[name] == pytest.approx(result.test_metrics[name], abs=1e-6)
    config, _ = read_config(model_dir)
    grouped = ranking.task(read_channel(files["test"], config, pairs=True))
    assert got["queries"] + got["queries_without_relevant"] == len(grouped.queries)
    assert got["candidates"] == len(grouped.candidates)
    for name in ("bm25", "tfidf"):
        scorer = lexical.scorer(name, grouped.candidates, grouped.queries)
        want = retrieval.evaluate_blocks(scorer.block, grouped.relevance)
        assert got["baselines"][name] == want
    lines = ranking.quality_lines("algo-1", "test", got)
    assert "#quality_metric: host=algo-1, test bm25 hits@10 <score>=" in "\n".join(lines)
    assert len(lines) == 3 * len(retrieval.METRIC_NAMES)


def test_evaluate_retrieval_counts_unlabelled_records_as_relevant(contrastive_run, tmp_path):
    # A pairs file's label may be left out (= 1); label 0 adds a candidate, no relevance.
    model_dir, files, _, _ = contrastive_run
    records = [json.loads(line) for line in files["test"].read_text().splitlines()]
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [
        {"in0": r["in0"], "in1": r["in1"]} if r["label"] == 1 else r for r in records])
    import o2v_jax

    # o2v_jax.evaluate_retrieval is the same function; it takes a loaded model too.
    assert o2v_jax.evaluate_retrieval(o2v_jax.load(model_dir), unlabelled) == \
        ranking.evaluate_retrieval(model_dir, files["test"])


def test_unknown_baseline_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"baseline 'bm99' is unknown: expected one of bm25, tfidf"):
        ranking.evaluate_retrieval(tmp_path / "no-such-model", tmp_path / "none.jsonl",
                                   baselines=["bm99"])


def test_a_pairs_file_without_in1_names_the_line_and_field(contrastive_run, tmp_path):
    from o2v_jax.data import DataError

    model_dir = contrastive_run[0]
    path = tmp_path / "q.jsonl"
    path.write_text('{"in0": [1, 2], "in1": [3]}\n{"in0": [4]}\n')
    with pytest.raises(DataError, match=r'q\.jsonl:2: field "in1": missing \(every record '
                                        r'needs "in0" \(the query\) and "in1"'):
        ranking.evaluate_retrieval(model_dir, path)


def test_pair_evaluation_refuses_a_contrastive_model(contrastive_run):
    from o2v_jax.api import evaluate
    from o2v_jax.checkpoint import ModelDirError

    model_dir, files, _, _ = contrastive_run
    with pytest.raises(ModelDirError, match="evaluate it with `o2v evaluate --retrieval`"):
        evaluate(model_dir, files["test"])
