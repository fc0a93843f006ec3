"""safetensors read and written a tensor at a time, from headers alone where that suffices; PyTorch
`.bin` state dicts (bases and adapters of the seed's era) read through a memory map, a shard at a time."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from cpuforge.errors import InputError


def safetensors_header(path: str | os.PathLike) -> dict:
    """Read a safetensors header (names, dtypes, shapes) without touching the weights."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise InputError(f"{path}: truncated safetensors file (header claims {n} bytes, file has {size}).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path}: corrupt safetensors header.") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise InputError(f"{path}: truncated safetensors file ({size} bytes, its tensors need {8 + n + end}).")
    return header


class SafetensorsReader:
    """Reads one tensor at a time with plain reads. Not mmap: every page of a mapped file that
    was read counts as resident, so a mapped 14 GB base would show as 14 GB of memory."""

    TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip

    def __init__(self, path: Path):
        self.header = safetensors_header(path)
        self.file = open(path, "rb")
        self.start = 8 + int.from_bytes(self.file.read(8), "little")

    def __getitem__(self, name: str):
        import torch

        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = getattr(torch, self.TORCH_DTYPES[info["dtype"]])
        if begin == end:
            return torch.empty(info["shape"], dtype=dtype)
        buffer = bytearray(end - begin)
        self.file.seek(self.start + begin)
        self.file.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])

    def close(self) -> None:
        self.file.close()


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def load_bin(path: Path) -> dict:
    """A PyTorch state dict, memory-mapped: a tensor's bytes are read when it is used, so listing the
    shapes of a shard reads almost nothing and merging it holds one shard's pages at most."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: cannot be read as a PyTorch state dict ({e}).") from None


class BinReader:
    """A `.bin` state dict with SafetensorsReader's interface."""

    def __init__(self, path: Path):
        self.tensors = load_bin(path)
        self.header = {n: {"dtype": torch_dtype_name(t.dtype), "shape": list(t.shape)} for n, t in self.tensors.items()}

    def __getitem__(self, name: str):
        return self.tensors[name]

    def close(self) -> None:
        self.tensors = {}


def torch_dtype_name(dtype) -> str:
    """The safetensors name of a torch dtype (torch.float16 -> "F16")."""
    names = {v: k for k, v in SafetensorsReader.TORCH_DTYPES.items()}
    return names[str(dtype).removeprefix("torch.")]


def open_weights(path: Path) -> SafetensorsReader | BinReader:
    return SafetensorsReader(path) if path.suffix == ".safetensors" else BinReader(path)


def weights_header(path: Path) -> dict:
    """Name -> {"dtype", "shape"} of a safetensors or .bin weights file, without reading the weights."""
    if path.suffix == ".safetensors":
        return safetensors_header(path)
    return BinReader(path).header


# bytes per element of each safetensors dtype
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_layout(specs: dict[str, tuple[str, list[int]]]) -> tuple[bytes, int]:
    """The header of a safetensors file holding `specs` (name -> dtype, shape) in name order, and its data size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        size = ITEMSIZE[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, offset


class SafetensorsWriter:
    """One safetensors file written as its tensors come, one at a time: the layout is planned up front
    (`specs`: name -> dtype, shape), so the header goes first and memory never holds more than the
    tensor being written. Tensors must come in name order with their planned shapes; closing checks
    that all of them came. Use as a context manager; the file is only complete when it exits cleanly."""

    def __init__(self, path: Path, specs: dict[str, tuple[str, list[int]]]):
        header, self.size = safetensors_layout(specs)
        self.path, self.specs, self.order = path, specs, sorted(specs)
        self.written = 0
        self.file = open(path, "wb")
        self.file.write(header)

    def write(self, name: str, tensor) -> None:
        import torch

        if self.written == len(self.order) or name != self.order[self.written]:
            expected = self.order[self.written] if self.written < len(self.order) else "no more tensors"
            raise RuntimeError(f"{self.path}: {name} written out of order; the layout expects {expected} next.")
        if list(tensor.shape) != self.specs[name][1]:
            raise InputError(f"{self.path.name}: {name} came out as {list(tensor.shape)}, planned {self.specs[name][1]}.")
        self.file.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        self.written += 1

    def close(self) -> None:
        self.file.close()
        if self.written != len(self.order):
            raise RuntimeError(f"{self.path}: {self.written} of {len(self.order)} planned tensors written.")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()
