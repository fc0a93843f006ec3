"""An adapter as a GGUF LoRA, applied at run time instead of merged (convert_adapter): the pinned
convert_lora_to_gguf.py run on it, its output copied with cpuforge's provenance. Which adapters can run so is
cpuforge.merge.runtime_lora's to say."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output
from cpuforge.io.provenance import copy_gguf_with_provenance

log = logging.getLogger(__name__)


def convert_adapter(
    source: Path, adapter: Path, base: Path, out: Path, outtype: str, threads: int, record: dict
) -> None:
    """The adapter as a GGUF LoRA through the pinned convert_lora_to_gguf.py (`base`: the HF folder whose
    config it reads), with `record` as its provenance, written atomically."""
    pythonpath = os.pathsep.join([str(source / "gguf-py"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads)}
    with atomic_output(out) as tmp:
        scratch = tmp.with_name(tmp.name + ".converter")
        cmd = [sys.executable, str(source / "convert_lora_to_gguf.py"), str(adapter), "--base", str(base),
               "--outfile", str(scratch), "--outtype", outtype]  # fmt: skip
        log.info("running %s", " ".join(cmd))
        result = subprocess.run(cmd, env=env, stdout=sys.stderr)
        if result.returncode != 0:
            raise InputError(f"{adapter}: the pinned convert_lora_to_gguf.py refused it (exit {result.returncode}).")
        copy_gguf_with_provenance(scratch, tmp, "convert_lora", record)
