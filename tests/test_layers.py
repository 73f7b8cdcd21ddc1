"""Building blocks against independent references: bucket function, explicit positions, losses,
mixed precision, and the package never importing the test-only references."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from mmt_jax.layers.relative_position import RelativePositionBias, relative_position_bucket
from mmt_jax.losses import cross_entropy_with_logits
from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.t5 import EncoderDecoder, t5_config


def test_buckets_match_transformers_for_all_distances():
    distances = np.arange(-400, 401)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (16, 20)):
            ours = relative_position_bucket(distances, bidirectional=bidirectional,
                                            num_buckets=num_buckets, max_distance=max_distance)
            theirs = T5Attention._relative_position_bucket(
                torch.tensor(distances), bidirectional=bidirectional, num_buckets=num_buckets,
                max_distance=max_distance).numpy()
            np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_hand_computed_buckets():
    # bidirectional, 32 buckets: 0..7 exact for keys at or before the query, 16..23 for keys after.
    got = relative_position_bucket(np.array([0, -1, -7, 1, 7, -128, 500]), bidirectional=True)
    np.testing.assert_array_equal(np.asarray(got), [0, 1, 7, 17, 23, 15, 31])
    # causal: keys after the query share bucket 0; 16 exact buckets before it.
    got = relative_position_bucket(np.array([3, 0, -1, -15, -16, -1000]), bidirectional=False)
    np.testing.assert_array_equal(np.asarray(got), [0, 0, 1, 15, 16, 31])


def test_explicit_positions_restart_per_segment():
    """Positions [0..2, 0..3] give, inside each segment, the bias of that segment alone."""
    module = RelativePositionBias(num_heads=2, bidirectional=True)
    positions = jnp.array([[0, 1, 2, 0, 1, 2, 3]])
    params = module.init(jax.random.PRNGKey(0), positions, positions)
    joint = module.apply(params, positions, positions)
    alone = module.apply(params, jnp.arange(4)[None], jnp.arange(4)[None])
    assert joint.shape == (1, 2, 7, 7)
    np.testing.assert_allclose(joint[:, :, 3:, 3:], alone)
    np.testing.assert_allclose(joint[:, :, :3, :3], alone[:, :, :3, :3])
    # batch of positions -> batch of biases
    assert module.apply(params, jnp.zeros((3, 5), int), jnp.zeros((3, 6), int)).shape == (3, 2, 5, 6)


def test_cross_entropy_label_smoothing_and_z_loss_by_hand():
    logits = np.array([[[2.0, 0.5, -1.0, 0.0]]], np.float32)
    target = np.array([[1]])
    log_z = np.log(np.exp(logits).sum())
    log_p = logits[0, 0] - log_z
    loss, z = cross_entropy_with_logits(logits, target, np.ones((1, 1)))
    np.testing.assert_allclose(loss, [[-log_p[1]]], rtol=1e-6)
    s, v = 0.1, 4
    smooth = np.full(v, s / (v - 1))
    smooth[1] = 1 - s
    entropy = -(smooth * np.log(smooth)).sum()
    loss, z = cross_entropy_with_logits(logits, target, np.ones((1, 1)), label_smoothing=s,
                                        z_loss=1e-2)
    np.testing.assert_allclose(z, [[1e-2 * log_z ** 2]], rtol=1e-6)
    np.testing.assert_allclose(loss, [[-(smooth * log_p).sum() - entropy + 1e-2 * log_z ** 2]],
                               rtol=1e-5)
    # A perfect prediction of the smoothed distribution costs nothing (beyond z-loss).
    perfect = np.log(smooth)[None, None].astype(np.float32)
    np.testing.assert_allclose(cross_entropy_with_logits(perfect, target, label_smoothing=s)[0],
                               [[0.0]], atol=1e-5)


def test_bfloat16_activations_keep_float32_params_and_track_float32():
    batch = {"encoder_input_tokens": np.array([[5, 6, 7, 8, 0]]),
             "decoder_input_tokens": np.array([[0, 9, 10]]),
             "decoder_target_tokens": np.array([[9, 10, 1]])}
    shapes = {k: v.shape for k, v in batch.items()}
    f32 = EncoderDecoderModel(EncoderDecoder(t5_config("tiny", vocab_size=64)))
    bf16 = EncoderDecoderModel(EncoderDecoder(t5_config("tiny", vocab_size=64, dtype=jnp.bfloat16)))
    params = bf16.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
    logits_bf16 = jax.jit(bf16._compute_logits)(params, batch)
    logits_f32 = jax.jit(f32._compute_logits)(params, batch)
    assert logits_bf16.dtype == jnp.float32  # logits always come back in float32
    np.testing.assert_allclose(logits_bf16, logits_f32, atol=0.15, rtol=0.05)
    grads = jax.jit(jax.grad(lambda p: bf16.loss_fn(p, batch, None)[0]))(params)
    assert {x.dtype for x in jax.tree_util.tree_leaves(grads)} == {jnp.dtype("float32")}


def test_dropout_is_active_only_with_an_rng():
    model = EncoderDecoderModel(EncoderDecoder(t5_config("tiny", vocab_size=64, dropout_rate=0.3)))
    batch = {"encoder_input_tokens": np.array([[5, 6, 7, 8]]), "decoder_input_tokens": np.array([[0, 9]]),
             "decoder_target_tokens": np.array([[9, 1]])}
    params = model.get_initial_variables(jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})["params"]
    loss = jax.jit(lambda rng: model.loss_fn(params, batch, rng)[0])
    a, b = loss(jax.random.PRNGKey(1)), loss(jax.random.PRNGKey(2))
    c, d = loss(None), jax.jit(model.eval_fn)(params, batch)[0]
    assert float(a) != float(b)
    np.testing.assert_allclose(float(c), float(d), rtol=1e-6)


def test_package_never_imports_torch_transformers_or_t5x():
    code = ("import sys, mmt_jax.main, mmt_jax.model, mmt_jax.decoding, mmt_jax.partitioning, "
            "mmt_jax.checkpoints.hf_t5, mmt_jax.checkpoints.store, mmt_jax.train, mmt_jax.demo, "
            "mmt_jax.evaluate, mmt_jax.eval_plots, mmt_jax.predictor, mmt_jax.infer, mmt_jax.tasks; "
            "bad = [m for m in ('torch', 'transformers', 't5x', 'mmt_jax.t5x') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
