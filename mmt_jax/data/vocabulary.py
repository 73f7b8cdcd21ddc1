"""The catalog SentencePiece vocabulary, with T5's conventions.

`catalog_spm.model` (shipped beside this file) is a BPE SentencePiece model trained on the
embedded catalog's text by `train_catalog_vocabulary` with the settings below; `mmt-jax data vocab
--out F` rebuilds it byte for byte. Like T5's vocabulary it has pad 0, EOS 1, UNK 2 and no BOS, and
`seqio.SentencePieceVocabulary(path, extra_ids=100)` adds `<extra_id_0>` ... `<extra_id_99>` as the
last 100 ids (`<extra_id_i>` = vocab_size - 1 - i). Byte fallback turns characters the catalog never
showed into byte pieces instead of UNK, so users' own text survives a round trip.

A user's T5 SentencePiece model works in its place: pass its path wherever a vocabulary is asked for
(`tasks.register_catalog_tasks(vocabulary=...)`, gin `VOCABULARY`).
"""
import io
import os
from typing import Iterator

import seqio
import sentencepiece as spm

from mmt_jax.data import catalog

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "catalog_spm.model")
EXTRA_IDS = 100
# What the shipped model was trained with; `train_catalog_vocabulary` defaults to these.
TRAINING_PRODUCTS = 20_000
VOCAB_SIZE = 768  # pad, EOS, UNK, 256 byte pieces and 509 learned pieces; + 100 sentinels = 868 ids


def vocabulary(path: str | None = None) -> seqio.SentencePieceVocabulary:
    """The catalog vocabulary (or a user's T5 SentencePiece model at `path`) with 100 sentinels."""
    return seqio.SentencePieceVocabulary(path or DEFAULT_PATH, extra_ids=EXTRA_IDS)


def catalog_sentences(num_products: int, seed: int = 0) -> Iterator[str]:
    """The embedded catalog's text, one line per title, description, bullet point and value, plus
    the prompts and answers the tasks add."""
    for product in catalog.generate_catalog(num_products, seed, image_size=16):
        yield product.title
        yield product.description
        yield from product.bullet_points
        yield product.product_type
        yield from (f"{name}: {value}" for name, value in sorted(product.attributes.items()))
        yield f"title: match: {'yes' if len(product.title) % 2 else 'no'}"


def train_catalog_vocabulary(out_path: str, num_products: int | None = None,
                             vocab_size: int | None = None, seed: int = 0) -> str:
    """Trains the BPE model on the catalog text (its 275 distinct words are too few for SentencePiece's
    unigram trainer, which then stops at ~280 pieces and splits words like "color"), deterministically (one thread, all sentences,
    no sampling), and writes it to `out_path`."""
    model = io.BytesIO()  # in memory: a file path would be recorded in the model and differ per run
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line.replace("\n", " ") for line in
                           catalog_sentences(num_products or TRAINING_PRODUCTS, seed)),
        model_writer=model, model_type="bpe", vocab_size=vocab_size or VOCAB_SIZE,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc", input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
    return out_path
