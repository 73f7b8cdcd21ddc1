"""Catalogs as a tensorflow-datasets builder: sharded TFRecords of tf.Example with splits and a spec.

One builder, `product_catalog`, stores both the embedded synthetic catalog and a user's JSONL catalog;
each becomes a builder config whose name is its directory under `data_dir`:

    <data_dir>/product_catalog/<config name>/1.0.0/product_catalog-train.tfrecord-00000-of-00004 ...

Once written, a catalog is read by name and directory with nothing else (the source JSONL is not
needed):

    tfds.load("product_catalog/my_catalog", data_dir=DIR, split="train")
    seqio.TfdsDataSource(tfds_name="product_catalog/my_catalog:1.0.0", tfds_data_dir=DIR)

A catalog may also store each product's image features from a frozen pretrained network
(`image_features`, a spec such as "efficientnet-lite0-px128", see vision/extractors.py): computed once
here, in batches, they spare training and evaluation the network's forward pass at every step.

A catalog is built whole in a hidden staging directory under `data_dir` and renamed into place when
every split is written (`prepare`), so a failed or interrupted conversion never leaves something that
reads as a finished catalog, nor empty folders, and `overwrite` never loses the catalog it replaces.
Records that fail validation stop the conversion (`on_error="fail"`, the default) or are skipped
(`"skip"`); either way each one is reported with its line, id, field and reason, and the skipped ones
are listed in the catalog's `metadata.json`, as are the attributes the products name, with their values
and counts per split (`catalog_attributes`), so that tasks can default to them.
"""
import collections
import contextlib
import dataclasses
import glob
import io
import itertools
import os
import re
import shutil
import tempfile
from typing import Iterator, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

from mmt_jax import image_spec
from mmt_jax.data import catalog, records
from mmt_jax.vision import extractors

NAME = "product_catalog"
VERSION = "1.0.0"
ON_ERROR = ("fail", "skip")
# The metadata entry that describes the catalog's attributes (`catalog_attributes`).
ATTRIBUTES = "attributes"
# The metadata entry naming the extractor spec of the stored image features (`stored_features_spec`).
IMAGE_FEATURES = "image_features"


@dataclasses.dataclass
class ProductCatalogConfig(tfds.core.BuilderConfig):
    """Where a catalog comes from: a JSONL file (+ images) or the embedded generator.

    Attributes:
      jsonl: the user's catalog files (records.py documents a line), each with the split of its
        records that name none (None: from the id's hash); None for the embedded catalog.
      images_dir: directory that relative `image` paths start from; no path may leave it.
      allow_absolute_image_paths: also read `image` paths that are absolute.
      max_image_side: the longest side images are stored at (records.py says how).
      num_products, seed, image_size: the embedded catalog's size, seed and square image size.
      validation_fraction, test_fraction: shares of products without a `split` field that go to
        validation and test, drawn from a hash of the id.
      on_error: "fail" stops at bad records, "skip" leaves them out; both report them.
      image_features: an extractor spec ("efficientnet-lite0-px128"): also store each product's
        features `image_features` float16 `[Lv, D]` (zeros for a product without an image).
    """
    jsonl: tuple[tuple[str, str | None], ...] | None = None
    images_dir: str | None = None
    allow_absolute_image_paths: bool = False
    max_image_side: int = records.MAX_IMAGE_SIDE
    num_products: int = 0
    seed: int = 0
    image_size: int = 128
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    on_error: str = "fail"
    image_features: str | None = None

    def __post_init__(self):
        if self.image_features is not None:
            image_spec.preprocessing(self.image_features)  # a clear error for an unknown spec


def embedded_config(num_products: int = 3000, seed: int = 0, image_size: int = 128,
                    image_features: str | None = None) -> ProductCatalogConfig:
    """The embedded catalog of a given size; its name says what it holds, so sizes never collide:
    "embedded-n3000-s0-px128", or "embedded-n3000-s0-px128-efficientnet-lite0-px128" with features."""
    features = f"-{image_features}" if image_features else ""
    return ProductCatalogConfig(
        name=f"embedded-n{num_products}-s{seed}-px{image_size}{features}",
        description=f"{num_products} generated products (seed {seed}, {image_size}px images"
                    f"{', features ' + image_features if image_features else ''})",
        num_products=num_products, seed=seed, image_size=image_size, image_features=image_features)


def embedded_config_from_name(name: str) -> ProductCatalogConfig | None:
    """The embedded catalog config a name like "embedded-n3000-s0-px128" stands for, else None."""
    match = re.fullmatch(r"embedded-n(\d+)-s(\d+)-px(\d+)(?:-(.+-px\d+))?", name)
    if not match:
        return None
    return embedded_config(*map(int, match.groups()[:3]), image_features=match.group(4))


