"""The application: respond() (decode, negotiate, compute, encode), the App's routes,
errors and inference slots, and the server's settings. No sockets (test_http has them).

Most tests use FakePredictor (tests/fake_model.py), so they run without compiling
anything; the respond() tests at the end use a real (untrained) model.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np
import pytest
from conftest import tiny_hp
from fake_model import EMBED, HANG, PAIRS, FakePredictor, assert_values, expected_values, wait_until

from o2v_jax import app as app_module
from o2v_jax import media, wire
from o2v_jax.app import App, Settings, compute, resolve_settings, respond
from o2v_jax.batcher import Batcher
from o2v_jax.cli import build_parser

ATOL = 1e-5  # float32 on CPU; see docs/inference.md "Same answers everywhere"


def settings(**overrides) -> Settings:
    """Test settings: a free port, and no dynamic batching unless asked for (the tests
    that count predictor calls hold one call per request)."""
    return Settings(model_dir=Path("unused"), port=0, **{"batching": False, **overrides})


def body_of(records: list[dict], media_type: str) -> bytes:
    if media_type == media.JSON:
        return json.dumps({"instances": records}).encode()
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# --------------------------------------------------------------------------- respond


@pytest.mark.parametrize("media_type", [media.JSON, media.JSONLINES])
@pytest.mark.parametrize("accept", [None, media.JSON, media.JSONLINES, media.NPY])
@pytest.mark.parametrize("records", [PAIRS, EMBED], ids=["scores", "embeddings"])
def test_respond_decodes_computes_and_encodes_every_format(media_type, accept, records):
    fake = FakePredictor()
    out, media_type = respond(body_of(records, media_type), media_type, accept, fake)
    assert media_type == (accept or media_type)
    want = expected_values(records)
    key = "scores" if len(records[0]) == 2 else "embeddings"
    if media_type == media.NPY:
        assert out == wire.encode_response(key, want, media.NPY)
    elif media_type == media.JSON:
        assert_values([p[key] for p in json.loads(out)["predictions"]], records)
    else:
        assert_values([json.loads(line)[key] for line in out.splitlines()], records)
    assert [n for n, _ in fake.calls] == [len(records)]  # one model call per request


def test_respond_uses_the_answer_it_is_given_and_checks_limits_first():
    fake = FakePredictor()
    seen = []

    def answer(request):
        seen.append(request)
        return compute(fake, request)

    out, _ = respond(body_of(EMBED, media.JSON), None, None, fake, answer=answer)
    assert len(seen) == 1 and seen[0].encoder == "in1" and len(fake.calls) == 1
    assert_values([p["embeddings"] for p in json.loads(out)["predictions"]], EMBED)
    # Wire errors come out before any model work: a bad id (400), an Accept nothing
    # satisfies (406), a body over max_bytes (413), an unknown Content-Type (415).
    for body, ctype, accept, kw, status in [
            (b'{"in0": [1, 40]}', media.JSONLINES, None, {}, 400),
            (body_of(EMBED, media.JSON), media.JSON, "text/csv", {}, 406),
            (b'{"in0": [1, 2, 3]}', media.JSONLINES, None, {"max_bytes": 10}, 413),
            (b'{"in0": [1]}', "text/plain", None, {}, 415)]:
        with pytest.raises(media.WireError) as e:
            respond(body, ctype, accept, fake, answer=answer, **kw)
        assert e.value.status == status
    assert len(seen) == 1 and len(fake.calls) == 1
    with pytest.raises(media.WireError) as e:
        respond(b'{"in0": [1]}\n{"in0": [99]}\n', media.JSONLINES, None, fake, first_line=7)
    assert e.value.path == "$[line 8].in0[0]"


# The AWS "Encoder Embeddings for Object2Vec" page's examples (/work/shared/seed), verbatim.
SEED_JSON = b'{ "instances" : [ {"in0": [6, 17, 606, 19, 53, 67, 52, 12, 5, 10, 15, 10178, 7, 33, 652, 80, 15, 69, 821, 4]}, {"in0": [22, 1016, 32, 13, 25, 11, 5, 64, 573, 45, 5, 80, 15, 67, 21, 7, 9, 107, 4]}, {"in0": [774, 14, 21, 206]} ] }'  # noqa: E501
SEED_JSONLINES = (
    b'{"in0": [6, 17, 606, 19, 53, 67, 52, 12, 5, 10, 15, 10178, 7, 33, 652, 80, 15, 69, 821, 4]}\n'
    b'{"in0": [22, 1016, 32, 13, 25, 11, 5, 64, 573, 45, 5, 80, 15, 67, 21, 7, 9, 107, 4]}\n'
    b'{"in0": [774, 14, 21, 206]}\n'
)
SEED_SEQUENCES = [[6, 17, 606, 19, 53, 67, 52, 12, 5, 10, 15, 10178, 7, 33, 652, 80, 15, 69, 821, 4],
                  [22, 1016, 32, 13, 25, 11, 5, 64, 573, 45, 5, 80, 15, 67, 21, 7, 9, 107, 4],
                  [774, 14, 21, 206]]
# The page's two response vectors as float32, and the exact records we print for them.
SEED_VECTORS = np.float32([
    [0.057368703186511, 0.030703511089086, 0.099890425801277, 0.063688032329082, 0.026327300816774,
     0.003637571120634, 0.021305780857801, 0.004316598642617, 0.0, 0.003397724591195, 0.0,
     0.000378780066967, 0.0, 0.0, 0.0, 0.007419463712722],
    [0.150190666317939, 0.05145975202322, 0.098204270005226, 0.064249359071254, 0.056249320507049,
     0.01513972133398, 0.047553978860378, 0.0, 0.0, 0.011533712036907, 0.011472506448626,
     0.010696629062294, 0.0, 0.0, 0.0, 0.008508535102009]])
SEED_RECORDS = [
    b'{"embeddings":[0.057368703,0.030703511,0.099890426,0.06368803,0.0263273,0.0036375711,'
    b'0.02130578,0.0043165986,0.0,0.0033977246,0.0,0.00037878007,0.0,0.0,0.0,0.0074194637]}',
    b'{"embeddings":[0.15019067,0.051459752,0.09820427,0.06424936,0.05624932,0.015139721,'
    b'0.04755398,0.0,0.0,0.011533712,0.011472506,0.010696629,0.0,0.0,0.0,0.008508535]}',
]


class SeedModel:
    """Answers every in0 sequence with one of the page's two vectors (by length parity)."""

    vocab_sizes, max_seq_lens = (20_000, 20_000), (100, 100)

    def __init__(self):
        self.seen = []

    def embed(self, sequences, encoder="in0"):
        self.seen.append((encoder, sequences.to_lists()))
        return SEED_VECTORS[sequences.lengths % 2]


