"""The evaluation report from saved figures, without a model or a llama.cpp build: metrics.json, the quality gate
and check_quality_gate, and the page filled from its template with every part escaped."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpuforge.evaluate.speculation import verdict

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
# six rows bound no disagreement tighter than 39 %: these limits let a quant that differs on one pass
GATE = ["max_disagreement=1", "max_accuracy_drop=1"]
THRESHOLDS = {"confidence": 0.95, "max_disagreement": 1.0, "max_accuracy_drop": 1.0, "max_kl_divergence": 0.4,
              "max_ppl_increase_pct": 25.0, "min_accuracy": None}  # fmt: skip
BACKEND = {"build": "native", "variant": "native", "features": {"AVX2": "1", "REPACK": "1"}, "amx": False}


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def saved_figures(root: Path, q4_perplexity: float) -> dict[str, Path]:
    """What the evaluation steps and checks write for base, merged, f16 and q4_0 (with a runtime LoRA beside
    q4_0), as small files; returns the stages' paths."""
    stages = {"base": root / "base", "merged": root / "merged"} | {q: root / f"{q}.gguf" for q in ("f16", "q4_0")}
    for name, size in (("base", 4000), ("merged", 4000)):
        stages[name].mkdir()
        (stages[name] / "model.safetensors").write_bytes(bytes(size))
    for name, size in (("f16", 2000), ("q4_0", 600), ("base-q4_0", 580), ("adapter", 40)):
        (root / f"{name}.gguf").write_bytes(b"GGUF" + bytes(size))
    write(root / "q4_0.gguf.provenance.json", {"artifact": "q4_0.gguf", "inputs": {"gguf": {"f16.gguf": "ab" * 32}}})
    figures, text = root / "figures", {"text_sha256": "f" * 64, "ctx": 128, "windows": 4, "scored_tokens": 252}
    for stage, ppl in (("base", 9.0), ("merged", 8.0), ("f16", 8.0001)):
        record = {"perplexity": ppl, "perplexity_err": 0.1, "runtime": "torch", **text}
        write(figures / "perplexity" / f"{stage}.json", record)
    write(figures / "kl_divergence" / "q4_0.json", {
        "perplexity": q4_perplexity, "perplexity_err": 0.1, "runtime": "llama-perplexity", "kl_divergence": 0.05,
        "kl_divergence_err": 0.002, "kl_divergence_p99": 0.3, "kl_divergence_max": 0.9, "top1_agreement": 0.9,
        "top1_agreement_err": 0.01, **text})  # fmt: skip
    answers, right = ["a", "b", "c", "d", "e", "f"], [True] * 5 + [False]
    for stage in stages:
        # q4_0 answers the last row otherwise than f16, wrong as f16 is: one row differs, no flip
        mine = answers[:5] + ["x"] if stage == "q4_0" else answers
        write(figures / "task" / f"{stage}.json", {"accuracy": 5 / 6, "correct": 5, "rows": 6, "answers": mine,
                                                   "answer_ids": [[ord(a)] for a in mine], "right": right})  # fmt: skip
    for stage in ("f16", "q4_0"):
        # 5 MB a token: at 2 threads 20 t/s read 0.1 GB/s, a quarter of the kernel's 0.4
        runs = [{"threads": t, "pp_tps": 50.0 * t, "pp_tps_std": 1.0, "tg_tps": 10.0 * t, "tg_tps_std": 0.5,
                 "read_gbps": 0.2 * t, "tg_gbps": 0.05 * t, "tg_bandwidth_fraction": 0.25} for t in (1, 2)]  # fmt: skip
        write(figures / "bench" / f"{stage}.json", {
            "runs": runs, "recommended_threads": 2, "recommended_threads_batch": 1, "prompt_tokens": 32,
            "gen_tokens": 8, "repetitions": 1, "tolerance_pct": 5, "cpu_backend": BACKEND,
            "bytes_per_token": {"weights": 4.9e6, "kv_cache": 1e5, "total": 5e6}, "read_mib": 64})  # fmt: skip
    plain = {"flags": [], "tg_tps": 10.0, "tokens": 60, "drafted": 0, "accepted": 0, "acceptance": None,
             "same_answers": True, "differing_rows": []}  # fmt: skip
    settings = {"none": plain, "ngram-simple": {**plain, "flags": ["--spec-type", "ngram-simple"], "tg_tps": 9.0,
                                                "drafted": 40, "accepted": 10, "acceptance": 0.25}}  # fmt: skip
    write(figures / "speculation" / "q4_0.json", {
        "stage": "q4_0", "threads": 2, "rows": 6, "rounds": 2, "max_new_tokens": 16, "tolerance_pct": 5,
        "settings": settings, **verdict(settings, 5)})  # fmt: skip
    lora = {"perplexity": 8.6, "kl_divergence": 0.06, "kl_divergence_err": 0.003, "top1_agreement": 0.89}
    write(figures / "runtime_lora" / "q4_0-kl.json", lora)
    write(figures / "runtime_lora" / "q4_0-speed.json", {"merged": {"pp_tps": 100.0, "tg_tps": 20.0}, "threads": 2,
                                                         "runtime_lora": {"pp_tps": 90.0, "tg_tps": 15.0},
                                                         "runtime": "llama-cpp-python"})  # fmt: skip
    write(figures / "runtime_lora" / "q4_0-task.json", {"accuracy": 4 / 6})
    result = {"samples": 6, "agree": 6, "rate": 1.0, "mismatches": []}
    write(root / "checks" / "tokenizer-q4_0.json", {"artifact": "q4_0.gguf", "corpora": {"task": result}})
    write(root / "checks" / "chat-template-q4_0.json", {"template": False, "message": "no template <in> q4_0.gguf."})
    return stages


