"""GGUF files read in one place, with one error policy: a file that is not a readable GGUF is an
InputError whose sentence names the file and the problem, whichever step reads it.

gguf-py's GGUFReader maps the file and decodes its header; it raises whatever numpy raises on a
file cut short (IndexError, ValueError), which a user should never see as a traceback."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cpuforge.errors import InputError

if TYPE_CHECKING:
    from gguf import GGUFReader

GGUF_MAGIC = b"GGUF"


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


def field_values(reader: GGUFReader, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The header fields of an open GGUF, decoded (strings, numbers, lists): all, or those of `keys` it has
    (decoding a vocabulary's 100k token strings is the slow part of reading a header)."""
    fields = reader.fields if keys is None else {k: reader.fields[k] for k in keys if k in reader.fields}
    return {name: f.contents() for name, f in fields.items()}


def read_metadata(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The header fields of a GGUF file, decoded: all, or those of `keys` it has."""
    return field_values(open_gguf(path), keys)


def gguf_context_length(path: str | os.PathLike) -> int:
    """The context length a GGUF model was trained with (`<arch>.context_length`)."""
    reader = open_gguf(path)
    arch = field_values(reader, ["general.architecture"]).get("general.architecture")
    if arch is None:
        raise InputError(f"{path}: no general.architecture in the GGUF header.")
    key = f"{arch}.context_length"
    if key not in reader.fields:
        raise InputError(f"{path}: no {key} in the GGUF header.")
    return int(reader.fields[key].contents())
