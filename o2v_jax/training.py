"""Training: optimizers, jitted steps over (state, batch, key), the epoch loop,
checkpoints and resume. The loss is :mod:`o2v_jax.objectives`; the metric lines and early
stopping are :mod:`o2v_jax.metrics`.

Data flow: ``PairData`` -> ``buckets.batches`` (fixed shapes) -> ``train_step`` (jitted,
compiled once per bucket shape) -> per-epoch metrics -> early stopping -> best params ->
``checkpoint.save_model``. The lazy ``row_sparse`` update lives in :mod:`o2v_jax.row_sparse`
(a drop-in for the dense update here). Python callers and ``o2v train`` reach this loop
through :mod:`o2v_jax.api` (channels in any form, the learning-curve PNG). See
docs/training.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from o2v_jax import checkpoint, mesh, native, ranking, row_sparse, runtime, sharded
from o2v_jax.buckets import Batch, batches, prefetch
from o2v_jax.config import Config
from o2v_jax.data import PairData
from o2v_jax.kernels import check_layout, default_layout
from o2v_jax.metrics import (METRICS_FILE, EarlyStopping, append_record, quality_line,
                             stopping_loss, write_history)
from o2v_jax.model import (Object2Vec, abstract_model, join_tables, nnx_rngs, split_params,
                           split_tables, table_group)
from o2v_jax.objectives import PairLoss, finish_metrics, loss_for, training_metrics
from o2v_jax.pretrained import Pretrained
from o2v_jax.progress import bar as progress_bar
from o2v_jax.sampling import negative_pairs

log = logging.getLogger("o2v_jax")

Params = dict[str, Any]  # nested dict of arrays (the model's parameters)


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


# --------------------------------------------------------------------------- steps

def init_opt_state(tx: optax.GradientTransformation, params: Params) -> dict[str, Any]:
    """The optimizer state: one for the dense parameters, one per token table (the
    row_sparse step updates tables row by row)."""
    rest, tables = split_tables(params)
    return {"rest": tx.init(rest), "tables": {k: tx.init(t) for k, t in tables.items()}}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a train step updates (and donates): parameters, optimizer state, step number."""

    params: Params
    opt_state: dict[str, Any]  # init_opt_state's structure
    step: jax.Array  # int32 (): the global step, folded into the step's dropout key


