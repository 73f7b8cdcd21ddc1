"""mmt_jax: multimodal-to-text transformers (MMT4, MoEMoE) in JAX/Flax."""
import pathlib


def gin_search_path() -> str:
    """The directory of the gin files (`mmt_jax/gin`), which our binaries search: `models/t5_tiny.gin`
    there is the package resource `mmt_jax/gin/models/t5_tiny.gin`."""
    return str(pathlib.Path(__file__).parent / "gin")
