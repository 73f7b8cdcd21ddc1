"""mmt_jax models under t5x's own train / eval / infer binaries, for users who have t5x installed
(tools/t5x/install.sh).

t5x is not on the package registry, so nothing in mmt_jax imports this package; t5x's binaries import
it through the run files in `mmt_jax/gin/t5x/`, after one of our model files:

    python -m t5x.train --gin_file=mmt_jax/gin/models/mmt4_tiny.gin \\
      --gin_file=mmt_jax/gin/t5x/pretrain.gin --gin.MODEL_DIR=\\"runs/t5x_pretrain\\" --gin.TRAIN_STEPS=300
"""
