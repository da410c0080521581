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

Trials run one after another (the machine is shared); a trial is 10-50 s on 2 cores
(rating-bag layouts: 1-4 minutes). Keys starting with "_" pick the variant rather than a
hyperparameter: "_seed" (default 0), and "_layout", "_id_repeat", "_keep", "_bag", "_target",
"_ensemble" (see `trial`).
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

from o2v_jax import movielens, movielens_formats  # noqa: E402
from o2v_jax.data import PairData  # noqa: E402
from o2v_jax.ragged import Ragged  # noqa: E402

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
    # 10. (second session) Beyond one id per side, on the preset: ratings as 5 softmax
    # classes scored by their expected value; lazy row_sparse decay; a 4-seed average; and
    # rating-profile bags (see `bags`), which carry what SVD++ and GC-MC add to a
    # factorisation. 100-200 s per bag trial (16M tokens per epoch).
    [{"_target": "softmax5", "weight_decay": wd} for wd in (0.001, 0.002, 0.003, 0.004, 0.008)]
    + [{"_target": "softmax5", "weight_decay": 0.002, "epochs": 24},
       {"_target": "softmax5", "weight_decay": 0.002} | D128]
    + [{"token_embedding_storage_type": "row_sparse", "weight_decay": wd}
       for wd in (0.004, 0.01, 0.02, 0.05)]
    + [{"_ensemble": 4}]
    + [{"_layout": "profile", "epochs": e, "weight_decay": wd} for e, wd in ((8, 0.004), (10, 0.001),
                                                                            (10, 0.0002))]
    + [{"_layout": "profile", "_keep": 0.25, "epochs": 12, "weight_decay": wd} for wd in (0.0002, 0.001)]
    + [{"_layout": "profile-user", "epochs": 14, "weight_decay": 0.0002},
       {"_layout": "profile-user", "epochs": 14, "weight_decay": 0.002,
        "token_embedding_storage_type": "row_sparse"}]
    + [{"_layout": "profile-user", "_id_repeat": "sqrt", "epochs": e, "weight_decay": wd,
        "learning_rate": lr, "dropout": d}
       for e, wd, lr, d in ((14, 0.0005, 0.05, 0.1), (14, 0.002, 0.05, 0.1), (16, 0.0005, 0.2, 0.1),
                            (16, 0.0001, 0.1, 0.3), (30, 0.0005, 0.05, 0.1))],
    # 11. (fifth session) SVD++'s own implicit set: the user's bag holds the movies rated,
    # not (movie, rating) pairs, so each bag token is shared by ~50 users.
    [{"_layout": "profile-user", "_bag": "implicit", "_id_repeat": "sqrt", "epochs": e,
      "weight_decay": wd, "learning_rate": lr}
     for e, wd, lr in ((16, 0.0005, 0.05), (16, 0.002, 0.05), (30, 0.0005, 0.2))],
]


def pairs(user: np.ndarray, item: np.ndarray, rating: np.ndarray, name: str) -> PairData:
    """One-token-per-side PairData straight from id arrays (no JSON round trip)."""
    offsets = np.arange(len(user) + 1, dtype=np.int64)
    return PairData(Ragged(user.astype(np.int32), offsets), Ragged(item.astype(np.int32), offsets),
                    rating.astype(np.float32), name)


def tuning_split(cache_dir: Path | None = None) -> tuple[PairData, PairData]:
    """(fit, tune): ua.base split again by the ua rule; ua.test is dropped."""
    inter, _ = movielens.cached_files(cache_dir, progress=False)
    r = movielens_formats.parse_ratings(inter.read_text(encoding="utf-8"), str(inter))
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


def bags(owner: np.ndarray, other: np.ndarray, rating: np.ndarray, q_owner: np.ndarray,
         *, n_owner: int, exclude: bool, id_repeat: str, implicit: bool = False) -> Ragged:
    """Each query's owner as a bag: its id token(s), then one token per rating it gave or got.

    For a user, ``[user, ..., (item, rating), ...]`` over the user's `fit` ratings; for an
    item, ``[item, ..., (user, rating), ...]``. A (other, rating) pair is token
    ``n_owner + 1 + (other - 1) * 5 + (rating - 1)``. With ``exclude`` the queries are the
    fit rows themselves (``q_owner`` = ``owner``) and each drops its own rating from its
    bag, so the label is never an input; otherwise a query sees all its owner's ratings. ``id_repeat="sqrt"`` repeats the id round(sqrt(n))
    times: under mean pooling that weighs the id against the bag as SVD++ weighs
    p_u against n^-1/2 sum(y_j), instead of 1/(n+1). ``implicit``: one token per rated
    other, whatever the rating (``n_owner + other``): SVD++'s y_j, which only says what
    was rated.
    """
    order = np.argsort(owner, kind="stable")
    if implicit:
        token = n_owner + other[order].astype(np.int64)
    else:
        token = (n_owner + 1 + (other[order] - 1) * 5 + (rating[order].astype(np.int64) - 1))
    counts = np.bincount(owner, minlength=n_owner + 1)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    n = counts[q_owner] - exclude
    seg = np.repeat(np.arange(len(q_owner)), n)
    within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    if exclude:  # skip the query's own position in its owner's run
        pos = np.empty(len(owner), np.int64)
        pos[order] = np.arange(len(owner)) - starts[owner[order]]
        within += within >= pos[seg]
    bag = token[starts[q_owner][seg] + within]
    ids = np.maximum(1, np.rint(np.sqrt(n))).astype(np.int64) if id_repeat == "sqrt" else np.ones_like(n)
    offsets = np.r_[0, np.cumsum(ids + n)].astype(np.int64)
    is_id = np.arange(offsets[-1]) - np.repeat(offsets[:-1], ids + n) < np.repeat(ids, ids + n)
    tokens = np.empty(offsets[-1], np.int32)
    tokens[is_id] = np.repeat(q_owner, ids)
    tokens[~is_id] = bag
    return Ragged(tokens, offsets)


