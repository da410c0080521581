"""Shared test helpers: tiny configs and synthetic pair data that a model can learn."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

# Catch silent broadcasting bugs (as equinox does).
jax.config.update("jax_numpy_rank_promotion", "raise")

TINY = {
    "enc0_max_seq_len": 8, "enc0_vocab_size": 40, "enc0_network": "pooled_embedding",
    "enc_dim": 16, "mlp_dim": 16, "mlp_layers": 1, "mlp_activation": "relu",
    "mini_batch_size": 16, "epochs": 3, "learning_rate": 0.01,
}


@contextlib.contextmanager
def count_compiles():
    """Collects one entry per XLA compile requested inside the block (jax.monitoring's
    backend-compile event, which also wraps persistent-cache look-ups); jit cache hits
    add nothing. The one compile counter of the suite::

        with count_compiles() as compiles:
            step(...)
        assert len(compiles) == 1
    """
    events: list[str] = []

    def listener(name, _secs, **_kw):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# SageMaker HPO's metric regexes for Object2Vec (spec §6.1), as its UI catalog gives them.
HPO_REGEXES = {
    "validation:accuracy": r"#quality_metric: host=\S+, epoch=\S+, validation accuracy <score>=(\S+)",
    "validation:cross_entropy": r"#quality_metric: host=\S+, epoch=\S+, validation cross_entropy <loss>=(\S+)",
    "test:accuracy": r"#quality_metric: host=\S+, test accuracy <score>=(\S+)",
    "test:cross_entropy": r"#quality_metric: host=\S+, test cross_entropy <loss>=(\S+)",
    "train:progress": r"#progress_metric: host=\S+, completed (\S+) %",
    "train:throughput": r"#throughput_metric: host=\S+, train throughput=(\S+) records/second",
}


def tiny_hp(**overrides) -> dict:
    """A tiny hyperparameter map (fast compiles); overrides use SageMaker names."""
    return {**TINY, **{k: str(v) for k, v in overrides.items()}}


def group_pairs(n: int, seed: int, vocab: int = 40, max_len: int = 8, regression: bool = False):
    """Pairs whose label says whether both sequences come from the same token group.

    Tokens 1..vocab/2-1 are group A, the rest group B; each sequence is drawn from one
    group, so every encoder can learn the task. Returns records as dicts.
    """
    rng = np.random.default_rng(seed)
    half = vocab // 2
    records = []
    for _ in range(n):
        groups = rng.integers(0, 2, size=2)
        seqs = []
        for g in groups:
            lo, hi = (1, half) if g == 0 else (half, vocab)
            seqs.append(rng.integers(lo, hi, size=rng.integers(1, max_len + 1)).tolist())
        same = int(groups[0] == groups[1])
        label = (2.0 * same - 1.0) if regression else same
        records.append({"label": label, "in0": seqs[0], "in1": seqs[1]})
    return records


# A small pooled model's settings for channel-reading tests (test_data, test_pretrained).
CHANNEL_HP = {"enc0_max_seq_len": 8, "enc0_vocab_size": 50, "enc0_network": "pooled_embedding",
              "enc_dim": 8, "mlp_dim": 8, "mini_batch_size": 4}


def channel_config(**overrides):
    """``CHANNEL_HP`` with ``overrides``, resolved."""
    from o2v_jax.config import from_hyperparameters

    return from_hyperparameters({**CHANNEL_HP, **overrides})


def write_lines(path: Path, lines, newline: str = "\n") -> Path:
    """``lines`` as a file, each ending with ``newline``."""
    path.write_text(newline.join(lines) + newline)
    return path


def record_line(label, in0, in1) -> str:
    """One channel record as a JSON line."""
    return json.dumps({"label": label, "in0": in0, "in1": in1})


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tiny_config():
    from o2v_jax.config import from_hyperparameters

    return from_hyperparameters(tiny_hp())


def random_batch(vocab_used: int, rows: int = 16, length: int = 8, seed: int = 0):
    """(in0, in1, labels, weights) of random ids in [1, vocab_used), the last two
    positions of in0 padding."""
    rng = np.random.default_rng(seed)
    in0 = rng.integers(1, vocab_used, size=(rows, length)).astype(np.int32)
    in1 = rng.integers(1, vocab_used, size=(rows, length)).astype(np.int32)
    in0[:, -2:] = 0  # some padding
    labels = rng.integers(0, 2, size=rows).astype(np.float32)
    return in0, in1, labels, np.ones(rows, np.float32)


def run_steps(config, batch, *, pretrained=(None, None), steps=3, layout="cpu", options=None):
    """``steps`` train steps on one batch (a Batch or its four arrays) from init_params
    with seed 0: returns (params before, as numpy; params after; opt_state after)."""
    from o2v_jax.buckets import Batch
    from o2v_jax.row_sparse import Options
    from o2v_jax.training import build_steps, init_params

    graphdef, params, keep = init_params(config, 0, pretrained, layout=layout)
    built = build_steps(graphdef, config, keep, layout=layout, options=options or Options())
    state = built.init_state(params)
    before = jax.tree.map(np.array, params)
    batch = batch if isinstance(batch, Batch) else Batch(*batch)
    for _ in range(steps):
        state, _ = built.train_step(state, batch, jax.random.key(0))
    return before, state.params, state.opt_state


def train_tiny_model(root: Path, **hp) -> Path:
    """Train a tiny model for one epoch under ``root`` and return its model directory.

    Training sequences of <= 4 ids fill one bucket: one train-step compile, a fast fixture.
    """
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.data import read_channel
    from o2v_jax.training import train

    config = from_hyperparameters(tiny_hp(**hp))
    data = read_channel(write_jsonl(root / "train.jsonl", group_pairs(48, 0, max_len=4)), config)
    train(config, data, model_dir=root / "model", emit=lambda line: None, progress=False)
    return root / "model"
