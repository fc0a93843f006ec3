"""The evaluation report: metrics.json's record (cpuforge.evaluate.records), the quality gate
(cpuforge.evaluate.gate) and the plots (cpuforge.evaluate.plots), shown as one self-contained report.html.

The page is report.html beside this module, a string.Template; the functions here make the parts that
depend on the figures: one row per stage, each quant merged beside its unmerged base with the adapters
applied at run time (when they can be), the three plots embedded as PNG, the quality gate's verdict, the
fidelity checks the workflow made (tokenizer and chat-template parity of each GGUF, greedy generation
parity, each quant with and without the importance matrix) and the provenance sidecar of every artifact.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from string import Template

from cpuforge.evaluate.gate import Gate
from cpuforge.evaluate.plots import draw
from cpuforge.evaluate.records import gather
from cpuforge.llama.runtime import feature_names

PAGE = Path(__file__).with_name("report.html")


def make_report(model: str, stages: dict[str, Path], figures: Path, task: bool, serve: str, commit: str,
                gate: Gate, runtime_lora: dict[str, Path] | None = None, adapters: list[Path] = (),
                checks: list[Path] = (), auto_search: Path | None = None) -> tuple[dict, str, dict[str, bytes]]:  # fmt: skip
    """metrics.json's record, report.html's text and the plots (PNG bytes by name)."""
    metrics, records = gather(model, stages, figures, task, serve, commit, gate, runtime_lora, adapters, checks,
                              auto_search)  # fmt: skip
    plots = draw(records, serve, metrics["recommended_threads"], metrics["auto_quant"])
    return metrics, render_html(metrics, records, plots), plots


def number(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def speed(value) -> str:
    return "–" if value is None else f"{value:,.1f}"


def stage_table(records: list[dict]) -> str:
    head = ("stage", "size", "size vs f16", "perplexity", "vs f16", "KL div. (mean)", "top-1 agreement",
            "task accuracy", "answers as f16's", "right→wrong", "wrong→right", "best pp t/s", "best tg t/s",
            "threads")  # fmt: skip
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
            *fidelity_cells(r.get("fidelity")),
            speed(max((b["pp_tps"] for b in bench), default=None)),
            speed(max((b["tg_tps"] for b in bench), default=None)),
            str(r.get("recommended_threads", "–")),
        )
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    return f"<table class='stages'>{header}{''.join(rows)}</table>"


def fidelity_cells(f: dict | None) -> tuple[str, str, str]:
    """Agreement with the f16 GGUF's answers (and the bound on disagreeing) and the flips, as table cells."""
    if f is None:
        return ("–", "–", "–")
    return (f"{f['agree']}/{f['rows']} (≤ {f['disagreement_bound'] * 100:.1f}% differ)", str(f["worse"]),
            str(f["better"]))


def bench_table(records: list[dict]) -> str:
    rows = []
    for r in (r for r in records if r["kind"] == "gguf"):
        for b in r["bench"]:
            rows.append(f"<tr><td>{html.escape(r['label'])}</td><td>{b['threads']}</td>"
                        f"<td>{b['pp_tps']:,.1f} ± {b['pp_tps_std']:,.1f}</td>"
                        f"<td>{b['tg_tps']:,.1f} ± {b['tg_tps_std']:,.1f}</td><td>{r['bytes_per_token'] / 1e6:,.1f}</td>"
                        f"<td>{b['tg_gbps']:,.1f}</td><td>{b['read_gbps']:,.1f}</td>"
                        f"<td>{100 * b['tg_bandwidth_fraction']:.0f} %</td></tr>")  # fmt: skip
    return ("<table><tr><th>stage</th><th>threads</th><th>prompt processing t/s</th><th>generation t/s</th>"
            "<th>MB read per token</th><th>generation GB/s</th><th>read bandwidth GB/s</th><th>of the bound</th></tr>"
            + "".join(rows) + "</table>")  # fmt: skip


def bandwidth_sentence(metrics: dict) -> str:
    g = metrics["generation_bandwidth"]
    return (f"At {g['threads']} threads its generation reads {g['tg_gbps']:.1f} GB/s ({g['tg_tps']:.1f} tokens/s × "
            f"{g['bytes_per_token'] / 1e6:.1f} MB per token), {100 * g['fraction']:.0f} % of the {g['read_gbps']:.1f} GB/s "
            "this machine's memory gave a read-only kernel at that thread count in the same job.")  # fmt: skip


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


