"""Every llama.cpp source is verified before it is built: sdist by sha256, git and path by commit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO
from helpers.workflow import snakemake

from cpuforge.llama.build import pinned_sdist

PIN = pinned_sdist()
SDIST_SHA256, COMMIT, VERSION = PIN["sha256"], PIN["commit"], PIN["version"]


def fetch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.fetch_llama_cpp", *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture
def checkout(tmp_path):
    """A real git repository standing in for a llama.cpp checkout, and its HEAD commit."""
    repo = tmp_path / "llama.cpp"
    repo.mkdir()
    (repo / "CMakeLists.txt").write_text("project(fake)\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    return repo, head


@pytest.mark.slow  # downloads the sdist from the package index
def test_tampered_sdist_is_refused(tmp_path):
    wrong = "0" * 64
    result = fetch("--kind", "sdist", "--version", VERSION, "--sha256", wrong, "--commit", COMMIT,
                   "--out", str(tmp_path / "src"))  # fmt: skip
    assert result.returncode == 2
    assert (f"llama_cpp_python-{VERSION}.tar.gz: sha256 is {SDIST_SHA256}, config llama_cpp.sdist.sha256 "
            f"expects {wrong}.") in result.stderr  # fmt: skip
    assert not (tmp_path / "src").exists() and not (tmp_path / "src.partial").exists()


def test_git_source_at_its_commit(tmp_path, checkout):
    repo, head = checkout
    result = fetch("--kind", "git", "--url", str(repo), "--commit", head, "--out", str(tmp_path / "src"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "src" / "SOURCE.json").read_text()) == {"kind": "git", "url": str(repo), "commit": head}


def test_git_source_with_unknown_commit(tmp_path, checkout):
    repo, _ = checkout
    result = fetch("--kind", "git", "--url", str(repo), "--commit", "1" * 40, "--out", str(tmp_path / "src"))
    assert result.returncode == 2 and f"llama_cpp.git.commit: {'1' * 40} does not exist in {repo}." in result.stderr
    assert not (tmp_path / "src").exists()


def test_path_source_at_another_commit(tmp_path, checkout):
    repo, head = checkout
    result = fetch("--kind", "path", "--path", str(repo), "--commit", "2" * 40, "--out", str(tmp_path / "src"))
    assert result.returncode == 2
    assert f"{repo}: checkout is at commit {head}, config llama_cpp.path.commit expects {'2' * 40}." in result.stderr


def test_path_source_at_its_commit_through_the_workflow(tmp_path, checkout):
    repo, head = checkout
    config = tmp_path / "c.yaml"
    config.write_text(f"llama_cpp: {{source: path, build_dir: build, path: {{dir: {repo}, commit: {head}}}}}\n")
    snakemake(tmp_path, f"build/{head}/source", "--configfile", str(config))
    assert (tmp_path / "build" / head / "source" / "CMakeLists.txt").is_file()
    assert json.loads((tmp_path / "build" / head / "source" / "SOURCE.json").read_text())["commit"] == head


def test_source_kind_without_its_section(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("llama_cpp: {source: git}\n")
    result = snakemake(tmp_path, "llama_cpp", "--configfile", str(config), check=False)
    assert result.returncode != 0
    assert "config llama_cpp.source is 'git' but llama_cpp.git is not set." in result.stdout + result.stderr
