"""Faults in the middle of `data convert/generate --force` and `infer`: an existing catalog survives a
failed rewrite, a failed conversion leaves no folders, and `infer --on-error skip` leaves out only the
bad record (never its batch), with repeated ids refused. Each fault is one `error:` line, exit 2."""
import json
import os

import pytest
import tensorflow_datasets as tfds

from mmt_jax import main
from mmt_jax.data import catalog, tfds_catalog


def _jsonl(path, products) -> str:
    path.write_text("".join(json.dumps(p) + "\n" for p in products))
    return str(path)


OLD = [{"id": f"old{i}", "title": f"red cotton shirt {i}"} for i in range(3)]
NEW = [{"id": f"new{i}", "title": f"blue denim trousers {i}"} for i in range(2)]


def _stored_ids(out: str, name: str = "catalog") -> list[str]:
    return sorted(ex["id"].decode() for ex in tfds.as_numpy(
        tfds.load(f"product_catalog/{name}", data_dir=out, split="all")))


def _one_error(err: str) -> str:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture
def converted(tmp_path, capsys):
    """`--out` holding the catalog "catalog" of the OLD products."""
    out = str(tmp_path / "out")
    assert main.run(["data", "convert", "--jsonl", _jsonl(tmp_path / "old.jsonl", OLD),
                     "--out", out]) == 0
    capsys.readouterr()
    return out


def test_force_with_bad_records_keeps_the_old_catalog(converted, tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", NEW + [{"id": "x", "titel": "typo"}])
    assert main.run(["data", "convert", "--jsonl", bad, "--out", converted, "--force"]) == 2
    assert "1 bad record(s); nothing was written" in _one_error(capsys.readouterr().err)
    assert _stored_ids(converted) == ["old0", "old1", "old2"]
    assert os.listdir(converted) == ["product_catalog"]  # no staging directory left


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_force_interrupted_while_writing_keeps_the_old_catalog(converted, tmp_path, capsys,
                                                               monkeypatch, fault):
    def products_then_fault(self, line_numbers):
        yield from list(original(self, line_numbers))[:1]
        raise fault("disk on fire")
    original = tfds_catalog.ProductCatalog._jsonl_products
    monkeypatch.setattr(tfds_catalog.ProductCatalog, "_jsonl_products", products_then_fault)
    args = ["data", "convert", "--jsonl", _jsonl(tmp_path / "new.jsonl", NEW), "--out", converted,
            "--force"]
    if fault is KeyboardInterrupt:
        assert main.run(args) == 2
        assert "interrupted: nothing was written" in _one_error(capsys.readouterr().err)
    else:
        with pytest.raises(RuntimeError, match="disk on fire"):  # a bug, not a user's error
            main.run(args)
    assert _stored_ids(converted) == ["old0", "old1", "old2"]
    assert os.listdir(converted) == ["product_catalog"]


def test_force_swaps_in_a_whole_new_catalog(converted, tmp_path, capsys):
    new = _jsonl(tmp_path / "new.jsonl", NEW)
    assert main.run(["data", "convert", "--jsonl", new, "--out", converted]) == 0  # reused as is
    assert _stored_ids(converted) == ["old0", "old1", "old2"]
    assert main.run(["data", "convert", "--jsonl", new, "--out", converted, "--force"]) == 0
    assert f"catalog {converted}/product_catalog/catalog/1.0.0: train 2" in capsys.readouterr().out
    assert _stored_ids(converted) == ["new0", "new1"]
    assert os.listdir(converted) == ["product_catalog"]
    assert os.listdir(os.path.join(converted, "product_catalog", "catalog")) == ["1.0.0"]


def test_a_kill_between_the_two_renames_of_a_swap_is_repaired_by_the_next_run(converted,
                                                                             tmp_path, capsys):
    """SIGKILL runs no handler: the old catalog is left inside the staging folder, moved aside by
    the swap's first rename. The next run on that --out puts it back before anything else."""
    final = os.path.join(converted, "product_catalog", "catalog", "1.0.0")
    staging = os.path.join(converted, ".product_catalog-catalog.incomplete-killed")
    os.makedirs(staging)
    os.rename(final, os.path.join(staging, "replaced"))
    new = _jsonl(tmp_path / "new.jsonl", NEW)
    assert main.run(["data", "convert", "--jsonl", new, "--out", converted]) == 0  # no --force
    assert f"restored catalog {final}" in capsys.readouterr().out
    assert _stored_ids(converted) == ["old0", "old1", "old2"]
    assert os.listdir(converted) == ["product_catalog"]


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_failed_first_conversion_leaves_no_folders(tmp_path, capsys, out_exists):
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "x", "titel": "typo"}])
    assert main.run(["data", "convert", "--jsonl", bad, "--out", str(out)]) == 2
    _one_error(capsys.readouterr().err)
    assert os.listdir(out) == [] if out_exists else not out.exists()


