"""The fault corpus: bad and awkward catalog records, written as real tools write them, run through the
real `mmt-jax data convert` (and infer's reader). Every bad record is reported with its line, id and
field; every awkward but valid one is stored faithfully (checked on the decoded pixels); every good
record around them is kept."""
import base64
import json
import os
from typing import Callable, NamedTuple

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmt_jax import infer, main
from mmt_jax.data import tfds_catalog
from tests.test_image_inputs import BLUE, RED, encoded, halves, pipeline_pixels, png_claiming

WHITE = (255, 255, 255)


class Bad(NamedTuple):
    """A record that must be reported: with `record_id` (None where the line has no readable id) and
    `field` (None for a line that is not a JSON object), the reason containing `reason`."""
    line: bytes
    record_id: str | None
    field: str | None
    reason: str


class Awkward(NamedTuple):
    """A valid record that tools write oddly: `check(stored example)` asserts it was kept faithfully."""
    line: bytes
    record_id: str
    check: Callable[[dict], None]


def record(**fields) -> bytes:
    """A JSON line as catalog exporters write it: UTF-8, non-ASCII characters unescaped."""
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")


def pixels_of(example: dict) -> np.ndarray:
    return pipeline_pixels(example["image"])


def all_close(expected, atol: int = 0) -> Callable[[dict], None]:
    """A check that every stored pixel is `expected` (an RGB triple or a grey level) within `atol`."""
    def check(example):
        pixels = pixels_of(example).astype(int)
        assert np.abs(pixels - np.asarray(expected)).max() <= atol, pixels[0, 0]
    return check


def shape_is(shape) -> Callable[[dict], None]:
    def check(example):
        assert pixels_of(example).shape == shape
    return check


def bytes_are(data: bytes) -> Callable[[dict], None]:
    def check(example):
        assert example["image"] == data
    return check


def turned_upright(example):
    """A 32x64 phone photo, left half red, saved with EXIF orientation 6: upright it is 64x32, red on
    top."""
    pixels = pixels_of(example)
    assert pixels.shape == (64, 32, 3)
    np.testing.assert_allclose(pixels[4, 16], RED, atol=8)
    np.testing.assert_allclose(pixels[-4, 16], BLUE, atol=8)


def palette_composited(example):
    pixels = pixels_of(example)
    np.testing.assert_array_equal(pixels[0, 0], WHITE)
    np.testing.assert_array_equal(pixels[1, 1], RED)


def texts_are(title: str, attributes: dict) -> Callable[[dict], None]:
    def check(example):
        assert example["title"].decode("utf-8") == title
        names = [n.decode("utf-8") for n in example["attribute_names"]]
        values = [v.decode("utf-8") for v in example["attribute_values"]]
        assert dict(zip(names, values)) == attributes
    return check


