"""Malformed weight files end in a clear error naming the file, never a crash or garbage values.

The PyTorch `.pth` reader (`checkpoints/torch_pickle.py`) is given crafted pickles whose tensor views point
outside their storage (negative offset, negative stride with a large size, overflowing sizes), and a seeded
fuzz of a real `torch.save` checkpoint (random bytes, truncations, bit flips in the raw file, in the pickle
and in the data entries, wrong dtype names, random views). The Hugging Face reader (`load_hf_t5`) is given
truncated or random safetensors, offsets past the end, wrong dtypes and shapes, and a config.json that is
not JSON.

    .venv/bin/python -m pytest tests/test_malformed_weights.py -q   # ~5 s on 2 CPUs
"""
import io
import json
import math
import pickle
import pickletools
import random
import re
import struct
import time
import zipfile

import numpy as np
import pytest

from mmt_jax.checkpoints import torch_pickle
from mmt_jax.checkpoints.torch_pickle import TorchPickleError

# --- crafted checkpoints: the pickle written opcode by opcode, so malicious values are exact ---------


def _ops(obj) -> bytes:
    """Pickle opcodes that push `obj` (a plain value), without PROTO and STOP."""
    return pickletools.optimize(pickle.dumps(obj, protocol=2))[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor_ops(storage_type, key, numel, offset, size, stride, view=...) -> bytes:
    pid_fields = [_ops("storage"), _global("torch", storage_type), _ops(key), _ops("cpu"), _ops(numel)]
    if view is not ...:  # legacy persistent ids carry view metadata, None for a whole storage
        pid_fields.append(_ops(view))
    pid = b"(" + b"".join(pid_fields) + b"tQ"  # MARK ... TUPLE BINPERSID
    args = pid + _ops(offset) + _ops(size) + _ops(stride) + _ops(False)
    args += _global("collections", "OrderedDict") + b")R"  # backward_hooks = OrderedDict()
    return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"


def _state_dict_pickle(entries) -> bytes:
    """`{name: tensor}` as a protocol-2 pickle; `entries` are (name, kwargs of `_tensor_ops`)."""
    body = b"".join(_ops(name) + _tensor_ops(**kw) + b"s" for name, kw in entries)
    return b"\x80\x02}" + body + b"."


def _write_zip(path, pkl: bytes, storages: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


def _write_legacy(path, pkl: bytes, storages: dict[str, tuple[int, bytes]]):
    out = (pickle.dumps(torch_pickle.LEGACY_MAGIC_NUMBER, 2) + pickle.dumps(1001, 2)
           + pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2) + pkl
           + pickle.dumps(list(storages), 2))
    for numel, data in storages.values():
        out += struct.pack("<q", numel) + data
    path.write_bytes(out)


BASE = np.arange(12, dtype=np.float32)  # storage "0" of every crafted checkpoint


def _crafted(tmp_path, legacy=False, storage_type="FloatStorage", data=BASE.tobytes(), numel=12,
             name="enc.weight", **view):
    kw = dict(storage_type=storage_type, key="0", numel=numel, offset=0, size=(3, 4), stride=(4, 1))
    kw.update(view)
    path = tmp_path / ("crafted.legacy.pth" if legacy else "crafted.pth")
    if legacy:
        kw.setdefault("view", None)
        _write_legacy(path, _state_dict_pickle([(name, kw)]), {"0": (numel, data)})
    else:
        _write_zip(path, _state_dict_pickle([(name, kw)]), {"0": data})
    return path


def _assert_clear(path, match=None, fn=torch_pickle.load_state_dict):
    with pytest.raises(TorchPickleError) as info:
        fn(path)
    assert str(path) in str(info.value)
    if match:
        assert re.search(match, str(info.value)), str(info.value)
    return info.value


@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_checkpoint_reads_like_torch(tmp_path, legacy):
    path = _crafted(tmp_path, legacy=legacy, size=(4, 3), stride=(1, 4), offset=0)
    out = torch_pickle.load_state_dict(path)
    np.testing.assert_array_equal(out["enc.weight"], BASE.reshape(3, 4).T)
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(torch.load(path, weights_only=True)["enc.weight"].numpy(),
                                  out["enc.weight"])


# A zip entry states its byte count; a legacy record is read by its element count, so a wrong count shows
# as a truncation or as bytes left over.
_SIZE_MISMATCH = r"holds 48 bytes|truncated in storage '0'|unexpected bytes after the last storage"
VIEW_ATTACKS = {
    # name: (view overrides, a pattern the error must match)
    "negative_offset": (dict(offset=-4, size=(4,), stride=(1,)), "negative"),
    "negative_stride_large_size": (dict(offset=11, size=(2**40,), stride=(-1,)), "negative"),
    "negative_stride_reads_before_storage": (dict(offset=11, size=(2**24,), stride=(-64,)), "negative"),
    "negative_stride_in_bounds": (dict(offset=11, size=(12,), stride=(-1,)), "negative"),
    "negative_size": (dict(size=(-3, 4)), "negative"),
    "huge_sizes_overflow_int64": (dict(size=(2**40, 2**40), stride=(0, 0)), "more elements"),
    "huge_size_stride_0": (dict(size=(2**62,), stride=(0,)), "more elements"),
    "size_past_end": (dict(size=(4, 4)), "reaches element 15"),
    "offset_past_end": (dict(offset=9, size=(4,), stride=(1,)), "reaches element 12"),
    "stride_past_end": (dict(size=(2, 2), stride=(100, 1)), "reaches element"),
    "scalar_past_end": (dict(offset=12, size=(), stride=()), "reaches element 12"),
    "empty_offset_past_end": (dict(offset=13, size=(0,), stride=(1,)), "past the end"),
    "size_stride_lengths_differ": (dict(size=(3, 4), stride=(1,)), "differ in length"),
    "float_size": (dict(size=(3.0, 4)), "not an integer"),
    "bool_offset": (dict(offset=True), "not an integer"),
    "size_not_a_tuple": (dict(size="abc"), "not a tuple"),
    "too_many_dims": (dict(size=(1,) * 100, stride=(1,) * 100), "dimensions"),
    "huge_offset": (dict(offset=2**70), "reaches element"),
    "numel_larger_than_entry": (dict(numel=13), _SIZE_MISMATCH),
    "numel_smaller_than_entry": (dict(numel=2, size=(2,), stride=(1,)), _SIZE_MISMATCH),
    "negative_numel": (dict(numel=-1), "element count"),
    "wrong_dtype_name_itemsize": (dict(storage_type="LongStorage"), _SIZE_MISMATCH),
    "unknown_dtype_name": (dict(storage_type="FluatStorage"), "torch.FluatStorage"),
    "bool_storage_with_garbage": (dict(storage_type="BoolStorage", numel=48, size=(48,), stride=(1,)),
                                  "other than 0 and 1"),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("attack", sorted(VIEW_ATTACKS))
def test_tensor_views_are_checked_against_the_storage(tmp_path, attack, legacy):
    view, pattern = VIEW_ATTACKS[attack]
    err = _assert_clear(_crafted(tmp_path, legacy=legacy, **view), pattern)
    if "numel" not in view and "storage_type" not in view:  # storage errors name the storage instead
        assert "enc.weight" in str(err)


@pytest.mark.parametrize("view_metadata", [("0", -4, 4), ("0", 10, 4), ("0", 0, -1), ("0", 2**63, 1),
                                           ("0", 0.5, 4), "nonsense"])
def test_legacy_storage_views_are_checked(tmp_path, view_metadata):
    _assert_clear(_crafted(tmp_path, legacy=True, size=(2,), stride=(1,), view=view_metadata))


def test_size_one_dimension_may_have_any_stride(tmp_path):
    # torch leaves the stride of a size-1 dimension arbitrary; it never steps, so it is not an overrun.
    out = torch_pickle.load_state_dict(_crafted(tmp_path, size=(1, 4), stride=(2**62, 1), offset=8))
    np.testing.assert_array_equal(out["enc.weight"], BASE[8:].reshape(1, 4))


def test_expanded_view_is_read_only_not_allocated(tmp_path):
    out = torch_pickle.load_state_dict(_crafted(tmp_path, size=(2**20, 2**20), stride=(0, 0), offset=5))
    w = out["enc.weight"]
    assert w.shape == (2**20, 2**20) and not w.flags.writeable and w[123, 456] == 5.0


def test_non_tensor_entries_and_missing_files(tmp_path):
    bare = tmp_path / "bare.pth"
    pid = b"(" + _ops("storage") + _global("torch", "FloatStorage") + _ops("0") + _ops("cpu") + _ops(12)
    _write_zip(bare, b"\x80\x02}" + _ops("w") + pid + b"tQs.", {"0": BASE.tobytes()})
    _assert_clear(bare, "bare storage")
    listed = tmp_path / "list.pth"
    _write_zip(listed, pickle.dumps([1, 2], 2), {})
    _assert_clear(listed, "expected a state dict")
    no_entry = tmp_path / "no_entry.pth"
    _write_zip(no_entry, _state_dict_pickle([("w", dict(storage_type="FloatStorage", key="7", numel=12,
                                                        offset=0, size=(12,), stride=(1,)))]), {})
    _assert_clear(no_entry, "archive/data/7")
    with pytest.raises(FileNotFoundError):
        torch_pickle.load_state_dict(tmp_path / "absent.pth")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_memo_index_cannot_allocate_gigabytes(tmp_path, legacy):
    # A bit flip found by the fuzz: `LONG_BINPUT 2**29` made the C unpickler take 8 GiB and 15 s before
    # failing on the next byte (2**31: 32 GiB, an out-of-memory kill on most machines).
    pkl = b"\x80\x02}r\x00\x00\x00\x20."
    path = tmp_path / "memo.pth"
    if legacy:
        _write_legacy(path, pkl, {})
    else:
        _write_zip(path, pkl, {})
    start = time.perf_counter()
    _assert_clear(path, "memo index 536870912")
    assert time.perf_counter() - start < 1


# --- seeded fuzz of a real torch.save checkpoint -----------------------------------------------------


def _real_state_dict(torch):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 5, generator=g)
    return {
        "dense.kernel": big,
        "dense.kernel_t": big.t(),  # non-contiguous view of a shared storage
        "dense.row": big[2],  # offset view of the same storage
        "ids": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(3, 2, generator=g).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "f64": torch.randn(2, generator=g).double(),
        "step": torch.tensor(17, dtype=torch.int32),
        "expanded": torch.arange(3.0).expand(2, 3),
    }


def _as_numpy(sd):
    return {k: v.float().numpy() if v.dtype == v.new_empty(0).bfloat16().dtype else v.numpy()
            for k, v in sd.items()}


def _outcome(path, reference=None):
    """'error' (a clear one), 'same' (equal to `reference`) or 'read' (a different but valid result)."""
    try:
        out = torch_pickle.load_state_dict(path)
    except TorchPickleError as e:
        assert str(path) in str(e)
        return "error"
    assert all(isinstance(v, np.ndarray) for v in out.values())
    if reference is not None and out.keys() == reference.keys() and all(
            np.array_equal(out[k].astype(reference[k].dtype), reference[k], equal_nan=True) for k in out):
        return "same"
    return "read"


def _flip(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 8])):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _rezip(src: bytes, dst, change):
    """A copy of zip `src` at `dst` with `change(name, data) -> data` applied; CRCs are recomputed."""
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, change(name, zin.read(name)))


