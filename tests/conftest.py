"""Fixtures: the pinned llama.cpp build (made once, through the workflow), tiny real models, Debian's chromium; and
the markers that say what each test needs (helpers/markers.py derives them). The helpers are in helpers/."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.llama import BIN
from helpers.markers import mark
from helpers.models import make_lora, make_tiny_llama, teach_chat_lessons
from helpers.vocab import MODELS_DIR, VOCAB_PAIRS, pair_template, write_vocab_gguf
from helpers.workflow import snakemake, write_config


@pytest.fixture(scope="session")
def llama_bin(tmp_path_factory) -> Path:
    """The pinned llama.cpp tools and libraries, fetched, verified and built by the workflow."""
    workdir = tmp_path_factory.mktemp("llama_cpp")
    config = write_config(workdir / "config.yaml", [{"name": "none", "base": "demo", "adapters": ["demo"]}])
    snakemake(workdir, "llama_cpp", "--configfile", str(config))
    os.environ["LLAMA_CPP_LIB_PATH"] = str(BIN)
    return BIN


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    return make_lora(tiny_base, tmp_path_factory.mktemp("tiny") / "adapter")


@pytest.fixture(scope="session")
def tiny_chat_model(llama_bin, tmp_path_factory) -> Path:
    """results/chat/ of a workflow run (q4_model) on a fitted tiny model with a chat template."""
    workdir = tmp_path_factory.mktemp("tiny_chat")
    base = teach_chat_lessons(make_tiny_llama(workdir / "inputs" / "base"))
    # a small adapter: it must change the weights, not undo the fitting
    adapter = make_lora(base, workdir / "inputs" / "adapter", lora_alpha=1)
    config = write_config(workdir / "chat.yaml", [{"name": "chat", "base": str(base), "adapters": [str(adapter)]}])
    snakemake(workdir, "q4_model", "--configfile", str(config))
    return workdir / "results" / "chat"


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory) -> Path:
    """The demo base's tokenizer and chat template (SmolLM2: byte-level BPE, ChatML, BOS <|im_start|>)."""
    from transformers import AutoTokenizer

    from cpuforge.demo import demo_gguf

    gguf = demo_gguf()
    out = tmp_path_factory.mktemp("smol") / "tokenizer"
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vocab_models(llama_bin, tmp_path_factory) -> dict[str, Path]:
    """results/{pair}/ggml-model-f32.gguf for each of VOCAB_PAIRS, with results/{pair}/merged beside it: the
    tokenizer transformers reads from the vocabulary file (gguf_file=), saved with the template. The vocabulary
    files come with the pinned source, which the build fixture fetches."""
    from transformers import AutoTokenizer

    results = tmp_path_factory.mktemp("vocab_models") / "results"
    tokenizers, models = {}, {}
    for name, (vocab, template) in VOCAB_PAIRS.items():
        if vocab not in tokenizers:
            tokenizers[vocab] = AutoTokenizer.from_pretrained(MODELS_DIR, gguf_file=f"ggml-vocab-{vocab}.gguf")
        tokenizer = tokenizers[vocab]
        tokenizer.chat_template = pair_template(template)
        tokenizer.save_pretrained(results / name / "merged")
        models[name] = write_vocab_gguf(MODELS_DIR / f"ggml-vocab-{vocab}.gguf", pair_template(template),
                                        results / name / "ggml-model-f32.gguf")  # fmt: skip
    return models


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed here when missing (CI's machine is fresh and we are root there)."""
    path = shutil.which("chromium")
    if path is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.fail("the report test needs Debian's chromium: apt-get install -y chromium")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True, env=env)
        path = shutil.which("chromium")
    return path


# a test whose explicit marker contradicts what it needs: failed at set-up with the reason, the others run
WRONG_MARKS = pytest.StashKey[str]()


def pytest_collection_modifyitems(config, items):
    for nodeid, message in mark(items).items():
        item = next(i for i in items if i.nodeid == nodeid)
        item.stash[WRONG_MARKS] = message


def pytest_runtest_setup(item):
    if message := item.stash.get(WRONG_MARKS, None):
        pytest.fail(message, pytrace=False)
