"""Synthetic data with the shapes of the spec's example jobs (no downloads).

* :func:`wikipedia` — spec §7.3 (NB-DOC): in0 one sentence, in1 the rest of the article
  cut to 50 tokens, vocab 267,522, token ids Zipf-distributed (s = 1) over the 267,518
  real types with id = frequency rank + 3 (a frequency-sorted vocab, as the notebook's
  builds it; ids 0-3 are <pad>, <unk>, <s>, </s>), all labels 1 (negatives come from
  negative sampling).
* :func:`movielens` — spec §7.1 shapes: 943 users, 1,682 items, 90,570 ``ua.base``
  records, one id per side, ratings 1-5.
* :func:`uniform_lengths` — inference inputs: N id lists with lengths uniform in a range.
"""

from __future__ import annotations

import numpy as np

from o2v_jax.data import PairData
from o2v_jax.ragged import Ragged

WIKI_VOCAB = 267_522
WIKI_SPECIAL = 4  # <pad>=0, <unk>, <s>, </s>


def zipf_ids(rng: np.random.Generator, n: int, vocab: int, first: int = WIKI_SPECIAL,
             s: float = 1.0) -> np.ndarray:
    """int32 (n,) ids in [first, vocab): id = first + rank, P(rank k) proportional to 1/(k+1)^s."""
    k = vocab - first
    cdf = np.cumsum(1.0 / np.arange(1, k + 1) ** s)
    cdf /= cdf[-1]
    return (np.searchsorted(cdf, rng.random(n)) + first).astype(np.int32)


def _ragged(rng: np.random.Generator, lengths: np.ndarray, vocab: int) -> Ragged:
    offsets = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Ragged(zipf_ids(rng, int(offsets[-1]), vocab), offsets)


def wikipedia(n: int, seed: int = 0, vocab: int = WIKI_VOCAB, max_len: int = 50) -> PairData:
    """``n`` positive (sentence, rest-of-article) pairs shaped like spec §7.3's data.

    Sentence lengths: log-normal around 20 tokens, clipped to [1, max_len] (Wikipedia
    sentences average ~20-25 words). Article remainders: 90% are longer than the cut,
    so length max_len; the rest uniform in [5, max_len].
    """
    rng = np.random.default_rng(seed)
    len0 = np.clip(np.round(rng.lognormal(np.log(20.0), 0.5, n)), 1, max_len).astype(np.int64)
    len1 = np.where(rng.random(n) < 0.9, max_len, rng.integers(5, max_len + 1, n)).astype(np.int64)
    return PairData(_ragged(rng, len0, vocab), _ragged(rng, len1, vocab),
                    np.ones(n, np.float32), "synthetic-wikipedia")


def movielens(n: int = 90_570, users: int = 943, items: int = 1682, seed: int = 0) -> PairData:
    """``n`` (user, item, rating) records; ids 1-based as in ml-100k (0 is padding)."""
    rng = np.random.default_rng(seed)
    one = np.arange(n + 1, dtype=np.int64)
    u = rng.integers(1, users + 1, n).astype(np.int32)
    i = np.minimum(rng.zipf(1.3, n), items).astype(np.int32)  # popular items dominate
    ratings = rng.integers(1, 6, n).astype(np.float32)
    return PairData(Ragged(u, one), Ragged(i, one), ratings, "synthetic-movielens")


def uniform_lengths(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` Python lists of ids in [1, vocab) with lengths uniform in [lo, hi]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, n)
    flat = rng.integers(1, vocab, int(lengths.sum())).tolist()
    out, start = [], 0
    for length in lengths.tolist():
        out.append(flat[start:start + length])
        start += length
    return out
