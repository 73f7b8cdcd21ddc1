"""Image preprocessing in the input pipeline: decode, resize, normalise, optionally augment.

The stored image is encoded bytes (`tfds_catalog.FEATURES["image"]`, b"" for a product without one);
the model gets `image` float32 `[size, size, 3]` and `image_mask` int32 `[1]` (0 when there was no
image; rank 1 because seqio's evaluator measures a length along every task feature; the pixels are
then zeros and the encoder masks the image vectors out).

With an `extractor` (`image_spec`, vision/extractors.py) the model gets `image_features` float32
`[Lv, D]` instead:
the frozen network's output on the image preprocessed as above, computed when the catalog was written
and stored in it (`tfds_catalog`), so the pixels are not decoded at all.

The settings (`ImagePreprocessing`, normalisation statistics, extractor specs) are `image_spec`'s.
"""
import dataclasses
import functools

import numpy as np
import seqio
import tensorflow as tf

from mmt_jax import image_spec
from mmt_jax.image_spec import ImagePreprocessing

def decode_and_resize(image_bytes: tf.Tensor, options: ImagePreprocessing,
                      seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded bytes `[]` -> (float32 `[size, size, 3]` normalised, int32 `[]` 1 if there was an image)."""
    has_image = tf.strings.length(image_bytes) > 0

    def present():
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        image = tf.cast(image, tf.float32)
        if options.augment:
            image = _random_crop_and_flip(image, seed)
        if options.resize == "center_crop":
            image = _center_crop(image, options.size, options.crop_fraction)
        image = tf.image.resize(image, (options.size, options.size), method="bilinear",
                                antialias=True)
        image = (image - tf.constant(options.mean)) / tf.constant(options.std)
        return tf.ensure_shape(image, (options.size, options.size, 3))

    image = tf.cond(has_image, present, lambda: tf.zeros((options.size, options.size, 3)))
    return image, tf.cast(has_image, tf.int32)


def decode_batch(encoded: list[bytes], options: ImagePreprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Encoded images (b"" for none) -> (float32 `[B, size, size, 3]`, int32 `[B]` 1 where there was
    an image), each as `decode_and_resize` makes it (augmentation is the pipeline's, not applied)."""
    if not encoded:
        return np.zeros((0, options.size, options.size, 3), np.float32), np.zeros((0,), np.int32)
    pixels, has_image = _batch_decoder(dataclasses.replace(options, augment=False))(
        tf.constant(list(encoded), tf.string))
    return pixels.numpy(), has_image.numpy()


@functools.cache
def _batch_decoder(options: ImagePreprocessing):
    """`decode_batch`'s traced function for one preprocessing: its graph is built once, not at
    every call; the images of a call are decoded in parallel."""
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def decode(encoded):
        images = tf.data.Dataset.from_tensor_slices(encoded).map(
            lambda image: decode_and_resize(image, options), num_parallel_calls=tf.data.AUTOTUNE)
        return images.batch(tf.size(encoded, out_type=tf.int64)).get_single_element()

    return decode


def _center_crop(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Resize the shorter side to size / crop_fraction, then the central size x size square."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / crop_fraction) / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    top, left = (new_shape[0] - size) // 2, (new_shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def _random_crop_and_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    seeds = tf.random.experimental.stateless_split(seed, 3)
    shape = tf.shape(image)[:2]
    side = tf.sqrt(tf.random.stateless_uniform([], seeds[0], 0.8, 1.0))
    crop = tf.cast(tf.cast(shape, tf.float32) * side, tf.int32)
    image = tf.image.stateless_random_crop(image, tf.concat([crop, [3]], 0), seeds[1])
    return tf.image.stateless_random_flip_left_right(image, seeds[2])


def preprocess_images(dataset: tf.data.Dataset, options: ImagePreprocessing) -> tf.data.Dataset:
    """A seqio preprocessor: the stored `image` bytes -> `image` (float32) and `image_mask`; with an
    extractor, the stored `image_features` (float32) and `image_mask`, without the `image` bytes."""
    if options.extractor is not None:
        return _stored_features(dataset, options)

    @seqio.map_over_dataset(num_seeds=1 if options.augment else None)
    def fn(example, seed=None):
        image, mask = decode_and_resize(example["image"], options, seed)
        return {**example, "image": image, "image_mask": mask[tf.newaxis]}

    return fn(dataset)


def _stored_features(dataset: tf.data.Dataset, options: ImagePreprocessing) -> tf.data.Dataset:
    spec = image_spec.spec(options)
    stored = dataset.element_spec.get("image_features")
    expected = image_spec.feature_shape(options)
    if stored is None or tuple(stored.shape) != expected:
        found = "none" if stored is None else f"shape {list(stored.shape)}"
        raise ValueError(f"the catalog has no image features of {spec!r} (expected shape "
                         f"{list(expected)}, found {found}); write the catalog with them: "
                         f"`mmt-jax data convert ... --image-features {spec}`, or for the embedded "
                         f"catalog the name 'embedded-n<N>-s<seed>-px<size>-{spec}'")

    def fn(example):
        mask = tf.cast(tf.strings.length(example["image"]) > 0, tf.int32)
        example = {k: v for k, v in example.items() if k != "image"}
        return {**example, "image_features": tf.cast(example["image_features"], tf.float32),
                "image_mask": mask[tf.newaxis]}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
