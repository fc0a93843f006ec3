"""The CLI of the fetch_llama_cpp step, described once in cpuforge.llama.build's docstring (--help shows it)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import run
from cpuforge.io.files import atomic_output, write_json
from cpuforge.llama.build import fetch_git, fetch_path, fetch_sdist
import cpuforge.llama.build as library

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=library.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["sdist", "git", "path"], required=True)
    parser.add_argument("--commit", required=True, help="the llama.cpp commit the source must be at")
    parser.add_argument("--package", default="llama-cpp-python", help="sdist: package name")
    parser.add_argument("--version", help="sdist: package version")
    parser.add_argument("--sha256", help="sdist: expected sha256 of the archive")
    parser.add_argument("--url", help="git: repository URL")
    parser.add_argument("--path", type=Path, help="path: local llama.cpp checkout")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with atomic_output(args.out) as tmp:
        if args.kind == "sdist":
            record = fetch_sdist(args.package, args.version, args.sha256, args.commit, tmp)
        elif args.kind == "git":
            record = fetch_git(args.url, args.commit, tmp)
        else:
            record = fetch_path(args.path, args.commit, tmp)
        write_json(tmp / "SOURCE.json", record)
    log.info("llama.cpp %s source verified in %s", args.commit, args.out)


if __name__ == "__main__":
    run(main)
