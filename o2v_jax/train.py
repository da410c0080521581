"""Training: losses, optimizers (incl. lazy row_sparse updates), jitted steps, the epoch
loop with SageMaker's early stopping and metric lines, checkpoints and resume.

Data flow: ``PairData`` -> ``buckets.batches`` (fixed shapes) -> ``train_step`` (jitted,
compiled once per bucket shape) -> per-epoch metrics -> early stopping -> best params ->
``checkpoint.save_model``. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checkpoint
from .buckets import batches, count_batches
from .config import Config
from .data import PairData, Pretrained, negative_sample
from .model import Object2Vec, abstract_model, merge_params, nnx_rngs, split_params

log = logging.getLogger("o2v_jax")

Params = dict[str, Any]  # nested dict of arrays (the model's parameters)
# Where the token tables live in the params dict (model.py: embed0/embed1 nnx.Embed).
TABLES = ("embed0", "embed1")


# --------------------------------------------------------------------------- optimizers

def make_optimizer(config: Config) -> optax.GradientTransformation:
    """The optax chain for ``config.optimizer`` with MXNet 1.3's default constants.

    ``weight_decay`` is MXNet's ``wd``: ``wd * w`` is added to the gradient before the
    optimizer sees it (so it also flows into Adam's moments), not decoupled AdamW decay.
    """
    lr = config.learning_rate
    base = {
        "adam": lambda: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),
        "adagrad": lambda: optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-7),
        "rmsprop": lambda: optax.rmsprop(lr, decay=0.9, eps=1e-8),
        "adadelta": lambda: optax.adadelta(lr, rho=0.9, eps=1e-5),
        "sgd": lambda: optax.sgd(lr),
    }[config.optimizer]()
    if config.weight_decay > 0:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    return base


# --------------------------------------------------------------------------- objective

def objective(output: jax.Array, labels: jax.Array, weights: jax.Array, regression: bool):
    """Masked loss and metric sums for one batch.

    Args:
      output: float32 (B, C) logits, or (B, 1) predictions for regression.
      labels: float32 (B,) class index or target value.
      weights: float32 (B,) 1 for real rows, 0 for fill rows (never counted).

    Returns:
      (loss, sums): the mean loss over real rows (what is differentiated) and a dict of
      sums over real rows: ``loss`` (cross-entropy or squared error), ``correct``, ``count``.
    """
    count = weights.sum()
    if regression:
        err = output[:, 0] - labels
        sq = err * err
        # MXNet's LinearRegressionOutput back-propagates (pred - label): the gradient of
        # 0.5 * err^2. The reported metric is the plain mean squared error.
        loss = 0.5 * (sq * weights).sum() / jnp.maximum(count, 1.0)
        return loss, {"loss": (sq * weights).sum(), "correct": jnp.zeros(()), "count": count}
    ce = optax.softmax_cross_entropy_with_integer_labels(output, labels.astype(jnp.int32))
    correct = (jnp.argmax(output, axis=-1) == labels.astype(jnp.int32)).astype(jnp.float32)
    loss = (ce * weights).sum() / jnp.maximum(count, 1.0)
    return loss, {"loss": (ce * weights).sum(), "correct": (correct * weights).sum(), "count": count}


def finish_metrics(sums: Mapping[str, float], regression: bool) -> dict[str, float]:
    """Metric sums -> SageMaker's metric names."""
    n = max(float(sums["count"]), 1.0)
    if regression:
        return {"mean_squared_error": float(sums["loss"]) / n}
    ce = float(sums["loss"]) / n
    return {"cross_entropy": ce, "accuracy": float(sums["correct"]) / n}


# --------------------------------------------------------------------------- steps

def _split_tables(params: Params) -> tuple[Params, dict[str, jax.Array]]:
    rest = {k: v for k, v in params.items() if k not in TABLES}
    tables = {k: params[k]["embedding"] for k in TABLES if k in params}
    return rest, tables


def _join_tables(rest: Params, tables: Mapping[str, jax.Array]) -> Params:
    return {**rest, **{k: {"embedding": t} for k, t in tables.items()}}


def _table_ids(name: str, in0: jax.Array, in1: jax.Array, tied: bool) -> jax.Array:
    """The token ids that read table `name` in this batch (both sides when tied)."""
    if tied:
        return jnp.concatenate([in0.ravel(), in1.ravel()])
    return (in0 if name == "embed0" else in1).ravel()


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted functions of one training run (built once, cached per bucket shape)."""

    train_step: Callable  # (params, opt_state, in0, in1, labels, weights, key) -> (params, opt_state, sums)
    eval_step: Callable  # (params, in0, in1, labels, weights) -> sums
    init_opt: Callable  # params -> opt_state


def build_steps(graphdef: Any, config: Config, keep: Mapping[str, jax.Array]) -> Steps:
    """Build the jitted train and eval steps.

    Args:
      graphdef: the model's static structure (``split_params``).
      config: the resolved configuration.
      keep: table name -> float32 (V, 1), 0 for frozen pretrained rows, 1 elsewhere;
        updates are multiplied by it so frozen rows never move (also under weight decay).
    """
    tx = make_optimizer(config)
    regression = config.is_regression
    tied = config.tied_token_embedding_weight

    def loss_fn(params, in0, in1, labels, weights, key):
        output, _ = merge_params(graphdef, params)(in0, in1, dropout_key=key)
        return objective(output, labels, weights, regression)

    def init_opt(params):
        rest, tables = _split_tables(params)
        return {"rest": tx.init(rest), "tables": {k: tx.init(t) for k, t in tables.items()}}

    def dense_step(params, opt_state, in0, in1, labels, weights, key):
        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, in0, in1, labels, weights, key)
        rest, tables = _split_tables(params)
        g_rest, g_tables = _split_tables(grads)
        up_rest, st_rest = tx.update(g_rest, opt_state["rest"], rest)
        new_tables, st_tables = {}, {}
        for name, table in tables.items():
            up, st_tables[name] = tx.update(g_tables[name], opt_state["tables"][name], table)
            if name in keep:
                up = up * keep[name]
            new_tables[name] = table + up
        params = _join_tables(optax.apply_updates(rest, up_rest), new_tables)
        return params, {"rest": st_rest, "tables": st_tables}, sums

    def sparse_step(params, opt_state, in0, in1, labels, weights, key):
        # Lazy row-wise updates (MXNet's row_sparse + lazy_update): gather the rows this
        # batch reads into a small (U, D) table, differentiate w.r.t. it, run the same
        # optax update on the gathered rows of the parameters *and* optimizer state, and
        # scatter both back. Rows not in the batch, and their moments, are never touched.
        rest, tables = _split_tables(params)
        sub_tables, rows = {}, {}
        for name, table in tables.items():
            vocab = table.shape[0]
            ids = _table_ids(name, in0, in1, tied)
            # Row 0 (padding) is always first so remapped padding stays id 0 and the
            # model's `id != 0` mask is unchanged; the fill value `vocab` is out of range
            # (dropped on scatter).
            ids = jnp.concatenate([jnp.zeros((1,), ids.dtype), ids])
            r = jnp.unique(ids, size=ids.shape[0], fill_value=vocab)
            rows[name] = r
            sub_tables[name] = table.at[r].get(mode="fill", fill_value=0)
        if tied:
            r = rows["embed0"]
            in0s, in1s = jnp.searchsorted(r, in0).astype(in0.dtype), jnp.searchsorted(r, in1).astype(in1.dtype)
        else:
            in0s = jnp.searchsorted(rows["embed0"], in0).astype(in0.dtype)
            in1s = jnp.searchsorted(rows["embed1"], in1).astype(in1.dtype) if "embed1" in rows else in1
        sub_params = _join_tables(rest, sub_tables)
        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(sub_params, in0s, in1s, labels, weights, key)
        g_rest, g_tables = _split_tables(grads)
        up_rest, st_rest = tx.update(g_rest, opt_state["rest"], rest)
        new_tables, st_tables = {}, {}
        for name, table in tables.items():
            vocab, r = table.shape[0], rows[name]

            def gather(x, vocab=vocab, r=r):
                return x.at[r].get(mode="fill", fill_value=0) if x.ndim and x.shape[0] == vocab else x

            def scatter(full, part, vocab=vocab, r=r):
                return full.at[r].set(part, mode="drop") if full.ndim and full.shape[0] == vocab else part

            st = opt_state["tables"][name]
            up, st_sub = tx.update(g_tables[name], jax.tree.map(gather, st), sub_tables[name])
            if name in keep:
                up = up * keep[name].at[r].get(mode="fill", fill_value=0)
            new_tables[name] = table.at[r].add(up, mode="drop")
            st_tables[name] = jax.tree.map(scatter, st, st_sub)
        params = _join_tables(optax.apply_updates(rest, up_rest), new_tables)
        return params, {"rest": st_rest, "tables": st_tables}, sums

    def eval_step(params, in0, in1, labels, weights):
        return loss_fn(params, in0, in1, labels, weights, None)[1]

    step = sparse_step if config.row_sparse else dense_step
    return Steps(
        train_step=jax.jit(step, donate_argnums=(0, 1)),
        eval_step=jax.jit(eval_step),
        init_opt=jax.jit(init_opt),
    )


# --------------------------------------------------------------------------- early stopping

@dataclasses.dataclass
class EarlyStopping:
    """SageMaker's early stopping, reconstructed from its log (spec §4.8).

    No check until ``patience`` epochs are done. Then an epoch is *good* only if its loss
    is below the minimum of the previous ``patience`` losses by at least ``tolerance``; a
    good epoch resets the bad count, a bad one increments it; training stops when the bad
    count exceeds ``patience``. The best epoch is the one with the lowest loss.
    """

    patience: int
    tolerance: float
    losses: list[float] = dataclasses.field(default_factory=list)
    bad: int = 0

    def update(self, loss: float) -> bool:
        """Record an epoch's validation loss; True when training should stop."""
        if len(self.losses) >= self.patience:
            window = self.losses[-self.patience:]
            if min(window) - loss >= self.tolerance:
                self.bad = 0
            else:
                self.bad += 1
        self.losses.append(loss)
        return self.bad > self.patience

    @property
    def best_epoch(self) -> int:
        return int(np.argmin(self.losses))


# --------------------------------------------------------------------------- metric lines

def quality_line(host: str, channel: str, name: str, value: float, epoch: int | None = None) -> str:
    """A ``#quality_metric`` line exactly as SageMaker's HPO regexes expect (spec §6.1)."""
    kind = "score" if name == "accuracy" else "loss"
    where = f"epoch={epoch}, " if epoch is not None else ""
    return f"#quality_metric: host={host}, {where}{channel} {name} <{kind}>={value!r}"


# --------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class TrainResult:
    model_dir: Path
    epochs_run: int
    best_epoch: int  # epoch whose parameters were kept
    history: list[dict[str, Any]]  # per epoch: train_*, validation_*, seconds, records_per_second
    test_metrics: dict[str, float] | None
    stopped_early: bool


def init_params(config: Config, seed: int, pretrained: tuple[Pretrained | None, Pretrained | None]):
    """Build the model, then copy pretrained rows over the default init.

    Returns (graphdef, params, keep) where keep maps a table name to its (V, 1) update
    mask (0 for frozen pretrained rows).
    """
    init_key = jax.random.fold_in(jax.random.key(seed), 0)
    graphdef, _ = abstract_model(config)
    # Initialising under jit compiles all initialisers as one program (seconds faster
    # than running them eagerly one by one).
    params = jax.jit(lambda key: split_params(Object2Vec(config, rngs=nnx_rngs(key)))[1])(init_key)
    keep: dict[str, jax.Array] = {}
    sides = [("embed0", 0)] if config.tied_token_embedding_weight else [("embed0", 0), ("embed1", 1)]
    for name, side in sides:
        pre = pretrained[side]
        if pre is None:
            continue
        table = params[name]["embedding"]
        found = jnp.asarray(pre.found)[:, None]
        params[name]["embedding"] = jnp.where(found, jnp.asarray(pre.vectors, table.dtype), table)
        if config.encoders[side].freeze_pretrained_embedding:
            keep[name] = jnp.where(found, 0.0, 1.0).astype(table.dtype)
    return graphdef, params, keep


def evaluate_params(steps: Steps, params: Params, data: PairData, config: Config) -> dict[str, float]:
    """Metrics of `params` on a labelled dataset (fill rows excluded)."""
    parts = [steps.eval_step(params, b.in0, b.in1, b.labels, b.weights)
             for b in batches(data, config, shuffle_seed=None)]
    sums = {k: float(sum(np.asarray(p[k]) for p in parts)) for k in ("loss", "correct", "count")}
    return finish_metrics(sums, config.is_regression)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="rec", unit_scale=True, leave=False,
                disable=disable, dynamic_ncols=True)


