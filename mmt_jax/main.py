"""Command-line entry points: `mmt-jax convert ...` and `mmt-jax demo` (also `python -m mmt_jax.main`).

  convert --from-hf DIR --to CHECKPOINT       Hugging Face T5 (config.json + model.safetensors) -> ours
  convert --from-t5x DIR --to CHECKPOINT      t5x checkpoint (orbax or legacy tensorstore) -> ours
  convert --from-checkpoint CHECKPOINT --to-hf DIR    ours -> Hugging Face T5
  demo [--steps N] [--workdir DIR]            trains the tiny T5 to sort generated token sequences,
                                              then decodes held-out ones and saves a checkpoint
"""
import argparse
import os
import sys

from mmt_jax.training.hf_t5 import CheckpointFormatError


def _convert(args) -> None:
    from mmt_jax.training import checkpoints, hf_t5, t5x_checkpoint
    if args.from_hf or args.from_t5x:
        if not args.to:
            raise SystemExit("convert --from-hf/--from-t5x needs --to CHECKPOINT_DIR")
        if args.from_hf:
            config, params = hf_t5.load_hf_t5(args.from_hf)
        else:
            config, params = t5x_checkpoint.load_t5x(args.from_t5x, args.num_heads)
        path = checkpoints.save_checkpoint(args.to, params, config, force=args.force)
        print(f"converted {args.from_hf or args.from_t5x} -> {path} ({_describe(config, params)})")
    elif args.from_checkpoint:
        if not args.to_hf:
            raise SystemExit("convert --from-checkpoint needs --to-hf DIR")
        config, params = checkpoints.load_checkpoint(args.from_checkpoint)
        hf_t5.save_hf_t5(params, config, args.to_hf)
        print(f"exported {args.from_checkpoint} -> {args.to_hf} ({_describe(config, params)})")
    else:
        raise SystemExit("convert needs --from-hf DIR, --from-t5x DIR or --from-checkpoint DIR")


def _describe(config, params) -> str:
    import jax
    import numpy as np
    n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    variant = "original T5" if config.logits_via_embedding else "T5.1.1"
    return (f"{variant}, {n / 1e6:.1f}M parameters, d_model {config.emb_dim}, "
            f"{config.num_encoder_layers}+{config.num_decoder_layers} layers")


def _demo(args) -> None:
    from mmt_jax.training import sort_demo
    sort_demo.run(steps=args.steps, workdir=args.workdir, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmt-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="import or export model weights")
    convert.add_argument("--from-hf", metavar="DIR", help="Hugging Face T5 checkpoint directory")
    convert.add_argument("--from-t5x", metavar="DIR",
                         help="t5x checkpoint_<step> directory, or a model dir (latest step)")
    convert.add_argument("--num-heads", type=int, default=None,
                         help="with --from-t5x: check the head count (default: read from the "
                              "relative position table)")
    convert.add_argument("--from-checkpoint", metavar="DIR", help="an mmt_jax checkpoint")
    convert.add_argument("--to", metavar="CHECKPOINT_DIR", help="where to write the mmt_jax checkpoint")
    convert.add_argument("--to-hf", metavar="DIR", help="where to write the Hugging Face checkpoint")
    convert.add_argument("--force", action="store_true", help="replace an existing --to directory")
    convert.set_defaults(run=_convert)
    demo = commands.add_parser("demo", help="train the tiny T5 on generated text for a few steps")
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--workdir", default=os.path.join("runs", "demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, FileExistsError, CheckpointFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
