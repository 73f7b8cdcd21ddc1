"""Span corruption and MLM (MMT4 section 4.1; T5's random_spans_noise_mask): exact counts per
example, statistics over thousands of examples, round trips, sentinels, pass-through, seeds."""
import functools

import numpy as np
import pytest
import seqio
import tensorflow as tf
from seqio import test_utils

from mmt_jax.data import preprocessors as pp

VOCAB_SIZE = 1100  # an int vocabulary: ids 1000..1099 are <extra_id_99..0>
MASK = VOCAB_SIZE - 100
NUM_TEXTS = 3000
rng = np.random.default_rng(0)
# Lengths 0..300 (the short edge cases first); token ids below all 100 extra ids.
TEXTS = [rng.integers(3, MASK, size=n, dtype=np.int32)
         for n in [0, 1, 2, 3] + list(rng.integers(0, 301, size=NUM_TEXTS - 4))]
IMAGES = rng.random((NUM_TEXTS, 2, 2, 3), dtype=np.float32)


def make_dataset(texts):
    """Texts (padded for from_tensor_slices, then cut back) with an image and an id each."""
    lengths = np.array([len(text) for text in texts])
    padded = np.zeros((len(texts), max(lengths.max(), 1)), np.int32)
    for i, text in enumerate(texts):
        padded[i, :len(text)] = text

    def unpad(example):
        return {"targets": example["targets"][:example["length"]], "id": example["id"],
                "image": example["image"]}
    return tf.data.Dataset.from_tensor_slices({
        "targets": padded, "length": lengths, "id": [f"product-{i}" for i in range(len(texts))],
        "image": IMAGES[:len(texts)]}).map(unpad)


def corrupt(preprocessor, texts, seed=0, vocabulary=VOCAB_SIZE):
    with seqio.utils.map_seed_manager(seed):  # what Task.get_dataset(seed=...) does
        dataset = preprocessor(make_dataset(texts), vocabulary=vocabulary)
    return list(dataset.as_numpy_iterator())


def expected_counts(length, density=0.2, mean_span=2.0):
    """(num_noise_tokens, num_noise_spans) as specified, in float32 like T5; (0, 0) below 2."""
    if length < 2:
        return 0, 0
    noise = min(max(int(np.round(np.float32(length) * np.float32(density))), 1), length - 1)
    spans = int(np.round(np.float32(noise) / np.float32(mean_span)))
    return noise, min(max(spans, 1), pp.MAX_SPANS, noise, length - noise)


def is_sentinel(tokens):
    return tokens >= VOCAB_SIZE - pp.MAX_SPANS


@pytest.fixture(scope="module")
def spans():
    return corrupt(pp.span_corruption, TEXTS)


@pytest.fixture(scope="module")
def masked():
    return corrupt(pp.mlm, TEXTS)


def test_span_corruption_exact_counts(spans):
    for text, out in zip(TEXTS, spans):
        noise, num_spans = expected_counts(len(text))
        assert is_sentinel(out["targets"]).sum() == is_sentinel(out["inputs"]).sum() == num_spans
        assert len(out["targets"]) == noise + num_spans
        assert len(out["inputs"]) == len(text) - noise + num_spans


def test_span_corruption_round_trip_and_layout(spans):
    for text, out in zip(TEXTS, spans):
        # reconstruct also checks <extra_id_0>, <extra_id_1>, ... in order in both features.
        np.testing.assert_array_equal(
            pp.reconstruct_span_corruption(out["inputs"], out["targets"], VOCAB_SIZE), text)
        assert MASK not in out["inputs"] and MASK not in out["targets"]  # <extra_id_99> is MLM's
        if len(text) >= 2:  # T5's layout: starts with non-noise, ends in noise
            assert out["inputs"][0] == text[0] and is_sentinel(out["inputs"][-1])
            assert out["targets"][0] == pp.extra_id(VOCAB_SIZE, 0)


