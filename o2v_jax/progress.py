"""Progress bars: one factory, so every bar renders in a terminal and in a notebook.

Bars come from ``tqdm.auto``: a text bar in a terminal, a widget in a Jupyter notebook
(issue 19). ``enabled=None`` means "when someone is watching": stderr is a terminal, or
the code runs in a notebook kernel, whose stderr is not a terminal but shows widgets.
Logs redirected to a file or a pipe (a SageMaker job, CI) get no bar unless one is asked
for with ``enabled=True``.
"""

from __future__ import annotations

import sys


def watched() -> bool:
    """True when stderr is a terminal or this is a Jupyter (IPython kernel) session."""
    stream = sys.stderr
    if stream is not None and hasattr(stream, "isatty") and stream.isatty():
        return True
    ipython = sys.modules.get("IPython")  # never imported here: only if the user has it
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # an IPython too old or too new to ask: no bar rather than a crash
        return False


def enabled(progress: bool | None) -> bool:
    """``progress`` when given, else :func:`watched`."""
    return watched() if progress is None else bool(progress)


def bar(total: int | None, desc: str, *, unit: str, progress: bool | None, **options):
    """A ``tqdm.auto`` bar (a context manager), disabled unless :func:`enabled`.

    ``options`` go to tqdm (e.g. ``leave=False``, ``unit_scale=True``).
    """
    from tqdm.auto import tqdm  # imported here to keep `import o2v_jax` light

    options.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled(progress), **options)
