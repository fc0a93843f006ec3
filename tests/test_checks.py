"""The fidelity checks on tiny real models: tokenizer, chat-template and generation parity, extended
vocabularies, and the chain broken on purpose (wrong tokenizer files, BOS doubled)."""

from __future__ import annotations

import ast
import json
import re
import shutil

import pytest
from helpers.llama import SOURCE, convert
from helpers.models import (
    CHAT_SPECIAL_TOKENS,
    PLAIN_CHAT_TEMPLATE,
    make_chat_llama,
    make_extended_adapter,
    make_lora,
    make_padded_vocab_adapter,
    make_tiny_llama,
    make_tokenizer,
)
from helpers.workflow import TASK

from cpuforge.errors import InputError
from cpuforge.checks.generation import check_generation
from cpuforge.io.gguf import read_metadata
from cpuforge.llama.convert import check_converter_vocab
from cpuforge.llama.runtime import load_gguf_vocab
from cpuforge.merge.merge import merge
from cpuforge.io.provenance import copy_gguf_with_provenance
from cpuforge.text.task import task_texts
from cpuforge.checks.chat_template import CHECKED, check_chat_template
from cpuforge.checks.tokenizer import check_tokenizer

TASK_FILES = [TASK["train"], TASK["heldout"]]


@pytest.fixture(scope="module")
def sp_chain(llama_bin, tiny_base, tiny_adapter, tmp_path_factory):
    """The tiny sentencepiece model merged and converted: (merged folder, f16 GGUF)."""
    work = tmp_path_factory.mktemp("sp_chain")
    merge(tiny_base, [tiny_adapter], work / "merged", "f32")
    return work / "merged", convert(work / "merged", work / "f16.gguf")


@pytest.fixture(scope="module")
def chat_chain(llama_bin, smol_tokenizer, tmp_path_factory):
    """A tiny model with the demo's tokenizer and chat template, merged and converted."""
    work = tmp_path_factory.mktemp("chat_chain")
    base = make_chat_llama(work / "base", smol_tokenizer, initializer_range=0.2)
    adapter = make_lora(base, work / "adapter")
    merge(base, [adapter], work / "merged", "f32")
    return base, work / "merged", convert(work / "merged", work / "f16.gguf")


def quoted(message: str, before: str) -> str:
    """The Python string literal that follows `before` in a check's sentence."""
    match = re.search(re.escape(before) + r" ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")", message)
    return ast.literal_eval(match[1])


def test_sentencepiece_model_tokenizes_as_transformers(sp_chain, tiny_base, llama_bin):
    merged, gguf = sp_chain
    record = check_tokenizer(gguf, merged, tiny_base, TASK_FILES, llama_bin)
    task = record["corpora"]["task"]
    assert record["passed"] and task["samples"] == 3 * 360 and task["rate"] == 1.0
    assert record["special"]["add_bos"] == {"hf": True, "gguf": True}
    assert record["special"]["vocab_size"] == {"hf": 512, "gguf": 512}
    for name in ("digits", "emoji", "cjk"):
        assert record["corpora"][name]["rate"] == 1.0, record["corpora"][name]
    # measured, listed, not hidden: llama.cpp's sentencepiece tokenizer puts a word boundary before
    # text that starts with whitespace, where transformers 5 (non-legacy) does not
    prose = record["corpora"]["prose"]
    assert 0.3 < prose["rate"] < 1.0 and len(prose["mismatches"]) == 10
    assert all(m["text"][0].isspace() for m in prose["mismatches"])
    assert json.loads(json.dumps(record)) == record  # the record is plain JSON for the report


def test_wrong_tokenizer_files_fail_the_gate(sp_chain, tiny_base, llama_bin, tmp_path):
    """A GGUF converted with another tokenizer's files: the gate names the artifact and the first string."""
    merged, _ = sp_chain
    other = tmp_path / "other"
    make_tokenizer(other, extra_text="\n".join(task_texts(TASK_FILES)))
    wrong = shutil.copytree(merged, tmp_path / "wrong")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(other / name, wrong / name)
    gguf = convert(wrong, tmp_path / "wrong.gguf")
    with pytest.raises(InputError) as failure:
        check_tokenizer(gguf, merged, tiny_base, TASK_FILES, llama_bin)
    message = str(failure.value)
    assert message.startswith(f"{gguf}: tokenizes the task text ")
    assert f"but the merged model's tokenizer ({merged}) gives" in message
    texts = task_texts(TASK_FILES)
    first = next(t for t in texts if hf_ids(merged, t) != hf_ids(other, t))
    assert quoted(message, "tokenizes the task text") in first