def dense_update(loss: PairLoss, tx: optax.GradientTransformation,
                 keep: Mapping[str, jax.Array], params: Params, opt_state, batch: Batch,
                 key: jax.Array):
    """One optimizer update of every parameter: ``(params, opt_state, sums)``. Table
    updates are multiplied by ``keep`` (0 on frozen pretrained rows), so frozen rows never
    move, also under weight decay."""
    (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(params, batch, key)
    rest, tables = split_tables(params)
    g_rest, g_tables = split_tables(grads)
    up_rest, st_rest = tx.update(g_rest, opt_state["rest"], rest)
    new_tables, st_tables = {}, {}
    for name, table in tables.items():
        up, st_tables[name] = tx.update(g_tables[name], opt_state["tables"][name], table)
        if name in keep:
            up = up * keep[name]
        new_tables[name] = table + up
    params = join_tables(optax.apply_updates(rest, up_rest), new_tables)
    return params, {"rest": st_rest, "tables": st_tables}, sums


def _train_step(update: Callable, state: TrainState, batch: Any, root: jax.Array):
    # The key is folded here, inside the jitted step, so a step is one dispatch.
    key = jax.random.fold_in(root, state.step)
    params, opt_state, sums = update(state.params, state.opt_state, batch, key)
    return TrainState(params, opt_state, state.step + 1), sums


def _eval_step(loss: PairLoss, params: Params, batch: Batch):
    return loss(params, batch, None)[1]


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted functions of one training run (built once, cached per bucket shape)."""

    # (state, batch, root key) -> (state, sums); donates the state. The step's dropout
    # key is fold_in(root, state.step).
    train_step: Callable
    eval_step: Callable  # (params, batch) -> sums
    init_opt: Callable  # params -> opt_state

    def init_state(self, params: Params, step: int = 0) -> TrainState:
        """A fresh optimizer state for ``params``, at global step ``step``."""
        return TrainState(params, self.init_opt(params), jnp.asarray(step, jnp.int32))


def build_steps(graphdef: Any, config: Config, keep: Mapping[str, jax.Array], *,
                layout: str, options: row_sparse.Options = row_sparse.Options()) -> Steps:
    """Build the jitted train and eval steps.

    Args:
      graphdef: the model's static structure (``init_params``), built for ``layout``.
      config: the resolved configuration.
      keep: table group -> float32 (V, 1), 0 for frozen pretrained rows, 1 elsewhere.
      layout: "cpu" or "accelerator" (:mod:`o2v_jax.kernels`), the model's.
      options: row_sparse knobs (tests and benchmarks).
    """
    tx = make_optimizer(config)
    loss = loss_for(graphdef, config, check_layout(layout))
    if not config.row_sparse:
        update = functools.partial(dense_update, loss, tx, keep)
    else:
        pooled = all(enc.network == "pooled_embedding" for enc in config.encoders)
        vocab = (config.enc0.vocab_size, config.enc1.vocab_size)
        tied = config.tied_token_embedding_weight
        update = row_sparse.LazyUpdate(loss, tx, keep, tied, vocab, pooled, layout, options)
    train_step = jax.jit(functools.partial(_train_step, update), donate_argnames="state")
    if config.row_sparse and layout == "cpu":  # rows found on the host, before the step
        if options.native_rows:
            native.available()  # build or load the row write-back now, not in the first step
        train_step = row_sparse.HostPlannedStep(train_step, functools.partial(
            row_sparse.plan_batch, tied=tied, vocab=vocab, pooled=pooled,
            plan_min_tokens=options.plan_min_tokens))
    return Steps(train_step=train_step, eval_step=jax.jit(functools.partial(_eval_step, loss)),
                 init_opt=jax.jit(functools.partial(init_opt_state, tx)))


def stage_batch(batch: Batch, layout: str) -> tuple[Batch, int]:
    """``(batch, real rows)`` as the train step takes it: on an accelerator all four
    arrays are copied to the device in one call (the row count is taken first, on the
    host, so counting never waits for the device). Feed a step staged batches only: jit
    keys its cache on numpy vs JAX array inputs too, so mixing them compiles each shape
    twice."""
    real = int(batch.weights.sum())
    if layout == "accelerator":
        batch = jax.device_put(batch)
    return batch, real


def staged(batch_iter: Iterator[Batch], layout: str) -> Iterator[tuple[Batch, int]]:
    """:func:`stage_batch` of each of ``batch_iter``. On an accelerator they are made
    ahead on a worker thread (:func:`buckets.prefetch`), so host batching and copies
    overlap the steps and the main thread only dispatches them. On CPU the steps keep
    both cores busy and a thread would only compete with the host's row plans for the
    GIL, so there batches are made inline (benchmarks/RESULTS.md has both)."""
    if layout != "accelerator":
        return (stage_batch(batch, layout) for batch in batch_iter)
    return prefetch(batch_iter, depth=2, transform=lambda batch: stage_batch(batch, layout))


# --------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class TrainResult:
    model_dir: Path
    epochs_run: int
    best_epoch: int  # epoch whose parameters were kept
    history: list[dict[str, Any]]  # per epoch: train_*, validation_*, seconds, records_per_second
    test_metrics: dict[str, float] | None
    stopped_early: bool


def init_params(config: Config, seed: int, pretrained: tuple[Pretrained | None, Pretrained | None],
                *, layout: str | None = None):
    """Build the model, then copy pretrained rows over the default init.

    Returns (graphdef, params, keep) where keep maps a table group to its (V, 1) update
    mask (0 for frozen pretrained rows). ``layout``: as for :class:`~o2v_jax.model.Object2Vec`.
    """
    init_key = jax.random.fold_in(jax.random.key(seed), 0)
    graphdef, _ = abstract_model(config, layout)
    # Initialising under jit compiles all initialisers as one program (faster than
    # running them eagerly one by one).
    params = jax.jit(lambda key: split_params(
        Object2Vec(config, rngs=nnx_rngs(key), layout=layout))[1])(init_key)
    keep: dict[str, jax.Array] = {}
    tied = config.tied_token_embedding_weight
    for side in (0,) if tied else (0, 1):
        pre, name = pretrained[side], table_group(side, tied)
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
    parts = [steps.eval_step(params, b) for b in batches(data, config, shuffle_seed=None)]
    sums = {k: float(sum(np.asarray(p[k]) for p in parts)) for k in ("loss", "correct", "count")}
    return finish_metrics(sums, config.is_regression)


def channel_metrics(config: Config, steps: Steps, embedder: ranking.Embedder,
                    data: PairData) -> Callable[[Params], dict[str, float]]:
    """params -> the metrics of a validation or test channel: SageMaker's (loss,
    accuracy), or for objective=contrastive the retrieval metrics of its pairs."""
    if config.objective == "contrastive":
        return ranking.Validation(embedder, data)
    return lambda params: evaluate_params(steps, params, data, config)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def epoch_batches(train_data: PairData, config: Config, seed: int,
                  epoch: int) -> tuple[int, Iterator[Batch]]:
    """One training epoch's host work: ``(records, batches)``, the channel plus this
    epoch's negatives (:func:`~o2v_jax.sampling.negative_pairs`, when the config samples
    them), batched in this epoch's shuffled order. Depends only on (seed, epoch)."""
    data = train_data
    if config.negative_sampling_rate > 0:
        rng = np.random.default_rng(_epoch_seed(seed, epoch, 1))
        data = negative_pairs(train_data, config.negative_sampling_rate, rng)
    return len(data), batches(data, config, shuffle_seed=_epoch_seed(seed, epoch, 0))