def test_respond_answers_the_seed_examples_byte_for_byte():
    # Lengths 20, 19, 4: vectors 0, 1, 0. The bytes are pinned: any change to decoding,
    # negotiation or float printing on the page's payloads fails here.
    model = SeedModel()
    body, media_type = respond(SEED_JSON, "application/json", None, model)
    assert media_type == media.JSON
    assert body == b'{"predictions":[' + b",".join([SEED_RECORDS[0], SEED_RECORDS[1], SEED_RECORDS[0]]) + b"]}"
    body, media_type = respond(SEED_JSONLINES, "application/jsonlines", None, model)
    assert media_type == media.JSONLINES
    assert body == b"".join(r + b"\n" for r in (SEED_RECORDS[0], SEED_RECORDS[1], SEED_RECORDS[0]))
    assert model.seen == [("in0", SEED_SEQUENCES)] * 2
    body, media_type = respond(SEED_JSON, "application/json", "application/x-npy", model)
    assert media_type == media.NPY and body == wire.encode_response("embeddings", SEED_VECTORS[[0, 1, 0]], media.NPY)


# --------------------------------------------------------------------------- the app


def test_app_ping_before_and_after_ready_and_execution_parameters():
    app = App(settings(threads=3, max_body_mb=20, batch_strategy="SINGLE_RECORD"))
    status, headers, body = app.handle("GET", "/ping", {}, b"")
    assert status == 503 and ("Retry-After", "1") in headers
    assert json.loads(body) == {"error": "the model is still loading", "path": None}
    assert app.handle("POST", "/invocations", {}, b"{}")[0] == 503
    app.ready(FakePredictor())
    assert app.handle("GET", "/ping", {}, b"") == (200, (), b"")
    assert app.handle("GET", "/ping?probe=1", {}, b"")[0] == 200
    status, headers, body = app.handle("GET", "/execution-parameters", {}, b"")
    assert status == 200 and dict(headers)["Content-Type"] == "application/json"
    assert json.loads(body) == {"MaxConcurrentTransforms": 3, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 20}
    # SageMaker refuses MaxConcurrentTransforms x MaxPayloadInMB > 100: the answer respects it.
    app = App(settings(threads=16, max_body_mb=30))
    params = json.loads(app.handle("GET", "/execution-parameters", {}, b"")[2])
    assert (params["MaxConcurrentTransforms"], params["MaxPayloadInMB"]) == (3, 30)
    # Each worker process has its own slots: the server admits workers x threads at once.
    for workers, concurrent in [(2, 4), (8, 10)]:
        app = App(settings(threads=2, max_body_mb=10, workers=workers))
        params = json.loads(app.handle("GET", "/execution-parameters", {}, b"")[2])
        assert params["MaxConcurrentTransforms"] == concurrent


