"""Sequence encoders: pooled_embedding, hcnn, bilstm (spec §4.2-§4.4), in flax.nnx.

An encoder maps embedded tokens ``x: float32 (B, L, D)`` and ``mask: bool (B, L)``
(True = real token, False = padding id 0) to ``float32 (B, H)``, H = enc_dim. The token
table lookup and the output dropout live in :mod:`o2v_jax.model`, so that one table can
be shared by both sides (tied weights) and always sits at one path in the nnx state.

Padding never changes the result: each encoder gives the same vector for a sequence
whatever length it is padded to and whatever batch it is in, and a finite vector for an
all-padding row. Design decisions and their reasons: docs/architecture.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from o2v_jax.config import EncoderConfig


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; ``key=None`` (or rate 0) is the deterministic identity.

    Args:
      x: float array of any shape.
      rate: probability of zeroing an element, in [0, 1] (a static Python float).
      key: a PRNG key used for this dropout site only, or None.
    """
    if key is None or rate == 0.0:
        return x
    if rate >= 1.0:  # dropout=1 is a legal hyperparameter (spec §2.2); avoid 0/0.
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Max over time of the real positions; all-padding rows give 0.

    Args:
      x: float32 (B, L, F).
      mask: bool (B, L).

    Returns:
      float32 (B, F).
    """
    pooled = jnp.max(jnp.where(mask[:, :, None], x, -jnp.inf), axis=1)
    # -inf would poison the comparator and MLP; 0 is what an empty max-pool means here.
    return jnp.where(jnp.any(mask, axis=1)[:, None], pooled, 0.0)


class PooledEmbedding(nnx.Module):
    """Masked mean of the token vectors (spec §4.2, exact); D must equal H."""

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: float32 (B, L, D), mask: bool (B, L) -> float32 (B, D)."""
        m = mask.astype(x.dtype)[:, :, None]  # (B, L, 1)
        # where, not x * m: a non-finite padding row could not leak in as 0 * inf = nan.
        s = jnp.sum(jnp.where(mask[:, :, None], x, 0.0), axis=1)  # (B, D)
        n = jnp.sum(m, axis=1)  # (B, 1)
        return s / (n + (n == 0))  # n + (n == 0): all-padding rows give 0, not nan.


def hcnn_filters(enc_dim: int, layers: int) -> tuple[int, ...]:
    """Filters per conv layer: enc_dim split as evenly as possible, first layers get the rest.

    >>> hcnn_filters(10, 3)
    (4, 3, 3)
    """
    base, extra = divmod(enc_dim, layers)
    return tuple(base + (i < extra) for i in range(layers))


