"""Where an artifact came from: sidecar JSON records and the same record inside a GGUF's metadata."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from cpuforge.io.files import sha256_tree, write_json
from cpuforge.io.gguf import field_values, open_gguf, row_bytes


PACKAGES = ("torch", "transformers", "peft", "safetensors", "sentencepiece", "gguf", "snakemake", "llama_cpp_python")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance(artifact: str | os.PathLike, inputs: dict[str, str | os.PathLike], **facts) -> dict:
    """Where an artifact came from: sha256 of its inputs, package versions and the step's own facts."""
    return {
        "artifact": Path(artifact).name,
        "inputs": {role: sha256_tree(p) for role, p in inputs.items()},
        "versions": package_versions(),
        **facts,
    }


def write_provenance(artifact: str | os.PathLike, record: dict) -> None:
    """Write a provenance() record beside its artifact as `<artifact>.provenance.json`."""
    artifact = Path(artifact)
    write_json(artifact.with_name(artifact.name + ".provenance.json"), record, sort_keys=True)


def copy_gguf_with_provenance(
    src: Path, dst: Path, step: str, record: dict, metadata: dict | None = None, remove: tuple[str, ...] = (),
    replace: dict[str, tuple[GGMLQuantizationType, Path]] | None = None,
) -> None:
    """Copy a GGUF file, adding `record` as JSON under the key `cpuforge.<step>`, so the file alone
    tells its history; keys from earlier steps travel along (llama-quantize copies them too).
    `metadata` (key -> str, bool or int value) sets further keys, `remove` drops keys; `replace` (tensor
    name -> its type and a file of its packed bytes) puts those tensors in other types."""
    from gguf import GGUFValueType, GGUFWriter
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    types = {bool: GGUFValueType.BOOL, str: GGUFValueType.STRING, int: GGUFValueType.UINT32}
    new = {key: MetadataDetails(types[type(value)], value) for key, value in (metadata or {}).items()}
    new[f"cpuforge.{step}"] = MetadataDetails(GGUFValueType.STRING, json.dumps(record, sort_keys=True))
    reader = open_gguf(src)
    writer = GGUFWriter(dst, arch=reader.get_field("general.architecture").contents(), endianess=reader.endianess)
    with open(src, "rb") as f:
        reader.tensors = [replaced(t, *replace[t.name]) if t.name in (replace or {})
                          else t._replace(data=StreamedTensor(f, t.data_offset, t.data.shape, t.data.dtype))
                          for t in reader.tensors]  # fmt: skip
        copy_with_new_metadata(reader, writer, new, list(remove))


def replaced(t, kind: GGMLQuantizationType, packed: Path):
    """GGUFReader's tensor `t` in type `kind`, its bytes those of the file `packed`."""
    n_per_row = int(t.shape[0])
    shape = (t.n_elements // n_per_row, row_bytes(kind, n_per_row))
    if packed.stat().st_size != shape[0] * shape[1]:
        raise RuntimeError(f"{packed}: {packed.stat().st_size} bytes, not the {shape[0] * shape[1]} of {t.name} "
                           f"in {kind.name}.")  # fmt: skip
    return t._replace(tensor_type=kind, n_bytes=shape[0] * shape[1], data=StreamedTensor(packed, 0, shape, np.uint8))


class StreamedTensor:
    """A GGUF tensor's bytes, copied to the writer's file in plain reads of at most CHUNK bytes.

    GGUFReader's tensors are views of one memory map, and every page a copy reads from a map stays
    resident in the process: copying a 13 GB f16 GGUF that way shows 13 GB of memory. This stands in
    for such a view where the writer uses it (shape, dtype, nbytes, tofile), so the copy holds one chunk.
    `source` is an open file, or a path opened when the bytes are copied."""

    CHUNK = 64 << 20

    def __init__(self, source, offset: int, shape: tuple[int, ...], dtype):
        self.source, self.offset = source, offset
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def tofile(self, out) -> None:
        if isinstance(self.source, Path):
            with open(self.source, "rb") as f:
                return self._copy(f, out)
        return self._copy(self.source, out)

    def _copy(self, f, out) -> None:
        f.seek(self.offset)
        left = self.nbytes
        while left:
            block = f.read(min(left, self.CHUNK))
            if not block:
                raise EOFError(f"{f.name}: ends inside a tensor's data.")
            out.write(block)
            left -= len(block)


def read_history(path: Path) -> dict:
    """general.* fields and the decoded cpuforge.* provenance records of a GGUF file."""
    reader = open_gguf(path)
    fields = field_values(reader)
    return {
        "general": {k: v for k, v in fields.items() if k.startswith("general.")},
        "cpuforge": {k.removeprefix("cpuforge."): json.loads(v) for k, v in fields.items()
                     if k.startswith("cpuforge.")},  # fmt: skip
        "tensors": len(reader.tensors),
    }
