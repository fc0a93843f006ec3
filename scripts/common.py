"""Helpers shared by every cpuforge step: logging, errors, atomic outputs, hashes, provenance.

This module is imported at workflow start-up (rules/common.smk), so it imports
nothing heavy: no torch, no transformers.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import platform
import shutil
import struct
import subprocess
import sys
from importlib import metadata
from pathlib import Path

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

PACKAGES = ("torch", "transformers", "peft", "safetensors", "sentencepiece", "gguf", "snakemake", "llama_cpp_python")


class InputError(Exception):
    """Bad input. The message is one sentence naming the file or key and the problem."""


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(main) -> None:
    """Run a step's main(): bad input ends it with its one sentence and exit code 2."""
    setup_logging()
    try:
        main()
    except InputError as e:
        log.error("%s", e)
        sys.exit(2)


def check_threads(threads: int) -> int:
    if threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}.")
    return threads


def check_quant_type(qtype: str) -> str:
    if qtype.lower() in QUANT_TYPES:
        return qtype.lower()
    # the usual typo is a letter for a look-alike digit (q4_O); else the nearest name
    lookalike = qtype.lower().replace("o", "0")
    close = [lookalike] if lookalike in QUANT_TYPES else difflib.get_close_matches(qtype.lower(), QUANT_TYPES, 1, 0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; known types: {', '.join(QUANT_TYPES)}."
    raise InputError(f"quant_types: unknown llama.cpp quantization type {qtype!r}{hint}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield `path.partial` to write to; rename it to `path` only when the body succeeds.

    A killed or failed step leaves at most a `.partial` (and the body's own
    `.partial.*` scratch files), never a file or folder with the final name; the
    next run removes such leftovers first.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")

    def clean():
        for leftover in [partial, *path.parent.glob(glob_escape(partial.name) + ".*")]:
            _remove(leftover)

    path.parent.mkdir(parents=True, exist_ok=True)
    clean()
    try:
        yield partial
    except BaseException:
        clean()
        raise
    _remove(path)
    os.replace(partial, path)
    clean()


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative name; hidden
    files such as Snakemake's .snakemake_timestamp are not content."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return {str(p.relative_to(path)): sha256_file(p) for p in files}


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
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    types = {bool: GGUFValueType.BOOL, str: GGUFValueType.STRING, int: GGUFValueType.UINT32}
    new = {key: MetadataDetails(types[type(value)], value) for key, value in (metadata or {}).items()}
    new[f"cpuforge.{step}"] = MetadataDetails(GGUFValueType.STRING, json.dumps(record, sort_keys=True))
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch=reader.get_field("general.architecture").contents(), endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, new, list(remove))


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found.") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}).") from None


def safetensors_header(path: str | os.PathLike) -> dict:
    """Read a safetensors header (names, dtypes, shapes) without touching the weights."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise InputError(f"{path}: truncated safetensors file (header claims {n} bytes, file has {size}).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path}: corrupt safetensors header.") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise InputError(f"{path}: truncated safetensors file ({size} bytes, its tensors need {8 + n + end}).")
    return header


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
    """Run a pinned llama.cpp tool through scripts/llama_tool.py, which keeps its last log lines (see there)."""
    runner = Path(__file__).with_name("llama_tool.py")
    return run_tool([sys.executable, str(runner), str(tool), *map(str, args)])


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (a HF model)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_json(path: str | os.PathLike, record: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


REPO = Path(__file__).resolve().parent.parent


def default_llama_bin() -> Path:
    """The pinned build's bin folder: $LLAMA_CPP_LIB_PATH, else build/llama.cpp/<commit>/bin of the config.

    Looked for under the working directory (where a run put results/) and then
    under the repository, so `python -m scripts.chat results/...` works after
    `snakemake q4_model` without flags.
    """
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(os.environ["LLAMA_CPP_LIB_PATH"])
    import yaml

    llama = yaml.safe_load((REPO / "config.yaml").read_text())["llama_cpp"]
    relative = Path(llama["build_dir"]) / llama[llama["source"]]["commit"] / "bin"
    for root in (Path.cwd(), REPO):
        if (root / relative / "libllama.so").is_file():
            return root / relative
    return Path.cwd() / relative


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


def report_metrics(model: str | os.PathLike) -> Path:
    """`results/{model}/report/metrics.json` for a model file or folder under results/{model}/."""
    return Path(model).resolve().parent / "report" / "metrics.json"


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


def load_gguf_vocab(path: str | os.PathLike, bin_dir: str | os.PathLike):
    """A llama-cpp-python Llama holding only the vocabulary and metadata of a GGUF file (no weights)."""
    llama_cpp = load_llama_cpp(bin_dir)
    return llama_cpp.Llama(str(path), vocab_only=True, n_ctx=64, verbose=False)


def gguf_chat_renderer(llm) -> str | None:
    """Which renderer llama-cpp-python's chat path (create_chat_completion, its server) uses for this GGUF:
    "jinja2" for the GGUF's own template, the name of a built-in format when it recognizes the template
    byte for byte (chatml, llama-3, mistral-instruct), None without a template (llama-cpp-python would then
    guess llama-2; cpuforge uses plain completion instead)."""
    from llama_cpp import llama_chat_format

    if llm.metadata.get("tokenizer.chat_template") is None:
        return None
    return llama_chat_format.guess_chat_format_from_gguf_metadata(llm.metadata) or "jinja2"


def gguf_chat_formatter(llm):
    """The formatter of llama-cpp-python's chat path for this GGUF (see gguf_chat_renderer); None when
    the GGUF has no template: then chat must fall back to plain completion, never to a guessed format."""
    from llama_cpp import llama_chat_format

    renderer = gguf_chat_renderer(llm)
    if renderer is None:
        return None
    if renderer != "jinja2":
        return getattr(llama_chat_format, "format_" + renderer.replace("-", "_"))
    vocab = llm._model
    bos, eos = vocab.token_bos(), vocab.token_eos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        bos_token=vocab.token_get_text(bos) if bos != -1 else "",
        eos_token=vocab.token_get_text(eos) if eos != -1 else "",
        stop_token_ids=[eos],
    )


def gguf_chat_prompt(llm, messages: list[dict]) -> tuple[str, list[int]] | None:
    """The prompt text and token ids that llama-cpp-python's chat path builds for `messages` from the
    GGUF's own template and vocabulary (as chat_formatter_to_chat_completion_handler tokenizes it);
    None when the GGUF has no chat template."""
    formatter = gguf_chat_formatter(llm)
    if formatter is None:
        return None
    result = formatter(messages=messages)
    ids = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
    return result.prompt, ids
