"""MMT4's ViT representator (Fig. 4.2): a Vision Transformer returning all `m + 1` token vectors.

`VisionTransformer(config)(images [B, H, W, 3]) -> [B, 1 + (H/p) * (W/p), hidden]`, CLS first; the same
computation as Hugging Face's `ViTModel(...).last_hidden_state` (pre-norm blocks with biases, exact GELU,
`1/sqrt(head_dim)` attention scaling, learned position embeddings, a final LayerNorm), so public ViT
checkpoints load with `mmt_jax.checkpoints.hf_vit.load_hf_vit`. The attention is T5's
`layers.attention.MultiHeadAttention` with `use_bias=True, scale_logits=True`: one attention core.

Parameter tree (kernels stored 2-D `[in, out]`, logical axes in `params_axes`):
  patch_embedding/{kernel [p*p*3, hidden] (image_features, embed), bias [hidden]}
  cls_token [1, 1, hidden], position_embedding [1, 1 + n, hidden], both (unmodeled, abspos_buckets, embed)
  layers_{i}/pre_attention_norm/{scale, bias} [hidden]
  layers_{i}/attention/{query, key, value}/{kernel [hidden, heads*head_dim] (embed, joined_kv), bias}
  layers_{i}/attention/out/{kernel [heads*head_dim, hidden] (joined_kv, embed), bias}
  layers_{i}/pre_mlp_norm/{scale, bias}
  layers_{i}/mlp/wi/{kernel [hidden, mlp_dim] (embed, mlp), bias}, layers_{i}/mlp/wo/{kernel, bias}
  final_norm/{scale, bias}
With `ViTConfig.scan_layers`, `layers_{i}/X` are one `layers/X [num_layers, ...]` (layers/layer_stack.py).
Patches are flattened row by row with channels last (`vision.patches.image_patches`), which is the order
of a transposed Hugging Face `Conv2d` patch kernel `[hidden, 3, p, p] -> [p, p, 3, hidden]`.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

from mmt_jax.layers.attention import IMPLEMENTATIONS, MultiHeadAttention
from mmt_jax.layers.dense import DenseGeneral, LayerNorm, default_kernel_init
from mmt_jax.layers.layer_stack import apply_stack, check_remat_policy
from mmt_jax.layers.mlp import ACTIVATIONS
from mmt_jax.vision.patches import image_patches

ACT_AXES = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT sizes. `image_size` is the (square) input side the position embeddings are learned for.

    dropout_rate: applied to the embeddings, the attention weights and each block's residual branches
      (Hugging Face's `hidden_dropout_prob` and `attention_probs_dropout_prob` in one number).
    attention_implementation: the kernel of the attention core shared with T5
      (`layers.attention.dot_product_attention`): "auto" (cuDNN's fused kernel where it fits, else
      XLA), "xla" or "cudnn".
    scan_layers, remat_policy: as `T5Config`'s (layers/layer_stack.py): one scan over the blocks
      (parameters stacked under `layers/`), and what each block keeps for the backward pass.
    Freezing it as a fixed feature extractor is MMT4's `FusionConfig.freeze_representator`.
    """

    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    layer_norm_epsilon: float = 1e-12
    activation: str = "gelu_exact"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    attention_implementation: str = "auto"
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        check_remat_policy(self.remat_policy)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention_implementation {self.attention_implementation!r}; "
                             f"known: {IMPLEMENTATIONS}")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Output vectors per image: CLS + grid_size**2 patches."""
        return 1 + self.grid_size ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_BASE = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072)
_LARGE = dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096)
VIT_PRESETS = {
    "B/16": dict(_BASE, image_size=224, patch_size=16),
    "B/32": dict(_BASE, image_size=224, patch_size=32),  # MMT4's choice: 7x7 patches + CLS = 50 vectors
    "L/16": dict(_LARGE, image_size=224, patch_size=16),
    "L/32": dict(_LARGE, image_size=224, patch_size=32),
    "tiny": dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64),
}


def vit_config(name: str, **overrides) -> ViTConfig:
    """A preset (`"B/16"`, `"B/32"`, `"L/16"`, `"L/32"`, `"tiny"`) with fields overridden."""
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; known: {sorted(VIT_PRESETS)}")
    return ViTConfig(**dict(VIT_PRESETS[name], **overrides))


class ViTMlp(nn.Module):
    """`wo(act(wi x + b) ) + b`: `[B, L, E] -> [B, L, E]` through `[B, L, mlp_dim]`."""

    mlp_dim: int
    activation: str = "gelu_exact"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = DenseGeneral(self.mlp_dim, kernel_axes=("embed", "mlp"), use_bias=True, dtype=self.dtype,
                         name="wi")(x)
        h = ACTIVATIONS[self.activation](h)
        h = partitioning.with_sharding_constraint(h, ("batch", "length", "mlp"))
        return DenseGeneral(x.shape[-1], kernel_axes=("mlp", "embed"), use_bias=True, dtype=self.dtype,
                            name="wo")(h)


class ViTBlock(nn.Module):
    """Pre-norm encoder block: `x + Attn(LN(x))`, then `+ MLP(LN(.))`; `[B, L, E] -> [B, L, E]`."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x, enable_dropout=False):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate)
        h = LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, name="pre_attention_norm")(x)
        h = MultiHeadAttention(cfg.num_heads, cfg.head_dim, dropout_rate=cfg.dropout_rate,
                               dtype=cfg.dtype, use_bias=True, scale_logits=True,
                               implementation=cfg.attention_implementation, name="attention")(
            h, h, enable_dropout=enable_dropout)
        x = x + drop(h, deterministic=not enable_dropout)
        h = LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, name="pre_mlp_norm")(x)
        h = ViTMlp(cfg.mlp_dim, cfg.activation, cfg.dtype, name="mlp")(h)
        x = x + drop(h, deterministic=not enable_dropout)
        return partitioning.with_sharding_constraint(x, ACT_AXES)


