"""The masked pair objective and its metrics (o2v_jax/objectives.py)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from o2v_jax.objectives import objective


def test_objective_ignores_fill_rows():
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    labels = jnp.array([0.0, 0.0, 1.0])
    full, sums = objective(logits, labels, jnp.array([1.0, 1.0, 0.0]), regression=False)
    alone, _ = objective(logits[:2], labels[:2], jnp.ones(2), regression=False)
    assert float(full) == pytest.approx(float(alone))
    assert float(sums["count"]) == 2.0 and float(sums["correct"]) == 1.0


def test_objective_regression_reports_plain_mse():
    out = jnp.array([[1.0], [3.0]])
    _, sums = objective(out, jnp.array([0.0, 1.0]), jnp.ones(2), regression=True)
    assert float(sums["loss"]) / float(sums["count"]) == pytest.approx((1 + 4) / 2)


def test_objective_never_counts_fill_rows_as_correct():
    # Fill rows are labelled 0 (buckets._make_batch); here the model predicts 0 for them,
    # so a metric that forgot their weights would count them as correct.
    logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [3.0, -3.0], [4.0, -4.0], [5.0, -5.0]])
    labels = jnp.array([0.0, 0.0, 0.0, 0.0, 0.0])
    weights = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0])
    _, sums = objective(logits, labels, weights, regression=False)
    assert (float(sums["correct"]), float(sums["count"])) == (1.0, 2.0)




# --------------------------------------------------------------------------- contrastive


def _contrastive_reference(u, v, labels, weights, temperature):
    """The loss written out with loops: each positive row's two softmax cross-entropies."""
    import numpy as np

    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = u @ v.T / temperature
    real = [j for j in range(len(u)) if weights[j] > 0]
    pos = [i for i in real if labels[i] == 1]
    total = 0.0
    for i in pos:
        docs = np.log(sum(np.exp(s[i, j]) for j in real)) - s[i, i]  # every real in1
        queries = np.log(sum(np.exp(s[k, i]) for k in pos)) - s[i, i]  # positive in0 only
        total += 0.5 * (docs + queries)
    return total / len(pos), len(pos)


def test_contrastive_loss_equals_a_hand_written_reference():
    import numpy as np

    from o2v_jax.objectives import contrastive_objective

    rng = np.random.default_rng(0)
    u = rng.standard_normal((7, 5)).astype(np.float32)
    v = rng.standard_normal((7, 5)).astype(np.float32)
    labels = np.array([1, 1, 0, 1, 0, 1, 1], np.float32)  # rows 2, 4: hard negatives
    weights = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)  # rows 5, 6: fill rows
    # Fill rows hold anything, here huge vectors equal to row 0's: if they entered either
    # softmax as a positive or a negative, the loss would change a lot.
    u[5:], v[5:] = 100 * u[0], 100 * v[0]
    for temperature in (0.05, 1.0):
        loss, sums = contrastive_objective(jnp.asarray(u), jnp.asarray(v), jnp.asarray(labels),
                                           jnp.asarray(weights), temperature)
        want, count = _contrastive_reference(u, v, labels, weights, temperature)
        assert float(loss) == pytest.approx(want, rel=1e-5)
        assert float(sums["count"]) == count == 3
        assert float(sums["loss"]) == pytest.approx(want * count, rel=1e-5)


def test_contrastive_loss_ignores_what_fill_rows_hold():
    import jax
    import numpy as np

    from o2v_jax.objectives import contrastive_objective

    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    labels = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    loss = lambda u, v: contrastive_objective(u, v, labels, weights, 0.1)[0]  # noqa: E731
    other = u.at[4:].set(7.0), v.at[4:].set(-3.0)
    assert float(loss(u, v)) == pytest.approx(float(loss(*other)), rel=1e-6)
    gu, gv = jax.grad(loss, argnums=(0, 1))(u, v)
    assert np.all(np.asarray(gu[4:]) == 0) and np.all(np.asarray(gv[4:]) == 0)
    assert np.all(np.asarray(gu[1]) == 0)  # a hard negative's in0 is no query
    assert np.any(np.asarray(gv[1]) != 0)  # but its in1 is a negative for every query
    assert np.isfinite(np.asarray(gu)).all() and np.isfinite(np.asarray(gv)).all()


def _topic_pairs(n: int, seed: int, topics: int = 12) -> list[dict]:
    """Title -> document pairs that share no token id: a query holds one or two of its
    topic's two title words, a document four of its topic's four body words and two
    noise words. Only a learned title-word <-> body-word association ranks well."""
    import numpy as np

    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        t = int(rng.integers(topics))
        title = (1 + 2 * t + rng.integers(0, 2, size=rng.integers(1, 3))).tolist()
        body = (1 + 2 * topics + 4 * t + rng.integers(0, 4, size=4)).tolist()
        noise = rng.integers(1 + 6 * topics, 80, size=2).tolist()
        records.append({"in0": title, "in1": body + noise, "label": 1})
    return records


