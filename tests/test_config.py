"""Hyperparameter table, parsing and coupling rules (o2v_jax/config.py).

The expected ranges and defaults below are copied by hand from the spec
(/work/shared/object2vec-spec.md §2.1 container defaults, §2.2 documented ranges), not
read from ``config.SPECS``, so a wrong number in the code makes a test fail.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re

import pytest

from o2v_jax import config as C
from o2v_jax.config import HyperparameterError, from_hyperparameters, load_hyperparameters

# The smallest valid map (spec §2.1: only enc0_max_seq_len and enc0_vocab_size are required).
REQUIRED = {"enc0_max_seq_len": "8", "enc0_vocab_size": "50"}
# enc1 with its own settings, so enc1_* values are used instead of copied from enc0.
SEPARATE = {**REQUIRED, "enc1_network": "hcnn", "enc1_max_seq_len": "8", "enc1_vocab_size": "50"}

# Spec §2.2 numeric ranges: name -> (kind, lowest valid, highest valid or None = unbounded).
SPEC_RANGES = {
    "enc0_max_seq_len": ("int", 1, 5000),
    "enc1_max_seq_len": ("int", 1, 5000),
    "enc0_vocab_size": ("int", 2, 3_000_000),
    "enc1_vocab_size": ("int", 2, 3_000_000),
    "enc0_cnn_filter_width": ("int", 1, 9),
    "enc1_cnn_filter_width": ("int", 1, 9),
    "enc0_token_embedding_dim": ("int", 2, 1000),
    "enc1_token_embedding_dim": ("int", 2, 1000),
    "enc_dim": ("int", 4, 10000),
    "mlp_layers": ("int", 0, 10),  # docs say 0-10 (the SDK's 1 is not ours)
    "mlp_dim": ("int", 2, 10000),
    "num_classes": ("int", 2, 30),
    "dropout": ("float", 0.0, 1.0),
    "epochs": ("int", 1, 100),
    "mini_batch_size": ("int", 1, 10000),
    "learning_rate": ("float", 1e-6, 1.0),
    "weight_decay": ("float", 0.0, 10000.0),
    "early_stopping_patience": ("int", 1, 5),
    "early_stopping_tolerance": ("float", 0.000001, 0.1),
    "bucket_width": ("int", 0, 100),
    "negative_sampling_rate": ("int", 0, None),  # docs: int >= 0 (the SDK's 100 is not ours)
    "enc0_layers": ("int", 1, 4),  # plus "auto", tested below
    "enc1_layers": ("int", 1, 4),
}

# Spec §2.1 container defaults, as parsed values: name -> expected.
SPEC_DEFAULTS = {
    "enc_dim": 4096, "mlp_dim": 512, "mlp_activation": "linear", "mlp_layers": 2,
    "output_layer": "softmax", "optimizer": "adam", "learning_rate": 0.0004,
    "mini_batch_size": 32, "epochs": 30, "bucket_width": 0, "early_stopping_tolerance": 0.01,
    "early_stopping_patience": 3, "dropout": 0.0, "weight_decay": 0.0,
    "negative_sampling_rate": 0, "comparator_list": ("hadamard", "concat", "abs_diff"),
    "tied_token_embedding_weight": False, "token_embedding_storage_type": "dense",
    "num_classes": 2,
    "enc0_network": "hcnn", "enc0_token_embedding_dim": 300, "enc0_layers": 4,  # auto, hcnn
    "enc0_cnn_filter_width": 3, "enc0_pretrained_embedding_file": "",
    "enc0_freeze_pretrained_embedding": True, "enc0_vocab_file": "",
    "enc1_token_embedding_dim": 300, "enc1_layers": 4, "enc1_cnn_filter_width": 3,
    "enc1_pretrained_embedding_file": "", "enc1_freeze_pretrained_embedding": True,
    "enc1_vocab_file": "",
}

# Spec §2.2 enum values.
SPEC_ENUMS = {
    "enc0_network": ("hcnn", "bilstm", "pooled_embedding"),
    "enc1_network": ("enc0", "hcnn", "bilstm", "pooled_embedding"),
    "mlp_activation": ("tanh", "relu", "linear"),
    "output_layer": ("softmax", "mean_squared_error"),
    "optimizer": ("adadelta", "adagrad", "adam", "sgd", "rmsprop"),
    "token_embedding_storage_type": ("dense", "row_sparse"),
}


def value_of(cfg: C.Config, name: str):
    """A hyperparameter's resolved value, by its SageMaker name."""
    if name.startswith(("enc0_", "enc1_")):
        if name.endswith("_network") and name.startswith("enc1_") and cfg.enc1_is_enc0:
            return "enc0"
        enc = cfg.enc0 if name.startswith("enc0_") else cfg.enc1
        return getattr(enc, name[5:])
    return getattr(cfg, name)