def test_span_corruption_density_and_mean_span_length(spans):
    noise = np.array([len(o["targets"]) - is_sentinel(o["targets"]).sum() for o in spans])
    num_spans = np.array([is_sentinel(o["targets"]).sum() for o in spans])
    lengths = np.array([len(t) for t in TEXTS])
    # Counts are rounded per example: |noise - 0.2 L| <= 0.5 and |noise / 2 - spans| <= 0.5, so the
    # pooled ratios may miss by at most these worst-case bounds (about 0.003 and 0.07 here).
    assert abs(noise.sum() / lengths.sum() - 0.2) <= 0.5 * len(TEXTS) / lengths.sum()
    assert abs(noise.sum() / num_spans.sum() - 2.0) <= len(TEXTS) / num_spans.sum()
    assert abs(noise.sum() / num_spans.sum() - 2.0) < 0.05  # the rounding errors mostly cancel


def test_span_segmentation_is_uniformly_random():
    # L = 100: 20 noise tokens in 10 spans. A uniformly random split of 20 into 10 positive parts
    # (T5's segmentation) gives a first span of length 1 with probability 9/19; over 2000 examples
    # the standard error is 0.011, so 0.05 is ~4.5 sigma.
    outs = corrupt(pp.span_corruption, [np.arange(3, 103, dtype=np.int32)] * 2000, seed=1)
    first_span = np.array([np.flatnonzero(is_sentinel(o["targets"]))[1] - 1 for o in outs])
    assert abs(np.mean(first_span == 1) - 9 / 19) < 0.05
    assert len({o["inputs"].tobytes() for o in outs}) > 1990  # every example draws its own spans


def test_short_texts():
    out0, out1, out2 = corrupt(pp.span_corruption, TEXTS[:3])
    assert out0["inputs"].size == out0["targets"].size == 0
    np.testing.assert_array_equal(out1["inputs"], TEXTS[1])  # one token: nothing to corrupt
    assert out1["targets"].size == 0
    sentinel = pp.extra_id(VOCAB_SIZE, 0)
    np.testing.assert_array_equal(out2["inputs"], [TEXTS[2][0], sentinel])
    np.testing.assert_array_equal(out2["targets"], [sentinel, TEXTS[2][1]])
    for text, out in zip(TEXTS[:2], corrupt(pp.mlm, TEXTS[:2])):
        np.testing.assert_array_equal(out["inputs"], text)  # MLM masks nothing below 2 tokens
        np.testing.assert_array_equal(out["targets"], text)


def test_span_corruption_caps_spans_at_99():
    text = np.random.default_rng(1).integers(3, MASK, size=1500, dtype=np.int32)
    # 300 noise tokens: 150 spans uncapped
    (out,) = corrupt(pp.span_corruption, [text])
    sentinels = out["targets"][is_sentinel(out["targets"])]
    np.testing.assert_array_equal(sentinels, pp.extra_id(VOCAB_SIZE, np.arange(99)))
    assert len(out["targets"]) == 300 + 99 and MASK not in out["targets"]
    np.testing.assert_array_equal(
        pp.reconstruct_span_corruption(out["inputs"], out["targets"], VOCAB_SIZE), text)


def test_sentinel_ids_in_a_t5_vocabulary():
    vocab = test_utils.sentencepiece_vocab(extra_ids=100)  # a real SentencePiece vocabulary
    for i in (0, 1, 98, 99):
        assert vocab.encode(f"<extra_id_{i}>") == [pp.extra_id(vocab.vocab_size, i)]
    (out,) = corrupt(pp.mlm, [np.arange(3, 23, dtype=np.int32)], vocabulary=vocab)
    assert "<extra_id_99>" in vocab.decode(out["inputs"].tolist())
    (out,) = corrupt(pp.span_corruption, [np.arange(3, 23, dtype=np.int32)], vocabulary=vocab)
    assert vocab.decode(out["targets"].tolist()).startswith("<extra_id_0>")
    with pytest.raises(ValueError, match="100 extra ids"):
        corrupt(pp.span_corruption, TEXTS[:1], vocabulary=seqio.PassThroughVocabulary(1000))


