"""t5x's `EncoderDecoderModel` over an mmt_jax module (T5, MMT4, MoE, MoEMoE), built from the same
`ModelConfig` our trainer builds from (`model_from_config`), and Adafactor factor rules for
mmt_jax's logical axis names. Imports t5x: see the package docstring.

The adapter subclasses t5x's EncoderDecoderModel (t5x's binaries check `isinstance(model,
BaseTransformerModel)` before verifying vocabularies, and its scoring with intermediates lives there)
but computes nothing of its own that our Model computes: it holds `mmt_jax.model.model_for(module)`
(the dense or the MoE Model, chosen from the module's config) and delegates to it

  - the loss and metrics (`loss_fn`, `eval_fn`): our Model's, so the same parameters and batch give
    the same loss under t5x's trainer as under ours, MoE losses and `moe/*` metrics included; the
    defaults (label smoothing, z-loss, normalisation) are `mmt_jax.losses.DEFAULT_LOSS`'s;
  - the forward pass and its rng streams (`_compute_logits`, used by t5x's `score_batch`);
  - initialisation and decoding: t5x's own `encode` sees only the text tokens and derives the
    cross-attention mask from them, which has the wrong length once image vectors lead the encoder
    sequence (shared/t5x_contract.md (a)).
"""
from flax.core import freeze
from t5x import adafactor
from t5x import models as t5x_models

from mmt_jax import model as mmt_model
from mmt_jax import task_inference
from mmt_jax.models.config import ModelConfig

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
    "contrastive": adafactor.FactorDim.COLUMN,     # the contrastive head's [embed, contrastive]
    "alignment": adafactor.FactorDim.COLUMN,       # MoEMoE's Eq. 6-7 projections [embed, alignment]
    "sources": adafactor.FactorDim.NONE,           # MoEMoE's FC(Q) [embed, sources] (Eq. 4)
    "image_vectors": adafactor.FactorDim.NONE,     # MoEMoE's learned resampling [Lv, k]
}


def logical_factor_rules():
    """t5x Adafactor's `logical_factor_rules` for mmt_jax models (gin: `adafactor.Adafactor.
    logical_factor_rules = @mmt_t5x.logical_factor_rules()`)."""
    return freeze({**adafactor.standard_logical_factor_rules(), **_EXTRA_FACTOR_RULES})


def model_from_config(model_config: ModelConfig, optimizer_def, **kwargs) -> "EncoderDecoderModel":
    """t5x's MODEL for `model_config`, the config `mmt-jax train` builds from (`models/*.gin`), with
    its vocabulary; `kwargs` are our Model's (decode_fn, label_smoothing, z_loss ...)."""
    vocabulary = task_inference.model_vocabulary(model_config)
    return EncoderDecoderModel(model_config.module(), vocabulary, vocabulary, optimizer_def, **kwargs)


class EncoderDecoderModel(t5x_models.EncoderDecoderModel):
    """t5x's model protocol over `module` (`models.t5.EncoderDecoder`, with or without fusion, MoE
    or MoEMoE's sources).

    `kwargs` are our Model's (`mmt_jax.model.EncoderDecoderModel`) and default as ours do: greedy
    decoding (`decode_fn`: one of `mmt_jax.decoding`'s, whose signature differs from t5x's decoding
    functions) and `mmt_jax.losses.DEFAULT_LOSS`, not t5x's defaults.
    """

    def __init__(self, module, input_vocabulary, output_vocabulary, optimizer_def, **kwargs):
        self._mmt = mmt_model.model_for(module, input_vocabulary, output_vocabulary, optimizer_def,
                                        **kwargs)
        # t5x keeps the loss options as attributes; they mirror ours and t5x's loss is never used.
        loss = self._mmt.loss_config
        super().__init__(module, input_vocabulary, output_vocabulary, optimizer_def,
                         feature_converter_cls=self._mmt.FEATURE_CONVERTER_CLS,
                         label_smoothing=loss.label_smoothing, z_loss=loss.z_loss,
                         loss_normalizing_factor=loss.loss_normalizing_factor)

    @property
    def mmt_model(self) -> mmt_model.EncoderDecoderModel:
        """Our Model that this adapter delegates to."""
        return self._mmt

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        return self._mmt.get_initial_variables(rng, input_shapes, input_types)

    def loss_fn(self, params, batch, dropout_rng):
        return self._mmt.loss_fn(params, batch, dropout_rng)

    def eval_fn(self, params, batch):
        return self._mmt.eval_fn(params, batch)

    def _compute_logits(self, params, batch, dropout_rng=None, mutable=False, other_variables=None):
        return self._mmt._apply(params, batch, dropout_rng, mutable=mutable,
                                other_variables=other_variables)

    def predict_batch_with_aux(self, params, batch, rng=None, decoder_params=None,
                               return_all_decodes: bool = False, num_decodes: int = 1,
                               prompt_with_targets: bool = False):
        if prompt_with_targets:
            raise ValueError("prompt_with_targets is a t5x decoding option; bind the mmt_jax "
                             "decode_fn's own (e.g. decoding.beam_search.alpha) in gin")
        # decoder_params: keywords of the mmt_jax decode function, as t5x passes its own's (e.g.
        # {"constraint": value_trie.ValueConstraint} for closed-set decoding)
        return self._mmt.predict_batch_with_aux(
            params, batch, rng=rng, num_decodes=num_decodes or 1,
            return_all_decodes=bool(return_all_decodes), decoder_params=decoder_params)
