"""T5 encoder-decoder in Flax Linen: T5.1.1 (GEGLU, untied logits) and original T5 (ReLU, tied
embeddings with 1/sqrt(d) logit scaling) from one implementation, chosen by `T5Config`.

Parameter tree (t5x T5.1.1 checkpoint names, so public t5x and converted Hugging Face checkpoints load
without renaming):
  token_embedder/embedding                                  [vocab, embed]
  encoder/relpos_bias/rel_embedding                          [heads, buckets]
  encoder/layers_{i}/{pre_attention_layer_norm, pre_mlp_layer_norm}/scale
  encoder/layers_{i}/attention/{query, key, value}/kernel    [embed, heads*kv]; out: [heads*kv, embed]
  encoder/layers_{i}/mlp/{wi | wi_0, wi_1}/kernel, mlp/wo/kernel
  encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding
  decoder/layers_{i}/{pre_self_attention, pre_cross_attention, pre_mlp}_layer_norm/scale
  decoder/layers_{i}/{self_attention, encoder_decoder_attention}/{query, key, value, out}/kernel
  decoder/layers_{i}/mlp/...,  decoder/decoder_norm/scale,  decoder/logits_dense/kernel (untied only)
A layer placed as MoE (`T5Config.moe`, `decoder_moe_layers`, `encoder_moe_layers`) has instead
  .../layers_{i}/mlp/router/kernel [embed, experts] and .../mlp/expert/{wi_0, wi_1, wo}/kernel
  [experts, ...] (layers/moe.py).
With `T5Config.scan_layers`, each stack's `layers_{i}/X` are one `layers/X [num_layers, ...]`
(layers/layer_stack.py has the mapping and the converters both ways).
"""
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util
from flax.linen import partitioning

from mmt_jax.layers.attention import (MultiHeadAttention, combine_masks, make_attention_mask,
                                      make_causal_mask, make_segment_mask)
