"""The embedded catalog: seeded, garment-like products drawn with numpy and PIL (no downloads).

Product `index` of seed `seed` comes from its own generator, `np.random.default_rng([seed, index])`,
so products are made independently, in any order and in any process, and are identical every time.
The attributes, title and texts are drawn before the image, so they do not depend on `image_size`.

What each attribute looks like, and where it can be read:
- `product_type`: a silhouette per type (`PRODUCT_TYPES`): four upper-body garments (shirt with a
  collar, cropped fitted top, hooded hoodie, long flared dress), three bottoms (trousers, shorts,
  skirt) and two non-apparel items (mug with a handle, bag with a top handle).
- `sleeve_type` (upper-body types only): sleeveless, short or long sleeves, visible as arm shapes and
  drawn independently of the type. No type word carries the sleeve ("t-shirt", "long-sleeve shirt"),
  so the title says the sleeve type only through the `sleeve_type` words themselves and removing those
  leaves the image as its only source. A three-quarter sleeve is left out: at 64x64 it is a pixel or
  two from a long one.
- `color`: the item's main colour from `COLORS`, whose RGB values lie at least 60 apart so they
  survive JPEG and downscaling; the main colour covers most of the item's pixels whatever the pattern.
- `pattern`: `PATTERNS`, drawn in a contrasting palette colour over the main one; `printed` is one
  graphic (circle, ring, diamond, triangle or star) at the item's chest or centre.
- `brand`, `material`: in the text only; nothing in the image depends on them.

Titles come from several templates with optional words (fit, size, audience) and always hold the
product's `color`, `pattern` and `sleeve_type` values verbatim as whole words (`solid` included), so
that `prompts.remove_words` can strip exactly those. The description and bullet points name the brand
and material but no colour, pattern or sleeve word, so a stripped title leaves the image as the only
source of those attributes. Images have a light solid or gradient background kept well away from the
item's colours, a random scale and position, and pixel noise.
"""
import json
import os
import re
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from mmt_jax.data import records

COLORS = {
    "red": (205, 25, 35), "maroon": (115, 15, 45), "coral": (250, 105, 95), "orange": (245, 130, 20),
    "yellow": (250, 220, 40), "olive": (120, 135, 20), "green": (35, 150, 55), "mint": (160, 240, 170),
    "teal": (0, 110, 120), "turquoise": (55, 215, 200), "light blue": (140, 200, 245),
    "blue": (30, 80, 220), "navy": (20, 30, 95), "purple": (115, 40, 165), "lavender": (190, 150, 235),
    "pink": (255, 160, 205), "magenta": (215, 25, 160), "brown": (135, 75, 30), "beige": (225, 205, 150),
    "white": (247, 247, 247), "grey": (128, 128, 128), "black": (20, 20, 20),
}
PATTERNS = ("solid", "striped", "checked", "dotted", "floral", "printed")
SLEEVE_TYPES = ("sleeveless", "short sleeve", "long sleeve")
UPPER_BODY_TYPES = ("shirt", "top", "dress", "hoodie")
APPAREL_TYPES = UPPER_BODY_TYPES + ("trousers", "shorts", "skirt")
PRODUCT_TYPES = APPAREL_TYPES + ("mug", "bag")
BRANDS = ("Alderwick", "Brisane", "Corvello", "Dunmore", "Elnora", "Fenwick", "Galloway", "Hartell",
          "Isolde", "Junova", "Kestrel", "Lumira", "Marlowe", "Northam", "Oakvale", "Pellino", "Quillon",
          "Rivane", "Solberg", "Tavira")
_GARMENT = ("cotton", "polyester", "linen", "viscose")
MATERIALS = {  # product type -> the materials it is made of
    "shirt": _GARMENT + ("silk",), "top": _GARMENT + ("silk", "jersey"),
    "dress": _GARMENT + ("silk", "chiffon"), "hoodie": ("cotton", "fleece", "polyester", "jersey"),
    "trousers": ("cotton", "denim", "linen", "wool", "corduroy"), "shorts": ("cotton", "denim", "linen"),
    "skirt": ("cotton", "denim", "wool", "silk", "linen"), "mug": ("ceramic", "porcelain", "stoneware"),
    "bag": ("canvas", "leather", "nylon", "jute"),
}

