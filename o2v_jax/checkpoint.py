"""Model directories and training checkpoints. The only module that imports orbax.

A model directory holds::

    model.json            manifest: format, resolved hyperparameters, metadata, and the
                          name of the parameter directory below (written last, atomically)
    hyperparameters.json  the resolved hyperparameters, for people and tools
    params-<id>/          the parameters (an orbax checkpoint of a nested dict of arrays)
    training/             only while training: the state `--resume` continues from

Saving is atomic: parameters go to a fresh ``params-<id>`` directory, and only once they
are complete on disk is ``model.json`` replaced (``os.replace``) to point at them. A crash
at any moment leaves either the previous complete model or the new complete model; stale
parameter directories are removed by the next save. Training state uses the same scheme
under ``training/``.

The manifest also records a CRC-32 of every saved array; loading checks them, so a
damaged file is an error rather than silently different weights (orbax stores raw
chunks without a checksum: a flipped bit in an embedding table loads without
complaint). Manifests without checksums (written before they existed) load unchecked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from o2v_jax.config import Config, HyperparameterError, from_hyperparameters

FORMAT = "o2v-jax-model/1"
MANIFEST = "model.json"
STATE_MANIFEST = "state.json"

log = logging.getLogger("o2v_jax")


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or from another format."""


def _checkpointer():
    # Imported lazily: orbax pulls in a lot and only save/load paths need it.
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)
    return ocp.StandardCheckpointer()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tree(directory: Path, tree: Any) -> None:
    with _checkpointer() as ckpt:  # closed after use: no background threads left behind
        ckpt.save(directory.absolute(), tree)
        ckpt.wait_until_finished()


def _restore_tree(directory: Path, target: Any = None) -> Any:
    with _checkpointer() as ckpt:
        try:
            if target is None:
                return ckpt.restore(directory.absolute())
            return ckpt.restore(directory.absolute(), target)
        except Exception as e:  # orbax and tensorstore raise ValueError, JSON errors, Exception
            text = str(e).strip()
            first = text.splitlines()[0][:300] if text else ""
            raise ModelDirError(f"{directory}: cannot read the saved arrays ({type(e).__name__}: "
                                f"{first}); the directory is damaged or incomplete: restore it "
                                f"from a copy or train again") from e


def checksums(tree: Any) -> dict[str, str]:
    """``{"mlp/0/bias": "crc32:<8 hex digits>", ...}`` over each array's bytes (C order).

    Names join the path's keys with "/", so a list index and the string key orbax
    restores it as ("0") name the same array.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in path)
        data = np.ascontiguousarray(np.asarray(leaf))
        out[name] = f"crc32:{zlib.crc32(data.view(np.uint8).reshape(-1)):08x}"
    return out


def _verify(path: Path, manifest: dict[str, Any], tree: Any) -> None:
    """Compare a restored tree with the checksums its manifest recorded (if it has any)."""
    saved = manifest.get("checksums")
    if not isinstance(saved, dict):
        return
    got = checksums(tree)
    for name, value in saved.items():
        if got.get(name) != value:
            raise ModelDirError(
                f"{path}: array {name} does not match the checksum saved with it "
                f"({got.get(name, 'missing')} != {value}); the parameter files are damaged: "
                f"restore them from a copy or train again")


def _commit(root: Path, manifest_name: str, prefix: str, tree: Any, manifest: dict[str, Any]) -> None:
    """Write `tree` to a new `<prefix>-<id>` dir, then atomically point the manifest at it."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    _save_tree(root / name, tree)
    _write_json_atomic(root / manifest_name,
                       {**manifest, "params_dir": name, "checksums": checksums(tree)})
    for stale in root.glob(f"{prefix}-*"):
        if stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)


def _host(tree: Any) -> Any:
    """Device arrays -> numpy, so saving never holds on to donated buffers."""
    return jax.tree.map(np.asarray, tree)


