"""Progress bars (o2v_jax/progress.py): tqdm.auto, on when someone watches (a terminal or
a notebook kernel), off in logs unless asked for."""

from __future__ import annotations

import io
import sys
import types

from o2v_jax import progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _fake_ipython(monkeypatch, config: dict) -> None:
    shell = types.SimpleNamespace(config=config)
    module = types.ModuleType("IPython")
    module.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", module)


def test_watched_in_a_terminal_or_a_notebook_kernel_only(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    assert progress.watched()
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))  # a log file, a pipe
    assert not progress.watched()
    _fake_ipython(monkeypatch, {"IPKernelApp": {}})  # Jupyter: stderr is no tty
    assert progress.watched()
    _fake_ipython(monkeypatch, {"TerminalInteractiveShell": {}})  # plain IPython
    assert not progress.watched()


def test_enabled_is_the_callers_choice_when_given(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    assert progress.enabled(True) and not progress.enabled(False) and not progress.enabled(None)


def test_bar_is_tqdm_auto_and_writes_only_when_enabled(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    stream = _Stream(tty=False)
    monkeypatch.setattr(sys, "stderr", stream)
    with progress.bar(10, "quiet", unit="rec", progress=None, file=stream) as bar:
        assert isinstance(bar, tqdm)
        bar.update(10)
    assert stream.getvalue() == ""
    with progress.bar(10, "asked", unit="rec", progress=True, file=stream) as bar:
        bar.update(10)
    assert "asked" in stream.getvalue() and "10/10" in stream.getvalue()
