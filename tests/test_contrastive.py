"""The contrastive image-text head (models/contrastive.py): InfoNCE against a hand computation, the
head's scores against a direct computation from the encoder's pooled vectors, the loss it adds to the
Model, and its place in the config and the checkpointed tree."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmt_jax.losses import contrastive_loss, same_sequence
from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.config import ModelConfig
from mmt_jax.models.contrastive import ContrastiveConfig
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.t5 import Encoder, EncoderDecoder, t5_config

CONFIG = t5_config("tiny", vocab_size=64, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64)
HEAD = ContrastiveConfig(dim=8, loss_weight=0.5)


def _unit(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hand_infonce(image, text, scale, valid, same):
    """Each direction's loss and hits, written out row by row."""
    n = len(image)
    losses, hits = [], []
    for anchors, others in ((image, text), (text, image)):
        total, hit = 0.0, 0
        for i in range(n):
            if not valid[i]:
                continue
            candidates = [j for j in range(n) if valid[j] and (j == i or not same[i][j])]
            logits = {j: scale * float(np.dot(anchors[i], others[j])) for j in candidates}
            total += -logits[i] + np.log(sum(np.exp(v) for v in logits.values()))
            best = max(candidates, key=lambda j: logits[j])
            hit += best == i or same[i][best]
        losses.append(total / sum(valid))
        hits.append(hit / sum(valid))
    return np.mean(losses), np.mean(hits)


def test_infonce_equals_a_hand_computation():
    rng = np.random.default_rng(0)
    image, text = _unit(rng, (5, 4)), _unit(rng, (5, 4))
    valid = [True, True, False, True, True]  # row 2 is a negative pair: no anchor, no candidate
    same = [[i == j or {i, j} == {0, 3} for j in range(5)] for i in range(5)]  # rows 0, 3: one title
    loss, accuracy = contrastive_loss(jnp.asarray(image), jnp.asarray(text), 3.0,
                                      jnp.asarray(valid), jnp.asarray(same))
    expected_loss, expected_accuracy = _hand_infonce(image, text, 3.0, valid, same)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(accuracy, expected_accuracy, rtol=1e-6)
    # perfectly aligned pairs at a high scale: loss near 0, every pair retrieved
    loss, accuracy = contrastive_loss(jnp.asarray(image), jnp.asarray(image), 100.0,
                                      jnp.ones(5, bool))
    assert float(loss) < 1e-3 and float(accuracy) == 1.0


def test_same_sequence_finds_repeated_texts():
    tokens = np.array([[5, 6, 1, 0], [7, 1, 0, 0], [5, 6, 1, 0], [6, 5, 1, 0]])
    np.testing.assert_array_equal(same_sequence(jnp.asarray(tokens)),
                                  (tokens[:, None] == tokens[None]).all(-1))


def _batch(b=4, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 64, (b, 7)).astype(np.int32)
    pair = rng.integers(2, 64, (b, 6)).astype(np.int32)
    pair[0, 4:] = 0
    targets = rng.integers(2, 64, (b, 3)).astype(np.int32)
    return {"encoder_input_tokens": tokens,
            "encoder_image_features": rng.normal(size=(b, 5, 12)).astype(np.float32),
            "encoder_image_mask": np.ones((b,), np.int32),
            "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
            "decoder_target_tokens": targets,
            "pair_text_tokens": pair, "pair_label": np.array([1, 1, 0, 1], np.int32)}


@functools.lru_cache(maxsize=None)
def _model(head=HEAD):
    config = ModelConfig(CONFIG, FusionConfig(representator="precomputed", feature_dim=12),
                         contrastive=head)
    model = EncoderDecoderModel(config.module())
    shapes = {k: v.shape for k, v in _batch().items()}
    init = jax.jit(functools.partial(model.get_initial_variables, input_shapes=shapes))
    params = init(jax.random.PRNGKey(0))["params"]
    return model, jax.tree_util.tree_map(np.asarray, params)


