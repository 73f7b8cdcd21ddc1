"""The ViT representator against Hugging Face transformers' PyTorch `ViTModel`, through real
`save_pretrained` checkpoints; checkpoint errors; gradients reach every parameter."""
import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import traverse_util

from mmt_jax.errors import CheckpointFormatError
from mmt_jax.checkpoints import hf_vit
from mmt_jax.vision.vit import VisionTransformer, ViTConfig, vit_config

HF_TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_hf_vit(cls=transformers.ViTModel, seed=0):
    torch.manual_seed(seed)
    model = cls(transformers.ViTConfig(**HF_TINY)).eval()
    with torch.no_grad():  # randomise everything, so a wrong mapping cannot hide behind zeros or ones
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_vit()


@pytest.fixture(scope="module")
def checkpoint_dir(hf_model, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("vit"))
    hf_model.save_pretrained(directory)
    return directory


def apply_fn(config):
    return jax.jit(lambda params, images: VisionTransformer(config).apply({"params": params}, images))


def images_nhwc(size, batch=3, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def hf_output(model, images, **kwargs):
    with torch.no_grad():
        pixels = torch.tensor(images.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        return model(pixel_values=pixels, **kwargs).last_hidden_state.numpy()


def test_presets():
    b32 = vit_config("B/32")
    assert (b32.image_size, b32.patch_size, b32.hidden_size, b32.num_layers, b32.num_heads,
            b32.mlp_dim) == (224, 32, 768, 12, 12, 3072)
    assert b32.num_tokens == 50 and vit_config("B/16").num_tokens == 197
    with pytest.raises(ValueError, match="preset"):
        vit_config("H/14")
    with pytest.raises(ValueError, match="multiple"):
        ViTConfig(image_size=30, patch_size=8)


def test_param_tree_matches_checkpoint(checkpoint_dir):
    config, params = hf_vit.load_hf_vit(checkpoint_dir)
    variables = jax.eval_shape(VisionTransformer(config).init, jax.random.PRNGKey(0),
                               jnp.zeros((1, 32, 32, 3)))
    ours = traverse_util.flatten_dict(variables["params"], sep="/")
    loaded = traverse_util.flatten_dict(params, sep="/")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in loaded.items()}
    assert ours["patch_embedding/kernel"].shape == (8 * 8 * 3, 32)
    assert ours["position_embedding"].shape == (1, 17, 32)
    axes = traverse_util.flatten_dict(variables["params_axes"], sep="/")
    assert axes["layers_0/attention/query/bias_axes"].names == ("joined_kv",)
    assert axes["layers_1/mlp/wi/kernel_axes"].names == ("embed", "mlp")
    assert axes["patch_embedding/kernel_axes"].names == ("image_features", "embed")


def test_matches_transformers(hf_model, checkpoint_dir):
    config, params = hf_vit.load_hf_vit(checkpoint_dir)
    assert config == vit_config("tiny")
    images = images_nhwc(32)
    ours = np.asarray(apply_fn(config)(params, images))
    assert ours.shape == (3, 17, 32)
    np.testing.assert_allclose(ours, hf_output(hf_model, images), atol=1e-4, rtol=1e-4)


def test_classification_checkpoint_loads_without_head(tmp_path):
    model = build_hf_vit(transformers.ViTForImageClassification, seed=1)
    model.save_pretrained(str(tmp_path))
    config, params = hf_vit.load_hf_vit(str(tmp_path))
    images = images_nhwc(32, seed=1)
    with torch.no_grad():
        theirs = model.vit(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state
    np.testing.assert_allclose(np.asarray(apply_fn(config)(params, images)), theirs.numpy(),
                               atol=1e-4, rtol=1e-4)


def test_resampled_position_embeddings_match_interpolate_pos_encoding(hf_model, checkpoint_dir):
    config, params = hf_vit.load_hf_vit(checkpoint_dir, image_size=48)
    assert config.image_size == 48 and params["position_embedding"].shape == (1, 37, 32)
    images = images_nhwc(48, batch=2, seed=2)
    ours = np.asarray(apply_fn(config)(params, images))
    theirs = hf_output(hf_model, images, interpolate_pos_encoding=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # Downsampling too, straight against torch's bicubic interpolation of the grid.
    position = hf_vit.load_hf_vit(checkpoint_dir)[1]["position_embedding"]
    small = hf_vit.resample_position_embedding(position, 3)
    grid = torch.tensor(position[:, 1:].reshape(1, 4, 4, 32)).permute(0, 3, 1, 2)
    torch_small = torch.nn.functional.interpolate(grid, size=(3, 3), mode="bicubic",
                                                  align_corners=False).permute(0, 2, 3, 1)
    np.testing.assert_allclose(small[:, 1:], torch_small.reshape(1, 9, 32).numpy(), atol=1e-5)
    np.testing.assert_array_equal(small[:, 0], position[:, 0])
    np.testing.assert_allclose(hf_vit.bicubic_matrix(4, 4), np.eye(4), atol=1e-12)  # identity


def _rewrite(checkpoint_dir, tmp_path, edit):
    tensors = safetensors.numpy.load_file(os.path.join(checkpoint_dir, "model.safetensors"))
    edit(tensors)
    shutil.copy(os.path.join(checkpoint_dir, "config.json"), tmp_path / "config.json")
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return str(tmp_path)


def test_checkpoint_errors_name_the_tensor(checkpoint_dir, tmp_path_factory):
    name = "encoder.layer.1.attention.attention.key.weight"

    def drop(t):
        del t[name]

    def reshape(t):
        t[name] = np.zeros((32, 16), np.float32)

    def extra(t):
        t["encoder.layer.2.layernorm_after.weight"] = np.zeros((32,), np.float32)

    for edit, pattern in ((drop, f"{name}.*missing"), (reshape, f"{name}.*shape"),
                          (extra, "encoder.layer.2.layernorm_after.weight.*unknown")):
        directory = _rewrite(checkpoint_dir, tmp_path_factory.mktemp("bad"), edit)
        with pytest.raises(CheckpointFormatError, match=pattern):
            hf_vit.load_hf_vit(directory)
    with pytest.raises(FileNotFoundError):
        hf_vit.load_hf_vit(str(tmp_path_factory.mktemp("empty")))


def test_wrong_image_size_is_refused():
    config = vit_config("tiny")
    with pytest.raises(ValueError, match="position embeddings"):
        VisionTransformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))


def test_gradients_reach_every_parameter(checkpoint_dir):
    config, params = hf_vit.load_hf_vit(checkpoint_dir)  # cheaper than compiling an init
    config = dataclasses.replace(config, dropout_rate=0.1)
    model = VisionTransformer(config)
    images = images_nhwc(32, batch=2)
    target = jax.random.normal(jax.random.PRNGKey(1), (2, config.num_tokens, config.hidden_size))

    def loss(params):
        out = model.apply({"params": params}, images, enable_dropout=True,
                          rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.sum(out * target)

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params), sep="/")
    norms = {k: float(jnp.abs(g).max()) for k, g in grads.items()}
    assert all(n > 0.0 for n in norms.values()), {k: n for k, n in norms.items() if n == 0.0}


def test_transformers5_module_names_load_the_same(hf_model, checkpoint_dir, tmp_path):
    # A checkpoint written from `state_dict()` directly carries transformers 5's module names.
    state = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    assert any(".q_proj." in k for k in state)
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(checkpoint_dir, "config.json"), tmp_path / "config.json")
    _, params = hf_vit.load_hf_vit(str(tmp_path))
    _, expected = hf_vit.load_hf_vit(checkpoint_dir)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
