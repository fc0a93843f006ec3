"""Where an artifact came from: sidecar JSON records and the same record inside a GGUF's metadata."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from cpuforge.io.files import atomic_output, sha256_tree
from cpuforge.io.gguf import field_values, open_gguf


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
    with atomic_output(artifact.with_name(artifact.name + ".provenance.json")) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def copy_gguf_with_provenance(
    src: Path, dst: Path, step: str, record: dict, metadata: dict | None = None, remove: tuple[str, ...] = ()
) -> None:
    """Copy a GGUF file, adding `record` as JSON under the key `cpuforge.<step>`, so the file alone
    tells its history; keys from earlier steps travel along (llama-quantize copies them too).
    `metadata` (key -> str, bool or int value) sets further keys, `remove` drops keys."""
    from gguf import GGUFValueType, GGUFWriter
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    types = {bool: GGUFValueType.BOOL, str: GGUFValueType.STRING, int: GGUFValueType.UINT32}
    new = {key: MetadataDetails(types[type(value)], value) for key, value in (metadata or {}).items()}
    new[f"cpuforge.{step}"] = MetadataDetails(GGUFValueType.STRING, json.dumps(record, sort_keys=True))
    reader = open_gguf(src)
    writer = GGUFWriter(dst, arch=reader.get_field("general.architecture").contents(), endianess=reader.endianess)
    with open(src, "rb") as f:
        reader.tensors = [t._replace(data=StreamedTensor(f, t.data_offset, t.data)) for t in reader.tensors]
        copy_with_new_metadata(reader, writer, new, list(remove))


class StreamedTensor:
    """A GGUF tensor's bytes, copied to the writer's file in plain reads of at most CHUNK bytes.

    GGUFReader's tensors are views of one memory map, and every page a copy reads from a map stays
    resident in the process: copying a 13 GB f16 GGUF that way shows 13 GB of memory. This stands in
    for such a view where the writer uses it (shape, dtype, nbytes, tofile), so the copy holds one chunk."""

    CHUNK = 64 << 20

    def __init__(self, file, offset: int, view):
        self.file, self.offset = file, offset
        self.shape, self.dtype, self.nbytes = view.shape, view.dtype, view.nbytes

    def tofile(self, out) -> None:
        self.file.seek(self.offset)
        left = self.nbytes
        while left:
            block = self.file.read(min(left, self.CHUNK))
            if not block:
                raise EOFError(f"{self.file.name}: ends inside a tensor's data.")
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
