"""The native row write-back (o2v_jax/native.py, rows.cc): same results as XLA's scatter,
built once into the cache, and a clean fallback to XLA's scatter when it cannot be built."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_steps, tiny_hp

from o2v_jax import env, native
from o2v_jax.buckets import Batch
from o2v_jax.config import from_hyperparameters
from o2v_jax.row_sparse import ROW_CHUNK, Options
from o2v_jax.training import build_steps, init_params


def _case(dtype, vocab=1000, width=7, n=300, seed=0):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, width)).astype(dtype)
    idx = rng.choice(vocab, n, replace=False).astype(np.int32)
    idx[::17] = vocab  # the lazy loop's padding id: dropped
    idx[5] = -3  # numpy's rule, as jax's .at[] applies it: row vocab - 3
    idx[6] = -vocab - 2  # still out of range: dropped
    rows = rng.standard_normal((n, width)).astype(dtype)
    return table, idx, rows


# Set by .ci/run: CI has a compiler, so there the native path must be built and tested,
# and a missing compiler is a failure rather than a skip.
REQUIRE = "O2V_REQUIRE_NATIVE"
NO_COMPILER = ("no C++ compiler: the native row write-back cannot be built; "
               "the XLA-scatter fallback is tested instead")


def _no_compiler() -> bool:
    cxx = native._compiler()
    return cxx is None or shutil.which(cxx) is None


def _require_native() -> None:
    """Skips where no C++ compiler can build the library (the README calls the compiler
    optional) or O2V_NATIVE=0 turns it off, unless $O2V_REQUIRE_NATIVE=1; a compiler
    that is there and fails is always a failure."""
    if os.environ.get(REQUIRE) != "1":
        if os.environ.get(env.NATIVE, "1").strip() == "0":
            pytest.skip(f"{env.NATIVE}=0 turns the native row write-back off")
        if _no_compiler():
            pytest.skip(NO_COMPILER)
    assert native.available(), f"native row write-back unavailable: {native._state.get('why')}"


@pytest.fixture
def built():
    _require_native()


def test_the_native_write_back_is_built_here(built):
    table, idx, rows = _case(np.float32)
    hlo = jax.jit(native.set_rows).lower(table, idx, rows).as_text()
    assert native.TARGET in hlo


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int32])
def test_set_rows_equals_xla_scatter(dtype):
    table, idx, rows = _case(dtype)
    want = np.asarray(jnp.asarray(table).at[idx].set(rows, mode="drop"))
    got = np.asarray(jax.jit(native.set_rows)(table, idx, rows))
    np.testing.assert_array_equal(got, want)
    ok = (idx >= 0) & (idx < len(table))
    np.testing.assert_array_equal(got[idx[ok]], rows[ok])
    np.testing.assert_array_equal(got[len(table) - 3], rows[5])
    untouched = np.setdiff1d(np.arange(len(table)), np.concatenate([idx[ok], [len(table) - 3]]))
    np.testing.assert_array_equal(got[untouched], table[untouched])


def test_set_rows_in_place_in_a_donated_loop():
    # The lazy loop's shape: chunks of rows written into a donated, loop-carried table.
    table, idx, rows = _case(np.float32, n=4 * 64)

    def loop(native_path):
        def body(i, t):
            ix = jax.lax.dynamic_slice_in_dim(jnp.asarray(idx), i * 64, 64)
            r = jax.lax.dynamic_slice_in_dim(jnp.asarray(rows), i * 64, 64)
            return native.set_rows(t, ix, t.at[ix].get(mode="clip") + r, native=native_path)
        return jax.jit(lambda t: jax.lax.fori_loop(0, 4, body, t), donate_argnums=0)

    a = loop(True)(jnp.asarray(table))
    b = loop(False)(jnp.asarray(table))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_build_is_cached_and_reports_compiler_failures(built, tmp_path):
    path = native.build(tmp_path)
    assert path.is_file() and path.parent.parent == tmp_path / "native"
    # Present: reused without running the compiler (which would fail here).
    assert native.build(tmp_path, cxx="/bin/false") == path
    other = tmp_path / "other"
    with pytest.raises(RuntimeError, match="failed"):
        native.build(other, cxx="/bin/false")
    with pytest.raises(RuntimeError, match="could not run"):
        native.build(other, cxx=str(tmp_path / "no-such-compiler"))
    assert not native.library_path(other).exists()


@pytest.mark.parametrize("how", ["env", "broken-compiler"])
def test_without_the_library_set_rows_is_xla_scatter(monkeypatch, tmp_path, caplog, how):
    monkeypatch.setattr(native, "_state", {})  # as in a fresh process
    monkeypatch.setattr(native, "_registered", None)
    if how == "env":
        monkeypatch.setenv(env.NATIVE, "0")
    else:
        monkeypatch.setenv("O2V_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("CXX", "/bin/false")
    with caplog.at_level(logging.WARNING, logger="o2v_jax"):
        assert not native.available()
        assert not native.available()  # decided once
    warned = [r for r in caplog.records if "native row write-back is unavailable" in r.message]
    assert len(warned) == (0 if how == "env" else 1)
    table, idx, rows = _case(np.float32)
    # A fresh function: jax.jit(native.set_rows) may hold an earlier test's trace.
    hlo = jax.jit(lambda *a: native.set_rows(*a)).lower(table, idx, rows).as_text()
    assert native.TARGET not in hlo
    np.testing.assert_array_equal(np.asarray(native.set_rows(table, idx, rows)),
                                  np.asarray(jnp.asarray(table).at[idx].set(rows, mode="drop")))


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_row_sparse_training_is_identical_with_and_without_it(built, monkeypatch, optimizer):
    # Three row_sparse steps over several row chunks: the native and XLA write-backs
    # must leave bit-identical tables and optimizer state.
    hp = tiny_hp(enc0_vocab_size=3000, enc0_max_seq_len=32, optimizer=optimizer,
                 token_embedding_storage_type="row_sparse", weight_decay=0.01)
    config = from_hyperparameters(hp)
    rng = np.random.default_rng(1)
    in0, in1 = (rng.integers(1, 3000, size=(16, 32)).astype(np.int32) for _ in range(2))
    in0[:, -4:] = 0
    batch = (in0, in1, rng.integers(0, 2, 16).astype(np.float32), np.ones(16, np.float32))
    assert len(np.unique(np.concatenate([in0, in1]))) > 2 * ROW_CHUNK

    def run(state):
        monkeypatch.setattr(native, "_state", state)
        _, params, opt_state = run_steps(config, batch, steps=3)
        return jax.tree.map(np.asarray, (params, opt_state))

    fast = run(dict(native._state))
    slow = run({"ok": False, "why": "test"})
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("plan_min_tokens", [0, 10**9], ids=["plan", "buffer"])
def test_row_sparse_step_writes_tables_in_place(built, plan_min_tokens):
    # The write-back aliases its table; if XLA ever has to keep the old table alive
    # past a write (e.g. two chunks gathered before either is written), it inserts
    # full-table copies, which made a Wikipedia-sized step many times slower in a trial.
    import re

    config = from_hyperparameters(tiny_hp(
        enc0_vocab_size=3000, enc0_max_seq_len=32, optimizer="adam",
        token_embedding_storage_type="row_sparse", tied_token_embedding_weight="false"))
    rng = np.random.default_rng(2)
    in0, in1 = (rng.integers(1, 3000, size=(16, 32)).astype(np.int32) for _ in range(2))
    batch = Batch(in0, in1, np.ones(16, np.float32), np.ones(16, np.float32))
    graphdef, params, keep = init_params(config, 0, (None, None), layout="cpu")
    steps = build_steps(graphdef, config, keep, layout="cpu",
                        options=Options(plan_min_tokens=plan_min_tokens))
    planned = steps.train_step.plan(batch)  # the host half of the CPU step
    assert all((t.plan is not None) == (plan_min_tokens == 0) for t in planned.tables.values())
    state = steps.init_state(params)
    text = steps.train_step.step.lower(state, planned, jax.random.key(0)).compile().as_text()
    width = config.enc0.token_embedding_dim
    assert f"f32[3000,{width}]" in text and native.TARGET in text
    copies = re.findall(rf"= f32\[3000,{width}\]\{{[^}}]*\}} copy(?:-start)?\(", text)
    assert not copies, f"{len(copies)} full-table copies in the compiled step"
    # The whole state is donated: every one of its buffers is also an output's.
    aliases = re.search(r"input_output_alias=\{([^\n]*?) \}", text)
    assert aliases and aliases.group(1).count("-alias)") == len(jax.tree.leaves(state))


def test_a_damaged_cached_library_is_rebuilt(built, tmp_path):
    path = native.build(tmp_path)
    path.write_bytes(b"\x7fELF truncated")
    lib, again = native.open_library(tmp_path)
    assert again == path and path.stat().st_size > 1000
    assert hasattr(lib, "O2vSetRows")


def test_other_platforms_lower_to_xla_scatter():
    # No GPU here, but lowering for one shows what it would run: XLA's scatter, not the
    # CPU-only FFI target (jax.lax.platform_dependent picks the branch per platform).
    table, idx, rows = _case(np.float32)
    exported = jax.export.export(jax.jit(native.set_rows), platforms=["cuda"])(table, idx, rows)
    text = exported.mlir_module()
    assert native.TARGET not in text and "scatter" in text


@pytest.mark.parametrize("vocab,width,ids", [(4, 3, []), (4, 0, [1, 2]), (0, 3, [0, 1]),
                                             (1, 5, [0, 0]), (6, 2, [5, -6, 6, -7])])
def test_set_rows_edge_shapes(vocab, width, ids):
    table = np.arange(vocab * width, dtype=np.float32).reshape(vocab, width)
    idx = np.asarray(ids, np.int32)
    rows = -1.0 - np.arange(len(ids) * width, dtype=np.float32).reshape(len(ids), width)
    if len(set(ids)) < len(ids) and vocab == 1:
        rows[:] = -7.0  # repeated ids: any write order gives the same table
    got = jax.jit(native.set_rows)(table, idx, rows)
    want = jnp.asarray(table).at[idx].set(rows, mode="drop")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_without_a_compiler_the_native_tests_skip_and_the_fallback_is_tested(tmp_path):
    # A fresh process on a machine without one: no CXX, no compiler on PATH, an empty cache.
    child = {k: v for k, v in os.environ.items() if k not in ("CXX", REQUIRE, env.NATIVE)}
    (tmp_path / "bin").mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child.update(PATH=str(tmp_path / "bin"), O2V_CACHE_DIR=str(tmp_path / "cache"),
                 PYTHONPATH=os.pathsep.join(filter(None, [root, child.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__,
         "-k", "built_here or equals_xla_scatter"],
        cwd=root, env=child, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed, 1 skipped" in done.stdout, done.stdout
    assert f": {NO_COMPILER}\n" in done.stdout, done.stdout
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_o2v_require_native_makes_a_missing_compiler_a_failure(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})  # as in a fresh process
    monkeypatch.setattr(native, "_registered", None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("O2V_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(REQUIRE, "1")
    with pytest.raises(AssertionError, match="no C\\+\\+ compiler found"):
        _require_native()
    monkeypatch.delenv(REQUIRE)
    with pytest.raises(pytest.skip.Exception, match=re.escape(NO_COMPILER)):
        _require_native()
