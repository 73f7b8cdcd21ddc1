"""Predictions for new products from a checkpoint: the Python API and the infer binary's engine.

    from mmt_jax.predictor import Predictor
    predictor = Predictor.from_checkpoint("runs/demo/mmt4")          # a checkpoint or a model dir
    predictor.predict(image="shirt.jpg", title="Acme cotton shirt", prompt="color:")
    # Prediction(text='red', score=-0.03)

A query is one product asked one prompt. Its encoder text is built as the catalog tasks build theirs
(`data/prompts.py`): "<title> <description> <prompt>" (empty parts left out), tokenised with the
checkpoint's vocabulary and ending in EOS; its image is decoded and resized with the checkpoint's own
`ImagePreprocessing` (augmentation off) and, for a checkpoint trained on stored image features, run
through the frozen extractor that wrote them into the catalog (a query read from a converted
catalog that stores them brings them along, and is not extracted again); the batch comes from the
model's feature converter. So a new product is seen exactly as the validation split was in training.

`score` is the log-probability of the generated text: greedy decoding, or beam search without a
length penalty, so `exp(score)` is the model's probability of its answer (what the recall-at-precision
and matching metrics rank by).

A MoEMoE checkpoint (`models/moemoe.py`) reads a query as its `P_qa` tasks built the training
examples (`data/prompts.py`): the prompt without its colon is the question (the attribute name,
"color"), and each of its text sources joins the product's fields as `prompts.TEXT_SOURCES` says
(the paper's one context: title + description + bullet points + product type); each prediction
carries the mean weight the model gave each source (`{"image": ..., "context": ...}`), so a user
sees whether an answer came from the image or the text.

A checkpoint with the contrastive head (`runs/contrastive.gin`) also scores image-title pairs without
decoding: `predictor.match(image=..., title=...)` is their cosine in the head's space, the score the
main job's "contrastive head" matching row ranks by.
"""
import collections
import dataclasses
import functools
import itertools
import os
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from mmt_jax import acceptance, decoding, quantization
from mmt_jax.checkpoints import store
from mmt_jax.data import images as images_lib
from mmt_jax.data import prompts, records
from mmt_jax.errors import InputError
from mmt_jax.image_spec import StoredFeatures
from mmt_jax.models.config import ModelConfig
from mmt_jax.task_inference import build_model, source_weights, until_eos, value_trie
from mmt_jax.value_trie import ValueConstraint
from mmt_jax.vision import extractors


@dataclasses.dataclass(frozen=True)
class Query:
    """One product asked one prompt. `image`: encoded JPEG/PNG bytes, b"" for none;
    `image_features`: its features as a converted catalog stores them, used instead of extracting
    them again when the checkpoint reads the same extractor's features."""
    record: str
    prompt: str
    title: str = ""
    description: str = ""
    image: bytes = b""
    bullet_points: tuple[str, ...] = ()
    product_type: str = ""
    image_features: StoredFeatures | None = dataclasses.field(default=None, compare=False,
                                                              repr=False)

    @property
    def text(self) -> str:
        """MMT4's encoder text, as the attribute tasks build it: title, description, prompt."""
        return " ".join(part for part in (self.title, self.description, self.prompt) if part)

    @property
    def question(self) -> str:
        """MoEMoE's question: the prompt's attribute name ("color:" -> "color")."""
        return self.prompt.strip().removesuffix(":").strip()

    def source_text(self, name: str) -> str:
        """MoEMoE's text source `name` as its `P_qa` tasks build it: the product fields
        `prompts.TEXT_SOURCES[name]` joins ("context": title, description, bullet points, product
        type)."""
        fields = {"title": (self.title,), "description": (self.description,),
                  "bullet_points": self.bullet_points, "product_type": (self.product_type,)}
        return " ".join(" ".join(part for field in prompts.TEXT_SOURCES[name]
                                 for part in fields[field]).split())


@dataclasses.dataclass(frozen=True)
class Prediction:
    """`source_weights`: MoEMoE's mean weight of each source, None for other models. `accepted`:
    whether the score reaches the prompt's calibrated threshold (`acceptance.py`); None where the
    checkpoint has none for the prompt."""
    text: str
    score: float
    source_weights: dict[str, float] | None = None
    accepted: bool | None = None


