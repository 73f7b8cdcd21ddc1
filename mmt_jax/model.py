"""The Model: loss, initial variables, decoding and scoring around a Flax module (t5x's model protocol).

`EncoderDecoderModel` exposes exactly what t5x's train/eval/infer binaries call (shared/t5x_contract.md):
`FEATURE_CONVERTER_CLS`, `get_initial_variables`, `loss_fn`, `eval_fn`, `predict_batch`,
`predict_batch_with_aux`, `score_batch`, `input_vocabulary`, `output_vocabulary`, `optimizer_def`,
`module`. It never imports t5x. Subclasses change what the encoder sees by overriding `encode`.
"""
from typing import Any, Callable, Mapping

import clu.metrics
import jax
import jax.numpy as jnp
import seqio
from flax import traverse_util

from mmt_jax import decoding
from mmt_jax.losses import cross_entropy_with_logits

Batch = Mapping[str, jax.Array]
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
FLOAT_FEATURES = {"encoder_images": jnp.float32, "encoder_image_features": jnp.float32}
ENCODER_FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_images",
                    "encoder_image_features", "encoder_image_mask")


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
      label_smoothing, z_loss: see `losses.cross_entropy_with_logits`.
      loss_normalizing_factor: divide the summed token loss by this constant, or by the number of
        real target tokens when `"NUM_REAL_TARGET_TOKENS"` (the default), or not at all when None.
    """

    FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter

    def __init__(self, module, input_vocabulary=None, output_vocabulary=None, optimizer_def=None,
                 feature_converter_cls=None,
                 decode_fn: Callable = decoding.greedy, label_smoothing: float = 0.0,
                 z_loss: float = 1e-4, loss_normalizing_factor: Any = NUM_REAL_TARGET_TOKENS,
                 eos_id: int = 1):
        self.module = module
        # A module with an image branch (MMT4) reads images, or stored image features: its batches
        # come from the multimodal converters. t5x reads this instance attribute as it reads its own
        # models' (models.py:386).
        fusion = getattr(module, "encoder_input", None)
        if feature_converter_cls is None and fusion is not None:
            from mmt_jax.data import feature_converter
            feature_converter_cls = (
                feature_converter.MultimodalFeaturesEncDecFeatureConverter
                if fusion.representator == "precomputed"
                else feature_converter.MultimodalEncDecFeatureConverter)
        if feature_converter_cls is not None:
            self.FEATURE_CONVERTER_CLS = feature_converter_cls
        self._input_vocabulary = input_vocabulary
        self._output_vocabulary = output_vocabulary
        self.optimizer_def = optimizer_def
        self._decode_fn = decode_fn
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.loss_normalizing_factor = loss_normalizing_factor
        self.eos_id = eos_id

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
        inputs.pop("decoder_loss_weights", None)
        return self.module.init(rng, **inputs, enable_dropout=False)

    # ---- forward -----------------------------------------------------------------------------
    def _compute_logits(self, params, batch: Batch, dropout_rng=None):
        """Teacher-forced logits `[B, Ld, vocab]` (float32)."""
        return self._forward(params, batch, dropout_rng)[0]

    def _forward(self, params, batch: Batch, dropout_rng=None):
        """`(logits, moe_statistics)`: the MoE layers' sown statistics, each averaged over the MoE
        layers ({} for a dense model). In training the router noise has its own rng stream, derived
        from the dropout rng (so it is folded with the step like dropout)."""
        rngs = None
        if dropout_rng is not None:
            rngs = {"dropout": dropout_rng, "router_noise": jax.random.fold_in(dropout_rng, 1)}
        inputs = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
        config = getattr(self.module, "config", None)
        if not getattr(config, "has_moe", False):
            return self.module.apply({"params": params}, **inputs, enable_dropout=rngs is not None,
                                     rngs=rngs), {}
        logits, state = self.module.apply({"params": params}, **inputs,
                                          enable_dropout=rngs is not None, rngs=rngs,
                                          mutable=["intermediates"])
        sown = traverse_util.flatten_dict(state["intermediates"])
        names = sorted({path[-1] for path in sown})
        return logits, {name: jnp.mean(jnp.stack([jnp.mean(jnp.asarray(v[0])) for path, v in
                                                  sown.items() if path[-1] == name]))
                        for name in names}

    def loss_fn(self, params, batch: Batch, dropout_rng):
        """`(scalar loss, {name: clu Metric})`; dropout is on iff `dropout_rng` is given.

        With MoE layers the loss adds `aux_loss_weight * L_aux + z_loss_weight * L_z` (MoEMoE's
        `CE + lambda L_aux`, the losses averaged over MoE layers) and the metrics `moe/<statistic>`.
        """
        logits, moe_statistics = self._forward(params, batch, dropout_rng)
        loss, metrics = self._loss_and_metrics(logits, batch)
        if moe_statistics:
            moe = self.module.config.moe
            loss = (loss + moe.aux_loss_weight * moe_statistics["auxiliary_loss"]
                    + moe.z_loss_weight * moe_statistics["router_z_loss"])
            metrics = {**metrics, "loss": clu.metrics.Average.from_model_output(loss),
                       **{f"moe/{name}": clu.metrics.Average.from_model_output(value)
                          for name, value in moe_statistics.items()}}
        return loss, metrics

    def _loss_and_metrics(self, logits, batch: Batch):
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        weights = jnp.asarray(weights, jnp.float32)
        token_loss, token_z_loss = cross_entropy_with_logits(
            logits, targets, weights, label_smoothing=self.label_smoothing, z_loss=self.z_loss)
        num_tokens = jnp.sum(weights)
        if self.loss_normalizing_factor == NUM_REAL_TARGET_TOKENS:
            normalizer = jnp.maximum(num_tokens, 1.0)
        elif self.loss_normalizing_factor is None:
            normalizer = 1.0
        else:
            normalizer = float(self.loss_normalizing_factor)
        loss = jnp.sum(token_loss) / normalizer
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * weights
        metrics = {
            "loss": clu.metrics.Average.from_model_output(loss),
            "cross_ent_loss": clu.metrics.Average.from_model_output(
                jnp.sum(token_loss - token_z_loss) / jnp.maximum(num_tokens, 1.0)),
            "z_loss": clu.metrics.Average.from_model_output(
                jnp.sum(token_z_loss) / jnp.maximum(num_tokens, 1.0)),
            "accuracy": clu.metrics.Average.from_model_output(
                jnp.sum(correct) / jnp.maximum(num_tokens, 1.0)),
            "num_tokens": clu.metrics.Average.from_model_output(num_tokens),
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
        inputs = {k: batch[k] for k in ENCODER_FEATURES if batch.get(k) is not None}
        return self.module.apply({"params": params}, **inputs, method=self.module.encode_with_mask)

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
                               num_decodes: int = 1, return_all_decodes: bool = False):
        """Decoded tokens `[B, L]` (or `[B, num_decodes, L]`) and `{"scores": ...}`.

        `L` is the decoder feature length (`decoder_input_tokens.shape[1]`), as in t5x.
        """
        decode_fn = decode_fn or self._decode_fn
        encoded, encoder_mask = self.encode(params, batch)
        batch_size, max_length = batch["decoder_input_tokens"].shape
        cache = self.init_decode_cache(params, encoded, encoder_mask, max_length)
        tokens_to_logits = self.tokens_to_logits_fn(
            params, decoding.expand_batch(encoder_mask, num_decodes), max_length)
        tokens, scores = decode_fn(cache, tokens_to_logits, batch_size=batch_size,
                                   max_decode_length=max_length, eos_id=self.eos_id, rng=rng,
                                   num_decodes=num_decodes)
        if return_all_decodes:
            return tokens, {"scores": scores}
        return tokens[:, -1], {"scores": scores[:, -1]}

    def predict_batch(self, params, batch: Batch, rng=None):
        return self.predict_batch_with_aux(params, batch, rng=rng)[0]
