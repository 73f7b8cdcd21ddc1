"""Forward+backward time of MMT4's fused encoder with each image representator, against the text-only
T5 encoder of the same size, in one process (MMT4 paper sizes: ViT-B/32 at 224px -> 50 vectors,
EfficientNet-B4 at 380px -> 144 vectors of 1792, 32x32 patches at 224px -> 49 vectors of 3072).

    .venv/bin/python bench/mmt4_encoder_bench.py --t5-size base --batch 8 --rounds 3 --steps 2

The timed function is `grad(sum(encode(...)**2))` over all parameters (jit-compiled, random weights);
contenders alternate in rounds and the table gives the median seconds per step and its ratio to the
text-only encoder (> 1 means the fused encoder costs that many times more).
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.t5 import EncoderDecoder, t5_config
from mmt_jax.vision.efficientnet import efficientnet_config
from mmt_jax.vision.vit import vit_config


def contenders():
    """name -> (FusionConfig or None, image input name, its shape without the batch axis)."""
    return {
        "text only (T5)": (None, None, None),
        "patches 32px @224 (49 x 3072)": (FusionConfig(patch_size=32), "encoder_images",
                                         (224, 224, 3)),
        "ViT-B/32 @224 (50 x 768)": (FusionConfig(representator="vit", network=vit_config("B/32")),
                                     "encoder_images", (224, 224, 3)),
        "EfficientNet-B4 @380 (144 x 1792)": (
            FusionConfig(representator="efficientnet", network=efficientnet_config("b4")),
            "encoder_images", (380, 380, 3)),
        "precomputed (144 x 1792)": (
            FusionConfig(representator="precomputed", feature_dim=1792),
            "encoder_image_features", (144, 1792)),
    }


def make_step(config, fusion, image_key, image_shape, batch, text_len, seed=0):
    module = EncoderDecoder(config, fusion)
    rng = np.random.default_rng(seed)
    inputs = {"encoder_input_tokens": jnp.asarray(rng.integers(2, config.vocab_size,
                                                               (batch, text_len)), jnp.int32)}
    if image_key:
        inputs[image_key] = jnp.asarray(rng.normal(size=(batch,) + image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **inputs,
                                                method=module.encode))["params"]
    # Random parameters from the shapes (no init compile; EfficientNet's init compiles slowly).
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), jnp.float32), shapes)

    def loss(p):
        return jnp.sum(jnp.square(module.apply({"params": p}, **inputs, method=module.encode)))

    grad = jax.jit(jax.grad(loss))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return lambda: jax.block_until_ready(grad(params)), n_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t5-size", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    config = t5_config(args.t5_size)
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}; T5.1.1 "
          f"{args.t5_size} encoder, batch {args.batch}, text length {args.text_len}, float32")
    steps, sizes, first = {}, {}, {}
    for name, (fusion, key, shape) in contenders().items():
        steps[name], sizes[name] = make_step(config, fusion, key, shape, args.batch, args.text_len)
        start = time.perf_counter()
        steps[name]()
        first[name] = time.perf_counter() - start
        print(f"  compiled {name}: {first[name]:.1f}s", flush=True)
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n.split(' (')[0]} {statistics.median(t[-args.steps:]):.2f}s" for n, t in times.items()),
            flush=True)
    base = statistics.median(times["text only (T5)"])
    print("\n| representator | parameters | median s/step | vs text only |\n|---|---:|---:|---:|")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {sizes[name] / 1e6:.0f}M | {m:.2f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
