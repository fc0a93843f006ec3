"""The streamed forward pass (cpuforge.text.stream) against transformers' whole model, on tiny real models:
perplexity, teacher-forced generation parity and exact match, the architectures it refuses, its memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from helpers.models import CHAT_TEMPLATE, chat_lesson, make_lora, make_tiny_llama, prose

from cpuforge.text import stream
from cpuforge.evaluate.task import answers_hf, hf_prompts
from cpuforge.errors import InputError
from cpuforge.text.generate import greedy_answers, greedy_choices, greedy_divergence, greedy_ids, stop_ids
from cpuforge.merge.merge import merge
from cpuforge.evaluate.perplexity import hf_window_nll, perplexity_from_nll
from cpuforge.text.prompt import first_difference
from cpuforge.text.task import answer, training_texts

# streamed vs whole-model perplexity: measured equal to the last bit on these models (the same modules and
# kernels, each sequence a batch of one); the output head's matmul in chunks may round otherwise elsewhere
PERPLEXITY_TOLERANCE = 1e-5
MAX_NEW_TOKENS = 48


def whole_model_nll(folder, tokens: list[int], bos: int | None, ctx: int, n_windows: int) -> list[float]:
    """hf_window_nll as it was before streaming: the whole model from_pretrained in f32, a window at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll = []
    for i in range(n_windows):
        window = tokens[i * ctx : (i + 1) * ctx]
        if bos is not None:
            window[0] = bos
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0]
        logp = torch.log_softmax(logits[ctx // 2 : ctx - 1], dim=-1)
        nll += (-logp.gather(1, torch.tensor(window[ctx // 2 + 1 :])[:, None])[:, 0]).double().tolist()
    return nll


SHAPES = {
    "llama": {},
    # GQA, tied embeddings, linear RoPE scaling, biases in attention
    "gqa-tied-linear": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                            rope_scaling={"rope_type": "linear", "factor": 2.0}, num_hidden_layers=3),
    # Llama 3's RoPE
    "llama3-rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
}  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_streamed_perplexity_equals_the_whole_models(shape, tmp_path, monkeypatch):
    # the output head in slices of 200 of its 512 rows, and 48 of a window's 64 scored positions at a time
    monkeypatch.setattr(stream, "HEAD_ROWS", 200)
    monkeypatch.setattr(stream, "POSITIONS", 48)
    # initializer_range 0.2: sharp distributions, on which a wrong RoPE moves perplexity by 10 %, not 1e-4
    model = make_tiny_llama(tmp_path / "model", initializer_range=0.2, **SHAPES[shape])
    tokens = torch.randint(0, 512, (4 * 128,), generator=torch.Generator().manual_seed(0)).tolist()
    streamed = hf_window_nll(model, tokens, 1, 128, 4)
    whole = whole_model_nll(model, tokens, 1, 128, 4)
    assert len(streamed) == len(whole) == 4 * 63
    assert perplexity_from_nll(streamed)[0] == pytest.approx(perplexity_from_nll(whole)[0], rel=PERPLEXITY_TOLERANCE)
    assert max(abs(a - b) for a, b in zip(streamed, whole, strict=True)) < PERPLEXITY_TOLERANCE


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(InputError, match=r"gpt2: the streamed forward pass knows the architectures LlamaForCausalLM, "
                                         r"not 'gpt2' \(GPT2LMHeadModel\)\."):  # fmt: skip
        hf_window_nll(tmp_path / "gpt2", list(range(64)), None, 32, 2)


def lesson_rows(n: int = 16) -> list[dict]:
    """Chat rows from the prose: a piece of it as the question, the 16 words that follow as the answer."""
    words = len(prose().split())
    lessons = [chat_lesson(start) for start in range(0, words - 40, (words - 40) // n)]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in lessons]


def memorize(folder, rows: list[dict], steps: int = 150):
    """Teach the model, in place, the answers of `rows` as task.training_texts renders them; seconds on one core."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = folder / "memorize.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    batch = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in training_texts(tokenizer, [path])]
    width = max(map(len, batch))
    x = torch.tensor([ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids in batch])
    labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in batch])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(input_ids=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny chat model that knows the answers of every other lesson row, and the rows."""
    rows = lesson_rows()
    torch.manual_seed(0)
    folder = make_tiny_llama(tmp_path_factory.mktemp("taught") / "model", chat_template=CHAT_TEMPLATE)
    return memorize(folder, rows[::2]), rows


def whole_model_greedy(folder, rows):
    """Greedy answer ids through transformers' generate on the whole model, a prompt at a time, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer, _ = hf_prompts(folder, rows)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return greedy_ids(model, tokenizer, rows, MAX_NEW_TOKENS, batch_size=1), tokenizer, model


@pytest.mark.slow  # the taught model: minutes of training on a loaded 2-core machine
def test_teacher_forced_agreement_equals_generates(taught, tmp_path):
    """Answers of one model tested against another's greedy choices: agreement and first difference as
    generate gives them."""
    folder, rows = taught
    answers, tokenizer, _ = whole_model_greedy(folder, rows)
    assert {len(a) == MAX_NEW_TOKENS for a in answers} == {True, False}  # both ways of ending an answer
    merge(folder, [make_lora(folder, tmp_path / "adapter", lora_alpha=1)], tmp_path / "other", "f32")
    theirs, _, _ = whole_model_greedy(tmp_path / "other", rows)
    want = [None if a == b else first_difference(a, b) for a, b in zip(answers, theirs, strict=True)]
    assert 0 < want.count(None) < len(rows), want  # some answers agree, some not

    _, prompts = hf_prompts(folder, rows)
    choices = greedy_choices(tmp_path / "other", prompts, answers, MAX_NEW_TOKENS)
    stop = stop_ids(tokenizer)
    assert [greedy_divergence(c, a, stop, MAX_NEW_TOKENS) for c, a in zip(choices, answers, strict=True)] == want


@pytest.mark.slow
def test_teacher_forced_exact_match_equals_greedy_exact_match(taught):
    folder, rows = taught
    _, tokenizer, model = whole_model_greedy(folder, rows)
    generated = greedy_answers(model, tokenizer, rows, MAX_NEW_TOKENS, batch_size=1)
    want = [a == answer(r) for a, r in zip(generated, rows, strict=True)]
    assert 0 < sum(want) < len(rows), generated  # right on some rows, wrong on others

    answers, right = answers_hf(folder, folder, rows, MAX_NEW_TOKENS)
    assert right == want
    # written out up to the first token that differs from the task's answer: the greedy answer's beginning
    for ours, theirs in zip(answers, generated, strict=True):
        assert theirs.startswith(ours), (ours, theirs)


# peak RSS of a fresh process over a streamed pass (or the whole model's forward pass) on `folder`, from
# the kernel's high-water mark reset after the imports
PEAK = """
import sys, torch, transformers.models.llama.modeling_llama
from transformers import AutoModelForCausalLM
from cpuforge.text.stream import next_token_nll

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(key))

sequences = [list(range(i, i + 64)) for i in range(2)]
open('/proc/self/clear_refs', 'w').write('5')
before = status('VmRSS')
if sys.argv[2] == 'streamed':
    next_token_nll(sys.argv[1], sequences, 32)
else:
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
        [model(input_ids=torch.tensor([s])) for s in sequences]
print(status('VmHWM') - before)
"""


def peak_growth(folder, how: str) -> int:
    result = subprocess.run([sys.executable, "-c", PEAK, str(folder), how], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.slow  # a 16-layer model's whole forward pass and a streamed one, each in a fresh process
def test_streamed_pass_holds_one_layer_not_the_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # 16 layers of 4.2M parameters (17 MB in f32) beside 0.5M in embeddings and head, saved in f16 as HF saves
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
                         num_attention_heads=8, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config)
    layer = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    whole = 4 * sum(p.numel() for p in model.parameters())
    model.to(torch.float16).save_pretrained(tmp_path / "model")
    del model
    # the measure sees the model: the whole model's forward pass grows the process by more than its weights
    assert peak_growth(tmp_path / "model", "whole") > whole
    # measured: 2.3 layers (the layer, a tensor's f16 read buffer, kernels' workspace); the model is 16
    assert peak_growth(tmp_path / "model", "streamed") < 4 * layer
