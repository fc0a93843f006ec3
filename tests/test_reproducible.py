"""Same inputs and config give the same bytes; a killed step leaves nothing that looks finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import REPO
from helpers.llama import SOURCE
from helpers.models import make_lora, make_tiny_llama
from helpers.workflow import snakemake, write_config

from cpuforge.io.files import sha256_file


def artifacts(workdir):
    results = workdir / "results" / "m"
    files = [results / "merged" / "model.safetensors", results / "ggml-model-f16.gguf", results / "ggml-model-q4_0.gguf"]
    return {f.relative_to(workdir).as_posix(): sha256_file(f) for f in files}


def run_chain(workdir, base, adapter, *args):
    workdir.mkdir(exist_ok=True)
    config = write_config(workdir / "c.yaml", [{"name": "m", "base": str(base), "adapters": [str(adapter)]}])
    snakemake(workdir, "q4_model", "--configfile", str(config), *args)
    return artifacts(workdir)


PARTIALS = ["results/m/merged.partial", "results/m/ggml-model-f16.gguf.partial", "results/m/ggml-model-q4_0.gguf.partial"]


def run_until(workdir, config, partial):
    """Start the chain and SIGKILL the whole workflow the moment `partial` appears."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "q4_model", "--configfile", str(config)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and not (workdir / partial).exists():
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (workdir / partial).exists(), f"the run ended before {partial} was seen"


def test_sigkill_mid_write_then_rerun(llama_bin, tmp_path):
    """Same inputs, same bytes; and a SIGKILL of the whole workflow while each step writes its output, one step
    further each run, leaves nothing that looks finished. The uninterrupted run has one core, the killed ones
    two: every step of the last one ran whole in a run of its own, so its bytes equal the first's only if each
    step is deterministic, whatever the cores. The model is big enough (~80 MB in f32) that each step writes
    for a while."""
    base = make_tiny_llama(tmp_path / "base", hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8)  # fmt: skip
    adapter = make_lora(base, tmp_path / "adapter")
    reference = run_chain(tmp_path / "reference", base, adapter, "--cores", "1")
    workdir = tmp_path / "killed"
    workdir.mkdir()
    config = write_config(workdir / "c.yaml", [{"name": "m", "base": str(base), "adapters": [str(adapter)]}])
    for partial in PARTIALS:
        run_until(workdir, config, partial)
        assert not (workdir / partial.removesuffix(".partial")).exists(), partial
        assert not (workdir / "results" / "m" / "ggml-model-q4_0.gguf").exists(), partial
        snakemake(workdir, "--unlock", "--configfile", str(config))  # a SIGKILLed Snakemake leaves its lock, as always
    assert run_chain(workdir, base, adapter) == reference
    assert not list((workdir / "results").rglob("*.partial"))


def test_full_disk_during_convert(llama_bin, tiny_base, tiny_adapter, tmp_path):
    """An output filesystem too small for the GGUF: one clear sentence, no partial GGUF."""
    from cpuforge.merge.merge import merge

    merge(tiny_base, [tiny_adapter], tmp_path / "merged", "f32")
    disk = tmp_path / "disk"
    disk.mkdir()
    # a 256 KiB tmpfs in a mount namespace of the convert's own (as root, or as a user mapped to root in a user
    # namespace): it needs no privilege on most machines, and it goes with the process, whatever happens
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    script = 'mount -t tmpfs -o size=256k tmpfs "$1" || exit 99; d=$1; shift; "$@"; rc=$?; echo "left:" $(ls -A "$d"); exit $rc'
    convert = [sys.executable, "-m", "scripts.convert", "--source", str(SOURCE), "--merged", str(tmp_path / "merged"),
               "--out", str(disk / "ggml-model-f16.gguf")]  # fmt: skip
    result = subprocess.run(["unshare", "--mount", *user, "sh", "-c", script, "sh", str(disk), *convert], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    # never a silent skip: a machine that cannot make the small filesystem fails here and says why
    assert result.returncode != 99, f"cannot mount a small tmpfs in a mount namespace here: {result.stderr}"
    assert result.returncode == 2, result.stderr
    assert f"{disk}: 0.2 MiB free, but converting {tmp_path / 'merged'} to f16 needs about" in result.stderr
    # what the convert left on the small filesystem, listed before it went: nothing, not even a partial file
    assert result.stdout.splitlines()[-1] == "left:"
