"""Safe reading and atomic, streaming writing of tensor files.

Reading: the safetensors header is validated here (size, JSON shape, dtypes, offsets against the file
size) before any tensor is touched; the tensors are then read one at a time from their checked byte
spans. Pickle formats only go through `torch.load(weights_only=True)`. Only regular files are read.

Writing: `SafetensorsWriter` writes a file tensor by tensor (the header is known up front from the
names, dtypes and shapes), into a temporary file in the destination folder that is fsynced and renamed
into place only when every tensor has been written. An existing file is never replaced unless asked.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

import torch

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


class TensorEntry(NamedTuple):
    """One tensor as the header describes it; no data is loaded. (A tuple: headers hold 10⁵ of them.)"""

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
    offsets: dict[str, int] = field(default_factory=dict)  # name -> where its bytes start in the file


_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _DTYPE_NAMES.values()}


def _itemsize(dtype: torch.dtype) -> int:
    return _ITEMSIZE.get(dtype) or torch.empty((), dtype=dtype).element_size()


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
    spans.sort()
    ordered = {name: entries[name] for _, _, name in spans}
    offsets = {name: 8 + len(raw) + begin for begin, _, name in spans}
    return SafetensorsHeader(path, dict(metadata), ordered, file_size, offsets)


def open_regular_file(path: str) -> BinaryIO:
    """`path` opened for reading, unbuffered; refuses what is not a regular file (a FIFO or a device
    would block or never end) without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise AdapterError(f"{path}: cannot read file ({e.strerror or e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterError(f"{path}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _raw_header(path: str) -> tuple[bytes, int]:
    """The header's bytes (its length checked against the limit and the file) and the file's size."""
    with open_regular_file(path) as f:
        try:
            file_size = os.fstat(f.fileno()).st_size
            prefix = _read_exactly(f, 9)
            if len(prefix) < 9 or prefix[8:9] != b"{":
                raise AdapterError(
                    f"{path}: not a safetensors file (" + (f"only {file_size} bytes" if len(prefix) < 9 else
                    "it does not start with a header length and a JSON header") + ")"
                )
            (header_len,) = struct.unpack("<Q", prefix[:8])
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
            raw = prefix[8:] + _read_exactly(f, header_len - 1)
        except OSError as e:
            raise AdapterError(f"{path}: cannot read file ({e.strerror or e})") from None
    if len(raw) < header_len:
        raise AdapterError(f"{path}: file shrank while its header was read")
    return raw, file_size


def _read_exactly(f: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes (fewer only at the end of the file); an unbuffered read may return less."""
    chunks, left = [], size
    while left:
        chunk = f.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are unique. A repeated key (a second `__metadata__`, a tensor named twice) makes
    the header mean two things: Python's json keeps the last, the safetensors library refuses the file."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _header_json(path: str, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise AdapterError(f"{path}: corrupt safetensors header ({str(e)[:200]!r} appears twice)") from None
    except UnicodeDecodeError as e:
        raise AdapterError(f"{path}: corrupt safetensors header (not UTF-8: {e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: corrupt safetensors header (not valid JSON: {e.msg} at character {e.pos})") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise AdapterError(f"{path}: corrupt safetensors header (an integer of thousands of digits)") from None
    except RecursionError:
        raise AdapterError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


# Sizes, dims and offsets must fit the int64 that torch and the safetensors format use.
INT64_MAX = (1 << 63) - 1


_INT_ONLY = {int}


def _is_counts(values) -> bool:
    """A JSON list of sizes: ints (not bools: JSON true is an int to Python) from 0 to INT64_MAX."""
    return type(values) is list and set(map(type, values)) <= _INT_ONLY and (
        not values or (min(values) >= 0 and max(values) <= INT64_MAX)
    )


def _entries(path: str, header: dict) -> tuple[dict[str, TensorEntry], list[tuple[int, int, str]]]:
    """Every tensor's entry, its dtype, shape and byte span checked against each other."""
    spans = []
    entries = {}
    for name, info in header.items():
        if type(info) is not dict:
            raise AdapterError(f"{path}: corrupt safetensors header (entry {name!r} is not an object)")
        dtype_str, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dtype = _DTYPE_NAMES.get(dtype_str) if type(dtype_str) is str else None
        if dtype is None:
            raise AdapterError(f"{path}: tensor {name!r} has unsupported dtype {_short(dtype_str)}")
        if not _is_counts(shape):
            raise AdapterError(f"{path}: tensor {name!r} has an invalid shape {_short(shape)}")
        numel = math.prod(shape)
        if (math.prod(n for n in shape if n) if numel == 0 else numel) > INT64_MAX:  # torch's strides overflow
            raise AdapterError(f"{path}: tensor {name!r} has a shape too large for int64 {_short(shape)}")
        if not (_is_counts(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise AdapterError(f"{path}: tensor {name!r} has invalid data offsets {_short(offsets)}")
        nbytes = numel * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise AdapterError(
                f"{path}: tensor {name!r} ({dtype_str}, shape {list(shape)}) needs {nbytes} bytes "
                f"but its offsets span {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
        entries[name] = TensorEntry(name, dtype, tuple(shape))
    return entries, spans


def _short(value, limit: int = 80) -> str:
    """A JSON value from a header, as much of it as a one-line message can take."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


_PREADV = hasattr(os, "preadv")


class SafetensorsReader:
    """Validated, lazy access to one safetensors file: header first (parsed once), then tensors on
    demand from their checked byte spans.

    A small tensor is copied out of one open, unbuffered handle: nothing of the file stays mapped or
    resident. A big one gets a mapping of just its own bytes that dies with the tensor, so a file
    streamed tensor by tensor costs about one tensor of memory, never the file. (`safe_open` would
    parse the whole header again on every open, which made files of many tiny tensors quadratic;
    one handle kept open would keep every page it read resident.)
    """

    MAP_BYTES = 64 << 20  # tensors at least this big are mapped rather than copied

    def __init__(self, path: str | os.PathLike):
        self.header = read_header(path)
        self.path = self.header.path
        self._file: BinaryIO | None = None
        self._lock = threading.Lock()  # one position for the shared handle

    def get(self, name: str) -> torch.Tensor:
        entry = self.header.tensors[name]
        start = self.header.offsets[name]
        try:
            if entry.nbytes >= self.MAP_BYTES:
                return self._mapped(entry, start)
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            if entry.nbytes:
                self._read_into(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), start)
            return tensor
        except OSError as e:
            raise AdapterError(f"{self.path}: cannot read tensor {name!r} ({e.strerror or e})") from None

    def get_many(self, names: list[str], gap_bytes: int = 4096) -> dict[str, torch.Tensor]:
        """Several small tensors (alphas), each run of near neighbours in the file read at once; the
        tensors of a run share its buffer."""
        offsets, entries = self.header.offsets, self.header.tensors
        order = sorted(set(names), key=offsets.__getitem__)
        found: dict[str, torch.Tensor] = {}
        i = 0
        while i < len(order):
            start = offsets[order[i]]
            end, j = start + entries[order[i]].nbytes, i + 1
            while j < len(order) and offsets[order[j]] - end <= gap_bytes and offsets[order[j]] + entries[order[j]].nbytes - start <= self.MAP_BYTES:
                end = max(end, offsets[order[j]] + entries[order[j]].nbytes)
                j += 1
            if end - start >= self.MAP_BYTES:
                found[order[i]] = self.get(order[i])
                i += 1
                continue
            buffer = self.read_bytes(start, end - start)
            for name in order[i:j]:
                entry = entries[name]
                found[name] = (torch.frombuffer(buffer, dtype=entry.dtype, count=entry.numel, offset=offsets[name] - start)
                               .reshape(entry.shape) if entry.numel else torch.empty(entry.shape, dtype=entry.dtype))
            i = j
        return {name: found[name] for name in names}

    def read_bytes(self, start: int, size: int) -> bytearray:
        """`size` bytes of the file from `start` (spans of tensors the header gave)."""
        buffer = bytearray(size)
        self._read_into(memoryview(buffer), start)
        return buffer

    def _read_into(self, buffer: memoryview, start: int) -> None:
        with self._lock:
            if self._file is None:
                self._file = open_regular_file(self.path)
            done = 0
            while done < len(buffer):
                if _PREADV:  # positioned: one call, and the handle's position is never shared
                    n = os.preadv(self._file.fileno(), [buffer[done:]], start + done)
                else:
                    self._file.seek(start + done)
                    n = self._file.readinto(buffer[done:])
                if not n:
                    raise AdapterError(f"{self.path}: file ended early (was it changed while being read?)")
                done += n

    def _mapped(self, entry: TensorEntry, start: int) -> torch.Tensor:
        with open_regular_file(self.path) as f:
            if os.fstat(f.fileno()).st_size != self.header.file_size:  # reading past its end would crash
                raise AdapterError(f"{self.path}: file changed size while being read")
            begin = start - start % mmap.ALLOCATIONGRANULARITY
            # A private (copy-on-write) mapping: writing into the tensor never touches the file.
            mapping = mmap.mmap(f.fileno(), start + entry.nbytes - begin, offset=begin, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(mapping, dtype=entry.dtype, count=entry.numel, offset=start - begin)
        return flat.reshape(entry.shape)  # the tensor keeps the mapping alive, and only it

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_pickle_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .ckpt/.pt/.bin/.pth file with `weights_only=True` (never arbitrary pickle)."""
    path = os.fspath(path)
    open_regular_file(path).close()
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


# A temporary file is named `.<output name>.<pid>.<random>.tmp`: the pid tells a live writer's file
# from one a killed run left behind.
TEMP_SUFFIX = ".tmp"
_TEMP_NAME_EXTRA = 32  # bytes a temporary file's name adds to the output's
NAME_MAX = 255  # bytes in one file name, on every common filesystem
MAX_NAME_BYTES = NAME_MAX - _TEMP_NAME_EXTRA  # the longest output file name


def check_output_path(path: str | os.PathLike, overwrite: bool) -> str:
    """Fail early (before any work) if `path` exists and may not be replaced, its folder is missing, or
    its name cannot be a file name."""
    path = os.fspath(path)
    if "\0" in path:
        raise AdapterError(f"{path!r}: output path contains a NUL character")
    name = os.path.basename(path)
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise AdapterError(
            f"{path}: output file name is too long ({len(name.encode('utf-8', 'surrogateescape'))} bytes; "
            f"at most {MAX_NAME_BYTES})"
        )
    if os.path.isdir(path):
        raise AdapterError(f"{path}: output path is a directory")
    if os.path.exists(path) and not overwrite:
        raise AdapterError(f"{path}: output file exists (pass --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AdapterError(f"{path}: output folder {folder} does not exist")
    return path


def stale_temp_files(path: str | os.PathLike) -> list[str]:
    """Temporary files for `path` that a killed run left behind (their writer is gone): what SIGKILL or a
    power cut leaves, named so they never pile up unseen."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    stale = []
    for name in sorted(names):
        if name.startswith(prefix) and name.endswith(TEMP_SUFFIX):
            pid = name[len(prefix) :].split(".", 1)[0]
            if not (pid.isdigit() and _writer_alive(int(pid), os.path.join(folder, name))):
                stale.append(os.path.join(folder, name))
    return stale


def _writer_alive(pid: int, temp: str) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there: go by the file's age instead
        try:
            return time.time() - os.path.getmtime(temp) < 600
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def describe_stale(paths: list[str]) -> list[str]:
    """One line per stale temporary file, for a command's summary."""
    lines = []
    for temp in paths:
        try:
            size = f"{os.path.getsize(temp) / 1e9:.2f} GB"
        except OSError:
            continue
        lines.append(f"note: {temp} ({size}) is left from an interrupted write; delete it")
    return lines


class AtomicFile:
    """A temporary file next to `path` that becomes `path` only on `commit()`."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = check_output_path(path, overwrite)
        self.overwrite = overwrite
        self.folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, self.tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(self.path)}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=self.folder
            )
        except OSError as e:
            raise AdapterError(f"{self.path}: cannot create a file in {self.folder} ({e.strerror or e})") from None
        os.close(fd)
        os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode

    def commit(self) -> None:
        try:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            if os.path.exists(self.path) and not self.overwrite:  # appeared while we worked
                raise AdapterError(f"{self.path}: output file appeared while writing (pass --overwrite to replace it)")
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise AdapterError(f"{self.path}: cannot write ({e.strerror or e})") from None
        _fsync_dir(self.folder)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
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
        try:
            # A large buffer batches the many small tensors of an adapter into few writes.
            self._file = open(self._target.tmp, "wb", buffering=WRITE_BUFFER_BYTES)
            self._file.write(self._header_bytes())
        except BaseException as e:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
            self._target.abort()
            if isinstance(e, OSError):
                raise AdapterError(f"{self.path}: cannot write ({e.strerror or e})") from None
            raise
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
        """Commit when every tensor was written; on any failure (a full disk, a file-size limit, an
        error or a signal while writing) remove the temporary file, and say which file failed."""
        committed = False
        try:
            try:
                self._file.close()  # flushes the buffer: fails again on a full disk
            except OSError:
                if exc_type is None:
                    raise
            if exc_type is None:
                if self._next != len(self.layout):
                    how = "was only partly written" if self._written else "was never written"
                    raise AdapterError(f"{self.path}: tensor {self.layout[self._next].name!r} {how}")
                self._target.commit()
                committed = True
        except OSError as e:
            raise AdapterError(f"{self.path}: cannot write ({e.strerror or e})") from None
        finally:
            if not committed:
                self._target.abort()
        if isinstance(exc, OSError):
            raise AdapterError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
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
