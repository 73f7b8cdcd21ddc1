"""MoEMoE's encoder front (paper sections 4.1-4.3): separate question, context and image encoders,
question-guided source weights, and the question-source alignment losses, on the T5 stack.

    C = T5_c(context),  Q = T5_q(question)                         [B, k, E]    (Eq. 1)
    I = tile(LayerNorm(W_proj f_v(image)), k)                      [B, k, E]    (Eq. 2-3)
    q_a = FC(Q)  (`source_gate`)                                   [B, k, c]    (Eq. 4)
    e = q_a[..., 0] * I + q_a[..., 1] * C                          [B, k, E]    (Eq. 5, to the decoder)
    L_QCA = |1 - cos(q_p, c_p)|,  L_QIA = |1 - cos(q_p, i_p)|                   (Eq. 6-7)

`MultiSourceEncoderDecoder(config, sources=MultiSourceConfig(...))` is the model: the context
encoder is the stack's own `encoder` (so a T5 checkpoint's encoder is its encoder), the question has
its own, unshared `question_encoder`, the image goes through any MMT4 representator and Eq. 1's
projection (`image_encoder`, `models/mmt4.py`'s part: its SE(0) is the image source's learned offset),
and the decoder (sparse MoE layers per `T5Config.decoder_moe_layers`) reads `e`.

The sources are the image and the text sources `MultiSourceConfig.text_sources`: the paper's one
context (c = 2) by default, or several texts, each a source of its own (c = 1 + texts, e.g. the title
and the other text fields, `data/prompts.py`'s `TEXT_SOURCES`). The first text source is the
stack's `encoder`'s; each further one, `name`, has its own unshared `<name>_encoder` and batch key
`encoder_<name>_tokens`. Eq. 5 and Eq. 6 go over every source:

    e = q_a[..., 0] * I + sum_j q_a[..., j] * (T_j * mask_j)                 [B, k, E]
    L_Q<source> = |1 - cos(q_p, s_p)|  for every source s

where a text source gives nothing at its own padding, and the decoder reads the positions where any
text source has a token.

Batches: `encoder_input_tokens [B, k]` the first text source, `encoder_question_tokens [B, k]` the
question, `encoder_<name>_tokens [B, k]` the further text sources, padded to the same length k (the
weights are per position, Eq. 4), and the image input of the representator (`encoder_images` or
`encoder_image_features`, `encoder_image_mask`). The encoders mask padding on the key side only, so
an answer does not depend on how far a batch is padded (except under `joint_encoder`, whose
concatenation puts the context after the padded question, and `resample`, whose learned map is for
one k).

Sown into `intermediates` (the Model adds the losses, `model.py`): `source_weights [B, k, c]`,
`question_<source>_alignment_loss` for every source (batch means).
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

from mmt_jax.layers.dense import DenseGeneral
from mmt_jax.models.contrastive import mean_pool, normalise
from mmt_jax.models.mmt4 import FusedImageTextInput, FusionConfig
from mmt_jax.models.t5 import Encoder, EncoderDecoder

IMAGE_SOURCE = "image"
SOURCE_WEIGHTINGS = ("linear", "softmax", "uniform")
IMAGE_TO_LENGTH = ("repeat", "resample")


@dataclasses.dataclass(frozen=True)
class MultiSourceConfig:
    """How MoEMoE's encoders meet.

    image: the image encoder: an MMT4 `FusionConfig` (its representator, `feature_dim` for stored
      features, `freeze_representator`); its segment and position options do not apply.
    text_sources: the text sources' names, in order: the first is read from `encoder_input_tokens`
      by the stack's `encoder`, each further one from `encoder_<name>_tokens` by its own encoder.
      ("context",): the paper's two sources; ("title", "details"): three, the title apart from the
      other text fields (what each name holds is the task's: `data/prompts.py` TEXT_SOURCES).
    source_weighting: how `q_a = FC(Q)` weighs the sources at each position:
      "linear"  the paper's Eq. 4-5: the FC's outputs as they are;
      "softmax" normalised over the sources (weights in (0, 1) that sum to 1);
      "uniform" no question guidance (Fig. 5's WoQG ablation): every source weighs 1/c, no FC;
                the decoder still has to know what is asked, so it reads the question's encoding
                before the fused sources (`[Q ; e]`, length 2k; not under `joint_encoder`, whose
                text source holds the question).
    image_to_length: Eq. 3, image vectors `[B, Lv, E]` -> `[B, k, E]`:
      "repeat"   the paper's `repeat(i, int(k / Lv))`: position p reads vector `p mod Lv`; when k is
                 not a multiple of Lv the last `k mod Lv` positions read the first `k mod Lv`
                 vectors once more (the paper's floor(k / Lv) repeats leave them undefined; a cut
                 there would make the answer depend on the padded length);
      "resample" beyond the paper: a learned map from the Lv vectors to the k positions (kernel
                 `[Lv, k]`, initialised as the tiling, so training starts from the paper's); k is
                 then the padded length trained with, and inference must pad to it.
    joint_encoder: Fig. 5's S-Enc ablation: no question encoder; the context's encoder reads
      `[question ; context]` (length 2k), which is the text source; question guidance is then not
      possible (the paper), so `source_weighting` must be "uniform", and the alignment pools the
      question's and the context's positions of that one encoding. One text source only.
    alignment_dim: the width of the projected vectors of Eq. 6-7.
    question_context_weight, question_image_weight: the weights of L_QCA (for every text source)
      and L_QIA in the loss (Eq. 8: 1 and 1; 0 switches a loss off, Fig. 5's WoAL ablation is both
      0).
    """

    image: FusionConfig
    text_sources: tuple[str, ...] = ("context",)
    source_weighting: str = "linear"
    image_to_length: str = "repeat"
    joint_encoder: bool = False
    alignment_dim: int = 128
    question_context_weight: float = 1.0
    question_image_weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.image, FusionConfig):
            raise ValueError(f"MultiSourceConfig.image must be a FusionConfig (the image encoder's "
                             f"representator), got {type(self.image).__name__}")
        object.__setattr__(self, "text_sources", tuple(self.text_sources))  # JSON and gin: lists
        names = self.names
        if not self.text_sources or len(set(names)) != len(names) or "question" in names or any(
                not re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in names):
            raise ValueError(f"text_sources={self.text_sources!r}: one or more distinct lower-case "
                             f"names (letters, digits, _), none of them 'image' or 'question'")
        if self.source_weighting not in SOURCE_WEIGHTINGS:
            raise ValueError(f"source_weighting={self.source_weighting!r}; choose from "
                             f"{SOURCE_WEIGHTINGS}")
        if self.image_to_length not in IMAGE_TO_LENGTH:
            raise ValueError(f"image_to_length={self.image_to_length!r}; choose from "
                             f"{IMAGE_TO_LENGTH}")
        if self.joint_encoder and self.source_weighting != "uniform":
            raise ValueError("joint_encoder (S-Enc) has no question encoding to guide the sources "
                             "with: set source_weighting='uniform'")
        if self.joint_encoder and len(self.text_sources) > 1:
            raise ValueError(f"joint_encoder (S-Enc) reads [question ; context] as one text "
                             f"source; text_sources={self.text_sources!r} has several")
        if self.alignment_dim < 1:
            raise ValueError(f"alignment_dim={self.alignment_dim}; need at least 1")
        if self.question_context_weight < 0 or self.question_image_weight < 0:
            raise ValueError("the alignment loss weights must be >= 0")

    @property
    def names(self) -> tuple[str, ...]:
        """Every source, in the order of the weights' last axis: the image, then the texts."""
        return (IMAGE_SOURCE, *self.text_sources)

    @property
    def token_features(self) -> tuple[str, ...]:
        """The batch keys the module reads beside `encoder_input_tokens` and the image's: the
        question's and those of the text sources after the first."""
        return ("encoder_question_tokens",
                *(f"encoder_{name}_tokens" for name in self.text_sources[1:]))

    def alignment_weights(self) -> dict[str, float]:
        """`{sown loss name: its weight in Eq. 8}`: `question_<source>_alignment_loss` for every
        source, L_QIA's weight for the image's, L_QCA's for each text source's."""
        return {f"question_{name}_alignment_loss":
                self.question_image_weight if name == IMAGE_SOURCE else self.question_context_weight
                for name in self.names}


def tiling(num_vectors: int, length: int) -> jax.Array:
    """Eq. 3 as a `[num_vectors, length]` 0/1 matrix: position p reads vector `p mod num_vectors`."""
    positions = jnp.arange(length)
    return (positions[None] % num_vectors == jnp.arange(num_vectors)[:, None]).astype(jnp.float32)


def alignment_loss(a: jax.Array, b: jax.Array, valid: jax.Array) -> jax.Array:
    """Eq. 6-7: `mean over valid rows of |1 - cos(a, b)|`, for `a, b [B, D]`, `valid [B]` bool."""
    cosine = jnp.sum(normalise(a) * normalise(b), axis=-1)
    weights = valid.astype(jnp.float32)
    return jnp.sum(jnp.abs(1.0 - cosine) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class ImageToLength(nn.Module):
    """Eq. 3: image vectors `[B, Lv, E]` and their mask `[B, Lv]` -> `[B, k, E]` by `tiling` (an
    absent image, masked, is zeros); `learned`: through a `[Lv, k]` parameter (`resampling`)
    initialised as the tiling."""

    learned: bool = False

    @nn.compact
    def __call__(self, image: jax.Array, mask: jax.Array, length: int):
        image = image * mask[..., None].astype(image.dtype)
        tiled = tiling(image.shape[1], length)
        if self.learned and self.has_variable("params", "resampling"):
            trained = self.get_variable("params", "resampling").shape
            if tuple(trained) != tuple(tiled.shape):
                raise ValueError(f"image_to_length='resample' learned a map from {trained[0]} image "
                                 f"vectors to {trained[1]} positions; this batch has "
                                 f"{tiled.shape[0]} vectors and a context of {length}: pad the "
                                 f"context (input_length) to {trained[1]}")
        matrix = (partitioning.param_with_axes("resampling", lambda rng: tiled,
                                               axes=("image_vectors", "length"))
                  if self.learned else tiled)
        return jnp.einsum("bve,vk->bke", image, matrix.astype(image.dtype))


class MultiSourceEncoderDecoder(EncoderDecoder):
    """MoEMoE: the T5 stack with its encoder front replaced by the question-guided fusion of the
    module docstring. The decoder, `decode` and the decoding cache are the stack's own."""

    sources: MultiSourceConfig | None = None

    def setup(self):
        if self.sources is None:
            raise ValueError("MultiSourceEncoderDecoder needs sources= a MultiSourceConfig")
        if self.encoder_input is not None or self.contrastive is not None:
            raise ValueError("MoEMoE reads its question, context and image through its own "
                             "encoders: no encoder_input part, no contrastive head")
        super().setup()  # token_embedder, the text part, `encoder` (the context's), decoder
        cfg = self.config
        if not self.sources.joint_encoder:
            self.question_encoder = Encoder(cfg, self.input_part.bias_layout)
        self.text_encoders = {name: Encoder(cfg, self.input_part.bias_layout, name=f"{name}_encoder")
                              for name in self.sources.text_sources[1:]}
        self.image_encoder = FusedImageTextInput(self.sources.image, cfg.emb_dim, cfg.dtype)
        self.image_to_length = ImageToLength(self.sources.image_to_length == "resample")
        if self.sources.source_weighting != "uniform":
            self.source_gate = DenseGeneral(len(self.sources.names),
                                            kernel_axes=("embed", "sources"), dtype=cfg.dtype)
        self.alignment_projections = {
            name: DenseGeneral(self.sources.alignment_dim, kernel_axes=("embed", "alignment"),
                               dtype=cfg.dtype, name=f"{name}_projection")
            for name in ("question", *self.sources.names)}

    def _text(self, encoder: nn.Module, tokens, enable_dropout):
        inputs = self.input_part(self.token_embedder, tokens, enable_dropout=enable_dropout)
        return encoder(inputs, enable_dropout=enable_dropout), inputs.mask

    def weigh_sources(self, question: jax.Array) -> jax.Array:
        """Eq. 4: `Q [B, k, E]` -> per-position weights of the sources `[B, k, c]` ("uniform":
        1/c at each position of `question`'s shape)."""
        if self.sources.source_weighting == "uniform":
            count = len(self.sources.names)
            return jnp.full(question.shape[:2] + (count,), 1.0 / count, question.dtype)
        weights = self.source_gate(question)
        if self.sources.source_weighting == "softmax":
            weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1).astype(question.dtype)
        return weights

    def _encode(self, encoder_input_tokens, encoder_segment_ids, enable_dropout, features):
        if encoder_segment_ids is not None:
            raise ValueError("MoEMoE does not read packed batches (encoder_segment_ids): its "
                             "sources are aligned position by position")
        length = jnp.shape(encoder_input_tokens)[1]
        first, *further = self.sources.text_sources
        tokens = {key: self._tokens(features, key, length)
                  for key in self.sources.token_features}
        question_tokens = tokens["encoder_question_tokens"]
        if self.sources.joint_encoder:  # S-Enc: one encoding of [question ; context]
            text, text_mask = self._text(
                self.encoder, jnp.concatenate([question_tokens, encoder_input_tokens], axis=1),
                enable_dropout)
            question, question_mask = text[:, :length], text_mask[:, :length]
            texts = {first: (text, text_mask)}
            pooled_texts = {first: (text[:, length:], text_mask[:, length:])}
        else:
            question, question_mask = self._text(self.question_encoder, question_tokens,
                                                 enable_dropout)
            texts = {first: self._text(self.encoder, encoder_input_tokens, enable_dropout)}
            texts |= {name: self._text(self.text_encoders[name], tokens[f"encoder_{name}_tokens"],
                                       enable_dropout) for name in further}
            pooled_texts = texts
        image, image_mask = self.image_encoder.image_vectors(**features,
                                                             enable_dropout=enable_dropout)
        text_length = texts[first][0].shape[1]
        image_k = self.image_to_length(image.astype(texts[first][0].dtype), image_mask, text_length)
        weights = self.weigh_sources(texts[first][0] if self.sources.joint_encoder
                                     else question)  # Eq. 4
        fused = weights[..., 0:1] * image_k  # Eq. 5, over every source
        for j, (text, mask) in enumerate(texts.values(), start=1):
            fused = fused + weights[..., j:j + 1] * text * mask[..., None].astype(text.dtype)
        fused_mask = functools.reduce(jnp.logical_or, [mask for _, mask in texts.values()])
        self.sow("intermediates", "source_weights", weights)
        pooled = {"question": mean_pool(question, question_mask),
                  IMAGE_SOURCE: mean_pool(image, image_mask),
                  **{name: mean_pool(text, mask) for name, (text, mask) in pooled_texts.items()}}
        present = {IMAGE_SOURCE: jnp.any(image_mask, -1),
                   **{name: jnp.any(mask, -1) for name, (_, mask) in pooled_texts.items()}}
        projected = {name: self.alignment_projections[name](vector)
                     for name, vector in pooled.items()}
        has_question = jnp.any(question_mask, axis=-1)
        for name in self.sources.names:  # Eq. 6-7
            self.sow("intermediates", f"question_{name}_alignment_loss", alignment_loss(
                projected["question"], projected[name], has_question & present[name]))
        if self.sources.source_weighting == "uniform" and not self.sources.joint_encoder:
            return (jnp.concatenate([question, fused], axis=1),
                    jnp.concatenate([question_mask, fused_mask], axis=1))  # WoQG: [Q ; e]
        return fused, fused_mask

    @staticmethod
    def _tokens(features: dict, key: str, length: int) -> jax.Array:
        """`features.pop(key)`, a `[batch, length]` token array the batch must have."""
        tokens = features.pop(key, None)
        what = ("the question" if key == "encoder_question_tokens"
                else f"the text source {key.removeprefix('encoder_').removesuffix('_tokens')!r}")
        if tokens is None:
            raise ValueError(f"MoEMoE reads {key} [batch, length] ({what}) beside "
                             f"encoder_input_tokens; the batch has none")
        if jnp.shape(tokens)[1] != length:
            raise ValueError(f"{key} has length {jnp.shape(tokens)[1]}, encoder_input_tokens "
                             f"{length}: MoEMoE weighs the sources position by position (Eq. 4), "
                             f"so all are padded to one length")
        return tokens
