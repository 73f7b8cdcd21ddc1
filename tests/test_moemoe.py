"""MoEMoE's encoder front (mmt_jax/models/moemoe.py) and its Model: shapes and the parameter tree,
Eq. 3-5 and 6-7 against direct computations, the loss of Eq. 8, gradients into every part, each
ablation switch, cached decoding against the full forward pass, the config's JSON round trip, and
the loss and gradients on 8 host devices against one device."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mmt_jax.layers.moe import MoeConfig
from mmt_jax.model import model_for
from mmt_jax.models.config import ModelConfig
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.moemoe import MultiSourceConfig, tiling
from mmt_jax.models.t5 import t5_config
from mmt_jax.partitioning import Partitioner

VOCAB, K, LV, DP = 64, 8, 3, 12  # k = 8 positions, 3 image vectors: tiled 2 2/3 times
IMAGE = FusionConfig(representator="precomputed", feature_dim=DP)


def _config(moe: bool = False, **sources) -> ModelConfig:
    t5 = t5_config("tiny", vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                   num_encoder_layers=2, num_decoder_layers=2,
                   **(dict(moe=MoeConfig(num_experts=4, num_selected=2, eval_capacity_factor=4.0,
                                         min_capacity=1), decoder_moe_layers="odd") if moe else {}))
    return ModelConfig(t5, sources=MultiSourceConfig(IMAGE, **{"alignment_dim": 8, **sources}))


def _batch(b: int = 2, seed: int = 0, k: int = K, further: tuple[str, ...] = ()) -> dict:
    """Row 0's context is padded after 5 tokens; each further text source `name` is
    `encoder_<name>_tokens`, row 0 with 7 tokens (past the context's), row 1 with 3."""
    rng = np.random.default_rng(seed)
    context = np.zeros((b, k), np.int32)
    context[:, :K] = rng.integers(2, VOCAB, (b, K))
    context[0, 5:] = 0  # padding in the context: the decoder reads positions 0..4 of row 0
    question = np.zeros((b, k), np.int32)
    question[:, :2] = rng.integers(2, VOCAB, (b, 2))
    targets = rng.integers(2, VOCAB, (b, 4)).astype(np.int32)
    texts = {}
    for name in further:
        tokens = np.zeros((b, k), np.int32)
        tokens[:, :3] = rng.integers(2, VOCAB, (b, 3))
        tokens[0, :7] = rng.integers(2, VOCAB, 7)
        texts[f"encoder_{name}_tokens"] = tokens
    return {"encoder_input_tokens": context, "encoder_question_tokens": question, **texts,
            "encoder_image_features": rng.normal(size=(b, LV, DP)).astype(np.float32),
            "encoder_image_mask": np.array([1] + [0] * (b - 1), np.int32),  # row 1: no image
            "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
            "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}


@functools.lru_cache(maxsize=None)
def _model(config: ModelConfig):
    model = model_for(config.module())
    batch = _batch(further=config.sources.text_sources[1:])
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    variables = jax.jit(lambda key: model.get_initial_variables(key, shapes, types))(
        jax.random.key(0))
    return model, variables


def _parts(model, params, batch):
    """The module's pieces, each computed on its own: the text sources `texts` {name: (encoding,
    mask)} (the first is the context, `context` and `context_mask` too), Q, the image vectors, the
    weights."""
    module = model.module
    first, *further = module.sources.text_sources

    def pieces(m):
        texts = {first: m._text(m.encoder, batch["encoder_input_tokens"], False)}
        texts |= {name: m._text(getattr(m, "text_encoders")[name],
                                batch[f"encoder_{name}_tokens"], False) for name in further}
        question, question_mask = m._text(m.question_encoder, batch["encoder_question_tokens"],
                                          False)
        image, image_mask = m.image_encoder.image_vectors(
            encoder_image_features=batch["encoder_image_features"],
            encoder_image_mask=batch["encoder_image_mask"])
        return dict(texts=texts, context=texts[first][0], context_mask=texts[first][1],
                    question=question, question_mask=question_mask, image=image,
                    image_mask=image_mask, weights=m.weigh_sources(question))
    return jax.tree_util.tree_map(np.asarray, module.apply({"params": params}, method=pieces))


def _fused(parts):
    """Eq. 5 over every source, by hand: `w_0 * I + sum_j w_j * (T_j * mask_j)`."""
    weights = parts["weights"]
    fused = weights[..., :1] * _tiled_image(parts)
    for j, (text, mask) in enumerate(parts["texts"].values(), start=1):
        fused = fused + weights[..., j:j + 1] * text * mask[..., None]
    return fused


def _tiled_image(parts):
    """Eq. 3 by hand for K = 8, LV = 3: positions 0..7 read image vectors 0, 1, 2, 0, 1, 2, 0, 1
    (zeros for a row without an image)."""
    image = parts["image"] * parts["image_mask"][..., None]
    return np.concatenate([image, image, image[:, :2]], 1)


def _encode(model, params, batch):
    return jax.tree_util.tree_map(np.asarray, jax.jit(model.encode)(params, batch))


def test_the_tree_shapes_and_eq_3_to_5_against_the_pieces():
    model, variables = _model(_config())
    params = variables["params"]
    assert {"encoder", "question_encoder", "image_encoder", "source_gate", "decoder",
            "question_projection", "context_projection", "image_projection",
            "token_embedder"} == set(params)
    assert params["source_gate"]["kernel"].shape == (16, 2)
    assert params["image_encoder"]["projection"]["kernel"].shape == (DP, 16)
    # the two text encoders are unshared: same shapes, different values
    assert not np.allclose(params["encoder"]["layers_0"]["attention"]["query"]["kernel"],
                           params["question_encoder"]["layers_0"]["attention"]["query"]["kernel"])
    batch = _batch()
    encoded, mask = _encode(model, params, batch)
    assert encoded.shape == (2, K, 16) and mask.shape == (2, K)
    p = _parts(model, params, batch)
    image_k = _tiled_image(p)
    assert np.any(image_k[0]) and not np.any(image_k[1])
    np.testing.assert_allclose(encoded, _fused(p), atol=1e-5)  # Eq. 5
    np.testing.assert_allclose(encoded[mask], (p["weights"][..., :1] * image_k
                                               + p["weights"][..., 1:] * p["context"])[mask],
                               atol=1e-5)  # the paper's two sources where the decoder reads
    # where the decoder looks: the context's tokens (Eq. 5's k)
    np.testing.assert_array_equal(mask, batch["encoder_input_tokens"] > 0)


def test_three_sources_eq_4_to_8_by_hand():
    """c = 3 (the image, the context and a further text source `details`): the gate gives three
    weights, Eq. 5 sums every source (each text only at its own tokens), the decoder reads where
    any text has a token, and Eq. 8 adds a question-source alignment loss per source."""
    model, variables = _model(_config(text_sources=("context", "details"),
                                      question_context_weight=0.5))
    params, batch = variables["params"], _batch(further=("details",))
    assert {"details_encoder", "details_projection"} <= set(params)
    assert params["source_gate"]["kernel"].shape == (16, 3)
    encoded, mask = _encode(model, params, batch)
    p = _parts(model, params, batch)
    assert p["weights"].shape == (2, K, 3)
    np.testing.assert_allclose(encoded, _fused(p), atol=1e-5)
    # row 0: the context's 5 tokens and details' 7; row 1: all 8 of the context's
    np.testing.assert_array_equal(mask.sum(1), [7, 8])
    np.testing.assert_array_equal(mask, (batch["encoder_input_tokens"] > 0)
                                  | (batch["encoder_details_tokens"] > 0))
    loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
    values = {k: float(v.compute()) for k, v in metrics.items()}

    def projected(name, x, m):
        return ((x * m[..., None]).sum(1) / m.sum(1, keepdims=True)) @ np.asarray(
            params[f"{name}_projection"]["kernel"])

    q = projected("question", p["question"], p["question_mask"])
    d = projected("details", *p["texts"]["details"])
    cosine = (q * d).sum(-1) / np.linalg.norm(q, axis=-1) / np.linalg.norm(d, axis=-1)
    np.testing.assert_allclose(values["question_details_alignment_loss"],
                               np.abs(1 - cosine).mean(), rtol=1e-4)
    np.testing.assert_allclose(float(loss), values["cross_ent_loss"] + values["z_loss"] + 0.5 * (
        values["question_context_alignment_loss"] + values["question_details_alignment_loss"])
        + values["question_image_alignment_loss"], rtol=1e-5)
    _, aux = jax.jit(model.predict_batch_with_aux)(params, batch)
    read = mask[..., None]
    np.testing.assert_allclose(aux["source_weights"],
                               (p["weights"] * read).sum(1) / read.sum(1), rtol=1e-5)
    grads = jax.jit(jax.grad(lambda q: model.loss_fn(q, batch, None)[0]))(params)
    assert all(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(
        grads["details_encoder"])) and np.all(np.asarray(grads["source_gate"]["kernel"])[:, 2])


def test_tiling_is_eq_3():
    np.testing.assert_array_equal(np.argmax(tiling(3, 8), 0), [0, 1, 2, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(tiling(3, 8).sum(0), [1] * 8)
    np.testing.assert_array_equal(tiling(4, 4), np.eye(4))


@pytest.mark.parametrize("text_sources", [("context",), ("context", "details")])
def test_the_answer_does_not_depend_on_the_padded_length(text_sources):
    """The same examples padded to 8 and to 13 positions: the same loss, and the same encodings
    where the decoder reads them (what lets the Predictor pad to any input_length)."""
    model, variables = _model(_config(moe=True, text_sources=text_sources))
    further = text_sources[1:]
    params = variables["params"]
    short, long = _batch(further=further), _batch(k=K + 5, further=further)
    losses = [float(jax.jit(model.loss_fn)(params, b, None)[0]) for b in (short, long)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    (encoded, mask), (encoded_long, mask_long) = _encode(model, params, short), _encode(
        model, params, long)
    np.testing.assert_array_equal(mask_long[:, :K], mask)
    assert not np.any(mask_long[:, K:])
    np.testing.assert_allclose(encoded_long[:, :K][mask], encoded[mask], atol=1e-5)


def test_the_loss_is_eq_8_with_alignment_by_hand():
    model, variables = _model(_config(moe=True, question_context_weight=0.5))
    params, batch = variables["params"], _batch()
    loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
    values = {k: float(v.compute()) for k, v in metrics.items()}
    p = _parts(model, params, batch)

    def pooled(x, mask):
        return (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)

    def projected(name, vector):
        kernel = np.asarray(params[f"{name}_projection"]["kernel"])
        return vector @ kernel

    q = projected("question", pooled(p["question"], p["question_mask"]))
    c = projected("context", pooled(p["context"], p["context_mask"]))
    i = projected("image", pooled(p["image"], p["image_mask"]))

    def one_minus_cos(a, b):
        return np.abs(1 - (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))

    qca = one_minus_cos(q, c).mean()
    qia = one_minus_cos(q[:1], i[:1])[0]  # row 1 has no image: not aligned
    np.testing.assert_allclose(values["question_context_alignment_loss"], qca, rtol=1e-4)
    np.testing.assert_allclose(values["question_image_alignment_loss"], qia, rtol=1e-4)
    cross_entropy = values["cross_ent_loss"] + values["z_loss"]
    np.testing.assert_allclose(float(loss), cross_entropy + 0.5 * qca + 1.0 * qia
                               + 0.1 * values["moe/auxiliary_loss"], rtol=1e-5)


def test_gradients_reach_every_part():
    model, variables = _model(_config(moe=True))
    grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, _batch(), jax.random.key(1))[0]))(
        variables["params"])
    flat = traverse_util.flatten_dict(grads, sep="/")
    silent = [path for path, g in flat.items() if not np.any(np.asarray(g))]
    assert not silent, silent
    assert any("/expert/" in path for path in flat) and "source_gate/kernel" in flat


@pytest.mark.parametrize("switch", ["softmax", "uniform", "no_alignment", "resample", "joint"])
def test_each_ablation_switch_changes_what_it_says(switch):
    base_model, base = _model(_config())
    sources = {"softmax": dict(source_weighting="softmax"),
               "uniform": dict(source_weighting="uniform"),
               "no_alignment": dict(question_context_weight=0.0, question_image_weight=0.0),
               "resample": dict(image_to_length="resample"),
               "joint": dict(joint_encoder=True, source_weighting="uniform")}[switch]
    model, variables = _model(_config(**sources))
    params, batch = variables["params"], _batch()
    base_paths = set(traverse_util.flatten_dict(base["params"], sep="/"))
    paths = set(traverse_util.flatten_dict(params, sep="/"))
    weights = None if switch == "joint" else _parts(model, params, batch)["weights"]
    loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
    if switch == "softmax":  # same parameters, weights normalised over the sources
        assert paths == base_paths
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
        assert np.all(weights > 0)
    elif switch == "uniform":  # no question guidance: no FC, every source 1/2, [Q ; e] read
        assert paths == base_paths - {"source_gate/kernel"}
        np.testing.assert_array_equal(weights, 0.5)
        encoded, mask = _encode(model, params, batch)
        p = _parts(model, params, batch)
        np.testing.assert_allclose(encoded[:, :K], p["question"], atol=1e-6)
        np.testing.assert_allclose(encoded[:, K:], _fused(p), atol=1e-5)
        np.testing.assert_allclose(encoded[:, K:][mask[:, K:]],
                                   (0.5 * _tiled_image(p) + 0.5 * p["context"])[mask[:, K:]],
                                   atol=1e-5)
        np.testing.assert_array_equal(mask, np.concatenate(
            [batch["encoder_question_tokens"], batch["encoder_input_tokens"]], 1) > 0)
        _, aux = jax.jit(model.predict_batch_with_aux)(params, batch)  # weights of the fused part
        np.testing.assert_allclose(aux["source_weights"], 0.5)
    elif switch == "no_alignment":  # the same model; the loss is the cross entropy alone
        assert paths == base_paths
        values = {k: float(v.compute()) for k, v in metrics.items()}
        np.testing.assert_allclose(float(loss), values["cross_ent_loss"] + values["z_loss"],
                                   rtol=1e-6)
        assert values["question_image_alignment_loss"] > 0  # still reported
    elif switch == "joint":  # S-Enc: one encoder reads [question ; context]; no guidance
        assert paths == {p for p in base_paths if not p.startswith(("question_encoder/",
                                                                    "source_gate/"))}
        encoded, mask = _encode(model, params, batch)
        assert encoded.shape == (2, 2 * K, 16)
        joint = np.concatenate([batch["encoder_question_tokens"], batch["encoder_input_tokens"]], 1)
        np.testing.assert_array_equal(mask, joint > 0)
        text, _ = model.module.apply({"params": params}, joint, method=lambda m, t: m._text(
            m.encoder, t, False))
        text = np.asarray(text)
        np.testing.assert_allclose(encoded[1], 0.5 * text[1] * mask[1][:, None],
                                   atol=1e-6)  # row 1: no image
        assert not np.allclose(encoded[0][mask[0]], 0.5 * text[0][mask[0]])  # row 0's image
    else:  # a learned [Lv, k] map, initialised as Eq. 3's tiling: the same encodings at first
        assert paths == base_paths | {"image_to_length/resampling"}
        np.testing.assert_array_equal(params["image_to_length"]["resampling"], tiling(LV, K))
        params_without = {k: v for k, v in params.items() if k != "image_to_length"}
        np.testing.assert_allclose(_encode(model, params, batch)[0],
                                   _encode(base_model, params_without, batch)[0], atol=1e-6)
        with pytest.raises(ValueError, match="pad the context .input_length. to 8"):
            model.encode(params, _batch(k=K + 1))


def test_cached_greedy_decoding_equals_the_full_forward_pass():
    model, variables = _model(_config(moe=True))
    params = jax.tree_util.tree_map(lambda p: p * 3.0 if p.ndim == 2 else p, variables["params"])
    batch = _batch(seed=1)
    length = 6
    tokens, _ = jax.jit(model.predict_batch_with_aux)(
        params, {**batch, "decoder_input_tokens": np.zeros((2, length), np.int32)})
    logits_fn = jax.jit(lambda decoder_input: model._compute_logits(
        params, {**batch, "decoder_input_tokens": decoder_input,
                 "decoder_target_tokens": decoder_input}))
    expected = np.zeros((2, length), np.int32)
    ended = np.zeros(2, bool)
    for i in range(length):  # the whole decoder on the prefix, padded (causal: no look ahead)
        decoder_input = np.concatenate([np.zeros((2, 1), np.int32), expected[:, :-1]], 1)
        step = np.where(ended, 0, np.argmax(np.asarray(logits_fn(decoder_input))[:, i], -1))
        expected[:, i] = step
        ended |= step == 1
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert len(np.unique(expected)) > 2


def test_config_round_trips_through_json_and_a_checkpoint(tmp_path):
    from mmt_jax.checkpoints import store
    config = _config(moe=True, source_weighting="softmax", image_to_length="resample")
    assert ModelConfig.from_json_dict(config.to_json_dict()) == config
    _, variables = _model(config)
    store.save_checkpoint(str(tmp_path / "ckpt"), variables["params"], config)
    loaded_config, loaded = store.load_checkpoint(str(tmp_path / "ckpt"))
    assert loaded_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables["params"])


def test_bad_configs_and_batches_are_named():
    with pytest.raises(ValueError, match="source_weighting"):
        MultiSourceConfig(IMAGE, source_weighting="sigmoid")
    with pytest.raises(ValueError, match="S-Enc"):
        MultiSourceConfig(IMAGE, joint_encoder=True)
    with pytest.raises(ValueError, match="has several"):
        MultiSourceConfig(IMAGE, ("context", "details"), joint_encoder=True,
                          source_weighting="uniform")
    for names in [(), ("context", "context"), ("image",), ("question",), ("Title",)]:
        with pytest.raises(ValueError, match="text_sources"):
            MultiSourceConfig(IMAGE, names)
    with pytest.raises(ValueError, match="no fusion"):
        dataclasses.replace(_config(), fusion=IMAGE)
    model, variables = _model(_config())
    batch = _batch()
    with pytest.raises(ValueError, match="encoder_question_tokens"):
        model.encode(variables["params"], {k: v for k, v in batch.items()
                                           if k != "encoder_question_tokens"})
    short = {**batch, "encoder_question_tokens": batch["encoder_question_tokens"][:, :4]}
    with pytest.raises(ValueError, match="padded to one length"):
        model.encode(variables["params"], short)
    model, variables = _model(_config(text_sources=("context", "details")))
    with pytest.raises(ValueError, match=r"encoder_details_tokens .* \(the text source 'details'\)"):
        model.encode(variables["params"], batch)


def test_loss_and_gradients_on_8_devices_equal_one_device():
    """A (data 2, expert 2, model 2) mesh, three sources: the loss, every sown loss and every
    gradient equal the one-device computation; the experts are sharded over `expert`."""
    from jax.sharding import PartitionSpec as P
    model, variables = _model(_config(moe=True, text_sources=("context", "details")))
    batch = _batch(b=8, further=("details",))

    def loss_and_sown(params, batch):
        loss, metrics = model.loss_fn(params, batch, None)
        return loss, {k: metrics[k].compute() for k in ("question_context_alignment_loss",
                                                        "question_details_alignment_loss",
                                                        "question_image_alignment_loss",
                                                        "moe/auxiliary_loss")}

    grad_fn = jax.value_and_grad(loss_and_sown, has_aux=True)
    (loss, sown), grads = jax.jit(grad_fn)(variables["params"], batch)
    partitioner = Partitioner((2, 2, 2))
    shardings = partitioner.params_shardings(variables["params_axes"])
    params = jax.device_put(variables["params"], shardings)
    expert = params["decoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"]
    assert expert.sharding.spec == P("expert", "model", None)
    step = jax.jit(grad_fn, in_shardings=(shardings, partitioner.batch_shardings(batch)),
                   out_shardings=((partitioner.replicated(), partitioner.replicated()), shardings))
    with partitioner.context():
        (mesh_loss, mesh_sown), mesh_grads = step(params, partitioner.shard_batch(batch))
    np.testing.assert_allclose(mesh_loss, loss, rtol=1e-5)
    for name in sown:
        np.testing.assert_allclose(mesh_sown[name], sown[name], rtol=1e-4, err_msg=name)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           jax.device_get(mesh_grads), jax.device_get(grads))


