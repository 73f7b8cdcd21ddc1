"""Hugging Face ViT checkpoints -> `VisionTransformer` parameters, without torch.

Reads a directory with `config.json` + `model.safetensors` as `ViTModel.save_pretrained` writes it
(tensors `embeddings.*`, `encoder.layer.{i}.*`, `layernorm.*`, `pooler.*`) or as
`ViTForImageClassification` writes it (the same under `vit.`, plus `classifier.*`). The pooler and the
classifier are not part of the representator and are skipped; any other tensor we do not map is an error.
transformers 5's in-memory names (`layers.{i}.attention.q_proj`, `mlp.fc1`, ...) are accepted too.

Position embeddings can be resampled to another image size exactly as transformers does for
`interpolate_pos_encoding=True` (`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`
on the patch grid, CLS kept), re-implemented here in numpy.
"""
import math
import re
from typing import Mapping

import numpy as np
from flax import traverse_util

from mmt_jax.checkpoints.hf_t5 import (UNKNOWN_VALUE, config_field, read_hf_config,
                                       read_safetensors)
from mmt_jax.errors import CheckpointFormatError
from mmt_jax.vision.vit import ViTConfig

_ACTIVATIONS = {  # hidden_act -> our activation name
    "gelu": "gelu_exact",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# Tensors of the heads around the representator, skipped on purpose.
_IGNORED = re.compile(r"^(vit\.)?pooler\.|^classifier\.")
# transformers 5 module names -> the checkpoint names transformers itself writes.
_MODERN_NAMES = [
    (r"^(vit\.)?layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def _side(value, field):
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointFormatError(f"config.json: {field} {value} is not square; only square "
                                        "images and patches are supported")
        value = value[0]
    return int(value)


def config_from_hf(hf_config: Mapping, image_size: int | None = None) -> ViTConfig:
    """Maps a Hugging Face ViT `config.json` dict to `ViTConfig` (at `image_size` if given)."""
    config_field(hf_config, "model_type", "vit", ("vit",), "{field} {value!r} is not a ViT layout")
    act = config_field(hf_config, "hidden_act", "gelu", _ACTIVATIONS, UNKNOWN_VALUE)
    if hf_config.get("num_channels", 3) != 3:
        raise CheckpointFormatError(
            f"config.json: num_channels {hf_config['num_channels']}; the representator reads RGB images")
    try:
        patch = _side(hf_config["patch_size"], "patch_size")
        config = dict(
            image_size=_side(hf_config["image_size"], "image_size"), patch_size=patch,
            hidden_size=hf_config["hidden_size"], num_layers=hf_config["num_hidden_layers"],
            num_heads=hf_config["num_attention_heads"], mlp_dim=hf_config["intermediate_size"],
            layer_norm_epsilon=hf_config.get("layer_norm_eps", 1e-12), activation=_ACTIVATIONS[act],
            dropout_rate=hf_config.get("hidden_dropout_prob", 0.0))
    except KeyError as e:
        raise CheckpointFormatError(f"config.json: missing field {e.args[0]!r}") from None
    if image_size is not None:
        config["image_size"] = int(image_size)
    try:
        return ViTConfig(**config)
    except ValueError as e:
        raise CheckpointFormatError(f"config.json: {e}") from None


def name_map(config: ViTConfig, grid_size: int | None = None) -> dict[str, tuple[str, tuple, str]]:
    """Our flat param path -> (Hugging Face tensor name, its expected shape, conversion).

    conversion: "copy", "transpose" (Linear `[out, in]` -> kernel `[in, out]`) or "patch" (Conv2d
    `[E, 3, p, p]` -> `[p*p*3, E]`). `grid_size`: patches per side of the checkpoint's position
    embeddings (default: the config's).
    """
    e, m, p = config.hidden_size, config.mlp_dim, config.patch_size
    grid = config.grid_size if grid_size is None else grid_size
    names = {
        "patch_embedding/kernel": ("embeddings.patch_embeddings.projection.weight", (e, 3, p, p), "patch"),
        "patch_embedding/bias": ("embeddings.patch_embeddings.projection.bias", (e,), "copy"),
        "cls_token": ("embeddings.cls_token", (1, 1, e), "copy"),
        "position_embedding": ("embeddings.position_embeddings", (1, 1 + grid * grid, e), "copy"),
        "final_norm/scale": ("layernorm.weight", (e,), "copy"),
        "final_norm/bias": ("layernorm.bias", (e,), "copy"),
    }
    linears = {"attention/query": ("attention.attention.query", e, e),
               "attention/key": ("attention.attention.key", e, e),
               "attention/value": ("attention.attention.value", e, e),
               "attention/out": ("attention.output.dense", e, e),
               "mlp/wi": ("intermediate.dense", e, m),
               "mlp/wo": ("output.dense", m, e)}
    for i in range(config.num_layers):
        ours, hf = f"layers_{i}", f"encoder.layer.{i}"
        for norm, hf_norm in (("pre_attention_norm", "layernorm_before"),
                              ("pre_mlp_norm", "layernorm_after")):
            names[f"{ours}/{norm}/scale"] = (f"{hf}.{hf_norm}.weight", (e,), "copy")
            names[f"{ours}/{norm}/bias"] = (f"{hf}.{hf_norm}.bias", (e,), "copy")
        for module, (hf_module, fan_in, fan_out) in linears.items():
            names[f"{ours}/{module}/kernel"] = (f"{hf}.{hf_module}.weight", (fan_out, fan_in),
                                                "transpose")
            names[f"{ours}/{module}/bias"] = (f"{hf}.{hf_module}.bias", (fan_out,), "copy")
    return names


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with torch's `a = -0.75`."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` weights of torch's 1-D bicubic resize (`align_corners=False`, no antialiasing,
    border samples clamped), so that `resized = W @ x` along one axis."""
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5  # not clamped at 0 for cubic, as in torch
        base = math.floor(src)
        t = src - base
        for k in range(-1, 3):
            weights[o, min(max(base + k, 0), in_size - 1)] += _cubic(np.float64(t - k))
    return weights


def resample_position_embedding(position: np.ndarray, grid_size: int) -> np.ndarray:
    """`[1, 1 + g*g, E]` -> `[1, 1 + grid_size**2, E]`: the CLS row kept, the `g x g` patch grid resized
    bicubically as transformers' `ViTEmbeddings.interpolate_pos_encoding`. Same size: unchanged."""
    position = np.asarray(position)
    n, e = position.shape[1] - 1, position.shape[2]
    old = int(round(math.sqrt(n)))
    if old * old != n:
        raise CheckpointFormatError(f"position embeddings hold {n} patches, not a square grid")
    if old == grid_size:
        return position
    grid = position[0, 1:].astype(np.float64).reshape(old, old, e)
    w = bicubic_matrix(old, grid_size)
    grid = np.einsum("yi,xj,ije->yxe", w, w, grid)
    patches = grid.reshape(1, grid_size * grid_size, e).astype(position.dtype)
    return np.concatenate([position[:, :1], patches], axis=1)


def _normalise_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        if _IGNORED.search(name):
            continue
        for pattern, repl in _MODERN_NAMES:
            name = re.sub(pattern, repl, name)
        out[name] = value
    if out and all(name.startswith("vit.") for name in out):
        out = {name[len("vit."):]: value for name, value in out.items()}
    return out


def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], config: ViTConfig,
                           checkpoint_image_size: int | None = None,
                           dtype=np.float32) -> dict[str, np.ndarray]:
    """Flat `{our/param/path: array}` for `config` from Hugging Face tensors whose position embeddings
    are for `checkpoint_image_size` (default: `config.image_size`); raises naming the tensor at fault."""
    tensors = _normalise_names(tensors)
    source_size = config.image_size if checkpoint_image_size is None else checkpoint_image_size
    if source_size % config.patch_size:
        raise CheckpointFormatError(f"config.json: image_size {source_size} is not a multiple of "
                                    f"patch_size {config.patch_size}")
    names = name_map(config, grid_size=source_size // config.patch_size)
    flat = {}
    for ours, (hf, shape, conversion) in names.items():
        if hf not in tensors:
            raise CheckpointFormatError(
                f"tensor {hf!r} (for {ours}) is missing from the checkpoint; does config.json "
                f"({config.num_layers} layers) describe this checkpoint?")
        value = np.asarray(tensors[hf])
        if value.shape != shape:
            raise CheckpointFormatError(
                f"tensor {hf!r} has shape {value.shape}, but config.json implies {shape} (for {ours})")
        if conversion == "transpose":
            value = value.T
        elif conversion == "patch":  # [E, C, p, p] -> [p, p, C, E] -> [p*p*C, E]
            value = value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
        if ours == "position_embedding":
            value = resample_position_embedding(value, config.grid_size)
        flat[ours] = np.asarray(value, dtype)
    unknown = sorted(set(tensors) - {hf for hf, _, _ in names.values()})
    if unknown:
        raise CheckpointFormatError(
            f"tensor {unknown[0]!r} (and {len(unknown) - 1} more) does not belong to a ViT layout "
            f"with config.json's sizes; unknown layout")
    return flat


def load_hf_vit(directory: str, image_size: int | None = None,
                dtype=np.float32) -> tuple[ViTConfig, dict]:
    """Reads a Hugging Face ViT checkpoint directory -> (`ViTConfig`, nested params of numpy arrays).

    image_size: the input side the returned model takes; when it differs from the checkpoint's, the
    position embeddings are resampled (transformers' `interpolate_pos_encoding=True`).
    """
    hf_config = read_hf_config(directory)
    checkpoint_config = config_from_hf(hf_config)
    config = config_from_hf(hf_config, image_size=image_size)
    flat = params_from_hf_tensors(read_safetensors(directory), config,
                                  checkpoint_image_size=checkpoint_config.image_size, dtype=dtype)
    return config, traverse_util.unflatten_dict(flat, sep="/")
