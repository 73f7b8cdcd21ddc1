"""SeqIO tasks and mixtures over one product catalog; `register_catalog_tasks` makes them.

For a catalog written by `mmt-jax data convert ... --out DIR --name NAME` (or the embedded one), one
call registers, with `P` the prefix:

  pretraining (Eq. 4: the two losses weighted equally, i.e. a mixture at equal rates)
    P_span_corruption    title + description, noise density 0.2, mean span 2, <extra_id_0..98>
    P_mlm                same text, 30% of tokens -> <extra_id_99>, target the full text
    P_pretrain           mixture of the two
    P_pretrain_titles    the two and P_title (the title from the image) at equal rates: beyond the
                         paper, the image branch learns in pretraining too (README "Why colour was
                         hard": text-only pretraining taught MMT4 to read colours from words)
  fine-tuning (MMT4 paper, section 4)
    P_<attribute>_removed<R>     "<title> <attribute>:" -> value, R% of titles without the value
                                 (<attribute> as in task names: `attribute_task_names`)
    P_attributes_removed<R>      mixture over the attributes (at `attribute_rates`, else equal)
    P_title              "title:" + image -> title
    P_match              "<title> match:" + image -> yes/no, balanced negatives
    P_multitask_removed<R>       mixture of the attribute tasks, title and match at twice their
                                 rate (`mmt-jax demo --job multitask`; the `_text` twin has no
                                 matching)
    P_qa_<attribute>_removed<R>  MoEMoE's records: question (the attribute name), context as
                                 `inputs` (title, description, bullets, type; R% of titles without
                                 the value, the same products as above), image -> value; or, with
                                 `qa_text_sources`, several text sources (`prompts.TEXT_SOURCES`)
    P_qa_removed<R>              mixture over the attributes
  and `_text` variants of the pretraining, attribute and title tasks without the image, for the
  text-only T5 baseline (matching needs the image, and MoEMoE QA its own converter).

Image tasks emit `image` and `image_mask` for `MultimodalEncDecFeatureConverter` (or, when `image`
names an extractor, the catalog's stored `image_features` and `image_mask` for
`MultimodalFeaturesEncDecFeatureConverter`); text tasks emit only tokens, for
`seqio.EncDecFeatureConverter`.
"""
import collections
import functools
import inspect
import os
import re
from typing import Mapping, Sequence

import seqio
import tensorflow as tf

from mmt_jax import image_spec, metrics
from mmt_jax.checkpoints import store
from mmt_jax.errors import InputError, UnknownTaskError
from mmt_jax.data import images, preprocessors, prompts, tfds_catalog
from mmt_jax.data import vocabulary as vocab_lib

DEFAULT_ATTRIBUTES = ("color", "pattern", "sleeve_type", "brand", "material")
REMOVAL_SHARES = (1.0, 0.2, 0.0)
MATCH_RATE = 2.0  # matching's rate in the multitask mixtures; every other task's is 1


def truncate_text(dataset: tf.data.Dataset, sequence_length: Sequence[int] | None):
    """Cuts the tokenised `targets` (the text to corrupt) to the shorter of the inputs and targets
    lengths minus one (room for EOS), so that corruption never produces inputs or targets that the
    feature lengths would cut."""
    if not sequence_length:
        return dataset
    limit = min(sequence_length[k] for k in ("inputs", "targets") if k in sequence_length) - 1

    @seqio.map_over_dataset
    def fn(example):
        return {**example, "targets": example["targets"][:limit]}
    return fn(dataset)


def keep_the_prompt(dataset: tf.data.Dataset, sequence_length: Sequence[int] | None,
                    vocabulary: seqio.Vocabulary, prompt: str) -> tf.data.Dataset:
    """After tokenising: when `inputs` ("<title> color:", "<title> match:") is longer than its
    length allows (one id left for EOS), cuts the text before the prompt instead of the prompt.
    seqio trims the end of a sequence, which is where the prompt is: an over-long title would leave
    the model no question, and train it on, or answer, whatever the cut text suggests."""
    if not sequence_length or not sequence_length.get("inputs"):
        return dataset
    limit = sequence_length["inputs"] - 1
    tail = len(vocabulary.encode(prompt))
    if tail >= limit:
        raise ValueError(f"the prompt {prompt!r} ({tail} ids) leaves no room for text in inputs of "
                         f"length {sequence_length['inputs']}")

    @seqio.map_over_dataset
    def fn(example):
        tokens = example["inputs"]
        return {**example, "inputs": tf.cond(
            tf.size(tokens) > limit,
            lambda: tf.concat([tokens[:limit - tail], tokens[-tail:]], 0), lambda: tokens)}
    return fn(dataset)