def auto_quant_html(auto: dict | None) -> str:
    """The quant search: every candidate measured, in the objective's order, with the gate's verdict and what
    beats it."""
    if auto is None:
        return "<p>No quant search (add <code>auto</code> to quant_types).</p>"

    def verdict(c: dict) -> str:
        if not c.get("verified"):
            return f"not verified: {c['pruned_by']} passes and beats it"
        words = "passes" if c["passed"] else "; ".join(c["misses"])
        if c["name"] == auto["chosen"]:
            words += " (chosen)"
        if c.get("dominated_by"):
            words += f"; beaten by {c['dominated_by']}"
        return words

    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in (
            c["name"], f"{c['size_bytes'] / 2**20:.1f}", f"{c['bpw']:.2f}", speed(c.get("screen_tg_tps")),
            speed(c.get("tg_tps")),
            "–" if "kl_divergence" not in c else f"{c['kl_divergence']:.4g} ± {c.get('kl_divergence_err', 0):.2g}",
            *fidelity_cells(c.get("fidelity")), verdict(c))) + "</tr>"
        for c in auto["candidates"]
    )  # fmt: skip
    b = auto["bench"]
    return (f"<p>Objective: {html.escape(auto['objective'])}; speeds from llama-bench on {html.escape(b['cpu'])} "
            f"({html.escape(b['backend'])}), {b['threads']} threads, {b['repetitions']} rounds of at least "
            f"{b['gen_tokens']} tokens, "
            f"side by side: every candidate on its screen file (its types on an evenly spaced cut of the layers, "
            f"nothing quantized), the passing ones again whole; speeds within {auto['tolerance'] * 100:g} % of one "
            f"run are a tie. {len(auto['candidates'])} "
            f"candidates, {auto['seconds']:.0f} s; the recipe is <code>auto/recipe.txt</code>. The chosen file, "
            f"measured again as the stage auto above, {'passes' if auto['passes'] else 'fails'} the gate.</p>"
            "<table><tr><th>candidate</th><th>MiB</th><th>bpw</th><th>screen tg t/s</th><th>tg t/s</th><th>KL ±</th><th>answers as f16's</th>"
            f"<th>right→wrong</th><th>wrong→right</th><th>gate</th></tr>{rows}</table>")  # fmt: skip


def speculation_html(spec: dict | None) -> str:
    """Draftless speculation against plain decoding: a row per setting, and the verdict scripts.serve follows."""
    if spec is None:
        return "<p>Not measured: the model has no task whose prompts to measure it on.</p>"

    def row(name: str, r: dict) -> str:
        accepted = "–" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f} % of {r['drafted']}"
        same = "yes" if r["same_answers"] else f"no: rows {', '.join(map(str, r['differing_rows']))} differ"
        cells = [name, f"{r['tg_tps']:,.1f}", accepted, same]
        return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"

    rows = "".join(row(name, r) for name, r in spec["settings"].items())
    return (f"<p id='speculation-verdict'>{html.escape(spec['sentence'])}</p><p>{spec['stage']} through llama-server "
            f"at {spec['threads']} threads, the {spec['rows']} held-out prompts greedy, up to {spec['max_new_tokens']} "
            f"tokens each; every setting in turns, {spec['rounds']} rounds, each its best.</p><table><tr>"
            "<th>setting</th><th>generation t/s</th><th>drafts accepted</th><th>same answers</th></tr>"
            f"{rows}</table>")  # fmt: skip


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


def render_html(metrics: dict, records: list[dict], plots: dict[str, bytes]) -> str:
    gate = metrics["gate"]
    if gate["passed"]:
        verdict = "<p class='pass'>Quality gate passed: every quant is within the configured thresholds.</p>"
    else:
        items = "".join(f"<li>{html.escape(f)}</li>" for f in gate["failures"])
        verdict = f"<div class='fail'><p>Quality gate failed:</p><ul>{items}</ul></div>"
    images = "".join(
        f"<figure><img class='plot' id='plot-{name}' alt='{name.replace('_', ' ')}' "
        f"src='data:image/png;base64,{base64.b64encode(data).decode()}'></figure>"
        for name, data in plots.items()
        if name != "frontier" or metrics["auto_quant"] is not None  # no search, no frontier on the page
    )
    ev = metrics["eval"]
    return Template(PAGE.read_text(encoding="utf-8")).substitute(
        model=html.escape(metrics["model"]),
        llama_cpp_commit=html.escape(metrics["llama_cpp_commit"]),
        cpu_backend=cpu_html(metrics["cpu_backend"]),
        recommended_for=html.escape(metrics["recommended_for"]),
        recommended_threads=metrics["recommended_threads"],
        recommended_threads_batch=metrics["recommended_threads_batch"],
        bandwidth=html.escape(bandwidth_sentence(metrics)),
        bench_tolerance_pct=f"{ev['bench_tolerance_pct']:g}",
        decision=html.escape(metrics["decision"]),
        verdict=verdict,
        thresholds=html.escape(Gate(**gate["thresholds"]).describe()),
        certifies=html.escape(metrics["certifies"] or ""),
        stage_table=stage_table(records),
        scored_tokens=ev["scored_tokens"],
        windows=ev["windows"],
        ctx=ev["ctx"],
        text_sha256=ev["text_sha256"][:16],
        task="no task" if ev["task_rows"] is None else f"{ev['task_rows']} held-out task rows",
        f16_vs_merged=f"{metrics['f16_vs_merged_perplexity_rel_diff']:.2e}",
        images=images,
        runtime_lora=runtime_lora_html(metrics.get("runtime_lora", [])),
        auto_quant=auto_quant_html(metrics["auto_quant"]),
        checks=checks_html(metrics["checks"]),
        bench_table=bench_table(records),
        speculation=speculation_html(metrics["speculation"]),
        provenance=provenance_html(records),
    )