def save_model(model_dir: str | Path, *, hyperparameters: dict[str, str], params: Any,
               metadata: dict[str, Any]) -> Path:
    """Save a trained model atomically.

    Args:
      model_dir: target directory (created if needed; may already hold a model).
      hyperparameters: the resolved SageMaker map (``Config.to_hyperparameters()``).
      params: nested dict of arrays (the model's parameters).
      metadata: JSON-serialisable facts inference needs or people want (metrics, epochs).
    """
    root = Path(model_dir)
    manifest = {"format": FORMAT, "hyperparameters": hyperparameters, "metadata": metadata}
    _commit(root, MANIFEST, "params", _host(params), manifest)
    _write_json_atomic(root / "hyperparameters.json", hyperparameters)
    return root


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    root = Path(model_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise ModelDirError(f"{root}: model directory not found")
    if not path.is_file():
        raise ModelDirError(f"{root}: no {MANIFEST}; not an o2v-jax model directory "
                            f"(or training never finished an epoch)")
    try:
        manifest = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ModelDirError(f"{path}: not UTF-8 JSON ({e.reason} at byte {e.start})") from None
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found != FORMAT:  # another tool's model.json, or an older layout
        raise ModelDirError(f"{path}: format {found!r}, expected {FORMAT!r}; not an o2v-jax "
                            f"model directory")
    missing = [k for k in ("params_dir", "hyperparameters", "metadata") if k not in manifest]
    if missing or not isinstance(manifest["params_dir"], str):
        raise ModelDirError(f"{path}: incomplete manifest (missing {', '.join(missing) or 'params_dir'})")
    if not (root / manifest["params_dir"]).is_dir():
        raise ModelDirError(f"{path}: parameter directory {manifest['params_dir']} is missing")
    return manifest


def read_config(model_dir: str | Path) -> tuple[Config, dict[str, Any]]:
    """The model's :class:`~o2v_jax.config.Config` and its manifest.

    The manifest stores the resolved hyperparameter map (``Config.to_hyperparameters()``),
    which parses back to the same Config (docs/hyperparameters.md, "Resolved maps are
    valid input"); every loader goes through here.

    Raises:
      ModelDirError: not a model directory, or its hyperparameters do not parse.
    """
    manifest = read_manifest(model_dir)
    try:
        config = from_hyperparameters(manifest["hyperparameters"])
    except HyperparameterError as e:
        raise ModelDirError(f"{Path(model_dir) / MANIFEST}: the saved hyperparameters do not "
                            f"parse: {e}") from None
    return config, manifest


def load_model(model_dir: str | Path, target: Any = None) -> tuple[dict[str, str], Any, dict[str, Any]]:
    """Load ``(hyperparameters, params, metadata)`` from a model directory.

    ``target`` (a tree of arrays with the expected structure) restores into matching
    shapes and dtypes; without it the stored tree is returned as saved.
    """
    manifest = read_manifest(model_dir)
    params = _restore_tree(Path(model_dir) / manifest["params_dir"], target)
    _verify(Path(model_dir) / MANIFEST, manifest, params)
    return manifest["hyperparameters"], params, manifest["metadata"]


def copy_model(model_dir: str | Path, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Copy a complete model directory to ``directory``, atomically; returns it.

    The copy is made in a hidden sibling and renamed into place, so ``directory`` never
    holds half a model. Everything but ``training/`` (state of an unfinished run) and
    hidden files is copied: the model, ``metrics.jsonl``, ``learning_curves.png``.

    Raises:
      ModelDirError: ``model_dir`` is not a complete model; ``directory`` is a file, a
        non-empty directory that is not a model directory (never replaced), or holds a
        model and ``overwrite`` is False.
    """
    src, dst = Path(model_dir), Path(directory)
    read_manifest(src)
    if dst.exists():
        if dst.resolve() == src.resolve():
            return dst
        if not dst.is_dir():
            raise ModelDirError(f"{dst}: exists and is not a directory")
        if any(dst.iterdir()):
            if not (dst / MANIFEST).is_file():
                raise ModelDirError(f"{dst}: not empty and not a model directory; "
                                    f"not writing a model into it")
            if not overwrite:
                raise ModelDirError(f"{dst}: already holds a model; pass overwrite=True to "
                                    f"replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = dst.with_name(f".{dst.name}.{tag}.tmp")
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("training", ".*"))
    if dst.exists():  # an empty directory or the model being replaced: set it aside first
        old = dst.with_name(f".{dst.name}.{tag}.old")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    return dst


def save_training_state(model_dir: str | Path, state: Any, info: dict[str, Any]) -> None:
    """Save the full training state (params, optimizer state, ...) after an epoch.

    Optimizer states are trees of named tuples; to keep the on-disk form plain, the tree
    is flattened to its leaves and rebuilt from a fresh ``target`` on restore.
    """
    leaves = jax.tree.leaves(state)
    tree = {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}
    _commit(Path(model_dir) / "training", STATE_MANIFEST, "state", _host(tree),
            {"format": FORMAT, "info": info, "num_leaves": len(leaves)})


def training_info(model_dir: str | Path) -> dict[str, Any] | None:
    """The ``info`` saved with the training state in ``model_dir``, or None if there is none."""
    path = Path(model_dir) / "training" / STATE_MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())["info"]


def load_training_state(model_dir: str | Path,
                        target: Any | Callable[[dict[str, Any]], Any]) -> tuple[Any, dict[str, Any]] | None:
    """Restore a state saved by :func:`save_training_state` into ``target``'s structure.

    ``target`` may be a function of the saved ``info`` (when the structure depends on
    what was saved). Returns None when there is nothing to resume from.
    """
    root = Path(model_dir) / "training"
    path = root / STATE_MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if callable(target):
        target = target(manifest["info"])
    leaves, treedef = jax.tree.flatten(target)
    if manifest["num_leaves"] != len(leaves):
        raise ModelDirError(f"{path}: saved state has {manifest['num_leaves']} arrays, this "
                            f"configuration needs {len(leaves)}; were the hyperparameters changed?")
    abstract = {f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    restored = _restore_tree(root / manifest["params_dir"], abstract)
    _verify(path, manifest, restored)
    state = jax.tree.unflatten(treedef, [restored[f"{i:05d}"] for i in range(len(leaves))])
    return state, manifest["info"]


def clear_training_state(model_dir: str | Path) -> None:
    shutil.rmtree(Path(model_dir) / "training", ignore_errors=True)