def test_train_and_eval_binaries_run_moemoe_and_report_source_weights(data_dir, tmp_path, capsys):
    """mmt_jax/gin/models/moemoe_tiny_lite0.gin with three sources (`TEXT_SOURCES`: the title apart
    from the other text fields, and the image) through `mmt-jax train` on the qa tasks (pixels
    instead of stored features, one layer per stack), then `mmt-jax eval`: every answer carries its
    source weights, the report their mean per attribute (one here), and the plot exists; the
    Predictor and the infer binary give each answer with the same weights. A model whose sources
    differ from its task's is refused."""
    import json
    from mmt_jax import main
    from mmt_jax.checkpoints import store
    model_dir, out = str(tmp_path / "moemoe"), tmp_path / "eval"
    sources = ("image", "title", "details")
    SOURCES = "--gin.TEXT_SOURCES=('title', 'details')"
    common = ["--gin.CATALOG_PREFIX='moemoe_test'", f"--gin.DATA_DIR='{data_dir}'",
              "--gin.CATALOG='embedded-n96-s0-px32'", "--gin.IMAGE_SIZE=16", "--gin.BATCH_SIZE=8",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]
    assert main.run(["train", "--gin_file=runs/catalog.gin", "--gin_file=models/moemoe_tiny_lite0.gin",
                     f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2",
                     "--gin.TASK='qa_removed100'", "--gin.mmt4.FusionConfig.representator='patches'",
                     "--gin.mmt4.FusionConfig.patch_size=8", "--gin.mmt4.FusionConfig.feature_dim=None",
                     "--gin.mmt4.FusionConfig.pixel_features=None",
                     "--gin.t5.t5_config.num_encoder_layers=1",
                     "--gin.t5.t5_config.num_decoder_layers=2", SOURCES, *common]) == 0
    printed = capsys.readouterr().out
    assert "question_image_alignment_loss" in printed and "moe/auxiliary_loss" in printed
    config, _ = store.load_checkpoint(model_dir)
    assert config.sources.source_weighting == "linear" and config.t5.decoder_moe_layers == "odd"
    assert config.sources.names == sources and "details_encoder" in store.load_checkpoint(
        model_dir)[1]
    assert "question_details_alignment_loss" in printed
    assert main.run(["eval", "--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH='{model_dir}'",
                     f"--gin.EVAL_OUTPUT_DIR='{out}'", "--gin.TASK='qa_color_removed100'",
                     *common]) == 0
    other = ["--gin.CATALOG_PREFIX='moemoe_context'", *common[1:]]  # its own registration
    assert main.run(["eval", "--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH='{model_dir}'",
                     f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'refused'}'",
                     "--gin.TASK='qa_color_removed100'",
                     "--gin.tasks.catalog_task.qa_text_sources=('context',)", *other]) == 2
    assert ("gives the text sources ['context'], the model reads ['title', 'details']"
            in capsys.readouterr().err)
    report = json.loads((out / "report.json").read_text())
    assert list(report["tasks"]) == ["moemoe_test_qa_color_removed100"]
    assert "source_weights.png" in report["plots"]
    for name, task in report["tasks"].items():
        assert tuple(task["mean_source_weights"]) == sources, name
        rows = [json.loads(line) for line in (out / "predictions" / f"{name}.jsonl").open()]
        mean = np.mean([row["source_weights"]["image"] for row in rows])
        np.testing.assert_allclose(task["mean_source_weights"]["image"], mean, rtol=1e-5)

    # The Predictor asks the prompt's attribute of the title and the details, as the qa task did,
    # and returns the eval pipeline's answer, score and source weights; the infer binary writes
    # the weights.
    from mmt_jax import infer
    from mmt_jax.predictor import Predictor, Query
    pattern = os.path.join(data_dir, "product_catalog", "embedded-n96-s0-px32", "*",
                           "product_catalog-validation.tfrecord*")
    products = {p.id: p for p in infer.read_products(pattern)}
    # longer than training's 32: whole titles (the eval rows' lose their colour words) fit
    predictor = Predictor.from_checkpoint(model_dir, input_length=48, target_length=8,
                                          batch_size=8)
    assert predictor.asks_questions
    # the eval rows' inputs are the titles without their colour, the details the product's other
    # fields; a text longer than the 32 tokens evaluated was cut there, so only the others compare
    queries = [Query(row["id"], "color:", row["inputs"], products[row["id"]].description,
                     products[row["id"]].image, products[row["id"]].bullet_points,
                     products[row["id"]].product_type) for row in rows]
    fits = [(row, query) for row, query in zip(rows, queries) if all(
        len(predictor.vocabulary.encode(query.source_text(name))) < 32 for name in sources[1:])]
    assert len(fits) >= 3
    fits, queries = [row for row, _ in fits], [query for _, query in fits]
    for row, (_, prediction) in zip(fits, predictor.predict_queries(queries)):
        assert prediction.text == row["prediction"]
        assert prediction.score == pytest.approx(row["score"], abs=1e-4)
        assert prediction.source_weights == pytest.approx(row["source_weights"], abs=1e-5)
    predictions = tmp_path / "predictions.jsonl"
    assert main.run(["infer", "--checkpoint", model_dir, "--input", pattern, "--prompt", "color:",
                     "--out", str(predictions), "--input-length", "48", "--target-length", "8",
                     "--batch-size", "8"]) == 0
    lines = [json.loads(line) for line in predictions.open()]
    assert len(lines) == len(products) and all(
        tuple(line["source_weights"]) == sources for line in lines)
    first = products[lines[0]["id"]]
    direct = predictor.predict(prompt="color:", title=first.title, description=first.description,
                               bullet_points=first.bullet_points,
                               product_type=first.product_type, image=first.image)
    assert (lines[0]["prediction"], lines[0]["source_weights"]) == (
        direct.text, pytest.approx(direct.source_weights, abs=1e-5))


