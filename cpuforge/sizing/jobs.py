"""A workflow job's figures: the facts its rule's formula needs (cpuforge.sizing.needs), gathered from the
model spec and the headers of what exists (one function per working rule, named by cpuforge.catalogue.RULES),
and the order of the plan's rows.

Before anything is made, a model's figures come from its base's and adapters' headers (the merge's plan,
the merged model it gives), the demo's from the GGUF its base comes from; a GGUF's from its own header once
it exists, else as the merged model predicts it."""

from __future__ import annotations

import os
from pathlib import Path

from cpuforge import catalogue
from cpuforge.catalogue import BASE, MERGED, RULE, RULES
from cpuforge.demo import TARGET_MODULES as DEMO_TARGETS
from cpuforge.serve.speculation import SETTINGS as SPECULATION_SETTINGS
from cpuforge.demo import demo_gguf
from cpuforge.llama.quant import candidate_files, listed_name
from cpuforge.merge.plan import Plan, check_inputs
from cpuforge.sizing import needs
from cpuforge.sizing.costs import Need, estimated_tokens, utf8_tokens
from cpuforge.sizing.gguf_size import Gguf, demo_model, predicted_gguf, read_gguf
from cpuforge.sizing.model import Arch, Model, Task, Tensor, base_arch, lora_gguf_bytes, plan_model
from cpuforge.sizing.model import task_figures, unmerged_base
from cpuforge.sizing.plan import Job, machine_memory_mb
from cpuforge.spec import AUTO, DEMO_ADAPTER, DEMO_BASE, HF_STAGES, Spec
from cpuforge.text.task import prose, read_heldout, read_rows


