"""Command-line entry points: `mmt-jax <command>` (also `python -m mmt_jax.main <command>`).

  convert --from-hf DIR --to CHECKPOINT       Hugging Face T5 (config.json + model.safetensors) -> ours
  convert --from-t5x DIR --to CHECKPOINT      t5x checkpoint (orbax or legacy tensorstore) -> ours
  convert --from-checkpoint CHECKPOINT --to-hf DIR    ours -> Hugging Face T5
  data convert --jsonl [SPLIT=]F ... [--images DIR] --out DIR [--name NAME] [--on-error fail|skip]
               [--image-features SPEC] [--max-image-side PX] [--allow-absolute-image-paths]
                                              a JSONL catalog (+ images) -> TFDS catalog under DIR
  data generate --out DIR [--num-products N] [--image-features SPEC]
                                              the embedded synthetic catalog -> TFDS catalog under DIR
  data vocab --out FILE                       retrains the catalog SentencePiece vocabulary
  train --gin_file=F [--gin_file=G ...] [--gin.NAME=VALUE ...]
                                              trains as the gin files say (mmt_jax/gin/runs/*.gin)
  eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=... --gin.TASK=... --gin.EVAL_OUTPUT_DIR=...
                                              a checkpoint's task metrics: report.json + plots
  infer --checkpoint DIR --input F --prompt P [--prompt Q ...] --out F [--on-error fail|skip]
        [--closed-set | --values FILE] [--multihost]
                                              products -> JSONL of predictions with scores
                                              (multi-host: each process its share, its own file)
  serve --checkpoint DIR [--port 8000] [--prompt P ...] [--closed-set | --values FILE]
                                              a page and a JSON endpoint: image + title -> attributes
  demo [--workdir DIR]                        the main job: pretrains and fine-tunes a tiny MMT4 and
                                              a text-only T5 on the embedded catalog, then prints
                                              their per-attribute accuracy (Table 2's shape)
"""
import argparse
import json
import os
import sys

# TensorFlow's C++ notices (tf.data's note on a cache read in part, ...) are not the user's business
# on the command line; set before TensorFlow loads, and an explicit value wins. TensorFlow runs only
# the input pipeline (decode, resize, casts), where its oneDNN kernels gain nothing and log an error
# line for every float16 cast on CPUs without AVX-512: its Eigen kernels are used. (`quiet_startup`
# does the rest.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from mmt_jax import quiet_startup  # noqa: E402
from mmt_jax.data.records import MAX_IMAGE_SIDE, ConversionError, RecordError  # noqa: E402
from mmt_jax.errors import (CheckpointError, CheckpointFormatError, GinError, InputError,  # noqa: E402
                            ModelDirInUseError, TrainingError, UnknownTaskError)


def _convert(args) -> None:
    from mmt_jax.models.config import ModelConfig
    from mmt_jax.checkpoints import hf_t5, store, t5x_checkpoint
    if args.from_hf or args.from_t5x:
        if not args.to:
            raise SystemExit("convert --from-hf/--from-t5x needs --to CHECKPOINT_DIR")
        if args.from_hf:
            config, params = hf_t5.load_hf_t5(args.from_hf)
        else:
            config, params = t5x_checkpoint.load_t5x(args.from_t5x, args.num_heads)
        path = store.save_checkpoint(args.to, params, ModelConfig(config), force=args.force)
        print(f"converted {args.from_hf or args.from_t5x} -> {path} ({_describe(config, params)})")
    elif args.from_checkpoint:
        if not args.to_hf:
            raise SystemExit("convert --from-checkpoint needs --to-hf DIR")
        model_config, params = store.load_checkpoint(args.from_checkpoint)
        if model_config.image_branch is not None:
            raise CheckpointFormatError(f"{args.from_checkpoint} is a multimodal checkpoint; only its text "
                                        "part has a Hugging Face T5 form, and exporting it is not "
                                        "supported yet")
        config = model_config.t5
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


