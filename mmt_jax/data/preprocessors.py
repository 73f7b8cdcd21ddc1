"""MMT4's self-supervised pre-training objectives (section 4.1) as seqio preprocessors.

Both corrupt already tokenised text, a 1-D int32 feature (default `targets`), and emit `inputs` and
`targets`; every other feature (image, id, the source feature itself) passes through unchanged.

  span_corruption  T5's objective (Raffel et al. 2020, section 3.1.4; `span_corruption` and
                   `random_spans_noise_mask` in t5.data.preprocessors): noise density 0.2, mean
                   noise span length 2, spans replaced by sentinels <extra_id_0> ... <extra_id_98>.
  mlm              30% of the tokens replaced by <extra_id_99> (the paper's [MASK]); the target is
                   the whole text.

In a T5 vocabulary (`seqio.SentencePieceVocabulary(path, extra_ids=100)`) `<extra_id_i>` has id
`vocab_size - 1 - i` (`extra_id`). Randomness comes only from the stateless per-example seed that
`seqio.map_over_dataset(num_seeds=1)` passes, so a task's output is fixed by the seed given to
`get_dataset`.

Order in a task: tokenize -> truncate -> span_corruption or mlm -> append_eos(_after_trim). Neither
adds EOS, and neither output is longer than the text, so text cut to the shortest feature length
minus one leaves room for the EOS.
"""
import numpy as np
import seqio
import tensorflow as tf

NUM_EXTRA_IDS = 100  # T5's sentinels <extra_id_0> ... <extra_id_99>
MAX_SPANS = 99  # span corruption uses <extra_id_0> ... <extra_id_98>
MASK_EXTRA_ID = 99  # MLM's mask token, <extra_id_99>


def extra_id(vocab_size: int, i):
    """The id of `<extra_id_i>` in a T5 vocabulary of `vocab_size` ids (sentinels count down)."""
    return vocab_size - 1 - i


def _vocab_size(vocabulary: seqio.Vocabulary | int) -> int:
    """`vocabulary.vocab_size`, after checking that its last 100 ids are sentinels; or an int."""
    if isinstance(vocabulary, int):
        return vocabulary
    if vocabulary.extra_ids < NUM_EXTRA_IDS:
        raise ValueError(f"span corruption and MLM need a vocabulary with {NUM_EXTRA_IDS} extra "
                         f"ids (<extra_id_0..99>); this one has {vocabulary.extra_ids}")
    return vocabulary.vocab_size


def _num_noise(length: tf.Tensor, density: float) -> tf.Tensor:
    """round(length * density) (float32, half to even, as T5) clipped to [1, length - 1]; 0 when
    length < 2. Scalar int32."""
    n = tf.cast(tf.round(tf.cast(length, tf.float32) * density), tf.int32)
    return tf.minimum(tf.maximum(n, 1), tf.maximum(length - 1, 0))


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed) -> tf.Tensor:
    """Lengths `[num_segments]`, each >= 1 and summing to `num_items`, of a uniformly random split
    of `num_items` into `num_segments` runs (T5's `_random_segmentation`)."""
    first_in_segment = tf.pad(seqio.utils.stateless_shuffle(
        tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32), seed), [[1, 0]])
    segment_id = tf.cumsum(first_in_segment)
    return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(length: tf.Tensor, noise_density: float,
                            mean_noise_span_length: float, seed) -> tf.Tensor:
    """T5's `random_spans_noise_mask` (random_roll=False): which of `length` tokens are noise.
    `[length]` bool.

    num_noise_tokens = round(length * noise_density) clipped to [1, length - 1]; num_noise_spans =
    round(num_noise_tokens / mean_noise_span_length), at least 1 and at most MAX_SPANS (99: more
    would run into <extra_id_99>, so texts of about 990 tokens or more get longer spans),
    num_noise_tokens and the number of non-noise tokens (T5 fails where these two bind). Noise and
    non-noise tokens are each split at random into that many spans, interleaved starting with
    non-noise, so the text always ends in noise. As in T5 the mask is drawn for max(length, 2)
    tokens and cut: one token is never noise, and an empty text gives an empty mask.
    """
    padded = tf.maximum(length, 2)
    num_noise = _num_noise(padded, noise_density)
    num_nonnoise = padded - num_noise
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
    num_spans = tf.clip_by_value(num_spans, 1, tf.reduce_min([MAX_SPANS, num_noise, num_nonnoise]))
    noise_seed, nonnoise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, nonnoise_seed)
    noise_lengths = _random_segmentation(num_noise, num_spans, noise_seed)
    span_lengths = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], 1), [-1])
    return tf.repeat(tf.tile([False, True], [num_spans]), span_lengths)[:length]


