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

import logging
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output, sha256_file
from cpuforge.paths import LLAMA_TOOLS, REPO

log = logging.getLogger(__name__)


def pinned_sdist(config: Path = REPO / "config.yaml") -> dict[str, str]:
    """config.yaml's llama_cpp.sdist, the one place the pin is written: package, version, sha256 and the
    llama.cpp commit of its vendor/llama.cpp."""
    import yaml

    return yaml.safe_load(config.read_text())["llama_cpp"]["sdist"]


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
            # its sha256 is checked above; where Python has the "data" filter (3.11.4 and later, and the
            # security releases before) it also refuses members that would land outside the folder
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)  # noqa: S202 (an archive of known sha256)
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


# `llama_cpp.cpu`: what the CPU code is compiled for. native: this machine's instructions
# (-march=native), which die with SIGILL on an older node of a cluster; portable: every x86-64
# (or ARM) CPU variant as a loadable backend, the best for the running CPU picked at run time
FLAVOURS = {
    "native": {"GGML_NATIVE": "ON"},
    "portable": {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON", "GGML_CPU_ALL_VARIANTS": "ON"},
}
# GCC's <amxtileintrin.h> drops ggml's AMX tile configuration (see the header): ours goes first
GCC_FIXES = Path(__file__).with_name("gcc_fixes")


def cmake_options(flavour: str) -> dict[str, str]:
    options = CMAKE_OPTIONS | FLAVOURS[flavour]
    if platform.machine() == "x86_64":
        options |= {"CMAKE_C_FLAGS": f"-I{GCC_FIXES}", "CMAKE_CXX_FLAGS": f"-I{GCC_FIXES}"}
    return options


def build(source: Path, work: Path, out: Path, threads: int, flavour: str, tools=LLAMA_TOOLS) -> None:
    options = [f"-D{k}={v}" for k, v in cmake_options(flavour).items()]
    subprocess.run(["cmake", "-S", str(source), "-B", str(work), *options], check=True, stdout=sys.stderr)
    log.info("building %s (%s) with %d jobs", " ".join(tools), flavour, threads)
    subprocess.run(
        ["cmake", "--build", str(work), "--parallel", str(threads), "--target", *tools],
        check=True, stdout=sys.stderr,
    )  # fmt: skip
    with atomic_output(out) as tmp:
        tmp.mkdir()
        for f in sorted((work / "bin").iterdir()):
            if f.name in tools or ".so" in f.name:
                shutil.copy2(f, tmp / f.name, follow_symlinks=False)