def write_images(tmp_path) -> tuple[str, dict[str, bytes]]:
    """The image files, as cameras, editors and exporters save them; returns the images directory and
    the bytes of the files the corpus compares against."""
    images = tmp_path / "images"
    (images / "a-directory.jpg").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.putpixel((1, 1), 1)
    ramp = np.linspace(0, 255, 3000).astype(np.uint8)[None, :, None].repeat(2000, 0).repeat(3, 2)
    plain = encoded(halves(8, 12), "JPEG")
    png = bytearray(encoded(halves(8, 12), "PNG"))
    png[30] ^= 0xFF  # the header chunk's checksum (bytes 29-32) no longer matches
    files = {
        "plain.jpg": plain,
        "grey.jpg": encoded(Image.new("L", (6, 6), 77), "JPEG"),
        "phone.jpg": encoded(halves(32, 64), "JPEG", exif=exif, quality=95),
        "grey16.png": encoded(Image.fromarray(np.full((6, 8), 0x8080, np.uint16)), "PNG"),
        "cmyk.jpg": encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
        "palette.png": encoded(palette, "PNG", transparency=0),
        "grey-alpha.png": encoded(Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8),
                                                             np.full((4, 4), 128, np.uint8)]), "LA"),
                                  "PNG"),
        "rgba.png": encoded(Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8),
                                                       np.full((4, 4), 64, np.uint8)]), "RGBA"), "PNG"),
        "huge.jpg": encoded(Image.fromarray(ramp), "JPEG"),
        "panorama.png": encoded(Image.new("RGB", (6000, 40), BLUE), "PNG"),
        "anim.gif": encoded(Image.new("RGB", (10, 6), RED), "GIF"),
        "photo.webp": encoded(Image.new("RGB", (10, 6), BLUE), "WEBP", lossless=True),
        "float.tif": encoded(Image.fromarray(np.full((5, 5), 0.5, np.float32)), "TIFF"),
        "bilevel.png": encoded(Image.new("1", (5, 5), 1), "PNG"),
        "truncated.jpg": plain[:len(plain) // 2],
        "empty.jpg": b"",
        "notes.jpg": b"Product photos are on the shared drive.\n",
        "bomb.png": png_claiming(30000, 30000),
        "81-megapixels.png": png_claiming(9000, 9000),
        "bad-crc.png": bytes(png),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    os.makedirs(images / "sub")
    os.symlink("plain.jpg", images / "alias.jpg")
    os.symlink(os.path.join("..", "outside.jpg"), images / "escape.jpg")
    (tmp_path / "outside.jpg").write_bytes(plain)
    return str(images), files


def corpus(tmp_path) -> tuple[list[Bad | Awkward], dict[str, bytes]]:
    images, files = write_images(tmp_path)
    outside = str(tmp_path / "outside.jpg")
    b64 = base64.b64encode(files["plain.jpg"]).decode()
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))  # as `base64` writes it
    unicode_attributes = {"Farbe": "Rot", "sleeve type": "kurzarm", "Größe": "L", "🎨": "bunt"}
    cases = [
        Awkward(b"\xef\xbb\xbf" + record(id="bom", title="After a byte-order mark"), "bom",
                texts_are("After a byte-order mark", {})),
        Awkward(record(id="crlf", title="Windows line end") + b"\r", "crlf",
                texts_are("Windows line end", {})),
        Awkward(record(id="phone", title="t", image="phone.jpg"), "phone", turned_upright),
        Awkward(record(id="grey16", title="t", image="grey16.png"), "grey16", all_close(128)),
        Awkward(record(id="cmyk", title="t", image="cmyk.jpg"), "cmyk", all_close(RED, atol=6)),
        Awkward(record(id="palette", title="t", image="palette.png"), "palette", palette_composited),
        Awkward(record(id="grey-alpha", title="t", image="grey-alpha.png"), "grey-alpha",
                all_close(127, atol=1)),
        Awkward(record(id="rgba", title="t", image="rgba.png"), "rgba", all_close(191, atol=1)),
        Awkward(record(id="huge", title="t", image="huge.jpg"), "huge", shape_is((683, 1024, 3))),
        Awkward(record(id="panorama", title="t", image="panorama.png"), "panorama",
                shape_is((7, 1024, 3))),
        Awkward(record(id="gif", title="t", image="anim.gif"), "gif", all_close(RED, atol=2)),
        Awkward(record(id="webp", title="t", image="photo.webp"), "webp", all_close(BLUE)),
        Awkward(record(id="float", title="t", image="float.tif"), "float", all_close(128)),
        Awkward(record(id="bilevel", title="t", image="bilevel.png"), "bilevel", all_close(255)),
        Awkward(record(id="unicode", title="Tシャツ 👕 Baumwolle", attributes=unicode_attributes),
                "unicode", texts_are("Tシャツ 👕 Baumwolle", unicode_attributes)),
        Awkward(record(id="alias", title="t", image="alias.jpg"), "alias",
                bytes_are(files["plain.jpg"])),
        Awkward(record(id="inside", title="t", image="sub/../plain.jpg"), "inside",
                bytes_are(files["plain.jpg"])),
        Awkward(record(id="wrapped", title="t", image_base64=wrapped), "wrapped",
                bytes_are(files["plain.jpg"])),
        Awkward(record(id="grey", title="t", image="grey.jpg"), "grey", bytes_are(files["grey.jpg"])),
        Awkward(record(id="text-only", title="t"), "text-only", bytes_are(b"")),

        Bad(record(id="truncated", title="t", image="truncated.jpg"), "truncated", "image",
            "corrupt or unreadable image in file 'truncated.jpg'"),
        Bad(record(id="empty", title="t", image="empty.jpg"), "empty", "image",
            "corrupt or unreadable image in file 'empty.jpg' (not a format PIL reads)"),
        Bad(record(id="notes", title="t", image="notes.jpg"), "notes", "image",
            "corrupt or unreadable image in file 'notes.jpg' (not a format PIL reads)"),
        Bad(record(id="bad-crc", title="t", image="bad-crc.png"), "bad-crc", "image",
            "corrupt or unreadable image in file 'bad-crc.png'"),
        Bad(record(id="bomb", title="t", image="bomb.png"), "bomb", "image",
            "file 'bomb.png' is too large"),
        Bad(record(id="81mp", title="t", image="81-megapixels.png"), "81mp", "image",
            "file '81-megapixels.png' is too large"),
        Bad(record(id="up", title="t", image="../outside.jpg"), "up", "image",
            "path '../outside.jpg' leads outside the images directory"),
        Bad(record(id="up2", title="t", image="images/../../outside.jpg"), "up2", "image",
            "leads outside the images directory"),
        Bad(record(id="escape", title="t", image="escape.jpg"), "escape", "image",
            "path 'escape.jpg' leads outside the images directory"),
        Bad(record(id="absolute", title="t", image=outside), "absolute", "image",
            f"absolute path {outside!r} refused"),
        Bad(record(id="missing", title="t", image="missing.jpg"), "missing", "image",
            "No such file or directory"),
        Bad(record(id="directory", title="t", image="a-directory.jpg"), "directory", "image",
            "not a regular file"),
        Bad(record(id="nul", title="t", image="plain.jpg\0.png"), "nul", "image", "NUL character"),
        Bad(record(id="empty-path", title="t", image=""), "empty-path", "image",
            "expected a file path"),
        Bad(record(id="path-number", title="t", image=7), "path-number", "image",
            "expected a file path"),
        Bad(record(id="b64", title="t", image_base64="not base64!"), "b64", "image_base64",
            "not valid base64"),
        Bad(record(id="b64-text", title="t", image_base64=base64.b64encode(b"hello").decode()),
            "b64-text", "image_base64", "corrupt or unreadable image in the base64 data"),
        Bad(record(id="both", title="t", image="plain.jpg", image_base64=b64), "both", "image",
            "not both"),
        Bad('{"id": "latin1", "title": "Caf\xe9 cr\xe8me"}'.encode("latin-1"), "latin1", "title",
            "not UTF-8"),
        Bad('{"id": "utf16", "title": "t"}'.encode("utf-16"), None, None, "not UTF-8"),
        Bad(b'[{"id": "array", "title": "t"}]', None, None, "expected a JSON object, got list"),
        Bad(b'{"id": "cut", "title": "cut off', None, None, "not valid JSON"),
        Bad(record(title="no id"), None, "id", "missing"),
        Bad(record(id=12345, title="t"), None, "id", "not a string"),
        Bad(record(id="empty-title", title=" "), "empty-title", "title", "empty"),
        Bad(record(id="title-list", title=["a", "b"]), "title-list", "title", "not a string"),
        Bad(record(id="attr-number", title="t", attributes={"size": 42}), "attr-number",
            "attributes", "value of 'size' must be a non-empty string"),
        Bad(record(id="attr-name", title="t", attributes={"": "red"}), "attr-name", "attributes",
            "names must be non-empty"),
        Bad(record(id="bullets", title="t", bullet_points="soft"), "bullets", "bullet_points",
            "list of strings"),
        Bad(record(id="colour", title="t", colour="red"), "colour", "colour", "unknown field"),
        Bad(record(id="dev", title="t", split="dev"), "dev", "split", "'dev' is not one of"),
        Bad(record(id="good-0", title="same id again"), "good-0", "id", "duplicate of line 2"),
    ]
    return cases, files


