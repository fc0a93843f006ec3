"""Gather every stage's figures into metrics.json and a self-contained report.html, and judge the quality gate.

The figures are the JSON files the evaluation steps wrote under --figures
(perplexity/, kl_divergence/, task/, bench/, runtime_lora/). The report shows one row per stage,
each quant merged beside its unmerged base with the adapters applied at run time (when they can be),
three matplotlib plots embedded as PNG, the quality gate's verdict, the fidelity
checks the workflow made (--checks FILE...: tokenizer and chat-template parity of each
GGUF, greedy generation parity, each quant with and without the importance
matrix) and the provenance sidecar of every artifact. The gate is judged here and written into
metrics.json; check_quality_gate fails the workflow on it, so a failing report
is still on disk to be read.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import read_json, size_on_disk
from cpuforge.llama.runtime import feature_names

log = logging.getLogger(__name__)


HF_STAGES = ("base", "merged")


REFERENCE = "f16"


LABELS = {"base": "base (HF)", "merged": "merged (HF)"}


def label(stage: str) -> str:
    return LABELS.get(stage, f"{stage} GGUF")


def parse_stages(specs: list[str], flag: str = "--stage", reference: bool = True) -> dict[str, Path]:
    stages = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{flag} {spec!r}: expected NAME=PATH.")
        stages[name] = Path(path)
    if reference and REFERENCE not in stages:
        raise InputError("--stage: the f16 GGUF stage is missing; every comparison is made against it.")
    return stages


def read_provenance(artifact: Path) -> dict | None:
    sidecar = artifact.with_name(artifact.name + ".provenance.json")
    return read_json(sidecar) if sidecar.is_file() else None


def stage_record(stage: str, path: Path, figures: Path, task: bool) -> dict:
    """Everything measured about one stage, from the evaluation steps' JSON files."""
    gguf = stage not in HF_STAGES
    record = {"stage": stage, "label": label(stage), "kind": "gguf" if gguf else "hf", "path": str(path),
              "size_bytes": size_on_disk(path)}  # fmt: skip
    quant = gguf and stage != REFERENCE
    ppl = read_json(figures / ("kl_divergence" if quant else "perplexity") / f"{stage}.json")
    record.update(perplexity=ppl["perplexity"], perplexity_err=ppl["perplexity_err"], runtime=ppl["runtime"])
    if quant:
        for key in ("kl_divergence", "kl_divergence_err", "kl_divergence_p99", "kl_divergence_max",
                    "top1_agreement", "top1_agreement_err"):  # fmt: skip
            record[key] = ppl[key]
    if task:
        answers = read_json(figures / "task" / f"{stage}.json")
        record.update(accuracy=answers["accuracy"], correct=answers["correct"], rows=answers["rows"])
    if gguf:
        speed = read_json(figures / "bench" / f"{stage}.json")
        record.update(bench=speed["runs"], recommended_threads=speed["recommended_threads"],
                      recommended_threads_batch=speed["recommended_threads_batch"])  # fmt: skip
    record["provenance"] = read_provenance(path)
    return record


def relative_figures(records: list[dict]) -> None:
    """Size and perplexity of every stage relative to the f16 GGUF."""
    f16 = next(r for r in records if r["stage"] == REFERENCE)
    for r in records:
        r["size_vs_f16"] = r["size_bytes"] / f16["size_bytes"]
        r["ppl_increase_vs_f16_pct"] = (r["perplexity"] / f16["perplexity"] - 1) * 100


