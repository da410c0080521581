"""MovieLens 100k's file formats: the ratings (GroupLens' tab-separated ``u.data``, recbole's
``ml-100k.inter``) and the movies (``u.item``, ``ml-100k.item``), read from a file, a
directory or a zip archive (``ml-100k.zip``, the recbole wheel).

Every malformed line is reported as ``name:line: field ...: expected ...``
(:class:`MovieLensError`); o2v_jax/movielens.py fetches, splits and writes the channels.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import zipfile
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger("o2v_jax")

# u.genre, in the order of u.item's 19 genre flags.
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")


class MovieLensError(RuntimeError):
    """The data could not be fetched or read; the message says where and what to do."""


@dataclasses.dataclass(frozen=True)
class Ratings:
    """Ratings in file order.

    Attributes:
        user: int64 (N,) user ids, >= 1 (0 is Object2Vec's padding token).
        item: int64 (N,) item ids, >= 1.
        rating: float64 (N,) ratings.
        source: where they were read from, for messages and info.json.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.user)


@dataclasses.dataclass(frozen=True)
class Movie:
    title: str
    genres: tuple[str, ...]


_RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


def parse_ratings(text: str, name: str) -> Ratings:
    """Parse `u.data` (4 whitespace-separated fields, no header) or a recbole `.inter` file.

    A `.inter` file is recognised by its header line (`user_id:token  item_id:token
    rating:float  timestamp:float`, tab-separated, columns found by name). Blank lines are
    skipped. Rows keep their file order, which the ua split depends on.

    Args:
        text: the file's contents.
        name: the file's name for messages (`name:line`).

    Raises:
        MovieLensError: naming name:line, the field and what was expected.
    """
    lines = text.splitlines()
    numbers = np.arange(1, len(lines) + 1)
    keep = [bool(ln.strip()) for ln in lines]
    lines = list(itertools.compress(lines, keep))
    numbers = numbers[np.asarray(keep, dtype=bool)]
    if not lines:
        raise MovieLensError(f"{name}: no ratings in the file")
    first = lines[0].split()[0]
    if first.lstrip("-").isdigit():  # u.data: no header, whitespace-separated
        sep, header_cols, cols = None, None, (0, 1, 2, 3)
        expected = "4 whitespace-separated fields: user_id item_id rating timestamp"
    else:  # recbole atomic file: `name:type` header, tab-separated
        sep = "\t"
        header_cols = [c.split(":")[0].strip() for c in lines[0].split("\t")]
        missing = [c for c in _RATING_COLUMNS[:3] if c not in header_cols]
        if missing:
            raise MovieLensError(
                f"{name}:{numbers[0]}: header {lines[0]!r} lacks column(s) {missing}; expected "
                f"u.data rows (user item rating timestamp) or a recbole .inter header "
                f"'user_id:token\\titem_id:token\\trating:float\\ttimestamp:float'")
        cols = tuple(header_cols.index(c) for c in _RATING_COLUMNS[:3])
        expected = f"{len(header_cols)} tab-separated fields ({', '.join(header_cols)})"
        lines, numbers = lines[1:], numbers[1:]
        if not lines:
            raise MovieLensError(f"{name}: header only, no ratings")
    width = len(header_cols) if header_cols else 4
    rows = [ln.split(sep) for ln in lines]
    widths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    bad = np.flatnonzero(widths != width)
    if bad.size:
        i = bad[0]
        raise MovieLensError(f"{name}:{numbers[i]}: expected {expected}, got {widths[i]} "
                             f"field(s): {lines[i]!r}")
    flat = list(itertools.chain.from_iterable(rows))
    user = _ids(flat[cols[0]::width], "user_id", name, numbers)
    item = _ids(flat[cols[1]::width], "item_id", name, numbers)
    rating = _floats(flat[cols[2]::width], "rating", name, numbers)
    return Ratings(user=user, item=item, rating=rating, source=name)


# Both converters take numpy's C path (str list -> array) and only walk the rows in
# Python to say which line is wrong once that path has failed.


def _ids(column: list[str], field: str, name: str, numbers: np.ndarray) -> np.ndarray:
    try:
        values = np.array(column, dtype=np.int64)
        if values.min() > 0:
            return values
    except (ValueError, OverflowError):
        pass
    for i, text in enumerate(column):
        s = text.strip()
        # Object2Vec reserves token id 0 for padding (masked in every encoder).
        if not (s.isascii() and s.isdigit() and len(s) <= 18 and int(s) > 0):
            raise MovieLensError(f"{name}:{numbers[i]}: field {field}: expected an integer "
                                 f">= 1 (0 is the padding id), got {text!r}")
    raise AssertionError("unreachable: every id parsed")