def _data_convert(args) -> None:
    from mmt_jax.data import tfds_catalog
    if args.max_image_side < 1:
        raise SystemExit("--max-image-side must be a positive number of pixels")
    config = tfds_catalog.jsonl_config(
        args.name, args.jsonl, args.images, validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction, on_error=args.on_error, image_features=args.image_features,
        allow_absolute_image_paths=args.allow_absolute_image_paths,
        max_image_side=args.max_image_side)
    print(tfds_catalog.summary(_prepare_catalog(config, args)))


def _data_generate(args) -> None:
    from mmt_jax.data import tfds_catalog
    print(tfds_catalog.summary(_prepare_catalog(tfds_catalog.embedded_config(
        args.num_products, args.seed, args.image_size, args.image_features), args)))


def _prepare_catalog(config, args):
    """`tfds_catalog.prepare` with the flags; Ctrl-C is one error line (nothing was written)."""
    from mmt_jax.data import tfds_catalog
    try:
        return tfds_catalog.prepare(config, args.out, num_shards=args.num_shards,
                                    overwrite=args.force)
    except KeyboardInterrupt:
        raise ConversionError(f"interrupted: nothing was written to {args.out} (an existing "
                              f"catalog {config.name!r} there is unchanged)") from None


def _data_vocab(args) -> None:
    from mmt_jax.data import vocabulary
    path = vocabulary.train_catalog_vocabulary(args.out, num_products=args.num_products,
                                               vocab_size=args.vocab_size)
    print(f"wrote {path}")


def _run_gin(args, configurable):
    from mmt_jax import gin_config
    return gin_config.run_configured(configurable, args.gin_file, args.gin_bindings,
                                     args.gin_search_path)


def _train(args) -> None:
    import jax
    from mmt_jax import train
    _initialize_distributed(args)
    result = _run_gin(args, train.train)
    if jax.process_index() != 0:
        return  # the chief reports for all
    print(f"finished at step {result.step}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in {**result.train_metrics,
                                    **{f"eval_{k}": v for k, v in result.eval_metrics.items()}}.items()))


def _eval(args) -> None:
    from mmt_jax import evaluate
    report = _run_gin(args, evaluate.evaluate)
    print(f"wrote the report of {len(report['tasks'])} task(s) and {len(report['plots'])} plot(s) to "
          f"{report['output_dir']}")


def _infer(args) -> None:
    from mmt_jax import infer
    from mmt_jax.predictor import Predictor
    import jax
    _initialize_distributed(args)
    local = jax.local_devices()
    if args.devices is not None and not 1 <= args.devices <= len(local):
        raise InputError(f"--devices {args.devices}: this process has {len(local)} local "
                         f"device(s) ({local[0].platform})")
    predictor = Predictor.from_checkpoint(
        args.checkpoint, input_length=args.input_length, target_length=args.target_length,
        batch_size=args.batch_size, num_beams=args.num_beams,
        value_sets=_value_sets(args.values, args.checkpoint if args.closed_set else None),
        devices=local[:args.devices], int8=args.int8)
    shard = (jax.process_index(), jax.process_count())
    out = infer.shard_path(args.out, *shard)
    count = infer.infer(predictor, args.input, out, args.prompt, images_dir=args.images,
                        with_description=args.with_description, on_error=args.on_error,
                        allow_absolute_image_paths=args.allow_absolute_image_paths, shard=shard)
    print(f"wrote {count} predictions to {out}")


