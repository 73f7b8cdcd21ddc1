"""The registered SeqIO tasks over a small embedded catalog, run through the feature converters."""
import os
import numpy as np
import pytest
import seqio

from mmt_jax import tasks
from mmt_jax.errors import UnknownTaskError
from mmt_jax import image_spec
from mmt_jax.data import feature_converter, preprocessors, tfds_catalog
from mmt_jax.data import vocabulary as vocab_lib

LENGTHS = {"inputs": 48, "targets": 24}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = tfds_catalog.embedded_config(num_products=240, seed=3, image_size=64)
    tfds_catalog.prepare(config, data_dir, num_shards=2)
    names = tasks.register_catalog_tasks(
        "test_catalog", data_dir, config.name,
        image=image_spec.ImagePreprocessing(size=32))
    return names


def _batch(task_name, converter_cls, split="train", n=8):
    ds = seqio.get_dataset(task_name, LENGTHS, dataset_split=split, shuffle=False, seed=0,
                           feature_converter=converter_cls(pack=False))
    return next(ds.batch(n).as_numpy_iterator())


def test_every_task_and_mixture_is_registered(registered):
    for name in ("test_catalog_pretrain", "test_catalog_pretrain_text", "test_catalog_color_removed20",
                 "test_catalog_attributes_removed100_text", "test_catalog_title", "test_catalog_match",
                 "test_catalog_qa_removed100", "test_catalog_qa_color_removed20",
                 "test_catalog_sleeve_type_removed0"):
        assert name in registered
        assert seqio.get_mixture_or_task(name)
    assert "test_catalog_match_text" not in registered
    multitask = {t.name for t in seqio.get_mixture_or_task("test_catalog_multitask_removed100").tasks}
    assert multitask == {f"test_catalog_{a}_removed100" for a in tasks.DEFAULT_ATTRIBUTES} | {
        "test_catalog_title", "test_catalog_match"}
    text_twin = {t.name for t in seqio.get_mixture_or_task(
        "test_catalog_multitask_removed100_text").tasks}
    assert text_twin == {f"{name}_text" for name in multitask - {"test_catalog_match"}}
    for suffix in ("", "_text"):
        with_titles = {t.name for t in seqio.get_mixture_or_task(
            f"test_catalog_pretrain_titles{suffix}").tasks}
        assert with_titles == {f"test_catalog_{objective}{suffix}"
                               for objective in ("span_corruption", "mlm", "title")}


def test_multimodal_tasks_give_the_model_batch(registered):
    vocab = vocab_lib.vocabulary()
    batch = _batch("test_catalog_color_removed100", feature_converter.MultimodalEncDecFeatureConverter)
    assert batch["encoder_input_tokens"].shape == (8, 48)
    assert batch["encoder_images"].shape == (8, 32, 32, 3)
    assert batch["encoder_images"].min() >= -1 and batch["encoder_images"].max() <= 1
    assert (batch["encoder_image_mask"] == 1).all()
    prompt = vocab.decode(batch["encoder_input_tokens"][0].tolist())
    answer = vocab.decode(batch["decoder_target_tokens"][0].tolist())
    assert prompt.endswith("color:") and answer and answer not in prompt.lower().split()
    text = _batch("test_catalog_color_removed0_text", seqio.EncDecFeatureConverter)
    assert "encoder_images" not in text
    # Title generation sees only the prompt and the image; the contrastive pair is the title.
    title = _batch("test_catalog_title", feature_converter.MultimodalEncDecFeatureConverter)
    assert vocab.decode(title["encoder_input_tokens"][0].tolist()) == "title:"
    assert vocab.decode(title["pair_text_tokens"][0].tolist()) == vocab.decode(
        title["decoder_target_tokens"][0].tolist()) and (title["pair_label"] == 1).all()


