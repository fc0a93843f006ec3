"""llama.cpp's quantization types and the quantize step around the pinned llama-quantize."""

from __future__ import annotations

import difflib
import logging
import subprocess
import sys
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output
from cpuforge.io.gguf import check_gguf
from cpuforge.io.provenance import copy_gguf_with_provenance

log = logging.getLogger(__name__)


# llama-quantize's type names (tools/quantize/quantize.cpp, QUANT_OPTIONS) that cpuforge makes.
QUANT_TYPES = (
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
    "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
    "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
    "iq4_nl", "iq4_xs",
    "f16", "bf16",
)  # fmt: skip


# Types whose files llama-quantize refuses to write without an importance matrix: they hold
# IQ1_*, IQ2_* or IQ3_XXS tensors, or Q2_K tensors inside a Q2_K_S file (src/llama-quant.cpp,
# tensor_requires_imatrix and llama_tensor_get_type).
NEEDS_IMATRIX = ("q2_k_s", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs")


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


def quantize(
    llama_bin: Path, src: Path, out: Path, qtype: str, threads: int, record: dict, imatrix: Path | None = None
) -> None:
    """Write `src` quantized to `qtype` as `out`, with `record` as its provenance, through the pinned llama-quantize."""
    check_gguf(src)
    check_imatrix(qtype, imatrix)
    with atomic_output(out) as tmp:
        scratch = tmp.with_name(tmp.name + ".quantizer")
        weights = ["--imatrix", str(imatrix)] if imatrix else []
        cmd = [str(llama_bin / "llama-quantize"), *weights, str(src), str(scratch), qtype.upper(), str(threads)]
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        copy_gguf_with_provenance(scratch, tmp, "quantize", record)