class CatalogSource(seqio.TfdsDataSource):
    """The catalog `product_catalog/<catalog>` under `data_dir`; an embedded catalog (a name like
    "embedded-n3000-s0-px128") is generated there the first time it is read. (Several processes
    starting on a catalog that is not there yet would each write it: generate it first,
    `mmt-jax data generate`, for multi-host runs.)"""

    def __init__(self, data_dir: str, catalog: str):
        super().__init__(tfds_name=tfds_catalog.tfds_name(catalog), tfds_data_dir=data_dir)
        self._to_generate = tfds_catalog.embedded_config_from_name(catalog)
        self._catalog_dir = data_dir
        self._catalog = catalog

    def attribute_counts(self, split: str) -> tuple[int, collections.Counter]:
        """(products in `split`, {attribute: products naming it})."""
        products, values = self.attribute_values(split)
        return products, collections.Counter({name: sum(counts.values())
                                              for name, counts in values.items()})

    @functools.lru_cache(maxsize=None)
    def attribute_values(self, split: str) -> tuple[int, dict[str, collections.Counter]]:
        """(products in `split`, {attribute: {value: products with it}}), read record by record
        once per process."""
        values, products = collections.defaultdict(collections.Counter), 0
        for record in self.get_dataset(split=split, shuffle=False).as_numpy_iterator():
            products += 1
            for name, value in zip(record["attribute_names"], record["attribute_values"]):
                values[name.decode("utf-8")][value.decode("utf-8")] += 1
        return products, dict(values)

    def describe(self, split: str) -> str:
        """What the catalog holds in `split`: its products and the attributes they name, with
        counts (for an error about a task that finds nothing in it)."""
        products, counts = self.attribute_counts(split)
        named = ", ".join(f"{name} ({n})" for name, n in sorted(counts.items())) or "none"
        return (f"catalog {self._catalog} under {self._catalog_dir} has {products} products in "
                f"'{split}', naming the attributes: {named}; name yours with "
                "tasks.catalog_task.attributes=(...)")

    @property
    def tfds_dataset(self):
        if self._to_generate is not None:
            tfds_catalog.prepare(self._to_generate, self._catalog_dir, num_shards=4)
            self._to_generate = None
        return super().tfds_dataset


