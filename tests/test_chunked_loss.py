"""The loss computed a chunk of target positions at a time (`loss_chunk_length`,
`losses.chunked_cross_entropy`) equals the loss from the whole logits, metrics and gradients
included, for untied (T5.1.1) and tied (T5) output layers, with smoothing, and for a module that sows
losses (MoEMoE); and the jitted gradient holds no `[B, L, vocab]` float32 array."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmt_jax import losses
from mmt_jax.model import model_for
from mmt_jax.models.t5 import EncoderDecoder, t5_config

VOCAB, B, LE, LD = 96, 3, 7, 11


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, VOCAB, (B, LD)).astype(np.int32)
    targets[0, 8:] = 0  # padding: weight 0
    return {"encoder_input_tokens": rng.integers(2, VOCAB, (B, LE)).astype(np.int32),
            "decoder_input_tokens": np.concatenate([np.zeros((B, 1), np.int32), targets[:, :-1]], 1),
            "decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.int32)}


def _models(module, chunk, **kwargs):
    plain, chunked = model_for(module, **kwargs), model_for(module, loss_chunk_length=chunk, **kwargs)
    shapes = {k: v.shape for k, v in _batch().items()}
    params = jax.jit(lambda key: plain.get_initial_variables(key, shapes))(jax.random.key(0))
    return plain, chunked, params["params"]


def _compare(plain, chunked, params, batch, dropout=None):
    def run(model):
        def loss(p):
            value, metrics = model.loss_fn(p, batch, dropout)
            return value, {k: m.compute() for k, m in metrics.items()}
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (loss_a, metrics_a), grads_a = run(plain)
    (loss_b, metrics_b), grads_b = run(chunked)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    assert set(metrics_a) == set(metrics_b)
    for name in metrics_a:
        np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=1e-5, err_msg=name)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6),
                           grads_a, grads_b)
    return loss_a


@pytest.mark.parametrize("variant, chunk, smoothing", [("t5_1_1", 4, 0.0), ("t5", 3, 0.1),
                                                       ("t5_1_1", 11, 0.0)])
def test_chunked_loss_equals_the_whole_logits_loss(variant, chunk, smoothing):
    config = t5_config("tiny", variant, vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8,
                       mlp_dim=32, num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.1)
    plain, chunked, params = _models(EncoderDecoder(config), chunk, label_smoothing=smoothing)
    _compare(plain, chunked, params, _batch())
    _compare(plain, chunked, params, _batch(1), dropout=jax.random.key(3))  # the same dropout


def test_chunked_loss_keeps_the_sown_losses():
    from tests.test_moemoe import _batch as moemoe_batch, _config
    config = _config(moe=True)
    module = config.module()
    plain, chunked = model_for(module), model_for(module, loss_chunk_length=3)
    batch = moemoe_batch()
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    params = jax.jit(lambda key: plain.get_initial_variables(key, shapes, types))(
        jax.random.key(0))["params"]
    _compare(plain, chunked, params, batch)


def test_the_gradient_holds_no_whole_logits():
    """Compiled, the chunked loss's gradient has no `[B, LD, vocab]` f32 value; the plain one has."""
    config = t5_config("tiny", vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                       num_encoder_layers=1, num_decoder_layers=1)
    plain, chunked, params = _models(EncoderDecoder(config), 4)
    batch = _batch()
    whole = f"f32[{B},{LD},{VOCAB}]"

    def hlo(model):
        grad = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, None)[0]))
        return grad.lower(params).compile().as_text()
    assert whole in hlo(plain) and whole not in hlo(chunked)
    assert f"f32[{B},4,{VOCAB}]" in hlo(chunked)


def test_chunk_length_must_be_positive():
    config = t5_config("tiny", vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32)
    with pytest.raises(ValueError, match="loss_chunk_length=0"):
        model_for(EncoderDecoder(config), loss_chunk_length=0)
    hidden = jnp.ones((2, 5, 4))
    loss, z, hits = losses.chunked_cross_entropy(
        lambda h: jnp.concatenate([h, -h], -1), hidden, jnp.zeros((2, 5), jnp.int32),
        chunk_length=2)
    assert loss.shape == z.shape == hits.shape == (2, 5) and bool(jnp.all(hits))
