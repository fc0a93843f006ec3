"""The quant search's choice beside every candidate class, measured side by side in one run.

    python -m benchmarks.auto_quant --workdir WORKDIR --model demo
    python -m benchmarks.auto_quant --workdir WORKDIR --types q8_0 q4_0 iq4_nl iq3_xxs --listed q4_0 q4_k_m

Reads a working directory where `snakemake auto_quant` has run (the f16 GGUF, the importance matrix, the
merged model, the search's record and chosen file, Snakemake's benchmark files). Makes again, as the search
makes them, each ladder type as a uniform file (llama-quantize --pure with the importance matrix) and each
listed type as llama-quantize makes it, with and without the importance matrix; measures each, and the
chosen file, as the search measures a candidate: size, KL divergence ± against the f16 GGUF, agreement with
the f16 GGUF's answers on the held-out rows and the flips (teacher-forced), exact-match accuracy, the gate's
verdict; then one llama-bench run over every file, side by side (prompt and generation tokens/s). Last, the
search's wall time (sensitivity + search) as a ratio to q4_0's eval_kl_divergence + eval_task, from
Snakemake's benchmark files.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def snakemake_seconds(workdir: Path, model: str, rule: str) -> float | None:
    path = workdir / "logs" / "benchmarks" / model / f"{rule}.tsv"
    if not path.is_file():
        return None
    with open(path) as f:
        return float(next(csv.DictReader(f, delimiter="\t"))["s"])


def run_config(path: Path | None) -> dict:
    """The run's config with the schema's defaults, as Snakemake gives it to the rules."""
    import yaml
    from snakemake.utils import validate

    config = yaml.safe_load((path or REPO / "config.yaml").read_text())
    validate(config, str(REPO / "schemas" / "config.schema.yaml"))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--configfile", type=Path, help="the run's config (default: the repository's config.yaml)")
    parser.add_argument("--llama-bin", type=Path, help="default: this repository's native build")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", nargs="*", help="ladder types to measure (default: the config's auto_quant.types)")
    parser.add_argument("--listed", nargs="*", help="llama-quantize types as quant_types makes them (default: the "
                                                    "config's quant_types)")  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    from cpuforge.llama.ggml import ggml_type, type_name
    from cpuforge.llama.quant import QUANTS, TENSOR_TYPES

    ladder = args.types
    unknown = [kind for kind in ladder or [] if kind.lower() not in TENSOR_TYPES]
    if unknown:
        parser.error(f"--types {' '.join(unknown)}: not a ladder type ({', '.join(TENSOR_TYPES)}).")
    unknown = [kind for kind in args.listed or [] if kind.lower() not in QUANTS]
    if unknown:
        parser.error(f"--listed {' '.join(unknown)}: not a llama-quantize type.")
    if ladder is not None and args.listed is not None and "q4_0" not in [*map(str.lower, ladder), *args.listed]:
        parser.error("--types or --listed must hold q4_0: the search's time is a ratio to q4_0's evaluation.")

    from cpuforge import catalogue
    from cpuforge.autoquant.tensors import Tensors
    from cpuforge.autoquant.verify import Inputs, file_figures, plan_files, verify
    from cpuforge.evaluate.bench import bench_side_by_side
    from cpuforge.evaluate.gate import Gate
    from cpuforge.evaluate.task import read_answers
    from cpuforge.text.task import read_heldout

    config = run_config(args.configfile and args.workdir / args.configfile)
    bin_dir = args.llama_bin or next((REPO / "build" / "llama.cpp").glob("*/native/bin"))
    results = args.workdir / "results" / args.model
    model = next(m for m in config["models"] if m["name"] == args.model)
    heldout = model.get("task_data", {}).get("heldout") or (REPO / "data" / "demo_task" / "heldout.jsonl")
    rows = read_heldout(heldout)
    ev = config["eval"]
    ladder = [type_name(ggml_type(t)) for t in (ladder or config["auto_quant"]["types"])]
    listed = args.listed if args.listed is not None else [q for q in config["quant_types"] if q != "auto"]
    record = json.loads((results / "auto" / "search.json").read_text())
    gate = Gate(**ev["gate"])
    from cpuforge.evaluate.perplexity import perplexity_gguf

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        logits = Path(tmp) / "f16.kld"
        perplexity_gguf(bin_dir, results / "ggml-model-f16.gguf", results / "report" / "eval_text.txt", ev["ctx"],
                        ev["chunks"], args.threads, logits)  # fmt: skip
        tensors = Tensors(bin_dir, results / "ggml-model-f16.gguf", results / "imatrix.gguf", Path(tmp) / "tensors",
                          args.threads)  # fmt: skip
        inp = Inputs(bin_dir, results / "ggml-model-f16.gguf", results / "imatrix.gguf", tensors, logits, ev["ctx"],
                     results / "merged", rows, ev["max_new_tokens"], args.threads, Path(tmp) / "c", gate, "speed",
                     ev["bench"]["tolerance_pct"] / 100, args.gen_tokens, args.repetitions,
                     read_answers(args.workdir / catalogue.figure(args.model, "task", "f16"), len(rows)))  # fmt: skip
        candidates = plan_files(inp, ladder, listed)
        inp.files["auto (chosen)"] = results / "ggml-model-auto.gguf"
        candidates.append({"name": "auto (chosen)", **file_figures(inp.files["auto (chosen)"])})
        for c in candidates:
            verify(inp, c, whole=True)
        rows_of = bench_side_by_side(bin_dir, [inp.files[c["name"]] for c in candidates], args.threads,
                                     args.gen_tokens, args.repetitions, args.prompt_tokens)  # fmt: skip
        speeds = {c["name"]: r for c, r in zip(candidates, rows_of, strict=True)}
    print(f"{'file':22} {'MiB':>7} {'bpw':>5} {'KL ±':>15} {'as f16':>6} {'r->w':>4} {'w->r':>4} {'task':>6} "
          f"{'pp t/s':>13} {'tg t/s':>13}  gate")  # fmt: skip
    for c in candidates:
        f, s = c["fidelity"], speeds[c["name"]]
        print(f"{c['name']:22} {c['size_bytes'] / 2**20:>7.1f} {c['bpw']:>5.2f} "
              f"{c['kl_divergence']:>7.4f} ± {c['kl_divergence_err']:.4f} {f['agree']:>3}/{f['rows']:<2} {f['worse']:>4} "
              f"{f['better']:>4} {c['correct']:>3}/{c['rows']:<2} {s['pp_tps']:>6.1f} ± {s['pp_tps_std']:<4.1f} "
              f"{s['tg_tps']:>6.1f} ± {s['tg_tps_std']:<4.1f}  {'passes' if not c['misses'] else '; '.join(c['misses'])}")  # fmt: skip
    searched = [snakemake_seconds(args.workdir, args.model, r) for r in ("measure_sensitivity", "auto_quant_search")]
    q4 = [snakemake_seconds(args.workdir, args.model, r) for r in ("eval_kl_divergence_q4_0", "eval_task_q4_0")]
    f16_answers = snakemake_seconds(args.workdir, args.model, "eval_task_f16")
    if None in searched or None in q4:
        print("search time: run `snakemake eval_report` with quant_types [q4_0, auto] for Snakemake's benchmark files")
    else:
        print(f"search: {sum(searched):.0f} s (sensitivity + search), chose {record['chosen']} of "
              f"{len(record['candidates'])} candidates; q4_0's KL + task {sum(q4):.0f} s; ratio "
              f"{sum(searched) / sum(q4):.2f}; the f16 GGUF's answers, which the search reads from the report's "
              f"eval_task, {f16_answers or 0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
