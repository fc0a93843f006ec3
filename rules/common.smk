import functools
import shlex
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# the scripts and the cpuforge library are packages of this repository: make `python -m scripts.<step>`
# (in every job) and the imports below work from any working directory
sys.path.insert(0, workflow.basedir)
# (the prefix is formatted like the command, hence the doubled braces)
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from cpuforge import catalogue
from cpuforge.errors import InputError
from cpuforge.llama.quant import QUANT_TYPES as KNOWN_QUANT_TYPES
from cpuforge.sizing import dag as sizing_dag
from cpuforge.sizing.jobs import Sizing
from cpuforge.spec import AUTO, DEMO_ADAPTER, DEMO_BASE, HF_STAGES, check_spec, load_spec, runtime_lora_refusal

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

# The config normalised once (cpuforge.spec), checked before any rule runs; and every job's figures
# (mem_mb, disk_mb and runtime: SLURM's --mem and --time, and what the start-up preflight holds against
# this machine), predicted from the inputs' headers (cpuforge.sizing). A rule's `threads:` is the most its
# step uses well: `-c N` caps it, and profiles/slurm/config.yaml sets it per rule for a cluster.
try:
    SPEC = load_spec(config, workflow.basedir)
    SIZING = Sizing(SPEC, check_spec(SPEC), workflow.cores)
    for name in SPEC.models:
        SIZING.model(name)  # what every job will need, from the headers
except InputError as e:
    raise WorkflowError(str(e))


wildcard_constraints:
    model="|".join(map(re.escape, SPEC.models)),
    # every type llama-quantize can make here, so q4_model works whatever quant_types holds
    qtype="|".join(q for q in KNOWN_QUANT_TYPES if q != "f16"),
    # the stages of the report: HF folders through torch, GGUF files through llama.cpp (`auto`: the quant
    # search's choice)
    hf_stage="|".join(HF_STAGES),
    gguf_stage="|".join([*KNOWN_QUANT_TYPES, AUTO]),
    # an artifact a check reads: the f16 GGUF or a quantized one
    stage="|".join([*KNOWN_QUANT_TYPES, AUTO]),
    # a GGUF LoRA of results/{model}/adapters/: `{n}-{name}`, n its place in the model's stack
    adapter=r"\d+-[A-Za-z0-9._-]+",


def get_model(wildcards):
    return SPEC.models[wildcards.model]


def get_base(wildcards):
    return get_model(wildcards).base


def get_folder(folder, demo):
    """A folder as input: the demo's (made by the run) whole, a user's as its files, so a changed file reruns
    what uses it."""
    return folder if demo else sorted(str(p) for p in Path(folder).iterdir() if p.is_file())


def get_merge_input(wildcards):
    m = get_model(wildcards)
    adapters = [f for a in m.adapters for f in get_folder(a, m.demo)]
    inputs = {"base": get_folder(m.base, m.demo), "adapters": DEMO_ADAPTER if m.demo else adapters}
    return inputs | {"vocab": catalogue.check(m.name, "converter-vocab")}


def get_vocab_check_input(wildcards):
    return get_model(wildcards).vocab_check_input


# Flags that carry paths are lists of words, each quoted by the rule's `:q`, so a path may hold
# spaces, quotes or any letter.
def get_adapter_args(wildcards):
    return [word for a in get_model(wildcards).adapters for word in ("--adapter", a)]


def get_adapter_ggufs(wildcards):
    return [catalogue.adapter(wildcards.model, a) for a in get_model(wildcards).adapter_names]


def get_runtime_adapters(wildcards):
    """The model's adapters, once each has been checked to run as a GGUF LoRA; one that cannot stops the
    run as the DAG is built, before any job, naming the adapter and why (merging it still works)."""
    if refusal := runtime_lora_refusal(get_model(wildcards)):
        raise WorkflowError(refusal)
    return list(get_model(wildcards).adapters)


@functools.cache
def has_runtime_lora(model):
    """Whether the report sets each quant merged beside its unmerged base + the adapters applied at run
    time: when the adapters can run as GGUF LoRAs. One that cannot is left out of the report, said once,
    and is merged as ever."""
    if refusal := runtime_lora_refusal(SPEC.models[model]):
        print(f"The report of {model} has no runtime-LoRA stages: {refusal}", file=sys.stderr)
    return refusal is None


def get_runtime_lora_args(wildcards):
    """scripts.make_eval_report's --runtime-lora QTYPE=BASE for each quant type, and the adapters' files."""
    if not has_runtime_lora(wildcards.model):
        return []
    bases = [f"--runtime-lora={q}={catalogue.gguf(wildcards.model, q, catalogue.BASE)}" for q in SPEC.fixed_types]
    return [*bases, "--adapters", *get_adapter_ggufs(wildcards)]


def get_unmerged_base_input(wildcards):
    get_runtime_adapters(wildcards)
    return get_merge_input(wildcards)


def get_adapter_folder(wildcards):
    """The adapter folder behind results/{model}/adapters/{adapter}.gguf."""
    names = get_model(wildcards).adapter_names
    if wildcards.adapter not in names:
        path = catalogue.adapter(wildcards.model, wildcards.adapter)
        raise WorkflowError(f"{path}: the model's adapters are {list(names)}.")
    return get_runtime_adapters(wildcards)[names.index(wildcards.adapter)]


def get_adapter_input(wildcards):
    return get_folder(get_adapter_folder(wildcards), get_model(wildcards).demo)


