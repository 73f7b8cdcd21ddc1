"""Record validation, the TFDS catalog builder and `mmt-jax data convert`: good catalogs round-trip,
every kind of bad record is named with its line, id, field and reason, and nothing partial is left."""
import base64
import json

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from mmt_jax import main
from mmt_jax.data import records, tfds_catalog


def _image(seed: int, fmt="JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return records.encode_image(pixels, fmt)


def _write_catalog(tmp_path, lines) -> tuple[str, str]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i in range(4):
        (images / f"p{i}.jpg").write_bytes(_image(i))
    path = tmp_path / "catalog.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")
    return str(path), str(images)


GOOD = [
    {"id": "p0", "image": "p0.jpg", "title": "Acme red cotton shirt", "attributes": {"color": "red"},
     "bullet_points": ["soft", "machine wash"], "product_type": "shirt", "split": "validation"},
    {"id": "p1", "image": "p1.jpg", "title": "Bolt blue denim trousers", "description": "Straight leg.",
     "attributes": {"color": "blue", "material": "denim"}},
    {"id": "p2", "image_base64": base64.b64encode(_image(7, "PNG")).decode(), "title": "A mug"},
    {"id": "p3", "title": "A product without an image"},
]


def test_parse_record_reads_every_field(tmp_path):
    _, images = _write_catalog(tmp_path, [])
    product, split = records.parse_record(json.dumps(GOOD[0]).encode(), 1, images)
    assert split == "validation"
    assert product == records.Product(
        id="p0", title="Acme red cotton shirt", image=_image(0), bullet_points=("soft", "machine wash"),
        product_type="shirt", attributes={"color": "red"})
    product, split = records.parse_record(json.dumps(GOOD[3]).encode(), 4, images)
    assert product.image == b"" and split is None
    # A GIF is re-encoded as PNG, the format tf.io.decode_image and the pipeline share.
    gif = tmp_path / "images" / "x.gif"
    from PIL import Image
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(gif)
    product, _ = records.parse_record(json.dumps({"id": "g", "title": "t", "image": "x.gif"}).encode(),
                                      1, images)
    assert product.image.startswith(b"\x89PNG")


@pytest.mark.parametrize("line, field, reason", [
    (b"\xff\xfe not utf-8\n", None, "not UTF-8"),
    (b"{not json\n", None, "not valid JSON"),
    (b"[1, 2]\n", None, "expected a JSON object"),
    (json.dumps({"title": "no id"}).encode(), "id", "missing"),
    (json.dumps({"id": "x"}).encode(), "title", "missing"),
    (json.dumps({"id": "x", "title": "  "}).encode(), "title", "empty"),
    (json.dumps({"id": "x", "title": "t", "description": 3}).encode(), "description", "string"),
    (json.dumps({"id": "x", "title": "t", "bullet_points": "one"}).encode(), "bullet_points", "list"),
    (json.dumps({"id": "x", "title": "t", "attributes": ["red"]}).encode(), "attributes", "object"),
    (json.dumps({"id": "x", "title": "t", "attributes": {"color": 1}}).encode(), "attributes", "color"),
    (json.dumps({"id": "x", "title": "t", "split": "dev"}).encode(), "split", "not one of"),
    (json.dumps({"id": "x", "title": "t", "colour": "red"}).encode(), "colour", "unknown field"),
    (json.dumps({"id": "x", "title": "t", "image": "missing.jpg"}).encode(), "image", "cannot read"),
    (json.dumps({"id": "x", "title": "t", "image": "corrupt.jpg"}).encode(), "image", "corrupt"),
    (json.dumps({"id": "x", "title": "t", "image": "truncated.jpg"}).encode(), "image", "corrupt"),
    (json.dumps({"id": "x", "title": "t", "image_base64": "@@"}).encode(), "image_base64", "base64"),
])
def test_bad_records_name_line_id_field_and_reason(tmp_path, line, field, reason):
    _, images = _write_catalog(tmp_path, [])
    (tmp_path / "images" / "corrupt.jpg").write_bytes(b"this is not an image")
    (tmp_path / "images" / "truncated.jpg").write_bytes(_image(1)[:200])
    with pytest.raises(records.RecordError) as e:
        records.parse_record(line, 17, images)
    assert e.value.line == 17 and e.value.field == field
    assert reason in e.value.reason
    assert str(e.value).startswith("line 17")
    if field not in (None, "id"):
        assert e.value.record_id == "x" and "record 'x'" in str(e.value)


def test_convert_writes_a_tfds_catalog_that_tfds_and_seqio_read(tmp_path, capsys):
    jsonl, images = _write_catalog(tmp_path, GOOD)
    out = str(tmp_path / "out")
    assert main.run(["data", "convert", "--jsonl", jsonl, "--images", images, "--out", out,
                     "--name", "shop", "--validation-fraction", "0", "--test-fraction", "0"]) == 0
    assert "train 3, validation 1" in capsys.readouterr().out
    read = {ex["id"].decode(): ex for ex in tfds.as_numpy(
        tfds.load("product_catalog/shop", data_dir=out, split="train+validation"))}
    assert sorted(read) == ["p0", "p1", "p2", "p3"]
    assert read["p0"]["image"] == _image(0) and read["p3"]["image"] == b""
    assert read["p1"]["description"] == b"Straight leg."
    assert list(read["p1"]["attribute_names"]) == [b"color", b"material"]
    assert list(read["p1"]["attribute_values"]) == [b"blue", b"denim"]
    assert list(read["p0"]["bullet_points"]) == [b"soft", b"machine wash"]
    source = seqio.TfdsDataSource(tfds_name=tfds_catalog.tfds_name("shop"), tfds_data_dir=out)
    assert [ex["id"] for ex in source.get_dataset("validation").as_numpy_iterator()] == [b"p0"]


