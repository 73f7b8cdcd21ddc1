"""The t5x adapter (mmt_jax/t5x) against t5x itself, where t5x is installed (it is not on the package
registry, so CI skips this file; tests/test_layers.py checks the package never imports it).

The gin model file builds t5x's MODEL; its loss is our Model's (same defaults, same number), and t5x's
scoring and decoding over it agree with mmt_jax's own Model on the same parameters; and t5x's
Adafactor has a factor rule for every parameter axis. (tests/test_model_protocol.py checks the
delegation against a stand-in for t5x where t5x is not installed.)"""
import os

import gin
import jax
import numpy as np
import pytest

t5x_adafactor = pytest.importorskip("t5x.adafactor")

import mmt_jax  # noqa: E402
from mmt_jax.losses import DEFAULT_LOSS  # noqa: E402
from mmt_jax.model import model_for  # noqa: E402


@pytest.fixture(scope="module")
def t5x_model():
    from mmt_jax.t5x import models as mmt_t5x
    gin.clear_config()
    try:
        gin.add_config_file_search_path(mmt_jax.gin_search_path())
        gin.parse_config_files_and_bindings([os.path.join("t5x", "mmt4_tiny.gin")],
                                            ["mmt4.FusionConfig.patch_size = 8"])
        model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    finally:
        gin.clear_config()
    assert isinstance(model, mmt_t5x.EncoderDecoderModel)
    return model


def _batch(size=2, length=6, target=4, image=16):
    rng = np.random.default_rng(0)
    return {"encoder_input_tokens": rng.integers(2, 800, (size, length)).astype(np.int32),
            "decoder_input_tokens": np.concatenate(
                [np.zeros((size, 1), np.int32), rng.integers(2, 800, (size, target - 1))], 1
            ).astype(np.int32),
            "decoder_target_tokens": rng.integers(2, 800, (size, target)).astype(np.int32),
            "decoder_loss_weights": np.ones((size, target), np.int32),
            "encoder_images": rng.normal(size=(size, image, image, 3)).astype(np.float32),
            "encoder_image_mask": np.ones((size,), np.int32)}


def test_t5x_paths_agree_with_ours(t5x_model):
    batch = _batch()
    shapes = {k: v.shape for k, v in batch.items()}
    variables = t5x_model.get_initial_variables(jax.random.key(0), shapes)  # no input_types: eval.py
    assert set(variables) == {"params", "params_axes"}
    params = variables["params"]
    # Our Model with its defaults, built apart from the adapter: the same loss as under t5x.
    ours = model_for(t5x_model.module, t5x_model.input_vocabulary, t5x_model.output_vocabulary)
    assert ours.loss_config == DEFAULT_LOSS == t5x_model.mmt_model.loss_config
    np.testing.assert_allclose(t5x_model.score_batch(params, batch), ours.score_batch(params, batch),
                               rtol=1e-5)
    for rng in (None, jax.random.key(3)):
        t5x_loss, _ = t5x_model.loss_fn(params, batch, rng)
        our_loss, _ = ours.loss_fn(params, batch, rng)
        np.testing.assert_allclose(t5x_loss, our_loss, rtol=1e-6)
    np.testing.assert_allclose(t5x_model.eval_fn(params, batch)[0],
                               ours.loss_fn(params, batch, None)[0], rtol=1e-6)
    tokens, aux = t5x_model.predict_batch_with_aux(params, batch, num_decodes=2)
    ours_tokens, ours_aux = ours.predict_batch_with_aux(params, batch, num_decodes=2,
                                                        decode_fn=t5x_model.mmt_model._decode_fn)
    np.testing.assert_array_equal(tokens, ours_tokens)
    np.testing.assert_allclose(aux["scores"], ours_aux["scores"], rtol=1e-5)


def test_adafactor_has_a_factor_rule_for_every_parameter_axis(t5x_model):
    from flax.linen import partitioning
    variables = t5x_model.get_initial_variables(jax.random.key(0),
                                                {k: v.shape for k, v in _batch().items()})
    optimizer = t5x_model.optimizer_def
    # as t5x's FlaxOptimTrainState.create does; an axis without a rule raises KeyError here
    optimizer.set_param_axes(partitioning.get_axis_names(variables["params_axes"]))
    state = optimizer.create(variables["params"])
    factored = [path for path, leaf in jax.tree_util.tree_leaves_with_path(state.state.param_states)
                if "v_row" in jax.tree_util.keystr(path) and leaf.size > 1]
    assert factored  # the 2-D kernels are factored