def drop_image(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The examples without their image (or stored features) and the text paired with it."""
    return dataset.map(lambda ex: {k: v for k, v in ex.items() if k not in (
        "image", "image_features", "pair_text", "pair_label")})


def drop_array_copies(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """After seqio's `tokenize`, which copies every output feature as `<name>_pretokenized`: drops
    the copies of the array features (image, stored features, masks, labels), keeping the texts'.
    Otherwise every example carries its pixels twice, and t5x's infer binary, which writes each
    example's `*_pretokenized` features into its JSONL, writes a float array into every row."""
    arrays = {f"{name}_pretokenized" for name, feature in output_features.items()
              if isinstance(feature.vocabulary, seqio.PassThroughVocabulary)}
    return dataset.map(lambda ex: {k: v for k, v in ex.items() if k not in arrays})


def register_catalog_tasks(prefix: str, data_dir: str, catalog: str, *,
                           vocabulary: seqio.Vocabulary | str | None = None,
                           attributes: Sequence[str] | None = None,
                           image: image_spec.ImagePreprocessing = image_spec.ImagePreprocessing(),
                           removal_shares: Sequence[float] = REMOVAL_SHARES,
                           with_description: bool = False,
                           attribute_rates: Mapping[str, float] | None = None,
                           qa_text_sources: Sequence[str] = ("context",)) -> list[str]:
    """Registers the tasks above for the catalog `product_catalog/<catalog>` under `data_dir`.

    Args:
      prefix: task name prefix (e.g. "catalog").
      data_dir, catalog: where the catalog is (the converter's --out and --name).
      vocabulary: a seqio vocabulary or the path of a T5 SentencePiece model (default: the catalog
        vocabulary shipped with the package).
      attributes: the attributes to make generation tasks for; None: every attribute the catalog
        names (`catalog_attribute_names`); () for a catalog used for matching, titles and
        pretraining only (no attribute or QA tasks are registered).
      image: how images are decoded and resized for the representator, or which stored features
        the model reads (`image_spec.preprocessing(spec)`; the catalog must hold them).
      removal_shares: shares of titles that lose the attribute value (Table 2: 1.0, 0.2, 0.0).
      with_description: attribute prompts read the description after the title (the paper: title
        only).
      attribute_rates: `{attribute: rate}` of an attribute's task in the mixtures over attributes
        (attributes, multitask, QA); every other task's rate is 1. For an attribute that needs more
        steps than the others (the main job's colour: 22 values told apart by the image alone).
      qa_text_sources: the text sources of the QA tasks, names of `prompts.TEXT_SOURCES`: the first
        is `inputs`, each further one the feature of its name (MoEMoE's
        `MultiSourceConfig.text_sources`, which must name the same).
    Returns:
      the names of the tasks and mixtures registered.
    """
    vocabulary_arg = vocabulary
    qa_text_sources = tuple(qa_text_sources)
    unknown = [name for name in qa_text_sources if name not in prompts.TEXT_SOURCES]
    if unknown or not qa_text_sources or len(set(qa_text_sources)) != len(qa_text_sources):
        raise ValueError(f"qa_text_sources={qa_text_sources!r}: one or more distinct names of "
                         f"{tuple(prompts.TEXT_SOURCES)}")
    if not isinstance(vocabulary, seqio.Vocabulary):
        vocabulary = vocab_lib.vocabulary(vocabulary)
    source = CatalogSource(data_dir, catalog)
    if attributes is None:
        attributes = catalog_attribute_names(data_dir, catalog)
    text_features = {"inputs": seqio.Feature(vocabulary, add_eos=True),
                     "targets": seqio.Feature(vocabulary, add_eos=True)}
    # Declared as output features so that mixtures, which keep only those, keep the image too.
    image_outputs = {
        image.input_feature: seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False,
                                           dtype=tf.float32, rank=3 if image.extractor is None else 2),
        "image_mask": seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.int32,
                                    rank=1),
        # The contrastive head's pair (data/prompts.py): the text paired with the image, and 1 when
        # it describes the image.
        "pair_text": seqio.Feature(vocabulary, add_eos=True),
        "pair_label": seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.int32,
                                    rank=1)}
    names = []

    def add(name, make_examples, metric_fns=(), tokenized=(), features=text_features,
            modalities=("image", "text"), prompt=None):
        """Registers `name` (with the image) and `name`_text (without): make the examples, decode
        the image or drop it, tokenise, apply the `tokenized` steps, then append EOS. `prompt`:
        what the task asks (`task_prompts`)."""
        for modality in modalities:
            with_image = modality == "image"
            _PROMPTS[name if with_image else f"{name}_text"] = () if prompt is None else (prompt,)
            seqio.TaskRegistry.add(
                name if with_image else f"{name}_text", source=source, metric_fns=list(metric_fns),
                output_features={**features, **(image_outputs if with_image else {})},
                preprocessors=[make_examples, functools.partial(images.preprocess_images, options=image)
                               if with_image else drop_image,
                               seqio.preprocessors.tokenize, drop_array_copies, *tokenized,
                               seqio.preprocessors.append_eos_after_trim])
            names.append(name if with_image else f"{name}_text")

    def keeping(prompt: str) -> list:
        return [functools.partial(keep_the_prompt, vocabulary=vocabulary, prompt=prompt)]

    for objective in (preprocessors.span_corruption, preprocessors.mlm):
        add(f"{prefix}_{objective.__name__}", prompts.pretraining_text, tokenized=[
            truncate_text, functools.partial(objective, vocabulary=vocabulary)])
        _ONE_PER_PRODUCT.update({f"{prefix}_{objective.__name__}{s}" for s in ("", "_text")})

    attribute_metrics = [metrics.attribute_accuracy, metrics.attribute_recall_at_precision]
    slugs = attribute_task_names(attributes)
    rate = _attribute_rates(attributes, attribute_rates or {})
    for share in removal_shares:
        removed = f"removed{round(share * 100)}"
        for attribute in attributes:
            add(f"{prefix}_{slugs[attribute]}_{removed}", functools.partial(
                prompts.attribute_examples, attribute=attribute, removal_share=share,
                with_description=with_description),
                attribute_metrics, tokenized=keeping(prompts.attribute_prompt(attribute)),
                prompt=prompts.attribute_prompt(attribute))
            _ATTRIBUTE_OF.update({f"{prefix}_{slugs[attribute]}_{removed}{suffix}": attribute
                                  for suffix in ("", "_text")})
        for suffix in ("", "_text") if attributes else ():  # no attributes: no attribute mixtures
            _add_mixture(f"{prefix}_attributes_{removed}{suffix}",
                         [(f"{prefix}_{slugs[a]}_{removed}{suffix}", rate[a]) for a in attributes],
                         names)
    add(f"{prefix}_title", prompts.title_examples, [metrics.title_rouge1],
        prompt=prompts.TITLE_PROMPT)
    _ONE_PER_PRODUCT.update({f"{prefix}_title", f"{prefix}_title_text"})
    add(f"{prefix}_match", prompts.matching_examples, [metrics.matching_metrics],
        tokenized=keeping(prompts.MATCH_PROMPT), modalities=("image",), prompt=prompts.MATCH_PROMPT)
    for suffix in ("", "_text"):
        text_objectives = [f"{prefix}_span_corruption{suffix}", f"{prefix}_mlm{suffix}"]
        _add_mixture(f"{prefix}_pretrain{suffix}", [(t, 1.0) for t in text_objectives], names)
        _add_mixture(f"{prefix}_pretrain_titles{suffix}",
                     [(t, 1.0) for t in text_objectives + [f"{prefix}_title{suffix}"]], names)
    for share in removal_shares if attributes else ():  # the fine-tuning tasks in one run
        removed = f"removed{round(share * 100)}"
        for suffix in ("", "_text"):
            rates = [(f"{prefix}_{slugs[a]}_{removed}{suffix}", rate[a]) for a in attributes]
            rates.append((f"{prefix}_title{suffix}", 1.0))
            if not suffix:  # matching needs the image, and learns slowest: twice the examples
                rates.append((f"{prefix}_match", MATCH_RATE))
            seqio.MixtureRegistry.add(f"{prefix}_multitask_{removed}{suffix}", rates)
            names.append(f"{prefix}_multitask_{removed}{suffix}")
    qa_features = {"question": seqio.Feature(vocabulary, add_eos=True),
                   "inputs": seqio.Feature(vocabulary, add_eos=True),  # the first text source
                   "targets": seqio.Feature(vocabulary, add_eos=True),
                   **{name: seqio.Feature(vocabulary, add_eos=True) for name in qa_text_sources[1:]}}
    for share in removal_shares if attributes else ():
        removed = f"removed{round(share * 100)}"
        for attribute in attributes:
            add(f"{prefix}_qa_{slugs[attribute]}_{removed}", functools.partial(
                prompts.question_answering_examples, attribute=attribute, removal_share=share,
                text_sources=qa_text_sources),
                attribute_metrics, features=qa_features, modalities=("image",),
                prompt=prompts.attribute_prompt(attribute))  # the Predictor's prompt for it
            _TEXT_SOURCES[f"{prefix}_qa_{slugs[attribute]}_{removed}"] = qa_text_sources
            _ATTRIBUTE_OF[f"{prefix}_qa_{slugs[attribute]}_{removed}"] = attribute
        _add_mixture(f"{prefix}_qa_{removed}",
                     [(f"{prefix}_qa_{slugs[a]}_{removed}", rate[a]) for a in attributes], names)
    _REGISTERED[prefix] = _full_arguments(prefix, data_dir, catalog, vocabulary=vocabulary_arg,
                                          attributes=attributes, image=image,
                                          removal_shares=removal_shares,
                                          with_description=with_description,
                                          attribute_rates=attribute_rates,
                                          qa_text_sources=qa_text_sources)
    _PREFIX_OF.update((name, prefix) for name in names)
    return names


