"""Builds random tiny Hugging Face (PyTorch) T5 models and saves them as transformers itself does.

Test-only: torch and transformers are the independent reference; the package never imports them.
"""
import os

import safetensors
import torch
import transformers

TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
            num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=20,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
# Sizes that no two of them share, and more encoder than decoder layers (TINY has fewer).
ODD = dict(TINY, vocab_size=101, d_model=36, d_kv=12, d_ff=70, num_heads=3, num_layers=3,
           num_decoder_layers=2)


def build_hf_t5(variant: str, seed: int = 0, **overrides) -> transformers.T5ForConditionalGeneration:
    """variant: "t5_1_1" (gated-gelu, separate unscaled head), "t5" (relu, tied + scaled head)."""
    torch.manual_seed(seed)
    fields = dict(TINY, **overrides)
    if variant == "t5_1_1":
        fields.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    else:
        fields.update(feed_forward_proj="relu")
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**fields)).eval()
    with torch.no_grad():
        # transformers' init leaves several tables tiny or zero; randomise everything so a wrong
        # mapping cannot hide behind symmetric weights.
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        if variant == "t5_1_1":
            # transformers 5 builds every T5 with lm_head tied to the shared embedding;
            # T5.1.1's is its own.
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.3)
    return model


def save_hf_checkpoint(model: transformers.T5ForConditionalGeneration, directory: str,
                       variant: str) -> str:
    """`model.save_pretrained(directory)`, nothing rewritten; checks the file holds `variant`'s head
    (a separate `lm_head.weight` for "t5_1_1", none for the tied "t5"). Returns `directory`."""
    model.save_pretrained(directory)
    with safetensors.safe_open(os.path.join(directory, "model.safetensors"), "numpy") as f:
        assert ("lm_head.weight" in f.keys()) == (variant == "t5_1_1"), variant
    return directory
