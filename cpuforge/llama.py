"""The pinned llama.cpp at run time: its Python binding, its tools, and how many threads and tokens to give them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.files import read_json
from cpuforge.paths import report_metrics

log = logging.getLogger(__name__)


def llama_cpp_env(bin_dir: str | os.PathLike) -> dict[str, str]:
    """Environment under which llama-cpp-python loads the pinned build instead of its own."""
    return {**os.environ, "LLAMA_CPP_LIB_PATH": str(Path(bin_dir).resolve())}


def load_llama_cpp(bin_dir: str | os.PathLike):
    """Import llama_cpp bound to the pinned libllama in `bin_dir`."""
    bin_dir = Path(bin_dir).resolve()
    if not (bin_dir / "libllama.so").is_file():
        raise InputError(f"{bin_dir}: no libllama.so (build it with `snakemake -c2 llama_cpp`, or pass --llama-bin).")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    import llama_cpp

    return llama_cpp


def run_tool(cmd: list[str]) -> str:
    """Run a llama.cpp tool; its output goes to the log (stderr) as it comes and is returned for parsing."""
    log.info("running %s", " ".join(map(str, cmd)))
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            lines.append(line)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return "".join(lines)


def run_llama_tool(tool: str | os.PathLike, args: list[str]) -> str:
    """Run a pinned llama.cpp tool through cpuforge/llama_tool.py, which keeps its last log lines (see there)."""
    runner = Path(__file__).with_name("llama_tool.py")
    return run_tool([sys.executable, str(runner), str(tool), *map(str, args)])


def load_gguf_vocab(path: str | os.PathLike, bin_dir: str | os.PathLike):
    """A llama-cpp-python Llama holding only the vocabulary and metadata of a GGUF file (no weights)."""
    llama_cpp = load_llama_cpp(bin_dir)
    return llama_cpp.Llama(str(path), vocab_only=True, n_ctx=64, verbose=False)


def physical_cores() -> int:
    """Physical cores this process may run on: hyper-threads share a core's units and only add contention."""
    allowed = os.sched_getaffinity(0)
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(allowed)
    return len(cores) or len(allowed)


# the context a chat or a server request gets unless --ctx-size says otherwise: the model's own,
# capped, because the KV cache for a 128k-token context is many GB that a chat rarely fills
MAX_DEFAULT_CTX = 4096


def gguf_context_length(path: str | os.PathLike) -> int:
    """The context length a GGUF model was trained with (`<arch>.context_length`), read from its header."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable GGUF file ({e}).") from None
    arch = fields["general.architecture"].contents()
    key = f"{arch}.context_length"
    if key not in fields:
        raise InputError(f"{path}: no {key} in the GGUF header.")
    return int(fields[key].contents())


def default_threads(model: str | os.PathLike) -> int:
    """Threads to run `model` with: the eval report's `recommended_threads`, else the physical cores."""
    metrics = report_metrics(model)
    if metrics.is_file():
        recommended = read_json(metrics).get("recommended_threads")
        if isinstance(recommended, int) and recommended >= 1:
            log.info("threads: %d, recommended by %s", recommended, metrics)
            return recommended
    threads = physical_cores()
    log.info("threads: %d, the physical cores (no recommended_threads in %s)", threads, metrics)
    return threads


def apply_loras(llama_cpp, llm, loras: list[tuple[Path, float]]) -> list:
    """Load GGUF LoRA adapters onto a llama-cpp-python Llama, all applied at once, each at its scale
    (on top of the alpha / r stored in the file), as llama-server's --lora-scaled does. Returns the
    adapters, which live as long as the model."""
    import ctypes

    adapters = []
    for path, _ in loras:
        if not Path(path).is_file():
            raise InputError(f"{path}: file not found.")
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
        if adapter is None:
            raise InputError(f"{path}: not a GGUF LoRA adapter for this model (llama.cpp cannot load it onto it).")
        adapters.append(adapter)
    if adapters:
        array = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
        scales = (ctypes.c_float * len(loras))(*(scale for _, scale in loras))
        if llama_cpp.llama_set_adapters_lora(llm.ctx, array, len(adapters), scales) != 0:
            raise InputError(f"{loras[0][0]}: llama.cpp could not apply the LoRA adapters.")
        log.info("applied %s", ", ".join(f"{p} (scale {s:g})" for p, s in loras))
    return adapters
