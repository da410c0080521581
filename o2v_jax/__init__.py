"""o2v-jax: Amazon SageMaker's Object2Vec rebuilt in JAX/Flax with compiled encoders.

    >>> import o2v_jax
    >>> model = o2v_jax.load("checkpoints/movielens-100k")
    >>> model.embed([[195], [96]], encoder="in1").shape
    (2, 64)
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def load(model_dir, **kwargs):
    """Load a trained model directory for inference; see :class:`o2v_jax.predictor.Predictor`."""
    from o2v_jax.predictor import load as _load

    return _load(model_dir, **kwargs)