def get_lora_args(wildcards):
    return [word for f in get_adapter_ggufs(wildcards) for word in ("--lora", f)]


def get_runtime_gate_arg(wildcards):
    """The f16 base + runtime LoRA must answer as the merged f16 does; a quantized pair is measured, since
    quantizing before or after merging rounds differently (what the report compares)."""
    return [] if wildcards.stage == "f16" else ["--no-gate"]


def get_task_files(wildcards):
    return list(get_model(wildcards).task_data.values())


def get_task_args(wildcards):
    return [word for f in get_task_files(wildcards) for word in ("--task-data", f)]


def get_heldout(wildcards):
    return get_model(wildcards).task_data.get("heldout", [])


def get_heldout_arg(wildcards):
    heldout = get_heldout(wildcards)
    return ["--heldout", heldout] if heldout else []


def get_reference_answers(wildcards):
    """The f16 GGUF's answers to the held-out rows (eval_task's), which the quant search compares with."""
    return [catalogue.figure(wildcards.model, "task", "f16")] if get_heldout(wildcards) else []


def get_reference_arg(wildcards):
    reference = get_reference_answers(wildcards)
    return ["--reference", *reference] if reference else []


def get_listed_ggufs(wildcards):
    """The workflow's files of quant_types, which the quant search takes as they are."""
    return [catalogue.gguf(wildcards.model, q) for q in SPEC.fixed_types]


def get_task_arg(wildcards):
    return ["--heldout", get_heldout(wildcards)] if get_model(wildcards).has_task else []


def get_calibration_files(wildcards):
    return SPEC.calibration_files(wildcards.model)


def get_calibration_args(wildcards):
    return SPEC.calibration_args(wildcards.model)


def get_quantize_input(wildcards, weights=catalogue.MERGED):
    """What quantize reads: the f16 GGUF (`weights`: MERGED or BASE, the unmerged one), and the importance
    matrix where the type uses one (the merged model's for both: base + LoRA is that model)."""
    files = {"gguf": catalogue.gguf(wildcards.model, "f16", weights), "quantize": f"{SPEC.llama_bin}/llama-quantize"}
    return files | ({"imatrix": catalogue.imatrix(wildcards.model)} if SPEC.uses_imatrix(wildcards.qtype) else {})


def get_base_quantize_input(wildcards):
    return get_quantize_input(wildcards, catalogue.BASE)


def get_imatrix_arg(wildcards):
    return ["--imatrix", catalogue.imatrix(wildcards.model)] if SPEC.uses_imatrix(wildcards.qtype) else []


def get_sensitivity_input(wildcards):
    """The f16 GGUF, the importance matrix (while it is on), and the build whose ggml rounds the weights."""
    files = {"gguf": catalogue.gguf(wildcards.model, "f16"), "lib": f"{SPEC.llama_bin}/libllama.so"}
    return files | ({"imatrix": catalogue.imatrix(wildcards.model)} if SPEC.imatrix["enabled"] else {})


def get_auto_imatrix_arg(wildcards):
    return ["--imatrix", catalogue.imatrix(wildcards.model)] if SPEC.imatrix["enabled"] else []


def get_check_input(wildcards):
    """What the tokenizer and chat-template checks read: the artifact, the merged model (the reference),
    the base (to tell the words an adapter added), the task data and the pinned libllama."""
    m = get_model(wildcards)
    return {
        "gguf": catalogue.gguf(m.name, wildcards.stage),
        "merged": catalogue.merged(m.name),
        "base": get_folder(m.base, m.demo),
        "task": get_task_files(wildcards),
        "lib": f"{SPEC.llama_bin}/libllama.so",
    }


def get_eval_text_input(wildcards):
    inputs = {"task": get_heldout(wildcards)} if get_model(wildcards).has_task else {}
    return inputs | ({"text": SPEC.eval["text"]} if SPEC.eval["text"] != "pydoc_topics" else {})


def get_hf_stage_model(wildcards):
    return get_base(wildcards) if wildcards.hf_stage == "base" else catalogue.merged(wildcards.model)


def get_hf_stage_input(wildcards):
    """The stage's folder, or a user's base folder's files, so a changed file reruns the stage."""
    m = get_model(wildcards)
    return {"model": get_folder(m.base, m.demo) if wildcards.hf_stage == "base" else catalogue.merged(m.name)}


def get_report_input(wildcards):
    return SPEC.report_inputs(wildcards.model, has_runtime_lora(wildcards.model))


def get_report_args(wildcards):
    """The stages in report order, each with its artifact, for scripts.make_eval_report."""
    artifacts = get_report_input(wildcards)["artifacts"]
    return [word for s, p in zip(SPEC.stages, artifacts) for word in ("--stage", f"{s}={p}")]


def get_auto_search_arg(wildcards):
    return [word for f in get_report_input(wildcards)["auto_search"] for word in ("--auto-search", f)]


def get_report_task_flag(wildcards):
    return "--task" if get_model(wildcards).has_task else ""


onstart:
    # Before any job of a local run: refuse the run, in one sentence, when a job needs more memory than this
    # machine has or more disk than is free where it writes, counting what the jobs before it write there.
    # A cluster run asks each job's figures of the scheduler instead.
    if workflow.local_exec and workflow.is_main_process:
        if sentence := sizing_dag.preflight(workflow, SIZING):
            raise WorkflowError(sentence)
