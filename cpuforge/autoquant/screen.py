"""The speed screen: every candidate's generation speed, side by side in one llama-bench run, before any
candidate is made.

How fast a file decodes on a CPU depends on its tensors' types and shapes, not on their values, so a screen
file holds no quantized weights: it is a cut of the f16 GGUF, an evenly spaced selection of its layers (enough
that their matrices outweigh the output matrix twice), every matrix in the type llama-quantize would give it
(`llama-quantize --dry-run`, cpuforge.llama.quant.planned_types) and its bytes left zero. Writing one costs
the norms' copy, where llama-quantize takes minutes per K- or I-type at 7B on a few cores. The screen orders
and prunes the candidates; a candidate's file is made whole only when it is verified, and the passing ones are
benched again, whole, side by side, which is the run the choice rests on.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from cpuforge.io.gguf import open_gguf, row_bytes
from cpuforge.llama.ggml import ggml_type

BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def n_layers(tensors: dict) -> int:
    """The layers of a GGUF, by its tensors' names."""
    return 1 + max(int(m[1]) for name in tensors if (m := BLOCK.match(name)))


def cut_layers(shapes: dict[str, tuple[int, ...]], n_layer: int) -> list[int]:
    """Evenly spaced layers whose matrices hold at least twice the output matrix's weights (the tied
    embeddings' where there is no output.weight): decoding's time spread over the layers' matrices as in the
    whole model, not spent on the output."""
    output = shapes.get("output.weight") or shapes["token_embd.weight"]
    per_layer = sum(math.prod(s) for name, s in shapes.items() if name.startswith("blk.") and len(s) == 2) / n_layer
    count = min(n_layer, max(1, math.ceil(2 * math.prod(output) / per_layer)))
    return sorted({int((j + 0.5) * n_layer / count) for j in range(count)})


class Zeros:
    """A tensor's bytes, all zero, left as a hole in the file where the filesystem allows (the writer needs
    shape, dtype, nbytes and tofile)."""

    def __init__(self, rows: int, row_size: int):
        self.shape, self.dtype = (rows, row_size), np.dtype(np.uint8)
        self.nbytes = rows * row_size

    def tofile(self, out) -> None:
        out.seek(self.nbytes - 1, 1)
        out.write(b"\0")


def write_screen(f16: Path, out: Path, types: dict[str, str], layers: list[int]) -> None:
    """`f16` cut to `layers` (renumbered from 0) as `out`, each matrix in its type of `types` with zero bytes,
    the other tensors (the norms) as they are."""
    from gguf import GGUFValueType, GGUFWriter
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from cpuforge.io.provenance import StreamedTensor

    reader = open_gguf(f16)
    arch = reader.get_field("general.architecture").contents()
    renumber = {old: new for new, old in enumerate(layers)}
    tensors = []
    with open(f16, "rb") as f:
        for t in reader.tensors:
            name = t.name
            if m := BLOCK.match(name):
                if int(m[1]) not in renumber:
                    continue
                name = f"blk.{renumber[int(m[1])]}.{m[2]}"
            kind = ggml_type(types[t.name])
            if kind == t.tensor_type:
                data = StreamedTensor(f, t.data_offset, t.data.shape, t.data.dtype)
                tensors.append(t._replace(name=name, data=data))
                continue
            n_per_row = int(t.shape[0])
            data = Zeros(t.n_elements // n_per_row, row_bytes(kind, n_per_row))
            tensors.append(t._replace(name=name, tensor_type=kind, n_bytes=data.nbytes, data=data))
        reader.tensors = tensors
        writer = GGUFWriter(out, arch=arch, endianess=reader.endianess)
        block_count = MetadataDetails(GGUFValueType.UINT32, len(layers))
        copy_with_new_metadata(reader, writer, {f"{arch}.block_count": block_count}, [])
