"""Token sequences: the one lists -> ids path, range checks, truncation, unpad (o2v_jax/ragged.py)."""

from __future__ import annotations

import numpy as np
import pytest

from o2v_jax.ragged import (Ragged, TokenRangeError, TokenTypeError, check_tokens, count_input, flatten,
                            from_input, offsets, positions, slice_input, unpad)


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


def test_slice_shares_memory_and_matches_take():
    r = Ragged.from_lists([[3, 1], [], [7, 8, 9], [5]])
    s = r.slice(1, 3)
    assert s.to_lists() == r.take([1, 2]).to_lists() == [[], [7, 8, 9]]
    assert np.shares_memory(s.tokens, r.tokens)
    assert r.slice(4, 4).to_lists() == []


def test_offsets_and_positions():
    offs = offsets(np.array([2, 0, 3], np.int64))
    assert offs.tolist() == [0, 2, 2, 5]
    assert positions(offs).tolist() == [0, 1, 0, 1, 2]
    assert positions(offsets(np.zeros(0, np.int64))).tolist() == []


def test_flatten_lists_of_ints():
    tokens, lengths = flatten([[3, 1], [], [np.int64(7)]])
    assert tokens.dtype == np.int64 and tokens.tolist() == [3, 1, 7]
    assert lengths.tolist() == [2, 0, 1]
    tokens, lengths = flatten([])
    assert tokens.size == 0 and lengths.size == 0


def test_flatten_clamps_ids_beyond_int64_so_a_range_check_finds_them():
    seqs = [[1, 2], [3, 2**70], [-(2**80)]]
    tokens, lengths = flatten(seqs)
    assert tokens.tolist() == [1, 2, 3, np.iinfo(np.int64).max, np.iinfo(np.int64).min]
    with pytest.raises(TokenRangeError) as e:
        check_tokens(tokens, lengths, 10, 8)
    assert (e.value.row, e.value.position) == (1, 1)
    assert seqs[e.value.row][e.value.position] == 2**70  # the caller reads the real value back


@pytest.mark.parametrize("seqs, row, position, value", [
    ([[1], [2, "x"]], 1, 1, "x"),
    ([[1, [2]]], 0, 1, [2]),
    ([[1], [None]], 1, 0, None),
    ([[1], 5], 1, None, 5),  # a row that is not a sequence
])
def test_flatten_names_the_first_non_integer(seqs, row, position, value):
    with pytest.raises(TokenTypeError) as e:
        flatten(seqs)
    assert (e.value.row, e.value.position, e.value.value) == (row, position, value)


def test_check_tokens_range_and_truncation():
    tokens = np.array([1, 2, 3, 4, 5, 6], np.int64)
    lengths = np.array([4, 0, 2], np.int64)
    r, cut = check_tokens(tokens, lengths, vocab=7, max_len=3)
    assert r.to_lists() == [[1, 2, 3], [], [5, 6]] and cut == 1
    assert r.tokens.dtype == np.int32
    r, cut = check_tokens(tokens, lengths, vocab=7, max_len=4)
    assert r.to_lists() == [[1, 2, 3, 4], [], [5, 6]] and cut == 0
    for bad, where in ((7, (2, 1)), (-1, (0, 0))):
        t = tokens.copy()
        t[5 if where == (2, 1) else 0] = bad
        with pytest.raises(TokenRangeError) as e:
            check_tokens(t, lengths, vocab=7, max_len=3)
        assert (e.value.row, e.value.position, e.value.value, e.value.vocab) == (*where, bad, 7)


def test_unpad_right_padded_rows_and_explicit_lengths():
    arr = np.array([[5, 0, 6, 0], [0, 0, 0, 0], [1, 2, 3, 4]], np.int16)
    tokens, lengths = unpad(arr)
    assert tokens.tolist() == [5, 0, 6, 1, 2, 3, 4] and lengths.tolist() == [3, 0, 4]
    tokens, lengths = unpad(arr, [1, 4, 0])
    assert tokens.tolist() == [5, 0, 0, 0, 0] and lengths.tolist() == [1, 4, 0]
    with pytest.raises(ValueError, match="lengths must be 3 integers in"):
        unpad(arr, [1, 5, 0])
    with pytest.raises(TypeError, match="2-D integer"):
        unpad(arr.astype(np.float32))


def test_content_hash_equal_sequences_equal_and_one_token_apart_differ():
    r = Ragged.from_lists([[1, 2, 3], [1, 2, 3], [1, 2, 4], [], [], [9], [3, 2, 1]])
    h = r.content_hash
    assert h[0] == h[1] and h[3] == h[4]
    assert len({h[0], h[2], h[3], h[5], h[6]}) == 5


def test_from_input_takes_lists_a_ragged_or_an_array_alike():
    seqs = [[3, 1, 4], [1], [5, 9, 2, 6, 5]]
    arr = np.zeros((3, 6), np.int64)
    for i, s in enumerate(seqs):
        arr[i, :len(s)] = s
    kw = dict(vocab=10, max_len=4, name="in1", vocab_name="enc1_vocab_size")
    for x, lengths in ((seqs, None), (Ragged.from_lists(seqs), None), (arr, None), (arr, [3, 1, 5])):
        r, cut = from_input(x, lengths, **kw)
        assert r.to_lists() == [[3, 1, 4], [1], [5, 9, 2, 6]] and cut == 1
        assert count_input(x, "in1") == 3
        part, part_lengths = slice_input(x, lengths, 1, 3)
        assert from_input(part, part_lengths, **kw)[0].to_lists() == [[1], [5, 9, 2, 6]]
    # Messages name the argument, the caller's row (first_row), the position and the limit.
    with pytest.raises(ValueError, match=r"^in1 sequence 8, position 2: token id 10 is out of range; "
                                         r"expected an integer in \[0, 9\] \(enc1_vocab_size=10\)$"):
        from_input([[1], [2, 3, 10]], None, first_row=7, **kw)
    with pytest.raises(TypeError, match=r"in1\[1\]: expected a list of token ids, got int"):
        from_input([[1], 2], None, **kw)
    with pytest.raises(TypeError, match="lengths= is only for 2-D arrays"):
        from_input(seqs, [1, 1, 1], **kw)
    with pytest.raises(TypeError, match="in1: expected a list of token-id lists"):
        count_input("abc", "in1")
