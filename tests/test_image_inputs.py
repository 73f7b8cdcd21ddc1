"""Image inputs of `data convert` and `infer`: paths stay inside the images directory, every PIL mode
is stored as the picture a viewer shows (16-bit grey, float, CMYK, transparency, EXIF rotation), images
are capped at a longest side, decompression bombs are refused, and errors name the record, field and
file, never a Python object."""
import base64
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mmt_jax import infer, main
from mmt_jax.data import records
from mmt_jax.errors import InputError
from mmt_jax.predictor import image_bytes

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encoded(img: Image.Image, image_format: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=image_format, **options)
    return out.getvalue()


def pipeline_pixels(stored: bytes) -> np.ndarray:
    """What the input pipeline decodes the stored bytes to: uint8 [height, width, 3]."""
    return tf.io.decode_image(stored, channels=3, expand_animations=False).numpy()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header claims `width` x `height` grey pixels (one row of
    data follows): what a decompression bomb looks like to a reader of its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def halves(height: int, width: int) -> Image.Image:
    """Left half red, right half blue: which way it is turned shows after decoding."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :width // 2] = RED
    pixels[:, width // 2:] = BLUE
    return Image.fromarray(pixels)


@pytest.mark.parametrize("img, image_format", [
    (Image.fromarray(np.full((6, 8), 0x8080, np.uint16)), "PNG"),   # mode I;16: 16-bit grey PNG
    (Image.fromarray(np.full((6, 8), 0x8080, np.int32)), "TIFF"),   # mode I
    (Image.fromarray(np.full((6, 8), 0.5, np.float32)), "TIFF"),    # mode F
])
def test_16bit_and_float_greyscale_is_scaled_not_stored_white(img, image_format):
    pixels = pipeline_pixels(records.stored_image(encoded(img, image_format)))
    assert pixels.shape == (6, 8, 3)
    np.testing.assert_array_equal(pixels, 128)


def test_a_16bit_gradient_keeps_its_range():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None, :].repeat(4, axis=0)
    pixels = pipeline_pixels(records.stored_image(encoded(Image.fromarray(ramp), "PNG")))
    np.testing.assert_array_equal(pixels[0, :, 0], np.arange(256))


@pytest.mark.parametrize("orientation, top_left, bottom_right, shape", [
    (1, RED, BLUE, (20, 40, 3)),
    (3, BLUE, RED, (20, 40, 3)),   # upside down
    (6, RED, BLUE, (40, 20, 3)),   # phone held upright: turn 90 degrees clockwise
    (8, BLUE, RED, (40, 20, 3)),   # turn 90 degrees anticlockwise
])
def test_exif_orientation_is_applied(orientation, top_left, bottom_right, shape):
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = encoded(halves(20, 40), "JPEG", exif=exif, quality=95)
    pixels = pipeline_pixels(records.stored_image(photo))
    assert pixels.shape == shape
    np.testing.assert_allclose(pixels[2, 2], top_left, atol=8)
    np.testing.assert_allclose(pixels[-3, -3], bottom_right, atol=8)


def test_transparency_is_composited_onto_white():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.putpixel((1, 1), 1)
    pixels = pipeline_pixels(records.stored_image(encoded(palette, "PNG", transparency=0)))
    np.testing.assert_array_equal(pixels[0, 0], (255, 255, 255))  # transparent index 0 (black)
    np.testing.assert_array_equal(pixels[1, 1], RED)
    grey_alpha = Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8),
                                            np.full((4, 4), 128, np.uint8)]), "LA")
    np.testing.assert_allclose(pipeline_pixels(records.stored_image(encoded(grey_alpha, "PNG"))),
                               127, atol=1)  # black at half opacity over white
    rgba = Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8),
                                      np.full((4, 4), 64, np.uint8)]), "RGBA")
    np.testing.assert_allclose(pipeline_pixels(records.stored_image(encoded(rgba, "PNG"))),
                               191, atol=1)


def test_cmyk_jpeg_becomes_sensible_rgb():
    cmyk = encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")  # Adobe marker, inverted
    np.testing.assert_allclose(pipeline_pixels(records.stored_image(cmyk)), np.broadcast_to(
        RED, (8, 8, 3)), atol=6)


def test_images_are_capped_at_their_longest_side():
    ramp = np.linspace(0, 255, 3000).astype(np.uint8)[None, :, None].repeat(2000, 0).repeat(3, 2)
    photo = records.stored_image(encoded(Image.fromarray(ramp), "JPEG"))
    assert photo[:2] == b"\xff\xd8"  # a JPEG photo stays a JPEG
    assert pipeline_pixels(photo).shape == (683, 1024, 3)  # the default cap
    strip = records.stored_image(encoded(Image.new("RGB", (2000, 500), RED), "PNG"))
    assert strip.startswith(b"\x89PNG")
    assert pipeline_pixels(strip).shape == (256, 1024, 3)
    assert pipeline_pixels(records.stored_image(encoded(Image.fromarray(ramp), "PNG"),
                                                max_side=64)).shape == (43, 64, 3)


def test_plain_small_jpeg_and_png_are_stored_byte_for_byte():
    for img, image_format in [(halves(20, 40), "JPEG"), (halves(20, 40), "PNG"),
                              (Image.new("L", (5, 5), 9), "PNG")]:
        data = encoded(img, image_format)
        assert records.stored_image(data) == data


@pytest.mark.parametrize("width, height", [(30000, 30000), (10000, 9000), (9000, 9000)])
def test_decompression_bombs_are_refused_with_a_clear_error(tmp_path, width, height):
    (tmp_path / "bomb.png").write_bytes(png_claiming(width, height))
    line = json.dumps({"id": "b", "title": "t", "image": "bomb.png"}).encode()
    with pytest.raises(records.RecordError) as e:
        records.parse_record(line, 4, str(tmp_path))
    assert e.value.field == "image"
    assert str(e.value) == (f"line 4, record 'b': field 'image': file 'bomb.png' is too large: "
                            f"more than {records.MAX_IMAGE_PIXELS:,} pixels (refused as a possible "
                            "decompression bomb)")


def test_image_errors_name_record_field_and_file_never_an_object(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    cases = [({"image": "notes.jpg"}, "field 'image': corrupt or unreadable image in file "
                                      "'notes.jpg' (not a format PIL reads)"),
             ({"image_base64": base64.b64encode(b"not a picture").decode()},
              "field 'image_base64': corrupt or unreadable image in the base64 data")]
    for fields, expected in cases:
        with pytest.raises(records.RecordError) as e:
            records.parse_record(json.dumps({"id": "x", "title": "t", **fields}).encode(), 3,
                                 str(tmp_path))
        message = str(e.value)
        assert message.startswith(f"line 3, record 'x': {expected}")
        assert "BytesIO" not in message and " at 0x" not in message
    with pytest.raises(InputError) as e:
        image_bytes(str(tmp_path / "notes.jpg"), "q")
    assert str(e.value) == (f"record 'q': field 'image': corrupt or unreadable image in file "
                            f"{str(tmp_path / 'notes.jpg')!r} (not a format PIL reads)")
    with pytest.raises(InputError, match=r"^record 'q': field 'image': corrupt or unreadable image "
                                         r"in the given bytes \(not a format PIL reads\)$"):
        image_bytes(b"\x89PNG not really", "q")


@pytest.fixture
def images_dir(tmp_path):
    """tmp_path/images with p.jpg, sub/, a symlink inside (alias.jpg -> p.jpg) and one leading out
    (escape.jpg -> ../secret.jpg); tmp_path/secret.jpg is a readable image outside."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "p.jpg").write_bytes(encoded(halves(4, 6), "JPEG"))
    (tmp_path / "secret.jpg").write_bytes(encoded(Image.new("RGB", (3, 3), BLUE), "JPEG"))
    os.symlink("p.jpg", images / "alias.jpg")
    os.symlink(os.path.join("..", "secret.jpg"), images / "escape.jpg")
    return images


