import errno
import functools
import math
import os
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

from cpuforge import paths
from cpuforge.errors import InputError
from cpuforge.lora import DTYPES, TOKENIZER_FILES, adapter_weights_file, base_shards, check_inputs, tokenizer_source
from cpuforge.quant import NEEDS_IMATRIX, QUANT_TYPES as KNOWN_QUANT_TYPES, check_quant_type
from cpuforge.runtime_lora import check_runtime
from cpuforge.safetensors_io import weights_header
from cpuforge.task import read_heldout

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

MODELS = {m["name"]: m for m in config["models"]}
LLAMA = config["llama_cpp"]
IMATRIX = config["imatrix"]
DEMO_TASK = {split: f"{workflow.basedir}/data/demo_task/{split}.jsonl" for split in ("train", "heldout")}
COMMIT = LLAMA[LLAMA["source"]]["commit"] if LLAMA["source"] in LLAMA else None
DEMO_BASE = "resources/demo/base"
DEMO_ADAPTER = "resources/demo/adapter"
EVAL = config["eval"]
HF_STAGES = ("base", "merged")


def fail(message):
    raise WorkflowError(message)


def check_config():
    """Every check that needs no expensive work, so bad input fails before any rule runs."""
    if COMMIT is None:
        fail(f"config llama_cpp.source is {LLAMA['source']!r} but llama_cpp.{LLAMA['source']} is not set.")
    names = [m["name"] for m in config["models"]]
    for name in sorted({n for n in names if names.count(n) > 1}):
        fail(f"config models: {names.count(name)} entries share the name {name!r}; each model needs its own.")
    try:
        for qtype in config["quant_types"]:
            check_quant_type(qtype)
        check_imatrix_config()
        for name, model in MODELS.items():
            for split, path in model.get("task_data", {}).items():
                if not Path(path).is_file():
                    fail(f"config models[{name}].task_data.{split}: {path} is not a file.")
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
        for name in MODELS:
            if has_task(name):
                read_heldout(get_task_data(name)["heldout"])
        if EVAL["text"] != "pydoc_topics" and not Path(EVAL["text"]).is_file():
            fail(f"config eval.text: {EVAL['text']} is neither `pydoc_topics` nor a file.")
    except InputError as e:
        fail(str(e))


def check_imatrix_config():
    """A type that needs an importance matrix is refused while the matrix is off, before any work."""
    for qtype in IMATRIX["use_for"]:
        if check_quant_type(qtype) in ("f16", "bf16"):
            fail(f"config imatrix.use_for: {qtype} is not quantized, so an importance matrix means nothing to it.")
    if not IMATRIX["enabled"]:
        for qtype in config["quant_types"]:
            if qtype.lower() in NEEDS_IMATRIX:
                fail(
                    f"quant_types: {qtype} needs an importance matrix, but imatrix.enabled is false; "
                    "turn it on or choose a type that needs none."
                )


QUANT_TYPES = [q.lower() for q in config["quant_types"]]


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    # every type llama-quantize can make here, so q4_model works whatever quant_types holds
    qtype="|".join(q for q in KNOWN_QUANT_TYPES if q != "f16"),
    # the stages of the report: HF folders through torch, GGUF files through llama.cpp
    hf_stage="|".join(HF_STAGES),
    gguf_stage="|".join(KNOWN_QUANT_TYPES),
    # an artifact a check reads: the f16 GGUF or a quantized one
    stage="|".join(KNOWN_QUANT_TYPES),
    # a GGUF LoRA of results/{model}/adapters/: `{n}-{name}`, n its place in the model's stack
    adapter=r"\d+-[A-Za-z0-9._-]+",


def get_llama_source():
    return str(paths.llama_source(LLAMA["build_dir"], COMMIT))


def get_llama_bin():
    return str(paths.llama_bin(LLAMA["build_dir"], COMMIT, LLAMA["cpu"]))


def get_llama_tools():
    return [str(p) for p in paths.llama_outputs(LLAMA["build_dir"], COMMIT, LLAMA["cpu"])]


