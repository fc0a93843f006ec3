"""The quant search's choice beside every uniform type of its ladder, measured side by side in one run.

    python -m benchmarks.auto_quant --workdir /work/demo-clone --model demo
    python -m benchmarks.auto_quant --workdir /work/demo-clone --types --listed q4_0 iq3_xxs iq2_xxs
    python -m benchmarks.scale --shape 1b --target auto_quant --auto --keep
    python -m benchmarks.auto_quant --workdir /tmp/cpuforge-scale/1b --model scale --configfile config.yaml

Reads a working directory where `snakemake auto_quant` has run (the f16 GGUF, the importance matrix, the
merged model, the search's record and chosen file). For each type of the ladder it makes the uniform file
(llama-quantize --pure with the importance matrix: every matrix in that type, as far as its rows allow)
and, with --listed, each llama-quantize type as `quant_types` makes it (llama-quantize's own mix for the
type, which keeps the embeddings and the output larger, with the importance matrix: the files a user
picks from today); it measures each as the search measured its candidates: size, bits per weight of the
matrices, KL divergence and top-1 agreement against the f16 GGUF (the f16 log-probabilities made again
here, on the report's text), task accuracy on the held-out rows, and llama-bench's pp/tg tokens/s; then
the chosen file the same way. Last, the search's wall time (sensitivity + search, from Snakemake's
benchmark files) as a ratio to the q4_0 KL stage and to KL + task of q4_0, both timed here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# each ladder type as the llama-quantize type whose matrices get it
UNIFORM = {"q8_0": "q8_0", "q6_K": "q6_k", "q5_K": "q5_k_s", "q5_0": "q5_0", "q4_K": "q4_k_s", "q4_0": "q4_0",
           "iq4_nl": "iq4_nl", "iq4_xs": "iq4_xs", "q3_K": "q3_k_s", "iq3_s": "iq3_s", "iq3_xxs": "iq3_xxs",
           "q2_K": "q2_k", "iq2_s": "iq2_m", "iq2_xs": "iq2_xs", "iq2_xxs": "iq2_xxs"}  # fmt: skip


def snakemake_seconds(workdir: Path, model: str, rule: str) -> float:
    import csv

    with open(workdir / "benchmarks" / model / f"{rule}.tsv") as f:
        return float(next(csv.DictReader(f, delimiter="\t"))["s"])


def measure(bin_dir: Path, gguf: Path, logits: Path, ctx: int, merged: Path, rows: list[dict], max_new: int,
            threads: int) -> dict:  # fmt: skip
    from cpuforge.evaluate.bench import bench
    from cpuforge.evaluate.perplexity import kl_divergence
    from cpuforge.evaluate.task import answers_gguf
    from cpuforge.text.task import answer

    started = time.monotonic()
    kl = kl_divergence(bin_dir, gguf, logits, ctx, threads)
    kl_seconds = time.monotonic() - started
    answers = answers_gguf(gguf, bin_dir, merged, rows, max_new, threads) if rows else []
    task_seconds = time.monotonic() - started - kl_seconds
    speed = bench(bin_dir, gguf, [threads], 128, 32, 2)
    return {"size_bytes": gguf.stat().st_size, "kl": kl["kl_divergence"], "top1": kl["top1_agreement"],
            "ppl": kl["perplexity"], "correct": sum(a == answer(r) for a, r in zip(answers, rows, strict=True)),
            "pp": speed[0]["pp_tps"], "tg": speed[0]["tg_tps"], "kl_seconds": kl_seconds,
            "task_seconds": task_seconds}  # fmt: skip


def matrix_bpw(gguf: Path) -> float:
    from cpuforge.autoquant.sensitivity import quantizable
    from cpuforge.io.gguf import read_header

    tensors = [t for t in read_header(gguf).tensors.values() if quantizable(t.name, t.shape)]
    return 8 * sum(t.n_bytes for t in tensors) / sum(t.n_elements for t in tensors)


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
    parser.add_argument("--listed", nargs="*", default=[],
                        help="llama-quantize types (q4_0, iq3_xxs, …) also made as quant_types makes them: "
                             "llama-quantize's own mix for the type, with the importance matrix")  # fmt: skip
    args = parser.parse_args()
    unknown = [kind for kind in args.types or [] if kind not in UNIFORM]
    if unknown:
        parser.error(f"--types {' '.join(unknown)}: not a ladder type ({', '.join(UNIFORM)}).")
    if args.types is not None and "q4_0" not in args.types + args.listed:
        parser.error("--types or --listed must hold q4_0: the search's time is a ratio to q4_0's evaluation.")
    import subprocess

    from cpuforge.evaluate.perplexity import perplexity_gguf
    from cpuforge.text.task import read_heldout

    config = run_config(args.configfile and args.workdir / args.configfile)
    bin_dir = args.llama_bin or next((REPO / "build" / "llama.cpp").glob("*/native/bin"))
    results = args.workdir / "results" / args.model
    model = next(m for m in config["models"] if m["name"] == args.model)
    heldout = model.get("task_data", {}).get("heldout") or (REPO / "data" / "demo_task" / "heldout.jsonl")
    rows = read_heldout(heldout)
    ev = config["eval"]
    search = json.loads((results / "auto" / "search.json").read_text())
    rows_out = []
    header = f"{'file':22} {'MiB':>8} {'bpw':>5} {'KL':>8} {'top-1':>6} {'task':>6} {'pp t/s':>8} {'tg t/s':>8}"
    print(header)

    def show(name: str, gguf: Path) -> dict:
        m = measure(bin_dir, gguf, logits, ev["ctx"], results / "merged", rows, ev["max_new_tokens"], args.threads)
        m |= {"name": name, "bpw": matrix_bpw(gguf)}
        print(f"{name:22} {m['size_bytes'] / 2**20:>8.1f} {m['bpw']:>5.2f} {m['kl']:>8.4f} {m['top1']:>6.3f} "
              f"{m['correct']:>3}/{len(rows):<2} {m['pp']:>8.1f} {m['tg']:>8.1f}", flush=True)  # fmt: skip
        rows_out.append(m)
        return m

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        logits = Path(tmp) / "f16.kld"
        perplexity_gguf(bin_dir, results / "ggml-model-f16.gguf", results / "report" / "eval_text.txt", ev["ctx"],
                        ev["chunks"], args.threads, logits)  # fmt: skip
        ladder = config["auto_quant"]["types"] if args.types is None else args.types
        made = [("uniform", kind, ["--pure"], UNIFORM[kind]) for kind in ladder]
        made += [("listed", kind, [], kind) for kind in args.listed]
        for how, kind, flags, ftype in made:
            out = Path(tmp) / f"{how}-{kind}.gguf"
            subprocess.run([str(bin_dir / "llama-quantize"), *flags, "--imatrix", str(results / "imatrix.gguf"),
                            str(results / "ggml-model-f16.gguf"), str(out), ftype.upper(), str(args.threads)],
                           check=True, capture_output=True)  # fmt: skip
            show(f"{how} {kind}", out)
            out.unlink()
        chosen = show("auto (chosen)", results / "ggml-model-auto.gguf")
    q4_0 = next(m for m in rows_out if m["name"] in ("uniform q4_0", "listed q4_0"))
    searched = snakemake_seconds(args.workdir, args.model, "measure_sensitivity")
    searched += snakemake_seconds(args.workdir, args.model, "auto_quant_search")
    print(f"search: {searched:.0f} s (sensitivity + search, Snakemake's benchmark files), {len(search['candidates'])} "
          f"candidates; q4_0 here: KL {q4_0['kl_seconds']:.0f} s, task {q4_0['task_seconds']:.0f} s; ratio to the KL "
          f"stage {searched / q4_0['kl_seconds']:.2f}, to KL + task {searched / (q4_0['kl_seconds'] + q4_0['task_seconds']):.2f}")  # fmt: skip
    for how in ("uniform", "listed"):
        passing = [m for m in rows_out if m["name"].startswith(how) and m["kl"] <= ev["gate"]["max_kl_divergence"]
                   and m["correct"] >= ev["gate"]["min_accuracy"] * len(rows)]  # fmt: skip
        if passing:
            smallest = min(passing, key=lambda m: m["size_bytes"])
            print(f"smallest {how} type within the gate's KL and accuracy: {smallest['name']} "
                  f"({smallest['size_bytes'] / 2**20:.1f} MiB); the chosen file is "
                  f"{(1 - chosen['size_bytes'] / smallest['size_bytes']) * 100:.1f} % smaller")  # fmt: skip


if __name__ == "__main__":
    main()
