"""The sparse MoE block (mmt_jax/layers/moe.py) against hand computations, the dense MLP and itself:
routing and priority dropping, the load-balancing loss, both dispatch implementations, router noise
only in training, and expert parallelism on 8 host devices (same loss and gradients as one device,
experts sharded over `expert`, an all-to-all in the compiled step)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmt_jax.layers import moe
from mmt_jax.layers.mlp import MlpBlock
from mmt_jax.partitioning import Partitioner

D, F = 16, 32


def _block(**overrides):
    config = moe.MoeConfig(**{"num_experts": 4, "num_selected": 2, "group_size": 8,
                              "min_capacity": 1, **overrides})
    return moe.MoeBlock(config, intermediate_dim=F)


def _inputs(batch=2, length=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, D)), jnp.float32)


def test_route_keeps_first_choices_before_second_choices():
    # One group of 4 tokens, 3 experts, k=2, capacity 2. First choices: 0, 0, 0, 1;
    # second choices: 1, 1, 2, 2.
    logits = jnp.array([[[3., 2., 0.], [3., 2., 0.], [3., 0., 2.], [0., 3., 2.]]])
    experts, weights, slot, kept = moe.route(logits, 2, 2)
    np.testing.assert_array_equal(experts[0], [[0, 1], [0, 1], [0, 2], [1, 2]])
    # Expert 0: tokens 0, 1 (first choices) fill it; token 2's first choice is dropped.
    # Expert 1: token 3's first choice takes slot 0 before tokens 0, 1's second choices (slots 1, 2).
    np.testing.assert_array_equal(slot[0], [[0, 1], [1, 2], [2, 0], [0, 1]])
    np.testing.assert_array_equal(kept[0], [[True, True], [True, False], [False, True],
                                            [True, True]])
    e = np.exp([3., 2.])
    np.testing.assert_allclose(weights[0, 0], e / e.sum(), rtol=1e-6)


def test_routing_groups_tile_the_sequence():
    x = _inputs(batch=1, length=12)
    block = _block(group_size=8)  # 12 tokens: groups of 6
    params = block.init(jax.random.key(0), x)["params"]
    _, stats = _run(block, params, x)
    expected_slots = moe.capacity(block.config, 6, block.config.eval_capacity_factor, False)
    _, _, _, kept = moe.route(jnp.einsum("gsd,de->gse", x.reshape(2, 6, D),
                                         params["router"]["kernel"]), 2, expected_slots)
    assert stats["expert_usage"] == pytest.approx(np.sum(kept) / (2 * 4 * expected_slots))


def test_capacity_formula():
    config = moe.MoeConfig(num_experts=8, num_selected=2, min_capacity=4)
    assert moe.capacity(config, 256, 1.25, False) == 80    # ceil(2 * 256 * 1.25 / 8)
    assert moe.capacity(config, 1, 1.25, False) == 1       # a decode step: min(group, ...)
    assert moe.capacity(config, 8, 1.0, False) == 4        # min_capacity
    assert moe.capacity(config, 256, 1.25, True) == 256    # dropless


def test_load_balancing_loss_by_hand():
    rng = np.random.default_rng(1)
    top1 = rng.integers(0, 4, (3, 10))
    gate = rng.dirichlet(np.ones(4), (3, 10))
    expected = np.mean([4 * sum(np.mean(top1[g] == i) * np.mean(gate[g, :, i]) for i in range(4))
                        for g in range(3)])
    np.testing.assert_allclose(moe.load_balancing_loss(jnp.asarray(top1), jnp.asarray(gate)),
                               expected, rtol=1e-6)
    uniform = moe.load_balancing_loss(jnp.arange(8).reshape(1, 8) % 4, jnp.full((1, 8, 4), 0.25))
    np.testing.assert_allclose(uniform, 1.0, rtol=1e-6)


def _run(block, params, x, **kwargs):
    out, state = block.apply({"params": params}, x, mutable=["intermediates"], **kwargs)
    return out, {name: float(values[0]) for name, values in state["intermediates"].items()}


def test_dispatch_variants_agree_and_drops_are_counted():
    x = _inputs()
    block = _block(eval_capacity_factor=0.5)  # capacity ceil(2 * 8 * 0.5 / 4) = 2: some drop
    params = block.init(jax.random.key(0), x)["params"]
    out, stats = _run(block, params, x)
    gathered, gather_stats = _run(_block(eval_capacity_factor=0.5, dispatch="gather"), params, x)
    np.testing.assert_allclose(out, gathered, atol=1e-5)
    assert stats == pytest.approx(gather_stats)
    logits = jnp.einsum("gsd,de->gse", x.reshape(2, 8, D), params["router"]["kernel"])
    _, _, _, kept = moe.route(logits, 2, 2)
    assert 0 < stats["fraction_tokens_left_behind"] == pytest.approx(
        1 - np.mean(np.any(kept, -1)))
    assert stats["expert_usage"] == pytest.approx(np.sum(kept) / (2 * 4 * 2))
    # A capacity large enough for everything drops nothing; dropless likewise.
    for kwargs in ({"eval_capacity_factor": 4.0}, {"eval_capacity_factor": 0.5, "eval_dropless": True}):
        _, stats = _run(_block(**kwargs), params, x)
        assert stats["fraction_tokens_left_behind"] == 0 and stats["router_confidence"] == (
            pytest.approx(1.0))


def test_one_expert_top1_equals_the_dense_mlp():
    x = _inputs()
    block = _block(num_experts=1, num_selected=1)
    params = block.init(jax.random.key(0), x)["params"]
    assert params["expert"]["wi_0"]["kernel"].shape == (1, D, F)
    dense = MlpBlock(F)
    dense_params = jax.tree_util.tree_map(lambda w: w[0], params["expert"])
    np.testing.assert_allclose(_run(block, params, x)[0], dense.apply({"params": dense_params}, x),
                               atol=1e-5)


def test_router_noise_only_in_training():
    x = _inputs()
    block = _block(router_noise=1.0)
    params = block.init(jax.random.key(0), x)["params"]
    evaluation = _run(block, params, x)[0]
    rngs = lambda seed: {"router_noise": jax.random.key(seed), "dropout": jax.random.key(0)}  # noqa
    a = _run(block, params, x, enable_dropout=True, rngs=rngs(1))[0]
    b = _run(block, params, x, enable_dropout=True, rngs=rngs(2))[0]
    assert not np.allclose(a, b) and not np.allclose(a, evaluation)
    quiet = _run(_block(router_noise=0.0), params, x, enable_dropout=True, rngs=rngs(1))[0]
    train_capacity = _run(dataclasses.replace(block, config=dataclasses.replace(
        block.config, router_noise=0.0, eval_capacity_factor=1.25)), params, x)[0]
    np.testing.assert_allclose(quiet, train_capacity, atol=1e-6)  # only noise and capacity differ


def _loss_and_grads(block, params, x):
    def loss(p):
        out, state = block.apply({"params": p}, x, mutable=["intermediates"])
        aux = state["intermediates"]["auxiliary_loss"][0]
        return jnp.mean(jnp.square(out)) + 0.1 * aux
    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("dispatch", moe.DISPATCH)
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1), (4, 1, 2)])
def test_expert_parallel_equals_one_device(mesh_shape, dispatch):
    x = _inputs(batch=8, length=16)
    block = moe.MoeBlock(moe.MoeConfig(num_experts=8, num_selected=2, group_size=8,
                                       eval_capacity_factor=1.0, min_capacity=1, dispatch=dispatch),
                         intermediate_dim=F)
    variables = block.init(jax.random.key(0), x)
    reference_loss, reference_grads = jax.jit(_loss_and_grads, static_argnums=0)(
        block, variables["params"], x)

    partitioner = Partitioner(mesh_shape)
    shardings = partitioner.params_shardings(variables["params_axes"])
    params = jax.device_put(variables["params"], shardings)
    wi = params["expert"]["wi_0"]["kernel"]
    assert wi.sharding.spec == P("expert", None, "model")
    assert params["router"]["kernel"].sharding.spec == P(None, None)
    x_sharded = jax.device_put(x, partitioner.data_sharding(3))
    with partitioner.context():
        step = jax.jit(_loss_and_grads, static_argnums=0)
        loss, grads = step(block, params, x_sharded)
        hlo = step.lower(block, params, x_sharded).compile().as_text()
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           grads, reference_grads)
    if mesh_shape[1] > 1:
        assert "all-to-all" in hlo


def test_expert_dropout_follows_enable_dropout():
    x = _inputs()
    block = dataclasses.replace(_block(router_noise=0.0), dropout_rate=0.5)
    params = block.init(jax.random.key(0), x)["params"]
    rngs = lambda seed: {"dropout": jax.random.key(seed)}  # noqa: E731
    a = _run(block, params, x, enable_dropout=True, rngs=rngs(1))[0]
    b = _run(block, params, x, enable_dropout=True, rngs=rngs(2))[0]
    assert not np.allclose(a, b)


# ---- MoE layers in the T5 stacks ----------------------------------------------------------------

def test_placements():
    from mmt_jax.models.t5 import moe_layers
    assert moe_layers("odd", 6) == {1, 3, 5} and moe_layers("even", 6) == {0, 2, 4}
    assert moe_layers("all", 3) == {0, 1, 2} and moe_layers("none", 3) == set()
    assert moe_layers("last", 6) == {5} and moe_layers("last-2", 6) == {4, 5}
    assert moe_layers((0, 2), 6) == {0, 2}
    with pytest.raises(ValueError, match="outside"):
        moe_layers((6,), 6)
    with pytest.raises(ValueError, match="placement 'first'"):
        moe_layers("first", 6)


def _moe_config(**overrides):
    return moe.MoeConfig(**{"num_experts": 4, "num_selected": 2, "eval_capacity_factor": 4.0,
                            "min_capacity": 1, **overrides})


def test_config_round_trips_and_the_tree_has_experts_where_placed():
    from mmt_jax.models.t5 import EncoderDecoder, T5Config, t5_config
    config = t5_config("tiny", vocab_size=64, moe=_moe_config(), decoder_moe_layers="odd",
                       encoder_moe_layers=(0,))
    assert T5Config.from_json_dict(config.to_json_dict()) == config
    with pytest.raises(ValueError, match="moe is None"):
        t5_config("tiny", decoder_moe_layers="all")
    shapes = {"encoder_input_tokens": (2, 6), "decoder_input_tokens": (2, 4)}
    params = jax.eval_shape(lambda: EncoderDecoder(config).init(
        jax.random.key(0), jnp.ones(shapes["encoder_input_tokens"], jnp.int32),
        jnp.ones(shapes["decoder_input_tokens"], jnp.int32)))["params"]
    assert params["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"].shape == (4, 128, 512)
    assert params["decoder"]["layers_1"]["mlp"]["router"]["kernel"].shape == (128, 4)
    assert "expert" not in params["decoder"]["layers_0"]["mlp"]
    assert "expert" in params["encoder"]["layers_0"]["mlp"]
    assert "expert" not in params["encoder"]["layers_1"]["mlp"]


def test_cached_decode_equals_full_forward_with_moe_layers():
    from tests.test_decoding import batch_for, greedy_by_recompute, make_model
    from tests.test_hf_parity import padded_tokens
    model, params = make_model(moe=_moe_config(), decoder_moe_layers="odd")
    assert "expert" in params["decoder"]["layers_1"]["mlp"]
    enc = padded_tokens(np.random.default_rng(0), 3, 7, 64)
    tokens, _ = model.predict_batch_with_aux(params, batch_for(enc, 8))
    expected = greedy_by_recompute(model, params, enc, 8)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert len(np.unique(expected)) > 3


def test_the_loss_adds_the_weighted_aux_loss_and_reports_the_statistics():
    from mmt_jax.model import MoeEncoderDecoderModel, model_for
    from tests.test_decoding import make_model
    model, params = make_model(moe=_moe_config(aux_loss_weight=0.1, z_loss_weight=0.01),
                               decoder_moe_layers="all")
    model = model_for(model.module)  # make_model builds the dense class; the loss needs the MoE one
    assert isinstance(model, MoeEncoderDecoderModel)
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 64, (2, 5)).astype(np.int32)
    batch = {"encoder_input_tokens": rng.integers(2, 64, (2, 6)).astype(np.int32),
             "decoder_input_tokens": np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], 1),
             "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}
    loss_fn = jax.jit(model.loss_fn)
    loss, metrics = loss_fn(params, batch, None)
    values = {k: float(v.compute()) for k, v in metrics.items()}
    assert set(values) >= {f"moe/{n}" for n in ("auxiliary_loss", "router_z_loss",
                                                "fraction_tokens_left_behind", "expert_usage",
                                                "router_confidence")}
    cross_entropy = values["cross_ent_loss"] + values["z_loss"]
    np.testing.assert_allclose(float(loss), cross_entropy + 0.1 * values["moe/auxiliary_loss"]
                               + 0.01 * values["moe/router_z_loss"], rtol=1e-5)
    # training draws router noise from its own stream: two dropout keys, two losses
    a, _ = loss_fn(params, batch, jax.random.key(1))
    b, _ = loss_fn(params, batch, jax.random.key(2))
    assert float(a) != float(b)


# ---- training modes and sparse upcycling --------------------------------------------------------

def _tiny_moe_model(**overrides):
    from mmt_jax.model import model_for
    from mmt_jax.models.t5 import EncoderDecoder, t5_config
    config = t5_config("tiny", vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                       **overrides)
    return model_for(EncoderDecoder(config))


def _lm_batch(batch=8, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, 64, (batch, 5)).astype(np.int32)
    return {"encoder_input_tokens": rng.integers(2, 64, (batch, 6)).astype(np.int32),
            "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32),
                                                    targets[:, :-1]], 1),
            "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}


@pytest.mark.parametrize("mode", ["experts", "backbone"])
def test_training_modes_freeze_and_frozen_parameters_have_no_optimizer_state(mode):
    from flax import traverse_util
    from mmt_jax.training import optimizers
    from mmt_jax.training.trainer import Trainer
    model = _tiny_moe_model(moe=_moe_config(), decoder_moe_layers="odd")
    batch = _lm_batch()
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    tx = optimizers.train_only(optimizers.adamw(1e-2), mode)
    trainer = Trainer(model, Partitioner((2, 4, 1)), tx, shapes, types)
    state, _, _ = trainer.initial_state(seed=0)
    before = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    state, _ = trainer.train_step(state, trainer.global_batch(batch), jax.random.key(0))
    after = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    moe_paths = {p for p in before if "/mlp/expert/" in p or "/mlp/router/" in p}
    assert moe_paths and all(p.startswith("decoder/layers_1/mlp/") for p in moe_paths)
    trained = moe_paths if mode == "experts" else set(before) - moe_paths
    for path in before:
        assert np.array_equal(before[path], after[path]) == (path not in trained), path
    # Adam's moments exist for the trained parameters only.
    state_sizes = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
    assert state_sizes == 2 * sum(before[p].size for p in trained)


def test_sparse_upcycling_copies_the_dense_mlp_into_every_expert():
    from flax import traverse_util
    from mmt_jax.checkpoints.store import initialize_from
    dense = _tiny_moe_model()
    batch = _lm_batch(batch=2)
    shapes = {k: v.shape for k, v in batch.items()}
    dense_params = jax.jit(lambda key: dense.get_initial_variables(key, shapes))(
        jax.random.key(0))["params"]
    sparse = _tiny_moe_model(moe=_moe_config(num_experts=3, num_selected=1), decoder_moe_layers="all")
    fresh = jax.jit(lambda key: sparse.get_initial_variables(key, shapes))(jax.random.key(1))["params"]
    params, fresh_paths, upcycled = initialize_from(fresh, dense_params)
    assert fresh_paths == ["decoder/layers_0/mlp/router/kernel", "decoder/layers_1/mlp/router/kernel"]
    assert upcycled == [f"decoder/layers_{i}/mlp/expert/{w}/kernel" for i in range(2)
                        for w in ("wi_0", "wi_1", "wo")]
    flat = traverse_util.flatten_dict(params, sep="/")
    for path in upcycled:
        dense_kernel = traverse_util.flatten_dict(dense_params, sep="/")[
            path.replace("/mlp/expert/", "/mlp/")]
        assert all(np.array_equal(expert, dense_kernel) for expert in flat[path])
    # Every expert equal to the dense MLP and k=1 (weight 1): the upcycled model is the dense model.
    np.testing.assert_allclose(jax.jit(sparse._compute_logits)(params, batch),
                               jax.jit(dense._compute_logits)(dense_params, batch), atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1), (4, 1, 2)])
def test_moe_model_loss_and_gradients_on_a_mesh_equal_one_device(mesh_shape):
    model = _tiny_moe_model(moe=_moe_config(num_experts=8, eval_capacity_factor=1.0),
                            decoder_moe_layers="odd")
    batch = _lm_batch()
    shapes = {k: v.shape for k, v in batch.items()}
    variables = jax.jit(lambda key: model.get_initial_variables(key, shapes))(jax.random.key(0))
    grad_fn = jax.value_and_grad(lambda p, b: model.loss_fn(p, b, None)[0])
    reference_loss, reference_grads = jax.jit(grad_fn)(variables["params"], batch)

    partitioner = Partitioner(mesh_shape)
    shardings = partitioner.params_shardings(variables["params_axes"])
    params = jax.device_put(variables["params"], shardings)
    expert = params["decoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"]
    assert expert.sharding.spec == P("expert", "model", None)
    step = jax.jit(grad_fn, in_shardings=(shardings, partitioner.batch_shardings(batch)),
                   out_shardings=(partitioner.replicated(), shardings))
    sharded_batch = partitioner.shard_batch(batch)
    with partitioner.context():
        loss, grads = step(params, sharded_batch)
        hlo = step.lower(params, sharded_batch).compile().as_text()
    assert ("all-to-all" in hlo) == (mesh_shape[1] > 1)
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(grads), reference_grads)