# Flags that carry paths are lists of words, each quoted by the rule's `:q`, so a path may hold
# spaces, quotes or any letter.
def get_fetch_args():
    kind = LLAMA["source"]
    spec = LLAMA[kind]
    if kind == "sdist":
        return ["--package", spec["package"], "--version", spec["version"], "--sha256", spec["sha256"]]
    if kind == "git":
        return ["--url", spec["url"]]
    return ["--path", spec["dir"]]


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
    vocab = f"results/{wildcards.model}/checks/converter-vocab.json"
    if base == DEMO_BASE:
        return {"base": DEMO_BASE, "adapters": DEMO_ADAPTER, "vocab": vocab}
    return {
        "base": get_folder_files(base),
        "adapters": [f for a in adapters for f in get_folder_files(a)],
        "vocab": vocab,
    }


def get_vocab_check_input(wildcards):
    """What the converter's vocabulary check reads: the base's config.json and the tokenizer files the
    merged folder will carry (the last adapter's that has them, else the base's)."""
    base, adapters = get_base(wildcards), get_adapters(wildcards)
    if base == DEMO_BASE:
        return {"base": DEMO_BASE, "adapters": DEMO_ADAPTER}
    tokenizer = tokenizer_source(Path(base), [Path(a) for a in adapters])
    return {
        "config": f"{base}/config.json",
        "tokenizer": [str(tokenizer / f) for f in TOKENIZER_FILES if (tokenizer / f).is_file()],
    }


def get_adapter_args(wildcards):
    return [word for a in get_adapters(wildcards) for word in ("--adapter", a)]


def get_adapter_names(model):
    """`{n}-{name}` of each adapter of a model, n its place in the stack, name its folder's (the demo's: demo)."""
    adapters = MODELS[model]["adapters"]
    names = ["demo"] if adapters == ["demo"] else [re.sub(r"[^A-Za-z0-9._-]", "_", Path(a).name) for a in adapters]
    return [f"{n}-{name}" for n, name in enumerate(names, 1)]


def get_adapter_ggufs(wildcards):
    return [f"results/{wildcards.model}/adapters/{a}.gguf" for a in get_adapter_names(wildcards.model)]


def get_runtime_adapters(wildcards):
    """The model's adapters, once each has been checked to run as a GGUF LoRA; one that cannot stops the
    run as the DAG is built, before any job, naming the adapter and why (merging it still works). The demo
    adapter is made by the run itself, and checked by the step."""
    base, adapters = get_base(wildcards), get_adapters(wildcards)
    if base != DEMO_BASE:
        try:
            check_runtime(Path(base), [Path(a) for a in adapters])
        except InputError as e:
            fail(str(e))
    return adapters


@functools.cache
def has_runtime_lora(model):
    """Whether the report sets each quant merged beside its unmerged base + the adapters applied at run
    time: when the model has adapters that can run as GGUF LoRAs (the demo's is checked by its step). One
    that cannot is left out of the report, said once, and is merged as ever."""
    base, adapters = MODELS[model]["base"], MODELS[model]["adapters"]
    if not adapters or base == "demo":
        return bool(adapters)
    try:
        check_runtime(Path(base), [Path(a) for a in adapters])
    except InputError as e:
        print(f"The report of {model} has no runtime-LoRA stages: {e}", file=sys.stderr)
        return False
    return True


def get_runtime_lora_args(wildcards):
    """scripts.make_eval_report's --runtime-lora QTYPE=BASE for each quant type, and the adapters' files."""
    if not has_runtime_lora(wildcards.model):
        return []
    bases = [f"--runtime-lora={q}=results/{wildcards.model}/base-{q}.gguf" for q in QUANT_TYPES]
    return [*bases, "--adapters", *get_adapter_ggufs(wildcards)]


def get_unmerged_base_input(wildcards):
    get_runtime_adapters(wildcards)
    return get_merge_input(wildcards)


def get_adapter_folder(wildcards):
    """The adapter folder behind results/{model}/adapters/{adapter}.gguf."""
    names = get_adapter_names(wildcards.model)
    if wildcards.adapter not in names:
        fail(f"results/{wildcards.model}/adapters/{wildcards.adapter}.gguf: the model's adapters are {names}.")
    return get_runtime_adapters(wildcards)[names.index(wildcards.adapter)]


def get_adapter_input(wildcards):
    folder = get_adapter_folder(wildcards)
    return folder if folder == DEMO_ADAPTER else get_folder_files(folder)


def get_lora_args(wildcards):
    return [word for f in get_adapter_ggufs(wildcards) for word in ("--lora", f)]


