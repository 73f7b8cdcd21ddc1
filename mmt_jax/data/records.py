"""The product record: what a catalog line holds, how it is checked, and how it is stored.

A catalog is a JSONL file, one product per line, plus an optional directory of image files:

    {"id": "B07X1", "image": "img/B07X1.jpg", "title": "Acme cotton crew-neck t-shirt",
     "description": "...", "bullet_points": ["...", "..."], "product_type": "t-shirt",
     "attributes": {"color": "red", "sleeve_type": "short sleeve"}, "split": "train"}

- `id` (string, unique) and `title` (non-empty string) are required.
- `image` is a path relative to the images directory (the current directory when none is given);
  `image_base64` carries the encoded bytes inline instead (line breaks, as `base64` tools wrap it, are
  allowed). Both absent means a product without an image (the model then sees text only). A path is
  resolved, symlinks too, and one that leads outside the images directory is refused; an absolute path
  is refused unless `allow_absolute_image_paths` (`--allow-absolute-image-paths`) is set.
- `description` (string), `bullet_points` (list of strings), `product_type` (string) and `attributes`
  (object of string -> string) are optional.
- `split` (`train`, `validation` or `test`) is optional; without it the split is drawn from a hash of
  the id, so a product never changes split when the catalog grows.

`parse_record` turns one line into a `Product` or raises `RecordError` naming the line, the id, the
field and the reason (a line that is not UTF-8 still names its id and field when it parses as JSON
otherwise). A byte-order mark at the start of a line is ignored. Images are decoded once here, by
`stored_image`, so a corrupt file is found at conversion time and not in the middle of training, and
the stored bytes are what `tf.io.decode_image` reads as the picture a viewer shows:

- an 8-bit RGB or greyscale JPEG or PNG without transparency or EXIF rotation, no larger than
  `max_image_side`, is stored byte for byte;
- anything else is decoded, turned upright by its EXIF orientation (as phones save photos),
  converted to 8-bit RGB or greyscale (16-bit and 32-bit integer greyscale are scaled from 0..65535,
  float greyscale from 0..1, CMYK and palettes converted, transparency composited onto white), shrunk
  to `max_image_side` on its longest side, and re-encoded: as JPEG at quality 95 when it was a JPEG
  photo (already lossy), else as PNG (lossless);
- an image of more than `MAX_IMAGE_PIXELS` pixels is refused before it is decoded (a decompression
  bomb: a small file whose header claims gigapixels).
"""
import base64
import binascii
import dataclasses
import hashlib
import io
import json
import os
import stat
import warnings
from typing import Mapping

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mmt_jax.image_spec import StoredFeatures

SPLITS = ("train", "validation", "test")
# Stored images are capped at this longest side: it leaves room above the largest representator's input
# (EfficientNet-B4 reads 380 px, ViT and Lite0 224 px, center crops included) while a 6000x6000 phone
# original is not stored as 100 MB of pixels the pipeline only shrinks again.
MAX_IMAGE_SIDE = 1024
# Refused before decoding: 80 megapixels is above a phone's or camera's full-size photo (a 10000x8000
# picture) and below Pillow's own decompression bomb warning (89.5 megapixels).
MAX_IMAGE_PIXELS = 80_000_000
_STORED_AS_IS_FORMATS = ("JPEG", "PNG")
_PHOTO_FORMATS = ("JPEG", "MPO")  # lossy already: re-encoded as JPEG, not inflated into PNG
_JPEG_QUALITY = 95
_GREY_MODES = ("1", "L", "LA", "La")
_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")


@dataclasses.dataclass(frozen=True)
class Product:
    """One catalog product. `image` holds encoded JPEG/PNG bytes (b"" when the product has none);
    `image_features` the features a converted catalog stores with it (read back from its TFRecord
    files), None otherwise: not part of the JSONL record."""
    id: str
    title: str
    image: bytes = b""
    description: str = ""
    bullet_points: tuple[str, ...] = ()
    product_type: str = ""
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    image_features: StoredFeatures | None = dataclasses.field(default=None, compare=False,
                                                              repr=False)

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


