"""The environment contract: every variable o2v-jax reads (o2v_jax/env.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from o2v_jax import env


def test_serving_reads_sagemaker_variables():
    got = env.serving({
        "SAGEMAKER_BIND_TO_PORT": "9090", "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "8",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20", "SAGEMAKER_BATCH_STRATEGY": "SingleRecord",
        "SAGEMAKER_BATCH": "true", "INFERENCE_PREFERRED_MODE": " Embedding ", "UNRELATED": "x",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "3"})
    assert got == env.ServingEnv(port=9090, threads=8, max_body_mb=20, batch_strategy="SINGLE_RECORD",
                                 batch=True, preferred_mode="embedding", workers=3)
    assert env.serving({}) == env.ServingEnv()
    # 0 means "SageMaker decides" / "any size": our default / the 100 MiB ceiling.
    got = env.serving({"SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "0", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "0",
                       "SAGEMAKER_MODEL_SERVER_WORKERS": "0"})
    assert got.threads is None and got.max_body_mb == env.MAX_PAYLOAD_MB == 100 and got.workers is None
    for name, value in [("SAGEMAKER_MAX_PAYLOAD_IN_MB", "6MB"), ("SAGEMAKER_BATCH_STRATEGY", "ALL"),
                        ("SAGEMAKER_MODEL_SERVER_WORKERS", "-1"),
                        ("INFERENCE_PREFERRED_MODE", "gpu"), ("SAGEMAKER_BATCH", "maybe")]:
        with pytest.raises(ValueError, match=name):
            env.serving({name: value})


@pytest.mark.parametrize("text, expected", [
    ("MULTI_RECORD", "MULTI_RECORD"), ("MultiRecord", "MULTI_RECORD"), ("multirecord", "MULTI_RECORD"),
    (" SingleRecord ", "SINGLE_RECORD"), ("single_record", "SINGLE_RECORD"), ("Batch", None), ("", None)])
def test_batch_strategy_spellings(text, expected):
    assert env.batch_strategy(text) == expected


def test_preferred_mode():
    assert env.preferred_mode({}) is None
    assert env.preferred_mode({"INFERENCE_PREFERRED_MODE": "  "}) is None
    assert env.preferred_mode({"INFERENCE_PREFERRED_MODE": "CLASSIFICATION"}) == "classification"
    with pytest.raises(ValueError, match="INFERENCE_PREFERRED_MODE='gpu'"):
        env.preferred_mode({"INFERENCE_PREFERRED_MODE": "gpu"})


def test_resolve_preferred_mode_argument_then_environment_then_default():
    assert env.resolve_preferred_mode(" Embedding ", {"INFERENCE_PREFERRED_MODE": "classification"}) == "embedding"
    assert env.resolve_preferred_mode(None, {"INFERENCE_PREFERRED_MODE": "EMBEDDING"}) == "embedding"
    assert env.resolve_preferred_mode(None, {}) == env.DEFAULT_PREFERRED_MODE == "classification"
    with pytest.raises(ValueError, match=r"preferred_mode='scores' is invalid; expected one of "
                                         r"classification, embedding \(spec §5.6\)"):
        env.resolve_preferred_mode("scores", {})
    with pytest.raises(ValueError, match="INFERENCE_PREFERRED_MODE='gpu'"):
        env.resolve_preferred_mode(None, {"INFERENCE_PREFERRED_MODE": "gpu"})


def test_cache_dir_resolution(tmp_path, monkeypatch):
    assert env.cache_dir({"O2V_CACHE_DIR": str(tmp_path / "x"), "XDG_CACHE_HOME": "/y"}) == tmp_path / "x"
    assert env.cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "o2v-jax"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert env.cache_dir({}) == Path(tmp_path / "home" / ".cache" / "o2v-jax")
    # The default reads the process environment.
    monkeypatch.setenv("O2V_CACHE_DIR", str(tmp_path / "z"))
    assert env.cache_dir() == tmp_path / "z"


def test_native_switch_and_compiler():
    assert env.native_disabled({"O2V_NATIVE": "0"}) and env.native_disabled({"O2V_NATIVE": " 0 "})
    assert not env.native_disabled({}) and not env.native_disabled({"O2V_NATIVE": "1"})
    assert env.compiler({"CXX": "clang++"}) == "clang++" and env.compiler({"CXX": ""}) is None