from mmt_jax.layers.dense import DenseGeneral, Embed, RMSNorm
from mmt_jax.layers.layer_stack import apply_stack, check_remat_policy
from mmt_jax.layers.mlp import MlpBlock
from mmt_jax.layers.moe import MoeBlock, MoeConfig
from mmt_jax.layers.relative_position import RelativePositionBias
from mmt_jax.models.contrastive import ContrastiveConfig, ContrastiveHead
from mmt_jax.models.encoder_inputs import (EncoderInputFactory, EncoderInputs, SegmentLayout,
                                           text_encoder_input)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes and variant switches of a T5 encoder-decoder.

    `mlp_activations=("gelu", "linear")` + `logits_via_embedding=False` is T5.1.1 (and Flan-T5);
    `("relu",)` + `logits_via_embedding=True` is the original T5.

    MoE (MoEMoE sec. 4.4): with `moe` set, the MLP of the layers named by `decoder_moe_layers` and
    `encoder_moe_layers` is a `MoeBlock`: "all", "odd", "even" (0-based layer indices), "last",
    "last-2" (the last two), "none", or explicit indices. The paper's best: decoder only (Table 4).

    Scale (layers/layer_stack.py): `scan_layers` runs each stack as one scan over a layer (compile
    time flat in depth; parameters stacked under `layers/`), `remat_policy` ("none", "minimal",
    "full") says what each layer's forward keeps for the backward pass. Neither changes results.
    """

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 6
    head_dim: int = 64
    mlp_dim: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    mlp_activations: Sequence[str] = ("gelu", "linear")
    logits_via_embedding: bool = False
    dropout_rate: float = 0.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32  # activations; parameters are always float32
    moe: MoeConfig | None = None
    decoder_moe_layers: str | tuple[int, ...] = "none"
    encoder_moe_layers: str | tuple[int, ...] = "none"
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        check_remat_policy(self.remat_policy)
        for stack in ("encoder", "decoder"):
            num_layers = getattr(self, f"num_{stack}_layers")
            layers = moe_layers(getattr(self, f"{stack}_moe_layers"), num_layers)
            if layers and self.moe is None:
                raise ValueError(f"{stack}_moe_layers places MoE layers but T5Config.moe is None")
            if self.scan_layers and 0 < len(layers) < num_layers:
                raise ValueError(f"scan_layers needs identical layers, but {stack}_moe_layers="
                                 f"{getattr(self, f'{stack}_moe_layers')!r} makes some MoE and some "
                                 "dense; place MoE on 'all' or 'none' of the stack's layers")

    def to_json_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["mlp_activations"] = list(self.mlp_activations)
        fields["dtype"] = jnp.dtype(self.dtype).name
        for stack in ("encoder", "decoder"):
            spec = fields[f"{stack}_moe_layers"]
            fields[f"{stack}_moe_layers"] = spec if isinstance(spec, str) else list(spec)
        return fields

    @classmethod
    def from_json_dict(cls, fields: dict) -> "T5Config":
        fields = dict(fields)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown T5Config field(s) {sorted(unknown)}")
        fields["mlp_activations"] = tuple(fields.get("mlp_activations", ("gelu", "linear")))
        fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
        if fields.get("moe") is not None:
            fields["moe"] = MoeConfig(**fields["moe"])
        for stack in ("encoder", "decoder"):
            spec = fields.get(f"{stack}_moe_layers", "none")
            fields[f"{stack}_moe_layers"] = spec if isinstance(spec, str) else tuple(spec)
        return cls(**fields)

    @property
    def has_moe(self) -> bool:
        return bool(moe_layers(self.encoder_moe_layers, self.num_encoder_layers) or
                    moe_layers(self.decoder_moe_layers, self.num_decoder_layers))


def moe_layers(spec: str | Sequence[int], num_layers: int) -> frozenset[int]:
    """The layer indices a placement names (see `T5Config`)."""
    named = {"none": (), "all": range(num_layers), "odd": range(1, num_layers, 2),
             "even": range(0, num_layers, 2), "last": range(num_layers - 1, num_layers),
             "last-2": range(max(0, num_layers - 2), num_layers)}
    if isinstance(spec, str):
        if spec not in named:
            raise ValueError(f"MoE placement {spec!r}; use one of {sorted(named)} or layer indices")
        return frozenset(named[spec])
    bad = [i for i in spec if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"MoE layer indices {bad} outside 0..{num_layers - 1}")
    return frozenset(spec)


# d_model, d_ff, heads, d_kv, encoder layers, decoder layers
_T5_1_1_SIZES = {
    "tiny": (128, 512, 4, 32, 2, 2),
    "small": (512, 1024, 6, 64, 8, 8),
    "base": (768, 2048, 12, 64, 12, 12),
    "large": (1024, 2816, 16, 64, 24, 24),
    "xl": (2048, 5120, 32, 64, 24, 24),
}
_T5_SIZES = {
    "tiny": (128, 512, 4, 32, 2, 2),
    "small": (512, 2048, 8, 64, 6, 6),
    "base": (768, 3072, 12, 64, 12, 12),
    "large": (1024, 4096, 16, 64, 24, 24),
}


def t5_config(size: str, variant: str = "t5_1_1", **overrides) -> T5Config:
    """Published sizes: `variant` is "t5_1_1" (also Flan-T5) or "t5" (original); sizes tiny..large(/xl)."""
    table = {"t5_1_1": _T5_1_1_SIZES, "t5": _T5_SIZES}.get(variant)
    if table is None:
        raise ValueError(f"unknown T5 variant {variant!r}; use 't5_1_1' or 't5'")
    if size not in table:
        raise ValueError(f"unknown size {size!r} for {variant}; known: {sorted(table)}")
    d_model, d_ff, heads, d_kv, n_enc, n_dec = table[size]
    variant_fields = (dict(mlp_activations=("gelu", "linear"), logits_via_embedding=False)
                      if variant == "t5_1_1" else
                      dict(mlp_activations=("relu",), logits_via_embedding=True))
    fields = dict(emb_dim=d_model, mlp_dim=d_ff, num_heads=heads, head_dim=d_kv,
                  num_encoder_layers=n_enc, num_decoder_layers=n_dec, **variant_fields)
    fields.update(overrides)
    fields["dtype"] = jnp.dtype(fields.get("dtype", jnp.float32))  # gin may say "bfloat16"
    return T5Config(**fields)


def param_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """`{'/'-joined param path: shape}` of the text-only `EncoderDecoder(config)`, without compute."""
    tokens = jnp.ones((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda: EncoderDecoder(config).init(jax.random.key(0), tokens, tokens))
    return {path: tuple(x.shape)
            for path, x in traverse_util.flatten_dict(variables["params"], sep="/").items()}


def _dropout(config, x, enable_dropout):
    return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))(x, deterministic=not enable_dropout)


def _constrain(x):
    return partitioning.with_sharding_constraint(x, ("batch", "length", "embed"))


def _mlp(cfg: T5Config, use_moe: bool):
    """The layer's feed-forward block, dense or MoE, always named `mlp`."""
    if use_moe:
        return MoeBlock(cfg.moe, cfg.mlp_dim, tuple(cfg.mlp_activations), cfg.dropout_rate,
                        cfg.dtype, name="mlp")
    return MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.dtype, name="mlp")


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + MLP block with residuals: `[B, L, E]` -> `[B, L, E]`."""

    config: T5Config
    use_moe: bool = False

    @nn.compact
    def __call__(self, x, mask, bias, enable_dropout=False):
        cfg = self.config
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg.num_heads, cfg.head_dim, dropout_rate=cfg.dropout_rate,
                               dtype=cfg.dtype, name="attention")(
            h, h, mask, bias, enable_dropout=enable_dropout)
        x = _constrain(x + _dropout(cfg, h, enable_dropout))
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(x)
        h = _mlp(cfg, self.use_moe)(h, enable_dropout=enable_dropout)
        return _constrain(x + _dropout(cfg, h, enable_dropout))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, MLP: `[B, L, E]` -> `[B, L, E]`."""

    config: T5Config
    use_moe: bool = False

    @nn.compact
    def __call__(self, y, encoded, decoder_mask, encoder_decoder_mask, bias, enable_dropout=False,
                 decode=False, max_decode_length=None):
        cfg = self.config
        attention = lambda name, cross: MultiHeadAttention(  # noqa: E731
            cfg.num_heads, cfg.head_dim, is_cross_attention=cross, dropout_rate=cfg.dropout_rate,
            dtype=cfg.dtype, name=name)
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_self_attention_layer_norm")(y)
        h = attention("self_attention", False)(
            h, h, decoder_mask, bias, enable_dropout=enable_dropout, decode=decode,
            max_decode_length=max_decode_length)
        y = _constrain(y + _dropout(cfg, h, enable_dropout))
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_cross_attention_layer_norm")(y)
        h = attention("encoder_decoder_attention", True)(
            h, encoded, encoder_decoder_mask, None, enable_dropout=enable_dropout, decode=decode)
        y = _constrain(y + _dropout(cfg, h, enable_dropout))
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name="pre_mlp_layer_norm")(y)
        h = _mlp(cfg, self.use_moe)(h, enable_dropout=enable_dropout)
        return _constrain(y + _dropout(cfg, h, enable_dropout))


