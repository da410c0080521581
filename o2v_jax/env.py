"""Every environment variable o2v-jax reads, and the cache root: one documented contract.

Library code reads the environment only through these functions (conventions item 2);
each takes the environment as an argument (None: ``os.environ``) so tests pass a dict.

=====================================  =================================================
variable                               meaning
=====================================  =================================================
``INFERENCE_PREFERRED_MODE``           ``embedding`` or ``classification``: where an
                                       inference model's head runs (spec §5.6)
``SAGEMAKER_BIND_TO_PORT``             ``o2v serve --sagemaker``: the port
``SAGEMAKER_MAX_CONCURRENT_TRANSFORMS``  concurrent inferences (0: ours)
``SAGEMAKER_MAX_PAYLOAD_IN_MB``        request body cap (0: the 100 MB ceiling)
``SAGEMAKER_BATCH_STRATEGY``           ``MULTI_RECORD`` / ``SINGLE_RECORD`` (or the API's
                                       ``MultiRecord`` / ``SingleRecord``)
``SAGEMAKER_BATCH``                    inside a batch transform job (logged only)
``SAGEMAKER_MODEL_SERVER_WORKERS``     worker processes (0: one per CPU)
``O2V_CACHE_DIR``                      the o2v-jax cache root (downloads, native kernel);
                                       else ``$XDG_CACHE_HOME/o2v-jax``, else
                                       ``~/.cache/o2v-jax``
``O2V_NATIVE``                         ``0`` turns the native row write-back off
``CXX``                                the C++ compiler that builds it
``JAX_COORDINATOR_PORT``               JAX's: the coordinator port of a Slurm / Open MPI
                                       job that o2v train detects (docs/distributed.md)
=====================================  =================================================

docs/serving.md and docs/training.md describe each where it matters.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

PREFERRED_MODE = "INFERENCE_PREFERRED_MODE"
# spec §5.6; "classification" (the default) keeps every parameter on the accelerator.
PREFERRED_MODES = ("classification", "embedding")
DEFAULT_PREFERRED_MODE = "classification"
CACHE_DIR = "O2V_CACHE_DIR"
NATIVE = "O2V_NATIVE"
CXX = "CXX"
# SageMaker's ceiling for MaxPayloadInMB (and so for request bodies and transform batches).
MAX_PAYLOAD_MB = 100
# SageMaker batch strategies as the container variable spells them; the API's
# MultiRecord / SingleRecord are read as the same (batch_strategy()).
BATCH_STRATEGIES = ("MULTI_RECORD", "SINGLE_RECORD")


def _get(environ: Mapping[str, str] | None, name: str) -> str | None:
    value = (os.environ if environ is None else environ).get(name, "").strip()
    return value or None


def preferred_mode(environ: Mapping[str, str] | None = None) -> str | None:
    """``INFERENCE_PREFERRED_MODE``, lower-cased, or None when unset or empty.

    Raises:
        ValueError: set to anything but ``embedding`` or ``classification``.
    """
    mode = _get(environ, PREFERRED_MODE)
    if mode is not None and mode.lower() not in PREFERRED_MODES:
        raise ValueError(f"{PREFERRED_MODE}={mode!r} is invalid; expected one of "
                         f"{', '.join(PREFERRED_MODES)} (spec §5.6)")
    return mode and mode.lower()


def resolve_preferred_mode(mode: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The preferred mode to use: ``mode``, else ``INFERENCE_PREFERRED_MODE``, else the default.

    Raises:
        ValueError: the value is not ``embedding`` or ``classification``.
    """
    if mode is None:
        return preferred_mode(environ) or DEFAULT_PREFERRED_MODE
    if not isinstance(mode, str) or mode.strip().lower() not in PREFERRED_MODES:
        raise ValueError(f"preferred_mode={mode!r} is invalid; expected one of "
                         f"{', '.join(PREFERRED_MODES)} (spec §5.6)")
    return mode.strip().lower()


def batch_strategy(text: str) -> str | None:
    """``MULTI_RECORD`` or ``SINGLE_RECORD`` for any of SageMaker's spellings, else None."""
    key = text.strip().upper().replace("_", "")
    return {s.replace("_", ""): s for s in BATCH_STRATEGIES}.get(key)


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The o2v-jax cache root: $O2V_CACHE_DIR, else $XDG_CACHE_HOME/o2v-jax, else
    ~/.cache/o2v-jax."""
    root = _get(environ, CACHE_DIR)
    if root is not None:
        return Path(root).expanduser()
    xdg = _get(environ, "XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "o2v-jax"


def native_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``O2V_NATIVE=0`` asks for XLA's scatter instead of the native kernel."""
    return _get(environ, NATIVE) == "0"


def coordinator_port(environ: Mapping[str, str] | None = None) -> str | None:
    """``$JAX_COORDINATOR_PORT`` (JAX's own variable, honoured as JAX does when a Slurm or
    Open MPI job is detected), or None."""
    return _get(environ, "JAX_COORDINATOR_PORT")


def compiler(environ: Mapping[str, str] | None = None) -> str | None:
    """``$CXX`` when set (None otherwise: the caller looks for c++, g++, clang++)."""
    return _get(environ, CXX)


@dataclasses.dataclass(frozen=True)
class ServingEnv:
    """What the environment asks of ``o2v serve``; None where a variable is unset or empty."""

    port: int | None = None  # SAGEMAKER_BIND_TO_PORT (inference pipelines)
    threads: int | None = None  # SAGEMAKER_MAX_CONCURRENT_TRANSFORMS (0: ours)
    max_body_mb: int | None = None  # SAGEMAKER_MAX_PAYLOAD_IN_MB (0, "any size": the ceiling)
    batch_strategy: str | None = None  # SAGEMAKER_BATCH_STRATEGY
    batch: bool = False  # SAGEMAKER_BATCH
    preferred_mode: str | None = None  # INFERENCE_PREFERRED_MODE
    workers: int | None = None  # SAGEMAKER_MODEL_SERVER_WORKERS (0: one per CPU)


def serving(environ: Mapping[str, str] | None = None) -> ServingEnv:
    """The serving variables (SageMaker's container contract, spec §5.8).

    Raises:
        ValueError: a variable that is set but malformed; the message names it.
    """

    def integer(name: str) -> int | None:
        value = _get(environ, name)
        if value is None:
            return None
        if not re.fullmatch(r"[0-9]{1,9}", value):
            raise ValueError(f"{name}={value!r}: expected a non-negative integer")
        return int(value)

    threads = integer("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS")
    payload = integer("SAGEMAKER_MAX_PAYLOAD_IN_MB")
    strategy = _get(environ, "SAGEMAKER_BATCH_STRATEGY")
    if strategy is not None:
        normal = batch_strategy(strategy)
        if normal is None:
            raise ValueError(f"SAGEMAKER_BATCH_STRATEGY={strategy!r}: expected MULTI_RECORD or SINGLE_RECORD")
        strategy = normal
    batch = (_get(environ, "SAGEMAKER_BATCH") or "false").lower()
    if batch not in ("true", "false", "1", "0"):
        raise ValueError(f"SAGEMAKER_BATCH={batch!r}: expected true or false")
    return ServingEnv(
        port=integer("SAGEMAKER_BIND_TO_PORT"),
        threads=threads or None,
        max_body_mb=MAX_PAYLOAD_MB if payload == 0 else payload,
        batch_strategy=strategy,
        batch=batch in ("true", "1"),
        preferred_mode=preferred_mode(environ),
        workers=integer("SAGEMAKER_MODEL_SERVER_WORKERS") or None,
    )