def _progress(total: int, desc: str, enabled: bool | None):
    return progress_bar(total, desc, unit="rec", progress=enabled, unit_scale=True, leave=False)


@dataclasses.dataclass
class _Run:
    """What the loop carries from epoch to epoch, and a resumed run restores."""

    state: TrainState
    keep: dict[str, jax.Array]  # table group -> (V, 1) update mask (0 = frozen row)
    stopper: EarlyStopping
    best_params: Params | None = None  # with validation: the best epoch's, on the host
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    epoch: int = 0  # the next epoch to run
    global_step: int = 0  # state.step, counted on the host (saving it never waits)


def _resume(run: _Run, model_dir: Path, config: Config, seed: int, validation: bool,
            pretrained: tuple[Pretrained | None, Pretrained | None],
            placement: mesh.Placement | None = None) -> _Run:
    """``run`` continued from the training state saved in ``model_dir`` (unchanged when
    there is none), on ``placement``'s mesh (None: one device), whatever mesh saved it.

    Raises:
      checkpoint.ModelDirError: the state was saved for other hyperparameters or seed,
        or it predates saved frozen-row masks and no auxiliary channel was given.
    """
    params = run.state.params
    saved_info = checkpoint.training_info(model_dir)
    if saved_info is not None and (saved_info["hyperparameters"] != config.to_hyperparameters()
                                   or saved_info["seed"] != seed):
        raise checkpoint.ModelDirError(
            f"{model_dir}: the saved training state was made with other "
            f"hyperparameters or seed; resume needs the same ones")

    def target(info: dict[str, Any]) -> dict[str, Any]:
        # The frozen-row masks are part of the state (so resuming needs no auxiliary
        # channel); states saved before they were have no "frozen_tables".
        keep = {name: np.ones((params[name]["embedding"].shape[0], 1), np.float32)
                for name in info.get("frozen_tables", ())}
        tree = {"params": params, "opt_state": run.state.opt_state,
                "best": params if validation else {},
                **({"keep": keep} if "frozen_tables" in info else {})}
        return tree if placement is None else placement.restore_target(tree)

    restored = checkpoint.load_training_state(model_dir, target)
    if restored is None:
        log.warning("--resume: no training state in %s; starting from epoch 0", model_dir)
        return run
    saved, info = restored
    keep = run.keep
    if "keep" in saved:
        keep = {name: jnp.asarray(mask) for name, mask in saved["keep"].items()}
    elif any(enc.pretrained_embedding_file for enc in config.encoders) and not any(
            p is not None for p in pretrained):
        raise checkpoint.ModelDirError(
            f"{model_dir}: this training state predates saved frozen-row masks; "
            f"resume it with the auxiliary channel it was trained with")
    log.info("Resuming from epoch %d (global step %d)", info["epoch"] + 1, info["global_step"])
    step = info["global_step"]
    return _Run(state=TrainState(saved["params"], saved["opt_state"], _step(step, placement)),
                keep=keep, best_params=saved["best"] if validation else None,
                stopper=EarlyStopping(config.early_stopping_patience,
                                      config.early_stopping_tolerance,
                                      losses=info["losses"], bad=info["bad"]),
                history=info["history"], epoch=info["epoch"] + 1, global_step=step)


