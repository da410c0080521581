"""A model's retrieval quality on pairs: ``o2v evaluate --retrieval``, and the
validation metric of ``objective=contrastive`` (issue 21).

::

    >>> import o2v_jax
    >>> o2v_jax.evaluate_retrieval("runs/m1", "test.jsonl", baselines=["bm25"])
    {'hits@1': ..., 'hits@5': ..., 'hits@10': ..., 'mrr': ..., 'ndcg@10': ...,
     'queries': ..., 'candidates': ..., 'queries_without_relevant': ...,
     'baselines': {'bm25': {'hits@1': ..., ...}}}

Pairs become a retrieval task as :func:`retrieval.group_pairs` says: every distinct
``in0`` is a query that ranks every distinct ``in1`` of the file by the cosine of their
embeddings (in0 through enc0, in1 through enc1); its relevant candidates are the in1 it
is paired with by a label-1 or unlabelled record (``data.read_channel(pairs=True)``).
The lexical baselines (:mod:`o2v_jax.lexical`) score the same token ids the model sees,
i.e. after the truncation to ``max_seq_len`` that reading applies. Metric lines follow
SageMaker's ``#quality_metric`` format with ``<score>`` (higher is better); a
baseline's lines put its name before the metric (``test bm25 hits@10``), so a regex for
the model's metric never matches them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from o2v_jax import lexical, retrieval
from o2v_jax.buckets import length_ladder, pad_sequences
from o2v_jax.config import Config
from o2v_jax.data import PairData
from o2v_jax.metrics import quality_line
from o2v_jax.model import merge_params
from o2v_jax.ragged import Ragged

BASELINES = tuple(lexical.SCORERS)  # "bm25", "tfidf"
EMBED_BATCH = 256  # rows per call of the training-time encoder (one compile per length)

EmbedFn = Callable[[Ragged, int], np.ndarray]  # (sequences, side) -> float32 (N, H)


def task(data: PairData) -> retrieval.Grouped:
    """Distinct queries (in0) and candidates (in1) of ``data`` and their relevance."""
    return retrieval.group_pairs(data.in0.to_lists(), data.in1.to_lists(), data.labels.tolist())


def model_metrics(embed: EmbedFn, grouped: retrieval.Grouped) -> dict[str, Any]:
    """Retrieval metrics of the embeddings ``embed`` gives the queries (side 0) and the
    candidates (side 1), ranked by cosine."""
    queries = embed(Ragged.from_lists(grouped.queries), 0)
    candidates = embed(Ragged.from_lists(grouped.candidates), 1)
    return retrieval.evaluate_embeddings(queries, candidates, grouped.relevance)


def check_baselines(names: Iterable[str]) -> list[str]:
    """``names`` as a list; ValueError naming the choices for one that is unknown."""
    names = list(names)
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"baseline {name!r} is unknown: expected one of "
                             f"{', '.join(BASELINES)}")
    return names


def baseline_metrics(name: str, grouped: retrieval.Grouped) -> dict[str, Any]:
    """Retrieval metrics of the lexical baseline ``name`` on the same task."""
    check_baselines([name])
    scorer = lexical.scorer(name, grouped.candidates, grouped.queries)
    return retrieval.evaluate_blocks(scorer.block, grouped.relevance)


def quality_lines(host: str, channel: str, metrics: dict[str, Any],
                  epoch: int | None = None) -> list[str]:
    """``#quality_metric`` lines of :func:`evaluate_retrieval`'s answer (or of its model
    part): one per metric, then one per baseline metric."""
    lines = [quality_line(host, channel, name, metrics[name], epoch)
             for name in retrieval.METRIC_NAMES]
    for base, values in metrics.get("baselines", {}).items():
        lines += [quality_line(host, channel, f"{base} {name}", values[name], epoch)
                  for name in retrieval.METRIC_NAMES]
    return lines


def evaluate_retrieval(model: Any, data: str | Path | PairData,
                       baselines: Iterable[str] = ()) -> dict[str, Any]:
    """Retrieval metrics of a model on a pairs file, and of lexical baselines.

    Args:
        model: a model directory, or a loaded model (``o2v_jax.load``).
        data: a JSON Lines pairs file or directory (records ``{"in0", "in1"}`` with an
            optional label: 1 or absent = relevant, 0 = a candidate only), or a
            ``PairData`` read with this model's configuration.
        baselines: names from :data:`BASELINES`, scored on the same token ids.

    Returns:
        ``retrieval.METRIC_NAMES``, ``queries``, ``candidates``,
        ``queries_without_relevant``, and ``baselines`` ({name: the same metrics}) when
        any were asked for.

    Raises:
        ValueError: an unknown baseline (before any work), or no query has a relevant
            candidate. data.DataError: a bad record (file:line, field, expectation).
    """
    from o2v_jax.data import read_channel
    from o2v_jax.predictor import Predictor, load

    baselines = check_baselines(baselines)
    predictor = model if isinstance(model, Predictor) else load(model)
    if not isinstance(data, PairData):
        data = read_channel(data, predictor.config, name="evaluation", pairs=True)
    grouped = task(data)
    encoders = ("in0", "in1")
    out = model_metrics(lambda seqs, side: predictor.embed(seqs, encoder=encoders[side]), grouped)
    if baselines:
        out["baselines"] = {name: baseline_metrics(name, grouped) for name in baselines}
    return out


# --------------------------------------------------------------------------- training


class Embedder:
    """Embeds sequences with parameters that change during training: one jitted encode,
    compiled once per (side, length bucket); every call has EMBED_BATCH rows."""

    def __init__(self, graphdef: Any, config: Config):
        self._encode = jax.jit(functools.partial(_encode, graphdef), static_argnames="side")
        self.ladders = [length_ladder(e.max_seq_len, config.bucket_width) for e in config.encoders]
        self.enc_dim = config.enc_dim

    def __call__(self, params: Any, seqs: Ragged, side: int) -> np.ndarray:
        """float32 (N, H): row i is sequence i's embedding."""
        ladder = np.asarray(self.ladders[side])
        bucket = np.searchsorted(ladder, seqs.lengths, side="left")
        out = np.zeros((len(seqs), self.enc_dim), np.float32)
        for b in np.unique(bucket):
            rows = np.flatnonzero(bucket == b)
            for start in range(0, rows.size, EMBED_BATCH):
                idx = rows[start:start + EMBED_BATCH]
                tokens = pad_sequences(seqs.take(idx), int(ladder[b]), EMBED_BATCH)
                out[idx] = np.asarray(self._encode(params, tokens, side=side))[:idx.size]
        return out


def _encode(graphdef: Any, params: Any, tokens: jax.Array, *, side: int) -> jax.Array:
    return merge_params(graphdef, params).encode(tokens, side)


class Validation:
    """The retrieval metrics of a pairs channel for parameters in training (the
    validation and test channels of ``objective=contrastive``)."""

    def __init__(self, embedder: Embedder, data: PairData):
        self.embedder = embedder
        self.grouped = task(data)

    def __call__(self, params: Any) -> dict[str, float]:
        metrics = model_metrics(functools.partial(self.embedder, params), self.grouped)
        return {name: metrics[name] for name in retrieval.METRIC_NAMES}