def thin(data: Ragged, keep: float, rng: np.random.Generator, n_owner: int) -> Ragged:
    """Keep each bag token (not the ids) with probability ``keep``: fixed per record."""
    m = (rng.random(data.tokens.size) < keep) | (data.tokens <= n_owner)
    ends = np.r_[0, np.cumsum(m)]
    return Ragged(data.tokens[m], ends[data.offsets].astype(np.int64))


def layout(fit: PairData, tune: PairData, kind: str, id_repeat: str, keep: float,
           implicit: bool = False) -> tuple[PairData, PairData, dict]:
    """(fit, tune, hyperparameter overrides) for the `_layout` trial key."""
    user, item, rating = fit.in0.tokens, fit.in1.tokens, fit.labels
    sides = {"profile": (True, True), "profile-user": (True, False)}[kind]
    out, hp = [], {}
    for exclude in (True, False):
        q_user, q_item = (user, item) if exclude else (tune.in0.tokens, tune.in1.tokens)
        sides_data = []
        for side, (on, owner, other, n_owner, n_other, q_own) in enumerate((
                (sides[0], user, item, N_USERS, N_ITEMS, q_user),
                (sides[1], item, user, N_ITEMS, N_USERS, q_item))):
            if not on:
                sides_data.append(Ragged(q_own.astype(np.int32), np.arange(len(q_own) + 1, dtype=np.int64)))
                continue
            r = bags(owner, other, rating, q_own, n_owner=n_owner, exclude=exclude,
                     id_repeat=id_repeat, implicit=implicit)
            if exclude and keep < 1:
                r = thin(r, keep, np.random.default_rng(side), n_owner)
            sides_data.append(r)
            vocab = n_owner + 1 + n_other * (1 if implicit else 5)
            hp |= {f"enc{side}_vocab_size": vocab, f"enc{side}_max_seq_len": 1000}
        data = fit if exclude else tune
        out.append(PairData(sides_data[0], sides_data[1], data.labels, data.source))
    return out[0], out[1], hp


N_USERS, N_ITEMS = 943, 1682


def trial(overrides: dict, fit: PairData, tune: PairData, seed: int = 0) -> dict:
    """One trial: the preset with ``overrides``; keys starting with _ select the variant.

    ``_layout``: "ids" (the notebook's records), "profile" (both sides as rating bags,
    see :func:`bags`) or "profile-user" (in0 only); ``_id_repeat``: "one" or "sqrt";
    ``_keep``: thin each fit bag once to this fraction; ``_bag``: "ratings" (a token
    per (other, rating), the default) or "implicit" (a token per rated other); ``_target``: "regression" or
    "softmax5" (rating - 1 as 5 classes, scored by the expected rating, last epoch);
    ``_ensemble``: average the last-epoch predictions of seeds 0..n-1.
    """
    from o2v_jax import load
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.demo import preset_hyperparameters
    from o2v_jax.training import train

    special = {k: overrides[k] for k in overrides if k.startswith("_")}
    hp = preset_hyperparameters() | {k: str(v) for k, v in overrides.items() if k not in special}
    # Patience 5 at its max and the tolerance at its min: the curve runs to `epochs`
    # unless it has clearly turned; the kept model is irrelevant here.
    hp |= {"early_stopping_patience": "5", "early_stopping_tolerance": "1e-6"}
    if special.get("_layout", "ids") != "ids":
        fit, tune, extra = layout(fit, tune, special["_layout"], special.get("_id_repeat", "one"),
                                  special.get("_keep", 1.0), special.get("_bag") == "implicit")
        hp |= {k: str(v) for k, v in extra.items()}
    softmax = special.get("_target") == "softmax5"
    if softmax:
        hp |= {"output_layer": "softmax", "num_classes": "5"}
        fit = PairData(fit.in0, fit.in1, fit.labels - 1, fit.source)
    config = from_hyperparameters(hp)
    seeds = range(special["_ensemble"]) if "_ensemble" in special else [seed]
    # A per-epoch tune curve only for single regression runs; otherwise no validation
    # channel, so the last epoch's model is saved and scored here.
    curve = not softmax and "_ensemble" not in special
    t0 = time.perf_counter()
    result, scores = None, []
    for s in seeds:
        with tempfile.TemporaryDirectory(prefix="o2v-tune-") as tmp:
            result = train(config, fit, validation=tune if curve else None, model_dir=tmp, seed=s,
                           emit=lambda line: None, progress=False)
            if not curve:
                p = load(tmp).predict(tune.in0, tune.in1)
                scores.append(p @ np.arange(1, 6, dtype=np.float32) if softmax else p[:, 0])
    seconds = time.perf_counter() - t0

    def rmse(mse) -> float:
        return round(float(np.sqrt(mse)), 4)

    out = {"overrides": overrides, "seed": seed}
    if curve:
        curve_rmse = [rmse(h["validation_mean_squared_error"]) for h in result.history]
        best = int(np.argmin(curve_rmse))
        out |= {"best_epoch": best, "best_tune_rmse": curve_rmse[best], "tune_rmse": curve_rmse}
    else:
        out |= {"last_epoch_tune_rmse": rmse(np.mean((np.mean(scores, axis=0) - tune.labels) ** 2)),
                "per_seed": [rmse(np.mean((p - tune.labels) ** 2)) for p in scores]}
    if not softmax:  # a softmax run's train loss is cross-entropy, not MSE
        out["train_rmse"] = [rmse(h["train_mean_squared_error"]) for h in result.history]
    return out | {"seconds": round(seconds, 1)}


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
