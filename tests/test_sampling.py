"""Negative sampling (o2v_jax/sampling.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from o2v_jax.data import PairData
from o2v_jax.ragged import Ragged
from o2v_jax.sampling import Pairs, negative_pairs, negative_sample

def pair_data(in0, in1, labels):
    return PairData(Ragged.from_lists(in0), Ragged.from_lists(in1),
                    np.asarray(labels, np.float32), "mem")


def test_negative_sampling_counts_labels_and_partners():
    n_pos, k = 6, 3
    data = pair_data([[i + 1] for i in range(8)], [[i + 10, i] for i in range(8)],
                     [1] * n_pos + [0, 0])
    out = negative_sample(data, k, np.random.default_rng(0))
    assert len(out) == len(data) + k * n_pos
    assert out.labels[:8].tolist() == data.labels.tolist()  # input passes through first
    assert out.in0.take(np.arange(8)).to_lists() == data.in0.to_lists()
    assert (out.labels[8:] == 0).all()
    neg_in0 = out.in0.take(np.arange(8, len(out))).to_lists()
    neg_in1 = out.in1.take(np.arange(8, len(out))).to_lists()
    # Each positive anchors exactly k negatives; label-0 records anchor none.
    assert sorted(neg_in0) == sorted([[i + 1] for i in range(n_pos)] * k)
    all_in1 = data.in1.to_lists()
    for a, b in zip(neg_in0, neg_in1):
        anchor = a[0] - 1
        assert b in all_in1 and b != all_in1[anchor]  # another record's in1


def test_negative_sampling_draws_from_the_whole_channel_by_frequency():
    # in1 object [99] fills half the channel (odd records), so about half of the negatives
    # of an anchor with another in1 use it; anchors holding [99] never get it back.
    n, k = 400, 5
    in1 = [[99] if i % 2 else [i + 1000] for i in range(n)]
    data = pair_data([[i + 1] for i in range(n)], in1, [1] * n)
    out = negative_sample(data, k, np.random.default_rng(1))
    anchors = [x[0] - 1 for x in out.in0.take(np.arange(n, len(out))).to_lists()]
    negatives = out.in1.take(np.arange(n, len(out))).to_lists()
    share = [np.mean([x == [99] for a, x in zip(anchors, negatives) if a % 2 == odd])
             for odd in (0, 1)]
    assert 0.45 < share[0] < 0.55 and share[1] == 0
    assert len({tuple(x) for x in negatives}) > n // 3  # not a handful of partners


def test_negative_sampling_partners_are_uniform_over_the_other_records():
    n, k = 5, 400
    data = pair_data([[i + 1] for i in range(n)], [[i + 10] for i in range(n)], [1] * n)
    out = negative_sample(data, k, np.random.default_rng(2))
    anchors = np.array([x[0] - 1 for x in out.in0.take(np.arange(n, len(out))).to_lists()])
    partners = np.array([x[0] - 10 for x in out.in1.take(np.arange(n, len(out))).to_lists()])
    for a in range(n):
        counts = np.bincount(partners[anchors == a], minlength=n)
        assert counts[a] == 0 and (counts[np.arange(n) != a] > 60).all()  # ~100 each


def test_negative_sampling_is_seeded_and_redrawn_per_epoch():
    data = pair_data([[i + 1] for i in range(30)], [[i + 1] for i in range(30)], [1] * 30)
    draw = lambda seed: negative_sample(data, 2, np.random.default_rng(seed)).in1.to_lists()
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_negative_sampling_edge_cases(caplog):
    data = pair_data([[1], [2], [3]], [[5], [5], [5]], [1, 1, 0])
    assert negative_sample(data, 0, np.random.default_rng(0)) is data
    with caplog.at_level(logging.WARNING, logger="o2v_jax"):
        out = negative_sample(data, 2, np.random.default_rng(0))  # every in1 is the same object
    assert len(out) == 3 + 4 and "share their anchor's in1" in caplog.text
    in0 = out.in0.take(np.arange(3, 7)).to_lists()
    assert sorted(in0) == [[1], [1], [2], [2]]
    no_pos = pair_data([[1], [2]], [[3], [4]], [0, 0])
    assert negative_sample(no_pos, 2, np.random.default_rng(0)) is no_pos
    with pytest.raises(ValueError):
        negative_sample(pair_data([[1]], [[2]], [1]), 1, np.random.default_rng(0))


def test_negative_pairs_index_the_channel_without_copying_tokens():
    data = pair_data([[i + 1, i] for i in range(20)], [[i + 30] for i in range(20)],
                     [1] * 15 + [0] * 5)
    pairs = negative_pairs(data, 2, np.random.default_rng(5))
    assert isinstance(pairs, Pairs) and pairs.data is data and len(pairs) == 20 + 2 * 15
    # The same records, in the same order, as negative_sample's copied-out PairData.
    out = negative_sample(data, 2, np.random.default_rng(5))
    assert pairs.materialize().in0.to_lists() == out.in0.to_lists()
    assert pairs.materialize().in1.to_lists() == out.in1.to_lists()
    np.testing.assert_array_equal(pairs.labels, out.labels)
    np.testing.assert_array_equal(pairs.i0[:20], np.arange(20))  # the input first, as is
    assert data.in1.content_hash is data.in1.content_hash  # hashed once per channel
    with pytest.raises(ValueError, match="Pairs needs"):
        Pairs(data, np.arange(3), np.arange(2), np.zeros(3, np.float32))

