"""The command-line entry points, run in-process on tiny inputs (flax examples' train_test pattern)."""
import json
import re
import os

import jax
import numpy as np
import pytest
import safetensors.numpy

from mmt_jax import main
from mmt_jax.checkpoints import hf_t5, store
from tests.hf_reference import build_hf_t5, save_hf_checkpoint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("hf"))
    return save_hf_checkpoint(build_hf_t5("t5_1_1"), directory, "t5_1_1")


def test_convert_from_hf_and_back(hf_dir, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    assert main.run(["convert", "--from-hf", hf_dir, "--to", ckpt]) == 0
    assert "T5.1.1" in capsys.readouterr().out
    config, params = store.load_checkpoint(ckpt)
    ref_config, ref_params = hf_t5.load_hf_t5(hf_dir)
    assert config.t5 == ref_config and config.fusion is None
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)
    # Refuses to overwrite, then exports back to the same tensors.
    assert main.run(["convert", "--from-hf", hf_dir, "--to", ckpt]) == 2
    assert "already exists" in capsys.readouterr().err
    out = str(tmp_path / "hf_again")
    assert main.run(["convert", "--from-checkpoint", ckpt, "--to-hf", out]) == 0
    original = safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def _broken_copy(hf_dir, tmp_path, edit_tensors=None, edit_config=None):
    target = tmp_path / "broken"
    target.mkdir()
    tensors = safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    safetensors.numpy.save_file(tensors, str(target / "model.safetensors"))
    json.dump(config, open(target / "config.json", "w"))
    return str(target)


