"""Kernels: the dropout hash, the embedding bag mean and its gradient in both layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o2v_jax import kernels

SEQS = [[3, 7, 1, 9, 4], [5], [2, 8], [6, 6, 6, 11, 12, 13, 14]]


@pytest.fixture(autouse=True)
def _strict_ranks():
    with jax.numpy_rank_promotion("raise"):
        yield


def pad(seqs, length):
    out = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def test_dropout_keep_mask_rate_and_keys():
    key = jax.random.key(7)
    mask = np.asarray(kernels.keep_mask(key, 0.6, (400, 251)))  # odd size: counters split in two halves
    assert mask.shape == (400, 251) and mask.dtype == bool
    assert abs(mask.mean() - 0.6) < 0.01
    np.testing.assert_array_equal(mask, np.asarray(kernels.keep_mask(key, 0.6, (400, 251))))
    other = np.asarray(kernels.keep_mask(jax.random.fold_in(key, 1), 0.6, (400, 251)))
    assert abs((mask & other).mean() - 0.36) < 0.01  # independent masks, not shifted copies
    assert np.asarray(kernels.keep_mask(key, 1.0, (1000,))).all()
    assert not np.asarray(kernels.keep_mask(key, 0.0, (1000,))).any()


def test_dropout_scales_kept_elements_and_is_the_identity_without_a_key():
    x = jnp.arange(1.0, 2001.0).reshape(40, 50)
    np.testing.assert_array_equal(kernels.dropout(x, 0.5, None), x)
    np.testing.assert_array_equal(kernels.dropout(x, 0.0, jax.random.key(0)), x)
    np.testing.assert_array_equal(kernels.dropout(x, 1.0, jax.random.key(0)), 0.0)
    y = np.asarray(kernels.dropout(x, 0.25, jax.random.key(0)))
    kept = y != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)


@pytest.mark.parametrize("layout", kernels.LAYOUTS)
def test_embedding_bag_mean_and_its_gradient_in_both_layouts(layout):
    # The layout picks loops that stay in cache (cpu) or straight-line code and one
    # scatter (accelerator); both must give the masked mean, the same sum whatever the
    # padding (bit for bit: an embedding may not depend on its bucket), and its gradient.
    rng = np.random.default_rng(4)
    table = rng.normal(size=(20, 5)).astype(np.float32)
    g = rng.normal(size=(len(SEQS), 5)).astype(np.float32)
    mean = jax.jit(kernels.embedding_bag_mean, static_argnums=2)
    short, long = mean(table, pad(SEQS, 7), layout), mean(table, pad(SEQS, 12), layout)
    np.testing.assert_array_equal(np.asarray(short), np.asarray(long))
    want = np.stack([table[s].mean(axis=0) for s in SEQS])
    np.testing.assert_allclose(np.asarray(short), want, rtol=1e-5, atol=1e-6)
    grad = jax.jit(jax.grad(lambda t, ids: jnp.sum(kernels.embedding_bag_mean(t, ids, layout) * g)))(
        table, pad(SEQS, 12))
    want_grad = np.zeros_like(table)
    for s, row in zip(SEQS, g):
        np.add.at(want_grad, s, row / len(s))
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", kernels.LAYOUTS)
def test_bag_gradient_of_several_bags_shares_one_accumulator(layout):
    # Tied tables: in0 and in1 read one table; their gradients add up in it.
    rng = np.random.default_rng(5)
    bags = [pad(SEQS, 9), pad([[1, 1, 2], [], [19, 3]], 4)]
    gs = [rng.normal(size=(b.shape[0], 3)).astype(np.float32) for b in bags]
    got = jax.jit(lambda: kernels.embedding_bag_mean_grad(20, list(zip(bags, gs)), layout))()
    want = np.zeros((20, 3), np.float32)
    for b, g in zip(bags, gs):
        for row, gr in zip(b, g):
            real = row[row != 0]
            np.add.at(want, real, gr / max(len(real), 1))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_the_layout_is_an_explicit_static_argument():
    # The two code shapes compile to different programs (a position loop on CPU, a
    # fully unrolled sum on an accelerator), picked by the argument alone.
    table, ids = np.zeros((20, 4), np.float32), pad(SEQS, 12)
    text = {layout: jax.jit(kernels.embedding_bag_mean, static_argnums=2)
            .lower(table, ids, layout).as_text() for layout in kernels.LAYOUTS}
    assert "while" in text["cpu"] and "while" not in text["accelerator"]
    assert kernels.default_layout() == ("cpu" if jax.default_backend() == "cpu" else "accelerator")
    with pytest.raises(ValueError, match="layout='gpu' is invalid"):
        kernels.embedding_bag_mean(table, ids, "gpu")
