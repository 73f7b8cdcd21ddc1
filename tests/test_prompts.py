"""Task examples built from stored products: attribute prompts with value removal, titles, balanced
matching and multi-source QA records; image decoding and the multimodal feature converter."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from mmt_jax import image_spec
from mmt_jax.data import feature_converter, images, prompts, records
from mmt_jax.data import vocabulary as vocab_lib


def _stored(i, title, attributes, image=b""):
    return records.Product(id=f"p{i}", title=title, image=image, description=f"Description {i}.",
                           bullet_points=("soft", "warm"), product_type="shirt",
                           attributes=attributes).to_features()


def _dataset(products):
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.ragged.constant([p[k] for p in products]) if isinstance(products[0][k], list)
         else [p[k] for p in products] for k in products[0]}).map(
        lambda ex: {k: v.to_tensor() if isinstance(v, tf.RaggedTensor) else v for k, v in ex.items()})


def _decode(dataset, keys=("inputs", "targets")):
    return [{k: ex[k].decode() for k in keys} for ex in dataset.as_numpy_iterator()]


@pytest.mark.parametrize("title, words, expected", [
    ("Acme navy blue cotton long sleeve shirt", "navy blue", "Acme cotton long sleeve shirt"),
    ("Acme Navy Blue shirt, navy blue trim", "navy blue", "Acme shirt, trim"),
    ("Bluestone blue shirt", "blue", "Bluestone shirt"),  # whole words only
    ("Red shirt", "red", "shirt"),
    ("A (c+) shirt", "(c+)", "A shirt"),
    ("red red shirt", "red", "shirt"),
    ("A c++ shirt", "c++", "A shirt"),
])
def test_remove_words_removes_whole_words_case_insensitively(title, words, expected):
    assert prompts.remove_words(tf.constant(title), tf.constant(words)).numpy().decode() == expected


def test_attribute_examples_remove_the_drawn_share_of_values():
    products = [_stored(i, f"Brand{i} red cotton shirt", {"color": "red", "material": "cotton"})
                for i in range(400)] + [_stored(400, "A mug", {"material": "ceramic"})]
    ds = _dataset(products)
    full = _decode(prompts.attribute_examples(ds, "color", removal_share=0.0))
    gone = _decode(prompts.attribute_examples(ds, "color", removal_share=1.0))
    some = _decode(prompts.attribute_examples(ds, "color", removal_share=0.2))
    assert len(full) == 400  # the mug has no colour and makes no example
    assert full[3] == {"inputs": "Brand3 red cotton shirt color:", "targets": "red"}
    assert gone[3] == {"inputs": "Brand3 cotton shirt color:", "targets": "red"}
    removed = [ex["inputs"] for ex in some if " red " not in ex["inputs"]]
    assert 0.14 < len(removed) / 400 < 0.26
    again = _decode(prompts.attribute_examples(ds, "color", removal_share=0.2))
    assert again == some  # the same titles every time
    # The material task is unaffected by colour removal and covers the mug.
    material = _decode(prompts.attribute_examples(ds, "material", removal_share=1.0))
    assert material[-1] == {"inputs": "A mug material:", "targets": "ceramic"}
    assert material[0]["inputs"] == "Brand0 red shirt material:"


def test_attribute_removal_removes_exactly_the_value_tokens():
    vocab = vocab_lib.vocabulary()
    title = "Northwind light blue striped long sleeve linen shirt for women"
    for value in ("light blue", "striped", "long sleeve", "linen"):
        ds = _dataset([_stored(0, title, {"attr": value})])
        (ex,) = _decode(prompts.attribute_examples(ds, "attr", removal_share=1.0))
        before = vocab.encode(title)
        after = vocab.encode(ex["inputs"].removesuffix(" attr:"))
        value_tokens = vocab.encode(value)
        assert len(before) == len(after) + len(value_tokens)
        starts = [i for i in range(len(before)) if before[i:i + len(value_tokens)] == value_tokens]
        assert any(before[:i] + before[i + len(value_tokens):] == after for i in starts), value


def test_matching_is_balanced_with_negatives_from_other_products():
    titles = [f"title {i}" for i in range(9)] + ["title 8"]  # last pair has equal titles: dropped
    ds = _dataset([_stored(i, t, {}, image=f"img{i}".encode()) for i, t in enumerate(titles)])
    examples = list(prompts.matching_examples(ds).as_numpy_iterator())
    answers = [ex["targets"].decode() for ex in examples]
    assert len(examples) == 16 and answers.count("yes") == answers.count("no") == 8
    for ex in examples:
        shown = ex["inputs"].decode().removesuffix(" match:")
        own = titles[int(ex["image"].decode()[3:])]
        assert (shown == own) == (ex["targets"] == b"yes")
        # the contrastive head's pair: the shown title, labelled as the answer says
        assert ex["pair_text"].decode() == shown and ex["pair_label"] == [ex["targets"] == b"yes"]


def test_title_and_question_answering_examples():
    product = _stored(0, "Acme red shirt", {"color": "red", "brand": "Acme", "size": "M"})
    (title,) = _decode(prompts.title_examples(_dataset([product])))
    assert title == {"inputs": "title:", "targets": "Acme red shirt"}
    attribute = next(prompts.attribute_examples(_dataset([product]), "color", 1.0)
                     .as_numpy_iterator())
    assert attribute["inputs"] == b"Acme shirt color:"  # the value is gone from the prompt only:
    assert attribute["pair_text"] == b"Acme red shirt" and attribute["pair_label"] == [1]
    qa = _decode(prompts.question_answering_examples(_dataset([product]), "color", 0.0),
                 keys=("question", "inputs", "targets"))
    assert qa == [{"question": "color", "targets": "red",
                   "inputs": "Acme red shirt Description 0. soft warm shirt"}]
    (removed,) = _decode(prompts.question_answering_examples(_dataset([product]), "color", 1.0),
                         keys=("inputs",))
    assert removed == {"inputs": "Acme shirt Description 0. soft warm shirt"}


def test_image_preprocessing_resizes_normalises_and_marks_missing_images():
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:, :30] = 255  # left half white
    png = records.encode_image(pixels, "PNG")
    stretch = image_spec.ImagePreprocessing(size=8)
    image, mask = images.decode_and_resize(tf.constant(png), stretch)
    assert image.shape == (8, 8, 3) and int(mask) == 1
    np.testing.assert_allclose(image[:, 0], 1.0, atol=1e-6)  # (255 - 127.5) / 127.5
    np.testing.assert_allclose(image[:, -1], -1.0, atol=1e-6)
    crop = image_spec.ImagePreprocessing(size=8, resize="center_crop", crop_fraction=1.0)
    image, _ = images.decode_and_resize(tf.constant(png), crop)  # central 30x30: the middle
    np.testing.assert_allclose(image[:, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(image[:, -1], -1.0, atol=1e-6)
    image, mask = images.decode_and_resize(tf.constant(b""), stretch)
    assert int(mask) == 0 and not np.any(image)
    augment = image_spec.ImagePreprocessing(size=8, augment=True)
    a = images.decode_and_resize(tf.constant(png), augment, tf.constant([1, 2]))[0]
    b = images.decode_and_resize(tf.constant(png), augment, tf.constant([1, 2]))[0]
    np.testing.assert_array_equal(a, b)


def test_feature_converter_builds_the_multimodal_batch_and_refuses_packing():
    ds = tf.data.Dataset.from_tensor_slices({
        "inputs": tf.ragged.constant([[5, 6, 1], [7, 1]]), "targets": tf.ragged.constant([[8, 1], [9, 9, 1]]),
        "image": tf.ones((2, 4, 4, 3)), "image_mask": [[1], [0]], "id": ["a", "b"]}).map(
        lambda ex: {**ex, "inputs": ex["inputs"], "targets": ex["targets"]})
    converter = feature_converter.MultimodalEncDecFeatureConverter(pack=False)
    out = list(converter(ds, {"inputs": 4, "targets": 3}).as_numpy_iterator())
    assert sorted(out[0]) == sorted(["encoder_input_tokens", "decoder_input_tokens",
                                     "decoder_target_tokens", "decoder_loss_weights",
                                     "encoder_images", "encoder_image_mask", "pair_text_tokens",
                                     "pair_label"])
    np.testing.assert_array_equal(out[0]["encoder_input_tokens"], [5, 6, 1, 0])
    np.testing.assert_array_equal(out[1]["decoder_input_tokens"], [0, 9, 9])
    np.testing.assert_array_equal(out[0]["decoder_loss_weights"], [1, 1, 0])
    assert out[0]["encoder_images"].shape == (4, 4, 3)
    assert [o["encoder_image_mask"] for o in out] == [1, 0]
    # a task without a contrastive pair: an empty text, labelled "no pair"
    assert [o["pair_label"] for o in out] == [0, 0] and not np.any(out[0]["pair_text_tokens"])
    paired = ds.map(lambda ex: {**ex, "pair_text": tf.constant([3, 4, 5, 6, 1]),
                                "pair_label": tf.constant([1])})
    out = list(converter(paired, {"inputs": 4, "targets": 3}).as_numpy_iterator())
    np.testing.assert_array_equal(out[0]["pair_text_tokens"], [3, 4, 5, 6])  # cut as inputs are
    assert out[0]["pair_label"] == 1
    assert converter.get_model_feature_lengths(
        {"inputs": 4, "targets": 3, "image": 4, "image_mask": 1})["pair_text_tokens"] == 4
    with pytest.raises(ValueError, match="cannot pack"):
        feature_converter.MultimodalEncDecFeatureConverter(pack=True)
    with pytest.raises(ValueError, match="preprocess_images"):
        converter(ds.map(lambda ex: {k: v for k, v in ex.items() if k != "image"}),
                  {"inputs": 4, "targets": 3})
    assert isinstance(converter, seqio.EncDecFeatureConverter)


def test_text_sources_join_the_fields_the_predictor_joins():
    """Every text source of `prompts.TEXT_SOURCES`, as the QA tasks build it (tf) and as the
    Predictor builds it for a new product (Python): the same text, so a product is read the same
    in training and in inference."""
    from mmt_jax.predictor import Query
    product = records.Product(id="p1", title="Acme  red shirt", description="Soft  cotton.",
                              bullet_points=("Machine wash", "Brand: Acme"), product_type="shirt",
                              attributes={"color": "red"})
    names = tuple(prompts.TEXT_SOURCES)
    example = next(prompts.question_answering_examples(
        _dataset([product.to_features()]), "color", removal_share=0.0,
        text_sources=names).as_numpy_iterator())
    query = Query("p1", "color:", product.title, product.description,
                  bullet_points=product.bullet_points, product_type=product.product_type)
    built = {names[0]: example["inputs"], **{name: example[name] for name in names[1:]}}
    assert {name: text.decode() for name, text in built.items()} == {
        name: query.source_text(name) for name in names}
    assert query.source_text("context") == "Acme red shirt Soft cotton. Machine wash Brand: Acme shirt"
