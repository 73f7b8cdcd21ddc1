"""The short matching run that must not plateau (issue 19): the train binary on the embedded test
catalog's `match` task with the contrastive head, then the head's scores through the Predictor
against the eval pipeline's. Its own file, so pytest-xdist runs it beside test_train.py's
end-to-end runs rather than after them."""
import os

import numpy as np
import pytest

from mmt_jax import main
from mmt_jax.checkpoints import store
from tests.test_train import _args


def test_matching_learns_from_its_inputs_where_it_used_to_plateau(data_dir, tmp_path, capsys):
    """Image-text matching from scratch at a rate that used to leave it at ln 2 per answer (AdamW
    2e-3): with the contrastive head (runs/contrastive.gin, its agreement token included) the
    held-out loss per answer falls below 0.9 ln 2 and the collapse check stays silent. The loss
    scored is the whole target's ("yes"/"no" and EOS), so the answer token's own loss is lower
    still."""
    steps = 50
    assert main.run(_args(data_dir, str(tmp_path / "match"), steps, "--gin_file=runs/contrastive.gin",
                          "--gin.TASK='match'", "--gin.LEARNING_RATE=2e-3",
                          "--gin.BATCH_SIZE=32", "--gin.train.train.log_period=50",
                          f"--gin.train.train.checkpoint_period={steps}",
                          "--gin.train.train.dropout=False",
                          f"--gin.train.train.eval_period={steps}",
                          "--gin.train.train.eval_batches=1", "--gin.train.train.eval_split='train'",
                          f"--gin.train.train.collapse_check_steps={steps}",
                          "--gin.train.train.collapse_check_examples=96")) == 0
    out = capsys.readouterr()
    loss = float(out.out.split("train_test_match/loss_per_example ")[1].split(",")[0])
    assert loss < 0.9 * np.log(2), out.out[-2000:]
    assert "warning: task" not in out.out + out.err
    assert "contrastive/loss" in out.out

    # The head's scores through the Predictor equal those of the eval pipeline (retrieval.py).
    from mmt_jax import infer, retrieval
    from mmt_jax.predictor import Predictor
    from mmt_jax.task_inference import build_model
    model_dir = str(tmp_path / "match")
    config, params = store.load_checkpoint(model_dir)
    model = build_model(config)
    pairs = retrieval.embed_task(model, params, "train_test_title", "validation",
                                 {"inputs": 24, "targets": 8}, batch_size=4)
    pattern = os.path.join(data_dir, "product_catalog", "embedded-n96-s0-px32", "*",
                           "product_catalog-validation.tfrecord*")
    products = {p.title: p for p in infer.read_products(pattern)}
    predictor = Predictor.from_checkpoint(model_dir, input_length=24, batch_size=4)
    scores = predictor.match_pairs([(products[t].image, t) for t in pairs.text])
    np.testing.assert_allclose(scores, pairs.cosines(), atol=1e-5)
    assert predictor.match(image=products[pairs.text[0]].image, title=pairs.text[0]) == (
        pytest.approx(scores[0], abs=1e-5))
    from mmt_jax.errors import InputError
    with pytest.raises(InputError, match="'pair 1': field 'image'"):
        predictor.match_pairs([(products[pairs.text[0]].image, "a"), (b"not an image", "b")])
