"""`o2v demo`: MovieLens 100k end to end, the SageMaker Object2Vec notebook in minutes on a CPU.

Fetch the ratings (cached after the first run), write the ua split, train the rating
regression model with the preset in ``o2v_jax/presets/movielens.json`` (the one place the
demo's hyperparameters live; `o2v train --hyperparameters` reads it unchanged), print the
validation RMSE next to the global-mean and per-user-mean baselines, embed every movie
with enc1, print the nearest neighbours of a few well-known titles, and say how to serve
the model. Training goes through :func:`o2v_jax.api.fit`, the path of ``o2v train`` and
``o2v_jax.train``, so the model directory holds what every run leaves: ``metrics.jsonl``
and ``learning_curves.png``, whose loss panel here also shows the two baselines.

Layout under ``--out DIR`` (default ``runs/movielens-demo``)::

    data/                        the channels (`o2v data movielens`), unless --data says elsewhere
    model/                       the trained model (o2v_jax.load / o2v serve --model-dir)
    model/metrics.jsonl          one line per epoch: train and validation MSE, seconds, records/s
    model/learning_curves.png    those curves and the baselines (needs matplotlib)
    demo.json                    the numbers printed

Validation is ua.test, as in the notebook. It is used for the per-epoch curve only: the
preset fixes the epoch count (chosen on a split of ua.base, benchmarks/RESULTS.md
"MovieLens quality") and sets early stopping so loose that it only fires on a curve that
has clearly turned. The headline RMSE is the last epoch's. ``train`` keeps the epoch with
the lowest validation loss; when that is not the last one the demo says so and prints
both numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from o2v_jax.movielens import MovieLensFiles
    from o2v_jax.predictor import Predictor

log = logging.getLogger("o2v_jax")

PRESET = "movielens"  # o2v_jax/presets/<name>.json: SageMaker hyperparameters, all strings
# --quick: the same pipeline with a tiny model (tests, smoke runs); everything else as preset.
QUICK = {"enc_dim": "8", "enc0_token_embedding_dim": "8", "enc1_token_embedding_dim": "8",
         "mlp_dim": "8", "mini_batch_size": "16", "epochs": "2"}
DEFAULT_OUT = Path("runs/movielens-demo")
# Well-known titles whose neighbours are printed (spec §7.1: the notebook's query was
# "Terminator, The (1984)", whose nearest movie was "Die Hard (1988)").
TITLES = ("Terminator, The (1984)", "Toy Story (1995)", "Star Wars (1977)",
          "Godfather, The (1972)", "Fargo (1996)", "Pulp Fiction (1994)")
NEIGHBOURS = 5
# Neighbours are drawn from movies with at least this many training ratings: a movie seen
# a handful of times keeps an embedding near its (decayed) initialisation, and such
# near-zero vectors would crowd every list without saying anything about taste.
MIN_RATINGS = 20
# References on the same ua split (docs: /work/shared/data-sources.md, spec §7.1).
REFERENCES = "SageMaker notebook ≈ 0.954, SVD 0.952–0.954, SVD++ 0.938 (scikit-surprise)"


# --------------------------------------------------------------------------- configuration

def preset_hyperparameters(name: str = PRESET) -> dict[str, str]:
    """The preset's SageMaker hyperparameter map (strings), as shipped in the package."""
    text = resources.files("o2v_jax").joinpath("presets", f"{name}.json").read_text("utf-8")
    return json.loads(text)


def demo_hyperparameters(*, vocab_sizes: tuple[int, int] | None = None, epochs: int | None = None,
                         quick: bool = False, overrides: Mapping[str, Any] = ()) -> dict[str, str]:
    """The preset with the data's vocabulary sizes and the demo's overrides applied.

    Args:
        vocab_sizes: (enc0, enc1) vocabulary sizes of the prepared data (max id + 1);
            None keeps the preset's (MovieLens 100k: 944, 1683).
        epochs: overrides the preset's epoch count.
        quick: apply QUICK (a tiny model).
        overrides: any further SageMaker hyperparameters, applied last.
    """
    hp = preset_hyperparameters()
    if vocab_sizes is not None:
        hp |= {"enc0_vocab_size": str(vocab_sizes[0]), "enc1_vocab_size": str(vocab_sizes[1])}
    if quick:
        hp |= QUICK
    if epochs is not None:
        hp["epochs"] = str(epochs)
    return hp | {k: str(v) for k, v in dict(overrides).items()}


