"""Encoder-input parts (issue 12): the T5 stack takes its encoder input as a part and knows nothing
of images; MMT4's fused part gives segments, per-segment positions and its bias layout; a new
multi-source part (the shape of MoEMoE's front) plugs in without touching the stack."""
import ast
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmt_jax.layers.relative_position import segment_positions
from mmt_jax.models import encoder_inputs, t5
from mmt_jax.models.config import ModelConfig
from mmt_jax.models.encoder_inputs import EncoderInputs, SegmentLayout
from mmt_jax.models.mmt4 import FusedImageTextInput, FusionConfig
from mmt_jax.models.t5 import EncoderDecoder, t5_config

CONFIG = t5_config("tiny", vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                   num_encoder_layers=1, num_decoder_layers=1)
TOKENS = np.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]], np.int32)
DECODER = np.array([[0, 3, 4], [0, 5, 6]], np.int32)
IMAGES = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)


def test_the_t5_stack_knows_no_images():
    source = inspect.getsource(t5)
    imported = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom)}
    assert not any("mmt4" in m or "vision" in m for m in imported), imported
    assert "image" not in source.lower()


def _part_outputs(module, variables, **features):
    """The part's `EncoderInputs`, called as the stack calls it."""
    return module.apply(variables, method=lambda m: m.input_part(m.token_embedder, TOKENS,
                                                                 **features))


def test_fused_part_gives_segments_positions_and_grid():
    module = ModelConfig(CONFIG, FusionConfig(patch_size=4, image_positions="grid")).module()
    variables = module.init(jax.random.key(0), TOKENS, DECODER, encoder_images=IMAGES)
    assert set(variables["params"]) == {"token_embedder", "image_fusion", "encoder", "decoder"}
    mask = np.array([[1, 0]], np.int32).T  # the second example has no image
    out = _part_outputs(module, variables, encoder_images=IMAGES, encoder_image_mask=mask[:, 0])
    assert out.embedded.shape == (2, 4 + 5, 16)
    np.testing.assert_array_equal(out.mask, np.concatenate(
        [np.broadcast_to(mask, (2, 4)), TOKENS > 0], axis=1))
    np.testing.assert_array_equal(out.token_types, [[0] * 4 + [1] * 5])  # [1, L]: same per row
    np.testing.assert_array_equal(out.positions, [[0, 1, 2, 3, 0, 1, 2, 3, 4]])  # Eq. 3
    np.testing.assert_array_equal(out.grid[0, :4], [[0, 0], [0, 1], [1, 0], [1, 1]])
    assert module.encoder_input.bias_layout == SegmentLayout(2, "bucket", grid_segment=0)
    # A text-only batch gives the text segment alone, grid rows included (never read).
    text = _part_outputs(module, variables)
    assert text.embedded.shape == (2, 5, 16) and text.grid.shape == (1, 5, 2)
    module.apply(variables, TOKENS, DECODER)  # and the grid layout encodes it


@pytest.mark.parametrize("cross_segment, positions", [
    ("bucket", [0, 1, 2, 3, 0, 1, 2, 3, 4]), ("zero", [0, 1, 2, 3, 0, 1, 2, 3, 4]),
    ("global", None)])
def test_the_fusion_config_decides_the_bias_layout(cross_segment, positions):
    fusion = FusionConfig(patch_size=4, cross_segment=cross_segment)
    assert fusion.bias_layout == SegmentLayout(2, cross_segment, None)
    module = EncoderDecoder(CONFIG, fusion)  # a FusionConfig is its part's factory
    variables = module.init(jax.random.key(0), TOKENS, DECODER, encoder_images=IMAGES)
    out = _part_outputs(module, variables, encoder_images=IMAGES)
    assert (out.positions is None if positions is None
            else out.positions.tolist() == [positions])
    relpos = set(variables["params"]["encoder"]["relpos_bias"])
    assert ("cross_segment_embedding" in relpos) == (cross_segment == "bucket")


