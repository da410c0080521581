"""Data-parallel training on a device mesh (o2v_jax.mesh, o2v_jax.sharded): the same
model as one device, resume across device counts, and no table-sized collective.

JAX fixes the number of CPU devices when it starts, so the mesh runs happen in one
subprocess with JAX_NUM_CPU_DEVICES=4 (the ``four_devices`` fixture: JAX starts once for
every check), whose results the tests read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from o2v_jax import row_sparse, sharded

ROOT = Path(__file__).resolve().parents[1]


def run_on_devices(scripts: dict[str, str], tmp_path: Path, devices: int = 4,
                   timeout: int = 900) -> tuple[dict, str]:
    """Run ``scripts`` (name -> code ending in ``print(json.dumps(out))``) one after the
    other in one process with ``devices`` CPU devices: ``({name: out}, stderr)``."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    code = "\n".join(f"def script_{name}():\n" + textwrap.indent(textwrap.dedent(body), "    ")
                     + f"\nscript_{name}()\n" for name, body in scripts.items())
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    outs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return dict(zip(scripts, outs, strict=True)), done.stderr


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> tuple[dict, str]:
    return run_on_devices({"train": TRAIN, "hlo": HLO}, tmp_path_factory.mktemp("mesh"))


TRAIN = """
    import json, logging, sys
    from pathlib import Path
    import jax, numpy as np
    from conftest import group_pairs, tiny_hp, write_jsonl
    from o2v_jax import checkpoint
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.data import read_channel
    from o2v_jax.pretrained import Pretrained
    from o2v_jax.training import train

    logging.basicConfig(level=logging.INFO)
    root = Path(sys.argv[1])
    # Runs on one mesh compile the same programs (a run and its resumed twin): compile once.
    from o2v_jax.runtime import enable_compilation_cache
    enable_compilation_cache(root / "jax-cache")
    V = 37  # not a multiple of 4 or 2: the tables are padded, differently on each mesh
    cases = {
        # mini_batch_size 10 gets 2 fill rows on 4 devices; weight decay reads every row
        "dense": dict(token_embedding_storage_type="dense", mini_batch_size=10,
                      weight_decay=0.01),
        # tied table, dropout (B a multiple of the devices: the same masks), frozen rows
        "row_sparse": dict(token_embedding_storage_type="row_sparse", mini_batch_size=12,
                           dropout=0.1, tied_token_embedding_weight="true", enc1_vocab_size=V,
                           enc1_max_seq_len=8),
        # in-batch negatives over the global batch: the softmax spans every device's
        # rows, and the 2 fill rows of B = 10 enter neither softmax. No dropout (the
        # objective's default is 0.3): with B not a multiple of the devices the masks
        # differ from one device's; the row_sparse case covers dropout on a mesh.
        "contrastive": dict(objective="contrastive", token_embedding_storage_type="row_sparse",
                            mini_batch_size=10, dropout=0.0),
    }
    # resume onto another device count (and padding of V): 1 -> 4 devices, 4 -> 2
    resumes = {"dense": (1, 4), "row_sparse": (4, 2)}
    out = {}
    for name, hp in cases.items():
        config = from_hyperparameters(tiny_hp(enc0_vocab_size=V, epochs=2, **hp))
        read = lambda f, n, s: read_channel(write_jsonl(root / f, group_pairs(n, s, vocab=V)), config)
        data, val = read("train.jsonl", 60, 0), read("val.jsonl", 30, 1)
        rng = np.random.default_rng(0)
        found = rng.random(V) < 0.3
        pre = (Pretrained(rng.standard_normal((V, 16)).astype(np.float32) * found[:, None], found), None)
        kw = dict(validation=val, pretrained=pre, emit=lambda line: None, progress=False)
        models = {}
        def run(tag, **more):
            result = train(config, data, model_dir=root / name / tag, **kw, **more)
            if result.best_epoch >= 0:  # a finished run (not one stopped after an epoch)
                models[tag] = checkpoint.load_model(root / name / tag)[1]
            return result
        one = run("1", devices=1)
        four = run("4", devices=4)
        if name in resumes:
            before, after = resumes[name]
            run("resumed", devices=before, stop_after_epochs=1)
            run("resumed", devices=after, resume=True)
        diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        frozen = np.asarray(models["4"]["embed0"]["embedding"])[found]
        metric = "validation_" + config.validation_metric
        out[name] = {
            "diff": {tag: diff(models["1"], models[tag]) for tag in models if tag != "1"},
            "shapes": [list(np.shape(x)) == list(np.shape(y)) for x, y in
                       zip(jax.tree.leaves(models["1"]), jax.tree.leaves(models["4"]))],
            "frozen_moved": float(np.max(np.abs(frozen - pre[0].vectors[found]))),
            "val_metric": [one.history[-1][metric], four.history[-1][metric]],
        }
    print(json.dumps(out))
"""