def test_app_failed_load_answers_503_with_the_reason():
    app = App(settings())
    app.failed("no such file")
    for method, path in (("GET", "/ping"), ("POST", "/invocations")):
        status, headers, body = app.handle(method, path, {}, b"{}")
        assert status == 503 and ("Retry-After", "1") in headers
        assert json.loads(body)["error"] == "the model failed to load: no such file"


def test_app_routes_404_405_and_invocations():
    app = App(settings())
    app.ready(FakePredictor())
    status, headers, body = app.handle("GET", "/nope", {}, b"")
    assert status == 404 and "/invocations" in json.loads(body)["error"]
    status, headers, body = app.handle("GET", "/invocations", {}, b"")
    assert status == 405 and dict(headers)["Allow"] == "POST"
    assert app.handle("DELETE", "/ping", {}, b"")[1][-1] == ("Allow", "GET, HEAD")
    # Header names in any case; the Accept header picks JSON Lines.
    body = "\n".join(json.dumps(r) for r in EMBED).encode()
    status, headers, out = app.handle("POST", "/invocations", {"content-TYPE": "application/jsonlines",
                                                             "ACCEPT": "application/jsonlines"}, body)
    assert status == 200 and headers == (("Content-Type", "application/jsonlines"),)
    assert_values([json.loads(line)["embeddings"] for line in out.splitlines()], EMBED)
    assert wire.count_records(out, "application/jsonlines") == 3


def test_app_wire_errors_carry_status_and_record_path():
    app = App(settings())
    app.ready(FakePredictor())
    bad = json.dumps({"instances": [{"in0": [1, 2]}, {"in0": [3, "x"]}]}).encode()
    status, headers, body = app.handle("POST", "/invocations", {"Content-Type": "application/json"}, bad)
    err = json.loads(body)
    assert status == 400 and err["path"] == "$.instances[1].in0[1]" and "integer token id" in err["error"]
    assert app.handle("POST", "/invocations", {"Content-Type": "text/csv"}, b"1,2")[0] == 415
    ok = json.dumps({"instances": EMBED}).encode()
    assert app.handle("POST", "/invocations", {"Accept": "text/html"}, ok)[0] == 406


@pytest.mark.parametrize("batching", [False, True])
def test_app_unexpected_error_is_500_without_details(caplog, batching):
    app = App(settings(batching=batching))
    app.ready(FakePredictor(fail=True))
    with caplog.at_level(logging.ERROR, logger="o2v_jax"):
        status, _, body = app.handle("POST", "/invocations", {}, json.dumps({"instances": EMBED}).encode())
    assert status == 500
    assert json.loads(body) == {"error": app_module.GENERIC_500, "path": None}
    assert b"secret" not in body and b"Traceback" not in body
    assert "secret internal detail" in caplog.text  # the traceback goes to the log


def test_app_batches_through_a_batcher_when_batching_is_on():
    assert App(settings()).batcher is None
    app = App(settings(batching=True))
    assert app.batcher is None  # made when the model is ready
    fake = FakePredictor()
    app.ready(fake)
    assert isinstance(app.batcher, Batcher)
    gate = threading.Event()
    fake.gate = gate
    body = json.dumps({"instances": EMBED}).encode()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(app.handle, "POST", "/invocations", {}, body)
        wait_until(lambda: fake.calls, "the first request is in the model")
        waiting = [pool.submit(app.handle, "POST", "/invocations", {}, body) for _ in range(2)]
        wait_until(lambda: len(app.batcher._queue) == 2, "two requests queue in the batcher")
        gate.set()
        for future in [first, *waiting]:
            status, _, out = future.result(HANG)
            assert status == 200
            assert_values([p["embeddings"] for p in json.loads(out)["predictions"]], EMBED)
    assert [n for n, _ in fake.calls] == [3, 6]  # the two waiting requests: one merged call