_REGISTERED: dict[str, dict] = {}  # prefix -> all arguments it was registered with
_PREFIX_OF: dict[str, str] = {}  # task or mixture -> the prefix it was registered under
_PROMPTS: dict[str, tuple[str, ...]] = {}  # task -> the prompt it asks (none: pretraining)
_TEXT_SOURCES: dict[str, tuple[str, ...]] = {}  # QA task -> its text sources
_ATTRIBUTE_OF: dict[str, str] = {}  # attribute or QA task -> the attribute it asks for
_ONE_PER_PRODUCT: set[str] = set()  # pretraining and title tasks: an example from every product


def has_examples(task_name: str, split: str) -> bool | None:
    """Whether catalog task `task_name` has an example in `split`, as its catalog's metadata tells
    without reading a record: an attribute or QA task has one for every product naming its
    attribute, a pretraining or title task one for every product. None where the metadata cannot
    tell: matching (it pairs products whose titles differ), a catalog written before the metadata
    recorded attributes, a split the catalog lacks, a task registered elsewhere."""
    prefix = _PREFIX_OF.get(task_name)
    if prefix is None:
        return None
    source = seqio.get_mixture_or_task(task_name).source
    if split not in source.splits:
        return None
    if task_name in _ONE_PER_PRODUCT:
        return source.num_input_examples(split) > 0
    if task_name not in _ATTRIBUTE_OF:
        return None
    recorded = tfds_catalog.catalog_attributes(_REGISTERED[prefix]["data_dir"],
                                               _REGISTERED[prefix]["catalog"])
    if recorded is None:
        return None
    return recorded.get(_ATTRIBUTE_OF[task_name], {}).get("products", {}).get(split, 0) > 0


