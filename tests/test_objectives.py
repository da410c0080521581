"""The masked pair objective and its metrics (o2v_jax/objectives.py)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from o2v_jax.objectives import objective


def test_objective_ignores_fill_rows():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    labels = jnp.array([0.0, 0.0, 1.0])
    full, sums = objective(logits, labels, jnp.array([1.0, 1.0, 0.0]), regression=False)
    alone, _ = objective(logits[:2], labels[:2], jnp.ones(2), regression=False)
    assert float(full) == pytest.approx(float(alone))
    assert float(sums["count"]) == 2.0 and float(sums["correct"]) == 1.0


def test_objective_regression_reports_plain_mse():
    out = jnp.array([[1.0], [3.0]])
    _, sums = objective(out, jnp.array([0.0, 1.0]), jnp.ones(2), regression=True)
    assert float(sums["loss"]) / float(sums["count"]) == pytest.approx((1 + 4) / 2)


def test_objective_never_counts_fill_rows_as_correct():
    # Fill rows are labelled 0 (buckets._make_batch); here the model predicts 0 for them,
    # so a metric that forgot their weights would count them as correct.
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [3.0, -3.0], [4.0, -4.0], [5.0, -5.0]])
    labels = jnp.array([0.0, 0.0, 0.0, 0.0, 0.0])
    weights = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0])
    _, sums = objective(logits, labels, weights, regression=False)
    assert (float(sums["correct"]), float(sums["count"])) == (1.0, 2.0)