def _floats(column: list[str], field: str, name: str, numbers: np.ndarray) -> np.ndarray:
    try:
        values = np.array(column, dtype=np.float64)
        if np.isfinite(values).all():
            return values
    except ValueError:
        pass
    for i, text in enumerate(column):
        try:
            if np.isfinite(float(text)):
                continue
        except ValueError:
            pass
        raise MovieLensError(f"{name}:{numbers[i]}: field {field}: expected a finite "
                             f"number, got {text!r}")
    raise AssertionError("unreachable: every value parsed")


def parse_movies(data: bytes, name: str) -> dict[int, Movie]:
    """Parse `u.item` (pipe-separated, latin-1) or recbole's `ml-100k.item` (TSV, UTF-8).

    recbole splits the year off the title; it is put back as " (1995)" so titles read as
    in u.item ("Toy Story (1995)").
    """
    if data.startswith(b"item_id:"):
        lines = data.decode("utf-8").splitlines()
        head = [c.split(":")[0] for c in lines[0].split("\t")]
        try:
            i_id, i_title = head.index("item_id"), head.index("movie_title")
        except ValueError:
            raise MovieLensError(f"{name}:1: expected item_id and movie_title columns, "
                                 f"got {head}") from None
        i_year = head.index("release_year") if "release_year" in head else None
        i_class = head.index("class") if "class" in head else None
        sep, width, start = "\t", len(head), 1
    else:
        i_id = 0
        lines = data.decode("latin-1").splitlines()
        sep, width, start = "|", 5 + len(GENRES), 0
    movies: dict[int, Movie] = {}
    for n, line in enumerate(lines[start:], start=start + 1):  # ~1,700 lines: a loop is fine
        if not line.strip():
            continue
        f = line.split(sep)
        if len(f) != width or not f[i_id].isdigit():
            raise MovieLensError(f"{name}:{n}: expected {width} {sep!r}-separated fields "
                                 f"starting with an item id, got {line!r}")
        if sep == "|":
            title = f[1]
            genres = tuple(g for g, flag in zip(GENRES, f[5:]) if flag == "1")
        else:
            year = f[i_year] if i_year is not None else ""
            title = f"{f[i_title]} ({year})" if year.isdigit() else f[i_title]
            genres = tuple(f[i_class].split()) if i_class is not None else ()
        movies[int(f[i_id])] = Movie(title=title, genres=genres)
    return movies


def load_source(source: Path | str) -> tuple[Ratings, dict[int, Movie] | None]:
    """Read ratings, and titles where there are any, from a local path.

    `source` may be `u.data` or `ml-100k.inter` (titles from `u.item` / `ml-100k.item`
    beside it), a directory holding one of them, or a zip archive (GroupLens'
    `ml-100k.zip`, the recbole wheel) holding one of them.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / n for n in ("u.data", "ml-100k.inter") if (path / n).is_file()]
        if not found:
            raise MovieLensError(f"{path}: no u.data or ml-100k.inter in this directory")
        path = found[0]
    if not path.is_file():
        raise MovieLensError(f"{path}: no such file (expected u.data, ml-100k.inter, a "
                             f"directory holding one, ml-100k.zip or the recbole wheel)")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    ratings = parse_ratings(path.read_text(encoding="latin-1"), str(path))
    # u.data -> u.item, ml-100k.inter -> ml-100k.item; else any u.item beside it.
    for item_path in dict.fromkeys([path.with_suffix(".item"), path.parent / "u.item",
                                    path.parent / "ml-100k.item"]):
        if item_path.is_file():
            return ratings, parse_movies(item_path.read_bytes(), str(item_path))
    log.warning("%s: no u.item or ml-100k.item beside it; writing no movies.tsv", path)
    return ratings, None


def _load_zip(path: Path) -> tuple[Ratings, dict[int, Movie] | None]:
    try:
        return _read_zip(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
            RuntimeError) as e:  # a damaged or truncated archive (bad CRC, broken deflate)
        raise MovieLensError(f"{path}: cannot read this zip archive ({e}); is it damaged "
                             f"or incomplete?") from None


def _read_zip(path: Path) -> tuple[Ratings, dict[int, Movie] | None]:
    with zipfile.ZipFile(path) as zf:
        names = {Path(n).name: n for n in reversed(zf.namelist())}  # first match wins
        for ratings_name, movies_name in (("u.data", "u.item"),
                                          ("ml-100k.inter", "ml-100k.item")):
            if ratings_name in names:
                member = names[ratings_name]
                ratings = parse_ratings(zf.read(member).decode("latin-1"), f"{path}:{member}")
                movies = (parse_movies(zf.read(names[movies_name]),
                                       f"{path}:{names[movies_name]}")
                          if movies_name in names else None)
                return ratings, movies
    raise MovieLensError(f"{path}: the archive holds no u.data or ml-100k.inter")
