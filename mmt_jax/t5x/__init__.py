"""mmt_jax models under t5x's own train / eval / infer binaries, for users who have t5x installed.

t5x is not on the package registry, so nothing in mmt_jax imports this package; import it from gin
(`mmt_jax/gin/t5x/*.gin`) when running t5x's binaries:

    python -m t5x.train --gin_search_paths="$(python -c 'import mmt_jax; print(mmt_jax.gin_search_path())')" \\
      --gin_file=t5x/finetune_mmt4_tiny.gin --gin.MODEL_DIR=\\"runs/t5x_mmt4\\" \\
      --gin.INITIAL_CHECKPOINT_PATH=\\"...\\"
"""