def test_pretraining_tasks_corrupt_the_text(registered):
    vocab = vocab_lib.vocabulary()
    mask_id = preprocessors.extra_id(vocab.vocab_size, preprocessors.MASK_EXTRA_ID)
    mlm = _batch("test_catalog_mlm", feature_converter.MultimodalEncDecFeatureConverter)
    targets = mlm["decoder_target_tokens"]
    inputs = mlm["encoder_input_tokens"][:, :targets.shape[1]]  # the text was cut to fit both
    assert not mlm["encoder_input_tokens"][:, targets.shape[1]:].any()
    real = targets > 0
    assert ((inputs == mask_id) == (real & (inputs != targets))).all()
    text_tokens = real.sum(1) - 1  # without EOS
    np.testing.assert_array_equal((inputs == mask_id).sum(1), np.round(text_tokens * 0.3))
    span = _batch("test_catalog_span_corruption", feature_converter.MultimodalEncDecFeatureConverter)
    for inputs, targets in zip(span["encoder_input_tokens"], span["decoder_target_tokens"]):
        inputs, targets = inputs[inputs > 0][:-1], targets[targets > 0][:-1]  # drop pad and EOS
        text = vocab.decode(preprocessors.reconstruct_span_corruption(
            inputs, targets, vocab.vocab_size).tolist())
        assert len(text.split()) > 3


def test_matching_task_is_balanced(registered):
    vocab = vocab_lib.vocabulary()
    ds = seqio.get_mixture_or_task("test_catalog_match").get_dataset(
        LENGTHS, split="train", shuffle=False)
    answers = [vocab.decode(ex["targets"].tolist()) for ex in ds.as_numpy_iterator()]
    assert set(answers) == {"yes", "no"} and answers.count("yes") == answers.count("no")


def test_question_answering_records_carry_question_context_and_image(registered):
    """MoEMoE's records: the question, the context without the value (removed100, as the attribute
    task's title), the image; its converter pads the question to the context's length."""
    vocab = vocab_lib.vocabulary()
    name = "test_catalog_qa_color_removed100"
    qa = next(seqio.get_mixture_or_task(name).get_dataset(
        LENGTHS, split="train", shuffle=False).as_numpy_iterator())
    prompt = next(seqio.get_mixture_or_task("test_catalog_color_removed100").get_dataset(
        LENGTHS, split="train", shuffle=False).as_numpy_iterator())
    assert qa["question_pretokenized"] == b"color" and qa["id"] == prompt["id"]
    value = qa["targets_pretokenized"].decode()
    context = qa["inputs_pretokenized"].decode()
    assert value and value.lower() not in context.lower() and len(context.split()) > 5
    assert context.startswith(prompt["inputs_pretokenized"].decode().removesuffix(" color:"))
    assert qa["image"].shape == (32, 32, 3) and qa["image_mask"].tolist() == [1]
    batch = _batch(name, feature_converter.multi_source_converter(False))
    assert batch["encoder_question_tokens"].shape == batch["encoder_input_tokens"].shape == (8, 48)
    np.testing.assert_array_equal(batch["encoder_question_tokens"][:, :2],
                                  [vocab.encode("color") + [1]] * 8)
    assert not batch["encoder_question_tokens"][:, 2:].any()
    assert batch["encoder_images"].shape == (8, 32, 32, 3)


def test_question_answering_with_several_text_sources(registered):
    """`qa_text_sources=("title", "details")` (MoEMoE with three sources): `inputs` is the title
    without the value, `details` the other text fields, both as the one-context task has them; the
    converter pads (and cuts, keeping EOS) `details` to the length of `inputs`; a model reading
    other text sources than the task's is refused, as is a source name the tasks do not know."""
    from mmt_jax.errors import InputError
    record = tasks.catalog_task_record("test_catalog_title")
    data_dir, catalog = record["data_dir"], record["catalog"]
    names = tasks.register_catalog_tasks("test_split", data_dir, catalog,
                                         image=image_spec.ImagePreprocessing(size=32),
                                         removal_shares=(1.0,),
                                         qa_text_sources=("title", "details"))
    assert "test_split_qa_removed100" in names
    name = "test_split_qa_color_removed100"
    split = next(seqio.get_mixture_or_task(name).get_dataset(
        LENGTHS, split="train", shuffle=False).as_numpy_iterator())
    context = next(seqio.get_mixture_or_task("test_catalog_qa_color_removed100").get_dataset(
        LENGTHS, split="train", shuffle=False).as_numpy_iterator())
    assert split["id"] == context["id"] and split["question_pretokenized"] == b"color"
    title, details = (split[k].decode() for k in ("inputs_pretokenized", "details_pretokenized"))
    assert f"{title} {details}" == context["inputs_pretokenized"].decode()
    assert split["targets_pretokenized"].decode() not in title.lower()
    converter = feature_converter.multi_source_converter(False, ("details",))
    batch = _batch(name, converter)
    assert batch["encoder_details_tokens"].shape == batch["encoder_input_tokens"].shape == (8, 48)
    short = next(seqio.get_dataset(name, {"inputs": 12, "targets": 8}, dataset_split="train",
                                   shuffle=False, feature_converter=converter(pack=False))
                 .as_numpy_iterator())
    vocab = vocab_lib.vocabulary()
    full = vocab.encode(details)
    assert len(full) > 12 and short["encoder_details_tokens"].tolist() == full[:11] + [1]
    tasks.check_text_sources(name, ("title", "details"))
    tasks.check_text_sources("test_catalog_qa_removed100", ("context",))
    tasks.check_text_sources("test_catalog_title", ("title", "details"))  # not a QA task
    with pytest.raises(InputError, match="gives the text sources .'title', 'details'., the model "
                                         "reads .'context'."):
        tasks.check_text_sources("test_split_qa_removed100", ("context",))
    with pytest.raises(ValueError, match="qa_text_sources=.'title', 'bullets'."):
        tasks.register_catalog_tasks("test_bad", data_dir, catalog,
                                     qa_text_sources=("title", "bullets"))


