"""Decoding over the cache: equals full recompute, beam search is exact when wide enough, scores are
log-likelihoods, and greedy equals transformers' generate."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmt_jax import decoding
from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.t5 import EncoderDecoder, t5_config
from mmt_jax.checkpoints import hf_t5
from tests.hf_reference import build_hf_t5, save_hf_checkpoint
from tests.test_hf_parity import padded_tokens


def make_model(variant="t5_1_1", vocab=64, **overrides):
    config = t5_config("tiny", variant, vocab_size=vocab, emb_dim=32, num_heads=2, head_dim=8,
                       mlp_dim=48, num_decoder_layers=3, **overrides)
    model = EncoderDecoderModel(EncoderDecoder(config))
    shapes = {"encoder_input_tokens": (2, 6), "decoder_input_tokens": (2, 5),
              "decoder_target_tokens": (2, 5)}
    params = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(
        jax.random.PRNGKey(1))["params"]
    # Larger weights than the default init make the distributions peaked and the tokens varied.
    params = jax.tree_util.tree_map(lambda p: p * 3.0 if p.ndim == 2 else p, params)
    return model, params


def batch_for(enc, dec_length):
    b = enc.shape[0]
    zeros = np.zeros((b, dec_length), np.int32)
    return {"encoder_input_tokens": jnp.asarray(enc), "decoder_input_tokens": zeros,
            "decoder_target_tokens": zeros}


def greedy_by_recompute(model, params, enc, length, eos_id=1):
    """Reference: re-runs the whole decoder (no cache) at every step. The decoder input is always
    `length` long (the prefix, then padding): the causal mask keeps step i's logits to the prefix,
    and one compiled forward serves every step."""
    b = enc.shape[0]
    out = np.zeros((b, length), np.int32)
    ended = np.zeros(b, bool)
    forward = jax.jit(lambda tokens: model.module.apply({"params": params}, enc, tokens))
    for i in range(length):
        dec_in = np.concatenate([np.zeros((b, 1), np.int32), out[:, :length - 1]], axis=1)
        logits = np.asarray(forward(dec_in))[:, i]
        nxt = np.where(ended, 0, np.argmax(logits, -1))
        out[:, i] = nxt
        ended |= nxt == eos_id
    return out


@pytest.mark.parametrize("variant", ["t5_1_1", "t5"])
def test_cached_greedy_equals_full_recompute(variant):
    model, params = make_model(variant)
    enc = padded_tokens(np.random.default_rng(0), 3, 7, 64)
    tokens, _ = model.predict_batch_with_aux(params, batch_for(enc, 8))
    expected = greedy_by_recompute(model, params, enc, 8)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert len(np.unique(expected)) > 3  # a non-trivial sequence


def test_scores_are_sums_of_token_log_probs():
    model, params = make_model()
    enc = padded_tokens(np.random.default_rng(1), 3, 7, 64)
    tokens, aux = model.predict_batch_with_aux(params, batch_for(enc, 6))
    tokens = np.asarray(tokens)
    # Hand computation from the teacher-forced logits of the decoded sequence.
    lengths = np.array([(list(t).index(1) + 1) if 1 in t else len(t) for t in tokens])
    weights = (np.arange(6)[None] < lengths[:, None]).astype(np.float32)
    dec_in = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], 1)
    logits = np.asarray(model.module.apply({"params": params}, enc, dec_in, np.ones_like(dec_in)),
                        np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = (np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0] * weights).sum(-1)
    np.testing.assert_allclose(np.asarray(aux["scores"]), expected, rtol=1e-5, atol=1e-5)
    scored = model.score_batch(params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
                                        "decoder_target_tokens": tokens,
                                        "decoder_loss_weights": weights})
    np.testing.assert_allclose(np.asarray(scored), expected, rtol=1e-5, atol=1e-5)


def test_beam_one_equals_greedy():
    model, params = make_model()
    enc = padded_tokens(np.random.default_rng(2), 4, 7, 64)
    greedy_tokens, greedy_aux = model.predict_batch_with_aux(params, batch_for(enc, 8))
    beam = functools.partial(decoding.beam_search, alpha=0.0)
    beam_tokens, beam_aux = model.predict_batch_with_aux(params, batch_for(enc, 8), decode_fn=beam,
                                                         num_decodes=1)
    np.testing.assert_array_equal(np.asarray(beam_tokens), np.asarray(greedy_tokens))
    np.testing.assert_allclose(beam_aux["scores"], greedy_aux["scores"], rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_wide_beam_finds_the_exhaustive_optimum(alpha):
    """With more beams than prefixes, beam search is exact: compare with scoring every sequence."""
    vocab, length = 6, 3
    model, params = make_model(vocab=vocab)
    enc = padded_tokens(np.random.default_rng(3), 2, 5, vocab)
    beam = functools.partial(decoding.beam_search, alpha=alpha)
    tokens, aux = model.predict_batch_with_aux(params, batch_for(enc, length), decode_fn=beam,
                                               num_decodes=vocab ** 2, return_all_decodes=True)
    candidates = []  # every sequence that ends with EOS (id 1) or at the length limit
    for n in range(1, length + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if 1 in seq[:-1] or (n < length and seq[-1] != 1):
                continue
            candidates.append(list(seq) + [0] * (length - n))
    cand = np.array(candidates, np.int32)
    lengths = np.array([(list(c).index(1) + 1) if 1 in c else length for c in cand])
    for row in range(2):
        dec_in = np.concatenate([np.zeros((len(cand), 1), np.int32), cand[:, :-1]], 1)
        log_lik = model.score_batch(params, {
            "encoder_input_tokens": np.repeat(enc[row:row + 1], len(cand), 0),
            "decoder_input_tokens": dec_in, "decoder_target_tokens": cand,
            "decoder_loss_weights": (np.arange(length)[None] < lengths[:, None])})
        penalised = np.asarray(log_lik) / ((5.0 + lengths) / 6.0) ** alpha
        best = int(np.argmax(penalised))
        np.testing.assert_array_equal(np.asarray(tokens)[row, -1], cand[best])
        np.testing.assert_allclose(float(aux["scores"][row, -1]), penalised[best], rtol=1e-4)
        assert np.all(np.diff(np.asarray(aux["scores"][row])) >= -1e-6)  # ascending, best last


def test_sampling_topk_one_is_greedy_and_sampling_is_seeded():
    model, params = make_model()
    enc = padded_tokens(np.random.default_rng(4), 3, 7, 64)
    batch = batch_for(enc, 8)
    greedy_tokens = np.asarray(model.predict_batch(params, batch))
    top1 = functools.partial(decoding.temperature_sample, temperature=1.0, topk=1)
    np.testing.assert_array_equal(
        np.asarray(model.predict_batch_with_aux(params, batch, decode_fn=top1)[0]), greedy_tokens)
    hot = functools.partial(decoding.temperature_sample, temperature=3.0)
    draw = lambda seed: np.asarray(model.predict_batch_with_aux(  # noqa: E731
        params, batch, rng=jax.random.PRNGKey(seed), decode_fn=hot, num_decodes=4,
        return_all_decodes=True)[0])
    a, b, c = draw(0), draw(0), draw(1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 4, 8) and not np.array_equal(a, c)


@pytest.mark.parametrize("variant", ["t5_1_1", "t5"])
def test_greedy_matches_transformers_generate(variant, tmp_path):
    # transformers' decode cache assumes as many decoder as encoder layers (IndexError otherwise).
    hf_model = build_hf_t5(variant, seed=5, num_decoder_layers=2)
    config, params = hf_t5.load_hf_t5(save_hf_checkpoint(hf_model, str(tmp_path), variant))
    model = EncoderDecoderModel(EncoderDecoder(config))
    enc = padded_tokens(np.random.default_rng(5), 4, 12, config.vocab_size)
    ours = np.asarray(model.predict_batch(params, batch_for(enc, 10)))
    with torch.no_grad():
        theirs = hf_model.generate(
            input_ids=torch.tensor(enc, dtype=torch.long),
            attention_mask=torch.tensor(enc > 0, dtype=torch.long), max_new_tokens=10,
            do_sample=False, num_beams=1).numpy()[:, 1:]
    theirs = np.pad(theirs, ((0, 0), (0, 10 - theirs.shape[1])))
    np.testing.assert_array_equal(ours, theirs)
    assert (ours > 1).sum() >= 10  # real sequences, not an immediate EOS
