"""Channels: JSON Lines records into flat arrays, and their errors (o2v_jax/data.py)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from conftest import channel_config as config
from conftest import record_line as rec
from conftest import write_lines as write

from o2v_jax import data as data_mod
from o2v_jax.data import DataError, PairData, read_channel
from o2v_jax.ragged import Ragged

# --------------------------------------------------------------------------- channels


def test_reads_records_into_flat_arrays(tmp_path):
    path = write(tmp_path / "train.jsonl",
                 [rec(0, [1, 2, 3], [4]), "", "   ", rec(1.0, [], [5, 6]), rec(1, [7], [])])
    data = read_channel(path, config())
    assert len(data) == 3
    assert data.in0.tokens.dtype == np.int32 and data.in0.offsets.dtype == np.int64
    assert data.in0.to_lists() == [[1, 2, 3], [], [7]]
    assert data.in1.to_lists() == [[4], [5, 6], []]
    assert data.labels.dtype == np.float32 and data.labels.tolist() == [0.0, 1.0, 1.0]
    assert data.source == str(path) and data.truncated == (0, 0)


def test_directory_channel_reads_files_in_sorted_order_and_skips_hidden(tmp_path):
    channel = tmp_path / "train"
    (channel / "sub").mkdir(parents=True)
    write(channel / "b.jsonl", [rec(1, [2], [2])])
    write(channel / "a.jsonl", [rec(0, [1], [1]), rec(0, [11], [11])])
    write(channel / "sub" / "c.jsonl", [rec(1, [3], [3])])
    write(channel / ".hidden.jsonl", ["not json at all"])
    (channel / ".cache").mkdir()
    write(channel / ".cache" / "x.jsonl", ["not json either"])
    data = read_channel(channel, config())
    assert data.in0.to_lists() == [[1], [11], [2], [3]]
    assert data.labels.tolist() == [0, 0, 1, 1]


def test_crlf_line_endings_and_byte_order_mark(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (rec(1, [1, 2], [3]) + "\r\n" + rec(0, [4], [5]) + "\r\n").encode())
    data = read_channel(path, config())
    assert data.in0.to_lists() == [[1, 2], [4]]


@pytest.mark.parametrize("line, message", [
    ('{"label": 1, "in0": [1, 2}', "malformed JSON"),
    ('{"label": 1, "in0": [1, 2', "malformed JSON: the line ends inside the record"),
    ('{"label": 1, "in0": "abc", "in1": [1]}', 'field "in0": expected array of integers, got str'),
    ('{"label": 1, "in0": [1, 2.5], "in1": [1]}', 'field "in0[1]": expected an integer token id, got float'),
    ('{"in0": [1], "in1": [1]}', 'field "label": missing'),
    ('{"label": 1, "in0": [1], "in1": [1], "extra": 2}', 'field "extra": unknown field'),
    ('{"label": "1", "in0": [1], "in1": [1]}', 'field "label": expected a number, got str'),
    ('[1, 2]', "expected a JSON object with"),
    ('{"label": 1, "in0": [1], "in1": [1, 2, 3, 50]}',
     'field "in1[3]": Vocab id "50" is not less than vocab_size=50 (enc0_vocab_size, which enc1 inherits'),
    ('{"label": 1, "in0": [4, -1], "in1": [1]}', 'field "in0[1]": Vocab id "-1" is negative'),
    ('{"label": 1, "in0": [1, 1180591620717411303424], "in1": [1]}',
     'field "in0[1]": Vocab id "1180591620717411303424" is not less than vocab_size=50'),
    ('{"label": 2, "in0": [1], "in1": [1]}',
     'field "label": expected a class index in 0..1 (output_layer=softmax, num_classes=2), got 2'),
    ('{"label": 0.5, "in0": [1], "in1": [1]}', 'field "label": expected a class index in 0..1'),
    ('{"label": -1, "in0": [1], "in1": [1]}', "got -1"),
])
def test_bad_record_names_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path / "train.jsonl", [rec(1, [1], [2]), "", line, rec(0, [3], [4])])
    with pytest.raises(DataError) as e:
        read_channel(path, config())
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)
    assert message in str(e.value)


@pytest.mark.parametrize("line, message", [
    # inside a key: msgspec raised a bare UnicodeDecodeError
    (b'{"label": 1, "in0": [1], "in1": [2], "x\xc3": 1}', "not valid UTF-8: byte 0xc3 at column 40"),
    (b'{"label": 1, "in0": [1], "in1": [2]}\xff', "malformed JSON"),
    (b'\xff{"label": 1, "in0": [1], "in1": [2]}', "malformed JSON"),
])
def test_invalid_utf8_is_a_data_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(rec(1, [1], [2]).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {message}"):
        read_channel(path, config())


@pytest.mark.parametrize("later", ['{"label": 1, "in0": [1, 2}', rec(1, [1], [1, 77]), rec(5, [1], [1])])
def test_the_first_bad_line_is_reported(tmp_path, later):
    path = write(tmp_path / "t.jsonl", [rec(0, [1], [2]), rec(1, [3], [4]), rec(1, [60], [1]), later])
    with pytest.raises(DataError, match=r"t.jsonl:3: field \"in0\[0\]\": Vocab id \"60\""):
        read_channel(path, config())
    path = write(tmp_path / "t.jsonl", [rec(0, [1], [2]), rec(7, [3], [4]), later, rec(1, [60], [1])])
    with pytest.raises(DataError, match=r"t.jsonl:2: field \"label\""):
        read_channel(path, config())


def test_vocab_error_names_the_encoders_own_setting(tmp_path):
    path = write(tmp_path / "train.jsonl", [rec(1, [1], [7])])
    cfg = config(enc1_network="pooled_embedding", enc1_max_seq_len=4, enc1_vocab_size=5)
    with pytest.raises(DataError, match=r'in1\[0\]": Vocab id "7" is not less than vocab_size=5 '
                                        r"\(enc1_vocab_size; ids must be in \[0, 5\)"):
        read_channel(path, cfg)


def test_error_line_numbers_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_CHUNK_BYTES", 64)  # many chunks, lines split across reads
    lines = [rec(i % 2, [1 + i % 40] * (i % 5), [2]) for i in range(60)]
    good = write(tmp_path / "good.jsonl", lines)
    small_chunks = read_channel(good, config())
    monkeypatch.setattr(data_mod, "_CHUNK_BYTES", 1 << 20)
    one_chunk = read_channel(good, config())
    assert small_chunks.in0.to_lists() == one_chunk.in0.to_lists() == [[1 + i % 40] * (i % 5)
                                                                        for i in range(60)]
    assert np.array_equal(small_chunks.labels, one_chunk.labels)
    monkeypatch.setattr(data_mod, "_CHUNK_BYTES", 64)
    lines[36] = rec(1, [1], [99])
    lines[50] = "{"
    bad = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=r"bad.jsonl:37: field \"in1\[0\]\": Vocab id \"99\""):
        read_channel(bad, config())
    lines[36] = rec(1, [1], [9])
    with pytest.raises(DataError, match=r"bad.jsonl:51: malformed JSON"):
        read_channel(write(bad, lines), config())


def test_regression_labels(tmp_path):
    cfg = config(output_layer="mean_squared_error")
    data = read_channel(write(tmp_path / "t.jsonl", [rec(4.5, [1], [1]), rec(-2, [1], [1])]), cfg)
    assert data.labels.tolist() == [4.5, -2.0]
    with pytest.raises(DataError, match=r"t2.jsonl:2: field \"label\": expected a number within "
                                        r"float32 range"):
        read_channel(write(tmp_path / "t2.jsonl", [rec(1, [1], [1]), rec(1e39, [1], [1])]), cfg)


def test_softmax_accepts_every_class_index(tmp_path):
    path = write(tmp_path / "t.jsonl", [rec(c, [1], [1]) for c in (0, 1, 2, 2.0)])
    assert read_channel(path, config(num_classes=3)).labels.tolist() == [0, 1, 2, 2]


def test_long_sequences_keep_their_first_tokens_and_are_counted(tmp_path, caplog):
    path = write(tmp_path / "t.jsonl", [rec(1, list(range(1, 11)), [1] * 8),
                                        rec(0, list(range(1, 9)), [2] * 9),
                                        rec(1, [3, 4], list(range(1, 13)))])
    with caplog.at_level(logging.WARNING, logger="o2v_jax"):
        data = read_channel(path, config())
    assert data.truncated == (1, 2)
    assert data.in0.to_lists() == [list(range(1, 9)), list(range(1, 9)), [3, 4]]
    assert data.in1.to_lists() == [[1] * 8, [2] * 8, list(range(1, 9))]
    assert "have been truncated because they exceeded max_seq_len" in caplog.text


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "nope", "channel train: .*nope does not exist"),
    (lambda p: (p / "d").mkdir() or p / "d", "channel train: no files in directory"),
    (lambda p: write(p / "e.jsonl", ["", " "]), "channel train: no records in"),
])
def test_missing_or_empty_channel(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        read_channel(setup(tmp_path), config())


def test_pair_data_take_keeps_rows_aligned():
    data = PairData(Ragged.from_lists([[1], [2, 2], [3]]), Ragged.from_lists([[4], [5], [6, 6]]),
                    np.array([0, 1, 0], np.float32), "mem", (1, 0))
    sub = data.take([2, 0])
    assert sub.in0.to_lists() == [[3], [1]] and sub.in1.to_lists() == [[6, 6], [4]]
    assert sub.labels.tolist() == [0, 0] and sub.truncated == (1, 0) and sub.source == "mem"


# --------------------------------------------------------------------------- retrieval pairs


def test_pairs_files_may_leave_the_label_out(tmp_path):
    # o2v evaluate --retrieval: no label reads as 1 (relevant), 0 is a candidate only,
    # whatever the model's output layer; training channels keep the strict format.
    path = write(tmp_path / "pairs.jsonl", ['{"in0": [1], "in1": [2, 3]}', rec(0, [4], [5]),
                                            rec(1, [6], [7])])
    data = read_channel(path, config(output_layer="mean_squared_error"), pairs=True)
    assert data.labels.tolist() == [1.0, 0.0, 1.0]
    assert data.in1.to_lists() == [[2, 3], [5], [7]]
    with pytest.raises(DataError, match=r'pairs\.jsonl:1: field "label": missing'):
        read_channel(path, config())


@pytest.mark.parametrize("line, message", [
    ('{"in0": [1], "in1": [2], "label": 2}',
     'field "label": expected 1 (relevant) or 0 (a candidate only), or no label (relevant), got 2'),
    ('{"in0": [1]}', 'field "in1": missing (every record needs "in0" (the query) and "in1"'),
    ('{"in0": [1], "in1": [2], "score": 1}', 'field "score": unknown field (a record has "in0"'),
])
def test_bad_pairs_record_names_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path / "pairs.jsonl", ['{"in0": [1], "in1": [2]}', line])
    with pytest.raises(DataError) as e:
        read_channel(path, config(), pairs=True)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)
