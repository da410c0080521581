"""Length ladders, padding and fixed-shape batches (o2v_jax/buckets.py)."""

from __future__ import annotations

import numpy as np
import pytest

from o2v_jax.buckets import batch_plan, batches, count_batches, length_ladder, pad_sequences, prefetch
from o2v_jax.config import from_hyperparameters
from o2v_jax.data import PairData
from o2v_jax.ragged import Ragged
from o2v_jax.sampling import Pairs, negative_pairs, negative_sample


def config(**overrides):
    return from_hyperparameters({"enc0_max_seq_len": 12, "enc0_vocab_size": 50,
                                 "enc0_network": "pooled_embedding", "enc_dim": 8, "mlp_dim": 8,
                                 "mini_batch_size": 4, "output_layer": "mean_squared_error",
                                 "enc1_network": "pooled_embedding", "enc1_max_seq_len": 20,
                                 "enc1_vocab_size": 50, **overrides})


def random_data(n, max0=12, max1=20, seed=0):
    """Labels are the record numbers, so a batch row tells which record it holds."""
    rng = np.random.default_rng(seed)
    seqs = lambda m: [rng.integers(1, 50, rng.integers(0, m + 1)).tolist() for _ in range(n)]
    return PairData(Ragged.from_lists(seqs(max0)), Ragged.from_lists(seqs(max1)),
                    np.arange(n, dtype=np.float32), "mem")


@pytest.mark.parametrize("max_len, width, ladder", [
    (50, 0, (8, 16, 32, 50)), (64, 0, (8, 16, 32, 64)), (9, 0, (8, 9)), (8, 0, (8,)), (3, 0, (3,)),
    (50, 10, (10, 20, 30, 40, 50)), (45, 10, (10, 20, 30, 40, 45)), (10, 100, (10,)), (1, 1, (1,)),
])
def test_length_ladder(max_len, width, ladder):
    assert length_ladder(max_len, width) == ladder


def test_default_ladder_stays_short():
    assert len(length_ladder(5000, 0)) == 11  # 8 .. 4096, then 5000
    with pytest.raises(ValueError):
        length_ladder(0, 0)


@pytest.mark.parametrize("n, sizes, expected", [
    (0, (1, 8, 64), []), (1, (1, 8, 64), [1]), (5, (1, 8, 64), [8]), (3, (1, 8, 64), [1, 1, 1]),
    (65, (1, 8, 64), [64, 1]), (200, (1, 8, 64), [64, 64, 64, 8]), (100, (1, 8, 64), [64, 64]),
    (3, (4, 16), [4]),
])
def test_batch_plan(n, sizes, expected):
    plan = batch_plan(n, sizes)
    assert plan == expected and sum(plan) >= n
    assert all(b in sizes for b in plan)


def test_pad_sequences():
    r = Ragged.from_lists([[1, 2, 3], [], [4]])
    np.testing.assert_array_equal(pad_sequences(r, 4, rows=5), [[1, 2, 3, 0], [0, 0, 0, 0],
                                                                 [4, 0, 0, 0], [0] * 4, [0] * 4])
    assert pad_sequences(r, 3).dtype == np.int32 and pad_sequences(r, 3).shape == (3, 3)
    with pytest.raises(ValueError):
        pad_sequences(r, 2)
    with pytest.raises(ValueError):
        pad_sequences(r, 4, rows=2)


def test_pad_sequences_reads_no_token_past_a_sequence():
    # Rows read L tokens from their start and zero the rest: the last sequences of the
    # array (whose reads run off its end) and empty ones must still come out exact.
    r = Ragged.from_lists([[7, 8], [9], [], [5, 6, 4]])
    np.testing.assert_array_equal(pad_sequences(r, 5), [[7, 8, 0, 0, 0], [9, 0, 0, 0, 0],
                                                        [0] * 5, [5, 6, 4, 0, 0]])
    empty = Ragged.from_lists([[], []])
    np.testing.assert_array_equal(pad_sequences(empty, 3, rows=3), np.zeros((3, 3)))


