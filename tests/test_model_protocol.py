"""One Model per family behind t5x's protocol (mmt_jax/model.py): the class comes from the module's
config; the dense and MoE losses are those of before the split (golden numbers); the MoE Model owns the
router rng stream and the weighted MoE losses; the t5x adapter delegates its loss to our Model and
takes the same loss defaults (checked against a minimal stand-in for t5x, which is not installed)."""
import dataclasses
import enum
import importlib
import os
import re
import sys
import types

import jax
import numpy as np
import pytest

import mmt_jax
from mmt_jax import losses
from mmt_jax.layers.moe import MoeConfig
from mmt_jax.model import EncoderDecoderModel, MoeEncoderDecoderModel, model_class, model_for
from mmt_jax.models.config import ModelConfig
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.t5 import t5_config

MOE = MoeConfig(num_experts=4, num_selected=2, group_size=8, min_capacity=1, eval_capacity_factor=2.0,
                aux_loss_weight=0.1, z_loss_weight=0.01)


def _config(**overrides):
    return t5_config("tiny", vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                     **{"dropout_rate": 0.1, **overrides})


def _module(family, **overrides):
    if family == "t5":
        return ModelConfig(_config(**overrides)).module()
    if family == "mmt4":
        return ModelConfig(_config(**overrides), FusionConfig(patch_size=8)).module()
    return ModelConfig(_config(moe=overrides.pop("moe", MOE), decoder_moe_layers="odd",
                               **overrides)).module()


def _batch(images=False, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, 64, (2, 5)).astype(np.int32)
    weights = np.ones_like(targets)
    weights[1, 3:] = 0
    batch = {"encoder_input_tokens": rng.integers(2, 64, (2, 6)).astype(np.int32),
             "decoder_input_tokens": np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], 1),
             "decoder_target_tokens": targets * weights, "decoder_loss_weights": weights}
    if images:
        batch["encoder_images"] = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
        batch["encoder_image_mask"] = np.ones((2,), np.int32)
    return batch


def _model_params_batch(family, **overrides):
    model = model_for(_module(family, **overrides))
    batch = _batch(images=family == "mmt4")
    params = model.get_initial_variables(jax.random.key(0), {k: v.shape for k, v in batch.items()})
    return model, params["params"], batch


def _values(metrics):
    return {k: float(v.compute()) for k, v in metrics.items()}


# Computed with the single EncoderDecoderModel of before the split (it told MoE apart by duck
# typing), on CPU, from exactly these modules, batches and keys: (eval loss, training loss with
# jax.random.key(3)). The MoE entries also pin the MoE statistics of the eval pass.
GOLDEN = {
    "t5": (5.184183120727539, 5.5792131423950195),
    "mmt4": (5.211082458496094, 5.424482345581055),
    "moe": (5.403641223907471, 5.4484429359436035),
}
GOLDEN_MOE_EVAL = {"cross_ent_loss": 5.257175445556641, "z_loss": 0.0021727054845541716,
                   "moe/auxiliary_loss": 1.239152431488037, "moe/router_z_loss": 2.037787914276123,
                   "moe/expert_usage": 0.5, "moe/fraction_tokens_left_behind": 0.0,
                   "moe/router_confidence": 1.0}


@pytest.mark.parametrize("family", ["t5", "mmt4", "moe"])
def test_losses_equal_the_golden_numbers_of_before_the_split(family):
    model, params, batch = _model_params_batch(family)
    assert type(model) is (MoeEncoderDecoderModel if family == "moe" else EncoderDecoderModel)
    eval_loss, metrics = model.loss_fn(params, batch, None)
    train_loss, _ = model.loss_fn(params, batch, jax.random.key(3))
    np.testing.assert_allclose([float(eval_loss), float(train_loss)], GOLDEN[family], rtol=2e-5)
    values = _values(metrics)
    assert values["num_tokens"] == 8.0 and values["loss"] == pytest.approx(float(eval_loss))
    if family == "moe":
        for name, expected in GOLDEN_MOE_EVAL.items():
            assert values[name] == pytest.approx(expected, rel=2e-5, abs=1e-7), name
    else:
        assert not any(name.startswith("moe/") for name in values)


def test_the_class_comes_from_the_config_and_the_dense_class_refuses_an_moe_module():
    assert model_class(_module("t5")) is EncoderDecoderModel
    assert model_class(_module("mmt4")) is EncoderDecoderModel
    assert model_class(_module("moe")) is MoeEncoderDecoderModel
    # MoE configured but placed nowhere: dense.
    assert model_class(ModelConfig(_config(moe=MOE)).module()) is EncoderDecoderModel
    assert model_class(object()) is EncoderDecoderModel  # a module without a config
    _, params, batch = _model_params_batch("moe")
    with pytest.raises(TypeError, match="model_for"):
        EncoderDecoderModel(_module("moe")).loss_fn(params, batch, None)


