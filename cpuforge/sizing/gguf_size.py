"""A GGUF file's figures: predicted from the merged model before it exists, or read from its header after; and
the demo's model, predicted from the GGUF its base is made from.

The converter's tensor names come from gguf-py, each quant type's bits per weight from the quant table
(cpuforge.llama.quant.QUANTS, held against gguf-py's block sizes by tests/test_quant.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gguf.constants import MODEL_ARCH
from gguf.tensor_mapping import get_tensor_name_map

from cpuforge.io.gguf import read_header
from cpuforge.llama.quant import QUANTS
from cpuforge.sizing.model import AdapterSpec, Arch, Model, Tensor, llama_shapes, merged_model

def matrix_type(qtype: str) -> tuple[float, str]:
    """Bits per weight of a llama-quantize type's matrices and the ggml type most of them get (the quant
    table's); vectors stay f32, `output.weight` is at least q6_K."""
    q = QUANTS[qtype]
    return q.bits, q.ggml_type


def is_legacy(qtype: str) -> bool:
    """A type quantized in one pass, block by block (the float types copied), not a searched K- or I-mix."""
    return QUANTS[qtype].family in ("legacy", "float")


@dataclass(frozen=True)
class Gguf:
    """A GGUF file's figures: its size, its architecture, and its tensors: elements, bytes, row length
    and ggml type of each."""

    arch: Arch
    nbytes: int
    tensors: dict[str, tuple[int, int, int, str]]

    @property
    def params(self) -> int:
        return sum(t[0] for t in self.tensors.values())


@cache
def _tensor_names(layers: int):
    return get_tensor_name_map(MODEL_ARCH.LLAMA, layers)


def gguf_name(name: str, layers: int) -> str:
    """The converter's name for a LLaMA tensor of a model of `layers` layers (gguf-py's tensor map)."""
    return _tensor_names(layers).get_name(name, try_suffixes=(".weight", ".bias")) or name


def predicted_gguf(model: Model, qtype: str = "f16") -> Gguf:
    """The GGUF the converter (f16) or llama-quantize (`qtype`) makes of the merged model: matrices in the
    type, vectors in f32 (as the converter keeps them), `output.weight` at least q6_K; plus the header,
    whose vocabulary takes about 32 bytes a token."""
    bits, kind = matrix_type(qtype)
    q6_k = matrix_type("q6_k")
    tensors = {}
    for name, t in model.merged.items():
        out = gguf_name(name, model.arch.layers)
        b, k = (32, "f32") if len(t.shape) == 1 else max((bits, kind), q6_k) if out == "output.weight" else (bits, kind)
        tensors[out] = (t.numel, math.ceil(t.numel * b / 8), t.shape[-1], k)
    header = 32 * model.arch.vocab + (64 << 10)
    return Gguf(model.arch, header + sum(t[1] for t in tensors.values()), tensors)


def read_gguf(path: str | Path) -> Gguf:
    """A GGUF file's figures from its header; no tensor data is read."""
    header = read_header(path)
    fields = header.fields
    prefix = fields["general.architecture"] + "."

    def value(key):
        return fields.get(prefix + key)

    heads = value("attention.head_count")
    vocab = header.lengths.get("tokenizer.ggml.tokens", 0)
    arch = Arch(value("block_count"), value("embedding_length"), heads, value("attention.head_count_kv") or heads,
                value("feed_forward_length"), vocab)  # fmt: skip
    tensors = {t.name: (t.n_elements, t.n_bytes, t.shape[0], t.type) for t in header.tensors.values()}
    return Gguf(arch, Path(path).stat().st_size, tensors)


def demo_model(g: Gguf, rank: int, targets: list[str], dtype: str) -> Model:
    """The demo's Model before its base exists: the architecture of `g`, the GGUF it is made from, the base
    in f32 (cpuforge.demo), its LoRA of rank `rank` on `targets` in every layer."""
    shapes = llama_shapes(g.arch, tied="output.weight" not in g.tensors)
    base = {n: Tensor(s, "F32") for n, s in shapes.items()}
    lora = AdapterSpec(loras={n: [rank] for n in shapes if n.split(".")[-2] in targets})
    return merged_model(g.arch, base, [lora], shapes, dtype)
