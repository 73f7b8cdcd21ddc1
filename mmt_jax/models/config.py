"""ModelConfig: everything that builds a model, stored as JSON beside its checkpoints.

`ModelConfig(t5=..., fusion=None)` is the text-only T5; with a `FusionConfig` it is MMT4; with a
`MultiSourceConfig` (`sources`) it is MoEMoE (its image encoder's FusionConfig inside). The JSON
form names the representator network's type (`ViTConfig`, `EfficientNetConfig`), so a checkpoint
rebuilds its own model with nothing but its directory, and records how its images were preprocessed,
so the Predictor and the infer binary feed new images exactly as training did.
"""
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmt_jax.image_spec import ImagePreprocessing
from mmt_jax.models.contrastive import ContrastiveConfig
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.moemoe import MultiSourceConfig, MultiSourceEncoderDecoder
from mmt_jax.models.t5 import EncoderDecoder, T5Config
from mmt_jax.vision.efficientnet import EfficientNetConfig
from mmt_jax.vision.vit import ViTConfig

_NETWORKS = {cls.__name__: cls for cls in (ViTConfig, EfficientNetConfig)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """t5: the transformer; fusion: the image branch (None: text only); vocabulary: the SentencePiece
    model the token ids belong to (None: the catalog vocabulary shipped with the package); image: how
    stored images became `encoder_images` in training (MMT4 only; gin binds the task's own, see
    mmt_jax/gin/runs/catalog.gin; None in checkpoints written before it was recorded); contrastive: MMT4's
    optional contrastive image-text head (`models/contrastive.py`; None: none); sources: MoEMoE's
    question, context and image encoders (`models/moemoe.py`; None: not MoEMoE); prompts: the
    prompts its training task asked ("color:", "match:"; `train` records them from the catalog
    task; None: not recorded), so a prompt it never learned can be flagged; trained_task: the
    catalog task it was trained on, as `tasks.catalog_task` registers it again (a JSON object:
    task, prefix, data_dir, catalog and the registration's settings; `tasks.catalog_task_record`;
    None: not a catalog task, or not recorded), so eval needs only the checkpoint."""
    t5: T5Config
    fusion: FusionConfig | None = None
    vocabulary: str | None = None
    image: ImagePreprocessing | None = None
    contrastive: ContrastiveConfig | None = None
    sources: MultiSourceConfig | None = None
    prompts: tuple[str, ...] | None = None
    trained_task: dict | None = dataclasses.field(default=None, hash=False)  # a dict: unhashable

    def __post_init__(self):
        if self.contrastive is not None and self.fusion is None:
            raise ValueError("a contrastive head compares images with texts: it needs an image "
                             "branch (ModelConfig.fusion)")
        if self.sources is not None and (self.fusion is not None or self.contrastive is not None):
            raise ValueError("MoEMoE (ModelConfig.sources) has its own image encoder "
                             "(sources.image): no fusion, no contrastive head")

    @property
    def image_branch(self) -> FusionConfig | None:
        """The image representator's config: MMT4's fusion or MoEMoE's image encoder."""
        return self.sources.image if self.sources is not None else self.fusion

    def module(self) -> EncoderDecoder:
        """The Flax module: the T5 stack with the fusion's encoder-input part (MMT4's
        `FusedImageTextInput`, a FusionConfig being its factory) or, without one, text alone,
        and the contrastive head when there is one; MoEMoE's `MultiSourceEncoderDecoder`."""
        if self.sources is not None:
            return MultiSourceEncoderDecoder(self.t5, sources=self.sources)
        return EncoderDecoder(self.t5, encoder_input=self.fusion, contrastive=self.contrastive)

    @property
    def text_sources(self) -> tuple[str, ...] | None:
        """MoEMoE's text sources (`MultiSourceConfig.text_sources`); None for other models."""
        return None if self.sources is None else self.sources.text_sources

    def to_json_dict(self) -> dict:
        image = None if self.image is None else {
            f.name: _plain(getattr(self.image, f.name)) for f in dataclasses.fields(self.image)}
        contrastive = None if self.contrastive is None else dataclasses.asdict(self.contrastive)
        sources = None if self.sources is None else {
            **dataclasses.asdict(self.sources), "image": _fusion_to_json(self.sources.image)}
        return {"t5": self.t5.to_json_dict(), "fusion": _fusion_to_json(self.fusion),
                "vocabulary": self.vocabulary, "image": image, "contrastive": contrastive,
                "sources": sources, "prompts": None if self.prompts is None else list(self.prompts),
                "trained_task": self.trained_task}

    @classmethod
    def from_json_dict(cls, fields: dict) -> "ModelConfig":
        if "t5" not in fields:  # a checkpoint written before ModelConfig: the T5 fields alone
            return cls(T5Config.from_json_dict(fields))
        image = fields.get("image")
        if image is not None:
            image = ImagePreprocessing(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in image.items()})
        contrastive = fields.get("contrastive")
        sources = fields.get("sources")
        if sources is not None:
            sources = MultiSourceConfig(**{**sources, "image": _fusion_from_json(sources["image"])})
        prompts = fields.get("prompts")
        return cls(T5Config.from_json_dict(fields["t5"]), _fusion_from_json(fields.get("fusion")),
                   fields.get("vocabulary"), image,
                   None if contrastive is None else ContrastiveConfig(**contrastive), sources,
                   None if prompts is None else tuple(prompts), fields.get("trained_task"))


def _plain(value: Any) -> Any:
    if isinstance(value, (np.dtype, type)):  # np.dtype('float32') or jnp.float32
        return jnp.dtype(value).name
    if isinstance(value, tuple):
        return list(value)
    return value


def _fusion_to_json(fusion: FusionConfig | None) -> dict | None:
    if fusion is None:
        return None
    fields = {f.name: _plain(getattr(fusion, f.name)) for f in dataclasses.fields(fusion)}
    if fusion.network is not None:
        network = fusion.network
        fields["network"] = {"type": type(network).__name__, **{
            f.name: _plain(getattr(network, f.name)) for f in dataclasses.fields(network)}}
    return fields


def _fusion_from_json(fields: dict | None) -> FusionConfig | None:
    if fields is None:
        return None
    fields = dict(fields)
    if fields.get("network") is not None:
        network = dict(fields["network"])
        cls = _NETWORKS.get(network.pop("type", None))
        if cls is None:
            raise ValueError(f"unknown representator network {fields['network'].get('type')!r}; "
                             f"known: {sorted(_NETWORKS)}")
        for f in dataclasses.fields(cls):
            if "dtype" in f.name and f.name in network:
                network[f.name] = jnp.dtype(network[f.name])
        fields["network"] = cls(**network)
    return FusionConfig(**fields)
