"""Tiny real models the tests build: a random-init Llama (2 layers, hidden 64: every row a multiple of 32, so q4_0
applies) with a sentencepiece tokenizer trained here on a few KB of real prose, LoRA adapters made with peft whose
B matrices are not zero (so merging changes the weights), a sibling fitted to answer questions (clear favourites,
so greedy answers agree across runtimes), and bases and adapters saved as 2023's tools saved them."""

from __future__ import annotations

import json
from pathlib import Path


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


def make_chat_llama(out: Path, tokenizer: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama that reads with the demo's tokenizer; embeddings tied, so 49152 rows stay small."""
    settings = dict(vocab_size=49152, tie_word_embeddings=True, pad_token_id=2, **overrides)
    return make_tiny_llama(out, seed, tokenizer=tokenizer, **settings)


# words no tokenizer here has: an extended vocabulary's added tokens
ADDED_WORDS = [f"cpuforgeword{i}" for i in range(32)]


def make_extended_adapter(base, out, words=ADDED_WORDS, targets=("embed_tokens", "lm_head")):
    """A Chinese-LLaMA-style adapter: tokenizer with added words, resized embeddings saved whole."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(5)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(words)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=list(targets),
        init_lora_weights=False, task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # as if trained: the saved embeddings differ from the base's
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.02)
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
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


# the special tokens a chat fine-tune adds (LLaMA-Factory's template tokens): 512 + 3 = 515 tokens, padded to 576 rows
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|tool|>"]


def make_padded_vocab_adapter(
    base: Path, out: Path, pad_to: int = 64, chat_template: str | None = None
) -> tuple[Path, dict]:
    """An adapter as LLaMA-Factory's resize_embedding_layer leaves one: special tokens added to the tokenizer, the
    embeddings resized to it padded to a multiple of `pad_to` (rows no token reaches), embed_tokens and lm_head saved
    whole in modules_to_save beside a LoRA, every trainable tensor moved as training would; the tokenizer saved with
    `chat_template` (the base's when None), as LLaMA-Factory saves its template's. Returns the folder and peft's
    merge_and_unload of that model, as a state dict."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(6)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_SPECIAL_TOKENS})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"],
        task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with torch.no_grad():
        return out, {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def save_mlx_adapter(base: Path, out: Path, fine_tune_type: str = "lora", num_layers: int = 1, rank: int = 4,
                     scale: float = 10.0, keys: list[str] | None = None, seed: int = 0) -> Path:  # fmt: skip
    """An adapter as mlx_lm.lora saves one for `base`: adapters.safetensors holding, for each module `keys` names
    (mlx-lm's default for LLaMA: q_proj and v_proj) in the last `num_layers` layers, LoRALinear's lora_a (in, r)
    and lora_b (r, out) (and DoRALinear's magnitude m), or for a full fine-tune those layers' tensors whole, as if
    trained; and adapter_config.json, the run's arguments. Written with numpy, as mlx.core.save_safetensors writes."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    weights = load_file(base / "model.safetensors")
    n_layers = len({k.split(".")[2] for k in weights if k.startswith("model.layers.")})
    layers = range(n_layers - num_layers if num_layers > 0 else 0, n_layers)
    tensors = {}
    for i in layers:
        if fine_tune_type == "full":
            for name, w in weights.items():
                if name.startswith(f"model.layers.{i}."):
                    tensors[name] = w + rng.normal(0, 0.02, w.shape).astype(np.float32)
            continue
        for key in keys or ["self_attn.q_proj", "self_attn.v_proj"]:
            w = weights[f"model.layers.{i}.{key}.weight"]
            n_out, n_in = w.shape
            module = f"model.layers.{i}.{key}"
            tensors[f"{module}.lora_a"] = rng.uniform(-(n_in**-0.5), n_in**-0.5, (n_in, rank)).astype(np.float32)
            tensors[f"{module}.lora_b"] = rng.normal(0, 0.05, (rank, n_out)).astype(np.float32)
            if fine_tune_type == "dora":  # the row norms of the base weight, trained on
                norm = np.linalg.norm(w, axis=1)
                tensors[f"{module}.m"] = (norm * rng.uniform(0.8, 1.2, norm.shape)).astype(np.float32)
    out.mkdir(parents=True)
    save_file(tensors, out / "adapters.safetensors", metadata={"format": "mlx"})
    lora_parameters = {"rank": rank, "alpha": 16, "dropout": 0.0, "scale": scale} | ({"keys": keys} if keys else {})
    config = {
        "model": str(base), "train": True, "fine_tune_type": fine_tune_type, "optimizer": "adam",
        "optimizer_config": {"adam": {}, "adamw": {}}, "data": "data/", "seed": 0, "num_layers": num_layers,
        "batch_size": 4, "iters": 100, "val_batches": 25, "learning_rate": 1e-05, "steps_per_report": 10,
        "steps_per_eval": 200, "resume_adapter_file": None, "adapter_path": str(out), "save_every": 100,
        "test": False, "test_batches": 500, "max_seq_length": 2048, "config": None, "grad_checkpoint": False,
        "lr_schedule": None, "lora_parameters": lora_parameters, "mask_prompt": False, "wandb": None,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return out


def save_gguf_lora(out: Path, alpha: float = 16.0, rank: int = 4) -> Path:
    """A GGUF LoRA as llama.cpp's convert_lora_to_gguf.py writes one for the tiny Llama: general.type adapter,
    adapter.type lora, adapter.lora.alpha, and each pair as blk.N.<tensor>.weight.lora_a (r, in) / .lora_b (out, r)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(out, "llama")
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    rng = np.random.default_rng(0)
    for i in range(2):
        for tensor in ("attn_q", "attn_v"):
            writer.add_tensor(f"blk.{i}.{tensor}.weight.lora_a", rng.normal(0, 0.1, (rank, 64)).astype(np.float32))
            writer.add_tensor(f"blk.{i}.{tensor}.weight.lora_b", rng.normal(0, 0.1, (64, rank)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
