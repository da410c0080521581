"""Batch transform: one output line per input line in order, mini-batches, bad lines,
content types, directories and the CLI entry point."""

from __future__ import annotations

import io
import json

import msgspec
import numpy as np
import pytest
from conftest import train_tiny_model

from o2v_jax import media, wire
from o2v_jax.app import respond
from o2v_jax.cli import main
from o2v_jax.predictor import load
from o2v_jax.transform import TransformError, _mini_batches, settings, transform, transform_file

ATOL = 1e-5
HP = dict(enc0_max_seq_len=12, bucket_width=4, enc_dim=8, mlp_dim=8, epochs=1, mini_batch_size=8)
TINY_PAYLOAD_MB = 400 / (1 << 20)  # 400 bytes: a few lines per mini-batch


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    model_dir = train_tiny_model(tmp_path_factory.mktemp("transform"), **HP)
    return load(model_dir, batch_sizes=(1, 4, 16), max_batch_tokens=64)


def pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"in0": rng.integers(1, 40, rng.integers(1, 15)).tolist(),
             "in1": rng.integers(1, 40, rng.integers(1, 15)).tolist()} for _ in range(n)]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_out(path):
    return path.read_text().split("\n")[:-1]


@pytest.mark.parametrize("strategy", ["MultiRecord", "SingleRecord"])
def test_keeps_line_order_and_count(predictor, tmp_path, strategy):
    records = pairs(40)
    lines = [json.dumps(r) for r in records]
    lines[5:5] = [""]  # a blank line stays a blank line
    src = write_lines(tmp_path / "pairs.jsonl", lines)
    assert src.stat().st_size > 3 * 400
    stats = transform_file(predictor, src, tmp_path / "out" / "pairs.jsonl.out", strategy=strategy,
                           max_payload_mb=TINY_PAYLOAD_MB)
    out = read_out(tmp_path / "out" / "pairs.jsonl.out")
    assert len(out) == len(lines) == stats.lines and out[5] == ""
    assert stats.records == 40 and stats.bad_lines == 0 and stats.bytes == src.stat().st_size
    got = np.array([msgspec.json.decode(x, type=wire.Scores).scores for x in out if x])
    want = predictor.predict([r["in0"] for r in records], [r["in1"] for r in records])
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert not (tmp_path / "out" / "pairs.jsonl.out.tmp").exists()


def test_mini_batches_respect_the_payload(predictor):
    opts = settings(predictor, max_payload_mb=TINY_PAYLOAD_MB)
    lines = [json.dumps(r).encode() + b"\n" for r in pairs(60)]
    groups = list(_mini_batches(io.BytesIO(b"".join(lines)), opts))
    assert len(groups) > 5
    assert all(sum(map(len, g)) <= opts.max_payload for _, g in groups)
    assert [line for _, g in groups for line in g] == lines
    assert [first for first, _ in groups] == list(np.cumsum([1] + [len(g) for _, g in groups[:-1]]))
    for spelling in ("SingleRecord", "SINGLE_RECORD", "single_record"):
        single = settings(predictor, strategy=spelling)
        assert single.strategy == "SINGLE_RECORD"
        assert all(len(g) == 1 for _, g in _mini_batches(io.BytesIO(b"".join(lines)), single))


def test_embeddings_and_mixed_modes_in_one_file(predictor, tmp_path):
    records = [{"in0": [1, 2, 3]}, {"in1": [4]}, {"in0": [5, 6], "in1": [7]}, {"in0": [8] * 13}]
    src = write_lines(tmp_path / "mixed.jsonl", [json.dumps(r) for r in records])
    transform_file(predictor, src, tmp_path / "mixed.out")
    out = [json.loads(x) for x in read_out(tmp_path / "mixed.out")]
    assert [list(x) for x in out] == [["embeddings"], ["embeddings"], ["scores"], ["embeddings"]]
    np.testing.assert_allclose(out[0]["embeddings"], predictor.embed([[1, 2, 3]])[0], atol=ATOL)
    np.testing.assert_allclose(out[1]["embeddings"], predictor.embed([[4]], encoder="in1")[0], atol=ATOL)
    np.testing.assert_allclose(out[2]["scores"], predictor.predict([[5, 6]], [[7]])[0], atol=ATOL)
    np.testing.assert_allclose(out[3]["embeddings"], predictor.embed([[8] * 12])[0], atol=ATOL)


