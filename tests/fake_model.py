"""A fake model for the serving tests (test_app, test_batcher, test_http, test_supervisor).

FakePredictor has the predictor's surface that the app uses (``vocab_sizes``,
``max_seq_lens``, ``predict``, ``embed``), with values computed from the tokens, so the
server is checked without compiling anything. The request path (app.respond, wire.py)
is the real one. :func:`load_from_dir` loads one in a serving process (a worker).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np

VOCAB, MAX_LEN = 40, 8
HANG = 30.0  # seconds: only a hang takes this long
PAIRS = [{"in0": [1, 2, 3], "in1": [4, 5]}, {"in0": [39], "in1": [7, 8, 9, 10]}]
EMBED = [{"in1": [5, 6]}, {"in1": [12]}, {"in1": [1, 1, 1, 1]}]


def wait_until(condition, what: str, timeout: float = HANG):
    """Poll ``condition()`` until it is true; fail (naming ``what``) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)
    return value


class FakePredictor:
    """Scores [sum(in0) / 100, len(in1)]; embeddings [first id, length, sum].

    ``gate``: an Event each call waits for (to hold requests in flight); ``delay``:
    seconds each call sleeps; ``fail``: each call raises. ``calls``: (records, thread id)
    per ``predict`` or ``embed`` call.
    """

    vocab_sizes, max_seq_lens = (VOCAB, VOCAB), (MAX_LEN, MAX_LEN)

    def __init__(self, gate: threading.Event | None = None, fail: bool = False, delay: float = 0.0):
        self.gate, self.fail, self.delay, self.calls = gate, fail, delay, []

    def _call(self, in0, in1) -> np.ndarray:
        self.calls.append((len(in0 if in0 is not None else in1), threading.get_ident()))
        if self.gate is not None:
            assert self.gate.wait(HANG)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("secret internal detail")
        return expected(in0, in1)

    def predict(self, in0, in1) -> np.ndarray:
        return self._call(in0, in1)

    def embed(self, sequences, encoder: str = "in0") -> np.ndarray:
        return self._call(sequences, None)


def _stats(r):
    starts = r.offsets[:-1]
    first, sums = r.tokens[starts], np.add.reduceat(r.tokens, starts)
    return first.astype(np.float32), r.lengths.astype(np.float32), sums.astype(np.float32)


def expected(in0, in1) -> np.ndarray:
    """FakePredictor's values for Ragged inputs (either may be None)."""
    if in0 is not None and in1 is not None:
        return np.stack([_stats(in0)[2] / 100, _stats(in1)[1]], axis=1)
    return np.stack(_stats(in0 if in0 is not None else in1), axis=1)


def expected_values(records: list[dict]) -> np.ndarray:
    """FakePredictor's values for records given as dicts: float32 (N, K)."""
    rows = []
    for r in records:
        if "in0" in r and "in1" in r:
            rows.append([np.float32(sum(r["in0"])) / np.float32(100), len(r["in1"])])
        else:
            s = r.get("in0", r.get("in1"))
            rows.append([s[0], len(s), sum(s)])
    return np.array(rows, np.float32)


def assert_values(values: list[list[float]], records: list[dict]) -> None:
    """Values read back from JSON equal the float32 values exactly (shortest round-trip decimals)."""
    np.testing.assert_array_equal(np.array(values, np.float32), expected_values(records))


class FileGate:
    """A FakePredictor gate that another process opens: open once ``path`` exists."""

    def __init__(self, path: Path):
        self.path = path

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.path.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


class _GatedPredictor(FakePredictor):
    def _call(self, in0, in1) -> np.ndarray:
        logging.getLogger("o2v_jax").info("invoked")  # the test waits for this line
        return super()._call(in0, in1)


def load_from_dir(settings) -> FakePredictor:
    """A worker's loader (``worker.Spec.load = "fake_model:load_from_dir"``), driven by
    ``settings.model_dir / "fake.json"``: ``{"load_delay": s, "hold": name, "fail":
    message, "gate": bool}``. "hold": loading waits until ``model_dir/name`` exists.
    With a gate each call logs "invoked" and waits until ``model_dir/release`` exists."""
    spec = json.loads((Path(settings.model_dir) / "fake.json").read_text())
    time.sleep(spec.get("load_delay", 0.0))
    if spec.get("hold"):
        assert FileGate(Path(settings.model_dir) / spec["hold"]).wait(HANG)
    if spec.get("fail"):
        raise ValueError(spec["fail"])
    if spec.get("gate"):
        return _GatedPredictor(gate=FileGate(Path(settings.model_dir) / "release"))
    return FakePredictor()
