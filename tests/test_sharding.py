"""The whole forward/backward on a 2x4 (data x model) mesh of host devices: parameters sharded as the
axis rules say, and the same loss and gradients as on one device; and how a Trainer paces the host
on such a mesh (at most 2 steps ahead, one program to merge a step's metrics)."""
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.t5 import EncoderDecoder, t5_config
from mmt_jax.partitioning import Partitioner, make_mesh
from mmt_jax.training.train_state import TrainState, train_step


def tiny_batch(batch=8, enc=12, dec=6, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, vocab, (batch, dec)).astype(np.int32)
    targets[:, -2:] = 0
    return {"encoder_input_tokens": rng.integers(1, vocab, (batch, enc)).astype(np.int32),
            "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32),
                                                    targets[:, :-1]], 1),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": (targets > 0).astype(np.int32)}


def setup_model(partitioner, batch):
    model = EncoderDecoderModel(EncoderDecoder(t5_config("tiny", vocab_size=128)))
    shapes = {k: v.shape for k, v in batch.items()}
    with partitioner.context():
        abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
    shardings = partitioner.params_shardings(abstract["params_axes"])
    init = partitioner.partition(
        lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"], (), shardings)
    return model, init(), shardings


def test_mesh_shape_errors_are_clear():
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh((4, 1, 4))
    with pytest.raises(ValueError, match="does not divide"):
        make_mesh((-1, 3, 1))


def test_forward_backward_sharded_2x4_equals_single_device():
    batch = tiny_batch()
    mesh_2x4 = Partitioner((2, 1, 4))
    model, params, shardings = setup_model(mesh_2x4, batch)

    # Parameters are laid out exactly as the rules say.
    assert params["token_embedder"]["embedding"].sharding.spec == P("model", None)
    layer = params["encoder"]["layers_0"]
    assert layer["mlp"]["wi_0"]["kernel"].sharding.spec == P(None, "model")
    assert layer["mlp"]["wo"]["kernel"].sharding.spec == P("model", None)
    assert layer["attention"]["query"]["kernel"].sharding.spec == P(None, "model")
    assert layer["attention"]["out"]["kernel"].sharding.spec == P("model", None)
    assert params["decoder"]["logits_dense"]["kernel"].sharding.spec == P(None, "model")
    assert params["encoder"]["relpos_bias"]["rel_embedding"].sharding.spec == P("model", None)
    assert layer["pre_mlp_layer_norm"]["scale"].sharding.spec == P(None)
    shard = params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].addressable_shards[0]
    assert shard.data.shape == (128, 512 // 4)

    def loss_and_grads(p, b):
        return jax.value_and_grad(lambda q: model.loss_fn(q, b, None)[0])(p)

    sharded_batch = mesh_2x4.shard_batch(batch)
    assert sharded_batch["encoder_input_tokens"].sharding.spec == P(("expert", "data"), None)
    step = mesh_2x4.partition(loss_and_grads, (shardings, mesh_2x4.batch_shardings(batch)),
                              (mesh_2x4.replicated(), shardings))
    loss, grads = step(params, sharded_batch)
    assert grads["encoder"]["layers_1"]["mlp"]["wo"]["kernel"].sharding.spec == P("model", None)

    one_device = jax.device_put((jax.device_get(params), batch), jax.devices()[0])
    loss_1, grads_1 = jax.jit(loss_and_grads)(*one_device)
    assert len(grads_1["token_embedder"]["embedding"].devices()) == 1
    np.testing.assert_allclose(float(loss), float(loss_1), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(grads), jax.device_get(grads_1))


def test_train_step_sharded_keeps_optimizer_slots_sharded():
    batch = tiny_batch()
    mesh = Partitioner((2, 1, 4))
    model, params, shardings = setup_model(mesh, batch)
    state = TrainState.create(params, optax.adamw(1e-3))
    state_shardings = state.shardings(shardings, mesh.replicated())
    step = mesh.partition(lambda s, b: train_step(model, s, b, None),
                          (state_shardings, mesh.batch_shardings(batch)), (state_shardings, None))
    state, metrics = step(state, mesh.shard_batch(batch))
    mu = state.opt_state[0].mu
    assert mu["decoder"]["layers_0"]["mlp"]["wi_1"]["kernel"].sharding.spec == P(None, "model")
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"].compute()))


def test_steps_in_flight_keep_the_host_at_most_the_limit_ahead():
    """A program of three 1000x1000 matmuls (tens of ms; its dispatch returns in well under one):
    with a limit of 2, after every dispatch all but the two newest outputs are finished; with no
    limit, adding does not wait."""
    import jax.numpy as jnp
    from mmt_jax.training.trainer import StepsInFlight
    slow = jax.jit(lambda x: (x @ x @ x @ x).sum())
    x = jnp.ones((1000, 1000)) / 1000
    slow(x).block_until_ready()
    paced, outputs = StepsInFlight(2), []
    for _ in range(5):
        outputs.append(slow(x))
        paced.add(outputs[-1])
        assert all(o.is_ready() for o in outputs[:-2])
    output = slow(x)
    StepsInFlight(None).add(output)
    assert not output.is_ready()  # dispatch returns first: above, the limit is what waited
    output.block_until_ready()


def test_a_trainer_merges_a_steps_metrics_in_one_program_as_clu_does():
    import optax
    from mmt_jax.training.trainer import Trainer
    batch = tiny_batch()
    model = EncoderDecoderModel(EncoderDecoder(t5_config("tiny", vocab_size=128)))
    trainer = Trainer(model, Partitioner((2, 1, 4)), optax.adamw(1e-3),
                      {k: v.shape for k, v in batch.items()}, {k: v.dtype for k, v in batch.items()})
    state, _, _ = trainer.initial_state(seed=0)
    state, first = trainer.train_step(state, trainer.global_batch(batch), None)
    state, second = trainer.train_step(state, trainer.global_batch(tiny_batch(seed=1)), None)
    assert trainer.merge_metrics(None, first) is first
    merged = trainer.merge_metrics(first, second)
    assert set(merged) == set(first)
    for name, metric in merged.items():
        np.testing.assert_allclose(float(metric.compute()),
                                   float(first[name].merge(second[name]).compute()), rtol=1e-6)
