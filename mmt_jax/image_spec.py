"""How images become model inputs, as plain facts: preprocessing settings, normalisation statistics,
feature-extractor specs and the feature shapes they give. No TensorFlow and no JAX here, so the data
pipeline (`data/images.py`), the vision networks (`vision/extractors.py`) and the model config all
import it without importing each other.

An extractor is named by a spec, "<network>[+pixels]-px<size>", e.g. "efficientnet-lite0-px128": a
frozen network (`EXTRACTOR_NETWORKS`) and the side of the square image it reads; "+pixels" adds one
vector of raw 8x8 pixels per cell of the network's output grid (`vision/extractors.py` says why).

    options = preprocessing("efficientnet-lite0+pixels-px128")   # ImagePreprocessing(size=128, ...)
    feature_shape(options)                                        # (32, 1472): [Lv, D]

Normalisation is `(pixel - mean) / std` on [0, 255] values, with the statistics the representator was
trained with: `VIT_STATS` for Hugging Face ViT checkpoints, `EFFICIENTNET_LITE_STATS` for
EfficientNet-Lite; raw patches use the ViT statistics (values in [-1, 1]).
"""
import dataclasses
import math
import re

import numpy as np

VIT_STATS = ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5))
EFFICIENTNET_LITE_STATS = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
RESIZE_METHODS = ("stretch", "center_crop")


@dataclasses.dataclass(frozen=True)
class ExtractorNetwork:
    """A frozen network's facts: normalisation `stats` (mean, std), the `stride` from its input to
    its output grid (TF 'SAME' padding: a side of S pixels gives ceil(S / stride) cells), and the
    `dim` of each output vector."""
    stats: tuple
    stride: int
    dim: int


EXTRACTOR_NETWORKS = {"efficientnet-lite0": ExtractorNetwork(EFFICIENTNET_LITE_STATS, 32, 1280)}
PIXELS = "+pixels"
PIXEL_SIDE = 8


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """How stored images become model inputs.

    Attributes:
      size: side of the square image the representator takes (e.g. 224 for ViT-B/32).
      resize: "stretch" resizes the whole image to size x size (products are centred on a plain
        background, so nothing is cut off); "center_crop" keeps the aspect ratio, resizes the shorter
        side to size / crop_fraction and takes the central size x size square (ImageNet-style).
      crop_fraction: see `resize`.
      mean, std: per-channel normalisation on [0, 255] values.
      augment: in training, a random crop of 80-100% of the area (same aspect ratio) and a random
        horizontal flip, drawn from seqio's per-example seed. No colour jitter: colour is a label.
      extractor: the frozen network ("<network>[+pixels]") whose features of the image, stored in
        the catalog, the model reads instead of pixels; None: pixels. Build the whole preprocessing
        from a spec with `preprocessing("efficientnet-lite0-px128")`.
    """
    size: int = 224
    resize: str = "stretch"
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = VIT_STATS[0]
    std: tuple[float, float, float] = VIT_STATS[1]
    augment: bool = False
    extractor: str | None = None

    def __post_init__(self):
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {self.resize!r}")
        if self.size <= 0 or not 0 < self.crop_fraction <= 1:
            raise ValueError(f"bad image preprocessing {self}")
        if self.extractor is not None and self.augment:
            raise ValueError("stored image features are computed once per product, so they cannot "
                             "be augmented: set augment=False or extractor=None")

    @property
    def input_feature(self) -> str:
        """The task feature the model reads: "image" (pixels) or "image_features"."""
        return "image" if self.extractor is None else "image_features"


@dataclasses.dataclass(frozen=True, eq=False)
class StoredFeatures:
    """The image features a converted catalog stores with a product (`tfds_catalog`): `vectors`
    float32 `[Lv, D]` holding the stored float16 values, its image preprocessed by `options`
    (`preprocessing(spec)` of the catalog's extractor spec) and run through that extractor. A reader
    whose model was trained on the same preprocessing uses them instead of extracting the features
    again."""
    options: ImagePreprocessing
    vectors: np.ndarray


def network_name(extractor: str) -> str:
    """"efficientnet-lite0+pixels" -> "efficientnet-lite0"; raises for an unknown network."""
    network = extractor.removesuffix(PIXELS)
    if network not in EXTRACTOR_NETWORKS:
        raise ValueError(f"unknown image feature extractor {extractor!r}; expected "
                         f"<network>[{PIXELS}]-px<size> with network one of "
                         f"{sorted(EXTRACTOR_NETWORKS)}, e.g. 'efficientnet-lite0-px128'")
    return network


def preprocessing(spec: str) -> ImagePreprocessing:
    """"<network>[+pixels]-px<size>" -> the ImagePreprocessing that feeds it and names it."""
    match = re.fullmatch(r"(.+)-px(\d+)", spec)
    network = network_name(match.group(1) if match else spec)
    if not match:
        raise ValueError(f"image feature extractor {spec!r} has no size; expected "
                         f"<network>[{PIXELS}]-px<size>, e.g. 'efficientnet-lite0-px128'")
    mean, std = EXTRACTOR_NETWORKS[network].stats
    return ImagePreprocessing(size=int(match.group(2)), mean=mean, std=std,
                              extractor=match.group(1))


def spec(options: ImagePreprocessing) -> str:
    """The inverse of `preprocessing`."""
    if options.extractor is None:
        raise ValueError(f"{options} extracts no features")
    return f"{options.extractor}-px{options.size}"


def feature_shape(options: ImagePreprocessing) -> tuple[int, int]:
    """`(Lv, D)` of the features that `options`' extractor gives: the network's grid of
    ceil(size / stride)^2 vectors of `dim`, and with "+pixels" as many again, every vector widened
    by the 3 * PIXEL_SIDE^2 pixel values (each kind zero in the other's dimensions)."""
    network = EXTRACTOR_NETWORKS[network_name(options.extractor)]
    cells = math.ceil(options.size / network.stride) ** 2
    if options.extractor.endswith(PIXELS):
        return 2 * cells, network.dim + 3 * PIXEL_SIDE ** 2
    return cells, network.dim
