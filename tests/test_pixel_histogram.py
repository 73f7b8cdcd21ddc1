"""The learned colour histogram of a patch (`vision/pixel_histogram.py`) and how MMT4's encoder
input reads it (`FusionConfig.colour_histogram`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.vision.pixel_histogram import PatchColourHistogram
from tests.test_mmt4 import batch, make

RED, NAVY = np.array([0.8, -0.8, -0.7]), np.array([-0.8, -0.7, -0.3])


def _patches(*patches):
    """Patches given as [P, 3] pixel arrays -> [1, L, P * 3], flattened as image_patches cuts them."""
    return jnp.asarray(np.stack([p.reshape(-1) for p in patches])[None], jnp.float32)


def test_the_histogram_is_the_mean_of_each_pixels_embedding():
    histogram = PatchColourHistogram(width=8)
    half = np.stack([RED] * 8 + [NAVY] * 8)  # 16 pixels, half red, half navy
    params = histogram.init(jax.random.PRNGKey(0), _patches(half))["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # biases off zero
    out = np.asarray(histogram.apply({"params": params}, _patches(half, half[::-1],
                                                                  np.zeros_like(half))))
    assert out.shape == (1, 3, 8)

    def embed(pixel):  # by hand: two 1x1 convolutions with GELU
        h = jax.nn.gelu(pixel @ params["pixel_embedding"]["kernel"] + params["pixel_embedding"]["bias"])
        return jax.nn.gelu(h @ params["pixel_embedding_2"]["kernel"] + params["pixel_embedding_2"]["bias"])

    expected = (np.asarray(embed(RED)) + np.asarray(embed(NAVY))) / 2
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(out[0, 1], expected, atol=1e-6)  # where the pixels are does not matter
    np.testing.assert_array_equal(out[0, 2], 0)  # no pixels (a CNN vector's pixel part): zeros
    # Which colour covers more of the patch is a linear read-out; a blend of the two is not.
    mostly_red = np.stack([RED] * 12 + [NAVY] * 4)
    blend = np.stack([(RED + NAVY) / 2] * 16)
    hist = np.asarray(histogram.apply({"params": params}, _patches(mostly_red, blend)))[0]
    np.testing.assert_allclose(hist[0], 0.75 * np.asarray(embed(RED)) + 0.25 * np.asarray(embed(NAVY)),
                               atol=1e-6)
    assert np.abs(hist[1] - expected).max() > 1e-3


def test_mmt4_reads_the_histogram_in_place_of_the_pixels():
    """Stored '+pixels' features: the CNN dimensions stay, the trailing pixel dimensions become the
    histogram; gradients reach it."""
    fusion = FusionConfig(representator="precomputed", feature_dim=20 + 48, pixel_features=48,
                          colour_histogram=6)
    example = batch()
    example.pop("encoder_images")
    rng = np.random.default_rng(1)
    features = np.zeros((4, 4, 68), np.float32)
    features[:, :2, :20] = rng.normal(size=(4, 2, 20))  # two CNN vectors
    features[:, 2:, 20:] = rng.normal(size=(4, 2, 48))  # two cells of 4x4 pixels
    example["encoder_image_features"] = features
    example["encoder_image_mask"] = np.ones((4,), np.int32)
    model, params = make(fusion, example=example)
    fusion_params = params["image_fusion"]
    assert fusion_params["projection"]["kernel"].shape == (20 + 6, 32)
    assert fusion_params["colour_histogram"]["pixel_embedding"]["kernel"].shape == (3, 6)
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
    grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, example, None)[0]))(params)
    for path, g in traverse_util.flatten_dict(grads["image_fusion"], sep="/").items():
        assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {path}"

    patches = FusionConfig(patch_size=8, colour_histogram=6)  # every patch is pixels
    _, params = make(patches)
    assert params["image_fusion"]["projection"]["kernel"].shape == (6, 32)


def test_the_histogram_needs_pixels():
    with pytest.raises(ValueError, match="colour_histogram needs pixel patches"):
        FusionConfig(representator="precomputed", feature_dim=20, colour_histogram=6)
    with pytest.raises(ValueError, match="pixel_features=30 needs representator='precomputed' and "
                                         "at most feature_dim=20"):
        FusionConfig(representator="precomputed", feature_dim=20, pixel_features=30)