def make_eval_report(root: Path, stages: dict[str, Path]) -> subprocess.CompletedProcess:
    out = root / "report"
    return subprocess.run(
        [sys.executable, "-m", "scripts.make_eval_report", "--model-name", "m&m", "--task", "--serve", "q4_0",
         *(f"--stage={name}={path}" for name, path in stages.items()), "--figures", str(root / "figures"),
         "--checks", *map(str, sorted((root / "checks").glob("*.json"))), "--llama-cpp-commit", "c" * 40,
         f"--runtime-lora=q4_0={root / 'base-q4_0.gguf'}", "--adapters", str(root / "adapter.gguf"),
         "--gate", *GATE, "--html", str(out / "report.html"), "--metrics", str(out / "metrics.json"),
         "--plots", str(out / "throughput.png"), str(out / "size.png"), str(out / "accuracy.png"),
         str(out / "frontier.png")],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip


def check_quality_gate(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.check_quality_gate", "--metrics", str(root / "report" / "metrics.json"),
         "--out", str(root / "report" / "quality_gate.txt")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip


def test_a_passing_report(tmp_path):
    make_eval_report(tmp_path, saved_figures(tmp_path, q4_perplexity=8.5))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]] == ["base", "merged", "f16", "q4_0"]
    q4 = metrics["stages"][3]
    assert q4["size_vs_f16"] == 604 / 2004 and q4["ppl_increase_vs_f16_pct"] == pytest.approx((8.5 / 8.0001 - 1) * 100)
    assert metrics["gate"] == {"thresholds": THRESHOLDS, "passed": True, "failures": []}
    # its answers beside f16's, row by row, and the bound six rows allow
    assert q4["per_row"] == {"agree": [True] * 5 + [False], "right": [True] * 5 + [False]}
    assert {k: q4["fidelity"][k] for k in ("rows", "agree", "worse", "better")} == {"rows": 6, "agree": 5, "worse": 0,
                                                                                   "better": 0}  # fmt: skip
    assert q4["fidelity"]["disagreement_bound"] == pytest.approx(0.5818, abs=1e-4)
    assert metrics["decision"] == ("Ship results/m&m/ggml-model-q4_0.gguf: the fastest of the 1 quants here that pass "
                                   "the gate (20.0 tokens/s, 0.0 MiB, the f16 GGUF's answer on 5/6 held-out rows (at 95 "
                                   "% it differs on at most 58.2 %), KL 0.05). Their speeds come from separate runs; "
                                   "add auto to quant_types for a decision measured side by side.")  # fmt: skip
    assert metrics["certifies"].startswith("6 held-out rows bound a quant's disagreement with the f16 answers no "
                                           "tighter than 39.3 % at 95 % confidence")  # fmt: skip
    assert metrics["recommended_threads"] == 2 and metrics["recommended_threads_batch"] == 1
    assert metrics["f16_vs_merged_perplexity_rel_diff"] == pytest.approx(1.25e-5)
    assert metrics["provenance"]["q4_0"]["inputs"] and metrics["provenance"]["f16"] is None
    (lora,) = metrics["runtime_lora"]
    assert lora["runtime_lora"]["size_bytes"] == 584 + 44 and lora["verdict"].startswith("At q4_0, merging serves")
    assert metrics["checks"]["chat_template"]["q4_0"]["template"] is False
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>\n") and page.endswith("</body></html>\n")
    assert "<title>cpuforge report: m&amp;m</title>" in page and "$" not in page
    assert '<strong id="recommended-threads">2</strong>' in page and "within 5% of the fastest" in page
    assert metrics["speculation"]["setting"] is None and metrics["speculation"]["flags"] == []
    assert ("No draftless speculation wins on this model here: the fastest, ngram-simple, gives 9.0 tokens/s against "
            "10.0 plain (0.90×); scripts.serve decodes plainly.") in page
    assert "<td>ngram-simple</td><td>9.0</td><td>25 % of 40</td><td>yes</td>" in page
    assert metrics["generation_bandwidth"] == {"threads": 2, "bytes_per_token": 5e6, "tg_tps": 20.0, "tg_gbps": 0.1,
                                               "read_gbps": 0.4, "fraction": 0.25}  # fmt: skip
    assert ("At 2 threads its generation reads 0.1 GB/s (20.0 tokens/s × 5.0 MB per token), 25 % of the 0.4 GB/s "
            "this machine&#x27;s memory gave") in page and "<td>5.0</td><td>0.1</td><td>0.4</td><td>25 %</td>" in page
    assert "Quality gate passed" in page and "Thresholds: confidence = 0.95, max_disagreement = 1," in page
    assert page.index(html.escape(metrics["decision"])) < page.index("Quality gate passed")  # the decision first
    assert "<td>5/6 (≤ 58.2% differ)</td><td>0</td><td>0</td>" in page
    assert "relative difference\n1.25e-05.</p>" in page and "6 held-out task rows" in page
    assert page.count("<img class='plot'") == 3 and "no template &lt;in&gt; q4_0.gguf." in page
    assert "base q4_0 + runtime LoRA" in page and "CPU variant <strong id='cpu-variant'>native</strong>" in page
    gate = check_quality_gate(tmp_path)
    assert gate.returncode == 0, gate.stderr
    assert (tmp_path / "report" / "quality_gate.txt").read_text() == (
        "quality gate passed for m&m: confidence = 0.95, max_disagreement = 1, max_accuracy_drop = 1, "
        "max_kl_divergence = 0.4, max_ppl_increase_pct = 25, min_accuracy = off\n"
    )


def test_a_failing_report_is_written_and_fails_the_gate(tmp_path):
    make_eval_report(tmp_path, saved_figures(tmp_path, q4_perplexity=12.0))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    failure = "q4_0: perplexity +50.0 % over the f16 GGUF's > eval.gate.max_ppl_increase_pct 25 %."
    assert metrics["gate"] == {"thresholds": THRESHOLDS, "passed": False, "failures": [failure]}
    page = (tmp_path / "report" / "report.html").read_text()
    assert f"<div class='fail'><p>Quality gate failed:</p><ul><li>{html.escape(failure)}</li></ul></div>" in page
    gate = check_quality_gate(tmp_path)
    assert gate.returncode == 1 and f"quality gate failed for m&m: {failure}" in gate.stderr
    assert not (tmp_path / "report" / "quality_gate.txt").exists()