def test_one_set_of_loss_defaults():
    assert losses.DEFAULT_LOSS == losses.LossConfig(
        label_smoothing=0.0, z_loss=1e-4, loss_normalizing_factor=losses.NUM_REAL_TARGET_TOKENS)
    for cls in (EncoderDecoderModel, MoeEncoderDecoderModel):
        assert model_for(_module("moe" if cls is MoeEncoderDecoderModel else "t5")).loss_config == (
            losses.DEFAULT_LOSS)
    model = EncoderDecoderModel(_module("t5"), label_smoothing=0.1, z_loss=0.0,
                                loss_normalizing_factor=None)
    assert (model.label_smoothing, model.z_loss, model.loss_normalizing_factor) == (0.1, 0.0, None)


def test_no_gin_file_binds_other_loss_options():
    """Our trainer and t5x's read the defaults; a gin binding of one would make them differ."""
    pattern = re.compile(r"^\s*[\w./]*\b(z_loss|label_smoothing|loss_normalizing_factor)\s*=", re.M)
    root = mmt_jax.gin_search_path()
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".gin"):
                with open(os.path.join(directory, name)) as f:
                    found += [(name, m.group(0)) for m in pattern.finditer(f.read())]
    assert not found


# ---- the MoE Model: rng stream and weighted losses ----------------------------------------------

def test_moe_rng_streams():
    key = jax.random.key(7)
    dense, moe = model_for(_module("t5")), model_for(_module("moe"))
    assert dense.rngs(None) is None and moe.rngs(None) is None
    assert set(dense.rngs(key)) == {"dropout"}
    streams = moe.rngs(key)
    assert set(streams) == {"dropout", "router_noise"}
    np.testing.assert_array_equal(jax.random.key_data(streams["router_noise"]),
                                  jax.random.key_data(jax.random.fold_in(key, 1)))


def test_router_noise_comes_from_its_own_stream():
    model, params, batch = _model_params_batch("moe", dropout_rate=0.0)  # no dropout: noise only
    fixed = jax.random.key(11)

    class FixedRouterNoise(MoeEncoderDecoderModel):
        def rngs(self, dropout_rng):
            return None if dropout_rng is None else {"dropout": dropout_rng, "router_noise": fixed}

    quiet = FixedRouterNoise(model.module)
    a, _ = model.loss_fn(params, batch, jax.random.key(1))
    b, _ = model.loss_fn(params, batch, jax.random.key(2))
    assert float(a) != float(b)  # the noise follows the dropout rng through `rngs`
    qa, _ = quiet.loss_fn(params, batch, jax.random.key(1))
    qb, _ = quiet.loss_fn(params, batch, jax.random.key(2))
    assert float(qa) == float(qb)  # ... and only through the router_noise stream


@pytest.mark.parametrize("rng", [None, 3])
def test_moe_loss_weights_add_exactly_weight_times_statistic(rng):
    rng = None if rng is None else jax.random.key(rng)
    model, params, batch = _model_params_batch("moe", moe=dataclasses.replace(
        MOE, aux_loss_weight=0.0, z_loss_weight=0.0))
    base, metrics = model.loss_fn(params, batch, rng)
    values = _values(metrics)
    assert float(base) == pytest.approx(values["cross_ent_loss"] + values["z_loss"], rel=1e-6)
    aux, router_z = values["moe/auxiliary_loss"], values["moe/router_z_loss"]
    assert aux > 0 and router_z > 0
    for aux_weight, z_weight in ((0.1, 0.0), (0.7, 0.0), (0.0, 0.01), (0.3, 0.05)):
        weighted = model_for(_module("moe", moe=dataclasses.replace(
            MOE, aux_loss_weight=aux_weight, z_loss_weight=z_weight)))
        loss, metrics = weighted.loss_fn(params, batch, rng)
        np.testing.assert_allclose(float(loss) - float(base), aux_weight * aux + z_weight * router_z,
                                   rtol=1e-5, atol=1e-6)
        assert _values(metrics)["loss"] == pytest.approx(float(loss))


# ---- the t5x adapter delegates its loss (t5x itself stood in for) --------------------------------

class _FakeT5xEncoderDecoderModel:
    """What the adapter inherits from t5x's EncoderDecoderModel, reduced to its constructor; its own
    loss must never run."""

    def __init__(self, module, input_vocabulary, output_vocabulary, optimizer_def, decode_fn=None,
                 feature_converter_cls=None, label_smoothing=0.0, z_loss=0.0,
                 loss_normalizing_factor=None):
        self.module = module
        self.t5x_loss_options = (label_smoothing, z_loss, loss_normalizing_factor)
        self.FEATURE_CONVERTER_CLS = feature_converter_cls

    def loss_fn(self, params, batch, dropout_rng):
        raise AssertionError("t5x's own loss_fn ran")

    def eval_fn(self, params, batch):
        raise AssertionError("t5x's own eval_fn ran")


@pytest.fixture
def adapter_module(monkeypatch):
    """`mmt_jax.t5x.models` imported against a stand-in `t5x` package (and removed afterwards)."""
    t5x = types.ModuleType("t5x")
    t5x_models = types.ModuleType("t5x.models")
    t5x_models.EncoderDecoderModel = _FakeT5xEncoderDecoderModel
    adafactor = types.ModuleType("t5x.adafactor")
    adafactor.FactorDim = enum.Enum("FactorDim", "NONE BATCH ROW COLUMN")
    adafactor.standard_logical_factor_rules = lambda: {}
    t5x.models, t5x.adafactor = t5x_models, adafactor
    for name, module in (("t5x", t5x), ("t5x.models", t5x_models), ("t5x.adafactor", adafactor)):
        monkeypatch.setitem(sys.modules, name, module)
    import mmt_jax.t5x
    monkeypatch.delitem(sys.modules, "mmt_jax.t5x.models", raising=False)
    monkeypatch.delattr(mmt_jax.t5x, "models", raising=False)
    return importlib.import_module("mmt_jax.t5x.models")


@pytest.mark.parametrize("family", ["mmt4", "moe"])
def test_the_t5x_adapter_computes_its_loss_with_our_model(adapter_module, family):
    module = _module(family)
    adapter = adapter_module.EncoderDecoderModel(module, None, None, None)
    ours = adapter.mmt_model
    assert type(ours) is model_class(module)
    # One set of defaults, our Model's, and t5x is told the same; an option given reaches both.
    assert ours.loss_config == losses.DEFAULT_LOSS
    assert adapter.t5x_loss_options == dataclasses.astuple(losses.DEFAULT_LOSS)
    smoothed = adapter_module.EncoderDecoderModel(module, None, None, None, label_smoothing=0.1)
    assert smoothed.mmt_model.loss_config.label_smoothing == 0.1
    assert smoothed.t5x_loss_options[0] == 0.1
    assert adapter.FEATURE_CONVERTER_CLS is ours.FEATURE_CONVERTER_CLS

    calls = []
    our_loss_fn = ours.loss_fn
    ours.loss_fn = lambda *args, **kwargs: calls.append((args, kwargs)) or our_loss_fn(*args, **kwargs)
    batch = _batch(images=family == "mmt4")
    params = adapter.get_initial_variables(jax.random.key(0),
                                           {k: v.shape for k, v in batch.items()})["params"]
    reference = model_for(module)  # built apart: the same number, not just the same call
    for rng in (None, jax.random.key(3)):
        loss, metrics = adapter.loss_fn(params, batch, rng)
        assert calls[-1] == ((params, batch, rng), {})
        expected, expected_metrics = reference.loss_fn(params, batch, rng)
        assert float(loss) == float(expected)
        assert _values(metrics) == _values(expected_metrics)
    assert float(adapter.eval_fn(params, batch)[0]) == float(reference.eval_fn(params, batch)[0])
    assert len(calls) == 3
    # t5x's scoring goes through `_compute_logits`: our forward pass, with our rng streams.
    key = jax.random.key(5)
    np.testing.assert_array_equal(adapter._compute_logits(params, batch, key),
                                  reference._compute_logits(params, batch, key))
    # t5x's decoder_params reach our decode function: closed-set decoding through the adapter
    from mmt_jax.value_trie import ValueTrie
    values = {(5, 1), (7, 9, 1)}
    constraint = ValueTrie.build({"set": sorted(values)}).constraint(
        ["set"] * len(batch["decoder_input_tokens"]))
    tokens, _ = adapter.predict_batch_with_aux(params, batch, decoder_params={"constraint": constraint})
    expected, _ = reference.predict_batch_with_aux(params, batch,
                                                   decoder_params={"constraint": constraint})
    np.testing.assert_array_equal(tokens, expected)
    assert {tuple(row[:list(row).index(1) + 1]) for row in np.asarray(tokens).tolist()} <= values


def test_token_and_sequence_accuracy_by_hand():
    """The training log's exact match: an example counts when every one of its target tokens is
    the argmax (what greedy decoding then answers word for word); rows without a target do not
    count. Logits built so that row 0 is all right, row 1 misses one of three tokens, row 2 has no
    target at all."""
    model, _, _ = _model_params_batch("t5")
    vocab = 16
    targets = np.array([[5, 6, 1, 0], [5, 7, 1, 0], [0, 0, 0, 0]], np.int32)
    predicted = np.array([[5, 6, 1, 9], [5, 3, 1, 9], [4, 4, 4, 4]])  # padding positions: anything
    logits = np.full((3, 4, vocab), -5.0, np.float32)
    np.put_along_axis(logits, predicted[..., None], 5.0, axis=-1)
    _, metrics = model.loss_from_logits(jax.numpy.asarray(logits), {"decoder_target_tokens": targets})
    values = _values(metrics)
    assert values["num_tokens"] == 6 and values["num_examples"] == 2
    assert values["token_accuracy"] == pytest.approx(5 / 6)
    assert values["sequence_accuracy"] == pytest.approx(1 / 2)
