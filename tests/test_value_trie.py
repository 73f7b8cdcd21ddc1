"""Closed-set decoding (mmt_jax/value_trie.py through decoding.py): answers never leave their value
set, equal open decoding when the set holds the open answer, keep the model's own scores, and
wide enough beam search finds the set's best value exactly."""
import functools

import numpy as np
import pytest

from mmt_jax import decoding
from mmt_jax.value_trie import ValueTrie
from tests.test_decoding import batch_for, make_model
from tests.test_hf_parity import padded_tokens

EOS, LENGTH = 1, 6


def _until_eos(row) -> tuple[int, ...]:
    row = list(map(int, row))
    return tuple(row[:row.index(EOS) + 1] if EOS in row else row)


def _score(model, params, enc, sequences):
    """The model's log-likelihood of each `sequences[i]` (ending in EOS) given `enc[i]`."""
    targets = np.zeros((len(sequences), LENGTH), np.int32)
    for i, s in enumerate(sequences):
        targets[i, :len(s)] = s
    dec_in = np.concatenate([np.zeros((len(sequences), 1), np.int32), targets[:, :-1]], 1)
    return np.asarray(model.score_batch(params, {
        "encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
        "decoder_target_tokens": targets, "decoder_loss_weights": targets > 0}))


@pytest.fixture(scope="module")
def setup():
    model, params = make_model()
    enc = padded_tokens(np.random.default_rng(5), 3, 7, 64)
    open_tokens, open_aux = model.predict_batch_with_aux(params, batch_for(enc, LENGTH))
    return model, params, enc, np.asarray(open_tokens), np.asarray(open_aux["scores"])


def test_greedy_stays_in_the_set_and_keeps_the_models_scores(setup):
    model, params, enc, open_tokens, _ = setup
    values = {"colour": [(5, 9, EOS), (5, 12, EOS), (7, EOS)],
              "size": [(20, EOS), (21, 22, EOS), (21, 23, 24, EOS)]}
    trie = ValueTrie.build(values)
    names = ["colour", "size", "colour"]
    tokens, aux = model.predict_batch_with_aux(
        params, batch_for(enc, LENGTH), decoder_params={"constraint": trie.constraint(names)})
    answers = [_until_eos(row) for row in np.asarray(tokens)]
    for name, answer, open_answer in zip(names, answers, open_tokens):
        assert answer in values[name], (name, answer)
        assert answer != _until_eos(open_answer)  # the open answers are none of these values
    np.testing.assert_allclose(np.asarray(aux["scores"]), _score(model, params, enc, answers),
                               rtol=1e-5, atol=1e-5)


def test_greedy_equals_open_decoding_when_the_set_holds_the_open_answer(setup):
    model, params, enc, open_tokens, open_scores = setup
    open_answers = [_until_eos(row) for row in open_tokens]  # LENGTH tokens where no EOS came
    trie = ValueTrie.build({f"row{i}": [a, (3, EOS), a[:1] + (EOS,)]
                            for i, a in enumerate(open_answers)})
    tokens, aux = model.predict_batch_with_aux(
        params, batch_for(enc, LENGTH),
        decoder_params={"constraint": trie.constraint(["row0", None, "row2"])})  # row 1 open
    np.testing.assert_array_equal(np.asarray(tokens), open_tokens)
    np.testing.assert_allclose(np.asarray(aux["scores"]), open_scores, rtol=1e-6)


def test_wide_beam_finds_the_sets_best_value(setup):
    """Beams at least as many as the set's values: the best answer is the value the model scores
    highest (computed value by value), and every returned beam is a value of the set."""
    model, params, enc, _, _ = setup
    values = [(5, 9, EOS), (5, 12, EOS), (7, EOS), (30, 31, 32, EOS), (30, 33, EOS)]
    trie = ValueTrie.build({"set": values})
    beam = functools.partial(decoding.beam_search, alpha=0.0)
    tokens, aux = model.predict_batch_with_aux(
        params, batch_for(enc, LENGTH), decode_fn=beam, num_decodes=5, return_all_decodes=True,
        decoder_params={"constraint": trie.constraint(["set"] * 3)})
    tokens, scores = np.asarray(tokens), np.asarray(aux["scores"])
    for row in range(3):
        by_value = _score(model, params, np.repeat(enc[row:row + 1], len(values), 0), values)
        assert {_until_eos(t) for t in tokens[row]} == set(values)
        assert _until_eos(tokens[row, -1]) == values[int(np.argmax(by_value))]
        np.testing.assert_allclose(np.sort(scores[row]), np.sort(by_value), rtol=1e-4)


def test_a_value_set_must_have_values():
    with pytest.raises(ValueError, match="'colour' has no values"):
        ValueTrie.build({"colour": []})
    with pytest.raises(ValueError, match="empty token sequence"):
        ValueTrie.build({"colour": [()]})
    trie = ValueTrie.build({"a": [(4, EOS)], "b": [(4, 5, EOS)]})
    assert trie.roots == {"a": 0, "b": 3} and trie.tokens.shape == (8, 1)  # 3 + 4 + dead
