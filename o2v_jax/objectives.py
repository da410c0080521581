"""The training objectives: SageMaker's masked pair loss, the contrastive loss, their metrics.

``output_layer=softmax`` trains cross-entropy over ``num_classes`` and reports
``cross_entropy`` and ``accuracy``; ``mean_squared_error`` trains 0.5 * squared error (the
gradient MXNet's LinearRegressionOutput back-propagates) and reports
``mean_squared_error`` (spec §4.5, §6.1). Fill rows (weight 0) never enter a loss or a
metric. :class:`PairLoss` applies the objective to the model, from token ids or from the
two encodings (the row_sparse step's entry point).

``objective=contrastive`` (an o2v extension, issue 21) trains the encodings for
retrieval instead: :func:`contrastive_objective`, in-batch negatives with a symmetric
softmax cross-entropy over cosine similarities divided by a temperature, applied by
:class:`ContrastiveLoss` (same two entry points as PairLoss). :func:`loss_for` picks the
loss a configuration asks for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from o2v_jax.buckets import Batch
from o2v_jax.config import Config
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


def bind(graphdef: Any, params: Params, layout: str) -> Object2Vec:
    """The model of ``params``, checked to be built for the steps' ``layout``."""
    model = merge_params(graphdef, params)
    if model.layout != layout:  # checked at trace time: free at run time
        raise ValueError(f"the model was built for layout={model.layout!r} but the steps "
                         f"for {layout!r}; pass the same layout to both")
    return model


@dataclasses.dataclass(frozen=True)
class PairLoss:
    """The masked objective of the model with parameters ``params`` on a batch."""

    graphdef: Any  # the model's static structure (split_params)
    regression: bool
    layout: str  # the steps' code shape, which must be the model's

    def model(self, params: Params) -> Object2Vec:
        return bind(self.graphdef, params, self.layout)

    def __call__(self, params: Params, batch: Batch, key: jax.Array | None):
        """(mean loss over real rows, metric sums); ``key=None``: no dropout."""
        output, _ = self.model(params)(batch.in0, batch.in1, dropout_key=key)
        return objective(output, batch.labels, batch.weights, self.regression)

    def from_encodings(self, params: Params, u: jax.Array, v: jax.Array, batch: Batch,
                       key: jax.Array | None):
        """The same from the two (B, H) encodings on (model.from_encodings)."""
        output, _ = self.model(params).from_encodings(u, v, dropout_key=key)
        return objective(output, batch.labels, batch.weights, self.regression)

# --------------------------------------------------------------------------- contrastive

def _unit(x: jax.Array) -> jax.Array:
    """Rows scaled to length 1; a zero row (all padding) stays 0, so its cosines are 0."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def contrastive_objective(u: jax.Array, v: jax.Array, labels: jax.Array, weights: jax.Array,
                          temperature: float):
    """In-batch contrastive loss (symmetric InfoNCE) and its metric sums for one batch.

    ``s[i, j] = cos(u_i, v_j) / temperature``. Row i with weight 1 and label 1 is a
    positive pair: its query ``u_i`` must pick ``v_i`` among every real row's ``v_j``
    (softmax over the columns), and its document ``v_i`` must pick ``u_i`` among the
    positive rows' queries (softmax over the rows). A label-0 row is a hard negative: its
    ``v_j`` is one more wrong column for every query, and it is never a positive; its
    ``u_j`` is no query (a negative pair says nothing about which documents ``u_j``
    matches). Fill rows (weight 0) are in neither softmax.

    Args:
      u: float32 (B, H) enc0 encodings of in0; v: float32 (B, H) enc1 encodings of in1.
      labels: float32 (B,) 1 = positive pair, 0 = hard negative.
      weights: float32 (B,) 1 for real rows, 0 for fill rows.
      temperature: the softmax temperature (static).

    Returns:
      (loss, sums): the mean over positive rows of the two directions' average
      cross-entropy (what is differentiated), and sums over positive rows: ``loss``,
      ``correct`` (queries whose own document scores highest in the batch) and ``count``.
    """
    real = weights > 0
    pos = real & (labels == 1)
    s = (_unit(u) @ _unit(v).T) / temperature  # (B, B)
    diag = jnp.diagonal(s)
    # Masked entries get -inf; every positive row keeps at least its own diagonal entry,
    # and rows or columns that are not positives are zeroed below, never differentiated
    # through an all -inf softmax (where() keeps their gradients 0, not NaN).
    to_docs = jnp.where(real[None, :], s, -jnp.inf)
    to_queries = jnp.where(pos[:, None], s, -jnp.inf)
    ce_docs = jax.nn.logsumexp(jnp.where(pos[:, None], to_docs, 0.0), axis=1) - diag
    ce_queries = jax.nn.logsumexp(jnp.where(pos[None, :], to_queries, 0.0), axis=0) - diag
    per_row = jnp.where(pos, 0.5 * (ce_docs + ce_queries), 0.0)
    count = pos.sum().astype(jnp.float32)
    correct = jnp.where(pos, (jnp.argmax(to_docs, axis=1) == jnp.arange(s.shape[0])), False)
    total = per_row.sum()
    return total / jnp.maximum(count, 1.0), {"loss": total, "correct": correct.sum().astype(jnp.float32),
                                            "count": count}


@dataclasses.dataclass(frozen=True)
class ContrastiveLoss:
    """:func:`contrastive_objective` of the model's two encodings (after the model's
    encoder-output dropout); the comparator and MLP head are not used. The same entry
    points as :class:`PairLoss`."""

    graphdef: Any  # the model's static structure (split_params)
    temperature: float
    layout: str  # the steps' code shape, which must be the model's

    def __call__(self, params: Params, batch: Batch, key: jax.Array | None):
        """(mean loss over positive rows, metric sums); ``key=None``: no dropout."""
        model = bind(self.graphdef, params, self.layout)
        return self._objective(model, model.encode(batch.in0, 0), model.encode(batch.in1, 1),
                               batch, key)

    def from_encodings(self, params: Params, u: jax.Array, v: jax.Array, batch: Batch,
                       key: jax.Array | None):
        """The same from the two (B, H) encodings (the row_sparse step's entry point)."""
        return self._objective(bind(self.graphdef, params, self.layout), u, v, batch, key)

    def _objective(self, model: Object2Vec, u, v, batch: Batch, key):
        u, v = model.encoding_dropout(u, v, dropout_key=key)
        return contrastive_objective(u, v, batch.labels, batch.weights, self.temperature)


def loss_for(graphdef: Any, config: Config, layout: str) -> PairLoss | ContrastiveLoss:
    """The loss ``config.objective`` names, on the model ``graphdef``."""
    if config.objective == "contrastive":
        return ContrastiveLoss(graphdef, config.contrastive_temperature, layout)
    return PairLoss(graphdef, config.is_regression, layout)


def training_metrics(sums: Mapping[str, float], config: Config) -> dict[str, float]:
    """An epoch's summed training metrics -> the metrics reported: SageMaker's
    (:func:`finish_metrics`), or ``contrastive_loss`` (the mean over positive pairs)."""
    if config.objective == "contrastive":
        return {"contrastive_loss": float(sums["loss"]) / max(float(sums["count"]), 1.0)}
    return finish_metrics(sums, config.is_regression)
