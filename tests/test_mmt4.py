"""MMT4's fused encoder: patches, Eq. 1-2 fusion, masks (absent image == text only), initialisation
from a text-only T5, gradients everywhere, and sharding over 8 host devices."""
import functools

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.t5 import EncoderDecoder, t5_config
from mmt_jax.partitioning import Partitioner
from mmt_jax.checkpoints.store import initialize_from
from mmt_jax.vision.patches import image_patches

CONFIG = t5_config("tiny", vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64)


def batch(b=4, image=32, seed=0, image_present=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 64, (b, 7)).astype(np.int32)
    tokens[1:, 5:] = 0
    targets = rng.integers(2, 64, (b, 4)).astype(np.int32)
    out = {"encoder_input_tokens": tokens,
           "encoder_images": rng.normal(size=(b, image, image, 3)).astype(np.float32),
           "encoder_image_mask": np.full((b,), image_present, np.int32),
           "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
           "decoder_target_tokens": targets}
    return out


def make(fusion=FusionConfig(patch_size=8), config=CONFIG, seed=0, example=None):
    model = EncoderDecoderModel(EncoderDecoder(config, fusion))
    example = batch() if example is None else example
    shapes = {k: v.shape for k, v in example.items()}
    init = functools.partial(model.get_initial_variables, input_shapes=shapes)
    if fusion is not None and fusion.network is not None:  # op by op, a CNN's init takes ~20 s
        init = jax.jit(init)
    return model, init(jax.random.PRNGKey(seed))["params"]


def test_patches_are_flattened_crops():
    images = np.random.default_rng(0).normal(size=(2, 12, 8, 3)).astype(np.float32)
    patches = np.asarray(image_patches(images, 4))
    assert patches.shape == (2, 6, 48)
    # patch 3 = row 1, column 1 (2 patches per row)
    np.testing.assert_array_equal(patches[1, 3], images[1, 4:8, 4:8, :].reshape(-1))
    with pytest.raises(ValueError, match="not a multiple of the patch size 5"):
        image_patches(images, 5)


def test_parameters_of_the_image_branch():
    _, params = make()
    fusion = params["image_fusion"]
    assert fusion["projection"]["kernel"].shape == (8 * 8 * 3, 32)
    assert set(fusion["projection_norm"]) == {"scale", "bias"}
    np.testing.assert_array_equal(fusion["segment_embedder"]["embedding"], np.zeros((2, 32)))
    assert params["encoder"]["relpos_bias"]["cross_segment_embedding"].shape == (2, 4)


def test_absent_image_equals_text_only():
    model, params = make()
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # non-zero segment embeddings too
    absent = batch(image_present=False)
    text_only = {k: v for k, v in absent.items() if not k.startswith("encoder_image")}
    logits_absent = jax.jit(model._compute_logits)(params, absent)
    logits_text = jax.jit(model._compute_logits)(params, text_only)
    np.testing.assert_allclose(logits_absent, logits_text, atol=1e-5)
    logits_present = jax.jit(model._compute_logits)(params, batch())
    assert np.abs(np.asarray(logits_present) - np.asarray(logits_text)).max() > 1e-3
    # Decoding sees the fused sequence with its mask: absent image decodes like text only.
    np.testing.assert_array_equal(model.predict_batch(params, absent),
                                  model.predict_batch(params, text_only))


def test_mmt4_from_text_only_t5_starts_as_that_t5():
    t5_model, t5_params = make(fusion=None, example={
        k: v for k, v in batch().items() if not k.startswith("encoder_image")})
    model, fresh = make(seed=1)
    params, fresh_paths, upcycled = initialize_from(fresh, t5_params)
    assert upcycled == []
    assert fresh_paths == [
        "encoder/relpos_bias/cross_segment_embedding", "image_fusion/projection/kernel",
        "image_fusion/projection_norm/bias", "image_fusion/projection_norm/scale",
        "image_fusion/segment_embedder/embedding"]
    text = {k: v for k, v in batch().items() if not k.startswith("encoder_image")}
    np.testing.assert_allclose(jax.jit(model._compute_logits)(params, text),
                               jax.jit(t5_model._compute_logits)(t5_params, text), atol=1e-6)
    with pytest.raises(ValueError, match="decoder/logits_dense/kernel has shape"):
        initialize_from(fresh, {"decoder": {"logits_dense": {"kernel": np.zeros((3, 3))}}})


@pytest.mark.parametrize("cross_segment", ["bucket", "zero", "global"])
def test_gradients_reach_every_parameter(cross_segment):
    model, params = make(FusionConfig(patch_size=8, cross_segment=cross_segment))
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # move off zero-initialised tables
    grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch(), None)[0]))(params)
    for path, g in traverse_util.flatten_dict(grads, sep="/").items():
        assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {path}"