def attribute_values(task_name: str, split: str = "train") -> tuple[str, ...] | None:
    """The values of the attribute a catalog attribute or QA task asks for, as `split` of its
    catalog gives them (the closed set of `mmt-jax eval`'s closed-set decoding), most frequent
    first; None for any other task."""
    attribute = _ATTRIBUTE_OF.get(task_name)
    if attribute is None:
        return None
    return _by_frequency(seqio.get_mixture_or_task(task_name).source, split).get(attribute, ())


def catalog_values(data_dir: str, catalog: str, split: str = "train") -> dict[str, tuple[str, ...]]:
    """`{attribute: its values in split, most frequent first}` of a catalog (`mmt-jax infer
    --closed-set`: the values of the checkpoint's training catalog)."""
    return _by_frequency(CatalogSource(data_dir, catalog), split)


def _by_frequency(source: CatalogSource, split: str) -> dict[str, tuple[str, ...]]:
    _, values = source.attribute_values(split)
    return {name: tuple(v for v, _ in counts.most_common()) for name, counts in values.items()}


def check_text_sources(mixture_or_task_name: str, text_sources: tuple[str, ...] | None) -> None:
    """Refuses a model whose text sources (`MultiSourceConfig.text_sources`, None: not MoEMoE)
    differ from those of a catalog QA task it would read: its `inputs` would be another text than
    the one it was built for. Tasks registered elsewhere are not checked."""
    tasks = seqio.get_mixture_or_task(mixture_or_task_name)
    for task in getattr(tasks, "tasks", [tasks]):
        task_sources = _TEXT_SOURCES.get(task.name)
        if task_sources is not None and text_sources is not None and task_sources != text_sources:
            raise InputError(f"task {task.name} gives the text sources {list(task_sources)}, the "
                             f"model reads {list(text_sources)}; set the task's "
                             f"(gin: tasks.catalog_task.qa_text_sources) or the model's "
                             f"(moemoe.MultiSourceConfig.text_sources) to match")


def task_prompts(mixture_or_task_name: str) -> tuple[str, ...] | None:
    """The prompts a catalog task or mixture asks ("color:", "match:", "title:"), sorted; () for
    pretraining; None for a task registered elsewhere (not known)."""
    tasks = seqio.get_mixture_or_task(mixture_or_task_name)
    names = [task.name for task in getattr(tasks, "tasks", [tasks])]
    if any(name not in _PROMPTS for name in names):
        return None
    return tuple(sorted({prompt for name in names for prompt in _PROMPTS[name]}))


