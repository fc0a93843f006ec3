"""The pinned llama.cpp build the tests run, and greedy answers through its Python binding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

from cpuforge import paths
from cpuforge.llama.build import pinned_sdist

# the sdist and commit config.yaml pins (its one owner): a second copy here could drift from what the workflow builds
SDIST = pinned_sdist()
COMMIT = SDIST["commit"]
# shared with the repository's own runs, so a user's demo run and the tests build llama.cpp once
BUILD_DIR = Path(os.environ.get("CPUFORGE_BUILD_DIR", REPO / "build" / "llama.cpp")).resolve()
# the build flavour under test (config llama_cpp.cpu): the default one, which CI builds, unless
# CPUFORGE_CPU names the other (`CPUFORGE_CPU=portable pytest` runs the suite on a portable build)
FLAVOUR = os.environ.get("CPUFORGE_CPU", paths.DEFAULT_FLAVOUR)
BIN = paths.llama_bin(BUILD_DIR, COMMIT, FLAVOUR)
SOURCE = paths.llama_source(BUILD_DIR, COMMIT)


def runtime_env(llama_bin: Path) -> dict[str, str]:
    """Environment of a chat or server process under test, bound to the pinned build."""
    # TERM=dumb: readline then writes no escape sequences into a chat's transcript
    return {**os.environ, "LLAMA_CPP_LIB_PATH": str(llama_bin), "TERM": "dumb", "PYTHONPATH": str(REPO)}


def convert(model: Path, out: Path) -> Path:
    """The f16 GGUF of a HF folder, through the workflow's convert step on the pinned converter."""
    result = subprocess.run(
        [sys.executable, "-m", "scripts.convert", "--source", str(SOURCE), "--merged", str(model), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"convert failed:\n{result.stderr}")
    return out


def ids_answers(gguf: Path, prompts: list[list[int]], max_tokens: int = 32, errors: str = "ignore") -> list[str]:
    """Greedy answers of llama-cpp-python to prompts given as token ids, in a process of its own (in order, each
    reusing what the last left in the KV cache, as a chat's turns do): up to an
    end-of-generation token, decoded as the chat decodes them (bytes that are not UTF-8 dropped; llama-server
    replaces them with U+FFFD: errors="replace"). With flash attention, as our chat runs (and llama-bench and
    llama-server on a CPU decide)."""
    # piece by piece into a large buffer: llama-cpp-python's detokenize drops a piece longer than 32 bytes
    code = (
        "import ctypes, json, sys, llama_cpp\n"
        "m = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=1, flash_attn=True, verbose=False)\n"
        "vocab = llama_cpp.llama_model_get_vocab(m.model)\n"
        "buf = ctypes.create_string_buffer(4096)\n"
        "for ids in json.loads(sys.argv[2]):\n"
        "    out = b''\n"
        "    for n, t in enumerate(m.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True)):\n"
        f"        if llama_cpp.llama_vocab_is_eog(vocab, t) or n == {max_tokens}:\n"
        "            break\n"
        "        size = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)\n"
        "        out += buf.raw[:size]\n"
        f"    print(json.dumps(out.decode('utf-8', errors={errors!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(gguf), json.dumps(prompts)],
        env=runtime_env(BIN), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines()]


def chat_ids(folder: Path, conversations: list[list[dict]]) -> list[list[int]]:
    """transformers' ids of each conversation's prompt, from the tokenizer and template in `folder`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in conversations]  # fmt: skip


def reference_answers(gguf: Path, conversations: list[list[dict]], max_tokens: int = 32) -> list[str]:
    """What the model answers to each conversation when fed transformers' ids (the merged folder beside it)."""
    return ids_answers(gguf, chat_ids(gguf.parent / "merged", conversations), max_tokens)