def test_pipeline_is_deterministic_given_a_seed(registered):
    def first(seed):
        ds = seqio.get_mixture_or_task("test_catalog_span_corruption").get_dataset(
            LENGTHS, split="train", shuffle=True, seed=seed)
        return [ex["inputs"].tolist() for ex in ds.take(5).as_numpy_iterator()]
    assert first(1) == first(1)
    assert first(1) != first(2)
    batches = [_batch("test_catalog_match", feature_converter.MultimodalEncDecFeatureConverter)
               for _ in range(2)]
    for key in batches[0]:
        np.testing.assert_array_equal(batches[0][key], batches[1][key])


def train_stand_in(mixture_or_task_name):
    """What a train binary does with the gin-bound task name (here: return it)."""
    return mixture_or_task_name


def test_gin_names_a_user_catalog_task_and_registers_it_once(tmp_path):
    import gin
    from mmt_jax import main
    out = str(tmp_path / "tfds")
    assert main.run(["data", "generate", "--out", out, "--num-products", "40", "--image-size", "32",
                     "--num-shards", "1"]) == 0
    config = f"""
from __gin__ import dynamic_registration
from mmt_jax import tasks
import tests.test_tasks as this_test
this_test.train_stand_in.mixture_or_task_name = @tasks.catalog_task()
tasks.catalog_task.task = "attributes_removed20"
tasks.catalog_task.prefix = "gin_shop"
tasks.catalog_task.data_dir = "{out}"
tasks.catalog_task.catalog = "embedded-n40-s0-px32"
"""
    gin.clear_config()
    with gin.unlock_config():
        gin.parse_config(config)
        try:
            configured = gin.get_configurable(train_stand_in)
            assert configured() == "gin_shop_attributes_removed20"
            assert seqio.get_mixture_or_task("gin_shop_attributes_removed20").get_dataset(
                LENGTHS, split="train", shuffle=False).take(1).cardinality() != 0
            # Registered once: asking again is fine, asking with other arguments is an error.
            assert tasks.catalog_task("title", "gin_shop", out, "embedded-n40-s0-px32") == "gin_shop_title"
            with pytest.raises(ValueError, match="registered with"):
                tasks.catalog_task("title", "gin_shop", out, "embedded-n40-s0-px32", with_description=True)
            with pytest.raises(UnknownTaskError, match="no catalog task 'colour_removed20'"):
                tasks.catalog_task("colour_removed20", "gin_shop", out, "embedded-n40-s0-px32")
        finally:
            gin.clear_config()


@pytest.mark.parametrize("task", ["test_catalog_color_removed100", "test_catalog_match",
                                  "test_catalog_span_corruption"])
def test_examples_keep_their_texts_as_written_but_no_second_copy_of_the_image(registered, task):
    """What t5x's infer binary writes beside each prediction (every `*_pretokenized` feature): the
    prompt and answer as text, never the image's pixels or the masks as arrays."""
    example = next(seqio.get_mixture_or_task(task).get_dataset(
        LENGTHS, split="validation", shuffle=False).as_numpy_iterator())
    copies = {k for k in example if k.endswith("_pretokenized")}
    assert "targets_pretokenized" in copies  # span corruption makes its inputs from the text
    assert all(isinstance(example[k], bytes) for k in copies), copies
    assert example["image"].shape == (32, 32, 3)