def _serve(args) -> None:
    from mmt_jax import serve
    from mmt_jax.checkpoints import store
    from mmt_jax.predictor import Predictor
    checkpoint = store.resolve(args.checkpoint)
    prompts = serve.attribute_prompts(store.load_config(checkpoint).prompts, args.prompt)
    predictor = Predictor.from_checkpoint(  # one product's prompts in one batch
        checkpoint, input_length=args.input_length, target_length=args.target_length,
        batch_size=len(prompts), num_beams=args.num_beams,
        value_sets=_value_sets(args.values, checkpoint if args.closed_set else None),
        int8=args.int8)
    app = serve.create_app(predictor, prompts, max_upload_bytes=int(args.max_upload_mb * 2 ** 20),
                           name=args.checkpoint)
    serve.serve(app, args.host, args.port)


def _value_sets(values_file: str | None, checkpoint: str | None) -> dict | None:
    """infer's closed sets, `{prompt: values}`: a taxonomy file's (`{"attribute": [values]}`), or
    the values the checkpoint's training catalog gives each attribute in its training split."""
    from mmt_jax import tasks
    from mmt_jax.checkpoints import store
    from mmt_jax.data import prompts
    if values_file is not None:
        try:
            with open(values_file, encoding="utf-8") as f:
                taxonomy = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"--values {values_file}: {getattr(e, 'strerror', None) or e}") from None
        bad = [k for k, v in taxonomy.items() if not isinstance(v, list) or not v
               or not all(isinstance(x, str) and x for x in v)] if isinstance(taxonomy, dict) else [""]
        if bad:
            raise InputError(f"--values {values_file}: expected {{\"attribute\": [\"value\", ...]}} "
                             f"with at least one non-empty value each; "
                             + (f"attribute {bad[0]!r} is not" if bad[0] else "the file is not"))
        return {prompts.attribute_prompt(a): v for a, v in taxonomy.items()}
    if checkpoint is None:
        return None
    task = store.load_config(checkpoint).trained_task
    if task is None:
        raise InputError(f"{checkpoint} does not record its training catalog, so --closed-set has "
                         "no values to take: give them with --values FILE")
    return {prompts.attribute_prompt(a): v
            for a, v in tasks.catalog_values(task["data_dir"], task["catalog"]).items()}


def _initialize_distributed(args) -> None:
    """Multi-host: `jax.distributed.initialize` from the flags, or from the environment (TPU pods,
    SLURM, ...) when `--multihost` is given without them."""
    import jax
    if args.coordinator_address or args.multihost:
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)


def _demo(args) -> None:
    from mmt_jax import demo
    demo.run(workdir=args.workdir, job=args.job, pretrain_steps=args.pretrain_steps,
             finetune_steps=args.finetune_steps, num_products=args.num_products,
             learning_rate=args.learning_rate)


