"""Small numeric kernels: the dropout hash, and the embedding bag mean with its VJP.

Two code shapes exist for the loops here, picked by an explicit ``layout`` argument
(a static string, part of whatever jitted function is built with it):

* ``"cpu"``: loops over positions with a working set that stays in cache;
* ``"accelerator"``: straight-line code and single scatters, because on a GPU every loop
  iteration is a kernel launch plus a host round trip.

:func:`default_layout` picks one from JAX's default backend; the model and the train
steps call it once, where they are built. Both shapes give the same results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LAYOUTS = ("cpu", "accelerator")


def default_layout() -> str:
    """``"cpu"`` when JAX's default backend is the CPU, else ``"accelerator"``."""
    return "cpu" if jax.default_backend() == "cpu" else "accelerator"


def check_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else a ValueError naming them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: expected one of {', '.join(LAYOUTS)}")
    return layout


# --------------------------------------------------------------------------- dropout

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
    keep = keep_mask(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011; the hash behind jax.random), unrolled.

    jax.random lowers this hash to a 5-step while loop on CPU (to compile faster); written
    out, XLA fuses it into one elementwise loop, which matters because a training step
    makes a mask per dropout site (benchmarks/RESULTS.md, "Dropout masks from an unrolled
    threefry"). uint32 in, (uint32, uint32) out.
    """
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for group in range(5):
        for r in _THREEFRY_ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def keep_mask(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """bool ``shape``, each element True with probability ``p`` (to 2^-32), from ``key``.

    ``jax.random.bernoulli``'s job for threefry keys (the default), on :func:`_threefry2x32`
    with counters 0..n/2; other key types go to ``jax.random.bernoulli``.
    """
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    if data.shape != (2,) or data.dtype != jnp.uint32:
        return jax.random.bernoulli(key, p, shape)
    n = 1
    for d in shape:
        n *= d
    half = (n + 1) // 2
    counter = jax.lax.iota(jnp.uint32, half)
    b0, b1 = _threefry2x32(data[0], data[1], counter, jnp.zeros_like(counter))
    bits = jnp.concatenate([b0, b1])[:n].reshape(shape)
    return bits < jnp.uint32(min(round(p * 2.0**32), 2**32 - 1))


# --------------------------------------------------------------------------- embedding bag

# Positions per unrolled step of the bag loops on CPU: enough straight-line gathers for
# the CPU to overlap their loads, few enough to keep compile time flat in L.
_BAG_UNROLL = 8


def bag_counts(tokens: jax.Array, dtype) -> jax.Array:
    """(B, 1) real-token counts with empty rows counted as 1 (their mean is 0, not nan)."""
    n = jnp.sum(tokens != 0, axis=1, keepdims=True).astype(dtype)
    return n + (n == 0)


def _bag_sum(table: jax.Array, tokens: jax.Array, layout: str) -> jax.Array:
    """Sum of the real tokens' rows: float32 (B, D), one (B, D) gather per position.

    Accumulating position by position keeps the working set at (B, D), which stays in
    cache; gathering (B, L, D) first and reducing it afterwards writes and re-reads
    B * L * D floats from memory (benchmarks/RESULTS.md, "Embedding throughput"). On an
    accelerator the loop is unrolled completely (one fused kernel, no loop round trips);
    the adds still run in position order, so the padding a bucket adds (exact zeros)
    never changes a sum.
    """
    batch, length = tokens.shape

    def add(pos, acc):
        col = jax.lax.dynamic_index_in_dim(tokens, pos, axis=1, keepdims=False)  # (B,)
        # where, not a multiply by the mask: a non-finite padding row cannot leak in.
        return acc + jnp.where((col != 0)[:, None], table.at[col].get(mode="clip"), 0.0)

    unroll = length if check_layout(layout) == "accelerator" else min(length, _BAG_UNROLL)
    return jax.lax.fori_loop(0, length, add, jnp.zeros((batch, table.shape[1]), table.dtype),
                             unroll=max(unroll, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embedding_bag_mean(table: jax.Array, tokens: jax.Array, layout: str) -> jax.Array:
    """Masked mean of token rows, ``table[tokens]`` averaged over the non-zero ids.

    The masked mean of ``table[tokens]`` (encoders.PooledEmbedding), computed like torch's
    ``EmbeddingBag(mode="mean", padding_idx=0)``. The gradient w.r.t. the table is a
    scatter-add of each row's output gradient / count into its tokens' rows.

    Args:
      table: float32 (V, D).
      tokens: int32 (B, L), ids in [0, V), 0 = padding.
      layout: "cpu" or "accelerator" (static): the code shape of the loops.

    Returns:
      float32 (B, D); all-padding rows give 0.
    """
    return _bag_sum(table, tokens, layout) / bag_counts(tokens, table.dtype)


def embedding_bag_mean_grad(num_rows: int, parts, layout: str) -> jax.Array:
    """The table gradient of ``sum_i <g_i, embedding_bag_mean(table, tokens_i)>``.

    Each real token of row b adds ``g[b] / count[b]`` to its table row: a scatter-add,
    on CPU done one position at a time ((B, D) updates) so no (B, L, D) array is built;
    on an accelerator as one scatter of all B * L updates (a loop costs a launch per
    position there). Several bags reading one table (tied in0/in1) share one accumulator.

    Args:
      num_rows: V, the table's row count.
      parts: sequence of (tokens int32 (B, L), g float32 (B, D)) pairs.
      layout: "cpu" or "accelerator" (static).

    Returns:
      float32 (V, D).
    """
    acc = jnp.zeros((num_rows, parts[0][1].shape[1]), parts[0][1].dtype)
    if check_layout(layout) == "accelerator":
        ids = jnp.concatenate([tokens.ravel() for tokens, _ in parts])
        updates = jnp.concatenate([
            jnp.where((tokens != 0)[:, :, None], (g / bag_counts(tokens, g.dtype))[:, None, :],
                      0.0).reshape(-1, g.shape[1]) for tokens, g in parts])
        return acc.at[ids].add(updates, mode="drop")
    for tokens, g in parts:
        gn = g / bag_counts(tokens, g.dtype)  # (B, D): what each real token of a row gets

        def add(pos, acc, tokens=tokens, gn=gn):
            col = jax.lax.dynamic_index_in_dim(tokens, pos, axis=1, keepdims=False)
            return acc.at[col].add(jnp.where((col != 0)[:, None], gn, 0.0), mode="drop")

        acc = jax.lax.fori_loop(0, tokens.shape[1], add, acc,
                                unroll=min(tokens.shape[1], _BAG_UNROLL))
    return acc


def _bag_fwd(table, tokens, layout):
    return embedding_bag_mean(table, tokens, layout), (table, tokens)


def _bag_bwd(layout, residuals, g):
    table, tokens = residuals
    grad = embedding_bag_mean_grad(table.shape[0], [(tokens, g)], layout)
    return grad.astype(table.dtype), None


embedding_bag_mean.defvjp(_bag_fwd, _bag_bwd)