@pytest.mark.parametrize("task, prompt", [("test_catalog_color_removed0", "color:"),
                                          ("test_catalog_match", "match:")])
def test_an_over_long_title_loses_its_end_not_the_prompt(registered, task, prompt):
    """Inputs longer than their length keep the prompt: the text before it is cut, one id is left
    for EOS (seqio's own trim would cut the prompt, at the end)."""
    vocab = vocab_lib.vocabulary()
    lengths = {"inputs": 8, "targets": 8}
    full = next(seqio.get_mixture_or_task(task).get_dataset(
        {"inputs": 512, "targets": 8}, split="train", shuffle=False).as_numpy_iterator())
    assert len(full["inputs"]) > 8  # the test is about a title that does not fit
    short = next(seqio.get_mixture_or_task(task).get_dataset(
        lengths, split="train", shuffle=False).as_numpy_iterator())
    prompt_ids = vocab.encode(prompt)
    assert len(short["inputs"]) == 8 and short["inputs"][-1] == 1  # EOS
    assert short["inputs"][-1 - len(prompt_ids):-1].tolist() == prompt_ids
    assert short["inputs"][:7 - len(prompt_ids)].tolist() == full["inputs"][:7 - len(prompt_ids)].tolist()
    assert vocab.decode(short["inputs"].tolist()).endswith(prompt)


def test_mixtures_keep_the_image(registered):
    batch = _batch("test_catalog_attributes_removed20", feature_converter.MultimodalEncDecFeatureConverter)
    assert batch["encoder_images"].shape == (8, 32, 32, 3) and batch["encoder_images"].any()
    pretrain = _batch("test_catalog_pretrain", feature_converter.MultimodalEncDecFeatureConverter)
    assert (pretrain["encoder_image_mask"] == 1).all()


def test_attribute_names_as_catalogs_spell_them(tmp_path):
    """Catalogs name attributes as people write them; seqio task names allow only word characters.
    Each becomes a task name of its own (`attribute_task_names`), the prompt keeps the name."""
    import json
    from mmt_jax import main
    spelled = {"product type": "t-shirt", "Sleeve Length": "long", "colour/finish": "matte red"}
    with open(tmp_path / "catalog.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"p{i}", "title": f"Acme shirt {i}", "split": "train",
                                "attributes": spelled}) + "\n")
    out = str(tmp_path / "tfds")
    assert main.run(["data", "convert", "--jsonl", str(tmp_path / "catalog.jsonl"), "--out", out,
                     "--name", "spelled"]) == 0
    assert tasks.attribute_task_names(list(spelled)) == {
        "product type": "product_type", "Sleeve Length": "sleeve_length",
        "colour/finish": "colour_finish"}
    # No attributes named: the catalog's own, as its metadata records them.
    assert tasks.catalog_attribute_names(out, "spelled") == tuple(sorted(spelled))
    # A catalog written before the metadata recorded them: its training split is read for them.
    metadata_path = os.path.join(out, "product_catalog", "spelled", "1.0.0", "metadata.json")
    recorded = json.load(open(metadata_path))
    json.dump({k: v for k, v in recorded.items() if k != "attributes"}, open(metadata_path, "w"))
    assert tasks.catalog_attribute_names(out, "spelled") == tuple(sorted(spelled))
    json.dump(recorded, open(metadata_path, "w"))
    names = tasks.register_catalog_tasks("spelled", out, "spelled")
    for attribute, value in spelled.items():
        task = f"spelled_{tasks.attribute_task_names([attribute])[attribute]}_removed0_text"
        assert task in names
        example = next(seqio.get_mixture_or_task(task).get_dataset(
            LENGTHS, split="train", shuffle=False).as_numpy_iterator())
        assert example["inputs_pretokenized"].decode().endswith(f" {attribute}:")
        assert example["targets_pretokenized"].decode() == value
    with pytest.raises(ValueError, match="'Colour' and 'colour' would both be tasks named 'colour'"):
        tasks.attribute_task_names(["Colour", "colour"])

    # A catalog used for matching and titles only: no attribute tasks, the rest as usual.
    names = tasks.register_catalog_tasks("spelled_none", out, "spelled", attributes=())
    assert "spelled_none_match" in names and "spelled_none_title" in names
    assert not any("removed" in name or name.endswith("_qa") for name in names)
    with pytest.raises(UnknownTaskError, match="no catalog task 'attributes_removed100'; "):
        tasks.catalog_task("attributes_removed100", "spelled_none", out, "spelled", attributes=())


