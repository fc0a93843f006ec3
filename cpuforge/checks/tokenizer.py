"""Check that a GGUF tokenizes exactly as the merged HF model's tokenizer does.

Both sides tokenize each sample as their runtime does, special tokens parsed and
BOS/EOS added by the tokenizer's own rules: transformers' `tokenizer(text)` on the
merged folder (what training saw), llama-cpp-python's `tokenize(text, add_bos=True,
special=True)` on the GGUF's vocabulary (what its completion path does), loaded
vocab-only through the pinned libllama. The id sequences must be equal.

The adapter's task data is the gate: every sample must agree, or the step fails
with one sentence naming the artifact and the first differing string. The other
corpora (prose, special-token strings, rendered chat prompts, whitespace runs,
digits, emoji, CJK) are measured and their first mismatches listed. For an
extended vocabulary (words the merged vocabulary has and the base's has not),
each added word alone must tokenize alike on both sides with no byte fallback;
how many reach their added piece is counted on each side.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.llama.runtime import load_gguf_vocab
from cpuforge.text.prompt import CONVERSATIONS, first_difference
from cpuforge.text.task import messages, paragraphs, prose, read_rows, task_texts

log = logging.getLogger(__name__)


SHOWN = 10  # mismatches listed per corpus


BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


WHITESPACE = [
    " leading space", "  two leading spaces", "trailing space ", "a  b   c    d", "tab\tseparated\tvalues",
    "\ttab first", "line\nbreak", "x\n\n\ny", "\n\nleading newlines", "windows\r\nline end", " ", "   ", "\n",
    " 42", "  42", "   7 items", "costs  $40.3 million", "rows:\n   1\n   2\n  10", "(2,)\n   2", "a\u00a0non-breaking space",
]  # fmt: skip


DIGITS = [
    "0", "7", "42", "1234567890", "12345678901234567890", "3.14159", "2,718,281", "$40.3 million", "-17.5%",
    "2024-11-25", "09:30:00", "0x1F", "1e-9", "v1.2.3", "Q3 2024 revenue rose 12% to $1,234.56", "ⅷ and ½",
]  # fmt: skip


EMOJI = [
    "🙂", "Hi 😀!", "🚀👍🏽", "👨‍👩‍👧‍👦 family", "flags 🇩🇪🇯🇵", "ok ✅ done", "♥️ and ❤", "🤖 says: beep",
]  # fmt: skip


CJK = [
    "日本語のテキスト", "中文测试文本，包含标点。", "한국어 문장입니다", "漢字かなカナ混じり文", "机器学习模型量化",
    "東京は日本の首都です。", "mixed 中文 and English",
]  # fmt: skip


def special_strings(tokenizer) -> list[str]:
    """Text holding each special or added token of the tokenizer, alone and inside a sentence."""
    tokens = sorted(set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()})
    return [s for t in tokens for s in (t, f"Hello {t} world", f"{t}\n{t}")]


def chat_prompts(tokenizer, task_rows: list[dict]) -> list[str]:
    """The chat template's rendered prompts: the fixed conversations and the task's own prompts."""
    if tokenizer.chat_template is None:
        return []
    conversations = list(CONVERSATIONS.values()) + [messages(r) for r in task_rows if "text" not in r]
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]


def hf_ids(tokenizer, text: str, add_special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def gguf_ids(llm, text: str, add_special: bool = True) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True) if text else gguf_empty(llm, add_special)


def gguf_empty(llm, add_special: bool) -> list[int]:
    # llama-cpp-python refuses empty bytes; llama_tokenize of "" is just the added specials
    vocab = llm._model
    ids = [vocab.token_bos()] if add_special and vocab.add_bos_token() else []
    return ids + ([vocab.token_eos()] if add_special and vocab.add_eos_token() else [])


def hf_pieces(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def gguf_pieces(llm, ids: list[int]) -> list[str]:
    return [llm._model.token_get_text(i) for i in ids]


def differing_string(tokenizer, text: str, ids: list[int], at: int) -> str:
    """The text from where the two tokenizations part, found through transformers' offsets."""
    try:
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        start = offsets[at][0] if at < len(offsets) else len(text)
    except (NotImplementedError, ValueError, KeyError, IndexError):
        start = 0
    start = max(0, min(start, len(text)) - 10)
    return text[start : start + 60]


def compare(tokenizer, llm, texts: list[str], add_special: bool = True) -> dict:
    """Agreement of the two tokenizations over `texts`, with the first mismatches."""
    agree, mismatches = 0, []
    for text in texts:
        want, got = hf_ids(tokenizer, text, add_special), gguf_ids(llm, text, add_special)
        if want == got:
            agree += 1
            continue
        if len(mismatches) < SHOWN:
            at = first_difference(want, got)
            mismatches.append({
                "text": text[:300], "at": differing_string(tokenizer, text, want, at), "token_index": at,
                "hf": hf_pieces(tokenizer, want[at : at + 8]), "gguf": gguf_pieces(llm, got[at : at + 8]),
            })  # fmt: skip
    return {"samples": len(texts), "agree": agree, "rate": agree / len(texts) if texts else None, "mismatches": mismatches}


def is_word(text: str) -> bool:
    return len(text) > 0 and text.isalpha()


