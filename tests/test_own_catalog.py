"""A user's own catalog through the README's commands, run as the README writes them ("Your own
catalog, start to finish"): convert, train, eval and infer on a catalog whose only attribute is
named "product type", with no attribute named in any command."""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw

from mmt_jax import main, tasks
from mmt_jax.checkpoints import store

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
SECTION = "### Your own catalog, start to finish"
# Appended to the README's train command (gin's last binding wins): a 1+1-layer model, 2 steps.
TINY_TRAINING = ["--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
                 "--gin.t5.t5_config.num_encoder_layers=1", "--gin.t5.t5_config.num_decoder_layers=1",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]
TYPES = {"t-shirt": ((200, 30, 40), "rectangle"), "mug": ((30, 60, 200), "ellipse")}


def readme_commands() -> list[list[str]]:
    """The `mmt-jax` commands of the README's section, as argument lists."""
    text = open(README, encoding="utf-8").read()
    block = re.search(re.escape(SECTION) + r".*?```bash\n(.*?)```", text, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith(".venv/bin/mmt-jax ")]


def _write_catalog(directory) -> int:
    os.makedirs(directory / "images")
    with open(directory / "products.jsonl", "w", encoding="utf-8") as f:
        for i in range(24):
            kind = list(TYPES)[i % 2]
            colour, shape = TYPES[kind]
            image = Image.new("RGB", (64, 64), (240, 240, 235))
            getattr(ImageDraw.Draw(image), shape)(
                (12 + i % 5, 10, 50, 54), fill=colour)
            image.save(directory / "images" / f"p{i}.jpg", quality=90)
            f.write(json.dumps({"id": f"p{i}", "image": f"p{i}.jpg", "title": f"Acme {kind} no. {i}",
                                "attributes": {"product type": kind},
                                "split": "validation" if i >= 18 else "train"}) + "\n")
    return 24


