"""The evaluation report on a tiny model, through Snakemake: figures, quality gate, the HTML in a real browser."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess

import pytest
from helpers.llama import BIN
from helpers.models import PLAIN_CHAT_TEMPLATE, make_lora, make_tiny_llama, prose, train_tiny_llama
from helpers.workflow import planned_jobs, snakemake, write_config

from cpuforge.evaluate.bandwidth import bytes_per_token
from cpuforge.evaluate.bench import recommended_threads
from cpuforge.serve.speculation import SETTINGS as SPECULATION_SETTINGS
from cpuforge.evaluate.speculation import verdict
from cpuforge.llama.runtime import cpu_backend
from cpuforge.evaluate.perplexity import parse_kl_output, perplexity_from_nll
from cpuforge.evaluate.gate import Gate, quality_gate
from cpuforge.text.task import as_text, load_split

# f16 GGUF (llama-perplexity) vs merged HF (torch f32) perplexity on the same tokens: measured 3e-5 to 6e-5
# relative on tiny models (f16 rounding of the weights, llama.cpp's kernels); about twenty times that is allowed
F16_VS_HF_TOLERANCE = 1e-3
# loose enough for a tiny model with a random LoRA: the passing run must pass, whatever the tiny model answers
# (six held-out rows bound no disagreement tighter than 39 %)
PASSING_GATE = {"max_ppl_increase_pct": 50, "max_kl_divergence": 1.0, "max_disagreement": 1.0, "max_accuracy_drop": 1.0}
EVAL = {
    "ctx": 128,
    "chunks": 4,
    "max_new_tokens": 24,
    "bench": {"threads": [1, 2], "prompt_tokens": 32, "gen_tokens": 8, "repetitions": 1, "tolerance_pct": 5,
              "read_mib": 64},
    "gate": PASSING_GATE,
}
STAGES = ["base", "merged", "f16", "q4_0", "auto"]
# the quant search as one of the quant types: a short ladder (iq2_xxs with the importance matrix), few rows sampled,
# at most two searched mixes
AUTO_QUANT = {"quant_types": ["q4_0", "auto"],
              "auto_quant": {"types": ["q8_0", "q4_0", "iq4_nl", "iq2_xxs"], "budget": 2, "sample_weights": 1024}}


def small_task(folder, heldout: int = 6):
    """A user's task folder in the demo's format: a few of the demo task's rows."""
    folder.mkdir(parents=True)
    for split, n in (("train", 8), ("heldout", heldout)):
        rows = load_split(split)[:n]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tiny_config(workdir, name: str, task=True, inputs=None, auto=True, chunks=EVAL["chunks"], **gate):
    """A config in `workdir` for the tiny model in `inputs` (default: workdir/inputs); with `auto`, the quant
    search is one of its quant types; `chunks`, the held-out text's windows."""
    inputs = inputs or workdir / "inputs"
    model = {"name": "tiny", "base": str(inputs / "base"), "adapters": [str(inputs / "adapter")]}
    if task:
        model["task_data"] = {split: str(inputs / "task" / f"{split}.jsonl") for split in ("train", "heldout")}
    extra = AUTO_QUANT if auto else {}
    return write_config(workdir / name, [model], eval={**EVAL, "chunks": chunks, "gate": {**PASSING_GATE, **gate}},
                        **extra)  # fmt: skip


@pytest.fixture(scope="module")
def eval_run(llama_bin, tmp_path_factory):
    """eval_report on a tiny model with a chat template, trained a little so its figures mean something; q4_0
    and the quant search's choice."""
    workdir = tmp_path_factory.mktemp("eval_run")
    base = make_tiny_llama(workdir / "inputs" / "base", chat_template=PLAIN_CHAT_TEMPLATE, add_bos=False)
    train_tiny_llama(base, prose() + "\n" + as_text(load_split("train")))
    # a gentle adapter (scale alpha/r = 0.5): it changes the answers without wrecking the trained model
    make_lora(base, workdir / "inputs" / "adapter", lora_alpha=2)
    small_task(workdir / "inputs" / "task")
    config = tiny_config(workdir, "eval.yaml")
    snakemake(workdir, "eval_report", "--configfile", str(config))
    return workdir, config


