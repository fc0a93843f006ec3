"""The one prompt path on real templates and real vocabularies: cpuforge.text.prompt renders and tokenizes
as transformers does, and the chat and the chat-template check see the ids every runtime is fed."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers.llama import chat_ids, reference_answers
from helpers.vocab import MODELS_DIR, VOCAB_PAIRS
from helpers.workflow import TASK

from cpuforge.serve.chat import Generation, GGUFChat
from cpuforge.errors import InputError
from cpuforge.paths import merged_folder
from cpuforge.text.prompt import ChatPrompt, GGUFPrompt, chat_prompt_for
from cpuforge.text.task import load_split, messages
from cpuforge.checks.chat_template import CHECKED, check_chat_template

HELDOUT = [messages(r) for r in load_split("heldout")]
SPM = [name for name, (vocab, _) in VOCAB_PAIRS.items() if vocab in ("llama-spm", "phi-3")]
SYSTEM = {"role": "system", "content": "You are a careful assistant."}
QUESTIONS = ["What is the capital of France?", "And the capital of Spain?"]


def hf_or_refusal(tokenizer, conversation):
    try:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # noqa: BLE001 (a template refuses with whatever it raises)
        return f"refused ({type(e).__name__})"


def ours_or_refusal(prompt, conversation):
    try:
        return prompt.ids(conversation)
    except Exception as e:  # noqa: BLE001 (a template refuses with whatever it raises)
        return f"refused ({type(e).__name__})"


def test_every_shipped_template_renders_as_transformers(vocab_models, tmp_path):
    """All of the pinned source's models/templates/*.jinja, on a sentencepiece vocabulary: the same ids, or
    a refusal from both (a template that wants tools, or no system turn)."""
    from transformers import AutoTokenizer

    templates = sorted((MODELS_DIR / "templates").glob("*.jinja"))
    assert len(templates) > 60
    rendered = 0
    for template in templates:
        folder = shutil.copytree(vocab_models["llama2-spm"].parent / "merged", tmp_path / template.stem)
        (folder / "chat_template.jinja").write_text(template.read_text())
        tokenizer, prompt = AutoTokenizer.from_pretrained(folder), ChatPrompt(folder)
        for name, conversation in CHECKED.items():
            want = hf_or_refusal(tokenizer, conversation)
            assert ours_or_refusal(prompt, conversation) == want, (template.name, name)
            rendered += isinstance(want, list)
    assert rendered > 0.9 * len(templates) * len(CHECKED)


TOOL = {
    "type": "function",
    "function": {
        "name": "get_datetime",
        "description": "The local date and time.",
        "parameters": {"type": "object", "properties": {}, "required": []},
    },
}


def test_tools_are_left_out_only_where_the_template_would_not_show_them(vocab_models, tmp_path):
    """The proxy renders a chat request that carries tools itself, leaving them out, only for a template that
    never reads `tools`: there transformers' text with the tools equals its text without them."""
    from transformers import AutoTokenizer

    conversation = [{"role": "user", "content": QUESTIONS[0]}]
    shown = 0
    for template in sorted((MODELS_DIR / "templates").glob("*.jinja")):
        folder = shutil.copytree(vocab_models["llama2-spm"].parent / "merged", tmp_path / template.stem)
        (folder / "chat_template.jinja").write_text(template.read_text())
        tokenizer, prompt = AutoTokenizer.from_pretrained(folder), ChatPrompt(folder)
        without = hf_or_refusal(tokenizer, conversation)
        try:
            with_tools = tokenizer.apply_chat_template(conversation, tools=[TOOL], add_generation_prompt=True,
                                                       tokenize=True, return_dict=False)  # fmt: skip
        except Exception as e:  # noqa: BLE001 (a template refuses with whatever it raises)
            with_tools = f"refused ({type(e).__name__})"
        if not prompt.renders_tools:
            assert with_tools == without, template.name
        shown += with_tools != without
    assert shown > 20  # most shipped templates do show tools, and are told apart


@pytest.mark.parametrize("pair", VOCAB_PAIRS)
def test_chat_prompt_equals_transformers(vocab_models, pair):
    """The fixed conversations and the task's held-out prompts, on each (vocabulary, template) pair."""
    from transformers import AutoTokenizer

    folder = vocab_models[pair].parent / "merged"
    tokenizer, prompt = AutoTokenizer.from_pretrained(folder), ChatPrompt(folder)
    assert prompt.special == tokenizer.special_tokens_map
    conversations = [*CHECKED.values(), *HELDOUT]
    for conversation in conversations:
        assert prompt.text(conversation) == tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    assert [prompt.ids(c) for c in conversations] == chat_ids(folder, conversations)


