"""Several processes (o2v_jax.cluster): joining, the roll call's errors, flags and data
compared between processes, a dead process named within the bound, and the model of two
processes equal to one process's.

The multi-process tests run ``o2v train`` processes on 127.0.0.1 (one CPU device each),
with short timeouts; they are few because each costs seconds of startup.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import group_pairs, tiny_hp, write_jsonl

from o2v_jax import checkpoint, cluster, runtime
from o2v_jax.cluster import ClusterError, ClusterSpec
from o2v_jax.config import from_hyperparameters
from o2v_jax.data import read_channel
from o2v_jax.training import train

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- flags

def test_cluster_flags_come_together_and_in_range():
    assert cluster.from_flags(None, None, None) is None
    spec = cluster.from_flags("10.0.0.1:1234", 4, 3)
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("10.0.0.1:1234", 4, 3)
    with pytest.raises(ClusterError, match="--num-processes, --process-id missing"):
        cluster.from_flags("10.0.0.1:1234", None, None)
    with pytest.raises(ClusterError, match=r"--process-id 4: expected 0 to 3 \(--num-processes 4\)"):
        cluster.from_flags("10.0.0.1:1234", 4, 4)
    with pytest.raises(ClusterError, match="--coordinator '10.0.0.1': expected HOST:PORT"):
        cluster.from_flags("10.0.0.1", 2, 0)


def test_sagemaker_hosts_make_a_cluster_the_first_host_coordinates(tmp_path):
    config = tmp_path / "resourceconfig.json"
    assert cluster.from_sagemaker(config) is None  # no file: one host
    config.write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    assert cluster.from_sagemaker(config) is None
    config.write_text(json.dumps({"current_host": "algo-7"}))  # no hosts: one host, as before
    assert cluster.from_sagemaker(config) is None
    config.write_text(json.dumps({"current_host": "algo-3", "hosts": ["algo-1", "algo-2", "algo-3"],
                                  "network_interface_name": "eth0"}))
    spec = cluster.from_sagemaker(config)
    assert spec.coordinator == f"algo-1:{cluster.SAGEMAKER_PORT}"
    assert (spec.num_processes, spec.process_id) == (3, 2)
    config.write_text(json.dumps({"current_host": "algo-9", "hosts": ["algo-1", "algo-2"]}))
    with pytest.raises(ClusterError, match="current_host 'algo-9' is not in hosts"):
        cluster.from_sagemaker(config)
    config.write_text(json.dumps({"hosts": ["algo-1", "algo-2"]}))
    with pytest.raises(ClusterError, match="resourceconfig.json: expected SageMaker's resource config"):
        cluster.from_sagemaker(config)
    # What a single host has always read: an unreadable file or one without hosts (the
    # CLI warns about the former and trains alone).
    for text in ("{", json.dumps({"current_host": "algo-7"}), "[]"):
        config.write_text(text)
        assert cluster.from_sagemaker(config) is None


def test_a_slurm_job_of_several_tasks_is_detected_as_jax_detects_it(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cluster.detect() is None
    slurm = {"SLURM_JOB_ID": "4100", "SLURM_STEP_NODELIST": "node[007-010],gpu1",
             "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    spec = cluster.detect()
    assert spec.coordinator == f"node007:{4100 % 4096 + 65535 - 4095}"
    assert (spec.num_processes, spec.process_id) == (4, 2)
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "1234")
    assert cluster.detect().coordinator == "node007:1234"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: nothing to join
    assert cluster.detect() is None


# --------------------------------------------------------------------------- roll call

def roll_call(port: int, n: int, reports: list[tuple[int, int]], timeout: float = 2.0):
    """Process 0 of ``n`` and workers (process id, their --num-processes) in threads:
    what each returned or raised."""
    results: dict[str, object] = {}

    def run(key, spec, fn):
        try:
            results[key] = fn(spec)
        except ClusterError as e:
            results[key] = e

    threads = [threading.Thread(target=run, args=(
        "0", ClusterSpec(f"127.0.0.1:{port}", n, 0, timeout), cluster._roll_call_coordinator))]
    for i, (pid, count) in enumerate(reports):
        threads.append(threading.Thread(target=run, args=(
            f"w{i}", ClusterSpec(f"127.0.0.1:{port}", count, pid, timeout), cluster._roll_call_worker)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_the_roll_call_gathers_every_process_or_names_the_missing_ones():
    results = roll_call(free_port(), 3, [(2, 3), (1, 3)])
    host = socket.gethostname()
    assert results == {"0": [host] * 3, "w0": [host] * 3, "w1": [host] * 3}

    started = time.monotonic()
    results = roll_call(free_port(), 4, [(2, 4)], timeout=1.0)  # 1 and 3 never come
    assert time.monotonic() - started < 10
    assert "processes 1, 3 of 4 did not join within 1 s" in str(results["0"])
    assert "process 0 reports: processes 1, 3 of 4 did not join" in str(results["w0"])


def test_the_roll_call_refuses_a_duplicate_id_and_another_process_count():
    results = roll_call(free_port(), 3, [(1, 3), (1, 3)])
    assert "two processes were started with --process-id 1" in str(results["0"])
    results = roll_call(free_port(), 3, [(1, 2), (2, 3)])
    assert isinstance(results["0"], ClusterError)
    assert "was started with --num-processes 2, process 0 with 3" in str(results["0"])


def test_a_busy_coordinator_port_or_no_coordinator_is_named():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClusterError, match=rf"127\.0\.0\.1:{port}: process 0 cannot listen "
                                               r"there: the port is in use"):
            cluster._roll_call_coordinator(ClusterSpec(f"127.0.0.1:{port}", 2, 0, 1))
    with pytest.raises(ClusterError, match=r"process 0 \(the coordinator, --coordinator "
                                           r"127\.0\.0\.1:\d+\) did not answer within 1 s"):
        cluster._roll_call_worker(ClusterSpec(f"127.0.0.1:{free_port()}", 2, 1, 1))


def test_check_same_names_the_first_field_that_differs(monkeypatch):
    joined = cluster.Cluster(ClusterSpec("h:1", 2, 0), ["host-a", "host-b"], None)
    theirs = {"--seed": "0", "--train channel": "64 records, crc32 0000abcd"}
    monkeypatch.setattr(runtime, "gather_text", lambda name, mine: [mine, json.dumps(theirs)])
    joined.check_same({"--seed": "0", "--train channel": "64 records, crc32 0000abcd"})
    with pytest.raises(ClusterError, match=r"--train channel differs between processes: process 0 "
                                           r"\(host-a\) has 64 records, crc32 12345678, process 1 "
                                           r"\(host-b\) has 64 records, crc32 0000abcd"):
        joined.check_same({"--seed": "0", "--train channel": "64 records, crc32 12345678"})


# --------------------------------------------------------------------------- processes

def write_run(root: Path, epochs: int) -> tuple[list[str], object, object]:
    """Channels and hyperparameters of a tiny run: (o2v train arguments, config, data)."""
    hp = tiny_hp(epochs=epochs)
    (root / "hp.json").write_text(json.dumps(hp))
    train_path = write_jsonl(root / "train.jsonl", group_pairs(64, 0, max_len=4))
    val_path = write_jsonl(root / "val.jsonl", group_pairs(32, 1, max_len=4))
    config = from_hyperparameters(hp)
    args = ["--train", str(train_path), "--validation", str(val_path), "--hyperparameters",
            str(root / "hp.json"), "--no-progress"]
    return args, config, (read_channel(train_path, config), read_channel(val_path, config))


def launch(args: list[str], n: int, port: int, timeout_s: float, extra=lambda i: [],
           ids=None, devices: int = 1) -> list:
    """``o2v train`` as processes ``ids`` (default all) of ``n``, each with ``devices``
    CPU devices."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_NUM_CPU_DEVICES": str(devices)}
    return [subprocess.Popen([sys.executable, "-m", "o2v_jax.cli", "train", *args,
                              "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                              "--process-id", str(i), "--cluster-timeout", str(timeout_s), *extra(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for i in (range(n) if ids is None else ids)]


def messages(err: str) -> str:
    """A process's stderr without native stack frames (what an assertion should show)."""
    return "\n".join(line for line in err.splitlines() if not line.strip().startswith("@"))[-4000:]


def params_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_two_processes_survive_a_kill_resume_on_more_devices_and_train_the_one_process_model(
        tmp_path):
    # One scenario, because every launch costs seconds of start-up: two processes train;
    # process 1 is killed after epoch 1; process 0 names it within the bound; two
    # processes of 2 devices each resume from the last complete checkpoint and finish;
    # the model equals an uninterrupted one-process run's.
    args, config, (data, val) = write_run(tmp_path, epochs=6)
    model_dir, timeout_s = tmp_path / "two", 10
    procs = launch([*args, "--model-dir", str(model_dir)], 2, free_port(), timeout_s)
    for line in procs[0].stdout:  # process 0 prints the metric lines
        if "epoch=1, validation" in line:
            break
    killed = time.monotonic()
    procs[1].kill()
    exited = []
    waiter = threading.Thread(target=lambda: exited.append(procs[0].wait() is not None
                                                           and time.monotonic()))
    waiter.start()
    # The one-process reference trains while process 0 waits for process 1's heartbeat.
    one = train(config, data, validation=val, model_dir=tmp_path / "one", emit=lambda _: None,
                progress=False)
    waiter.join(timeout=300)
    _, err0 = procs[0].communicate(timeout=60)
    out1, _ = procs[1].communicate(timeout=60)
    assert procs[0].returncode == 1, messages(err0)
    assert "mesh: 2 devices (2 processes x 1)" in err0
    assert "#quality_metric" not in out1  # process 0 alone prints metric lines
    assert f"process 1 ({socket.gethostname()}) stopped: no heartbeat for {timeout_s} s" in err0
    waited = exited[0] - killed
    assert waited < timeout_s + 20, waited  # the bound: --cluster-timeout plus a poll or two
    # The last complete checkpoint loads onto another mesh: 2 processes x 2 devices.
    assert checkpoint.training_info(model_dir)["epoch"] in (0, 1)  # 1 if its save finished
    procs = launch([*args, "--model-dir", str(model_dir), "--resume"], 2, free_port(), 30,
                   devices=2)
    (out0, err0), (out1, err1) = (p.communicate(timeout=600) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], messages(err0) + messages(err1)
    assert "mesh: 4 devices (2 processes x 2)" in err0 and "Resuming from epoch" in err0
    assert "Training finished" in out0 and "#quality_metric" not in out1
    _, two_params, two_meta = checkpoint.load_model(model_dir)
    _, one_params, _ = checkpoint.load_model(tmp_path / "one")
    assert params_diff(one_params, two_params) < 1e-5  # docs/distributed.md's tolerance
    assert [h["epoch"] for h in two_meta["history"]] == [h["epoch"] for h in one.history]
    assert abs(two_meta["history"][-1]["validation_cross_entropy"]
               - one.history[-1]["validation_cross_entropy"]) < 1e-5
    assert not (model_dir / "training").exists()
    # Both processes were given one --model-dir: process 0 alone writes metrics.jsonl (a
    # second writer would empty or double it; the resumed run rewrites the saved epochs)
    # and the learning curves.
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [h["epoch"] for h in one.history]
    assert (model_dir / "learning_curves.png").is_file()


def test_a_missing_process_or_other_flags_stop_every_process_with_the_reason(tmp_path):
    args, _, _ = write_run(tmp_path, epochs=1)
    # Both cases run at once (each mostly waits): a process whose peer never comes, and
    # two processes with different seeds.
    started = time.monotonic()
    (alone,) = launch([*args, "--model-dir", str(tmp_path / "a")], 2, free_port(), 2, ids=[0])
    procs = launch([*args, "--model-dir", str(tmp_path / "b")], 2, free_port(), 30,
                   extra=lambda i: ["--seed", str(i)])
    _, err = alone.communicate(timeout=300)
    assert alone.returncode == 2
    assert "process 1 of 2 did not join within 2 s" in err
    assert time.monotonic() - started < 120
    # Different seeds: both processes stop, naming the flag.
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    for err in errors:
        assert "--seed differs between processes: process 0" in err and "has 0" in err