def numbers_in(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)]


def edges():
    """(name, value, valid) for lowest/highest valid and just below/above each range."""
    for name, (kind, lo, hi) in SPEC_RANGES.items():
        if kind == "int":
            yield name, lo, True
            yield name, lo - 1, False
            if hi is None:
                yield name, 10**7, True  # unbounded above
            else:
                yield name, hi, True
                yield name, hi + 1, False
        else:
            yield name, lo, True
            yield name, lo * (1 - 1e-6) if lo > 0 else -1e-6, False
            yield name, hi, True
            yield name, hi * (1 + 1e-6), False


EDGES = list(edges())


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize("as_string", [True, False], ids=["string", "json"])
@pytest.mark.parametrize("name,value,valid", EDGES, ids=[f"{n}={v}" for n, v, _ in EDGES])
def test_range_edges(name, value, valid, as_string):
    raw = repr(value) if as_string and isinstance(value, float) else (str(value) if as_string else value)
    hp = {**SEPARATE, name: raw}
    if valid:
        cfg = from_hyperparameters(hp)
        got = value_of(cfg, name)
        assert got == value and type(got) is type(value)
    else:
        with pytest.raises(HyperparameterError) as exc:
            from_hyperparameters(hp)
        msg = str(exc.value)
        # The error names the hyperparameter, the rejected value and the valid range.
        line = next(ln for ln in msg.splitlines() if name in ln)
        assert str(raw) in line
        kind, lo, hi = SPEC_RANGES[name]
        nums = numbers_in(line.split("expected", 1)[1])
        assert any(math.isclose(n, lo, rel_tol=1e-9, abs_tol=0) for n in nums), line
        if hi is not None:
            assert any(math.isclose(n, hi, rel_tol=1e-9) for n in nums), line


def test_negative_sampling_rate_above_sdk_cap_is_valid():
    # Decision: docs say int >= 0; the SDK/UI cap of 100 is not applied.
    assert from_hyperparameters({**REQUIRED, "negative_sampling_rate": "101"}).negative_sampling_rate == 101


def test_mlp_layers_zero_is_valid():
    # Decision: docs allow 0 hidden layers; the SDK's minimum of 1 is not applied.
    assert from_hyperparameters({**REQUIRED, "mlp_layers": "0"}).mlp_layers == 0


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS))
def test_container_default(name):
    cfg = from_hyperparameters(REQUIRED)
    assert value_of(cfg, name) == SPEC_DEFAULTS[name]


def test_default_enc1_network_is_enc0():
    cfg = from_hyperparameters(REQUIRED)
    assert cfg.enc1_is_enc0 and cfg.enc1 == cfg.enc0
    assert cfg.to_hyperparameters()["enc1_network"] == "enc0"


@pytest.mark.parametrize("name", [n for n in SPEC_DEFAULTS if n.startswith("enc1_")])
def test_enc1_defaults_when_separate(name):
    cfg = from_hyperparameters({**SEPARATE, "enc0_token_embedding_dim": "16",
                                "enc0_cnn_filter_width": "5", "enc0_layers": "2",
                                "enc0_freeze_pretrained_embedding": "false"})
    # enc1's own defaults, not enc0's values.
    assert value_of(cfg, name) == SPEC_DEFAULTS[name]


def test_default_config_strings():
    hp = from_hyperparameters(REQUIRED).to_hyperparameters()
    assert hp["comparator_list"] == "hadamard, concat, abs_diff"
    assert hp["enc0_layers"] == "auto"
    assert hp["tied_token_embedding_weight"] == "false"
    assert hp["enc0_freeze_pretrained_embedding"] == "true"
    assert all(isinstance(v, str) for v in hp.values())


# ---------------------------------------------------------------- required keys


@pytest.mark.parametrize("missing", ["enc0_max_seq_len", "enc0_vocab_size"])
def test_required_key_missing(missing):
    hp = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(HyperparameterError, match=rf"{missing} is required"):
        from_hyperparameters(hp)


def test_both_required_keys_missing_reported_together():
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters({})
    assert "enc0_max_seq_len" in str(exc.value) and "enc0_vocab_size" in str(exc.value)


