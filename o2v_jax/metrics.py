"""What a training run reports: SageMaker's metric lines, its early stopping rule, and
the run's record in ``metrics.jsonl``.

SageMaker's HPO reads ``#quality_metric`` lines from the job's log with fixed regexes
(spec §6.1), and stops a run early on the validation loss by a rule reconstructed from
its logs (spec §4.8). Both are reproduced here exactly. ``metrics.jsonl`` (issue 19) is
ours: the model directory's per-epoch record, one JSON object a line, written as each
epoch ends (docs/training.md, "What a run leaves").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


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


# Metrics where higher is better: SageMaker's lines tag them <score>, the rest <loss>.
# Besides accuracy, the retrieval metrics of objective=contrastive (retrieval.py).
SCORES = ("accuracy", "hits@1", "hits@5", "hits@10", "mrr", "ndcg@10")


def stopping_loss(name: str, value: float) -> float:
    """What :class:`EarlyStopping` compares for validation metric ``name`` (lower is
    better): a loss as it is, a score in [0, 1] as 1 - score, so the tolerance is the
    same absolute amount and the best epoch is the highest score."""
    return 1.0 - value if name in SCORES else value


def quality_line(host: str, channel: str, name: str, value: float, epoch: int | None = None) -> str:
    """A ``#quality_metric`` line exactly as SageMaker's HPO regexes expect (spec §6.1).
    ``name`` may carry a prefix word (``bm25 mrr``); its last word says score or loss."""
    kind = "score" if name.split()[-1] in SCORES else "loss"
    where = f"epoch={epoch}, " if epoch is not None else ""
    return f"#quality_metric: host={host}, {where}{channel} {name} <{kind}>={value!r}"


# --------------------------------------------------------------------------- metrics.jsonl

METRICS_FILE = "metrics.jsonl"  # in the model directory: one JSON object per epoch


def write_history(path: str | Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Replace ``path`` with one line per record of ``history`` (atomically).

    A run calls this when it starts: a fresh run empties the file, a resumed one writes
    the epochs its saved state has, so a line written after the last saved state (the
    run was stopped between the two) is not repeated when that epoch runs again.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(_line(record) for record in history), encoding="utf-8")
    os.replace(tmp, path)


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one epoch's record as a line; it is on disk (flushed) when this returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(_line(record))


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _line(record: Mapping[str, Any]) -> str:
    # json writes floats with repr(), as the #quality_metric lines do: the same digits.
    return json.dumps(dict(record)) + "\n"