def added_words(tokenizer, base_tokenizer, limit: int = 2000) -> dict[str, int]:
    """Words the merged vocabulary adds to the base's: added pieces that stand for a whole word (a
    sentencepiece or GPT-2 piece that starts a word, an added token, a CJK piece), by their text."""
    base = set(base_tokenizer.get_vocab())
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if not t.special}
    words = {}
    for piece, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if piece in base or i in tokenizer.all_special_ids:
            continue
        word = tokenizer.convert_tokens_to_string([piece]).strip()
        starts_word = piece in added or piece.startswith(("▁", "Ġ")) or not word.isascii()
        if is_word(word) and starts_word and word not in words:
            words[word] = i
        if len(words) >= limit:
            break
    return words


def check_added_words(tokenizer, llm, words: dict[str, int]) -> dict:
    """Each added word alone must tokenize the same in transformers and the GGUF, with no byte fallback
    on either side; how many reach their added piece (beside at most bare word-boundary pieces) is
    counted, and the words that do not are listed: a piece that the merges never build is the
    tokenizer's own matter, not the conversion's."""
    failures, not_whole = [], []
    whole, byte_fallback = {"hf": 0, "gguf": 0}, {"hf": 0, "gguf": 0}
    for word, i in words.items():
        sides = {"hf": hf_ids(tokenizer, word, False), "gguf": gguf_ids(llm, word, False)}
        pieces = {"hf": hf_pieces(tokenizer, sides["hf"]), "gguf": gguf_pieces(llm, sides["gguf"])}
        bytes_used = {side: any(BYTE_PIECE.fullmatch(p) for p in pieces[side]) for side in sides}
        for side, ids in sides.items():
            rest = [p for j, p in zip(ids, pieces[side]) if j != i]
            byte_fallback[side] += bytes_used[side]
            if i in ids and all(p.strip("▁Ġ ") == "" for p in rest) and not bytes_used[side]:
                whole[side] += 1
            elif side == "hf" and len(not_whole) < SHOWN:
                not_whole.append({"word": word, "piece_id": i, "hf": pieces["hf"]})
        if (sides["hf"] != sides["gguf"] or any(bytes_used.values())) and len(failures) < SHOWN:
            failures.append({"word": word, "piece_id": i, **pieces})
    n = len(words)
    return {
        "words": n, "whole": whole, "rate": {side: count / n for side, count in whole.items()} if n else None,
        "byte_fallback": byte_fallback, "failures": failures, "not_whole": not_whole, "passed": not failures,
    }  # fmt: skip


def special_facts(tokenizer, llm) -> dict:
    """BOS/EOS ids and whether each side adds them, side by side."""
    vocab = llm._model
    probe_hf = hf_ids(tokenizer, "probe"), hf_ids(tokenizer, "probe", False)
    return {
        "bos_id": {"hf": tokenizer.bos_token_id, "gguf": none_if_null(vocab.token_bos())},
        "eos_id": {"hf": tokenizer.eos_token_id, "gguf": none_if_null(vocab.token_eos())},
        "add_bos": {"hf": len(probe_hf[0]) > len(probe_hf[1]) and probe_hf[0][0] == tokenizer.bos_token_id,
                    "gguf": bool(vocab.add_bos_token())},
        "add_eos": {"hf": len(probe_hf[0]) > len(probe_hf[1]) and probe_hf[0][-1] == tokenizer.eos_token_id,
                    "gguf": bool(vocab.add_eos_token())},
        "vocab_size": {"hf": len(tokenizer), "gguf": vocab.n_vocab()},
    }  # fmt: skip


def none_if_null(token: int) -> int | None:
    return None if token == -1 else token


def check_tokenizer(gguf: Path, merged: Path, base: Path | None, task_data: list[Path], bin_dir: Path) -> dict:
    """The parity record of one GGUF artifact; raises InputError when the gate fails."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    llm = load_gguf_vocab(gguf, bin_dir)
    rows = [r for path in task_data for r in read_rows(path)]
    corpora = {
        "task": task_texts(task_data),
        "prose": paragraphs(prose()),
        "special_tokens": special_strings(tokenizer),
        "whitespace": WHITESPACE,
        "digits": DIGITS,
        "emoji": EMOJI,
        "cjk": CJK,
    }
    results = {name: compare(tokenizer, llm, texts) for name, texts in corpora.items()}
    # rendered prompts are tokenized as apply_chat_template does: the template holds the specials
    results["chat_prompts"] = compare(tokenizer, llm, chat_prompts(tokenizer, rows), add_special=False)
    for name, result in results.items():
        log.info("%s: %s/%s samples agree", name, result["agree"], result["samples"])
    words = added_words(tokenizer, AutoTokenizer.from_pretrained(base)) if base else {}
    added = check_added_words(tokenizer, llm, words) if words else None
    task = results["task"]
    record = {
        "artifact": gguf.name,
        "reference": str(merged),
        "gate": {"corpus": "task", "required_rate": 1.0, "samples": task["samples"]},
        "passed": task["agree"] == task["samples"] and (added is None or added["passed"]),
        "special": special_facts(tokenizer, llm),
        "corpora": results,
        "added_words": added,
    }
    if not task_data:
        log.warning("no task data configured: the gate has nothing to check")
    if task["mismatches"]:
        first = task["mismatches"][0]
        raise InputError(
            f"{gguf}: tokenizes the task text {first['at']!r} as {first['gguf']} but the merged model's tokenizer "
            f"({merged}) gives {first['hf']} ({task['samples'] - task['agree']} of {task['samples']} task samples differ)."
        )
    if added is not None and not added["passed"]:
        first = added["failures"][0]
        raise InputError(
            f"{gguf}: the added word {first['word']!r} tokenizes to {first['gguf']} in the GGUF and to {first['hf']} "
            f"in the merged model's tokenizer ({merged}); they must agree, without byte fallback."
        )
    return record