@pytest.mark.parametrize("network", ["hcnn", "bilstm", "pooled_embedding"])
@pytest.mark.parametrize("missing", ["enc1_max_seq_len", "enc1_vocab_size"])
def test_enc1_required_when_not_enc0(network, missing):
    hp = {k: v for k, v in {**SEPARATE, "enc1_network": network}.items() if k != missing}
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters(hp)
    assert missing in str(exc.value) and f"enc1_network={network}" in str(exc.value)


def test_enc1_keys_not_required_with_enc0():
    cfg = from_hyperparameters({**REQUIRED, "enc1_network": "enc0"})
    assert cfg.enc1.max_seq_len == 8 and cfg.enc1.vocab_size == 50


def test_invalid_enc1_network_gives_one_error_not_required_noise():
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters({**REQUIRED, "enc1_network": "enc00"})
    msg = str(exc.value)
    assert "enc1_network='enc00'" in msg and "enc0, hcnn, bilstm, pooled_embedding" in msg
    assert "required" not in msg


# ---------------------------------------------------------------- enums


ENUM_CASES = [(n, v) for n, vs in SPEC_ENUMS.items() for v in vs]


@pytest.mark.parametrize("name,value", ENUM_CASES, ids=[f"{n}={v}" for n, v in ENUM_CASES])
def test_enum_values_accepted_and_lower_cased(name, value):
    base = SEPARATE if name != "enc1_network" else REQUIRED
    if name == "enc1_network" and value != "enc0":
        base = {**REQUIRED, "enc1_max_seq_len": "8", "enc1_vocab_size": "50"}
    if name == "token_embedding_storage_type":
        base = {**base, "optimizer": "adam"}
    for raw in (value, value.upper(), f" {value.title()} "):
        assert value_of(from_hyperparameters({**base, name: raw}), name) == value


@pytest.mark.parametrize("name", sorted(SPEC_ENUMS))
def test_enum_invalid_names_choices(name):
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters({**SEPARATE, name: "nope"})
    line = next(ln for ln in str(exc.value).splitlines() if name in ln)
    assert "'nope'" in line and all(v in line for v in SPEC_ENUMS[name])


# ---------------------------------------------------------------- string parsing


@pytest.mark.parametrize("raw,expected", [
    ("true", True), ("True", True), ("TRUE", True), (" true ", True), (True, True),
    ("false", False), ("False", False), ("FALSE", False), (False, False),
])
def test_booleans(raw, expected):
    cfg = from_hyperparameters({**SEPARATE, "tied_token_embedding_weight": raw,
                                "enc0_freeze_pretrained_embedding": raw,
                                "enc1_freeze_pretrained_embedding": raw})
    assert cfg.tied_token_embedding_weight is expected
    assert cfg.enc0.freeze_pretrained_embedding is expected
    assert cfg.enc1.freeze_pretrained_embedding is expected


@pytest.mark.parametrize("raw", ["yes", "1", "0", "", "t", 1])
def test_boolean_invalid(raw):
    with pytest.raises(HyperparameterError, match="tied_token_embedding_weight=.*true or false"):
        from_hyperparameters({**REQUIRED, "tied_token_embedding_weight": raw})


@pytest.mark.parametrize("network,expected", [("hcnn", 4), ("bilstm", 1), ("pooled_embedding", 1)])
@pytest.mark.parametrize("raw", ["auto", "AUTO", " Auto "])
def test_layers_auto(network, expected, raw):
    cfg = from_hyperparameters({**REQUIRED, "enc0_network": network, "enc0_layers": raw})
    assert cfg.enc0.layers == expected and cfg.enc0.layers_auto
    assert cfg.to_hyperparameters()["enc0_layers"] == "auto"


@pytest.mark.parametrize("raw", ["2", "2.0", 2, 2.0])
def test_layers_explicit(raw):
    cfg = from_hyperparameters({**REQUIRED, "enc0_layers": raw})
    assert cfg.enc0.layers == 2 and not cfg.enc0.layers_auto
    assert cfg.to_hyperparameters()["enc0_layers"] == "2"


@pytest.mark.parametrize("raw", ["autox", "2.5", "", "none"])
def test_layers_invalid(raw):
    with pytest.raises(HyperparameterError, match=r"enc0_layers=.*'auto' or an integer in \[1, 4\]"):
        from_hyperparameters({**REQUIRED, "enc0_layers": raw})