def test_lines_of_one_kind_share_a_model_call_when_a_mini_batch_is_mixed(predictor, tmp_path,
                                                                        monkeypatch):
    # Mixed kinds cannot be one request, so each line is decoded alone; the lines of each
    # kind are still answered together: one call per kind, not one per line.
    calls = []
    for name in ("embed", "predict"):
        real = getattr(predictor, name)
        monkeypatch.setattr(predictor, name, lambda *a, _real=real, _name=name, **kw: (
            calls.append((_name, kw.get("encoder"), len(a[0]))), _real(*a, **kw))[1])
    records = [{"in0": [1, 2]}, {"in0": [3], "in1": [4]}, {"in1": [5]}, {"in0": [6]},
               {"in0": [7, 8], "in1": [9]}, {"in0": [1]}]
    src = write_lines(tmp_path / "mixed.jsonl", [json.dumps(r) for r in records])
    stats = transform_file(predictor, src, tmp_path / "mixed.out")
    assert stats.records == 6
    assert calls == [("embed", "in0", 3), ("predict", None, 2), ("embed", "in1", 1)]
    monkeypatch.undo()
    out = [json.loads(x) for x in read_out(tmp_path / "mixed.out")]
    np.testing.assert_allclose(out[3]["embeddings"], predictor.embed([[6]])[0], atol=ATOL)
    np.testing.assert_allclose(out[4]["scores"], predictor.predict([[7, 8]], [[9]])[0], atol=ATOL)


def test_bad_line_stops_with_file_and_line(predictor, tmp_path):
    lines = [json.dumps(r) for r in pairs(10)]
    lines[6] = '{"in0": [1, 2, 99], "in1": [3]}'
    src = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TransformError, match=r"bad\.jsonl:7: \$\[line 7\]\.in0\[2\]: token id 99"):
        transform_file(predictor, src, tmp_path / "bad.out", max_payload_mb=TINY_PAYLOAD_MB)
    assert not (tmp_path / "bad.out").exists() and not (tmp_path / "bad.out.tmp").exists()
    lines[6] = '{"in0": [1, 2'
    write_lines(src, lines)
    with pytest.raises(TransformError, match=r"bad\.jsonl:7: .*malformed JSON"):
        transform_file(predictor, src, tmp_path / "bad.out", strategy="SingleRecord")


def test_skip_bad_lines_keeps_the_line_count(predictor, tmp_path):
    records = pairs(12)
    lines = [json.dumps(r) for r in records]
    lines[2] = '{"in0": [1, 2, 99], "in1": [3]}'
    lines[8] = "not json"
    lines[10] = json.dumps({"in0": [1] * 200, "in1": [2]})  # longer than the payload
    src = write_lines(tmp_path / "bad.jsonl", lines)
    stats = transform_file(predictor, src, tmp_path / "bad.out", skip_bad_lines=True,
                           max_payload_mb=600 / (1 << 20))
    out = read_out(tmp_path / "bad.out")
    assert len(out) == 12 and stats.bad_lines == 3 and stats.records == 9
    errors = {i: json.loads(out[i]) for i in (2, 8, 10)}
    assert errors[2]["line"] == 3 and "token id 99" in errors[2]["error"]
    assert errors[8]["line"] == 9 and "malformed JSON" in errors[8]["error"]
    assert errors[10]["line"] == 11 and "max payload" in errors[10]["error"]
    good = [i for i in range(12) if i not in errors]
    want = predictor.predict([records[i]["in0"] for i in good], [records[i]["in1"] for i in good])
    got = np.array([json.loads(out[i])["scores"] for i in good])
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_json_requests_one_per_line(predictor, tmp_path):
    docs = [{"instances": [{"in0": [1, 2]}, {"in0": [3]}]},
            {"instances": [{"in0": [4], "in1": [5, 6]}]},
            {"instances": [{"in0": [7, 8, 9]}]}]
    src = write_lines(tmp_path / "docs.json", [json.dumps(d) for d in docs])
    stats = transform_file(predictor, src, tmp_path / "docs.out", content_type=media.JSON,
                           max_payload_mb=TINY_PAYLOAD_MB)
    out = read_out(tmp_path / "docs.out")
    assert len(out) == 3 and stats.records == 4
    for line, doc in zip(out, docs):
        assert line.encode() == respond(json.dumps(doc).encode(), media.JSON, None, predictor)[0]


