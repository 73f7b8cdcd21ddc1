"""Schedules at hand-computed points, and gradient accumulation equal to the whole batch's step."""
import jax
import numpy as np
import optax
import pytest

from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.t5 import EncoderDecoder, t5_config
from mmt_jax.training import optimizers
from mmt_jax.training.train_state import TrainState, train_step
from tests.test_sharding import tiny_batch


def test_linear_decay_with_warmup():
    schedule = optimizers.linear_decay(2e-4, total_steps=100, warmup_steps=10)
    for step, expected in [(0, 0.0), (5, 1e-4), (10, 2e-4), (55, 1e-4), (100, 0.0)]:
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-9)


def test_step_decay_counts_boundaries_from_the_start():
    schedule = optimizers.step_decay(1e-3, boundaries=(50, 80), factor=0.2, warmup_steps=10)
    for step, expected in [(0, 0.0), (5, 5e-4), (10, 1e-3), (49, 1e-3), (50, 2e-4), (80, 4e-5)]:
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


def test_rsqrt_decay():
    schedule = optimizers.rsqrt_decay(1e-2, warmup_steps=100)
    assert [float(schedule(s)) for s in (0, 100, 400)] == pytest.approx([1e-2, 1e-2, 5e-3])


def test_microbatches_give_the_whole_batch_update():
    model = EncoderDecoderModel(EncoderDecoder(t5_config("tiny", vocab_size=128)))
    batch = tiny_batch()
    batch["decoder_loss_weights"][:2, 2:] = 0  # uneven token counts across the microbatches
    batch["decoder_target_tokens"][:2, 2:] = 0
    shapes = {k: v.shape for k, v in batch.items()}
    params = model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
    tx = optax.sgd(1.0)  # update = -gradient: compares the accumulated gradient itself
    step = jax.jit(train_step, static_argnums=(0, 4))
    whole, _ = step(model, TrainState.create(params, tx), batch, None, 1)
    accumulated, metrics = step(model, TrainState.create(params, tx), batch, None, 4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           accumulated.params, whole.params)
    assert int(accumulated.step) == 1 and float(metrics["loss"].count) == 4
