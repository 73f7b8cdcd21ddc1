"""Encoder-input parts: what turns a batch's encoder-side features into the sequence the T5 encoder
reads. The T5 stack (`models/t5.py`) takes its part as a field and knows nothing of what the features
are; a family adds a front by adding a part, not by editing the stack.

A part is a Flax module built by a factory from the stack's `T5Config` (`factory(config) -> part`; the
part's parameters live under the module's own name in the tree) and called as

    part(token_embedder, encoder_input_tokens [B, Lt], *, enable_dropout=False, **features)
        -> EncoderInputs(embedded [B, L, E], mask [B, L], token_types, positions, grid)

`token_embedder` is the stack's shared `Embed` (also the decoder's), `features` the batch's other
encoder-side features by their batch keys (a part rejects a key it does not read). `part.bias_layout`
(a `SegmentLayout`) says how the encoder's relative position bias treats the part's segments; it is
fixed when the model is built, the arrays of `EncoderInputs` come per batch.

Parts: `TextEncoderInput` (T5: the tokens alone, one segment) here; `FusedImageTextInput` (MMT4, Eq.
1-3: `[image vectors ; text tokens]`, two segments) in `models/mmt4.py`.
"""
import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmt_jax.layers.relative_position import CROSS_SEGMENT_OPTIONS


@dataclasses.dataclass(frozen=True)
class SegmentLayout:
    """How the encoder's relative position bias (`RelativePositionBias`) treats segments.

    num_segments: how many token types the part's `token_types` take (1: T5, no per-segment bias).
    cross_segment: the bias between positions of different segments ("bucket", "zero" or "global").
    grid_segment: the segment whose pairs get 2-D (row, column) bias from `grid`; None: no grid.
    """

    num_segments: int = 1
    cross_segment: str = "bucket"
    grid_segment: int | None = None

    def __post_init__(self):
        if self.num_segments < 1:
            raise ValueError(f"num_segments={self.num_segments}; need at least 1")
        if self.cross_segment not in CROSS_SEGMENT_OPTIONS:
            raise ValueError(f"cross_segment={self.cross_segment!r}; choose from {CROSS_SEGMENT_OPTIONS}")
        if self.grid_segment is not None and not 0 <= self.grid_segment < self.num_segments:
            raise ValueError(f"grid_segment={self.grid_segment} outside 0..{self.num_segments - 1}")


class EncoderInputs(NamedTuple):
    """A part's output: the encoder sequence and what its attention mask and position bias need.

    embedded:    `[B, L, E]` the sequence the encoder layers read.
    mask:        `[B, L]` bool, True at real positions (padding, absent images: False); also the key
                 mask of the decoder's cross-attention.
    token_types: `[B|1, L]` int segment of each position in `[0, layout.num_segments)`; None: one
                 segment.
    positions:   `[B|1, L]` int position of each element for the relative position bias (per segment:
                 restarting at 0 in each, MMT4 Eq. 3); None: `0..L-1`.
    grid:        `[B|1, L, 2]` int (row, column), read only for pairs inside `layout.grid_segment`;
                 None when the layout has no grid segment.
    """

    embedded: jax.Array
    mask: jax.Array
    token_types: jax.Array | None = None
    positions: jax.Array | None = None
    grid: jax.Array | None = None


# factory(T5Config) -> an encoder-input part (a Flax module with `bias_layout` and the call above).
EncoderInputFactory = Callable[[Any], nn.Module]


def reject_unread(part: str, features: dict) -> None:
    """A clear error for batch features that `part` does not read (a model/batch mismatch)."""
    unread = sorted(name for name, value in features.items() if value is not None)
    if unread:
        raise ValueError(f"this model's encoder input ({part}) reads encoder_input_tokens only, "
                         f"but the batch also has {unread}")


class TextEncoderInput(nn.Module):
    """T5's encoder input: the embedded tokens, padding (id 0) masked, one segment. No parameters."""

    @property
    def bias_layout(self) -> SegmentLayout:
        return SegmentLayout()

    def __call__(self, token_embedder: nn.Module, encoder_input_tokens: jax.Array, *,
                 enable_dropout: bool = False, **features) -> EncoderInputs:
        del enable_dropout
        reject_unread("text", features)
        tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
        return EncoderInputs(token_embedder(tokens), tokens > 0)


def text_encoder_input(config: Any) -> TextEncoderInput:
    """The default factory: the text-only part (T5)."""
    del config
    return TextEncoderInput()
