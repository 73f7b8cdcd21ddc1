"""EfficientNet's depthwise convolutions: XLA's grouped convolution against the sum of shifted slices
(the same arithmetic), in one process, on the default backend. `vision/efficientnet.py` uses shifted
slices on CPU and the grouped convolution on GPU/TPU (`depthwise="auto"`); this measures that choice.

1. Layers: every distinct depthwise layer of EfficientNet-Lite0 at the given image size (batch 32),
   forward, and forward + backward (what end-to-end training of the CNN representator needs).
2. Network: Lite0 feature extraction (`vision/extractors.py`), images per second, with its depthwise
   layers forced to each implementation (`EfficientNetConfig.depthwise`).

Contenders are compiled first, then timed in alternating rounds; figures are medians.

    .venv/bin/python bench/depthwise_bench.py --image-size 128 --rounds 5
"""
import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmt_jax.vision import efficientnet as en


def layer_shapes(size: int):
    """(height, channels, kernel, stride) of each distinct depthwise layer of Lite0 at `size`."""
    config, h, seen = en.efficientnet_config("lite0"), -(-size // 2), []
    for block in config.blocks():
        mid = block["in_filters"] * block["expand"]
        shape = (h, mid, block["kernel"], block["stride"])
        if shape not in seen:
            seen.append(shape)
        h = -(-h // block["stride"])
    return seen


def median_time(fn, args, rounds):
    fn(*args)  # compiled before timing
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"backend {jax.default_backend()}; Lite0 depthwise layers at {args.image_size} px, "
          f"batch {args.batch} (ms: grouped conv / shifted slices, ratio)")
    totals = np.zeros((2, 2))
    for h, c, k, s in layer_shapes(args.image_size):
        x = jnp.asarray(rng.normal(size=(args.batch, h, h, c)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32)
        pads = [en._pads(h, k, s, "same")] * 2
        row = []
        for impl in ("grouped", "shifted"):
            conv = lambda x, w, impl=impl: en.depthwise_conv(x, w, s, pads, impl)  # noqa: E731
            forward = jax.jit(conv)
            backward = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2),
                                        argnums=(0, 1)))
            row.append((median_time(forward, (x, kernel), args.rounds),
                        median_time(backward, (x, kernel), args.rounds)))
        totals += np.array(row)
        (gf, gb), (sf, sb) = row
        print(f"  {h:3d}x{h:<3d} {c:4d} ch  k{k} s{s}   fwd {gf * 1e3:7.1f} / {sf * 1e3:6.1f} "
              f"({gf / sf:4.1f}x)   fwd+bwd {gb * 1e3:7.1f} / {sb * 1e3:6.1f} ({gb / sb:4.1f}x)")
    (gf, gb), (sf, sb) = totals
    print(f"  all layers   grouped / shifted time: fwd {gf / sf:.1f}x   fwd+bwd {gb / sb:.1f}x")

    config, params = en.load_efficientnet_lite0()
    images = jnp.asarray(rng.uniform(-1, 1, size=(args.batch, args.image_size, args.image_size, 3)),
                         jnp.float32)
    rates = {}
    for name, impl in (("grouped conv", "grouped"), ("shifted slices", "shifted"), ("auto", "auto")):
        model = en.EfficientNet(dataclasses.replace(config, depthwise=impl))
        forward = jax.jit(lambda x, model=model: model.apply({"params": params}, x))
        rates[name] = args.batch / median_time(forward, (images,), args.rounds)
    print(f"Lite0 features at {args.image_size} px: " + ", ".join(
        f"{name} {rate:.0f} images/s" for name, rate in rates.items())
        + f" (shifted / grouped: {rates['shifted slices'] / rates['grouped conv']:.1f}x)")


if __name__ == "__main__":
    main()
