"""Safe reading and atomic, streaming writing of tensor files.

Reading: the safetensors header is validated here (size, JSON shape, dtypes, offsets against the file
size) before any tensor is touched; the tensors themselves are then read through `safetensors.safe_open`
one at a time. Pickle formats only go through `torch.load(weights_only=True)`.

Writing: `SafetensorsWriter` writes a file tensor by tensor (the header is known up front from the
names, dtypes and shapes), into a temporary file in the destination folder that is fsynced and renamed
into place only when every tensor has been written. An existing file is never replaced unless asked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .errors import AdapterError

MAX_HEADER_BYTES = 100 * 1000 * 1000
WRITE_BUFFER_BYTES = 8 << 20
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# safetensors dtype names <-> torch dtypes (only those torch can hold).
_DTYPE_NAMES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _DTYPE_NAMES[_name] = getattr(torch, _attr)
_NAME_OF_DTYPE = {dtype: name for name, dtype in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAME_OF_DTYPE[dtype]
    except KeyError:
        raise AdapterError(f"dtype {dtype} cannot be stored in a safetensors file") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; no data is loaded."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]  # in file order (by data offset)
    file_size: int


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header; raises AdapterError naming the file."""
    path = os.fspath(path)
    raw, file_size = _raw_header(path)
    header = _header_json(path, raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries, spans = _entries(path, header)
    _check_spans(path, spans, data_size=file_size - 8 - len(raw))
    ordered = {name: entries[name] for _, _, name in sorted(spans)}
    return SafetensorsHeader(path, dict(metadata), ordered, file_size)


def _raw_header(path: str) -> tuple[bytes, int]:
    """The header's bytes (its length checked against the limit and the file) and the file's size."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise AdapterError(f"{path}: not a safetensors file (only {file_size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise AdapterError(
                    f"{path}: safetensors header of {header_len} bytes is larger than the "
                    f"{MAX_HEADER_BYTES // 1000 // 1000} MB limit (corrupt or not a safetensors file)"
                )
            if header_len > file_size - 8:
                raise AdapterError(
                    f"{path}: truncated or not a safetensors file (header says {header_len} bytes, "
                    f"file has {file_size - 8} after the length field)"
                )
            return f.read(header_len), file_size
    except OSError as e:
        raise AdapterError(f"{path}: cannot read file ({e.strerror or e})") from None


def _header_json(path: str, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _entries(path: str, header: dict) -> tuple[dict[str, TensorEntry], list[tuple[int, int, str]]]:
    """Every tensor's entry, its dtype, shape and byte span checked against each other."""
    spans = []
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise AdapterError(f"{path}: corrupt safetensors header (entry {name!r} is not an object)")
        dtype_str, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype_str not in _DTYPE_NAMES:
            raise AdapterError(f"{path}: tensor {name!r} has unsupported dtype {dtype_str!r}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise AdapterError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) and n >= 0 for n in offsets)
            or offsets[0] > offsets[1]
        ):
            raise AdapterError(f"{path}: tensor {name!r} has invalid data offsets {offsets!r}")
        entry = TensorEntry(name, _DTYPE_NAMES[dtype_str], tuple(shape))
        if offsets[1] - offsets[0] != entry.nbytes:
            raise AdapterError(
                f"{path}: tensor {name!r} ({dtype_str}, shape {list(shape)}) needs {entry.nbytes} bytes "
                f"but its offsets span {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
        entries[name] = entry
    return entries, spans


def _check_spans(path: str, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte spans tile the data section exactly: no gap, no overlap, nothing left over."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise AdapterError(
                f"{path}: inconsistent offsets in safetensors header (tensor {name!r} starts at {begin}, "
                f"expected {position})"
            )
        position = end
    if position > data_size:
        raise AdapterError(
            f"{path}: truncated file (header needs {position} bytes of tensor data, file has {data_size})"
        )
    if position != data_size:
        raise AdapterError(
            f"{path}: inconsistent safetensors file ({data_size - position} bytes after the last tensor)"
        )


class SafetensorsReader:
    """Validated, lazy access to one safetensors file: header first, then tensors on demand.

    Tensors come from `safe_open`, which maps the file: every page read stays resident (and counted
    as the process's memory) while its mapping lives, and a tensor written in place turns its pages
    into private copies. So the mapping is renewed once `REMAP_BYTES` have been read through it,
    and a big tensor gets a mapping of its own that dies with it: a file streamed tensor by tensor
    costs about one tensor of memory, not the file.
    """

    REMAP_BYTES = 64 << 20
    FAULT_AROUND_BYTES = 1 << 20

    def __init__(self, path: str | os.PathLike):
        self.header = read_header(path)
        self.path = self.header.path
        self._handle = None
        self._mapped = 0  # bytes read through the current handle

    def _open(self):
        try:
            return safe_open(self.path, framework="pt", device="cpu")
        except Exception as e:  # the header passed our checks; anything left is still the file's fault
            raise AdapterError(f"{self.path}: cannot open safetensors file ({e})") from None

    def get(self, name: str) -> torch.Tensor:
        size = self.header.tensors[name].nbytes
        if size >= self.REMAP_BYTES:
            return self._open().get_tensor(name)
        # A page fault maps the pages around it too (read-around), so even a 4-byte alpha costs
        # about this much resident memory.
        cost = max(size, self.FAULT_AROUND_BYTES)
        if self._handle is None or self._mapped + cost > self.REMAP_BYTES:
            self._handle, self._mapped = self._open(), 0
        self._mapped += cost
        return self._handle.get_tensor(name)

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_pickle_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .ckpt/.pt/.bin/.pth file with `weights_only=True` (never arbitrary pickle)."""
    path = os.fspath(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{path}: not a loadable weights-only torch file ({first_line})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise AdapterError(f"{path}: torch file does not hold a flat dict of named tensors")
    return obj


# ---------------------------------------------------------------------------------------------
# Writing


def check_output_path(path: str | os.PathLike, overwrite: bool) -> str:
    """Fail early (before any work) if `path` exists and may not be replaced, or its folder is missing."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise AdapterError(f"{path}: output path is a directory")
    if os.path.exists(path) and not overwrite:
        raise AdapterError(f"{path}: output file exists (pass --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AdapterError(f"{path}: output folder {folder} does not exist")
    return path


class AtomicFile:
    """A temporary file next to `path` that becomes `path` only on `commit()`."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = check_output_path(path, overwrite)
        self.overwrite = overwrite
        self.folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(
            prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=self.folder
        )
        os.close(fd)
        os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode

    def commit(self) -> None:
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        if os.path.exists(self.path) and not self.overwrite:  # appeared while we worked
            raise AdapterError(f"{self.path}: output file appeared while writing (pass --overwrite to replace it)")
        os.replace(self.tmp, self.path)
        _fsync_dir(self.folder)

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success fsync it and rename it onto `path`.

    On any exception the temporary file is removed and `path` is untouched.
    """
    target = AtomicFile(path, overwrite)
    try:
        yield target.tmp
        target.commit()
    except BaseException:
        target.abort()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SafetensorsWriter:
    """Stream tensors into a new safetensors file, in a layout fixed up front.

    with SafetensorsWriter(path, [TensorEntry(...), ...], metadata) as w:
        for entry in entries: w.write(entry.name, tensor)

    The file only appears at `path` when the block exits normally after every tensor was written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layout: list[TensorEntry],
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
    ):
        self.path = check_output_path(path, overwrite)
        self.overwrite = overwrite
        self.layout = list(layout)
        names = [e.name for e in self.layout]
        if len(set(names)) != len(names):
            raise AdapterError(f"{self.path}: duplicate tensor names in output layout")
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._next = 0  # index in the layout of the tensor being written
        self._written = 0  # bytes of it written so far
        self._file = None
        self._target = None

    def _header_bytes(self) -> bytes:
        header: dict = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        offset = 0
        for entry in self.layout:
            header[entry.name] = {
                "dtype": dtype_name(entry.dtype),
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
        return struct.pack("<Q", len(raw)) + raw

    def __enter__(self) -> SafetensorsWriter:
        self._target = AtomicFile(self.path, self.overwrite)
        # A large buffer batches the many small tensors of an adapter into few writes.
        self._file = open(self._target.tmp, "wb", buffering=WRITE_BUFFER_BYTES)
        self._file.write(self._header_bytes())
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the layout, whole."""
        entry = self._expect(name, tensor)
        if tuple(tensor.shape) != entry.shape or self._written:
            raise self._mismatch(name, tensor, entry)
        self._put(tensor, entry)

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """The next block of rows (dim 0) of the current tensor: a tensor can be written in parts,
        in order, so it never has to exist whole in memory."""
        entry = self._expect(name, rows)
        if not entry.shape or tuple(rows.shape[1:]) != entry.shape[1:]:
            raise self._mismatch(name, rows, entry)
        self._put(rows, entry)

    def _expect(self, name: str, tensor: torch.Tensor) -> TensorEntry:
        if self._next >= len(self.layout):
            raise AdapterError(f"{self.path}: unexpected extra tensor {name!r}")
        entry = self.layout[self._next]
        if name != entry.name or tensor.dtype != entry.dtype:
            raise self._mismatch(name, tensor, entry)
        return entry

    def _mismatch(self, name: str, tensor: torch.Tensor, entry: TensorEntry) -> AdapterError:
        return AdapterError(
            f"{self.path}: tensor {name!r} ({tensor.dtype}, {list(tensor.shape)}) does not match the "
            f"planned {entry.name!r} ({entry.dtype}, {list(entry.shape)})"
        )

    def _put(self, tensor: torch.Tensor, entry: TensorEntry) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if self._written + data.numel() > entry.nbytes:
            raise AdapterError(f"{self.path}: more data than planned for tensor {entry.name!r}")
        self._file.write(memoryview(data.numpy()))
        self._written += data.numel()
        if self._written == entry.nbytes:
            self._next, self._written = self._next + 1, 0

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._file.close()
        if exc_type is not None:
            self._target.abort()
            return False
        try:
            if self._next != len(self.layout):
                how = "was only partly written" if self._written else "was never written"
                raise AdapterError(f"{self.path}: tensor {self.layout[self._next].name!r} {how}")
            self._target.commit()
        except BaseException:
            self._target.abort()
            raise
        return False


def save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write an in-memory dict of tensors atomically (small files: adapters, checkpoints)."""
    layout = [TensorEntry(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(path, layout, metadata, overwrite) as writer:
        for name, t in tensors.items():
            writer.write(name, t)


def append_records(metadata: dict[str, str], key: str, records: list[dict]) -> None:
    """Append `records` to the JSON list kept under `metadata[key]` (what this pack did to a file).
    An earlier value that is not a JSON list is kept, as the list's first entry, never dropped."""
    old = metadata.get(key)
    try:
        earlier = json.loads(old) if old is not None else []
    except (ValueError, RecursionError):
        earlier = [{"unreadable": old}]
    if not isinstance(earlier, list):
        earlier = [earlier]
    metadata[key] = json.dumps(earlier + records)
