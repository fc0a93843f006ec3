"""Base + runtime LoRA against the merged model (check_runtime_lora): the same greedy answers, token for token,
from the GGUF base with its GGUF LoRAs applied at run time and from the merged GGUF, on the held-out prompts."""

from __future__ import annotations

import logging
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.llama.runtime import apply_loras, load_llama_cpp, load_model
from cpuforge.text.generate import gguf_greedy_ids, stop_ids
from cpuforge.text.prompt import first_difference, prompt_ids, tokenizer_folder
from cpuforge.text.task import has_prompts, messages, read_rows

log = logging.getLogger(__name__)


SHOWN = 10


def check_runtime_lora(
    base: Path, loras: list[Path], merged: Path, heldout: Path, bin_dir: Path, threads: int,
    max_new_tokens: int = 48, min_agreement: float = 0.9, limit: int = 0, gated: bool = True,
) -> dict:  # fmt: skip
    """Greedy answers of `base` with `loras` applied at run time (each at scale 1: its own alpha / r) against
    the merged GGUF's, token for token; with `gated`, raises InputError below `min_agreement`."""
    rows = read_rows(heldout)
    if not has_prompts(rows):
        raise InputError(f"{heldout}: rows need `messages` (or the demo's `system` and `news`) to be prompts.")
    rows = rows[:limit] if limit else rows
    from transformers import AutoTokenizer

    # both sides read the ids transformers gives for the merged model's template, as every runtime does
    folder = tokenizer_folder(merged)
    if folder is None:
        raise InputError(f"{merged}: no merged model folder beside it to build the prompts from.")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [prompt_ids(tokenizer, r) for r in rows]
    n_ctx = max(map(len, prompts)) + max_new_tokens + 16  # the longest prompt and its answer
    llama_cpp = load_llama_cpp(bin_dir)
    answers, texts = {}, {}
    for side, path, adapters in (("merged", merged, []), ("runtime", base, loras)):
        llm = load_model(llama_cpp, path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0,
                         verbose=False)  # fmt: skip
        apply_loras(llama_cpp, llm, [(a, 1.0) for a in adapters])
        answers[side] = gguf_greedy_ids(llm, prompts, stop_ids(tokenizer), max_new_tokens)
        texts[side] = [llm.detokenize(a).decode("utf-8", errors="replace").strip() for a in answers[side]]
    agree = [a == b for a, b in zip(answers["merged"], answers["runtime"], strict=True)]
    rate = sum(agree) / len(rows)
    record = {
        "artifact": f"{base.name} + {' + '.join(a.name for a in loras)}",
        "reference": merged.name,
        "prompts": len(rows),
        "agree": sum(agree),
        "rate": rate,
        "min_rate": min_agreement if gated else None,
        "passed": rate >= min_agreement if gated else None,
        "max_new_tokens": max_new_tokens,
        "mismatches": [
            {"prompt": messages(r)[-1]["content"], "merged": m, "runtime": t, "token_index": first_difference(a, b)}
            for r, m, t, a, b, same in zip(rows, texts["merged"], texts["runtime"], answers["merged"],
                                           answers["runtime"], agree) if not same
        ][:SHOWN],
    }  # fmt: skip
    log.info("runtime LoRA and merged model agree on %d/%d prompts (%.1f %%)", sum(agree), len(rows), 100 * rate)
    if gated and not record["passed"]:
        first = record["mismatches"][0]
        raise InputError(
            f"{base} + {', '.join(map(str, loras))}: greedy answers agree with {merged}'s on {sum(agree)} of "
            f"{len(rows)} held-out prompts ({rate:.0%}, below {min_agreement:.0%}); first difference, on "
            f"{first['prompt']!r}: runtime LoRA {first['runtime']!r}, merged {first['merged']!r}."
        )
    return record