def quality_gate(records: list[dict], max_ppl_increase_pct: float, max_kl: float, min_accuracy: float) -> list[str]:
    """One sentence per quant and figure that misses its threshold."""
    failures = []
    for r in records:
        if r["kind"] != "gguf" or r["stage"] == REFERENCE:
            continue
        if r["ppl_increase_vs_f16_pct"] > max_ppl_increase_pct:
            failures.append(
                f"{r['stage']}: perplexity {r['perplexity']:.4g} is {r['ppl_increase_vs_f16_pct']:.1f}% above the f16 "
                f"GGUF's, more than eval.gate.max_ppl_increase_pct allows ({max_ppl_increase_pct:g}%)."
            )
        if r["kl_divergence"] > max_kl:
            failures.append(
                f"{r['stage']}: mean KL divergence from the f16 GGUF is {r['kl_divergence']:.4g}, more than "
                f"eval.gate.max_kl_divergence allows ({max_kl:g})."
            )
        if "accuracy" in r and r["accuracy"] < min_accuracy:
            failures.append(
                f"{r['stage']}: task accuracy is {r['accuracy']:.3f} ({r['correct']}/{r['rows']}), less than "
                f"eval.gate.min_accuracy requires ({min_accuracy:g})."
            )
    return failures


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_throughput(records: list[dict], serve: str, recommended: int) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for r in (r for r in records if r["kind"] == "gguf"):
        threads = [b["threads"] for b in r["bench"]]
        for ax, key in zip(axes, ("pp_tps", "tg_tps"), strict=True):
            ax.plot(threads, [b[key] for b in r["bench"]], marker="o", linewidth=2, label=r["label"])
    serving = next(r for r in records if r["stage"] == serve)
    best = next(b for b in serving["bench"] if b["threads"] == recommended)
    axes[1].scatter([recommended], [best["tg_tps"]], s=250, facecolors="none", edgecolors="black", zorder=3,
                    label=f"recommended for {serve}: {recommended}")  # fmt: skip
    for ax, title in zip(axes, ("prompt processing", "generation"), strict=True):
        ax.set(title=f"{title} (llama-bench)", xlabel="threads", ylabel="tokens/s")
        ax.set_xticks(sorted({b["threads"] for r in records if r["kind"] == "gguf" for b in r["bench"]}))
        ax.grid(alpha=0.3)
        ax.legend()
    data = png(fig)
    plt.close(fig)
    return data