def test_fuzzed_checkpoints_end_in_clear_errors(tmp_path):
    torch = pytest.importorskip("torch")
    rng = random.Random(1234)
    sd = _real_state_dict(torch)
    reference = _as_numpy(sd)
    blobs = {}
    for fmt in ("zip", "legacy"):
        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=fmt == "zip")
        blobs[fmt] = buf.getvalue()
        path = tmp_path / f"clean.{fmt}.pth"
        path.write_bytes(blobs[fmt])
        assert _outcome(path, reference) == "same", fmt
    counts: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    path = tmp_path / "case.pth"

    def case(kind, data=None, allowed=("error",), rezip=None):
        if rezip is not None:
            _rezip(blobs["zip"], path, rezip)
        else:
            path.write_bytes(data)
        result = _outcome(path, reference)
        assert result in allowed, (kind, result)
        counts.setdefault(kind, {}).setdefault(result, 0)
        counts[kind][result] += 1

    for i in range(40):  # random bytes, some behind a zip or legacy-pickle opening
        head = rng.choice([b"", b"PK\x03\x04", blobs["legacy"][:rng.randrange(1, 40)]])
        case("random bytes", head + rng.randbytes(rng.randrange(0, 3000)))
    for fmt in ("zip", "legacy"):  # every truncation point on a spread over the file
        blob = blobs[fmt]
        for cut in sorted({0, 1, len(blob) - 1, *rng.sample(range(len(blob)), 60)}):
            case(f"truncated {fmt}", blob[:cut])
    for _ in range(80):  # raw flips: the zip's CRCs catch them, or they hit bytes that do not matter
        case("bit flips in zip file", _flip(blobs["zip"], rng), ("error", "same"))
    for _ in range(60):  # legacy files have no checksum: a flip in raw data changes values, nothing else
        case("bit flips in legacy file", _flip(blobs["legacy"], rng), ("error", "same", "read"))
    for _ in range(120):  # the pickle itself corrupted, with a valid CRC
        case("bit flips in data.pkl", allowed=("error", "same", "read"),
             rezip=lambda n, d: _flip(d, rng) if n.endswith("data.pkl") else d)
    entries = [n for n in zipfile.ZipFile(io.BytesIO(blobs["zip"])).namelist() if "/data/" in n]
    for _ in range(40):  # a data entry corrupted with a valid CRC: only values change (bools must fail)
        target = rng.choice(entries)
        case("bit flips in data entries", allowed=("error", "same", "read"),
             rezip=lambda n, d: _flip(d, rng) if n == target else d)
    names = [n.encode() for n in torch_pickle.STORAGE_DTYPES] + [b"FluatStorage", b"Storage", b"XStorage"]
    for _ in range(40):  # storage type names swapped
        new = rng.choice(names)
        case("wrong dtype names", allowed=("error", "same", "read"),
             rezip=lambda n, d: d.replace(b"FloatStorage", new) if n.endswith("data.pkl") else d)
    elapsed = time.perf_counter() - start
    total = sum(sum(c.values()) for c in counts.values())
    print(f"\n{total} fuzz cases in {elapsed:.1f}s: {counts}")
    assert total >= 500 and counts["random bytes"] == {"error": 40}