def test_generate_force_interrupted_keeps_the_old_catalog(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    args = ["data", "generate", "--out", out, "--num-products", "8", "--image-size", "16",
            "--num-shards", "1"]
    assert main.run(args) == 0
    name = tfds_catalog.embedded_config(8, 0, 16).name
    before = _stored_ids(out, name)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(catalog, "make_product", interrupted)
    assert main.run(args + ["--force"]) == 2
    assert "interrupted" in _one_error(capsys.readouterr().err)
    assert _stored_ids(out, name) == before and len(before) == 8
    assert os.listdir(out) == ["product_catalog"]


# ---- infer ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random T5.1.1 with the catalog vocabulary's size, converted as tests/test_main.py does
    (no training: only the bookkeeping around predictions is tested here)."""
    from mmt_jax.data import vocabulary
    from tests.hf_reference import build_hf_t5, save_hf_checkpoint
    hf = save_hf_checkpoint(build_hf_t5("t5_1_1", vocab_size=vocabulary.vocabulary().vocab_size),
                            str(tmp_path_factory.mktemp("hf")), "t5_1_1")
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    assert main.run(["convert", "--from-hf", hf, "--to", path]) == 0
    return path


PRODUCTS = [{"id": f"p{i}", "title": f"cotton shirt {i}"} for i in range(6)]
LONG = {"id": "long", "title": "a very long title " * 20}


def _infer(checkpoint, jsonl, out, *extra):
    return main.run(["infer", "--checkpoint", checkpoint, "--input", jsonl, "--prompt", "color:",
                     "--out", str(out), "--input-length", "24", "--target-length", "4",
                     "--batch-size", "4", *extra])


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_infer_skip_leaves_out_a_too_long_record_and_keeps_its_batch(checkpoint, tmp_path, capsys):
    clean = tmp_path / "clean.jsonl"
    assert _infer(checkpoint, _jsonl(clean, PRODUCTS), tmp_path / "clean.out") == 0
    with_long = _jsonl(tmp_path / "long.jsonl", PRODUCTS[:2] + [LONG] + PRODUCTS[2:])
    out = tmp_path / "predictions.jsonl"
    assert _infer(checkpoint, with_long, out, "--on-error", "skip") == 0
    err = capsys.readouterr().err
    assert "skipped prompt 'color:' of record 'long': title + description + prompt are" in err
    assert "more than input_length=24" in err and "Traceback" not in err
    assert _lines(out) == _lines(tmp_path / "clean.out")  # every other product, as if alone

    out.write_text("earlier results\n")
    assert _infer(checkpoint, with_long, out) == 2  # --on-error fail
    assert "record 'long'" in _one_error(capsys.readouterr().err)
    assert out.read_text() == "earlier results\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".infer-")]


def test_predictor_skip_isolates_an_error_raised_inside_a_batch(checkpoint, monkeypatch):
    from mmt_jax.errors import InputError
    from mmt_jax.predictor import Predictor, Query
    predictor = Predictor.from_checkpoint(checkpoint, input_length=24, target_length=4,
                                          batch_size=4)
    queries = [Query(f"q{i}", "color:", f"shirt {i}") for i in range(6)]
    expected = list(predictor.predict_queries(queries))
    batch = predictor._batch

    def batch_that_cannot_take_q2(chunk):
        if any(q.record == "q2" for q in chunk):
            raise InputError("record 'q2': field 'image': does not decode")
        return batch(chunk)
    monkeypatch.setattr(predictor, "_batch", batch_that_cannot_take_q2)
    with pytest.raises(InputError):
        list(predictor.predict_queries(queries))
    skipped = []
    got = list(predictor.predict_queries(queries, on_error=lambda q, e: skipped.append((q, e))))
    assert [q.record for q, _ in skipped] == ["q2"] and "does not decode" in str(skipped[0][1])
    assert [(q.record, p) for q, p in got] == [(q.record, p) for q, p in expected
                                               if q.record != "q2"]

    # TensorFlow's decode error names no record; without on_error the batch is split to name it.
    import tensorflow as tf

    def batch_whose_q2_image_does_not_decode(chunk):
        if any(q.record == "q2" for q in chunk):
            raise tf.errors.InvalidArgumentError(None, None, "Unknown image file format")
        return batch(chunk)
    monkeypatch.setattr(predictor, "_batch", batch_whose_q2_image_does_not_decode)
    with pytest.raises(InputError, match="record 'q2': field 'image': does not decode: Unknown"):
        list(predictor.predict_queries(queries))


def test_predictor_batches_by_length_and_answers_in_the_order_given(checkpoint, monkeypatch):
    from mmt_jax.predictor import Predictor, Query
    long = "cotton shirt with long sleeves and a collar, made to last for years and years, size"
    queries = [Query(f"q{i}", "color:", f"{long} {i}" if i % 2 else f"shirt {i}")
               for i in range(8)]
    sorted_, in_order = (Predictor.from_checkpoint(checkpoint, input_length=64, target_length=4,
                                                   batch_size=4, sort_window=window)
                         for window in (16, 1))
    widths = {}
    for predictor in (sorted_, in_order):
        def batch_recording_its_width(chunk, predictor=predictor, batch=predictor._batch):
            built = batch(chunk)
            widths.setdefault(predictor, []).append(
                ([q.record for q in chunk], built["encoder_input_tokens"].shape[1]))
            return built
        monkeypatch.setattr(predictor, "_batch", batch_recording_its_width)
    got, expected = list(sorted_.predict_queries(queries)), list(in_order.predict_queries(queries))
    # the short texts batched together, at a shorter bucket than the mixed batches' longest
    assert [records for records, _ in widths[sorted_]] == [["q0", "q2", "q4", "q6"],
                                                           ["q1", "q3", "q5", "q7"]]
    assert widths[sorted_][0][1] < widths[sorted_][1][1] == widths[in_order][0][1]
    # answered in the order given, as without sorting
    assert [q.record for q, _ in got] == [q.record for q in queries]
    for (_, one), (_, other) in zip(got, expected):
        assert one.text == other.text and one.score == pytest.approx(other.score, abs=1e-5)


def test_infer_refuses_repeated_ids_or_skips_the_later_one(checkpoint, tmp_path, capsys):
    jsonl = _jsonl(tmp_path / "dup.jsonl",
                   PRODUCTS[:2] + [{"id": "p0", "title": "another product"}] + PRODUCTS[2:3])
    out = tmp_path / "predictions.jsonl"
    assert _infer(checkpoint, jsonl, out) == 2
    assert ("line 3, record 'p0': field 'id': duplicate of line 1"
            in _one_error(capsys.readouterr().err))
    assert not out.exists()
    assert _infer(checkpoint, jsonl, out, "--on-error", "skip") == 0
    assert "skipped line 3, record 'p0': field 'id': duplicate of line 1" in capsys.readouterr().err
    rows = _lines(out)
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