def jsonl_sources(specs: str | Sequence[str]) -> tuple[tuple[str, str | None], ...]:
    """Catalog files as `data convert --jsonl` names them -> ((path, split or None), ...): each spec
    a path or a glob, optionally `SPLIT=` first ("test=shop_test.jsonl") for the records of those
    files that name no split themselves. FileNotFoundError for a spec that names no file."""
    sources = []
    for spec in [specs] if isinstance(specs, str) else specs:
        split, _, pattern = spec.partition("=")
        if split not in records.SPLITS:  # no split given: the whole spec is the file or glob
            split, pattern = None, spec
        pattern = os.path.expanduser(pattern)
        paths = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern))
        if not paths:
            raise FileNotFoundError(f"no catalog file {pattern}")
        sources += [(path, split) for path in paths]
    if len({path for path, _ in sources}) < len(sources):
        raise records.ConversionError(f"a catalog file is named twice: "
                                      f"{', '.join(path for path, _ in sources)}")
    return tuple(sources)


def jsonl_config(name: str, jsonl: str | Sequence[str], images_dir: str | None = None, *,
                 validation_fraction: float = 0.05, test_fraction: float = 0.05,
                 on_error: str = "fail", image_features: str | None = None,
                 allow_absolute_image_paths: bool = False,
                 max_image_side: int = records.MAX_IMAGE_SIDE) -> ProductCatalogConfig:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    sources = jsonl_sources(jsonl)
    return ProductCatalogConfig(name=name, description="converted from " + ", ".join(
                                    path for path, _ in sources), jsonl=sources,
                                images_dir=images_dir, validation_fraction=validation_fraction,
                                test_fraction=test_fraction, on_error=on_error,
                                image_features=image_features,
                                allow_absolute_image_paths=allow_absolute_image_paths,
                                max_image_side=max_image_side)


FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "title": tfds.features.Text(),
    # Encoded JPEG/PNG bytes, b"" for a product without an image. Decoding and resizing happen in the
    # input pipeline, at the size the model's representator wants.
    "image": tfds.features.Tensor(shape=(), dtype=tf.string),
    "description": tfds.features.Text(),
    "bullet_points": tfds.features.Sequence(tfds.features.Text()),
    "product_type": tfds.features.Text(),
    # attributes as two parallel lists, sorted by name: a tf.Example has no map type.
    "attribute_names": tfds.features.Sequence(tfds.features.Text()),
    "attribute_values": tfds.features.Sequence(tfds.features.Text()),
})


def catalog_features(spec: str | None) -> tfds.features.FeaturesDict:
    """A stored example's features: `FEATURES`, and with an extractor spec `image_features`
    float16 `[Lv, D]`."""
    if spec is None:
        return FEATURES
    shape = image_spec.feature_shape(image_spec.preprocessing(spec))
    return tfds.features.FeaturesDict({
        **FEATURES, "image_features": tfds.features.Tensor(shape=shape, dtype=tf.float16)})


def stored_features_spec(directory: str) -> str | None:
    """The extractor spec of the image features stored in a written catalog's version directory
    (`.../product_catalog/<name>/1.0.0`), as its metadata records it; None for a catalog without
    features, a directory that holds no catalog, or a catalog written before the spec was recorded."""
    if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
        return None
    return (tfds.builder_from_directory(directory).info.metadata or {}).get(IMAGE_FEATURES)


class ProductCatalog(tfds.core.GeneratorBasedBuilder):
    """Products with an image, a title, texts, a type and named attributes (see records.py)."""
    VERSION = tfds.core.Version(VERSION)
    # No registered configs: every catalog is written with its own config object (`prepare`) and
    # read back by name from its directory.
    BUILDER_CONFIG_CLS = ProductCatalogConfig

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=catalog_features(self.builder_config.image_features), supervised_keys=None,
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded: catalogs come from local files or the generator
        config = self.builder_config
        self.info.metadata[ATTRIBUTES] = {}
        if config.image_features is not None:
            self.info.metadata[IMAGE_FEATURES] = config.image_features
        if config.jsonl is None:
            return {split: self._generate_examples(
                        (catalog.make_product(i, config.seed, config.image_size) for i in indices),
                        split)
                    for split, indices in _embedded_indices_by_split(config).items()}
        lines_by_split, skipped = _validate_jsonl(config)
        self.info.metadata["skipped_records"] = skipped
        self.info.metadata["source"] = [os.path.abspath(path) for path, _ in config.jsonl]
        # A split with no products is left out: TFDS cannot write an empty split.
        return {split: self._generate_examples(self._jsonl_products(lines), split)
                for split, lines in lines_by_split.items()}

    def _generate_examples(self, products: Iterator[records.Product], split: str):
        products = _counting_attributes(products, self.info.metadata[ATTRIBUTES], split)
        spec = self.builder_config.image_features
        if spec is None:
            for product in products:
                yield product.id, product.to_features()
            return
        options = image_spec.preprocessing(spec)
        products = iter(products)
        for chunk in iter(lambda: list(itertools.islice(products, extractors.BATCH_SIZE)), []):
            features, _ = extractors.extract_from_bytes([p.image for p in chunk], options)
            for product, vectors in zip(chunk, features.astype("float16")):
                yield product.id, {**product.to_features(), "image_features": vectors}

    def _jsonl_products(self, lines: list[tuple[int, int]]) -> Iterator[records.Product]:
        """The products at `lines`, (index of the file in `jsonl`, line number) pairs."""
        wanted = set(lines)
        config = self.builder_config
        for index, (path, _) in enumerate(config.jsonl):
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, start=1):
                    if (index, line_no) in wanted:
                        yield records.parse_record(raw, line_no, config.images_dir,
                                                   **_image_reading(config))[0]


