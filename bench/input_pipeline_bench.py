"""Is the input pipeline fast enough to feed the tiny MMT4? Both rates, measured in one process.

    .venv/bin/python bench/input_pipeline_bench.py --products 1500 --batch 32 --image-size 224

1. Writes an embedded catalog of `--products` products with 256 px JPEGs (products/s).
2. Pipeline alone: the attribute mixture through the whole chain (TFRecord read, JPEG decode, resize
   to `--image-size`, normalise, prompt + value removal, tokenise, feature converter, batch):
   examples/s.
3. The tiny MMT4 (T5.1.1 tiny + flattened `--patch-size` patches) train step alone, on one batch
   held in memory: examples/s.
4. Training fed by the pipeline (prefetching in the background), as the train binary runs it:
   examples/s, and its ratio to (3). A ratio near 1 means the pipeline is not the bottleneck; both
   share the machine's cores, so (2) alone overstates what is left over for training.
"""
import argparse
import os
import tempfile
import time

import jax
import optax
import seqio

from mmt_jax import tasks
from mmt_jax import image_spec
from mmt_jax.data import feature_converter, tfds_catalog
from mmt_jax.data import vocabulary as vocab_lib
from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.t5 import EncoderDecoder, t5_config
from mmt_jax.training.train_state import TrainState, train_step

LENGTHS = {"inputs": 64, "targets": 8}


def batches(task: str, batch: int):
    ds = seqio.get_dataset(task, LENGTHS, dataset_split="train", shuffle=True, seed=0,
                           num_epochs=None,
                           feature_converter=feature_converter.MultimodalEncDecFeatureConverter(pack=False))
    return ds.batch(batch, drop_remainder=True).prefetch(2).as_numpy_iterator()


def rate(fn, count: int, per_call: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return count * per_call / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPU cores; jax {jax.__version__} on {jax.devices()[0].platform}; "
          f"batch {args.batch}, images {args.image_size}px, text {LENGTHS}")
    data_dir = tempfile.mkdtemp(prefix="mmt_bench_")
    start = time.perf_counter()
    config = tfds_catalog.embedded_config(args.products, seed=0, image_size=256)
    tfds_catalog.prepare(config, data_dir, num_shards=4)
    print(f"catalog: {args.products / (time.perf_counter() - start):.0f} products/s written")
    tasks.register_catalog_tasks("bench", data_dir, config.name,
                                 image=image_spec.ImagePreprocessing(size=args.image_size))
    task = "bench_attributes_removed100"

    it = batches(task, args.batch)
    for _ in range(3):
        next(it)
    pipeline = rate(lambda: next(it), args.steps, args.batch)
    print(f"pipeline alone: {pipeline:.0f} examples/s")

    vocab_size = -(-vocab_lib.vocabulary().vocab_size // 128) * 128
    model = EncoderDecoderModel(EncoderDecoder(t5_config("tiny", vocab_size=vocab_size),
                                               FusionConfig(patch_size=args.patch_size)))
    batch = next(it)
    params = model.get_initial_variables(jax.random.key(0), {k: v.shape for k, v in batch.items()},
                                         {k: v.dtype for k, v in batch.items()})["params"]
    state = TrainState.create(params, optax.adamw(2e-4))
    step = jax.jit(lambda s, b: train_step(model, s, b, None), donate_argnums=0)
    state, _ = step(state, batch)
    jax.block_until_ready(state)

    def train_on(source):
        nonlocal state
        state, metrics = step(state, source())
        jax.block_until_ready(metrics)

    alone = rate(lambda: train_on(lambda: batch), args.steps, args.batch)
    fed = rate(lambda: train_on(lambda: next(it)), args.steps, args.batch)
    vectors = (args.image_size // args.patch_size) ** 2
    print(f"tiny MMT4 train step alone ({vectors} image vectors + {LENGTHS['inputs']} tokens): "
          f"{alone:.0f} examples/s")
    print(f"training fed by the pipeline: {fed:.0f} examples/s = {fed / alone:.2f}x of the step "
          f"alone; pipeline alone / step alone = {pipeline / alone:.1f}x")


if __name__ == "__main__":
    main()