def _view_reference(base, offset, size, stride):
    """What an honest reader returns, computed one element at a time; None where a read leaves `base`."""
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride) or len(size) != len(stride):
        return None
    if math.prod(max(n, 1) for n in size) * base.itemsize > np.iinfo(np.intp).max:
        return None  # no array can have that shape
    if math.prod(size) == 0:
        return np.zeros(size, base.dtype) if offset <= base.size else None
    if math.prod(size) > 10_000:
        return "large"
    out = np.empty(size, base.dtype)
    for index in np.ndindex(*size):
        i = offset + sum(k * s for k, s in zip(index, stride))
        if i >= base.size:
            return None
        out[index] = base[i]
    return out


def test_random_views_read_exactly_the_storage_or_fail(tmp_path):
    rng = random.Random(99)
    edges = [0, 1, 2, 3, 11, 12, 13, -1, -2, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63), 2**64 + 1]
    path = tmp_path / "view.pth"
    outcomes = {"error": 0, "read": 0}
    for i in range(300):
        ndim = rng.choice([0, 1, 1, 2, 2, 3])
        pick = lambda: rng.choice(edges) if rng.random() < 0.4 else rng.randrange(0, 6)  # noqa: E731
        offset, size, stride = pick(), tuple(pick() for _ in range(ndim)), tuple(pick() for _ in range(ndim))
        if rng.random() < 0.1:
            stride = stride[:-1]
        _write_zip(path, _state_dict_pickle([("w", dict(storage_type="FloatStorage", key="0", numel=12,
                                                        offset=offset, size=size, stride=stride))]),
                   {"0": BASE.tobytes()})
        expected = _view_reference(BASE, offset, size, stride)
        try:
            got = torch_pickle.load_state_dict(path)["w"]
        except TorchPickleError as e:
            assert str(path) in str(e) and "'w'" in str(e), str(e)
            assert expected is None or isinstance(expected, str), (offset, size, stride, str(e))
            outcomes["error"] += 1
            continue
        assert expected is not None, (offset, size, stride)
        outcomes["read"] += 1
        if isinstance(expected, str):  # too many elements to check one by one: spot-check a few
            assert got.shape == size
            for _ in range(5):
                index = tuple(rng.randrange(n) for n in size)
                assert got[index] == BASE[offset + sum(k * s for k, s in zip(index, stride))]
        else:
            np.testing.assert_array_equal(got, expected, err_msg=str((offset, size, stride)))
    assert outcomes["error"] > 50 and outcomes["read"] > 50, outcomes