def test_mlm_exact_density_and_round_trip(masked):
    for text, out in zip(TEXTS, masked):
        np.testing.assert_array_equal(out["targets"], text)
        is_masked = out["inputs"] != text
        assert is_masked.sum() == expected_counts(len(text), density=0.3)[0]
        assert np.all(out["inputs"][is_masked] == MASK)


def test_mlm_positions_are_uniform():
    # Each of 50 positions is masked with probability 0.3: standard error over 2000 examples 0.0102,
    # so 0.05 is ~4.9 sigma for each position.
    outs = corrupt(pp.mlm, [np.arange(3, 53, dtype=np.int32)] * 2000, seed=2)
    frequency = np.mean([o["inputs"] == MASK for o in outs], axis=0)
    assert np.all(np.abs(frequency - 0.3) < 0.05)


def test_other_features_pass_through(spans, masked):
    for outs in (spans, masked):
        for i, out in enumerate(outs):
            assert set(out) == {"inputs", "targets", "id", "image"}
            assert out["id"] == f"product-{i}".encode()
            np.testing.assert_array_equal(out["image"], IMAGES[i])


@pytest.mark.parametrize("preprocessor", [pp.span_corruption, pp.mlm])
def test_seed_determines_the_masks(preprocessor):
    texts = TEXTS[4:204]
    first, again, other = (corrupt(preprocessor, texts, seed) for seed in (5, 5, 6))
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, again))
    differ = [not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other)]
    assert np.mean(differ) > 0.9  # only very short texts can draw the same mask by chance


def test_reconstruct_rejects_a_malformed_pair():
    s0, s1 = pp.extra_id(VOCAB_SIZE, 0), pp.extra_id(VOCAB_SIZE, 1)
    for inputs, targets in [([5, s1], [s1, 6]), ([5, s0], [6, s0, 7]), ([5, s0], [s0, 6, s1, 7])]:
        with pytest.raises(ValueError, match="not a span corruption pair"):
            pp.reconstruct_span_corruption(inputs, targets, VOCAB_SIZE)


@pytest.mark.parametrize("preprocessor", [pp.span_corruption, pp.mlm])
def test_seeds_through_a_seqio_task(preprocessor):
    vocab = test_utils.sentencepiece_vocab(extra_ids=100)
    words = ["red", "cotton", "shirt", "blue", "dress", "wool", "hat", "green", "sock"]
    rng = np.random.default_rng(3)
    titles = [" ".join(rng.choice(words, size=rng.integers(2, 8))) for _ in range(20)]

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices(
            {"targets": titles, "id": [f"p{i}" for i in range(20)], "image": IMAGES[:20]})

    features = {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}
    task = seqio.Task(
        f"test_{preprocessor.__name__}", seqio.FunctionDataSource(dataset_fn, splits=["train"]),
        output_features=features, preprocessors=[
            seqio.preprocessors.tokenize, functools.partial(preprocessor, vocabulary=vocab),
            seqio.preprocessors.append_eos_after_trim])

    def get(seed):
        return list(task.get_dataset({"inputs": 64, "targets": 64}, shuffle=False,
                                     seed=seed).as_numpy_iterator())

    first, again, other = get(7), get(7), get(8)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, again))
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))
    for i, out in enumerate(first):
        text = vocab.encode(titles[i])
        assert out["inputs"][-1] == out["targets"][-1] == vocab.eos_id  # EOS added after corruption
        inputs, targets = out["inputs"][:-1], out["targets"][:-1]
        if preprocessor is pp.span_corruption:
            targets = pp.reconstruct_span_corruption(inputs, targets, vocab.vocab_size)
        np.testing.assert_array_equal(targets, text)
        assert out["id"] == f"p{i}".encode()
        np.testing.assert_array_equal(out["image"], IMAGES[i])