def write_catalog(tmp_path) -> tuple[str, str, list, list[str]]:
    """The corpus with a good record after each case (and a blank line or two, as editors leave);
    returns the JSONL path, images directory, [(line number, case)] and the good records' ids."""
    cases, _ = corpus(tmp_path)
    numbered, good_ids, lines = [], [], []
    for n, case in enumerate(cases):
        numbered.append((len(lines) + 1, case))
        lines.append(case.line + b"\n")
        good_ids.append(f"good-{n}")
        image = {"image": "plain.jpg"} if n % 2 == 0 else {}
        lines.append(record(id=f"good-{n}", title=f"Good product {n}", **image) + b"\n")
        if n % 10 == 9:
            lines.append(b"\r\n")
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(b"".join(lines))
    return str(path), str(tmp_path / "images"), numbered, good_ids


def test_corpus_is_converted_or_reported_and_no_good_record_is_lost(tmp_path, capsys):
    jsonl, images, numbered, good_ids = write_catalog(tmp_path)
    bad = [(line, case) for line, case in numbered if isinstance(case, Bad)]
    awkward = [case for _, case in numbered if isinstance(case, Awkward)]
    assert len(numbered) >= 30 and len(bad) >= 30 and len(awkward) >= 20
    out = str(tmp_path / "out")
    assert main.run(["data", "convert", "--jsonl", jsonl, "--images", images, "--out", out,
                     "--on-error", "skip"]) == 0
    assert f"skipped {len(bad)} bad record(s)" in capsys.readouterr().out

    builder = tfds.builder("product_catalog/catalog", data_dir=out)
    skipped = builder.info.metadata["skipped_records"]
    assert [(r["line"], r["id"], r["field"]) for r in skipped] == [
        (line, case.record_id, case.field) for line, case in bad]
    for reported, (_, case) in zip(skipped, bad):
        assert case.reason in reported["reason"], (reported, case)
        assert "BytesIO" not in reported["reason"] and " at 0x" not in reported["reason"]

    stored = {ex["id"].decode("utf-8"): ex for ex in tfds.as_numpy(
        tfds.load("product_catalog/catalog", data_dir=out, split="all"))}
    assert sorted(stored) == sorted(good_ids + [case.record_id for case in awkward])
    for case in awkward:
        case.check(stored[case.record_id])
    plain = (tmp_path / "images" / "plain.jpg").read_bytes()
    for n, record_id in enumerate(good_ids):
        assert stored[record_id]["image"] == (plain if n % 2 == 0 else b"")
        assert stored[record_id]["title"] == f"Good product {n}".encode()

    # infer reads the same lines to the same bytes and reports the same bad records
    products = {product.id: product
                for product in infer.read_products(jsonl, images, on_error="skip")}
    assert sorted(products) == sorted(stored)
    assert all(products[i].image == stored[i]["image"] for i in stored)
    err = capsys.readouterr().err
    assert err.count("skipped line ") == len(bad)


def test_corpus_with_on_error_fail_prints_one_error_and_writes_nothing(tmp_path, capsys):
    jsonl, images, numbered, _ = write_catalog(tmp_path)
    bad = [(line, case) for line, case in numbered if isinstance(case, Bad)]
    out = tmp_path / "out"
    assert main.run(["data", "convert", "--jsonl", jsonl, "--images", images, "--out", str(out),
                     "--on-error", "fail"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert f"{len(bad)} bad record(s); nothing was written" in errors[0]
    line, first = bad[0]
    assert f"line {line}, record {first.record_id!r}: field {first.field!r}: {first.reason}" in err
    assert not (out / "product_catalog" / "catalog" / tfds_catalog.VERSION).exists()
    with pytest.raises(Exception):
        tfds.builder("product_catalog/catalog", data_dir=str(out))