@pytest.fixture
def own_eval_run(eval_run, tmp_path):
    """A copy of eval_run's working directory (mtimes and Snakemake's records kept) on the same inputs, for a test
    that reruns steps with another config: the shared run stays as every other test expects it."""
    workdir, config = eval_run
    copy = shutil.copytree(workdir, tmp_path / "eval_run", symlinks=True, ignore=shutil.ignore_patterns("inputs"))
    # the inputs where the shared run has them: the same paths, so Snakemake sees the same inputs
    assert planned_jobs(copy, "eval_report", "--configfile", str(config)) == {}
    return copy, config


def report_dir(workdir):
    return workdir / "results" / "tiny" / "report"


def metrics_of(workdir) -> dict:
    return json.loads((report_dir(workdir) / "metrics.json").read_text())


def stages_of(workdir) -> dict[str, dict]:
    return {s["stage"]: s for s in metrics_of(workdir)["stages"]}


def test_every_metric_is_present_and_sane(eval_run):
    workdir, _ = eval_run
    metrics = metrics_of(workdir)
    stages = stages_of(workdir)
    assert list(stages) == STAGES
    for s in stages.values():
        assert s["size_bytes"] > 0
        # better than chance (the vocabulary has 512 tokens) yet above 1
        assert 1 < s["perplexity"] < 512 and s["perplexity_err"] > 0
        assert 0 <= s["accuracy"] <= 1 and s["rows"] == 6
    assert stages["f16"]["size_vs_f16"] == 1 and stages["q4_0"]["size_vs_f16"] < 0.5
    q4 = stages["q4_0"]
    assert q4["kl_divergence"] > 0 and q4["kl_divergence_p99"] >= q4["kl_divergence"]
    assert 0 < q4["top1_agreement"] <= 1
    for name in ("f16", "q4_0"):
        runs = stages[name]["bench"]
        assert [r["threads"] for r in runs] == [1, 2]
        assert all(r["pp_tps"] > 0 and r["tg_tps"] > 0 for r in runs)
        # generation's bandwidth: tokens/s x the bytes a token reads (every tensor of the untied tiny model but
        # its embeddings, and the KV cache), against the read kernel's figure at the same threads
        assert stages[name]["bytes_per_token"] == bytes_per_token(workdir / "results" / "tiny" / f"ggml-model-{name}.gguf",
                                                                 EVAL["bench"]["gen_tokens"])["total"]  # fmt: skip
        for r in runs:
            assert r["read_gbps"] > 0 and r["tg_gbps"] == pytest.approx(r["tg_tps"] * stages[name]["bytes_per_token"] / 1e9)
            assert r["tg_bandwidth_fraction"] == pytest.approx(r["tg_gbps"] / r["read_gbps"])
    # the recommendation, recomputed here from the measured figures: the fewest threads within the tolerance of
    # the fastest, tg for generation and pp for prompt processing
    def fewest(key):
        fastest = max(r[key] for r in q4["bench"])
        return min(r["threads"] for r in q4["bench"] if r[key] >= fastest * (1 - EVAL["bench"]["tolerance_pct"] / 100))

    assert metrics["recommended_for"] == "q4_0"
    assert metrics["recommended_threads"] == q4["recommended_threads"] == fewest("tg_tps")
    assert metrics["recommended_threads_batch"] == q4["recommended_threads_batch"] == fewest("pp_tps")
    at = next(r for r in q4["bench"] if r["threads"] == q4["recommended_threads"])
    assert metrics["generation_bandwidth"]["fraction"] == at["tg_bandwidth_fraction"]
    # the CPU code that ran the benchmark, as this process's own load of the same build reports it
    assert metrics["cpu_backend"] == cpu_backend(BIN)
    assert metrics["gate"]["passed"] and (report_dir(workdir) / "quality_gate.txt").is_file()
    assert metrics["eval"]["task_rows"] == 6 and metrics["eval"]["scored_tokens"] == 4 * (128 - 1 - 64)
    for name in ("merged", "f16", "q4_0"):
        assert metrics["provenance"][name]["inputs"], name
    assert metrics["provenance"]["f16"]["llama_cpp"]["commit"] == metrics["llama_cpp_commit"]
    for log in ("eval_perplexity_f16", "eval_kl_divergence_q4_0", "eval_task_q4_0", "bench_threads_q4_0"):
        assert (workdir / "logs" / "tiny" / f"{log}.log").stat().st_size > 0
        assert (workdir / "logs" / "benchmarks" / "tiny" / f"{log}.tsv").is_file()
    assert not list((workdir / "results").rglob("*.partial"))
    assert not (report_dir(workdir) / "f16-logits.kld").exists()  # temporary: gone once every quant is scored


