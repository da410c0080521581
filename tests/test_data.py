"""Channels, auxiliary files and negative sampling (o2v_jax/data.py)."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from o2v_jax import data as data_mod
from o2v_jax.config import from_hyperparameters
from o2v_jax.data import (DataError, PairData, Pairs, Ragged, negative_pairs, negative_sample, read_auxiliary,
                          read_channel)

BASE = {"enc0_max_seq_len": 8, "enc0_vocab_size": 50, "enc0_network": "pooled_embedding",
        "enc_dim": 8, "mlp_dim": 8, "mini_batch_size": 4}


def config(**overrides):
    return from_hyperparameters({**BASE, **overrides})


def write(path, lines, newline="\n"):
    path.write_text(newline.join(lines) + newline)
    return path


def rec(label, in0, in1):
    return json.dumps({"label": label, "in0": in0, "in1": in1})


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


# --------------------------------------------------------------------------- containers


def test_ragged_round_trip_take_and_concat():
    seqs = [[3, 1], [], [7, 8, 9], [5]]
    r = Ragged.from_lists(seqs)
    assert r.to_lists() == seqs and len(r) == 4
    assert r.lengths.tolist() == [2, 0, 3, 1]
    assert r.take([2, 0, 2, 1]).to_lists() == [[7, 8, 9], [3, 1], [7, 8, 9], []]
    assert r.take(np.array([False, True, True, False])).to_lists() == [[], [7, 8, 9]]
    assert r.take([-1]).to_lists() == [[5]]
    assert r.take([]).to_lists() == []
    assert Ragged.concat([r, r.take([3])]).to_lists() == seqs + [[5]]
    with pytest.raises(ValueError):
        Ragged(np.array([1, 2], np.int32), np.array([0, 3], np.int64))
    with pytest.raises(ValueError):
        Ragged.from_lists([[2**31]])


def test_pair_data_take_keeps_rows_aligned():
    data = PairData(Ragged.from_lists([[1], [2, 2], [3]]), Ragged.from_lists([[4], [5], [6, 6]]),
                    np.array([0, 1, 0], np.float32), "mem", (1, 0))
    sub = data.take([2, 0])
    assert sub.in0.to_lists() == [[3], [1]] and sub.in1.to_lists() == [[6, 6], [4]]
    assert sub.labels.tolist() == [0, 0] and sub.truncated == (1, 0) and sub.source == "mem"


# --------------------------------------------------------------------------- auxiliary


def aux_config(**overrides):
    return config(**{"enc0_network": "hcnn", "enc0_token_embedding_dim": 3, "enc0_vocab_size": 6,
                     "enc0_vocab_file": "vocab.json", "enc0_pretrained_embedding_file": "glove.txt",
                     **overrides})


def write_aux(tmp_path, glove_lines, vocab=None):
    vocab = vocab or {"<pad>": 0, "the": 1, "cat": 2, "dog": 3, "zebra": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    write(tmp_path / "glove.txt", glove_lines)
    return tmp_path


GLOVE = ["the 0.1 0.2 0.3", "apple 9 9 9", "cat 1 2 3", "dog -1e-1 0 4.5", "the 7 7 7"]


def test_pretrained_rows_follow_vocab_ids_and_coverage_is_logged(tmp_path, caplog):
    aux = write_aux(tmp_path, GLOVE)
    with caplog.at_level(logging.INFO, logger="o2v_jax"):
        enc0, enc1 = read_auxiliary(aux, aux_config())
    assert enc0 is enc1  # enc1_network=enc0: loaded once, shared
    assert enc0.vectors.dtype == np.float32 and enc0.vectors.shape == (6, 3)
    assert enc0.found.tolist() == [False, True, True, True, False, False]
    np.testing.assert_allclose(enc0.vectors[1:4], [[0.1, 0.2, 0.3], [1, 2, 3], [-0.1, 0, 4.5]],
                               rtol=1e-6)  # "the": the first of two rows wins
    assert not enc0.vectors[[0, 4, 5]].any()
    assert "enc0: 3 of 5 vocab tokens found in glove.txt (60.0%)" in caplog.text


def test_word2vec_header_and_tokens_with_spaces(tmp_path):
    aux = write_aux(tmp_path, ["4 3", "the 1 1 1", "at home 2 2 2", "cat  3 3 3 ", "at 5 5 5"],
                    vocab={"the": 1, "at home": 2, "cat": 3})
    enc0, _ = read_auxiliary(aux, aux_config())
    assert enc0.found.tolist() == [False, True, True, True, False, False]
    assert enc0.vectors[2].tolist() == [2, 2, 2] and enc0.vectors[3].tolist() == [3, 3, 3]


def test_separate_encoders_load_their_own_files(tmp_path):
    aux = write_aux(tmp_path, GLOVE)
    enc0, enc1 = read_auxiliary(aux, aux_config(enc1_network="bilstm", enc1_max_seq_len=4,
                                                enc1_vocab_size=9))
    assert enc0 is not None and enc1 is None
    enc0, enc1 = read_auxiliary(aux, aux_config(
        enc1_network="bilstm", enc1_max_seq_len=4, enc1_vocab_size=9,
        enc1_token_embedding_dim=3, enc1_vocab_file="vocab.json",
        enc1_pretrained_embedding_file="glove.txt"))
    assert enc0 is not enc1 and enc1.vectors.shape == (9, 3) and enc1.found.sum() == 3


@pytest.mark.parametrize("glove, message", [
    (["the 0.1 0.2", "cat 1 2 3"], r"glove.txt:1: 2 values after the token, expected "
                                   r"enc0_token_embedding_dim=3"),
    (["apple 1 2 3", "cat 1 2"], r"glove.txt:2: 2 values after the token, expected "
                                 r"enc0_token_embedding_dim=3"),
    (["10 5", "the 1 2 3 4 5"], r"glove.txt:1: header says 5 dimensions"),
    (["the 1 2 3", "cat 1 x 3"], r"glove.txt:2: expected 3 numbers after the token"),
])
def test_pretrained_file_errors_name_file_and_line(tmp_path, glove, message):
    with pytest.raises(DataError, match=message):
        read_auxiliary(write_aux(tmp_path, glove), aux_config())


def test_auxiliary_setup_errors(tmp_path):
    aux = write_aux(tmp_path, GLOVE)
    with pytest.raises(DataError, match=r"auxiliary channel .*: enc0_pretrained_embedding_file="
                                        r"missing.txt not found \(files present: glove.txt, vocab.json\)"):
        read_auxiliary(aux, aux_config(enc0_pretrained_embedding_file="missing.txt"))
    with pytest.raises(DataError, match="needs enc0_vocab_file"):
        read_auxiliary(aux, aux_config(enc0_vocab_file=""))
    with pytest.raises(DataError, match="needs the auxiliary channel"):
        read_auxiliary(None, aux_config())
    write_aux(tmp_path, GLOVE, vocab={"the": 1, "cat": 6})
    with pytest.raises(DataError, match=r'vocab.json: token "cat": id 6 is not in \[0, 6\) '
                                        r"\(enc0_vocab_size=6\)"):
        read_auxiliary(aux, aux_config())
    (tmp_path / "vocab.json").write_text('{"the": "one"}')
    with pytest.raises(DataError, match="vocab.json: expected a JSON object mapping token"):
        read_auxiliary(aux, aux_config())
    (tmp_path / "vocab.json").write_bytes(b'{"the": 1,\n "caf\xe9": 2}')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"vocab.json:2: tokens must be UTF-8; not valid UTF-8: "
                                        r"byte 0xe9 at column 6"):
        read_auxiliary(aux, aux_config())


def test_no_pretrained_files_means_none(tmp_path):
    assert read_auxiliary(None, config()) == (None, None)


# --------------------------------------------------------------------------- negative sampling


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
