"""Encoders: padding invariance, all-padding rows, and reference implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from o2v_jax.config import from_hyperparameters
from o2v_jax.encoders import BiLSTM, HCNN, hcnn_filters, masked_max
from o2v_jax.model import Object2Vec

SEQS = [[3, 7, 1, 9, 4], [5], [2, 8], [6, 6, 6, 11, 12, 13, 14]]


@pytest.fixture(autouse=True)
def _strict_ranks():
    # Catch silent broadcasting bugs (the equinox habit).
    with jax.numpy_rank_promotion("raise"):
        yield


def tiny_config(network, *, enc_dim=8, token_dim=6, layers=1, width=3, **extra):
    hp = {"enc0_max_seq_len": 16, "enc0_vocab_size": 20, "enc0_network": network,
          "enc0_token_embedding_dim": token_dim, "enc0_layers": layers,
          "enc0_cnn_filter_width": width, "enc1_network": "enc0", "enc_dim": enc_dim,
          "mlp_dim": 8, "mini_batch_size": 4}
    hp.update(extra)
    return from_hyperparameters(hp)


def jit_encode(model):
    graphdef, params = nnx.split(model)
    f = jax.jit(lambda p, t: nnx.merge(graphdef, p).encode(t, 0))
    return lambda tokens: np.asarray(f(params, jnp.asarray(tokens, jnp.int32)))


def pad(seqs, length, lead=()):
    """Right-pad each sequence to `length`; rows in `lead` get their padding in front."""
    out = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if i in lead:
            out[i, length - len(s):] = s
        else:
            out[i, :len(s)] = s
    return out


ENCODER_CASES = [
    pytest.param(dict(network="pooled_embedding", enc_dim=8, token_dim=8), id="pooled"),
    *[pytest.param(dict(network="hcnn", enc_dim=10, layers=layers, width=width),
                   id=f"hcnn-l{layers}-w{width}")
      for layers in (1, 3) for width in (1, 2, 3)],
    *[pytest.param(dict(network="bilstm", enc_dim=9, layers=layers), id=f"bilstm-l{layers}")
      for layers in (1, 2)],
]


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_padding_never_changes_the_encoding(case):
    case = dict(case)
    model = Object2Vec(tiny_config(case.pop("network"), **case), rngs=nnx.Rngs(1))
    encode = jit_encode(model)
    # In a batch: other lengths, one row padded in front, one all-padding row.
    batch = encode(pad(SEQS + [[]], 10, lead=(2,)))
    assert batch.shape == (5, case["enc_dim"])
    for i in (0, 1):  # alone at its own length (1 is shorter than any filter width), padded
        alone = encode(pad([SEQS[i]], len(SEQS[i])))[0]
        padded = encode(pad([SEQS[i]], 10))[0]
        np.testing.assert_allclose(padded, alone, atol=1e-5)
        np.testing.assert_allclose(batch[i], alone, atol=1e-5)
    np.testing.assert_allclose(batch[2], encode(pad([SEQS[2]], 2))[0], atol=1e-5)
    np.testing.assert_allclose(batch[3], encode(pad([SEQS[3]], 10))[0], atol=1e-5)
    # An all-padding row is finite (zero: an empty mean or max-pool).
    assert np.all(np.isfinite(batch[4])) and np.all(batch[4] == 0)
    assert np.any(batch[:4] != 0)


def test_pooled_embedding_is_the_masked_mean_of_token_rows():
    model = Object2Vec(tiny_config("pooled_embedding", enc_dim=8, token_dim=8), rngs=nnx.Rngs(0))
    table = np.asarray(model.embed0.embedding[...])
    got = np.asarray(model.encode(pad(SEQS, 7), 0))
    want = np.stack([table[s].mean(axis=0) for s in SEQS])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_hcnn_filters_split_enc_dim_exactly():
    assert hcnn_filters(10, 3) == (4, 3, 3)
    assert hcnn_filters(8, 4) == (2, 2, 2, 2)
    assert hcnn_filters(4096, 4) == (1024,) * 4  # InferSent's 4 x 1024
    for enc_dim in range(4, 30):
        for layers in range(1, 5):
            sizes = hcnn_filters(enc_dim, layers)
            assert sum(sizes) == enc_dim and max(sizes) - min(sizes) <= 1


def test_masked_max_ignores_padding_even_when_it_is_larger():
    x = jnp.array([[[1.0, -5.0], [100.0, 100.0]], [[7.0, 7.0], [8.0, 8.0]]])
    mask = jnp.array([[True, False], [False, False]])
    np.testing.assert_array_equal(masked_max(x, mask), [[1.0, -5.0], [0.0, 0.0]])


def _conv_same(x, kernel, bias):
    """Reference 'SAME' conv of one unpadded sequence: x (n, C), kernel (w, C, F)."""
    w = kernel.shape[0]
    xp = np.concatenate([np.zeros(((w - 1) // 2, x.shape[1])), x, np.zeros((w // 2, x.shape[1]))])
    return np.stack([np.einsum("kc,kcf->f", xp[t:t + w], kernel) for t in range(len(x))]) + bias


@pytest.mark.parametrize("width", [2, 3])
def test_hcnn_matches_a_reference_on_unpadded_sequences(width):
    rng = np.random.default_rng(0)
    enc = HCNN(5, 7, 2, width, rngs=nnx.Rngs(0))
    x = rng.normal(size=(2, 6, 5)).astype(np.float32)
    lengths = [6, 3]
    mask = np.arange(6)[None, :] < np.array(lengths)[:, None]
    got = np.asarray(enc(jnp.asarray(x), jnp.asarray(mask)))
    for row, n in enumerate(lengths):
        h, pooled = x[row, :n], []
        for conv in enc.convs:
            h = np.maximum(_conv_same(h, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])), 0)
            pooled.append(h.max(axis=0))
        np.testing.assert_allclose(got[row], np.concatenate(pooled), rtol=1e-5, atol=1e-5)


def _lstm_ref(direction, xs):
    """Reference LSTM over the rows of xs (n, D) in the given order: (n, h)."""
    wi = np.asarray(direction.dense_i.kernel[...])
    wh, b = np.asarray(direction.dense_h.kernel[...]), np.asarray(direction.dense_h.bias[...])
    sig = lambda z: 1 / (1 + np.exp(-z))
    c = h = np.zeros(direction.hidden)
    out = []
    for x in xs:
        i, f, g, o = np.split(x @ wi + h @ wh + b, 4)
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        out.append(h)
    return np.stack(out)


@pytest.mark.parametrize("layers", [1, 2])
def test_bilstm_matches_a_reference_on_unpadded_sequences(layers):
    rng = np.random.default_rng(0)
    enc = BiLSTM(4, 7, layers, rngs=nnx.Rngs(0))
    assert (enc.fwd[0].hidden, enc.bwd[0].hidden) == (4, 3)  # ceil/floor of 7 / 2
    x = rng.normal(size=(2, 5, 4)).astype(np.float32)
    lengths = [5, 2]
    mask = np.arange(5)[None, :] < np.array(lengths)[:, None]
    got = np.asarray(enc(jnp.asarray(x), jnp.asarray(mask)))
    for row, n in enumerate(lengths):
        h = x[row, :n].astype(np.float64)
        for fwd, bwd in zip(enc.fwd, enc.bwd):
            # Backward direction: run on the reversed real tokens, flip back.
            h = np.concatenate([_lstm_ref(fwd, h), _lstm_ref(bwd, h[::-1])[::-1]], axis=1)
        np.testing.assert_allclose(got[row], h.max(axis=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_bilstm_from_projection_equals_the_call_on_embeddings(layers):
    # The predictor looks up rows of table @ input_kernel() instead of projecting x:
    # the same numbers must come out, with unequal directions (7 = 4 + 3) and padding.
    rng = np.random.default_rng(3)
    enc = BiLSTM(5, 7, layers, rngs=nnx.Rngs(1))
    table = rng.normal(size=(11, 5)).astype(np.float32)
    tokens = np.array([[3, 1, 4, 1, 5, 9], [2, 6, 0, 0, 0, 0], [0] * 6])
    mask = jnp.asarray(tokens != 0)
    want = np.asarray(enc(jnp.asarray(table[tokens]), mask))
    kernel = enc.input_kernel()
    assert kernel.shape == (5, 4 * 4 + 4 * 3)
    got = np.asarray(enc.from_projection(jnp.asarray(table @ np.asarray(kernel))[tokens], mask))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[2], 0.0)  # all padding: the empty max-pool
    assert np.abs(got[:2]).min() > 0


@pytest.mark.parametrize("width,layers", [(1, 1), (2, 2), (3, 4), (4, 1), (5, 2)])
def test_hcnn_from_projection_equals_the_call_on_embeddings(width, layers):
    # The first conv from looked-up taps (table @ input_kernel()), shifted and summed,
    # must equal nnx.Conv's 'SAME' convolution, odd and even widths, padded rows too.
    rng = np.random.default_rng(5)
    enc = HCNN(5, 7, layers, width, rngs=nnx.Rngs(2))
    table = rng.normal(size=(11, 5)).astype(np.float32)
    tokens = np.array([[3, 1, 4, 1, 5, 9], [2, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [0] * 6])
    mask = jnp.asarray(tokens != 0)
    want = np.asarray(enc(jnp.asarray(table[tokens]), mask))
    kernel = enc.input_kernel()
    assert kernel.shape == (5, width * hcnn_filters(7, layers)[0])
    got = np.asarray(enc.from_projection(jnp.asarray(table @ np.asarray(kernel))[tokens], mask))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[3], 0.0)
    assert np.abs(got[:3]).max() > 0
