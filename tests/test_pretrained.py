"""The auxiliary channel: vocabulary files and pretrained vectors (o2v_jax/pretrained.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import channel_config as config
from conftest import write_lines as write

from o2v_jax.data import DataError
from o2v_jax.pretrained import read_auxiliary


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
