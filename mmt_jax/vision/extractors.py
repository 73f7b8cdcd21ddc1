"""Frozen pretrained representators whose output is stored with the catalog (MMT4's f_v, Eq. 1).

A frozen representator gives the same vectors for a product every time it is read, so they can be
computed once, when the catalog is written, instead of at every training step: the model then uses
`FusionConfig(representator="precomputed", feature_dim=...)` and trains only from the projection on.
An extractor is named by a spec, "<network>[+pixels]-px<size>", e.g. "efficientnet-lite0-px128": the
network (`LOADERS`) and the side of the square image it reads. The spec also fixes the image's
decoding and normalisation (`image_spec.preprocessing(spec)`), which the catalog, the tasks and the
checkpoint all record, so the Predictor extracts features from a new product's image exactly as the
catalog did.

    options = image_spec.preprocessing("efficientnet-lite0-px128")   # ImagePreprocessing(size=128)
    features = extract(pixels, options.extractor)     # [B, 128, 128, 3] -> [B, 16, 1280]

Extracting equals the end-to-end frozen representator, `FusionConfig(representator="efficientnet",
network=<the same config>, freeze_representator=True)`, on the same normalised pixels.

"+pixels" adds the paper's patch representator on the CNN's grid: for each of the map's h*w cells, one
more vector holding that cell's pixels at 8x8 (`image_spec.PIXEL_SIDE`; the image resized to 8h x 8w, cut into
patches). An ImageNet CNN's last map keeps texture and shape but little of the colour (on the embedded
catalog a linear probe of Lite0's pooled map finds the colour 44% of the time, the pattern 97%), so the
two kinds complement each other. Each kind keeps its own dimensions, zero in the other's:

    features = [cnn (h*w, D) | 0 (h*w, 192)]      the first h*w vectors
               [0 (h*w, D)   | pixels (h*w, 192)]  the next h*w vectors   -> [B, 2*h*w, D + 192]

so the single projection of Eq. 1 acts as one matrix per kind and its LayerNorm normalises each vector
on its own: the pixel vectors are not drowned by the CNN's 1280 activations.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmt_jax import image_spec
from mmt_jax.data.images import decode_batch
from mmt_jax.image_spec import PIXEL_SIDE, PIXELS, ImagePreprocessing
from mmt_jax.vision import efficientnet
from mmt_jax.vision.patches import image_patches


def _lite0():
    config, params = efficientnet.load_efficientnet_lite0()
    return efficientnet.EfficientNet(config), params


# network name -> () -> (module, params) with the pretrained weights (local files only); their
# normalisation, grid and width are image_spec.EXTRACTOR_NETWORKS'.
LOADERS = {"efficientnet-lite0": _lite0}
BATCH_SIZE = 32  # most images per call of the compiled network


@functools.lru_cache(maxsize=None)
def _network(name: str):
    """The compiled extractor: normalised pixels `[B, S, S, 3]` -> `[B, Lv, D]`."""
    module, params = LOADERS[image_spec.network_name(name)]()
    params = jax.device_put(params)

    def features(images):
        cnn = module.apply({"params": params}, images)  # [B, h*w, D]
        if not name.endswith(PIXELS):
            return cnn
        grid = int(round(cnn.shape[1] ** 0.5))
        side = PIXEL_SIDE * grid
        small = jax.image.resize(images, (images.shape[0], side, side, 3), "linear", antialias=True)
        pixels = image_patches(small, PIXEL_SIDE)  # [B, h*w, 192], rows first as the map
        d, p = cnn.shape[-1], pixels.shape[-1]
        return jnp.concatenate([jnp.pad(cnn, ((0, 0), (0, 0), (0, p))),
                                jnp.pad(pixels, ((0, 0), (0, 0), (d, 0)))], axis=1)

    return jax.jit(features)


def extract(images: np.ndarray, name: str) -> np.ndarray:
    """Normalised pixels float32 `[B, S, S, 3]` -> feature vectors float32 `[B, Lv, D]`."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [batch, size, size, 3], got shape {list(images.shape)}")
    if not len(images):  # no network loaded for nothing (a batch whose features are all stored)
        empty = ImagePreprocessing(size=images.shape[1], extractor=name)
        return np.zeros((0,) + image_spec.feature_shape(empty), np.float32)
    network = _network(name)
    out = []
    for start in range(0, len(images), BATCH_SIZE):
        chunk = images[start:start + BATCH_SIZE]
        # padded to a power of two: a few compiled shapes, and a few images cost a few
        size = min(BATCH_SIZE, 1 << (len(chunk) - 1).bit_length())
        padded = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:],
                                                 np.float32)])
        out.append(np.asarray(network(padded))[:len(chunk)])
    return np.concatenate(out)


def extract_from_bytes(encoded: list[bytes], options: ImagePreprocessing
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Encoded images (b"" for none) -> (features `[B, Lv, D]`, int32 `[B]` 1 where there was an
    image). Decoding and resizing are `images.decode_batch`'s; a missing image gives zeros, as its
    pixels are zeros and the encoder masks its vectors out. The features are float32 holding
    float16 values: what the catalog stores, so a new product's features are the ones training
    would have read."""
    pixels, has_image = decode_batch(encoded, options)
    features = extract(pixels, options.extractor)
    features = features * has_image[:, None, None].astype(np.float32)
    return features.astype(np.float16).astype(np.float32), has_image
