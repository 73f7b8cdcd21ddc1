"""Read a PyTorch `.pth` state dict into numpy arrays without importing torch.

Both serialisations that `torch.save` has used are understood:

* legacy (torch < 1.6, and `_use_new_zipfile_serialization=False`): a stream of pickles -- the magic
  number, the protocol version, a sys-info dict, the object itself (whose storages are *persistent ids*
  `('storage', storage_type, key, location, numel[, view_metadata])`), the list of storage keys, and then
  for each key in that order an int64 element count followed by the raw little-endian bytes;
* zip (torch >= 1.6): `<prefix>/data.pkl` with persistent ids `('storage', storage_type, key, location,
  numel)` and each storage's raw bytes in `<prefix>/data/<key>`.

The unpickler is restricted: `find_class` resolves only what is needed to rebuild tensors and dicts
(`torch._utils._rebuild_tensor_v2` and friends, `torch.<Type>Storage`, `collections.OrderedDict`) and
refuses anything else with a `pickle.UnpicklingError` naming it, so a checkpoint cannot run code
(`os.system`, `builtins.eval`, ...) when it is read.

Nothing the pickle says is trusted: the pickle only sees opaque storage references, and every tensor
is checked against the bytes actually read before numpy looks at them (known dtype, storage length equal
to its zip entry or legacy record, offset, sizes and strides >= 0, the highest element reachable inside
the storage, element counts numpy can hold). A file that fails any check, or that is not a PyTorch
checkpoint at all (random bytes, a truncated zip, a bad CRC), raises `TorchPickleError` naming the file
and the tensor or storage at fault.
"""
import collections
import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
import warnings
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from mmt_jax.errors import CheckpointError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
MAX_DIMS = 32  # numpy >= 1 holds at least this many; no real checkpoint comes near it.
_MAX_BYTES = np.iinfo(np.intp).max
_r = reprlib.repr  # values from the file, cut short for messages