def _relpos_bias(config, bidirectional, layout=SegmentLayout()):
    return RelativePositionBias(
        config.num_heads, bidirectional, config.relative_attention_num_buckets,
        config.relative_attention_max_distance, num_segments=layout.num_segments,
        cross_segment=layout.cross_segment, grid_segment=layout.grid_segment, dtype=config.dtype,
        name="relpos_bias")


class Encoder(nn.Module):
    """An encoder-input part's `EncoderInputs` (`models/encoder_inputs.py`) -> encodings `[B, L, E]`.

    The part gives the embedded sequence, its mask, and each position's segment (`token_types`),
    position and grid cell; `layout` (the part's `bias_layout`) says how the one relative position
    bias shared by all layers treats the segments. Without segments the sequence is one, as in T5.
    `packing_segment_ids [B, L]` separate examples packed into one row.
    """

    config: T5Config
    layout: SegmentLayout = SegmentLayout()

    @nn.compact
    def __call__(self, inputs: EncoderInputs, packing_segment_ids=None, *, enable_dropout=False):
        cfg = self.config
        embedded, mask = inputs.embedded, inputs.mask
        # Only keys are masked (as Hugging Face's T5 does): a padded position's output then depends
        # on the real tokens alone, never on how far the batch is padded. Nothing reads those
        # outputs but MoEMoE's source gate, which weighs every context position by the question's
        # output there (Eq. 4), the question being padded to the context's length.
        attention_mask = make_attention_mask(jnp.ones_like(mask), mask)
        if packing_segment_ids is not None:
            attention_mask = combine_masks(
                attention_mask, make_segment_mask(packing_segment_ids, packing_segment_ids))
        positions = inputs.positions
        if positions is None:
            positions = jnp.arange(embedded.shape[1])[None]
        bias = _relpos_bias(cfg, True, self.layout)(
            positions, positions, inputs.token_types, inputs.token_types, inputs.grid, inputs.grid)
        x = _constrain(_dropout(cfg, embedded.astype(cfg.dtype), enable_dropout))
        placed = moe_layers(cfg.encoder_moe_layers, cfg.num_encoder_layers)
        x = apply_stack(EncoderLayer, [dict(config=cfg, use_moe=i in placed)
                                       for i in range(cfg.num_encoder_layers)],
                        x, (attention_mask, bias), (enable_dropout,),
                        scan=cfg.scan_layers, remat_policy=cfg.remat_policy)
        x = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name="encoder_norm")(x)
        return _dropout(cfg, x, enable_dropout)


