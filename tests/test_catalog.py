"""The embedded catalog: deterministic products, a silhouette per type and sleeve type, colours that
survive JPEG and downscaling, titles that hold the attribute words and texts that do not, coverage,
and the user-format JSONL writer."""
import collections
import hashlib
import io
import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmt_jax.data import catalog, records

VISUAL_WORDS = (*catalog.COLORS, *catalog.PATTERNS, *catalog.SLEEVE_TYPES)
PALETTE = np.array(list(catalog.COLORS.values()), np.float32)


def _has_words(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


def _remove_words(text: str, phrase: str) -> str:
    """What `prompts.remove_words` does, in Python."""
    return re.sub(rf"(?i)(^|\W){re.escape(phrase)}(\W|$)", r"\1\2", text)


def _nearest_colors(pixels: np.ndarray) -> np.ndarray:
    """Index into the palette of the colour nearest to each pixel of [..., 3]."""
    return np.linalg.norm(pixels[..., None, :].astype(np.float32) - PALETTE, axis=-1).argmin(-1)


def _mask(product_type, sleeve_type, image_size=64):
    return catalog.render(product_type, "red", "solid", sleeve_type, np.random.default_rng(0), image_size)[1]


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_products_are_deterministic_and_independent_of_order():
    product = catalog.make_product(5, seed=3, image_size=32)
    assert product == catalog.make_product(5, seed=3, image_size=32)
    assert list(catalog.generate_catalog(8, seed=3, image_size=32))[5] == product
    assert next(catalog.generate_catalog(2, seed=3, image_size=32, start=5)) == product
    assert product.id == catalog.product_id(5, 3) == "synthetic-3-0000005"


def test_products_are_the_same_in_another_process():
    code = ("import hashlib; from mmt_jax.data import catalog; "
            "print(hashlib.sha256(b''.join(catalog.make_product(i, 7, 48).image for i in range(4)))"
            ".hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    here = hashlib.sha256(b"".join(catalog.make_product(i, 7, 48).image for i in range(4))).hexdigest()
    assert out == here


def test_seeds_differ_and_text_does_not_depend_on_image_size():
    a = [catalog.make_product(i, seed=0, image_size=32) for i in range(20)]
    b = [catalog.make_product(i, seed=1, image_size=32) for i in range(20)]
    assert all(x.image != y.image for x, y in zip(a, b))
    assert [x.attributes for x in a] != [y.attributes for y in b]
    for product in a[:5]:
        big = catalog.make_product(int(product.id[-7:]), seed=0, image_size=96)
        assert (big.title, big.description, big.bullet_points, big.attributes) == (
            product.title, product.description, product.bullet_points, product.attributes)
        assert Image.open(io.BytesIO(big.image)).size == (96, 96)


@pytest.mark.parametrize("sleeve_type", catalog.SLEEVE_TYPES)
def test_every_product_type_has_its_own_silhouette(sleeve_type):
    masks = {t: _mask(t, sleeve_type if t in catalog.UPPER_BODY_TYPES else None)
             for t in catalog.PRODUCT_TYPES}
    for product_type, mask in masks.items():
        assert 0.05 < mask.mean() < 0.5, product_type
    for (a, mask_a), (b, mask_b) in itertools.combinations(masks.items(), 2):
        assert _iou(mask_a, mask_b) < 0.85, (a, b)


@pytest.mark.parametrize("product_type", catalog.UPPER_BODY_TYPES)
def test_sleeve_types_are_visible_arm_shapes(product_type):
    sleeveless, short, long = (_mask(product_type, s) for s in catalog.SLEEVE_TYPES)
    assert sleeveless.sum() * 1.05 < short.sum() and short.sum() * 1.05 < long.sum()
    for a, b in itertools.combinations((sleeveless, short, long), 2):
        assert _iou(a, b) < 0.92
    # What the sleeves add hangs lower for long sleeves than for short ones.
    lowest_row = [np.nonzero((m & ~sleeveless).any(1))[0].max() for m in (short, long)]
    assert lowest_row[1] > lowest_row[0] + 0.1 * sleeveless.shape[0]


def test_render_rejects_a_sleeve_type_that_does_not_fit():
    with pytest.raises(ValueError, match="sleeve_type"):
        catalog.render("mug", "red", "solid", "long sleeve", np.random.default_rng(0), 32)
    with pytest.raises(ValueError, match="sleeve_type"):
        catalog.render("shirt", "red", "solid", None, np.random.default_rng(0), 32)


@pytest.mark.parametrize("color", catalog.COLORS)
def test_item_colour_is_the_palette_colour_after_jpeg_and_downscaling(color):
    rgb = np.array(catalog.COLORS[color], np.float32)
    rng = np.random.default_rng(list(catalog.COLORS).index(color))
    pixels, mask = catalog.render("shirt", color, "solid", "short sleeve", rng, 128)
    assert np.linalg.norm(pixels[mask].mean(0) - rgb) < 4
    assert np.linalg.norm(np.median(pixels[~mask], 0) - rgb) > 60  # the item stands out
    small = np.asarray(Image.open(io.BytesIO(records.encode_image(pixels))).resize((32, 32), Image.BOX))
    inside = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((32, 32), Image.BOX)) == 255
    assert np.linalg.norm(small[inside].mean(0) - rgb) < 12
    assert (_nearest_colors(small[inside]) == list(catalog.COLORS).index(color)).mean() > 0.9


@pytest.mark.parametrize("pattern", catalog.PATTERNS)
def test_main_colour_is_the_most_common_colour_of_the_item_for_every_pattern(pattern):
    for i, (color, product_type) in enumerate(zip(catalog.COLORS, itertools.cycle(catalog.PRODUCT_TYPES))):
        sleeve_type = "long sleeve" if product_type in catalog.UPPER_BODY_TYPES else None
        pixels, mask = catalog.render(product_type, color, pattern, sleeve_type,
                                      np.random.default_rng(i), 64)
        counts = np.bincount(_nearest_colors(pixels[mask]), minlength=len(PALETTE))
        assert counts[list(catalog.COLORS).index(color)] > 0.5 * mask.sum(), (color, product_type)
        if pattern != "solid":  # the pattern shows, in one other colour
            assert np.sort(counts)[-2] > 0.03 * mask.sum(), (color, product_type)


def test_titles_hold_the_visual_words_and_the_other_texts_do_not():
    for product in catalog.generate_catalog(400, seed=2, image_size=16):
        attributes = product.attributes
        assert product.product_type in catalog.PRODUCT_TYPES
        assert set(attributes) == {"color", "pattern", "brand", "material"} | (
            {"sleeve_type"} if product.product_type in catalog.UPPER_BODY_TYPES else set())
        assert attributes["material"] in catalog.MATERIALS[product.product_type]
        assert attributes["brand"] in catalog.BRANDS
        stripped = product.title
        for name in ("color", "pattern", "sleeve_type"):
            if name in attributes:
                assert _has_words(product.title, attributes[name]), (product.title, name)
                stripped = _remove_words(stripped, attributes[name])
        others = " | ".join((stripped, product.description, *product.bullet_points))
        assert not [w for w in VISUAL_WORDS if _has_words(others, w)], (product.title, others)
        assert attributes["brand"] in product.description + " ".join(product.bullet_points)
        assert 2 <= len(product.bullet_points) <= 3


def test_two_thousand_products_cover_every_value():
    seen = collections.defaultdict(set)
    for product in catalog.generate_catalog(2000, image_size=16):
        seen["product_type"].add(product.product_type)
        for name, value in product.attributes.items():
            seen[name].add(value)
    assert seen["product_type"] == set(catalog.PRODUCT_TYPES)
    assert seen["color"] == set(catalog.COLORS)
    assert seen["pattern"] == set(catalog.PATTERNS)
    assert seen["sleeve_type"] == set(catalog.SLEEVE_TYPES)
    assert seen["brand"] == set(catalog.BRANDS)
    assert seen["material"] == set(itertools.chain(*catalog.MATERIALS.values()))


def test_write_jsonl_round_trips_through_parse_record(tmp_path):
    products = list(catalog.generate_catalog(6, seed=4, image_size=32))
    jsonl, images_dir = tmp_path / "catalog.jsonl", tmp_path / "images"
    assert catalog.write_jsonl(iter(products), str(jsonl), str(images_dir)) == len(products)
    lines = jsonl.read_bytes().splitlines()
    assert len(lines) == len(products)
    for line_no, (line, product) in enumerate(zip(lines, products), start=1):
        parsed, split = records.parse_record(line, line_no, str(images_dir))
        assert (parsed, split) == (product, None)
        assert (images_dir / f"{product.id}.jpg").read_bytes() == product.image