def test_each_quant_merged_beside_its_base_with_the_runtime_lora(eval_run):
    """The report's "base q4_0 + runtime LoRA" stage beside "merged then q4_0": the base and the adapter's
    bytes, its figures from its own steps, both speeds from one side-by-side run, one sentence on which wins."""
    workdir, _ = eval_run
    results = workdir / "results" / "tiny"
    (row,) = metrics_of(workdir)["runtime_lora"]
    merged, lora = row["merged"], row["runtime_lora"]
    assert row["qtype"] == "q4_0" and row["adapters"] == ["results/tiny/adapters/1-adapter.gguf"]
    assert lora["size_bytes"] == sum(
        (results / name).stat().st_size for name in ("base-q4_0.gguf", "adapters/1-adapter.gguf")
    )
    assert merged["size_bytes"] == stages_of(workdir)["q4_0"]["size_bytes"]
    figures = report_dir(workdir) / "runtime_lora"
    kl, task = json.loads((figures / "q4_0-kl.json").read_text()), json.loads((figures / "q4_0-task.json").read_text())
    assert kl["loras"] == row["adapters"] and lora["kl_divergence"] == kl["kl_divergence"] > 0
    assert 1 < lora["perplexity"] < 512 and 0 < lora["top1_agreement"] <= 1
    assert task["runtime"] == "llama-cpp-python + runtime LoRA" and lora["accuracy"] == task["accuracy"]
    assert merged["kl_divergence"] == stages_of(workdir)["q4_0"]["kl_divergence"]
    assert all(side[k] > 0 for side in (merged, lora) for k in ("pp_tps", "tg_tps"))
    assert row["verdict"].startswith("At q4_0, ") and f"{lora['kl_divergence']:.4g}" in row["verdict"]
    page = (report_dir(workdir) / "report.html").read_text()
    assert "base q4_0 + runtime LoRA" in page and html.escape(row["verdict"]) in page


def test_draftless_speculation_is_measured_on_the_task_and_judged_on_its_figures(eval_run):
    """Each --spec-type of the pinned llama-server beside plain decoding on the task's prompts, greedy: speed,
    the drafts' acceptance, whether every answer stayed the same; the verdict follows from those figures."""
    workdir, _ = eval_run
    spec = json.loads((report_dir(workdir) / "speculation" / "q4_0.json").read_text())
    assert list(spec["settings"]) == list(SPECULATION_SETTINGS) and spec["rows"] == 6
    assert spec["threads"] == metrics_of(workdir)["recommended_threads"]
    plain = spec["settings"]["none"]
    assert plain["same_answers"] and plain["drafted"] == 0 and plain["acceptance"] is None and plain["tg_tps"] > 0
    assert all(r["tg_tps"] > 0 and r["tokens"] > 0 for r in spec["settings"].values())
    # llama-server's own counts: a setting drafts only where the text so far repeats an n-gram
    for r in spec["settings"].values():
        assert 0 <= r["accepted"] <= r["drafted"] and (r["acceptance"] is None) == (r["drafted"] == 0)
    assert {k: spec[k] for k in ("setting", "flags", "sentence")} == verdict(spec["settings"], spec["tolerance_pct"])
    assert metrics_of(workdir)["speculation"] == spec
    page = (report_dir(workdir) / "report.html").read_text()
    assert html.escape(spec["sentence"]) in page


