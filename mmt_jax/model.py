"""The Models: loss, initial variables, decoding and scoring around a Flax module (t5x's model protocol).

One Model per family, chosen from the module's config by `model_class` / `model_for`:

  EncoderDecoderModel            dense T5 and MMT4: cross entropy + z-loss, `dropout` rng stream
  `- MoeEncoderDecoderModel      sparse MoE layers: + the `router_noise` rng stream, the MoE layers'
                                 sown losses (weighted by the module's `MoeConfig`) and `moe/*` metrics

Both expose exactly what t5x's train/eval/infer binaries call (shared/t5x_contract.md):
`FEATURE_CONVERTER_CLS`, `get_initial_variables`, `loss_fn`, `eval_fn`, `predict_batch`,
`predict_batch_with_aux`, `score_batch`, `input_vocabulary`, `output_vocabulary`, `optimizer_def`,
`module`. They never import t5x; the t5x adapter (mmt_jax/t5x/models.py) wraps the same classes and
delegates its loss to them, and both take the loss defaults from `losses.DEFAULT_LOSS`, so our trainer
and t5x's give one loss for one batch. Subclasses change what the encoder sees by overriding `encode`.
"""
from typing import Callable, Mapping

import clu.metrics
import jax
import jax.numpy as jnp
import seqio
from flax import traverse_util

from mmt_jax import decoding
from mmt_jax.data import feature_converter
from mmt_jax.losses import (DEFAULT_LOSS, NUM_REAL_TARGET_TOKENS, LossConfig,  # noqa: F401
                            chunked_cross_entropy, contrastive_loss, cross_entropy_with_logits,
                            same_sequence)

Batch = Mapping[str, jax.Array]
FLOAT_FEATURES = {"encoder_images": jnp.float32, "encoder_image_features": jnp.float32}
IMAGE_FEATURES = ("encoder_images", "encoder_image_features", "encoder_image_mask")
# MoEMoE's also reads its question and further text sources (`MultiSourceConfig.token_features`).
ENCODER_FEATURES = ("encoder_input_tokens", "encoder_segment_ids") + IMAGE_FEATURES
# Read by the contrastive head only (data/feature_converter.py): the text paired with each row's
# image and whether it describes that image (1) or not / there is none (0).
PAIR_FEATURES = ("pair_text_tokens", "pair_label")
NOT_MODULE_INPUTS = ("decoder_loss_weights",) + PAIR_FEATURES
# What every MoE layer sows into `intermediates` (DESIGN.md; t5x contrib/moe reads the same names).
MOE_STATISTICS = ("auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind", "expert_usage",
                  "router_confidence")


def model_class(module) -> type["EncoderDecoderModel"]:
    """The Model class of a module, from its config: `MoeEncoderDecoderModel` when
    `module.config.has_moe` (some layer is a sparse MoE block), else `EncoderDecoderModel`. A
    module without a `config` (a third-party one) is dense."""
    config = getattr(module, "config", None)
    return MoeEncoderDecoderModel if getattr(config, "has_moe", False) else EncoderDecoderModel


def model_for(module, *args, **kwargs) -> "EncoderDecoderModel":
    """`model_class(module)(module, *args, **kwargs)`: the one way to build the Model of a module."""
    return model_class(module)(module, *args, **kwargs)


