"""Dynamic batching: a lone request runs at once on its own thread; waiting requests are
merged by kind into one call and each gets its own rows back; failures reach every
merged request; merge/split keep the caller's order."""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fake_model import EMBED, HANG, MAX_LEN, PAIRS, VOCAB, FakePredictor, expected_values, wait_until

from o2v_jax import wire
from o2v_jax.app import compute
from o2v_jax.batcher import Batcher, kind, merge, split


def decoded(records: list[dict]) -> wire.Request:
    body = json.dumps({"instances": records}).encode()
    return wire.decode_request(body, None, vocab_sizes=(VOCAB, VOCAB), max_seq_lens=(MAX_LEN, MAX_LEN))


def batcher_for(fake: FakePredictor, **kw) -> Batcher:
    return Batcher(functools.partial(compute, fake), **kw)


def test_merge_and_split_keep_each_requests_rows():
    parts = [PAIRS, PAIRS[::-1], [{"in0": [3], "in1": [1, 2, 3]}]]
    requests = [decoded(r) for r in parts]
    assert {kind(r) for r in requests} == {("scores", None)}
    merged = merge(requests)
    assert len(merged) == 5 and merged.in0.to_lists() == [r["in0"] for p in parts for r in p]
    assert merged.in1.to_lists() == [r["in1"] for p in parts for r in p]
    assert merge(requests[:1]) is requests[0]
    values = compute(FakePredictor(), merged)
    for records, rows in zip(parts, split(values, requests)):
        np.testing.assert_array_equal(rows, expected_values(records))
    assert kind(decoded(EMBED)) == ("embeddings", "in1")
    one = merge([decoded(EMBED), decoded(EMBED[:1])])
    assert one.in0 is None and one.in1.to_lists() == [r["in1"] for r in EMBED + EMBED[:1]]


def test_batcher_runs_a_lone_request_at_once_on_its_own_thread():
    fake = FakePredictor()
    batcher = batcher_for(fake)
    np.testing.assert_array_equal(batcher.answer(decoded(PAIRS)), expected_values(PAIRS))
    assert fake.calls == [(2, threading.get_ident())]
    assert not batcher._busy and not batcher._queue


def test_batcher_merges_waiting_requests_by_kind_and_splits_the_answers():
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    batcher = batcher_for(fake, max_records=256)
    kinds = [PAIRS, EMBED, [{"in0": [3, 4]}], PAIRS[::-1], [{"in0": [9]}, {"in0": [1, 2, 8]}], EMBED[:1]]
    with ThreadPoolExecutor(len(kinds) + 1) as pool:
        first = pool.submit(batcher.answer, decoded(PAIRS))  # holds the predictor
        wait_until(lambda: fake.calls, "the first request is in the predictor")
        waiting = [pool.submit(batcher.answer, decoded(r)) for r in kinds]
        wait_until(lambda: len(batcher._queue) == len(kinds), "all are queued behind the running call")
        gate.set()
        np.testing.assert_array_equal(first.result(HANG), expected_values(PAIRS))
        for records, future in zip(kinds, waiting):
            np.testing.assert_array_equal(future.result(HANG), expected_values(records))
    # One call for the first request, then one per kind (scores, in1, in0) for the other six.
    assert sorted(n for n, _ in fake.calls) == [2, 3, 4, 4]


def test_batcher_failure_reaches_every_merged_request_and_big_requests_bypass():
    fake = FakePredictor(fail=True)
    with pytest.raises(RuntimeError, match="batched predictor call failed") as e:
        batcher_for(fake).answer(decoded(EMBED))
    assert "secret internal detail" in str(e.value.__cause__)
    gate = threading.Event()
    fake = FakePredictor(gate=gate, fail=True)
    batcher = batcher_for(fake)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.answer, decoded(PAIRS))
        wait_until(lambda: fake.calls, "the first request is in the predictor")
        waiting = [pool.submit(batcher.answer, decoded(r)) for r in (EMBED, EMBED[:1])]
        wait_until(lambda: len(batcher._queue) == 2, "both wait behind it")
        gate.set()
        for future in [first, *waiting]:  # the merged call fails for both waiting requests
            with pytest.raises(RuntimeError, match="batched predictor call failed"):
                future.result(HANG)
    assert [n for n, _ in fake.calls] == [2, 4] and not batcher._busy and not batcher._queue
    # A request of max_records or more runs alongside a call in flight, not behind it.
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    batcher = batcher_for(fake, max_records=3)
    with ThreadPoolExecutor(2) as pool:
        small = pool.submit(batcher.answer, decoded(PAIRS))
        wait_until(lambda: fake.calls, "the small request is in the predictor")
        big = pool.submit(batcher.answer, decoded(EMBED))
        wait_until(lambda: len(fake.calls) == 2, "the big request runs while the gate is shut")
        assert not batcher._queue
        gate.set()
        np.testing.assert_array_equal(big.result(HANG), expected_values(EMBED))
        np.testing.assert_array_equal(small.result(HANG), expected_values(PAIRS))
    assert not batcher._busy and not batcher._queue
