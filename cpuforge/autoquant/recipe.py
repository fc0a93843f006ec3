"""A mix as the file `llama-quantize --tensor-type-file` reads, and the check of a written GGUF against it.

One line per quantized tensor, `^NAME$=TYPE`: llama-quantize matches each line's name as a regular
expression against every tensor's, the first match winning, so every name is anchored and its dots
escaped. The file holds nothing else (llama-quantize reads it as words, and refuses any that is not
NAME=TYPE); why the search chose it is in the search record beside it. By hand:

    llama-quantize --imatrix imatrix.gguf --tensor-type-file recipe.txt ggml-model-f16.gguf out.gguf Q4_K_S
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.gguf import read_header
from cpuforge.llama.ggml import ggml_type, type_name
from cpuforge.llama.quant import QUANTS

LINE = re.compile(r"^\^(?P<name>(?:[^\\=]|\\.)+)\$=(?P<type>[A-Za-z0-9_]+)$")


def lines(types: dict[str, str]) -> list[str]:
    return [f"^{re.escape(name)}$={kind}" for name, kind in types.items()]


def write(path: Path, types: dict[str, str]) -> None:
    path.write_text("\n".join(lines(types)) + "\n")


def read(path: Path) -> dict[str, str]:
    """tensor name -> ggml type; a line this module does not write is refused by number."""
    types = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = LINE.match(line.strip())
        if m is None:
            raise InputError(f"{path}:{n}: not a recipe line (^TENSOR$=TYPE): {line!r}")
        types[re.sub(r"\\(.)", r"\1", m["name"])] = type_name(ggml_type(m["type"]))
    return types


def base_type(types: dict[str, str], bytes_of: dict[str, int]) -> str:
    """llama-quantize's positional type for a recipe: the type holding most of its bytes, as the llama-quantize
    type whose matrices get it (so general.file_type tells roughly what the file is), else q8_0."""
    held = Counter()
    for name, kind in types.items():
        held[kind.lower()] += bytes_of[name]
    for kind, _ in held.most_common():
        for q in QUANTS.values():
            if q.ggml_type == kind and q.family != "float" and not q.needs_imatrix:
                return q.name
    return "q8_0"


def check_written(gguf: Path, types: dict[str, str]) -> None:
    """Every tensor of the recipe has, in the file's header, the type the recipe gives it (llama.cpp #22544:
    an override equal to the file's own type was once replaced by the default mix)."""
    tensors = read_header(gguf).tensors
    wrong = [f"{name} is {tensors[name].type if name in tensors else 'missing'}, not {kind}"
             for name, kind in types.items() if name not in tensors or tensors[name].type != kind.lower()]  # fmt: skip
    if wrong:
        raise RuntimeError(f"{gguf}: llama-quantize did not follow the recipe: {'; '.join(wrong[:5])}"
                           + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "") + ".")  # fmt: skip