class EncoderDecoderModel:
    """T5-style encoder-decoder: `module` has `encode(tokens, segment_ids, *, enable_dropout)` and
    `decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, ...)`.

    Args:
      module: the Flax module (e.g. `models.t5.EncoderDecoder`).
      input_vocabulary, output_vocabulary: seqio vocabularies (checked by t5x against the task's).
      optimizer_def: whatever the trainer in use expects (t5x: an `OptimizerDef`); unused here.
      feature_converter_cls: the seqio converter of its batches; default: seqio's
        EncDecFeatureConverter, or the multimodal one when the module has an image branch.
      decode_fn: `decoding.greedy`, `decoding.beam_search` or `decoding.temperature_sample` (other
        keywords bound with functools.partial or gin); `num_decodes` of `predict_batch_with_aux` is
        the beam size or the number of samples.
      label_smoothing, z_loss, loss_normalizing_factor: `losses.LossConfig`; the defaults are
        `losses.DEFAULT_LOSS`'s (no smoothing, z-loss 1e-4, mean over the real target tokens).
      loss_chunk_length: compute the training loss this many target positions at a time
        (`losses.chunked_cross_entropy`: the `[B, Ld, vocab]` logits are never held whole, in the
        forward or the backward pass); None: from the whole logits. The same loss and gradients.
    """

    FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter

    def __init__(self, module, input_vocabulary=None, output_vocabulary=None, optimizer_def=None,
                 feature_converter_cls=None, decode_fn: Callable = decoding.greedy,
                 label_smoothing: float = DEFAULT_LOSS.label_smoothing,
                 z_loss: float = DEFAULT_LOSS.z_loss,
                 loss_normalizing_factor: float | str | None = DEFAULT_LOSS.loss_normalizing_factor,
                 eos_id: int = 1, loss_chunk_length: int | None = None):
        self.module = module
        # A module with an image branch (MMT4) reads images, or stored image features: its batches
        # come from the multimodal converters. t5x reads this instance attribute as it reads its own
        # models' (models.py:386).
        # MoEMoE's come from its own (with the question), with its image encoder's representator.
        sources = getattr(module, "sources", None)
        fusion = (sources.image if sources is not None  # MMT4: its FusionConfig (None: text)
                  else getattr(module, "encoder_input", None))
        if feature_converter_cls is None and fusion is not None:
            stored = fusion.representator == "precomputed"
            feature_converter_cls = (
                feature_converter.multi_source_converter(stored, sources.text_sources[1:])
                if sources is not None else
                feature_converter.MultimodalFeaturesEncDecFeatureConverter if stored else
                feature_converter.MultimodalEncDecFeatureConverter)
        if feature_converter_cls is not None:
            self.FEATURE_CONVERTER_CLS = feature_converter_cls
        self._input_vocabulary = input_vocabulary
        self._output_vocabulary = output_vocabulary
        self.optimizer_def = optimizer_def
        self._decode_fn = decode_fn
        self.loss_config = LossConfig(label_smoothing, z_loss, loss_normalizing_factor)
        self.eos_id = eos_id
        if loss_chunk_length is not None and loss_chunk_length < 1:
            raise ValueError(f"loss_chunk_length={loss_chunk_length}; need at least 1 (or None)")
        self.loss_chunk_length = loss_chunk_length

    @property
    def label_smoothing(self) -> float:
        return self.loss_config.label_smoothing

    @property
    def z_loss(self) -> float:
        return self.loss_config.z_loss

    @property
    def loss_normalizing_factor(self) -> float | str | None:
        return self.loss_config.loss_normalizing_factor

    @property
    def input_vocabulary(self):
        return self._input_vocabulary

    @property
    def output_vocabulary(self):
        return self._output_vocabulary

    # ---- initial variables -------------------------------------------------------------------
    def get_initial_variables(self, rng, input_shapes: Mapping[str, tuple], input_types=None):
        """`params` and `params_axes` for global batch shapes (dtypes: images float32, the rest int32)."""
        input_types = {**FLOAT_FEATURES, **(input_types or {})}
        inputs = {name: jnp.zeros(shape, input_types.get(name, jnp.int32))
                  for name, shape in input_shapes.items()}
        pair_text = inputs.get("pair_text_tokens", jnp.zeros_like(inputs["encoder_input_tokens"]))
        inputs = {k: v for k, v in inputs.items() if k not in NOT_MODULE_INPUTS}
        if getattr(self.module, "contrastive", None) is None:
            return self.module.init(rng, **inputs, enable_dropout=False)

        # training's pass creates the contrastive head's parameters too
        return self.module.init(rng, **inputs, pair_text_tokens=pair_text, enable_dropout=False,
                                method=self.module.forward_with_pairs)

    # ---- forward -----------------------------------------------------------------------------
    def rngs(self, dropout_rng) -> dict | None:
        """The module's rng streams for one step: `dropout` (None outside training)."""
        return None if dropout_rng is None else {"dropout": dropout_rng}

    def _apply(self, params, batch: Batch, dropout_rng=None, mutable=False, other_variables=None,
               **kwargs):
        """The teacher-forced forward pass (`module.apply(...)`'s result); dropout and every other
        training-only randomness (`rngs`) is on iff `dropout_rng` is given; `kwargs` go to the
        module (`output="hidden"`)."""
        inputs = {k: v for k, v in batch.items() if k not in NOT_MODULE_INPUTS}
        return self.module.apply({"params": params, **(other_variables or {})}, **inputs,
                                 enable_dropout=dropout_rng is not None, rngs=self.rngs(dropout_rng),
                                 mutable=mutable, **kwargs)

    def _compute_logits(self, params, batch: Batch, dropout_rng=None):
        """Teacher-forced logits `[B, Ld, vocab]` (float32)."""
        return self._apply(params, batch, dropout_rng)

    # ---- loss --------------------------------------------------------------------------------
    def loss_fn(self, params, batch: Batch, dropout_rng):
        """`(scalar loss, {name: clu Metric})`; dropout is on iff `dropout_rng` is given."""
        expected = model_class(self.module)
        if not isinstance(self, expected):
            raise TypeError(f"{type(self).__name__} does not compute the loss of this module; its "
                            f"Model is {expected.__name__}: build it with model.model_for(module)")
        with_pairs = self.trains_contrastive_head(batch)
        output = self._apply(params, batch, dropout_rng,
                             mutable=["intermediates"] if self.sows_losses else False,
                             output="hidden" if self.loss_chunk_length else "logits",
                             **({"method": self.module.forward_with_pairs,
                                 "pair_text_tokens": batch["pair_text_tokens"]} if with_pairs else {}))
        output, state = output if self.sows_losses else (output, None)
        output, pairs = output if with_pairs else (output, None)
        if self.loss_chunk_length:
            loss, metrics = self.loss_from_hidden(params, output, batch)
        else:
            loss, metrics = self.loss_from_logits(output, batch)
        if state is not None:
            loss, metrics = self.with_sown_losses(loss, metrics, state["intermediates"])
        if pairs is not None:
            loss, metrics = self.with_contrastive_loss(loss, metrics, pairs, batch)
        return loss, metrics

    # ---- losses sown by the module ------------------------------------------------------------
    @property
    def sows_losses(self) -> bool:
        """Whether the module's forward pass sows losses into `intermediates` (MoEMoE's alignment
        losses, `models/moemoe.py`; the MoE subclass adds its layers')."""
        return getattr(self.module, "sources", None) is not None

    def sown_losses(self, intermediates) -> dict[str, tuple[float, jax.Array]]:
        """`{name: (weight, value)}` of the losses in `intermediates`: MoEMoE's alignment losses
        (Eq. 6-7) with their `MultiSourceConfig` weights."""
        sources = getattr(self.module, "sources", None)
        if sources is None:
            return {}
        return {name: (weight, jnp.asarray(intermediates[name][0]))
                for name, weight in sources.alignment_weights().items()}

    def with_sown_losses(self, loss, metrics, intermediates):
        """The cross-entropy loss plus every sown loss times its weight (MoEMoE's Eq. 8:
        `CE + L_QCA + L_QIA + lambda L_aux`), each sown loss also a metric by its name."""
        sown = self.sown_losses(intermediates)
        for weight, value in sown.values():
            loss = loss + weight * value
        average = clu.metrics.Average.from_model_output
        return loss, {**metrics, "loss": average(loss),
                      **{name: average(value) for name, (_, value) in sown.items()}}

    # ---- the contrastive head (models/contrastive.py) -----------------------------------------
    def embed_pairs(self, params, batch: Batch):
        """`(u [B, D], v [B, D], scale [])`: the unit image and paired-text vectors of each row."""
        images = {k: batch[k] for k in IMAGE_FEATURES if batch.get(k) is not None}
        return self.module.apply({"params": params}, batch["pair_text_tokens"], **images,
                                 method=self.module.embed_pairs)

    def score_pairs(self, params, batch: Batch) -> jax.Array:
        """The head's matching score of each row's image and paired text: their cosine `[B]`."""
        image, text, _ = self.embed_pairs(params, batch)
        return jnp.sum(image * text, axis=-1)

    @staticmethod
    def valid_pairs(batch: Batch) -> jax.Array:
        """`[B]` rows that are true image-text pairs: labelled 1, with an image and a text."""
        valid = (jnp.asarray(batch["pair_label"]) > 0) & jnp.any(batch["pair_text_tokens"] > 0, -1)
        if batch.get("encoder_image_mask") is not None:
            mask = jnp.asarray(batch["encoder_image_mask"]) > 0
            valid &= mask if mask.ndim == 1 else jnp.any(mask, axis=-1)
        return valid

    def trains_contrastive_head(self, batch: Batch) -> bool:
        """Whether the loss has the contrastive term: the module has a head with a positive
        weight and the batch has paired texts."""
        config = getattr(self.module, "contrastive", None)
        return bool(config is not None and config.loss_weight and "pair_text_tokens" in batch)

    def with_contrastive_loss(self, loss, metrics, pairs, batch: Batch):
        """`loss + weight * contrastive loss` of `pairs`, the head's `(u, v, scale)` of the batch,
        and the metrics `contrastive/{loss,accuracy,pairs,scale}`."""
        image, text, scale = pairs
        valid = self.valid_pairs(batch)
        pair_loss, accuracy = contrastive_loss(image, text, scale, valid,
                                               same_sequence(batch["pair_text_tokens"]))
        loss = loss + self.module.contrastive.loss_weight * pair_loss
        average = clu.metrics.Average.from_model_output
        return loss, {**metrics, "loss": average(loss), "contrastive/loss": average(pair_loss),
                      "contrastive/accuracy": average(accuracy),
                      "contrastive/pairs": average(jnp.sum(valid.astype(jnp.float32))),
                      "contrastive/scale": average(scale)}

    @staticmethod
    def _targets_and_weights(batch: Batch):
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        return targets, jnp.asarray(weights, jnp.float32)

    def loss_from_logits(self, logits, batch: Batch):
        """The cross-entropy loss (with z-loss and smoothing, normalised per `self.loss_config`) of
        teacher-forced `logits` and its metrics (`token_metrics`)."""
        targets, weights = self._targets_and_weights(batch)
        token_loss, token_z_loss = cross_entropy_with_logits(
            logits, targets, weights, label_smoothing=self.loss_config.label_smoothing,
            z_loss=self.loss_config.z_loss)
        return self.token_metrics(token_loss, token_z_loss, jnp.argmax(logits, -1) == targets,
                                  weights)

    def loss_from_hidden(self, params, hidden, batch: Batch):
        """`loss_from_logits` of the logits of `hidden` (the decoder's states before its output
        layer, `[B, Ld, E]`), made `loss_chunk_length` positions at a time
        (`losses.chunked_cross_entropy`)."""
        targets, weights = self._targets_and_weights(batch)

        def project(states):
            return self.module.apply({"params": params}, states, method=self.module.vocab_logits)
        token_loss, token_z_loss, hits = chunked_cross_entropy(
            project, hidden, targets, weights, chunk_length=self.loss_chunk_length,
            label_smoothing=self.loss_config.label_smoothing, z_loss=self.loss_config.z_loss)
        return self.token_metrics(token_loss, token_z_loss, hits, weights)

    def token_metrics(self, token_loss, token_z_loss, hits, weights):
        """The scalar loss from per-token losses `[B, L]` (weighted), and the metrics `loss`,
        `cross_ent_loss`, `z_loss`, `token_accuracy` (those three per real target token; `hits`
        `[B, L]`: the target is the argmax), `num_tokens`, and `sequence_accuracy`: the share of
        examples whose every target token is the argmax given the reference prefix, which is
        exactly the share that greedy decoding answers word for word (the exact-match accuracy
        users read), over the `num_examples` with a target."""
        num_tokens = jnp.sum(weights)
        loss = jnp.sum(token_loss) / self.loss_config.normalizer(num_tokens)
        correct = hits.astype(jnp.float32) * weights
        per_token = jnp.maximum(num_tokens, 1.0)
        has_target = jnp.any(weights > 0, axis=-1)
        num_examples = jnp.sum(has_target.astype(jnp.float32))
        all_right = jnp.all(hits | (weights <= 0), axis=-1) & has_target
        metrics = {
            "loss": clu.metrics.Average.from_model_output(loss),
            "cross_ent_loss": clu.metrics.Average.from_model_output(
                jnp.sum(token_loss - token_z_loss) / per_token),
            "z_loss": clu.metrics.Average.from_model_output(jnp.sum(token_z_loss) / per_token),
            "token_accuracy": clu.metrics.Average.from_model_output(jnp.sum(correct) / per_token),
            "sequence_accuracy": clu.metrics.Average.from_model_output(
                jnp.sum(all_right.astype(jnp.float32)) / jnp.maximum(num_examples, 1.0)),
            "num_tokens": clu.metrics.Average.from_model_output(num_tokens),
            "num_examples": clu.metrics.Average.from_model_output(num_examples),
        }
        return loss, metrics

    def eval_fn(self, params, batch: Batch):
        return self.loss_fn(params, batch, dropout_rng=None)

    # ---- scoring -----------------------------------------------------------------------------
    def score_batch(self, params, batch: Batch, return_intermediates: bool = False):
        """Per-example log-likelihood `[B]`: `sum_t w_t log p(target_t | ...)`."""
        if return_intermediates:
            raise NotImplementedError("intermediates are not collected by this model")
        logits = self._compute_logits(params, batch)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        targets = batch["decoder_target_tokens"]
        token_log_probs = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), -1)[..., 0]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        return jnp.sum(token_log_probs * jnp.asarray(weights, jnp.float32), axis=-1)

    # ---- decoding ----------------------------------------------------------------------------
    def encode(self, params, batch: Batch):
        """`(encoded [B, Le, E], encoder_mask [B, Le])` for decoding (images first for MMT4)."""
        return self.encode_with_aux(params, batch)[:2]

    def encode_with_aux(self, params, batch: Batch):
        """`encode`'s pair and what decoding reports beside its answers: for MoEMoE
        `source_weights [B, c]`, each source's weight (`models/moemoe.py`, Eq. 4) averaged over the
        positions the decoder reads; else nothing."""
        sources = getattr(self.module, "sources", None)
        keys = ENCODER_FEATURES + (() if sources is None else sources.token_features)
        inputs = {k: batch[k] for k in keys if batch.get(k) is not None}
        if sources is None:
            encoded, mask = self.module.apply({"params": params}, **inputs,
                                              method=self.module.encode_with_mask)
            return encoded, mask, {}
        (encoded, mask), state = self.module.apply({"params": params}, **inputs,
                                                   method=self.module.encode_with_mask,
                                                   mutable=["intermediates"])
        weights = jnp.asarray(state["intermediates"]["source_weights"][0], jnp.float32)
        # the fused positions are the last (without question guidance the question's come first)
        read = mask[:, -weights.shape[1]:, None].astype(jnp.float32)
        mean = jnp.sum(weights * read, axis=1) / jnp.maximum(jnp.sum(read, axis=1), 1.0)
        return encoded, mask, {"source_weights": mean}

    def init_decode_cache(self, params, encoded, encoder_mask, max_decode_length: int):
        """The decoder's `cache` collection for a batch, with the cross-attention projections filled."""
        batch_size = encoded.shape[0]
        _, variables = self.module.apply(
            {"params": params}, encoded, None, jnp.zeros((batch_size, 1), jnp.int32),
            encoder_mask=encoder_mask, decode=True, max_decode_length=max_decode_length,
            method=self.module.decode, mutable=["cache"])
        return variables["cache"]

    def tokens_to_logits_fn(self, params, encoder_mask, max_decode_length: int):
        """One decoder step over the cache: `(tokens [N, 1], cache) -> (logits [N, vocab], cache)`."""
        def tokens_to_logits(tokens, cache):
            logits, variables = self.module.apply(
                {"params": params, "cache": cache}, None, None, tokens, encoder_mask=encoder_mask,
                decode=True, max_decode_length=max_decode_length, method=self.module.decode,
                mutable=["cache"])
            return logits[:, -1, :], variables["cache"]
        return tokens_to_logits

    def predict_batch_with_aux(self, params, batch: Batch, rng=None, decode_fn=None,
                               num_decodes: int = 1, return_all_decodes: bool = False,
                               decoder_params: Mapping | None = None):
        """Decoded tokens `[B, L]` (or `[B, num_decodes, L]`) and `{"scores": ...}` (and MoEMoE's
        `source_weights [B, c]`, `encode_with_aux`).

        `L` is the decoder feature length (`decoder_input_tokens.shape[1]`), as in t5x.
        `decoder_params`: more keywords for the decode function, as in t5x, e.g. `{"constraint":
        value_trie.ValueConstraint}` for closed-set decoding.
        """
        decode_fn = decode_fn or self._decode_fn
        encoded, encoder_mask, aux = self.encode_with_aux(params, batch)
        batch_size, max_length = batch["decoder_input_tokens"].shape
        cache = self.init_decode_cache(params, encoded, encoder_mask, max_length)
        tokens_to_logits = self.tokens_to_logits_fn(
            params, decoding.expand_batch(encoder_mask, num_decodes), max_length)
        tokens, scores = decode_fn(cache, tokens_to_logits, batch_size=batch_size,
                                   max_decode_length=max_length, eos_id=self.eos_id, rng=rng,
                                   num_decodes=num_decodes, **(decoder_params or {}))
        if return_all_decodes:
            return tokens, {"scores": scores, **aux}
        return tokens[:, -1], {"scores": scores[:, -1], **aux}

    def predict_batch(self, params, batch: Batch, rng=None):
        return self.predict_batch_with_aux(params, batch, rng=rng)[0]


