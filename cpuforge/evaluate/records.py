"""The figures of every stage gathered into one record: the metrics.json that the report shows, the
quality gate judges and the serving commands read (recommended thread counts).

The figures are the JSON files the evaluation steps wrote under the figures folder (perplexity/,
kl_divergence/, task/, bench/, runtime_lora/), the provenance sidecar of each artifact and the
fidelity checks' records (results/{model}/checks/*.json)."""

from __future__ import annotations

from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.evaluate.fidelity import certifies, compare
from cpuforge.evaluate.gate import Gate, judge, stage_figures
from cpuforge.evaluate.stages import AUTO, HF_STAGES, REFERENCE, label
from cpuforge.evaluate.task import read_answers
from cpuforge.io.files import read_json, size_on_disk
from cpuforge.constants import MIB


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
                      recommended_threads_batch=speed["recommended_threads_batch"],
                      bytes_per_token=speed["bytes_per_token"]["total"])  # fmt: skip
    record["provenance"] = read_provenance(path)
    return record


def relative_figures(records: list[dict], figures: Path, task: bool, confidence: float) -> None:
    """Size and perplexity of every stage relative to the f16 GGUF, and each quant's answers beside the f16
    GGUF's, row by row (`fidelity`, `per_row`)."""
    f16 = next(r for r in records if r["stage"] == REFERENCE)
    reference = read_answers(figures / "task" / f"{REFERENCE}.json") if task else None
    for r in records:
        r["size_vs_f16"] = r["size_bytes"] / f16["size_bytes"]
        r["ppl_increase_vs_f16_pct"] = (r["perplexity"] / f16["perplexity"] - 1) * 100
        if reference and r["kind"] == "gguf" and r["stage"] != REFERENCE:
            mine = read_answers(figures / "task" / f"{r['stage']}.json", len(reference["answers"]))
            agree = [a == b for a, b in zip(mine["answers"], reference["answers"], strict=True)]
            r["per_row"] = {"agree": agree, "right": mine["right"]}
            r["fidelity"] = compare(reference["right"], mine["right"], agree, confidence)


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


def generation_bandwidth(record: dict) -> dict:
    """A GGUF stage's generation at its recommended thread count: tokens/s x bytes per token, and the fraction
    of the read bandwidth measured at that thread count in the same job."""
    run = next(b for b in record["bench"] if b["threads"] == record["recommended_threads"])
    return {"threads": run["threads"], "bytes_per_token": record["bytes_per_token"], "tg_tps": run["tg_tps"],
            "tg_gbps": run["tg_gbps"], "read_gbps": run["read_gbps"], "fraction": run["tg_bandwidth_fraction"]}  # fmt: skip


def auto_quant_summary(search: dict, records: list[dict], gate: Gate) -> dict:
    """The quant search beside the report's own figures: its record, and whether the chosen file, measured
    again as a stage of the report, still passes the gate."""
    auto = next(r for r in records if r["stage"] == AUTO)
    return {**search, "passes": not gate.misses(stage_figures(auto))}


def describe_file(r: dict) -> str:
    """A candidate's or a stage's figures in words: speed, size, agreement with the f16 GGUF and its bound."""
    f = r.get("fidelity")
    words = [f"{r['tg_tps']:.1f} tokens/s", f"{r['size_bytes'] / MIB:.1f} MiB"]
    if f:
        words.append(f"the f16 GGUF's answer on {f['agree']}/{f['rows']} held-out rows (at "
                     f"{f['confidence'] * 100:g} % it differs on at most {f['disagreement_bound'] * 100:.1f} %)")  # fmt: skip
    words.append(f"KL {r['kl_divergence']:.3g}")
    return ", ".join(words)


def decision(model: str, records: list[dict], auto: dict | None, gate: Gate) -> str:
    """The report's first sentence: the file to ship, and why, with what was measured beside it."""
    if auto is not None:
        chosen = next(c for c in auto["candidates"] if c["name"] == auto["chosen"])
        passing = [c for c in auto["candidates"] if c.get("passed") and c is not chosen]
        others = "; ".join(f"{c['name']}: {describe_file(c)}" for c in sorted(passing, key=lambda c: -c["tg_tps"])[:3])
        measured = f"of the {len(auto['candidates'])} candidates measured that answer like the fine-tune"
        if auto["objective"] == "speed":
            why = f"the fastest on {auto['bench']['cpu']} ({auto['bench']['threads']} threads) {measured}"
        elif auto["objective"] == "size":
            why = f"the smallest {measured}"
        else:
            why = f"the {auto['objective']}, which {'passes' if chosen['passed'] else 'misses'} the gate"
        return (f"Ship results/{model}/ggml-model-auto.gguf ({chosen['name']}): {why}: {describe_file(chosen)}"
                + (f". Passing beside it: {others}" if others else "")
                + ". A file chosen for speed on one CPU should be decided again on another.")  # fmt: skip
    quants = [r for r in records if r["kind"] == "gguf" and r["stage"] != REFERENCE]
    passing = [r for r in quants if not gate.misses(stage_figures(r))]
    if not passing:
        return f"No quant of {model} here passes the quality gate; see its failures below."
    passing = [{**r, "tg_tps": generation_bandwidth(r)["tg_tps"]} for r in passing]
    best = max(passing, key=lambda r: r["tg_tps"])
    return (f"Ship results/{model}/ggml-model-{best['stage']}.gguf: the fastest of the {len(passing)} quants here "
            f"that pass the gate ({describe_file(best)}). Their speeds come from separate runs; add auto to "
            "quant_types for a decision measured side by side.")  # fmt: skip


def gather(model: str, stages: dict[str, Path], figures: Path, task: bool, serve: str, commit: str,
           gate: Gate, runtime_lora: dict[str, Path] | None = None, adapters: list[Path] = (),
           checks: list[Path] = (), auto_search: Path | None = None) -> tuple[dict, list[dict]]:  # fmt: skip
    """metrics.json's record, and the stages' records (with their provenance) that the report shows."""
    records = [stage_record(stage, path, figures, task) for stage, path in stages.items()]
    relative_figures(records, figures, task, gate.confidence)
    by_stage = {r["stage"]: r for r in records}
    if serve not in by_stage or by_stage[serve]["kind"] != "gguf":
        raise InputError(f"--serve {serve}: not one of the GGUF stages ({', '.join(by_stage)}).")
    search = read_json(auto_search) if auto_search else None
    reference = read_json(figures / "perplexity" / f"{REFERENCE}.json")
    bench = read_json(figures / "bench" / f"{serve}.json")
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
        # generation against the memory bus, at the recommended thread count (cpuforge.evaluate.bandwidth)
        "generation_bandwidth": generation_bandwidth(by_stage[serve]),
        "eval": settings,
        "f16_vs_merged_perplexity_rel_diff": f16_vs_merged,
        "decision": decision(model, records, search, gate),
        "gate": judge(records, gate),
        # what the held-out rows can certify about any quant
        "certifies": certifies(by_stage[serve]["rows"], gate.confidence, gate.max_disagreement) if task else None,
        "stages": [{k: v for k, v in r.items() if k != "provenance"} for r in records],
        "runtime_lora": runtime_lora_rows(runtime_lora or {}, list(adapters), records, figures, task),
        "provenance": {r["stage"]: r["provenance"] for r in records},
        "checks": read_checks(list(checks)),
        "auto_quant": auto_quant_summary(search, records, gate) if search else None,
        # draftless speculative decoding on the served stage, and whether scripts.serve turns it on
        "speculation": read_json(figures / "speculation" / f"{serve}.json") if task else None,
    }
    return metrics, records
