"""Our T5 against Hugging Face transformers' PyTorch T5, through checkpoints exactly as
`save_pretrained` writes them, converted and exported by the `mmt-jax convert` command."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from mmt_jax import main
from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.t5 import EncoderDecoder
from mmt_jax.checkpoints import hf_t5, store
from tests.hf_reference import ODD, build_hf_t5, save_hf_checkpoint

VARIANTS = ["t5_1_1", "t5"]


def padded_tokens(rng, batch, length, vocab, min_length=3):
    lengths = rng.integers(min_length, length + 1, size=batch)
    lengths[0] = length  # one full row, so no column is all padding
    tokens = rng.integers(2, vocab, size=(batch, length))
    return np.where(np.arange(length)[None] < lengths[:, None], tokens, 0).astype(np.int32)


def hf_logits(model, enc, dec_inputs):
    """[batch, dec_length, vocab] logits of a transformers model."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long),
                     attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                     decoder_input_ids=torch.tensor(dec_inputs, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=VARIANTS)
def checkpoint(request, tmp_path_factory):
    """(variant, transformers model, its save_pretrained directory, our converted checkpoint)."""
    variant = request.param
    model = build_hf_t5(variant, **ODD)
    directory = save_hf_checkpoint(model, str(tmp_path_factory.mktemp(variant)), variant)
    ours = str(tmp_path_factory.mktemp(f"{variant}_ours") / "ckpt")
    assert main.run(["convert", "--from-hf", directory, "--to", ours]) == 0
    return variant, model, directory, ours


def test_config_recognises_variant(checkpoint):
    variant, _, directory, ours = checkpoint
    with open(os.path.join(directory, "config.json")) as f:
        written = json.load(f)
    # transformers 5's own layout: always "tied", the head told apart by scale_decoder_outputs.
    assert written["tie_word_embeddings"] is True
    assert written["scale_decoder_outputs"] is (variant == "t5")
    config = store.load_checkpoint(ours)[0].t5
    assert (config.vocab_size, config.emb_dim, config.head_dim, config.num_heads, config.mlp_dim,
            config.num_encoder_layers, config.num_decoder_layers) == (101, 36, 12, 3, 70, 3, 2)
    if variant == "t5_1_1":
        assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding
    else:
        assert config.mlp_activations == ("relu",) and config.logits_via_embedding


def test_logits_match_transformers(checkpoint):
    _, model, _, ours = checkpoint
    model_config, params = store.load_checkpoint(ours)
    config = model_config.t5
    rng = np.random.default_rng(0)
    enc = padded_tokens(rng, 4, 13, config.vocab_size)
    dec_targets = padded_tokens(rng, 4, 9, config.vocab_size)
    dec_inputs = np.concatenate([np.zeros((4, 1), np.int32), dec_targets[:, :-1]], axis=1)
    logits = EncoderDecoder(config).apply({"params": params}, enc, dec_inputs, dec_targets)
    theirs = hf_logits(model, enc, dec_inputs)
    valid = dec_targets > 0
    assert valid.sum() > 10
    np.testing.assert_allclose(np.asarray(logits)[valid], theirs[valid], atol=1e-4, rtol=1e-4)


def test_greedy_matches_transformers(checkpoint):
    _, model, _, ours = checkpoint
    model_config, params = store.load_checkpoint(ours)
    length = 8
    enc = padded_tokens(np.random.default_rng(1), 4, 11, model_config.t5.vocab_size)
    zeros = np.zeros((4, length), np.int32)
    tokens = EncoderDecoderModel(EncoderDecoder(model_config.t5)).predict_batch(params, {
        "encoder_input_tokens": enc, "decoder_input_tokens": zeros, "decoder_target_tokens": zeros})
    with torch.no_grad():
        theirs = model.generate(
            input_ids=torch.tensor(enc, dtype=torch.long),
            attention_mask=torch.tensor(enc > 0, dtype=torch.long), max_new_tokens=length,
            do_sample=False, num_beams=1, use_cache=False).numpy()[:, 1:]
    theirs = np.pad(theirs, ((0, 0), (0, length - theirs.shape[1])))
    np.testing.assert_array_equal(np.asarray(tokens), theirs)
    assert (theirs > 1).sum() >= 8  # real sequences, not an immediate EOS


def test_export_reloads_in_transformers(checkpoint, tmp_path):
    variant, model, _, ours = checkpoint
    out = str(tmp_path / "hf")
    assert main.run(["convert", "--from-checkpoint", ours, "--to-hf", out]) == 0
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    # Equal fields: transformers 4 (tie_word_embeddings) and 5 (scale_decoder_outputs) agree.
    assert written["tie_word_embeddings"] is written["scale_decoder_outputs"] is (variant == "t5")
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    rng = np.random.default_rng(2)
    enc, dec = (padded_tokens(rng, 3, n, ODD["vocab_size"]) for n in (7, 5))
    dec_inputs = np.concatenate([np.zeros((3, 1), np.int32), dec], axis=1)
    np.testing.assert_allclose(hf_logits(reloaded, enc, dec_inputs),
                               hf_logits(model, enc, dec_inputs), atol=1e-5)
    _, params = store.load_checkpoint(ours)
    _, params_again = hf_t5.load_hf_t5(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_again)


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path, capsys):
    model = build_hf_t5("t5", **ODD)
    with torch.no_grad():  # an original-T5 config, but its own head: save_pretrained writes both
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model.save_pretrained(str(tmp_path / "hf"))
    capsys.readouterr()  # transformers' progress bar
    out = tmp_path / "out"
    assert main.run(["convert", "--from-hf", str(tmp_path / "hf"), "--to", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "'lm_head.weight'" in err and str(tmp_path / "hf" / "model.safetensors") in err, err
    assert not out.exists()


def test_head_rules_of_both_transformers_versions():
    base = dict(vocab_size=8, d_model=4, num_heads=1, d_kv=4, d_ff=8, num_layers=1)
    tied = {  # config.json head fields -> logits via the (scaled) embedding?
        (): True,  # transformers 4, original T5 (the field's default)
        (("tie_word_embeddings", True),): True,
        (("tie_word_embeddings", False),): False,  # transformers 4, T5.1.1
        (("tie_word_embeddings", True), ("scale_decoder_outputs", True)): True,  # transformers 5
        (("tie_word_embeddings", True), ("scale_decoder_outputs", False)): False,
        (("scale_decoder_outputs", False),): False,
        (("tie_word_embeddings", False), ("scale_decoder_outputs", False)): False,  # our export
    }
    for fields, expected in tied.items():
        config = hf_t5.config_from_hf(dict(base, **dict(fields)))
        assert config.logits_via_embedding is expected, fields
    for fields, message in [
            (dict(tie_word_embeddings=False, scale_decoder_outputs=True), "transformers 4 reads"),
            (dict(tie_word_embeddings=None), "tie_word_embeddings is None")]:
        with pytest.raises(hf_t5.CheckpointFormatError, match=message):
            hf_t5.config_from_hf(dict(base, **fields))
