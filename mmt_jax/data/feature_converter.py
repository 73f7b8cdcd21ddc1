"""The multimodal feature converter: task examples -> the batch dict of shared/DESIGN.md.

Task features (after `images.preprocess_images`):
  inputs      int32 [Li]        text tokens (prompt, title ...) ending in EOS
  targets     int32 [Lt]
  image       float32 [S, S, 3] normalised pixels (zeros without an image)
  image_mask  int32 [1]         1 if the product has an image (rank 1: seqio's evaluator measures
                                a length along every task feature)
  pair_text   int32 [Lp]        the text paired with the image, for the contrastive head
  pair_label  int32 [1]         1 if pair_text describes the image (data/prompts.py); a task
                                without the two gets an empty text labelled 0 (no pair)

Model features, for a batch of B:
  encoder_input_tokens  [B, Li]        decoder_input_tokens   [B, Lt]  (targets shifted right, BOS 0)
  encoder_images        [B, S, S, 3]   decoder_target_tokens  [B, Lt]
  encoder_image_mask    [B]            decoder_loss_weights   [B, Lt]  (1 on real target tokens)
  pair_text_tokens      [B, Lp]        pair_label             [B]

`MultimodalFeaturesEncDecFeatureConverter` is the same with stored features in place of pixels
(`representator="precomputed"`): task `image_features` float32 `[Lv, D]` -> `encoder_image_features`
`[B, Lv, D]`.

`TASK_FEATURE_LENGTHS` needs only `inputs` and `targets`, as for a text task; the image side is taken
from the examples' static shape, and `pair_text` is as long as `inputs` unless given its own length. MoEMoE's converters (`MultiSource...`) also read the task feature `question` and pad it to the
length of `inputs` (the context) as `encoder_question_tokens [B, Li]`: the model weighs its sources
position by position (`models/moemoe.py`).

Packing is refused: packing would put several products' images into
one row, which the fused encoder (one image per row, Eq. 2 of the MMT4 paper) does not model, so t5x
runs must set `DatasetConfig.pack = False`.
"""
import functools
from typing import Mapping

import seqio
import tensorflow as tf

FeatureSpec = seqio.FeatureConverter.FeatureSpec


def _with_image(task_feature: str, model_feature: str, rank: int):
    """(TASK_FEATURES, MODEL_FEATURES) of seqio's converter plus one image input, its mask and the
    contrastive pair."""
    return ({**seqio.EncDecFeatureConverter.TASK_FEATURES,
             task_feature: FeatureSpec(dtype=tf.float32, rank=rank),
             "image_mask": FeatureSpec(dtype=tf.int32, rank=1),
             "pair_text": FeatureSpec(dtype=tf.int32, rank=1),
             "pair_label": FeatureSpec(dtype=tf.int32, rank=1)},
            {**seqio.EncDecFeatureConverter.MODEL_FEATURES,
             model_feature: FeatureSpec(dtype=tf.float32, rank=rank),
             "encoder_image_mask": FeatureSpec(dtype=tf.int32, rank=0),
             "pair_text_tokens": FeatureSpec(dtype=tf.int32, rank=1),
             "pair_label": FeatureSpec(dtype=tf.int32, rank=0)})


def _cut_keeping_last(tokens: tf.Tensor, length: int) -> tf.Tensor:
    """`tokens` `[n]` cut to `length` as seqio's `append_eos_after_trim` cuts: the first
    `length - 1` and the last (the EOS the task appended)."""
    return tf.cond(tf.size(tokens) > length,
                   lambda: tf.concat([tokens[:length - 1], tokens[-1:]], 0), lambda: tokens)


def _without_pair(example):
    return {**example, "pair_text": tf.zeros([0], tf.int32), "pair_label": tf.zeros([1], tf.int32)}


class MultimodalEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """seqio.EncDecFeatureConverter plus one image per example; constructible as t5x does it."""

    IMAGE_FEATURE, MODEL_IMAGE_FEATURE, IMAGE_RANK = "image", "encoder_images", 3
    TASK_FEATURES, MODEL_FEATURES = _with_image(IMAGE_FEATURE, MODEL_IMAGE_FEATURE, IMAGE_RANK)
    QUESTION = False  # MoEMoE's: also `question` -> `encoder_question_tokens`
    TEXT_SOURCES: tuple[str, ...] = ()  # MoEMoE's further text sources: `name` -> `encoder_<name>_tokens`

    def __init__(self, pack: bool = False, use_custom_packing_ops: bool = False, **kwargs):
        if pack:
            raise ValueError(
                "MultimodalEncDecFeatureConverter cannot pack: each row holds one product's image, "
                "and packing would put several images into one encoder row. Run with pack=False "
                "(under t5x: `train/utils.DatasetConfig.pack = False`).")
        super().__init__(pack=False, use_custom_packing_ops=use_custom_packing_ops, **kwargs)

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        name = self.IMAGE_FEATURE
        image_shape = ds.element_spec[name].shape if name in ds.element_spec else None
        if image_shape is None or not image_shape.is_fully_defined():
            raise ValueError(
                f"the dataset needs an `{name}` feature of static shape (add "
                f"images.preprocess_images to the task's preprocessors, with the preprocessing the "
                f"model was built for); got {image_shape}")
        lengths = {name: image_shape[0], "image_mask": 1, "pair_label": 1,
                   "pair_text": task_feature_lengths["inputs"], **task_feature_lengths,
                   **{key: task_feature_lengths["inputs"] for key in self._aligned_texts()}}
        if "pair_text" in ds.element_spec:  # a title longer than the inputs is cut as they are
            ds = ds.map(lambda ex: {**ex, "pair_text": ex["pair_text"][:lengths["pair_text"]]})
        else:
            ds = ds.map(_without_pair)
        if self._aligned_texts():  # cut as seqio cuts `inputs`, keeping the final EOS
            ds = ds.map(lambda ex: {**ex, **{key: _cut_keeping_last(ex[key], lengths[key])
                                             for key in self._aligned_texts()}})
        return super().__call__(ds, lengths)

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        text_lengths = {k: task_feature_lengths[k] for k in
                        ("inputs", "targets", "pair_text", *self._aligned_texts())}
        ds = self._pack_or_pad(ds, text_lengths)

        def convert(features):
            converted = dict(self._convert_example(features))
            converted[self.MODEL_IMAGE_FEATURE] = features[self.IMAGE_FEATURE]
            converted["encoder_image_mask"] = features["image_mask"][0]
            converted["pair_text_tokens"] = features["pair_text"]
            converted["pair_label"] = features["pair_label"][0]
            for key in self._aligned_texts():
                converted[f"encoder_{key}_tokens"] = features[key]
            return converted

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        return {**super().get_model_feature_lengths(task_feature_lengths),
                self.MODEL_IMAGE_FEATURE: task_feature_lengths[self.IMAGE_FEATURE],
                "encoder_image_mask": 0,
                "pair_text_tokens": task_feature_lengths.get("pair_text",
                                                             task_feature_lengths["inputs"]),
                "pair_label": 0,
                **{f"encoder_{key}_tokens": task_feature_lengths["inputs"]
                   for key in self._aligned_texts()}}

    def _aligned_texts(self) -> tuple[str, ...]:
        """The task features padded to the length of `inputs`: MoEMoE's question and further text
        sources."""
        return ("question",) * self.QUESTION + self.TEXT_SOURCES


class MultimodalFeaturesEncDecFeatureConverter(MultimodalEncDecFeatureConverter):
    """The same with the catalog's stored image features (`representator="precomputed"`)."""

    IMAGE_FEATURE, MODEL_IMAGE_FEATURE, IMAGE_RANK = "image_features", "encoder_image_features", 2
    TASK_FEATURES, MODEL_FEATURES = _with_image(IMAGE_FEATURE, MODEL_IMAGE_FEATURE, IMAGE_RANK)


@functools.cache
def multi_source_converter(stored_features: bool, text_sources: tuple[str, ...] = ()) -> type:
    """MoEMoE's converter: the multimodal one (pixels, or `stored_features`) that also reads the
    question and the further `text_sources` (`MultiSourceConfig.text_sources[1:]`); one class per
    arguments, so a Model's `FEATURE_CONVERTER_CLS` compares equal to another's of the same sources."""
    base = (MultimodalFeaturesEncDecFeatureConverter if stored_features
            else MultimodalEncDecFeatureConverter)
    texts = ("question", *text_sources)
    return type(
        f"MultiSource{'Features' if stored_features else ''}EncDecFeatureConverter", (base,),
        {"__doc__": f"MoEMoE's batches: question, {', '.join(('inputs',) + text_sources)} and the "
                    f"image ({'stored features' if stored_features else 'pixels'}).",
         "QUESTION": True, "TEXT_SOURCES": tuple(text_sources),
         "TASK_FEATURES": {**base.TASK_FEATURES,
                           **{key: FeatureSpec(dtype=tf.int32) for key in texts}},
         "MODEL_FEATURES": {**base.MODEL_FEATURES,
                            **{f"encoder_{key}_tokens": FeatureSpec(dtype=tf.int32)
                               for key in texts}}})
