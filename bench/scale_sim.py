"""Scale by simulation: the compiled MMT4 train step's per-device memory and compile time on meshes of
simulated host devices, with nothing allocated (issue 12).

Each row builds MMT4 (T5.1.1 base / large / XL + ViT-B/16 at 224 px, all three stacks scanned or
unrolled and rematerialised alike, activations in bfloat16,
parameters and AdamW state in float32), lowers our real `train_step` with abstract, sharded inputs
(`jax.ShapeDtypeStruct`s carrying the Partitioner's shardings, the state donated), compiles it for
the CPU devices of this host (`--xla_force_host_platform_device_count=64`) and reads:
  params, optimizer  the per-device bytes of the state's shards (from the shardings themselves)
  temp               XLA's memory analysis: everything the step allocates besides its arguments and
                     outputs (activations kept for the backward pass, gradients, workspace)
  peak               argument + output - aliased (donated) + temp: what one device must hold
  compile            the wall time of `lowered.compile()` on this host
Meshes: (data, expert, model) = (N/4, 1, 4): N = 8 or 64 devices, 4-way model parallel. Partitioning:
1-D splits weights over `model` only (Megatron); 2-D also splits `embed` over `data` (t5x's
`parameter_partitioning_dims=2`, ZeRO-3 style). XLA:CPU's buffer assignment is not an
accelerator's; the figures say what fits and how the options compare, not an exact HBM count.

    .venv/bin/python bench/scale_sim.py                      # the README's tables (about 40 min on 2 cores)
    .venv/bin/python bench/scale_sim.py --rows xl-8-2d-scan-full   # one row
    .venv/bin/python bench/scale_sim.py --depth                # compile time vs layers, scan vs unrolled
"""
import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=64").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmt_jax.model import model_for  # noqa: E402
from mmt_jax.models.config import ModelConfig  # noqa: E402
from mmt_jax.models.mmt4 import FusionConfig  # noqa: E402
from mmt_jax.models.t5 import t5_config  # noqa: E402
from mmt_jax.partitioning import Partitioner, standard_logical_axis_rules  # noqa: E402
from mmt_jax.training import optimizers  # noqa: E402
from mmt_jax.training.train_state import TrainState, train_step  # noqa: E402
from mmt_jax.vision.vit import vit_config  # noqa: E402