def test_convert_fails_on_bad_records_and_writes_nothing(tmp_path, capsys):
    lines = GOOD + [{"id": "p1", "title": "duplicate"}, {"id": "p9", "image": "nope.jpg", "title": "t"},
                    b"\xff\n"]
    jsonl, images = _write_catalog(tmp_path, lines)
    out = tmp_path / "out"
    assert main.run(["data", "convert", "--jsonl", jsonl, "--images", images, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "3 bad record(s); nothing was written" in err
    assert "line 5, record 'p1': field 'id': duplicate of line 2" in err
    assert "line 6, record 'p9': field 'image': cannot read" in err
    assert "line 7: not UTF-8" in err
    finished = out / "product_catalog" / "catalog" / tfds_catalog.VERSION
    assert not finished.exists()
    with pytest.raises(Exception):
        tfds.builder("product_catalog/catalog", data_dir=str(out))


def test_convert_skips_bad_records_and_lists_them(tmp_path, capsys):
    jsonl, images = _write_catalog(tmp_path, GOOD + [{"id": "p1", "title": "duplicate"}, b"oops\n"])
    out = str(tmp_path / "out")
    assert main.run(["data", "convert", "--jsonl", jsonl, "--images", images, "--out", out,
                     "--on-error", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 bad record(s)" in printed and "line 5, record 'p1': id: duplicate" in printed
    builder = tfds.builder("product_catalog/catalog", data_dir=out)
    assert sum(s.num_examples for s in builder.info.splits.values()) == 4
    skipped = builder.info.metadata["skipped_records"]
    assert [(r["line"], r["field"]) for r in skipped] == [(5, "id"), (6, None)]


def test_hash_split_is_stable_and_near_the_fractions():
    ids = [f"product-{i}" for i in range(20000)]
    splits = [records.split_of(i, 0.1, 0.05) for i in ids]
    assert splits == [records.split_of(i, 0.1, 0.05) for i in ids]
    assert abs(splits.count("validation") / len(ids) - 0.1) < 0.01
    assert abs(splits.count("test") / len(ids) - 0.05) < 0.01


def test_convert_takes_several_files_each_with_its_split(tmp_path, capsys):
    """A catalog delivered as train and test files: `--jsonl train=F validation=G*` (a glob); a
    record's own split wins over its file's; the metadata records every source."""
    (tmp_path / "images").mkdir()
    for i in range(5):
        (tmp_path / "images" / f"p{i}.jpg").write_bytes(_image(i))

    def write(name, rows):
        with open(tmp_path / name, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    product = lambda i, **more: {"id": f"p{i}", "image": f"p{i}.jpg", "title": f"Acme shirt {i}",
                                 "attributes": {"color": "red" if i % 2 else "blue"}, **more}
    write("shop_train.jsonl", [product(0), product(1), product(2, split="test")])
    write("shop_valid_a.jsonl", [product(3)])
    write("shop_valid_b.jsonl", [product(4)])
    out = str(tmp_path / "tfds")
    argv = ["data", "convert", "--jsonl", f"train={tmp_path}/shop_train.jsonl",
            f"validation={tmp_path}/shop_valid_*.jsonl", "--images", str(tmp_path / "images"),
            "--out", out, "--name", "shop"]
    assert main.run(argv) == 0
    assert "train 2, validation 2, test 1 products" in capsys.readouterr().out
    builder = tfds.builder_from_directory(f"{out}/product_catalog/shop/1.0.0")
    ids = {split: sorted(x["id"].decode() for x in tfds.as_numpy(builder.as_dataset(split=split)))
           for split in ("train", "validation", "test")}
    assert ids == {"train": ["p0", "p1"], "validation": ["p3", "p4"], "test": ["p2"]}
    assert [p.rsplit("/", 1)[-1] for p in builder.info.metadata["source"]] == [
        "shop_train.jsonl", "shop_valid_a.jsonl", "shop_valid_b.jsonl"]

    # The same id in two files: an error naming both places; nothing written.
    write("shop_valid_b.jsonl", [product(0)])
    assert main.run(argv[:-1] + ["again"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/shop_valid_b.jsonl: line 1, record 'p0': field 'id': duplicate of " \
           f"{tmp_path}/shop_train.jsonl line 1" in err
    assert not (tmp_path / "tfds/product_catalog/again").exists()
    assert main.run(["data", "convert", "--jsonl", f"test={tmp_path}/nothing_*.jsonl",
                     "--out", out]) == 2
    assert f"error: no catalog file {tmp_path}/nothing_*.jsonl" in capsys.readouterr().err
    assert main.run(["data", "convert", "--jsonl", f"{tmp_path}/shop_train.jsonl",
                     f"test={tmp_path}/shop_train.jsonl", "--out", out]) == 2
    assert "error: a catalog file is named twice" in capsys.readouterr().err