def test_report_shows_the_fidelity_checks(eval_run):
    workdir, _ = eval_run
    checks = metrics_of(workdir)["checks"]
    assert sorted(checks["tokenizer"]) == sorted(checks["chat_template"]) == ["auto", "f16", "q4_0"]
    assert all(record["corpora"]["task"]["rate"] == 1.0 for record in checks["tokenizer"].values())
    # q4_0 is made with the importance matrix (imatrix.use_for: [all]): the check sets it beside q4_0 made without
    assert checks["generation"]["prompts"] == 6 and list(checks["imatrix"]) == ["q4_0"]
    imatrix = checks["imatrix"]["q4_0"]
    assert imatrix["with"]["artifact"] == "ggml-model-q4_0.gguf" and imatrix["without"]["made_with"] == "no importance matrix"
    page = (report_dir(workdir) / "report.html").read_text()
    assert "<h2>Fidelity checks</h2>" in page and "Generation parity" in page
    assert page.count("ggml-model-q4_0.gguf</td>") == 1  # one row of the parity table


def test_every_stage_is_scored_on_the_same_tokens(eval_run):
    workdir, _ = eval_run
    figures = [json.loads(p.read_text()) for p in report_dir(workdir).glob("*/*.json") if p.parent.name != "task"]
    scored = {(f["stage"], f.get("scored_tokens"), f.get("windows")) for f in figures if "perplexity" in f}
    assert {s for s, _, _ in scored} == {*STAGES, "base-q4_0+lora"}  # the base with the adapter at run time too
    assert {(n, w) for _, n, w in scored} == {(4 * 63, 4)}
    texts = {f["text_sha256"] for f in figures if "text_sha256" in f}
    assert len(texts) == 1


def test_f16_gguf_perplexity_equals_the_merged_hf_model(eval_run):
    workdir, _ = eval_run
    stages = stages_of(workdir)
    diff = abs(stages["f16"]["perplexity"] / stages["merged"]["perplexity"] - 1)
    assert diff < F16_VS_HF_TOLERANCE
    assert metrics_of(workdir)["f16_vs_merged_perplexity_rel_diff"] == pytest.approx(diff)
    # the measure sees the adapter: the base model scores differently (by 3% here)
    assert abs(stages["base"]["perplexity"] / stages["merged"]["perplexity"] - 1) > 10 * F16_VS_HF_TOLERANCE
    # and the quant's own figure agrees with llama-perplexity's f16 run, at the precision each is printed with:
    # "Final estimate: PPL = 3.9200" (4 decimals) and the KL run's "Mean PPL(base) : 3.920043" (6 decimals)
    kl = json.loads((report_dir(workdir) / "kl_divergence" / "q4_0.json").read_text())
    assert kl["f16_perplexity"] == pytest.approx(stages["f16"]["perplexity"], rel=0, abs=0.5e-4 + 0.5e-6)


def test_gguf_and_transformers_answer_the_same_prompts_alike(eval_run):
    """Same prompt tokens (transformers' ids, fed to both), same greedy answers from f16 GGUF and merged HF (checked by
    teacher forcing the merged model on the GGUF's answers)."""
    workdir, _ = eval_run
    answers = {s: json.loads((report_dir(workdir) / "task" / f"{s}.json").read_text())["answers"] for s in STAGES}
    assert all(len(a) == 6 and all(isinstance(x, str) for x in a) for a in answers.values())
    generation = json.loads((workdir / "results" / "tiny" / "checks" / "generation.json").read_text())
    assert generation["agree"] >= 5 and generation["first_difference"].count(None) == generation["agree"]
    # the HF stages' answers are the task's where right, else the greedy answer up to where it departs from it
    rows = load_split("heldout")[:6]
    for stage in ("base", "merged"):
        figures = json.loads((report_dir(workdir) / "task" / f"{stage}.json").read_text())
        assert figures["correct"] == sum(a == r["answer"] for a, r in zip(figures["answers"], rows, strict=True))
    assert "the GGUF answers the 6 prompts as transformers' token ids from " in (
        workdir / "logs" / "tiny" / "eval_task_q4_0.log"
    ).read_text()