# --- Hugging Face safetensors checkpoints ------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path):
    from flax import traverse_util

    from mmt_jax.models.t5 import T5Config, param_shapes
    from mmt_jax.checkpoints import hf_t5

    config = T5Config(vocab_size=32, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16, num_encoder_layers=1,
                      num_decoder_layers=1)
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(config).items()}
    directory = tmp_path / "hf"
    hf_t5.save_hf_t5(traverse_util.unflatten_dict(flat, sep="/"), config, str(directory))
    hf_t5.load_hf_t5(str(directory))  # the clean checkpoint reads
    return directory


def _assert_hf_clear(directory, file, *words):
    """`load_hf_t5` raises CheckpointFormatError naming the checkpoint (and `file`, and `words`)."""
    from mmt_jax.checkpoints.hf_t5 import CheckpointFormatError, load_hf_t5

    with pytest.raises(CheckpointFormatError) as info:
        load_hf_t5(str(directory))
    message = str(info.value)
    assert str(directory) in message and (file or "") in message, message
    assert all(w in message for w in words), message


def _rewrite_safetensors(directory, change):
    """Rewrites model.safetensors via `change(header: dict, data: bytes) -> (header, data)`."""
    path = directory / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = change(json.loads(blob[8:8 + n]), blob[8 + n:])
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.5, 0.999])
def test_hf_truncated_safetensors(hf_dir, fraction):
    path = hf_dir / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * fraction)])
    _assert_hf_clear(hf_dir, "model.safetensors")


