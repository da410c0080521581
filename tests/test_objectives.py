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




# --------------------------------------------------------------------------- contrastive


def _contrastive_reference(u, v, labels, weights, temperature):
    """The loss written out with loops: each positive row's two softmax cross-entropies."""
    import numpy as np

    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = u @ v.T / temperature
    real = [j for j in range(len(u)) if weights[j] > 0]
    pos = [i for i in real if labels[i] == 1]
    total = 0.0
    for i in pos:
        docs = np.log(sum(np.exp(s[i, j]) for j in real)) - s[i, i]  # every real in1
        queries = np.log(sum(np.exp(s[k, i]) for k in pos)) - s[i, i]  # positive in0 only
        total += 0.5 * (docs + queries)
    return total / len(pos), len(pos)


def test_contrastive_loss_equals_a_hand_written_reference():
    import numpy as np

    from o2v_jax.objectives import contrastive_objective

    rng = np.random.default_rng(0)
    u = rng.standard_normal((7, 5)).astype(np.float32)
    v = rng.standard_normal((7, 5)).astype(np.float32)
    labels = np.array([1, 1, 0, 1, 0, 1, 1], np.float32)  # rows 2, 4: hard negatives
    weights = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)  # rows 5, 6: fill rows
    # Fill rows hold anything, here huge vectors equal to row 0's: if they entered either
    # softmax as a positive or a negative, the loss would change a lot.
    u[5:], v[5:] = 100 * u[0], 100 * v[0]
    for temperature in (0.05, 1.0):
        loss, sums = contrastive_objective(jnp.asarray(u), jnp.asarray(v), jnp.asarray(labels),
                                           jnp.asarray(weights), temperature)
        want, count = _contrastive_reference(u, v, labels, weights, temperature)
        assert float(loss) == pytest.approx(want, rel=1e-5)
        assert float(sums["count"]) == count == 3
        assert float(sums["loss"]) == pytest.approx(want * count, rel=1e-5)


def test_contrastive_loss_ignores_what_fill_rows_hold():
    import jax
    import numpy as np

    from o2v_jax.objectives import contrastive_objective

    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    labels = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    loss = lambda u, v: contrastive_objective(u, v, labels, weights, 0.1)[0]  # noqa: E731
    other = u.at[4:].set(7.0), v.at[4:].set(-3.0)
    assert float(loss(u, v)) == pytest.approx(float(loss(*other)), rel=1e-6)
    gu, gv = jax.grad(loss, argnums=(0, 1))(u, v)
    assert np.all(np.asarray(gu[4:]) == 0) and np.all(np.asarray(gv[4:]) == 0)
    assert np.all(np.asarray(gu[1]) == 0)  # a hard negative's in0 is no query
    assert np.any(np.asarray(gv[1]) != 0)  # but its in1 is a negative for every query
    assert np.isfinite(np.asarray(gu)).all() and np.isfinite(np.asarray(gv)).all()