def test_both_text_encoders_and_the_decoder_start_from_one_t5():
    """A text-only T5 checkpoint of the same size initialises MoEMoE (three sources here): the
    context's, the question's and the further text source's encoders all as its encoder, the
    decoder as its decoder, the experts upcycled from its MLPs; the image encoder, the source gate,
    the projections and the routers start fresh."""
    from mmt_jax.checkpoints.store import initialize_from
    config = _config(moe=True, text_sources=("context", "details"))
    t5 = model_for(ModelConfig(dataclasses.replace(config.t5, moe=None,
                                                   decoder_moe_layers="none")).module())
    shapes = {k: v.shape for k, v in _batch().items() if k in ("encoder_input_tokens",
                                                                 "decoder_input_tokens",
                                                                 "decoder_target_tokens")}
    t5_params = jax.jit(lambda key: t5.get_initial_variables(key, shapes))(
        jax.random.key(7))["params"]
    _, variables = _model(config)
    params, fresh, derived = initialize_from(jax.device_get(variables["params"]),
                                             jax.device_get(t5_params))
    assert {p.split("/")[0] for p in fresh} == {"image_encoder", "source_gate", "question_projection",
                                                "context_projection", "details_projection",
                                                "image_projection", "decoder"}
    assert all("router" in p for p in fresh if p.startswith("decoder/"))
    assert any(p.startswith("question_encoder/") for p in derived)
    assert any(p.startswith("details_encoder/") for p in derived)
    assert any("/mlp/expert/" in p for p in derived)
    for name in ("encoder", "question_encoder", "details_encoder"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], t5_params["encoder"])
    expert = params["decoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"]
    np.testing.assert_array_equal(expert[2], t5_params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"])