def test_head_scores_equal_a_direct_computation_from_pooled_vectors():
    model, params = _model()
    batch = _batch()
    head = params["contrastive_head"]
    assert head["image_projection"]["kernel"].shape == (32, 8)
    np.testing.assert_allclose(head["log_scale"], np.log(1 / 0.07), rtol=1e-6)
    # the encoder reading the image alone, and the paired text alone (jitted: faster than eager)
    encode = jax.jit(lambda tokens, **features: model.module.apply(
        {"params": params}, tokens, method=model.module.encode_with_mask, **features))
    image_encoded, image_mask = encode(np.zeros((4, 0), np.int32),
                                       encoder_image_features=batch["encoder_image_features"])
    text_encoded, text_mask = encode(batch["pair_text_tokens"])
    assert image_encoded.shape == (4, 5, 32) and text_encoded.shape == (4, 6, 32)

    def direct(encoded, mask, kernel):
        mask = np.asarray(mask, np.float64)[..., None]
        pooled = (np.asarray(encoded, np.float64) * mask).sum(1) / mask.sum(1)
        projected = pooled @ np.asarray(kernel, np.float64)
        return projected / np.linalg.norm(projected, axis=-1, keepdims=True)
    u = direct(image_encoded, image_mask, head["image_projection"]["kernel"])
    v = direct(text_encoded, text_mask, head["text_projection"]["kernel"])
    np.testing.assert_allclose(jax.jit(model.score_pairs)(params, batch), (u * v).sum(-1),
                               atol=1e-5)
    # the contrastive loss the Model adds is InfoNCE over the true pairs (row 2 is a negative)
    loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
    generative, _ = jax.jit(EncoderDecoderModel(model.module.clone(contrastive=None)).loss_fn)(
        params, batch, None)
    expected, _ = _hand_infonce(u, v, 1 / 0.07, [True, True, False, True],
                                np.eye(4, dtype=bool))
    np.testing.assert_allclose(metrics["contrastive/loss"].compute(), expected, rtol=1e-4)
    np.testing.assert_allclose(loss, generative + 0.5 * expected, rtol=1e-4)
    assert metrics["contrastive/pairs"].compute() == 3


def test_contrastive_loss_reaches_the_encoder_and_the_image_branch():
    model, params = _model()
    batch = _batch()
    grads = jax.jit(jax.grad(lambda p: model.with_contrastive_loss(
        0.0, {}, model.embed_pairs(p, batch), batch)[0]))(params)
    for path in (("image_fusion", "projection", "kernel"), ("encoder", "encoder_norm", "scale"),
                 ("token_embedder", "embedding"), ("contrastive_head", "log_scale")):
        leaf = grads
        for key in path:
            leaf = leaf[key]
        assert float(jnp.abs(leaf).max()) > 0, path
    assert float(jnp.abs(grads["decoder"]["decoder_norm"]["scale"]).max()) == 0


def test_a_batch_without_pairs_or_a_zero_weight_adds_nothing():
    model, params = _model()
    batch = _batch()
    no_pairs = {k: v for k, v in batch.items() if k not in ("pair_text_tokens", "pair_label")}
    unweighted, _ = _model(ContrastiveConfig(dim=8, loss_weight=0.0))
    generative, metrics = jax.jit(model.loss_fn)(params, no_pairs, None)
    assert "contrastive/loss" not in metrics
    np.testing.assert_allclose(jax.jit(unweighted.loss_fn)(params, batch, None)[0], generative,
                               rtol=1e-6)


def test_config_round_trips_and_needs_an_image_branch():
    config = ModelConfig(CONFIG, FusionConfig(patch_size=8), contrastive=HEAD)
    assert ModelConfig.from_json_dict(config.to_json_dict()) == config
    assert ModelConfig.from_json_dict({**config.to_json_dict(), "contrastive": None}).contrastive is None
    with pytest.raises(ValueError, match="needs an image branch"):
        ModelConfig(CONFIG, contrastive=HEAD)
    with pytest.raises(ValueError, match="initial_temperature"):
        ContrastiveConfig(initial_temperature=0.001)


def test_recall_at_k_ranks_distinct_texts_for_each_image():
    from mmt_jax.retrieval import PairEmbeddings, recall_at_k
    # image 0 is closest to its own text; image 1's own text is 2nd; images 2 and 3 share one title
    texts = np.eye(4)[[0, 1, 2, 2]]
    images = np.array([[1, 0, 0, 0], [0.6, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0.9, 0.1]])
    embeddings = PairEmbeddings(images, texts, np.array([1, 1, 1, 1]), ["a", "b", "c", "c"])
    assert recall_at_k(embeddings, ks=(1, 2)) == {"recall@1": 0.75, "recall@2": 1.0,
                                                  "retrieval_candidates": 3.0}
    negatives = PairEmbeddings(images, texts, np.array([1, 0, 1, 1]), ["a", "b", "c", "c"])
    assert recall_at_k(negatives, ks=(1,))["recall@1"] == 1.0  # text "b" is no candidate
    np.testing.assert_allclose(embeddings.cosines(), [1, 0.5, 1, 0.9])