@pytest.mark.parametrize("raw,expected", [
    ("hadamard, concat", ("hadamard", "concat")),
    (" abs_diff ,hadamard", ("abs_diff", "hadamard")),
    ("concat", ("concat",)),
    ("abs_diff,concat,hadamard", ("abs_diff", "concat", "hadamard")),
    ("HADAMARD", None),  # operator names are not lower-cased (only enum values are)
])
def test_comparator_list(raw, expected):
    if expected is None:
        with pytest.raises(HyperparameterError, match="comparator_list"):
            from_hyperparameters({**REQUIRED, "comparator_list": raw})
        return
    cfg = from_hyperparameters({**REQUIRED, "comparator_list": raw})
    assert cfg.comparator_list == expected  # listed order kept: it is the concat order


@pytest.mark.parametrize("raw", ["", " ", "hadamard,", "hadamard,,concat", "hadamard, dot",
                                 "hadamard, hadamard", "hadamard concat"])
def test_comparator_list_invalid(raw):
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters({**REQUIRED, "comparator_list": raw})
    msg = str(exc.value)
    assert f"comparator_list={raw!r}" in msg and "hadamard, concat, abs_diff" in msg


@pytest.mark.parametrize("raw", ["4", "4.0", " 4 ", 4, 4.0, "4e0"])
def test_integral_values_accepted_for_ints(raw):
    cfg = from_hyperparameters({**REQUIRED, "epochs": raw})
    assert cfg.epochs == 4 and type(cfg.epochs) is int


@pytest.mark.parametrize("raw", ["4.5", 4.5, "four", "", True, "nan", "inf", "0x10"])
def test_non_integral_values_rejected_for_ints(raw):
    with pytest.raises(HyperparameterError, match=r"epochs=.*an integer in \[1, 100\]"):
        from_hyperparameters({**REQUIRED, "epochs": raw})


@pytest.mark.parametrize("raw,expected", [("0.001", 0.001), (0.001, 0.001), ("1e-3", 0.001),
                                          (1, 1.0), ("1", 1.0)])
def test_floats(raw, expected):
    cfg = from_hyperparameters({**REQUIRED, "learning_rate": raw})
    assert cfg.learning_rate == expected and type(cfg.learning_rate) is float


@pytest.mark.parametrize("raw", ["nan", "inf", "fast", "", False])
def test_floats_invalid(raw):
    with pytest.raises(HyperparameterError, match="learning_rate="):
        from_hyperparameters({**REQUIRED, "learning_rate": raw})


@pytest.mark.parametrize("raw,ok", [("glove.840B.300d.txt", True), ("vocab_0.json", True), ("", True),
                                    ("dir/glove.txt", False), ("s3://bucket/glove.txt", False),
                                    ("glove-300.txt", False), ("gl ove.txt", False)])
def test_file_names(raw, ok):
    hp = {**REQUIRED, "enc0_pretrained_embedding_file": raw, "enc0_vocab_file": raw}
    if ok:
        cfg = from_hyperparameters(hp)
        assert cfg.enc0.pretrained_embedding_file == raw and cfg.enc0.vocab_file == raw
    else:
        with pytest.raises(HyperparameterError) as exc:
            from_hyperparameters(hp)
        assert "enc0_pretrained_embedding_file" in str(exc.value) and "enc0_vocab_file" in str(exc.value)


# ---------------------------------------------------------------- keys


def test_underscore_keys_ignored():
    hidden = {"_kvstore": "device", "_num_gpus": "auto", "_num_kv_servers": "auto",
              "_tuning_objective_metric": "", "_whatever": "x=1"}
    assert from_hyperparameters({**REQUIRED, **hidden}) == from_hyperparameters(REQUIRED)


@pytest.mark.parametrize("key,suggestion", [("learning_rte", "learning_rate"),
                                            ("enc0_vocab_sz", "enc0_vocab_size"),
                                            ("enc_dims", "enc_dim"),
                                            ("comparators_list", "comparator_list"),
                                            ("Epochs", "epochs")])
def test_unknown_key_suggests_closest(key, suggestion):
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters({**REQUIRED, key: "1"})
    assert f"unknown hyperparameter {key!r}; did you mean {suggestion!r}?" in str(exc.value)


def test_unknown_key_without_close_match():
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters({**REQUIRED, "zzz": "1"})
    assert "unknown hyperparameter 'zzz'" in str(exc.value) and "did you mean" not in str(exc.value)


