"""SageMaker's metric lines and early stopping (o2v_jax/metrics.py)."""

from __future__ import annotations

from o2v_jax.metrics import EarlyStopping, quality_line


def test_early_stopping_reproduces_sagemaker_trace():
    # spec §4.8 (LOG-DOC): patience 2, tolerance 0.01 -> stop after epoch 6, best epoch 3.
    losses = [0.2085, 0.1976, 0.2025, 0.1813, 0.1969, 0.1930, 0.1977]
    es = EarlyStopping(patience=2, tolerance=0.01)
    stops = [es.update(x) for x in losses]
    assert stops == [False] * 6 + [True]
    assert es.best_epoch == 3


def test_early_stopping_needs_improvement_by_tolerance():
    es = EarlyStopping(patience=1, tolerance=0.1)
    assert not es.update(1.0)
    assert not es.update(0.95)  # bad 1 (improved by less than tolerance)
    assert es.update(0.93)  # bad 2 > patience
    es = EarlyStopping(patience=1, tolerance=0.1)
    assert [es.update(x) for x in (1.0, 0.85, 0.7, 0.55)] == [False] * 4




def test_quality_line_format():
    line = quality_line("algo-1", "validation", "accuracy", 0.915, epoch=0)
    assert line == "#quality_metric: host=algo-1, epoch=0, validation accuracy <score>=0.915"
    assert quality_line("algo-1", "test", "cross_entropy", 0.18) == \
        "#quality_metric: host=algo-1, test cross_entropy <loss>=0.18"