def test_contrastive_objective_retrieves_better_than_the_pair_objective(tmp_path):
    """The issue's claim on a small synthetic task: the same tied pooled model, trained
    with SageMaker's pair objective (3 sampled negatives per pair) or with
    objective=contrastive, ranked by the cosine of its embeddings."""
    from conftest import write_jsonl

    from o2v_jax.config import from_hyperparameters
    from o2v_jax.data import read_channel
    from o2v_jax.ranking import evaluate_retrieval
    from o2v_jax.training import train

    train_path = write_jsonl(tmp_path / "train.jsonl", _topic_pairs(384, 0))
    test_path = write_jsonl(tmp_path / "test.jsonl", _topic_pairs(96, 1))
    base = {"enc0_network": "pooled_embedding", "enc0_vocab_size": 80, "enc0_max_seq_len": 8,
            "enc_dim": 16, "tied_token_embedding_weight": "true", "epochs": 4,
            "learning_rate": 0.01, "mini_batch_size": 32}
    runs = {"pair": {"negative_sampling_rate": 3, "comparator_list": "hadamard,abs_diff",
                     "mlp_dim": 16, "mlp_layers": 1},
            "contrastive": {}}
    got = {}
    for kind, hp in runs.items():
        config = from_hyperparameters({**base, **hp, "objective": kind})
        train(config, read_channel(train_path, config), model_dir=tmp_path / kind,
              emit=lambda line: None, progress=False)
        got[kind] = evaluate_retrieval(tmp_path / kind, test_path)
    assert got["contrastive"]["mrr"] > got["pair"]["mrr"] + 0.1
    assert got["contrastive"]["hits@10"] > got["pair"]["hits@10"] + 0.2


# --------------------------------------------------------------------------- contrastive steps


@pytest.mark.parametrize("network,tied,layout,storage", [
    ("pooled_embedding", "true", "cpu", "dense"),
    ("hcnn", "false", "accelerator", "row_sparse"),
    ("bilstm", "true", "cpu", "dense"),
])
def test_contrastive_step_compiles_once_per_bucket_and_learns(tmp_path, network, tied, layout,
                                                              storage):
    # As tests/test_train.py's pair-objective twin (the CPU row_sparse step also compiles
    # per row-set size, so row_sparse runs in the accelerator layout here), and the
    # contrastive loss of the same batches goes down over the epochs.
    import jax
    import numpy as np
    from conftest import count_compiles, group_pairs, tiny_hp, write_jsonl

    from o2v_jax.buckets import batches
    from o2v_jax.config import from_hyperparameters
    from o2v_jax.data import read_channel
    from o2v_jax.training import build_steps, init_params, staged

    config = from_hyperparameters(tiny_hp(
        objective="contrastive", enc0_network=network, enc0_max_seq_len=20, bucket_width=10,
        tied_token_embedding_weight=tied, token_embedding_storage_type=storage,
        enc0_token_embedding_dim=16, enc0_layers=1, mini_batch_size=32))
    # Titles of <= 8 ids, documents of up to 16: two buckets on either ladder (row_sparse
    # uses the default one), so the count is checked at the least cost (compiles take seconds).
    records = [{**r, "in0": r["in0"][:8], "in1": r["in1"][:16]}
               for r in group_pairs(200, 0, max_len=20)]
    data = read_channel(write_jsonl(tmp_path / "t.jsonl", records), config)
    graphdef, params, keep = init_params(config, 0, (None, None), layout=layout)
    steps = build_steps(graphdef, config, keep, layout=layout)
    state, root = steps.init_state(params), jax.random.key(0)
    shapes, losses = set(), []
    with count_compiles() as compiles:
        for _ in range(2):
            sums = []
            for b, _ in staged(batches(data, config, shuffle_seed=0), layout):
                shapes.add((b.in0.shape, b.in1.shape))
                state, s = steps.train_step(state, b, root)
                sums.append(s)
            losses.append(sum(float(s["loss"]) for s in sums) / sum(float(s["count"]) for s in sums))
    assert len(shapes) == 2
    assert len(compiles) == len(shapes)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.parametrize("tied,gradient_path", [("true", "plan"), ("true", "buffer"),
                                                ("true", "accelerator"), ("false", "buffer")])
def test_contrastive_row_sparse_equals_dense_for_pooled_models(tied, gradient_path):
    # The row_sparse step differentiates pooled models w.r.t. their (B, D) encodings and
    # enters the loss through from_encodings: the same dropout sites, hard negatives and
    # fill rows as the dense step through the model, or the parameters part ways.
    import jax
    import numpy as np
    from conftest import random_batch, run_steps, tiny_hp

    from o2v_jax.config import from_hyperparameters
    from o2v_jax.row_sparse import Options

    run = ({"layout": "accelerator"} if gradient_path == "accelerator" else
           {"layout": "cpu", "options": Options(plan_min_tokens=0 if gradient_path == "plan" else 10**9)})
    in0, in1, labels, weights = random_batch(vocab_used=30)
    weights[-3:] = 0.0  # fill rows
    labels[-3:] = 0.0
    dense = from_hyperparameters(tiny_hp(objective="contrastive", optimizer="sgd",
                                         learning_rate=0.5, dropout=0.3,
                                         tied_token_embedding_weight=tied))
    sparse = dense.replace(token_embedding_storage_type="row_sparse")
    before, p_dense, _ = run_steps(dense, (in0, in1, labels, weights), steps=3, **run)
    _, p_sparse, _ = run_steps(sparse, (in0, in1, labels, weights), steps=3, **run)
    assert not np.allclose(before["embed0"]["embedding"], np.asarray(p_dense["embed0"]["embedding"]))
    for a, b in zip(jax.tree.leaves(p_dense), jax.tree.leaves(p_sparse)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