def test_all_errors_reported_together():
    hp = {"enc0_max_seq_len": "0", "learning_rte": "0.1", "optimizer": "rmsprop",
          "token_embedding_storage_type": "row_sparse", "mlp_activation": "gelu",
          "dropout": "1.5", "comparator_list": "dot"}
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters(hp)
    msg = str(exc.value)
    for part in ("enc0_max_seq_len='0'", "learning_rte", "mlp_activation='gelu'", "dropout='1.5'",
                 "comparator_list='dot'", "enc0_vocab_size is required",
                 "optimizer='rmsprop' is invalid with token_embedding_storage_type=row_sparse"):
        assert part in msg
    assert len(msg.splitlines()) == 1 + 7  # header + one line per problem


def test_tied_error_reported_with_other_errors():
    hp = {**SEPARATE, "enc1_vocab_size": "60", "tied_token_embedding_weight": "true", "epochs": "0"}
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters(hp)
    assert "epochs='0'" in str(exc.value) and "tied_token_embedding_weight" in str(exc.value)


# ---------------------------------------------------------------- coupling rules


def test_issue_834_enc1_inherits_enc0_vocab(caplog):
    hp = {"enc0_max_seq_len": "8", "enc0_vocab_size": "2", "enc1_vocab_size": "3"}
    with caplog.at_level(logging.INFO, logger="o2v_jax"):
        cfg = from_hyperparameters(hp)
    assert cfg.enc1.vocab_size == 2
    assert "ignoring enc1_vocab_size=3" in caplog.text


def test_enc1_enc0_copies_every_encoder_setting(caplog):
    enc0 = {"enc0_network": "bilstm", "enc0_max_seq_len": "12", "enc0_vocab_size": "40",
            "enc0_cnn_filter_width": "5", "enc0_layers": "2", "enc0_token_embedding_dim": "16",
            "enc0_pretrained_embedding_file": "glove.txt",
            "enc0_freeze_pretrained_embedding": "false", "enc0_vocab_file": "vocab.json"}
    enc1 = {"enc1_max_seq_len": "6", "enc1_vocab_size": "30", "enc1_cnn_filter_width": "7",
            "enc1_layers": "3", "enc1_token_embedding_dim": "24",
            "enc1_pretrained_embedding_file": "other.txt",
            "enc1_freeze_pretrained_embedding": "true", "enc1_vocab_file": "other.json"}
    with caplog.at_level(logging.INFO, logger="o2v_jax"):
        cfg = from_hyperparameters({**enc0, **enc1, "enc1_network": "enc0"})
    assert cfg.enc1 == cfg.enc0
    assert cfg.enc1.network == "bilstm" and cfg.enc1.pretrained_embedding_file == "glove.txt"
    for key, value in enc1.items():
        assert f"{key}={value}" in caplog.text  # every ignored value is named


def test_enc1_enc0_equal_values_not_reported_as_ignored(caplog):
    hp = {**REQUIRED, "enc0_freeze_pretrained_embedding": "True",
          "enc1_freeze_pretrained_embedding": "true", "enc1_vocab_size": "50.0"}
    with caplog.at_level(logging.INFO, logger="o2v_jax"):
        from_hyperparameters(hp)
    assert "enc1_network=enc0" in caplog.text and "ignoring" not in caplog.text


def test_enc1_enc0_weights_separate_unless_tied():
    assert not from_hyperparameters(REQUIRED).tied_token_embedding_weight
    assert from_hyperparameters({**REQUIRED, "tied_token_embedding_weight": "true"}).tied_token_embedding_weight


def test_pooled_embedding_forces_token_dim(caplog):
    hp = {**REQUIRED, "enc0_network": "pooled_embedding", "enc_dim": "8"}
    with caplog.at_level(logging.INFO, logger="o2v_jax"):
        cfg = from_hyperparameters(hp)
    assert cfg.enc0.token_embedding_dim == 8 and cfg.enc1.token_embedding_dim == 8
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # enc1 inherits: said once, for enc0
    msg = warnings[0].getMessage()
    assert "Inconsistent enc_dim and token_embedding_dim" in msg and "8 vs 300" in msg and "enc0" in msg


def test_pooled_embedding_enc1_own_warning(caplog):
    hp = {**SEPARATE, "enc1_network": "pooled_embedding", "enc_dim": "8", "enc1_token_embedding_dim": "16"}
    with caplog.at_level(logging.WARNING, logger="o2v_jax"):
        cfg = from_hyperparameters(hp)
    assert cfg.enc1.token_embedding_dim == 8 and cfg.enc0.token_embedding_dim == 300  # hcnn keeps its own
    assert [r.getMessage() for r in caplog.records if "enc1" in r.getMessage() and "8 vs 16" in r.getMessage()]