# `torch.<Name>Storage` -> numpy dtype of its elements.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class TorchPickleError(CheckpointError, pickle.UnpicklingError):
    """A `.pth` file that is not a readable PyTorch checkpoint; names the file and, where known, the
    tensor or storage at fault."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class _Malformed(pickle.UnpicklingError):
    """Raised inside the reader; `load_torch_pickle` adds the file name."""


class _StorageType:
    """Stands for a `torch.<Name>Storage` class inside the pickle."""

    def __init__(self, name: str):
        self.name = name


class _StorageRef:
    """What a persistent id turns into: a key into the reader's own storage table, plus the element range
    of a legacy storage view. The pickle can alter it (BUILD), so it is checked when it is used."""

    def __init__(self, key: str, view: tuple | None = None):
        self.key, self.view = key, view


class _LazyTensor:
    """What `_rebuild_tensor(_v2)` returns: the pickle's raw arguments, checked in `_Storages.tensor`."""

    def __init__(self, storage, storage_offset, size, stride):
        self.storage, self.storage_offset, self.size, self.stride = storage, storage_offset, size, stride


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    del requires_grad, backward_hooks, metadata
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors (as `_LazyTensor`), storages and (Ordered)dicts; refuses every other global."""

    def __init__(self, file, persistent_load):
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}' from a PyTorch checkpoint: only tensors, "
            "storages and (ordered) dicts are allowed")

    def persistent_load(self, pid):
        return self._persistent_load(pid)


_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _unpickle(f: io.BytesIO, persistent_load):
    """The next pickle in `f`, read by `RestrictedUnpickler` once its opcodes are known to be sane.

    The C unpickler sizes its memo by the largest index a PUT names, so ten bytes saying
    `LONG_BINPUT 2**31` would make it allocate some 32 GiB. Picklers number memo entries 0, 1, 2, ... as
    objects are made, so an honest index is below the count of opcodes before it; larger ones are refused
    after a pure-Python scan that builds nothing."""
    start = f.tell()
    try:
        with warnings.catch_warnings():  # pickletools warns on bad escapes in protocol-0 strings
            warnings.simplefilter("ignore", DeprecationWarning)
            for n, (opcode, arg, pos) in enumerate(pickletools.genops(f)):
                if opcode.name in _PUTS and arg > n:
                    raise _Malformed(f"corrupt pickle: memo index {arg} at byte {pos} is out of range")
    except ValueError as e:  # unknown opcode, truncated argument, no STOP
        raise _Malformed(f"corrupt pickle: {e}") from None
    f.seek(start)
    return RestrictedUnpickler(f, persistent_load).load()


def _int(value, what: str) -> int:
    if type(value) is not int:  # bool and float are not sizes
        raise _Malformed(f"{what} is {_r(value)}, not an integer")
    return value


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)):
        raise _Malformed(f"{what} is {_r(values)}, not a tuple of integers")
    if len(values) > MAX_DIMS:
        raise _Malformed(f"{what} has {len(values)} dimensions; at most {MAX_DIMS} are read")
    return tuple(_int(v, what) for v in values)


class _Storages:
    """The reader's storage table: key -> (dtype, element count, flat array once its bytes are read)."""

    def __init__(self):
        self.dtypes: dict[str, np.dtype] = {}
        self.numels: dict[str, int] = {}
        self.arrays: dict[str, np.ndarray] = {}

    def declare(self, pid, n_fields: int) -> tuple[str, np.dtype, int]:
        """Checks a persistent id `('storage', type, key, location, numel[, view])`; records the storage."""
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise _Malformed(f"refusing persistent id {_r(pid)}: only storages are allowed")
        if len(pid) != n_fields:
            raise _Malformed(f"storage persistent id {_r(pid)} has {len(pid)} fields, expected {n_fields}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType) or storage_type.name not in STORAGE_DTYPES:
            raise _Malformed(f"expected a torch storage type in persistent id {_r(pid)}")
        if not isinstance(key, str):
            raise _Malformed(f"storage key {_r(key)} is not a string")
        dtype = STORAGE_DTYPES[storage_type.name]
        numel = _int(numel, f"storage {key!r}: element count")
        if numel < 0 or numel * dtype.itemsize > _MAX_BYTES:
            raise _Malformed(f"storage {key!r}: element count {numel} is impossible")
        if key in self.dtypes and (self.dtypes[key], self.numels[key]) != (dtype, numel):
            raise _Malformed(
                f"storage {key!r} is declared both as {self.numels[key]} {self.dtypes[key]} and as "
                f"{numel} {dtype} elements")
        self.dtypes[key], self.numels[key] = dtype, numel
        return key, dtype, numel

    def fill(self, key: str, data: bytes, where: str):
        """Sets storage `key` from its raw little-endian bytes, which must be exactly its declared size."""
        dtype, numel = self.dtypes[key], self.numels[key]
        if len(data) != numel * dtype.itemsize:
            raise _Malformed(f"storage {key!r} ({where}) holds {len(data)} bytes, but its persistent id "
                             f"says {numel} {dtype} elements ({numel * dtype.itemsize} bytes)")
        if dtype == np.bool_ and data.translate(None, b"\x00\x01"):
            raise _Malformed(f"storage {key!r} ({where}) of bools holds bytes other than 0 and 1")
        self.arrays[key] = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype)

    def _flat(self, ref, where: str) -> np.ndarray:
        if not isinstance(ref, _StorageRef) or not isinstance(ref.key, str):
            raise _Malformed(f"{where}: its storage is a {type(ref).__name__}, not a torch storage")
        if ref.key not in self.arrays:
            raise _Malformed(f"{where}: storage {ref.key!r} has no data in the file")
        flat = self.arrays[ref.key]
        if ref.view is None:
            return flat
        if not isinstance(ref.view, tuple) or len(ref.view) != 3:
            raise _Malformed(f"{where}: storage view {_r(ref.view)} is not (key, offset, size)")
        offset = _int(ref.view[1], f"{where}: storage view offset")
        size = _int(ref.view[2], f"{where}: storage view size")
        if offset < 0 or size < 0 or offset + size > flat.size:
            raise _Malformed(f"{where}: storage view [{offset}, {offset + size}) lies outside storage "
                             f"{ref.key!r} of {flat.size} elements")
        return flat[offset:offset + size]

    def tensor(self, lazy: _LazyTensor, where: str) -> np.ndarray:
        """The tensor as an ndarray, after checking its view against the storage's actual bytes."""
        flat = self._flat(lazy.storage, where)
        offset = _int(lazy.storage_offset, f"{where}: storage offset")
        size, stride = _ints(lazy.size, f"{where}: size"), _ints(lazy.stride, f"{where}: stride")
        view = f"{where} (size {size}, stride {stride}, offset {offset})"
        if len(size) != len(stride):
            raise _Malformed(f"{view}: size and stride differ in length")
        if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
            raise _Malformed(f"{view}: negative offset, size or stride")
        itemsize = flat.dtype.itemsize
        if math.prod(max(n, 1) for n in size) * itemsize > _MAX_BYTES:
            raise _Malformed(f"{view}: more elements than an array can hold")
        numel = math.prod(size)
        if numel == 0:
            if offset > flat.size:
                raise _Malformed(f"{view}: offset past the end of its storage of {flat.size} elements")
            return np.zeros(size, flat.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise _Malformed(f"{view}: reaches element {last} of a storage of {flat.size} elements")
        # Every step now stays inside `flat`; a dimension of size 1 never steps, whatever its stride.
        strides = tuple(s * itemsize if n > 1 else 0 for n, s in zip(size, stride))
        array = np.ndarray(size, flat.dtype, buffer=flat, offset=offset * itemsize, strides=strides)
        if numel <= flat.size:
            return array.copy()
        # More elements than the storage (an expanded view, stride 0): a read-only view, as torch gives,
        # so a small file cannot make us allocate without bound.
        array.flags.writeable = False
        return array

    def materialize(self, obj, where: str = ""):
        if isinstance(obj, _LazyTensor):
            return self.tensor(obj, f"tensor {where or '<top level>'!r}")
        if isinstance(obj, dict):
            return type(obj)((k, self.materialize(v, f"{where}.{k}" if where else str(k)))
                             for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.materialize(v, f"{where}[{i}]") for i, v in enumerate(obj))
        if isinstance(obj, (_StorageRef, _StorageType)):
            raise _Malformed(f"entry {where!r} is a bare storage, not a tensor")
        return obj


def _no_persistent_ids(pid):
    raise _Malformed(f"unexpected persistent id {_r(pid)} in a checkpoint header")


def _load_legacy(data: bytes) -> Any:
    f = io.BytesIO(data)

    def header():
        return _unpickle(f, _no_persistent_ids)

    if header() != LEGACY_MAGIC_NUMBER:
        raise _Malformed("not a PyTorch checkpoint: wrong magic number")
    protocol = header()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise _Malformed(f"unsupported PyTorch legacy protocol version {_r(protocol)}")
    sys_info = header()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise _Malformed("big-endian PyTorch checkpoints are not supported")

    storages = _Storages()

    def persistent_load(pid):
        key, _, _ = storages.declare(pid, 6)
        view = pid[5]
        if view is not None and not (isinstance(view, tuple) and len(view) == 3):
            raise _Malformed(f"storage {key!r}: view metadata {_r(view)} is not (key, offset, size)")
        return _StorageRef(key, view)

    result = _unpickle(f, persistent_load)
    keys = _unpickle(f, _no_persistent_ids)
    if not isinstance(keys, list):
        raise _Malformed(f"the list of storage keys is a {type(keys).__name__}")
    for key in keys:
        if not isinstance(key, str) or key not in storages.dtypes:
            raise _Malformed(f"storage key {_r(key)} in the key list is not used by any tensor")
        if key in storages.arrays:
            raise _Malformed(f"storage {key!r} is listed twice")
        record = f.read(8)
        if len(record) != 8:
            raise _Malformed(f"checkpoint truncated before storage {key!r}")
        (numel,) = struct.unpack("<q", record)
        if numel != storages.numels[key]:
            raise _Malformed(f"storage {key!r} has {numel} elements in its record, but "
                             f"{storages.numels[key]} in its persistent id")
        nbytes = numel * storages.dtypes[key].itemsize
        if nbytes > len(data) - f.tell():
            raise _Malformed(f"checkpoint truncated in storage {key!r}")
        storages.fill(key, f.read(nbytes), "legacy record")
    if f.tell() != len(data):
        raise _Malformed(f"{len(data) - f.tell()} unexpected bytes after the last storage")
    return storages.materialize(result)


def _load_zip(f) -> Any:
    with zipfile.ZipFile(f) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise _Malformed("zip file without <prefix>/data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise _Malformed("big-endian PyTorch checkpoints are not supported")
        storages = _Storages()

        def persistent_load(pid):
            key, dtype, numel = storages.declare(pid, 5)
            if key not in storages.arrays:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise _Malformed(f"storage {key!r} has no zip entry {entry}")
                # Checked before reading, so a forged entry size cannot make us inflate without bound.
                if archive.getinfo(entry).file_size != numel * dtype.itemsize:
                    raise _Malformed(
                        f"storage {key!r} ({entry}) holds {archive.getinfo(entry).file_size} bytes, "
                        f"but its persistent id says {numel} {dtype} elements")
                storages.fill(key, archive.read(entry), entry)
            return _StorageRef(key)

        result = _unpickle(io.BytesIO(archive.read(pkl[0])), persistent_load)
    return storages.materialize(result)


def load_torch_pickle(path: str | os.PathLike) -> Any:
    """The object saved with `torch.save` at `path`, with every tensor as a numpy array.

    Raises `TorchPickleError` (naming `path`) for anything that is not a well-formed checkpoint."""
    name = os.fspath(path)
    with open(path, "rb") as f:  # a missing file stays FileNotFoundError
        try:
            if zipfile.is_zipfile(f):
                f.seek(0)
                return _load_zip(f)
            f.seek(0)
            data = f.read()
            if data.startswith(b"PK\x03\x04"):
                raise _Malformed("truncated or corrupt zip archive (no central directory)")
            return _load_legacy(data)
        except _Malformed as e:
            raise TorchPickleError(name, str(e)) from None
        except pickle.UnpicklingError as e:  # find_class's refusals, and pickle's own complaints
            raise TorchPickleError(name, str(e)) from e
        except Exception as e:  # noqa: BLE001 -- any failure decoding untrusted bytes is a malformed file
            raise TorchPickleError(name, f"not a readable PyTorch checkpoint: {type(e).__name__}: {e}") \
                from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.pth` state dict as `{name: ndarray}`; nested dicts are flattened with `.` between keys."""
    obj = load_torch_pickle(path)
    if not isinstance(obj, dict):
        raise TorchPickleError(os.fspath(path), f"expected a state dict, found {type(obj).__name__}")
    flat: dict[str, np.ndarray] = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            elif isinstance(value, np.ndarray):
                flat[name] = value
            else:
                raise TorchPickleError(os.fspath(path), f"entry {name!r} is a {type(value).__name__}, "
                                                        "not a tensor")

    walk("", obj)
    return flat