class HCNN(nnx.Module):
    """InferSent's hierarchical ConvNet (spec §4.3): concat of per-layer max-pooled convs.

    Each layer is a 1-D convolution of width ``cnn_filter_width`` ('SAME' padding, ReLU)
    over the previous layer's feature maps; after each layer the maps are max-pooled over
    the real positions, and the ``layers`` pooled vectors are concatenated (H in total).
    """

    def __init__(self, in_features: int, enc_dim: int, layers: int, filter_width: int,
                 *, rngs: nnx.Rngs):
        convs = []
        channels = in_features
        for filters in hcnn_filters(enc_dim, layers):
            convs.append(nnx.Conv(channels, filters, kernel_size=(filter_width,),
                                  padding="SAME", rngs=rngs))
            channels = filters
        self.convs = nnx.List(convs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: float32 (B, L, D), mask: bool (B, L) -> float32 (B, H)."""
        real = mask[:, :, None]
        pooled = []
        for conv in self.convs:  # `layers` <= 4: unrolled at trace time
            # Zeroing padded positions before every conv makes them exactly the zero
            # 'SAME' padding an unpadded sequence would get, so real outputs don't change.
            x = jax.nn.relu(conv(jnp.where(real, x, 0.0)))  # (B, L, F_l)
            pooled.append(masked_max(x, mask))
        return jnp.concatenate(pooled, axis=-1)


class LSTMDirection(nnx.Module):
    """Weights of one LSTM direction, laid out like ``nnx.OptimizedLSTMCell``.

    Gates are ordered (i, f, g, o); ``dense_i`` has no bias because the two projections
    are summed. Kept apart from the cell so the input projection of all L steps is one
    matmul outside the time scan.
    """

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        self.dense_i = nnx.Linear(in_features, 4 * hidden, use_bias=False, rngs=rngs)
        self.dense_h = nnx.Linear(hidden, 4 * hidden, rngs=rngs,
                                  kernel_init=nnx.initializers.orthogonal())


def _lstm_step(carry, xi, w, b, real):
    """One masked LSTM step: rows whose position is padding keep their state unchanged.

    carry: (c, h) float32 (B, h); xi: (B, 4h) input projection; w: (h, 4h); b: (4h,);
    real: bool (B,).
    """
    c, h = carry
    i, f, g, o = jnp.split(xi + h @ w + b[None, :], 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    keep = real[:, None]
    return jnp.where(keep, c_new, c), jnp.where(keep, h_new, h)


def bilstm_layer(fwd: LSTMDirection, bwd: LSTMDirection, x: jax.Array,
                 mask: jax.Array) -> jax.Array:
    """One bidirectional LSTM layer over the real tokens of each row.

    Both directions run in the same ``lax.scan`` (forward at step t, backward at L-1-t),
    so the sequential depth is L, not 2L. A padded step carries the state through
    unchanged: the forward direction never sees padding, and the backward direction
    stays at its zero initial state until it reaches each row's last real token. The
    result equals running the LSTM on the row's real tokens alone.

    Args:
      x: float32 (B, L, D_in).
      mask: bool (B, L).

    Returns:
      float32 (B, L, h_fwd + h_bwd); padded positions hold carried-over states.
    """
    batch = x.shape[0]
    xf = jnp.swapaxes(fwd.dense_i(x), 0, 1)  # (L, B, 4 h_fwd), time-major for scan
    xb = jnp.swapaxes(bwd.dense_i(x), 0, 1)[::-1]  # (L, B, 4 h_bwd), reversed time
    mf = mask.T  # (L, B)
    mb = mf[::-1]
    wf, bf = fwd.dense_h.kernel[...], fwd.dense_h.bias[...]
    wb, bb = bwd.dense_h.kernel[...], bwd.dense_h.bias[...]

    def step(carry, inputs):
        carry_f, carry_b = carry
        xf_t, xb_t, mf_t, mb_t = inputs
        carry_f = _lstm_step(carry_f, xf_t, wf, bf, mf_t)
        carry_b = _lstm_step(carry_b, xb_t, wb, bb, mb_t)
        return (carry_f, carry_b), (carry_f[1], carry_b[1])

    zeros = lambda n: jnp.zeros((batch, n), x.dtype)
    init = ((zeros(fwd.hidden), zeros(fwd.hidden)), (zeros(bwd.hidden), zeros(bwd.hidden)))
    _, (hf, hb) = jax.lax.scan(step, init, (xf, xb, mf, mb))
    # hb[k] is the backward state after position L-1-k: flip it back to position order.
    return jnp.concatenate([jnp.swapaxes(hf, 0, 1), jnp.swapaxes(hb[::-1], 0, 1)], axis=-1)


class BiLSTM(nnx.Module):
    """Stacked bidirectional LSTM, max-pooled over time (InferSent's BiLSTM-max, spec §4.4).

    Forward hidden size ceil(H/2), backward floor(H/2), so the concatenation is H exactly.
    """

    def __init__(self, in_features: int, enc_dim: int, layers: int, *, rngs: nnx.Rngs):
        h_fwd, h_bwd = (enc_dim + 1) // 2, enc_dim // 2
        fwd, bwd = [], []
        for layer in range(layers):
            d_in = in_features if layer == 0 else enc_dim
            fwd.append(LSTMDirection(d_in, h_fwd, rngs=rngs))
            bwd.append(LSTMDirection(d_in, h_bwd, rngs=rngs))
        self.fwd = nnx.List(fwd)
        self.bwd = nnx.List(bwd)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: float32 (B, L, D), mask: bool (B, L) -> float32 (B, H)."""
        for fwd, bwd in zip(self.fwd, self.bwd):  # `layers` <= 4: unrolled at trace time
            x = bilstm_layer(fwd, bwd, x, mask)
        return masked_max(x, mask)


def make_encoder(enc: EncoderConfig, enc_dim: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """The encoder module for one side's settings (``enc.layers`` already resolved)."""
    if enc.network == "pooled_embedding":
        if enc.token_embedding_dim != enc_dim:  # config.py forces equality (spec §2.4)
            raise ValueError(f"pooled_embedding needs token_embedding_dim == enc_dim, got "
                             f"{enc.token_embedding_dim} and {enc_dim}")
        return PooledEmbedding()
    if enc.network == "hcnn":
        return HCNN(enc.token_embedding_dim, enc_dim, enc.layers, enc.cnn_filter_width,
                    rngs=rngs)
    if enc.network == "bilstm":
        return BiLSTM(enc.token_embedding_dim, enc_dim, enc.layers, rngs=rngs)
    raise ValueError(f"network={enc.network!r} is invalid: expected one of "
                     "hcnn, bilstm, pooled_embedding")
