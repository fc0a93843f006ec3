"""Tiny GGUF models on the pinned source's real vocabularies (models/ggml-vocab-*.gguf), each with a real chat
template, written with gguf-py: the prompt, chat and server tests feed them transformers' ids."""

from __future__ import annotations

from pathlib import Path

from helpers.llama import SOURCE

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
# the pinned source's vocabulary files and chat templates
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
    from gguf import GGUFValueType, GGUFWriter

    from cpuforge.io.gguf import read_header

    header = read_header(vocab, None)
    n_vocab = header.lengths["tokenizer.ggml.tokens"]
    writer = GGUFWriter(out, arch="llama")
    writer.add_name(out.parent.name)
    hparams = {writer.add_context_length: 256, writer.add_embedding_length: hidden, writer.add_block_count: 2,
               writer.add_feed_forward_length: ffn, writer.add_head_count: 2, writer.add_head_count_kv: 2,
               writer.add_rope_dimension_count: hidden // 2, writer.add_layer_norm_rms_eps: 1e-5,
               writer.add_vocab_size: n_vocab, writer.add_file_type: 0}  # fmt: skip
    for add, value in hparams.items():
        add(value)
    for name, value in header.fields.items():
        if name.startswith("tokenizer.") and name != "tokenizer.chat_template":
            kind, *item = (GGUFValueType(t) for t in header.types[name])
            writer.add_key_value(name, value, kind, sub_type=item[0] if item else None)
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
