"""The infer binary: products in, one JSON line of predictions per product and prompt out.

    mmt-jax infer --checkpoint runs/demo/mmt4 --input products.jsonl --images images/ \\
        --prompt color: --prompt pattern: --out predictions.jsonl [--num-beams 4]

Input is a catalog JSONL (the record format of `data/records.py`; attributes and split are ignored)
or the TFRecord files a `mmt-jax data convert` wrote (a glob such as
`DIR/product_catalog/NAME/1.0.0/product_catalog-test.tfrecord*`; a catalog written with
`--image-features` gives its stored features, which a checkpoint trained on the same extractor
reads instead of extracting them again). Each output line is
`{"id", "prompt", "prediction", "score"}`, `score` the log-probability of the prediction (a MoEMoE
checkpoint adds `source_weights`, `{"image": ..., "context": ...}`: how much the answer drew on
each source; it reads the whole text, so `--with-description` is implied), and `accepted` for a
prompt the checkpoint has a calibrated threshold for (`acceptance.py`, written by `mmt-jax eval`),
whose accepted share is printed at the end. The output
is written to a temporary file and renamed when complete, so an interrupted run never leaves a
truncated file that looks finished, and an existing file is replaced only by a whole new one.

Multi-host (`--multihost`, or `--coordinator_address/--num_processes/--process_id`): process i of
n predicts every n-th product from its i-th (`shard=(i, n)`) on its own local devices and writes
`<out stem>-<i>-of-<n><suffix>` (`shard_path`); every process reads the whole input, so each
refuses a bad record or a repeated id alike.

Ids key the output, so an input that repeats an id is refused, naming the id and both lines. A bad
record (a line that does not parse, a repeated id, a text longer than `--input-length`, an image that
does not decode) stops the run with one error naming it and writes nothing (`--on-error fail`, the
default), or is reported on stderr and left out while every other product is still predicted
(`--on-error skip`; for a repeated id, the later line is the one left out).
"""
import json
import os
import sys
import tempfile
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from mmt_jax import image_spec
from mmt_jax.data import records, tfds_catalog
from mmt_jax.errors import InputError
from mmt_jax.predictor import Predictor, Query


