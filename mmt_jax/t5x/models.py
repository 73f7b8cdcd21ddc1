"""t5x's `EncoderDecoderModel` over an mmt_jax module (T5 or MMT4), and Adafactor factor rules for
mmt_jax's logical axis names. Imports t5x: see the package docstring.

t5x's own EncoderDecoderModel cannot drive MMT4 unchanged (shared/t5x_contract.md (a)): its
`encode` sees only the text tokens and it derives the cross-attention mask from them, which has the
wrong length once image vectors lead the encoder sequence. So this subclass keeps t5x's loss,
metrics and scoring (they go through `_compute_logits`) and takes initialisation and decoding from
mmt_jax's Model, which knows the image branch.
"""
from typing import Any, Callable

from flax.core import freeze
from t5x import adafactor
from t5x import models as t5x_models

from mmt_jax import decoding
from mmt_jax import model as mmt_model

# mmt_jax's parameter axes beyond t5x's standard ones (partitioning.standard_logical_axis_rules).
_EXTRA_FACTOR_RULES = {
    "image_features": adafactor.FactorDim.COLUMN,  # [image_features, embed] projection (Eq. 1)
    "segments": adafactor.FactorDim.NONE,          # token-type embeddings [segments, embed]
    "abspos_buckets": adafactor.FactorDim.NONE,    # ViT position embeddings
    "unmodeled": adafactor.FactorDim.NONE,
    "conv_height": adafactor.FactorDim.NONE,       # CNN representator kernels [h, w, in, out]
    "conv_width": adafactor.FactorDim.NONE,
    "conv_in": adafactor.FactorDim.ROW,
    "conv_out": adafactor.FactorDim.COLUMN,
    "expert": adafactor.FactorDim.BATCH,           # MoE experts, as t5x contrib/moe factors them
    "expert_mlp": adafactor.FactorDim.COLUMN,
}


def logical_factor_rules():
    """t5x Adafactor's `logical_factor_rules` for mmt_jax models (gin: `adafactor.Adafactor.
    logical_factor_rules = @mmt_t5x.logical_factor_rules()`)."""
    return freeze({**adafactor.standard_logical_factor_rules(), **_EXTRA_FACTOR_RULES})


class EncoderDecoderModel(t5x_models.EncoderDecoderModel):
    """t5x's model protocol over `module` (`models.t5.EncoderDecoder`, with or without fusion).

    Args beyond t5x's: `decode_fn` is one of `mmt_jax.decoding`'s (greedy, beam_search,
    temperature_sample), whose signature differs from t5x's decoding functions.
    """

    def __init__(self, module, input_vocabulary, output_vocabulary, optimizer_def,
                 decode_fn: Callable = decoding.beam_search, feature_converter_cls=None,
                 label_smoothing: float = 0.0, z_loss: float = 0.0,
                 loss_normalizing_factor: Any = None):
        self._mmt = mmt_model.EncoderDecoderModel(
            module, input_vocabulary, output_vocabulary, optimizer_def,
            feature_converter_cls=feature_converter_cls, decode_fn=decode_fn)
        super().__init__(module, input_vocabulary, output_vocabulary, optimizer_def,
                         feature_converter_cls=self._mmt.FEATURE_CONVERTER_CLS,
                         label_smoothing=label_smoothing, z_loss=z_loss,
                         loss_normalizing_factor=loss_normalizing_factor)

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        return self._mmt.get_initial_variables(rng, input_shapes, input_types)

    def _compute_logits(self, params, batch, dropout_rng=None, mutable=False, other_variables=None):
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        inputs = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
        return self.module.apply({"params": params, **(other_variables or {})}, **inputs,
                                 enable_dropout=rngs is not None, rngs=rngs, mutable=mutable)

    def predict_batch_with_aux(self, params, batch, rng=None, decoder_params=None,
                               return_all_decodes: bool = False, num_decodes: int = 1,
                               prompt_with_targets: bool = False):
        if decoder_params or prompt_with_targets:
            raise ValueError("decoder_params and prompt_with_targets are t5x decoding options; bind "
                             "the mmt_jax decode_fn's own (e.g. decoding.beam_search.alpha) in gin")
        return self._mmt.predict_batch_with_aux(
            params, batch, rng=rng, num_decodes=num_decodes or 1,
            return_all_decodes=bool(return_all_decodes))