def test_the_catalog_metadata_tells_which_tasks_have_examples_as_reading_does(tmp_path):
    """`tasks.has_examples` (what the train binary checks before it repeats a task forever) answers
    from the catalog's metadata as reading the task's first example would, and None where the
    metadata cannot tell (matching, a split the catalog lacks)."""
    import json
    from mmt_jax import main
    with open(tmp_path / "catalog.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"p{i}", "title": f"Acme shirt {i}", "split": "train",
                                "attributes": {"color": "red"}}) + "\n")
        f.write(json.dumps({"id": "t0", "title": "Acme hat", "split": "test",
                            "attributes": {"size": "XL"}}) + "\n")
    out = str(tmp_path / "tfds")
    assert main.run(["data", "convert", "--jsonl", str(tmp_path / "catalog.jsonl"), "--out", out,
                     "--name", "sparse"]) == 0
    tasks.register_catalog_tasks("sparse", out, "sparse", attributes=("color", "size", "fit"),
                                 removal_shares=(0.0,))
    answers = {}
    for task in ("color_removed0_text", "size_removed0_text", "fit_removed0_text",
                 "qa_size_removed0", "title_text", "span_corruption_text", "match"):
        for split in ("train", "test"):
            name = f"sparse_{task}"
            answers[task, split] = tasks.has_examples(name, split)
            if answers[task, split] is not None:
                read = seqio.get_mixture_or_task(name).get_dataset(
                    LENGTHS, split=split, shuffle=False, num_epochs=1)
                assert answers[task, split] == (next(read.as_numpy_iterator(), None) is not None)
    assert answers == {
        ("color_removed0_text", "train"): True, ("color_removed0_text", "test"): False,
        ("size_removed0_text", "train"): False, ("size_removed0_text", "test"): True,
        ("fit_removed0_text", "train"): False, ("fit_removed0_text", "test"): False,
        ("qa_size_removed0", "train"): False, ("qa_size_removed0", "test"): True,
        ("title_text", "train"): True, ("title_text", "test"): True,
        ("span_corruption_text", "train"): True, ("span_corruption_text", "test"): True,
        ("match", "train"): None, ("match", "test"): None}
    assert tasks.has_examples("sparse_title_text", "validation") is None  # no such split


def test_attribute_rates_set_each_attributes_share_of_the_mixtures(tmp_path):
    """`attribute_rates` weights an attribute's task in every mixture over attributes; the sampled
    batches follow it (colour at 3 among five attributes: 3/7 of the examples)."""
    out = str(tmp_path / "tfds")
    config = tfds_catalog.embedded_config(num_products=60, seed=1, image_size=32)
    tfds_catalog.prepare(config, out, num_shards=1)
    tasks.register_catalog_tasks("rated", out, config.name, attribute_rates={"color": 3},
                                 image=image_spec.ImagePreprocessing(size=32))
    for mixture in ("rated_attributes_removed100", "rated_attributes_removed100_text",
                    "rated_multitask_removed100", "rated_qa_removed20"):
        rates = {t.name: seqio.get_mixture_or_task(mixture).get_rate(t)
                 for t in seqio.get_mixture_or_task(mixture).tasks if "_removed" in t.name}
        assert sorted(rates.values()) == [1.0, 1.0, 1.0, 1.0, 3.0]
        assert all(r == 3.0 for n, r in rates.items() if "_color_" in n)
    examples = seqio.get_mixture_or_task("rated_attributes_removed100_text").get_dataset(
        LENGTHS, split="train", shuffle=True, seed=0).take(1400)
    vocabulary = vocab_lib.vocabulary(None)  # mixtures keep the tokens, not the texts
    colour = sum(vocabulary.decode(ex["inputs"].tolist()).endswith("color:")
                 for ex in examples.as_numpy_iterator())
    assert abs(colour / 1400 - 3 / 7) < 0.05  # binomial sd 0.013
    with pytest.raises(ValueError, match="names 'colour', which the tasks do not have"):
        tasks.register_catalog_tasks("rated_typo", out, config.name, attribute_rates={"colour": 3})
    with pytest.raises(ValueError, match=r"attribute_rates\['color'\] is 0"):
        tasks.register_catalog_tasks("rated_zero", out, config.name, attribute_rates={"color": 0})
