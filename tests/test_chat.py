"""The terminal chat, driven in a pseudo-terminal as a person would, against the runtimes' own answers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pexpect
import pytest
from helpers import REPO
from helpers.llama import reference_answers, runtime_env
from helpers.models import chat_lesson

from cpuforge.serve.chat import Generation, load_generation
from cpuforge.errors import InputError
from cpuforge.llama.runtime import cpu_backend, default_thread_counts, default_threads, describe_cpu_backend, physical_cores

MAX_NEW = 32  # as reference_answers
QUESTIONS = [chat_lesson(start)[0] for start in (200, 800)]


def spawn_chat(llama_bin, *args, preexec_fn=None) -> pexpect.spawn:
    cmd = [sys.executable, "-m", "scripts.chat", *map(str, args), "--threads", "1", "--max-new-tokens", str(MAX_NEW)]
    # a wait for text that never comes (a wrong answer) must fail, not hang CI: the bound is a deadlock
    # guard far above any answer's time on a loaded machine, not a speed limit
    # a wide terminal, so readline echoes a long question on one line
    env = runtime_env(llama_bin)
    return pexpect.spawn(
        cmd[0], cmd[1:], cwd=str(REPO), env=env, encoding="utf-8", timeout=300, dimensions=(24, 500), preexec_fn=preexec_fn
    )


def ask(child: pexpect.spawn, question: str) -> str:
    """Type a question, return the streamed answer as the terminal showed it (up to the next prompt)."""
    child.sendline(question)
    child.expect_exact(question + "\r\n")  # the terminal's echo of the typed line
    child.expect_exact("\r\n> ")
    return child.before.replace("\r\n", "\n")


@pytest.fixture(scope="module")
def gguf(tiny_chat_model):
    return tiny_chat_model / "ggml-model-q4_0.gguf"


def test_terminal_chat_answers_as_the_model_does_to_transformers_ids(llama_bin, gguf):
    first, second = QUESTIONS
    (want_first,) = reference_answers(gguf, [[{"role": "user", "content": first}]])
    history = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": want_first},
        {"role": "user", "content": second},
    ]
    # in the chat's order, in one process: each prompt reuses what the last one left in the KV cache, as
    # the chat's do, so both round alike (a fresh evaluation of turn two may flip a near-tie)
    _, want_second, want_alone = reference_answers(gguf, [history[:1], history, [{"role": "user", "content": second}]])
    assert want_first.strip() and want_second.strip()
    assert "\n> " not in want_first + want_second  # the prompt marks the end of an answer

    child = spawn_chat(llama_bin, gguf)
    child.expect_exact("> ")
    assert ask(child, first) == want_first
    assert ask(child, second) == want_second  # the same conversation, turn two
    child.sendline("/reset")
    child.expect_exact("(new conversation)")
    child.expect_exact("> ")
    assert ask(child, second) == want_alone
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["SIGINT default", "SIGINT ignored"])
def test_ctrl_c_ends_the_chat_cleanly(llama_bin, gguf, inherited):
    """Also when the chat inherits SIGINT ignored, as a script's background job does."""
    child = spawn_chat(llama_bin, gguf, preexec_fn=lambda: signal.signal(signal.SIGINT, inherited))
    child.expect_exact("> ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.before


def test_a_conversation_longer_than_the_context_is_refused_and_the_chat_goes_on(llama_bin, gguf):
    child = spawn_chat(llama_bin, gguf)
    child.expect_exact("> ")
    child.sendline("word " * 300)
    child.expect_exact("the context holds 256.")
    child.expect_exact("> ")
    (want,) = reference_answers(gguf, [[{"role": "user", "content": QUESTIONS[0]}]])
    assert ask(child, QUESTIONS[0]) == want  # the refused turn left no trace in the conversation
    child.sendeof()
    child.expect(pexpect.EOF)


def test_one_shot_prompt(llama_bin, gguf):
    (want,) = reference_answers(gguf, [[{"role": "user", "content": QUESTIONS[1]}]])
    result = subprocess.run(
        [sys.executable, "-m", "scripts.chat", str(gguf), "--prompt", QUESTIONS[1], "--threads", "1",
         "--threads-batch", "2", "--max-new-tokens", str(MAX_NEW)],
        cwd=REPO, env=runtime_env(llama_bin), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout == want + "\n"
    # the start-up log says which CPU code runs the model, as this process loads the same build
    assert describe_cpu_backend(cpu_backend(llama_bin)) in result.stderr
    assert "(1 threads, 2 for prompts," in result.stderr


def test_sampling_follows_the_seed(llama_bin, gguf):
    def one_shot(*flags) -> str:
        cmd = [sys.executable, "-m", "scripts.chat", str(gguf), "--prompt", QUESTIONS[0], "--threads", "1", *flags]
        return subprocess.run(
            cmd, cwd=REPO, env=runtime_env(llama_bin), capture_output=True, text=True, check=True
        ).stdout

    sampled = one_shot("--do-sample", "--temperature", "1.5", "--seed", "3")
    assert sampled == one_shot("--do-sample", "--temperature", "1.5", "--seed", "3")
    assert sampled != one_shot()  # greedy


def hf_answer(folder, question: str, **settings) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, pad_token_id=tokenizer.eos_token_id, **settings)
    return tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("beams", [1, 4])
def test_hf_chat_answers_as_transformers_generate(llama_bin, tiny_chat_model, beams):
    merged = tiny_chat_model / "merged"
    settings = {"do_sample": False} if beams == 1 else {"num_beams": 4, "early_stopping": True, "do_sample": False}
    want = hf_answer(merged, QUESTIONS[1], **settings)
    assert want.strip()
    if beams > 1:  # on this question the search finds another answer than greedy decoding
        assert want != hf_answer(merged, QUESTIONS[1], do_sample=False)
    child = spawn_chat(llama_bin, "--hf", merged, "--num-beams", beams)
    child.expect_exact("> ")
    assert ask(child, QUESTIONS[1]) == want
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_beam_search_on_a_gguf_is_refused(llama_bin, gguf):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.chat", str(gguf), "--num-beams", "4", "--prompt", "hi"],
        cwd=REPO, env=runtime_env(llama_bin), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "beam search runs only on the HF model (--hf); llama.cpp decodes one sequence." in result.stderr


def test_generation_config_then_flags(tmp_path):
    assert load_generation() == Generation(do_sample=False, max_new_tokens=1024, num_beams=1)
    config = tmp_path / "generation_config.json"
    # a HF generation_config.json: the ids are the model's business, the rest are settings
    config.write_text(json.dumps({"num_beams": 4, "max_new_tokens": 1024, "early_stopping": True, "eos_token_id": 2}))
    assert load_generation(config) == Generation(num_beams=4, early_stopping=True)
    assert load_generation(config, num_beams=1, max_new_tokens=64) == Generation(num_beams=1, max_new_tokens=64)
    with pytest.raises(InputError, match="choose sampling"):
        load_generation(config, do_sample=True)


def test_threads_follow_the_eval_report(tmp_path):
    model = tmp_path / "results" / "m" / "ggml-model-q4_0.gguf"
    model.parent.mkdir(parents=True)
    assert default_threads(model) == physical_cores() >= 1
    (model.parent / "report").mkdir()
    (model.parent / "report" / "metrics.json").write_text(json.dumps({"recommended_threads": 7}))
    assert default_threads(model) == default_threads(model.parent / "merged") == 7
    assert default_thread_counts(model, None, None) == (7, physical_cores())
    metrics = {"recommended_threads": 7, "recommended_threads_batch": 12}
    (model.parent / "report" / "metrics.json").write_text(json.dumps(metrics))
    assert default_thread_counts(model, None, None) == (7, 12)
    assert default_thread_counts(model, 3, None) == (3, 12) and default_thread_counts(model, None, 5) == (7, 5)
    with pytest.raises(InputError, match="threads must be at least 1, got 0"):
        default_thread_counts(model, None, 0)


def test_teacher_forced_answers_are_where_greedy_decoding_writes_them(llama_bin, gguf):
    """fidelity_gguf, the quant search's check of a candidate's answers (teacher-forced) against the f16
    GGUF's greedy answers as eval_task keeps them (answers_gguf's token ids): a file checked against its own
    answers agrees on every row and is right exactly where greedy decoding is. The rows: the model's own
    answers (right), each less its last word (wrong: the model goes on) or with a word more (wrong: it stops
    first), and the lessons' own replies."""
    from cpuforge.evaluate.task import answers_gguf, fidelity_gguf, gold_ids, hf_prompts
    from cpuforge.text.task import answer

    merged = gguf.parent / "merged"
    lessons = [chat_lesson(start) for start in range(100, 1300, 200)]

    def row(question: str, reply: str) -> dict:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}

    own, _ = answers_gguf(gguf, llama_bin, merged, [row(q, "") for q, _ in lessons], MAX_NEW, 1)
    rows = [row(q, a) for (q, _), a in zip(lessons, own, strict=True)]
    rows += [row(q, a.rsplit(" ", 1)[0]) for (q, _), a in zip(lessons, own, strict=True) if " " in a]
    rows += [row(q, a + " the") for (q, _), a in zip(lessons, own, strict=True)]
    rows += [row(q, reply) for q, reply in lessons]
    texts, ids = answers_gguf(gguf, llama_bin, merged, rows, MAX_NEW, 1)
    greedy = [a == answer(r) for a, r in zip(texts, rows, strict=True)]
    assert 0 < sum(greedy) < len(rows)
    reference = {"answers": ids, "right": greedy}
    same = fidelity_gguf(gguf, llama_bin, merged, rows, MAX_NEW, 1, reference)
    assert same == {"agree": [True] * len(rows), "right": greedy}
    # against other answers (each row's from the next row), it agrees exactly where they are its own, and is
    # right where greedy decoding is
    shifted = reference["answers"][1:] + reference["answers"][:1]
    other = fidelity_gguf(gguf, llama_bin, merged, rows, MAX_NEW, 1, {"answers": shifted, "right": greedy})
    assert other["agree"] == [a == b for a, b in zip(shifted, reference["answers"], strict=True)]
    assert not all(other["agree"]) and other["right"] == greedy
    # a reference that goes on past the model's own answers (each with a word more): they are unlike it, and the
    # task's answers, the model's own, are checked from where the two part, the prompt and shared tokens kept
    n = len(lessons)
    tokenizer, prompts = hf_prompts(merged, rows)
    longer = [gold_ids(tokenizer, r, p) for r, p in zip(rows[-2 * n : -n], prompts[-2 * n : -n], strict=True)] + ids[n:]
    parted = fidelity_gguf(gguf, llama_bin, merged, rows, MAX_NEW, 1, {"answers": longer, "right": greedy})
    assert parted["agree"][:n] == [False] * n and parted["right"] == greedy
