"""Channels from Python (o2v_jax/records.py): records and arrays become the PairData a
file gives, and bad ones get the file's error with a record path instead of file:line."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import group_pairs, write_jsonl

from o2v_jax import records as records_mod
from o2v_jax.config import from_hyperparameters
from o2v_jax.data import DataError, read_channel
from o2v_jax.ragged import Ragged
from o2v_jax.records import pair_data

BASE = {"enc0_max_seq_len": 8, "enc0_vocab_size": 40, "enc0_network": "pooled_embedding",
        "enc_dim": 8, "mlp_dim": 8, "mini_batch_size": 4}


def config(**overrides):
    return from_hyperparameters({**BASE, **overrides})


def padded(seqs, width=10):
    out = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def same(a, b):
    for side in ("in0", "in1"):
        np.testing.assert_array_equal(getattr(a, side).tokens, getattr(b, side).tokens)
        np.testing.assert_array_equal(getattr(a, side).offsets, getattr(b, side).offsets)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.dtype == b.labels.dtype and a.truncated == b.truncated


# Sequences up to 10 long: some are cut to max_seq_len 8, so truncation is compared too.
RECORDS = group_pairs(40, 3, max_len=10)


def _forms(path):
    in0, in1 = [r["in0"] for r in RECORDS], [r["in1"] for r in RECORDS]
    labels = [r["label"] for r in RECORDS]
    return {
        "path str": str(path),
        "records": RECORDS,
        "a generator of records": (dict(r) for r in RECORDS),
        "records with NumPy values": [{"in0": np.array(r["in0"]), "in1": [np.int64(t) for t in r["in1"]],
                                       "label": np.float32(r["label"])} for r in RECORDS],
        "padded arrays": (padded(in0), padded(in1), np.array(labels)),
        "lists": (in0, in1, labels),
        "Ragged and lists of arrays": (Ragged.from_lists(in0), [np.array(s) for s in in1],
                                       np.array(labels, np.float32)),
    }


@pytest.mark.parametrize("form", list(_forms("")))
def test_every_form_gives_the_files_pair_data(tmp_path, form):
    cfg = config()
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    from_file = read_channel(path, cfg)
    assert from_file.truncated != (0, 0)
    same(pair_data(_forms(path)[form], cfg, name="train"), from_file)


def test_records_are_read_a_chunk_at_a_time_and_errors_keep_their_index(monkeypatch):
    monkeypatch.setattr(records_mod, "_CHUNK", 7)
    cfg = config()
    same(pair_data(RECORDS, cfg, name="train"), pair_data(list(RECORDS), config(), name="x"))
    bad = [dict(r) for r in RECORDS]
    bad[23] = dict(bad[23], in1=[1, 99])
    with pytest.raises(DataError, match=r'^train\[23\]: field "in1\[1\]": Vocab id "99"'):
        pair_data(bad, cfg, name="train")


# Each bad record, and the message after "file:line: " (files) or "train[i]: " (Python).
BAD = [
    ({"label": 1, "in0": [1, 40], "in1": [2]},
     'field "in0[1]": Vocab id "40" is not less than vocab_size=40 (enc0_vocab_size; ids must be in [0, 40), 0 is padding)'),
    ({"label": 1, "in0": [1], "in1": [-3]},
     'field "in1[0]": Vocab id "-3" is negative (enc0_vocab_size, which enc1 inherits because enc1_network=enc0; ids must be in [0, 40), 0 is padding)'),
    ({"label": 2, "in0": [1], "in1": [2]},
     'field "label": expected a class index in 0..1 (output_layer=softmax, num_classes=2), got 2'),
    ({"label": 0.5, "in0": [1], "in1": [2]},
     'field "label": expected a class index in 0..1 (output_layer=softmax, num_classes=2), got 0.5'),
    ({"label": True, "in0": [1], "in1": [2]}, 'field "label": expected a number, got bool'),
    ({"label": "1", "in0": [1], "in1": [2]}, 'field "label": expected a number, got str'),
    ({"label": 1, "in0": [1, "7"], "in1": [2]}, 'field "in0[1]": expected an integer token id, got str'),
    ({"label": 1, "in0": [1, 2.5], "in1": [2]}, 'field "in0[1]": expected an integer token id, got float'),
    ({"label": 1, "in0": 3, "in1": [2]}, 'field "in0": expected array of integers, got int'),
    ({"label": 1, "in0": [1]}, 'field "in1": missing (every record needs "label", "in0" and "in1")'),
    ({"label": 1, "in0": [1], "in1": [2], "in2": [3]},
     'field "in2": unknown field (a record has exactly "label", "in0" and "in1")'),
    ([1, [1], [2]], 'expected a JSON object with "label", "in0" and "in1", got array'),
]


@pytest.mark.parametrize("record, message", BAD)
def test_a_bad_record_gets_the_files_message_at_its_record_path(tmp_path, record, message):
    good = {"label": 0, "in0": [1], "in1": [2]}
    path = write_jsonl(tmp_path / "t.jsonl", [good, good, record, good])
    with pytest.raises(DataError) as from_file:
        read_channel(path, config(), name="train")
    assert str(from_file.value) == f"{path}:3: {message}"
    with pytest.raises(DataError) as from_records:
        pair_data([good, good, record, good], config(), name="train")
    assert str(from_records.value) == f"train[2]: {message}"


def test_the_first_bad_record_is_reported_whatever_its_problem():
    records = [{"label": 0, "in0": [1], "in1": [2]}, {"label": 0, "in0": [1], "in1": [77]},
               {"label": "x", "in0": [1], "in1": [2]}]
    with pytest.raises(DataError, match=r'^validation\[1\]: field "in1\[0\]"'):
        pair_data(records, config(), name="validation")


def test_bad_arrays_name_the_row_and_field():
    cfg = config()
    cases = [
        (([[1], [2, 50]], [[1], [2]], [0, 1]), 'train[1]: field "in0[1]": Vocab id "50" is not less than vocab_size=40'),
        (([[1], [2]], [[1], [2.0]], [0, 1]), 'train[1]: field "in1[0]": expected an integer token id, got float'),
        (([[1], 5], [[1], [2]], [0, 1]), 'train[1]: field "in0": expected array of integers, got int'),
        (([[1], [2]], [[1], [2]], [0, 3]), 'train[1]: field "label": expected a class index in 0..1'),
        (([[1], [2]], [[1], [2]], [0, True]), 'train[1]: field "label": expected a number, got bool'),
        (([[1], [2]], [[1], [2]], np.array([False, True])),
         'train: field "label": expected a 1-D integer or float array (N,), one label per pair, got bool(2,)'),
        (([[1], [2]], [[1], [2]], np.zeros((2, 1))),
         'train: field "label": expected a 1-D integer or float array (N,), one label per pair, got float64(2, 1)'),
        ((np.zeros((2, 3)), [[1], [2]], [0, 1]), 'train: field "in0": expected a 2-D integer array (N, L)'),
        ((np.zeros(3, np.int32), [[1], [2]], [0, 1]), 'train: field "in0": expected a 2-D integer array'),
        ((padded([[1], [2]]), [[1], [2], [3]], [0, 1]), "train: in0 has 2 rows, in1 3 and labels 2"),
        (([], [], []), "channel train: no records"),
    ]
    for channel, message in cases:
        with pytest.raises(DataError) as e:
            pair_data(channel, cfg, name="train")
        assert str(e.value).startswith(message), (str(e.value), message)


def test_regression_labels_and_truncation_warn_as_files_do(caplog):
    cfg = config(output_layer="mean_squared_error")
    with caplog.at_level(logging.WARNING, logger="o2v_jax"):
        data = pair_data(([[1] * 12, [2]], [[3], [4]], [0.25, -1.5]), cfg, name="train")
    assert data.labels.tolist() == [0.25, -1.5] and data.truncated == (1, 0)
    assert "truncated because they exceeded max_seq_len: train: 1 in0 sequences" in caplog.text
    with pytest.raises(DataError, match=r'^train\[0\]: field "label": expected a number within float32'):
        pair_data([{"label": float("inf"), "in0": [1], "in1": [2]}], cfg, name="train")


def test_what_is_not_a_channel_is_a_type_error():
    for channel, message in [({"in0": [1]}, "got dict"), (5, "got int"),
                             (([[1]], [[1]]), "a tuple of 2")]:
        with pytest.raises(TypeError, match=message):
            pair_data(channel, config(), name="train")
