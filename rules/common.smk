import functools
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from snakemake.utils import min_version, validate

min_version("9.0")

# the scripts and the cpuforge library are packages of this repository: make `python -m scripts.<step>`
# (in every job) and the imports below work from any working directory
sys.path.insert(0, workflow.basedir)
# (the prefix is formatted like the command, hence the doubled braces)
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from cpuforge import paths
from cpuforge.sizing import resources
from cpuforge.demo import TARGET_MODULES as DEMO_TARGETS, demo_gguf
from cpuforge.errors import InputError
from cpuforge.merge.plan import TOKENIZER_FILES, check_inputs, tokenizer_source
from cpuforge.llama.quant import NEEDS_IMATRIX, QUANT_TYPES as KNOWN_QUANT_TYPES, check_quant_type
from cpuforge.merge.runtime_lora import check_runtime
from cpuforge.text.task import check_task_data, prose, read_heldout, read_rows

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
            PLANS[name] = check_inputs(Path(model["base"]), [Path(a) for a in model["adapters"]])
        for name in MODELS:
            check_task_data(get_task_data(name))  # every line of every task file, now, not after the merge
            get_model_facts(name)  # what every job will need, from the headers
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


# Resources: what a job asks a scheduler for (mem_mb, disk_mb and runtime: SLURM's --mem and --time)
# and what the start-up preflight holds against this machine; one set of figures per job, from
# cpuforge.sizing.resources, predicted from the inputs' headers before anything is made (the merge's plan, the
# merged model it gives, a GGUF's own header once it exists). A rule's `threads:` is the most its step
# uses well: `-c N` caps it, and profiles/slurm/config.yaml sets it per rule for a cluster.
PREFLIGHT = config["preflight"]
PLANS = {}  # model -> its checked merge (cpuforge.merge.plan.Plan), kept by check_config


@functools.cache
def get_model_facts(model):
    """A model's figures from its base's and adapters' headers; for the demo before they are made, from
    the GGUF its base comes from."""
    dtype = config["merge"]["dtype"]
    if model not in PLANS and Path(DEMO_ADAPTER).is_dir():
        PLANS[model] = check_inputs(Path(DEMO_BASE), [Path(DEMO_ADAPTER)])
    if model in PLANS:
        return resources.plan_model(PLANS[model], dtype)
    return resources.demo_model(demo_gguf(), config["demo"]["rank"], DEMO_TARGETS, dtype)


def get_tokenizer_source(model):
    """The folder the merged model's tokenizer files come from; None for the demo before its adapter is made
    (it saves a tokenizer.json)."""
    get_model_facts(model)
    return PLANS[model].tokenizer if model in PLANS else None


@functools.cache
def read_gguf_header(path, mtime):
    return resources.read_gguf(path)


def get_gguf_facts(model, stage, weights="ggml-model"):
    """A GGUF's figures (`weights`: ggml-model, the merged one, or base, the unmerged one of runtime LoRA):
    its header once it is made, else as the merged model (or the base) predicts it."""
    path = Path(f"results/{model}/{weights}-{stage}.gguf")
    if path.is_file():
        return read_gguf_header(str(path), path.stat().st_mtime)
    facts = get_model_facts(model)
    return resources.predicted_gguf(facts if weights == "ggml-model" else resources.unmerged_base(facts), stage)


def get_lora_bytes(model):
    """The model's GGUF LoRAs, as they load beside the unmerged base."""
    return resources.lora_gguf_bytes(get_model_facts(model))


@functools.cache
def get_task_figures(model, limit=0):
    rows = read_heldout(get_task_data(model)["heldout"]) if has_task(model) else []
    return resources.task_figures(rows[:limit] if limit else rows)


def get_text_bytes(files):
    return sum(Path(f).stat().st_size for f in files)