def hf_ids(folder, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


def test_model_without_template_gets_a_clear_message(sp_chain, llama_bin):
    merged, gguf = sp_chain
    record = check_chat_template(gguf, merged, llama_bin)
    assert record["passed"] and not record["template"] and record["conversations"] == []
    assert record["message"] == (
        f"{gguf.name} has no chat template (tokenizer.chat_template), nor has {merged}: chat on it is plain completion."
    )


def test_chat_template_feeds_transformers_ids(chat_chain, llama_bin):
    base, merged, gguf = chat_chain
    record = check_chat_template(gguf, merged, llama_bin, TASK["heldout"])
    assert record["passed"] and record["template"] and record["tokenizer"] == str(merged)
    assert [c["name"] for c in record["conversations"]] == list(CHECKED)
    for conversation in record["conversations"]:
        assert conversation["same_ids"] == {"chat": True, "server": True, "llama.cpp": True}, conversation
        assert conversation["hf_head"][:2] == ["<|im_start|>", "system"]
    for runtime in record["runtimes"].values():  # a byte-level BPE vocabulary: llama.cpp's own path agrees too
        assert runtime["same_ids"] == runtime["prompts"] == len(CHECKED) + 40
    tokens = check_tokenizer(gguf, merged, base, TASK_FILES, llama_bin)
    assert tokens["corpora"]["chat_prompts"]["rate"] == 1.0 and tokens["corpora"]["chat_prompts"]["samples"] == 363


def test_bos_doubled_fails_the_tokenizer_gate_and_never_reaches_the_chat(chat_chain, llama_bin, tmp_path):
    """A GGUF that says "add BOS" where transformers adds none, on a model whose ChatML template opens
    with its BOS (<|im_start|>): plain text gains a BOS, and the tokenizer gate fails; the chat and the
    server are fed transformers' ids, with one BOS."""
    from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE

    base, merged, _ = chat_chain
    chatml = shutil.copytree(merged, tmp_path / "chatml")
    (chatml / "chat_template.jinja").write_text(CHATML_CHAT_TEMPLATE)
    good = convert(chatml, tmp_path / "good.gguf")
    doubled = tmp_path / "doubled.gguf"
    copy_gguf_with_provenance(good, doubled, "test", {}, {"tokenizer.ggml.add_bos_token": True})

    record = check_chat_template(doubled, chatml, llama_bin)
    assert record["passed"] and all(c["same_ids"]["chat"] and c["same_ids"]["server"] for c in record["conversations"])
    assert all(c["hf_head"][:2] == ["<|im_start|>", "system"] for c in record["conversations"][:1])
    # llama.cpp's own path sees the template write the BOS and adds none: it agrees here too
    assert record["runtimes"]["llama.cpp"]["same_ids"] == len(CHECKED)
    with pytest.raises(InputError) as failure:
        check_tokenizer(doubled, chatml, base, TASK_FILES, llama_bin)
    message = str(failure.value)
    assert message.startswith(f"{doubled}: tokenizes the task text ")
    assert quoted(message, "tokenizes the task text") in task_texts(TASK_FILES)[0]
    assert "as ['<|im_start|>', 'Extract'" in message and f"({chatml}) gives ['Extract'" in message
    # the same file with transformers' BOS behaviour passes both
    assert check_tokenizer(good, chatml, base, TASK_FILES, llama_bin)["passed"]
    assert check_chat_template(good, chatml, llama_bin)["runtimes"]["llama.cpp"]["same_ids"] == len(CHECKED)


def test_convert_states_transformers_bos_behaviour(chat_chain, llama_bin):
    """The demo tokenizer adds no BOS; the converter's own guess is replaced by what transformers does."""
    _, merged, gguf = chat_chain
    vocab = load_gguf_vocab(gguf, llama_bin)._model
    assert not vocab.add_bos_token() and not vocab.add_eos_token()
    record = json.loads(gguf.with_name(gguf.name + ".provenance.json").read_text())
    assert record["tokenizer"] == {"restated": [], "add_bos_token": False, "add_eos_token": False, "chat_template": True}




# a greedy step whose top two logits are this far apart (in f32) picks the same token through f16 weights and
# llama.cpp's kernels on any machine: their rounding moves these logits by about 1e-3 here
CLEAR_MARGIN = 0.05


def clear_rows(merged, rows, max_new_tokens) -> list[dict]:
    """The rows whose every greedy step, in transformers f32 on `merged`, has a top-1 margin of CLEAR_MARGIN or more:
    the prompts whose answers do not hinge on near-ties."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpuforge.text.generate import stop_ids
    from cpuforge.text.prompt import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    stop, clear = stop_ids(tokenizer), []
    for row in rows:
        ids, margins = list(prompt_ids(tokenizer, row)), []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                top = torch.topk(model(input_ids=torch.tensor([ids])).logits[0, -1], 2)
                margins.append(float(top.values[0] - top.values[1]))
                ids.append(int(top.indices[0]))
                if ids[-1] in stop:
                    break
        if min(margins) >= CLEAR_MARGIN:
            clear.append(row)
    return clear


@pytest.mark.parametrize(
    ("template", "path"),
    [(None, "plain completion (no chat template)"), (PLAIN_CHAT_TEMPLATE, "chat template")],
    ids=["plain completion", "chat template"],
)
def test_generation_parity_on_clear_answers(llama_bin, tmp_path, template, path):
    """Weights large enough for clear favourites (initializer_range 0.2; 512 pieces, where the demo's 49152 leave
    near-ties at almost every step), and only the prompts whose answers have one at every step: the GGUF must then
    answer every one of them as the merged model does, on any machine."""
    from cpuforge.text.task import read_rows

    base = make_tiny_llama(tmp_path / "base", chat_template=template, add_bos=template is None, initializer_range=0.2)
    merge(base, [make_lora(base, tmp_path / "adapter")], tmp_path / "merged", "f32")
    gguf = convert(tmp_path / "merged", tmp_path / "f16.gguf")
    rows = clear_rows(tmp_path / "merged", read_rows(TASK["heldout"]), 16)[:10]
    assert len(rows) >= 5, f"only {len(rows)} held-out prompts have clear greedy answers"
    heldout = tmp_path / "clear.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = check_generation(gguf, tmp_path / "merged", heldout, llama_bin, threads=2, max_new_tokens=16)
    assert record["path"] == path and record["passed"]
    assert record["agree"] == record["prompts"] == len(rows), record["mismatches"]
    assert record["first_difference"] == [None] * len(rows) and 0 <= record["exact_match"]["gguf"] <= 1


def test_gguf_without_the_adapter_fails_generation_parity(chat_chain, llama_bin, tmp_path):
    base, merged, _ = chat_chain
    unmerged = convert(base, tmp_path / "base.gguf")
    sentence = re.escape(f"{unmerged}: greedy answers agree with the merged model's on ") + r".* at answer token \d+: "
    with pytest.raises(InputError, match=sentence):
        check_generation(unmerged, merged, TASK["heldout"], llama_bin, threads=2, max_new_tokens=16, limit=10)


REAL_WORDS = ["quantize", "quantized", "adapter", "merge", "checkpoint", "inference", "calibration", "importance",
              "matrix", "perplexity", "embedding", "vocabulary", "量化", "模型", "词表"]  # fmt: skip


def extend_sentencepiece(base_model, out, words=REAL_WORDS):
    """Chinese-LLaMA style: train a sentencepiece model on text full of new words and append its
    pieces that the base lacks to the base's tokenizer.model, each with score 0 (merge_tokenizers.py)."""
    import random

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp

    random.seed(0)
    corpus = out.parent / "domain.txt"
    corpus.write_text("\n".join(" ".join(random.choices(words, k=12)) for _ in range(400)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out.parent / "domain"), vocab_size=150, model_type="bpe",
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )  # fmt: skip
    proto, domain = sp.ModelProto(), sp.ModelProto()
    proto.ParseFromString(base_model.read_bytes())
    domain.ParseFromString((out.parent / "domain.model").read_bytes())
    have = {p.piece for p in proto.pieces}
    for piece in domain.pieces:
        if piece.type == sp.ModelProto.SentencePiece.NORMAL and piece.piece not in have:
            proto.pieces.append(sp.ModelProto.SentencePiece(piece=piece.piece, score=0.0))
    out.write_bytes(proto.SerializeToString())
    return len(proto.pieces)


def make_sentencepiece_extended_adapter(base, out):
    """An adapter as Chinese-LLaMA ships one: an extended tokenizer.model (no tokenizer.json) and the
    resized embeddings and lm_head saved whole."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out.mkdir()
    rows = extend_sentencepiece(base / "tokenizer.model", out / "tokenizer.model")
    shutil.copy(base / "tokenizer_config.json", out / "tokenizer_config.json")
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(rows, mean_resizing=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"],
                        init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    get_peft_model(model, config).save_pretrained(out)
    return out, rows


def test_extended_sentencepiece_vocabulary(tiny_base, llama_bin, tmp_path):
    """The added words tokenize to their added pieces, with no byte fallback, in transformers and the GGUF."""
    import sentencepiece
    from transformers import AutoTokenizer

    adapter, rows = make_sentencepiece_extended_adapter(tiny_base, tmp_path / "adapter")
    reference = sentencepiece.SentencePieceProcessor(model_file=str(adapter / "tokenizer.model"))
    whole = [w for w in REAL_WORDS if len([p for p in reference.encode(w, out_type=str) if p != "▁"]) == 1]
    assert len(whole) >= 10  # sentencepiece itself reads them as one added piece
    base_pieces = AutoTokenizer.from_pretrained(tiny_base).tokenize("量化 perplexity")
    assert any(re.fullmatch(r"<0x[0-9A-F]{2}>", p) for p in base_pieces)  # the base reads CJK as bytes

    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    gguf = convert(tmp_path / "merged", tmp_path / "f16.gguf")
    record = check_tokenizer(gguf, tmp_path / "merged", tiny_base, TASK_FILES, llama_bin)
    added = record["added_words"]
    assert record["passed"] and record["corpora"]["task"]["rate"] == 1.0
    assert record["special"]["vocab_size"] == {"hf": rows, "gguf": rows} and rows > 512
    assert added["byte_fallback"] == {"hf": 0, "gguf": 0} and added["words"] >= len(whole)
    assert added["failures"] == [] and added["whole"]["gguf"] == added["whole"]["hf"] >= len(whole)
    # every added word that sentencepiece reads as its piece does so in transformers and the GGUF too;
    # the ones that no merge builds are listed
    tokenizer, llm = AutoTokenizer.from_pretrained(tmp_path / "merged"), load_gguf_vocab(gguf, llama_bin)
    for word in whole:
        pieces = [p for p in tokenizer.tokenize(word) if p != "▁"]
        assert len(pieces) == 1 and pieces[0].strip("▁") == word, word
        ids = llm.tokenize(word.encode(), add_bos=False, special=True)
        assert [llm._model.token_get_text(i) for i in ids if llm._model.token_get_text(i) != "▁"] == pieces
    unreached = {w["word"] for w in added["not_whole"]}
    assert unreached and not unreached & set(whole)


def test_transformers_alone_misses_the_added_pieces(tiny_base, tmp_path):
    """Why merge writes tokenizer.json: transformers 5 reads a lone extended tokenizer.model with its
    merges in id order, and splits the added words into the base's pieces."""
    from transformers import AutoTokenizer

    adapter, _ = make_sentencepiece_extended_adapter(tiny_base, tmp_path / "adapter")
    alone = shutil.copytree(adapter, tmp_path / "alone", ignore=shutil.ignore_patterns("adapter_*"))
    shutil.copy(tiny_base / "config.json", alone / "config.json")
    assert len(AutoTokenizer.from_pretrained(alone).tokenize("perplexity")) > 2


def test_added_tokens_of_a_transformers_5_adapter_reach_the_gguf(tiny_base, llama_bin, tmp_path):
    """An adapter saved by transformers 5 brings tokenizer.json alone, its added words only there:
    the GGUF still gets the words (not unused [PAD] tokens) and the base's merge order."""

    words = ["quantization", "perplexity", "calibration", "vocabulary"]
    adapter = make_extended_adapter(tiny_base, tmp_path / "ext", words=words)
    assert not (adapter / "tokenizer.model").exists()
    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    gguf = convert(tmp_path / "merged", tmp_path / "f16.gguf")
    vocab = load_gguf_vocab(gguf, llama_bin)._model
    assert [vocab.token_get_text(512 + i) for i in range(len(words))] == words
    record = check_tokenizer(gguf, tmp_path / "merged", tiny_base, TASK_FILES, llama_bin)
    assert record["passed"] and record["corpora"]["task"]["rate"] == 1.0
    assert record["added_words"]["words"] == len(words) and record["added_words"]["whole"] == {"hf": 4, "gguf": 4}


def test_padded_vocabulary_converts_and_checks_exact(tiny_base, llama_bin, tmp_path):
    """LLaMA-Factory's resize_embedding_layer: 512 tokens + 3 ChatML special ones, embeddings padded to 576 rows.
    The workflow's steps (converter vocabulary check, merge, convert) give a 576-token GGUF whose 515 real tokens are
    the tokenizer's own and whose 61 padding rows are unused [PAD] tokens that no text reaches; the tokenizer and
    chat-template checks then measure exactly what they measure on the same adapter unpadded."""
    import gguf
    from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE
    from transformers import AutoTokenizer

    adapter, _ = make_padded_vocab_adapter(tiny_base, tmp_path / "adapter", chat_template=CHATML_CHAT_TEMPLATE)
    vocab = check_converter_vocab(SOURCE, tiny_base, [adapter], tmp_path / "vocab")
    assert (vocab["model"], vocab["tokens"]) == ("llama", 576)
    merged = tmp_path / "results" / "merged"
    merge(tiny_base, [adapter], merged, "f32")
    model = convert(merged, merged.with_name("ggml-model-f16.gguf"))

    tokenizer = AutoTokenizer.from_pretrained(merged)
    fields = read_metadata(model, ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.chat_template"])
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 576 and fields["tokenizer.chat_template"] == CHATML_CHAT_TEMPLATE
    assert gguf.GGUFReader(model).tensors[0].shape.tolist() == [64, 576]  # token_embd: every row kept
    assert tokens[:515] == tokenizer.convert_ids_to_tokens(list(range(515)))
    assert tokens[512:515] == CHAT_SPECIAL_TOKENS and set(types[512:515]) == {gguf.TokenType.CONTROL}
    assert tokens[515:] == [f"[PAD{i}]" for i in range(515, 576)] and set(types[515:]) == {gguf.TokenType.UNUSED}
    llm = load_gguf_vocab(model, llama_bin)
    for text in ("[PAD515]", "rows [PAD520] to [PAD575]"):  # a [PAD] name in text is text on both sides
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert ids == tokenizer(text)["input_ids"] and max(ids) < 515

    record = check_tokenizer(model, merged, tiny_base, TASK_FILES, llama_bin)
    assert record["passed"] and record["corpora"]["task"] == {"samples": 1080, "agree": 1080, "rate": 1.0,
                                                              "mismatches": []}  # fmt: skip
    assert record["special"]["vocab_size"] == {"hf": 515, "gguf": 576}
    for name in ("digits", "emoji", "cjk"):
        assert record["corpora"][name]["rate"] == 1.0, record["corpora"][name]
    # the added special tokens are read as themselves on both sides; what differs is only the word boundary llama.cpp's
    # sentencepiece tokenizer puts after any special token, the base's </s> alike (the adapter unpadded gives 18, 6 too)
    special = record["corpora"]["special_tokens"]
    assert (special["samples"], special["agree"]) == (18, 6)
    assert all(m["gguf"] == ["▁", *m["hf"]][: len(m["gguf"])] for m in special["mismatches"])
    assert record["added_words"] is None  # special tokens, not words

    chat = check_chat_template(model, merged, llama_bin, TASK["heldout"])
    assert chat["passed"] and chat["template"] and chat["tokenizer"] == str(merged)
    for name in ("chat", "server"):
        assert chat["runtimes"][name]["same_ids"] == chat["runtimes"][name]["prompts"] == len(CHECKED) + 40
    assert [c["name"] for c in chat["conversations"]] == list(CHECKED)
    for conversation in chat["conversations"]:
        assert conversation["same_ids"]["chat"] and conversation["same_ids"]["server"], conversation
        assert conversation["hf_head"][0] == "<|im_start|>"