def test_agreement_token_is_the_heads_elementwise_product_read_by_the_decoder():
    head = ContrastiveConfig(dim=8, loss_weight=0.5, agreement_token=True)
    model, params = _model(head)
    batch = _batch()
    batch["encoder_image_mask"] = np.array([1, 1, 0, 1], np.int32)  # row 2 has no image
    features = {k: batch[k] for k in ("encoder_image_features", "encoder_image_mask")}
    encoded, mask = jax.jit(lambda p: model.module.apply(
        {"params": p}, batch["encoder_input_tokens"], method=model.module.encode_with_mask,
        **features))(params)
    assert encoded.shape == (4, 5 + 7 + 1, 32)
    np.testing.assert_array_equal(np.asarray(mask)[:, -1], [1, 1, 0, 1])
    # the last position: W_a (D u (.) v), u from the image alone, v from the encoder's text alone
    u, v, _ = jax.jit(lambda p: model.module.apply(
        {"params": p}, batch["encoder_input_tokens"], method=model.module.embed_pairs,
        **features))(params)
    expected = 8 * np.asarray(u) * np.asarray(v) @ params["agreement_embedding"]["kernel"]
    np.testing.assert_allclose(np.asarray(encoded)[:, -1], expected, atol=1e-5)
    # the generative loss alone trains it
    grads = jax.jit(jax.grad(lambda p: EncoderDecoderModel(
        model.module.clone(contrastive=head)).loss_fn(
            p, {k: x for k, x in batch.items() if not k.startswith("pair_")}, None)[0]))(params)
    assert float(jnp.abs(grads["agreement_embedding"]["kernel"]).max()) > 0
    with pytest.raises(ValueError, match="packed batches"):
        model.module.apply({"params": params}, batch["encoder_input_tokens"],
                           np.ones((4, 7), np.int32), method=model.module.encode_with_mask,
                           **features)


def test_training_encodes_the_image_alone_once_for_the_token_and_the_head():
    model, params = _model(ContrastiveConfig(dim=8, loss_weight=0.5, agreement_token=True))
    batch = _batch()
    calls = []

    def count_encoder_calls(next_fun, args, kwargs, context):
        if isinstance(context.module, Encoder) and context.method_name == "__call__":
            calls.append(args[0].embedded.shape[1])
        return next_fun(*args, **kwargs)
    with nn.intercept_methods(count_encoder_calls):
        loss, metrics = model.loss_fn(params, batch, None)
    # fused [image ; text], the image alone (one pad position), the encoder's text, the paired text
    assert sorted(calls) == sorted([5 + 7, 5 + 1, 7, 6])
    # and the shared pass gives the head's own vectors: its loss as from `embed_pairs`
    u, v, scale = model.embed_pairs(params, batch)
    expected, _ = _hand_infonce(np.asarray(u), np.asarray(v), float(scale),
                                [True, True, False, True], np.eye(4, dtype=bool))
    np.testing.assert_allclose(metrics["contrastive/loss"].compute(), expected, rtol=1e-4)


def test_agreement_token_reads_the_first_tokens_of_the_text_only():
    head = ContrastiveConfig(dim=8, loss_weight=0.5, agreement_token=True, agreement_text_length=3)
    model, params = _model(head)
    batch = _batch()
    features = {k: batch[k] for k in ("encoder_image_features", "encoder_image_mask")}
    encode = jax.jit(lambda tokens: model.module.apply(
        {"params": params}, tokens, method=model.module.encode_with_mask, **features)[0])
    tokens = batch["encoder_input_tokens"]
    later_changed = tokens.copy()
    later_changed[:, 3:] = np.roll(tokens[:, 3:], 1, axis=0)
    encoded, changed = np.asarray(encode(tokens)), np.asarray(encode(later_changed))
    np.testing.assert_allclose(changed[:, -1], encoded[:, -1], atol=1e-6)
    assert np.abs(changed[:, :-1] - encoded[:, :-1]).max() > 1e-3  # the fused pass reads them
    u, v, _ = jax.jit(lambda p: model.module.apply(
        {"params": p}, tokens[:, :3], method=model.module.embed_pairs, **features))(params)
    expected = 8 * np.asarray(u) * np.asarray(v) @ params["agreement_embedding"]["kernel"]
    np.testing.assert_allclose(encoded[:, -1], expected, atol=1e-5)
    with pytest.raises(ValueError, match="agreement_text_length"):
        ContrastiveConfig(agreement_text_length=3)