def test_pooled_embedding_matching_dims_no_warning(caplog):
    hp = {**REQUIRED, "enc0_network": "pooled_embedding", "enc_dim": "16", "enc0_token_embedding_dim": "16"}
    with caplog.at_level(logging.WARNING, logger="o2v_jax"):
        cfg = from_hyperparameters(hp)
    assert cfg.enc0.token_embedding_dim == 16 and not caplog.records


@pytest.mark.parametrize("optimizer", ["rmsprop", "adadelta"])
def test_row_sparse_rejects_optimizer(optimizer):
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters({**REQUIRED, "token_embedding_storage_type": "row_sparse", "optimizer": optimizer})
    msg = str(exc.value)
    assert f"optimizer={optimizer!r}" in msg and "row_sparse" in msg and "adam, adagrad, sgd" in msg


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "sgd"])
def test_row_sparse_accepts_optimizer(optimizer):
    cfg = from_hyperparameters({**REQUIRED, "token_embedding_storage_type": "row_sparse", "optimizer": optimizer})
    assert cfg.row_sparse and cfg.optimizer == optimizer


@pytest.mark.parametrize("optimizer", ["rmsprop", "adadelta"])
def test_dense_accepts_every_optimizer(optimizer):
    assert not from_hyperparameters({**REQUIRED, "optimizer": optimizer}).row_sparse


def test_row_sparse_forces_bucket_width_zero(caplog):
    hp = {**REQUIRED, "token_embedding_storage_type": "row_sparse", "bucket_width": "10"}
    with caplog.at_level(logging.WARNING, logger="o2v_jax"):
        cfg = from_hyperparameters(hp)
    assert cfg.bucket_width == 0
    assert any("bucket_width" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_dense_keeps_bucket_width(caplog):
    with caplog.at_level(logging.WARNING, logger="o2v_jax"):
        assert from_hyperparameters({**REQUIRED, "bucket_width": "10"}).bucket_width == 10
    assert not caplog.records


def test_num_classes_ignored_for_regression(caplog):
    hp = {**REQUIRED, "output_layer": "mean_squared_error", "num_classes": "5"}
    with caplog.at_level(logging.INFO, logger="o2v_jax"):
        cfg = from_hyperparameters(hp)
    assert cfg.is_regression and cfg.num_outputs == 1 and cfg.validation_metric == "mean_squared_error"
    assert "num_classes=5 is ignored" in caplog.text


def test_num_classes_used_for_softmax():
    cfg = from_hyperparameters({**REQUIRED, "num_classes": "5"})
    assert not cfg.is_regression and cfg.num_outputs == 5 and cfg.validation_metric == "cross_entropy"


@pytest.mark.parametrize("extra,bad_key", [
    ({"enc1_vocab_size": "60"}, "vocab_size"),
    ({"enc1_token_embedding_dim": "32"}, "token_embedding_dim"),
])
def test_tied_requires_equal_tables(extra, bad_key):
    hp = {**SEPARATE, "tied_token_embedding_weight": "true", **extra}
    with pytest.raises(HyperparameterError) as exc:
        from_hyperparameters(hp)
    assert f"enc0_{bad_key}" in str(exc.value) and f"enc1_{bad_key}" in str(exc.value)
    # Same map without tying is fine: separate tables may differ.
    from_hyperparameters({**hp, "tied_token_embedding_weight": "false"})


def test_tied_compares_resolved_pooled_dims():
    # enc0 pooled: token dim forced to enc_dim=16, equal to enc1's explicit 16.
    hp = {**SEPARATE, "enc0_network": "pooled_embedding", "enc_dim": "16",
          "enc1_token_embedding_dim": "16", "tied_token_embedding_weight": "true"}
    cfg = from_hyperparameters(hp)
    assert cfg.enc0.token_embedding_dim == cfg.enc1.token_embedding_dim == 16


def test_separate_encoders_keep_own_settings():
    hp = {**SEPARATE, "enc1_network": "bilstm", "enc1_vocab_size": "60", "enc1_max_seq_len": "4"}
    cfg = from_hyperparameters(hp)
    assert not cfg.enc1_is_enc0 and cfg.encoders == (cfg.enc0, cfg.enc1)
    assert (cfg.enc1.network, cfg.enc1.vocab_size, cfg.enc1.max_seq_len, cfg.enc1.layers) == ("bilstm", 60, 4, 1)
    assert (cfg.enc0.network, cfg.enc0.vocab_size, cfg.enc0.layers) == ("hcnn", 50, 4)


# ---------------------------------------------------------------- round trip, replace


ROUND_TRIP = [
    REQUIRED,
    {**REQUIRED, "enc0_network": "pooled_embedding", "enc_dim": "8", "mlp_dim": "8", "mini_batch_size": "4"},
    {**SEPARATE, "enc1_network": "bilstm", "enc1_layers": "3", "enc0_layers": "auto",
     "comparator_list": " abs_diff ,hadamard", "learning_rate": "1e-6", "dropout": "0.25"},
    {**REQUIRED, "output_layer": "mean_squared_error", "token_embedding_storage_type": "row_sparse",
     "optimizer": "SGD", "bucket_width": "7", "negative_sampling_rate": "3",
     "tied_token_embedding_weight": "True", "enc0_pretrained_embedding_file": "glove.txt",
     "enc0_vocab_file": "vocab.json", "enc0_freeze_pretrained_embedding": "FALSE", "weight_decay": "0.5"},
    {**REQUIRED, "enc1_vocab_size": "3", "enc1_network": "enc0", "epochs": "4.0", "mlp_layers": 0},
]


@pytest.mark.parametrize("hp", ROUND_TRIP)
def test_round_trip(hp):
    cfg = from_hyperparameters(hp)
    out = cfg.to_hyperparameters()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())
    assert from_hyperparameters(out) == cfg
    assert json.loads(cfg.to_json()) == out
    assert from_hyperparameters(json.loads(cfg.to_json())) == cfg