def get_imatrix_chunks(model):
    """Chunks of llama-imatrix: imatrix.chunks, else as many as the calibration text holds."""
    if IMATRIX["chunks"]:
        return IMATRIX["chunks"]
    text = get_text_bytes(get_calibration_files(SimpleNamespace(model=model))) + IMATRIX["prose_chars"]
    return max(1, resources.estimated_tokens(text) // IMATRIX["ctx_size"])


def get_compare_chunks():
    compare = config["checks"]["imatrix"]
    return compare["chunks"] or max(1, resources.utf8_tokens(prose("evaluation")) // compare["ctx_size"])


def get_demo_example_tokens():
    """The longest demo training example (prompt and answer), in estimated tokens."""
    task = resources.task_figures(read_rows(DEMO_TASK["train"]))
    return task.longest_prompt + task.longest_answer


def get_stage_facts(model, stage):
    """The tensors and architecture a HF stage's streamed pass reads: the base's or the merged model's."""
    m = get_model_facts(model)
    return (m.merged, m.arch) if stage == "merged" else (m.base, resources.base_arch(m))


GENERATION, COMPARE = config["checks"]["generation"], config["checks"]["imatrix"]
NEEDS = {
    "merge": lambda w, t: resources.merge(get_model_facts(w["model"]), t),
    "convert": lambda w, t: resources.convert(get_model_facts(w["model"]), get_gguf_facts(w["model"], "f16")),
    "quantize": lambda w, t: resources.quantize(
        get_gguf_facts(w["model"], "f16"), get_gguf_facts(w["model"], w["qtype"]), w["qtype"], t
    ),
    "make_imatrix": lambda w, t: resources.make_imatrix(
        get_gguf_facts(w["model"], "f16"), IMATRIX["ctx_size"], get_imatrix_chunks(w["model"]), t
    ),
    "eval_perplexity": lambda w, t: resources.eval_perplexity(
        get_gguf_facts(w["model"], "f16"), EVAL["ctx"], EVAL["chunks"], t
    ),
    "eval_kl_divergence": lambda w, t: resources.eval_kl_divergence(
        get_gguf_facts(w["model"], w["qtype"]), EVAL["ctx"], EVAL["chunks"], t
    ),
    "eval_perplexity_hf": lambda w, t: resources.eval_perplexity_hf(
        *get_stage_facts(w["model"], w["hf_stage"]), EVAL["ctx"], EVAL["chunks"], t
    ),
    "eval_task_hf": lambda w, t: resources.eval_task_hf(
        *get_stage_facts(w["model"], w["hf_stage"]), get_task_figures(w["model"]), EVAL["max_new_tokens"], t
    ),
    "eval_task": lambda w, t: resources.eval_task(
        get_gguf_facts(w["model"], w["gguf_stage"]), get_task_figures(w["model"]), EVAL["max_new_tokens"], t
    ),
    "bench_threads": lambda w, t: resources.bench_threads(
        get_gguf_facts(w["model"], w["gguf_stage"]),
        EVAL["bench"]["prompt_tokens"],
        EVAL["bench"]["gen_tokens"],
        EVAL["bench"]["repetitions"],
        get_bench_threads(),
    ),
    "check_generation": lambda w, t: resources.check_generation(
        get_model_facts(w["model"]),
        get_gguf_facts(w["model"], "f16"),
        get_task_figures(w["model"], GENERATION["prompts"]),
        GENERATION["max_new_tokens"],
        t,
    ),
    "compare_imatrix": lambda w, t: resources.compare_imatrix(
        get_gguf_facts(w["model"], "f16"),
        get_gguf_facts(w["model"], w["qtype"]),
        w["qtype"],
        COMPARE["ctx_size"],
        get_compare_chunks(),
        get_task_figures(w["model"], COMPARE["prompts"]),
        t,
    ),
    "check_tokenizer": lambda w, t: resources.check_tokenizer(
        get_model_facts(w["model"]).arch, get_text_bytes(get_task_data(w["model"]).values())
    ),
    "check_chat_template": lambda w, t: resources.check_chat_template(get_model_facts(w["model"]).arch),
    "check_converter_vocab": lambda w, t: resources.check_converter_vocab(get_model_facts(w["model"]).arch),
    # runtime LoRA (rules/adapters.smk): the unmerged base through the same converter and llama-quantize
    "make_unmerged_base": lambda w, t: resources.make_unmerged_base(
        get_model_facts(w["model"]), get_tokenizer_source(w["model"])
    ),
    "convert_base": lambda w, t: resources.convert(
        resources.unmerged_base(get_model_facts(w["model"])), get_gguf_facts(w["model"], "f16", "base")
    ),
    "quantize_base": lambda w, t: resources.quantize(
        get_gguf_facts(w["model"], "f16", "base"), get_gguf_facts(w["model"], w["qtype"], "base"), w["qtype"], t
    ),
    "convert_adapter": lambda w, t: resources.convert_adapter(
        get_model_facts(w["model"]), get_adapter_names(w["model"]).index(w["adapter"])
    ),
    "check_runtime_lora": lambda w, t: resources.check_runtime_lora(
        get_gguf_facts(w["model"], w["stage"]),
        get_gguf_facts(w["model"], w["stage"], "base"),
        get_lora_bytes(w["model"]),
        get_task_figures(w["model"], GENERATION["prompts"]),
        GENERATION["max_new_tokens"],
        t,
    ),
    "eval_kl_divergence_lora": lambda w, t: resources.eval_kl_divergence_lora(
        get_gguf_facts(w["model"], w["qtype"], "base"), get_lora_bytes(w["model"]), EVAL["ctx"], EVAL["chunks"], t
    ),
    "eval_task_lora": lambda w, t: resources.eval_task_lora(
        get_gguf_facts(w["model"], w["qtype"], "base"),
        get_lora_bytes(w["model"]),
        get_task_figures(w["model"]),
        EVAL["max_new_tokens"],
        t,
    ),
    "bench_runtime_lora": lambda w, t: resources.bench_runtime_lora(
        get_gguf_facts(w["model"], w["qtype"]),
        get_gguf_facts(w["model"], w["qtype"], "base"),
        get_lora_bytes(w["model"]),
        EVAL["bench"]["prompt_tokens"],
        EVAL["bench"]["gen_tokens"],
        EVAL["bench"]["repetitions"],
        max(get_bench_threads()),
    ),
    "build_llama_cpp": lambda w, t: resources.build_llama_cpp(t),
    "make_demo_base": lambda w, t: resources.make_demo_base(get_model_facts("demo")),
    "train_demo_adapter": lambda w, t: resources.train_demo_adapter(
        get_model_facts("demo"), config["demo"]["batch_size"], config["demo"]["steps"], t, get_demo_example_tokens()
    ),
}


@functools.cache
def get_need(name, wildcards, threads):
    """One job's figures, `name` its rule's and `wildcards` as sorted items; None for a target rule, which
    only names files. (`name`, since the linter takes a line with the word rule, a space and a colon
    for a rule definition.)"""
    if name in resources.SMALL:
        return resources.SMALL[name]
    return NEEDS[name](dict(wildcards), threads) if name in NEEDS else None


def get_mem_mb(wildcards, threads, rulename):
    return get_need(rulename, tuple(sorted(wildcards.items())), threads).mem_mb


def get_disk_mb(wildcards, threads, rulename):
    return get_need(rulename, tuple(sorted(wildcards.items())), threads).disk_mb


def get_runtime(wildcards, threads, rulename):
    return get_need(rulename, tuple(sorted(wildcards.items())), threads).runtime


def get_job(rule, wildcards, threads, output):
    """A job of the plan or the preflight: its figures beside its rule, model and other wildcards."""
    need = get_need(rule, tuple(sorted(wildcards.items())), threads)
    if need is None:
        return None
    model = wildcards.get("model", "demo" if rule in ("make_demo_base", "train_demo_adapter") else "-")
    job = ",".join(f"{k}={v}" for k, v in sorted(wildcards.items()) if k != "model")
    return resources.Job(rule, model, job, str(output), need)


def get_plan_jobs():
    """The jobs `all` runs from scratch, as (rule, wildcards, first output); tests/test_resources.py holds
    them against Snakemake's own dry run."""
    jobs = []
    # the source is fetched once for every flavour; a flavour is built where its tools are missing
    fetched = Path(get_llama_source()).exists()
    if not fetched:
        jobs.append(("fetch_llama_cpp", {}, get_llama_source()))
    if not fetched or not all(Path(t).exists() for t in get_llama_tools()):
        jobs.append(("build_llama_cpp", {}, get_llama_tools()[0]))
    if any(m["base"] == "demo" for m in MODELS.values()):
        jobs += [("make_demo_base", {}, DEMO_BASE), ("train_demo_adapter", {}, DEMO_ADAPTER)]
    for model in MODELS:
        r, w = f"results/{model}", {"model": model}
        jobs.append(("check_converter_vocab", w, f"{r}/checks/converter-vocab.json"))
        jobs += [("merge", w, f"{r}/merged"), ("convert", w, f"{r}/ggml-model-f16.gguf")]
        jobs += [("quantize", w | {"qtype": q}, f"{r}/ggml-model-{q}.gguf") for q in QUANT_TYPES]
        if any(uses_imatrix(q) for q in QUANT_TYPES):
            jobs.append(("make_imatrix", w, f"{r}/imatrix.gguf"))
        jobs += [
            ("make_eval_text", w, f"{r}/report/eval_text.txt"),
            ("eval_perplexity", w, f"{r}/report/perplexity/f16.json"),
        ]
        jobs += [("eval_perplexity_hf", w | {"hf_stage": s}, f"{r}/report/perplexity/{s}.json") for s in HF_STAGES]
        jobs += [("eval_kl_divergence", w | {"qtype": q}, f"{r}/report/kl_divergence/{q}.json") for q in QUANT_TYPES]
        if has_task(model):
            jobs += [("eval_task_hf", w | {"hf_stage": s}, f"{r}/report/task/{s}.json") for s in HF_STAGES]
            jobs += [("eval_task", w | {"gguf_stage": s}, f"{r}/report/task/{s}.json") for s in get_gguf_stages()]
            jobs.append(("check_generation", w, f"{r}/checks/generation.json"))
        jobs += [("bench_threads", w | {"gguf_stage": s}, f"{r}/report/bench/{s}.json") for s in get_gguf_stages()]
        jobs += [
            ("make_eval_report", w, f"{r}/report/report.html"),
            ("check_quality_gate", w, f"{r}/report/quality_gate.txt"),
        ]
        for stage in get_gguf_stages():
            jobs.append(("check_tokenizer", w | {"stage": stage}, f"{r}/checks/tokenizer-{stage}.json"))
            jobs.append(("check_chat_template", w | {"stage": stage}, f"{r}/checks/chat-template-{stage}.json"))
        jobs += [
            ("compare_imatrix", w | {"qtype": q}, f"{r}/checks/imatrix-{q}.json")
            for q in QUANT_TYPES
            if uses_imatrix(q)
        ]
        if has_runtime_lora(model):
            jobs += [("make_unmerged_base", w, f"{r}/base"), ("convert_base", w, f"{r}/base-f16.gguf")]
            jobs += [("quantize_base", w | {"qtype": q}, f"{r}/base-{q}.gguf") for q in QUANT_TYPES]
            jobs += [
                ("convert_adapter", w | {"adapter": a}, f"{r}/adapters/{a}.gguf") for a in get_adapter_names(model)
            ]
            kinds = ["kl", "speed", "task"] if has_task(model) else ["kl", "speed"]
            rules = {"kl": "eval_kl_divergence_lora", "speed": "bench_runtime_lora", "task": "eval_task_lora"}
            jobs += [
                (rules[k], w | {"qtype": q}, f"{r}/report/runtime_lora/{q}-{k}.json")
                for q in QUANT_TYPES
                for k in kinds
            ]
    return jobs


def get_rule_threads(rule):
    """The threads a rule's job gets here: its `threads:`, capped by the cores snakemake was given."""
    return min(workflow.get_rule(rule).resources["_cores"].value, workflow.cores or os.cpu_count())


def get_plan():
    return [get_job(rule, w, get_rule_threads(rule), out) for rule, w, out in get_plan_jobs()]


def show_plan(tsv, log):
    """Print the plan table, with the sentence of every job that this machine could not run; the table
    also goes to `log`, and as TSV to `tsv`."""
    jobs = get_plan()
    resources.write_plan(jobs, tsv)
    memory, free = get_machine()
    lines = [
        f"here: {sentence}"
        for job in jobs
        if (sentence := resources.refusal(job, memory, free or resources.free_disk_mb(job.output)))
    ]
    text = resources.plan_table(jobs) + "".join(line + "\n" for line in lines)
    Path(log).write_text(text)
    print(text, end="")


def get_machine():
    """This machine's memory in MiB, and the free disk if preflight.disk_mb states it (else None: each
    job's own file system is asked)."""
    return PREFLIGHT["mem_mb"] or resources.machine_memory_mb(), PREFLIGHT["disk_mb"] or None


def preflight():
    """Before any job of a local run: refuse the run, in one sentence, when a job needs more memory than
    this machine has or more disk than is free where it writes, counting what the jobs before it write
    there. A cluster run asks each job's figures of the scheduler instead."""
    if not workflow.local_exec or not workflow.is_main_process:
        return
    memory, free = get_machine()
    written = {}
    jobs = set(workflow.dag.needrun_jobs())
    for layer in workflow.dag.toposorted(jobs):
        figures = [
            get_job(j.rule.name, dict(j.wildcards.items()), j.threads, j.output[0] if j.output else "") for j in layer
        ]
        # within a layer the order is Snakemake's choice: the largest first, so it is the one named
        for job in sorted(filter(None, figures), key=lambda f: (-f.need.disk_mb, f.rule, f.job)):
            device, space = resources.file_system(job.output)
            if sentence := resources.refusal(job, memory, free or space, written.get(device, 0)):
                fail(sentence)
            written[device] = written.get(device, 0) + job.need.kept_mb


check_config()


onstart:
    preflight()