def test_accept_json_wraps_each_line(predictor, tmp_path):
    records = pairs(5)
    src = write_lines(tmp_path / "p.jsonl", [json.dumps(r) for r in records])
    transform_file(predictor, src, tmp_path / "p.out", accept=media.JSON)
    want = predictor.predict([r["in0"] for r in records], [r["in1"] for r in records])
    for i, line in enumerate(read_out(tmp_path / "p.out")):
        assert line.encode() == wire.encode_response("scores", want[i:i + 1], media.JSON)


@pytest.mark.parametrize("options, message", [
    ({"strategy": "Batch"}, "strategy 'Batch' is invalid; expected one of MultiRecord, SingleRecord"),
    ({"content_type": "text/csv"}, "unsupported content type 'text/csv'"),
    ({"content_type": media.NPZ}, "unsupported content type 'application/x-npz'"),  # serve only
    ({"content_type": media.JSON, "accept": media.JSONLINES}, "needs --content-type"),
    ({"accept": "text/csv"}, "allows no type"),
    ({"accept": media.NPY}, "one JSON line per input line"),
    ({"max_payload_mb": 0}, "max payload 0 MB is invalid"),
    ({"content_type": "application/jsonlines; infer_max_seqlens=0,3"}, "infer_max_seqlens"),
])
def test_invalid_settings_fail_before_reading(predictor, options, message):
    with pytest.raises(TransformError, match=message):
        settings(predictor, **options)


def test_infer_max_seqlens_applies_per_line(predictor, tmp_path):
    src = write_lines(tmp_path / "e.jsonl", [json.dumps({"in0": [1, 2, 3, 4, 5]})])
    transform_file(predictor, src, tmp_path / "e.out",
                   content_type="application/jsonlines; infer_max_seqlens=2,2")
    got = json.loads(read_out(tmp_path / "e.out")[0])["embeddings"]
    np.testing.assert_allclose(got, predictor.embed([[1, 2]])[0], atol=ATOL)


def test_cli_transforms_a_directory(predictor, tmp_path, capsys):
    src = tmp_path / "in"
    write_lines((src / "sub").mkdir(parents=True) or src / "sub" / "b.jsonl",
                [json.dumps({"in1": [3, 4]})] * 3)
    write_lines(src / "a.jsonl", [json.dumps(r) for r in pairs(4)])
    write_lines(src / ".hidden", ["ignored"])
    assert main(["transform", "--model-dir", str(predictor.model_dir), "--input", str(src),
                 "--output", str(tmp_path / "out"), "--strategy", "SINGLE_RECORD", "--no-progress"]) == 0
    assert len(read_out(tmp_path / "out" / "a.jsonl.out")) == 4
    assert len(read_out(tmp_path / "out" / "sub" / "b.jsonl.out")) == 3
    assert not (tmp_path / "out" / ".hidden.out").exists()
    summary = json.loads(capsys.readouterr().out.split("Transform finished: ", 1)[1])
    assert summary["files"] == 2 and summary["lines"] == 7 and summary["bad_lines"] == 0


def test_transform_of_a_missing_input_is_an_error(predictor, tmp_path):
    with pytest.raises(TransformError, match="input not found"):
        transform(predictor, tmp_path / "nope", tmp_path / "out")