class Decoder(nn.Module):
    """Decoder inputs `[B, Ld]` and encodings `[B, Le, E]` -> logits `[B, Ld, vocab]` (float32).

    `output`: "logits"; "hidden", the states the output layer reads `[B, Ld, E]` (after the final
    norm and dropout); "project", the output layer alone on such states passed as `encoded` (what
    `losses.chunked_cross_entropy` applies chunk by chunk, so no `[B, Ld, vocab]` array is made).
    """

    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoded, decoder_input_tokens, decoder_mask=None, encoder_decoder_mask=None, *,
                 enable_dropout=False, decode=False, max_decode_length=None, output="logits"):
        cfg = self.config
        if output == "project":
            return self._output_layer(encoded)
        tokens = jnp.asarray(decoder_input_tokens, jnp.int32)
        # Decode steps need the bias of the whole cached length; the attention layer takes its row.
        length = max_decode_length if decode and max_decode_length else tokens.shape[1]
        positions = jnp.arange(length)[None]
        bias = _relpos_bias(cfg, bidirectional=False)(positions, positions)
        y = _dropout(cfg, self.shared_embedding(tokens).astype(cfg.dtype), enable_dropout)
        y = _constrain(y)
        placed = moe_layers(cfg.decoder_moe_layers, cfg.num_decoder_layers)
        y = apply_stack(DecoderLayer, [dict(config=cfg, use_moe=i in placed)
                                       for i in range(cfg.num_decoder_layers)],
                        y, (encoded, decoder_mask, encoder_decoder_mask, bias),
                        (enable_dropout, decode, max_decode_length),
                        scan=cfg.scan_layers, remat_policy=cfg.remat_policy)
        y = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name="decoder_norm")(y)
        y = _dropout(cfg, y, enable_dropout)
        if output == "hidden":
            return y
        if output != "logits":
            raise ValueError(f"output={output!r}; choose 'logits', 'hidden' or 'project'")
        return self._output_layer(y)

    def _output_layer(self, y):
        """`[..., E]` -> float32 logits `[..., vocab]` (called within `__call__`)."""
        cfg = self.config
        if cfg.logits_via_embedding:
            # Original T5 ties the output layer to the embedding and rescales by 1/sqrt(d_model).
            logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1]).astype(cfg.dtype)
        else:
            logits = DenseGeneral(cfg.vocab_size, kernel_axes=("embed", "vocab"), dtype=cfg.dtype,
                                  name="logits_dense")(y)
        logits = jnp.asarray(logits, jnp.float32)
        return partitioning.with_sharding_constraint(logits, ("batch", "length", "vocab"))


