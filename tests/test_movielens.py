"""MovieLens preparation: ua split, record format, sources, errors, download and cache.

No network: the download tests serve a tiny fake wheel built in tmp_path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.error
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from o2v_jax import fetch
from o2v_jax import movielens as ml
from o2v_jax.cli import main

# user -> number of ratings: more than 10, exactly 11, exactly 10, fewer than 10 (3), ...
COUNTS = {1: 25, 2: 11, 3: 10, 4: 3, 5: 14, 7: 21}


def _ratings(seed: int = 0) -> list[tuple[int, int, float, int]]:
    """Synthetic ratings, users interleaved in a random file order, half-stars included."""
    rng = np.random.default_rng(seed)
    rows = []
    for user, n in COUNTS.items():
        items = rng.choice(np.arange(1, 41), size=n, replace=False)
        for item in items:
            rows.append((user, int(item), float(rng.choice([1, 2, 3, 3.5, 4, 5])),
                         int(rng.integers(8e8, 9e8))))
    return [rows[i] for i in rng.permutation(len(rows))]


def _fmt(r: float) -> str:
    return str(int(r)) if r == int(r) else str(r)


def _write_udata(path: Path, rows) -> Path:
    path.write_text("".join(f"{u}\t{i}\t{_fmt(r)}\t{t}\n" for u, i, r, t in rows))
    return path


def _write_inter(path: Path, rows) -> Path:
    # Columns deliberately out of the usual order: they are found by header name.
    path.write_text("item_id:token\trating:float\tuser_id:token\ttimestamp:float\n" + "".join(
        f"{i}\t{_fmt(r)}\t{u}\t{t}\n" for u, i, r, t in rows))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _allbut(rows, start=1, stop=10):
    """GroupLens allbut.pl, line by line: (test rows, base rows)."""
    seen, test, base = Counter(), [], []
    for row in rows:
        seen[row[0]] += 1
        (test if start <= seen[row[0]] <= stop else base).append(row)
    return test, base


def _key(rows):
    return sorted((u, i, r) for u, i, r, *_ in rows)


def test_ua_split_matches_allbut_and_file_order(tmp_path):
    rows = _ratings()
    src = _write_udata(tmp_path / "u.data", rows)
    files = ml.prepare_movielens(tmp_path / "out", source=src)
    test, base = _allbut(rows)
    got_val = [(d["in0"][0], d["in1"][0], d["label"]) for d in _read_jsonl(files.validation)]
    got_train = [(d["in0"][0], d["in1"][0], d["label"]) for d in _read_jsonl(files.train)]
    assert sorted(got_val) == _key(test)
    assert sorted(got_train) == _key(base)
    # Rows are sorted by (user, item), as mku.sh sorts ua.base / ua.test.
    assert got_val == sorted(got_val) and got_train == sorted(got_train)
    # The split is by file order, not by item id or rating: reversing the file changes it.
    rev = ml.ua_split(np.array([r[0] for r in rows[::-1]]))
    assert not np.array_equal(rev[::-1], ml.ua_split(np.array([r[0] for r in rows])))


def test_ua_split_counts_per_user(tmp_path):
    rows = _ratings(seed=1)
    src = _write_udata(tmp_path / "u.data", rows)
    files = ml.prepare_movielens(tmp_path / "out", source=src)
    val = Counter(d["in0"][0] for d in _read_jsonl(files.validation))
    train = Counter(d["in0"][0] for d in _read_jsonl(files.train))
    for user, n in COUNTS.items():
        assert val[user] == min(n, 10), user
        assert train[user] == n - min(n, 10), user  # users with <= 10 ratings: none in train
    info = json.loads(files.info.read_text())
    assert (info["ratings"], info["train"], info["validation"]) == (
        len(rows), len(rows) - sum(min(n, 10) for n in COUNTS.values()),
        sum(min(n, 10) for n in COUNTS.values()))
    assert info["users_only_in_validation"] == 2  # users 3 (10 ratings) and 4 (3 ratings)
    assert info["users"] == len(COUNTS) and info["enc0_vocab_size"] == max(COUNTS) + 1
    assert info["enc1_vocab_size"] == max(r[1] for r in rows) + 1
    assert (files.n_train, files.n_validation) == (info["train"], info["validation"])


def test_ua_split_vectorised_equals_loop():
    user = np.random.default_rng(3).integers(1, 30, size=2000)
    expected = np.zeros(len(user), dtype=bool)
    seen = Counter()
    for n, u in enumerate(user):
        seen[u] += 1
        expected[n] = seen[u] <= 10
    np.testing.assert_array_equal(ml.ua_split(user), expected)


def test_record_format(tmp_path):
    rows = [(1, 5, 3.0, 1), (1, 6, 4.0, 2), (2, 7, 3.5, 3), (2, 8, 1.0, 4), (3, 9, 5.0, 5)]
    src = _write_udata(tmp_path / "u.data", rows)
    files = ml.prepare_movielens(tmp_path / "out", source=src)
    reg = _read_jsonl(files.validation)
    binary = _read_jsonl(files.validation_binary)
    assert reg[0] == {"label": 3.0, "in0": [1], "in1": [5]}
    assert files.validation.read_text().splitlines()[0] == '{"label": 3.0, "in0": [1], "in1": [5]}'
    assert all(isinstance(d["label"], float) for d in reg)
    assert all(type(d["label"]) is int for d in binary)
    # Threshold is rating > 3: 3.0 -> 0, 3.5 -> 1, 4.0 -> 1, 1.0 -> 0, 5.0 -> 1.
    assert [d["label"] for d in reg] == [3.0, 4.0, 3.5, 1.0, 5.0]
    assert [d["label"] for d in binary] == [0, 1, 1, 0, 1]
    assert [(d["in0"], d["in1"]) for d in reg] == [(d["in0"], d["in1"]) for d in binary]
    assert files.train.read_text() == "" and files.n_train == 0


def test_inter_header_gives_same_files_as_udata(tmp_path):
    rows = _ratings(seed=2)
    a = ml.prepare_movielens(tmp_path / "a", source=_write_udata(tmp_path / "u.data", rows))
    inter = _write_inter(tmp_path / "ml-100k.inter", rows)
    b = ml.prepare_movielens(tmp_path / "b", source=inter)
    for name in ("train", "validation", "train_binary", "validation_binary"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes(), name
    assert a.train.read_text()  # not trivially equal


def test_titles_from_uitem_and_recbole_item(tmp_path):
    rows = [(1, 1, 4.0, 1), (1, 2, 2.0, 2)]
    flags = ["0"] * 19
    flags[1] = flags[15] = "1"  # Action, Sci-Fi
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "u.item").write_bytes(
        ("1|Misérables, Les (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n"
         "2|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 19) + "\n"
         ).encode("latin-1"))
    src = _write_udata(tmp_path / "u" / "u.data", rows)
    files = ml.prepare_movielens(tmp_path / "o1", source=src)
    assert files.movies.read_text(encoding="utf-8").splitlines() == [
        "item_id\ttitle\tgenres",
        "1\tMisérables, Les (1995)\tAction|Sci-Fi",
        "2\tToy Story (1995)\t"]

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tTerminator, The\t1984\tAction Sci-Fi Thriller\n2\tunkonwn\tunkonwn\tunknown\n",
        encoding="utf-8")
    src = _write_inter(tmp_path / "r" / "ml-100k.inter", rows)
    files = ml.prepare_movielens(tmp_path / "o2", source=src)
    assert files.movies.read_text().splitlines()[1:] == [
        "1\tTerminator, The (1984)\tAction|Sci-Fi|Thriller", "2\tunkonwn\tunknown"]


def test_no_titles_writes_no_movies(tmp_path):
    src = _write_udata(tmp_path / "u.data", _ratings())
    files = ml.prepare_movielens(tmp_path / "out", source=src)
    assert files.movies is None and not (tmp_path / "out" / "movies.tsv").exists()
    assert json.loads(files.info.read_text())["files"]["movies"] is None


def test_zip_and_directory_sources_match_file(tmp_path):
    rows = _ratings(seed=4)
    direct = ml.prepare_movielens(tmp_path / "a", source=_write_udata(tmp_path / "u.data", rows))
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as zf:
        zf.write(tmp_path / "u.data", "ml-100k/u.data")
    zipped = ml.prepare_movielens(tmp_path / "b", source=tmp_path / "ml-100k.zip")
    folder = ml.prepare_movielens(tmp_path / "c", source=tmp_path)
    assert direct.train.read_bytes() == zipped.train.read_bytes() == folder.train.read_bytes()
    assert "ml-100k/u.data" in zipped.source


def test_a_damaged_zip_source_is_a_clear_error(tmp_path):
    _write_udata(tmp_path / "u.data", _ratings(seed=5))
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(tmp_path / "u.data", "ml-100k/u.data")
    body = bytearray((tmp_path / "ml-100k.zip").read_bytes())
    body[len(body) // 3] ^= 0xFF  # inside the compressed data: bad CRC or a broken stream
    (tmp_path / "ml-100k.zip").write_bytes(bytes(body))
    with pytest.raises(ml.MovieLensError, match=r"ml-100k.zip: cannot read this zip archive "
                                                r"\(.*\); is it damaged or incomplete\?"):
        ml.prepare_movielens(tmp_path / "out", source=tmp_path / "ml-100k.zip")


@pytest.mark.parametrize("text, line, words", [
    ("1\t2\t3\t4\n\n1\t3\t4\n", 3, ["expected 4", "got 3 field"]),
    ("1\t2\t3\t4\n2\tx\t4\t5\n", 2, ["item_id", "integer >= 1", "'x'"]),
    ("1\t2\t3\t4\n0\t2\t4\t5\n", 2, ["user_id", "padding", "'0'"]),
    ("1\t2\t3\t4\n1\t3\t4\t5\n2\t2\tgood\t5\n", 3, ["rating", "finite number", "'good'"]),
    ("1\t2\t3\t4\n1\t3\tnan\t5\n", 2, ["rating", "'nan'"]),
    ("user_id:token\titem_id:token\trating:float\n1\t2\t3\n4\t5\n", 3, ["expected 3 tab"]),
    ("uid:token\titem_id:token\trating:float\n1\t2\t3\n", 1, ["lacks", "user_id"]),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "bad.data"
    path.write_text(text)
    with pytest.raises(ml.MovieLensError) as e:
        ml.prepare_movielens(tmp_path / "out", source=path)
    assert f"{path}:{line}:" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_malformed_item_file_names_line(tmp_path):
    _write_udata(tmp_path / "u.data", [(1, 1, 4.0, 1)])
    (tmp_path / "u.item").write_text("1|A (1990)|||x|" + "|".join(["0"] * 19) + "\n2|B\n")
    with pytest.raises(ml.MovieLensError, match=r"u\.item:2: expected 24 '\|'-separated"):
        ml.prepare_movielens(tmp_path / "out", source=tmp_path / "u.data")


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(ml.MovieLensError, match="no such file"):
        ml.prepare_movielens(tmp_path / "out", source=tmp_path / "nope.data")


# --------------------------------------------------------------------------- download


INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         + "".join(f"{u}\t{i}\t{1 + (u * i) % 5}\t{u * 100 + i}\n"
                   for u in (196, 186, 22) for i in range(1, 13)))
ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\tMovie {i}\t1990\tDrama\n" for i in range(1, 13)))
MEMBERS = ("fake/dataset_example/ml-100k/ml-100k.inter",
           "fake/dataset_example/ml-100k/ml-100k.item")


@pytest.fixture
def fake_wheel(tmp_path):
    """A tiny wheel holding the two data files plus one that must not be extracted."""
    path = tmp_path / "served" / "fake-1.0-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MEMBERS[0], INTER)
        zf.writestr(MEMBERS[1], ITEM)
        zf.writestr("fake/dataset_example/ml-100k/ml-100k.kg", "big\n")
    data = path.read_bytes()
    pin = fetch.WheelPin(project="fake", version="1.0", filename=path.name, size=len(data),
                      sha256=hashlib.sha256(data).hexdigest(), members=MEMBERS)
    return path, pin


class FakePyPI:
    """Stands in for the three network functions and records what was asked."""

    def __init__(self, wheel: Path, *, api_down=False, fetch_error=None, pip_ok=True):
        self.wheel, self.api_down, self.pip_ok = wheel, api_down, pip_ok
        self.fetch_error = fetch_error
        self.calls = []

    def fetch_json(self, url):
        self.calls.append(("json", url))
        if self.api_down:
            raise urllib.error.URLError("Name or service not known")
        return {"urls": [{"filename": "fake-1.0.tar.gz", "url": "https://files.example/sdist"},
                         {"filename": self.wheel.name, "url": "https://files.example/w.whl"}]}

    def fetch(self, url, dest, *, size, progress):
        self.calls.append(("fetch", url))
        if self.fetch_error:
            Path(dest).write_bytes(b"partial")
            raise self.fetch_error
        Path(dest).write_bytes(self.wheel.read_bytes())

    def pip(self, pin, dest, *, progress):
        self.calls.append(("pip", pin.requirement))
        if not self.pip_ok:
            raise fetch.FetchError(f"`pip download {pin.requirement}` failed: no network")
        Path(dest).write_bytes(self.wheel.read_bytes())
        return f"pip download {pin.requirement}"

    def install(self, monkeypatch):
        monkeypatch.setattr(fetch, "_fetch_json", self.fetch_json)
        monkeypatch.setattr(fetch, "_fetch", self.fetch)
        monkeypatch.setattr(fetch, "_pip_download", self.pip)
        return self


def test_download_rejects_wrong_hash_then_extracts_and_caches(tmp_path, fake_wheel, monkeypatch):
    wheel, pin = fake_wheel
    pypi = FakePyPI(wheel).install(monkeypatch)
    cache = tmp_path / "cache"
    bad = dataclasses.replace(pin, sha256="0" * 64)
    with pytest.raises(ml.MovieLensError) as e:
        ml.cached_files(cache, pin=bad, progress=False)
    msg = str(e.value)
    assert "0" * 64 in msg and pin.sha256 in msg and f"{pin.size:,} bytes" in msg
    assert "https://files.example/w.whl" in msg and "--from" in msg
    assert not any(p.is_file() for p in cache.rglob("*")), "partial download left behind"

    paths = ml.cached_files(cache, pin=pin, progress=False)
    assert [p.name for p in paths] == ["ml-100k.inter", "ml-100k.item"]
    assert all(p.parent == cache / "movielens-100k" for p in paths)
    assert paths[0].read_text() == INTER and paths[1].read_text() == ITEM
    assert sorted(p.name for p in (cache / "movielens-100k").iterdir()) == [
        "ml-100k.inter", "ml-100k.item"]  # only the two members; the wheel is gone
    assert ("fetch", "https://files.example/w.whl") in pypi.calls

    # Second run: offline, from the cache.
    offline = FakePyPI(wheel, api_down=True, fetch_error=OSError("offline"), pip_ok=False)
    offline.install(monkeypatch)
    assert ml.cached_files(cache, pin=pin, progress=False) == paths
    assert offline.calls == []


def test_wrong_size_is_rejected(tmp_path, fake_wheel, monkeypatch):
    wheel, pin = fake_wheel
    FakePyPI(wheel).install(monkeypatch)
    bad = dataclasses.replace(pin, size=pin.size + 1)
    with pytest.raises(ml.MovieLensError, match=f"expected .* of {pin.size + 1:,} bytes"):
        ml.cached_files(tmp_path / "cache", pin=bad, progress=False)


def test_prepare_from_download_end_to_end(tmp_path, fake_wheel, monkeypatch):
    wheel, pin = fake_wheel
    FakePyPI(wheel).install(monkeypatch)
    monkeypatch.setattr(ml, "RECBOLE", pin)
    monkeypatch.setenv("O2V_CACHE_DIR", str(tmp_path / "envcache"))
    files = ml.prepare_movielens(tmp_path / "out", progress=False)
    assert (tmp_path / "envcache" / "movielens-100k" / "ml-100k.inter").is_file()
    assert (files.n_ratings, files.n_train, files.n_validation) == (36, 6, 30)
    # 1 + (22 * 1) % 5 = 3; each user's file order is items 1..12, so 11 and 12 are train.
    assert _read_jsonl(files.validation)[0] == {"label": 3.0, "in0": [22], "in1": [1]}
    assert [d["in1"][0] for d in _read_jsonl(files.train)] == [11, 12] * 3
    assert files.movies.read_text().splitlines()[1] == "1\tMovie 1 (1990)\tDrama"
    assert (files.enc0_vocab_size, files.enc1_vocab_size) == (197, 13)


def test_api_down_falls_back_to_pip(tmp_path, fake_wheel, monkeypatch):
    wheel, pin = fake_wheel
    pypi = FakePyPI(wheel, api_down=True).install(monkeypatch)
    paths = ml.cached_files(tmp_path / "cache", pin=pin, progress=False)
    assert paths[0].read_text() == INTER
    assert [c[0] for c in pypi.calls] == ["json", "json", "pip"]
    assert pypi.calls[0][1] == "https://pypi.org/pypi/fake/1.0/json"


def test_api_and_pip_down_is_a_clear_error(tmp_path, fake_wheel, monkeypatch):
    wheel, pin = fake_wheel
    FakePyPI(wheel, api_down=True, pip_ok=False).install(monkeypatch)
    with pytest.raises(ml.MovieLensError) as e:
        ml.cached_files(tmp_path / "cache", pin=pin, progress=False)
    msg = str(e.value)
    assert "https://pypi.org/pypi/fake/1.0/json" in msg and "Name or service not known" in msg
    assert "pip download fake==1.0" in msg and "--from PATH" in msg


def test_failed_download_names_url_reason_and_from(tmp_path, fake_wheel, monkeypatch):
    wheel, pin = fake_wheel
    FakePyPI(wheel, fetch_error=urllib.error.URLError("timed out")).install(monkeypatch)
    with pytest.raises(ml.MovieLensError) as e:
        ml.cached_files(tmp_path / "cache", pin=pin, progress=False)
    msg = str(e.value)
    assert "https://files.example/w.whl" in msg and "timed out" in msg and "--from" in msg
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_recbole_pin_is_the_documented_one():
    assert ml.RECBOLE.size == 2_130_151
    assert ml.RECBOLE.sha256 == "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
    assert ml.RECBOLE.members == ("recbole/dataset_example/ml-100k/ml-100k.inter",
                                  "recbole/dataset_example/ml-100k/ml-100k.item")


# --------------------------------------------------------------------------- CLI


def test_cli_writes_and_summarises(tmp_path, capsys):
    src = _write_udata(tmp_path / "u.data", _ratings())
    assert main(["data", "movielens", "--out", str(tmp_path / "out"), "--from", str(src),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    n_val = sum(min(n, 10) for n in COUNTS.values())
    assert f"validation {n_val:,}" in out and "enc0_vocab_size=8" in out
    assert (tmp_path / "out" / "train.jsonl").is_file()


def test_cli_error_exit_code(tmp_path, capsys):
    (tmp_path / "u.data").write_text("1\t2\n")
    assert main(["data", "movielens", "--out", str(tmp_path / "out"), "--from",
                 str(tmp_path / "u.data")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("o2v data movielens: error: ") and f"{tmp_path / 'u.data'}:1:" in err
