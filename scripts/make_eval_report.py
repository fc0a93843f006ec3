"""Gather every stage's figures into metrics.json and a self-contained report.html, and judge the quality gate.

    python -m scripts.make_eval_report --model-name demo --stage base=resources/demo/base \
        --stage merged=results/demo/merged --stage f16=results/demo/ggml-model-f16.gguf \
        --stage q4_0=results/demo/ggml-model-q4_0.gguf --figures results/demo/report --task --serve q4_0 \
        --html report.html --metrics metrics.json --plots throughput.png size.png accuracy.png

The figures are the JSON files the evaluation steps wrote under --figures
(perplexity/, kl_divergence/, task/, bench/). The report shows one row per stage,
three matplotlib plots embedded as PNG, the quality gate's verdict, the fidelity
checks the workflow made (--checks FILE...: tokenizer and chat-template parity of each
GGUF, greedy generation parity, each quant with and without the importance
matrix) and the provenance sidecar of every artifact. The gate is judged here and written into
metrics.json; check_quality_gate fails the workflow on it, so a failing report
is still on disk to be read.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import run
from cpuforge.io.files import atomic_output, write_json
from cpuforge.evaluate.gate import Gate
from cpuforge.evaluate.report import make_report
from cpuforge.evaluate.stages import parse_stages

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--stage", action="append", required=True, help="NAME=PATH, in report order")
    parser.add_argument("--figures", type=Path, required=True, help="folder of the evaluation steps' JSON files")
    parser.add_argument("--task", action="store_true", help="the model has a task: read task/<stage>.json")
    parser.add_argument("--checks", type=Path, nargs="*", default=[], help="the fidelity checks' JSON files")
    parser.add_argument("--runtime-lora", action="append", default=[], metavar="QTYPE=BASE_GGUF",
                        help="a quant type's unmerged base; its figures under runtime_lora/")  # fmt: skip
    parser.add_argument("--adapters", type=Path, nargs="*", default=[], help="the GGUF LoRA files applied to it")
    parser.add_argument("--serve", default="q4_0", help="GGUF stage whose recommended thread count is reported")
    parser.add_argument("--llama-cpp-commit", default="unknown")
    parser.add_argument("--gate", nargs="*", default=[], metavar="KEY=VALUE", help="eval.gate's limits")
    parser.add_argument("--html", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--auto-search", type=Path, help="the quant search's record, where `auto` is a stage")
    parser.add_argument("--plots", type=Path, nargs=4, required=True,
                        metavar=("THROUGHPUT", "SIZE_VS_PERPLEXITY", "ACCURACY", "FRONTIER"))  # fmt: skip
    args = parser.parse_args()
    gate = Gate.parse(args.gate)
    import matplotlib

    matplotlib.use("Agg")
    runtime_lora = parse_stages(args.runtime_lora, "--runtime-lora", reference=False)
    metrics, page, plots = make_report(args.model_name, parse_stages(args.stage), args.figures, args.task,
                                       args.serve, args.llama_cpp_commit, gate, runtime_lora, args.adapters,
                                       args.checks, args.auto_search)  # fmt: skip
    for path, data in zip(args.plots, plots.values(), strict=True):
        with atomic_output(path) as tmp:
            tmp.write_bytes(data)
    with atomic_output(args.html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    write_json(args.metrics, metrics)
    for r in metrics["stages"]:
        log.info("%-12s %8.1f MiB  ppl %.4f  %s", r["stage"], r["size_bytes"] / 2**20, r["perplexity"],
                 "" if "accuracy" not in r else f"accuracy {r['accuracy']:.3f}")  # fmt: skip
    for row in metrics["runtime_lora"]:
        log.info("%s", row["verdict"])
    log.info("%s", metrics["decision"])
    log.info("quality gate %s; report written to %s", "passed" if not metrics["gate"]["failures"] else "failed",
             args.html)  # fmt: skip


if __name__ == "__main__":
    run(main)
