"""The stages a report compares: which are Hugging Face folders, which GGUF the others are held against,
and how each is named on the page."""

from __future__ import annotations

from pathlib import Path

from cpuforge.errors import InputError

# the stages measured as Hugging Face folders (through torch); every other stage is a GGUF
HF_STAGES = ("base", "merged")
# the stage every other is compared with
REFERENCE = "f16"
# the quant type whose file the quant search chooses (rules/auto_quant.smk): results/{model}/ggml-model-auto.gguf
AUTO = "auto"
LABELS = {"base": "base (HF)", "merged": "merged (HF)", AUTO: "auto GGUF (searched mix)"}


def label(stage: str) -> str:
    return LABELS.get(stage, f"{stage} GGUF")


def parse_stages(specs: list[str], flag: str = "--stage", reference: bool = True) -> dict[str, Path]:
    stages = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{flag} {spec!r}: expected NAME=PATH.")
        stages[name] = Path(path)
    if reference and REFERENCE not in stages:
        raise InputError("--stage: the f16 GGUF stage is missing; every comparison is made against it.")
    return stages