# --------------------------------------------------------------------------- numbers

def rmse(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Root mean squared error of float (N,) predictions against float (N,) labels."""
    err = np.asarray(predictions, np.float64).reshape(-1) - np.asarray(labels, np.float64)
    return float(np.sqrt(np.mean(err * err)))


def baselines(users: np.ndarray, ratings: np.ndarray, val_users: np.ndarray,
              val_ratings: np.ndarray) -> dict[str, float]:
    """RMSE on validation of the two baselines the notebook shows (spec §7.1).

    Args:
        users, ratings: int (N,) user ids and float (N,) ratings of the train split.
        val_users, val_ratings: the same for validation.

    Returns:
        {"global mean": RMSE of predicting the train mean, "per-user mean": RMSE of
        predicting each user's train mean (the global mean for users without one)}.
    """
    mean = float(np.mean(ratings))
    size = int(max(users.max(), val_users.max())) + 1
    sums = np.bincount(users, weights=ratings, minlength=size)
    counts = np.bincount(users, minlength=size)
    per_user = np.where(counts > 0, sums / np.maximum(counts, 1), mean)
    return {"global mean": rmse(np.full(len(val_ratings), mean), val_ratings),
            "per-user mean": rmse(per_user[val_users], val_ratings)}


def nearest(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int,
            metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """The k nearest candidates of each query (the query itself excluded).

    Args:
        vectors: float32 (V, H) one embedding per item id (row = id).
        queries: int (Q,) item ids.
        candidates: int (C,) item ids to search.
        k: neighbours per query.
        metric: "cosine" (similarity, higher is nearer) or "euclidean" (distance).

    Returns:
        (ids int (Q, k), scores float (Q, k)), nearest first.
    """
    q, c = vectors[queries].astype(np.float64), vectors[candidates].astype(np.float64)
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        cn = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        score = qn @ cn.T  # (Q, C)
        key = -score
    elif metric == "euclidean":
        sq = (q * q).sum(1)[:, None] - 2 * q @ c.T + (c * c).sum(1)[None, :]
        score = np.sqrt(np.maximum(sq, 0.0))
        key = score.copy()
    else:
        raise ValueError(f"metric={metric!r}; expected 'cosine' or 'euclidean'")
    key[candidates[None, :] == queries[:, None]] = np.inf  # never a movie's own neighbour
    k = min(k, max(len(candidates) - 1, 0))
    top = np.argsort(key, axis=1, kind="stable")[:, :k]
    return candidates[top], np.take_along_axis(score, top, axis=1)


def read_titles(path: Path | None) -> dict[int, str]:
    """item id -> title from the movies.tsv `o2v data movielens` writes ({} without one)."""
    if path is None or not Path(path).is_file():
        return {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    return {int(f[0]): f[1] for f in (line.split("\t") for line in lines if line)}


# --------------------------------------------------------------------------- the demo

@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What one demo run measured and wrote."""

    model_dir: Path
    rmse: float  # validation RMSE after the last epoch (the fixed-epoch protocol)
    kept_rmse: float  # validation RMSE of the saved model (train keeps its best epoch)
    kept_epoch: int
    epochs_run: int
    baselines: dict[str, float]  # name -> validation RMSE
    neighbours: dict[str, list[tuple[str, float]]]  # query title -> [(title, cosine)]
    plot: Path | None  # model/learning_curves.png (None without matplotlib)
    train_seconds: float
    seconds: float  # the whole demo


def run_demo(out: Path | str = DEFAULT_OUT, *, data_dir: Path | str | None = None,
             source: Path | str | None = None, cache_dir: Path | str | None = None,
             epochs: int | None = None, quick: bool = False, seed: int = 0,
             progress: bool | None = None,
             emit: Callable[[str], None] = functools.partial(print, flush=True)) -> DemoResult:
    """Run the MovieLens demo; see the module docstring for what it does and writes.

    Args:
        out: output directory (data/, model/, demo.json).
        data_dir: where to write the channels (default ``out/data``).
        source: a local u.data / ml-100k.inter / ml-100k.zip / recbole wheel instead of
            the download (see ``movielens.load_source``).
        cache_dir: the o2v-jax cache root for the download.
        epochs: override the preset's epoch count.
        quick: a tiny model (tests, smoke runs).
        seed: training seed.
        progress: progress bars: None = when someone watches (a terminal or a notebook).
        emit: where the printed lines go (metric lines included); the default flushes
            each, so they reach a pipe as written.
    """
    from o2v_jax import load as load_predictor
    from o2v_jax import plots
    from o2v_jax.api import fit
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.data import read_channel
    from o2v_jax.movielens import prepare_movielens
    from o2v_jax.progress import enabled

    t_start = time.perf_counter()
    out = Path(out)
    data_dir = Path(data_dir) if data_dir is not None else out / "data"
    model_dir = out / "model"

    emit("== MovieLens 100k: data")
    files = prepare_movielens(data_dir, source=source, cache_dir=cache_dir,
                              progress=enabled(progress))
    emit(f"{files.n_ratings:,} ratings from {files.source}; ua split: "
         f"{files.n_train:,} train / {files.n_validation:,} validation (each user's first "
         f"10 ratings), {files.n_users:,} users, {files.n_items:,} movies -> {data_dir}")
    emit("Data terms: GroupLens research use only, no redistribution; cite Harper & "
         "Konstan 2015 (docs/movielens.md)")

    config = from_hyperparameters(demo_hyperparameters(
        vocab_sizes=(files.enc0_vocab_size, files.enc1_vocab_size), epochs=epochs, quick=quick))
    train_data = read_channel(files.train, config, name="train")
    val_data = read_channel(files.validation, config, name="validation")
    # One token per side: the flat token arrays are the user and item ids, row by row.
    users, items = train_data.in0.tokens, train_data.in1.tokens
    val_users = val_data.in0.tokens
    base = baselines(users, train_data.labels, val_users, val_data.labels)

    changes = (["--quick: a tiny model"] if quick else []) + ([f"--epochs {epochs}"] if epochs else [])
    emit(f"\n== Training: preset o2v_jax/presets/{PRESET}.json"
         + (f" with {', '.join(changes)}" if changes else ""))
    emit("  " + " ".join(f"{k}={v}" for k, v in sorted(config.to_hyperparameters().items())
                         if k in _SHOWN))
    t0 = time.perf_counter()
    # The run's own learning-curve PNG is drawn below, with the baselines on it.
    result = fit(config, train_data, validation=val_data, model_dir=model_dir, seed=seed,
                 emit=emit, progress=progress, plot=False)
    train_seconds = time.perf_counter() - t0
    history = result.history
    last_rmse = float(np.sqrt(history[-1]["validation_mean_squared_error"]))

    predictor = load_predictor(model_dir)
    kept_rmse = rmse(predictor.predict(val_data.in0, val_data.in1)[:, 0], val_data.labels)
    emit(f"\n== Validation RMSE on ua.test ({len(val_data):,} ratings)")
    rows = [(name, value) for name, value in base.items()]
    # Epochs numbered from 0, as in the metric lines above.
    rows.append((f"Object2Vec, epoch {result.epochs_run - 1} (last)", last_rmse))
    if result.best_epoch != result.epochs_run - 1:
        rows.append((f"Object2Vec, epoch {result.best_epoch} (kept: lowest validation loss)",
                     kept_rmse))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        emit(f"  {name:<{width}}  {value:.4f}")
    emit(f"  references on this split: {REFERENCES}")
    emit(f"  training: {train_seconds:.1f} s for {result.epochs_run} epochs "
         f"({len(train_data):,} ratings/epoch)")

    neighbours = _neighbours(predictor, files, items, emit)

    plot = plots.learning_curves(history, model_dir / plots.FILENAME, kept_epoch=result.best_epoch,
                                 reference={name: value ** 2 for name, value in base.items()},
                                 title="Object2Vec on MovieLens 100k (ua split)",
                                 validation_label="validation (ua.test)")
    if plot is not None:
        emit(f"\nLearning curves: {plot} (per epoch: {model_dir / 'metrics.jsonl'})")
    else:
        emit(f"\nPer-epoch metrics: {model_dir / 'metrics.jsonl'} (matplotlib is not "
             f"installed, so no learning-curve PNG: pip install 'o2v-jax[plot]' to get one)")

    emit("\n== Serving")
    emit(f"  this model:    o2v serve --model-dir {model_dir}   (127.0.0.1:8080)")
    emit("  shipped model: ./just serve (checkpoints/movielens-100k, trained with this preset)")
    emit("  score a pair:  curl -s http://127.0.0.1:8080/invocations -H 'Content-Type: "
         "application/json' -d '{\"instances\": [{\"in0\": [196], \"in1\": [242]}]}'")
    emit("  embed a movie: curl -s http://127.0.0.1:8080/invocations -H 'Content-Type: "
         "application/json' -d '{\"instances\": [{\"in1\": [195]}]}'")

    seconds = time.perf_counter() - t_start
    demo = DemoResult(model_dir=model_dir, rmse=last_rmse, kept_rmse=kept_rmse,
                      kept_epoch=result.best_epoch, epochs_run=result.epochs_run,
                      baselines=base, neighbours=neighbours, plot=plot,
                      train_seconds=train_seconds, seconds=seconds)
    (out / "demo.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(demo).items()}
        | {"hyperparameters": config.to_hyperparameters(), "seed": seed},
        indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    emit(f"\nDone in {seconds:.0f} s ({out / 'demo.json'}).")
    return demo


# Hyperparameters worth a glance in the training header (the rest are in model/).
_SHOWN = ("enc_dim", "enc0_network", "enc1_network", "comparator_list", "mlp_layers", "mlp_dim",
          "mlp_activation", "dropout", "optimizer", "learning_rate", "weight_decay",
          "mini_batch_size", "epochs")


def _neighbours(predictor: Predictor, files: MovieLensFiles, items: np.ndarray,
                emit: Callable[[str], None]) -> dict[str, list[tuple[str, float]]]:
    """Embed every movie with enc1 and print the cosine neighbours of TITLES.

    Args:
        items: int (N,) the item id of every training rating (for the rating counts).
    """
    vocab = predictor.vocab_sizes[1]
    ids = np.arange(1, vocab, dtype=np.int32)
    vectors = np.zeros((vocab, predictor.enc_dim), np.float32)  # row = item id; row 0 unused
    vectors[1:] = predictor.embed(ids[:, None], encoder="in1")
    counts = np.bincount(items, minlength=vocab)
    min_ratings = MIN_RATINGS
    if np.count_nonzero(counts >= min_ratings) <= NEIGHBOURS:  # small data (a sample, tests)
        min_ratings = 1
    candidates = np.flatnonzero(counts >= min_ratings)
    titles = read_titles(files.movies)
    by_title = {t: i for i, t in titles.items()}
    queries = [by_title[t] for t in TITLES if t in by_title and counts[by_title[t]] > 0]
    if not queries:  # no titles (a bare u.data): the three most-rated movies
        queries = [int(i) for i in np.argsort(-counts, kind="stable")[:3]]

    def name(i: int) -> str:
        return titles.get(int(i), f"item {int(i)}")

    emit(f"\n== Nearest movies by cosine similarity of enc1 embeddings "
         f"({len(ids):,} movies embedded; neighbours among the {len(candidates):,} with "
         f">= {min_ratings} training ratings)")
    found, score = nearest(vectors, np.asarray(queries), candidates, NEIGHBOURS)
    neighbours = {}
    for q, row, sims in zip(queries, found, score):
        neighbours[name(q)] = [(name(i), round(float(s), 4)) for i, s in zip(row, sims)]
        emit(f"  {name(q)}:")
        emit("      " + "; ".join(f"{name(i)} {s:.2f}" for i, s in zip(row, sims)))
    return neighbours