def get_runtime_gate_arg(wildcards):
    """The f16 base + runtime LoRA must answer as the merged f16 does; a quantized pair is measured, since
    quantizing before or after merging rounds differently (what the report compares)."""
    return [] if wildcards.stage == "f16" else ["--no-gate"]


def get_lora_adapters():
    """What the target lora_adapters makes: every model's GGUF LoRAs, its unmerged base in each quant type,
    and where the task has held-out prompts, base + runtime LoRA checked against the merged GGUF."""
    files = []
    for model in MODELS:
        files += [f"results/{model}/adapters/{a}.gguf" for a in get_adapter_names(model)]
        files += [f"results/{model}/base-{q}.gguf" for q in QUANT_TYPES]
        if has_task(model):
            files += [f"results/{model}/checks/runtime-lora-{s}.json" for s in get_gguf_stages()]
    return files


def get_quantized():
    return expand("results/{model}/ggml-model-{qtype}.gguf", model=MODELS, qtype=QUANT_TYPES)


def get_task_data(model):
    """The model's task data files by split: the demo task for the demo, else models[].task_data."""
    if MODELS[model]["adapters"] == ["demo"]:
        return DEMO_TASK
    return MODELS[model].get("task_data", {})


def has_task(model):
    """Whether the model has a task the report scores: held-out JSONL rows with answers."""
    return str(get_task_data(model).get("heldout", "")).endswith(".jsonl")


def get_task_files(wildcards):
    return list(get_task_data(wildcards.model).values())


def get_task_args(wildcards):
    return [word for f in get_task_files(wildcards) for word in ("--task-data", f)]


def get_heldout(wildcards):
    return get_task_data(wildcards.model).get("heldout", [])


def get_heldout_arg(wildcards):
    heldout = get_heldout(wildcards)
    return ["--heldout", heldout] if heldout else []


def get_calibration_files(wildcards):
    train = get_task_data(wildcards.model).get("train")
    return [*([train] if train and IMATRIX["task_data"] else []), *IMATRIX["text"]]


def get_calibration_args(wildcards):
    train = get_task_data(wildcards.model).get("train")
    args = ["--task-data", train] if train and IMATRIX["task_data"] else []
    return args + [word for t in IMATRIX["text"] for word in ("--text", t)]


def uses_imatrix(qtype):
    return IMATRIX["enabled"] and (qtype in NEEDS_IMATRIX or qtype in [q.lower() for q in IMATRIX["use_for"]])


def get_quantize_input(wildcards, weights="ggml-model"):
    """What quantize reads: the f16 GGUF (`weights`: ggml-model, the merged one, or base, the unmerged one),
    and the importance matrix where the type uses one (the merged model's for both: base + LoRA is that model)."""
    files = {"gguf": f"results/{wildcards.model}/{weights}-f16.gguf", "quantize": f"{get_llama_bin()}/llama-quantize"}
    if uses_imatrix(wildcards.qtype):
        files["imatrix"] = f"results/{wildcards.model}/imatrix.gguf"
    return files


def get_base_quantize_input(wildcards):
    return get_quantize_input(wildcards, "base")


def get_imatrix_arg(wildcards):
    return ["--imatrix", f"results/{wildcards.model}/imatrix.gguf"] if uses_imatrix(wildcards.qtype) else []


def get_check_input(wildcards):
    """What the tokenizer and chat-template checks read: the artifact, the merged model (the reference),
    the base (to tell the words an adapter added), the task data and the pinned libllama."""
    base = get_base(wildcards)
    return {
        "gguf": f"results/{wildcards.model}/ggml-model-{wildcards.stage}.gguf",
        "merged": f"results/{wildcards.model}/merged",
        "base": base if base == DEMO_BASE else get_folder_files(base),
        "task": get_task_files(wildcards),
        "lib": f"{get_llama_bin()}/libllama.so",
    }


def get_parity_checks(qtypes):
    """The tokenizer and chat-template checks of the f16 GGUF and each of `qtypes`: part of the chain."""
    stages = ["f16", *[q for q in qtypes if q != "f16"]]
    return expand(
        "results/{model}/checks/{check}-{stage}.json", model=MODELS, check=["tokenizer", "chat-template"], stage=stages
    )


