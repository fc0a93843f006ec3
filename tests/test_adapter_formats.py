"""Adapters as the training tools write them: a vocabulary padded past its tokenizer (LLaMA-Factory).
Real peft on the tiny Llama."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.models import CHAT_SPECIAL_TOKENS, make_padded_vocab_adapter
from safetensors.numpy import load_file

from cpuforge.errors import InputError
from cpuforge.merge.merge import merge
from cpuforge.merge.plan import check_inputs

# f32 merges against peft's in f32: equal up to the order of the operations
TOLERANCE = 1e-5


def merged(folder) -> dict[str, np.ndarray]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_padded_vocabulary_merges_as_peft_does(tmp_path, tiny_base):
    """512 tokens + 3 special ones, embeddings padded to 576 rows (pad_to_multiple_of=64): accepted, merged to peft's
    merge_and_unload, and the merged folder keeps the 576 rows and the 515-token tokenizer."""
    from transformers import AutoTokenizer

    adapter, reference = make_padded_vocab_adapter(tiny_base, tmp_path / "adapter")
    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    got = merged(tmp_path / "merged")
    assert set(got) == set(reference) and got["model.embed_tokens.weight"].shape == (576, 64)
    assert max(np.abs(got[k] - reference[k].numpy()).max() for k in reference) < TOLERANCE
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 576
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert len(tokenizer) == 515 and tokenizer.convert_tokens_to_ids(CHAT_SPECIAL_TOKENS) == [512, 513, 514]


def test_padded_vocabulary_without_its_tokenizer_is_refused(tmp_path, tiny_base):
    """The base's 512-token tokenizer with the 576 rows: 576 is not 512 padded, so the adapter's tokenizer is
    missing."""
    adapter, _ = make_padded_vocab_adapter(tiny_base, tmp_path / "adapter")
    for f in adapter.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template")):
            f.unlink()
    with pytest.raises(InputError) as e:
        check_inputs(tiny_base, [adapter])
    assert str(e.value) == (
        f"{tiny_base / 'tokenizer.json'}: tokenizer has 512 tokens but the merged embeddings have 576 rows, which is "
        "neither 512 nor 512 padded to a multiple of a power of two (pad_to_multiple_of); is the adapter's own "
        "tokenizer missing?"
    )

