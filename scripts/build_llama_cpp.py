"""Build the llama.cpp tools and shared libraries that cpuforge needs from a verified source.

cmake builds in `cmake/` beside the source (kept, so a rebuild is incremental);
the executables and shared libraries are then copied into `bin/` beside it as
one folder, which is what the rules call and what llama-cpp-python loads
through LLAMA_CPP_LIB_PATH.
Binaries find their libraries through an $ORIGIN rpath, so the folder works
wherever it lies.
"""

import argparse
import logging
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.common import atomic_output, check_threads, run

log = logging.getLogger(__name__)

TOOLS = ("llama-quantize", "llama-cli", "llama-perplexity", "llama-bench", "llama-server", "llama-imatrix")

CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "ON",
    "CMAKE_BUILD_RPATH_USE_ORIGIN": "ON",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    # nothing may be downloaded at build time, and HTTPS is not needed locally
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
}
# -march=native turns on AMX where the CPU lists it, and ggml's AMX kernels then
# crash every q4_0/q4_1/q8_0 matmul on VMs that list AMX (seen on this project's
# machines); an explicit -mno-* wins over -march=native whatever the order
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if platform.machine() == "x86_64":
    CMAKE_OPTIONS |= {"CMAKE_C_FLAGS": NO_AMX, "CMAKE_CXX_FLAGS": NO_AMX}


def build(source: Path, work: Path, out: Path, threads: int, tools=TOOLS) -> None:
    options = [f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items()]
    subprocess.run(["cmake", "-S", str(source), "-B", str(work), *options], check=True, stdout=sys.stderr)
    log.info("building %s with %d jobs", " ".join(tools), threads)
    subprocess.run(
        ["cmake", "--build", str(work), "--parallel", str(threads), "--target", *tools],
        check=True, stdout=sys.stderr,
    )  # fmt: skip
    with atomic_output(out) as tmp:
        tmp.mkdir()
        for f in sorted((work / "bin").iterdir()):
            if f.name in tools or ".so" in f.name:
                shutil.copy2(f, tmp / f.name, follow_symlinks=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="verified llama.cpp source folder")
    parser.add_argument("--work", type=Path, help="cmake build folder (default: cmake/ beside the source)")
    parser.add_argument("--out", type=Path, help="folder for the tools and libraries (default: bin/ beside it)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    out = args.out or args.source.parent / "bin"
    build(args.source, args.work or args.source.parent / "cmake", out, check_threads(args.threads))
    log.info("llama.cpp tools ready in %s", out)


if __name__ == "__main__":
    run(main)