def plot_size_vs_perplexity(records: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for r in records:
        ax.errorbar(r["size_bytes"] / 2**20, r["perplexity"], yerr=r["perplexity_err"], fmt="o", markersize=9,
                    capsize=4, label=r["label"])  # fmt: skip
        ax.annotate(r["stage"], (r["size_bytes"] / 2**20, r["perplexity"]), textcoords="offset points",
                    xytext=(8, 6))  # fmt: skip
    ax.set(title="size vs. perplexity", xlabel="size on disk (MiB)", ylabel="perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    data = png(fig)
    plt.close(fig)
    return data


def plot_accuracy(records: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    if all("accuracy" in r for r in records):
        bars = ax.bar([r["label"] for r in records], [r["accuracy"] for r in records], color="C0")
        ax.bar_label(bars, labels=[f"{r['correct']}/{r['rows']}" for r in records])
        ax.set(ylim=(0, 1.1), ylabel="exact match")
    else:
        ax.text(0.5, 0.5, "this model has no task (config models[].task)", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("task accuracy, greedy, held-out rows")
    data = png(fig)
    plt.close(fig)
    return data


def number(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def speed(value) -> str:
    return "–" if value is None else f"{value:,.1f}"


def stage_table(records: list[dict]) -> str:
    head = ("stage", "size", "size vs f16", "perplexity", "vs f16", "KL div. (mean)", "top-1 agreement",
            "task accuracy", "best pp t/s", "best tg t/s", "threads")  # fmt: skip
    rows = []
    for r in records:
        bench = r.get("bench") or []
        cells = (
            r["label"],
            f"{r['size_bytes'] / 2**20:.1f} MiB",
            f"{r['size_vs_f16']:.2f}×",
            f"{r['perplexity']:.4f} ± {r['perplexity_err']:.3g}",
            f"{r['ppl_increase_vs_f16_pct']:+.2f}%",
            number(r.get("kl_divergence")),
            "–" if "top1_agreement" not in r else f"{100 * r['top1_agreement']:.1f}%",
            "–" if "accuracy" not in r else f"{r['accuracy']:.3f} ({r['correct']}/{r['rows']})",
            speed(max((b["pp_tps"] for b in bench), default=None)),
            speed(max((b["tg_tps"] for b in bench), default=None)),
            str(r.get("recommended_threads", "–")),
        )
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    return f"<table class='stages'>{header}{''.join(rows)}</table>"


def bench_table(records: list[dict]) -> str:
    rows = []
    for r in (r for r in records if r["kind"] == "gguf"):
        for b in r["bench"]:
            rows.append(f"<tr><td>{html.escape(r['label'])}</td><td>{b['threads']}</td>"
                        f"<td>{b['pp_tps']:,.1f} ± {b['pp_tps_std']:,.1f}</td>"
                        f"<td>{b['tg_tps']:,.1f} ± {b['tg_tps_std']:,.1f}</td></tr>")  # fmt: skip
    return ("<table><tr><th>stage</th><th>threads</th><th>prompt processing t/s</th><th>generation t/s</th></tr>"
            + "".join(rows) + "</table>")  # fmt: skip


def runtime_lora_rows(runtime_lora: dict[str, Path], adapters: list[Path], records: list[dict], figures: Path,
                      task: bool) -> list[dict]:  # fmt: skip
    """Per quant type, "merged then {qtype}" beside "base {qtype} + runtime LoRA": bytes on disk (the base and
    every adapter), perplexity and KL divergence against the merged f16 (llama-perplexity --lora), task
    accuracy, and prompt and generation tokens/s of both measured side by side in one run by the same code;
    and one sentence on which serves the model better."""
    by_stage = {r["stage"]: r for r in records}
    folder, rows = figures / "runtime_lora", []
    for qtype, base in runtime_lora.items():
        kl, speed = read_json(folder / f"{qtype}-kl.json"), read_json(folder / f"{qtype}-speed.json")
        shared = ("perplexity", "kl_divergence", "kl_divergence_err", "top1_agreement")
        merged = {k: by_stage[qtype].get(k) for k in ("size_bytes", *shared, "accuracy")}
        lora = {"size_bytes": size_on_disk(base) + sum(size_on_disk(a) for a in adapters),
                **{k: kl[k] for k in shared},
                "accuracy": read_json(folder / f"{qtype}-task.json")["accuracy"] if task else None}  # fmt: skip
        for side, figures_of in (("merged", merged), ("runtime_lora", lora)):
            figures_of.update(pp_tps=speed[side]["pp_tps"], tg_tps=speed[side]["tg_tps"])
        rows.append({"qtype": qtype, "base": str(base), "adapters": [str(a) for a in adapters], "merged": merged,
                     "runtime_lora": lora, "speed_runtime": speed["runtime"], "speed_threads": speed["threads"],
                     "verdict": lora_verdict(qtype, merged, lora, len(adapters))})  # fmt: skip
    return rows


def lora_verdict(qtype: str, merged: dict, lora: dict, n_adapters: int) -> str:
    """Which way serves the model better at `qtype`, from the figures: closer to the merged f16 (task accuracy
    where the two differ, else KL divergence beyond both estimates' error) and faster at generation."""
    closer = None  # as close, within the error
    if abs(lora["kl_divergence"] - merged["kl_divergence"]) > lora["kl_divergence_err"] + merged["kl_divergence_err"]:
        closer = lora["kl_divergence"] < merged["kl_divergence"]
    if merged["accuracy"] is not None and lora["accuracy"] != merged["accuracy"]:
        closer = lora["accuracy"] > merged["accuracy"]
    faster = lora["tg_tps"] > merged["tg_tps"]
    figures = (f"KL divergence from the merged f16 {lora['kl_divergence']:.4g} ± {lora['kl_divergence_err']:.2g} "
               f"against {merged['kl_divergence']:.4g} ± {merged['kl_divergence_err']:.2g}"
               + ("" if merged["accuracy"] is None else
                  f", task accuracy {lora['accuracy']:.3f} against {merged['accuracy']:.3f}")
               + f", generation at {lora['tg_tps'] / merged['tg_tps']:.2f}× the merged speed, "
               f"{lora['size_bytes'] / 2**20:,.1f} MiB on disk for the base and its {n_adapters} "
               f"adapter{'s' * (n_adapters != 1)} against {merged['size_bytes'] / 2**20:,.1f} MiB merged")  # fmt: skip
    if closer in (None, faster):
        way = "base + runtime LoRA" if faster else "merging"
        return f"At {qtype}, {way} serves this model better: {figures}."
    return (f"At {qtype}, neither way wins outright: {figures}; merge for {'speed' if closer else 'quality'}, "
            f"keep the LoRA at run time for {'quality' if closer else 'speed'}.")


def runtime_lora_html(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = ("stage", "size", "perplexity", "KL div. vs merged f16", "top-1 agreement", "task accuracy",
            "prompt t/s", "generation t/s")  # fmt: skip
    body = []
    for row in rows:
        for label, r in ((f"merged then {row['qtype']}", row["merged"]),
                         (f"base {row['qtype']} + runtime LoRA", row["runtime_lora"])):  # fmt: skip
            cells = (label, f"{r['size_bytes'] / 2**20:.1f} MiB", number(r["perplexity"]), number(r["kl_divergence"]),
                     "–" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%",
                     number(r["accuracy"], 3), speed(r["pp_tps"]), speed(r["tg_tps"]))  # fmt: skip
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    verdicts = "".join(f"<p class='lora-verdict'>{html.escape(row['verdict'])}</p>" for row in rows)
    return (f"<h2>Merged or runtime LoRA</h2><table class='runtime-lora'>{header}{''.join(body)}</table>{verdicts}"
            f"<p>Sizes count the base and every adapter file. Speed: {html.escape(rows[0]['speed_runtime'])}, "
            f"{rows[0]['speed_threads']} threads, both sides in turns in one run, each its best round.</p>")


def provenance_html(records: list[dict]) -> str:
    parts = []
    for r in records:
        prov = r["provenance"]
        if prov is None:
            body = "<p>no provenance sidecar: a user's input, whose file hashes are in the merged model's.</p>"
        else:
            inputs = "".join(
                f"<li>{html.escape(role)}: {html.escape(name)} <code>{digest[:16]}</code></li>"
                for role, files in prov.get("inputs", {}).items()
                for name, digest in files.items()
            )
            facts = {k: v for k, v in prov.items() if k not in ("inputs", "artifact")}
            body = f"<ul>{inputs}</ul><pre>{html.escape(json.dumps(facts, indent=1, sort_keys=True))}</pre>"
        tuners = f" (adapters: {html.escape(', '.join(prov['tuners']))})" if prov and prov.get("tuners") else ""
        parts.append(f"<details><summary>{html.escape(r['label'])}: <code>{html.escape(r['path'])}</code>{tuners}"
                     f"</summary>{body}</details>")  # fmt: skip
    return "".join(parts)


def read_checks(paths: list[Path]) -> dict:
    """The fidelity checks' records by kind (results/{model}/checks/KIND[-STAGE].json): tokenizer and
    chat-template by stage, generation, imatrix by quant type."""
    checks = {"tokenizer": {}, "chat_template": {}, "generation": None, "imatrix": {}}
    for path in paths:
        kind, _, stage = path.stem.partition("-")
        if path.stem.startswith("chat-template-"):
            checks["chat_template"][path.stem.removeprefix("chat-template-")] = read_json(path)
        elif kind in ("tokenizer", "imatrix"):
            checks[kind][stage] = read_json(path)
        elif kind == "generation":
            checks["generation"] = read_json(path)
    return checks


def rate(result: dict) -> str:
    return f"{result['agree']}/{result['samples']} ({100 * result['agree'] / max(result['samples'], 1):.1f}%)"


def template_verdict(template: dict | None) -> str:
    """How many prompts each runtime was fed exactly transformers' ids for: `chat 44/44, server 44/44, …`."""
    if template is None:
        return "–"
    if not template["template"]:
        return template["message"]
    return ", ".join(f"{name} {r['same_ids']}/{r['prompts']}" for name, r in template["runtimes"].items())


def checks_html(checks: dict) -> str:
    parts = []
    if checks["tokenizer"]:
        corpora = list(next(iter(checks["tokenizer"].values()))["corpora"])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["artifact", *corpora, "chat prompts: transformers' ids"])
        rows = []
        for stage, record in checks["tokenizer"].items():
            verdict = template_verdict(checks["chat_template"].get(stage))
            cells = [record["artifact"], *(rate(record["corpora"][c]) for c in corpora), verdict]
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        mismatches = "".join(
            f"<li>{html.escape(stage)}, {html.escape(corpus)}: {html.escape(repr(m['at']))} — GGUF {m['gguf']}, "
            f"transformers {m['hf']}</li>"
            for stage, record in checks["tokenizer"].items()
            for corpus, result in record["corpora"].items()
            for m in result["mismatches"][:3]
        )
        parts.append(
            "<h3>Tokenizer and chat-template parity</h3><p>Token ids from the GGUF's vocabulary (pinned libllama) "
            "against the merged model's tokenizer; the task data must agree 100%. The last column counts the chat "
            "prompts (fixed conversations and held-out prompts) that the chat and the server were fed with exactly "
            "transformers' token ids (both must be all), beside llama.cpp's own tokenization of the GGUF's template, "
            "which the runtimes use only without a merged model.</p>"
            f"<table class='checks'><tr>{head}</tr>{''.join(rows)}</table>"
            + (f"<details><summary>first mismatches</summary><ul>{mismatches}</ul></details>" if mismatches else "")
        )
    generation = checks["generation"]
    if generation is not None:
        parts.append(
            f"<h3>Generation parity</h3><p>Greedy answers of {html.escape(generation['artifact'])} and of "
            f"{html.escape(generation['reference'])} agree token for token on {generation['agree']} of "
            f"{generation['prompts']} held-out prompts ({100 * generation['rate']:.1f}%; at least "
            f"{100 * generation['min_rate']:.0f}% required), through the {html.escape(generation['path'])}.</p>"
        )
    if checks["imatrix"]:
        keys = ("perplexity", "kl_divergence", "top1_agreement", "task_exact_match")
        rows = "".join(
            f"<tr><td>{html.escape(qtype)}</td><td>{side}</td>"
            + "".join(f"<td>{number(record[side].get(k))}</td>" for k in keys)
            + "</tr>"
            for qtype, record in checks["imatrix"].items()
            for side in ("with", "without")
        )
        parts.append(
            "<h3>Importance matrix</h3><p>Each type made with the matrix (from the task's training data and prose) "
            "and without it, scored on prose the matrix never saw.</p>"
            "<table class='checks'><tr><th>type</th><th>matrix</th>"
            + "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys)
            + f"</tr>{rows}</table>"
        )
    return "<h2>Fidelity checks</h2>" + "".join(parts) if parts else ""


def cpu_html(backend: dict) -> str:
    amx = "AMX used" if backend["amx"] else "AMX not used"
    return (f"{html.escape(backend['build'])} build, CPU variant <strong id='cpu-variant'>"
            f"{html.escape(backend['variant'])}</strong> (<span id='cpu-features'>"
            f"{html.escape(feature_names(backend))}</span>; {amx})")  # fmt: skip


def render_html(metrics: dict, records: list[dict], plots: dict[str, bytes], checks: dict) -> str:
    gate = metrics["gate"]
    if gate["passed"]:
        verdict = "<p class='pass'>Quality gate passed: every quant is within the configured thresholds.</p>"
    else:
        items = "".join(f"<li>{html.escape(f)}</li>" for f in gate["failures"])
        verdict = f"<div class='fail'><p>Quality gate failed:</p><ul>{items}</ul></div>"
    thresholds = ", ".join(f"{k} = {v:g}" for k, v in gate["thresholds"].items())
    images = "".join(
        f"<figure><img class='plot' id='plot-{name}' alt='{name.replace('_', ' ')}' "
        f"src='data:image/png;base64,{base64.b64encode(data).decode()}'></figure>"
        for name, data in plots.items()
    )
    ev = metrics["eval"]
    task = "no task" if ev["task_rows"] is None else f"{ev['task_rows']} held-out task rows"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cpuforge report: {html.escape(metrics['model'])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.pass {{ background: #e3f4e3; border-left: 6px solid #2a8a2a; padding: 0.6em; }}
.fail {{ background: #fbe4e4; border-left: 6px solid #b22; padding: 0.6em; }}
figure {{ display: inline-block; margin: 0.5em; }}
img.plot {{ border: 1px solid #ddd; }}
</style></head>
<body>
<h1>cpuforge evaluation report: {html.escape(metrics['model'])}</h1>
<p>llama.cpp <code>{html.escape(metrics['llama_cpp_commit'])}</code>, {cpu_html(metrics['cpu_backend'])}.
Recommended thread counts for {html.escape(metrics['recommended_for'])}: generation
<strong id="recommended-threads">{metrics['recommended_threads']}</strong>, prompt processing
<strong id="recommended-threads-batch">{metrics['recommended_threads_batch']}</strong>
(each the fewest threads within {ev['bench_tolerance_pct']:g}% of the fastest).</p>
{verdict}
<p>Thresholds: {html.escape(thresholds)}.</p>
<h2>Stages</h2>
{stage_table(records)}
<p>Perplexity on the same {ev['scored_tokens']} scored tokens ({ev['windows']} windows of {ev['ctx']} tokens,
second halves scored; text sha256 <code>{ev['text_sha256'][:16]}</code>: {task}, then Python's documentation
topics); HF stages through torch in f32, GGUF stages through llama-perplexity. KL divergence and top-1 agreement
against the f16 GGUF (llama-perplexity --kl-divergence). f16 GGUF vs merged HF perplexity: relative difference
{metrics['f16_vs_merged_perplexity_rel_diff']:.2e}.</p>
<h2>Plots</h2>
{images}
{runtime_lora_html(metrics.get("runtime_lora", []))}
{checks_html(checks)}
<h2>Speed by thread count</h2>
{bench_table(records)}
<h2>Provenance</h2>
{provenance_html(records)}
<script>
// lets a headless browser's DOM dump say that every plot decoded
window.addEventListener("load", () => {{
  const plots = [...document.querySelectorAll("img.plot")];
  document.body.dataset.plotsDecoded = plots.filter((i) => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""


def make_report(model: str, stages: dict[str, Path], figures: Path, task: bool, serve: str, commit: str,
                thresholds: dict[str, float], runtime_lora: dict[str, Path] | None = None,
                adapters: list[Path] = ()) -> tuple[dict, list[dict], dict[str, bytes]]:  # fmt: skip
    records = [stage_record(stage, path, figures, task) for stage, path in stages.items()]
    relative_figures(records)
    by_stage = {r["stage"]: r for r in records}
    if serve not in by_stage or by_stage[serve]["kind"] != "gguf":
        raise InputError(f"--serve {serve}: not one of the GGUF stages ({', '.join(by_stage)}).")
    reference = read_json(figures / "perplexity" / f"{REFERENCE}.json")
    bench = read_json(figures / "bench" / f"{serve}.json")
    failures = quality_gate(records, thresholds["max_ppl_increase_pct"], thresholds["max_kl_divergence"],
                            thresholds["min_accuracy"])  # fmt: skip
    settings = {
        "text_sha256": reference["text_sha256"],
        "ctx": reference["ctx"],
        "windows": reference["windows"],
        "scored_tokens": reference["scored_tokens"],
        "task_rows": by_stage[serve].get("rows"),
        **{f"bench_{k}": bench[k] for k in ("prompt_tokens", "gen_tokens", "repetitions", "tolerance_pct")},
    }
    f16_vs_merged = abs(by_stage[REFERENCE]["perplexity"] / by_stage["merged"]["perplexity"] - 1)
    metrics = {
        "model": model,
        "llama_cpp_commit": commit,
        # the CPU code that ran the benchmark: the build's flavour, the variant ggml picked, its features
        "cpu_backend": bench["cpu_backend"],
        # the serving commands read these keys
        "recommended_threads": by_stage[serve]["recommended_threads"],
        "recommended_threads_batch": by_stage[serve]["recommended_threads_batch"],
        "recommended_for": serve,
        "eval": settings,
        "f16_vs_merged_perplexity_rel_diff": f16_vs_merged,
        "gate": {"thresholds": thresholds, "passed": not failures, "failures": failures},
        "stages": [{k: v for k, v in r.items() if k != "provenance"} for r in records],
        "runtime_lora": runtime_lora_rows(runtime_lora or {}, list(adapters), records, figures, task),
        "provenance": {r["stage"]: r["provenance"] for r in records},
    }
    plots = {
        "throughput": plot_throughput(records, serve, metrics["recommended_threads"]),
        "size_vs_perplexity": plot_size_vs_perplexity(records),
        "accuracy": plot_accuracy(records),
    }
    return metrics, records, plots
