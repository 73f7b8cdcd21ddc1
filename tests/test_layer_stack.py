"""Scanned layer stacks and rematerialisation (issue 12, layers/layer_stack.py): the same model under
another parameter layout and another memory/compute trade, never another result.

The reference is the unrolled model: a scanned model given the unrolled parameters stacked by
`layer_stack.scanned` must produce the same logits, gradients, decoded tokens and beam scores; remat
must not change the gradients; a converted (unrolled) checkpoint must start a scanned model; the
2x4 mesh must shard the stacked kernels as the axis rules say.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmt_jax import decoding
from mmt_jax.checkpoints import hf_t5, store
from mmt_jax.layers import layer_stack
from mmt_jax.layers.moe import MoeConfig
from mmt_jax.model import model_for
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.t5 import EncoderDecoder, T5Config, t5_config
from mmt_jax.partitioning import Partitioner
from mmt_jax.vision.vit import vit_config
from tests.test_sharding import tiny_batch

VOCAB = 64


def _config(**fields) -> T5Config:
    return t5_config("tiny", **{"vocab_size": VOCAB, "num_encoder_layers": 3,
                                "num_decoder_layers": 2, **fields})


MOE = dict(moe=MoeConfig(num_experts=4, num_selected=2), decoder_moe_layers="all")


def _batch():
    return tiny_batch(batch=4, enc=9, dec=6, vocab=VOCAB, seed=3)


def _init(config: T5Config, batch):
    model = model_for(EncoderDecoder(config))
    shapes = {k: v.shape for k, v in batch.items()}
    return model, jax.jit(lambda key: model.get_initial_variables(key, shapes))(jax.random.key(0))


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _assert_trees_close(a, b, **tolerances):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **tolerances), a, b)


@pytest.mark.parametrize("fields", [{}, MOE], ids=["dense", "moe"])
def test_scanned_model_equals_unrolled_in_loss_gradients_and_layout(fields):
    batch = _batch()
    model, variables = _init(_config(**fields), batch)
    scanned_model, scanned_variables = _init(_config(scan_layers=True, **fields), batch)
    params = _host(variables["params"])
    stacked = layer_stack.scanned(params, scanned_variables["params"])

    # The documented mapping: layers_{i}/X == layers/X[i], and the logical axes gain `layers` first.
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(
        scanned_variables["params"])
    np.testing.assert_array_equal(stacked["encoder"]["layers"]["attention"]["query"]["kernel"][2],
                                  params["encoder"]["layers_2"]["attention"]["query"]["kernel"])
    axes = scanned_variables["params_axes"]["decoder"]["layers"]["pre_mlp_layer_norm"]
    assert tuple(axes["scale_axes"].names) == ("layers", "embed")
    _assert_trees_close(layer_stack.unscanned(stacked), params, rtol=0, atol=0)

    def loss_and_grads(m, p):
        # MoE: router noise and dropout off (no dropout rng), so both runs route identically.
        return jax.value_and_grad(lambda q: m.loss_fn(q, batch, None)[0])(p)

    loss, grads = jax.jit(lambda p: loss_and_grads(model, p))(params)
    scanned_loss, scanned_grads = jax.jit(lambda p: loss_and_grads(scanned_model, p))(stacked)
    np.testing.assert_allclose(float(scanned_loss), float(loss), rtol=1e-6)
    _assert_trees_close(layer_stack.unscanned(_host(scanned_grads)), _host(grads),
                        rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", ["minimal", "full"])
def test_remat_changes_no_gradient(policy):
    batch = _batch()
    one_layer = dict(num_encoder_layers=1, num_decoder_layers=1)
    model, variables = _init(_config(**one_layer), batch)
    remat_model, _ = _init(_config(remat_policy=policy, **one_layer), batch)
    params = variables["params"]
    rng = jax.random.key(7)  # dropout on: remat must replay the same dropout masks
    grad = lambda m: jax.jit(jax.grad(lambda p: m.loss_fn(p, batch, rng)[0]))(params)  # noqa: E731
    _assert_trees_close(_host(grad(remat_model)), _host(grad(model)), rtol=1e-5, atol=1e-7)


def test_remat_policy_really_recomputes():
    """`full` keeps only each layer's input: the compiled backward pass has more matmuls than with
    no remat (XLA's cost analysis counts the recomputed forward)."""
    batch = _batch()
    flops = {}
    for policy in ("none", "full"):
        model, variables = _init(_config(remat_policy=policy), batch)
        step = jax.jit(jax.grad(lambda p, m=model: m.loss_fn(p, batch, None)[0]))
        flops[policy] = step.lower(variables["params"]).compile().cost_analysis()["flops"]
    assert flops["full"] > 1.1 * flops["none"], flops


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_scanned_decoding_equals_unrolled(decode):
    """The scanned decoder keeps its cache stacked `[layers, batch, ...]`; beam search must expand
    and reorder it on the batch axis, not the layer axis."""
    batch = _batch()
    model, variables = _init(_config(), batch)
    scanned_model, scanned_variables = _init(_config(scan_layers=True), batch)
    params = _host(variables["params"])
    stacked = layer_stack.scanned(params, scanned_variables["params"])
    decode_fn = decoding.beam_search if decode == "beam" else decoding.greedy
    num_decodes = 3 if decode == "beam" else 1

    def predict(m, p):
        return m.predict_batch_with_aux(p, batch, decode_fn=decode_fn, num_decodes=num_decodes,
                                        return_all_decodes=True)

    tokens, aux = predict(model, params)
    scanned_tokens, scanned_aux = predict(scanned_model, stacked)
    np.testing.assert_array_equal(scanned_tokens, tokens)
    np.testing.assert_allclose(scanned_aux["scores"], aux["scores"], rtol=1e-5)

    cache = scanned_model.init_decode_cache(stacked, *scanned_model.encode(stacked, batch), 6)
    key = cache["decoder"]["layers"]["self_attention"]["cached_key"]
    assert key.shape[:2] == (2, 4)  # [layers, batch, length, heads, kv]
    assert decoding.expand_batch(cache, 3)["decoder"]["layers"]["self_attention"][
        "cached_key"].shape[:2] == (2, 12)


def test_unrolled_checkpoint_starts_a_scanned_model_and_exports_unrolled(tmp_path):
    """A converted checkpoint is unrolled (HF and t5x name every layer); `initialize_from` stacks it
    into a scanned model, upcycling dense MLPs into every expert, and the HF export unrolls again."""
    batch = _batch()
    _, dense = _init(_config(), batch)
    _, moe = _init(_config(scan_layers=True, **MOE), batch)
    pretrained = _host(dense["params"])
    merged, fresh, upcycled = store.initialize_from(_host(moe["params"]), pretrained)

    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(moe["params"])
    experts = merged["decoder"]["layers"]["mlp"]["expert"]["wi_0"]["kernel"]  # [layers, experts, ...]
    for layer in range(2):
        for expert in range(4):
            np.testing.assert_array_equal(
                experts[layer, expert], pretrained["decoder"][f"layers_{layer}"]["mlp"]["wi_0"]["kernel"])
    assert upcycled == [f"decoder/layers_{i}/mlp/expert/{w}/kernel"
                        for i in range(2) for w in ("wi_0", "wi_1", "wo")]
    assert fresh == [f"decoder/layers_{i}/mlp/router/kernel" for i in range(2)]
    np.testing.assert_array_equal(merged["encoder"]["layers"]["mlp"]["wo"]["kernel"][1],
                                  pretrained["encoder"]["layers_1"]["mlp"]["wo"]["kernel"])

    # A scanned dense model exports the same Hugging Face tensors as its unrolled twin.
    _, scanned_dense = _init(_config(scan_layers=True), batch)
    stacked, _, _ = store.initialize_from(_host(scanned_dense["params"]), pretrained)
    hf_t5.save_hf_t5(stacked, _config(scan_layers=True), str(tmp_path / "scanned"))
    hf_t5.save_hf_t5(pretrained, _config(), str(tmp_path / "unrolled"))
    _assert_trees_close(hf_t5.read_safetensors(str(tmp_path / "scanned")),
                        hf_t5.read_safetensors(str(tmp_path / "unrolled")), rtol=0, atol=0)


def _sharded_and_single_device(model, batch, mesh):
    """`(params on the mesh, loss and grads on the mesh, loss and grads on one device)`."""
    shapes = {k: v.shape for k, v in batch.items()}
    with mesh.context():
        abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
    shardings = mesh.params_shardings(abstract["params_axes"])
    params = mesh.partition(lambda: model.get_initial_variables(jax.random.key(0), shapes)["params"],
                            (), shardings)()

    def loss_and_grads(p, b):
        return jax.value_and_grad(lambda q: model.loss_fn(q, b, None)[0])(p)

    step = mesh.partition(loss_and_grads, (shardings, mesh.batch_shardings(batch)),
                          (mesh.replicated(), shardings))
    sharded = step(params, mesh.shard_batch(batch))
    single = jax.jit(loss_and_grads)(*jax.device_put((jax.device_get(params), batch),
                                                     jax.devices()[0]))
    return params, sharded, single


def test_scanned_stack_shards_stacked_kernels_and_matches_one_device():
    batch = tiny_batch(vocab=128)
    config = t5_config("tiny", vocab_size=128, scan_layers=True, remat_policy="minimal")
    mesh = Partitioner((2, 1, 4))
    params, (loss, grads), (loss_1, grads_1) = _sharded_and_single_device(
        model_for(EncoderDecoder(config)), batch, mesh)
    layers = params["encoder"]["layers"]
    assert layers["mlp"]["wi_0"]["kernel"].sharding.spec == P(None, None, "model")
    assert layers["attention"]["out"]["kernel"].sharding.spec == P(None, "model", None)
    np.testing.assert_allclose(float(loss), float(loss_1), rtol=1e-5)
    _assert_trees_close(jax.device_get(grads), jax.device_get(grads_1), rtol=1e-4, atol=1e-6)


def test_mmt4_with_scanned_vit_trains_sharded():
    """MMT4 with a ViT, every stack scanned and rematerialised, on the 2x4 mesh (the ViT's CLS token
    once named one logical axis twice, which only a mesh rejects)."""
    batch = tiny_batch(batch=8, enc=6, dec=4, vocab=128)
    batch["encoder_images"] = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    vit = vit_config("tiny", scan_layers=True, remat_policy="full")
    config = t5_config("tiny", vocab_size=128, scan_layers=True, remat_policy="full")
    module = EncoderDecoder(config, FusionConfig(representator="vit", network=vit))
    params, (loss, grads), (loss_1, grads_1) = _sharded_and_single_device(
        model_for(module), batch, Partitioner((2, 1, 4)))
    vit_layers = params["image_fusion"]["representator"]["layers"]
    assert vit_layers["mlp"]["wi"]["kernel"].shape == (2, 32, 64)
    np.testing.assert_allclose(float(loss), float(loss_1), rtol=1e-5)
    _assert_trees_close(jax.device_get(grads), jax.device_get(grads_1), rtol=1e-4, atol=1e-6)


def test_scan_and_remat_settings_are_checked():
    with pytest.raises(ValueError, match="remat policy 'some'"):
        _config(remat_policy="some")
    with pytest.raises(ValueError, match="decoder_moe_layers='odd'.*'all' or 'none'"):
        _config(scan_layers=True, moe=MoeConfig(), decoder_moe_layers="odd")
    config = _config(scan_layers=True, remat_policy="full")
    assert T5Config.from_json_dict(config.to_json_dict()) == config
    old = {k: v for k, v in _config().to_json_dict().items()
           if k not in ("scan_layers", "remat_policy")}  # a checkpoint written before scan existed
    assert T5Config.from_json_dict(old) == _config()
