"""The search behind objective=contrastive's defaults, on the validation split only.

Title -> review retrieval on Women's E-Commerce Clothing Reviews
(``womens_reviews.prepare``; the test split is never read here). Each trial trains
``objective=contrastive`` with the hyperparameters BASE, then the trial's overrides, on
the train split (and, with ``"_ict": true``, the inverse-cloze pairs of the train
reviews mixed in), with the validation split as the validation channel: after every
epoch the validation titles rank the validation reviews (hits@10, MRR), early stopping
watches 1 - MRR and the best epoch is kept. One JSON line per trial: the overrides, the
validation hits@10 and MRR of the kept epoch and of every epoch, the epochs run and the
training seconds (validation scoring included; the machine is shared, so seconds are
noisy). Results and reasoning: benchmarks/RESULTS.md, "Retrieval".

    python benchmarks/tune_retrieval.py --data runs/womens            # every trial in TRIALS
    python benchmarks/tune_retrieval.py --data runs/womens 3 4        # trials by index
    python benchmarks/tune_retrieval.py --data runs/womens '{"enc_dim": 512}'  # given ones

Keys starting with "_" pick the variant rather than a hyperparameter: "_ict" (mix in
the inverse-cloze pairs), "_seed" (default 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import womens_reviews  # noqa: E402

# Every trial starts from objective=contrastive with only the data's sizes set, so its
# other values are o2v's defaults for that objective (config.CONTRASTIVE_DEFAULTS).
BASE = {"objective": "contrastive"}
POOLED = {"enc0_network": "pooled_embedding", "enc_dim": 1024}
# The search as run on 2026-12-07, in order (results: benchmarks/RESULTS.md, "Retrieval").
# Each trial spells out what it sets, so it replays the same whatever the defaults are now.
TRIALS: list[dict] = [
    # 1. The calibration's starting point: tied pooled table, width 1024, a fast rate.
    POOLED | {"learning_rate": 0.002, "epochs": 12, "early_stopping_tolerance": 0.001},
    # 2. The same with the inverse-cloze pairs mixed in (a 40-token bucket width: fewer
    #    compiles of the mixed lengths); then a slower rate on the train pairs alone.
    POOLED | {"learning_rate": 0.002, "epochs": 6, "early_stopping_tolerance": 0.001,
              "bucket_width": 40, "_ict": True},
    POOLED | {"learning_rate": 0.0004, "epochs": 8, "early_stopping_tolerance": 0.001,
              "bucket_width": 40},
    # 3. Slower rate and a warmer softmax with the inverse-cloze pairs (stopped after two
    #    epochs: past the time budget); bigger batches (more in-batch negatives).
    POOLED | {"learning_rate": 0.0004, "contrastive_temperature": 0.1, "epochs": 4,
              "early_stopping_tolerance": 0.001, "bucket_width": 40, "_ict": True},
    POOLED | {"learning_rate": 0.004, "contrastive_temperature": 0.1, "mini_batch_size": 1024,
              "epochs": 3, "early_stopping_tolerance": 0.001, "bucket_width": 40, "_ict": True},
    POOLED | {"learning_rate": 0.004, "contrastive_temperature": 0.1, "mini_batch_size": 1024,
              "epochs": 10, "early_stopping_tolerance": 0.001, "bucket_width": 40},
    # 4. The rate between the two: best with and without the inverse-cloze pairs.
    POOLED | {"learning_rate": 0.001, "epochs": 3, "early_stopping_tolerance": 0.001,
              "bucket_width": 40, "_ict": True},
    POOLED | {"learning_rate": 0.001, "epochs": 8, "early_stopping_tolerance": 0.001,
              "bucket_width": 40},
    # 5. Regularisation, to train longer: dropout on the encodings (both losses' site).
    POOLED | {"learning_rate": 0.001, "epochs": 8, "early_stopping_tolerance": 0.001,
              "bucket_width": 40, "dropout": 0.3},
    POOLED | {"learning_rate": 0.001, "epochs": 3, "early_stopping_tolerance": 0.001,
              "bucket_width": 40, "dropout": 0.3, "_ict": True},
]


def data_hyperparameters(prep: womens_reviews.Prepared) -> dict[str, str]:
    """The sizes a model of this data needs: vocabulary and the longest sequence."""
    longest = 0
    for path in (prep.train, prep.ict):
        titles, reviews = womens_reviews.read_pairs(path)
        longest = max(longest, max(map(len, titles)), max(map(len, reviews)))
    return {"enc0_vocab_size": str(prep.vocab_size), "enc0_max_seq_len": str(longest)}


def training_file(prep: womens_reviews.Prepared, ict: bool, work_dir: Path) -> Path:
    """The train split, or the train split followed by the inverse-cloze pairs."""
    if not ict:
        return prep.train
    path = work_dir / "train_and_ict.jsonl"
    if not path.exists():
        path.write_text(prep.train.read_text() + prep.ict.read_text())
    return path


def trial(prep: womens_reviews.Prepared, overrides: dict, *, work_dir: Path,
          sizes: dict[str, str] | None = None, test: bool = False) -> dict:
    """Train one configuration with validation; its validation (and with ``test``, its
    test) metrics, history and seconds."""
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.data import read_channel
    from o2v_jax.training import train

    hp = {**BASE, **(sizes or data_hyperparameters(prep))}
    hp.update({k: str(v) for k, v in overrides.items() if not k.startswith("_")})
    config = from_hyperparameters(hp)
    train_data = read_channel(training_file(prep, bool(overrides.get("_ict")), work_dir), config)
    validation = read_channel(prep.validation, config, name="validation")
    test_data = read_channel(prep.test, config, name="test") if test else None
    with tempfile.TemporaryDirectory(prefix="model-", dir=work_dir) as model_dir:
        t0 = time.perf_counter()
        result = train(config, train_data, model_dir=model_dir, validation=validation,
                       test=test_data, seed=int(overrides.get("_seed", 0)),
                       emit=lambda line: None, progress=False)
        seconds = time.perf_counter() - t0
    best = result.history[result.best_epoch]
    out = {"overrides": overrides, "train_records": len(train_data),
           "validation_hits@10": best["validation_hits@10"],
           "validation_mrr": best["validation_mrr"], "best_epoch": result.best_epoch,
           "epochs_run": result.epochs_run, "train_seconds": round(seconds, 1),
           "curve": [(round(h["validation_hits@10"], 4), round(h["validation_mrr"], 4))
                     for h in result.history]}
    if test:
        out["test"] = result.test_metrics
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="prepared splits (womens_reviews.py --out)")
    ap.add_argument("trials", nargs="*", help="indices into TRIALS, or JSON override maps")
    args = ap.parse_args(argv)
    from o2v_jax.runtime import enable_compilation_cache

    prep = womens_reviews.prepare(args.data, progress=False)
    chosen = [TRIALS[int(t)] if t.isdigit() else json.loads(t) for t in args.trials] or TRIALS
    sizes = data_hyperparameters(prep)
    with tempfile.TemporaryDirectory(prefix="o2v-tune-retrieval-") as tmp:
        enable_compilation_cache(Path(tmp) / "jax-cache")
        for overrides in chosen:
            print(json.dumps(trial(prep, overrides, work_dir=Path(tmp), sizes=sizes)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
