"""What a training run reports: SageMaker's metric lines and its early stopping rule.

SageMaker's HPO reads ``#quality_metric`` lines from the job's log with fixed regexes
(spec §6.1), and stops a run early on the validation loss by a rule reconstructed from
its logs (spec §4.8). Both are reproduced here exactly.
"""

from __future__ import annotations

import dataclasses

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