def read_products(path: str, images_dir: str | None = None, on_error: str = "fail",
                  allow_absolute_image_paths: bool = False) -> Iterator[records.Product]:
    """Products of a JSONL catalog (`.jsonl`/`.json`) or of TFRecord files (any other path or glob).

    A bad JSONL line raises `records.RecordError` naming the line, record and field; with
    `on_error="skip"` it is reported on stderr and left out. A product whose id came before is bad
    too ("duplicate of line N"; of example N in TFRecord files), since ids key the output.
    """
    first_of_id = {}
    if path.endswith((".jsonl", ".json")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no input file {path}")
        with open(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    product, _ = records.parse_record(
                        raw, line, images_dir, allow_absolute_image_paths=allow_absolute_image_paths)
                    if product.id in first_of_id:
                        raise records.RecordError(line, product.id, "id",
                                                  f"duplicate of line {first_of_id[product.id]}")
                except records.RecordError as e:
                    if on_error != "skip":
                        raise
                    print(f"skipped {e}", file=sys.stderr)
                    continue
                first_of_id.setdefault(product.id, line)
                yield product
        return
    files = tf.io.gfile.glob(path)
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {path}")
    directories = {os.path.dirname(file) for file in files}
    spec = (tfds_catalog.stored_features_spec(directories.pop()) if len(directories) == 1
            else None)
    features = tfds_catalog.catalog_features(spec)
    options = spec and image_spec.preprocessing(spec)
    dataset = tf.data.TFRecordDataset(sorted(files)).map(features.deserialize_example)
    for number, example in enumerate(dataset.as_numpy_iterator(), start=1):
        text = lambda key: example[key].decode("utf-8")  # noqa: E731
        if text("id") in first_of_id:
            error = InputError(f"{path}: example {number}, record {text('id')!r}: field 'id': "
                               f"duplicate of example {first_of_id[text('id')]}")
            if on_error != "skip":
                raise error
            print(f"skipped {error}", file=sys.stderr)
            continue
        first_of_id.setdefault(text("id"), number)
        yield records.Product(id=text("id"), title=text("title"), image=example["image"],
                              description=text("description"),
                              bullet_points=tuple(b.decode("utf-8")
                                                  for b in example["bullet_points"]),
                              product_type=text("product_type"),
                              image_features=spec and image_spec.StoredFeatures(
                                  options, example["image_features"].astype(np.float32)))


def queries(products, prompts: Sequence[str], with_description: bool) -> Iterator[Query]:
    for product in products:
        for prompt in prompts:
            yield Query(product.id, prompt, product.title,
                        product.description if with_description else "", product.image,
                        product.bullet_points, product.product_type, product.image_features)


def shard_path(output_path: str, index: int, count: int) -> str:
    """The output file of process `index` of `count`: `output_path` itself for one process, else
    `<stem>-<index>-of-<count><suffix>` ("preds.jsonl" -> "preds-00001-of-00002.jsonl")."""
    if count == 1:
        return output_path
    stem, suffix = os.path.splitext(output_path)
    return f"{stem}-{index:05d}-of-{count:05d}{suffix}"


def infer(predictor: Predictor, input_path: str, output_path: str, prompts: Sequence[str], *,
          images_dir: str | None = None, with_description: bool = False,
          on_error: str = "fail", allow_absolute_image_paths: bool = False,
          shard: tuple[int, int] = (0, 1)) -> int:
    """Writes the predictions of every product x prompt to `output_path`; returns their number.

    `on_error` as the module docstring says: "fail" raises at the first bad record, "skip" reports
    each on stderr and leaves it out. `shard=(i, n)`: only the products i, i + n, i + 2n, ... of
    the input (its good records, in order).
    """
    shard_index, shard_count = shard
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard}: need 0 <= index < count")
    if not prompts:
        raise ValueError("give at least one prompt (e.g. --prompt color:)")
    for prompt in predictor.untrained_prompts(prompts):
        print(f"warning: the model was never trained on the prompt {prompt!r} (its training task "
              f"asked {', '.join(map(repr, predictor.config.prompts)) or 'nothing: pretraining'}); "
              "its answers to it are not predictions", file=sys.stderr)
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    count, skipped, accepted = 0, [], {}

    def skip(query: Query, error: InputError) -> None:
        skipped.append(query)
        print(f"skipped prompt {query.prompt!r} of {error}", file=sys.stderr)

    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".infer-", suffix=".jsonl",
                                     delete=False, encoding="utf-8") as out:
        try:
            products = read_products(input_path, images_dir, on_error, allow_absolute_image_paths)
            mine = (p for i, p in enumerate(products) if i % shard_count == shard_index)
            stream = queries(mine, prompts, with_description or predictor.asks_questions)
            predictions = predictor.predict_queries(stream,
                                                    on_error=skip if on_error == "skip" else None)
            for query, prediction in tqdm(predictions, unit="prediction",
                                          disable=not sys.stderr.isatty()):
                row = {"id": query.record, "prompt": query.prompt,
                       "prediction": prediction.text, "score": prediction.score}
                if prediction.source_weights is not None:
                    row["source_weights"] = prediction.source_weights
                if prediction.accepted is not None:
                    row["accepted"] = prediction.accepted
                    tally = accepted.setdefault(query.prompt, [0, 0])
                    tally[0] += prediction.accepted
                    tally[1] += 1
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    os.replace(out.name, output_path)
    if skipped:
        print(f"skipped {len(skipped)} product x prompt queries the model cannot take",
              file=sys.stderr)
    for prompt, (taken, total) in accepted.items():
        print(f"{prompt} accepted {taken} of {total} predictions ({taken / total:.1%}) at the "
              f"checkpoint's 90%-precision threshold")
    return count
