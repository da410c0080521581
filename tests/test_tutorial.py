"""docs/tutorial.md: every code block runs, in order, in a fresh directory, and does
what the page says it does (issue 19)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(TUTORIAL.read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_shell(code: str, cwd: Path) -> str:
    """Run a shell block with `o2v` meaning this checkout's CLI, on a free port."""
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "o2v"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m o2v_jax.cli "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    code = code.replace("8080", str(free_port()))
    # Its own process group: if the block hangs (a server that never answers /ping), the
    # server it started in the background is stopped with it.
    shell = subprocess.Popen(["bash", "-e", "-c", code], cwd=cwd, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = shell.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
    assert shell.returncode == 0, err
    return out


def test_the_tutorial_blocks_are_python_and_one_shell_session():
    languages = [language for language, _ in blocks()]
    assert set(languages) == {"python", "sh"} and languages.count("sh") == 1
    assert languages[-1] == "sh"  # serving comes last: it needs the saved model


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None,
                    reason="the serving block uses bash and curl")
def test_every_block_runs_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__tutorial__"}
    served = ""
    for i, (language, code) in enumerate(blocks()):
        if language == "python":
            exec(compile(code, f"{TUTORIAL.name} block {i}", "exec"), namespace)
        else:
            served = run_shell(code, tmp_path)

    # What the page says happened, happened.
    printed = capsys.readouterr().out
    assert ('train[4000]: field "in0[1]": Vocab id "250" is not less than vocab_size=201 '
            '(enc0_vocab_size; ids must be in [0, 201), 0 is padding)') in printed
    plotted = importlib.util.find_spec("matplotlib") is not None
    files = ["hyperparameters.json"] + ["learning_curves.png"] * plotted + ["metrics.jsonl", "model.json"]
    assert str(files) in printed
    model = namespace["model"]
    assert [h["epoch"] for h in model.history] == [0, 1, 2, 3]
    assert namespace["metrics"]["accuracy"] > 0.9  # the topics were learned
    assert (tmp_path / "my-model" / "metrics.jsonl").is_file()
    assert (tmp_path / "quick-model" / "model.json").is_file()
    assert not namespace["quick"].model_dir.is_relative_to(tmp_path)
    vectors = np.load(tmp_path / "vectors.npy", mmap_mode="r")
    assert vectors.shape == (1_000_000, 32) and np.isfinite(vectors[-1000:]).all()
    assert (namespace["neighbours"][:, 0] == [0, 1, 2]).all()
    scores = [p["scores"] for p in json.loads(served)["predictions"]]
    assert scores[0][1] > 0.5 > scores[1][1]  # same topic, then different topics
