"""Build the read-bandwidth kernel that generation's speed is measured against (cpuforge.evaluate.bandwidth).

    python -m scripts.build_read_bandwidth --out build/llama.cpp/read_bandwidth
"""

from __future__ import annotations

import argparse
import logging

from cpuforge.cli import add_flags, run
from cpuforge.evaluate.bandwidth import SOURCE, build

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "out")
    args = parser.parse_args()
    build(args.out)
    log.info("built %s from %s", args.out, SOURCE)


if __name__ == "__main__":
    run(main)