def _counting_attributes(products: Iterator[records.Product], counts: dict, split: str
                         ) -> Iterator[records.Product]:
    """`products`, counting into `counts` (the metadata's ATTRIBUTES) as they pass."""
    for product in products:
        for name, value in product.attributes.items():
            entry = counts.setdefault(name, {"products": {}, "values": {}})
            entry["products"][split] = entry["products"].get(split, 0) + 1
            entry["values"][value] = entry["values"].get(value, 0) + 1
        yield product


def catalog_attributes(data_dir: str, name: str) -> dict[str, dict] | None:
    """The attributes a written catalog names, as its metadata records them: `{attribute:
    {"products": {split: count}, "values": {value: count}}}`, in the catalog's spelling; None for a
    catalog written before they were recorded."""
    directory = os.path.join(os.path.expanduser(data_dir), NAME, name, VERSION)
    if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
        raise FileNotFoundError(f"no catalog {name!r} under {data_dir} (looked for {directory}; "
                                "write it with `mmt-jax data convert --out DIR --name NAME`)")
    return (tfds.builder_from_directory(directory).info.metadata or {}).get(ATTRIBUTES)


def _image_reading(config: ProductCatalogConfig) -> dict:
    """The config's settings for `records.parse_record`, the same when checking and when writing."""
    return {"allow_absolute_image_paths": config.allow_absolute_image_paths,
            "max_image_side": config.max_image_side}


