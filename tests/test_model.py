"""The pair model: shapes, comparator, MLP, tied/pretrained tables, dropout, jit, grads."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_compiles
from flax import nnx

from o2v_jax import model as model_module
from o2v_jax.config import from_hyperparameters
from o2v_jax.kernels import default_layout
from o2v_jax.model import Object2Vec, comparator_dim, embedding_paths

IN0 = np.array([[1, 2, 3, 0], [4, 5, 0, 0], [6, 0, 0, 0]], np.int32)  # tokens 1-6
IN1 = np.array([[7, 8, 0], [9, 7, 8], [10, 0, 0]], np.int32)  # tokens 7-10


@pytest.fixture(autouse=True)
def _strict_ranks():
    with jax.numpy_rank_promotion("raise"):
        yield


def tiny_config(**hp):
    base = {"enc0_max_seq_len": 8, "enc0_vocab_size": 20, "enc0_network": "pooled_embedding",
            "enc1_network": "enc0", "enc_dim": 8, "mlp_dim": 6, "mini_batch_size": 4}
    base.update(hp)
    return from_hyperparameters(base)


def jit_forward(model):
    """The trainer's pattern: pure function of split state under jax.jit."""
    graphdef, params = nnx.split(model)
    f = jax.jit(lambda p, a, b, k: nnx.merge(graphdef, p)(a, b, dropout_key=k))
    return lambda a, b, key=None: f(params, a, b, key)


COMPARATORS = ["hadamard", "concat, abs_diff", "hadamard, concat, abs_diff"]
NETWORKS = {"pooled_embedding": dict(enc0_network="pooled_embedding"),
            "hcnn": dict(enc0_network="hcnn", enc0_token_embedding_dim=5, enc0_layers=2),
            "bilstm": dict(enc0_network="bilstm", enc0_token_embedding_dim=5)}


@pytest.mark.parametrize("network,comparators,mlp_layers,output_layer", list(itertools.product(
    NETWORKS, COMPARATORS, [0, 2], ["softmax", "mean_squared_error"])))
def test_output_shapes(network, comparators, mlp_layers, output_layer):
    config = tiny_config(**NETWORKS[network], comparator_list=comparators, mlp_layers=mlp_layers,
                         output_layer=output_layer, num_classes=3)
    model = Object2Vec(config, rngs=nnx.Rngs(0))
    out, aux = jit_forward(model)(IN0, IN1)
    assert out.shape == (3, 1 if output_layer == "mean_squared_error" else 3)
    assert aux["enc0"].shape == aux["enc1"].shape == (3, 8)
    assert aux["comparator"].shape == (3, comparator_dim(8, config.comparator_list))
    assert len(model.mlp) == mlp_layers and np.all(np.isfinite(out))


def test_mixed_encoders_with_own_vocabularies():
    config = from_hyperparameters({
        "enc0_max_seq_len": 4, "enc0_vocab_size": 11, "enc0_network": "hcnn",
        "enc0_token_embedding_dim": 3, "enc1_max_seq_len": 3, "enc1_vocab_size": 30,
        "enc1_network": "bilstm", "enc1_token_embedding_dim": 7, "enc_dim": 5, "mlp_dim": 4})
    model = Object2Vec(config, rngs=nnx.Rngs(0))
    assert model.embed0.embedding.shape == (11, 3) and model.embed1.embedding.shape == (30, 7)
    out, aux = jit_forward(model)(IN0, IN1 + 15)
    assert out.shape == (3, 2) and aux["enc1"].shape == (3, 5)


@pytest.mark.parametrize("comparators,parts", [
    ("abs_diff, hadamard", lambda u, v: [jnp.abs(u - v), u * v]),
    ("concat", lambda u, v: [u, v]),
    ("hadamard, concat, abs_diff", lambda u, v: [u * v, u, v, jnp.abs(u - v)]),
])
def test_comparator_concatenates_in_listed_order(comparators, parts):
    model = Object2Vec(tiny_config(comparator_list=comparators), rngs=nnx.Rngs(0))
    _, aux = model(IN0, IN1)
    want = jnp.concatenate(parts(aux["enc0"], aux["enc1"]), axis=-1)
    np.testing.assert_allclose(aux["comparator"], want, rtol=1e-6)
    assert not np.allclose(aux["enc0"], aux["enc1"])  # else order would be untestable