class EncoderDecoder(nn.Module):
    """A T5 encoder-decoder whose encoder input is a part, with t5x's module interface (`__call__`,
    `encode`, `decode`).

    encoder_input: the factory of the encoder-input part (`models/encoder_inputs.py`), called with
      `config`; None: `TextEncoderInput`, plain T5. Other fronts come in through their own part (MMT4:
      `EncoderDecoder(config, FusionConfig(...))`, a FusionConfig being its part's factory); the
      stack passes them the batch's other encoder-side features by keyword and reads back the
      embedded sequence, its mask and the segments its relative position bias needs.

    contrastive: a `ContrastiveConfig` adds the contrastive head (`embed_pairs`, parameters under
      `contrastive_head`); None: none.

    Masks: padding is token id 0; packed batches pass segment ids (block-diagonal masks); the decoder
    is causal. `encode_with_mask` also gives the encoder sequence's key mask for the decoder's
    cross-attention (it can be longer than the tokens).
    """

    config: T5Config
    encoder_input: EncoderInputFactory | None = None
    contrastive: ContrastiveConfig | None = None

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype, name="token_embedder")
        # A part names itself when its parameters have a fixed place in the tree; else `input_part`.
        self.input_part = (self.encoder_input or text_encoder_input)(cfg)
        self.encoder = Encoder(cfg, self.input_part.bias_layout)
        self.decoder = Decoder(cfg, self.token_embedder)
        if self.contrastive is not None:
            self.contrastive_head = ContrastiveHead(self.contrastive, cfg.dtype)
            if self.contrastive.agreement_token:
                self.agreement_embedding = DenseGeneral(
                    cfg.emb_dim, kernel_axes=("contrastive", "embed"), dtype=cfg.dtype,
                    name="agreement_embedding")

    def _encode_sequence(self, encoder_input_tokens, encoder_segment_ids, enable_dropout, features):
        inputs = self.input_part(self.token_embedder, encoder_input_tokens,
                                 enable_dropout=enable_dropout, **features)
        length = jnp.shape(encoder_input_tokens)[1]
        if encoder_segment_ids is not None and inputs.embedded.shape[1] != length:
            raise ValueError(
                f"packed batches (encoder_segment_ids) need one encoder position per token; this "
                f"batch's encoder input has {inputs.embedded.shape[1]} positions for {length} tokens")
        encoded = self.encoder(inputs, encoder_segment_ids, enable_dropout=enable_dropout)
        return encoded, inputs.mask

    def _encode(self, encoder_input_tokens, encoder_segment_ids, enable_dropout, features,
                features_vector=None):
        """The encoded sequence and its key mask, with the agreement token after it when the head
        has one (`ContrastiveConfig.agreement_token`; masked on a row whose other features are
        absent). `features_vector`: the head's `u [B, D]` of these features when the caller has it."""
        encoded, mask = self._encode_sequence(encoder_input_tokens, encoder_segment_ids,
                                              enable_dropout, features)
        if self.contrastive is None or not self.contrastive.agreement_token or not features:
            return encoded, mask
        if encoder_segment_ids is not None:
            raise ValueError("the agreement token compares one row's features with its text: "
                             "packed batches (encoder_segment_ids) are not supported")
        if features_vector is None:
            features_vector = self._features_vector(encoder_input_tokens, enable_dropout, features)
        text = self._text_vector(encoder_input_tokens[:, :self.contrastive.agreement_text_length],
                                 enable_dropout)
        agreement = self.agreement_embedding(self.contrastive.dim * features_vector * text)
        present = jnp.any(jnp.abs(features_vector) > 0, axis=-1, keepdims=True)  # zero: nothing pooled
        return (jnp.concatenate([encoded, jnp.asarray(agreement, encoded.dtype)[:, None]], axis=1),
                jnp.concatenate([mask, present.astype(mask.dtype)], axis=1))

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, *, enable_dropout=False,
               **features):
        """`[B, Lt]` tokens, and the part's other features by their batch keys -> `[B, Le, E]`
        (`Le = Lt` for text; MMT4: `Lv + Lt`)."""
        return self._encode(encoder_input_tokens, encoder_segment_ids, enable_dropout, features)[0]

    def encode_with_mask(self, encoder_input_tokens, encoder_segment_ids=None, *,
                         enable_dropout=False, **features):
        """`(encoded [B, Le, E], key mask [B, Le])`: what the decoder's cross-attention needs."""
        return self._encode(encoder_input_tokens, encoder_segment_ids, enable_dropout, features)

    def embed_pairs(self, pair_text_tokens, *, enable_dropout=False, **features):
        """The contrastive head (`models/contrastive.py`): the encoder reads the part's other
        features with no text and, separately, `pair_text_tokens [B, Lp]` with no other feature;
        each is pooled and projected. -> `(u [B, D], v [B, D], scale [])`."""
        if self.contrastive is None:
            raise ValueError("this model has no contrastive head (ModelConfig.contrastive is None)")
        return (self._features_vector(pair_text_tokens, enable_dropout, features),
                self._text_vector(pair_text_tokens, enable_dropout), self.contrastive_head.scale())

    def _features_vector(self, text_tokens, enable_dropout, features):
        """The head's `u [B, D]`: the part's other features encoded with no text (`text_tokens
        [B, L]` gives only the batch size)."""
        # One masked pad position rather than none: XLA:CPU executables with zero-size operands
        # deadlocked in collectives when reloaded from the persistent compilation cache.
        no_text = jnp.zeros((jnp.shape(text_tokens)[0], 1), jnp.int32)
        return self.contrastive_head.embed_features(
            *self._encode_sequence(no_text, None, enable_dropout, features))

    def _text_vector(self, text_tokens, enable_dropout):
        """The head's `v [B, D]`: `text_tokens [B, L]` encoded with no other feature."""
        return self.contrastive_head.embed_text(
            *self._encode_sequence(text_tokens, None, enable_dropout, {}))

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None, *,
               encoder_mask=None, enable_dropout=False, decode=False, max_decode_length=None,
               output="logits"):
        """Logits `[B, Ld, vocab]`; with `decode=True`, one step `[B, 1, vocab]` over the cache;
        `output="hidden"`: the states before the output layer (`Decoder`).

        `encoder_mask [B, Le]` defaults to the text padding mask (`encoder_input_tokens > 0`).
        """
        # Relative positions within a packed segment equal those of arange; targets only define loss.
        del decoder_positions, decoder_target_tokens
        if encoder_mask is None:
            encoder_mask = jnp.asarray(encoder_input_tokens) > 0
        # Only keys are masked for padding: a causal row never reaches the padding after a sequence,
        # so query-side padding masks would change nothing but the (ignored) outputs at pad positions,
        # and a pad id generated mid-sequence is scored exactly as it was decoded.
        query_mask = jnp.ones(decoder_input_tokens.shape, bool)
        encoder_decoder_mask = make_attention_mask(query_mask, encoder_mask)
        decoder_mask = None if decode else make_causal_mask(decoder_input_tokens.shape[1])
        if decoder_segment_ids is not None and not decode:
            decoder_mask = combine_masks(
                decoder_mask, make_segment_mask(decoder_segment_ids, decoder_segment_ids))
            encoder_decoder_mask = combine_masks(
                encoder_decoder_mask, make_segment_mask(decoder_segment_ids, encoder_segment_ids))
        return self.decoder(encoded, decoder_input_tokens, decoder_mask, encoder_decoder_mask,
                            enable_dropout=enable_dropout, decode=decode,
                            max_decode_length=max_decode_length, output=output)

    def vocab_logits(self, hidden):
        """The decoder's output layer alone: states `[B, n, E]` (`output="hidden"`) -> float32
        logits `[B, n, vocab]`."""
        return self.decoder(hidden, None, output="project")

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, *, enable_dropout=False, decode=False,
                 max_decode_length=None, output="logits", **features):
        """Teacher-forced logits `[B, Ld, vocab]` (`output="hidden"`: the states before the output
        layer `[B, Ld, E]`); `features`: the encoder-input part's (`encode`)."""
        del encoder_positions
        encoded, mask = self._encode(encoder_input_tokens, encoder_segment_ids, enable_dropout,
                                     features)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           encoder_segment_ids, decoder_segment_ids, decoder_positions,
                           encoder_mask=mask, enable_dropout=enable_dropout, decode=decode,
                           max_decode_length=max_decode_length, output=output)

    def forward_with_pairs(self, encoder_input_tokens, decoder_input_tokens, pair_text_tokens,
                           decoder_target_tokens=None, encoder_segment_ids=None,
                           decoder_segment_ids=None, encoder_positions=None,
                           decoder_positions=None, *, enable_dropout=False, output="logits",
                           **features):
        """Training's pass: `(__call__'s output, embed_pairs(pair_text_tokens)'s (u, v, scale))`.
        The features alone are encoded once, for the agreement token and the head's `u` both."""
        del encoder_positions, decoder_positions, decoder_target_tokens
        alone = self._features_vector(encoder_input_tokens, enable_dropout, features)
        encoded, mask = self._encode(encoder_input_tokens, encoder_segment_ids, enable_dropout,
                                     features, features_vector=alone)
        output = self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                             encoder_segment_ids=encoder_segment_ids,
                             decoder_segment_ids=decoder_segment_ids, encoder_mask=mask,
                             enable_dropout=enable_dropout, output=output)
        return output, (alone, self._text_vector(pair_text_tokens, enable_dropout),
                        self.contrastive_head.scale())
