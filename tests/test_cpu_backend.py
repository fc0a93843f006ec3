"""The CPU code llama.cpp runs: the build's flavour and variant, the features it reports, AMX, the tools on it."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys

import pytest
from helpers import REPO
from helpers.llama import FLAVOUR, SOURCE, convert
from helpers.workflow import snakemake

from cpuforge.llama.runtime import cpu_backend, describe_cpu_backend, kernel_grants_amx
from cpuforge.llama.build import cmake_options
from cpuforge.paths import DEFAULT_FLAVOUR

# ggml's feature names and /proc/cpuinfo's flags for the same instructions
CPUINFO_FLAG = {
    "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2",
    "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
    "AVX_VNNI": "avx_vnni", "AMX_INT8": "amx_int8",
}  # fmt: skip
X86 = platform.machine() == "x86_64"


def cpu_flags() -> set[str]:
    return set(re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M)[1].split())


@pytest.mark.skipif(not X86, reason="the feature names checked are x86-64's")
def test_the_build_runs_only_instructions_this_cpu_has(llama_bin):
    backend = cpu_backend(llama_bin)
    assert backend["build"] == FLAVOUR
    flags = cpu_flags()
    reported = {name for name in backend["features"] if name in CPUINFO_FLAG}
    assert {CPUINFO_FLAG[name] for name in reported} <= flags, backend
    assert "REPACK" in backend["features"]  # q4_0 weights are repacked for the CPU's widest dot products
    if backend["build"] == "native":
        assert backend["variant"] == "native"
        # -march=native: every instruction set ggml knows that this CPU has
        assert {name for name, flag in CPUINFO_FLAG.items() if flag in flags} <= set(backend["features"]), backend
    else:
        assert (llama_bin / f"libggml-cpu-{backend['variant']}.so").is_file()
        if "avx2" in flags:  # never the x86-64 baseline on a CPU that can do better
            assert "AVX2" in backend["features"], backend
    assert describe_cpu_backend(backend).startswith(f"{FLAVOUR} build, CPU variant {backend['variant']} (")


@pytest.mark.skipif(not X86, reason="AMX is x86-64's")
def test_amx_is_used_only_where_the_kernel_grants_its_tile_state(llama_bin):
    # the request ggml makes before its first AMX instruction, in a process of its own (it is for life)
    request = "import ctypes; sys = ctypes.CDLL(None).syscall; raise SystemExit(sys(158, 0x1023, 18) != 0)"
    granted = subprocess.run([sys.executable, "-c", request]).returncode == 0
    assert kernel_grants_amx() == granted
    if "amx_tile" not in cpu_flags():
        assert not granted
    backend = cpu_backend(llama_bin)
    assert backend["amx"] == ("AMX_INT8" in backend["features"] and granted)


def tile_config_stores(objdump: str) -> set[int]:
    """Offsets within the tile configuration of the stack stores before each ldtilecfg that loads it."""
    offsets = set()
    lines = objdump.splitlines()
    for i, line in enumerate(lines):
        match = re.search(r"ldtilecfg\s+(-?0x[0-9a-f]+|)\(%rsp\)", line)
        if match:
            base = int(match[1] or "0", 16)
            for before in lines[max(0, i - 16) : i]:
                store = re.search(r",(-?0x[0-9a-f]+|)\(%rsp\)\s*$", before)
                if store and base <= int(store[1] or "0", 16) < base + 64:
                    offsets.add(int(store[1] or "0", 16) - base)
    return offsets


@pytest.mark.skipif(not X86 or shutil.which("g++") is None, reason="GCC's AMX header, on x86-64")
def test_gcc_keeps_ggmls_amx_tile_configuration(llama_bin, tmp_path):
    # ggml's own tile configuration (ggml-cpu/amx/mmq.cpp), compiled as the build compiles it
    source = (SOURCE / "ggml" / "src" / "ggml-cpu" / "amx" / "mmq.cpp").read_text()
    struct = re.search(r"struct tile_config_t\{.*?\n\};", source, re.S)[0]
    init = re.search(r"inline void ggml_tile_config_init\(void\) \{.*?\n\}", source, re.S)[0]
    unit = tmp_path / "tile.cpp"
    unit.write_text(f"#include <immintrin.h>\n#include <cstdint>\n{struct}\n{init.replace('inline ', '')}\n")
    flags = cmake_options(FLAVOUR)["CMAKE_CXX_FLAGS"].split()
    subprocess.run(["g++", "-O3", "-march=sapphirerapids", *flags, "-c", str(unit), "-o", str(tmp_path / "tile.o")],
                   check=True)  # fmt: skip
    objdump = subprocess.run(["objdump", "-d", str(tmp_path / "tile.o")], capture_output=True, text=True, check=True)
    stores = tile_config_stores(objdump.stdout)
    # palette 1 at byte 0, the column bytes of tiles 0-7 from byte 16, their rows from byte 48: with
    # GCC's own header only byte 0 is written and every tile stays unconfigured (SIGILL at the first use)
    assert 16 in stores and 48 in stores, objdump.stdout
    if FLAVOUR == "portable":  # and in the AMX variant the build made
        library = llama_bin / "libggml-cpu-sapphirerapids.so"
        objdump = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
        assert "ldtilecfg" in objdump and {16, 48} <= tile_config_stores(objdump)


def test_slurm_profile_builds_one_portable_llama_cpp_for_every_node(tmp_path):
    result = snakemake(tmp_path, "--dry-run", "--profile", str(REPO / "profiles" / "slurm"), "llama_cpp")
    assert "--flavour portable" in result.stdout and "/portable/bin/libllama.so" in result.stdout
    result = snakemake(tmp_path, "--dry-run", "--printshellcmds", "llama_cpp")  # config.yaml's
    assert f"--flavour {DEFAULT_FLAVOUR}" in result.stdout and f"/{DEFAULT_FLAVOUR}/bin/libllama.so" in result.stdout


def test_llama_cli_answers_on_the_build(llama_bin, tiny_base, tmp_path):
    gguf = convert(tiny_base, tmp_path / "tiny-f16.gguf")
    result = subprocess.run(
        [str(llama_bin / "llama-cli"), "-m", str(gguf), "-p", "the", "-n", "8", "-st", "-t", "2", "--temp", "0",
         "--no-warmup"],
        cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    if FLAVOUR == "portable":  # found beside the tool, the variant for this CPU
        variant = cpu_backend(llama_bin)["variant"]
        assert f"loaded CPU backend from {llama_bin.resolve()}/libggml-cpu-{variant}.so" in result.stderr
