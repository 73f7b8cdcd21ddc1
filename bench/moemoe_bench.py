"""MoEMoE against MMT4 of the same width: train step and greedy decoding, one process.

The tiny models of the main job and of `mmt_jax/gin/models/moemoe_tiny_lite0.gin` (T5.1.1 tiny, 2+2 layers,
d_model 128, catalog vocabulary 896) reading the main job's stored image features (32 vectors of
1472, Lite0+pixels), batch 32, context 64 / answer 8 tokens:
- MMT4: one encoder over the 64 text tokens fused with the 32 image vectors (96 positions);
- MoEMoE: a question encoder and a context encoder (64 each), the image brought to 64 positions,
  the source gate, the alignment projections, and MoE (8 experts, top-2) in the odd decoder layers;
- MoEMoE with a dense decoder, to tell the multi-source encoder's cost from the experts'.

Train step: AdamW, forward + backward + update. Decoding: greedy, 8 tokens, cached. Contenders are
compiled first, then timed in alternating rounds; figures are medians (`moe_bench.measure`).

    .venv/bin/python bench/moemoe_bench.py --rounds 3 --steps 3
"""

import jax
import numpy as np
from moe_bench import model_bench_parser, report_train_and_decode

from mmt_jax.layers.moe import MoeConfig
from mmt_jax.models.config import ModelConfig
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.moemoe import MultiSourceConfig
from mmt_jax.models.t5 import t5_config

VOCAB, VECTORS, FEATURE_DIM = 896, 32, 1472


def _batch(args, question: bool) -> dict:
    rng = np.random.default_rng(0)
    b = args.batch
    targets = rng.integers(2, VOCAB, (b, args.targets)).astype(np.int32)
    batch = {"encoder_input_tokens": rng.integers(2, VOCAB, (b, args.inputs)).astype(np.int32),
             "encoder_image_features": rng.normal(size=(b, VECTORS, FEATURE_DIM)).astype(np.float32),
             "encoder_image_mask": np.ones((b,), np.int32),
             "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]],
                                                    1),
             "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}
    if question:
        batch["encoder_question_tokens"] = np.zeros((b, args.inputs), np.int32)
        batch["encoder_question_tokens"][:, :3] = rng.integers(2, VOCAB, (b, 3))
    return batch


def _configs():
    image = FusionConfig(representator="precomputed", feature_dim=FEATURE_DIM)
    moe = dict(moe=MoeConfig(num_experts=8, num_selected=2), decoder_moe_layers="odd")
    return {"MMT4": ModelConfig(t5_config("tiny", vocab_size=VOCAB), fusion=image),
            "MoEMoE, dense decoder": ModelConfig(t5_config("tiny", vocab_size=VOCAB),
                                                 sources=MultiSourceConfig(image)),
            "MoEMoE (MoE decoder)": ModelConfig(t5_config("tiny", vocab_size=VOCAB, **moe),
                                                sources=MultiSourceConfig(image))}


def main():
    p = model_bench_parser(__doc__, targets=8)
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch}, context "
          f"{args.inputs} / answer {args.targets} tokens, {VECTORS} image vectors of {FEATURE_DIM}")
    report_train_and_decode({name: (config.module(),
                                    _batch(args, question=config.sources is not None))
                             for name, config in _configs().items()}, args)


if __name__ == "__main__":
    main()
