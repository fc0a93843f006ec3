"""The tiny-model chain on a real one-node SLURM cluster, through `--profile profiles/slurm`.

The fixture installs Debian's slurm-wlm and munge when they are missing and
starts munged, slurmctld and slurmd as root for one node, this machine. Key,
socket, slurm.conf, state, logs and ports are its own, in a temporary folder,
so a system's own SLURM or MUNGE set-up (or another run of this test) is
neither used nor disturbed. There is no accounting database, as on many
small clusters: the profile asks squeue for job states.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from helpers.llama import FLAVOUR
from helpers.workflow import snakemake, write_config

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue")
PRODUCTS = ("merged/model.safetensors", "ggml-model-f16.gguf", "ggml-model-q4_0.gguf")
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


# Debian puts the daemons in /usr/sbin, which a user's PATH (and a CI runner's) may leave out
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def tool(name: str) -> str | None:
    """The full path of a SLURM or munge command: on PATH, else in the sbin folders."""
    return shutil.which(name, path=SEARCH_PATH)


def install_slurm() -> None:
    if all(tool(name) for name in DAEMONS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"], check=True, env=env
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ready, logs: list[Path], seconds: float = 60) -> None:
    """Poll `ready()` until it holds; a daemon that never comes up fails the test with its logs."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            text = "\n".join(f"--- {log}\n{log.read_text() if log.exists() else ''}" for log in logs)
            raise AssertionError(f"{what} did not come up in {seconds} s:\n{text}")
        time.sleep(0.5)


SLURM_CONF = """\
ClusterName=cpuforge-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
# no cgroups (containers and CI machines often cannot delegate them) and no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# squeue reports finished jobs for MinJobAge seconds; the plugin wants 3 × its status interval
MinJobAge=600
ReturnToService=2
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

# snakemake-executor-plugin-slurm-jobstep 0.6.1 removes every SLURM_* variable but
# a few from the environment of the `srun` it runs inside each job, SLURM_CONF
# among them; clusters keep slurm.conf where srun looks by default, this one
# cannot, so srun gets it back here.
SRUN = """\
#!/bin/sh
SLURM_CONF='{conf}' exec '{srun}' "$@"
"""


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster: the environment its commands need, and the node's CPU count."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM test installs packages and starts munged, slurmctld and slurmd: run it as root")
    install_slurm()
    # munged wants every folder above its socket searchable by all, which pytest's tmp_path is not
    folder = Path(tempfile.mkdtemp(prefix="cpuforge-slurm-"))
    folder.chmod(0o711)
    daemons: list[subprocess.Popen] = []
    env = {}
    try:
        (folder / "state").mkdir()
        (folder / "spool").mkdir()
        key = folder / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        node = subprocess.run([tool("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        cpus = int(re.search(r"\bCPUs=(\d+)", node)[1])
        conf = folder / "slurm.conf"
        host = re.search(r"\bNodeName=(\S+)", node)[1]  # the name slurmd will know itself by
        conf.write_text(SLURM_CONF.format(host=host, ctld_port=free_port(), slurmd_port=free_port(),
                                          dir=folder, node=node))  # fmt: skip
        shim = folder / "bin" / "srun"
        shim.parent.mkdir()
        shim.write_text(SRUN.format(conf=conf, srun=tool("srun")))
        shim.chmod(0o755)
        env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{shim.parent}{os.pathsep}{SEARCH_PATH}"}

        def start(name: str, *cmd: str) -> None:
            with open(folder / f"{name}.out", "w") as out:
                daemons.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))

        start("munged", tool("munged"), "--foreground", f"--socket={folder}/munge.socket", f"--key-file={key}",
              f"--pid-file={folder}/munged.pid", f"--seed-file={folder}/munged.seed")  # fmt: skip
        wait_for("munged", (folder / "munge.socket").exists, [folder / "munged.out"])
        start("slurmctld", tool("slurmctld"), "-D", "-c", "-f", str(conf))
        start("slurmd", tool("slurmd"), "-D", "-f", str(conf))

        def node_idle() -> bool:
            sinfo = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, env=env)
            return sinfo.stdout.strip() == "idle"

        logs = [folder / name for name in ("slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log")]
        wait_for("the SLURM node", node_idle, logs)
        yield env, cpus
    finally:
        if env:
            subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_config(tiny_base, tiny_adapter, tmp_path_factory) -> Path:
    config = tmp_path_factory.mktemp("slurm_config") / "tiny.yaml"
    return write_config(config, [{"name": "tiny", "base": str(tiny_base), "adapters": [str(tiny_adapter)]}])


def test_chain_through_slurm_matches_a_local_run(llama_bin, slurm_cluster, tiny_config, tmp_path):
    env, cpus = slurm_cluster
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    snakemake(local, "q4_model", "--profile", str(REPO / "profiles" / "local"), "--configfile", str(tiny_config))
    snakemake(
        cluster, "q4_model", "--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(tiny_config),
        # the session's one build, not the profile's portable one (CI builds llama.cpp once)
        "--config", f"llama_cpp={{cpu: {FLAVOUR}}}",
        # the node's cores bound every job's --cpus-per-task (the profile asks for up to 16)
        "--max-threads", str(cpus),
        # poll every few seconds, not the plugin's 40 (MinJobAge above stays 3 × larger)
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-keep-successful-logs",
        env=env,
    )  # fmt: skip

    (log,) = (cluster / ".snakemake" / "log").glob("*.snakemake.log")
    submitted = {re.search(r"/rule_(\w+)/", path)[1]: job for job, path in SUBMITTED.findall(log.read_text())}
    # (q4_0 is made with the importance matrix, imatrix.use_for: [all])
    assert set(submitted) == {"merge", "convert", "make_imatrix", "quantize"}, log.read_text()
    # a target and the cheap parity checks: Snakemake runs them itself, no job
    assert all(f"localrule {rule}:" in log.read_text() for rule in ("q4_model", "check_tokenizer")), log.read_text()

    # the controller's own record: each job ran to completion under the rule's name
    squeue = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%i|%T|%k|%C|%m", f"--jobs={','.join(submitted.values())}"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    jobs = {job: rest for job, *rest in (line.split("|") for line in squeue.stdout.split())}
    threads = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())["set-threads"]
    memory = dict(re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: .*?\bmem_mb=(\d+)", log.read_text(), re.M))
    for rule, job in submitted.items():
        state, comment, job_cpus, job_memory = jobs[job]
        assert state == "COMPLETED" and comment.startswith(f"rule_{rule}_wildcards_tiny"), jobs
        # sbatch got the profile's threads and the memory the rule computed from its inputs
        assert int(job_cpus) == min(threads[rule], cpus) and job_memory == f"{memory[rule]}M", (jobs, memory)
        job_log = next((cluster / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(f"{job}.log"))
        assert f"rule {rule}:" in job_log.read_text()

    for product in PRODUCTS:
        a, b = local / "results" / "tiny" / product, cluster / "results" / "tiny" / product
        assert a.read_bytes() == b.read_bytes(), f"{product} differs between the local and the SLURM run"
