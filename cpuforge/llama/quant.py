"""llama.cpp's quantization types and the quantize step around the pinned llama-quantize."""

from __future__ import annotations

import difflib
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output
from cpuforge.io.gguf import check_gguf
from cpuforge.io.provenance import copy_gguf_with_provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantType:
    """One of llama-quantize's types (tools/quantize/quantize.cpp, QUANT_OPTIONS) and what it needs."""

    name: str  # as config quant_types and the file names spell it; llama-quantize takes it upper-cased
    family: str  # legacy (one block format, quantized in one pass), k or i (searched mixes), float
    bits: float  # bits per weight of the matrices: for the K- and I-mixes their average over a LLaMA's
    # matrices, from the sizes llama-quantize states; vectors stay f32, `output.weight` gets at least q6_k
    ggml_type: str  # the ggml type its matrices get unless a mix says otherwise (llama_ftype_get_default_type)
    # llama-quantize refuses to write it without an importance matrix: it holds IQ1_*, IQ2_* or IQ3_XXS
    # tensors, or Q2_K tensors inside a Q2_K_S file (src/llama-quant.cpp, tensor_requires_imatrix and
    # llama_tensor_get_type)
    needs_imatrix: bool = False


# the types cpuforge makes, in the order their names are matched (rules/common.smk's wildcard constraints)
QUANTS = {q.name: q for q in (
    QuantType("q4_0", "legacy", 4.5, "q4_0"),
    QuantType("q4_1", "legacy", 5.0, "q4_1"),
    QuantType("q5_0", "legacy", 5.5, "q5_0"),
    QuantType("q5_1", "legacy", 6.0, "q5_1"),
    QuantType("q8_0", "legacy", 8.5, "q8_0"),
    QuantType("q2_k", "k", 3.0, "q2_k"),
    QuantType("q2_k_s", "k", 2.9, "q2_k", needs_imatrix=True),
    QuantType("q3_k_s", "k", 3.5, "q3_k"),
    QuantType("q3_k_m", "k", 3.9, "q3_k"),
    QuantType("q3_k_l", "k", 4.3, "q3_k"),
    QuantType("q4_k_s", "k", 4.6, "q4_k"),
    QuantType("q4_k_m", "k", 4.9, "q4_k"),
    QuantType("q5_k_s", "k", 5.5, "q5_k"),
    QuantType("q5_k_m", "k", 5.7, "q5_k"),
    QuantType("q6_k", "k", 6.5625, "q6_k"),
    QuantType("iq1_s", "i", 1.6, "iq1_s", needs_imatrix=True),
    QuantType("iq1_m", "i", 1.8, "iq1_m", needs_imatrix=True),
    QuantType("iq2_xxs", "i", 2.1, "iq2_xxs", needs_imatrix=True),
    QuantType("iq2_xs", "i", 2.35, "iq2_xs", needs_imatrix=True),
    QuantType("iq2_s", "i", 2.5, "iq2_xs", needs_imatrix=True),
    QuantType("iq2_m", "i", 2.7, "iq2_s", needs_imatrix=True),
    QuantType("iq3_xxs", "i", 3.1, "iq3_xxs", needs_imatrix=True),
    QuantType("iq3_xs", "i", 3.3, "iq3_s", needs_imatrix=True),
    QuantType("iq3_s", "i", 3.45, "iq3_s"),
    QuantType("iq3_m", "i", 3.7, "iq3_s"),
    QuantType("iq4_nl", "i", 4.5, "iq4_nl"),
    QuantType("iq4_xs", "i", 4.25, "iq4_xs"),
    QuantType("f16", "float", 16, "f16"),
    QuantType("bf16", "float", 16, "bf16"),
)}  # fmt: skip
# views of the table, for the checks and the rules
QUANT_TYPES = tuple(QUANTS)
NEEDS_IMATRIX = tuple(name for name, q in QUANTS.items() if q.needs_imatrix)
# ggml tensor types a mix may give a matrix (cpuforge.autoquant), and those llama-quantize writes into a
# matrix other than the embeddings and the output only with an importance matrix (tensor_requires_imatrix)
TENSOR_TYPES = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_nl", "iq4_xs", "q3_k", "iq3_s",
                "iq3_xxs", "q2_k", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")  # fmt: skip
IMATRIX_TENSOR_TYPES = ("iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")


def uniform_type(tensor_type: str) -> str:
    """The llama-quantize type whose matrices get the ggml type `tensor_type` (q4_K -> q4_k_s), for --pure: the
    first of the table, one that needs no importance matrix where there is one."""
    names = [name for name, q in QUANTS.items() if q.ggml_type == tensor_type.lower()]
    return min(names, key=lambda name: QUANTS[name].needs_imatrix)


def takes_imatrix(qtype: str) -> bool:
    """Whether llama-quantize's rounding of `qtype` reads an importance matrix (q8_0's and the floats' do not)."""
    return QUANTS[qtype].family != "float" and QUANTS[qtype].ggml_type != "q8_0"