def _step(step: int, placement: mesh.Placement | None) -> jax.Array:
    return jnp.asarray(step, jnp.int32) if placement is None else placement.scalar(step)


def _save_state(run: _Run, model_dir: Path, config: Config, seed: int, validation: bool,
                sharded_state: bool = False) -> None:
    """Checkpoint the run after epoch ``run.epoch - 1`` (what ``resume`` restores)."""
    checkpoint.save_training_state(
        model_dir,
        {"params": run.state.params, "opt_state": run.state.opt_state,
         "best": run.best_params if validation else {}, "keep": run.keep},
        {"epoch": run.epoch - 1, "global_step": run.global_step, "history": run.history,
         "seed": seed, "frozen_tables": sorted(run.keep), "losses": run.stopper.losses,
         "bad": run.stopper.bad, "hyperparameters": config.to_hyperparameters()},
        sharded=sharded_state)


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
    emit: Callable[[str], None] = functools.partial(print, flush=True),  # lines reach a pipe as written
    progress: bool | None = None,
    stop_after_epochs: int | None = None,
    devices: int | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Train an Object2Vec model and save the kept parameters to ``model_dir``.

    With a validation channel, early stopping (spec §4.8) watches the validation loss and
    the best epoch's parameters are kept; without one, all epochs run and the last is kept.
    The test channel, if given, is scored once with the kept parameters. After each
    epoch its record (``TrainResult.history``'s) is appended to ``model_dir/metrics.jsonl``
    and the full training state is checkpointed under ``model_dir/training``, so
    ``resume=True`` continues an interrupted run with the same result.

    ``stop_after_epochs`` ends the run early after that many epochs *without* finishing it
    (it simulates an interruption for tests and for time-boxed runs).

    ``devices``: how many of this process's devices to train on (None: all of them).
    One process on one device runs the steps of this module; otherwise the run is data
    parallel over a mesh of every process's devices (o2v_jax.mesh, o2v_jax.sharded),
    every process calls this with the same arguments, and process 0 alone emits metric
    lines and writes the model (docs/distributed.md). ``checkpoint_dir``: where the
    per-epoch state goes (default ``model_dir``; with several processes, a filesystem
    they all share, else no state is saved).
    """
    model_dir, validating = Path(model_dir), validation is not None
    state_dir = model_dir if checkpoint_dir is None else Path(checkpoint_dir)
    placement = mesh.for_training(config, devices)  # None: one device, the steps above
    layout = default_layout() if placement is None else sharded.MODEL_LAYOUT
    graphdef, params, keep = init_params(config, seed, pretrained, layout=layout)
    init_opt = functools.partial(init_opt_state, make_optimizer(config))
    if placement is None:
        opt_state = jax.jit(init_opt)(params)
    else:
        log.info("%s", placement.describe())
        params, keep = placement.place_params(params), placement.place_keep(keep)
        opt_state = placement.init_opt(init_opt, params)
        if not placement.is_main:  # process 0 alone prints metric lines
            emit, progress = (lambda line: None), False
        if not runtime.shared_directory(state_dir / "training"):
            log.warning("%s is not shared by all processes: no training state is saved "
                        "(no --resume); give --checkpoint-dir on a shared filesystem", state_dir)
            state_dir = None
    run = _Run(TrainState(params, opt_state, _step(0, placement)), keep,
               EarlyStopping(config.early_stopping_patience, config.early_stopping_tolerance))
    if resume and state_dir is not None:
        run = _resume(run, state_dir, config, seed, validating, pretrained, placement)
    steps = (build_steps(graphdef, config, run.keep, layout=layout) if placement is None else
             sharded.MeshSteps(graphdef, config, run.keep, placement=placement))
    # metrics.jsonl holds exactly the epochs of run.history: fresh runs start it empty,
    # resumed ones rewrite the saved epochs (docs/training.md, "What a run leaves").
    # Process 0 alone writes it, as it alone writes the model.
    metrics_path = None
    if placement is None or placement.is_main:
        model_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = model_dir / METRICS_FILE
        write_history(metrics_path, run.history)
    embedder = ranking.Embedder(graphdef, config)
    validate = channel_metrics(config, steps, embedder, validation) if validating else None
    dropout_root = jax.random.fold_in(jax.random.key(seed), 1)
    start_epoch, stopped_early = run.epoch, False
    while run.epoch < config.epochs:
        epoch = run.epoch
        if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs:
            return TrainResult(model_dir, epoch, -1, run.history, None, False)
        t0 = time.perf_counter()
        records, epoch_iter = epoch_batches(train_data, config, seed, epoch)
        parts = []
        with _progress(records, f"epoch {epoch}", progress) as bar:
            # Mesh steps take host batches: they find the rows and feed each process's part.
            for batch, real in staged(epoch_iter, layout if placement is None else "cpu"):
                run.state, sums = steps.train_step(run.state, batch, dropout_root)
                parts.append(sums)
                run.global_step += 1
                bar.update(real)
        parts = jax.device_get(parts)  # one batched copy, not a round trip per step
        totals = {k: float(np.sum([p[k] for p in parts])) for k in ("loss", "correct", "count")}
        seconds = time.perf_counter() - t0
        train_metrics = training_metrics(totals, config)
        record: dict[str, Any] = {"epoch": epoch, "seconds": seconds,
                                  "records_per_second": totals["count"] / max(seconds, 1e-9),
                                  **{f"train_{k}": v for k, v in train_metrics.items()}}
        for name, value in train_metrics.items():
            emit(quality_line(host, "train", name, value, epoch))
        stop = False
        if validating:
            val_metrics = validate(run.state.params)
            record.update({f"validation_{k}": v for k, v in val_metrics.items()})
            for name, value in val_metrics.items():
                emit(quality_line(host, "validation", name, value, epoch))
            name = config.validation_metric
            stop = run.stopper.update(stopping_loss(name, val_metrics[name]))
            if run.stopper.best_epoch == epoch:
                run.best_params = (jax.tree.map(np.array, run.state.params) if placement is None
                                   else placement.snapshot(run.state.params))
        run.history.append(record)
        if metrics_path is not None:
            append_record(metrics_path, record)
        emit(f"#progress_metric: host={host}, completed {100.0 * (epoch + 1) / config.epochs} % of epochs")
        emit(f"#throughput_metric: host={host}, train throughput={record['records_per_second']:.2f} records/second")
        run.epoch = epoch + 1
        if state_dir is not None:
            _save_state(run, state_dir, config, seed, validating, placement is not None)
        if stop:
            emit("Bad epochs exceeded patience. Stopping training early!")
            stopped_early = True
            break

    params = run.state.params
    if validating and run.best_params is not None:
        best_epoch = run.stopper.best_epoch
        best = run.stopper.losses[best_epoch]
        emit(f"Best model based on epoch {best_epoch}. Best loss: {best:.3f}" if config.objective == "pair"
             else f"Best model based on epoch {best_epoch}. Best validation "
                  f"{config.validation_metric}: {1.0 - best:.4f}")
        params = jax.tree.map(jnp.asarray, run.best_params)
    else:
        best_epoch = run.epoch - 1
    test_metrics = None
    if test is not None:
        test_metrics = channel_metrics(config, steps, embedder, test)(params)
        for name, value in test_metrics.items():
            emit(quality_line(host, "test", name, value))
    metadata = {
        "best_epoch": best_epoch, "epochs_run": run.epoch, "stopped_early": stopped_early,
        "seed": seed, "history": run.history, "test_metrics": test_metrics,
        "num_records": {"train": len(train_data), "validation": len(validation) if validating else 0,
                        "test": len(test) if test is not None else 0},
    }
    if placement is not None:
        params = placement.to_host(params)  # every process takes part
    if placement is None or placement.is_main:
        checkpoint.save_model(model_dir, hyperparameters=config.to_hyperparameters(),
                              params=params, metadata=metadata)
        if state_dir is not None:
            checkpoint.clear_training_state(state_dir)
    if placement is not None:
        runtime.barrier("model-saved")
    return TrainResult(model_dir, run.epoch, best_epoch, run.history, test_metrics, stopped_early)


def load_for_evaluation(model_dir: str | Path) -> tuple[Config, Steps, Params]:
    """Rebuild a saved model's config, jitted steps and parameters."""
    config, _ = checkpoint.read_config(model_dir)
    layout = default_layout()
    graphdef, params, _ = init_params(config, 0, (None, None), layout=layout)
    _, params, _ = checkpoint.load_model(model_dir, target=jax.tree.map(np.asarray, params))
    params = jax.tree.map(jnp.asarray, params)
    return config, build_steps(graphdef, config, {}, layout=layout), params