# A pattern's second colour is a palette colour at least this far (RGB distance) from the main one.
_MIN_CONTRAST = 110
_CONTRASTS = {name: tuple(other for other, rgb in COLORS.items()
                          if np.linalg.norm(np.subtract(rgb, COLORS[name])) >= _MIN_CONTRAST)
              for name in COLORS}
# The background is drawn at least this far from the item's colours (when 16 tries find one).
_BACKGROUND_DISTANCE = 90


def product_id(index: int, seed: int = 0) -> str:
    """The id of product `index`, known without making the product (the TFDS builder splits by it)."""
    return f"synthetic-{seed}-{index:07d}"


def make_product(index: int, seed: int = 0, image_size: int = 128) -> records.Product:
    """Product `index` of the catalog with `seed`, with a square JPEG image of `image_size` pixels."""
    rng = np.random.default_rng([seed, index])
    product_type = _pick(rng, PRODUCT_TYPES)
    color, pattern = _pick(rng, list(COLORS)), _pick(rng, PATTERNS)
    sleeve_type = _pick(rng, SLEEVE_TYPES) if product_type in UPPER_BODY_TYPES else None
    brand, material = _pick(rng, BRANDS), _pick(rng, MATERIALS[product_type])
    attributes = {"color": color, "pattern": pattern, "brand": brand, "material": material}
    if sleeve_type:
        attributes["sleeve_type"] = sleeve_type
    title, description, bullet_points = _texts(rng, product_type, attributes)
    pixels, _ = render(product_type, color, pattern, sleeve_type, rng, image_size)
    return records.Product(id=product_id(index, seed), title=title, image=records.encode_image(pixels),
                           description=description, bullet_points=bullet_points,
                           product_type=product_type, attributes=attributes)


def generate_catalog(num_products: int, seed: int = 0, image_size: int = 128,
                     start: int = 0) -> Iterator[records.Product]:
    """Products `start` .. `start + num_products - 1`, one at a time (any size streams)."""
    for index in range(start, start + num_products):
        yield make_product(index, seed, image_size)


def write_jsonl(products: Iterable[records.Product], jsonl_path: str, images_dir: str) -> int:
    """Writes a user-format catalog (records.py): one JSON line per product, each image as the file
    `images_dir/<id>.jpg` named relative to `images_dir`. Returns the number of products written."""
    os.makedirs(images_dir, exist_ok=True)
    count = 0
    with open(jsonl_path, "w", encoding="utf-8") as f:
        for product in products:
            image_path = f"{product.id}.jpg" if product.image else None
            if image_path:
                with open(os.path.join(images_dir, image_path), "wb") as image_file:
                    image_file.write(product.image)
            f.write(json.dumps(product.to_json_dict(image_path=image_path)) + "\n")
            count += 1
    return count


# ---- Images ----

