"""Stored products -> the text examples of each task (before tokenisation), as seqio preprocessors.

Each function maps a dataset of stored products (`tfds_catalog.FEATURES`) to examples with string
`inputs` and `targets` (plus `question` for MoEMoE's multi-source QA), keeping `id`, `image` and,
in a catalog written with them, the stored `image_features`. Every example also carries the text
paired with its image for the contrastive head (`models/contrastive.py`): `pair_text`, the
product's title (matching: the candidate title), and `pair_label` `[1]`, 1 when that text describes
the image (matching's negatives: 0). The prompts follow the MMT4 paper (section 4): the attribute name and a colon after the title (`... color:`
-> `red`), `title:` for title generation from the image, `match:` -> `yes`/`no` for image-text matching.
"""
import tensorflow as tf

KEEP = ("id", "image", "image_features")
MATCH_PROMPT = "match:"
TITLE_PROMPT = "title:"
# MoEMoE's text sources (`MultiSourceConfig.text_sources`): the product fields each one joins.
TEXT_SOURCES = {"context": ("title", "description", "bullet_points", "product_type"),
                "title": ("title",),
                "details": ("description", "bullet_points", "product_type")}


def attribute_prompt(attribute: str) -> str:
    """The prompt after the text that asks for `attribute`: its name as written and a colon."""
    return f"{attribute}:"


def _keep(example: dict, **features) -> dict:
    """The kept features of a stored product, its title as the text paired with its image, and
    `features`."""
    return {**{k: example[k] for k in KEEP if k in example}, "pair_text": example["title"],
            "pair_label": tf.constant([1], tf.int32), **features}


def attribute_value(example: dict, attribute: str) -> tf.Tensor:
    """The product's value of `attribute`, or "" when it has none. `[]` string."""
    found = tf.equal(example["attribute_names"], attribute)
    values = tf.boolean_mask(example["attribute_values"], found)
    return tf.cond(tf.size(values) > 0, lambda: values[0], lambda: tf.constant(""))


def remove_words(text: tf.Tensor, words: tf.Tensor) -> tf.Tensor:
    """`text` with every case-insensitive occurrence of the phrase `words` that stands between
    non-word characters (or the ends) removed, and the spaces left behind collapsed. Regex
    metacharacters in `words` are taken literally."""
    escaped = tf.strings.regex_replace(words, r"([\\.^$|?*+()\[\]{}])", r"\\\1")
    pattern = tf.strings.join([r"(?i)(^|\W)", escaped, r"(\W|$)"])
    for _ in range(2):  # a second pass catches a repeat that shared its separator with the first
        text = tf.strings.regex_replace(text, pattern, r"\1\2")
    text = tf.strings.regex_replace(text, r"\s+", " ")
    return tf.strings.strip(text)


def removal_drawn(product_id: tf.Tensor, attribute: str, share: float) -> tf.Tensor:
    """Whether this product's title loses its `attribute` value: a fixed draw from the id, so a share
    of 0.2 always strips the same 20% of titles, in every epoch and run (Table 2 of the paper)."""
    bucket = tf.strings.to_hash_bucket_fast(tf.strings.join([product_id, attribute], "/"), 1_000_000)
    return bucket < int(round(share * 1_000_000))


def attribute_examples(dataset: tf.data.Dataset, attribute: str, removal_share: float,
                       with_description: bool = False) -> tf.data.Dataset:
    """Products that have `attribute` -> `inputs` "<title> <attribute>:", `targets` the value.

    `removal_share` of the titles (by id, see `removal_drawn`) have the value's words removed, so the
    image is the only place left to read it from. `with_description` appends the description.
    """
    def has_value(example):
        return tf.strings.length(attribute_value(example, attribute)) > 0

    def to_example(example):
        value = attribute_value(example, attribute)
        title = example["title"]
        title = tf.cond(removal_drawn(example["id"], attribute, removal_share),
                        lambda: remove_words(title, value), lambda: title)
        text = tf.strings.join([title, example["description"]], " ") if with_description else title
        return _keep(example, inputs=tf.strings.join([text, attribute_prompt(attribute)], " "), targets=value)

    return dataset.filter(has_value).map(to_example, num_parallel_calls=tf.data.AUTOTUNE)


def title_examples(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Title generation from the image alone: `inputs` "title:", `targets` the title."""
    return dataset.map(lambda ex: _keep(ex, inputs=tf.constant(TITLE_PROMPT), targets=ex["title"]),
                       num_parallel_calls=tf.data.AUTOTUNE)


def pretraining_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The text span corruption and MLM corrupt: title, then description, in `targets`."""
    def to_example(example):
        text = tf.strings.strip(tf.strings.join([example["title"], example["description"]], " "))
        return _keep(example, targets=text)
    return dataset.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)


def matching_examples(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Image-text matching, exactly balanced: consecutive products a, b give four examples,
    (image a, title a) -> yes, (image a, title b) -> no, (image b, title b) -> yes, (image b, title a)
    -> no. A pair whose titles are equal is dropped (its negatives would be false), as is a last odd
    product. Stored catalogs are shuffled at write time, so neighbours are random products.
    """
    def four(pair):
        def example(i, j, answer):
            return {**{k: pair[k][i] for k in KEEP if k in pair},
                    "inputs": tf.strings.join([pair["title"][j], MATCH_PROMPT], " "),
                    "targets": tf.constant(answer), "pair_text": pair["title"][j],
                    "pair_label": tf.constant([int(i == j)], tf.int32)}
        return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(
            lambda *xs: tf.stack(xs),
            example(0, 0, "yes"), example(0, 1, "no"), example(1, 1, "yes"), example(1, 0, "no")))

    pairs = dataset.map(lambda ex: {**{k: ex[k] for k in KEEP if k in ex}, "title": ex["title"]})
    pairs = pairs.batch(2, drop_remainder=True)
    pairs = pairs.filter(lambda p: tf.not_equal(tf.strings.lower(p["title"][0]),
                                                tf.strings.lower(p["title"][1])))
    return pairs.flat_map(four)


def question_answering_examples(dataset: tf.data.Dataset, attribute: str, removal_share: float,
                                text_sources: tuple[str, ...] = ("context",)) -> tf.data.Dataset:
    """MoEMoE's multi-source examples (paper sections 3-4) of the products that have `attribute`:
    `question` the attribute name, `targets` the value, the image, and the text sources: the first
    as `inputs`, each further one as the feature of its name, each the product fields
    `TEXT_SOURCES[name]` joins (the paper's one context: title + description + bullet points +
    product type).

    `removal_share` of the titles (by id, `removal_drawn`, the same products as the attribute
    tasks') lose the value's words, as in `attribute_examples`.
    """
    def has_value(example):
        return tf.strings.length(attribute_value(example, attribute)) > 0

    def to_example(example):
        value = attribute_value(example, attribute)
        fields = {"title": tf.cond(removal_drawn(example["id"], attribute, removal_share),
                                   lambda: remove_words(example["title"], value),
                                   lambda: example["title"]),
                  "description": example["description"],
                  "bullet_points": tf.strings.reduce_join(example["bullet_points"], separator=" "),
                  "product_type": example["product_type"]}
        texts = [tf.strings.strip(tf.strings.regex_replace(
            tf.strings.join([fields[f] for f in TEXT_SOURCES[name]], " "), r"\s+", " "))
            for name in text_sources]
        return _keep(example, question=tf.constant(attribute), inputs=texts[0], targets=value,
                     **dict(zip(text_sources[1:], texts[1:])))

    return dataset.filter(has_value).map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
