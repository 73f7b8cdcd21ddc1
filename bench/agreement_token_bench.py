"""What the agreement token costs: the multitask job's MMT4 with the contrastive head, without the
token, with it over all of the encoder's text, and over its first 20 tokens (`runs/contrastive.gin`).

The tiny MMT4 of the multitask job (T5.1.1 tiny, catalog vocabulary 896) reading the stored
Lite0+pixels features (32 vectors of 1472 through the colour histogram), head width 128 at weight
0.25, batch 32, inputs 64 / targets 20 / paired texts 20 tokens. Train step: AdamW, forward +
backward + update, the contrastive loss included (the features alone are encoded once per step, for
the head and the token). Decoding: greedy over the targets' length, cached (the token is computed
once, with the encoder's output). Contenders are compiled first, then timed in alternating
rounds; figures are medians (`moe_bench.measure`).

    .venv/bin/python bench/agreement_token_bench.py --rounds 3 --steps 3
"""
import functools

import jax
import numpy as np
from moe_bench import model_bench_parser, report_train_and_decode

from mmt_jax.models.config import ModelConfig
from mmt_jax.models.contrastive import ContrastiveConfig
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.t5 import t5_config

VOCAB, VECTORS, FEATURE_DIM = 896, 32, 1472


def _batch(args) -> dict:
    rng = np.random.default_rng(0)
    b = args.batch
    targets = rng.integers(2, VOCAB, (b, args.targets)).astype(np.int32)
    return {"encoder_input_tokens": rng.integers(2, VOCAB, (b, args.inputs)).astype(np.int32),
            "encoder_image_features": rng.normal(size=(b, VECTORS, FEATURE_DIM)).astype(np.float32),
            "encoder_image_mask": np.ones((b,), np.int32),
            "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
            "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets),
            "pair_text_tokens": rng.integers(2, VOCAB, (b, args.pair)).astype(np.int32),
            "pair_label": np.ones((b,), np.int32)}


def _configs(args):
    image = FusionConfig(representator="precomputed", feature_dim=FEATURE_DIM, pixel_features=192,
                         colour_histogram=64)
    head = functools.partial(ContrastiveConfig, dim=128, loss_weight=0.25)
    heads = {"head, no token": head(),
             f"token over all {args.inputs} text tokens": head(agreement_token=True),
             "token over the first 20 (the recipe)": head(agreement_token=True,
                                                          agreement_text_length=20)}
    return {name: ModelConfig(t5_config("tiny", vocab_size=VOCAB), fusion=image, contrastive=h)
            for name, h in heads.items()}


def main():
    p = model_bench_parser(__doc__, targets=20)
    p.add_argument("--pair", type=int, default=20)
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch}, inputs "
          f"{args.inputs} / targets {args.targets} / paired texts {args.pair} tokens, {VECTORS} "
          f"image vectors of {FEATURE_DIM}")
    batch = _batch(args)
    report_train_and_decode({name: (config.module(), batch)
                             for name, config in _configs(args).items()}, args)


if __name__ == "__main__":
    main()