class Sizing:
    """Every job's figures for one run of the workflow: `spec` its config, `plans` the checked merge of each
    user's model (cpuforge.spec.check_spec), `cores` the cores Snakemake was given."""

    def __init__(self, spec: Spec, plans: dict[str, Plan], cores: int | None):
        self.spec, self.plans, self.cores = spec, dict(plans), cores or os.cpu_count()
        self._models: dict[str, Model] = {}
        self._headers: dict[tuple[str, float], Gguf] = {}
        self._tasks: dict[tuple[str, int], Task] = {}
        self._needs: dict[tuple, Need | None] = {}

    def model(self, name: str) -> Model:
        """A model's figures from its base's and adapters' headers; for the demo before they are made, from
        the GGUF its base comes from."""
        if name not in self._models:
            dtype = self.spec.merge["dtype"]
            if name not in self.plans and Path(DEMO_ADAPTER).is_dir():
                self.plans[name] = check_inputs(Path(DEMO_BASE), [Path(DEMO_ADAPTER)])
            if name in self.plans:
                self._models[name] = plan_model(self.plans[name], dtype)
            else:
                self._models[name] = demo_model(read_gguf(demo_gguf()), self.spec.demo["rank"], DEMO_TARGETS, dtype)
        return self._models[name]

    def tokenizer_source(self, name: str) -> Path | None:
        """The folder the merged model's tokenizer files come from; None for the demo before its adapter is
        made (it saves a tokenizer.json)."""
        self.model(name)
        return self.plans[name].tokenizer if name in self.plans else None

    def gguf(self, name: str, stage: str, weights: str = MERGED) -> Gguf:
        """A GGUF's figures (`weights`: MERGED or BASE, the unmerged one of runtime LoRA): its header once it
        is made, else as the merged model (or the base) predicts it."""
        path = Path(catalogue.gguf(name, stage, weights))
        if path.is_file():
            key = (str(path), path.stat().st_mtime)
            if key not in self._headers:
                self._headers[key] = read_gguf(path)
            return self._headers[key]
        facts = self.model(name)
        # the quant search's file is at most every matrix in q8_0 (the largest type it offers by default)
        stage = "q8_0" if stage == AUTO else stage
        return predicted_gguf(facts if weights == MERGED else unmerged_base(facts), stage)

    def lora_bytes(self, name: str) -> list[int]:
        """The model's GGUF LoRAs, as they load beside the unmerged base."""
        return lora_gguf_bytes(self.model(name))

    def task(self, name: str, limit: int = 0) -> Task:
        if (name, limit) not in self._tasks:
            model = self.spec.models[name]
            rows = read_heldout(model.task_data["heldout"]) if model.has_task else []
            self._tasks[name, limit] = task_figures(rows[:limit] if limit else rows)
        return self._tasks[name, limit]

    def imatrix_chunks(self, name: str) -> int:
        """Chunks of llama-imatrix: imatrix.chunks, else as many as the calibration text holds."""
        imatrix = self.spec.imatrix
        if imatrix["chunks"]:
            return imatrix["chunks"]
        text = text_bytes(self.spec.calibration_files(name)) + imatrix["prose_chars"]
        return max(1, estimated_tokens(text) // imatrix["ctx_size"])

    def compare_chunks(self) -> int:
        compare = self.spec.checks["imatrix"]
        return compare["chunks"] or max(1, utf8_tokens(prose("evaluation")) // compare["ctx_size"])

    def demo_example_tokens(self) -> int:
        """The longest demo training example (prompt and answer), in estimated tokens."""
        demo = next(m for m in self.spec.models.values() if m.demo)
        task = task_figures(read_rows(demo.task_data["train"]))
        return task.longest_prompt + task.longest_answer

    def stage(self, name: str, stage: str) -> tuple[dict[str, Tensor], Arch]:
        """The tensors and architecture a HF stage's streamed pass reads: the base's or the merged model's."""
        m = self.model(name)
        return (m.merged, m.arch) if stage == "merged" else (m.base, base_arch(m))

    def bench_threads(self) -> list[int]:
        """The thread counts of the sweep: config, else 1 up to the cores."""
        return self.spec.eval["bench"]["threads"] or list(range(1, self.cores + 1))

    def need(self, rule: str, wildcards: dict[str, str], threads: int) -> Need | None:
        """One job's figures; None for a target rule, which only names files."""
        key = (rule, tuple(sorted(wildcards.items())), threads)
        if key not in self._needs:
            self._needs[key] = NEEDS[rule](self, wildcards, threads) if rule in NEEDS else None
        return self._needs[key]

    # a rule's `resources:` (Snakemake passes the job's wildcards, its threads and its rule's name)

    def mem_mb(self, wildcards, threads: int, rulename: str) -> int:
        return self.need(rulename, dict(wildcards.items()), threads).mem_mb

    def disk_mb(self, wildcards, threads: int, rulename: str) -> int:
        return self.need(rulename, dict(wildcards.items()), threads).disk_mb

    def runtime(self, wildcards, threads: int, rulename: str) -> int:
        return self.need(rulename, dict(wildcards.items()), threads).runtime

    def machine(self) -> tuple[int, int | None]:
        """This machine's memory in MiB, and the free disk if preflight.disk_mb states it (else None: each
        job's own file system is asked)."""
        return self.spec.preflight["mem_mb"] or machine_memory_mb(), self.spec.preflight["disk_mb"] or None

    def job(self, rule: str, wildcards: dict[str, str], threads: int, output: str) -> Job | None:
        """A job of the plan or the preflight: its figures beside its rule, model and other wildcards."""
        need = self.need(rule, wildcards, threads)
        if need is None:
            return None
        model = wildcards.get("model", "demo" if rule in RULE and RULE[rule].group == "demo" else "-")
        job = ",".join(f"{k}={v}" for k, v in sorted(wildcards.items()) if k != "model")
        return Job(rule, model, job, str(output), need)

    def plan_order(self, rule: str, wildcards: dict[str, str]) -> tuple:
        """Where a job's row goes in the plan: the llama.cpp build and the demo's making first, then each model
        in config order, its rules in the order of catalogue.RULES, a group's rules taking turns over their
        wildcard's values (the quant types, stages and adapters in config order); a target rule last."""
        group, within = catalogue.place(rule)
        if "model" not in wildcards:
            return (0, group, within, rule)
        model = self.spec.models[wildcards["model"]]
        values = [*HF_STAGES, *self.spec.gguf_stages, *model.adapter_names]
        value = next((v for k, v in sorted(wildcards.items()) if k != "model"), None)
        rank = values.index(value) if value in values else -1
        return (1, list(self.spec.models).index(model.name), group, rank, within, rule)


def text_bytes(files) -> int:
    return sum(Path(f).stat().st_size for f in files)


# One function per working rule (catalogue.RULES names it): its job's Need from the facts of its wildcards
# (`w`) and its threads (`t`).


def merge_job(s: Sizing, w, t):
    return needs.merge_need(s.model(w["model"]), t)


def convert_job(s: Sizing, w, t):
    return needs.convert_need(s.model(w["model"]), s.gguf(w["model"], "f16"))


def quantize_job(s: Sizing, w, t):
    return needs.quantize_need(s.gguf(w["model"], "f16"), s.gguf(w["model"], w["qtype"]), w["qtype"], t)


def make_imatrix_job(s: Sizing, w, t):
    f16 = s.gguf(w["model"], "f16")
    return needs.make_imatrix_need(f16, s.spec.imatrix["ctx_size"], s.imatrix_chunks(w["model"]), t)


def eval_perplexity_job(s: Sizing, w, t):
    return needs.eval_perplexity_need(s.gguf(w["model"], "f16"), s.spec.eval["ctx"], s.spec.eval["chunks"], t)


def eval_kl_divergence_job(s: Sizing, w, t):
    quant = s.gguf(w["model"], w["gguf_stage"])
    return needs.eval_kl_divergence_need(quant, s.spec.eval["ctx"], s.spec.eval["chunks"], t)


def eval_perplexity_hf_job(s: Sizing, w, t):
    tensors, arch = s.stage(w["model"], w["hf_stage"])
    return needs.eval_perplexity_hf_need(tensors, arch, s.spec.eval["ctx"], s.spec.eval["chunks"], t)


def eval_task_hf_job(s: Sizing, w, t):
    tensors, arch = s.stage(w["model"], w["hf_stage"])
    return needs.eval_task_hf_need(tensors, arch, s.task(w["model"]), s.spec.eval["max_new_tokens"], t)


def eval_speculation_job(s: Sizing, w, t):
    gguf = s.gguf(w["model"], w["gguf_stage"])
    ev = s.spec.eval
    return needs.eval_speculation_need(gguf, s.task(w["model"]), ev["max_new_tokens"], t, len(SPECULATION_SETTINGS),
                                       ev["speculation"]["rounds"])  # fmt: skip


def eval_task_job(s: Sizing, w, t):
    gguf = s.gguf(w["model"], w["gguf_stage"])
    return needs.eval_task_need(gguf, s.task(w["model"]), s.spec.eval["max_new_tokens"], t)


def bench_threads_job(s: Sizing, w, t):
    bench = s.spec.eval["bench"]
    return needs.bench_threads_need(
        s.gguf(w["model"], w["gguf_stage"]),
        bench["prompt_tokens"],
        bench["gen_tokens"],
        bench["repetitions"],
        s.bench_threads(),
        bench["read_mib"],
    )


def measure_sensitivity_job(s: Sizing, w, t):
    auto = s.spec.auto_quant
    return needs.measure_sensitivity_need(s.gguf(w["model"], "f16"), auto["sample_weights"], len(s.spec.auto_types), t)


def auto_quant_search_job(s: Sizing, w, t):
    model, ev, auto = w["model"], s.spec.eval, s.spec.auto_quant
    typical = s.gguf(model, "q4_0")
    files = candidate_files(s.spec.auto_types, list(s.spec.fixed_types), s.spec.imatrix["enabled"])
    given = {listed_name(q, s.spec.uses_imatrix(q)) for q in s.spec.fixed_types}  # the workflow made them
    candidates = [(q, s.gguf(model, q), name not in given) for name, _, q, _, _ in files]
    largest = max((g for _, g, _ in candidates), key=lambda g: g.nbytes, default=typical)
    return needs.auto_quant_search_need(s.gguf(model, "f16"), candidates, largest, typical, ev["ctx"], ev["chunks"],
                                        s.task(model), ev["max_new_tokens"], auto["budget"], auto["gen_tokens"],
                                        ev["bench"]["repetitions"], t)  # fmt: skip


def check_generation_job(s: Sizing, w, t):
    generation = s.spec.checks["generation"]
    task = s.task(w["model"], generation["prompts"])
    f16 = s.gguf(w["model"], "f16")
    return needs.check_generation_need(s.model(w["model"]), f16, task, generation["max_new_tokens"], t)


def compare_imatrix_job(s: Sizing, w, t):
    compare = s.spec.checks["imatrix"]
    return needs.compare_imatrix_need(
        s.gguf(w["model"], "f16"),
        s.gguf(w["model"], w["qtype"]),
        w["qtype"],
        compare["ctx_size"],
        s.compare_chunks(),
        s.task(w["model"], compare["prompts"]),
        t,
    )


def check_tokenizer_job(s: Sizing, w, t):
    task_data = s.spec.models[w["model"]].task_data.values()
    return needs.check_tokenizer_need(s.model(w["model"]).arch, text_bytes(task_data))


def check_chat_template_job(s: Sizing, w, t):
    return needs.check_chat_template_need(s.model(w["model"]).arch)


def check_converter_vocab_job(s: Sizing, w, t):
    return needs.check_converter_vocab_need(s.model(w["model"]).arch)


# runtime LoRA (rules/adapters.smk): the unmerged base through the same converter and llama-quantize
def make_unmerged_base_job(s: Sizing, w, t):
    return needs.make_unmerged_base_need(s.model(w["model"]), s.tokenizer_source(w["model"]))


def convert_base_job(s: Sizing, w, t):
    return needs.convert_need(unmerged_base(s.model(w["model"])), s.gguf(w["model"], "f16", BASE))


def quantize_base_job(s: Sizing, w, t):
    f16, quant = s.gguf(w["model"], "f16", BASE), s.gguf(w["model"], w["qtype"], BASE)
    return needs.quantize_need(f16, quant, w["qtype"], t)


def convert_adapter_job(s: Sizing, w, t):
    index = s.spec.models[w["model"]].adapter_names.index(w["adapter"])
    return needs.convert_adapter_need(s.model(w["model"]), index)


def check_runtime_lora_job(s: Sizing, w, t):
    generation = s.spec.checks["generation"]
    return needs.check_runtime_lora_need(
        s.gguf(w["model"], w["stage"]),
        s.gguf(w["model"], w["stage"], BASE),
        s.lora_bytes(w["model"]),
        s.task(w["model"], generation["prompts"]),
        generation["max_new_tokens"],
        t,
    )


def eval_kl_divergence_lora_job(s: Sizing, w, t):
    base = s.gguf(w["model"], w["qtype"], BASE)
    ctx, chunks = s.spec.eval["ctx"], s.spec.eval["chunks"]
    return needs.eval_kl_divergence_lora_need(base, s.lora_bytes(w["model"]), ctx, chunks, t)


def eval_task_lora_job(s: Sizing, w, t):
    base = s.gguf(w["model"], w["qtype"], BASE)
    task, max_new_tokens = s.task(w["model"]), s.spec.eval["max_new_tokens"]
    return needs.eval_task_lora_need(base, s.lora_bytes(w["model"]), task, max_new_tokens, t)


def bench_runtime_lora_job(s: Sizing, w, t):
    bench = s.spec.eval["bench"]
    return needs.bench_runtime_lora_need(
        s.gguf(w["model"], w["qtype"]),
        s.gguf(w["model"], w["qtype"], BASE),
        s.lora_bytes(w["model"]),
        bench["prompt_tokens"],
        bench["gen_tokens"],
        bench["repetitions"],
        max(s.bench_threads()),
    )


def build_llama_cpp_job(s: Sizing, w, t):
    return needs.build_llama_cpp_need(t)


def make_demo_base_job(s: Sizing, w, t):
    return needs.make_demo_base_need(s.model("demo"))


def train_demo_adapter_job(s: Sizing, w, t):
    demo = s.spec.demo
    return needs.train_demo_adapter_need(s.model("demo"), demo["batch_size"], demo["steps"], t, s.demo_example_tokens())


def small_job(step: str, *figures, **named):
    """A job whose cost does not grow with the model (needs.small), as `step`'s."""
    return lambda s, w, t: needs.small(step, *figures, **named)


fetch_llama_cpp_job = small_job("fetch_llama_cpp", disk=200 << 20, seconds=5 * 60)
make_eval_text_job = small_job("make_eval_text")
make_eval_report_job = small_job("make_eval_report", 10 << 20, 10 << 20)
check_quality_gate_job = small_job("check_quality_gate")
build_read_bandwidth_job = small_job("build_read_bandwidth")
# npm ci's node_modules are scratch, deleted after the build; the page is a few MB
build_webui_job = small_job("build_webui", 1 << 30, 800 << 20, 10 * 60)

NEEDS = {r.name: globals()[r.need] for r in RULES}
