"""The Object2Vec pair model (spec §4.1, §4.5) and its parameter layout.

::

    in0 ids ─► embed0 ─► enc0 ─► dropout ─► u (B, H) ─┐
                                                      ├─► comparator ─► MLP ─► output
    in1 ids ─► embed1 ─► enc1 ─► dropout ─► v (B, H) ─┘

The trainer and predictor call it as a pure function of split state::

    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, a, b, k: nnx.merge(graphdef, p)(a, b, dropout_key=k))

Randomness: ``dropout_key=None`` is deterministic (evaluation and inference). Given a
key, each dropout site uses its own ``fold_in(key, site)`` (site 0/1: encoder outputs,
2 + i: MLP layer i; numbered here only), so pass a fresh key per step, e.g.
``fold_in(dropout_root, step)``.

The model holds its ``layout`` (:mod:`o2v_jax.kernels`: the code shape of the bag loops)
as a static attribute, so it is part of the graphdef and of every function built on it.
The parameter layout, which top-level groups of ``split_params(model)[1]`` hold what, is
written down once, below the model (:data:`TABLE_GROUPS` and the functions after it).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from o2v_jax.config import Config
from o2v_jax.encoders import HCNN, BiLSTM, PooledEmbedding, make_encoder
from o2v_jax.kernels import check_layout, default_layout, dropout

log = logging.getLogger("o2v_jax")

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "linear": lambda x: x}
# Dropout sites for fold_in: 0 and 1 are the encoder outputs (side 0, side 1), MLP layer
# i uses 2 + i. The trainer's row_sparse step reuses them through from_encodings.
_ENCODER_SITE = 0
_MLP_SITE = 2


def _site_key(dropout_key: jax.Array | None, site: int) -> jax.Array | None:
    return None if dropout_key is None else jax.random.fold_in(dropout_key, site)


def compare(u: jax.Array, v: jax.Array, ops: tuple[str, ...]) -> jax.Array:
    """The comparator: listed operators applied to (u, v) and concatenated in order.

    Args:
      u, v: float32 (B, H) encoder outputs.
      ops: names from ``hadamard`` (u*v), ``concat`` ([u, v]), ``abs_diff`` (|u-v|).

    Returns:
      float32 (B, C) with C = H per hadamard/abs_diff and 2H for concat (spec §4.5).
    """
    parts = {"hadamard": lambda: [u * v], "concat": lambda: [u, v],
             "abs_diff": lambda: [jnp.abs(u - v)]}
    return jnp.concatenate([p for op in ops for p in parts[op]()], axis=-1)


def comparator_dim(enc_dim: int, ops: tuple[str, ...]) -> int:
    """C, the comparator output width."""
    return sum(2 * enc_dim if op == "concat" else enc_dim for op in ops)


def _token_table(vocab_size: int, dim: int, init: np.ndarray | None, where: str,
                 rngs: nnx.Rngs) -> nnx.Embed:
    """(V, D) table; default init N(0, 1/D) (flax's Embed default), else the given rows."""
    embed = nnx.Embed(vocab_size, dim, rngs=rngs)
    if init is not None:
        init = np.asarray(init)
        if init.shape != (vocab_size, dim):
            raise ValueError(f"pretrained embeddings for {where}: expected shape "
                             f"({vocab_size}, {dim}) (vocab_size, token_embedding_dim), "
                             f"got {init.shape}")
        if not np.issubdtype(init.dtype, np.floating) or not np.isfinite(init).all():
            raise ValueError(f"pretrained embeddings for {where}: expected finite floats")
        embed.embedding[...] = jnp.asarray(init, jnp.float32)
    return embed


class Object2Vec(nnx.Module):
    """Pair model. Attributes: embed0, embed1 (``embed1 is embed0`` when tied), enc0,
    enc1, mlp (nnx.List of hidden nnx.Linear), output (nnx.Linear to num_outputs)."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs,
                 pretrained: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
                 layout: str | None = None):
        """Build and initialise the model.

        Args:
          config: the validated configuration.
          rngs: initialisation randomness (only the default stream is used).
          pretrained: per side, None or float32 (V, D) initial rows for the token table
            (the caller merges file rows with default-init rows). With tied tables the
            first non-None of the two is used.
          layout: "cpu" or "accelerator", the code shape of the bag loops
            (:mod:`o2v_jax.kernels`); None: :func:`~o2v_jax.kernels.default_layout`.
        """
        self.layout = default_layout() if layout is None else check_layout(layout)
        self.comparator_list = config.comparator_list
        self.dropout_rate = config.dropout
        self.activation = config.mlp_activation
        enc0, enc1 = config.encoders
        init0 = pretrained[0]
        if config.tied_token_embedding_weight and pretrained[1] is not None:
            if init0 is None:
                init0 = pretrained[1]
            elif not np.array_equal(init0, pretrained[1]):
                log.warning("tied_token_embedding_weight=true: the shared table starts "
                            "from enc0's pretrained embeddings; enc1's are ignored")
        self.embed0 = _token_table(enc0.vocab_size, enc0.token_embedding_dim, init0,
                                   "enc0", rngs)
        if config.tied_token_embedding_weight:
            self.embed1 = self.embed0  # one shared table (spec §4.6)
        else:
            self.embed1 = _token_table(enc1.vocab_size, enc1.token_embedding_dim,
                                       pretrained[1], "enc1", rngs)
        self.enc0 = make_encoder(enc0, config.enc_dim, rngs=rngs)
        self.enc1 = make_encoder(enc1, config.enc_dim, rngs=rngs)
        width = comparator_dim(config.enc_dim, config.comparator_list)
        mlp = []
        for _ in range(config.mlp_layers):
            mlp.append(nnx.Linear(width, config.mlp_dim, rngs=rngs))
            width = config.mlp_dim
        self.mlp = nnx.List(mlp)
        self.output = nnx.Linear(width, config.num_outputs, rngs=rngs)

    def encode(self, tokens: jax.Array, side: int, *,
               projection: jax.Array | None = None) -> jax.Array:
        """One side's embedding (deterministic; training adds dropout in
        :meth:`from_encodings`).

        Args:
          tokens: int32 (B, L), 0 = padding.
          side: 0 (enc0, for in0) or 1 (enc1, for in1).
          projection: this side's :meth:`token_projection` (bilstm, hcnn), precomputed
            for fixed weights (inference); its rows replace the first layer's matmul.

        Returns:
          float32 (B, H).
        """
        if side not in (0, 1):
            raise ValueError(f"side={side!r} is invalid: expected 0 (enc0) or 1 (enc1)")
        embed, encoder = (self.embed0, self.enc0) if side == 0 else (self.embed1, self.enc1)
        tokens = jnp.asarray(tokens)
        if isinstance(encoder, PooledEmbedding):
            # Pooled straight from ids: no (B, L, D) intermediate (encoders.py says why).
            return encoder.from_ids(embed.embedding[...], tokens, self.layout)
        if projection is not None:
            # Ids are range-checked by the caller (the predictor); clip keeps any slip defined.
            return encoder.from_projection(jnp.take(projection, tokens, axis=0, mode="clip"),
                                           tokens != 0)
        x = embed(tokens)  # (B, L, D); a gather (jnp.take)
        return encoder(x, tokens != 0)

    def token_projection(self, side: int) -> jax.Array | None:
        """Every token's first-layer product, ``table @ encoder.input_kernel()``.

        float32 (V, 4 h_fwd + 4 h_bwd) for bilstm (the LSTM input projection), (V, w F_0)
        for hcnn (the first conv's taps); None for pooled_embedding, which has no first
        layer. With fixed weights :meth:`encode` can look rows up (``projection=``).
        """
        embed, encoder = (self.embed0, self.enc0) if side == 0 else (self.embed1, self.enc1)
        if not isinstance(encoder, (BiLSTM, HCNN)):
            return None
        return jnp.matmul(embed.embedding[...], encoder.input_kernel(),
                          precision=jax.lax.Precision.HIGHEST)

    def __call__(self, in0: jax.Array, in1: jax.Array, *,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Score pairs.

        Args:
          in0: int32 (B, L0); in1: int32 (B, L1); 0 = padding.
          dropout_key: None for deterministic output, else a key used once per step.

        Returns:
          output: float32 (B, num_outputs): logits (softmax) or predictions (regression).
          aux: {"enc0": (B, H), "enc1": (B, H), "comparator": (B, C)}.
        """
        return self.from_encodings(self.encode(in0, 0), self.encode(in1, 1),
                                   dropout_key=dropout_key)

    def from_encodings(self, u: jax.Array, v: jax.Array, *,
                       dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """``__call__`` from the two encodings on: their output dropout, then :meth:`head`.

        The row_sparse train step encodes pooled sides itself (to differentiate with
        respect to the (B, H) encodings) and continues here, with the same dropout sites.

        Args:
          u, v: float32 (B, H), :meth:`encode` of in0 and in1.
          dropout_key: as in ``__call__``.

        Returns:
          (output, aux) as ``__call__`` returns them.
        """
        u, v = self.encoding_dropout(u, v, dropout_key=dropout_key)
        output, c = self.head(u, v, dropout_key=dropout_key)
        return output, {"enc0": u, "enc1": v, "comparator": c}

    def encoding_dropout(self, u: jax.Array, v: jax.Array, *,
                         dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The encoder-output dropout of both sides (sites 0 and 1); the contrastive
        objective, which has no head, applies only this."""
        return (dropout(u, self.dropout_rate, _site_key(dropout_key, _ENCODER_SITE)),
                dropout(v, self.dropout_rate, _site_key(dropout_key, _ENCODER_SITE + 1)))

    def head(self, u: jax.Array, v: jax.Array, *,
             dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Comparator, MLP and output layer on two encodings.

        Inference encodes each side in its own length bucket and then runs only this
        part, so pair scoring compiles once per batch size instead of per (L0, L1) pair.

        Args:
          u, v: float32 (B, H) encodings of in0 and in1.
          dropout_key: as in ``__call__`` (the MLP's sites only).

        Returns:
          (output (B, num_outputs), comparator features (B, C)).
        """
        c = compare(u, v, self.comparator_list)
        h = c
        act = ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.mlp):
            h = dropout(act(layer(h)), self.dropout_rate, _site_key(dropout_key, _MLP_SITE + i))
        return self.output(h), c


# --------------------------------------------------------------------------- parameter layout

# The top-level groups of split_params(model)[1] (Object2Vec's attribute names). Token
# tables are nnx.Embed, their (V, D) array under "embedding"; a tied table is one
# Variable, which nnx stores once, at its first path: embed0.
TABLE_GROUPS = ("embed0", "embed1")
ENCODER_GROUPS = ("enc0", "enc1")  # side 0, side 1
HEAD_GROUPS = ("mlp", "output")  # what head() reads


def table_groups(tied: bool) -> tuple[str, ...]:
    """The token tables a model has: ``("embed0",)`` when tied, else both."""
    return TABLE_GROUPS[:1] if tied else TABLE_GROUPS


def table_group(side: int, tied: bool) -> str:
    """The group holding ``side``'s token table: its own, or embed0 when tied."""
    return TABLE_GROUPS[0 if tied else side]


def side_groups(side: int, tied: bool) -> tuple[str, str]:
    """The groups ``encode(tokens, side)`` reads: its token table and its encoder."""
    return table_group(side, tied), ENCODER_GROUPS[side]


def split_tables(params: dict) -> tuple[dict, dict]:
    """(the other groups, {table group: float32 (V, D)}) of a params dict (or of its
    gradients): the trainer updates the tables apart from the rest."""
    rest = {k: v for k, v in params.items() if k not in TABLE_GROUPS}
    return rest, {k: params[k]["embedding"] for k in TABLE_GROUPS if k in params}


def join_tables(rest: dict, tables: dict) -> dict:
    """The inverse of :func:`split_tables`."""
    return {**rest, **{k: {"embedding": t} for k, t in tables.items()}}


def embedding_paths(model: Object2Vec) -> dict[int, tuple]:
    """Where each side's token table lives in ``nnx.split(model)`` / ``nnx.state(model)``.

    Returns:
      {0: path, 1: path}, a path being a tuple of keys into the state, e.g.
      ``("embed0", "embedding")``; tied tables map both sides to embed0's path (use
      ``set(paths.values())`` for the distinct tables).
    """
    tied = model.embed1 is model.embed0
    return {side: (table_group(side, tied), "embedding") for side in (0, 1)}


def split_params(model: Object2Vec) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params): the static structure and the parameters as a nested dict of
    arrays, the form the trainer, optax and the checkpoint module work with."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def merge_params(graphdef: nnx.GraphDef, params: dict) -> Object2Vec:
    """Rebuild a model from :func:`split_params`' output (cheap; use inside jit)."""
    return nnx.merge(graphdef, params)


def abstract_model(config: Config, layout: str | None = None) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params as ShapeDtypeStructs) without running any initialiser: what a
    loader needs to restore saved parameters into. ``layout`` as for :class:`Object2Vec`."""
    model = nnx.eval_shape(lambda: Object2Vec(config, rngs=nnx.Rngs(0), layout=layout))
    return split_params(model)


def nnx_rngs(key: jax.Array) -> nnx.Rngs:
    """The ``rngs`` argument of :class:`Object2Vec` from a key (keeps flax out of callers)."""
    return nnx.Rngs(key)