def _validate_jsonl(config: ProductCatalogConfig
                    ) -> tuple[dict[str, list[tuple[int, int]]], list[dict]]:
    """Checks every line of every file once; returns the good lines per split, as (index of the
    file, line number), and the skipped records. A record's own `split` wins over its file's.

    Raises ConversionError listing the bad records (with their file, when there are several) when
    `on_error` is "fail".
    """
    from tqdm.auto import tqdm
    several = len(config.jsonl) > 1
    lines_by_split = collections.defaultdict(list)
    bad, first_seen = [], {}  # bad: (file, RecordError); first_seen: id -> where it was first

    for index, (path, file_split) in enumerate(config.jsonl):
        where = f"{path} line " if several else "line "
        with open(path, "rb") as f:
            for line_no, raw in enumerate(tqdm(f, desc=f"checking {path}", unit=" records",
                                               disable=None), start=1):  # None: off a terminal
                if not raw.strip():
                    continue
                try:
                    product, split = records.parse_record(raw, line_no, config.images_dir,
                                                          **_image_reading(config))
                    if product.id in first_seen:
                        raise records.RecordError(line_no, product.id, "id",
                                                  f"duplicate of {first_seen[product.id]}")
                except records.RecordError as e:
                    bad.append((path, e))
                    continue
                first_seen[product.id] = f"{where}{line_no}"
                split = split or file_split or records.split_of(
                    product.id, config.validation_fraction, config.test_fraction)
                lines_by_split[split].append((index, line_no))
    files = ", ".join(path for path, _ in config.jsonl)
    if bad and config.on_error == "fail":
        shown = "\n  ".join(f"{path}: {e}" if several else str(e) for path, e in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise records.ConversionError(f"{files}: {len(bad)} bad record(s); nothing was written "
                                      f"(pass on_error='skip' / --on-error skip to leave them "
                                      f"out):\n  {shown}{more}")
    if not first_seen:
        raise records.ConversionError(f"{files}: no valid records")
    skipped = [{"file": path, "line": e.line, "id": e.record_id, "field": e.field,
                "reason": e.reason} for path, e in bad]
    return lines_by_split, skipped


def prepare(config: ProductCatalogConfig, data_dir: str, *, num_shards: int | None = None,
            overwrite: bool = False) -> tfds.core.DatasetBuilder:
    """Writes the catalog under `data_dir` (reusing a finished one unless `overwrite`); no network.

    `num_shards` files per split (None: by size); for the embedded catalog it is capped at the
    smallest split's size, as TFDS cannot write an empty file.

    The catalog is built whole in a hidden staging directory beside it
    (`<data_dir>/.product_catalog-<name>.incomplete-*`, the same filesystem) and renamed into place
    only when every split is written. So a conversion that fails (a bad record, an exception, Ctrl-C)
    leaves no folders of its own behind, and with `overwrite` the existing catalog stays as it was,
    readable, until the new one replaces it.
    """
    if num_shards and config.jsonl is None:
        num_shards = max(1, min(num_shards, *map(len, _embedded_indices_by_split(config).values())))
    builder = ProductCatalog(config=config, data_dir=data_dir)
    final = os.fspath(builder.data_path)  # <data_dir>/product_catalog/<name>/<version>
    _restore_replaced(data_dir, config.name, final)
    if os.path.isdir(final) and not overwrite:
        with _without_tfds_notices():
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
                try_download_gcs=False))
        return builder
    created_data_dir = not os.path.isdir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=_staging_prefix(config.name), dir=data_dir)
    try:
        staged = ProductCatalog(config=config, data_dir=staging)
        with _without_tfds_notices():
            staged.download_and_prepare(download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
                try_download_gcs=False, num_shards=num_shards))
        _swap_in(os.fspath(staged.data_path), final, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_data_dir and not os.listdir(data_dir):
            os.rmdir(data_dir)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return ProductCatalog(config=config, data_dir=data_dir)  # reads the catalog in its place


def _without_tfds_notices():
    """tensorflow-datasets prints "Downloading and preparing dataset Unknown size ..." to stdout
    around a build, naming the staging folder: nothing is downloaded, and `summary` says where the
    catalog is."""
    return contextlib.redirect_stdout(io.StringIO())


def _staging_prefix(name: str) -> str:
    return f".{NAME}-{name}.incomplete-"


def _restore_replaced(data_dir: str, name: str, final: str) -> None:
    """Puts back a catalog that `_swap_in` had moved aside when a hard kill (no handler runs) struck
    between its two renames, and removes staging folders that such kills left."""
    if not os.path.isdir(data_dir):
        return
    for entry in sorted(os.listdir(data_dir)):
        if not entry.startswith(_staging_prefix(name)):
            continue
        staging = os.path.join(data_dir, entry)
        replaced = os.path.join(staging, "replaced")
        if os.path.isdir(replaced) and not os.path.exists(final):
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(replaced, final)
            print(f"restored catalog {final}, which an interrupted replacement had left in {staging}")
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(new: str, final: str, staging: str) -> None:
    """Renames the finished catalog `new` to `final`; an existing `final` first moves into `staging`
    (deleted with it) and is moved back if the second rename fails or is interrupted."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    old = None
    if os.path.isdir(final):
        old = os.path.join(staging, "replaced")
        os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        if old is not None and not os.path.exists(final):
            os.rename(old, final)
        raise


def _embedded_indices_by_split(config: ProductCatalogConfig) -> dict[str, list[int]]:
    """Which products of the embedded catalog go to which split (from their ids' hashes)."""
    indices = collections.defaultdict(list)
    for index in range(config.num_products):
        indices[records.split_of(catalog.product_id(index, config.seed), config.validation_fraction,
                                 config.test_fraction)].append(index)
    return indices


def summary(builder: tfds.core.DatasetBuilder) -> str:
    """Counts per split and the skipped records, for the converter's closing message."""
    counts = {name: info.num_examples for name, info in builder.info.splits.items()}
    splits = ", ".join(f"{name} {counts[name]}" for name in records.SPLITS if name in counts)
    skipped = builder.info.metadata.get("skipped_records", []) if builder.info.metadata else []
    lines = [f"catalog {builder.data_dir}: {splits} products"]
    if skipped:
        lines.append(f"skipped {len(skipped)} bad record(s) (listed in metadata.json):")
        several = len(builder.info.metadata.get("source", [])) > 1
        lines += [f"  {r['file'] + ' ' if several else ''}line {r['line']}, record {r['id']!r}: "
                  f"{r['field'] or 'line'}: {r['reason']}" for r in skipped[:20]]
    return "\n".join(lines)


def tfds_name(config_name: str) -> str:
    """The name seqio.TfdsDataSource takes for a catalog config."""
    return f"{NAME}/{config_name}:{VERSION}"