def test_chat_prompt_equals_transformers_on_the_workflows_tokenizers(smol_tokenizer, tiny_base, tmp_path):
    """The demo's byte-level BPE tokenizer (ChatML), and the tiny sentencepiece one the tests train, with
    Llama-2-chat's template."""
    from helpers.vocab import LLAMA_2_CHAT_TEMPLATE

    tiny = shutil.copytree(tiny_base, tmp_path / "tiny")
    (tiny / "chat_template.jinja").write_text(LLAMA_2_CHAT_TEMPLATE)
    for folder in (smol_tokenizer, tiny):
        conversations = [*CHECKED.values(), *HELDOUT]
        prompt = ChatPrompt(folder)  # once: loading the demo's 49152-piece tokenizer takes a while
        assert [prompt.ids(c) for c in conversations] == chat_ids(folder, conversations), folder


def test_a_gguf_finds_the_merged_folder_beside_it(vocab_models, llama_bin, tmp_path, caplog):
    gguf = vocab_models["llama2-spm"]
    assert merged_folder(gguf) == gguf.parent / "merged"
    assert chat_prompt_for(gguf).folder == gguf.parent / "merged"
    # outside the results layout, and without --tokenizer: said once, and the GGUF's own template path
    alone = shutil.copy(gguf, tmp_path / "model.gguf")
    assert merged_folder(alone) is None and chat_prompt_for(alone) is None
    assert "no merged model folder beside it" in caplog.text
    assert isinstance(GGUFChat(alone, 1, 256, llama_bin).prompt, GGUFPrompt)
    assert chat_prompt_for(alone, gguf.parent / "merged").folder == gguf.parent / "merged"
    with pytest.raises(InputError, match="no tokenizer.json"):
        chat_prompt_for(alone, tmp_path)


@pytest.mark.parametrize("pair", VOCAB_PAIRS)
def test_gguf_chat_feeds_transformers_ids_multi_turn(vocab_models, llama_bin, pair):
    """Two turns with a system prompt through GGUFChat: it evaluates exactly transformers' ids, and answers as
    llama-cpp-python does to those ids; on the sentencepiece pairs llama.cpp's own path would feed others."""
    gguf = vocab_models[pair]
    chat = GGUFChat(gguf, 1, 256, llama_bin)
    gen = Generation(max_new_tokens=16)
    conversation = [SYSTEM]
    for question in QUESTIONS:
        conversation.append({"role": "user", "content": question})
        (want_ids,) = chat_ids(gguf.parent / "merged", [conversation])
        assert chat.prompt_tokens(conversation)[0] == want_ids
        assert (GGUFPrompt(chat.llm).ids(conversation) != want_ids) == (pair in SPM)
        (want,) = reference_answers(gguf, [conversation], max_tokens=16)
        answer = "".join(chat.stream(conversation, gen))
        assert answer == want
        conversation.append({"role": "assistant", "content": answer})


@pytest.mark.parametrize("pair", VOCAB_PAIRS)
def test_chat_template_check_counts_the_ids_each_runtime_is_fed(vocab_models, llama_bin, pair):
    gguf = vocab_models[pair]
    record = check_chat_template(gguf, gguf.parent / "merged", llama_bin, TASK["heldout"])
    assert record["passed"] and record["template"]
    prompts = len(CHECKED) + len(HELDOUT)
    for runtime in ("chat", "server"):
        assert record["runtimes"][runtime] | {"path": None} == {
            "path": None,
            "prompts": prompts,
            "same_ids": prompts,
            "first_mismatch": None,
            "gated": True,
        }
    own = record["runtimes"]["llama.cpp"]
    assert not own["gated"] and own["prompts"] == prompts
    if pair in SPM:  # measured: llama.cpp's tokenization of these templates never gives transformers' ids
        assert own["same_ids"] == 0 and own["first_mismatch"]["prompt"] == "system+user"
    else:
        assert own["same_ids"] == prompts
    assert [c["name"] for c in record["conversations"]] == list(CHECKED)
    assert json.loads(json.dumps(record)) == record


def test_chat_template_check_fails_when_a_runtime_is_fed_other_ids(vocab_models, llama_bin, tmp_path):
    """The merged folder beside the GGUF holds another model's tokenizer: the chat would read other ids."""
    gguf = vocab_models["llama2-spm"]
    wrong = shutil.copytree(vocab_models["phi3-spm"].parent / "merged", tmp_path / "results" / "m" / "merged")
    moved = shutil.copy(gguf, wrong.parent / "ggml-model-f32.gguf")
    with pytest.raises(InputError) as failure:
        check_chat_template(moved, gguf.parent / "merged", llama_bin)
    assert str(failure.value).startswith(f"{moved}: the chat feeds the system+user prompt as ")
    assert f"where transformers' template of {gguf.parent / 'merged'} gives" in str(failure.value)
