"""GGUF files read in one place, with one error policy: a file that is not a readable GGUF is an
InputError whose sentence names the file and the problem, whichever step reads it.

Headers (metadata and tensor infos) are read by `read_header`, which decodes a vocabulary's strings only
when asked: gguf-py's GGUFReader makes a numpy view of every part of every field, which takes seconds
for a 50k-token vocabulary, and every Snakemake start-up and every chat reads a header. Tensor data is
read through GGUFReader (`open_gguf`), which maps the file; it raises whatever numpy raises on a file
cut short (IndexError, ValueError), which a user should never see as a traceback."""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpuforge.errors import InputError

if TYPE_CHECKING:
    from gguf import GGUFReader
    from gguf.constants import GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
# the GGUF value types (gguf-py's GGUFValueType) that are one fixed-size number
NUMBERS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def row_bytes(kind: GGMLQuantizationType, n_per_row: int) -> int:
    """The bytes `n_per_row` weights of ggml type `kind` take: whole blocks of the type."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[kind]
    return n_per_row // block * size


def check_gguf(path: str | os.PathLike) -> None:
    """The first four bytes only: a cheap check before a llama.cpp tool is handed the file."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found.") from None
    if magic != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r}).")


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """gguf-py's reader of `path`: its header fields, and tensors as views of the mapped file."""
    from gguf import GGUFReader

    check_gguf(path)
    try:
        return GGUFReader(path)
    except (OSError, ValueError, IndexError) as e:
        raise InputError(f"{path}: not a readable GGUF file ({e}).") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml's order: shape[0] is the length of a row
    type: str  # the ggml type, lower case (q4_0, f16, ...)
    n_elements: int
    n_bytes: int
    offset: int  # of its data, from the file's start


@dataclass(frozen=True)
class Header:
    fields: dict[str, Any]  # numbers, strings, and the arrays asked for
    lengths: dict[str, int]  # the length of every array field, asked for or not
    types: dict[str, tuple[int, ...]]  # every field's GGUF value type; an array's, then its items'
    tensors: dict[str, TensorInfo]


class _Cursor:
    """Reads a GGUF header from a memory map, front to back."""

    def __init__(self, data: mmap.mmap):
        self.data, self.at = data, 0

    def unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.at += n
        if self.at > len(self.data):
            raise ValueError("a string runs past the end of the file")
        return self.data[self.at - n : self.at].decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in NUMBERS:
            return self.unpack(NUMBERS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = self.array()
        return self.items(item, count)

    def array(self) -> tuple[int, int]:
        """An array's item type and length."""
        return self.unpack("<I"), self.unpack("<Q")

    def items(self, item: int, count: int) -> list:
        return [self.value(item) for _ in range(count)]

    def skip(self, item: int, count: int) -> None:
        if item in NUMBERS:
            self.at += count * struct.calcsize(NUMBERS[item])
        elif item == ARRAY:
            for _ in range(count):
                self.skip(*self.array())
        else:
            for _ in range(count):
                self.string()


def read_header(path: str | os.PathLike, arrays: Iterable[str] | None = ()) -> Header:
    """The metadata and tensor infos of a GGUF file, without its tensor data; the array fields named in
    `arrays` decoded (all of them when None), the others skipped. A file whose tensor data is cut short
    is refused here too, as a loader would refuse it."""
    from gguf.constants import GGMLQuantizationType

    check_gguf(path)
    wanted = None if arrays is None else set(arrays)
    fields, lengths, types = {}, {}, {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(data)
            cursor.at = 4
            version, n_tensors, n_fields = cursor.unpack("<I"), cursor.unpack("<Q"), cursor.unpack("<Q")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version}; this reader knows versions 2 and 3")
            for _ in range(n_fields):
                key, kind = cursor.string(), cursor.unpack("<I")
                if kind != ARRAY:
                    types[key], fields[key] = (kind,), cursor.value(kind)
                    continue
                item, lengths[key] = cursor.array()
                types[key] = (kind, item)
                if wanted is None or key in wanted:
                    fields[key] = cursor.items(item, lengths[key])
                else:
                    cursor.skip(item, lengths[key])
            infos = []
            for _ in range(n_tensors):
                name, dims = cursor.string(), cursor.unpack("<I")
                shape = tuple(cursor.unpack("<Q") for _ in range(dims))
                kind, offset = GGMLQuantizationType(cursor.unpack("<I")), cursor.unpack("<Q")
                n = math.prod(shape)
                infos.append((name, shape, kind.name.lower(), n, row_bytes(kind, n), offset))
            alignment = fields.get("general.alignment", 32)
            start = -(-cursor.at // alignment) * alignment
            tensors = {i[0]: TensorInfo(*i[:5], start + i[5]) for i in infos}
            end = max((t.offset + t.n_bytes for t in tensors.values()), default=cursor.at)
            if end > len(data):
                raise ValueError(f"its tensor data ends at byte {end}, but the file has {len(data)} bytes")
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise InputError(f"{path}: not a readable GGUF file ({e}).") from None
    return Header(fields, lengths, types, tensors)


def field_values(reader: GGUFReader, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The header fields of an open GGUF, decoded (strings, numbers, lists): all, or those of `keys` it has
    (decoding a vocabulary's 100k token strings is the slow part of reading a header)."""
    fields = reader.fields if keys is None else {k: reader.fields[k] for k in keys if k in reader.fields}
    return {name: f.contents() for name, f in fields.items()}


def read_metadata(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The header fields of a GGUF file, decoded: all, or those of `keys` it has."""
    if keys is None:
        return read_header(path, None).fields
    keys = list(keys)
    fields = read_header(path, keys).fields
    return {k: fields[k] for k in keys if k in fields}


def gguf_context_length(path: str | os.PathLike) -> int:
    """The context length a GGUF model was trained with (`<arch>.context_length`)."""
    fields = read_header(path).fields
    arch = fields.get("general.architecture")
    if arch is None:
        raise InputError(f"{path}: no general.architecture in the GGUF header.")
    key = f"{arch}.context_length"
    if key not in fields:
        raise InputError(f"{path}: no {key} in the GGUF header.")
    return int(fields[key])
