"""The catalogue of a run: where each artifact lives under results/{model}/, how a GGUF's path reads back, and
the working rules, each with the function that sizes its job and its group in the plan.

A leaf (it imports nothing of cpuforge), so the rules, the library and the tests all read it. Each function
gives the path for given values, or the rule's pattern for wildcards: `gguf("{model}", "{qtype}")` is
`results/{model}/ggml-model-{qtype}.gguf`. A new artifact or rule is added here and in its rule file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

# the GGUFs of a model: the merged model's (converted, then quantized), and the unmerged base's, to which the
# adapters are applied at run time (rules/adapters.smk)
MERGED, BASE = "ggml-model", "base"
# the parity checks every GGUF gets (rules/checks.smk), as their files are named
PARITY = ("tokenizer", "chat-template")
PLAN = "results/plan.tsv"


def folder(model: str) -> str:
    return f"results/{model}"


def merged(model: str) -> str:
    """The merged model, a Hugging Face folder."""
    return f"{folder(model)}/merged"


def unmerged(model: str) -> str:
    """The unmerged base with the merged model's tokenizer, a Hugging Face folder."""
    return f"{folder(model)}/base"


def gguf(model: str, stage: str, weights: str = MERGED) -> str:
    """A GGUF: `stage` f16, a quant type or `auto`; `weights` MERGED or BASE."""
    return f"{folder(model)}/{weights}-{stage}.gguf"


def imatrix(model: str) -> str:
    return f"{folder(model)}/imatrix.gguf"


def adapter(model: str, name: str) -> str:
    """An adapter as a GGUF LoRA; `name` is `{n}-{folder}`, n its place in the model's stack."""
    return f"{folder(model)}/adapters/{name}.gguf"


def check(model: str, name: str) -> str:
    """A check's record: `name` a check (generation, converter-vocab) or `{check}-{stage}` (tokenizer-q4_0)."""
    return f"{folder(model)}/checks/{name}.json"


def report(model: str, name: str = "") -> str:
    """The report's folder, or a file in it (report.html, metrics.json, eval_text.txt, plots/...)."""
    return f"{folder(model)}/report" + (f"/{name}" if name else "")


def figure(model: str, kind: str, stage: str) -> str:
    """One measurement the report reads: `kind` perplexity, kl_divergence, task, bench, speculation or
    runtime_lora (whose `stage` is `{qtype}-{kl|speed|task}`)."""
    return report(model, f"{kind}/{stage}.json")


def auto(model: str, name: str) -> str:
    """The quant search's files: sensitivity.tsv, recipe.txt, search.json."""
    return f"{folder(model)}/auto/{name}"


class GgufName(NamedTuple):
    model: str
    stage: str
    weights: str


GGUF_NAME = re.compile(rf"({re.escape(MERGED)}|{re.escape(BASE)})-(.+)\.gguf")


def parse_gguf(path: str | os.PathLike) -> GgufName | None:
    """What a GGUF of the layout is (its folder's name as the model); None for any other file."""
    path = Path(path)
    if match := GGUF_NAME.fullmatch(path.name):
        return GgufName(path.resolve().parent.name, match[2], match[1])
    return None


class Rule(NamedTuple):
    name: str
    need: str  # the function of cpuforge.sizing.jobs that sizes its job
    group: str  # its rows' group in the plan


# The working rules (those that run a step; the target rules only name files), in the plan's reading order:
# the llama.cpp build and the demo's making, then the chain from the inputs to the quants (the quant search's
# after the f16's log-probabilities it needs), the report's figures, the checks, runtime LoRA. The rules of a
# group take turns over their wildcard (each stage's tokenizer check, then its chat-template check).
RULES = tuple(Rule(*row) for row in (
    ("fetch_llama_cpp", "fetch_llama_cpp_job", "llama_cpp"),
    ("build_llama_cpp", "build_llama_cpp_job", "llama_cpp"),
    ("build_webui", "build_webui_job", "llama_cpp"),
    ("build_read_bandwidth", "build_read_bandwidth_job", "llama_cpp"),
    ("make_demo_base", "make_demo_base_job", "demo"),
    ("train_demo_adapter", "train_demo_adapter_job", "demo"),
    ("check_converter_vocab", "check_converter_vocab_job", "check_converter_vocab"),
    ("merge", "merge_job", "merge"),
    ("convert", "convert_job", "convert"),
    ("quantize", "quantize_job", "quantize"),
    ("make_imatrix", "make_imatrix_job", "make_imatrix"),
    ("make_eval_text", "make_eval_text_job", "make_eval_text"),
    ("eval_perplexity", "eval_perplexity_job", "eval_perplexity"),
    ("measure_sensitivity", "measure_sensitivity_job", "measure_sensitivity"),
    ("auto_quant_search", "auto_quant_search_job", "auto_quant_search"),
    ("eval_perplexity_hf", "eval_perplexity_hf_job", "eval_perplexity_hf"),
    ("eval_kl_divergence", "eval_kl_divergence_job", "eval_kl_divergence"),
    ("eval_task_hf", "eval_task_hf_job", "eval_task_hf"),
    ("eval_task", "eval_task_job", "eval_task"),
    ("check_generation", "check_generation_job", "check_generation"),
    ("bench_threads", "bench_threads_job", "bench_threads"),
    ("eval_speculation", "eval_speculation_job", "eval_speculation"),
    ("make_eval_report", "make_eval_report_job", "make_eval_report"),
    ("check_quality_gate", "check_quality_gate_job", "check_quality_gate"),
    ("check_tokenizer", "check_tokenizer_job", "parity"),
    ("check_chat_template", "check_chat_template_job", "parity"),
    ("compare_imatrix", "compare_imatrix_job", "compare_imatrix"),
    ("make_unmerged_base", "make_unmerged_base_job", "make_unmerged_base"),
    ("convert_base", "convert_base_job", "convert_base"),
    ("quantize_base", "quantize_base_job", "quantize_base"),
    ("convert_adapter", "convert_adapter_job", "convert_adapter"),
    ("eval_kl_divergence_lora", "eval_kl_divergence_lora_job", "runtime_lora"),
    ("bench_runtime_lora", "bench_runtime_lora_job", "runtime_lora"),
    ("eval_task_lora", "eval_task_lora_job", "runtime_lora"),
    ("check_runtime_lora", "check_runtime_lora_job", "check_runtime_lora"),
))  # fmt: skip
RULE = {r.name: r for r in RULES}
GROUPS = tuple(dict.fromkeys(r.group for r in RULES))


def place(rule: str) -> tuple[int, int]:
    """Where a rule's rows go in the plan: its group's place, and its own within the group; a rule not here
    (a target rule) after them all."""
    if rule not in RULE:
        return len(GROUPS), 0
    group = RULE[rule].group
    return GROUPS.index(group), [r.name for r in RULES if r.group == group].index(rule)
