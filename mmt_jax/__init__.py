"""mmt_jax: multimodal-to-text transformers (MMT4, MoEMoE) in JAX/Flax."""
import pathlib


def gin_search_path() -> str:
    """The directory of the gin files, for `--gin_search_paths`: `mmt_jax/gin` inside an installed
    wheel (setup.py maps the repository's gin/ there), the repository's gin/ in a source checkout."""
    package = pathlib.Path(__file__).parent
    installed = package / "gin"
    return str(installed if installed.is_dir() else package.parent / "gin")
