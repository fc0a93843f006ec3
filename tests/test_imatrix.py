"""The importance matrix from the fine-tune's own data, the quants that need it or name it, and the
comparison with the same types made without it; on a tiny model whose rows are multiples of 256."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO
from helpers.models import PLAIN_CHAT_TEMPLATE, make_lora, make_tiny_llama
from helpers.workflow import TASK, snakemake, write_config

from cpuforge.checks.chat_template import CHECKED

K_QUANT_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=2)


@pytest.fixture(scope="module")
def k_run(llama_bin, tmp_path_factory):
    """`snakemake all` on a tiny model with a K-quant that names the matrix and an I-quant that needs it.

    The model is random, so no quant of it can pass a quality gate: the gate is opened wide (its own
    tests are in test_eval.py) and the report is made all the same.
    """
    workdir = tmp_path_factory.mktemp("k_run")
    # with a chat template, so that the tokenizer check also compares its rendered prompts
    base = make_tiny_llama(workdir / "inputs" / "base", chat_template=PLAIN_CHAT_TEMPLATE, **K_QUANT_SIZES)
    adapter = make_lora(base, workdir / "inputs" / "adapter")
    models = [{"name": "k", "base": str(base), "adapters": [str(adapter)], "task_data": TASK}]
    config = write_config(
        workdir / "k.yaml", models, quant_types=["q4_k_m", "iq2_xxs"],
        imatrix={"use_for": ["q4_k_m"], "ctx_size": 128, "chunks": 24, "prose_chars": 20000},
        checks={"generation": {"prompts": 8, "max_new_tokens": 12}, "imatrix": {"ctx_size": 128, "chunks": 4, "prompts": 4}},
        eval={"ctx": 128, "chunks": 4, "max_new_tokens": 12,
              "bench": {"threads": [1], "prompt_tokens": 32, "gen_tokens": 8, "repetitions": 1},
              "gate": {"max_ppl_increase_pct": 1e9, "max_kl_divergence": 1e9, "max_disagreement": 1,
                       "max_accuracy_drop": 1}},
    )  # fmt: skip
    snakemake(workdir, "all", "--configfile", str(config))
    return workdir


def fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return reader, {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.ggml.")}


def test_imatrix_is_made_from_the_task_data_and_prose(k_run):
    results = k_run / "results" / "k"
    reader, meta = fields(results / "imatrix.gguf")
    assert meta["general.type"] == "imatrix" and meta["imatrix.chunk_count"] == 24 and meta["imatrix.chunk_size"] == 128
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.in_sum2", "blk.1.ffn_down.weight.counts"} <= names
    record = json.loads((results / "imatrix.gguf.provenance.json").read_text())
    assert record["chunks"] == 24 and record["prose_chars"] == 20000
    assert list(record["inputs"]["task_data1"]) == ["train.jsonl"]  # the training split, never the held-out one
    log = (k_run / "logs" / "k" / "make_imatrix.log").read_text()
    assert "computing over 24 chunks" in log and "calibration text:" in log


def test_types_that_need_it_or_name_it_are_made_with_it(k_run):
    results = k_run / "results" / "k"
    iq2, iq2_meta = fields(results / "ggml-model-iq2_xxs.gguf")
    k4, k4_meta = fields(results / "ggml-model-q4_k_m.gguf")
    assert "IQ2_XXS" in {t.tensor_type.name for t in iq2.tensors}
    assert {t.tensor_type.name for t in k4.tensors} >= {"Q4_K", "Q6_K"}
    for meta in (iq2_meta, k4_meta):
        assert meta["quantize.imatrix.file"].endswith("imatrix.gguf") and meta["quantize.imatrix.chunks_count"] == 24
    assert json.loads(iq2_meta["cpuforge.quantize"])["inputs"]["imatrix"]["imatrix.gguf"]


def test_each_quant_is_compared_with_the_same_type_made_without_it(k_run):
    checks = k_run / "results" / "k" / "checks"
    for qtype, without in (("iq2_xxs", "a uniform importance matrix"), ("q4_k_m", "no importance matrix")):
        record = json.loads((checks / f"imatrix-{qtype}.json").read_text())
        assert record["type"] == qtype and record["without"]["made_with"] == without
        assert record["f16"]["perplexity"] > 1 and record["eval"]["chunks"] == 4
        for side in ("with", "without"):
            figures = record[side]
            assert figures["perplexity"] > 1 and figures["kl_divergence"] > 0 and 0 <= figures["top1_agreement"] <= 1
            assert 0 <= figures["task_exact_match"] <= 1
        assert record["with"]["kl_divergence"] != record["without"]["kl_divergence"]
    assert not list(checks.glob("*.partial*"))  # the scratch quants are gone


def test_checks_of_every_artifact(k_run):
    """Each check's figures, against counts made here from the task files: a record is written only when its
    check passes, so "passed" alone would prove only that the file exists."""
    checks = k_run / "results" / "k" / "checks"
    rows = {split: [json.loads(line) for line in open(path)] for split, path in TASK.items()}
    # the demo's rows: a system prompt, a piece of news and an answer, each a sample of the tokenizer check
    task_samples = sum(len(split) for split in rows.values()) * 3
    for stage in ("f16", "q4_k_m", "iq2_xxs"):
        tokenizer = json.loads((checks / f"tokenizer-{stage}.json").read_text())
        task = tokenizer["corpora"]["task"]
        assert task["samples"] == task_samples == tokenizer["gate"]["samples"] and task["agree"] == task_samples
        prompts = tokenizer["corpora"]["chat_prompts"]
        assert not task["mismatches"] and prompts["samples"] > 0 and prompts["agree"] == prompts["samples"]
        template = json.loads((checks / f"chat-template-{stage}.json").read_text())
        # the chat and the server, gated, fed transformers' ids on every prompt: the fixed ones and each held-out row
        gated = {name: r for name, r in template["runtimes"].items() if r["gated"]}
        assert sorted(gated) == ["chat", "server"]
        assert {(r["same_ids"], r["prompts"]) for r in gated.values()} == {(len(CHECKED) + len(rows["heldout"]),) * 2}
    generation = json.loads((checks / "generation.json").read_text())
    assert generation["prompts"] == 8 and generation["agree"] == generation["first_difference"].count(None)
    assert generation["rate"] == generation["agree"] / 8 >= generation["min_rate"] == 0.9  # config's default


def test_report_shows_each_quant_with_and_without_the_matrix(k_run):
    report = k_run / "results" / "k" / "report"
    imatrix = json.loads((report / "metrics.json").read_text())["checks"]["imatrix"]
    assert sorted(imatrix) == ["iq2_xxs", "q4_k_m"]
    assert all(record[side]["kl_divergence"] > 0 for record in imatrix.values() for side in ("with", "without"))
    assert "<h3>Importance matrix</h3>" in (report / "report.html").read_text()


def test_uniform_imatrix_weighs_every_column_alike(k_run, tmp_path):
    from gguf import GGUFReader

    from cpuforge.evaluate.imatrix import uniform_imatrix

    real = k_run / "results" / "k" / "imatrix.gguf"
    uniform_imatrix(real, tmp_path / "uniform.gguf")
    tensors = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "uniform.gguf").tensors}
    assert set(tensors) == {t.name for t in GGUFReader(real).tensors}
    sums, counts = tensors["blk.0.attn_q.weight.in_sum2"], tensors["blk.0.attn_q.weight.counts"]
    assert np.all(sums / counts.reshape(-1, 1) == 1.0)


def test_quantize_refuses_a_type_that_needs_it_without_one(tmp_path, k_run):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.quantize", "--llama-bin", "unused", "--gguf",
         str(k_run / "results" / "k" / "ggml-model-f16.gguf"), "--out", str(tmp_path / "q.gguf"), "--type", "IQ2_XXS"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "iq2_xxs needs an importance matrix (--imatrix): llama-quantize cannot make it without one." in result.stderr
    assert not (tmp_path / "q.gguf").exists()
