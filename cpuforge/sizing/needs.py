"""One formula per rule: what a job of the rule needs (a Need: peak memory, disk, runtime), from the figures
of its inputs (a Model, a Gguf, a Task) and its settings; named `<rule>_need`, and `small` for the rules whose
cost does not grow with the model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cpuforge.autoquant.screen import cut_layers
from cpuforge.autoquant.sensitivity import rows_for
from cpuforge.constants import MIB
from cpuforge.sizing.costs import (
    BYTES_PER_SECOND,
    DISK_BYTES_PER_SECOND,
    SENSITIVITY_WEIGHTS_PER_SECOND,
    FLOPS_PER_THREAD,
    TRANSFORMERS_MB,
    Cost,
    Need,
    both_alive,
    cost,
    one_after_another,
)
from cpuforge.sizing.gguf_size import Gguf
from cpuforge.sizing.model import Arch, Model, Task, Tensor, lora_gguf_bytes
from cpuforge.sizing.parts import (
    answers,
    kld_bytes,
    llama_run,
    perplexity,
    quantizer,
    streamed_forward,
    tokenizer_bytes,
    with_loras,
)


def merge_need(m: Model, threads: int) -> Need:
    written = sum(t.nbytes for t in m.merged.values()) + (8 << 20)  # and the tokenizer files
    seconds = (sum(t.nbytes for t in m.base.values()) + written) / DISK_BYTES_PER_SECOND
    seconds += 2 * m.merge_macs / (FLOPS_PER_THREAD * threads)
    return cost("merge", m.merge_peak + m.adapter_bytes, written, seconds).need()


def convert_need(m: Model, f16: Gguf) -> Need:
    """The converter, a child of scripts.convert (which holds the tokenizer), maps a tensor, converts it
    when it is not f16 already, and writes it; then its scratch file is copied with the provenance added,
    64 MiB at a time."""
    largest = max(m.merged.values(), key=lambda t: t.numel)
    work = largest.nbytes + (0 if largest.dtype == "F16" else 2 * largest.numel) + tokenizer_bytes(m.arch)
    seconds = (sum(t.nbytes for t in m.merged.values()) + 3 * f16.nbytes) / DISK_BYTES_PER_SECOND
    return cost("convert", work, 2 * f16.nbytes, seconds, kept=f16.nbytes).need()


def quantize_need(f16: Gguf, out: Gguf, qtype: str, threads: int) -> Need:
    return quantizer("quantize", f16, out, qtype, threads).need()


def make_imatrix_need(f16: Gguf, ctx: int, chunks: int, threads: int) -> Need:
    """llama-imatrix over `chunks` windows of `ctx` tokens with every position's logits, beside the Python
    that rendered the calibration text; the matrix holds a sum and a count per matrix column."""
    run = llama_run("make_imatrix", f16, ctx, ctx, threads, tokens=ctx * chunks)
    matrix = sum(8 * t[2] for t in f16.tensors.values()) + (1 << 20)
    return Cost(run.mem + tokenizer_bytes(f16.arch) / MIB, matrix, run.seconds).need()


def eval_perplexity_need(g: Gguf, ctx: int, chunks: int, threads: int) -> Need:
    return perplexity("eval_perplexity", g, ctx, chunks, threads, True).need()


def eval_kl_divergence_need(g: Gguf, ctx: int, chunks: int, threads: int) -> Need:
    return perplexity("eval_kl_divergence", g, ctx, chunks, threads, False).need()


def eval_task_need(g: Gguf, task: Task, max_new_tokens: int, threads: int) -> Need:
    return answers("eval_task", g, task, max_new_tokens, threads).need()


def eval_speculation_need(g: Gguf, task: Task, max_new_tokens: int, threads: int, settings: int, rounds: int) -> Need:
    """llama-server (as the task's llama-cpp-python would: one context, the prompts in turn) started for every
    setting in every round; the merged model's tokenizer beside it, in this process."""
    run = answers("eval_speculation", g, task, max_new_tokens, threads)
    return Cost(run.mem, 0, settings * rounds * run.seconds).need()


def bench_threads_need(g: Gguf, prompt_tokens: int, gen_tokens: int, repetitions: int, sweep: list[int],
                       read_mib: int) -> Need:  # fmt: skip
    """The read-bandwidth kernel's buffer (`read_mib`, written, then read 5 times) at every thread count, then
    llama-bench: for every thread count a warm-up and `repetitions` runs of each test."""
    runs = [llama_run("bench_threads", g, prompt_tokens + gen_tokens, 1, t, prompt_tokens, gen_tokens) for t in sweep]
    kernel = cost("bench_threads", read_mib * MIB, seconds=len(sweep) * 6 * read_mib * MIB / BYTES_PER_SECOND)
    return Cost(max(runs[0].mem, kernel.mem), 0, kernel.seconds + (repetitions + 1) * sum(r.seconds for r in runs)).need()


def eval_perplexity_hf_need(tensors: dict[str, Tensor], arch: Arch, ctx: int, chunks: int, threads: int) -> Need:
    return streamed_forward("eval_perplexity_hf", tensors, arch, ctx * chunks, ctx, threads).need()


def eval_task_hf_need(tensors: dict[str, Tensor], arch: Arch, task: Task, max_new_tokens: int, threads: int) -> Need:
    """Teacher forcing: one streamed pass over every prompt and its answer (at most max_new_tokens of it)."""
    longest = task.longest_prompt + min(task.longest_answer, max_new_tokens) + 1
    return streamed_forward("eval_task_hf", tensors, arch, task.rows * longest, longest, threads).need()


def check_generation_need(m: Model, f16: Gguf, task: Task, max_new_tokens: int, threads: int) -> Need:
    """The f16 GGUF answers every prompt and is closed; then one streamed pass of the merged model over
    every prompt and that answer."""
    longest = task.longest_prompt + max_new_tokens
    gguf = answers("check_generation", f16, task, max_new_tokens, threads)
    hf = streamed_forward("check_generation", m.merged, m.arch, task.rows * longest, longest, threads)
    return one_after_another(gguf, hf).need()


def compare_imatrix_need(f16: Gguf, quant: Gguf, qtype: str, ctx: int, chunks: int, task: Task, threads: int) -> Need:
    """Quantize without the matrix, llama-perplexity on the f16 (saving its log-probabilities), then on both
    quants against them, then each quant's task answers: one model at a time, beside the Python, which
    holds the merged model's tokenizer from the start."""
    rule, tokenizer = "compare_imatrix", tokenizer_bytes(f16.arch) / MIB
    llama_steps = [quantizer(rule, f16, quant, qtype, threads), perplexity(rule, f16, ctx, chunks, threads, True),
                   *[perplexity(rule, quant, ctx, chunks, threads, False)] * 2]  # fmt: skip
    return one_after_another(
        *[replace(c, mem=c.mem + tokenizer) for c in llama_steps],
        *[answers(rule, quant, task, 48, threads, n_ctx=1024)] * 2,  # cpuforge.evaluate.imatrix.task_accuracy; counts it
        kept=0,  # its quant, logits and text are scratch
    ).need()


def measure_sensitivity_need(f16: Gguf, sample_weights: int, types: int, threads: int) -> Need:
    """ggml rounds each tensor's sampled rows (f32) in every type, `threads` tensors at a time, weighted by the
    importance matrix (two floats per column of every matrix, held whole)."""
    # the weights sampled from each tensor (cpuforge.autoquant.sensitivity.rows_for)
    sampled = [t[2] * rows_for(t[2], t[0] // t[2], sample_weights) for t in f16.tensors.values()]
    imatrix = sum(8 * t[2] for t in f16.tensors.values())
    seconds = types * sum(sampled) / SENSITIVITY_WEIGHTS_PER_SECOND / threads
    return cost("measure_sensitivity", threads * 4 * 4 * max(sampled) + imatrix, 1 << 20, seconds).need()


def screen_fraction(f16: Gguf) -> float:
    """The share of a candidate's bytes its screen file holds (cpuforge.autoquant.screen): the cut's layers and
    every tensor outside the layers."""
    shapes = {name: (row, elements // row) if elements > row else (row,)
              for name, (elements, _, row, _) in f16.tensors.items()}  # fmt: skip
    layer = sum(e for name, (e, *_) in f16.tensors.items() if name.startswith("blk."))
    kept = len(cut_layers(shapes, f16.arch.layers)) / f16.arch.layers
    return (f16.params - layer * (1 - kept)) / f16.params


def auto_quant_search_need(f16: Gguf, candidates: list[tuple[str, Gguf, bool]], largest: Gguf, typical: Gguf,
                           ctx: int, chunks: int, task: Task, max_new_tokens: int, budget: int, gen_tokens: int,
                           repetitions: int, threads: int) -> Need:  # fmt: skip
    """Every uniform and listed candidate (`candidates`: its type, its figures, and whether the search makes it:
    the workflow made the listed files it names) benched on its screen file, all of them side by side; a third
    of them made by llama-quantize and verified (the objective's order prunes the rest, which are never made)
    and `budget` mixes (written from tensors quantized once), each a llama-perplexity run and its answers
    teacher-forced against the f16 GGUF's, which eval_task wrote; the passing ones benched again whole: memory as
    for the `largest` file, time as for `typical` ones (each KL run whole, though a clear one stops after a
    quarter); disk, besides, for its copy of the f16 log-probabilities, its windows spread."""
    rule, tokenizer = "auto_quant_search", tokenizer_bytes(f16.arch) / MIB
    made = [quantizer(rule, f16, g, q, threads) for q, g, makes in candidates if makes]
    peak = [perplexity(rule, largest, ctx, chunks, threads, False), answers(rule, largest, task, max_new_tokens, threads),
            *made]  # fmt: skip
    verified = len(candidates) // 3 + 1
    screens = screen_fraction(f16) * sum(g.nbytes for _, g, _ in candidates)
    seconds = verified * sum(c.seconds for c in made) / max(1, len(candidates))
    seconds += repetitions * gen_tokens * (screens + (verified + 1) * typical.nbytes) / BYTES_PER_SECOND
    seconds += (screens + verified * typical.nbytes) / DISK_BYTES_PER_SECOND  # the screen and made files written
    seconds += (verified + budget) * perplexity(rule, typical, ctx, chunks, threads, False).seconds
    seconds += (verified + budget + 1) * answers(rule, typical, task, max_new_tokens, threads).seconds
    seconds += quantizer(rule, f16, typical, "q4_k_m", threads).seconds * 4 / 3  # the mixes' tensors
    seconds += (budget + 2) * typical.nbytes / DISK_BYTES_PER_SECOND  # the mixes and the chosen file written
    disk = max(screens, (verified + 3) * typical.nbytes) + kld_bytes(f16.arch, ctx, chunks)
    return Cost(max(c.mem for c in peak) + tokenizer, disk, seconds, typical.nbytes).need()


def check_tokenizer_need(arch: Arch, text_bytes: int) -> Need:
    """Both tokenizers of the vocabulary (no weights) over the task data and fixed corpora."""
    return cost("check_tokenizer", tokenizer_bytes(arch) + 20 * text_bytes, seconds=60 + text_bytes / 1e4).need()


def check_chat_template_need(arch: Arch) -> Need:
    return cost("check_chat_template", tokenizer_bytes(arch), seconds=60).need()


def build_llama_cpp_need(threads: int) -> Need:
    """One compiler per thread; ggml's largest sources need about 500 MB each."""
    return cost("build_llama_cpp", threads * (500 << 20), 800 << 20, 20 * 60).need()


def make_demo_base_need(m: Model) -> Need:
    """transformers dequantizes the demo GGUF into an f32 model and copies its weights into a fresh one,
    which it saves (measured: twice the f32 weights at its peak)."""
    weights = sum(4 * t.numel for t in m.base.values())
    return cost("make_demo_base", 2 * weights, weights, 5 * 60).need()


def train_demo_adapter_need(m: Model, batch_size: int, steps: int, threads: int, longest: int) -> Need:
    """peft trains the LoRA on the f32 base: its weights, and the activations of a batch of the longest
    examples kept for the backward pass."""
    weights = sum(4 * t.numel for t in m.base.values())
    per_token = m.arch.layers * (4 * m.arch.ffn + 16 * m.arch.hidden) + 3 * m.arch.vocab
    seconds = 6 * weights / 4 * batch_size * longest * steps / (FLOPS_PER_THREAD * threads)
    return cost("train_demo_adapter", weights + 4 * batch_size * longest * per_token, 64 << 20, seconds).need()


def check_converter_vocab_need(arch: Arch) -> Need:
    """The pinned converter's vocabulary code on the tokenizer the merged model will carry (no weights)."""
    return cost("check_converter_vocab", tokenizer_bytes(arch), seconds=60).need()


def make_unmerged_base_need(m: Model, tokenizer: Path | None) -> Need:
    """Links the base's shards and copies its config and the merged model's tokenizer files (from the folder
    `tokenizer`; None: one that has a tokenizer.json); where only a sentencepiece tokenizer.model came,
    transformers writes the tokenizer.json (cpuforge.merge.merge.copy_tokenizer)."""
    writes_json = tokenizer is not None and not (tokenizer / "tokenizer.json").is_file()
    work = TRANSFORMERS_MB * MIB + tokenizer_bytes(m.arch) if writes_json else 0
    return cost("make_unmerged_base", work, 16 << 20, 60).need()


def convert_adapter_need(m: Model, index: int) -> Need:
    """convert_lora_to_gguf.py holds the adapter's pairs as peft saved them (f32 at worst) and their f16
    copy; its scratch file sits beside the copy that gets the provenance."""
    params = m.lora_params[index]
    out = lora_gguf_bytes(m)[index]
    return cost("convert_adapter", 4 * params + 2 * params, 2 * out, 60 + 3 * out / DISK_BYTES_PER_SECOND, out).need()


def eval_kl_divergence_lora_need(base: Gguf, loras: list[int], ctx: int, chunks: int, threads: int) -> Need:
    run = perplexity("eval_kl_divergence", base, ctx, chunks, threads, False)
    return with_loras(run, loras, ctx * chunks, threads).need()


def eval_task_lora_need(base: Gguf, loras: list[int], task: Task, max_new_tokens: int, threads: int) -> Need:
    run = answers("eval_task", base, task, max_new_tokens, threads)
    return with_loras(run, loras, task.rows * (task.longest_prompt + max_new_tokens), threads).need()


def check_runtime_lora_need(merged: Gguf, base: Gguf, loras: list[int], task: Task, max_new_tokens: int,
                       threads: int) -> Need:  # fmt: skip
    """Greedy answers of the merged GGUF, then of the base with the LoRAs; the first context is not freed
    before the second is made (cpuforge.checks.runtime_lora.check_runtime_lora), so both count."""
    rule, tokens = "check_runtime_lora", task.rows * (task.longest_prompt + max_new_tokens)
    merged_run = answers(rule, merged, task, max_new_tokens, threads)
    base_run = with_loras(answers(rule, base, task, max_new_tokens, threads), loras, tokens, threads)
    return both_alive(rule, merged_run, base_run).need()


def bench_runtime_lora_need(merged: Gguf, base: Gguf, loras: list[int], prompt_tokens: int, gen_tokens: int,
                       rounds: int, threads: int) -> Need:  # fmt: skip
    """Both sides' contexts alive at once (cpuforge.evaluate.lora_speed.speed_side_by_side), a warm-up and
    `rounds` runs of each."""
    rule, n_ctx = "bench_runtime_lora", max(prompt_tokens, gen_tokens) + 16
    sides = [llama_run(rule, merged, n_ctx, 1, threads, prompt_tokens, gen_tokens),
             with_loras(llama_run(rule, base, n_ctx, 1, threads, prompt_tokens, gen_tokens), loras,
                        prompt_tokens + gen_tokens, threads)]  # fmt: skip
    run = both_alive(rule, *sides)
    return replace(run, seconds=(rounds + 1) * run.seconds).need()


def small(rule: str, work: int = 0, disk: int = 1 << 20, seconds: float = 60) -> Need:
    """A step whose cost does not grow with the model."""
    return cost(rule, work, disk, seconds).need()
