"""The training objective: SageMaker's masked pair loss and its metrics.

``output_layer=softmax`` trains cross-entropy over ``num_classes`` and reports
``cross_entropy`` and ``accuracy``; ``mean_squared_error`` trains 0.5 * squared error (the
gradient MXNet's LinearRegressionOutput back-propagates) and reports
``mean_squared_error`` (spec §4.5, §6.1). Fill rows (weight 0) never enter a loss or a
metric. :class:`PairLoss` applies the objective to the model, from token ids or from the
two encodings (the row_sparse step's entry point).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from o2v_jax.buckets import Batch
from o2v_jax.model import Object2Vec, merge_params

Params = dict[str, Any]  # nested dict of arrays (the model's parameters)


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


@dataclasses.dataclass(frozen=True)
class PairLoss:
    """The masked objective of the model with parameters ``params`` on a batch."""

    graphdef: Any  # the model's static structure (split_params)
    regression: bool
    layout: str  # the steps' code shape, which must be the model's

    def model(self, params: Params) -> Object2Vec:
        model = merge_params(self.graphdef, params)
        if model.layout != self.layout:  # checked at trace time: free at run time
            raise ValueError(f"the model was built for layout={model.layout!r} but the steps "
                             f"for {self.layout!r}; pass the same layout to both")
        return model

    def __call__(self, params: Params, batch: Batch, key: jax.Array | None):
        """(mean loss over real rows, metric sums); ``key=None``: no dropout."""
        output, _ = self.model(params)(batch.in0, batch.in1, dropout_key=key)
        return objective(output, batch.labels, batch.weights, self.regression)

    def from_encodings(self, params: Params, u: jax.Array, v: jax.Array, batch: Batch,
                       key: jax.Array | None):
        """The same from the two (B, H) encodings on (model.from_encodings)."""
        output, _ = self.model(params).from_encodings(u, v, dropout_key=key)
        return objective(output, batch.labels, batch.weights, self.regression)
