"""The README's facts that code defines, read from the README and compared with the code, so the two
cannot drift apart (issue 18 found three that had). The README's own-catalog commands are run as
written in test_own_catalog.py."""
import dataclasses
import os
import re
import shlex

from mmt_jax import demo, gin_config, image_spec
from mmt_jax.task_inference import Prediction

README = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"),
              encoding="utf-8").read()
GIN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "mmt_jax", "gin")


def test_the_eval_prediction_fields_are_the_written_ones():
    listed = re.search(r"`predictions/<task>\.jsonl` \(([^)]*)\)", README).group(1)
    assert re.findall(r"`(\w+)`", listed) == [f.name for f in dataclasses.fields(Prediction)]


def test_the_stored_features_widths_are_the_extractors_and_the_model_files():
    spec = "efficientnet-lite0+pixels-px128"
    vectors, width = image_spec.feature_shape(image_spec.preprocessing(spec))
    assert f"`{spec}` (the main job's) gives {vectors} vectors of 1280 + 192 = {width}" in README
    model_file = open(os.path.join(GIN, "models", "mmt4_tiny_lite0.gin")).read()
    for setting in re.search(r'A model reads them as `FusionConfig\(representator="precomputed", (.*?)\)',
                             README, re.S).group(1).split(","):
        name, value = (part.strip() for part in setting.split("="))
        assert re.search(rf"^\s+{name} = {value}$", model_file, re.M), setting


def test_the_main_job_is_described_with_its_own_recipe():
    job = demo.JOBS["table2"]
    pretrain = demo.run.__defaults__[2]  # run(workdir, job, pretrain_steps, ...)
    rate = f"{job.learning_rate:.0e}".replace("e-0", "e-")
    assert (f"{pretrain} pretraining and {job.finetune_steps} fine-tuning steps at batch 32, AdamW at "
            f"{rate} with a {job.warmup_steps}-step warm-up") in README.replace("\n", " ")
    assert job.attribute_rates == {"color": 3.0} and "colour at 3 times" in README.replace("\n", " ")


def _readme_gin_commands():
    """(command line, gin files, settings bound) of every `mmt-jax train|eval` line in the README."""
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", README, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.split(maxsplit=1) or not line.split()[0].endswith("mmt-jax"):
                continue
            words = shlex.split(line.strip(), comments=True)
            if len(words) > 1 and words[1] in ("train", "eval"):
                files = [w.split("=", 1)[1] for w in words if w.startswith("--gin_file=")]
                bound = [w[len("--gin."):].split("=", 1)[0] for w in words if w.startswith("--gin.")]
                yield line.strip(), files, bound


def test_every_setting_a_readme_command_binds_exists_in_its_gin_files():
    """A setting renamed in the gin files (or misspelt in the README) would be a new, unused gin
    macro and change nothing: every upper-case `--gin.NAME=` of a README command is defined by the
    gin files the command reads."""
    commands = list(_readme_gin_commands())
    assert len(commands) >= 8
    for line, files, bound in commands:
        defined = {name for f in files for name, _, _ in gin_config.settings(f)}
        for name in bound:
            if name.isupper():
                assert name in defined, f"{name} in: {line}"