def get_model_checks(model):
    """The checks of one model: parity of each artifact, generation parity where the task has held-out
    prompts, and each quant made with the importance matrix compared with the same type made without."""
    checks = expand(
        "results/{model}/checks/{check}-{stage}.json",
        model=model,
        check=["tokenizer", "chat-template"],
        stage=get_gguf_stages(),
    )
    if has_task(model):
        checks.append(f"results/{model}/checks/generation.json")
    return checks + [f"results/{model}/checks/imatrix-{q}.json" for q in QUANT_TYPES if uses_imatrix(q)]


def get_checks():
    return [check for model in MODELS for check in get_model_checks(model)]


# Resources: what a job asks a scheduler for (SLURM's --mem and --time, minutes),
# sized from the job's inputs where the cost grows with the model. Memory figures
# are the step's peak plus HEADROOM_MB for the interpreter and its libraries.
# A rule's `threads:` is the most its step uses well: `-c N` caps it, and
# profiles/slurm/config.yaml sets it per rule for a cluster.
MB = 1 << 20
GB = 1 << 30
HEADROOM_MB = 1024
BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}


def get_made(path):
    """`path` once an earlier job has made it; until then FileNotFoundError, which Snakemake
    takes as "size this job later" and asks again when the job's input is all there."""
    if not Path(path).exists():
        raise FileNotFoundError(errno.ENOENT, "not made yet", path)
    return Path(path)


def get_shard_numels(folder):
    """Element counts of every tensor, by weights shard (safetensors or .bin), of a HF model folder (headers only)."""
    shards = sorted(set(base_shards(get_made(folder)).values()))
    return {shard: [math.prod(t["shape"]) for t in weights_header(shard).values()] for shard in shards}


def get_tree_bytes(folder):
    return sum(p.stat().st_size for p in get_made(folder).rglob("*") if p.is_file())


def get_merge_mem_mb(wildcards, input):
    """scripts.merge streams one tensor at a time: the largest base tensor as read, its f32 working
    copy and LoRA delta, and its output-dtype copy; plus the adapters (a .bin one is read whole)."""
    numels = get_shard_numels(get_base(wildcards)).values()
    largest = max(map(max, numels))
    out = BYTES_PER_ELEMENT[DTYPES[config["merge"]["dtype"]]]
    tensor = largest * (4 + 4 + 4 + out)  # as read (at most f32), f32 copy, f32 delta, output
    adapters = sum(adapter_weights_file(get_made(a)).stat().st_size for a in get_adapters(wildcards))
    return math.ceil((tensor + adapters) / MB) + HEADROOM_MB


def get_merge_runtime(wildcards, input):
    """Minutes: reading, merging and writing the base, at a pessimistic 2 minutes per GB."""
    return 10 + math.ceil(2 * get_tree_bytes(get_base(wildcards)) / GB)


def get_convert_mem_mb(wildcards, input):
    """The converter reads tensors lazily: a few f32 copies of the largest one are alive at a time."""
    largest = max(max(n) for n in get_shard_numels(input.model).values())
    return math.ceil(3 * 4 * largest / MB) + HEADROOM_MB


def get_convert_runtime(wildcards, input):
    return 10 + math.ceil(2 * get_tree_bytes(input.model) / GB)


def get_quantize_mem_mb(wildcards, input):
    """llama-quantize reads one tensor at a time: its f16 data, an f32 copy and the quantized output."""
    from gguf import GGUFReader

    largest = max(int(t.n_elements) for t in GGUFReader(get_made(input.gguf)).tensors)
    return math.ceil((2 + 4 + 4) * largest / MB) + HEADROOM_MB // 2


def get_quantize_runtime(wildcards, input):
    return 10 + math.ceil(get_made(input.gguf).stat().st_size / GB)


def get_build_mem_mb(wildcards, threads):
    """One compiler per thread; ggml's largest sources need about 500 MB each."""
    return HEADROOM_MB + 500 * threads


def get_eval_text_input(wildcards):
    inputs = {}
    if has_task(wildcards.model):
        inputs["task"] = get_heldout(wildcards)
    if EVAL["text"] != "pydoc_topics":
        inputs["text"] = EVAL["text"]
    return inputs


def get_task_arg(wildcards):
    return ["--heldout", get_heldout(wildcards)] if has_task(wildcards.model) else []


def get_hf_stage_model(wildcards):
    return get_base(wildcards) if wildcards.hf_stage == "base" else f"results/{wildcards.model}/merged"


