"""MMT4's encoder input (Fig. 3, Eq. 1-3): images through a representator -> Linear -> LayerNorm,
segment embeddings, and the per-segment relative position layout, as an encoder-input part of the T5
stack (`models/encoder_inputs.py`).

`EncoderDecoder(config, FusionConfig(...))` in `models/t5.py` is MMT4 (a `FusionConfig` is the factory
of its part, `FusedImageTextInput`); `EncoderDecoder(config)` is the text-only T5 of the paper's
comparison, the same stack with no image segment. Everything image-related lives here.

Encoder sequence: `[image vectors (token type 0) ; text tokens (token type 1)]`, i.e.
  X_v = LayerNorm(W_proj f_v(V)) + SE(0),   X_t = WE(T) + SE(1)          (Eq. 1, 2)
with relative position bias computed per segment (Eq. 3, `layers/relative_position.py`).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

from mmt_jax.layers.dense import DenseGeneral, Embed, LayerNorm
from mmt_jax.layers.relative_position import CROSS_SEGMENT_OPTIONS, segment_positions
from mmt_jax.models.encoder_inputs import EncoderInputs, SegmentLayout
from mmt_jax.vision.efficientnet import EfficientNet, EfficientNetConfig
from mmt_jax.vision.patches import image_patches
from mmt_jax.vision.pixel_histogram import PatchColourHistogram
from mmt_jax.vision.vit import ViTConfig, VisionTransformer

IMAGE_TYPE, TEXT_TYPE = 0, 1
REPRESENTATORS = ("patches", "precomputed", "vit", "efficientnet")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """How images enter the encoder.

    representator: f_v of Eq. 1 (Fig. 4):
      "patches"      flattened `patch_size x patch_size x 3` patches of `encoder_images`;
      "vit"          all tokens (CLS first) of a ViT over `encoder_images` (`network`: a ViTConfig);
      "efficientnet" the last feature map of a CNN as h*w vectors (`network`: an EfficientNetConfig);
      "precomputed"  `encoder_image_features [B, Lv, feature_dim]` computed elsewhere.
    freeze_representator: no gradient flows into the ViT/CNN and its dropout is off (a fixed
      feature extractor).
    image_positions: "sequence" (the paper: image vectors numbered 0..Lv-1) or "grid" (beyond the
      paper: row and column buckets between image vectors; for patches, and for CNN or precomputed
      features that form a square map; not for ViT, whose CLS vector has no place on the grid).
    cross_segment: relative position bias between image and text positions, see
      `RelativePositionBias` ("bucket", "zero" or "global").
    colour_histogram: beyond the paper: the width of a learned colour histogram of each pixel patch
      (`vision/pixel_histogram.py`) that replaces the patch's pixels before the projection; 0: the
      pixels themselves (Eq. 1). For "patches", and for "precomputed" features whose last
      `pixel_features` dimensions hold pixels (the "+pixels" extractors: 192; the CNN's dimensions
      stay).
    pixel_features: "precomputed" only: how many trailing dimensions of each vector are a patch's
      pixels (zero in vectors that have none).
    """

    representator: str = "patches"
    patch_size: int = 32
    feature_dim: int | None = None
    network: Any = None
    freeze_representator: bool = False
    image_positions: str = "sequence"
    cross_segment: str = "bucket"
    colour_histogram: int = 0
    pixel_features: int | None = None
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.representator not in REPRESENTATORS:
            raise ValueError(f"representator={self.representator!r}; choose from {REPRESENTATORS}")
        if self.cross_segment not in CROSS_SEGMENT_OPTIONS:
            raise ValueError(f"cross_segment={self.cross_segment!r}; choose from {CROSS_SEGMENT_OPTIONS}")
        if self.representator == "precomputed" and not self.feature_dim:
            raise ValueError("representator='precomputed' needs feature_dim (the vectors' width)")
        if self.image_positions not in ("sequence", "grid"):
            raise ValueError(f"image_positions={self.image_positions!r}; use 'sequence' or 'grid'")
        if self.image_positions == "grid" and self.representator == "vit":
            raise ValueError("image_positions='grid' needs image vectors on a grid; ViT's CLS vector "
                             "has no grid position")
        if self.colour_histogram and not (
                self.representator == "patches"
                or (self.representator == "precomputed" and self.pixel_features)):
            raise ValueError("colour_histogram needs pixel patches: representator='patches', or "
                             "'precomputed' with pixel_features (its vectors' trailing pixel dims)")
        if self.pixel_features and not (self.representator == "precomputed"
                                        and self.pixel_features <= self.feature_dim):
            raise ValueError(f"pixel_features={self.pixel_features} needs representator="
                             f"'precomputed' and at most feature_dim={self.feature_dim}")
        expected = {"vit": ViTConfig, "efficientnet": EfficientNetConfig}.get(self.representator)
        if expected is not None and not isinstance(self.network, expected):
            raise ValueError(f"representator={self.representator!r} needs network= a "
                             f"{expected.__name__}, got {type(self.network).__name__}")

    @property
    def bias_layout(self) -> SegmentLayout:
        """Eq. 3: two segments, per-segment positions, `cross_segment` between them; image pairs on
        the grid with `image_positions='grid'`."""
        return SegmentLayout(num_segments=2, cross_segment=self.cross_segment,
                             grid_segment=IMAGE_TYPE if self.image_positions == "grid" else None)

    def __call__(self, config) -> "FusedImageTextInput":
        """The encoder-input part factory (`models/encoder_inputs.py`): MMT4's part for a T5 stack of
        `config` (a `T5Config`), its parameters under `image_fusion` as in every MMT4 checkpoint."""
        return FusedImageTextInput(self, config.emb_dim, config.dtype, name="image_fusion")


class FusedImageTextInput(nn.Module):
    """MMT4's encoder-input part: `(token_embedder, encoder_input_tokens [B, Lt], encoder_images
    [B, H, W, 3] | encoder_image_features [B, Lv, Dp], encoder_image_mask [B] | [B, Lv])` ->
    `EncoderInputs` of `[image vectors ; text]`, `L = Lv + Lt`, with token types `[1, L]` (0 image,
    1 text), per-segment positions `[1, L]` (`0..Lv-1, 0..Lt-1`) and, with `image_positions='grid'`,
    the image vectors' (row, column) `[1, L, 2]`. Without image input: the text segment alone.

    Parameters (under `image_fusion`): `projection` (W_proj), `projection_norm`, `segment_embedder`
    (SE, `[2, embed]`), `representator` for the ViT/CNN representators and `colour_histogram`
    with `FusionConfig.colour_histogram`.
    """

    fusion: FusionConfig
    emb_dim: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.projection = DenseGeneral(self.emb_dim, kernel_axes=("image_features", "embed"),
                                       dtype=self.dtype)
        self.projection_norm = LayerNorm(self.fusion.layer_norm_epsilon, dtype=self.dtype)
        # Zero-initialised, so that MMT4 built on a text-only T5 checkpoint starts as that T5 on text.
        self.segment_embedder = Embed(2, self.emb_dim, dtype=self.dtype,
                                      embedding_init=nn.initializers.zeros, axes=("segments", "embed"))
        network = {"vit": VisionTransformer, "efficientnet": EfficientNet}.get(self.fusion.representator)
        if network is not None:
            self.representator = network(self.fusion.network)
        if self.fusion.colour_histogram:
            self.colour_histogram = PatchColourHistogram(self.fusion.colour_histogram, self.dtype)

    @property
    def bias_layout(self) -> SegmentLayout:
        return self.fusion.bias_layout

    def __call__(self, token_embedder: nn.Module, encoder_input_tokens: jax.Array, *,
                 encoder_images=None, encoder_image_features=None, encoder_image_mask=None,
                 enable_dropout: bool = False) -> EncoderInputs:
        tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
        text, text_mask = self.text_segment(token_embedder(tokens)), tokens > 0
        text_types = jnp.full((1, tokens.shape[1]), TEXT_TYPE, jnp.int32)
        grid_layout = self.bias_layout.grid_segment is not None
        text_grid = jnp.zeros((1, tokens.shape[1], 2), jnp.int32) if grid_layout else None
        if encoder_images is None and encoder_image_features is None:  # the text segment alone
            return EncoderInputs(text, text_mask, text_types, self._positions(text_types), text_grid)
        image, image_mask = self.image_vectors(encoder_images, encoder_image_features,
                                               encoder_image_mask, enable_dropout=enable_dropout)
        types = jnp.concatenate([jnp.full((1, image.shape[1]), IMAGE_TYPE, jnp.int32), text_types],
                                axis=1)
        grid = None
        if grid_layout:  # text rows are never read: zeros
            grid = jnp.concatenate([self.grid_positions(encoder_images, image.shape[1]), text_grid],
                                   axis=1)
        return EncoderInputs(jnp.concatenate([image.astype(text.dtype), text], axis=1),
                             jnp.concatenate([image_mask, text_mask], axis=1),
                             types, self._positions(types), grid)

    def _positions(self, types):
        """Per-segment positions (Eq. 3), or one sequence over the concatenation ('global')."""
        if self.bias_layout.cross_segment == "global":
            return None
        return segment_positions(types)

    def representation(self, encoder_images=None, encoder_image_features=None, *,
                       enable_dropout=False):
        """`f_v(V)`: `[B, Lv, Dp]` feature vectors from the batch's image input."""
        if self.fusion.representator == "precomputed":
            if encoder_image_features is None:
                raise ValueError("representator 'precomputed' reads encoder_image_features "
                                 "[batch, vectors, feature_dim]; the batch has none")
            features = jnp.asarray(encoder_image_features, self.dtype)
            if features.ndim != 3 or features.shape[-1] != self.fusion.feature_dim:
                raise ValueError(f"encoder_image_features has shape {features.shape}; expected "
                                 f"[batch, vectors, {self.fusion.feature_dim}]")
            return features
        if encoder_images is None:
            raise ValueError(f"representator {self.fusion.representator!r} reads encoder_images "
                             "[batch, height, width, 3]; the batch has none")
        images = jnp.asarray(encoder_images, self.dtype)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"encoder_images has shape {images.shape}; expected [batch, h, w, 3]")
        if self.fusion.representator == "patches":
            return image_patches(images, self.fusion.patch_size)
        if self.fusion.freeze_representator:  # a fixed, deterministic feature extractor
            return jax.lax.stop_gradient(self.representator(images, enable_dropout=False))
        return self.representator(images, enable_dropout=enable_dropout)

    def image_vectors(self, encoder_images=None, encoder_image_features=None,
                      encoder_image_mask=None, *, enable_dropout=False):
        """Image inputs -> `(vectors [B, Lv, E] with SE(0) added (Eq. 1, 2), key mask [B, Lv])`."""
        features = self.representation(encoder_images, encoder_image_features,
                                        enable_dropout=enable_dropout)
        if self.fusion.colour_histogram:  # the pixels give way to their histogram
            kept = features.shape[-1] - (self.fusion.pixel_features or features.shape[-1])
            features = jnp.concatenate(
                [features[..., :kept], self.colour_histogram(features[..., kept:])], axis=-1)
        x = self.projection_norm(self.projection(features))  # Eq. 1
        x = x + self.segment_embedder(jnp.full(x.shape[:2], IMAGE_TYPE))  # Eq. 2
        x = partitioning.with_sharding_constraint(x, ("batch", "length", "embed"))
        if encoder_image_mask is None:
            mask = jnp.ones(x.shape[:2], bool)
        else:
            mask = jnp.asarray(encoder_image_mask) > 0
            if mask.ndim == 1:  # one flag per example: the image is there or not
                mask = jnp.broadcast_to(mask[:, None], x.shape[:2])
            if mask.shape != x.shape[:2]:
                raise ValueError(f"encoder_image_mask has shape {mask.shape}; expected [batch] or "
                                 f"[batch, {x.shape[1]}] for this image input")
        return x, mask

    def grid_positions(self, encoder_images, num_vectors: int) -> jax.Array:
        """`[1, Lv, 2]` (row, column) of each image vector, rows first as the vectors are ordered."""
        if self.fusion.representator == "patches":
            columns = encoder_images.shape[2] // self.fusion.patch_size
        else:  # a square feature map
            columns = int(round(num_vectors ** 0.5))
            if columns * columns != num_vectors:
                raise ValueError(f"image_positions='grid' needs a square map of vectors; got "
                                 f"{num_vectors} vectors")
        index = jnp.arange(num_vectors)
        return jnp.stack([index // columns, index % columns], axis=-1)[None]

    def text_segment(self, embedded_text: jax.Array) -> jax.Array:
        """`WE(T) + SE(1)` (Eq. 2)."""
        return embedded_text + self.segment_embedder(jnp.full(embedded_text.shape[:2], TEXT_TYPE))


ImageFusion = FusedImageTextInput  # its name before it became the encoder-input part
