"""Builds random tiny Hugging Face (PyTorch) T5 models and writes them as real checkpoint directories.

Test-only: torch and transformers are the independent reference; the package never imports them.
"""
import json
import os

import safetensors.torch
import torch
import transformers

TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
            num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=20,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def build_hf_t5(variant: str, seed: int = 0, **overrides) -> transformers.T5ForConditionalGeneration:
    """variant: "t5_1_1" (gated-gelu, untied head), "t5" (relu, tied + scaled)."""
    torch.manual_seed(seed)
    fields = dict(TINY, **overrides)
    if variant == "t5_1_1":
        fields.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    else:
        fields.update(feed_forward_proj="relu", tie_word_embeddings=True)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**fields)).eval()
    with torch.no_grad():
        # transformers' init leaves several tables tiny or zero; randomise everything so a wrong
        # mapping cannot hide behind symmetric weights.
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        if variant == "t5_1_1":
            # transformers 5.x always ties lm_head to the shared embedding; T5.1.1 checkpoints do not.
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.3)
            assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    return model


def save_hf_checkpoint(model: transformers.T5ForConditionalGeneration, directory: str,
                       variant: str) -> str:
    """Writes config.json + model.safetensors as a hub checkpoint of that variant holds them."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if variant == "t5":
        state.pop("lm_head.weight", None)  # tied: hub checkpoints of the original T5 omit it
    safetensors.torch.save_file(state, os.path.join(directory, "model.safetensors"),
                                metadata={"format": "pt"})
    config = model.config.to_dict()
    config["tie_word_embeddings"] = variant == "t5"
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory
