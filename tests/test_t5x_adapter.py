"""The t5x adapter (mmt_jax/t5x) against t5x itself, for every model family, where t5x is installed
(tools/t5x/install.sh; it is not on the package registry, so CI skips this file, and
tests/test_layers.py checks the package never imports it).

t5x's MODEL is built as t5x's binaries build it: our model file, then `mmt_jax/gin/t5x/common.gin`.
Its loss, scores and decodes equal our own Model's on the same parameters and batch; t5x's own train
step (`trainer.train_with_lr`, what `t5x.train` runs) reports our loss at step 1; and t5x's
Adafactor has a factor rule for every parameter axis. (tests/test_model_protocol.py checks the
delegation against a stand-in for t5x where t5x is not installed.)"""
import gin
import jax
import numpy as np
import pytest

t5x_trainer = pytest.importorskip("t5x.trainer", reason="t5x is not installed (tools/t5x/install.sh)")

from t5x import train_state as t5x_train_state  # noqa: E402

from mmt_jax.losses import DEFAULT_LOSS  # noqa: E402
from mmt_jax.model import MoeEncoderDecoderModel, model_for  # noqa: E402

FAMILIES = {  # our model file, and bindings that keep the test small
    "mmt4": ("mmt4_tiny.gin", ["mmt4.FusionConfig.patch_size = 8"]),
    "text": ("t5_tiny_catalog.gin", []),
    "moe": ("moe_tiny_catalog.gin", []),
    "moemoe": ("moemoe_tiny_lite0.gin", []),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    from mmt_jax.t5x import models as mmt_t5x
    model_file, bindings = FAMILIES[request.param]
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [f"mmt_jax/gin/models/{model_file}", "mmt_jax/gin/t5x/common.gin"], bindings,
            finalize_config=False)
        model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    finally:
        gin.clear_config()
    assert isinstance(model, mmt_t5x.EncoderDecoderModel)
    return request.param, model


def _batch(family: str, size=2, length=8, target=4):
    rng = np.random.default_rng(0)
    batch = {"encoder_input_tokens": rng.integers(2, 800, (size, length)).astype(np.int32),
             "decoder_input_tokens": np.concatenate(
                 [np.zeros((size, 1), np.int32), rng.integers(2, 800, (size, target - 1))], 1
             ).astype(np.int32),
             "decoder_target_tokens": rng.integers(2, 800, (size, target)).astype(np.int32),
             "decoder_loss_weights": np.ones((size, target), np.int32)}
    if family == "mmt4":
        batch["encoder_images"] = rng.normal(size=(size, 16, 16, 3)).astype(np.float32)
        batch["encoder_image_mask"] = np.ones((size,), np.int32)
    if family == "moemoe":  # the stored Lite0+pixels features: 32 vectors of 1472
        batch["encoder_question_tokens"] = rng.integers(2, 800, (size, length)).astype(np.int32)
        batch["encoder_image_features"] = rng.normal(size=(size, 32, 1472)).astype(np.float32)
        batch["encoder_image_mask"] = np.ones((size,), np.int32)
    return batch


def _initial(model, batch):
    return model.get_initial_variables(jax.random.key(0), {k: v.shape for k, v in batch.items()})


def test_t5x_paths_agree_with_ours(family_model):
    family, t5x_model = family_model
    batch = _batch(family)
    variables = _initial(t5x_model, batch)  # no input_types, as t5x's eval.py calls it
    assert set(variables) == {"params", "params_axes"}
    params = variables["params"]
    # Our Model with its defaults, built apart from the adapter: the same loss as under t5x.
    ours = model_for(t5x_model.module, t5x_model.input_vocabulary, t5x_model.output_vocabulary)
    assert isinstance(ours, MoeEncoderDecoderModel) == (family in ("moe", "moemoe"))
    assert ours.loss_config == DEFAULT_LOSS == t5x_model.mmt_model.loss_config
    np.testing.assert_allclose(t5x_model.score_batch(params, batch), ours.score_batch(params, batch),
                               rtol=1e-5)
    for rng in (None, jax.random.key(3)):
        t5x_loss, _ = t5x_model.loss_fn(params, batch, rng)
        our_loss, _ = ours.loss_fn(params, batch, rng)
        np.testing.assert_allclose(t5x_loss, our_loss, rtol=1e-6)
    tokens, aux = t5x_model.predict_batch_with_aux(params, batch, num_decodes=1)
    ours_tokens, ours_aux = ours.predict_batch_with_aux(params, batch)
    np.testing.assert_array_equal(tokens, ours_tokens)
    np.testing.assert_allclose(aux["scores"], ours_aux["scores"], rtol=1e-5)


def test_t5x_train_step_reports_our_loss_at_step_one(family_model):
    """t5x's train step (accumulate the gradients, apply them, as `t5x.train` runs it) on t5x's
    initial train state: its loss metric is our Model's loss of the same parameters, batch and
    dropout rng, to 1e-5, with MoE's auxiliary and MoEMoE's alignment losses in it."""
    family, t5x_model = family_model
    batch = _batch(family)
    variables = _initial(t5x_model, batch)
    state = t5x_train_state.FlaxOptimTrainState.create(t5x_model.optimizer_def, variables)
    rng = jax.random.key(7)
    new_state, metrics = t5x_trainer.train_with_lr(state, batch, 1e-3, rng, t5x_model,
                                                   num_microbatches=None)
    ours = model_for(t5x_model.module)
    expected, our_metrics = ours.loss_fn(variables["params"], batch, rng)
    np.testing.assert_allclose(float(metrics["loss"].compute()), float(expected), rtol=1e-5)
    if family in ("moe", "moemoe"):
        assert {"moe/auxiliary_loss", "moe/router_z_loss"} <= set(metrics)
    if family == "moemoe":
        assert "question_context_alignment_loss" in metrics
    assert int(new_state.step) == 1


def test_adafactor_has_a_factor_rule_for_every_parameter_axis(family_model):
    from flax.linen import partitioning
    family, t5x_model = family_model
    variables = _initial(t5x_model, _batch(family))
    optimizer = t5x_model.optimizer_def
    # as t5x's FlaxOptimTrainState.create does; an axis without a rule raises KeyError here
    optimizer.set_param_axes(partitioning.get_axis_names(variables["params_axes"]))
    state = optimizer.create(variables["params"])
    factored = [path for path, leaf in jax.tree_util.tree_leaves_with_path(state.state.param_states)
                if "v_row" in jax.tree_util.keystr(path) and leaf.size > 1]
    assert factored  # the 2-D kernels are factored