def train(
    config: Config,
    train_data: PairData,
    *,
    model_dir: str | Path,
    validation: PairData | None = None,
    test: PairData | None = None,
    pretrained: tuple[Pretrained | None, Pretrained | None] = (None, None),
    seed: int = 0,
    resume: bool = False,
    host: str = "algo-1",
    emit: Callable[[str], None] = print,
    progress: bool | None = None,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train an Object2Vec model and save the kept parameters to ``model_dir``.

    With a validation channel, early stopping (spec §4.8) watches the validation loss and
    the best epoch's parameters are kept; without one, all epochs run and the last is kept.
    The test channel, if given, is scored once with the kept parameters. After each
    epoch the full training state is checkpointed under ``model_dir/training`` so
    ``resume=True`` continues an interrupted run with the same result.

    ``stop_after_epochs`` ends the run early after that many epochs *without* finishing it
    (it simulates an interruption for tests and for time-boxed runs).
    """
    model_dir = Path(model_dir)
    regression = config.is_regression
    graphdef, params, keep = init_params(config, seed, pretrained)
    steps = build_steps(graphdef, config, keep)
    opt_state = steps.init_opt(params)
    dropout_root = jax.random.fold_in(jax.random.key(seed), 1)
    stopper = EarlyStopping(config.early_stopping_patience, config.early_stopping_tolerance)
    history: list[dict[str, Any]] = []
    best_params: Params | None = None
    start_epoch, global_step = 0, 0

    if resume:
        target = {"params": params, "opt_state": opt_state,
                  "best": params if validation is not None else {}}
        restored = checkpoint.load_training_state(model_dir, target)
        if restored is None:
            log.warning("--resume: no training state in %s; starting from epoch 0", model_dir)
        else:
            state, info = restored
            if info["hyperparameters"] != config.to_hyperparameters() or info["seed"] != seed:
                raise checkpoint.ModelDirError(
                    f"{model_dir}: the saved training state was made with other "
                    f"hyperparameters or seed; resume needs the same ones")
            params, opt_state = state["params"], state["opt_state"]
            best_params = state["best"] if validation is not None else None
            start_epoch, global_step = info["epoch"] + 1, info["global_step"]
            history = info["history"]
            stopper = EarlyStopping(config.early_stopping_patience, config.early_stopping_tolerance,
                                    losses=info["losses"], bad=info["bad"])
            log.info("Resuming from epoch %d (global step %d)", start_epoch, global_step)

    stopped_early = False
    epochs_done = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs:
            return TrainResult(model_dir, epoch, -1, history, None, False)
        t0 = time.perf_counter()
        data = train_data
        if config.negative_sampling_rate > 0:
            rng = np.random.default_rng(_epoch_seed(seed, epoch, 1))
            data = negative_sample(train_data, config.negative_sampling_rate, rng)
        parts = []
        with _progress(len(data), f"epoch {epoch}", progress) as bar:
            for batch in batches(data, config, shuffle_seed=_epoch_seed(seed, epoch, 0)):
                key = jax.random.fold_in(dropout_root, global_step)
                params, opt_state, sums = steps.train_step(
                    params, opt_state, batch.in0, batch.in1, batch.labels, batch.weights, key)
                parts.append(sums)
                global_step += 1
                bar.update(int(batch.weights.sum()))
        totals = {k: float(np.sum([np.asarray(p[k]) for p in parts])) for k in ("loss", "correct", "count")}
        seconds = time.perf_counter() - t0
        train_metrics = finish_metrics(totals, regression)
        record: dict[str, Any] = {"epoch": epoch, "seconds": seconds,
                                  "records_per_second": totals["count"] / max(seconds, 1e-9),
                                  **{f"train_{k}": v for k, v in train_metrics.items()}}
        for name, value in train_metrics.items():
            emit(quality_line(host, "train", name, value, epoch))
        stop = False
        if validation is not None:
            val_metrics = evaluate_params(steps, params, validation, config)
            record.update({f"validation_{k}": v for k, v in val_metrics.items()})
            for name, value in val_metrics.items():
                emit(quality_line(host, "validation", name, value, epoch))
            stop = stopper.update(val_metrics[config.validation_metric])
            if stopper.best_epoch == epoch:
                best_params = jax.tree.map(np.array, params)
        history.append(record)
        emit(f"#progress_metric: host={host}, completed {100.0 * (epoch + 1) / config.epochs} % of epochs")
        emit(f"#throughput_metric: host={host}, train throughput={record['records_per_second']:.2f} records/second")
        epochs_done = epoch + 1
        checkpoint.save_training_state(
            model_dir,
            {"params": params, "opt_state": opt_state,
             "best": best_params if validation is not None else {}},
            {"epoch": epoch, "global_step": global_step, "history": history, "seed": seed,
             "losses": stopper.losses, "bad": stopper.bad,
             "hyperparameters": config.to_hyperparameters()})
        if stop:
            emit("Bad epochs exceeded patience. Stopping training early!")
            stopped_early = True
            break

    if validation is not None and best_params is not None:
        best_epoch = stopper.best_epoch
        emit(f"Best model based on epoch {best_epoch}. Best loss: {stopper.losses[best_epoch]:.3f}")
        params = jax.tree.map(jnp.asarray, best_params)
    else:
        best_epoch = epochs_done - 1
    test_metrics = None
    if test is not None:
        test_metrics = evaluate_params(steps, params, test, config)
        for name, value in test_metrics.items():
            emit(quality_line(host, "test", name, value))
    metadata = {
        "best_epoch": best_epoch, "epochs_run": epochs_done, "stopped_early": stopped_early,
        "seed": seed, "history": history, "test_metrics": test_metrics,
        "num_records": {"train": len(train_data),
                        "validation": len(validation) if validation is not None else 0,
                        "test": len(test) if test is not None else 0},
    }
    checkpoint.save_model(model_dir, hyperparameters=config.to_hyperparameters(),
                          params=params, metadata=metadata)
    checkpoint.clear_training_state(model_dir)
    return TrainResult(model_dir, epochs_done, best_epoch, history, test_metrics, stopped_early)


def load_for_evaluation(model_dir: str | Path) -> tuple[Config, Steps, Params]:
    """Rebuild a saved model's config, jitted steps and parameters."""
    from .config import from_hyperparameters

    manifest = checkpoint.read_manifest(model_dir)
    config = from_hyperparameters(manifest["hyperparameters"])
    graphdef, params, _ = init_params(config, 0, (None, None))
    _, params, _ = checkpoint.load_model(model_dir, target=jax.tree.map(np.asarray, params))
    params = jax.tree.map(jnp.asarray, params)
    return config, build_steps(graphdef, config, {}), params


def evaluate(model_dir: str | Path, data_path: str | Path) -> dict[str, float]:
    """Metrics of a saved model on a labelled JSON Lines file or directory."""
    from .data import read_channel

    config, steps, params = load_for_evaluation(model_dir)
    data = read_channel(data_path, config, name="evaluation")
    return evaluate_params(steps, params, data, config)
