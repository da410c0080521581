"""The auxiliary channel: a vocabulary file and pretrained token vectors (spec §3.4).

``encX_pretrained_embedding_file`` names a GloVe or word2vec text file and
``encX_vocab_file`` a token -> id JSON object in the auxiliary channel; :func:`read_auxiliary`
aligns the file's vectors with token ids. docs/data.md, "Auxiliary channel", has the rules.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import warnings
from pathlib import Path

import msgspec
import numpy as np

from o2v_jax.config import Config
from o2v_jax.data import DataError, utf8_error_at, utf8_problem

log = logging.getLogger("o2v_jax")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Pretrained token vectors for one encoder, aligned to its token ids."""

    vectors: np.ndarray  # float32 (V, D): the file's vector where found, 0 elsewhere
    found: np.ndarray  # bool (V,): rows initialised from the file (others keep the default init)


def read_auxiliary(aux_dir: str | Path | None,
                   config: Config) -> tuple[Pretrained | None, Pretrained | None]:
    """Load each encoder's pretrained embeddings from the auxiliary channel (spec §3.4).

    An encoder gets vectors when ``encX_pretrained_embedding_file`` is set; its
    ``encX_vocab_file`` (token -> id JSON) aligns the file's rows with token ids. Encoders
    naming the same files (e.g. ``enc1_network=enc0``) share one loaded object.

    Raises:
        DataError: missing channel or file, pretrained file without vocab file, vocab id
            outside [0, vocab_size), or a vector whose size is not token_embedding_dim.
    """
    loaded: dict[tuple, Pretrained] = {}
    out: list[Pretrained | None] = []
    for side, enc in enumerate(config.encoders):
        prefix = "enc0" if side == 1 and config.enc1_is_enc0 else f"enc{side}"
        if not enc.pretrained_embedding_file:
            if enc.vocab_file and prefix == f"enc{side}":
                log.info("%s_vocab_file=%s is only used to align %s_pretrained_embedding_file, "
                         "which is not set; ignoring it", prefix, enc.vocab_file, prefix)
            out.append(None)
            continue
        key = (enc.vocab_file, enc.pretrained_embedding_file, enc.vocab_size,
               enc.token_embedding_dim)
        if key not in loaded:
            loaded[key] = _load_pretrained(aux_dir, f"enc{side}", prefix, enc)
        out.append(loaded[key])
    return out[0], out[1]


def _aux_file(aux_dir: str | Path | None, setting: str, file_name: str) -> Path:
    if aux_dir is None:
        raise DataError(f"{setting}={file_name} needs the auxiliary channel, but none was given")
    path = Path(aux_dir) / file_name
    if not path.is_file():
        present = sorted(p.name for p in Path(aux_dir).iterdir()) if Path(aux_dir).is_dir() else []
        raise DataError(f"auxiliary channel {aux_dir}: {setting}={file_name} not found "
                        f"(files present: {', '.join(present) or 'none'})")
    return path


def _load_pretrained(aux_dir, encoder: str, prefix: str, enc) -> Pretrained:
    if not enc.vocab_file:
        raise DataError(f"{prefix}_pretrained_embedding_file={enc.pretrained_embedding_file} "
                        f"needs {prefix}_vocab_file (token -> id JSON) to align its rows with ids")
    vocab_path = _aux_file(aux_dir, f"{prefix}_vocab_file", enc.vocab_file)
    vectors_path = _aux_file(aux_dir, f"{prefix}_pretrained_embedding_file",
                             enc.pretrained_embedding_file)
    vocab = _load_vocab(vocab_path, enc.vocab_size, prefix)
    result, matched = _load_vectors(vectors_path, vocab, enc.vocab_size, enc.token_embedding_dim,
                                    prefix)
    log.info("%s: %s of %s vocab tokens found in %s (%.1f%%)", encoder, f"{matched:,}",
             f"{len(vocab):,}", vectors_path.name, 100.0 * matched / max(len(vocab), 1))
    return result