def catalog_attribute_names(data_dir: str, catalog: str) -> tuple[str, ...]:
    """The attributes a catalog names: the embedded generator's (`DEFAULT_ATTRIBUTES`) for an
    embedded catalog, else those its metadata records (`tfds_catalog.catalog_attributes`), sorted;
    a catalog written before they were recorded has its training split read for them."""
    if tfds_catalog.embedded_config_from_name(catalog) is not None:
        return DEFAULT_ATTRIBUTES
    recorded = tfds_catalog.catalog_attributes(data_dir, catalog)
    if recorded is None:
        recorded = CatalogSource(data_dir, catalog).attribute_counts("train")[1]
    return tuple(sorted(recorded))


def task_name_part(name: str) -> str:
    """`name` as seqio task names allow it: lower-cased, each run of characters other than letters,
    digits and `_` made one `_` ("Sleeve Length" -> "sleeve_length")."""
    return re.sub(r"\W+", "_", name.lower()).strip("_")


def attribute_task_names(attributes: Sequence[str]) -> dict[str, str]:
    """`{attribute: the part of its task names}`: catalogs name attributes as people write them
    ("product type", "Sleeve Length", "colour/finish"), task names allow only letters, digits and
    `_`, so each is lower-cased and every run of other characters becomes one `_` ("product_type",
    "sleeve_length", "colour_finish"). The prompt keeps the name as written. Two attributes with the
    same task name are an error naming both."""
    names, seen = {}, {}
    for attribute in attributes:
        name = task_name_part(attribute)
        if not name:
            raise ValueError(f"attribute {attribute!r} has no letter or digit to name its tasks by")
        if name in seen and seen[name] != attribute:
            raise ValueError(f"attributes {seen[name]!r} and {attribute!r} would both be tasks "
                             f"named {name!r}; rename one in the catalog")
        names[attribute], seen[name] = name, attribute
    return names


def _full_arguments(*args, **kwargs) -> dict:
    bound = inspect.signature(register_catalog_tasks).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in bound.arguments.items()}
    if arguments["attributes"] is None:  # the same registration as naming them
        arguments["attributes"] = catalog_attribute_names(arguments["data_dir"], arguments["catalog"])
    arguments["attribute_rates"] = dict(arguments["attribute_rates"] or {})
    arguments["data_dir"] = os.path.abspath(arguments["data_dir"])  # "runs/tfds" is the same catalog
    return arguments


def catalog_task(task: str | None, prefix: str | None, data_dir: str | None, catalog: str | None,
                 recorded_by: str | None = None, **kwargs) -> str:
    """The name of `<prefix>_<task>`, registering the catalog's tasks on first use; for gin, where a
    run names its task as `MIXTURE_OR_TASK_NAME = @tasks.catalog_task()` with the catalog bound:

        tasks.catalog_task.task = "attributes_removed100"
        tasks.catalog_task.prefix = None      # the catalog's name as task names allow: "shop"
        tasks.catalog_task.data_dir = "/data/tfds"
        tasks.catalog_task.catalog = "shop"

    `kwargs` go to `register_catalog_tasks`. `recorded_by`: a checkpoint (or model directory) whose
    training task (`catalog_task_record`) fills in every argument left None (eval: only the
    checkpoint is needed; a catalog named explicitly keeps its own prefix). Raises ValueError if the
    prefix was registered with other arguments, UnknownTaskError if it has no such task, InputError
    if the task or catalog is neither given nor recorded.
    """
    if recorded_by is not None:
        task, prefix, data_dir, catalog, kwargs = _with_recorded(recorded_by, task, prefix, data_dir,
                                                                 catalog, kwargs)
    missing = [name for name, value in (("task", task), ("data_dir", data_dir), ("catalog", catalog))
               if value is None]
    if missing:
        raise InputError(f"no catalog {' or '.join(missing)} given"
                         + (f", and {recorded_by} does not record its training task (gin: TASK=...)"
                            if recorded_by is not None else ""))
    prefix = prefix or task_name_part(catalog)
    if prefix not in _REGISTERED:
        register_catalog_tasks(prefix, data_dir, catalog, **kwargs)
    elif _REGISTERED[prefix] != (arguments := _full_arguments(prefix, data_dir, catalog, **kwargs)):
        raise ValueError(f"catalog tasks {prefix!r} are registered with {_REGISTERED[prefix]}, "
                         f"not {arguments}")
    name = f"{prefix}_{task}"
    if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
        known = sorted(n.removeprefix(f"{prefix}_") for registry in (seqio.TaskRegistry,
                                                                     seqio.MixtureRegistry)
                       for n in registry.names() if n.startswith(f"{prefix}_"))
        raise UnknownTaskError(f"no catalog task {task!r}; {prefix!r} has {', '.join(known)}")
    return name