def candidate_files(ladder: list[str], listed: list[str], imatrix: bool) -> list[tuple[str, str, str, bool, bool]]:
    """The quant search's files that llama-quantize writes, as (name, kind, llama-quantize type, with the
    importance matrix, --pure): each ladder type uniform, each listed type with the matrix where it takes one
    and without it where it needs none."""
    files = [(f"uniform {t}", "uniform", q, imatrix and takes_imatrix(q), True) for t in ladder if (q := uniform_type(t))]
    for qtype in listed:
        if imatrix and takes_imatrix(qtype):
            files.append((listed_name(qtype, True), "listed", qtype, True, False))
        if not QUANTS[qtype].needs_imatrix:
            files.append((listed_name(qtype, False), "listed", qtype, False, False))
    return files


def listed_name(qtype: str, imatrix: bool) -> str:
    """A listed type's candidate: `q4_0 + imatrix`, `q4_0`."""
    return f"{qtype} + imatrix" if imatrix else qtype


def check_quant_type(qtype: str) -> str:
    if qtype.lower() in QUANT_TYPES:
        return qtype.lower()
    # the usual typo is a letter for a look-alike digit (q4_O); else the nearest name
    lookalike = qtype.lower().replace("o", "0")
    close = [lookalike] if lookalike in QUANT_TYPES else difflib.get_close_matches(qtype.lower(), QUANT_TYPES, 1, 0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; known types: {', '.join(QUANT_TYPES)}."
    raise InputError(f"quant_types: unknown llama.cpp quantization type {qtype!r}{hint}")


def check_imatrix(qtype: str, imatrix: Path | None) -> None:
    if qtype in NEEDS_IMATRIX and imatrix is None:
        raise InputError(f"{qtype} needs an importance matrix (--imatrix): llama-quantize cannot make it without one.")
    if imatrix is not None:
        check_gguf(imatrix)


def quantize_command(llama_bin: Path, src: Path, out: Path, qtype: str, threads: int, imatrix: Path | None = None,
                     recipe: Path | None = None, pure: bool = False) -> list[str]:  # fmt: skip
    """The pinned llama-quantize's command: `src` to `out` in `qtype`, the types of `recipe`'s tensors (a
    --tensor-type-file, cpuforge.autoquant.recipe) overriding it; with `pure`, every matrix in `qtype`'s tensor
    type as far as its rows allow (--pure), not llama-quantize's mix for the type."""
    weights = ["--imatrix", str(imatrix)] if imatrix else []
    types = ["--tensor-type-file", str(recipe)] if recipe else []
    flags = ["--pure"] if pure else []
    return [str(llama_bin / "llama-quantize"), *flags, *weights, *types, str(src), str(out), qtype.upper(),
            str(threads)]  # fmt: skip


def run_quantize(llama_bin: Path, src: Path, out: Path, qtype: str, threads: int, imatrix: Path | None = None,
                 recipe: Path | None = None, pure: bool = False) -> None:  # fmt: skip
    """The pinned llama-quantize, as it is (quantize_command)."""
    cmd = quantize_command(llama_bin, src, out, qtype, threads, imatrix, recipe, pure)
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)


# llama-quantize --dry-run's line per tensor: "[  2/272] token_embd.weight - [576, 49152, 1, 1], type = f16,
# size = 54.00 MiB -> 28.69 MiB (q8_0)"; a tensor it keeps has no arrow
PLANNED = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^]]*\], type =\s*(\w+), size =[^(]*(?:\((\w+)\))?\s*$")


def planned_types(llama_bin: Path, src: Path, qtype: str, imatrix: Path | None = None, pure: bool = False) -> dict:
    """Each tensor's ggml type in the file llama-quantize would write (its --dry-run: nothing quantized)."""
    cmd = quantize_command(llama_bin, src, src.with_name("dry-run.gguf"), qtype, 1, imatrix, pure=pure)
    cmd.insert(1, "--dry-run")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-quantize --dry-run {qtype} failed:\n{result.stderr[-2000:]}")
    types = {m[1]: m[3] or m[2] for line in (result.stdout + result.stderr).splitlines() if (m := PLANNED.match(line))}
    if not types:
        raise RuntimeError(f"llama-quantize --dry-run {qtype}: no tensor listed in its output.")
    return types


def quantize(
    llama_bin: Path, src: Path, out: Path, qtype: str, threads: int, record: dict, imatrix: Path | None = None
) -> None:
    """Write `src` quantized to `qtype` as `out`, with `record` as its provenance, through the pinned llama-quantize."""
    check_gguf(src)
    check_imatrix(qtype, imatrix)
    with atomic_output(out) as tmp:
        scratch = tmp.with_name(tmp.name + ".quantizer")
        run_quantize(llama_bin, src, scratch, qtype, threads, imatrix)
        copy_gguf_with_provenance(scratch, tmp, "quantize", record)
