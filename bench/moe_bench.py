"""The sparse MoE block against a dense FFN of the same active FLOPs, and an MoE decoder's train step
against the dense model's, in one process.

1. Layer: `MoeBlock` (8 experts, top-2, d_model 512, d_ff 2048 per expert, gated GELU) forward +
   backward on 8 x 256 tokens, for each dispatch ("einsum", "gather") and routing group size, over
   `MlpBlock` with d_ff = 2 x 2048 (a token's two experts do the FLOPs of one FFN twice as wide).
   Capacity factor 1.0 (training's 1.25 adds 25% expert work by construction).
2. Model: a T5.1.1 train step (AdamW) with MoE layers in the odd decoder layers against the same
   model dense.

Contenders are compiled first, then timed in alternating rounds; figures are medians.

    .venv/bin/python bench/moe_bench.py --rounds 5 --steps 3
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmt_jax.layers.mlp import MlpBlock
from mmt_jax.layers.moe import MoeBlock, MoeConfig
from mmt_jax.model import model_for
from mmt_jax.models.t5 import EncoderDecoder, t5_config
from mmt_jax.training.train_state import TrainState, train_step


def layer_contenders(args):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, args.length, args.d_model)),
                    jnp.float32)

    def timed(module):
        params = module.init(jax.random.key(0), x)["params"]

        def loss(p):
            out = module.apply({"params": p}, x, mutable=["intermediates"])[0]
            return jnp.mean(jnp.square(out))
        step = jax.jit(jax.value_and_grad(loss))
        return lambda: jax.block_until_ready(step(params))

    contenders = {"dense FFN d_ff=%d" % (args.k * args.d_ff):
                  timed(MlpBlock(args.k * args.d_ff))}
    for dispatch in ("einsum", "gather"):
        for group in args.groups:
            config = MoeConfig(num_experts=args.experts, num_selected=args.k, group_size=group,
                               eval_capacity_factor=1.0, min_capacity=1, dispatch=dispatch)
            contenders[f"MoE {dispatch}, groups of {group}"] = timed(MoeBlock(config, args.d_ff))
    return contenders


def model_contenders(args):
    rng = np.random.default_rng(0)
    b, le, ld = args.batch, args.length, 32
    targets = rng.integers(2, 1000, (b, ld)).astype(np.int32)
    batch = {"encoder_input_tokens": rng.integers(2, 1000, (b, le)).astype(np.int32),
             "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
             "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}
    contenders = {}
    for name, overrides in (("dense T5.1.1", {}),
                            ("MoE in odd decoder layers", dict(
                                moe=MoeConfig(num_experts=args.experts, num_selected=args.k,
                                              eval_capacity_factor=1.0, min_capacity=1),
                                decoder_moe_layers="odd"))):
        config = t5_config("small", vocab_size=1024, num_encoder_layers=4, num_decoder_layers=4,
                           **overrides)
        contenders[name] = train_and_decode(EncoderDecoder(config), batch)[0]
    return contenders


def model_bench_parser(doc, targets):
    """The arguments of the tiny-model benches (`report_train_and_decode`'s and their batch's)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--targets", type=int, default=targets)
    return p


def report_train_and_decode(models, args):
    """`{name: (module, batch)}`: each one's train step and greedy decoding, timed in alternating
    rounds (`args.rounds`, `args.steps`), as two tables against the first."""
    train, decode = {}, {}
    for name, (module, batch) in models.items():
        train[name], decode[name] = train_and_decode(module, batch)
    report("Train step (AdamW)", measure(train, args.rounds, args.steps))
    report(f"Greedy decoding, {args.targets} tokens", measure(decode, args.rounds, args.steps))


def train_and_decode(module, batch):
    """A module's timed calls on `batch`: `(train step, greedy decoding)`, each with no arguments.
    AdamW from random parameters; decoding reads the parameters trained so far."""
    model = model_for(module)
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    params = jax.jit(lambda key: model.get_initial_variables(key, shapes, types))(
        jax.random.key(0))["params"]
    step = jax.jit(functools.partial(train_step, model), donate_argnums=0)
    predict = jax.jit(model.predict_batch_with_aux)
    holder = {"state": TrainState.create(params, optax.adamw(1e-4))}

    def run_step():
        holder["state"], metrics = step(holder["state"], batch, None)
        jax.block_until_ready(metrics["loss"].compute())

    def run_decode():
        jax.block_until_ready(predict(holder["state"].params, batch))
    return run_step, run_decode


def measure(contenders, rounds, steps):
    for fn in contenders.values():  # compile
        fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title, medians):
    base_name = next(iter(medians))
    print(f"\n{title}\n| contender | median ms | over {base_name} |\n|---|---:|---:|")
    for name, t in medians.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / medians[base_name]:.2f}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("-k", type=int, default=2)
    p.add_argument("--groups", default="256,64", type=lambda s: [int(g) for g in s.split(",")])
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.local_device_count()} "
          f"device(s); batch {args.batch} x {args.length} tokens, d_model {args.d_model}")
    report(f"MoE layer ({args.experts} experts, top-{args.k}, d_ff {args.d_ff}), forward + backward",
           measure(layer_contenders(args), args.rounds, args.steps))
    if not args.skip_model:
        report("Train step, T5.1.1 small-width 4+4 layers, encoder 256 / decoder 32 tokens",
               measure(model_contenders(args), args.rounds, args.steps))


if __name__ == "__main__":
    main()
