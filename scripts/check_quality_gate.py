"""Fail when the report's quality gate failed, with one sentence per quant and figure that missed its threshold.

    python -m scripts.check_quality_gate --metrics results/demo/report/metrics.json --out quality_gate.txt

make_eval_report judges the gate and writes its verdict into metrics.json (and the
report), so the report stays on disk to be read when this step fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cpuforge.cli import run
from cpuforge.evaluate.gate import Gate
from cpuforge.io.files import atomic_output, read_json

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="written only when the gate passes")
    args = parser.parse_args()
    metrics = read_json(args.metrics)
    gate = metrics["gate"]
    if not gate["passed"]:
        for failure in gate["failures"]:
            log.error("quality gate failed for %s: %s", metrics["model"], failure)
        log.error("the report is %s", args.metrics.with_name("report.html"))
        sys.exit(1)
    with atomic_output(args.out) as tmp:
        tmp.write_text(f"quality gate passed for {metrics['model']}: {Gate(**gate['thresholds']).describe()}\n")
    log.info("quality gate passed for %s", metrics["model"])


if __name__ == "__main__":
    run(main)
