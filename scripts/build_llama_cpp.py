"""Build the llama.cpp tools and shared libraries that cpuforge needs from a verified source.

cmake builds in `<flavour>/cmake/` beside the source (kept, so a rebuild is
incremental); the executables and shared libraries (with a portable build, every
CPU variant's libggml-cpu-*.so) are then copied into `<flavour>/bin/` beside it as
one folder, which is what the rules call and what llama-cpp-python loads
through LLAMA_CPP_LIB_PATH.
Binaries find their libraries through an $ORIGIN rpath, so the folder works
wherever it lies.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import run
from cpuforge.llama.runtime import check_threads
from cpuforge.llama.build import FLAVOURS, build
from cpuforge.paths import DEFAULT_FLAVOUR

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="verified llama.cpp source folder")
    parser.add_argument("--flavour", choices=FLAVOURS, default=DEFAULT_FLAVOUR, help="what the CPU code is compiled for")
    parser.add_argument("--work", type=Path, help="cmake build folder (default: <flavour>/cmake beside the source)")
    parser.add_argument("--out", type=Path, help="folder for the tools and libraries (default: <flavour>/bin)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    here = args.source.parent / args.flavour
    out = args.out or here / "bin"
    build(args.source, args.work or here / "cmake", out, check_threads(args.threads), args.flavour)
    log.info("llama.cpp tools ready in %s", out)


if __name__ == "__main__":
    run(main)