def _record(image_path: str) -> bytes:
    return json.dumps({"id": "x", "title": "t", "image": image_path}).encode()


@pytest.mark.parametrize("name, reason", [
    ("../secret.jpg", "leads outside the images directory"),
    ("sub/../../secret.jpg", "leads outside the images directory"),
    ("images/../../secret.jpg", "leads outside the images directory"),
    ("escape.jpg", "leads outside the images directory"),        # a symlink out
    ("ABSOLUTE", "absolute path"),
])
def test_paths_that_leave_the_images_directory_are_refused(images_dir, name, reason):
    name = str(images_dir.parent / "secret.jpg") if name == "ABSOLUTE" else name
    with pytest.raises(records.RecordError) as e:
        records.parse_record(_record(name), 2, str(images_dir))
    assert (e.value.line, e.value.record_id, e.value.field) == (2, "x", "image")
    assert reason in e.value.reason and repr(name) in e.value.reason


def test_paths_inside_the_images_directory_are_read(images_dir, monkeypatch):
    expected = (images_dir / "p.jpg").read_bytes()
    for name in ("p.jpg", "./p.jpg", "sub/../p.jpg", "alias.jpg"):
        assert records.parse_record(_record(name), 1, str(images_dir))[0].image == expected
    secret = str(images_dir.parent / "secret.jpg")
    product, _ = records.parse_record(_record(secret), 1, str(images_dir),
                                      allow_absolute_image_paths=True)
    assert product.image == (images_dir.parent / "secret.jpg").read_bytes()
    # Without an images directory, paths start at (and stay inside) the current directory.
    monkeypatch.chdir(images_dir)
    assert records.parse_record(_record("p.jpg"), 1, None)[0].image == expected
    with pytest.raises(records.RecordError, match="leads outside the images directory"):
        records.parse_record(_record("../secret.jpg"), 1, None)