def test_four_devices_train_the_model_one_device_trains_and_resume_across_device_counts(
        four_devices):
    (out, log) = four_devices[0]["train"], four_devices[1]
    assert "mesh: 4 devices (1 process x 4)" in log and "mesh: 2 devices (1 process x 2)" in log
    assert set(out["dense"]["diff"]) == set(out["row_sparse"]["diff"]) == {"4", "resumed"}
    assert set(out["contrastive"]["diff"]) == {"4"}
    for name, case in out.items():
        assert all(case["shapes"]), name  # the saved model has V rows, not V's padding
        # Tolerance (docs/distributed.md): the (cap, D) gradient's partial sums are added
        # in another order; 2 epochs of Adam on tiny data stay within 1e-5.
        assert all(d < 1e-5 for d in case["diff"].values()), (name, case["diff"])
        assert case["frozen_moved"] == 0.0, name
        # validation cross-entropy, or the retrieval MRR of objective=contrastive
        assert abs(case["val_metric"][0] - case["val_metric"][1]) < 1e-5, name


HLO = """
    import json, sys
    from conftest import tiny_hp
    from o2v_jax import mesh, sharded
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.model import abstract_model

    out = {}
    for storage in ("row_sparse", "dense"):
        for vocab in (1_000, 100_000):
            config = from_hyperparameters(tiny_hp(
                token_embedding_storage_type=storage, enc0_vocab_size=vocab, enc1_vocab_size=vocab,
                enc1_max_seq_len=8, optimizer="adam", mini_batch_size=16))
            placement = mesh.for_training(config, None)
            graphdef, abstract = abstract_model(config, sharded.MODEL_LAYOUT)
            steps = sharded.MeshSteps(graphdef, config, {}, placement=placement)
            state, batch, root = sharded.abstract_inputs(config, placement, abstract,
                                                         lengths=(8, 8), cap=256)
            text = steps.lower(state, batch, root).compile().as_text()
            out[f"{storage}/{vocab}"] = sharded.collectives(text)
    print(json.dumps(out))
"""


def test_the_compiled_step_moves_no_table(four_devices):
    out = four_devices[0]["hlo"]
    for storage in ("row_sparse", "dense"):
        small, large = out[f"{storage}/1000"], out[f"{storage}/100000"]
        assert small and small == large, storage  # the same collectives whatever V
        assert not any(in_loop for _, _, in_loop in small), storage  # each runs once a step
        # no all-gather of a table, no reduce-scatter (gloo's trap on CPU)
        assert {op for op, _, _ in small} <= {"all-reduce", "all-gather"}, storage
        # the largest moves a few (cap = 256, D = 16) row blocks at once, not a (V, 16) table
        assert max(size for _, size, _ in small) <= 4 * 256 * 16 * 4, storage


def test_collectives_reads_ops_result_bytes_and_loops():
    text = """
%add.1 (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%inner.2 (p: f32[4]) -> f32[4] {
  ROOT %rs = bf16[4,4]{1,0} reduce-scatter(bf16[16,4]{1,0} %c), dimensions={0}
}

%body.3 (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %call = f32[4]{0} fusion(f32[4]{0} %x), kind=kLoop, calls=%inner.2
}

%cond.4 (t: (s32[], f32[4])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main.5 (x: f32[256,16]) -> f32[256,16] {
  %all-reduce.1 = f32[256,16]{1,0} all-reduce(f32[256,16]{1,0} %a), to_apply=%add.1
  %ag = (f32[8]{0}, s32[2,3]{1,0}) all-gather-start(f32[2]{0} %b), dimensions={0}
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond.4, body=%body.3
  ROOT %add = f32[256,16]{1,0} add(f32[256,16]{1,0} %x, f32[256,16]{1,0} %y)
}
"""
    assert sorted(sharded.collectives(text)) == sorted([
        ("all-reduce", 256 * 16 * 4, False), ("all-gather", 8 * 4 + 6 * 4, False),
        ("reduce-scatter", 16 * 2, True)])


def test_batch_rows_for_large_vocabularies_are_the_host_rows():
    # Past a vocabulary many times the batch, rows are found by sorting the ids (the
    # host work never grows with V); the answer is host_rows' exactly.
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 5000, size=(4, 6)).astype(np.int32), rng.integers(0, 5000, size=(4, 3)).astype(np.int32)]
    ids[0][:, -1] = 0
    want = row_sparse.host_rows(ids, 5000)
    got = sharded.batch_rows(ids, 5000)
    np.testing.assert_array_equal(got[0], want[0])
    assert int(got[1]) == int(want[1])
    for g, w in zip(got[2], want[2]):
        np.testing.assert_array_equal(g, w)