class VisionTransformer(nn.Module):
    """`images [B, H, W, 3]` (float, H = W = `config.image_size`) -> `[B, 1 + (H/p) * (W/p), hidden]`.

    Row 0 is the CLS vector, then the patches in row-major order; every row has passed the final
    LayerNorm (Hugging Face's `last_hidden_state`).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array, *, enable_dropout: bool = False) -> jax.Array:
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images have shape {images.shape}; expected [batch, height, width, 3]")
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, but this ViT's position embeddings "
                f"are for {cfg.image_size}x{cfg.image_size}; resize the images, or load the checkpoint "
                f"with load_hf_vit(..., image_size=...) to resample the position embeddings")
        x = image_patches(jnp.asarray(images, cfg.dtype), cfg.patch_size)  # [B, n, p*p*3]
        x = DenseGeneral(cfg.hidden_size, kernel_axes=("image_features", "embed"), use_bias=True,
                         dtype=cfg.dtype, kernel_init=default_kernel_init, name="patch_embedding")(x)
        cls = partitioning.param_with_axes(
            "cls_token", nn.initializers.normal(0.02), (1, 1, cfg.hidden_size), jnp.float32,
            axes=("unmodeled", "abspos_buckets", "embed"))  # position slot 0; a name twice breaks sharding
        position = partitioning.param_with_axes(
            "position_embedding", nn.initializers.normal(0.02), (1, cfg.num_tokens, cfg.hidden_size),
            jnp.float32, axes=("unmodeled", "abspos_buckets", "embed"))
        cls = jnp.broadcast_to(jnp.asarray(cls, cfg.dtype), (x.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + jnp.asarray(position, cfg.dtype)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)
        x = partitioning.with_sharding_constraint(x, ACT_AXES)
        x = apply_stack(ViTBlock, [dict(config=cfg)] * cfg.num_layers, x, (), (enable_dropout,),
                        scan=cfg.scan_layers, remat_policy=cfg.remat_policy)
        return LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, name="final_norm")(x)
