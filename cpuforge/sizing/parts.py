"""What the parts of a step cost: a llama.cpp context, llama-perplexity, llama-quantize, llama-cpp-python
answering a task, a streamed torch pass, GGUF LoRAs applied at run time."""

from __future__ import annotations

import math
from dataclasses import replace

from cpuforge.constants import EMBED, LM_HEAD, MIB
from cpuforge.evaluate.perplexity import logits_bytes
from cpuforge.sizing.costs import (
    BYTES_PER_SECOND,
    DISK_BYTES_PER_SECOND,
    FLOPS_PER_THREAD,
    QUANTIZE_WEIGHTS_PER_SECOND,
    SLOW_QUANTIZE,
    TOKENIZER_BYTES,
    UBATCH,
    Cost,
    cost,
)
from cpuforge.sizing.gguf_size import Gguf, is_legacy
from cpuforge.sizing.model import LAYER, Arch, Task, Tensor
from cpuforge.text.stream import HEAD_ROWS, POSITIONS


def tokenizer_bytes(arch: Arch) -> int:
    return TOKENIZER_BYTES * arch.vocab


def kv_cache_bytes(arch: Arch, n_ctx: int) -> int:
    """f16 K and V of every layer and position; llama.cpp pads the context to a multiple of 256."""
    return 256 * math.ceil(n_ctx / 256) * arch.layers * arch.kv_heads * arch.head_dim * 2 * 2


def compute_buffer_bytes(arch: Arch, n_ubatch: int) -> int:
    """ggml's graph of one micro-batch (flash attention, as llama.cpp chooses on a CPU): per token its
    logits and the widest intermediates (measured: 35.25 MiB for 256 tokens of a 32000-token, hidden-2048
    LLaMA, which this gives within 16 %)."""
    return 4 * n_ubatch * (arch.vocab + 2 * arch.hidden + arch.ffn)


def llama_run(rule: str, g: Gguf, n_ctx: int, n_outputs: int, threads: int, tokens: int = 0,
              generated: int = 0) -> Cost:  # fmt: skip
    """A llama.cpp context on the GGUF: the file read once (cpuforge.llama.runtime.LOAD_MODE: the matrices the
    CPU backend repacks are held repacked instead of as stored, not beside a mapped copy), the KV cache, the
    compute and output buffers; `tokens` evaluated in batches and `generated` one at a time."""
    work = (g.nbytes + kv_cache_bytes(g.arch, n_ctx) + compute_buffer_bytes(g.arch, min(UBATCH, n_ctx))
            + 4 * n_outputs * g.arch.vocab)  # fmt: skip
    seconds = 2 * g.params * tokens / (FLOPS_PER_THREAD * threads) + generated * g.nbytes / BYTES_PER_SECOND
    return cost(rule, work, seconds=seconds)


def kld_bytes(arch: Arch, ctx: int, chunks: int) -> int:
    """llama-perplexity's --kl-divergence-base file (cpuforge.evaluate.perplexity.logits_bytes)."""
    return logits_bytes(ctx, arch.vocab, chunks)


def streamed_forward(rule: str, tensors: dict[str, Tensor], arch: Arch, tokens: int, longest: int,
                     threads: int) -> Cost:  # fmt: skip
    """cpuforge.text.stream over sequences of `tokens` tokens in all, the longest `longest`: the hidden states of
    all of them (and one sequence's new ones) in f32, beside the largest of the embeddings as read, a
    layer's phase (its weights in f32, the tensor being read as stored, one sequence's activations inside
    the layer: attention's q, k, v, output and scores, the MLP's gate, up and their product) and the
    output head's (as stored, HEAD_ROWS rows in f32, three chunks of logits: the chunk, a slice's
    product and the log-softmax)."""
    layers: dict[int, list[Tensor]] = {}
    for name, t in tensors.items():
        if m := LAYER.match(name):
            layers.setdefault(int(m[1]), []).append(t)
    layer = max(sum(4 * t.numel for t in ts) + max(t.nbytes for t in ts) for ts in layers.values())
    inside = 4 * longest * (3 * arch.ffn + 6 * arch.hidden) + 4 * arch.heads * longest * longest
    head = tensors.get(LM_HEAD) or tensors[EMBED]
    head_phase = head.nbytes + 4 * HEAD_ROWS * arch.hidden + 3 * 4 * POSITIONS * arch.vocab
    hidden = 4 * arch.hidden * (tokens + longest)
    work = hidden + max(layer + inside, head_phase, tensors[EMBED].nbytes) + tokenizer_bytes(arch)
    seconds = 2 * sum(t.numel for t in tensors.values()) * tokens / (FLOPS_PER_THREAD * threads)
    seconds += sum(t.nbytes for t in tensors.values()) / DISK_BYTES_PER_SECOND
    return cost(rule, work, seconds=seconds)


def quantizer(rule: str, f16: Gguf, out: Gguf, qtype: str, threads: int) -> Cost:
    """llama-quantize: a tensor mapped, its f32 copy and its quantized bytes (its buffers keep the largest)."""
    n, nbytes = max(t[:2] for t in f16.tensors.values())
    work = nbytes + 4 * n + max(t[1] for t in out.tensors.values())
    rate = QUANTIZE_WEIGHTS_PER_SECOND * threads / (1 if is_legacy(qtype) else SLOW_QUANTIZE)
    seconds = f16.params / rate + 3 * out.nbytes / DISK_BYTES_PER_SECOND
    return cost(rule, work, 2 * out.nbytes, seconds, kept=out.nbytes)


def perplexity(rule: str, g: Gguf, ctx: int, chunks: int, threads: int, save_logits: bool) -> Cost:
    """llama-perplexity, one window per batch, every position's logits; with `save_logits` it writes every
    scored position's log-probabilities, which the quants' KL divergence reads a window at a time."""
    run = llama_run(rule, g, ctx, ctx, threads, tokens=ctx * chunks)
    return Cost(run.mem, kld_bytes(g.arch, ctx, chunks) if save_logits else 0, run.seconds)


def answers(rule: str, g: Gguf, task: Task, max_new_tokens: int, threads: int, n_ctx: int = 0) -> Cost:
    """llama-cpp-python answering every row in turn, beside the merged model's tokenizer: a context for the
    longest prompt and answer (or `n_ctx`), and its own score array of one micro-batch of logits."""
    run = llama_run(rule, g, n_ctx or task.longest_prompt + max_new_tokens + 16, UBATCH, threads,
                    tokens=task.rows * task.longest_prompt, generated=task.rows * max_new_tokens)  # fmt: skip
    return Cost(run.mem + tokenizer_bytes(g.arch) / MIB, 0, run.seconds)


def with_loras(c: Cost, loras: list[int], tokens: int = 0, threads: int = 1) -> Cost:
    """A llama.cpp context with GGUF LoRAs applied: their tensors loaded beside the base, and their low-rank
    products on every token."""
    seconds = 2 * sum(loras) / 2 * tokens / (FLOPS_PER_THREAD * threads)
    return replace(c, mem=c.mem + sum(loras) / MIB, seconds=c.seconds + seconds)
