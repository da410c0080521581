"""Hyperparameters: SageMaker Object2Vec names, ranges, defaults and coupling rules.

SageMaker passes hyperparameters as a string -> string map (spec §2). This module owns
the one table of every hyperparameter (name, type, valid range, container default,
spec §2.1-§2.2), parses a map into a frozen, validated :class:`Config`, applies the
coupling rules of spec §2.4, and turns a :class:`Config` back into the resolved map
that is printed at start-up and stored with the model.

A few hyperparameters are o2v extensions, not SageMaker's (``Spec.extension``; docs/
hyperparameters.md, "o2v extensions"): SageMaker's names, defaults and behaviour are
unchanged while they keep their defaults, and a resolved map names them only when
they are in use, so maps of SageMaker models stay exactly what they were.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("o2v_jax")

NETWORKS = ("hcnn", "bilstm", "pooled_embedding")
COMPARATORS = ("hadamard", "concat", "abs_diff")
ACTIVATIONS = ("tanh", "relu", "linear")
OUTPUT_LAYERS = ("softmax", "mean_squared_error")
OPTIMIZERS = ("adadelta", "adagrad", "adam", "sgd", "rmsprop")
STORAGE_TYPES = ("dense", "row_sparse")
OBJECTIVES = ("pair", "contrastive")  # o2v extension (issue 21); pair is SageMaker's
# Optimizers MXNet can run with lazy row-wise updates (spec §2.2, row_sparse).
ROW_SPARSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
# `layers=auto` per network (spec §2.2: 4 for hcnn, 1 for bilstm; pooled ignores it).
AUTO_LAYERS = {"hcnn": 4, "bilstm": 1, "pooled_embedding": 1}
_FILE_NAME = re.compile(r"[A-Za-z0-9._]*")


class HyperparameterError(ValueError):
    """A hyperparameter map that SageMaker Object2Vec would reject."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """One hyperparameter: its kind, valid values and container default (None = required)."""

    kind: str  # "int" | "float" | "bool" | "choice" | "layers" | "file" | "comparators"
    default: str | None
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    extension: bool = False  # an o2v extension, not one of SageMaker's hyperparameters

    def describe(self) -> str:
        if self.kind in ("int", "float"):
            hi = "inf" if self.hi is None else _num(self.hi)
            return f"{'an integer' if self.kind == 'int' else 'a number'} in [{_num(self.lo)}, {hi}]"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "layers":
            return "'auto' or an integer in [1, 4]"
        if self.kind == "file":
            return "a file name made of letters, digits, '.' and '_'"
        return "a comma-separated list of " + ", ".join(COMPARATORS)


def _num(x: float | None) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() and abs(x) >= 1 else repr(x))


def _encoder_specs(prefix: str, network_choices: tuple[str, ...], network_default: str) -> dict[str, Spec]:
    return {
        f"{prefix}_max_seq_len": Spec("int", None, 1, 5000),
        f"{prefix}_vocab_size": Spec("int", None, 2, 3_000_000),
        f"{prefix}_network": Spec("choice", network_default, choices=network_choices),
        f"{prefix}_cnn_filter_width": Spec("int", "3", 1, 9),
        f"{prefix}_layers": Spec("layers", "auto"),
        f"{prefix}_token_embedding_dim": Spec("int", "300", 2, 1000),
        f"{prefix}_pretrained_embedding_file": Spec("file", ""),
        f"{prefix}_freeze_pretrained_embedding": Spec("bool", "true"),
        f"{prefix}_vocab_file": Spec("file", ""),
    }


# The table: every documented hyperparameter with the container's default (spec §2.1).
SPECS: dict[str, Spec] = {
    **_encoder_specs("enc0", NETWORKS, "hcnn"),
    **_encoder_specs("enc1", ("enc0",) + NETWORKS, "enc0"),
    "enc_dim": Spec("int", "4096", 4, 10000),
    "comparator_list": Spec("comparators", "hadamard, concat, abs_diff"),
    "mlp_layers": Spec("int", "2", 0, 10),
    "mlp_dim": Spec("int", "512", 2, 10000),
    "mlp_activation": Spec("choice", "linear", choices=ACTIVATIONS),
    "output_layer": Spec("choice", "softmax", choices=OUTPUT_LAYERS),
    "num_classes": Spec("int", "2", 2, 30),
    "dropout": Spec("float", "0", 0.0, 1.0),
    "epochs": Spec("int", "30", 1, 100),
    "mini_batch_size": Spec("int", "32", 1, 10000),
    "learning_rate": Spec("float", "0.0004", 1e-6, 1.0),
    "optimizer": Spec("choice", "adam", choices=OPTIMIZERS),
    "weight_decay": Spec("float", "0", 0.0, 10000.0),
    "early_stopping_patience": Spec("int", "3", 1, 5),
    "early_stopping_tolerance": Spec("float", "0.01", 1e-6, 0.1),
    "bucket_width": Spec("int", "0", 0, 100),
    # The docs give no upper bound (the SDK caps at 100); we follow the docs.
    "negative_sampling_rate": Spec("int", "0", 0, None),
    "tied_token_embedding_weight": Spec("bool", "false"),
    "token_embedding_storage_type": Spec("choice", "dense", choices=STORAGE_TYPES),
    # o2v extensions (docs/hyperparameters.md, "o2v extensions").
    "objective": Spec("choice", "pair", choices=OBJECTIVES, extension=True),
    "contrastive_temperature": Spec("float", "0.05", 0.001, 10.0, extension=True),
}

# objective=contrastive: the defaults of the keys a map does not set, chosen on the
# validation split by benchmarks/tune_retrieval.py (docs/hyperparameters.md, "o2v
# extensions", gives each one's reason). Keys the map sets keep their value.
CONTRASTIVE_DEFAULTS: dict[str, str] = {
    "enc0_network": "pooled_embedding", "enc_dim": "1000",
    "enc0_token_embedding_dim": "1000", "enc1_token_embedding_dim": "1000",
    "tied_token_embedding_weight": "true", "mini_batch_size": "256",
    "learning_rate": "0.001", "epochs": "4", "dropout": "0.3",
}

# Encoder settings that `enc1_network=enc0` copies from enc0 (spec §2.4, issue #834).
_ENCODER_KEYS = ("max_seq_len", "vocab_size", "network", "cnn_filter_width", "layers",
                 "token_embedding_dim", "pretrained_embedding_file",
                 "freeze_pretrained_embedding", "vocab_file")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """One encoder's resolved settings (enc1 already inherited from enc0 if asked)."""

    network: str  # hcnn | bilstm | pooled_embedding
    max_seq_len: int  # longer sequences are truncated
    vocab_size: int  # token ids must be in [0, vocab_size); 0 is padding
    token_embedding_dim: int  # D; equals enc_dim for pooled_embedding
    layers: int  # resolved from "auto" (hcnn 4, bilstm 1, pooled 1)
    cnn_filter_width: int  # hcnn kernel width
    pretrained_embedding_file: str  # file name in the auxiliary channel, "" = none
    freeze_pretrained_embedding: bool  # pretrained rows never change when true
    vocab_file: str  # token -> id JSON in the auxiliary channel, "" = none
    layers_auto: bool = True  # whether `layers` came from "auto" (for round-tripping)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The full, validated Object2Vec configuration. Build it with :func:`from_hyperparameters`."""

    enc0: EncoderConfig
    enc1: EncoderConfig
    enc1_is_enc0: bool  # enc1_network=enc0 was given (enc1 copies enc0's settings)
    enc_dim: int  # H, output size of each encoder
    comparator_list: tuple[str, ...]  # applied and concatenated in this order
    mlp_layers: int
    mlp_dim: int
    mlp_activation: str
    output_layer: str  # softmax | mean_squared_error
    num_classes: int  # ignored for regression
    dropout: float
    epochs: int
    mini_batch_size: int
    learning_rate: float
    optimizer: str
    weight_decay: float
    early_stopping_patience: int
    early_stopping_tolerance: float
    bucket_width: int
    negative_sampling_rate: int
    tied_token_embedding_weight: bool
    token_embedding_storage_type: str
    objective: str  # pair (SageMaker's classifier) | contrastive (in-batch ranking)
    contrastive_temperature: float  # softmax temperature of objective=contrastive

    @property
    def encoders(self) -> tuple[EncoderConfig, EncoderConfig]:
        return (self.enc0, self.enc1)

    @property
    def is_regression(self) -> bool:
        return self.output_layer == "mean_squared_error"

    @property
    def num_outputs(self) -> int:
        """Width of the output layer: num_classes for softmax, 1 for regression."""
        return 1 if self.is_regression else self.num_classes

    @property
    def row_sparse(self) -> bool:
        return self.token_embedding_storage_type == "row_sparse"

    @property
    def validation_metric(self) -> str:
        """The validation metric early stopping watches (spec §4.8): a loss, or the
        retrieval MRR for objective=contrastive (metrics.stopping_loss turns it into one)."""
        if self.objective == "contrastive":
            return "mrr"
        return "mean_squared_error" if self.is_regression else "cross_entropy"

    def to_hyperparameters(self) -> dict[str, str]:
        """The resolved configuration as a SageMaker string map (round-trips)."""
        out: dict[str, str] = {}
        for name, enc in (("enc0", self.enc0), ("enc1", self.enc1)):
            for key in _ENCODER_KEYS:
                value = getattr(enc, key)
                if key == "layers" and enc.layers_auto:
                    value = "auto"
                out[f"{name}_{key}"] = _to_str(value)
        if self.enc1_is_enc0:
            out["enc1_network"] = "enc0"
        for f in dataclasses.fields(self):
            if f.name in ("enc0", "enc1", "enc1_is_enc0"):
                continue
            value = getattr(self, f.name)
            spec = SPECS[f.name]
            if spec.extension and self.objective == "pair" and value == _parse(f.name, spec, spec.default):
                continue  # not in use: the map stays SageMaker's
            out[f.name] = ", ".join(value) if f.name == "comparator_list" else _to_str(value)
        return dict(sorted(out.items()))

    def to_json(self) -> str:
        return json.dumps(self.to_hyperparameters(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> Config:
        """A re-validated copy with some hyperparameters changed (SageMaker names)."""
        hp = self.to_hyperparameters()
        if self.enc1_is_enc0 and str(changes.get("enc1_network", "enc0")).strip().lower() == "enc0":
            # enc1's values are copies of enc0's: drop them so enc1 follows a changed enc0
            # without logging them as "ignored" (they would look like user-set values).
            hp = {k: v for k, v in hp.items() if not k.startswith("enc1_") or k == "enc1_network"}
        hp.update({k: _to_str(v) for k, v in changes.items()})
        return from_hyperparameters(hp)


def _to_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse(name: str, spec: Spec, raw: str) -> Any:
    """Parse one raw string per its spec; raises HyperparameterError naming the value."""
    text = raw.strip()

    def bad() -> HyperparameterError:
        return HyperparameterError(f"{name}={raw!r} is invalid: expected {spec.describe()}")

    if spec.kind in ("int", "layers"):
        if spec.kind == "layers" and text.lower() == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise bad() from None
        # SageMaker's UIs send "4.0" for integers from a float field; accept exact ones.
        if not math.isfinite(value) or not value.is_integer():
            raise bad()
        value = int(value)
        lo, hi = (1, 4) if spec.kind == "layers" else (spec.lo, spec.hi)
        if value < lo or (hi is not None and value > hi):
            raise bad()
        return value
    if spec.kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise bad() from None
        if not math.isfinite(value) or value < spec.lo or (spec.hi is not None and value > spec.hi):
            raise bad()
        return value
    if spec.kind == "bool":
        lowered = text.lower()
        if lowered not in ("true", "false"):
            raise bad()
        return lowered == "true"
    if spec.kind == "choice":
        if text not in spec.choices:
            lowered = text.lower()
            if lowered in spec.choices:  # the container lower-cases enum values
                return lowered
            raise bad()
        return text
    if spec.kind == "file":
        if not _FILE_NAME.fullmatch(text):
            raise bad()
        return text
    # comparators: split on ',', strip spaces, each a known operator, no repeats.
    parts = [p.strip() for p in text.split(",")]
    if not text or any(p not in COMPARATORS for p in parts) or len(set(parts)) != len(parts):
        raise bad()
    return tuple(parts)


def _resolve_encoder(src: str, values: Mapping[str, Any]) -> EncoderConfig | None:
    """Encoder settings from the ``{src}_*`` values; None when one of them is invalid."""
    if "enc_dim" not in values or any(f"{src}_{k}" not in values for k in _ENCODER_KEYS):
        return None
    network = values[f"{src}_network"]
    layers = values[f"{src}_layers"]
    # pooled_embedding averages token vectors, so they must already be enc_dim wide.
    token_dim = values["enc_dim"] if network == "pooled_embedding" else values[f"{src}_token_embedding_dim"]
    return EncoderConfig(
        network=network,
        max_seq_len=values[f"{src}_max_seq_len"],
        vocab_size=values[f"{src}_vocab_size"],
        token_embedding_dim=token_dim,
        layers=AUTO_LAYERS[network] if layers == "auto" else layers,
        layers_auto=layers == "auto",
        cnn_filter_width=values[f"{src}_cnn_filter_width"],
        pretrained_embedding_file=values[f"{src}_pretrained_embedding_file"],
        freeze_pretrained_embedding=values[f"{src}_freeze_pretrained_embedding"],
        vocab_file=values[f"{src}_vocab_file"],
    )


def _accept_coupled_token_dims(coupled: Mapping[str, tuple[int, str]], values: dict[str, Any],
                               errors: list[str], enc1_is_enc0: bool) -> None:
    """Accept an out-of-range ``encX_token_embedding_dim`` that equals ``enc_dim`` on a
    pooled_embedding encoder: it is the value the coupling rule sets (spec §2.4), so the
    resolved map every model directory stores is valid input (docs/hyperparameters.md,
    "Resolved maps are valid input"). The range error stands for anything else."""
    kept = {}
    for name, (at, raw) in coupled.items():
        side = "enc0" if name.startswith("enc1") and enc1_is_enc0 else name[:4]
        try:
            value = _parse(name, dataclasses.replace(SPECS[name], hi=None), raw)
        except HyperparameterError:
            continue
        if values.get(f"{side}_network") == "pooled_embedding" and value == values.get("enc_dim"):
            values[name] = value
            kept[at] = True
    # Remove accepted errors back to front so the recorded positions stay valid.
    for at in sorted(kept, reverse=True):
        del errors[at]


def _contrastive_rules(given: Mapping[str, str], values: dict[str, Any], errors: list[str],
                       enc0: EncoderConfig | None, enc1: EncoderConfig | None) -> None:
    """objective=contrastive's coupling rules (docs/hyperparameters.md, "o2v extensions")."""
    # Labels are read as 1 = positive pair, 0 = hard negative: the softmax rule with two
    # classes is exactly that check.
    for name, needed in (("output_layer", "softmax"), ("num_classes", 2)):
        if name in values and values[name] != needed:
            errors.append(f"{name}={values[name]} is invalid with objective=contrastive: "
                          f"expected {needed} (labels are 1 = positive pair, 0 = negative)")
    # The tied table is only a default: encoders with different tables keep their own.
    if "tied_token_embedding_weight" not in given and enc0 and enc1 and any(
            getattr(enc0, k) != getattr(enc1, k) for k in ("vocab_size", "token_embedding_dim")):
        log.info("objective=contrastive: enc0 and enc1 have different token tables, so "
                 "tied_token_embedding_weight stays false")
        values["tied_token_embedding_weight"] = False


def from_hyperparameters(mapping: Mapping[str, Any]) -> Config:
    """Validate a SageMaker hyperparameter map and resolve it into a :class:`Config`.

    Values may be strings (as SageMaker passes them) or JSON scalars. Keys starting with
    ``_`` (``_kvstore``, ``_num_gpus``, ...) are accepted and ignored. All problems are
    collected and reported together in one :class:`HyperparameterError`.
    """
    errors: list[str] = []
    given: dict[str, str] = {}
    for key, value in mapping.items():
        key = str(key)
        if key.startswith("_"):
            continue
        if key not in SPECS:
            close = difflib.get_close_matches(key, SPECS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.append(f"unknown hyperparameter {key!r}{hint}")
            continue
        given[key] = _to_str(value) if not isinstance(value, str) else value

    values: dict[str, Any] = {}
    # Token dims outside the user-facing range wait for the networks and enc_dim: a
    # pooled_embedding encoder's may be the value its coupling rule sets (see below).
    coupled: dict[str, tuple[int, str]] = {}
    defaults = {name: spec.default for name, spec in SPECS.items()}
    contrastive = given.get("objective", "").strip().lower() == "contrastive"
    if contrastive:
        defaults.update(CONTRASTIVE_DEFAULTS)
    for name, spec in SPECS.items():
        raw = given.get(name, defaults[name])
        if raw is None:
            continue
        try:
            values[name] = _parse(name, spec, raw)
        except HyperparameterError as e:
            if name.endswith("_token_embedding_dim"):
                coupled[name] = (len(errors), raw)
            errors.append(str(e))

    for name in ("enc0_max_seq_len", "enc0_vocab_size"):
        if name not in given:
            errors.append(f"{name} is required: expected {SPECS[name].describe()}")
    enc1_is_enc0 = values.get("enc1_network") == "enc0"
    _accept_coupled_token_dims(coupled, values, errors, enc1_is_enc0)
    # An invalid enc1_network is already reported; don't pile "required" errors on it.
    if "enc1_network" in values and not enc1_is_enc0:
        for name in ("enc1_max_seq_len", "enc1_vocab_size"):
            if name not in given:
                errors.append(f"{name} is required when enc1_network={values['enc1_network']}: "
                              f"expected {SPECS[name].describe()}")

    # Coupling rules are checked before raising, wherever their inputs parsed, so one
    # run reports every problem (spec §2.4).
    if values.get("token_embedding_storage_type") == "row_sparse":
        if "optimizer" in values and values["optimizer"] not in ROW_SPARSE_OPTIMIZERS:
            errors.append(f"optimizer={values['optimizer']!r} is invalid with "
                          f"token_embedding_storage_type=row_sparse: expected one of "
                          f"{', '.join(ROW_SPARSE_OPTIMIZERS)}")
    enc0, enc1 = (_resolve_encoder("enc0" if enc1_is_enc0 else name, values)
                  for name in ("enc0", "enc1"))
    if contrastive:
        _contrastive_rules(given, values, errors, enc0, enc1)
    if values.get("tied_token_embedding_weight") and enc0 and enc1:
        for key in ("vocab_size", "token_embedding_dim"):
            if getattr(enc0, key) != getattr(enc1, key):
                errors.append(f"tied_token_embedding_weight=true needs one token table: "
                              f"enc0_{key}={getattr(enc0, key)} and enc1_{key}="
                              f"{getattr(enc1, key)} must be equal")
    if errors:
        raise HyperparameterError("invalid hyperparameters:\n  " + "\n  ".join(errors))

    if enc1_is_enc0:
        # Name only the enc1_* values that differ from enc0's: those are the surprise.
        # Compare parsed values, so "True" vs "true" or "4" vs "4.0" is no difference.
        overridden = [f"enc1_{k}={given[f'enc1_{k}']}" for k in _ENCODER_KEYS
                      if k != "network" and f"enc1_{k}" in given
                      and values[f"enc1_{k}"] != values[f"enc0_{k}"]]
        log.info("enc1_network=enc0: enc1 uses enc0's network and all enc0_* settings "
                 "(weights are separate unless tied_token_embedding_weight=true)%s",
                 f"; ignoring {', '.join(overridden)}" if overridden else "")
    for name in ("enc0",) if enc1_is_enc0 else ("enc0", "enc1"):
        if values[f"{name}_network"] == "pooled_embedding" \
                and values[f"{name}_token_embedding_dim"] != values["enc_dim"]:
            # SageMaker does the same, with a similar log line (spec §2.4, LOG-934).
            log.warning("Inconsistent enc_dim and token_embedding_dim found for %s "
                        "(pooled_embedding): %d vs %d. Setting token embedding dim to be %d",
                        name, values["enc_dim"], values[f"{name}_token_embedding_dim"],
                        values["enc_dim"])
    if values["token_embedding_storage_type"] == "row_sparse" and values["bucket_width"] != 0:
        log.warning("token_embedding_storage_type=row_sparse disables bucket_width "
                    "(was %d); using the default length ladder", values["bucket_width"])
        values["bucket_width"] = 0
    # Only a non-default value is news: resolved maps (saved models) always carry the key.
    if (values["output_layer"] == "mean_squared_error" and "num_classes" in given
            and values.get("num_classes") != int(SPECS["num_classes"].default)):
        log.info("num_classes=%s is ignored for output_layer=mean_squared_error", given["num_classes"])

    return Config(
        enc0=enc0, enc1=enc1, enc1_is_enc0=enc1_is_enc0,
        **{f.name: values[f.name] for f in dataclasses.fields(Config)
           if f.name not in ("enc0", "enc1", "enc1_is_enc0")},
    )


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> dict; the value may contain '=' and spaces."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HyperparameterError(f"override {pair!r} is invalid: expected key=value")
        out[key.strip()] = value
    return out


def load_hyperparameters(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a SageMaker ``hyperparameters.json`` (optional) and apply ``key=value`` overrides."""
    mapping: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise HyperparameterError(f"{path}: hyperparameters file not found") from None
        except json.JSONDecodeError as e:
            raise HyperparameterError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not UTF-8
            raise HyperparameterError(f"{path}: cannot read hyperparameters file: {e}") from None
        if not isinstance(data, dict):
            raise HyperparameterError(f"{path}: expected a JSON object of name -> value, "
                                      f"got {type(data).__name__}")
        mapping.update(data)
    mapping.update(parse_overrides(overrides))
    return from_hyperparameters(mapping)


def format_config(config: Config) -> str:
    """The resolved configuration, one ``name=value`` per line, as printed at start-up."""
    return "\n".join(f"{k}={v}" for k, v in config.to_hyperparameters().items())