@pytest.mark.parametrize("activation", ["tanh", "relu", "linear"])
def test_mlp_and_output_follow_spec(activation):
    model = Object2Vec(tiny_config(mlp_layers=2, mlp_activation=activation), rngs=nnx.Rngs(0))
    out, aux = model(IN0, IN1)
    act = {"tanh": np.tanh, "relu": lambda z: np.maximum(z, 0), "linear": lambda z: z}[activation]
    h = np.asarray(aux["comparator"])
    for layer in model.mlp:
        h = act(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]))
    want = h @ np.asarray(model.output.kernel[...]) + np.asarray(model.output.bias[...])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_tied_table_is_one_object_that_both_encoders_train():
    model = Object2Vec(tiny_config(tied_token_embedding_weight="true"), rngs=nnx.Rngs(0))
    assert model.embed1 is model.embed0
    paths = embedding_paths(model)
    assert paths == {0: ("embed0", "embedding"), 1: ("embed0", "embedding")}
    graphdef, params = nnx.split(model)
    assert "embed1" not in params and nnx.merge(graphdef, params).embed1 is not None
    merged = nnx.merge(graphdef, params)
    assert merged.embed1 is merged.embed0  # sharing survives split/merge

    def loss(p):
        out, _ = nnx.merge(graphdef, p)(IN0, IN1)
        return jnp.sum(out ** 2)

    grad = np.asarray(jax.jit(jax.grad(loss))(params)["embed0"]["embedding"][...])
    used0, used1 = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]
    assert np.all(np.abs(grad[used0]).sum(1) > 0) and np.all(np.abs(grad[used1]).sum(1) > 0)
    assert np.all(grad[11:] == 0) and np.all(grad[0] == 0)


def test_untied_tables_are_separate_and_each_side_trains_its_own():
    model = Object2Vec(tiny_config(), rngs=nnx.Rngs(0))
    assert model.embed1 is not model.embed0
    assert embedding_paths(model) == {0: ("embed0", "embedding"), 1: ("embed1", "embedding")}
    graphdef, params = nnx.split(model)

    def loss(p):
        out, _ = nnx.merge(graphdef, p)(IN0, IN1)
        return jnp.sum(out ** 2)

    grads = jax.grad(loss)(params)
    g0 = np.asarray(grads["embed0"]["embedding"][...])
    g1 = np.asarray(grads["embed1"]["embedding"][...])
    assert np.all(np.abs(g0[1:7]).sum(1) > 0) and np.all(g0[7:] == 0)
    assert np.all(np.abs(g1[7:11]).sum(1) > 0) and np.all(g1[:7] == 0)


@pytest.mark.parametrize("network", list(NETWORKS))
def test_grad_is_finite_and_zero_for_the_padding_row(network):
    model = Object2Vec(tiny_config(**NETWORKS[network], mlp_layers=1, dropout=0.2),
                       rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    in1 = IN1.copy()
    in1[2] = 0  # an all-padding row must not make gradients nan

    def loss(p, key):
        out, _ = nnx.merge(graphdef, p)(IN0, in1, dropout_key=key)
        return jnp.mean(out ** 2)

    grads = jax.jit(jax.grad(loss))(params, jax.random.key(3))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves)
    for name in ("embed0", "embed1"):
        table = np.asarray(grads[name]["embedding"][...])
        assert np.all(table[0] == 0) and np.any(table[1:] != 0)


