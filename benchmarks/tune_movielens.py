"""The hyperparameter search behind the MovieLens demo preset, on the train split only.

ua.test (the validation channel of the notebook and the demo) is never read here. The
tuning split is carved out of ua.base much as ua.test is carved out of u.data: walking
ua.base's ratings in u.data file order, each user's first min(10, n // 2) ratings (n =
the user's ua.base ratings) go to `tune`, the rest to `fit` (81,804 fit / 8,766 tune).
The cap at half keeps the users with 20 ratings in all (10 in ua.base) from becoming
cold users, which ua.test never has. Each trial trains on `fit`, scores `tune` after
every epoch (early stopping loosened to patience 5, tolerance 1e-6, so the curve runs on
unless it has clearly turned) and prints one JSON line: the overrides, tune and train
RMSE per epoch, the best epoch and the seconds.

    python benchmarks/tune_movielens.py                        # every round in ROUNDS
    python benchmarks/tune_movielens.py 3                      # one round
    python benchmarks/tune_movielens.py '{"enc_dim": 128}' ... # given trials (preset + overrides)

Trials run one after another (the machine is shared); a trial is 10-50 s on 2 cores.
The key "_seed" in a trial sets the seed (default 0).

Trials run one after another (the machine is shared); keep them short.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from o2v_jax import movielens  # noqa: E402
from o2v_jax.data import PairData, Ragged  # noqa: E402

TUNE_PER_USER = 10  # as ua.test, capped at half of each user's ua.base ratings

# The search that chose o2v_jax/presets/movielens.json, round by round, as run. Every
# trial is the preset with its overrides, so each one spells out what it varies from the
# starting point START (the issue's suggestions: adam, relu, dropout 0.3). Results and
# reasoning: benchmarks/RESULTS.md, "MovieLens quality".
START = {"optimizer": "adam", "learning_rate": 0.002, "mlp_activation": "relu", "dropout": 0.3,
         "weight_decay": 0, "mini_batch_size": 256}
ADAGRAD = {"optimizer": "adagrad", "learning_rate": 0.05, "mlp_activation": "tanh",
           "dropout": 0.1, "weight_decay": 0.005, "mini_batch_size": 256, "epochs": 20}
D128 = {"enc_dim": 128, "enc0_token_embedding_dim": 128, "enc1_token_embedding_dim": 128}
ROUNDS: list[list[dict]] = [
    # 1. Adam around START: tanh, bigger batches, dropout, weight decay.
    [START | {"epochs": 15, "mlp_activation": "tanh"},
     START | {"epochs": 15, "mlp_activation": "tanh", "mini_batch_size": 1024},
     START | {"epochs": 15, "mlp_activation": "tanh", "mini_batch_size": 1024, "dropout": 0.5},
     START | {"epochs": 15, "mlp_activation": "tanh", "mini_batch_size": 1024, "weight_decay": 0.001}],
    # 2. Weight decay is what matters: sweep it (adam, tanh, batch 512, dropout 0.1).
    *[[START | {"epochs": 15, "mlp_activation": "tanh", "mini_batch_size": 512, "dropout": d,
                "weight_decay": wd} for d, wd in ((0.1, 3e-4), (0.1, 3e-3), (0.1, 0.01), (0.0, 3e-3))]],
    # 3. Around the best of round 2: lazy row updates, width, comparator, adagrad.
    [START | {"epochs": 15, "mlp_activation": "tanh", "mini_batch_size": 512, "dropout": 0.1,
              "weight_decay": 3e-3} | extra
     for extra in ({"token_embedding_storage_type": "row_sparse"},
                   {"enc_dim": 32, "enc0_token_embedding_dim": 32, "enc1_token_embedding_dim": 32},
                   D128, {"comparator_list": "hadamard"},
                   {"optimizer": "adagrad", "learning_rate": 0.05})],
    # 4. Adagrad (its decaying step anneals the noise Adam leaves at the end).
    [ADAGRAD | {"epochs": 15, "weight_decay": wd, "learning_rate": lr, "dropout": d,
                "mlp_layers": layers, "mini_batch_size": 512}
     for lr, wd, d, layers in ((0.1, 3e-3, 0.1, 1), (0.05, 0.01, 0.1, 1), (0.05, 1e-3, 0.1, 1),
                               (0.05, 3e-3, 0.1, 0), (0.05, 3e-3, 0.3, 1))],
    # 5. SGD (classic matrix factorisation's optimizer): overfits or diverges.
    [START | {"epochs": 20, "mlp_activation": "tanh", "mini_batch_size": 64, "optimizer": "sgd",
              "dropout": 0.0, "learning_rate": lr, "weight_decay": wd}
     for lr, wd in ((0.3, 1e-4), (0.3, 3e-5), (1.0, 3e-5), (0.3, 1e-3), (0.3, 3e-3))],
    # 6. Adagrad: seeds, width, dropout, activation, depth, batch.
    [ADAGRAD | {"epochs": 15, "weight_decay": 3e-3, "mini_batch_size": 512} | extra
     for extra in ({"_seed": 1}, D128, D128 | {"dropout": 0.3}, {"mlp_activation": "relu"},
                   {"mlp_dim": 256, "mlp_layers": 2}, {"mini_batch_size": 256})],
    # 7. Longer, weight decay 0.002-0.005, dropout 0.
    [ADAGRAD | {"epochs": 25, "weight_decay": wd, "dropout": d}
     for wd, d in ((0.002, 0.1), (0.005, 0.1), (0.003, 0.0))],
    # 8. Structure: enc_dim 256, no MLP, comparator subsets, rmsprop, hcnn towers, adam.
    [ADAGRAD | extra for extra in (
        {"enc_dim": 256, "enc0_token_embedding_dim": 256, "enc1_token_embedding_dim": 256,
         "dropout": 0.2},
        {"mlp_layers": 0, "learning_rate": 0.2}, {"comparator_list": "hadamard, concat"},
        {"optimizer": "rmsprop", "learning_rate": 0.001},
        {"comparator_list": "hadamard, abs_diff"}, {"comparator_list": "abs_diff, concat"},
        {"mlp_dim": 512}, {"mini_batch_size": 1024, "learning_rate": 0.1},
        {"weight_decay": 0.004, "dropout": 0.0}, {"_seed": 1},
        {"enc0_network": "hcnn", "enc1_network": "hcnn", "enc0_layers": 1, "enc1_layers": 1},
        {"optimizer": "adam", "learning_rate": 0.0005},
        {"optimizer": "adam", "learning_rate": 0.0005, "weight_decay": 0.002})],
    # 9. The final neighbourhood: weight decay 0.004 vs 0.007 (two seeds), batch, step.
    [ADAGRAD | {"weight_decay": wd, "_seed": seed} for wd in (0.004, 0.007) for seed in (0, 1)]
    + [ADAGRAD | {"weight_decay": 0.004} | extra
       for extra in ({"mini_batch_size": 128}, {"mini_batch_size": 64, "learning_rate": 0.03},
                     {"learning_rate": 0.03, "epochs": 25})],
]


def pairs(user: np.ndarray, item: np.ndarray, rating: np.ndarray, name: str) -> PairData:
    """One-token-per-side PairData straight from id arrays (no JSON round trip)."""
    offsets = np.arange(len(user) + 1, dtype=np.int64)
    return PairData(Ragged(user.astype(np.int32), offsets), Ragged(item.astype(np.int32), offsets),
                    rating.astype(np.float32), name)


def tuning_split(cache_dir: Path | None = None) -> tuple[PairData, PairData]:
    """(fit, tune): ua.base split again by the ua rule; ua.test is dropped."""
    inter, _ = movielens.cached_files(cache_dir, progress=False)
    r = movielens.parse_ratings(inter.read_text(encoding="utf-8"), str(inter))
    base = np.flatnonzero(~movielens.ua_split(r.user))  # ua.base rows, in file order
    user = r.user[base]
    # Rank of each rating within its user, in file order (as ua_split counts).
    order = np.argsort(user, kind="stable")
    starts = np.flatnonzero(np.r_[True, user[order][1:] != user[order][:-1]])
    counts = np.diff(np.r_[starts, len(user)])
    rank = np.empty(len(user), np.int64)
    rank[order] = np.arange(len(user)) - np.repeat(starts, counts)
    # At most half of a user's ua.base ratings: users with 10 of them (20 in all) keep 5
    # for fitting instead of becoming cold users that ua.test never has.
    per_user = np.minimum(TUNE_PER_USER, counts // 2)
    tune = rank < np.repeat(per_user, counts)[np.argsort(order)]
    fit_rows, tune_rows = base[~tune], base[tune]
    return (pairs(r.user[fit_rows], r.item[fit_rows], r.rating[fit_rows], "ua.base-fit"),
            pairs(r.user[tune_rows], r.item[tune_rows], r.rating[tune_rows], "ua.base-tune"))


def trial(overrides: dict, fit: PairData, tune: PairData, seed: int = 0) -> dict:
    from o2v_jax.demo import preset_hyperparameters
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.train import train

    hp = preset_hyperparameters() | {k: str(v) for k, v in overrides.items()}
    # Patience 5 at its max and the tolerance at its min: the curve runs to `epochs`
    # unless it has clearly turned; the kept model is irrelevant here.
    hp |= {"early_stopping_patience": "5", "early_stopping_tolerance": "1e-6"}
    config = from_hyperparameters(hp)
    with tempfile.TemporaryDirectory(prefix="o2v-tune-") as tmp:
        t0 = time.perf_counter()
        result = train(config, fit, validation=tune, model_dir=tmp, seed=seed,
                       emit=lambda line: None, progress=False)
        seconds = time.perf_counter() - t0
    rmse = [round(float(np.sqrt(h["validation_mean_squared_error"])), 4) for h in result.history]
    train_rmse = [round(float(np.sqrt(h["train_mean_squared_error"])), 4) for h in result.history]
    best = int(np.argmin(rmse))
    return {"overrides": overrides, "seed": seed, "best_epoch": best, "best_tune_rmse": rmse[best],
            "tune_rmse": rmse, "train_rmse": train_rmse, "seconds": round(seconds, 1)}


def main(argv: list[str]) -> int:
    if not argv:
        trials = [t for r in ROUNDS for t in r]
    elif len(argv) == 1 and argv[0].isdigit():
        trials = ROUNDS[int(argv[0]) - 1]
    else:
        trials = [json.loads(a) for a in argv]
    trials = [dict(t) for t in trials]  # pop("_seed") below must not change ROUNDS
    fit, tune = tuning_split()
    print(f"# fit {len(fit):,} / tune {len(tune):,} ratings (ua.base only)", flush=True)
    for overrides in trials:
        seed = overrides.pop("_seed", 0)
        print(json.dumps(trial(overrides, fit, tune, seed=seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