def test_app_bounds_concurrent_inferences():
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    app = App(settings(threads=1, queue_timeout=0.2))
    app.ready(fake)
    body = json.dumps({"instances": EMBED}).encode()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(app.handle, "POST", "/invocations", {}, body)
        wait_until(lambda: fake.calls, "the first request holds the only slot")
        t0 = time.monotonic()
        status, headers, out = app.handle("POST", "/invocations", {}, body)
        waited = time.monotonic() - t0
        gate.set()
        assert first.result(HANG)[0] == 200
    # Refused only after waiting queue_timeout for a slot (a lower bound: never flaky).
    assert status == 503 and ("Retry-After", "1") in headers and waited >= 0.2
    assert "inference slots" in json.loads(out)["error"]
    assert app.handle("POST", "/invocations", {}, body)[0] == 200  # the slot was released


# --------------------------------------------------------------------------- settings


def resolve(argv, environ) -> Settings:
    return resolve_settings(build_parser().parse_args(["serve", *argv]), environ)


def test_resolve_settings_sagemaker_mode_and_precedence():
    env = {"SAGEMAKER_BIND_TO_PORT": "9090", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20",
           "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "8", "INFERENCE_PREFERRED_MODE": "embedding"}
    # `docker run IMAGE serve` runs `o2v serve` with no flags: SageMaker container mode.
    s = resolve([], env)
    assert (s.sagemaker, s.model_dir, s.host, s.port, s.threads, s.max_body_mb, s.preferred_mode) == \
        (True, Path("/opt/ml/model"), "0.0.0.0", 9090, 8, 20, "embedding")
    s = resolve(["--sagemaker", "--model-dir", "m", "--port", "1234", "--threads", "2"], env)
    assert (s.model_dir, s.host, s.port, s.threads, s.max_body_mb) == (Path("m"), "0.0.0.0", 1234, 2, 20)
    # Without SageMaker mode: local defaults, SAGEMAKER_* ignored, INFERENCE_PREFERRED_MODE honoured.
    s = resolve(["--model-dir", "m"], env)
    assert (s.sagemaker, s.host, s.port, s.threads, s.max_body_mb, s.preferred_mode) == \
        (False, "127.0.0.1", 8080, Settings.threads, 6, "embedding")
    assert s.batching is True
    s = resolve(["--model-dir", "m", "--preferred-mode", "classification",
                 "--timeout", "2.5", "--max-connections", "9", "--no-batching"], env)
    assert (s.preferred_mode, s.read_timeout, s.max_connections, s.batching) == ("classification", 2.5, 9, False)
    with pytest.raises(ValueError, match=r"max_body_mb .*--max-body-mb.* \[1, 100\], got 101"):
        resolve(["--model-dir", "m", "--max-body-mb", "101"], {})
    with pytest.raises(ValueError, match="threads"):
        Settings(model_dir=Path("m"), threads=0)


def test_resolve_settings_workers_and_their_compilation_cache(tmp_path, monkeypatch):
    cache = {"O2V_CACHE_DIR": str(tmp_path / "cache")}
    # Outside SageMaker mode: one process, no cache, whatever SAGEMAKER_* says.
    s = resolve(["--model-dir", "m"], {**cache, "SAGEMAKER_MODEL_SERVER_WORKERS": "4"})
    assert (s.workers, s.compile_cache_dir) == (1, None)
    s = resolve(["--model-dir", "m", "--workers", "3"], cache)
    assert (s.workers, s.compile_cache_dir) == (3, tmp_path / "cache" / "jax-compile")
    s = resolve(["--model-dir", "m", "--workers", "2", "--compile-cache-dir", "c"], cache)
    assert s.compile_cache_dir == Path("c")
    s = resolve(["--model-dir", "m", "--compile-cache-dir", "c"], cache)  # one worker may use one too
    assert (s.workers, s.compile_cache_dir) == (1, Path("c"))
    # SageMaker mode: SAGEMAKER_MODEL_SERVER_WORKERS, else one per CPU; the flag wins.
    s = resolve(["--sagemaker", "--model-dir", "m"], {**cache, "SAGEMAKER_MODEL_SERVER_WORKERS": "5"})
    assert s.workers == 5
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    monkeypatch.setattr(app_module, "NVIDIA_DEVICE", tmp_path / "no-gpu")
    assert resolve(["--sagemaker", "--model-dir", "m"], cache).workers == 7
    # With a GPU, one: every worker's JAX would claim most of its memory.
    monkeypatch.setattr(app_module, "NVIDIA_DEVICE", tmp_path)
    assert resolve(["--sagemaker", "--model-dir", "m"], cache).workers == 1
    assert resolve(["--sagemaker", "--model-dir", "m", "--workers", "1"], cache).workers == 1
    with pytest.raises(ValueError, match=r"workers \(--workers, SAGEMAKER_MODEL_SERVER_WORKERS\) must be in"):
        resolve(["--model-dir", "m", "--workers", "0"], {})


# --------------------------------------------------------------------------- a real model

HP = dict(enc0_max_seq_len=12, bucket_width=4, enc_dim=8, mlp_dim=8)
SMALL = {"batch_sizes": (1, 4, 16), "max_batch_tokens": 64}


def save_untrained(path, **overrides):
    """A model directory from init_params + save_model (no training: fast)."""
    from o2v_jax import checkpoint
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.training import init_params

    config = from_hyperparameters(tiny_hp(**{**HP, **overrides}))
    _, params, _ = init_params(config, 0, (None, None))
    checkpoint.save_model(path, hyperparameters=config.to_hyperparameters(), params=params, metadata={})
    return path


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from o2v_jax.predictor import load

    return load(save_untrained(tmp_path_factory.mktemp("app") / "model"), **SMALL)


def random_seqs(rng, n, max_len=12):
    return [rng.integers(1, 40, rng.integers(1, max_len + 1)).tolist() for _ in range(n)]


def test_respond_with_a_predictor_every_mode_and_content_type(predictor):
    rng = np.random.default_rng(7)
    in0, in1 = random_seqs(rng, 5), random_seqs(rng, 5)
    cases = {
        "scores": ([{"in0": a, "in1": b} for a, b in zip(in0, in1)], predictor.predict(in0, in1)),
        "in0": ([{"in0": a} for a in in0], predictor.embed(in0)),
        "in1": ([{"in1": b} for b in in1], predictor.embed(in1, encoder="in1")),
    }
    for case, (instances, want) in cases.items():
        mode = "scores" if case == "scores" else "embeddings"
        record = wire.Scores if mode == "scores" else wire.Embeddings
        for sent in (media.JSON, media.JSONLINES):
            for accept in (None, media.JSON, media.JSONLINES):
                out, media_type = respond(body_of(instances, sent), sent, accept, predictor)
                assert media_type == (accept or sent)
                if media_type == media.JSON:
                    typ = wire.ScoresResponse if mode == "scores" else wire.EmbeddingsResponse
                    rows = msgspec.json.decode(out, type=typ).predictions
                else:
                    rows = [msgspec.json.decode(x, type=record) for x in out.splitlines()]
                got = np.array([getattr(r, mode) for r in rows], np.float32)
                np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"{case} {sent} {accept}")
    # The server's path (a Batcher in front of compute) gives the same bytes.
    body = body_of(cases["scores"][0], media.JSON)
    batched = Batcher(functools.partial(compute, predictor)).answer
    assert respond(body, None, None, predictor, answer=batched) == respond(body, None, None, predictor)