def headless(chromium: str, profile, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


def near(image, rgb: tuple[int, int, int], tolerance: float = 0.06) -> int:
    """How many pixels are close to a colour."""
    import numpy as np

    target = np.array(rgb) / 255
    return int((np.abs(image[..., :3] - target).max(axis=-1) < tolerance).sum())


def test_report_renders_its_plots_in_chromium(eval_run, chromium, tmp_path):
    import matplotlib.image
    import numpy as np

    workdir, _ = eval_run
    page = (report_dir(workdir) / "report.html").resolve().as_uri()
    dom = headless(chromium, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom", page).stdout
    assert 'data-plots-decoded="4"' in dom  # the page's script counted four decoded plot images (the frontier's)
    for plot in ("throughput", "size_vs_perplexity", "accuracy"):
        assert re.search(rf"<img class=\"plot\" id=\"plot-{plot}\"[^>]*src=\"data:image/png;base64,", dom), plot
    assert "Quality gate passed" in dom and 'id="recommended-threads"' in dom
    backend = metrics_of(workdir)["cpu_backend"]
    assert f'id="cpu-variant">{backend["variant"]}<' in dom and 'id="recommended-threads-batch"' in dom
    assert re.search(r'id="cpu-features">[^<]*\bREPACK\b', dom)  # the q4_0 weight repacking

    shot = tmp_path / "report.png"
    headless(chromium, tmp_path / "profile-shot", "--window-size=1280,2600", f"--screenshot={shot}", page)
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (2600, 1280)
    assert np.std(image[..., :3]) > 0.05  # not blank
    # the plots' lines and markers, in matplotlib's first two colours (C0 blue, C1 orange)
    assert near(image, (0x1F, 0x77, 0xB4)) > 500 and near(image, (0xFF, 0x7F, 0x0E)) > 500


def test_snakemake_report_holds_the_evaluation(eval_run):
    workdir, config = eval_run
    out = workdir / "snakemake-report.html"
    snakemake(workdir, "eval_report", "--configfile", str(config), "--report", str(out))
    text = out.read_text()
    assert "Evaluation" in text and "size_vs_perplexity.png" in text


def test_recommended_threads_is_the_fewest_within_tolerance_for_each_phase():
    # generation levels off once memory is the limit, prompt processing gains from every core
    runs = [{"threads": 1, "tg_tps": 10.0, "pp_tps": 50.0}, {"threads": 2, "tg_tps": 19.5, "pp_tps": 98.0},
            {"threads": 4, "tg_tps": 20.0, "pp_tps": 190.0}]  # fmt: skip
    assert recommended_threads(runs, 5) == {"threads": 2, "threads_batch": 4}
    assert recommended_threads(runs, 0) == {"threads": 4, "threads_batch": 4}
    assert recommended_threads(runs, 50) == {"threads": 1, "threads_batch": 2}


def test_perplexity_from_nll_is_llama_perplexitys_formula():
    nll = [1.0, 2.0, 3.0, 2.0]
    ppl, err = perplexity_from_nll(nll)
    assert ppl == pytest.approx(math.exp(2.0))
    assert err == pytest.approx(math.sqrt(0.5 / 3) * math.exp(2.0))


def test_kl_summary_is_read_from_llama_perplexity_output():
    out = (
        "kl_divergence: computing over 4 chunks, n_ctx=128, batch_size=128, n_seq=1\n"
        "Mean PPL(Q)                   :  14.413613 ±   1.377084\n"
        "Mean PPL(base)                :  14.664800 ±   1.387890\n"
        "Mean    KLD:   0.017902 ±   0.001441\nMaximum KLD:   0.247896\n99.0%   KLD:   0.087385\n"
        "Same top p: 89.286 ± 1.952 %\n"
    )
    figures = parse_kl_output(out)
    assert figures["kl_divergence"] == 0.017902 and figures["top1_agreement"] == pytest.approx(0.89286)
    assert figures["perplexity"] == 14.413613 and figures["scored_tokens"] == 4 * 63


def test_merged_or_runtime_lora_is_said_from_the_figures():
    from cpuforge.evaluate.records import lora_verdict

    merged = {"kl_divergence": 0.02, "kl_divergence_err": 0.001, "accuracy": 0.9, "tg_tps": 100.0, "size_bytes": 2**30}

    def verdict(**lora):
        return lora_verdict("q4_0", merged, {**merged, "size_bytes": 2**29, **lora}, 2)

    # within both estimates' error and as accurate: the faster way wins
    assert verdict(kl_divergence=0.0215, tg_tps=90.0).startswith("At q4_0, merging serves this model better: ")
    assert verdict(kl_divergence=0.0185, tg_tps=110.0).startswith("At q4_0, base + runtime LoRA serves")
    # closer and faster, or further and slower
    assert "runtime LoRA serves" in verdict(kl_divergence=0.01, tg_tps=101.0)
    assert "merging serves" in verdict(kl_divergence=0.05, tg_tps=99.0)
    # accuracy decides quality where the two differ, KL otherwise; a trade is said as one
    trade = verdict(kl_divergence=0.01, accuracy=0.8, tg_tps=120.0)
    assert "neither way wins outright" in trade and "merge for quality, keep the LoRA at run time for speed" in trade
    assert "task accuracy 0.800 against 0.900" in trade and "1.20× the merged speed" in trade
    assert "512.0 MiB on disk for the base and its 2 adapters against 1,024.0 MiB merged" in trade


def test_quality_gate_names_the_stage_and_every_limit_it_misses():
    from cpuforge.evaluate.fidelity import compare

    # 40 rows: q4_0 answers 8 of them otherwise than f16, 6 of those right -> wrong
    reference = [True] * 38 + [False] * 2
    right = [False] * 6 + [True] * 32 + [False] * 2
    agree = [False] * 8 + [True] * 32
    records = [
        {"stage": "f16", "kind": "gguf", "perplexity": 10.0, "ppl_increase_vs_f16_pct": 0.0},
        {"stage": "q4_0", "kind": "gguf", "perplexity": 13.0, "ppl_increase_vs_f16_pct": 30.0, "kl_divergence": 0.3,
         "kl_divergence_err": 0.01, "accuracy": 0.8, "fidelity": compare(reference, right, agree, 0.95)},
        {"stage": "merged", "kind": "hf", "perplexity": 10.0, "ppl_increase_vs_f16_pct": 99.0},
    ]  # fmt: skip
    (failure,) = quality_gate(records, Gate(max_kl_divergence=0.25, min_accuracy=0.9))
    assert failure.startswith("q4_0: KL divergence from the f16 GGUF 0.3 ± 0.01 (at 95 % up to 0.3164) > "
                              "eval.gate.max_kl_divergence 0.25; perplexity +30.0 % over the f16 GGUF's > ")  # fmt: skip
    assert "; answers unlike the f16 GGUF's on 8/40 rows (at 95 % up to 33.2 %) > eval.gate.max_disagreement 0.2" in failure
    assert "; 6 right->wrong against 0 wrong->right flips (an accuracy drop at 95 % of at least" in failure
    assert failure.endswith("; task accuracy 0.800 < eval.gate.min_accuracy 0.9.")
    assert quality_gate(records, Gate(max_kl_divergence=0.4, max_ppl_increase_pct=30, max_disagreement=0.4,
                                      max_accuracy_drop=0.1)) == []  # fmt: skip


def test_bad_heldout_rows_fail_at_start(tmp_path, tiny_base, tiny_adapter):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"system": "s", "news": "n"}\n')
    model = {"name": "m", "base": str(tiny_base), "adapters": [str(tiny_adapter)], "task_data": {"heldout": str(heldout)}}
    config = write_config(tmp_path / "bad.yaml", [model])
    result = snakemake(tmp_path, "eval_report", "--configfile", str(config), check=False)
    assert result.returncode != 0 and not (tmp_path / "results").exists()
    assert f"{heldout}: line 1 lacks the text field(s) answer." in result.stdout + result.stderr


def test_quality_gate_fails_eval_report_and_keeps_the_report(own_eval_run, eval_run):
    workdir, config = own_eval_run
    # without the quant search, which would find no file within this gate (test_the_quant_search_fails_...)
    strict = tiny_config(workdir, "strict.yaml", inputs=eval_run[0] / "inputs", auto=False, max_kl_divergence=1e-6)
    result = snakemake(workdir, "eval_report", "--configfile", str(strict), check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(
        r"quality gate failed for tiny: q4_0: KL divergence from the f16 GGUF [0-9.e-]+ ± [0-9.e-]+ \(at 95 % up to "
        r"[0-9.e-]+\) > eval\.gate\.max_kl_divergence 1e-06\.",
        out,
    ), out
    assert "eval.gate.max_ppl_increase_pct" not in out and "eval.gate.min_accuracy" not in out  # only what it missed
    # the report is kept, and says why
    assert "Quality gate failed" in (report_dir(workdir) / "report.html").read_text()
    assert not (report_dir(workdir) / "quality_gate.txt").exists()
    assert not metrics_of(workdir)["gate"]["passed"]
    # back to the passing thresholds: only the report and the gate run again
    assert planned_jobs(workdir, "eval_report", "--configfile", str(config)) == {
        "make_eval_report": 1, "check_quality_gate": 1, "eval_report": 1,
    }  # fmt: skip
    snakemake(workdir, "eval_report", "--configfile", str(config))
    assert metrics_of(workdir)["gate"]["passed"]


def test_model_without_task_has_no_accuracy(own_eval_run, eval_run):
    """A user's model has no demo task: the report drops the task part and the gate its accuracy check."""
    workdir, _ = own_eval_run
    config = tiny_config(workdir, "no-task.yaml", task=False, inputs=eval_run[0] / "inputs", auto=False,
                         min_accuracy=1.0)  # fmt: skip
    result = snakemake(workdir, "eval_report", "--configfile", str(config))
    assert "eval_task" not in result.stdout + result.stderr and "eval_speculation" not in result.stdout + result.stderr
    metrics = metrics_of(workdir)
    assert metrics["speculation"] is None and "Not measured: the model has no task" in (report_dir(workdir) / "report.html").read_text()
    assert metrics["gate"]["passed"] and metrics["eval"]["task_rows"] is None
    assert all("accuracy" not in s for s in metrics["stages"])
    text = (report_dir(workdir) / "eval_text.txt").read_text()
    assert load_split("heldout")[0]["news"] not in text and "Python" in text


def test_the_quant_search_chooses_an_undominated_file_that_its_recipe_remakes(eval_run, llama_bin, tmp_path):
    """auto_quant: every ladder type as a uniform file and q4_0 as llama-quantize makes it (with and without the
    importance matrix), benched side by side, verified in speed order; the chosen GGUF, its recipe (which
    llama-quantize takes by hand and which remakes the same tensors) and the search record, from which nothing
    passing beats the choice; the file is a stage of the report like q4_0, and the report opens with it."""
    workdir, config = eval_run
    assert planned_jobs(workdir, "auto_quant", "--configfile", str(config)) == {}  # eval_report made it all
    results = workdir / "results" / "tiny"
    chosen, record = results / "ggml-model-auto.gguf", json.loads((results / "auto" / "search.json").read_text())
    names = [c["name"] for c in record["candidates"]]
    assert names[:6] == ["uniform q8_0", "uniform q4_0", "uniform iq4_nl", "uniform iq2_xxs", "q4_0 + imatrix", "q4_0"]
    # the workflow's q4_0 (made with the importance matrix) is that candidate as it is, not made again, and the
    # answers every candidate's are compared with are the f16 GGUF's that the report's eval_task kept
    listed = record["candidates"][4]
    assert listed["from_workflow"] and "make_seconds" not in listed
    assert listed["size_bytes"] == (results / "ggml-model-q4_0.gguf").stat().st_size
    f16_task = json.loads((report_dir(workdir) / "task" / "f16.json").read_text())
    assert record["reference"] == {"answers": f16_task["answer_ids"], "right": f16_task["right"]}
    assert record["objective"] == "speed" and record["chosen"] in names
    # every file screened in one run; the passing ones benched again whole, side by side, where the choice is made
    assert all(c["screen_tg_tps"] > 0 for c in record["candidates"][:6])
    assert all(c["tg_tps"] > 0 for c in record["candidates"] if c["passed"])
    assert all("tg_tps" not in c for c in record["candidates"] if not c["passed"])
    verified = [c for c in record["candidates"] if c["verified"]]
    assert all(set(c) >= {"size_bytes", "bpw", "kl_divergence", "passed", "fidelity", "per_row"}
               for c in verified if c["passed"])  # fmt: skip
    # checked from the record: the chosen file passes, nothing passing is no larger and no slower and better on
    # one, and no passing candidate is faster beyond the tolerance
    best = next(c for c in record["candidates"] if c["name"] == record["chosen"])
    passing = [c for c in record["candidates"] if c["passed"]]
    assert best["passed"] and best["verified"]
    for c in passing:
        assert not (c["tensor_bytes"] <= best["tensor_bytes"] and c["tg_tps"] >= best["tg_tps"]
                    and (c["tensor_bytes"], c["tg_tps"]) != (best["tensor_bytes"], best["tg_tps"])), c["name"]  # fmt: skip
        assert c["tg_tps"] - best["tg_tps"] <= record["tolerance"] * c["tg_tps"], c["name"]
    # an unverified candidate names the passing one that beats it
    for c in record["candidates"]:
        if not c["verified"]:
            assert c["pruned_by"] in [p["name"] for p in passing]
    by_hand = tmp_path / "by-hand.gguf"
    weights = ["--imatrix", str(results / "imatrix.gguf")] if best["imatrix"] else []
    subprocess.run([str(llama_bin / "llama-quantize"), *weights, "--tensor-type-file", str(results / "auto" / "recipe.txt"),
                    str(results / "ggml-model-f16.gguf"), str(by_hand), "Q8_0"], check=True, capture_output=True)  # fmt: skip
    from cpuforge.autoquant.recipe import check_written, read
    from cpuforge.io.gguf import open_gguf, read_metadata

    types = read(results / "auto" / "recipe.txt")
    check_written(chosen, types)
    ours = {t.name: (t.tensor_type, bytes(t.data)) for t in open_gguf(chosen).tensors}
    assert ours == {t.name: (t.tensor_type, bytes(t.data)) for t in open_gguf(by_hand).tensors}
    provenance = json.loads(read_metadata(chosen)["cpuforge.quantize"])
    assert provenance["type"] == "auto" and provenance["recipe"] == types and provenance["candidate"] == best["name"]
    # the report measured the chosen file again, as every stage: the same KL divergence the search measured, and
    # the search's teacher-forced answers are the report's greedy ones
    auto = stages_of(workdir)["auto"]
    assert auto["kl_divergence"] == pytest.approx(best["kl_divergence"], rel=1e-3)
    assert best["per_row"]["right"] == auto["per_row"]["right"] and best["correct"] == auto["correct"]
    assert best["per_row"]["agree"] == auto["per_row"]["agree"]
    metrics = metrics_of(workdir)
    assert metrics["auto_quant"]["passes"] and metrics["decision"].startswith(
        f"Ship results/tiny/ggml-model-auto.gguf ({best['name']}): the fastest on ")
    assert f"of the {len(names)} candidates measured that answer like the fine-tune: " in metrics["decision"]
    page = (report_dir(workdir) / "report.html").read_text()
    assert page.index(html.escape(metrics["decision"])) < page.index("Quality gate passed")
    assert (report_dir(workdir) / "plots" / "frontier.png").stat().st_size


def test_the_quant_search_fails_naming_the_best_candidate(own_eval_run, eval_run):
    """No candidate within the gate: the search fails with one sentence, on the terminal, naming the best
    candidate and the figure it missed, and leaves nothing under the output's name."""
    workdir, _ = own_eval_run
    # more windows than the 4 a KL run is first judged on, so that one can be stopped before its last
    config = tiny_config(workdir, "impossible.yaml", inputs=eval_run[0] / "inputs", chunks=6,
                         max_kl_divergence=1e-9)  # fmt: skip
    result = snakemake(workdir, "results/tiny/ggml-model-auto.gguf", "--configfile", str(config), check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    # a KL limit below every file's: each candidate verified, none passes, the least lossy named
    assert re.search(r"auto_quant: no candidate passes eval\.gate \(6 measured\); the best, uniform q8_0 \([0-9.]+ "
                     r"MiB, [0-9.]+ bpw\), misses KL divergence from the f16 GGUF [0-9.e-]+ ± [0-9.e-]+ \(at 95 % up to "
                     r"[0-9.e-]+\) > eval\.gate\.max_kl_divergence 1e-09", out), out  # fmt: skip
    # so clear a miss that llama-perplexity was ended once its first windows showed it, before its summary
    log = (workdir / "logs" / "tiny" / "auto_quant_search.log").read_text()
    assert "ended early" in log and "Mean    KLD" not in log
    assert re.search(r"uniform q8_0: KL .* \(stopped after 4 windows: a clear miss\)", log), log
    # (the provenance sidecar of the shared run's successful search stays, as every rule's does)
    results = workdir / "results" / "tiny"
    assert not (results / "ggml-model-auto.gguf").exists() and not list(results.glob("ggml-model-auto.gguf.partial*"))
