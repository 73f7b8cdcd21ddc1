"""The shipped catalog vocabulary: T5 conventions, lossless round trips, reproducible from the code."""
import sentencepiece as spm

from mmt_jax.data import catalog, vocabulary


def test_t5_conventions_and_sentinels():
    sp = spm.SentencePieceProcessor(model_file=vocabulary.DEFAULT_PATH)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    vocab = vocabulary.vocabulary()
    assert vocab.vocab_size == sp.get_piece_size() + 100
    assert vocab.pad_id == 0 and vocab.eos_id == 1 and vocab.unk_id == 2
    assert vocab.decode([vocab.vocab_size - 1]) == "<extra_id_0>"
    assert vocab.decode([vocab.vocab_size - 100]) == "<extra_id_99>"


def test_round_trips_catalog_and_unseen_text():
    vocab = vocabulary.vocabulary()
    for product in catalog.generate_catalog(50, seed=11, image_size=16):
        for text in (product.title, product.description, *product.attributes.values()):
            ids = vocab.encode(text)
            assert 2 not in ids and vocab.decode(ids) == text
    # Prompts and answers are single pieces; characters never seen fall back to bytes, not UNK.
    for word in ("color", "match", "yes", "no", "title", "sleeve"):
        assert len(vocab.encode(word)) == 1, word
    text = "Größe 42 — naïve café ☃"
    assert 2 not in vocab.encode(text) and vocab.decode(vocab.encode(text)) == text


def test_rebuilding_gives_the_shipped_model(tmp_path):
    rebuilt = vocabulary.train_catalog_vocabulary(str(tmp_path / "catalog_spm.model"))
    with open(rebuilt, "rb") as a, open(vocabulary.DEFAULT_PATH, "rb") as b:
        assert a.read() == b.read()


def test_vocab_command_writes_a_loadable_model(tmp_path, capsys):
    from mmt_jax import main
    out = str(tmp_path / "small.model")
    assert main.run(["data", "vocab", "--out", out, "--num-products", "200", "--vocab-size", "400"]) == 0
    assert out in capsys.readouterr().out
    vocab = vocabulary.vocabulary(out)
    assert vocab.vocab_size == 500 and vocab.decode(vocab.encode("navy blue shirt")) == "navy blue shirt"
