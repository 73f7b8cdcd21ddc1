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
"""
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

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


class _StorageType:
    """Stands for a `torch.<Name>Storage` class inside the pickle."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A storage whose bytes may arrive after the pickle (legacy format); `array` is set once read."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.array: np.ndarray | None = None


class _StorageView:
    """A legacy view into a root storage: elements `[offset, offset + size)`."""

    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, offset, size
        self.dtype = root.dtype

    @property
    def array(self):
        return None if self.root.array is None else self.root.array[self.offset:self.offset + self.size]


class _LazyTensor:
    """What `_rebuild_tensor_v2` returns: materialised into an ndarray once all storages are read."""

    def __init__(self, storage, storage_offset: int, size, stride):
        self.storage, self.storage_offset = storage, int(storage_offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialize(self) -> np.ndarray:
        flat = self.storage.array
        if flat is None:
            raise pickle.UnpicklingError("a tensor refers to a storage whose bytes were never read")
        if not self.size:
            return np.array(flat[self.storage_offset], dtype=flat.dtype)
        needed = self.storage_offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, flat.dtype)
        if needed > flat.size:
            raise pickle.UnpicklingError(
                f"tensor of size {self.size} and stride {self.stride} at offset {self.storage_offset} "
                f"overruns its storage of {flat.size} elements")
        base = flat[self.storage_offset:]
        view = np.lib.stride_tricks.as_strided(
            base, shape=self.size, strides=tuple(s * flat.itemsize for s in self.stride), writeable=False)
        return np.array(view, copy=True)


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


def _storage_type(obj) -> _StorageType:
    if not isinstance(obj, _StorageType):
        raise pickle.UnpicklingError(f"expected a torch storage type in a persistent id, got {obj!r}")
    return obj


def _materialize(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _no_persistent_ids(pid):
    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a checkpoint header")


def _load_legacy(f) -> Any:
    def header():
        return RestrictedUnpickler(f, _no_persistent_ids).load()

    magic = header()
    if magic != LEGACY_MAGIC_NUMBER:
        raise pickle.UnpicklingError("not a PyTorch checkpoint: wrong magic number")
    protocol = header()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise pickle.UnpicklingError(f"unsupported PyTorch legacy protocol version {protocol}")
    sys_info = header()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError("big-endian PyTorch checkpoints are not supported")

    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"refusing persistent id {pid!r}: only storages are allowed")
        storage_type, root_key, _location, numel, view_metadata = pid[1:6]
        storage_type = _storage_type(storage_type)
        root_key = str(root_key)
        if root_key not in storages:
            storages[root_key] = _Storage(storage_type.dtype, int(numel))
        root = storages[root_key]
        if view_metadata is not None:
            _view_key, offset, view_size = view_metadata
            return _StorageView(root, int(offset), int(view_size))
        return root

    result = RestrictedUnpickler(f, persistent_load).load()
    keys = RestrictedUnpickler(f, _no_persistent_ids).load()
    for key in keys:
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * storage.dtype.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise pickle.UnpicklingError(f"checkpoint truncated in storage {key}")
        storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder("<")).astype(storage.dtype)
    return _materialize(result)


def _load_zip(path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise pickle.UnpicklingError(f"{path}: zip file without <prefix>/data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise pickle.UnpicklingError("big-endian PyTorch checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
                raise pickle.UnpicklingError(f"refusing persistent id {pid!r}: only storages are allowed")
            storage_type, key, _location, numel = pid[1:5]
            storage_type = _storage_type(storage_type)
            key = str(key)
            if key not in storages:
                storage = _Storage(storage_type.dtype, int(numel))
                data = archive.read(f"{prefix}data/{key}")
                storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder("<")).astype(
                    storage.dtype)
                storages[key] = storage
            return storages[key]

        result = RestrictedUnpickler(io.BytesIO(archive.read(pkl[0])), persistent_load).load()
    return _materialize(result)


def load_torch_pickle(path: str | os.PathLike) -> Any:
    """The object saved with `torch.save` at `path`, with every tensor as a numpy array."""
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        return _load_legacy(f)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.pth` state dict as `{name: ndarray}`; nested dicts are flattened with `.` between keys."""
    obj = load_torch_pickle(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    flat: dict[str, np.ndarray] = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            elif isinstance(value, np.ndarray):
                flat[name] = value
            else:
                raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")

    walk("", obj)
    return flat