def _settings_help(run_file: str, note: str = "") -> str:
    """The settings of `run_file` (and the files it includes) with their defaults, for --help."""
    from mmt_jax import gin_config
    lines = [f"settings (--gin.NAME=VALUE) with their defaults in mmt_jax/gin/{run_file} and the "
             f"files it includes{note}:"]
    for name, value, comment in gin_config.settings(run_file):
        value = "required" if value == "%gin.REQUIRED" else value
        lines.append(f"  {name:<24} {value}" + (f"   # {comment}" if comment else ""))
    return "\n".join(lines)


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
    data = commands.add_parser("data", help="convert or generate catalogs, build the vocabulary")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    convert_data = data_commands.add_parser("convert", help="JSONL catalog -> TFDS catalog")
    convert_data.add_argument(
        "--jsonl", required=True, nargs="+", action="extend", metavar="[SPLIT=]FILE",
        help="one product per line (README: Data); several files or globs, each optionally "
             "SPLIT= (train, validation, test) for its records that name no split")
    convert_data.add_argument("--images", default=None,
                              help="directory of the image paths (default: the current directory); "
                                   "a path leading outside it is a bad record")
    absolute_help = "also read absolute image paths (by default a bad record)"
    convert_data.add_argument("--allow-absolute-image-paths", action="store_true", help=absolute_help)
    convert_data.add_argument("--max-image-side", type=int, default=MAX_IMAGE_SIDE,
                              metavar="PIXELS",
                              help="store images shrunk to this longest side (default: "
                                   f"{MAX_IMAGE_SIDE}, above the largest representator's "
                                   "input)")
    convert_data.add_argument("--out", required=True, help="TFDS data_dir to write under")
    convert_data.add_argument("--name", default="catalog", help="catalog (builder config) name")
    convert_data.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                              help="stop at bad records (default) or leave them out; both list them")
    convert_data.add_argument("--validation-fraction", type=float, default=0.05)
    convert_data.add_argument("--test-fraction", type=float, default=0.05)
    convert_data.add_argument("--num-shards", type=int, default=None,
                              help="TFRecord files per split (default: by size); multi-host "
                                   "training wants at least one per process")
    features_help = ("also store each product's features from this frozen pretrained network, "
                     "e.g. efficientnet-lite0-px128 (vision/extractors.py)")
    convert_data.add_argument("--image-features", metavar="SPEC", default=None, help=features_help)
    convert_data.add_argument("--force", action="store_true", help="rewrite an existing catalog")
    convert_data.set_defaults(run=_data_convert)
    generate = data_commands.add_parser("generate", help="write the embedded synthetic catalog")
    generate.add_argument("--out", required=True, help="TFDS data_dir to write under")
    generate.add_argument("--num-products", type=int, default=3000)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--image-size", type=int, default=128)
    generate.add_argument("--num-shards", type=int, default=4)
    generate.add_argument("--image-features", metavar="SPEC", default=None, help=features_help)
    generate.add_argument("--force", action="store_true", help="rewrite an existing catalog")
    generate.set_defaults(run=_data_generate)
    vocab = data_commands.add_parser("vocab", help="train the catalog SentencePiece vocabulary")
    vocab.add_argument("--out", required=True, help="path of the .model file to write")
    vocab.add_argument("--num-products", type=int, default=None, help="default: as shipped")
    vocab.add_argument("--vocab-size", type=int, default=None, help="default: as shipped")
    vocab.set_defaults(run=_data_vocab)
    gin_search = argparse.ArgumentParser(add_help=False)
    gin_search.add_argument("--gin_file", action="append", default=[], required=True,
                            help="gin file (searched in the package's gin/ and --gin_search_path)")
    gin_search.add_argument("--gin_search_path", action="append", default=[])
    distributed = argparse.ArgumentParser(add_help=False)  # jax.distributed, for train and infer
    distributed.add_argument("--multihost", action="store_true",
                             help="call jax.distributed.initialize() (settings from the environment)")
    distributed.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    distributed.add_argument("--num_processes", type=int, default=None)
    distributed.add_argument("--process_id", type=int, default=None)
    train = commands.add_parser("train", parents=[gin_search, distributed], help="train a model as gin files say",
                                description="Bindings are --gin.NAME=VALUE (strings in quotes: "
                                            "--gin.MODEL_DIR=\\\"runs/x\\\").",
                                epilog=_settings_help("runs/catalog.gin", "; runs/pretrain.gin and "
                                                      "runs/finetune.gin set TASK and more"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.set_defaults(run=_train)
    evaluate = commands.add_parser(
        "eval", parents=[gin_search], help="a checkpoint on its tasks' metrics: JSON report + plots",
        description="Bindings are --gin.NAME=VALUE, as for train.", epilog=_settings_help("runs/eval.gin"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.set_defaults(run=_eval)
    predicting = argparse.ArgumentParser(add_help=False)  # the Predictor's, for infer and serve
    predicting.add_argument("--checkpoint", required=True,
                            help="a checkpoint, or a model dir (newest)")
    predicting.add_argument("--num-beams", type=int, default=1, help="1: greedy; more: beam search")
    predicting.add_argument("--input-length", type=int, default=128,
                            help="tokens; longer is an error")
    predicting.add_argument("--target-length", type=int, default=16, help="most tokens generated")
    predicting.add_argument("--int8", action="store_true",
                            help="dense kernels and activations in int8 (README: int8 decoding)")
    closed = predicting.add_mutually_exclusive_group()
    closed.add_argument("--closed-set", action="store_true",
                        help="answer each attribute only with a value its training catalog gives it")
    closed.add_argument("--values", default=None, metavar="FILE",
                        help='JSON {"attribute": ["value", ...]}: answer those attributes only with '
                             "their listed values (closed-set decoding)")
    infer = commands.add_parser("infer", parents=[predicting, distributed],
                                help="products (JSONL or TFRecord) -> JSONL of predictions")
    infer.add_argument("--input", required=True,
                       help="catalog .jsonl, or a glob of TFRecord files from `data convert`")
    infer.add_argument("--images", default=None,
                       help="directory of the JSONL's image paths (default: the current directory)")
    infer.add_argument("--allow-absolute-image-paths", action="store_true", help=absolute_help)
    infer.add_argument("--prompt", action="append", default=[], required=True,
                       help="e.g. color: (repeat for several; each product gets each prompt)")
    infer.add_argument("--out", required=True, help="JSONL of {id, prompt, prediction, score}")
    infer.add_argument("--with-description", action="store_true",
                       help="append the description to the title (if the model was trained so)")
    infer.add_argument("--batch-size", type=int, default=16,
                       help="queries per step, over all devices (rounded up to whole rows each)")
    infer.add_argument("--devices", type=int, default=None, metavar="N",
                       help="split each batch over the first N local devices (default: all)")
    infer.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                       help="a bad JSONL record stops the run (default) or is skipped and reported")
    infer.set_defaults(run=_infer)
    serve = commands.add_parser("serve", parents=[predicting],
                                help="a page and a JSON endpoint to try a checkpoint in a browser")
    serve.add_argument("--prompt", action="append", default=[],
                       help="e.g. color: (repeat for several; default: the attribute prompts the "
                            "checkpoint was trained on)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port")
    serve.add_argument("--max-upload-mb", type=float, default=10.0,
                       help="a larger request is refused with 413")
    serve.set_defaults(run=_serve)
    demo = commands.add_parser("demo", help="the main job: MMT4 vs text-only T5 on the embedded "
                                             "catalog (Table 2's shape), ~12 min on 2 cores")
    demo.add_argument("--workdir", default=os.path.join("runs", "demo"))
    demo.add_argument("--job", choices=("table2", "multitask", "moemoe"), default="table2",
                      help="table2: MMT4 vs T5 on the attributes (default); multitask: MMT4 with "
                           "the contrastive head on attributes, titles and matching in one run; "
                           "moemoe: MoEMoE and its Fig. 5 ablations beside table2's models")
    demo.add_argument("--pretrain-steps", type=int, default=300,
                      help="0: fine-tune from scratch")
    demo.add_argument("--finetune-steps", type=int, default=None, help="default: the job's")
    demo.add_argument("--num-products", type=int, default=3000)
    demo.add_argument("--learning-rate", type=float, default=None,
                      help="AdamW's peak rate for every run (default: the job's own, "
                           "mmt_jax/demo.py JOBS)")
    demo.set_defaults(run=_demo)
    return parser


def run(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.gin_bindings = [a[len("--gin."):] for a in unknown if a.startswith("--gin.")]
    others = [a for a in unknown if not a.startswith("--gin.")]
    if others or (args.gin_bindings and args.command not in ("train", "eval")):
        parser.error(f"unrecognized arguments: {' '.join(others or unknown)}")
    if args.command != "convert":  # every other command reads data through TensorFlow
        quiet_startup.import_tensorflow()
    try:
        args.run(args)
    except (FileNotFoundError, FileExistsError, CheckpointError, ConversionError, GinError,
            TrainingError, UnknownTaskError, InputError, RecordError, ModelDirInUseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
