"""The measured constants and pessimistic rates every prediction starts from, and a step's Cost and Need."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cpuforge.constants import MIB

# resident MiB of each step's processes before any work, measured on the `tiny` shape of
# benchmarks/scale.py (2 layers, hidden 256, LLaMA's tokenizer; the tokenizer's share taken out, see
# TOKENIZER_BYTES): the interpreters, torch and transformers where imported, the ggml backends
BASE_MB = {
    "merge": 380, "convert": 560, "quantize": 70, "make_imatrix": 550, "eval_perplexity": 40,
    "eval_kl_divergence": 40, "bench_threads": 15, "eval_task": 170, "eval_perplexity_hf": 300,
    "eval_task_hf": 250, "check_generation": 250, "compare_imatrix": 300, "check_tokenizer": 300,
    "check_chat_template": 270, "make_eval_text": 22, "make_eval_report": 60, "check_quality_gate": 15,
    "fetch_llama_cpp": 100, "build_llama_cpp": 60, "make_demo_base": 350, "train_demo_adapter": 450, "plan": 15,
    # merge: 250 MiB measured, and 126 more (measured on the test suite's tiny model) since it loads each
    # adapter_config.json with peft's own config class, which imports peft and transformers;
    # make_unmerged_base measured at 37 and 60 MiB with its shell (tiny, 1b); convert_adapter and
    # bench_runtime_lora measured on the test suite's tiny model and checked on the 1b shape (1.00 and 0.77
    # to 0.86 of the plan); check_runtime_lora guessed as eval_task's llama-cpp-python
    "check_converter_vocab": 290, "make_unmerged_base": 55, "convert_adapter": 310, "check_runtime_lora": 250,
    "bench_runtime_lora": 170,
    # the quant search (rules/auto_quant.smk): measure_sensitivity measured at 80 MiB peak on the demo (the
    # interpreter, numpy, ggml's I-quant tables; rows read, never mapped); the search guessed as eval_task's
    "measure_sensitivity": 70, "auto_quant_search": 170,
    # the read-bandwidth kernel's build: the interpreter and the C compiler (guessed); the chat page's build:
    # the interpreter, npm, then vite (guessed)
    "build_read_bandwidth": 80, "build_webui": 300,
    # eval_speculation: eval_task's Python (the tokenizer) with llama-server as a child instead (guessed)
    "eval_speculation": 170,
}  # fmt: skip
# a transformers tokenizer and a GGUF vocabulary held by a step, per token of the vocabulary
TOKENIZER_BYTES = 3 << 10
# transformers, imported to write a tokenizer.json where only a sentencepiece tokenizer.model came
TRANSFORMERS_MB = 300
# every memory figure is rounded up by this: allocator slack, the libraries' caches, sampling noise
MARGIN = 1.1
# pessimistic rates of a small machine, for the time limits
FLOPS_PER_THREAD = 10e9
BYTES_PER_SECOND = 4e9  # memory bandwidth: a generated token reads every weight once
DISK_BYTES_PER_SECOND = 100e6
QUANTIZE_WEIGHTS_PER_SECOND = 20e6  # per thread, for the legacy types; the others search scales longer
SLOW_QUANTIZE = 4
# weights of the sampled rows ggml rounds (and reads back) per second, per type, in the quant search's
# sensitivity step
SENSITIVITY_WEIGHTS_PER_SECOND = 2e6
MINUTES_MIN = 5
# llama.cpp's default micro-batch, which llama-cpp-python also keeps a score array of
UBATCH = 512


@dataclass(frozen=True)
class Need:
    mem_mb: int
    disk_mb: int  # at the step's peak, scratch files included
    runtime: int  # minutes
    kept_mb: int = 0  # of disk_mb, what stays when the step is done


@dataclass(frozen=True)
class Cost:
    """A step's peak memory (MiB, its interpreter included), bytes written at its peak, estimated seconds,
    and bytes that stay written (its outputs; the rest is scratch)."""

    mem: float
    disk: float
    seconds: float
    kept: float | None = None  # None: all of `disk`

    def need(self) -> Need:
        # the time limit: three times the estimate
        runtime = max(MINUTES_MIN, math.ceil(3 * self.seconds / 60))
        kept = self.disk if self.kept is None else self.kept
        return Need(math.ceil(self.mem * MARGIN), max(1, math.ceil(self.disk / MIB)), runtime, math.ceil(kept / MIB))


def cost(rule: str, work_bytes: float, disk: float = 0, seconds: float = 0, kept: float | None = None) -> Cost:
    """A step of `rule`: its processes' BASE_MB plus `work_bytes`."""
    return Cost(BASE_MB[rule] + work_bytes / MIB, disk, seconds, kept)


def one_after_another(*costs: Cost, kept: float | None = None) -> Cost:
    """Steps run in turn by one process: the largest peak, everything written, all the time."""
    return Cost(max(c.mem for c in costs), sum(c.disk for c in costs), sum(c.seconds for c in costs), kept)


def both_alive(rule: str, *costs: Cost) -> Cost:
    """Contexts one process holds at once: their work added, its interpreter once, their times added."""
    work = sum(c.mem - BASE_MB[rule] for c in costs)
    return Cost(BASE_MB[rule] + work, sum(c.disk for c in costs), sum(c.seconds for c in costs))


def estimated_tokens(nbytes: int) -> int:
    """Tokens of a text of `nbytes` UTF-8 bytes before a tokenizer is at hand: one per 3 bytes, which no
    LLaMA-family vocabulary falls short of on English (4 to 5 bytes a token) or CJK text (a character's
    3 bytes are one or two tokens)."""
    return math.ceil(nbytes / 3) + 1


def utf8_tokens(text: str) -> int:
    return estimated_tokens(len(text.encode("utf-8")))