def test_hf_random_bytes_safetensors(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(random.Random(0).randbytes(5000))
    _assert_hf_clear(hf_dir, "model.safetensors")


def test_hf_offsets_past_the_end(hf_dir):
    def change(header, data):
        name = "encoder.final_layer_norm.weight"
        start, _ = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, len(data) + 4096]
        return header, data

    _rewrite_safetensors(hf_dir, change)
    _assert_hf_clear(hf_dir, "model.safetensors")


def test_hf_tensor_of_wrong_dtype(hf_dir):
    def change(header, data):  # float32 bytes relabelled int32: same size, a valid file, wrong dtype
        header["encoder.final_layer_norm.weight"]["dtype"] = "I32"
        return header, data

    _rewrite_safetensors(hf_dir, change)
    _assert_hf_clear(hf_dir, "model.safetensors", "encoder.final_layer_norm.weight", "int32")


def test_hf_tensor_of_wrong_shape(hf_dir):
    import safetensors.numpy

    path = hf_dir / "model.safetensors"
    tensors = safetensors.numpy.load_file(str(path))
    tensors["encoder.final_layer_norm.weight"] = np.ones(9, np.float32)
    safetensors.numpy.save_file(tensors, str(path))
    _assert_hf_clear(hf_dir, None, "encoder.final_layer_norm.weight", "(9,)")


@pytest.mark.parametrize("text", [b"{not json", b"", b"[1, 2]", b"\x00\xff\xfe"])
def test_hf_config_not_json(hf_dir, text):
    (hf_dir / "config.json").write_bytes(text)
    _assert_hf_clear(hf_dir, "config.json")
