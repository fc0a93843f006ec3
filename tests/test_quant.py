"""The table of llama.cpp quant types (cpuforge.llama.quant.QUANTS) held against the pinned llama.cpp itself."""

from __future__ import annotations

import re
import subprocess

import pytest
from helpers.llama import SOURCE, convert
from helpers.models import make_tiny_llama

from cpuforge.llama.quant import QUANTS

# rows of 256 (hidden and feed-forward), so every K- and I-quant applies as such instead of falling back
K_QUANT_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=2)


@pytest.mark.unit
def test_every_main_type_is_a_ggml_type():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for q in QUANTS.values():
        ggml = GGMLQuantizationType[q.ggml_type.upper()]
        block, size = GGML_QUANT_SIZES[ggml]
        # the legacy and float types are one block format each: their bits per weight are the block's
        assert q.family not in ("legacy", "float") or q.bits == 8 * size / block, q.name


@pytest.fixture(scope="module")
def f16_gguf(llama_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("quant_table")
    return convert(make_tiny_llama(work / "base", **K_QUANT_SIZES), work / "f16.gguf")


@pytest.mark.llama
def test_llama_quantize_knows_every_type_and_which_need_an_importance_matrix(llama_bin, f16_gguf):
    """llama-quantize --dry-run plans each type without writing it, and warns where the real run would
    refuse to go on without an importance matrix: exactly the types the table says need one."""
    for q in QUANTS.values():
        run = subprocess.run([str(llama_bin / "llama-quantize"), "--dry-run", str(f16_gguf), q.name.upper()],
                             capture_output=True, text=True)  # fmt: skip
        out = run.stdout + run.stderr
        assert run.returncode == 0, f"{q.name}:\n{out[-3000:]}"
        assert ("will require an imatrix" in out) == q.needs_imatrix, f"{q.name}:\n{out[-3000:]}"


@pytest.mark.llama
def test_each_main_type_is_llama_cpps_default_for_it(llama_bin):
    """The table's ggml type of each quant type is the one the pinned llama.cpp gives its matrices unless a
    mix rule says otherwise (src/llama-quant.cpp, llama_ftype_get_default_type; cases fall through)."""
    code = (SOURCE / "src" / "llama-quant.cpp").read_text()
    body = code[code.index("ggml_type llama_ftype_get_default_type(") :]
    body = body[: body.index("default:")]
    defaults, pending = {}, []
    for ftype, ggml in re.findall(r"case LLAMA_FTYPE_(?:MOSTLY|ALL)_(\w+):\s*(?:return GGML_TYPE_(\w+);)?", body):
        pending.append(ftype.lower())
        if ggml:
            defaults |= dict.fromkeys(pending, ggml.lower())
            pending = []
    assert defaults["q4_k_m"] == "q4_k" and defaults["iq2_s"] == "iq2_xs"  # the parse itself
    assert {name: q.ggml_type for name, q in QUANTS.items()} == {name: defaults[name] for name in QUANTS}