def test_config_is_frozen():
    cfg = from_hyperparameters(REQUIRED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3


def test_replace_changes_and_revalidates():
    cfg = from_hyperparameters(REQUIRED)
    new = cfg.replace(learning_rate=0.01, epochs=5, tied_token_embedding_weight=True)
    assert (new.learning_rate, new.epochs, new.tied_token_embedding_weight) == (0.01, 5, True)
    assert cfg.epochs == 30  # the original is untouched
    assert new.replace(learning_rate=0.0004, epochs=30, tied_token_embedding_weight=False) == cfg
    with pytest.raises(HyperparameterError, match="epochs='0'"):
        cfg.replace(epochs=0)
    with pytest.raises(HyperparameterError, match="did you mean 'epochs'"):
        cfg.replace(epoch=5)


def test_replace_enc0_setting_carries_to_inherited_enc1(caplog):
    cfg = from_hyperparameters(REQUIRED)
    with caplog.at_level(logging.INFO, logger="o2v_jax"):
        new = cfg.replace(enc0_vocab_size=100)
    assert new.enc0.vocab_size == new.enc1.vocab_size == 100
    assert "ignoring" not in caplog.text


def test_replace_enc1_network_starts_from_enc0_values():
    cfg = from_hyperparameters({**REQUIRED, "enc0_vocab_size": "40"})
    new = cfg.replace(enc1_network="bilstm")
    assert not new.enc1_is_enc0 and new.enc1.network == "bilstm" and new.enc1.vocab_size == 40


# ---------------------------------------------------------------- files and overrides


def sagemaker_file(tmp_path, data) -> str:
    path = tmp_path / "hyperparameters.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_load_sagemaker_file(tmp_path):
    # SageMaker writes every value as a string, hidden keys included.
    path = sagemaker_file(tmp_path, {"enc0_max_seq_len": "8", "enc0_vocab_size": "50",
                                     "epochs": "10", "tied_token_embedding_weight": "True",
                                     "comparator_list": "hadamard, concat", "_kvstore": "device",
                                     "_num_gpus": "auto", "enc0_layers": "auto"})
    cfg = load_hyperparameters(path)
    assert (cfg.epochs, cfg.tied_token_embedding_weight, cfg.comparator_list) == (10, True, ("hadamard", "concat"))


def test_load_overrides_win(tmp_path):
    path = sagemaker_file(tmp_path, {**REQUIRED, "epochs": "10", "optimizer": "sgd"})
    cfg = load_hyperparameters(path, ["epochs=5", "comparator_list=hadamard, abs_diff"])
    assert cfg.epochs == 5 and cfg.optimizer == "sgd"
    assert cfg.comparator_list == ("hadamard", "abs_diff")


def test_load_overrides_only():
    cfg = load_hyperparameters(None, ["enc0_max_seq_len=8", "enc0_vocab_size=50"])
    assert cfg == from_hyperparameters(REQUIRED)


def test_override_value_keeps_equals_and_spaces():
    assert C.parse_overrides(["a=b=c", " comparator_list = hadamard, concat", "x="]) == {
        "a": "b=c", "comparator_list": " hadamard, concat", "x": ""}
    # The whole value after the first '=' reaches the parser (and is named in the error).
    with pytest.raises(HyperparameterError, match="enc0_vocab_file='a=b c'"):
        load_hyperparameters(None, [*(f"{k}={v}" for k, v in REQUIRED.items()), "enc0_vocab_file=a=b c"])


@pytest.mark.parametrize("pair", ["epochs", "=5", " =5"])
def test_override_without_key_value(pair):
    with pytest.raises(HyperparameterError, match="expected key=value"):
        load_hyperparameters(None, [pair])


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(HyperparameterError, match=re.escape(str(path))):
        load_hyperparameters(path)


def test_load_invalid_json(tmp_path):
    path = sagemaker_file(tmp_path, '{\n  "epochs": "3",\n  oops\n}')
    with pytest.raises(HyperparameterError) as exc:
        load_hyperparameters(path)
    assert f"{path}:3" in str(exc.value) and "not valid JSON" in str(exc.value)


@pytest.mark.parametrize("data", [["epochs", "3"], "3", None])
def test_load_non_object_json(tmp_path, data):
    path = sagemaker_file(tmp_path, json.dumps(data))
    with pytest.raises(HyperparameterError) as exc:
        load_hyperparameters(path)
    assert path in str(exc.value) and "JSON object" in str(exc.value)


def test_load_directory(tmp_path):
    with pytest.raises(HyperparameterError, match=re.escape(str(tmp_path))):
        load_hyperparameters(tmp_path)


def test_load_errors_from_file_values(tmp_path):
    path = sagemaker_file(tmp_path, {**REQUIRED, "enc_dim": "2"})
    with pytest.raises(HyperparameterError, match=r"enc_dim='2' is invalid: expected an integer in \[4, 10000\]"):
        load_hyperparameters(path)


def test_format_config_lines():
    text = C.format_config(from_hyperparameters(REQUIRED))
    assert "enc_dim=4096" in text.splitlines() and "optimizer=adam" in text.splitlines()


# --------------------------------------------------------------------------- o2v extensions


def test_extensions_stay_out_of_sagemaker_maps():
    # A map that never names an extension resolves to exactly SageMaker's keys.
    hp = from_hyperparameters(REQUIRED).to_hyperparameters()
    assert "objective" not in hp and "contrastive_temperature" not in hp
    assert set(hp) == {k for k, spec in C.SPECS.items() if not spec.extension}
    # A temperature set with objective=pair is news, so it is kept (and round-trips).
    cfg = from_hyperparameters({**REQUIRED, "contrastive_temperature": "0.2"})
    assert cfg.to_hyperparameters()["contrastive_temperature"] == "0.2"
    assert from_hyperparameters(cfg.to_hyperparameters()) == cfg


def test_contrastive_sets_its_defaults_for_unset_keys_only():
    cfg = from_hyperparameters({**REQUIRED, "objective": "contrastive"})
    pair = from_hyperparameters(REQUIRED)
    resolved = cfg.to_hyperparameters()
    for key, value in C.CONTRASTIVE_DEFAULTS.items():  # written as the resolved map writes them
        assert resolved[key] == value != pair.to_hyperparameters()[key]
    assert resolved["objective"] == "contrastive" and "contrastive_temperature" in resolved
    assert cfg.validation_metric == "mrr" and pair.validation_metric == "cross_entropy"
    # A key the map sets keeps its value; the round trip gives the same Config.
    assert from_hyperparameters({**REQUIRED, "objective": "contrastive",
                                 "mini_batch_size": "7"}).mini_batch_size == 7
    assert from_hyperparameters(resolved) == cfg


@pytest.mark.parametrize("key, value, message", [
    ("output_layer", "mean_squared_error", "output_layer=mean_squared_error is invalid with "
                                           "objective=contrastive: expected softmax"),
    ("num_classes", "3", "num_classes=3 is invalid with objective=contrastive: expected 2"),
])
def test_contrastive_needs_two_class_labels(key, value, message):
    with pytest.raises(HyperparameterError, match=re.escape(message)):
        from_hyperparameters({**REQUIRED, "objective": "contrastive", key: value})


def test_contrastive_keeps_separate_tables_when_encoders_differ():
    cfg = from_hyperparameters({**SEPARATE, "objective": "contrastive", "enc1_vocab_size": "60"})
    assert not cfg.tied_token_embedding_weight
    with pytest.raises(HyperparameterError, match="tied_token_embedding_weight=true needs one"):
        from_hyperparameters({**SEPARATE, "objective": "contrastive", "enc1_vocab_size": "60",
                              "tied_token_embedding_weight": "true"})