@seqio.map_over_dataset(num_seeds=1)
def span_corruption(example: dict, seed, vocabulary: seqio.Vocabulary | int,
                    noise_density: float = 0.2, mean_noise_span_length: float = 2.0,
                    feature: str = "targets") -> dict:
    """T5 span corruption of `example[feature]` (`[L]` int token ids, no EOS yet).

    With the noise spans of `random_spans_noise_mask`: `inputs` `[L - noise + spans]` is the text
    with the i-th noise span replaced by `<extra_id_i>`; `targets` `[noise + spans]` is each noise
    span preceded by its sentinel. E.g. `a b c d e f` -> inputs `a <X0> d e <X1>`, targets
    `<X0> b c <X1> f`. An empty text gives empty inputs and targets; one token gives inputs = the
    text and empty targets (where T5 would emit a lone `<extra_id_0>`). `vocabulary`: a T5
    vocabulary or its size. `reconstruct_span_corruption` inverts it.
    """
    tokens = example[feature]
    noise = random_spans_noise_mask(tf.size(tokens), noise_density, mean_noise_span_length, seed)
    first_noise = tf.concat([noise[:1], noise[1:] & ~noise[:-1]], 0)
    sentinels = _vocab_size(vocabulary) - tf.cumsum(tf.cast(first_noise, tokens.dtype))
    pairs = tf.stack([sentinels, tokens], 1)  # row i: (sentinel if a span starts at i, token i)
    return {**example, "inputs": tf.boolean_mask(pairs, tf.stack([first_noise, ~noise], 1)),
            "targets": tf.boolean_mask(pairs, tf.stack([first_noise, noise], 1))}


@seqio.map_over_dataset(num_seeds=1)
def mlm(example: dict, seed, vocabulary: seqio.Vocabulary | int, mask_density: float = 0.3,
        feature: str = "targets") -> dict:
    """Masked language modelling of `example[feature]` (`[L]` int token ids, no EOS yet), MMT4 4.1.

    `inputs` `[L]`: the text with round(L * mask_density) positions, chosen uniformly at random and
    clipped to [1, L - 1] (some text is always masked and some always visible; nothing when L < 2),
    replaced by `<extra_id_99>`. `targets` `[L]`: the whole original text. Every chosen token is
    masked: the paper describes no BERT-style 80/10/10 split. `vocabulary`: a T5 vocabulary or its
    size.
    """
    tokens = example[feature]
    length = tf.size(tokens)
    chosen = tf.range(length) < _num_noise(length, mask_density)
    masked = seqio.utils.stateless_shuffle(chosen, seed)
    mask_id = tf.cast(extra_id(_vocab_size(vocabulary), MASK_EXTRA_ID), tokens.dtype)
    return {**example, "inputs": tf.where(masked, mask_id, tokens), "targets": tokens}


def reconstruct_span_corruption(inputs, targets, vocab_size: int) -> np.ndarray:
    """The text that `span_corruption` turned into `inputs` and `targets` (1-D int arrays as it
    emits them: drop the EOS that append_eos adds first), each sentinel in `inputs` replaced by the
    tokens that follow the same sentinel in `targets`. `[L]`.

    Raises ValueError unless `targets` is empty or starts with a sentinel, and both hold the
    sentinels `<extra_id_0>`, `<extra_id_1>`, ... (never `<extra_id_99>`) once each, in order.
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    sentinel_at = np.flatnonzero(targets >= vocab_size - MAX_SPANS)
    expected = extra_id(vocab_size, np.arange(len(sentinel_at)))
    if (len(targets) and (not len(sentinel_at) or sentinel_at[0])) or not (
            np.array_equal(targets[sentinel_at], expected)
            and np.array_equal(inputs[inputs >= vocab_size - MAX_SPANS], expected)):
        raise ValueError(f"not a span corruption pair: inputs {inputs.tolist()}, "
                         f"targets {targets.tolist()}")
    spans = iter(np.split(targets, sentinel_at[1:]))
    pieces = [next(spans)[1:] if token >= vocab_size - MAX_SPANS else [token] for token in inputs]
    return np.concatenate(pieces).astype(inputs.dtype) if pieces else inputs[:0]