GIB = 2 ** 30
MODEL_PARALLEL = 4
# The README's grid: every size on both meshes and both partitionings with scan + full remat, then
# the options one at a time on 8 devices with 2-D partitioning.
DEFAULT_ROWS = ([f"{size}-{n}-{p}-scan-full" for size in ("base", "large", "xl")
                 for n in (8, 64) for p in ("1d", "2d")] +
                [f"{size}-8-2d-{scan}-{remat}" for size in ("base", "large", "xl")
                 for scan, remat in (("unrolled", "none"), ("unrolled", "full"),
                                     ("scan", "none"), ("scan", "minimal"))] +
                ["xl-8-2d-scan-full-mb2"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help="comma-separated SIZE-DEVICES-{1d,2d}-{scan,unrolled}-{none,minimal,full}"
                             "[-mbN] (N microbatches: gradient accumulation)")
    parser.add_argument("--depth", action="store_true",
                        help="instead: compile time of T5.1.1-base-wide stacks of 6..48 layers")
    parser.add_argument("--batch", type=int, default=128, help="global batch (examples)")
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--target-len", type=int, default=64)
    parser.add_argument("--json", help="also write the rows here")
    return parser.parse_args(argv)


def model_config(size: str, scan: bool, remat: str, num_layers: int | None = None) -> ModelConfig:
    layers = {} if num_layers is None else dict(num_encoder_layers=num_layers,
                                                 num_decoder_layers=num_layers)
    t5 = t5_config(size, dtype=jnp.bfloat16, scan_layers=scan, remat_policy=remat, **layers)
    vit = vit_config("B/16", dtype=jnp.bfloat16, scan_layers=scan, remat_policy=remat)
    return ModelConfig(t5, FusionConfig(representator="vit", network=vit))


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (abstract arrays) laid out by `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        total += int(np.prod(sharding.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
    return total


def simulate(config: ModelConfig, devices: int, param_dims: int, args, microbatches: int = 1) -> dict:
    model = model_for(config.module())
    partitioner = Partitioner((devices // MODEL_PARALLEL, 1, MODEL_PARALLEL),
                              standard_logical_axis_rules(1, param_dims), jax.devices()[:devices])
    vit = config.fusion.network
    b = args.batch
    batch = {"encoder_input_tokens": ((b, args.text_len), jnp.int32),
             "encoder_images": ((b, vit.image_size, vit.image_size, 3), jnp.float32),
             "decoder_input_tokens": ((b, args.target_len), jnp.int32),
             "decoder_target_tokens": ((b, args.target_len), jnp.int32),
             "decoder_loss_weights": ((b, args.target_len), jnp.int32)}
    shapes = {k: shape for k, (shape, _) in batch.items()}
    tx = optimizers.adamw(optimizers.linear_decay(2e-4, 10_000))
    with partitioner.context():
        variables = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
        params_shardings = partitioner.params_shardings(variables["params_axes"])
        state = jax.eval_shape(lambda p: TrainState.create(p, tx), variables["params"])
        state_shardings = state.shardings(params_shardings, partitioner.replicated())
        abstract_state = jax.tree_util.tree_map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            state, state_shardings)
        abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype,
                                                  sharding=partitioner.data_sharding(len(shape)))
                          for k, (shape, dtype) in batch.items()}
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=partitioner.replicated())
        step = jax.jit(lambda s, x, r: train_step(model, s, x, r, microbatches),
                       out_shardings=(state_shardings, partitioner.replicated()), donate_argnums=(0,))
        lowered = step.lower(abstract_state, abstract_batch, rng)
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    return dict(params_total_b=num_params / 1e9,
                params_gib=shard_bytes(state.params, state_shardings.params) / GIB,
                optimizer_gib=shard_bytes(state.opt_state, state_shardings.opt_state) / GIB,
                temp_gib=memory.temp_size_in_bytes / GIB, peak_gib=peak / GIB,
                compile_s=compile_s)


def parse_row(name: str):
    parts = name.split("-")
    size, devices, dims, layout, remat = parts[:5]
    microbatches = parts[5] if len(parts) == 6 else "mb1"
    if (len(parts) not in (5, 6) or dims not in ("1d", "2d") or layout not in ("scan", "unrolled")
            or not microbatches.startswith("mb")):
        raise SystemExit(f"error: row {name!r}: want SIZE-DEVICES-{{1d,2d}}-{{scan,unrolled}}-REMAT"
                         "[-mbN]")
    return size, int(devices), int(dims[0]), layout == "scan", remat, int(microbatches[2:])


def main(argv=None):
    args = parse_args(argv)
    rows = []
    if args.depth:
        print("| layers (enc = dec) | scan compile s | unrolled compile s |\n|---|---|---|", flush=True)
        for layers in (6, 12, 24, 48):
            times = [simulate(model_config("base", scan, "full", layers), 8, 2, args)["compile_s"]
                     for scan in (True, False)]
            rows.append(dict(layers=layers, scan_compile_s=times[0], unrolled_compile_s=times[1]))
            print(f"| {layers} | {times[0]:.1f} | {times[1]:.1f} |", flush=True)
    else:
        print(f"batch {args.batch}, text {args.text_len} + 196 image tokens, target {args.target_len}; "
              "AdamW; bf16 activations, fp32 params")
        print("| model | devices | params | layers | remat | microbatches | params (B) | params GiB "
              "| optimizer GiB | temp GiB | peak GiB | compile s |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for name in args.rows.split(","):
            size, devices, dims, scan, remat, microbatches = parse_row(name)
            row = dict(row=name, **simulate(model_config(size, scan, remat), devices, dims, args,
                                            microbatches))
            rows.append(row)
            print(f"| MMT4 T5.1.1-{size} + ViT-B/16 | {devices} | {dims}-D | "
                  f"{'scan' if scan else 'unrolled'} | {remat} | {microbatches} | "
                  f"{row['params_total_b']:.2f} | "
                  f"{row['params_gib']:.2f} | {row['optimizer_gib']:.2f} | {row['temp_gib']:.2f} | "
                  f"{row['peak_gib']:.2f} | {row['compile_s']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