def render(product_type: str, color: str, pattern: str, sleeve_type: str | None,
           rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image of one item -> (uint8 pixels [S, S, 3], bool item mask [S, S]).

    Scale and position are the first draws from `rng`, so the same generator state places every
    type in the same box. `sleeve_type` is required for upper-body types and must be None otherwise.
    """
    if (sleeve_type is None) == (product_type in UPPER_BODY_TYPES):
        raise ValueError(f"sleeve_type {sleeve_type!r} does not fit product type {product_type!r}")
    box = rng.uniform(0.68, 0.9) * image_size
    x0, y0 = rng.uniform(0, image_size - box, size=2).tolist()
    frame = (image_size, x0, y0, box)
    item = _draw(_SHAPES[product_type](sleeve_type), frame)
    main, second = COLORS[color], COLORS[_pick(rng, _CONTRASTS[color])]
    marks = _pattern_marks(pattern, product_type, rng, frame) & item
    planes = _background(rng, image_size, (main, second))  # channels first: fast to broadcast
    for plane, main_value, second_value in zip(planes, main, second):
        plane[item] = main_value
        plane[marks] = second_value
    planes += rng.standard_normal((image_size, image_size), dtype=np.float32) * rng.uniform(2, 6)
    return np.clip(planes, 0, 255).round().transpose(1, 2, 0).astype(np.uint8, order="C"), item


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _draw(ops, frame) -> np.ndarray:
    """Shapes given in the item's unit square -> bool mask [S, S]. An op is ("polygon", points, 1|0),
    ("ellipse", corners, 1|0) (1 draws, 0 cuts out) or ("ring", corners, thickness)."""
    size, x0, y0, box = frame
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for kind, coords, value in ops:
        points = [(x0 + u * box, y0 + v * box) for u, v in coords]
        if kind == "polygon":
            draw.polygon(points, fill=value)
        elif kind == "ellipse":
            draw.ellipse(points, fill=value)
        else:
            draw.ellipse(points, outline=1, width=max(1, round(value * box)))
    return np.asarray(image, dtype=bool)


# Sleeve type -> (angle below the horizontal in degrees, length, cuff width) of each sleeve.
_SLEEVES = {"short sleeve": (30, 0.2, 0.13), "long sleeve": (70, 0.6, 0.1)}


def _upper_body(sleeve_type, neck, shoulder_y, shoulder_hw, waist, hem, arm=1.0):
    """A torso polygon through the (y, half width) points neck, shoulders, waist and hem, with the
    shoulders cut in for `sleeveless`, else a sleeve from shoulder and armpit to the cuff on each
    side (`_SLEEVES`); `arm` scales sleeves and armholes to the garment."""
    (neck_y, neck_hw), (waist_y, waist_hw), (hem_y, hem_hw) = neck, waist, hem
    armpit_y = shoulder_y + 0.13 * arm
    top_hw = shoulder_hw - 0.08 if sleeve_type == "sleeveless" else shoulder_hw
    left = [(0.5 - neck_hw, neck_y), (0.5 - top_hw, shoulder_y), (0.5 - shoulder_hw, armpit_y),
            (0.5 - waist_hw, waist_y), (0.5 - hem_hw, hem_y)]
    ops = [("polygon", left + [(1 - u, v) for u, v in reversed(left)], 1)]
    if sleeve_type != "sleeveless":
        degrees, length, width = _SLEEVES[sleeve_type]
        a = np.deg2rad(degrees)
        shoulder, armpit = np.array([0.5 - shoulder_hw, shoulder_y]), np.array([0.5 - shoulder_hw, armpit_y])
        cuff_out = shoulder + length * arm * np.array([-np.cos(a), np.sin(a)])
        cuff_in = cuff_out + width * arm * np.array([np.sin(a), np.cos(a)])
        sleeve = [tuple(p) for p in (shoulder, cuff_out, cuff_in, armpit)]
        ops += [("polygon", sleeve, 1), ("polygon", [(1 - u, v) for u, v in sleeve], 1)]
    return ops


_SHAPES = {  # product type -> sleeve_type -> ops in the unit square (see `_draw`)
    "shirt": lambda s: _upper_body(s, (0.07, 0.08), 0.12, 0.19, (0.5, 0.19), (0.93, 0.2)) + [
        ("polygon", [(0.41, 0.12), (0.43, 0.04), (0.57, 0.04), (0.59, 0.12)], 1),  # collar
        ("polygon", [(0.46, 0.04), (0.54, 0.04), (0.5, 0.14)], 0)],  # its open V
    "top": lambda s: _upper_body(s, (0.18, 0.09), 0.2, 0.17, (0.46, 0.14), (0.7, 0.175), arm=0.85) + [
        ("ellipse", [(0.4, 0.1), (0.6, 0.29)], 0)],  # scoop neck
    "hoodie": lambda s: [("ellipse", [(0.36, 0.01), (0.64, 0.33)], 1)] + _upper_body(  # hood
        s, (0.2, 0.1), 0.22, 0.24, (0.6, 0.24), (0.82, 0.24)) + [
        ("polygon", [(0.27, 0.81), (0.73, 0.81), (0.71, 0.89), (0.29, 0.89)], 1)],  # waistband
    "dress": lambda s: _upper_body(s, (0.06, 0.07), 0.08, 0.14, (0.38, 0.115), (0.96, 0.32), arm=0.8) + [
        ("ellipse", [(0.43, 0.02), (0.57, 0.15)], 0)],  # round neck
    "trousers": lambda s: [("polygon", [(0.3, 0.03), (0.7, 0.03), (0.74, 0.97), (0.54, 0.97),
                                        (0.5, 0.34), (0.46, 0.97), (0.26, 0.97)], 1)],
    "shorts": lambda s: [("polygon", [(0.24, 0.25), (0.76, 0.25), (0.83, 0.72), (0.55, 0.76),
                                      (0.5, 0.5), (0.45, 0.76), (0.17, 0.72)], 1)],
    "skirt": lambda s: [("polygon", [(0.33, 0.16), (0.67, 0.16), (0.84, 0.8), (0.5, 0.85),
                                     (0.16, 0.8)], 1)],
    "mug": lambda s: [("ring", [(0.55, 0.33), (0.87, 0.7)], 0.07),  # handle
                      ("polygon", [(0.16, 0.24), (0.66, 0.24), (0.66, 0.84), (0.16, 0.84)], 1),
                      ("ellipse", [(0.16, 0.18), (0.66, 0.3)], 1),  # rim
                      ("ellipse", [(0.16, 0.78), (0.66, 0.9)], 1)],  # rounded base
    "bag": lambda s: [("ring", [(0.3, 0.07), (0.7, 0.55)], 0.05),  # handle
                      ("polygon", [(0.2, 0.38), (0.8, 0.38), (0.88, 0.9), (0.12, 0.9)], 1)],
}
# Where a `printed` graphic sits, in the unit square: the chest, or the centre of the item's body.
_PRINT_AT = {"shirt": (0.5, 0.38), "top": (0.5, 0.45), "hoodie": (0.5, 0.5), "dress": (0.5, 0.62),
             "trousers": (0.5, 0.17), "shorts": (0.5, 0.37), "skirt": (0.5, 0.45), "mug": (0.41, 0.55),
             "bag": (0.5, 0.64)}


def _pattern_marks(pattern, product_type, rng, frame) -> np.ndarray:
    """Where the second colour goes (before clipping to the item), as a bool mask [S, S]. Sizes are
    fractions of the item's box, so a pattern scales with the item."""
    size, x0, y0, box = frame
    u = ((np.arange(size, dtype=np.float32) + 0.5 - x0) / box)[None, :]
    v = ((np.arange(size, dtype=np.float32) + 0.5 - y0) / box)[:, None]
    if pattern == "solid":
        return np.zeros((size, size), bool)
    if pattern == "printed":
        cu, cv = _PRINT_AT[product_type]
        r = rng.uniform(0.1, 0.14)
        corners = [(cu - r, cv - r), (cu + r, cv + r)]
        angles = np.pi * (np.arange(10) / 5 - 0.5)
        star = [(cu + q * np.cos(t), cv + q * np.sin(t)) for q, t in zip([r, 0.45 * r] * 5, angles)]
        graphic = _pick(rng, [("ellipse", corners, 1), ("ring", corners, 0.35 * r),
                              ("polygon", [(cu, cv - r), (cu + r, cv), (cu, cv + r), (cu - r, cv)], 1),
                              ("polygon", [(cu, cv - r), (cu + 0.87 * r, cv + 0.5 * r),
                                           (cu - 0.87 * r, cv + 0.5 * r)], 1),
                              ("polygon", star, 1)])
        return _draw([graphic], frame)
    period = rng.uniform(*{"striped": (0.1, 0.16), "checked": (0.14, 0.22), "dotted": (0.11, 0.16),
                           "floral": (0.2, 0.28)}[pattern])
    u, v = u + rng.uniform(0, period), v + rng.uniform(0, period)
    if pattern == "striped":
        return np.broadcast_to((u if rng.random() < 0.5 else v) % period < 0.3 * period, (size, size))
    if pattern == "checked":
        return (u % period < 0.18 * period) | (v % period < 0.18 * period)
    # Dots and flowers on a grid whose odd rows shift by half a period; a flower is five petals.
    u = (u + 0.5 * period * (v // period % 2)) % period - 0.5 * period
    v = v % period - 0.5 * period
    if pattern == "dotted":
        return u**2 + v**2 < (0.27 * period) ** 2
    marks = np.zeros((size, size), bool)
    for t in rng.uniform(0, 2 * np.pi) + np.arange(5) * 2 * np.pi / 5:
        marks |= (u - 0.2 * period * np.cos(t))**2 + (v - 0.2 * period * np.sin(t))**2 < (0.14 * period)**2
    return marks


def _background(rng, size, avoid) -> np.ndarray:
    """A light solid colour (half the time) or linear gradient, float32 [3, S, S], far from the
    colours in `avoid`."""
    candidates = rng.uniform(140, 255, size=(16, 3)).astype(np.float32)
    distance = np.linalg.norm(candidates[:, None] - np.array(avoid)[None], axis=-1).min(axis=1)
    start = candidates[np.argmax(np.minimum(distance, _BACKGROUND_DISTANCE))]  # first far enough
    if rng.random() < 0.5:
        return np.broadcast_to(start[:, None, None], (3, size, size)).copy()
    end = start + rng.uniform(-25, 25, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    t = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]).astype(np.float32)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    return start[:, None, None] + (end - start)[:, None, None] * t


# ---- Text ----

_TITLES = ("{brand} {look} {type} {audience}", "{brand} {fit} {type}, {look}, {size}",
           "{look} {material} {type} by {brand} {audience}", "{type} {audience} - {look} - {brand} {size}",
           "{brand} {material} {type} in {look} {fit}")
_LOOKS = ("{color} {pattern} {sleeve}", "{pattern} {color} {sleeve}", "{sleeve} {color} {pattern}",
          "{color} {sleeve} {pattern}")
_APPAREL_WORDS = {"fit": ("slim fit", "regular fit", "relaxed fit", "oversized"),
                  "size": ("size XS", "size S", "size M", "size L", "size XL"),
                  "audience": ("for women", "for men", "for kids", "unisex")}
_OPTIONAL_WORDS = {  # product type -> optional title words (each present half of the time)
    **{t: _APPAREL_WORDS for t in APPAREL_TYPES},
    **{t: {**_APPAREL_WORDS, "audience": ("for women", "for girls")} for t in ("dress", "skirt")},
    "mug": {"size": ("300 ml", "350 ml", "11 oz", "15 oz"), "audience": ("for coffee", "for tea")},
    "bag": {"size": ("small", "medium", "large"), "audience": ("for work", "for travel", "for the beach")},
}
_OPENINGS = ("{brand} {type} made from {material}.", "Made from {material} by {brand}.",
             "{brand} {type} in {material}.")
_APPAREL_FILLERS = ("Easy to care for and made to last.", "Cut for comfort and an easy fit.",
                    "A reliable piece for every day.", "Pairs well with the rest of the collection.")
_FILLERS = {  # product type -> (description sentences, extra bullet points)
    **{t: (_APPAREL_FILLERS, ("Machine wash cold", "Do not tumble dry", "Model wears size M",
                              "Iron on low heat")) for t in APPAREL_TYPES},
    "mug": (("Dishwasher and microwave safe.", "Holds a generous hot drink.",
             "A sturdy handle and a smooth rim."), ("Dishwasher safe", "Microwave safe", "Gift boxed")),
    "bag": (("Room for a laptop, a book and more.", "An inner pocket keeps keys and cards at hand.",
             "Strong handles for heavy loads."), ("Magnetic closure", "Inner zip pocket", "Spot clean only")),
}


def _texts(rng, product_type, attributes) -> tuple[str, str, tuple[str, ...]]:
    """(title, description, bullet points). Only the title names colour, pattern and sleeve type."""
    words = {"type": product_type, "brand": attributes["brand"], "material": attributes["material"]}
    look = _pick(rng, _LOOKS).format(color=attributes["color"], pattern=attributes["pattern"],
                                     sleeve=attributes.get("sleeve_type", ""))
    optional = {name: _pick(rng, options) if rng.random() < 0.5 else ""
                for name, options in _OPTIONAL_WORDS[product_type].items()}
    title = _pick(rng, _TITLES).format(look=look, **{"fit": "", **optional}, **words)
    title = re.sub(r" ,", ",", " ".join(title.split())).strip(" ,-")
    sentences, extra_bullets = _FILLERS[product_type]
    description = f"{_pick(rng, _OPENINGS).format(**words)} {_pick(rng, sentences)}"
    bullets = [f"Material: {words['material']}", f"Brand: {words['brand']}"]
    if rng.random() < 0.5:
        bullets.append(_pick(rng, extra_bullets))
    return title, description, tuple(bullets)
