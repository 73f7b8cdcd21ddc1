"""Our T5 against Hugging Face transformers' PyTorch T5, through a real safetensors checkpoint."""
import jax
import numpy as np
import pytest
import torch

from mmt_jax.models.t5 import EncoderDecoder
from mmt_jax.training import hf_t5
from tests.hf_reference import build_hf_t5, save_hf_checkpoint

VARIANTS = ["t5_1_1", "t5"]


def padded_tokens(rng, batch, length, vocab, min_length=3):
    lengths = rng.integers(min_length, length + 1, size=batch)
    lengths[0] = length  # one full row, so no column is all padding
    tokens = rng.integers(2, vocab, size=(batch, length))
    return np.where(np.arange(length)[None] < lengths[:, None], tokens, 0).astype(np.int32)


@pytest.fixture(scope="module", params=VARIANTS)
def checkpoint(request, tmp_path_factory):
    variant = request.param
    model = build_hf_t5(variant)
    directory = save_hf_checkpoint(model, str(tmp_path_factory.mktemp(variant)), variant)
    config, params = hf_t5.load_hf_t5(directory)
    return variant, model, config, params, directory


def test_config_recognises_variant(checkpoint):
    variant, _, config, _, _ = checkpoint
    if variant == "t5_1_1":
        assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding
    else:
        assert config.mlp_activations == ("relu",) and config.logits_via_embedding


def test_logits_match_transformers(checkpoint):
    _, model, config, params, _ = checkpoint
    rng = np.random.default_rng(0)
    enc = padded_tokens(rng, 4, 13, config.vocab_size)
    dec_targets = padded_tokens(rng, 4, 9, config.vocab_size)
    dec_inputs = np.concatenate([np.zeros((4, 1), np.int32), dec_targets[:, :-1]], axis=1)
    ours = EncoderDecoder(config).apply({"params": params}, enc, dec_inputs, dec_targets)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(enc, dtype=torch.long),
                       attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                       decoder_input_ids=torch.tensor(dec_inputs, dtype=torch.long)).logits.numpy()
    valid = dec_targets > 0
    assert valid.sum() > 10
    np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=1e-4, rtol=1e-4)


def test_export_round_trip_loads_in_transformers(checkpoint, tmp_path):
    variant, model, config, params, _ = checkpoint
    import transformers
    hf_t5.save_hf_t5(params, config, str(tmp_path))
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    if variant == "t5_1_1":
        # transformers 5 ties lm_head on load; put back the exported head to compare like for like.
        from safetensors.torch import load_file
        reloaded.lm_head.weight = torch.nn.Parameter(load_file(str(tmp_path / "model.safetensors"))["lm_head.weight"])
    ids = torch.tensor([[5, 6, 7, 8, 1]])
    with torch.no_grad():
        a = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 9, 10]])).logits
        b = reloaded(input_ids=ids, decoder_input_ids=torch.tensor([[0, 9, 10]])).logits
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    _, params_again = hf_t5.load_hf_t5(str(tmp_path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_again)