def test_precomputed_features_and_their_errors():
    fusion = FusionConfig(representator="precomputed", feature_dim=20)
    example = batch()
    example.pop("encoder_images")
    example["encoder_image_features"] = np.random.default_rng(1).normal(size=(4, 5, 20)).astype(
        np.float32)
    example["encoder_image_mask"] = np.array([[1, 1, 1, 0, 0]] * 4, np.int32)  # 3 real vectors
    model, params = make(fusion, example=example)
    assert params["image_fusion"]["projection"]["kernel"].shape == (20, 32)
    shorter = dict(example, encoder_image_features=example["encoder_image_features"][:, :3],
                   encoder_image_mask=example["encoder_image_mask"][:, :3])
    # Masked trailing vectors change nothing.
    np.testing.assert_allclose(jax.jit(model._compute_logits)(params, example),
                               jax.jit(model._compute_logits)(params, shorter), atol=1e-5)
    wrong = dict(example, encoder_image_features=np.zeros((4, 5, 21), np.float32))
    with pytest.raises(ValueError, match=r"shape \(4, 5, 21\); expected \[batch, vectors, 20\]"):
        model._compute_logits(params, wrong)
    with pytest.raises(ValueError, match="needs feature_dim"):
        FusionConfig(representator="precomputed")


def test_sharded_over_8_devices_matches_one_device():
    example = batch(b=8)
    mesh = Partitioner((4, 1, 2))
    model = EncoderDecoderModel(EncoderDecoder(CONFIG, FusionConfig(patch_size=8)))
    shapes = {k: v.shape for k, v in example.items()}
    with mesh.context():
        abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
    shardings = mesh.params_shardings(abstract["params_axes"])
    params = mesh.partition(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)[
        "params"], (), shardings)()
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
    sharded = mesh.shard_batch(example)
    assert sharded["encoder_images"].sharding.spec == P(("expert", "data"), None, None, None)

    def encoded_and_grads(p, b):
        encoded = model.module.apply({"params": p}, b["encoder_input_tokens"],
                                     encoder_images=b["encoder_images"], method=model.module.encode)
        loss, grads = jax.value_and_grad(lambda q: model.loss_fn(q, b, None)[0])(p)
        return encoded, loss, grads

    step = mesh.partition(encoded_and_grads, (shardings, mesh.batch_shardings(example)),
                          (mesh.data_sharding(3), mesh.replicated(), shardings))
    encoded, loss, grads = step(params, sharded)
    assert encoded.sharding.spec == P(("expert", "data"), None, None)
    assert len(encoded.addressable_shards) == 8 and encoded.addressable_shards[0].data.shape[0] == 2
    one = jax.device_put((jax.device_get(params), example), jax.devices()[0])
    encoded_1, loss_1, grads_1 = jax.jit(encoded_and_grads)(*one)
    np.testing.assert_allclose(encoded, encoded_1, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss_1), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                           jax.device_get(grads), jax.device_get(grads_1))


def test_cnn_representator_feeds_its_feature_map_and_can_be_frozen():
    from mmt_jax.vision.efficientnet import efficientnet_config
    network = efficientnet_config("lite0", depth=0.1, width=0.25)  # one block per stage
    example = batch(b=2, image=64)
    grads_into = {}
    for frozen in (False, True):
        fusion = FusionConfig(representator="efficientnet", network=network,
                              freeze_representator=frozen)
        model, params = make(fusion, example=example)
        assert params["image_fusion"]["projection"]["kernel"].shape == (1280, 32)
        if not frozen:
            encoded, mask = jax.jit(model.encode)(params, example)
            assert encoded.shape == (2, 2 * 2 + 7, 32) and mask.shape == (2, 11)  # 64px: 2x2 map
        grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, example, None)[0]))(params)
        grads_into[frozen] = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(
            grads["image_fusion"]["representator"]))
        assert float(np.abs(grads["image_fusion"]["projection"]["kernel"]).max()) > 0
    assert grads_into[False] > 0 and grads_into[True] == 0
    with pytest.raises(ValueError, match="needs network= a EfficientNetConfig"):
        FusionConfig(representator="efficientnet")


def test_vit_representator_feeds_all_tokens_with_cls():
    from mmt_jax.vision.vit import vit_config
    example = batch(b=2, image=32)
    model, params = make(FusionConfig(representator="vit", network=vit_config("tiny")),
                         example=example)
    assert params["image_fusion"]["representator"]["position_embedding"].shape == (1, 17, 32)
    encoded, mask = model.encode(params, example)
    assert encoded.shape == (2, 1 + 16 + 7, 32) and mask.shape == (2, 24)


def test_grid_image_positions():
    model, params = make(FusionConfig(patch_size=8, image_positions="grid"))
    relpos = params["encoder"]["relpos_bias"]
    assert relpos["grid_row_embedding"].shape == relpos["grid_col_embedding"].shape == (2, 32)
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
    grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch(), None)[0]))(params)
    assert float(np.abs(grads["encoder"]["relpos_bias"]["grid_row_embedding"]).max()) > 0
    with pytest.raises(ValueError, match="CLS vector has no grid position"):
        from mmt_jax.vision.vit import vit_config
        FusionConfig(representator="vit", network=vit_config("tiny"), image_positions="grid")
