"""o2v-jax: Amazon SageMaker's Object2Vec rebuilt in JAX/Flax with compiled encoders.

    >>> import o2v_jax
    >>> model = o2v_jax.load("checkpoints/movielens-100k")
    >>> model.embed([[195], [96]], encoder="in1").shape
    (2, 64)

Train from Python (docs/tutorial.md)::

    >>> model = o2v_jax.train(hyperparameters, train_records, validation=val_records)
    >>> model.history[-1], o2v_jax.evaluate(model, test_records)

Retrieval (docs/retrieval.md): ``o2v_jax.evaluate_retrieval(model, "pairs.jsonl")``
(hits@k, MRR, nDCG@10 of ranking by embedding cosine); over arrays,
``o2v_jax.retrieval.evaluate_embeddings`` and exact top-k search ``o2v_jax.search.top_k``.

``import o2v_jax`` imports no JAX: each function imports what it needs when called.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "train", "evaluate", "evaluate_retrieval", "__version__"]


def load(model_dir, **kwargs):
    """Load a trained model directory for inference; see :class:`o2v_jax.predictor.Predictor`."""
    from o2v_jax.predictor import load as _load

    return _load(model_dir, **kwargs)


# --------------------------------------------------------------------------- train, evaluate
# The Python training API (issue 19) lives in o2v_jax/api.py; its functions are looked up
# here on first use, so the package stays light to import.

_API = ("train", "evaluate")


def __getattr__(name: str):
    if name in _API:
        from o2v_jax import api

        return getattr(api, name)
    if name == "evaluate_retrieval":  # issue 21: o2v evaluate --retrieval from Python
        from o2v_jax import ranking

        return ranking.evaluate_retrieval
    raise AttributeError(f"module 'o2v_jax' has no attribute {name!r}")

