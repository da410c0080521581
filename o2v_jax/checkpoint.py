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

A training state saved from a device mesh (o2v_jax.mesh) is written sharded: every
process writes the rows its devices hold, to a filesystem all processes share, and
process 0 writes the manifest once they all have. Its checksums are
:func:`fingerprints` instead of CRCs: computed on the devices from the global array,
the same whatever the mesh, the padding of V or the order of the partial sums, so a
state saved on 4 devices is checked as it is restored onto 2, or onto one. Such a state
restores onto any mesh (orbax cuts or zero-fills the padding rows of V) or onto one
device (:func:`load_training_state`).
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
import jax.numpy as jnp
import numpy as np

from o2v_jax.config import Config, HyperparameterError, from_hyperparameters

FORMAT = "o2v-jax-model/1"
MANIFEST = "model.json"
STATE_MANIFEST = "state.json"

log = logging.getLogger("o2v_jax")


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or from another format."""


def _checkpointer(solo: bool = False):
    # Imported lazily: orbax pulls in a lot and only save/load paths need it.
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)
    if solo and jax.process_count() > 1:  # process 0 writes alone; the others do not wait
        return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=0, active_processes={0}, barrier_sync_key_prefix="o2v-solo"))
    return ocp.StandardCheckpointer()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tree(directory: Path, tree: Any, solo: bool = False) -> None:
    with _checkpointer(solo) as ckpt:  # closed after use: no background threads left behind
        ckpt.save(directory.absolute(), tree)
        ckpt.wait_until_finished()


def _restore_tree(directory: Path, target: Any = None, strict: bool = True) -> Any:
    with _checkpointer() as ckpt:
        try:
            if target is None:
                return ckpt.restore(directory.absolute())
            return ckpt.restore(directory.absolute(), target, strict=strict)
        except Exception as e:  # orbax and tensorstore raise ValueError, JSON errors, Exception
            text = str(e).strip()
            first = text.splitlines()[0][:300] if text else ""
            raise ModelDirError(f"{directory}: cannot read the saved arrays ({type(e).__name__}: "
                                f"{first}); the directory is damaged or incomplete: restore it "
                                f"from a copy or train again") from e


def _names(tree: Any) -> list[tuple[str, Any]]:
    """(name, leaf) pairs; names join the path's keys with "/", so a list index and the
    string key orbax restores it as ("0") name the same array."""
    return [("/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                      for k in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def checksums(tree: Any) -> dict[str, str]:
    """``{"mlp/0/bias": "crc32:<8 hex digits>", ...}`` over each array's bytes (C order)."""
    out = {}
    for name, leaf in _names(tree):
        data = np.ascontiguousarray(np.asarray(leaf))
        out[name] = f"crc32:{zlib.crc32(data.view(np.uint8).reshape(-1)):08x}"
    return out


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit moves about half the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
    """uint32 (2,): two position-weighted sums of ``x``'s bits, modulo 2^32."""
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        bits = x.astype(jnp.uint8).astype(jnp.uint32) if x.dtype == jnp.bool_ else \
            jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    pos, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for axis in reversed(range(x.ndim)):  # the element's C-order index (mod 2^32)
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    # Odd weights: a change of one element's bits always changes both sums.
    w0 = _mix(pos ^ jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
    w1 = _mix(pos ^ jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
    return jnp.stack([jnp.sum(bits * w0, dtype=jnp.uint32), jnp.sum(bits * w1, dtype=jnp.uint32)])


@jax.jit
def _fingerprint_all(leaves: list) -> list:
    return [_fingerprint(x) for x in leaves]


def fingerprints(tree: Any) -> dict[str, str]:
    """``{"mlp/0/bias": "fp64:<16 hex digits>", ...}``: a checksum of each array that
    does not depend on how it is laid out.

    Two sums over the array's elements of (element bits x an odd weight hashed from the
    element's index), modulo 2^32, computed on the devices: integer sums give the same
    result in any order, so the value is the same for the array on one device, split by
    rows over any number of devices and processes (each sums its part; one all-reduce
    of 8 bytes), or as numpy. Zero rows add nothing, so a table padded with zero rows
    has the fingerprint of the table without them. Any change of one element's bits
    changes both sums. For global arrays this is a collective: every process calls it.
    """
    names = _names(tree)
    sums = _fingerprint_all([leaf for _, leaf in names])
    return {name: "fp64:" + "".join(f"{int(v):08x}" for v in np.asarray(s))
            for (name, _), s in zip(names, sums)}


def _verify(path: Path, manifest: dict[str, Any], tree: Any) -> None:
    """Compare a restored tree with the checksums its manifest recorded (if it has any)."""
    saved = manifest.get("checksums")
    if not isinstance(saved, dict):
        return
    fingerprinted = any(str(v).startswith("fp64:") for v in saved.values())
    got = fingerprints(tree) if fingerprinted else checksums(tree)
    for name, value in saved.items():
        if got.get(name) != value:
            raise ModelDirError(
                f"{path}: array {name} does not match the checksum saved with it "
                f"({got.get(name, 'missing')} != {value}); the parameter files are damaged: "
                f"restore them from a copy or train again")


def _commit(root: Path, manifest_name: str, prefix: str, tree: Any, manifest: dict[str, Any],
            solo: bool = False) -> None:
    """Write `tree` to a new `<prefix>-<id>` dir, then atomically point the manifest at it."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    _save_tree(root / name, tree, solo)
    _write_json_atomic(root / manifest_name,
                       {**manifest, "params_dir": name, "checksums": checksums(tree)})
    _remove_stale(root, prefix, name)


def _remove_stale(root: Path, prefix: str, keep: str) -> None:
    for stale in root.glob(f"{prefix}-*"):
        if stale.name != keep:
            shutil.rmtree(stale, ignore_errors=True)


def _commit_sharded(root: Path, manifest_name: str, prefix: str, tree: Any,
                    manifest: dict[str, Any]) -> None:
    """:func:`_commit` for global arrays, called by every process: each writes its
    shards into the same new directory (orbax), and once all have, process 0 points the
    manifest at it. A process that dies half-way leaves the previous manifest, and the
    state it names, as they were."""
    from o2v_jax import runtime

    root.mkdir(parents=True, exist_ok=True)
    name = runtime.agreed(lambda: f"{prefix}-{uuid.uuid4().hex[:12]}")
    sums = fingerprints(tree)  # on the devices, before orbax holds the arrays
    _save_tree(root / name, tree)
    runtime.barrier(f"{prefix}-written")
    if jax.process_index() == 0:
        _write_json_atomic(root / manifest_name, {**manifest, "params_dir": name, "checksums": sums})
        _remove_stale(root, prefix, name)
    runtime.barrier(f"{prefix}-committed")


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
    # With several processes only process 0 calls this (training.py): it writes alone.
    _commit(root, MANIFEST, "params", _host(params), manifest, solo=True)
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


def save_training_state(model_dir: str | Path, state: Any, info: dict[str, Any], *,
                        sharded: bool = False) -> None:
    """Save the full training state (params, optimizer state, ...) after an epoch.

    Optimizer states are trees of named tuples; to keep the on-disk form plain, the tree
    is flattened to its leaves and rebuilt from a fresh ``target`` on restore.

    ``sharded``: the leaves are global arrays on a device mesh; every process calls this
    and writes its own shards (checksums: :func:`fingerprints`).
    """
    leaves = jax.tree.leaves(state)
    tree = {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}
    manifest = {"format": FORMAT, "info": info, "num_leaves": len(leaves)}
    if sharded:
        _commit_sharded(Path(model_dir) / "training", STATE_MANIFEST, "state", tree, manifest)
    else:
        _commit(Path(model_dir) / "training", STATE_MANIFEST, "state", _host(tree), manifest)


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

    Leaves of ``target`` that are ShapeDtypeStructs with a sharding (a device mesh) come
    back as global arrays with that sharding; other leaves as numpy. Either way a state
    saved on another mesh (or on one device) fits: tables are cut or zero-filled to the
    target's row count, which differs only by the padding of V (o2v_jax.mesh).
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
    keys = [f"{i:05d}" for i in range(len(leaves))]
    placed = bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
                                  for x in leaves)
    fingerprinted = any(str(v).startswith("fp64:") for v in (manifest.get("checksums") or {}).values())
    directory = root / manifest["params_dir"]
    if placed and fingerprinted:  # mesh to mesh: each process reads only its rows
        restored = _restore_tree(directory, dict(zip(keys, leaves)), strict=False)
        _verify(path, manifest, restored)
    else:  # whole arrays on the host, as saved, then fitted (and placed)
        restored = _restore_tree(directory, {k: np.asarray(x) if not isinstance(
            x, jax.ShapeDtypeStruct) else np.zeros(x.shape, x.dtype) for k, x in zip(keys, leaves)})
        _verify(path, manifest, restored)
        restored = {k: _fit(path, k, restored[k], x, placed) for k, x in zip(keys, leaves)}
    state = jax.tree.unflatten(treedef, [restored[k] for k in keys])
    return state, manifest["info"]


def _fit(path: Path, key: str, x: np.ndarray, target: Any, placed: bool) -> Any:
    """``x`` with the target's row count (cut, or zero rows added: V's padding), placed
    with the target's sharding when ``placed``."""
    x, shape = np.asarray(x), tuple(np.shape(target))
    if x.shape != shape:
        if x.ndim == 0 or x.shape[1:] != shape[1:]:
            raise ModelDirError(f"{path}: array {key} was saved with shape {x.shape}, this run "
                                f"needs {shape}; were the hyperparameters changed?")
        if x.shape[0] > shape[0]:
            x = x[:shape[0]]
        else:
            x = np.concatenate([x, np.zeros((shape[0] - x.shape[0], *shape[1:]), x.dtype)])
    if placed:
        return jax.make_array_from_callback(shape, target.sharding, lambda idx: x[idx])
    return x


def clear_training_state(model_dir: str | Path) -> None:
    shutil.rmtree(Path(model_dir) / "training", ignore_errors=True)
