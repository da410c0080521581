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
from o2v_jax.kernels import embedding_bag_mean


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

    def from_ids(self, table: jax.Array, tokens: jax.Array, layout: str) -> jax.Array:
        """The same masked mean straight from ids, never materialising (B, L, D).

        table: float32 (V, D), tokens: int32 (B, L) (0 = padding) -> float32 (B, D);
        layout: the loops' code shape (:mod:`o2v_jax.kernels`).
        """
        return embedding_bag_mean(table, tokens, layout)


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
        return self._layers(x, mask, None)

    def input_kernel(self) -> jax.Array:
        """float32 (D, w * F_0): the first conv's taps side by side, tap j in columns
        [j F_0, (j+1) F_0). Row t of ``table @ input_kernel()`` holds what token t adds
        to the first conv's output through each tap (predictor.py looks it up)."""
        kernel = self.convs[0].kernel[...]  # (w, D, F_0)
        width, d, filters = kernel.shape
        return jnp.transpose(kernel, (1, 0, 2)).reshape(d, width * filters)

    def from_projection(self, projected: jax.Array, mask: jax.Array) -> jax.Array:
        """As ``__call__``, given each position's token projection instead of x.

        projected: float32 (B, L, w * F_0), e.g. rows of ``table @ input_kernel()``;
        mask: bool (B, L) -> float32 (B, H).
        """
        return self._layers(None, mask, projected)

    def _layers(self, x: jax.Array | None, mask: jax.Array, projected: jax.Array | None) -> jax.Array:
        real = mask[:, :, None]
        pooled = []
        for layer, conv in enumerate(self.convs):  # `layers` <= 4: unrolled at trace time
            # Zeroing padded positions before every conv makes them exactly the zero
            # 'SAME' padding an unpadded sequence would get, so real outputs don't change.
            if layer == 0 and projected is not None:
                x = jax.nn.relu(_conv_from_taps(conv, jnp.where(real, projected, 0.0)))
            else:
                x = jax.nn.relu(conv(jnp.where(real, x, 0.0)))  # (B, L, F_l)
            pooled.append(masked_max(x, mask))
        return jnp.concatenate(pooled, axis=-1)


def _conv_from_taps(conv: nnx.Conv, taps: jax.Array) -> jax.Array:
    """A 'SAME' 1-D convolution (stride 1) from per-position tap outputs.

    taps: float32 (B, L, w * F): tap j's output for each position's input, x_s @ W[j].
    Output t is bias + sum_j taps[t + j - (w - 1) // 2, j] (zero outside [0, L)), the
    cross-correlation that ``conv`` computes, with lax's 'SAME' split of the padding.
    """
    batch, length, _ = taps.shape
    width, filters = conv.kernel.shape[0], conv.kernel.shape[2]
    taps = taps.reshape(batch, length, width, filters)
    low = (width - 1) // 2
    out = jnp.zeros((batch, length, filters), taps.dtype)
    for j in range(width):  # w <= 9: unrolled at trace time
        shift = j - low  # output t reads position t + shift
        z = taps[:, :, j]
        if shift > 0:
            z = jnp.pad(z[:, shift:], ((0, 0), (0, min(shift, length)), (0, 0)))
        elif shift < 0:
            z = jnp.pad(z[:, :shift], ((0, 0), (min(-shift, length), 0), (0, 0)))
        out = out + z
    return out + conv.bias[...][None, None, :] if conv.bias is not None else out


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


def bilstm_layer(fwd: LSTMDirection, bwd: LSTMDirection, x: jax.Array | None,
                 mask: jax.Array, projected: jax.Array | None = None) -> jax.Array:
    """One bidirectional LSTM layer over the real tokens of each row.

    Both directions run in the same ``lax.scan`` (forward at step t, backward at L-1-t),
    so the sequential depth is L, not 2L. A padded step carries the state through
    unchanged: the forward direction never sees padding, and the backward direction
    stays at its zero initial state until it reaches each row's last real token. The
    result equals running the LSTM on the row's real tokens alone.

    Args:
      x: float32 (B, L, D_in); unused when ``projected`` is given.
      mask: bool (B, L).
      projected: None, or float32 (B, L, 4 h_fwd + 4 h_bwd): the input projections
        ``fwd.dense_i(x)`` and ``bwd.dense_i(x)`` side by side, when the caller has them
        already (:meth:`BiLSTM.from_projection`).

    Returns:
      float32 (B, L, h_fwd + h_bwd); padded positions hold carried-over states.
    """
    if projected is None:
        pf, pb = fwd.dense_i(x), bwd.dense_i(x)
    else:
        pf, pb = jnp.split(projected, [4 * fwd.hidden], axis=-1)
    batch = mask.shape[0]
    xf = jnp.swapaxes(pf, 0, 1)  # (L, B, 4 h_fwd), time-major for scan
    xb = jnp.swapaxes(pb, 0, 1)[::-1]  # (L, B, 4 h_bwd), reversed time
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

    zeros = lambda n: jnp.zeros((batch, n), pf.dtype)
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
        return self._layers(x, mask, None)

    def input_kernel(self) -> jax.Array:
        """float32 (D, 4 h_fwd + 4 h_bwd): the first layer's input kernels side by side.

        Row t of ``table @ input_kernel()`` is the first layer's input projection of token
        t, so a model with fixed weights can look projections up instead of computing
        them (predictor.py does, for inference).
        """
        return jnp.concatenate([self.fwd[0].dense_i.kernel[...], self.bwd[0].dense_i.kernel[...]],
                               axis=1)

    def from_projection(self, projected: jax.Array, mask: jax.Array) -> jax.Array:
        """As ``__call__``, given the first layer's input projection instead of x.

        projected: float32 (B, L, 4 h_fwd + 4 h_bwd), e.g. rows of
        ``table @ input_kernel()``; mask: bool (B, L) -> float32 (B, H).
        """
        return self._layers(None, mask, projected)

    def _layers(self, x: jax.Array | None, mask: jax.Array, projected: jax.Array | None) -> jax.Array:
        for layer, (fwd, bwd) in enumerate(zip(self.fwd, self.bwd)):  # <= 4: unrolled at trace time
            x = bilstm_layer(fwd, bwd, x, mask, projected if layer == 0 else None)
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
