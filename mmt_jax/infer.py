"""The infer binary: products in, one JSON line of predictions per product and prompt out.

    mmt-jax infer --checkpoint runs/demo/mmt4 --input products.jsonl --images images/ \\
        --prompt color: --prompt pattern: --out predictions.jsonl [--num-beams 4]

Input is a catalog JSONL (the record format of `data/records.py`; attributes and split are ignored)
or the TFRecord files a `mmt-jax data convert` wrote (a glob such as
`DIR/product_catalog/NAME/1.0.0/product_catalog-test.tfrecord*`). Each output line is
`{"id", "prompt", "prediction", "score"}`, `score` the log-probability of the prediction. The output
is written to a temporary file and renamed when complete, so an interrupted run never leaves a
truncated file that looks finished, and an existing file is replaced only by a whole new one.
"""
import json
import os
import sys
import tempfile
from typing import Iterator, Sequence

import tensorflow as tf
from tqdm.auto import tqdm

from mmt_jax.data import records
from mmt_jax.predictor import Predictor, Query


def read_products(path: str, images_dir: str | None = None,
                  on_error: str = "fail") -> Iterator[records.Product]:
    """Products of a JSONL catalog (`.jsonl`/`.json`) or of TFRecord files (any other path or glob).

    A bad JSONL line raises `records.RecordError` naming the line, record and field; with
    `on_error="skip"` it is reported on stderr and left out.
    """
    if path.endswith((".jsonl", ".json")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no input file {path}")
        with open(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    product, _ = records.parse_record(raw, line, images_dir)
                except records.RecordError as e:
                    if on_error != "skip":
                        raise
                    print(f"skipped {e}", file=sys.stderr)
                    continue
                yield product
        return
    files = tf.io.gfile.glob(path)
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {path}")
    from mmt_jax.data.tfds_catalog import FEATURES
    dataset = tf.data.TFRecordDataset(sorted(files)).map(FEATURES.deserialize_example)
    for example in dataset.as_numpy_iterator():
        text = lambda key: example[key].decode("utf-8")  # noqa: E731
        yield records.Product(id=text("id"), title=text("title"), image=example["image"],
                              description=text("description"))


def queries(products, prompts: Sequence[str], with_description: bool) -> Iterator[Query]:
    for product in products:
        for prompt in prompts:
            yield Query(product.id, prompt, product.title,
                        product.description if with_description else "", product.image)


def infer(predictor: Predictor, input_path: str, output_path: str, prompts: Sequence[str], *,
          images_dir: str | None = None, with_description: bool = False,
          on_error: str = "fail") -> int:
    """Writes the predictions of every product x prompt to `output_path`; returns their number."""
    if not prompts:
        raise ValueError("give at least one prompt (e.g. --prompt color:)")
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    count = 0
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".infer-", suffix=".jsonl",
                                     delete=False, encoding="utf-8") as out:
        try:
            stream = queries(read_products(input_path, images_dir, on_error), prompts,
                             with_description)
            for query, prediction in tqdm(predictor.predict_queries(stream), unit="prediction",
                                          disable=not sys.stderr.isatty()):
                out.write(json.dumps({"id": query.record, "prompt": query.prompt,
                                      "prediction": prediction.text, "score": prediction.score},
                                     ensure_ascii=False) + "\n")
                count += 1
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    os.replace(out.name, output_path)
    return count
