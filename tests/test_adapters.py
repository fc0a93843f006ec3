"""Runtime LoRA: the adapters as GGUF LoRA files on one unmerged quantized base, made by the workflow
(lora_adapters), served side by side and checked against merging.

Two tiny adapters are trained here, in seconds, to give different fixed answers to the same prompts,
so an answer shows which adapter (if any) made it.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from helpers import REPO
from helpers.llama import runtime_env
from helpers.models import chat_lesson, make_lora
from helpers.serve import client, start_server, wait_for_url
from helpers.workflow import snakemake, write_config

from cpuforge.errors import InputError
from cpuforge.checks.runtime_lora import check_runtime_lora

log = logging.getLogger(__name__)

ANSWERS = {"a": "The name of the module is not found.", "b": "Return a new list of the values in order."}
TRAIN = [chat_lesson(start)[0] for start in range(40, 4000, 60)]
QUESTIONS = [chat_lesson(start)[0] for start in (150, 450, 750, 1050)]
MAX_NEW = 24


def train_fixed_answer_lora(base, out, answer: str, steps: int = 80, seed: int = 0):
    """A LoRA that makes the model answer every prompt with `answer` (loss on the answer only)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules=modules, task_type="CAUSAL_LM"),
    )
    examples = []
    for question in TRAIN:
        user = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False
        )
        examples.append((full, [-100] * len(prompt) + full[len(prompt) :]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = [examples[i] for i in torch.randint(0, len(examples), (16,), generator=generator).tolist()]
        width = max(len(ids) for ids, _ in batch)
        x = torch.tensor([ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        model(input_ids=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


def says(text: str, name: str) -> bool:
    """Whether `text` is adapter `name`'s fixed answer (its first word may come out rounded on a q4_0 base)."""
    return text.endswith(ANSWERS[name].split(" ", 1)[1])


@pytest.fixture(scope="module")
def lora_run(llama_bin, tiny_chat_model, tmp_path_factory):
    """lora_adapters for two models on one fitted tiny base (the chat tests' own): `alpha` (adapter a, with
    held-out prompts, so the runtime-LoRA checks run) and `beta` (adapter b)."""
    workdir = tmp_path_factory.mktemp("lora_run")
    inputs = workdir / "inputs"
    inputs.mkdir()
    base = tiny_chat_model.parent.parent / "inputs" / "base"
    for name, answer in ANSWERS.items():
        train_fixed_answer_lora(base, inputs / name, answer)
    heldout = inputs / "heldout.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWERS["a"]}]}
        for q in QUESTIONS
    ]
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = [
        {"name": "alpha", "base": str(base), "adapters": [str(inputs / "a")], "task_data": {"heldout": str(heldout)}},
        {"name": "beta", "base": str(base), "adapters": [str(inputs / "b")]},
    ]
    config = write_config(workdir / "lora.yaml", models, quant_types=["q4_0"])
    snakemake(workdir, "lora_adapters", "--configfile", str(config))
    return workdir


def gguf_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return reader, {f.name: f.contents() for f in reader.fields.values()}


def test_lora_adapters_makes_gguf_loras_and_the_unmerged_base(lora_run):
    from safetensors.numpy import load_file

    results = lora_run / "results" / "alpha"
    reader, fields = gguf_fields(results / "adapters" / "1-a.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0
    assert json.loads(fields["cpuforge.convert_lora"])["step"] == "convert_lora"
    assert (results / "adapters" / "1-a.gguf.provenance.json").is_file()
    # the low-rank pairs as peft trained them, rounded to f16 (llama.cpp's A is peft's A, stored [r, in])
    peft = load_file(lora_run / "inputs" / "a" / "adapter_model.safetensors")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(tensors) == 2 * 7 * 2  # A and B of 7 modules in 2 layers
    want = peft["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].astype(np.float16)
    assert np.array_equal(tensors["blk.1.attn_v.weight.lora_a"].reshape(want.shape), want)

    _, base = gguf_fields(results / "base-q4_0.gguf")
    _, merged = gguf_fields(results / "ggml-model-q4_0.gguf")
    assert base["general.file_type"] == merged["general.file_type"] == 2  # MOSTLY_Q4_0
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.chat_template",
        "tokenizer.ggml.bos_token_id",
    ):
        assert base[key] == merged[key], key
    assert "cpuforge.quantize" in base and "cpuforge.convert" in base
    assert (lora_run / "results" / "beta" / "adapters" / "1-b.gguf").is_file()
    assert not list((lora_run / "results").rglob("*.partial"))


def test_runtime_lora_answers_as_the_merged_model(lora_run):
    checks = lora_run / "results" / "alpha" / "checks"
    f16 = json.loads((checks / "runtime-lora-f16.json").read_text())
    assert f16["passed"] and f16["prompts"] == len(QUESTIONS) and f16["rate"] >= f16["min_rate"] == 0.9
    q4 = json.loads((checks / "runtime-lora-q4_0.json").read_text())
    assert q4["passed"] is None and q4["prompts"] == len(QUESTIONS)  # measured, not gated
    log.info("runtime LoRA vs merged: f16 %d/%d, q4_0 %d/%d", f16["agree"], f16["prompts"], q4["agree"], q4["prompts"])


def test_llama_perplexity_applies_the_lora_for_the_report(lora_run, llama_bin, tmp_path):
    """The report's runtime-LoRA KL divergence (eval_kl_divergence --lora): the f16 base with adapter a applied
    is the merged f16 up to rounding, far closer than the base alone or with the other adapter."""
    from helpers.models import prose

    from cpuforge.evaluate.perplexity import kl_divergence, perplexity_gguf

    results = lora_run / "results" / "alpha"
    text = tmp_path / "text.txt"
    text.write_text(prose(6000))
    logits = tmp_path / "f16.kld"
    perplexity_gguf(llama_bin, results / "ggml-model-f16.gguf", text, 128, 8, 1, logits)
    kl = {
        name: kl_divergence(llama_bin, results / "base-f16.gguf", logits, 128, 1, loras)["kl_divergence"]
        for name, loras in (("a", [results / "adapters" / "1-a.gguf"]), ("none", []),
                            ("b", [lora_run / "results" / "beta" / "adapters" / "1-b.gguf"]))
    }  # fmt: skip
    log.info("KL divergence from the merged f16: %s", kl)
    assert kl["a"] < 1e-3 and kl["a"] < kl["none"] / 10 and kl["a"] < kl["b"] / 10


def test_runtime_lora_check_fails_on_the_wrong_adapter(lora_run, llama_bin):
    """The other adapter on the base does not answer as the merged model: the check names both."""
    results = lora_run / "results"
    wrong = results / "beta" / "adapters" / "1-b.gguf"
    with pytest.raises(InputError, match=r"greedy answers agree with .*ggml-model-f16.gguf's on 0 of 4 held-out"):
        check_runtime_lora(
            results / "alpha" / "base-f16.gguf", [wrong], results / "alpha" / "ggml-model-f16.gguf",
            lora_run / "inputs" / "heldout.jsonl", llama_bin, 1, MAX_NEW,
        )  # fmt: skip


def chat_answer(llama_bin, base, question: str, *lora) -> str:
    """What `scripts.chat BASE --lora FILE --prompt Q` answers, greedily."""
    cmd = [sys.executable, "-m", "scripts.chat", str(base), "--prompt", question, "--threads", "1",
           "--max-new-tokens", str(MAX_NEW), *(a for f in lora for a in ("--lora", str(f)))]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=runtime_env(llama_bin), capture_output=True, text=True, check=True)
    return result.stdout.removesuffix("\n")


def start_lora_server(llama_bin, log_file, base, files: dict, parallel: int):
    """scripts.serve on `base` with each adapter of `files` (name -> GGUF LoRA), one thread, `parallel` slots."""
    return start_server(llama_bin, log_file, base, "--port", 0, "--threads", 1, "--parallel", parallel,
                        *(a for n, f in files.items() for a in ("--lora", f"{n}={f}")))  # fmt: skip


@pytest.fixture(scope="module")
def lora_server(llama_bin, lora_run, tmp_path_factory):
    results = lora_run / "results"
    base = results / "alpha" / "base-q4_0.gguf"
    files = {"a": results / "alpha" / "adapters" / "1-a.gguf", "b": results / "beta" / "adapters" / "1-b.gguf"}
    log_file = tmp_path_factory.mktemp("lora_serve") / "serve.log"
    process = start_lora_server(llama_bin, log_file, base, files, parallel=4)
    url = wait_for_url(process, log_file)
    yield url, base, files
    process.send_signal(signal.SIGINT)
    assert process.wait() == 0, log_file.read_text()


def test_chat_applies_the_adapter(lora_server, llama_bin):
    _, base, files = lora_server
    question = QUESTIONS[0]
    assert says(chat_answer(llama_bin, base, question, files["a"]), "a")
    assert says(chat_answer(llama_bin, base, question, files["b"]), "b")
    alone = chat_answer(llama_bin, base, question)
    assert alone.strip() and not says(alone, "a") and not says(alone, "b")


def test_four_clients_alternating_adapters_get_each_adapters_own_answers(lora_server, llama_bin):
    url, base, files = lora_server
    c = client(url, key="none")
    assert [m.id for m in c.models.list()] == ["alpha-q4_0", "alpha-q4_0+a", "alpha-q4_0+b"]
    want = {(n, q): chat_answer(llama_bin, base, q, f) for n, f in files.items() for q in QUESTIONS}
    assert all(says(text, n) for (n, _), text in want.items())  # each adapter's own, fixed answer

    def one(i: int) -> list[tuple[str, str, str]]:
        got = []
        for j, question in enumerate(QUESTIONS):
            name = "ab"[(i + j) % 2]
            messages = [{"role": "user", "content": question}]
            response = client(url, key="none").chat.completions.create(
                model=f"alpha-q4_0+{name}", messages=messages, temperature=0, max_tokens=MAX_NEW
            )
            got.append((name, question, response.choices[0].message.content))
        return got

    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = [a for got in pool.map(one, range(4)) for a in got]
    elapsed = time.monotonic() - start
    equal = sum(text == want[name, q] for name, q, text in answers)
    log.info(
        "%d requests from 4 concurrent clients, %d equal to scripts.chat --lora, %.1f s", len(answers), equal, elapsed
    )
    assert equal == len(answers) == 16

    with pytest.raises(openai.NotFoundError, match=r"The model `alpha-q4_0\+c` does not exist; this server serves"):
        c.chat.completions.create(model="alpha-q4_0+c", messages=[{"role": "user", "content": QUESTIONS[0]}])
    base_answer = c.chat.completions.create(
        model="alpha-q4_0", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=MAX_NEW
    )
    assert base_answer.choices[0].message.content == chat_answer(llama_bin, base, QUESTIONS[0])


def test_a_prompt_seen_under_one_adapter_is_answered_by_the_other(llama_bin, lora_server, tmp_path):
    """One slot, so a prompt asked again comes back from llama-server's prompt cache: asked of adapter a, then
    of b, then of a, each answer is the adapter's own (`scripts.chat --lora`), not one read on a prompt the other
    adapter computed ("Rn be a new list" for "Return a new list", when the cache kept prompts by tokens alone)."""
    _, base, files = lora_server
    log_file = tmp_path / "serve.log"
    process = start_lora_server(llama_bin, log_file, base, files, parallel=1)
    order = [("a", 0), ("b", 1), ("b", 0), ("a", 0)]
    try:
        c = client(wait_for_url(process, log_file), key="none")
        got = [
            c.chat.completions.create(
                model=f"alpha-q4_0+{name}", messages=[{"role": "user", "content": QUESTIONS[q]}], temperature=0,
                max_tokens=MAX_NEW,
            ).choices[0].message.content
            for name, q in order
        ]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait()
    assert got == [chat_answer(llama_bin, base, QUESTIONS[q], files[name]) for name, q in order]


@pytest.mark.parametrize(
    "lora, reason",
    [
        ({"modules_to_save": ["embed_tokens"]}, "saves model.embed_tokens.weight whole"),
        ({"modules_to_save": ["lm_head"]}, "saves lm_head.weight whole"),
        ({"use_rslora": True}, "uses rsLoRA (scale alpha / sqrt(r))"),
    ],
    ids=["embed_tokens", "lm_head", "rslora"],
)
def test_an_adapter_that_cannot_run_at_run_time_is_refused_at_start_up(tmp_path, tiny_base, lora, reason):
    adapter = make_lora(tiny_base, tmp_path / "adapter", **lora)
    config = write_config(tmp_path / "bad.yaml", [{"name": "m", "base": str(tiny_base), "adapters": [str(adapter)]}])
    result = snakemake(tmp_path, "lora_adapters", "--configfile", str(config), check=False)
    assert result.returncode != 0 and not (tmp_path / "results").exists()
    assert f"{adapter}: cannot run as a GGUF LoRA (lora_adapters): it {reason}" in result.stdout + result.stderr
    assert "merging it still works." in result.stdout + result.stderr
    snakemake(tmp_path, "-n", "q4_model", "--configfile", str(config))  # the merge path takes it


def test_bad_lora_flags_are_refused_with_one_sentence(llama_bin, lora_run, tmp_path):
    base = lora_run / "results" / "alpha" / "base-q4_0.gguf"
    for flag, sentence in (
        ("1-a.gguf", "--lora 1-a.gguf: give NAME=FILE[:SCALE]"),
        (f"a={tmp_path / 'nope.gguf'}", f"--lora a={tmp_path / 'nope.gguf'}: file not found."),
        (f"a={base}:big", f"--lora {base}:big: the scale after the last `:` must be a number, got 'big'."),
    ):
        log_file = tmp_path / "serve.log"
        process = start_server(llama_bin, log_file, base, "--port", 0, "--threads", 1, "--lora", flag)
        assert process.wait() == 2
        assert sentence in log_file.read_text()