@pytest.mark.parametrize("seed", [None, 3])
def test_batches_of_pairs_equal_batches_of_the_copied_records(seed):
    # An epoch's Pairs (indices, no copied tokens) batch exactly like the same records
    # materialised: same shapes, rows, labels, order.
    data = PairData(random_data(90).in0, random_data(90, seed=1).in1,
                    (np.arange(90) % 2).astype(np.float32), "mem")
    cfg = config()
    pairs = negative_pairs(data, 2, np.random.default_rng(0))
    copied = negative_sample(data, 2, np.random.default_rng(0))
    got = list(batches(pairs, cfg, shuffle_seed=seed))
    want = list(batches(copied, cfg, shuffle_seed=seed))
    assert len(got) == len(want) == count_batches(pairs, cfg) > 1
    for a, b in zip(got, want):
        for field in ("in0", "in1", "labels", "weights"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # A Pairs view of a subset in another order batches its own records only.
    sub = Pairs(data, np.array([5, 5, 2]), np.array([0, 1, 2]), np.array([1, 2, 3], np.float32))
    rows = [(list(b.in0[i][b.in0[i] > 0]), list(b.in1[i][b.in1[i] > 0]), b.labels[i])
            for b in batches(sub, cfg, shuffle_seed=None) for i in np.flatnonzero(b.weights)]
    lists0, lists1 = data.in0.to_lists(), data.in1.to_lists()
    assert sorted(rows, key=lambda r: r[2]) == [(lists0[5], lists1[0], 1), (lists0[5], lists1[1], 2),
                                                 (lists0[2], lists1[2], 3)]


@pytest.mark.parametrize("bucket_width", [0, 5])
@pytest.mark.parametrize("seed", [None, 7])
def test_every_record_once_in_a_fixed_shape_batch(bucket_width, seed):
    cfg = config(bucket_width=bucket_width)
    data = random_data(101)
    ladder0, ladder1 = length_ladder(12, bucket_width), length_ladder(20, bucket_width)
    seen = []
    out = list(batches(data, cfg, shuffle_seed=seed))
    assert len(out) == count_batches(data, cfg)
    for b in out:
        assert b.in0.shape[0] == b.in1.shape[0] == b.labels.shape[0] == b.weights.shape[0] == 4
        assert b.in0.shape[1] in ladder0 and b.in1.shape[1] in ladder1
        assert b.in0.dtype == b.in1.dtype == np.int32
        assert b.labels.dtype == b.weights.dtype == np.float32
        real = b.weights == 1
        assert set(np.unique(b.weights)) <= {0.0, 1.0} and real[: real.sum()].all()
        # Masked rows: no tokens, label 0, weight 0.
        assert not b.in0[~real].any() and not b.in1[~real].any() and not b.labels[~real].any()
        for row, i in enumerate(b.labels[real].astype(int)):
            for side, (ragged, ladder, tokens) in enumerate(
                    [(data.in0, ladder0, b.in0), (data.in1, ladder1, b.in1)]):
                seq = ragged.take([i]).to_lists()[0]
                # The smallest bucket that fits this side, padded with zeros.
                assert tokens.shape[1] == min(x for x in ladder if x >= len(seq))
                assert tokens[row].tolist() == seq + [0] * (tokens.shape[1] - len(seq))
        seen += b.labels[real].astype(int).tolist()
    assert sorted(seen) == list(range(len(data)))


def test_only_each_buckets_last_batch_is_padded():
    cfg = config()
    data = random_data(200, seed=3)
    per_bucket: dict[tuple[int, int], list[int]] = {}
    for b in batches(data, cfg, shuffle_seed=None):
        per_bucket.setdefault((b.in0.shape[1], b.in1.shape[1]), []).append(int(b.weights.sum()))
    for sizes in per_bucket.values():
        assert all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4


def test_shuffling_is_seeded():
    cfg = config()
    data = random_data(64, seed=1)
    labels = lambda seed: [b.labels.tolist() for b in batches(data, cfg, shuffle_seed=seed)]
    assert labels(11) == labels(11)
    assert labels(11) != labels(12)
    assert sorted(map(tuple, labels(11))) != sorted(map(tuple, labels(12)))  # records move too
    # Batches of different buckets are interleaved, not visited bucket by bucket.
    shapes = [(b.in0.shape[1], b.in1.shape[1]) for b in batches(data, cfg, shuffle_seed=11)]
    assert shapes != sorted(shapes)


def test_no_seed_keeps_file_order_within_buckets():
    cfg = config(mini_batch_size=3)
    data = random_data(60, seed=2)
    out = [b for b in batches(data, cfg, shuffle_seed=None)]
    assert [b.labels.tolist() for b in out] == [b.labels.tolist()
                                                 for b in batches(data, cfg, shuffle_seed=None)]
    shapes = [(b.in0.shape[1], b.in1.shape[1]) for b in out]
    assert shapes == sorted(shapes)  # buckets in ascending (L0, L1) order
    for shape in set(shapes):
        rows = [int(x) for b in out if (b.in0.shape[1], b.in1.shape[1]) == shape
                for x, w in zip(b.labels, b.weights) if w]
        assert rows == sorted(rows)


def test_one_bucket_when_everything_is_short():
    cfg = config(mini_batch_size=8)
    data = PairData(Ragged.from_lists([[1]] * 10), Ragged.from_lists([[2, 3]] * 10),
                    np.arange(10, dtype=np.float32), "mem")
    out = list(batches(data, cfg, shuffle_seed=5))
    assert [b.in0.shape for b in out] == [(8, 8), (8, 8)] and count_batches(data, cfg) == 2
    assert sum(b.weights.sum() for b in out) == 10


def test_sequences_longer_than_max_seq_len_are_rejected():
    data = PairData(Ragged.from_lists([[1] * 13]), Ragged.from_lists([[1]]),
                    np.zeros(1, np.float32), "mem")
    with pytest.raises(ValueError, match="longer than max_seq_len=12"):
        count_batches(data, config())


# --------------------------------------------------------------------------- prefetch

def test_prefetch_yields_the_same_items_in_order_through_transform():
    assert list(prefetch(iter(range(50)), depth=3, transform=lambda x: x * x)) == [
        x * x for x in range(50)]
    assert list(prefetch(iter([]))) == []


def test_prefetch_raises_the_workers_error_at_its_item():
    def items():
        yield 1
        yield 2
        raise ValueError("bad record at line 3")

    got = []
    with pytest.raises(ValueError, match="line 3"):
        for x in prefetch(items()):
            got.append(x)
    assert got == [1, 2]


def test_prefetch_stops_its_worker_when_the_consumer_stops():
    import itertools
    import threading

    made = []

    def endless():
        for i in itertools.count():
            made.append(i)
            yield i

    gen = prefetch(endless(), depth=2)
    assert [next(gen) for _ in range(5)] == list(range(5))
    gen.close()
    assert not any(t.name == "o2v-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 5 + 2 + 2  # at most depth items (+ one in hand) past the last taken