class Predictor:
    """Decodes queries in batches of `batch_size` (the last one padded, so one compiled program).

    Args:
      model, params, config: an `EncoderDecoderModel`, its parameters and the `ModelConfig` they
        came from (`from_checkpoint` reads all three).
      input_length: encoder text length in tokens; a longer query is an `InputError`.
      target_length: the most tokens generated.
      num_beams: 1 for greedy decoding, else beam search with that many beams.
      value_sets: `{prompt: values}`: closed-set decoding, a query with one of these prompts
        answering only with one of its values (`value_trie.py`); other prompts decode openly.
      thresholds: `{"open" | "closed": {prompt: threshold}}`, the checkpoint's calibrated
        acceptance (`acceptance.py`; `from_checkpoint` reads them): each prediction is marked
        accepted against its prompt's threshold for the decoding it got.
      devices: the devices each batch is split over, data parallel (the parameters copied to
        each; `batch_size` rounded up to a whole number of rows per device); default: the first
        local device.
      sort_window: `predict_queries` sorts this many batches' queries by length at a time (1:
        batches in the order given).
      int8: decode with int8 dense kernels and activations (`quantization.py`).
    """

    def __init__(self, model, params, config: ModelConfig, *, input_length: int = 128,
                 target_length: int = 16, batch_size: int = 16, num_beams: int = 1,
                 value_sets: Mapping[str, Sequence[str]] | None = None,
                 thresholds: Mapping[str, Mapping[str, float | None]] | None = None,
                 devices: Sequence[jax.Device] | None = None, sort_window: int = 16,
                 int8: bool = False):
        if config.image_branch is not None and config.image is None:
            raise InputError("the checkpoint does not record its image preprocessing (written before "
                             "ModelConfig.image existed); set config.image to the training run's "
                             "ImagePreprocessing")
        self.model, self.config = model, config
        self.devices = list(devices) if devices else jax.local_devices()[:1]
        mesh = Mesh(np.asarray(self.devices), ("data",))
        self._rows, self._copies = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(
            mesh, PartitionSpec())
        self.params = jax.device_put(quantization.quantize_params(params) if int8 else params,
                                     self._copies)
        self.input_length, self.target_length = input_length, target_length
        self.batch_size = -(-batch_size // len(self.devices)) * len(self.devices)
        self.num_beams, self.sort_window = num_beams, sort_window
        self.vocabulary = model.output_vocabulary
        self.asks_questions = getattr(model.FEATURE_CONVERTER_CLS, "QUESTION", False)
        self.text_sources = config.text_sources or ()  # MoEMoE's; the first is `inputs`
        self._image = (None if config.image_branch is None
                       else dataclasses.replace(config.image, augment=False))
        decode_fn = (decoding.greedy if num_beams == 1
                     else functools.partial(decoding.beam_search, alpha=0.0))
        self._predict = jax.jit(functools.partial(
            model.predict_batch_with_aux, decode_fn=decode_fn, num_decodes=num_beams))
        self._score_pairs = jax.jit(model.score_pairs)
        self._converter = None  # `_converted`'s, built at the first batch
        self.value_sets = dict(value_sets or {})
        self._trie = (value_trie(self.vocabulary, self.value_sets) if self.value_sets else None)
        self.thresholds = thresholds

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> "Predictor":
        """From a checkpoint directory, or the newest checkpoint of a training run's model_dir."""
        path = store.resolve(path)
        config, params = store.load_checkpoint(path)
        calibrated = acceptance.load(path)
        return cls(build_model(config), params, config,
                   **{"thresholds": calibrated and calibrated["thresholds"], **kwargs})

    def untrained_prompts(self, prompts: Iterable[str]) -> list[str]:
        """Those of `prompts` the checkpoint's training task never asked (none when it did not
        record its prompts): the model answers them anyway, with whatever it learned to say."""
        known = self.config.prompts
        return [] if known is None else [p for p in dict.fromkeys(prompts) if p not in known]

    @property
    def uses_images(self) -> bool:
        return self._image is not None

    def predict(self, *, prompt: str, title: str = "", description: str = "", image=None,
                bullet_points: tuple[str, ...] = (), product_type: str = "") -> Prediction:
        """One product: `image` is a file path, encoded bytes, a PIL image, a uint8 `[H, W, 3]`
        array, or None (bullet points and product type: read by MoEMoE only)."""
        query = Query("query", prompt, title, description, image_bytes(image, "query"),
                      tuple(bullet_points), product_type)
        return next(self.predict_queries([query]))[1]

    def predict_queries(self, queries: Iterable[Query],
                        on_error: Callable[[Query, InputError], None] | None = None
                        ) -> Iterator[tuple[Query, Prediction]]:
        """Lazily decodes `queries`, yielding each with its prediction, in order. They are taken
        `sort_window` batches at a time and batched in order of their products' text length, so
        each batch is cut to a short length bucket (`_in_length_bucket`); a product's prompts stay
        together and share its image's decoding (and features). Each batch is built while the
        devices decode the one before.

        A query the model cannot take (a text longer than `input_length`, an image that does not
        decode) raises `InputError` naming its record (a batch that fails is decoded again one
        query at a time to find it); with `on_error`, it is passed to `on_error(query, error)` and
        left out instead, and the other queries of its batch are still predicted.
        """
        windows = collections.deque()  # read ahead of the predictions, so at most two

        def by_length():
            stream = iter(queries)
            while window := list(itertools.islice(stream, self.batch_size * self.sort_window)):
                windows.append(_SortedWindow(window, self._text_length))
                yield from windows[-1].sorted()

        # one stream across windows: the next window is read while the devices decode
        for query, prediction in self._predict_sorted(by_length(), on_error):
            while not windows[0].place(query, prediction):  # the head window is complete
                yield from windows.popleft().in_order()
        while windows:
            yield from windows.popleft().in_order()

    def _text_length(self, query: Query) -> int:
        """What batches are sorted by: the length of the product's text without the prompt."""
        if self.asks_questions:
            return len(query.source_text(self.text_sources[0]))
        return len(query.title) + len(query.description)

    def _predict_sorted(self, queries: Iterable[Query],
                        on_error) -> Iterator[tuple[Query, Prediction]]:
        """`queries` decoded in batches in the order given, each yielded with its prediction."""
        in_flight = []  # (queries, device outputs): dispatched, not read back yet
        for chunk in self._chunks(queries, on_error):
            try:  # the next batch is built while the devices decode the one before
                dispatched = list(self._dispatch(chunk, on_error))
            except InputError:
                for item in in_flight:
                    yield from self._collect(*item)
                raise
            for item in in_flight:
                yield from self._collect(*item)
            in_flight = dispatched
        for item in in_flight:
            yield from self._collect(*item)

    def _chunks(self, queries: Iterable[Query], on_error) -> Iterator[list[Query]]:
        chunk = []
        for query in queries:
            if on_error is not None:
                try:
                    self._tokens(query)  # the common bad query, caught before it spoils a batch
                except InputError as e:
                    on_error(query, e)
                    continue
            chunk.append(query)
            if len(chunk) == self.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def match(self, *, image, title: str) -> float:
        """The contrastive head's score of one image and one title (any image form `predict`
        takes): their cosine, in [-1, 1]."""
        return self.match_pairs([(image, title)])[0]

    def match_pairs(self, pairs: Iterable[tuple[object, str]]) -> list[float]:
        """`match` for many `(image, title)` pairs, `batch_size` per call; no decoding."""
        if getattr(self.model.module, "contrastive", None) is None or not self.uses_images:
            raise InputError("this checkpoint has no contrastive head to match with; train one "
                             "with --gin_file=runs/contrastive.gin")
        queries = [Query(f"pair {i}", "", title, image=image_bytes(image, f"pair {i}"))
                   for i, (image, title) in enumerate(pairs)]
        return [score for start in range(0, len(queries), self.batch_size)
                for score in self._match_chunk(queries[start:start + self.batch_size])]

    def _match_chunk(self, chunk: list[Query]) -> list[float]:
        padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
        try:
            batch = self._batch(padded)
        except (InputError, tf.errors.InvalidArgumentError) as e:
            if len(chunk) == 1:  # an image that does not decode: named by its pair
                raise _as_input_error(chunk[0], e) from None
            return [score for query in chunk for score in self._match_chunk([query])]
        return np.asarray(self._score_pairs(self.params, batch)).tolist()[:len(chunk)]

    def _dispatch(self, chunk: list[Query], on_error) -> Iterator[tuple[list[Query], tuple]]:
        """Starts decoding `chunk`: `(chunk, device outputs)`. A query the model cannot take spoils
        its batch: each is then started alone to find it, and it is raised or passed to
        `on_error`."""
        try:
            yield chunk, self._start(chunk)
        except (InputError, tf.errors.InvalidArgumentError) as e:
            if len(chunk) > 1:
                for query in chunk:
                    yield from self._dispatch([query], on_error)
                return
            error = _as_input_error(chunk[0], e)
            if on_error is None:
                raise error from None
            on_error(chunk[0], error)

    def _start(self, queries: list[Query]) -> tuple:
        """The batch of `queries` (padded to `batch_size`) built and its decoding dispatched; the
        devices run it while the host goes on."""
        padded = queries + [queries[-1]] * (self.batch_size - len(queries))
        decoder_params = None
        if self._trie is not None:  # the trie on every device, each row's root with its row
            constraint = self._trie.constraint(
                [q.prompt if q.prompt in self.value_sets else None for q in padded])
            decoder_params = {"constraint": jax.device_put(
                constraint, ValueConstraint(self._copies, self._copies, self._rows))}
        return self._predict(self.params, self._batch(padded), decoder_params=decoder_params)

    def _collect(self, queries: list[Query], outputs: tuple) -> Iterator[tuple[Query, Prediction]]:
        """`queries` with their predictions, once the devices have them."""
        tokens, aux = outputs
        n = len(queries)
        tokens, scores = np.asarray(tokens)[:n], np.asarray(aux["scores"])[:n]
        weights = source_weights(self.model, aux, n)
        eos = self.vocabulary.eos_id
        for query, row, score, w in zip(queries, tokens, scores, weights):
            yield query, Prediction(self.vocabulary.decode(until_eos(row, eos)), float(score), w,
                                    self._accepted(query.prompt, float(score)))

    def _accepted(self, prompt: str, score: float) -> bool | None:
        decoding = "closed" if prompt in self.value_sets else "open"
        return acceptance.accepted(None if self.thresholds is None
                                   else self.thresholds.get(decoding), prompt, score)

    def _batch(self, queries: list[Query]) -> dict:
        examples = {"inputs": [self._tokens(q) for q in queries],
                    "targets": [np.zeros(0, np.int32)] * len(queries)}
        if self.asks_questions:
            examples["question"] = [self._encode(q.question, q, "question") for q in queries]
            for name in self.text_sources[1:]:
                examples[name] = [self._encode(q.source_text(name), q, _fields(name))
                                  for q in queries]
        converter, image = self.model.FEATURE_CONVERTER_CLS, None
        if self.uses_images:  # the contrastive head's pair: the title, as the catalog tasks pair it
            examples["pair_text"] = [self._title_tokens(q) for q in queries]
            examples["pair_label"] = np.asarray([[int(bool(q.title))] for q in queries], np.int32)
            if self._image.extractor is not None:
                image = self._image_features(queries)
            else:  # each distinct image once: a product's prompts share its image
                distinct, of = _distinct_images(queries)
                image = images_lib.decode_batch(distinct, self._image)[0][of]
            # The converter passes the image through as it is (`feature_converter.py`), so it
            # converts a one-value stand-in and the batch takes the image whole: megabytes a batch
            # not copied row by row through tf.data.
            examples[converter.IMAGE_FEATURE] = np.zeros(
                (len(queries),) + (1,) * converter.IMAGE_RANK, np.float32)
            examples["image_mask"] = np.asarray([[int(bool(q.image))] for q in queries], np.int32)
        batch = self._converted(examples)
        if image is not None:
            batch[converter.MODEL_IMAGE_FEATURE] = image
        return jax.device_put(self._in_length_bucket(batch), self._rows)  # each device its rows

    def _image_features(self, queries: list[Query]) -> np.ndarray:
        """The features `[B, Lv, D]` of the queries' images: those stored with a query by the
        checkpoint's own preprocessing as they are, the others extracted (each distinct image once)."""
        stored = [q.image_features is not None and q.image_features.options == self._image
                  for q in queries]
        distinct, of = _distinct_images([q for q, s in zip(queries, stored) if not s])
        extracted = iter(extractors.extract_from_bytes(distinct, self._image)[0][of])
        return np.stack([q.image_features.vectors if s else next(extracted)
                         for q, s in zip(queries, stored)])

    def _in_length_bucket(self, batch: dict) -> dict:
        """The batch's encoder texts `[B, input_length]` cut to the shortest length bucket that
        holds its longest one (`length_bucket`): the padding cut off is masked anyway, so no
        answer changes, but a 128-token input holding 40 tokens is encoded at 64. One compiled
        program per bucket. Not for MoEMoE's `resample`, whose map was learned for one length."""
        sources = self.config.sources
        if sources is not None and sources.image_to_length == "resample":
            return batch
        texts = [k for k in batch if k.startswith("encoder_") and k.endswith("_tokens")]
        used = max(_used_length(batch[k]) for k in texts)  # one length: MoEMoE's sources align
        length = length_bucket(used, self.input_length)
        return {k: v[:, :length] if k in texts else v for k, v in batch.items()}

    def _converted(self, examples: dict) -> dict:
        """The model's feature converter over one batch of task features -> the numpy batch.
        `examples`: token features as lists of 1-D arrays (any lengths), the others stacked
        `[B, ...]`. It runs through one traced TensorFlow function: its graph (the converter's
        tf.data pipeline over the rows given) is built at the first batch and run at every batch;
        token features travel padded, with their lengths."""
        tokens = [k for k, v in examples.items() if isinstance(v, list)]
        features = {k: v for k, v in examples.items() if k not in tokens}
        for k in tokens:
            lengths = np.asarray([len(ids) for ids in examples[k]], np.int32)
            padded = np.zeros((len(lengths), lengths.max(initial=0)), np.int32)
            for ids, out in zip(examples[k], padded):
                out[:len(ids)] = ids
            features[k], features[f"{k}{_LENGTH}"] = padded, lengths
        if self._converter is None:
            self._converter = self._converter_function(features, list(examples), tokens)
        return {k: v.numpy() for k, v in self._converter(features).items()}

    def _converter_function(self, features: dict, names: list[str],
                            tokens: list[str]) -> Callable[[dict], dict]:
        """The feature converter as a `tf.function` over batches shaped as `features` (the task
        features `names`; those in `tokens` `[B, longest]` padded, with `<name>_length` `[B]`)."""
        signature = {k: tf.TensorSpec((None,) + ((None,) if k in tokens else v.shape[1:]),
                                      tf.as_dtype(v.dtype)) for k, v in features.items()}
        converter = self.model.FEATURE_CONVERTER_CLS(pack=False)
        lengths = {"inputs": self.input_length, "targets": self.target_length}

        def unpadded(row):
            return {k: row[k][:row[f"{k}{_LENGTH}"]] if k in tokens else row[k] for k in names}

        @tf.function(input_signature=[signature], autograph=False)
        def convert(batch):
            rows = tf.data.Dataset.from_tensor_slices(batch).map(unpadded)
            return converter(rows, lengths).batch(self.batch_size).get_single_element()
        return convert

    def _title_tokens(self, query: Query) -> np.ndarray:
        return np.asarray(list(self.vocabulary.encode(query.title))
                          + [self.vocabulary.eos_id], np.int32)[:self.input_length]

    def _tokens(self, query: Query) -> np.ndarray:
        """The encoder text's tokens: MMT4's prompted text, or MoEMoE's first text source."""
        if self.asks_questions:
            first = self.text_sources[0]
            return self._encode(query.source_text(first), query, _fields(first))
        return self._encode(query.text, query, "title + description + prompt")

    def _encode(self, text: str, query: Query, what: str) -> np.ndarray:
        ids = list(self.vocabulary.encode(text)) + [self.vocabulary.eos_id]
        if len(ids) > self.input_length:
            raise InputError(f"record {query.record!r}: {what} are {len(ids)} tokens, more than "
                             f"input_length={self.input_length}; shorten the text or raise "
                             "input_length")
        return np.asarray(ids, np.int32)


class _SortedWindow:
    """A window of `Predictor.predict_queries`: its queries, their order by `length`, and the
    predictions placed so far (they come in that order, less the queries left out)."""

    def __init__(self, queries: list[Query], length: Callable[[Query], int]):
        self.queries, self.predictions, self.next = queries, {}, 0
        self.order = sorted(range(len(queries)), key=lambda i: length(queries[i]))  # stable

    def sorted(self) -> Iterator[Query]:
        return (self.queries[i] for i in self.order)

    def place(self, query: Query, prediction: Prediction) -> bool:
        """Places the prediction of the next query in order that is `query` (those before it were
        left out); False when none is: `query` is of a later window."""
        while self.next < len(self.order) and self.queries[self.order[self.next]] is not query:
            self.next += 1
        if self.next == len(self.order):
            return False
        self.predictions[self.order[self.next]] = prediction
        self.next += 1
        return True

    def in_order(self) -> Iterator[tuple[Query, Prediction]]:
        return ((self.queries[i], self.predictions[i]) for i in sorted(self.predictions))


_LENGTH = "_length"  # a token feature's lengths, `_converted`'s


def _distinct_images(queries: list[Query]) -> tuple[list[bytes], np.ndarray]:
    """The distinct images of `queries` and, for each query, the index of its own among them."""
    position = {image: i for i, image in enumerate(dict.fromkeys(q.image for q in queries))}
    return list(position), np.asarray([position[q.image] for q in queries], np.int64)


def length_bucket(length: int, most: int, least: int = 8) -> int:
    """The padded length of a batch whose longest text is `length` tokens: the next power of two,
    at least `least`, at most `most`."""
    return min(most, max(least, 1 << max(length - 1, 0).bit_length()))


def _used_length(tokens: np.ndarray) -> int:
    """`[B, L]` padded token ids -> the position after the last non-padding id of any row."""
    columns = np.flatnonzero(np.any(tokens != 0, axis=0))
    return int(columns[-1]) + 1 if columns.size else 1


def _fields(text_source: str) -> str:
    """What a text source holds, for messages: "title + description + ..."."""
    return " + ".join(field.replace("_", " ") for field in prompts.TEXT_SOURCES[text_source])


def _as_input_error(query: Query, error: Exception) -> InputError:
    """A query's error as an `InputError` naming its record (TensorFlow's decode errors name none)."""
    if isinstance(error, InputError):
        return error
    reason = (getattr(error, "message", "") or str(error)).strip().splitlines()
    return InputError(f"record {query.record!r}: field 'image': does not decode: "
                      f"{reason[0] if reason else type(error).__name__}")


def image_bytes(image, record: str) -> bytes:
    """Any image form `Predictor.predict` takes -> the bytes a catalog would store for it
    (`records.stored_image`: upright, 8-bit, capped at `records.MAX_IMAGE_SIDE`)."""
    if image is None:
        return b""
    if isinstance(image, (str, os.PathLike)):
        source = f"file {os.fspath(image)!r}"
        try:
            with open(image, "rb") as f:
                image = f.read()
        except OSError as e:
            raise InputError(f"record {record!r}: field 'image': cannot read {os.fspath(image)}: "
                             f"{e.strerror}") from None
    elif isinstance(image, bytes):
        source = "the given bytes"
    elif isinstance(image, Image.Image):
        source = "the given PIL image"
    else:
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise InputError(f"record {record!r}: field 'image': an image array must be uint8 "
                             f"[height, width, 3], got {pixels.dtype} {list(pixels.shape)}")
        image, source = Image.fromarray(pixels), "the given array"
    try:
        return records.stored_image(image, source=source)
    except ValueError as e:
        raise InputError(f"record {record!r}: field 'image': {e}") from None
