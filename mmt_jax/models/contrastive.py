"""A contrastive image-text head on the fused encoder (beyond the MMT4 paper; MaMMUT's lesson).

MaMMUT (Kuo et al. 2023) trains one model for generation and for contrastive retrieval. Here the
encoder that reads `[image ; text]` for generation also reads each alone: the image with no text,
and a text with no image. Each output is mean-pooled over its real positions and projected to a
shared space:

    u_i = normalise(W_image mean_pool(Enc(image_i)))      v_j = normalise(W_text mean_pool(Enc(text_j)))
    s_ij = exp(t) u_i . v_j                               (cosine times a learned scale, CLIP's t)

`ContrastiveHead` computes `(u, v, exp(t))`; `losses.contrastive_loss` is InfoNCE over `s` in both
directions; the matching/retrieval score of a pair is the cosine `u_i . v_i`, with no decoding.

The agreement token (`ContrastiveConfig.agreement_token`, beyond MaMMUT) hands the head's comparison
to the decoder: one more encoder position `a = W_a (D u (.) v)`, with `u` from the image alone and `v`
from the encoder's own text alone, so `sum(u (.) v)` is the head's cosine. Whether an image and a
title match is a function of the pair only (each image and each title occur as often in a true pair
as in a false one), so nothing the decoder can read from one side predicts it; this position gives
generative matching a feature that does.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning

from mmt_jax.layers.dense import DenseGeneral


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """The contrastive head's settings (stored with the model config).

    dim: width of the shared image-text space.
    loss_weight: weight of the contrastive loss added to the generative loss (0: the head is
      there, e.g. for scoring, but not trained by this run).
    initial_temperature: CLIP's 0.07: the learned scale starts at 1 / 0.07.
    max_scale: the scale is clipped at this value (CLIP: 100), so the logits stay bounded.
    agreement_token: the encoder's output gets one more position, the agreement `W_a (D u (.) v)` of
      the image alone and the encoder's text alone (above), which the decoder reads like any other.
    agreement_text_length: the token's text is the first this many tokens of the encoder's (every
      prompt puts the product's text first, its title leading, and the prompt last, so these are
      the text the head learned to embed: the paired titles); None: all of it. A shorter text is
      a cheaper pass: the encoder reads the text alone once more for the token.
    """

    dim: int = 128
    loss_weight: float = 1.0
    initial_temperature: float = 0.07
    max_scale: float = 100.0
    agreement_token: bool = False
    agreement_text_length: int | None = None

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"contrastive dim={self.dim}; need at least 1")
        if self.loss_weight < 0:
            raise ValueError(f"contrastive loss_weight={self.loss_weight}; need >= 0")
        if not (self.initial_temperature > 0 and 1 / self.initial_temperature <= self.max_scale):
            raise ValueError(f"initial_temperature={self.initial_temperature} needs a scale "
                             f"1/T in (0, max_scale={self.max_scale}]")
        if self.agreement_text_length is not None and not (
                self.agreement_token and self.agreement_text_length >= 1):
            raise ValueError(f"agreement_text_length={self.agreement_text_length} needs "
                             f"agreement_token=True and a length of at least 1")


def mean_pool(encoded: jax.Array, mask: jax.Array) -> jax.Array:
    """`[B, L, E]`, mask `[B, L]` -> the mean over each row's real positions `[B, E]` (float32; a
    row without any real position pools to zeros)."""
    weights = jnp.asarray(mask, jnp.float32)[..., None]
    total = jnp.sum(jnp.asarray(encoded, jnp.float32) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def normalise(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
    """Each row of `[B, D]` scaled to unit length (a zero row stays zero)."""
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), epsilon ** 2))


class ContrastiveHead(nn.Module):
    """The unit vectors `u [B, D]` (`embed_features`) and `v [B, D]` (`embed_text`) of pooled
    encodings, and the clipped scale (`scale`).

    Parameters: `image_projection/kernel [embed, contrastive]`, `text_projection/kernel`,
    `log_scale []` (starts at `log(1 / initial_temperature)`).
    """

    config: ContrastiveConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.image_projection = DenseGeneral(cfg.dim, kernel_axes=("embed", "contrastive"),
                                             dtype=self.dtype, name="image_projection")
        self.text_projection = DenseGeneral(cfg.dim, kernel_axes=("embed", "contrastive"),
                                            dtype=self.dtype, name="text_projection")
        self.log_scale = partitioning.param_with_axes(
            "log_scale", nn.initializers.constant(np.log(1.0 / cfg.initial_temperature)), (),
            jnp.float32, axes=())

    def embed_features(self, image_encoded, image_mask):
        """`u [B, D]` of the features encoded alone (MMT4: the image) `[B, Lv, E]`, mask `[B, Lv]`."""
        return normalise(jnp.asarray(self.image_projection(mean_pool(image_encoded, image_mask)),
                                     jnp.float32))

    def embed_text(self, text_encoded, text_mask):
        """`v [B, D]` of a text encoded alone `[B, Lt, E]`, mask `[B, Lt]`."""
        return normalise(jnp.asarray(self.text_projection(mean_pool(text_encoded, text_mask)),
                                     jnp.float32))

    def scale(self):
        """The learned scale `exp(t)`, clipped at `max_scale` `[]`."""
        return jnp.minimum(jnp.exp(self.log_scale), self.config.max_scale)
