"""The pinned llama.cpp at run time: its Python binding, its tools, and how many threads and tokens to give them."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import read_json
from cpuforge.paths import report_metrics

log = logging.getLogger(__name__)


# How every llama.cpp runtime here loads a GGUF: read into memory, not mapped. The CPU backend repacks
# q4_0, q4_K, iq4_nl (and q2_K) matrices into an interleaved copy as it loads them; with the file mapped
# (llama.cpp's default), every page of it was read for that copy and stays resident beside it, so the
# weights were held twice (llama.cpp #16761; the demo's q4_0 llama-server: 191 MiB peak RSS mapped, 135 MiB read).
# Read, each weight is in memory once, repacked or as stored; the repacking, and its speed, stay.
LOAD_MODE = ["--load-mode", "none"]  # llama-server, llama-perplexity, llama-imatrix, llama-cli, llama-bench


def load_model(llama_cpp, path: str | os.PathLike, **params):
    """A llama-cpp-python Llama on the GGUF `path` holding its weights once (LOAD_MODE: read, not mapped)."""
    return llama_cpp.Llama(str(path), use_mmap=False, **params)


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

    load_backends(bin_dir)
    return llama_cpp


def load_backends(bin_dir: str | os.PathLike) -> ctypes.CDLL:
    """ggml of the build in `bin_dir`, its backends registered in this process.

    A portable build's CPU code is one loadable library per CPU variant, which only
    ggml_backend_load_all* registers (the best one for this CPU). llama-cpp-python has no
    binding for it (llama-cpp-python #2069), and llama_backend_init's own call looks beside the
    Python executable, so it is called here, through ctypes, before the first model. A native
    build links its CPU backend, so it has one registered already and nothing is loaded."""
    bin_dir = Path(bin_dir).resolve()
    ggml = ctypes.CDLL(str(bin_dir / "libggml.so"))  # the one libllama.so links: dlopen returns it
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_reg_count() == 0:
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(os.fsencode(bin_dir))
        if ggml.ggml_backend_reg_count() == 0:
            raise InputError(f"{bin_dir}: none of its libggml-cpu-*.so runs on this CPU.")
    return ggml


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


# arch_prctl(2) on x86-64 Linux: the extended states the kernel can grant a process; AMX's tile data is bit 18
SYS_ARCH_PRCTL, ARCH_GET_XCOMP_SUPP, XFEATURE_XTILEDATA = 158, 0x1021, 18


def kernel_grants_amx() -> bool:
    """Whether the kernel can give this process AMX's tile state, which ggml asks for
    (ARCH_REQ_XCOMP_PERM) before it uses AMX; without it (a CPU or a VM without AMX, a kernel
    before 5.16) ggml keeps to AVX-512."""
    if platform.machine() != "x86_64" or sys.platform != "linux":
        return False
    mask = ctypes.c_uint64()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_SUPP, ctypes.byref(mask)) != 0:
        return False
    return bool(mask.value >> XFEATURE_XTILEDATA & 1)


def cpu_backend(bin_dir: str | os.PathLike) -> dict:
    """What CPU code of the build in `bin_dir` runs in this process: the build's flavour, the variant
    ggml picked (`native` for a native build), the features its CPU backend reports (AVX2, AVX512*,
    AMX_INT8, REPACK: the q4_0 weight repacking, ...), and whether AMX is used (compiled in and
    granted by the kernel)."""
    ggml = load_backends(bin_dir)
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    reg = ggml.ggml_backend_reg_by_name(b"CPU")
    address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    get_features = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(address)
    features, feature = {}, get_features(reg)
    for i in range(256):
        if feature[i].name is None:
            break
        features[feature[i].name.decode()] = feature[i].value.decode()
    # the variant ggml picked is the one libggml-cpu-<variant>.so of bin_dir left mapped in this process
    maps = Path("/proc/self/maps").read_text()
    variant = re.search(re.escape(str(Path(bin_dir).resolve())) + r"/libggml-cpu-([\w.]+)\.so", maps)
    return {
        "build": "portable" if any(Path(bin_dir).glob("libggml-cpu-*.so")) else "native",
        "variant": variant[1] if variant else "native",
        "features": features,
        "amx": "AMX_INT8" in features and kernel_grants_amx(),
    }


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (the machine's architecture where it gives none)."""
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        m = None
    return m[1].strip() if m else platform.machine()


def feature_names(backend: dict) -> str:
    return " ".join(k if v == "1" else f"{k}={v}" for k, v in backend["features"].items())


def describe_cpu_backend(backend: dict) -> str:
    """One line for a log: `portable build, CPU variant zen4 (AVX2 AVX512 ... REPACK), AMX not used`."""
    amx = "used" if backend["amx"] else "not used"
    return f"{backend['build']} build, CPU variant {backend['variant']} ({feature_names(backend)}), AMX {amx}"


def run_tool(cmd: list[str], stop: Callable[[str], bool] | None = None) -> str:
    """Run a llama.cpp tool; its output goes to the log (stderr) as it comes and is returned for parsing. With
    `stop`, the tool is ended at the first line of its output for which `stop(line)` is true (its output up to
    that line returned)."""
    log.info("running %s", " ".join(map(str, cmd)))
    lines, stopped = [], False
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            for line in proc.stdout:
                sys.stderr.write(line)
                lines.append(line)
                if stop is not None and stop(line):
                    log.info("ended early: its output so far decides")
                    proc.terminate()
                    stopped = True
                    break
        except BaseException:  # the step ends (SIGTERM, Ctrl-C, an error): the tool with it, not at its next line
            proc.kill()
            raise
    if proc.returncode != 0 and not stopped:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return "".join(lines)


def run_llama_tool(tool: str | os.PathLike, args: list[str], stop: Callable[[str], bool] | None = None) -> str:
    """Run a pinned llama.cpp tool through cpuforge/llama/tool.py, which keeps its last log lines (see there)."""
    runner = Path(__file__).with_name("tool.py")
    return run_tool([sys.executable, str(runner), str(tool), *map(str, args)], stop)


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


def default_threads(model: str | os.PathLike, key: str = "recommended_threads") -> int:
    """Threads to run `model` with: the eval report's `recommended_threads` (generation) or
    `recommended_threads_batch` (prompt processing), else the physical cores."""
    metrics = report_metrics(model)
    if metrics.is_file():
        recommended = read_json(metrics).get(key)
        if isinstance(recommended, int) and recommended >= 1:
            log.info("%s: %d, from %s", key, recommended, metrics)
            return recommended
    threads = physical_cores()
    log.info("%s: %d, the physical cores (none in %s)", key, threads, metrics)
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


def check_threads(threads: int) -> int:
    """A thread count given on the command line or in the config: at least 1."""
    if threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}.")
    return threads


def default_thread_counts(model: str | os.PathLike, threads: int | None, threads_batch: int | None) -> tuple[int, int]:
    """--threads and --threads-batch, each defaulting to its recommendation in the eval report."""
    return (check_threads(threads) if threads is not None else default_threads(model),
            check_threads(threads_batch) if threads_batch is not None
            else default_threads(model, "recommended_threads_batch"))  # fmt: skip
