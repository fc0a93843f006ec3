"""Where things are: the build/llama.cpp/<commit>/{source,<flavour>/bin} layout, and a file of results/{model}/
(cpuforge.catalogue) read back.

The workflow passes its configured build folder and commit to these functions;
the CLIs that run without Snakemake (chat, serve) find the build from the
GGUF's own provenance, never by reading config.yaml.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cpuforge import catalogue
from cpuforge.catalogue import MERGED
from cpuforge.io.gguf import read_metadata

REPO = Path(__file__).resolve().parent.parent
BUILD_DIR = Path("build/llama.cpp")  # config llama_cpp.build_dir's default
# what build_llama_cpp makes into bin/, beside the ggml libraries
LLAMA_TOOLS = ("llama-quantize", "llama-cli", "llama-perplexity", "llama-bench", "llama-server", "llama-imatrix")
LIBLLAMA = "libllama.so"
# config llama_cpp.cpu: one source per commit, one build of it per flavour (cpuforge.llama.build.FLAVOURS)
DEFAULT_FLAVOUR = "native"


def llama_dir(build_dir: str | os.PathLike, commit: str) -> Path:
    return Path(build_dir) / commit


def llama_bin(build_dir: str | os.PathLike, commit: str, flavour: str) -> Path:
    return llama_dir(build_dir, commit) / flavour / "bin"


def llama_source(build_dir: str | os.PathLike, commit: str) -> Path:
    return llama_dir(build_dir, commit) / "source"


def webui(build_dir: str | os.PathLike, commit: str) -> Path:
    """llama-server's chat page built from a commit's source (cpuforge.llama.webui): one for its every flavour."""
    return llama_dir(build_dir, commit) / "webui"


def webui_of(bin_dir: str | os.PathLike) -> Path:
    """The chat page beside a build's bin folder (<commit>/<flavour>/bin -> <commit>/webui)."""
    return Path(bin_dir).absolute().parent.parent / "webui"


def read_bandwidth(build_dir: str | os.PathLike) -> Path:
    """The read-bandwidth kernel (cpuforge.evaluate.bandwidth), beside the llama.cpp builds: it depends on
    neither their commit nor their flavour."""
    return Path(build_dir) / "read_bandwidth"


def llama_outputs(build_dir: str | os.PathLike, commit: str, flavour: str) -> list[Path]:
    """Every file build_llama_cpp makes that a rule depends on."""
    return [llama_bin(build_dir, commit, flavour) / name for name in (*LLAMA_TOOLS, LIBLLAMA)]


def source_record(bin_dir: str | os.PathLike) -> Path:
    """The verified source's SOURCE.json of a build's bin folder (<commit>/<flavour>/bin)."""
    return Path(bin_dir).resolve().parent.parent / "source" / "SOURCE.json"


def gguf_commit(model: str | os.PathLike) -> str | None:
    """The llama.cpp commit that converted a GGUF, from its cpuforge provenance; None for other GGUFs."""
    # the key copy_gguf_with_provenance writes for the convert step
    record = read_metadata(model, ["cpuforge.convert"]).get("cpuforge.convert")
    return None if record is None else (json.loads(record).get("llama_cpp") or {}).get("commit")


def default_llama_bin(model: str | os.PathLike | None = None) -> Path:
    """The bin folder of the pinned build: $LLAMA_CPP_LIB_PATH, else the build of the commit that made
    `model` (its provenance), else the only commit there is; of that commit's flavours the default
    one when it is there. Looked for under the working directory (where a run put results/), then
    under the repository, so `python -m scripts.chat results/...` works after `snakemake q4_model`
    without flags."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(os.environ["LLAMA_CPP_LIB_PATH"])
    commit = gguf_commit(model) if model is not None and Path(model).is_file() else None
    for root in (Path.cwd(), REPO):
        builds = sorted((root / BUILD_DIR).glob(f"{commit or '*'}/*/bin/{LIBLLAMA}"))
        if len({b.parent.parent.parent for b in builds}) == 1 or (builds and commit):
            builds.sort(key=lambda b: b.parent.parent.name != DEFAULT_FLAVOUR)
            return builds[0].parent
    return Path.cwd() / llama_bin(BUILD_DIR, commit or "<commit>", DEFAULT_FLAVOUR)


def model_name(model: str | os.PathLike) -> str:
    """`demo-q4_0` for results/demo/ggml-model-q4_0.gguf and for the unmerged base-q4_0.gguf beside it;
    the file's stem for any other GGUF."""
    name = catalogue.parse_gguf(model)
    return f"{name.model}-{name.stage}" if name else Path(model).stem


def merged_folder(gguf: str | os.PathLike) -> Path | None:
    """results/{model}/merged for results/{model}/ggml-model-{qtype}.gguf, the folder whose tokenizer a
    chat or server on that GGUF builds its prompts with; None for a GGUF outside that layout."""
    name = catalogue.parse_gguf(gguf)
    return Path(gguf).parent / "merged" if name and name.weights == MERGED else None


def report_metrics(model: str | os.PathLike) -> Path:
    """`results/{model}/report/metrics.json` for a model file or folder under results/{model}/."""
    return Path(model).resolve().parent / "report" / "metrics.json"
