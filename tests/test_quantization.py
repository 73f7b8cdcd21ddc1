"""Int8 inference (mmt_jax/quantization.py): per-channel int8 kernels, int8 x int8 matmuls with rows
quantised on the fly, against float32 computed directly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmt_jax import quantization
from mmt_jax.layers.dense import DenseGeneral
from tests.test_decoding import batch_for, make_model


def test_kernels_round_trip_within_half_a_step_per_channel():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(16, 6)).astype(np.float32) * np.array([1, 10, 0.01, 1, 1, 0], np.float32)
    values, scale = quantization.quantize_kernel(kernel)
    assert values.dtype == np.int8 and scale.shape == (6,) and np.abs(values).max() == 127
    assert np.all(np.abs(values * scale - kernel) <= scale / 2 + 1e-7)
    assert scale[5] == 1.0 and not values[:, 5].any()  # an all-zero column


@pytest.mark.parametrize("axis, features", [(-1, 12), ((-2, -1), 5)])
def test_a_quantized_dense_layer_equals_float_within_a_percent(axis, features):
    layer = DenseGeneral(features, kernel_axes=("embed", "mlp"), axis=axis)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 8))
    params = layer.init(jax.random.PRNGKey(1), x)["params"]
    quantized = quantization.quantize_params(params)
    assert quantized["kernel"].dtype == np.int8 and quantization.SCALE in quantized
    want, got = layer.apply({"params": params}, x), layer.apply({"params": quantized}, x)
    assert got.shape == want.shape
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.01


def test_an_int8_model_decodes_as_float_and_keeps_its_other_parameters():
    """Every 2-D kernel becomes int8; embeddings, norms and the relative position bias stay float;
    a T5.1.1 scores the float model's greedy answers nearly as the float model does (agreement on a
    trained checkpoint: README, int8 decoding)."""
    model, params = make_model(num_encoder_layers=2)
    # the default initialisation's scale (make_model triples it for varied tokens, which drives the
    # activations of this 32-wide model far beyond a trained one's)
    params = jax.tree_util.tree_map(lambda p: p / 3.0 if p.ndim == 2 else p, params)
    quantized = quantization.quantize_params(params)
    flat = jax.tree_util.tree_leaves_with_path(quantized)
    kernels = [leaf for path, leaf in flat if path[-1].key == "kernel"]
    assert kernels and all(leaf.dtype == np.int8 for leaf in kernels)
    assert quantized["token_embedder"]["embedding"].dtype == np.float32
    enc = np.random.default_rng(0).integers(2, 64, size=(8, 6)).astype(np.int32)
    batch = batch_for(enc, 5)
    tokens = jax.jit(model.predict_batch)(params, batch)
    tokens8 = jax.jit(model.predict_batch)(quantized, batch)
    # random weights give close calls, and one flipped token changes all later ones: the first
    # tokens agree, and the float model's whole answers score alike under both
    np.testing.assert_array_equal(np.asarray(tokens)[:, 0], np.asarray(tokens8)[:, 0])
    scored = {"decoder_target_tokens": tokens, "decoder_input_tokens": np.pad(
        np.asarray(tokens)[:, :-1], ((0, 0), (1, 0))), "encoder_input_tokens": enc}
    np.testing.assert_allclose(model.score_batch(quantized, scored), model.score_batch(params, scored),
                               rtol=0.02)
