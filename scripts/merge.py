"""Example:

    python -m scripts.merge --base BASE --adapter A1 [--adapter A2 ...] --out MERGED [--verify]

The step is described once, in cpuforge.merge.merge's docstring, which --help shows first.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import run
from cpuforge.llama.runtime import check_threads
from cpuforge.io.files import read_json
from cpuforge.merge.formats import describe
from cpuforge.merge.plan import DTYPES
from cpuforge.merge.merge import VERIFY_PROMPTS, merge
from cpuforge.io.provenance import provenance, write_provenance
import cpuforge.merge.merge as library

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=library.__doc__, epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="HF model folder")
    parser.add_argument("--adapter", type=Path, action="append", required=True,
                        help="PEFT adapter folder (LoRA, DoRA, IA3, LoHa, …); repeat, in order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f16",
                        help="dtype of the merged matrices; vectors (norms, biases) are always f32")
    parser.add_argument("--verify", action="store_true", help="check the merged logits against peft's unmerged model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(check_threads(args.threads))
    worst = merge(args.base, args.adapter, args.out, args.dtype, VERIFY_PROMPTS if args.verify else ())
    tuners = [describe(read_json(a / "adapter_config.json")) for a in args.adapter]  # in the order merged
    facts = {"step": "merge", "dtype": args.dtype, "tuners": tuners, "verify_max_abs_logit_diff": worst}
    inputs = {"base": args.base, **{f"adapter{i}": a for i, a in enumerate(args.adapter, 1)}}
    write_provenance(args.out, provenance(args.out, inputs, **facts))
    log.info("merged model written to %s", args.out)


if __name__ == "__main__":
    run(main)