class MoeEncoderDecoderModel(EncoderDecoderModel):
    """An encoder-decoder with sparse MoE layers (`module.config.moe`, MoEMoE sec. 4.4).

    Adds to the dense Model:
      - the `router_noise` rng stream (the routers' training noise), derived from the dropout rng
        as `fold_in(dropout_rng, 1)`, so it is folded with the step and microbatch like dropout;
      - the MoE layers' sown losses, each averaged over the MoE layers, weighted by the module's
        `MoeConfig`: `loss = CE + aux_loss_weight * auxiliary_loss + z_loss_weight * router_z_loss`
        (MoEMoE's `CE + lambda L_aux`);
      - the metrics `moe/<statistic>` for every statistic in `MOE_STATISTICS`, and `loss` the total.
    """

    ROUTER_NOISE_FOLD = 1

    def rngs(self, dropout_rng) -> dict | None:
        rngs = super().rngs(dropout_rng)
        if rngs is not None:
            rngs["router_noise"] = jax.random.fold_in(dropout_rng, self.ROUTER_NOISE_FOLD)
        return rngs

    @property
    def moe_config(self):
        return self.module.config.moe

    def moe_statistics(self, intermediates) -> dict[str, jax.Array]:
        """`{statistic: value averaged over the MoE layers}` from the `intermediates` collection;
        raises if a layer sowed none of them (the module has no MoE layer after all)."""
        sown = traverse_util.flatten_dict(intermediates)
        statistics = {}
        for name in MOE_STATISTICS:
            values = [jnp.mean(jnp.asarray(v[0])) for path, v in sown.items() if path[-1] == name]
            if not values:
                raise ValueError(f"the module's MoE layers sowed no {name!r} into intermediates")
            statistics[name] = jnp.mean(jnp.stack(values))
        return statistics

    @property
    def sows_losses(self) -> bool:
        return True

    def sown_losses(self, intermediates) -> dict[str, tuple[float, jax.Array]]:
        """The dense Model's, plus `moe/<statistic>` for every statistic in `MOE_STATISTICS`:
        `auxiliary_loss` weighted by `aux_loss_weight`, `router_z_loss` by `z_loss_weight`, the
        others reported with weight 0."""
        moe = self.moe_config
        weights = {"auxiliary_loss": moe.aux_loss_weight, "router_z_loss": moe.z_loss_weight}
        return {**super().sown_losses(intermediates),
                **{f"moe/{name}": (weights.get(name, 0.0), value)
                   for name, value in self.moe_statistics(intermediates).items()}}