def test_the_readme_commands_run_on_a_catalog_of_ones_own(tmp_path, monkeypatch, capsys):
    count = _write_catalog(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [c[:2] if c[0] == "data" else c[:1] for c in commands] == [
        ["data", "convert"], ["train"], ["eval"], ["infer"]]
    assert not any("catalog_task.attributes" in argument for command in commands for argument in command)
    for command in commands:
        extra = TINY_TRAINING if command[0] == "train" else []
        with contextlib.redirect_stdout(io.StringIO()):
            assert main.run(command + extra) == 0, command

    metadata = json.load(open(tmp_path / "runs/tfds/product_catalog/shop/1.0.0/metadata.json"))
    assert metadata["attributes"] == {"product type": {"products": {"train": 18, "validation": 6},
                                                       "values": {"t-shirt": 12, "mug": 12}}}
    report = json.load(open(tmp_path / "runs/shop/eval/report.json"))
    assert list(report["tasks"]) == ["shop_product_type_removed100"]
    assert report["tasks"]["shop_product_type_removed100"]["num_examples"] == 6
    # closed-set decoding beside the open one: only the values the training split names
    assert "closed_attribute_accuracy" in report["tasks"]["shop_product_type_removed100"]["metrics"]
    evaluated = [json.loads(line) for line in open(
        tmp_path / "runs/shop/eval/predictions/shop_product_type_removed100.jsonl")]
    assert {row["closed_prediction"] for row in evaluated} <= {"t-shirt", "mug"}
    # the 90%-precision thresholds, in the report and beside the checkpoint, for infer
    calibrated = report["acceptance"]
    stored = json.load(open(calibrated["file"]))
    assert calibrated["file"] == os.path.join(os.getcwd(), "runs/shop/checkpoint_2/acceptance.json")
    assert stored["thresholds"] == calibrated["thresholds"] and set(stored["thresholds"]) == {
        "open", "closed"} and list(stored["thresholds"]["open"]) == ["product type:"]
    for decoding, prediction in (("open", "prediction"), ("closed", "closed_prediction")):
        threshold = stored["thresholds"][decoding]["product type:"]
        taken = [row for row in evaluated if threshold is not None
                 and row[prediction.replace("prediction", "score")] >= threshold]
        assert not taken or np.mean([r[prediction] == r["target"] for r in taken]) >= 0.9
    rows = [json.loads(line) for line in open(tmp_path / "runs/shop/predictions.jsonl")]
    assert len(rows) == count and {row["prompt"] for row in rows} == {"product type:"}
    assert all(np.isfinite(row["score"]) for row in rows)
    threshold = stored["thresholds"]["open"]["product type:"]
    assert all(row["accepted"] == (threshold is not None and row["score"] >= threshold)
               for row in rows)

    # The checkpoint records what its task asked (a prompt it never learned is flagged) and the
    # catalog task itself, which eval above read with nothing but the checkpoint.
    config = store.load_checkpoint("runs/shop")[0]
    assert config.prompts == ("product type:",)
    assert config.trained_task == {
        "task": "attributes_removed100", "prefix": "shop", "catalog": "shop",
        "data_dir": os.path.join(os.getcwd(), "runs/tfds"), "vocabulary": None, "attributes": ["product type"],
        "removal_shares": list(tasks.REMOVAL_SHARES), "with_description": False,
        "attribute_rates": {}, "qa_text_sources": ["context"]}
    capsys.readouterr()
    assert main.run(["infer", "--checkpoint", "runs/shop", "--input", "products.jsonl", "--images",
                     "images/", "--prompt", "product type:", "--prompt", "color:", "--out",
                     "runs/shop/both.jsonl"]) == 0
    err = capsys.readouterr().err
    assert "warning: the model was never trained on the prompt 'color:' (its training task asked " \
           "'product type:')" in err and "'product type:' " not in err.split("asked")[0]

    # Closed-set decoding: the values of the training catalog, or a taxonomy file's; a prompt
    # without a value set ('color:') still decodes openly.
    def closed(*flags) -> dict[str, set[str]]:
        assert main.run(["infer", "--checkpoint", "runs/shop", "--input", "products.jsonl",
                         "--images", "images/", "--prompt", "product type:", "--prompt", "color:",
                         "--out", "runs/shop/closed.jsonl", *flags]) == 0
        answers = {}
        for line in open("runs/shop/closed.jsonl"):
            row = json.loads(line)
            answers.setdefault(row["prompt"], set()).add(row["prediction"])
        return answers
    assert closed("--closed-set")["product type:"] <= {"t-shirt", "mug"}
    with open("taxonomy.json", "w") as f:
        json.dump({"product type": ["mug"]}, f)
    answers = closed("--values", "taxonomy.json")
    assert answers["product type:"] == {"mug"} and answers["color:"] != {"mug"}
    with open("taxonomy.json", "w") as f:
        json.dump({"product type": "mug"}, f)
    capsys.readouterr()
    assert main.run(["infer", "--checkpoint", "runs/shop", "--input", "products.jsonl", "--images",
                     "images/", "--prompt", "product type:", "--out", "runs/shop/bad.jsonl",
                     "--values", "taxonomy.json"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --values taxonomy.json: expected {\"attribute\": [\"value\", ...]} with at least "
        "one non-empty value each; attribute 'product type' is not"]


def test_a_command_prints_what_it_did_and_nothing_else(tmp_path):
    """No start-up notice from TensorFlow or tensorflow-datasets (oneDNN, CUDA drivers, cuInit,
    "Using custom data configuration", progress bars off a terminal): stderr stays empty."""
    _write_catalog(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    done = subprocess.run([sys.executable, "-m", "mmt_jax.main", "data", "convert", "--jsonl",
                           "products.jsonl", "--images", "images/", "--out", "runs/tfds", "--name",
                           "shop"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == "catalog runs/tfds/product_catalog/shop/1.0.0: train 18, validation 6 products\n"