@pytest.mark.parametrize("case, expected", [
    ("missing_dir", "nowhere: no such checkpoint directory"),
    ("missing_weights", "no model.safetensors"),
    ("missing_config", "config.json: missing"),
    ("wrong_shape", "'encoder.block.1.layer.1.DenseReluDense.wo.weight' has shape (32, 65)"),
    ("missing_tensor", "'decoder.block.2.layer.1.EncDecAttention.k.weight' (for decoder/layers_2/"
                       "encoder_decoder_attention/key/kernel) is missing"),
    ("unknown_tensor", "'encoder.block.0.layer.0.SelfAttention.rotary.weight'"),
    ("unknown_activation", "unknown feed_forward_proj 'gated-swish9'"),
])
def test_convert_errors_name_the_culprit(hf_dir, tmp_path, capsys, case, expected):
    if case == "missing_dir":
        source = str(tmp_path / "nowhere")
    elif case == "missing_weights":
        source = str(tmp_path)
        (tmp_path / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    elif case == "missing_config":
        source = str(tmp_path)
        safetensors.numpy.save_file({"shared.weight": np.zeros((2, 2), np.float32)},
                                    str(tmp_path / "model.safetensors"))
    elif case == "wrong_shape":
        def edit(t):
            t["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 65), np.float32)
        source = _broken_copy(hf_dir, tmp_path, edit_tensors=edit)
    elif case == "missing_tensor":
        source = _broken_copy(hf_dir, tmp_path, edit_tensors=lambda t: t.pop(
            "decoder.block.2.layer.1.EncDecAttention.k.weight"))
    elif case == "unknown_tensor":
        def edit(t):
            t["encoder.block.0.layer.0.SelfAttention.rotary.weight"] = np.zeros(3, np.float32)
        source = _broken_copy(hf_dir, tmp_path, edit_tensors=edit)
    else:
        source = _broken_copy(hf_dir, tmp_path,
                              edit_config=lambda c: c.update(feed_forward_proj="gated-swish9"))
    assert main.run(["convert", "--from-hf", source, "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not os.path.exists(tmp_path / "out")  # nothing half-written


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
    """One workdir (and catalog) for both jobs, as a user running both would have."""
    return tmp_path_factory.mktemp("demo")


def test_demo_runs_the_main_job_and_prints_the_table(demo_workdir, capsys):
    from mmt_jax import demo
    tmp_path = demo_workdir
    accuracy = demo.run(workdir=str(tmp_path), pretrain_steps=2, finetune_steps=2, num_products=48,
                        batch_size=8, examples=2)
    out = capsys.readouterr().out
    assert set(accuracy) == {"T5", "MMT4"}
    assert all(0 <= a <= 1 for model in accuracy.values() for a in model.values())
    assert "| color |" in out and "| sleeve_type |" in out and "Examples (" in out
    assert "$ mmt-jax train --gin_file=runs/catalog.gin --gin_file=models/mmt4_tiny_lite0.gin" in out
    assert "--gin.LEARNING_RATE=0.001 --gin.WARMUP_STEPS=100 " in out
    assert """'--gin.tasks.catalog_task.attribute_rates={"color": 3.0}'""" in out
    config, params = store.load_checkpoint(str(tmp_path / "mmt4" / "checkpoint_2"))
    assert config.trained_task["attribute_rates"] == {"color": 3.0}
    assert config.fusion.representator == "precomputed" and "image_fusion" in params
    assert config.image.extractor == "efficientnet-lite0+pixels"  # the demo's stored features
    assert config.contrastive is None


def test_multitask_job_reports_matching_retrieval_and_titles(demo_workdir, capsys):
    from mmt_jax import demo
    tmp_path = demo_workdir
    # From scratch (the table2 test covers the pretrained start): no pretraining run
    report = demo.run(workdir=str(tmp_path), job="multitask", pretrain_steps=0, finetune_steps=2,
                      num_products=48, batch_size=8, examples=2)
    out = capsys.readouterr().out
    assert set(report) == {"MMT4", "MMT4 image-text"}
    image_text = report["MMT4 image-text"]
    assert {"match_generative_roc_auc", "match_head_pr_auc", "match_head_pairs_per_second",
            "recall@1", "recall@10", "title_rouge1_recall_validation",
            "title_rouge1_recall_train"} <= set(image_text)
    assert all(0 <= v <= 1 for k, v in image_text.items() if "per_second" not in k)
    assert "| contrastive head (cosine) |" in out and "recall@10" in out and "ROUGE-1" in out
    assert ("--gin_file=models/mmt4_tiny_lite0.gin --gin_file=runs/contrastive.gin" in out
            and "multitask_removed100" in out and "--gin.LEARNING_RATE=0.00067" in out)
    config, params = store.load_checkpoint(str(tmp_path / "mmt4_multitask" / "checkpoint_2"))
    assert config.contrastive is not None and "contrastive_head" in params
    assert config.contrastive.agreement_token and "agreement_embedding" in params  # the recipe's
    assert "INITIAL_CHECKPOINT_PATH" not in out and not (tmp_path / "mmt4_multitask_pretrain").exists()


def test_moemoe_job_starts_from_table2s_t5_and_reports_recall_and_source_weights(demo_workdir,
                                                                                  capsys):
    from mmt_jax import demo
    tmp_path = demo_workdir  # after the table2 test, whose T5 pretraining MoEMoE starts from
    # one ablation (each MoEMoE compiles its own programs): it starts from T5's pretraining, on
    # the qa tasks, with its switch
    report = demo.run(workdir=str(tmp_path), job="moemoe", pretrain_steps=2, finetune_steps=2,
                      num_products=48, batch_size=8, examples=2, models=("WoAL",))
    out = capsys.readouterr().out
    assert set(report) == {"WoAL", "WoAL recall@P90", "WoAL image share"}
    assert all(0 <= v <= 1 for values in report.values() for v in values.values())
    assert "| WoAL R@P90 |" in out and "| WoAL image share |" in out
    assert f"INITIAL_CHECKPOINT_PATH=\"{tmp_path}/t5_pretrain/checkpoint_2\"" in out
    assert "--gin.TASK=\"qa_removed100\"" in out
    assert "--gin.moemoe.MultiSourceConfig.question_image_weight=0.0" in out
    config, _ = store.load_checkpoint(str(tmp_path / "woal" / "checkpoint_2"))
    assert config.sources.question_context_weight == 0.0
    assert not (tmp_path / "moemoe_pretrain").exists()
    with pytest.raises(ValueError, match="not in job 'table2'"):
        demo.run(workdir=str(tmp_path), models=("MoEMoE",))


@pytest.mark.parametrize("command, expected", [
    ("train", [r"MODEL_DIR\s+required", r"DATA_DIR\s+@tasks.default_data_dir\(\)\s+# \$MMT_JAX_DATA_DIR",
               r'CATALOG\s+"embedded-n3000-s0-px128"', r"LEARNING_RATE\s+2e-4", r"BATCH_SIZE\s+32"]),
    ("eval", [r"CHECKPOINT_PATH\s+required", r'EVAL_SPLIT\s+"validation"', r"TASK\s+None\s+# the checkpoint's training task",
              r'TASK_FEATURE_LENGTHS\s+\{"inputs": 64, "targets": 16\}']),
])
def test_help_lists_the_gin_settings_with_their_defaults(command, expected, capsys):
    with pytest.raises(SystemExit):
        main.run([command, "--help"])
    shown = capsys.readouterr().out
    for pattern in expected:
        assert re.search(pattern, shown), pattern
