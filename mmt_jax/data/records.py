"""The product record: what a catalog line holds, how it is checked, and how it is stored.

A catalog is a JSONL file, one product per line, plus an optional directory of image files:

    {"id": "B07X1", "image": "img/B07X1.jpg", "title": "Acme cotton crew-neck t-shirt",
     "description": "...", "bullet_points": ["...", "..."], "product_type": "t-shirt",
     "attributes": {"color": "red", "sleeve_type": "short sleeve"}, "split": "train"}

- `id` (string, unique) and `title` (non-empty string) are required.
- `image` is a path relative to the images directory (or absolute); `image_base64` carries the encoded
  bytes inline instead. Both absent means a product without an image (the model then sees text only).
- `description` (string), `bullet_points` (list of strings), `product_type` (string) and `attributes`
  (object of string -> string) are optional.
- `split` (`train`, `validation` or `test`) is optional; without it the split is drawn from a hash of
  the id, so a product never changes split when the catalog grows.

`parse_record` turns one line into a `Product` or raises `RecordError` naming the line, the id, the
field and the reason. Images are decoded once here, so a corrupt file is found at conversion time and
not in the middle of training; JPEG and PNG bytes are stored as they are, other formats are re-encoded
as PNG (what `tf.io.decode_image` reads).
"""
import base64
import binascii
import dataclasses
import hashlib
import io
import json
import os
from typing import Mapping

import numpy as np
from PIL import Image

SPLITS = ("train", "validation", "test")
STORED_IMAGE_FORMATS = ("JPEG", "PNG")


@dataclasses.dataclass(frozen=True)
class Product:
    """One catalog product. `image` holds encoded JPEG/PNG bytes (b"" when the product has none)."""
    id: str
    title: str
    image: bytes = b""
    description: str = ""
    bullet_points: tuple[str, ...] = ()
    product_type: str = ""
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json_dict(self, image_path: str | None = None) -> dict:
        """The JSONL form; the image goes to `image_path` when given, else inline as base64."""
        record = {"id": self.id, "title": self.title, "description": self.description,
                  "bullet_points": list(self.bullet_points), "product_type": self.product_type,
                  "attributes": dict(self.attributes)}
        if image_path is not None:
            record["image"] = image_path
        elif self.image:
            record["image_base64"] = base64.b64encode(self.image).decode("ascii")
        return record

    def to_features(self) -> dict:
        """The stored example (see `tfds_catalog.FEATURES`); attributes as two parallel lists."""
        names = sorted(self.attributes)
        return {"id": self.id, "title": self.title, "image": self.image,
                "description": self.description, "bullet_points": list(self.bullet_points),
                "product_type": self.product_type, "attribute_names": names,
                "attribute_values": [self.attributes[n] for n in names]}


class RecordError(ValueError):
    """A catalog line that cannot become a Product; says where and why."""

    def __init__(self, line: int, record_id: str | None, field: str | None, reason: str):
        self.line, self.record_id, self.field, self.reason = line, record_id, field, reason
        where = f"line {line}" + (f", record {record_id!r}" if record_id is not None else "")
        super().__init__(f"{where}: {f'field {field!r}: ' if field else ''}{reason}")


class ConversionError(ValueError):
    """A catalog that did not convert; the message lists the bad records."""


def split_of(record_id: str, validation_fraction: float, test_fraction: float) -> str:
    """A stable split from the id's hash: the same product lands in the same split in every run."""
    u = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


def parse_record(raw_line: bytes, line: int, images_dir: str | None) -> tuple[Product, str | None]:
    """One JSONL line -> (Product, the record's own `split` or None). Raises RecordError."""
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(line, None, None, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(line, None, None, f"not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RecordError(line, None, None, f"expected a JSON object, got {type(obj).__name__}")
    record_id = obj.get("id")
    if not isinstance(record_id, str) or not record_id.strip():
        raise RecordError(line, None, "id", "missing, empty or not a string")

    def fail(field, reason):
        raise RecordError(line, record_id, field, reason)

    known = {"id", "title", "image", "image_base64", "description", "bullet_points", "product_type",
             "attributes", "split"}
    unknown = sorted(set(obj) - known)
    if unknown:
        fail(unknown[0], f"unknown field (known fields: {', '.join(sorted(known))})")
    title = obj.get("title")
    if not isinstance(title, str) or not title.strip():
        fail("title", "missing, empty or not a string")
    for field in ("description", "product_type"):
        if not isinstance(obj.get(field, ""), str):
            fail(field, f"expected a string, got {type(obj[field]).__name__}")
    bullets = obj.get("bullet_points", [])
    if not isinstance(bullets, list) or not all(isinstance(b, str) for b in bullets):
        fail("bullet_points", "expected a list of strings")
    attributes = obj.get("attributes", {})
    if not isinstance(attributes, dict):
        fail("attributes", f"expected an object of name -> value, got {type(attributes).__name__}")
    for name, value in attributes.items():
        if not isinstance(value, str) or not value.strip():
            fail("attributes", f"value of {name!r} must be a non-empty string, got {value!r}")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        fail("split", f"{split!r} is not one of {', '.join(SPLITS)}")
    image = _read_image(obj, images_dir, fail)
    product = Product(id=record_id, title=title, image=image, description=obj.get("description", ""),
                      bullet_points=tuple(bullets), product_type=obj.get("product_type", ""),
                      attributes=dict(attributes))
    return product, split


def _read_image(obj: dict, images_dir: str | None, fail) -> bytes:
    """The record's image as JPEG/PNG bytes (b"" if it has none), decoded once to prove it is whole."""
    if "image" in obj and "image_base64" in obj:
        fail("image", "give either 'image' (a path) or 'image_base64', not both")
    if "image_base64" in obj:
        field = "image_base64"
        if not isinstance(obj[field], str):
            fail(field, "expected a base64 string")
        try:
            data = base64.b64decode(obj[field], validate=True)
        except binascii.Error as e:
            fail(field, f"not valid base64 ({e})")
    elif "image" in obj:
        field = "image"
        if not isinstance(obj[field], str) or not obj[field]:
            fail(field, "expected a file path")
        path = obj[field] if images_dir is None else os.path.join(images_dir, obj[field])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            fail(field, f"cannot read {path}: {e.strerror}")
    else:
        return b""
    try:
        return stored_image(data)
    except ValueError as e:
        fail(field, str(e))


def stored_image(data: bytes) -> bytes:
    """Encoded image bytes of any format PIL reads -> JPEG/PNG bytes that `tf.io.decode_image` reads
    (JPEG and PNG unchanged). Decodes the whole image, so a truncated or corrupt file raises
    ValueError here rather than failing later inside the input pipeline."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img_format = img.format
            img.load()
            if img_format in STORED_IMAGE_FORMATS and img.mode in ("RGB", "L", "RGBA", "P"):
                return data
            out = io.BytesIO()
            img.convert("RGB").save(out, format="PNG")
            return out.getvalue()
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise ValueError(f"corrupt or unreadable image ({e})") from None


def encode_image(pixels: np.ndarray, image_format: str = "JPEG", quality: int = 92) -> bytes:
    """uint8 [height, width, 3] -> encoded bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=image_format, quality=quality)
    return out.getvalue()