def get_hf_stage_input(wildcards):
    """The stage's folder, or a user's base folder's files, so a changed file reruns the stage."""
    model = get_hf_stage_model(wildcards)
    if model in (DEMO_BASE, f"results/{wildcards.model}/merged"):
        return {"model": model}
    return {"model": get_folder_files(model)}


def get_bench_threads():
    """The thread counts of the sweep: config, else 1 up to the cores snakemake was given."""
    return EVAL["bench"]["threads"] or list(range(1, (workflow.cores or os.cpu_count()) + 1))


def get_gguf_stages():
    return ["f16", *QUANT_TYPES]


def get_stages():
    """The stages of the report, in its order."""
    return [*HF_STAGES, *get_gguf_stages()]


def get_report_input(wildcards):
    model = wildcards.model
    figures = f"results/{model}/report"
    inputs = {
        "artifacts": [get_base(wildcards), f"results/{model}/merged"]
        + [f"results/{model}/ggml-model-{s}.gguf" for s in get_gguf_stages()],
        "perplexity": [f"{figures}/perplexity/{s}.json" for s in ("base", "merged", "f16")],
        "kl_divergence": [f"{figures}/kl_divergence/{q}.json" for q in QUANT_TYPES],
        "bench": [f"{figures}/bench/{s}.json" for s in get_gguf_stages()],
        "checks": get_model_checks(model),
        "task": [],
        "runtime_lora": [],
    }
    if has_task(model):
        inputs["task"] = [f"{figures}/task/{s}.json" for s in get_stages()]
    if has_runtime_lora(model):
        kinds = ("kl", "speed", "task") if has_task(model) else ("kl", "speed")
        inputs["runtime_lora"] = [f"{figures}/runtime_lora/{q}-{k}.json" for q in QUANT_TYPES for k in kinds]
        inputs["runtime_lora"] += [f"results/{model}/base-{q}.gguf" for q in QUANT_TYPES]
    return inputs


def get_report_args(wildcards):
    """The stages in report order, each with its artifact, for scripts.make_eval_report."""
    paths = get_report_input(wildcards)["artifacts"]
    return [word for s, p in zip(get_stages(), paths) for word in ("--stage", f"{s}={p}")]


def get_report_task_flag(wildcards):
    return "--task" if has_task(wildcards.model) else ""


def get_eval_reports():
    return expand(
        "results/{model}/report/{name}",
        model=MODELS,
        name=("report.html", "metrics.json", "quality_gate.txt"),
    )


def get_check_mem_mb(wildcards, input):
    """A transformers tokenizer and a vocabulary-only GGUF load: the vocabulary, not the weights."""
    return 2 * HEADROOM_MB


def get_generation_mem_mb(wildcards, input):
    """The merged model in float32 and the f16 GGUF, both loaded whole, plus the generation caches."""
    return math.ceil((get_tree_bytes(input.merged) + get_made(input.gguf).stat().st_size) / MB) + 2 * HEADROOM_MB


def get_generation_runtime(wildcards, input):
    return 20 + math.ceil(20 * get_made(input.gguf).stat().st_size / GB)


def get_runtime_check_mem_mb(wildcards, input):
    """The merged GGUF, then the unmerged one with its adapters (both alive at once at worst), plus the caches."""
    sizes = get_made(input.gguf).stat().st_size + get_made(input.merged).stat().st_size
    return math.ceil(sizes / MB) + 2 * HEADROOM_MB


def get_imatrix_mem_mb(wildcards, input):
    """llama-imatrix holds the f16 GGUF and one context's activations."""
    return math.ceil(get_made(input.gguf).stat().st_size / MB) + 2 * HEADROOM_MB


def get_imatrix_runtime(wildcards, input):
    """Minutes: a forward pass over the calibration text, pessimistically 10 minutes per GB of f16 weights."""
    return 10 + math.ceil(10 * get_made(input.gguf).stat().st_size / GB)


def get_compare_mem_mb(wildcards, input):
    """One model at a time (quantize, llama-perplexity, generation), the f16 one being the largest."""
    return math.ceil(get_made(input.f16).stat().st_size / MB) + 2 * HEADROOM_MB


def get_compare_runtime(wildcards, input):
    return 20 + math.ceil(30 * get_made(input.f16).stat().st_size / GB)


check_config()
