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

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from scripts.common import InputError, atomic_output, run, sha256_file

log = logging.getLogger(__name__)


def fetch_sdist(package: str, version: str, sha256: str, commit: str, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading the %s %s sdist", package, version)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--progress-bar", "off", "-d", tmp, f"{package}=={version}"],
            check=True, stdout=sys.stderr,
        )  # fmt: skip
        (archive,) = Path(tmp).glob("*.tar.gz")
        found = sha256_file(archive)
        if found != sha256:
            raise InputError(f"{archive.name}: sha256 is {found}, config llama_cpp.sdist.sha256 expects {sha256}.")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        root = Path(tmp) / archive.name.removesuffix(".tar.gz")
        recorded = (root / ".git/modules/vendor/llama.cpp/HEAD").read_text().strip()
        if recorded != commit:
            raise InputError(f"{archive.name}: vendor/llama.cpp is at commit {recorded}, config expects {commit}.")
        shutil.move(root / "vendor/llama.cpp", out)
    return {"kind": "sdist", "package": package, "version": version, "sha256": sha256, "commit": commit}


def git_head(repo: Path) -> str:
    result = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if result.returncode != 0:
        raise InputError(f"{repo}: not a git checkout, so its llama.cpp commit cannot be verified.")
    return result.stdout.strip()


def fetch_git(url: str, commit: str, out: Path) -> dict:
    log.info("cloning %s at %s", url, commit)
    subprocess.run(["git", "clone", "--quiet", url, str(out)], check=True, stdout=sys.stderr)
    if subprocess.run(["git", "-C", str(out), "checkout", "--quiet", commit]).returncode != 0:
        raise InputError(f"llama_cpp.git.commit: {commit} does not exist in {url}.")
    found = git_head(out)
    if found != commit:
        raise InputError(f"llama_cpp.git.commit: {url} resolves {commit} to {found}; give the full 40-hex commit.")
    return {"kind": "git", "url": url, "commit": commit}


def fetch_path(path: Path, commit: str, out: Path) -> dict:
    found = git_head(path)
    if found != commit:
        raise InputError(f"{path}: checkout is at commit {found}, config llama_cpp.path.commit expects {commit}.")
    shutil.copytree(path, out, symlinks=True)
    return {"kind": "path", "path": str(path.resolve()), "commit": commit}


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