def catalog_task_record(mixture_or_task_name: str) -> dict | None:
    """What `catalog_task` needs to register `mixture_or_task_name` again, as a JSON object (train
    stores it in the checkpoints' ModelConfig.trained_task): the task within its catalog, the
    prefix, the (absolute) data_dir, the catalog and the registration's settings (its image
    preprocessing is the ModelConfig's own `image`). None for a task that is not a catalog's, or
    registered with a vocabulary object that has no file to name."""
    prefix = _PREFIX_OF.get(mixture_or_task_name)
    if prefix is None:
        return None
    record = {"task": mixture_or_task_name.removeprefix(f"{prefix}_")}
    for name, value in _REGISTERED[prefix].items():  # `_full_arguments`: tuples, absolute data_dir
        if isinstance(value, seqio.Vocabulary):
            value = getattr(value, "sentencepiece_model_file", None)
            if value is None:
                return None
        if name != "image":
            record[name] = list(value) if isinstance(value, tuple) else value
    return record


def default_data_dir() -> str:
    """$MMT_JAX_DATA_DIR, else ~/.cache/mmt_jax/tensorflow_datasets."""
    return os.environ.get("MMT_JAX_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mmt_jax", "tensorflow_datasets")


def _with_recorded(checkpoint: str, task, prefix, data_dir, catalog, kwargs):
    """`catalog_task`'s arguments with those left None taken from `checkpoint`'s training task, and
    its image preprocessing; for a checkpoint that records no task, the embedded catalog under
    `default_data_dir()`."""
    try:
        config = store.load_config(checkpoint)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    record = dict(config.trained_task or {"data_dir": default_data_dir(),
                                          "catalog": tfds_catalog.embedded_config().name})
    same_catalog = catalog is None or catalog == record["catalog"]
    settings = {k: v for k, v in record.items()
                if k not in ("task", "prefix", "data_dir", "catalog")}
    if config.image is not None:
        settings["image"] = config.image
    kwargs = {**settings, **{k: v for k, v in kwargs.items() if v is not None}}
    return (task if task is not None else record.get("task"),
            prefix if prefix is not None else (record.get("prefix") if same_catalog else None),
            data_dir if data_dir is not None else record["data_dir"],
            catalog if catalog is not None else record["catalog"], kwargs)


def _attribute_rates(attributes: Sequence[str], rates: Mapping[str, float]) -> dict[str, float]:
    """Every attribute's mixing rate: `rates`' or 1; a rate for an attribute the catalog does not
    name, or one not above 0, is a ValueError naming it."""
    unknown = sorted(set(rates) - set(attributes))
    if unknown:
        raise ValueError(f"attribute_rates names {', '.join(map(repr, unknown))}, which the tasks do "
                         f"not have; their attributes: {', '.join(map(repr, attributes))}")
    for attribute, rate in rates.items():
        if not rate > 0:
            raise ValueError(f"attribute_rates[{attribute!r}] is {rate!r}; a rate must be above 0")
    return {attribute: float(rates.get(attribute, 1.0)) for attribute in attributes}


def _add_mixture(name: str, rates: list[tuple[str, float]], names: list[str]) -> None:
    """Registers mixture `name` over `(task, rate)` pairs and appends it to `names`."""
    seqio.MixtureRegistry.add(name, rates)
    names.append(name)
