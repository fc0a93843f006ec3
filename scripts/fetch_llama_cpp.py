"""Fetch the pinned llama.cpp source and verify it before anything is built.

Three kinds of source, all verified:
  sdist  the llama-cpp-python sdist from the package index (checked by sha256);
         its vendor/llama.cpp is the source, and the sdist's own git record of
         the submodule must name the expected commit.
  git    a clone of `--url` checked out at `--commit` (checked with rev-parse).
  path   a local git checkout whose HEAD must be `--commit`.

The source lands in `--out` (written as `--out`.partial, renamed when complete),
with SOURCE.json recording what was fetched and how it was verified.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cpuforge.cli import run
from cpuforge.io.files import atomic_output
from cpuforge.llama.build import fetch_git, fetch_path, fetch_sdist

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        (tmp / "SOURCE.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("llama.cpp %s source verified in %s", args.commit, args.out)


if __name__ == "__main__":
    run(main)