def test_infer_reads_jsonl_images_with_the_same_checks(images_dir, tmp_path, capsys):
    secret = str(tmp_path / "secret.jpg")
    jsonl = tmp_path / "products.jsonl"
    jsonl.write_bytes(b"\n".join([
        json.dumps({"id": "ok", "title": "t", "image": "p.jpg"}).encode(),
        json.dumps({"id": "up", "title": "t", "image": "../secret.jpg"}).encode(),
        json.dumps({"id": "abs", "title": "t", "image": secret}).encode()]) + b"\n")
    with pytest.raises(records.RecordError, match="line 2, record 'up': field 'image'"):
        list(infer.read_products(str(jsonl), str(images_dir)))
    assert [p.id for p in infer.read_products(str(jsonl), str(images_dir), "skip")] == ["ok"]
    err = capsys.readouterr().err
    assert "line 2, record 'up': field 'image': path '../secret.jpg' leads outside" in err
    assert "line 3, record 'abs': field 'image': absolute path" in err
    assert [p.id for p in infer.read_products(str(jsonl), str(images_dir), "skip",
                                              allow_absolute_image_paths=True)] == ["ok", "abs"]
    args = main.build_parser().parse_args([
        "infer", "--checkpoint", "c", "--input", str(jsonl), "--prompt", "color:", "--out", "o",
        "--allow-absolute-image-paths"])
    assert args.allow_absolute_image_paths


def test_predictor_images_go_through_the_same_conversion(tmp_path):
    grey16 = Image.fromarray(np.full((6, 8), 0x8080, np.uint16))
    (tmp_path / "grey16.png").write_bytes(encoded(grey16, "PNG"))
    for image in (str(tmp_path / "grey16.png"), encoded(grey16, "PNG"), grey16):
        np.testing.assert_array_equal(pipeline_pixels(image_bytes(image, "q")), 128)
    pixels = np.zeros((1500, 30, 3), np.uint8)
    assert pipeline_pixels(image_bytes(pixels, "q")).shape == (1024, 20, 3)
    with pytest.raises(InputError, match=r"record 'q': field 'image': cannot read .*missing.png"):
        image_bytes(str(tmp_path / "missing.png"), "q")


def test_data_convert_flags_cap_images_and_allow_absolute_paths(tmp_path, capsys):
    (tmp_path / "wide.png").write_bytes(encoded(Image.new("RGB", (100, 50), RED), "PNG"))
    jsonl = tmp_path / "catalog.jsonl"
    jsonl.write_text(json.dumps({"id": "w", "title": "wide", "image": str(tmp_path / "wide.png")}))
    out = str(tmp_path / "out")
    args = ["data", "convert", "--jsonl", str(jsonl), "--images", str(tmp_path), "--out", out,
            "--max-image-side", "32"]
    assert main.run(args) == 2
    assert "field 'image': absolute path" in capsys.readouterr().err
    assert main.run(args + ["--allow-absolute-image-paths"]) == 0
    (product,) = tfds.as_numpy(tfds.load("product_catalog/catalog", data_dir=out, split="all"))
    assert pipeline_pixels(product["image"]).shape == (16, 32, 3)
    with pytest.raises(SystemExit, match="--max-image-side must be a positive"):
        main.run(args[:-1] + ["0"])