def test_respond_with_a_predictor_lets_wire_errors_through(predictor):
    with pytest.raises(media.WireError) as e:
        respond(b'{"in0": [1, 40]}', media.JSONLINES, None, predictor)
    assert e.value.status == 400 and e.value.path == "$[line 1].in0[1]"
    with pytest.raises(media.WireError) as e:
        respond(b'{"instances": [{"in0": [1]}]}', media.JSON, "text/csv", predictor)
    assert e.value.status == 406
    with pytest.raises(media.WireError) as e:
        respond(b'{"in0": [1]}', "text/plain", None, predictor)
    assert e.value.status == 415


def test_respond_with_a_predictor_answers_the_seed_examples(tmp_path):
    from o2v_jax.predictor import load

    # The page's 16-wide embeddings: a pooled_embedding model with enc_dim 16.
    model_dir = save_untrained(tmp_path / "seed", enc0_vocab_size=10179, enc0_max_seq_len=20,
                               enc_dim=16, bucket_width=0)
    p = load(model_dir, **SMALL)
    want = p.embed(SEED_SEQUENCES)
    body, media_type = respond(SEED_JSON, "application/json", None, p)
    assert media_type == media.JSON
    got = msgspec.json.decode(body, type=wire.EmbeddingsResponse).predictions
    assert len(got) == 3 and all(len(r.embeddings) == 16 for r in got)
    np.testing.assert_allclose([r.embeddings for r in got], want, atol=ATOL)
    body, media_type = respond(SEED_JSONLINES, "application/jsonlines", None, p)
    assert media_type == media.JSONLINES and body.count(b"\n") == 3
    assert body == wire.encode_lines("embeddings", want)
