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


def _without_pair(example):
    return {**example, "pair_text": tf.zeros([0], tf.int32), "pair_label": tf.zeros([1], tf.int32)}


class MultimodalEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """seqio.EncDecFeatureConverter plus one image per example; constructible as t5x does it."""

    IMAGE_FEATURE, MODEL_IMAGE_FEATURE, IMAGE_RANK = "image", "encoder_images", 3
    TASK_FEATURES, MODEL_FEATURES = _with_image(IMAGE_FEATURE, MODEL_IMAGE_FEATURE, IMAGE_RANK)
    QUESTION = False  # MoEMoE's: also `question` -> `encoder_question_tokens`

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
                   **({"question": task_feature_lengths["inputs"]} if self.QUESTION else {})}
        if "pair_text" in ds.element_spec:  # a title longer than the inputs is cut as they are
            ds = ds.map(lambda ex: {**ex, "pair_text": ex["pair_text"][:lengths["pair_text"]]})
        else:
            ds = ds.map(_without_pair)
        return super().__call__(ds, lengths)

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        text_lengths = {k: task_feature_lengths[k] for k in
                        ("inputs", "targets", "pair_text", *(("question",) if self.QUESTION else ()))}
        ds = self._pack_or_pad(ds, text_lengths)

        def convert(features):
            converted = dict(self._convert_example(features))
            converted[self.MODEL_IMAGE_FEATURE] = features[self.IMAGE_FEATURE]
            converted["encoder_image_mask"] = features["image_mask"][0]
            converted["pair_text_tokens"] = features["pair_text"]
            converted["pair_label"] = features["pair_label"][0]
            if self.QUESTION:
                converted["encoder_question_tokens"] = features["question"]
            return converted

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        return {**super().get_model_feature_lengths(task_feature_lengths),
                self.MODEL_IMAGE_FEATURE: task_feature_lengths[self.IMAGE_FEATURE],
                "encoder_image_mask": 0,
                "pair_text_tokens": task_feature_lengths.get("pair_text",
                                                             task_feature_lengths["inputs"]),
                "pair_label": 0,
                **({"encoder_question_tokens": task_feature_lengths["inputs"]}
                   if self.QUESTION else {})}


class MultimodalFeaturesEncDecFeatureConverter(MultimodalEncDecFeatureConverter):
    """The same with the catalog's stored image features (`representator="precomputed"`)."""

    IMAGE_FEATURE, MODEL_IMAGE_FEATURE, IMAGE_RANK = "image_features", "encoder_image_features", 2
    TASK_FEATURES, MODEL_FEATURES = _with_image(IMAGE_FEATURE, MODEL_IMAGE_FEATURE, IMAGE_RANK)


def _with_question(base: type) -> dict:
    """The class attributes of MoEMoE's twin of the converter `base`."""
    return {"QUESTION": True,
            "TASK_FEATURES": {**base.TASK_FEATURES, "question": FeatureSpec(dtype=tf.int32)},
            "MODEL_FEATURES": {**base.MODEL_FEATURES,
                               "encoder_question_tokens": FeatureSpec(dtype=tf.int32)}}


MultiSourceEncDecFeatureConverter = type(
    "MultiSourceEncDecFeatureConverter", (MultimodalEncDecFeatureConverter,),
    {"__doc__": "MoEMoE's batches from pixels: question, context (`inputs`) and image.",
     **_with_question(MultimodalEncDecFeatureConverter)})
MultiSourceFeaturesEncDecFeatureConverter = type(
    "MultiSourceFeaturesEncDecFeatureConverter", (MultimodalFeaturesEncDecFeatureConverter,),
    {"__doc__": "MoEMoE's batches from stored image features: question, context and image.",
     **_with_question(MultimodalFeaturesEncDecFeatureConverter)})
