"""The Python training API, ``o2v_jax.train`` and ``o2v_jax.evaluate``, and :func:`fit`,
the one training path they share with ``o2v train``.

::

    >>> import o2v_jax
    >>> model = o2v_jax.train({"enc0_vocab_size": 40, "enc0_max_seq_len": 8, "epochs": 3},
    ...                       train_records, validation=val_records, model_dir="runs/m1")
    >>> model.history[-1]["validation_accuracy"]    # per-epoch metrics, as in metrics.jsonl
    >>> model.embed([[6, 17, 606]], encoder="in0")  # the same object o2v_jax.load returns
    >>> o2v_jax.evaluate(model, test_records)       # {"accuracy": ..., "cross_entropy": ...}

Hyperparameters are a dict with SageMaker's names, or a SageMaker ``hyperparameters.json``
path: the CLI's parsing, validation and errors (:class:`~o2v_jax.config.HyperparameterError`).
A channel is a path, an iterable of records or ``(in0, in1, labels)`` arrays
(:mod:`o2v_jax.records`), with the file channel's checks and errors
(:class:`~o2v_jax.data.DataError`, naming the record path, e.g. ``train[3]``).

The trained model is a :class:`~o2v_jax.predictor.Predictor` loaded from the model
directory the run wrote, as :func:`o2v_jax.load` would load it: one class, so a model
trained a minute ago and one loaded a year later behave alike. Without ``model_dir`` the
run writes into a fresh temporary directory that is removed when the model is garbage
collected or the interpreter exits; ``model.save(dir)`` copies it somewhere that stays.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from o2v_jax import checkpoint, cluster, plots
from o2v_jax.config import Config, format_config, from_hyperparameters, load_hyperparameters
from o2v_jax.predictor import Predictor, load
from o2v_jax.pretrained import read_auxiliary
from o2v_jax.records import Channel, pair_data
from o2v_jax.training import TrainResult, evaluate_params, load_for_evaluation
from o2v_jax.training import train as train_loop

log = logging.getLogger("o2v_jax")

Hyperparameters = Mapping[str, Any] | str | os.PathLike | Config
_print = functools.partial(print, flush=True)  # metric lines reach a pipe as written


def resolve_hyperparameters(hyperparameters: Hyperparameters) -> Config:
    """A dict of SageMaker names -> values, a hyperparameters.json path, or a Config.

    Raises:
        HyperparameterError: as ``o2v train`` reports it (names, ranges, coupling rules).
    """
    if isinstance(hyperparameters, Config):
        return hyperparameters
    if isinstance(hyperparameters, (str, os.PathLike)):
        return load_hyperparameters(hyperparameters)
    if isinstance(hyperparameters, Mapping):
        return from_hyperparameters(hyperparameters)
    raise TypeError(f"hyperparameters: expected a dict of SageMaker names or a "
                    f"hyperparameters.json path, got {type(hyperparameters).__name__}")


def needs_auxiliary(config: Config, model_dir: str | Path, resume: bool) -> bool:
    """Whether this run must read the auxiliary channel: a pretrained embedding file is
    set, and it is not a resume whose saved state already holds the pretrained rows and
    the frozen-row masks."""
    if not any(enc.pretrained_embedding_file for enc in config.encoders):
        return False
    state = checkpoint.training_info(model_dir) if resume else None
    return state is None or "frozen_tables" not in state


def fit(hyperparameters: Hyperparameters, train: Channel, validation: Channel | None = None,
        test: Channel | None = None, *, model_dir: str | Path, seed: int = 0,
        auxiliary: str | Path | None = None, resume: bool = False, host: str = "algo-1",
        emit: Callable[[str], None] | None = _print, progress: bool | None = None,
        plot: bool = True, devices: int | None = None,
        checkpoint_dir: str | Path | None = None) -> TrainResult:
    """Train into ``model_dir``: what ``o2v train`` does after parsing its flags.

    Writes the model directory (docs/training.md, "What a run leaves"): the model,
    ``metrics.jsonl`` (one line per epoch, as it ends) and, with ``plot`` and matplotlib,
    ``learning_curves.png``. Arguments as for :func:`train`; ``host`` names the machine
    in the metric lines (SageMaker's ``current_host``); ``devices`` and ``checkpoint_dir``
    as for :func:`o2v_jax.training.train` (docs/distributed.md). In a cluster
    (:mod:`o2v_jax.cluster`), every process calls this with the same arguments; their
    flags and data are compared first, and process 0 alone writes the model directory.

    Raises:
        HyperparameterError, DataError, checkpoint.ModelDirError: bad inputs.
        cluster.ClusterError: the processes of a cluster were given different inputs.
    """
    config = resolve_hyperparameters(hyperparameters)
    log.info("Final configuration:\n%s", format_config(config))
    data = {name: pair_data(channel, config, name=name)
            for name, channel in (("train", train), ("validation", validation), ("test", test))
            if channel is not None}
    pretrained = (None, None)
    if needs_auxiliary(config, checkpoint_dir or model_dir, resume):
        pretrained = read_auxiliary(auxiliary, config)
    elif any(enc.pretrained_embedding_file for enc in config.encoders):
        # The pretrained rows are in the saved parameters and the frozen-row masks in the
        # state: the auxiliary files are not needed (and may be gone) to continue.
        log.info("--resume: pretrained rows and frozen-row masks come from the saved training "
                 "state; the auxiliary channel is not read")
    for name, d in data.items():
        log.info("%s channel: %d records from %s", name, len(d), d.source)
    joined = cluster.active()
    if joined is not None:
        cluster.check_run(joined, config, data, pretrained, seed=seed, resume=resume,
                          devices=devices)
    result = train_loop(config, data["train"], validation=data.get("validation"),
                        test=data.get("test"), pretrained=pretrained, model_dir=model_dir,
                        seed=seed, resume=resume, host=host,
                        emit=emit if emit is not None else _silent, progress=progress,
                        devices=devices, checkpoint_dir=checkpoint_dir)
    if plot and (joined is None or joined.process_id == 0):
        plots.learning_curves(result.history, result.model_dir / plots.FILENAME,
                              kept_epoch=result.best_epoch if validation is not None else None)
    return result


def train(hyperparameters: Hyperparameters, train: Channel, validation: Channel | None = None,
          test: Channel | None = None, *, model_dir: str | Path | None = None, seed: int = 0,
          auxiliary: str | Path | None = None, resume: bool = False,
          emit: Callable[[str], None] | None = _print, progress: bool | None = None,
          plot: bool = True, preferred_mode: str | None = None) -> Predictor:
    """Train an Object2Vec model and return it, ready to embed and predict.

    Args:
        hyperparameters: a dict of SageMaker hyperparameter names -> values (numbers or
            strings), or the path of a SageMaker ``hyperparameters.json``.
        train: the train channel: a JSON Lines path, an iterable of records
            ``{"in0": [ids], "in1": [ids], "label": ...}``, or arrays ``(in0, in1, labels)``
            (in0/in1 2-D int arrays 0-padded on the right, or lists of id lists).
        validation: the same forms; drives early stopping and the kept epoch.
        test: the same forms; scored once with the kept parameters.
        model_dir: where the model directory is written (kept). None: a temporary
            directory, removed with the model (``model.save(dir)`` keeps a copy).
        seed: one seed for initialisation, shuffling, dropout and negatives; the same
            seed and data give the same model as ``o2v train --seed``.
        auxiliary: the auxiliary channel (vocabulary and pretrained vectors) directory,
            when ``encX_pretrained_embedding_file`` is set.
        resume: continue the interrupted run in ``model_dir`` (needs ``model_dir``).
        emit: where the metric lines go (print by default, flushed); None for silence.
        progress: per-epoch progress bars; None = when someone watches (a terminal or
            a notebook, where they render as widgets).
        plot: write ``learning_curves.png`` into the model directory (needs matplotlib).
        preferred_mode: the returned model's (see :func:`o2v_jax.load`).

    Returns:
        A :class:`~o2v_jax.predictor.Predictor` (``embed``, ``predict``, ``warmup``,
        ``config``, ``metadata``) with ``history``, the per-epoch metrics, and
        ``save(dir)``.

    Raises:
        HyperparameterError: a bad hyperparameter (the message ``o2v train`` prints).
        DataError: a bad record, naming its path (``train[3]: field "in0[2]": ...``) or
            file:line.
    """
    temporary = model_dir is None
    if temporary:
        if resume:
            raise ValueError("resume=True continues the run in model_dir; give its model_dir")
        model_dir = tempfile.mkdtemp(prefix="o2v-model-")
    try:
        fit(hyperparameters, train, validation, test, model_dir=model_dir, seed=seed,
            auxiliary=auxiliary, resume=resume, emit=emit, progress=progress, plot=plot)
        model = load(model_dir, preferred_mode=preferred_mode)
    except BaseException:  # also KeyboardInterrupt in a notebook: leave nothing behind
        if temporary:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    if temporary:
        # Runs when the model is garbage collected, or at interpreter exit.
        weakref.finalize(model, shutil.rmtree, model_dir, ignore_errors=True)
    return model


def evaluate(model: Predictor | str | Path, data: Channel) -> dict[str, float]:
    """The metrics of a model on labelled data, as ``o2v evaluate`` prints them.

    Args:
        model: a model from :func:`train` or :func:`o2v_jax.load`, or a model directory.
        data: a JSON Lines path, records or ``(in0, in1, labels)`` arrays.

    Returns:
        ``{"accuracy", "cross_entropy"}`` (softmax) or ``{"mean_squared_error"}``.
    """
    model_dir = model.model_dir if isinstance(model, Predictor) else model
    if model_dir is None:
        raise ValueError("evaluate needs a model with a model directory (from o2v_jax.train "
                         "or o2v_jax.load); this Predictor was built in memory")
    config, _ = checkpoint.read_config(model_dir)
    if config.objective == "contrastive":
        # Its comparator and MLP were never trained: their loss would mean nothing.
        raise checkpoint.ModelDirError(
            f"{model_dir}: this model was trained with objective=contrastive, for retrieval; "
            f"evaluate it with `o2v evaluate --retrieval` (o2v_jax.evaluate_retrieval)")
    pairs = pair_data(data, config, name="evaluation")  # bad data fails before the slow part
    config, steps, params = load_for_evaluation(model_dir)
    return evaluate_params(steps, params, pairs, config)


def _silent(line: str) -> None:
    pass