def test_pretrained_rows_initialise_the_tables():
    config = tiny_config()
    p0 = np.arange(20 * 8, dtype=np.float32).reshape(20, 8) / 100
    p1 = -p0
    model = Object2Vec(config, rngs=nnx.Rngs(0), pretrained=(p0, p1))
    np.testing.assert_array_equal(model.embed0.embedding[...], p0)
    np.testing.assert_array_equal(model.embed1.embedding[...], p1)
    only1 = Object2Vec(config, rngs=nnx.Rngs(0), pretrained=(None, p1))
    default = Object2Vec(config, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(only1.embed0.embedding[...], default.embed0.embedding[...])
    np.testing.assert_array_equal(only1.embed1.embedding[...], p1)
    assert 0.05 < float(jnp.std(default.embed0.embedding[...])) < 1.0  # N(0, 1/D) default
    tied = tiny_config(tied_token_embedding_weight="true")
    np.testing.assert_array_equal(
        Object2Vec(tied, rngs=nnx.Rngs(0), pretrained=(p0, None)).embed1.embedding[...], p0)
    np.testing.assert_array_equal(
        Object2Vec(tied, rngs=nnx.Rngs(0), pretrained=(None, p1)).embed0.embedding[...], p1)
    with pytest.raises(ValueError, match=r"enc1: expected shape \(20, 8\)"):
        Object2Vec(config, rngs=nnx.Rngs(0), pretrained=(None, p1[:5]))


def test_dropout_key_none_is_deterministic_and_keys_are_never_reused():
    model = Object2Vec(tiny_config(dropout=0.5, mlp_layers=2, tied_token_embedding_weight="true"),
                       rngs=nnx.Rngs(0))
    fwd = jit_forward(model)
    base, _ = fwd(IN0, IN1)
    np.testing.assert_array_equal(fwd(IN0, IN1)[0], base)
    np.testing.assert_allclose(model(IN0, IN1)[0], base, rtol=1e-5, atol=1e-6)  # eager
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, b = fwd(IN0, IN1, k1)[0], fwd(IN0, IN1, k2)[0]
    np.testing.assert_array_equal(fwd(IN0, IN1, k1)[0], a)  # same key, same result
    assert not np.allclose(a, b) and not np.allclose(a, base)
    # Same tokens on both (tied) sides: one shared key would give identical dropout masks.
    _, aux = fwd(IN0, IN0, k1)
    assert not np.array_equal(aux["enc0"] == 0, aux["enc1"] == 0)
    # encode() alone: deterministic without a key.
    np.testing.assert_array_equal(model.encode(IN0, 0), model.encode(IN0, 0))
    with pytest.raises(ValueError, match="side"):
        model.encode(IN0, 2)


@pytest.mark.parametrize("network", list(NETWORKS))
def test_jitted_split_merge_forward_equals_eager_and_compiles_once(network):
    model = Object2Vec(tiny_config(**NETWORKS[network], mlp_layers=1), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, a, b, key: nnx.merge(graphdef, p)(a, b, dropout_key=key))
    with count_compiles() as first:
        out, aux = fwd(params, IN0, IN1, None)
    eager_out, eager_aux = model(IN0, IN1)
    np.testing.assert_allclose(out, eager_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["comparator"], eager_aux["comparator"], rtol=1e-5, atol=1e-6)
    with count_compiles() as again:
        fwd(params, IN0 + 1, IN1, None)  # new values, same shapes: no recompile
    assert len(first) == 1 and again == []


@pytest.mark.parametrize("tied", ["true", "false"])
def test_the_parameter_layout_names_the_models_groups(tied):
    # model.py's layout (used by the trainer and the predictor) against the real state:
    # each side's table group holds the Variable that side's encode reads, the encoder
    # and head groups exist, and nothing else is at the top level.
    config = tiny_config(tied_token_embedding_weight=tied, enc0_network="hcnn",
                         enc0_token_embedding_dim=5, mlp_layers=1)
    model = Object2Vec(config, rngs=nnx.Rngs(0))
    is_tied = tied == "true"
    _, params = model_module.split_params(model)
    groups = set(model_module.side_groups(0, is_tied)) | set(model_module.side_groups(1, is_tied))
    assert set(params) == groups | set(model_module.HEAD_GROUPS)
    assert set(model_module.table_groups(is_tied)) == {g for g in params if g.startswith("embed")}
    found = {}
    for path, node in nnx.iter_graph(model):
        for side, embed in ((0, model.embed0), (1, model.embed1)):
            if node is embed.embedding and side not in found:
                found[side] = tuple(path)
    assert embedding_paths(model) == found
    for side in (0, 1):
        assert found[side] == (model_module.table_group(side, is_tied), "embedding")
    rest, tables = model_module.split_tables(params)
    assert set(tables) == set(model_module.table_groups(is_tied)) and not set(rest) & set(tables)
    joined = model_module.join_tables(rest, tables)
    assert jax.tree.structure(joined) == jax.tree.structure(params)


def test_from_encodings_is_the_model_after_its_encoders():
    # The row_sparse step encodes pooled sides itself and continues with from_encodings:
    # same dropout sites, so the same output for the same key.
    model = Object2Vec(tiny_config(dropout=0.4, mlp_layers=2), rngs=nnx.Rngs(0))
    key = jax.random.key(5)
    out, aux = model(IN0, IN1, dropout_key=key)
    out2, aux2 = model.from_encodings(model.encode(IN0, 0), model.encode(IN1, 1), dropout_key=key)
    np.testing.assert_array_equal(out2, out)
    for name in ("enc0", "enc1", "comparator"):
        np.testing.assert_array_equal(aux2[name], aux[name])
    assert (np.asarray(aux["enc0"]) == 0).any()  # dropout did drop something


def test_the_layout_is_static_and_changes_no_result():
    config = tiny_config(mlp_layers=1)
    models = {layout: Object2Vec(config, rngs=nnx.Rngs(0), layout=layout)
              for layout in ("cpu", "accelerator")}
    graphdefs = {layout: nnx.split(m)[0] for layout, m in models.items()}
    assert graphdefs["cpu"] != graphdefs["accelerator"]  # jit sees it through the graphdef
    outs = [np.asarray(jit_forward(m)(IN0, IN1)[0]) for m in models.values()]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert Object2Vec(config, rngs=nnx.Rngs(0)).layout == default_layout()  # from the backend
    with pytest.raises(ValueError, match="layout="):
        Object2Vec(config, rngs=nnx.Rngs(0), layout="tpu")