def parse_record(raw_line: bytes, line: int, images_dir: str | None, *,
                 allow_absolute_image_paths: bool = False,
                 max_image_side: int = MAX_IMAGE_SIDE) -> tuple[Product, str | None]:
    """One JSONL line -> (Product, the record's own `split` or None). Raises RecordError.

    `images_dir`: where `image` paths start (None: the current directory); no path may leave it, and
    an absolute one is read only with `allow_absolute_image_paths`. `max_image_side`: the longest
    side an image is stored at (see the module docstring).
    """
    try:
        text = raw_line.decode("utf-8").removeprefix("\ufeff")  # the BOM Windows editors write
    except UnicodeDecodeError as e:
        raise _not_utf8_error(raw_line, line, e) from None
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
        if not name.strip():
            fail("attributes", f"attribute names must be non-empty, got {name!r}")
        if not isinstance(value, str) or not value.strip():
            fail("attributes", f"value of {name!r} must be a non-empty string, got {value!r}")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        fail("split", f"{split!r} is not one of {', '.join(SPLITS)}")
    image = _read_image(obj, images_dir, allow_absolute_image_paths, max_image_side, fail)
    product = Product(id=record_id, title=title, image=image, description=obj.get("description", ""),
                      bullet_points=tuple(bullets), product_type=obj.get("product_type", ""),
                      attributes=dict(attributes))
    return product, split


def _not_utf8_error(raw_line: bytes, line: int, error: UnicodeDecodeError) -> RecordError:
    """The error for a line that is not UTF-8 (say a Latin-1 export): with the record's id and the
    field holding the first bad byte when the rest of the line is a JSON object, else the line only."""
    reason = f"not UTF-8 ({error.reason}: byte 0x{raw_line[error.start]:02x} at byte {error.start})"
    try:  # undecodable bytes become lone surrogates U+DC80..U+DCFF, which no UTF-8 text holds
        obj = json.loads(raw_line.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff"))
    except json.JSONDecodeError:
        return RecordError(line, None, None, reason)
    if not isinstance(obj, dict):
        return RecordError(line, None, None, reason)

    def undecodable(value) -> bool:
        if isinstance(value, str):
            return any("\udc80" <= c <= "\udcff" for c in value)
        if isinstance(value, dict):
            return any(undecodable(k) or undecodable(v) for k, v in value.items())
        return isinstance(value, list) and any(undecodable(v) for v in value)

    record_id = obj.get("id")
    if not isinstance(record_id, str) or undecodable(record_id):
        record_id = None
    field = next((k for k, v in obj.items() if undecodable(k) or undecodable(v)), None)
    return RecordError(line, record_id, field, reason)


def _read_image(obj: dict, images_dir: str | None, allow_absolute_image_paths: bool,
                max_image_side: int, fail) -> bytes:
    """The record's image as stored bytes (b"" if it has none); see `stored_image`."""
    if "image" in obj and "image_base64" in obj:
        fail("image", "give either 'image' (a path) or 'image_base64', not both")
    if "image_base64" in obj:
        field, source = "image_base64", "the base64 data"
        if not isinstance(obj[field], str):
            fail(field, "expected a base64 string")
        try:
            data = base64.b64decode("".join(obj[field].split()), validate=True)
        except binascii.Error as e:
            fail(field, f"not valid base64 ({e})")
    elif "image" in obj:
        field = "image"
        name = obj[field]
        if not isinstance(name, str) or not name:
            fail(field, "expected a file path")
        source = f"file {name!r}"
        try:
            path = _image_path(name, images_dir, allow_absolute_image_paths)
        except ValueError as e:
            fail(field, str(e))
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                fail(field, f"cannot read {path}: not a regular file")
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            fail(field, f"cannot read {path}: {e.strerror}")
    else:
        return b""
    try:
        return stored_image(data, max_image_side, source=source)
    except ValueError as e:
        fail(field, str(e))


def _image_path(name: str, images_dir: str | None, allow_absolute_image_paths: bool) -> str:
    """The file a record's `image` names, resolved (symlinks too). Raises ValueError for a path that
    leads outside the images directory, or an absolute one unless `allow_absolute_image_paths`."""
    if "\0" in name:
        raise ValueError(f"path {name!r} contains a NUL character")
    if os.path.isabs(name):
        if not allow_absolute_image_paths:
            raise ValueError(f"absolute path {name!r} refused: paths are relative to the images "
                             "directory (allow_absolute_image_paths / --allow-absolute-image-paths "
                             "reads absolute ones)")
        return os.path.realpath(name)
    root = os.path.realpath(images_dir if images_dir is not None else os.curdir)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"path {name!r} leads outside the images directory {root} (to {path})")
    return path


