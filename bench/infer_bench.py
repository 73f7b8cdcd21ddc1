"""Batch inference throughput: the infer binary's path against the model's own compiled predict step.

Measures, in one process on one checkpoint and the same products x prompts:
  1. end to end: `infer.infer` (read the TFRecords, build each batch's inputs: tokenise, take the
     catalog's stored image features (or decode and resize, or extract features, for a catalog
     without them), convert; decode; write JSONL);
  2. the compiled `predict_batch_with_aux` alone on the same batches, built beforehand and held in
     memory: the ceiling the input side should approach (issue 16 asks for 0.8x of it).
After one untimed warm-up pass of each (compilation), the two alternate for `--rounds` rounds;
figures are each one's fastest pass.

    .venv/bin/python bench/infer_bench.py --checkpoint runs/demo/mmt4 \\
        --input "runs/demo/tfds/product_catalog/*/1.0.0/product_catalog-test.tfrecord*"
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

from mmt_jax import infer
from mmt_jax.predictor import Predictor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="TFRecord glob of a converted catalog")
    p.add_argument("--prompts", default="color:,pattern:,sleeve_type:,brand:,material:")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-length", type=int, default=64)
    p.add_argument("--target-length", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sort-window", type=int, default=16,
                   help="Predictor.sort_window: batches sorted by length at a time (1: none)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    prompts = args.prompts.split(",")
    predictor = Predictor.from_checkpoint(args.checkpoint, input_length=args.input_length,
                                          target_length=args.target_length,
                                          batch_size=args.batch_size,
                                          sort_window=args.sort_window)
    products = list(infer.read_products(args.input))
    queries = list(infer.queries(products, prompts, with_description=True))
    n = len(queries)
    print(f"# batch inference: {len(products)} products x {len(prompts)} prompts = {n} queries, "
          f"batch {predictor.batch_size}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}")

    def end_to_end():
        with tempfile.TemporaryDirectory() as directory:
            start = time.perf_counter()
            infer.infer(predictor, args.input, os.path.join(directory, "out.jsonl"), prompts,
                        with_description=True)
            return time.perf_counter() - start

    chunks = [queries[i:i + predictor.batch_size] for i in range(0, n, predictor.batch_size)]
    batches = [predictor._batch(chunk + [chunk[-1]] * (predictor.batch_size - len(chunk)))
               for chunk in chunks]

    def predict_only():
        start = time.perf_counter()
        for batch in batches:
            jax.block_until_ready(predictor._predict(predictor.params, batch))
        return time.perf_counter() - start

    predict_only(), end_to_end()  # compile both
    rounds = [(predict_only(), end_to_end()) for _ in range(args.rounds)]
    step, whole = (min(times) for times in zip(*rounds))
    print(f"| path | seconds | queries/s |\n|---|---:|---:|\n"
          f"| compiled predict step, batches in memory | {step:.2f} | {n / step:.0f} |\n"
          f"| infer end to end | {whole:.2f} | {n / whole:.0f} |\n"
          f"end to end / predict step: {step / whole:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
