"""Validation of a PEFT LoRA adapter directory, without torch.

An acceptable expert is a directory with ``adapter_config.json`` (``peft_type`` LORA) and
``adapter_model.safetensors``. The safetensors header is parsed here (8-byte little-endian length,
then a JSON header) with bounds checks, so a corrupt or truncated file is named, never loaded: the
tensors must tile the data section exactly (no gap, no overlap, no trailing bytes), as the
safetensors library requires. The config fields, the key grammar and the shape rules are those of
``atmoe.adapter_format``, the one definition that model building reads too; float tensors must
hold no NaN or Inf (checked with numpy, in chunks, while the file streams into the blob store).
Pickle files are refused and never opened.

Every failure raises one ``InvalidAdapter`` (or ``PickleRefused``) line naming the file and problem.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atmoe.adapter_format import (
    CONFIG_FILE,
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    ModuleLayout,
    module_layouts,
    read_settings,
)
from atmoe.errors import InvalidAdapter, PickleRefused
from atmoe.jsontext import JsonTextError, parse_json

__all__ = [
    "CONFIG_FILE",
    "PICKLE_SUFFIXES",
    "WEIGHTS_FILE",
    "AdapterInfo",
    "FiniteCheck",
    "SafetensorsHeader",
    "TensorInfo",
    "check_finite_file",
    "read_safetensors_header",
    "validate_adapter",
]  # fmt: skip

MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors library itself
MAX_CONFIG_BYTES = 10_000_000
CHECK_CHUNK = 1 << 20

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
    "C64": 8,
}  # fmt: skip

# (unsigned view, sign-clearing mask, exponent mask): with the sign bit cleared, a value is NaN or
# Inf exactly when its bits are >= the all-ones exponent, so one max() over a chunk decides.
_NONFINITE_MASKS: dict[str, tuple[str, int, int]] = {
    "F16": ("<u2", 0x7FFF, 0x7C00),
    "BF16": ("<u2", 0x7FFF, 0x7F80),
    "F32": ("<u4", 0x7FFFFFFF, 0x7F800000),
    "F64": ("<u8", 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int  # exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


@dataclass
class AdapterInfo:
    """What the registry records about a valid adapter."""

    path: Path
    peft_type: str
    r: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    module_ranks: dict[str, int]  # module name (as in the base model) -> rank
    use_dora: bool
    lora_bias: bool
    modules: dict[str, ModuleLayout]  # module name -> what the adapter holds there
    base_model_name_or_path: str | None
    revision: str | None
    files: list[str]  # relative paths of the files an expert stores, sorted
    config: dict[str, Any] = field(repr=False, default_factory=dict)
    header: SafetensorsHeader | None = field(repr=False, default=None)

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE


def _fail(file: str | Path, problem: str) -> InvalidAdapter:
    return InvalidAdapter(f"{file}: {problem}")


# -- safetensors -----------------------------------------------------------------------------


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and bounds-check a safetensors header; never reads tensor data."""
    path = Path(path)
    label = path.name
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _fail(label, f"truncated: {file_size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _fail(label, f"corrupt: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
            if 8 + header_len > file_size:
                raise _fail(
                    label,
                    f"truncated or corrupt: header of {header_len} bytes but the file has {file_size}",
                )
            raw = handle.read(header_len)
    except OSError as error:
        raise _fail(label, f"cannot be read ({error.strerror or error})") from None
    try:
        header = parse_json(raw)
    except JsonTextError as error:
        raise _fail(label, f"corrupt: the safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _fail(label, "corrupt: the safetensors header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(label, "corrupt: __metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _fail(label, f"corrupt: tensor {name!r} has no dtype/shape/data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _fail(label, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(label, f"corrupt: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _fail(label, f"corrupt: tensor {name!r} has invalid data_offsets {offsets!r}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise _fail(
                label,
                f"corrupt: tensor {name!r} {dtype}{shape} needs {expected} bytes "
                f"but data_offsets span {offsets[1] - offsets[0]}",
            )
        if offsets[1] > data_size:
            raise _fail(
                label,
                f"truncated: tensor {name!r} ends at byte {data_start + offsets[1]} but the file has {file_size}",
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])

    previous_end = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start < previous_end:
            raise _fail(label, f"corrupt: tensor {info.name!r} overlaps the tensor before it")
        if info.start > previous_end:
            raise _fail(
                label,
                f"corrupt: {info.start - previous_end} unused bytes before tensor {info.name!r} "
                "(the safetensors library refuses gaps)",
            )
        previous_end = info.end
    if previous_end != file_size:
        raise _fail(
            label,
            f"corrupt: {file_size - previous_end} trailing bytes after the last tensor "
            "(the safetensors library refuses them)",
        )
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_start=data_start, file_size=file_size)


class FiniteCheck:
    """Checks that float tensors hold no NaN or Inf, fed the file's bytes in order, in any chunks.

    Used as the blob store's ``inspect`` hook, so the weights are read once: hashed, checked and
    copied in the same pass. Raises InvalidAdapter naming the first bad tensor.
    """

    def __init__(self, header: SafetensorsHeader, label: str = WEIGHTS_FILE) -> None:
        self.label = label
        self.offset = 0  # file offset of the next byte fed
        self.ranges = sorted(
            (t for t in header.tensors.values() if t.dtype in _NONFINITE_MASKS and t.nbytes),
            key=lambda t: t.start,
        )
        self.index = 0
        self.carry = b""  # bytes of an element split between two chunks

    def __call__(self, chunk: memoryview | bytes) -> None:
        chunk = memoryview(chunk)
        chunk_start = self.offset
        chunk_end = chunk_start + len(chunk)
        self.offset = chunk_end
        while self.index < len(self.ranges):
            tensor = self.ranges[self.index]
            if tensor.start >= chunk_end:
                return
            lo = max(tensor.start, chunk_start)
            hi = min(tensor.end, chunk_end)
            if hi > lo:
                self._check(tensor, chunk[lo - chunk_start : hi - chunk_start])
            if tensor.end > chunk_end:
                return
            self.index += 1
            self.carry = b""

    def _check(self, tensor: TensorInfo, data: memoryview) -> None:
        view_dtype, abs_mask, exponent = _NONFINITE_MASKS[tensor.dtype]
        width = int(view_dtype[-1])
        if self.carry:  # finish the element split over the previous chunk
            need = width - len(self.carry)
            head = self.carry + bytes(data[:need])
            if len(head) < width:
                self.carry = head
                return
            self.carry = b""
            self._scan(tensor, memoryview(head), view_dtype, abs_mask, exponent)
            data = data[need:]
        whole = len(data) - len(data) % width
        if whole < len(data):
            self.carry = bytes(data[whole:])
        if whole:
            self._scan(tensor, data[:whole], view_dtype, abs_mask, exponent)

    def _scan(self, tensor: TensorInfo, data: memoryview, view_dtype: str, abs_mask: int, exponent: int) -> None:
        bits = np.frombuffer(data, dtype=view_dtype)
        magnitude = np.bitwise_and(bits, np.array(abs_mask, dtype=view_dtype))
        if magnitude.max() >= exponent:
            raise _fail(self.label, f"tensor {tensor.name!r} contains NaN or Inf values")

    def finish(self) -> None:
        """Raise if fewer bytes were fed than the tensors need (a file changed while read)."""
        if self.index < len(self.ranges):
            raise _fail(self.label, "truncated: the file ended before all tensors were read")


def check_finite_file(path: str | os.PathLike[str], header: SafetensorsHeader | None = None) -> None:
    """Stream a safetensors file once and raise InvalidAdapter if a float tensor has NaN or Inf."""
    header = header or read_safetensors_header(path)
    check = FiniteCheck(header, Path(path).name)
    buffer = bytearray(CHECK_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            check(view[:n])
    check.finish()


# -- adapter_config.json ---------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise _fail(CONFIG_FILE, "is too large to be an adapter config")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise _fail(CONFIG_FILE, f"cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise _fail(CONFIG_FILE, "is not UTF-8 text") from None
    try:
        config = parse_json(text)
    except JsonTextError as error:
        raise _fail(CONFIG_FILE, f"is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise _fail(CONFIG_FILE, "is not a JSON object")
    return config


# -- the directory ---------------------------------------------------------------------------


def adapter_files(path: Path) -> list[str]:
    """The files an expert stores: the directory's regular top-level files, without dotfiles.

    A symbolic link (``notes.txt -> /etc/shadow``) or a special file (FIFO, device, socket) among them
    is refused, never followed or read: an expert's files are its own bytes. Subdirectories are
    not part of an adapter and are left alone.
    """
    names = []
    for entry in path.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            raise InvalidAdapter(
                f"{entry.name}: is a symbolic link; an adapter's files must be regular files "
                "in its folder (copy the file there instead)"
            )
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise InvalidAdapter(f"{entry.name}: is not a regular file (a FIFO, device or socket); refused")
        names.append(entry.name)
    return sorted(names)


def validate_adapter(path: str | os.PathLike[str], *, check_values: bool = True) -> AdapterInfo:
    """Validate a PEFT LoRA directory and describe it.

    ``check_values=False`` skips the NaN/Inf scan over the weights, for callers that run
    ``FiniteCheck`` themselves while streaming the file (``experts.add_expert``).
    """
    root = Path(path)
    if not root.exists():
        raise InvalidAdapter(f"{root}: no such directory")
    if not root.is_dir():
        raise InvalidAdapter(
            f"{root}: not a directory; expected a PEFT LoRA adapter directory ({CONFIG_FILE} + {WEIGHTS_FILE})"
        )
    files = adapter_files(root)
    for name in files:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise PickleRefused(f"{name}: refused, {PICKLE_HINT}")
    if CONFIG_FILE not in files:
        raise InvalidAdapter(
            f"{root}: not a PEFT LoRA adapter directory (no {CONFIG_FILE}); "
            "save the adapter with PEFT's save_pretrained()"
        )
    config = _read_config(root / CONFIG_FILE)

    settings = read_settings(config)
    if WEIGHTS_FILE not in files:
        raise InvalidAdapter(f"{root}: no {WEIGHTS_FILE}; only safetensors LoRA weights are accepted")
    header = read_safetensors_header(root / WEIGHTS_FILE)
    modules = module_layouts(
        settings,
        {name: info.shape for name, info in header.tensors.items()},
        {name: info.dtype for name, info in header.tensors.items()},
    )
    if check_values:
        check_finite_file(root / WEIGHTS_FILE, header)

    return AdapterInfo(
        path=root,
        peft_type="LORA",
        r=settings.r,
        alpha=settings.alpha,
        use_rslora=settings.use_rslora,
        target_modules=settings.target_modules,
        rank_pattern=settings.rank_pattern,
        alpha_pattern=settings.alpha_pattern,
        module_ranks={module: layout.rank for module, layout in modules.items()},
        use_dora=settings.use_dora,
        lora_bias=settings.lora_bias,
        modules=modules,
        base_model_name_or_path=settings.base_model_name_or_path,
        revision=settings.revision,
        files=files,
        config=config,
        header=header,
    )