def stored_image(image: bytes | Image.Image, max_side: int = MAX_IMAGE_SIDE, *,
                 source: str = "the image") -> bytes:
    """Encoded bytes of any format PIL reads (or a PIL image) -> the JPEG/PNG bytes to store, as the
    module docstring describes. Decodes the whole image, so a truncated or corrupt file raises
    ValueError here rather than failing later inside the input pipeline; the message names `source`
    ("file 'img/x.jpg'", "the base64 data")."""
    img = image if isinstance(image, Image.Image) else _opened(image, source)
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise _too_large(source)
    # A malformed file can make PIL's decoders raise almost anything (OSError, SyntaxError, EOFError,
    # struct.error, IndexError, ...): each is this image's error, reported as such.
    try:
        if isinstance(image, bytes) and img.format in _PHOTO_FORMATS and max(img.size) > max_side:
            img.draft(None, (max_side, max_side))  # decodes at 1/2, 1/4 or 1/8 scale, still >= max_side
        img.load()
        if (isinstance(image, bytes) and img.format in _STORED_AS_IS_FORMATS
                and img.mode in ("RGB", "L") and "transparency" not in img.info
                and img.getexif().get(ExifTags.Base.Orientation, 1) == 1
                and max(img.size) <= max_side):
            return image
        upright = _upright_8bit(img)
        if max(upright.size) > max_side:
            scale = max_side / max(upright.size)
            upright = upright.resize((max(1, round(upright.width * scale)),
                                      max(1, round(upright.height * scale))),
                                     Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        if img.format in _PHOTO_FORMATS:
            upright.save(out, format="JPEG", quality=_JPEG_QUALITY)
        else:
            upright.save(out, format="PNG")
        return out.getvalue()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"corrupt or unreadable image in {source} ({e})") from None


def _opened(data: bytes, source: str) -> Image.Image:
    """PIL's lazy view of encoded bytes (header read, pixels not yet decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(source) from None
    except UnidentifiedImageError:  # its message holds the repr of the BytesIO, not a file name
        raise ValueError(f"corrupt or unreadable image in {source} (not a format PIL reads)") from None
    except Exception as e:  # noqa: BLE001 (as in stored_image)
        raise ValueError(f"corrupt or unreadable image in {source} ({e})") from None


def _too_large(source: str) -> ValueError:
    return ValueError(f"{source} is too large: more than {MAX_IMAGE_PIXELS:,} pixels (refused as a "
                      "possible decompression bomb)")


def _upright_8bit(img: Image.Image) -> Image.Image:
    """A decoded image of any PIL mode -> mode "L" or "RGB", turned as its EXIF orientation says."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit samples (PNG, TIFF)
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257
        return Image.fromarray(np.round(grey).astype(np.uint8))
    if img.mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 1) * 255
        return Image.fromarray(np.round(grey).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        grey = img.mode in _GREY_MODES
        with_alpha = img.convert("LA" if grey else "RGBA")
        background = Image.new("L" if grey else "RGB", img.size, "white")
        background.paste(with_alpha.convert(background.mode), mask=with_alpha.getchannel("A"))
        return background
    return img.convert("L" if img.mode in _GREY_MODES else "RGB")


def encode_image(pixels: np.ndarray, image_format: str = "JPEG", quality: int = 92) -> bytes:
    """uint8 [height, width, 3] -> encoded bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=image_format, quality=quality)
    return out.getvalue()