def test_segment_layout_is_validated():
    with pytest.raises(ValueError, match="cross_segment='diagonal'"):
        SegmentLayout(2, "diagonal")
    with pytest.raises(ValueError, match="grid_segment=2 outside 0..1"):
        SegmentLayout(2, grid_segment=2)


def test_text_part_is_the_default_and_rejects_image_features():
    module = EncoderDecoder(CONFIG)
    variables = module.init(jax.random.key(0), TOKENS, DECODER)
    assert set(variables["params"]) == {"token_embedder", "encoder", "decoder"}
    out = _part_outputs(module, variables)
    assert out.token_types is None and out.positions is None and out.grid is None
    np.testing.assert_array_equal(out.mask, TOKENS > 0)
    with pytest.raises(ValueError, match=r"reads encoder_input_tokens only, but the batch also "
                                         r"has \['encoder_images'\]"):
        module.apply(variables, TOKENS, DECODER, encoder_images=IMAGES)
    assert isinstance(encoder_inputs.text_encoder_input(CONFIG), encoder_inputs.TextEncoderInput)


class QuestionContextInput(nn.Module):
    """A toy two-source front: `[question tokens ; context tokens]`, a learned source embedding per
    segment, positions restarting per segment, no bias across segments (the shape of MoEMoE's)."""

    @property
    def bias_layout(self):
        return SegmentLayout(num_segments=2, cross_segment="zero")

    @nn.compact
    def __call__(self, token_embedder, encoder_input_tokens, *, encoder_context_tokens,
                 enable_dropout=False):
        question, context = (jnp.asarray(t, jnp.int32)
                             for t in (encoder_input_tokens, encoder_context_tokens))
        types = jnp.concatenate([jnp.zeros((1, question.shape[1]), jnp.int32),
                                 jnp.ones((1, context.shape[1]), jnp.int32)], axis=1)
        sources = self.param("source_embedding", nn.initializers.normal(1.0),
                             (2, token_embedder.features))
        embedded = token_embedder(jnp.concatenate([question, context], axis=1)) + sources[types]
        return EncoderInputs(embedded, jnp.concatenate([question, context], axis=1) > 0, types,
                             segment_positions(types))


def test_a_multi_source_part_plugs_into_the_stack():
    module = EncoderDecoder(CONFIG, encoder_input=lambda config: QuestionContextInput(
        name="question_context"))
    context = np.array([[11, 12, 13, 0], [14, 0, 0, 0]], np.int32)
    variables = module.init(jax.random.key(0), TOKENS, DECODER, encoder_context_tokens=context)
    params = variables["params"]
    assert params["question_context"]["source_embedding"].shape == (2, 16)
    assert set(params["encoder"]["relpos_bias"]) == {"rel_embedding"}  # "zero": no cross table
    encoded, mask = module.apply(variables, TOKENS, encoder_context_tokens=context,
                                 method=module.encode_with_mask)
    assert encoded.shape == (2, 9, 16)
    np.testing.assert_array_equal(mask, np.concatenate([TOKENS, context], 1) > 0)
    logits = module.apply(variables, TOKENS, DECODER, encoder_context_tokens=context)
    # The encoder and the decoder's cross-attention read the part's mask: more padding changes
    # nothing.
    padded = np.pad(context, ((0, 0), (0, 3)))
    np.testing.assert_allclose(logits, module.apply(variables, TOKENS, DECODER,
                                                    encoder_context_tokens=padded), atol=1e-5)
    changed = module.apply(variables, TOKENS, DECODER, encoder_context_tokens=context + 1)
    assert np.abs(np.asarray(changed) - np.asarray(logits)).max() > 1e-4
    with pytest.raises(ValueError, match="one encoder position per token; this batch's encoder "
                                         "input has 9 positions for 5 tokens"):
        module.apply(variables, TOKENS, DECODER, encoder_context_tokens=context,
                     encoder_segment_ids=(TOKENS > 0).astype(np.int32),
                     decoder_segment_ids=np.ones_like(DECODER))


def test_fused_part_keeps_its_old_name():
    from mmt_jax.models import mmt4
    assert mmt4.ImageFusion is FusedImageTextInput