def _load_vocab(path: Path, vocab_size: int, prefix: str) -> dict[bytes, int]:
    """token -> id JSON as {utf-8 token: id}, every id checked against vocab_size."""
    data = path.read_bytes()
    try:
        vocab = msgspec.json.decode(data, type=dict[str, int])
    except msgspec.MsgspecError as e:
        raise DataError(f"{path}: expected a JSON object mapping token -> integer id "
                        f"({e})") from None
    except UnicodeDecodeError:  # in a key: msgspec does not wrap it
        lines = data.split(b"\n")
        line = data.count(b"\n", 0, utf8_error_at(data))  # from 0
        raise DataError(f"{path}:{line + 1}: tokens must be UTF-8; "
                        f"{utf8_problem(lines[line])}") from None
    # Clamp before converting so that ids beyond int64 still reach the range message.
    ids = np.fromiter((min(max(i, -1), vocab_size) for i in vocab.values()), np.int64,
                      count=len(vocab))
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        token, value = next(itertools.islice(vocab.items(), int(bad[0]), None))
        raise DataError(f'{path}: token "{token}": id {value} is not in [0, {vocab_size}) '
                        f"({prefix}_vocab_size={vocab_size})")
    return {token.encode(): i for token, i in vocab.items()}


def _load_vectors(path: Path, vocab: dict[bytes, int], vocab_size: int, dim: int,
                  prefix: str) -> tuple[Pretrained, int]:
    """Parse a GloVe/word2vec text file, keeping only rows of vocab tokens (first wins)."""
    setting = f"{prefix}_token_embedding_dim={dim}"
    ids, rows, line_nos = [], [], []
    seen: set[bytes] = set()
    # A line is parsed further only if its first word is a vocab token or the first word
    # of one ("new" for "new york": glove.840B has tokens with spaces).
    heads = set(vocab).union(token.split(b" ", 1)[0] for token in vocab if b" " in token)
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line_no == 1:
                fields = line.split()
                if len(fields) == 2 and all(x.isdigit() for x in fields):  # word2vec "count dim"
                    if int(fields[1]) != dim:
                        raise DataError(f"{path}:1: header says {int(fields[1])} dimensions, "
                                        f"expected {setting}")
                    continue
                if len(fields) - 1 != dim:  # fail fast even when no token of line 1 matches
                    raise DataError(f"{path}:1: {len(fields) - 1} values after the token, "
                                    f"expected {setting}")
            space = line.find(b" ")
            if space < 0:  # a bare token (or a blank line): no values to keep
                space = len(line)
            word = line[:space].rstrip()
            if word not in heads:  # most lines: one set probe, no float parsing
                continue
            rest = line[space + 1:]
            if rest.count(b" ") != dim - 1:  # odd spacing or a token containing spaces
                values = rest.split()
                if len(values) < dim:
                    raise DataError(f"{path}:{line_no}: {len(values)} values after the token, "
                                    f"expected {setting}")
                word = b" ".join([word, *values[:-dim]])
                rest = b" ".join(values[-dim:])
            if word not in vocab or word in seen:
                continue
            seen.add(word)
            ids.append(vocab[word])
            rows.append(rest)
            line_nos.append(line_no)
    vectors = np.zeros((vocab_size, dim), np.float32)
    found = np.zeros(vocab_size, bool)
    if rows:
        matrix = _parse_rows(path, rows, line_nos, dim)
        bad = ~np.isfinite(matrix).all(axis=1)
        if bad.any():
            raise DataError(f"{path}:{line_nos[int(np.argmax(bad))]}: expected finite numbers")
        vectors[ids] = matrix
        found[ids] = True
    return Pretrained(vectors, found), len(seen)


def _parse_rows(path: Path, rows: list[bytes], line_nos: list[int], dim: int) -> np.ndarray:
    """float32 (R, dim) from R lines of ``dim`` space-separated numbers, in one C parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy < 2.3 only warns on junk
        try:
            flat = np.fromstring(b" ".join(rows), dtype=np.float32, sep=" ")
        except (ValueError, DeprecationWarning):
            flat = None
        if flat is None or flat.size != len(rows) * dim:
            for row, line_no in zip(rows, line_nos):
                try:
                    ok = np.fromstring(row, dtype=np.float32, sep=" ").size == dim
                except (ValueError, DeprecationWarning):
                    ok = False
                if not ok:
                    raise DataError(f"{path}:{line_no}: expected {dim} numbers after the token")
            raise AssertionError("rows failed to parse together but each parses")
    return flat.reshape(len(rows), dim)

