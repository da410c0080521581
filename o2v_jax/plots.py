"""Learning curves as a PNG: the picture a training run leaves beside ``metrics.jsonl``.

The only module that imports matplotlib, an optional dependency (``o2v-jax[plot]``):
without it :func:`learning_curves` logs a note and returns None. It draws through
matplotlib's object API (``matplotlib.figure.Figure``), never ``pyplot``, so training
from a notebook neither switches the notebook's backend nor leaves figures open.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("o2v_jax")

FILENAME = "learning_curves.png"  # in the model directory, beside metrics.jsonl
# Panels in this order when the history has them (training's metric names, docs/training.md).
METRICS = ("mean_squared_error", "cross_entropy", "accuracy")
_LABELS = {"mean_squared_error": "mean squared error", "cross_entropy": "cross-entropy",
           "accuracy": "accuracy"}


def learning_curves(history: Sequence[Mapping[str, Any]], path: str | Path, *,
                    kept_epoch: int | None = None, reference: Mapping[str, float] = (),
                    title: str = "Object2Vec learning curves",
                    validation_label: str = "validation") -> Path | None:
    """Train and validation metrics per epoch, one panel per metric, as a PNG.

    Args:
        history: per-epoch records (``TrainResult.history``, the lines of metrics.jsonl):
            "epoch" and train_<metric> / validation_<metric> values.
        path: the PNG to write (its directory is created).
        kept_epoch: the epoch whose parameters were kept, starred on the validation curve.
        reference: label -> value of a baseline, drawn as horizontal lines on the first
            panel (the loss: mean squared error or cross-entropy).
        title: the figure's title.
        validation_label: the validation curve's legend entry.

    Returns:
        ``path``, or None when matplotlib is not installed or the history is empty.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.info("matplotlib is not installed, so no learning-curve PNG "
                 "(pip install 'o2v-jax[plot]' to get one)")
        return None
    metrics = [m for m in METRICS if any(f"train_{m}" in h for h in history)]
    if not metrics:
        return None
    epochs = [h["epoch"] for h in history]  # from 0, as in the metric lines
    fig = Figure(figsize=(4.5 + 3.5 * len(metrics), 4.2), dpi=110)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for i, (ax, metric) in enumerate(zip(axes, metrics)):
        ax.plot(epochs, [h.get(f"train_{metric}", math.nan) for h in history], "o-", label="train")
        if any(f"validation_{metric}" in h for h in history):
            val = [h.get(f"validation_{metric}", math.nan) for h in history]
            ax.plot(epochs, val, "s-", label=validation_label)
            if kept_epoch is not None and kept_epoch in epochs:
                ax.plot([kept_epoch], [val[epochs.index(kept_epoch)]], "k*", ms=12,
                        label="kept epoch")
        if i == 0:
            for (name, value), style in zip(dict(reference).items(), (":", "--", "-.")):
                ax.axhline(value, color="grey", ls=style, lw=1, label=f"{name} ({validation_label})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (from 0)")
        ax.set_ylabel(_LABELS[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
