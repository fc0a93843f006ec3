"""The chain at real model sizes: each rule's wall time, peak memory and disk beside what the plan predicted.

    python -m benchmarks.scale --shape 1b [--target q4_model] [--workdir DIR] [--keep]
    python -m benchmarks.scale --shape llama-7b --target q4_model
    python -m benchmarks.scale --shape chinese-llama-plus-7b --target all
    python -m benchmarks.scale --shape 1b --auto --keep --target results/scale/ggml-model-auto.gguf \
        results/scale/report/kl_divergence/q4_0.json results/scale/report/task/q4_0.json   # the quant search

The quant search's time against q4_0's eval_kl_divergence + eval_task (logs/benchmarks/scale/) means what a
user pays only with `--full-eval`: sized down, the evaluation shrinks and the search's making of candidates
does not.

Builds a synthetic model of real shape with random weights, saved as HF saves one (f16 safetensors
shards of at most 10 GB, an index, config.json, the real LLaMA tokenizer from the pinned llama.cpp's
vocabulary files), and LoRA adapters for it: r=16 on the seven projections for `1b` (TinyLlama-1.1B's
shape) and `llama-7b`; for `chinese-llama-plus-7b` the seed's model, r=64 on the seven projections with
`embed_tokens` and `lm_head` saved whole at 49953 rows (a tokenizer extended to 49953 pieces), then a
second LoRA (r=16 on q, k, v, o) stacked on it. The inputs are built by a process of its own, so no
step measured here inherits its memory high-water mark.

Then it runs `snakemake -c2 plan` and `snakemake -c2 TARGET` on them, with the evaluation sized down
(see EVAL; `--full-eval` keeps config.yaml's windows and answers, and every held-out row), samples
the memory of every job's process tree every 0.2 s, and prints one row per job:
wall time beside the plan's time limit, predicted and measured peak RSS (the sampled peak; Snakemake's
own max_rss, sampled every 30 s after a job's first 15 s, beside it), predicted disk and the size of
what it wrote. Then peft's merge_and_unload + save_pretrained on the same inputs (f16, as the seed's
own merge script loads it), stopped when it would take more memory than is available, and the f16 and
q4_0 sizes beside the seed's log. Run by hand: `1b` takes about 10 minutes and 10 GB of disk; the
seed's 7B `all` about 30 minutes and 50 GB of disk.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    "tiny": {"vocab": 32000, "hidden": 256, "layers": 2, "ffn": 512, "heads": 4, "kv_heads": 4},
    "1b": {"vocab": 32000, "hidden": 2048, "layers": 22, "ffn": 5632, "heads": 32, "kv_heads": 4},
    "llama-7b": {"vocab": 32000, "hidden": 4096, "layers": 32, "ffn": 11008, "heads": 32, "kv_heads": 32},
    "chinese-llama-plus-7b": {"vocab": 32000, "hidden": 4096, "layers": 32, "ffn": 11008, "heads": 32,
                              "kv_heads": 32, "extended_vocab": 49953},
}  # fmt: skip

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# the evaluation, sized so a 7B `all` fits an afternoon on 2 cores
EVAL = {
    "eval": {"ctx": 256, "chunks": 4, "max_new_tokens": 16,
             "bench": {"threads": [2], "prompt_tokens": 128, "gen_tokens": 16, "repetitions": 1},
             "gate": {"max_ppl_increase_pct": 1e9, "max_kl_divergence": 1e9, "max_disagreement": 1,
                       "max_accuracy_drop": 1}},
    # random weights: the quality gate and generation parity would fail on what is measured here, not on cost
    "checks": {"generation": {"prompts": 4, "max_new_tokens": 16, "min_agreement": 0},
               "imatrix": {"ctx_size": 256, "chunks": 4, "prompts": 4}},
    "imatrix": {"ctx_size": 256, "chunks": 8, "prose_chars": 20000, "use_for": ["q4_k_m"]},
    "quant_types": ["q4_0", "q4_k_m"],
}  # fmt: skip

# held-out task rows scored (the demo has 40): each costs the 7B a forward pass per stage
TASK_ROWS = 8

# the seed's log: LLaMA-7B through the llama.cpp of May 2023 (its "MB" are MiB)
SEED_MB = {"f16": 12853.02, "q4_0": 3615.64}

LLAMA_VOCAB = "ggml-vocab-llama-spm.gguf"

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float16)
for adapter in sys.argv[4:]:
    rows = int(sys.argv[1])
    if rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(sys.argv[3] + ".peft-merged")
"""


# ---- inputs (run in a process of their own) ----


def hf_shapes(s: dict, vocab: int) -> dict[str, list[int]]:
    """A LLaMA model's tensors in the order HF saves them."""
    head_dim = s["hidden"] // s["heads"]
    shapes = {"model.embed_tokens.weight": [vocab, s["hidden"]]}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": [s["hidden"], s["hidden"]],
            p + "self_attn.k_proj.weight": [s["kv_heads"] * head_dim, s["hidden"]],
            p + "self_attn.v_proj.weight": [s["kv_heads"] * head_dim, s["hidden"]],
            p + "self_attn.o_proj.weight": [s["hidden"], s["hidden"]],
            p + "mlp.gate_proj.weight": [s["ffn"], s["hidden"]],
            p + "mlp.up_proj.weight": [s["ffn"], s["hidden"]],
            p + "mlp.down_proj.weight": [s["hidden"], s["ffn"]],
            p + "input_layernorm.weight": [s["hidden"]],
            p + "post_attention_layernorm.weight": [s["hidden"]],
        }
    return shapes | {"model.norm.weight": [s["hidden"]], "lm_head.weight": [vocab, s["hidden"]]}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], seed: int, sparse: bool = False) -> None:
    """Random weights (norms 1), one tensor in memory at a time; `sparse`: the matrices zeros that take no
    disk (a hole), the norms still 1 (zero norms would zero every hidden state: every logit equal)."""
    import torch

    from cpuforge.io.safetensors import ITEMSIZE, safetensors_layout

    header, size = safetensors_layout(tensors)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(header)
        if sparse:
            f.truncate(len(header) + size)
        for name in sorted(tensors):
            dtype, shape = tensors[name]
            torch_dtype = torch.float16 if dtype == "F16" else torch.float32
            if len(shape) == 1:
                data = torch.ones(shape, dtype=torch_dtype)
            elif sparse:
                f.seek(math.prod(shape) * ITEMSIZE[dtype], os.SEEK_CUR)
                continue
            else:
                data = (torch.randn(shape, generator=generator) * 0.02).to(torch_dtype)
            f.write(memoryview(data.view(-1).view(torch.uint8).numpy()))


def write_sharded(folder: Path, shapes: dict[str, list[int]], sparse: bool, max_shard: int = 10 * 10**9) -> None:
    """f16 shards of at most `max_shard` bytes, in HF's order, with HF's names and index."""
    from cpuforge.io.files import write_json

    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if size + nbytes > max_shard and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", {n: ("F16", shapes[n]) for n in shards[0]}, 0, sparse)
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, {n: ("F16", shapes[n]) for n in names}, i, sparse)
        weight_map |= dict.fromkeys(names, file)
        print(f"base shard {i}/{len(shards)} written", file=sys.stderr)
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(folder / "model.safetensors.index.json", index)


def llama_tokenizer(out: Path, extended: int | None = None) -> None:
    """The real LLaMA tokenizer (32000 pieces), read by transformers from the pinned llama.cpp's vocabulary
    file; `extended` grows it Chinese-LLaMA style to that many pieces: two-character CJK words, each made
    by a merge appended after LLaMA's own, so transformers and llama.cpp both reach them."""
    from transformers import AutoTokenizer

    from cpuforge import paths
    from cpuforge.llama.build import pinned_sdist

    source = paths.llama_source(Path(os.environ.get("CPUFORGE_BUILD_DIR", REPO / "build" / "llama.cpp")),
                               pinned_sdist()["commit"])
    tokenizer = AutoTokenizer.from_pretrained(source / "models", gguf_file=LLAMA_VOCAB)
    tokenizer.save_pretrained(out)
    if extended is None:
        return
    path = out / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    chars = sorted(p for p in vocab if len(p) == 1 and "\u4e00" <= p <= "\u9fff")
    for a in chars:
        for b in chars:
            if len(vocab) == extended:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append([a, b] if isinstance(merges[0], list) else f"{a} {b}")
    assert len(vocab) == extended, len(vocab)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_lora(folder: Path, s: dict, rank: int, targets: list[str], seed: int, whole: dict | None = None) -> None:
    """A PEFT LoRA adapter: A and B random (so the merge changes every target), f32 as peft trains them;
    `whole` maps module names (embed_tokens, lm_head) to rows saved whole in f16 (modules_to_save)."""
    from cpuforge.io.files import write_json

    folder.mkdir(parents=True)
    shapes = hf_shapes(s, s["vocab"])
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in targets:
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = ("F32", [rank, shape[1]])
            tensors[f"{prefix}.lora_B.weight"] = ("F32", [shape[0], rank])
    for module, rows in (whole or {}).items():
        name = "model.embed_tokens" if module == "embed_tokens" else module
        tensors[f"base_model.model.{name}.weight"] = ("F16", [rows, s["hidden"]])
    write_safetensors(folder / "adapter_model.safetensors", tensors, seed)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.05,
              "target_modules": targets, "modules_to_save": sorted(whole or {}) or None, "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": "base"}  # fmt: skip
    write_json(folder / "adapter_config.json", config)


def make_inputs(shape: str, inputs: Path, sparse: bool) -> None:
    from transformers import LlamaConfig

    s = SHAPES[shape]
    scratch = inputs.with_name(inputs.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    base = scratch / "base"
    base.mkdir(parents=True)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=2048, tie_word_embeddings=False, dtype="float16",
                         architectures=["LlamaForCausalLM"])  # fmt: skip
    config.save_pretrained(base)
    llama_tokenizer(base)
    write_sharded(base, hf_shapes(s, s["vocab"]), sparse)
    if "extended_vocab" in s:
        rows = s["extended_vocab"]
        whole = {"embed_tokens": rows, "lm_head": rows}
        write_lora(scratch / "adapter1", s, 64, PROJECTIONS, 1, whole)
        llama_tokenizer(scratch / "adapter1", extended=rows)
        write_lora(scratch / "adapter2", s, 16, PROJECTIONS[:4], 2)
    else:
        write_lora(scratch / "adapter1", s, 16, PROJECTIONS, 1)
    os.replace(scratch, inputs)


# ---- measuring ----


OUT = re.compile(r"--(?:out|html) (\S+)")


def high_water_mark(pid: int) -> int:
    """The kernel's peak RSS of a process (VmHWM, bytes): exact however short the peak, and, unlike
    ru_maxrss, not inherited from the process that forked it (it starts again at exec)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def sample_jobs(proc: subprocess.Popen, interval: float = 0.2) -> dict[str, float]:
    """Peak RSS (MiB) of each job while `proc` (snakemake) runs, by the job's output: every step's command
    names it (--out, or the report's --html), and its children inherit the job. Every `interval` seconds
    each job's processes then alive are summed by their high-water marks, which catch a peak however
    short; a step's processes that run one after the other (a tool, then its Python copying the output)
    are not added up."""
    import psutil

    root, peaks = psutil.Process(proc.pid), {}
    while proc.poll() is None:
        owner, marks = {}, {}
        try:
            procs = root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                m = OUT.search(" ".join(p.cmdline()))
                owner[p.pid] = (m[1] if m else None, p.ppid())
                marks[p.pid] = high_water_mark(p.pid)
            except (psutil.Error, OSError, StopIteration):
                continue
        totals = {}
        for pid, mark in marks.items():
            job, parent = owner[pid]
            while job is None and parent in owner:
                job, parent = owner[parent]
            if job is not None:
                totals[job] = totals.get(job, 0) + mark
        for job, total in totals.items():
            peaks[job] = max(peaks.get(job, 0), total / 2**20)
        time.sleep(interval)
    return peaks


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    """Snakemake in `workdir`, its output to workdir/snakemake-<first argument>.log."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args, "--configfile", str(workdir / "config.yaml")]  # fmt: skip
    with open(workdir / f"snakemake-{args[0].replace('/', '_')}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def write_config(workdir: Path, inputs: Path, auto: bool = False, full_eval: bool = False) -> None:
    import yaml

    adapters = sorted(str(a) for a in inputs.glob("adapter*"))
    # the demo task, its held-out rows cut to TASK_ROWS: each is a teacher-forced pass of the whole model
    heldout = (REPO / "data" / "demo_task" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    heldout = heldout if full_eval else heldout[:TASK_ROWS]
    (workdir / "heldout.jsonl").write_text("\n".join(heldout) + "\n", encoding="utf-8")
    task = {"train": str(REPO / "data" / "demo_task" / "train.jsonl"), "heldout": str(workdir / "heldout.jsonl")}
    build = os.environ.get("CPUFORGE_BUILD_DIR", str(REPO / "build" / "llama.cpp"))
    config = {"models": [{"name": "scale", "base": str(inputs / "base"), "adapters": adapters, "task_data": task}],
              "llama_cpp": {"build_dir": build}, **EVAL}  # fmt: skip
    workflow = yaml.safe_load((REPO / "config.yaml").read_text())["eval"]
    if full_eval:  # config.yaml's windows and answers: the evaluation a user runs
        config["eval"] = config["eval"] | {key: workflow[key] for key in ("ctx", "chunks", "max_new_tokens")}
    if auto:  # the quant search beside q4_0, whose evaluation stages it is timed against
        config |= {"quant_types": ["q4_0", "auto"], "auto_quant": {"budget": 3}}
        # config.yaml's KL limit, so the search brackets as it would for a user (the other limits stay open:
        # on random weights no answer is right)
        gate = config["eval"]["gate"] | {"max_kl_divergence": workflow["gate"]["max_kl_divergence"]}
        config["eval"] = config["eval"] | {"gate": gate}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def read_plan(workdir: Path) -> dict[str, dict]:
    with open(workdir / "results" / "plan.tsv") as f:
        return {row["output"]: row for row in csv.DictReader(f, delimiter="\t")}


def snakemake_benchmark(workdir: Path, rule: str, job: str) -> dict:
    """The job's own record in benchmarks/{model}/<rule>[_<wildcard>].tsv."""
    suffix = {"eval_perplexity": "_f16"}.get(rule, "") if not job else "_" + job.split("=", 1)[1]
    name = {"eval_perplexity_hf": "eval_perplexity", "eval_task_hf": "eval_task"}.get(rule, rule)
    path = workdir / "benchmarks" / "scale" / f"{name}{suffix}.tsv"
    if not path.is_file():
        return {}
    with open(path) as f:
        return next(csv.DictReader(f, delimiter="\t"))


def peft_merge(workdir: Path, inputs: Path, rows: int, threads: int, limit_mb: float) -> str:
    """peft's merge_and_unload + save_pretrained on the same inputs, stopped before it takes `limit_mb`."""
    import psutil

    adapters = sorted(str(a) for a in inputs.glob("adapter*"))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PEFT_MERGE, str(rows), str(threads), str(inputs / "base"), *adapters],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    peak, stopped = 0.0, False
    while proc.poll() is None:
        try:
            peak = max(peak, psutil.Process(proc.pid).memory_info().rss / 2**20)
        except psutil.Error:
            pass
        if peak > limit_mb:
            proc.kill()
            stopped = True
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    shutil.rmtree(str(inputs / "base") + ".peft-merged", ignore_errors=True)
    if stopped:
        return f"peft merge_and_unload: stopped at {peak:.0f} MiB after {seconds:.0f} s (limit {limit_mb:.0f} MiB)"
    if proc.returncode != 0:
        return f"peft merge_and_unload: failed after {seconds:.0f} s at {peak:.0f} MiB: {proc.stderr.read()[-300:]}"
    return f"peft merge_and_unload + save_pretrained (f16): {seconds:.0f} s, peak RSS {peak:.0f} MiB"


def report(workdir: Path, peaks: dict[str, float]) -> None:
    plan = read_plan(workdir)
    print(f"{'rule':20} {'job':22} {'wall s':>8} {'limit min':>9} {'pred MiB':>9} {'peak MiB':>9} {'ratio':>6}"
          f" {'smk max_rss':>11} {'pred disk':>10} {'written MiB':>11}")  # fmt: skip
    for output, row in plan.items():
        if output not in peaks:
            continue
        bench = snakemake_benchmark(workdir, row["rule"], row["job"])
        predicted, peak = int(row["peak_rss_mib"]), peaks[output]
        written = size_of(workdir / output) / 2**20
        print(f"{row['rule']:20} {row['job']:22} {bench.get('s', 'NA'):>8} {row['runtime_min']:>9} {predicted:>9} {peak:>9.0f} "
              f"{peak / predicted:>6.2f} {bench.get('max_rss', 'NA'):>11} {row['disk_mib']:>10} {written:>11.1f}")  # fmt: skip
    sizes = {q: size_of(workdir / "results" / "scale" / f"ggml-model-{q}.gguf") / 2**20 for q in ("f16", "q4_0")}
    print("sizes (MiB, llama.cpp's \"MB\"): "
          + ", ".join(f"{q} {mb:.2f} (the seed's log: {SEED_MB[q]})" for q, mb in sizes.items() if mb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--target", nargs="+", default=["q4_model"], help="what to make: q4_model, all, files, …")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpuforge-scale")
    parser.add_argument("--keep", action="store_true", help="keep the inputs and results")
    parser.add_argument("--no-peft", action="store_true", help="skip peft's merge")
    parser.add_argument("--auto", action="store_true", help="quant_types q4_0 and auto (the quant search)")
    parser.add_argument("--full-eval", action="store_true",
                        help="config.yaml's evaluation (its windows, every held-out row, its answers' length) instead "
                             "of the one sized down")  # fmt: skip
    parser.add_argument("--sparse-base", action="store_true",
                        help="base weights all zero in sparse files (13.5 GB less disk at 7B); the LoRA deltas "
                             "still make every merged weight random")  # fmt: skip
    parser.add_argument("--make-inputs", type=Path, help=argparse.SUPPRESS)  # the child that builds them
    args = parser.parse_args()
    if args.make_inputs:
        make_inputs(args.shape, args.make_inputs, args.sparse_base)
        return
    workdir = args.workdir / args.shape
    inputs = workdir / "inputs"
    workdir.mkdir(parents=True, exist_ok=True)
    if not inputs.is_dir():
        sparse = ["--sparse-base"] if args.sparse_base else []
        subprocess.run([sys.executable, "-m", "benchmarks.scale", "--shape", args.shape, *sparse, "--make-inputs",
                        str(inputs)], cwd=REPO, check=True)  # fmt: skip
    write_config(workdir, inputs, args.auto, args.full_eval)
    snakemake(workdir, "plan").wait()
    print((workdir / "snakemake-plan.log").read_text())
    run = snakemake(workdir, *args.target)
    peaks = sample_jobs(run)
    if run.wait() != 0:
        print((workdir / f"snakemake-{args.target[0].replace('/', '_')}.log").read_text()[-5000:])
    report(workdir, peaks)
    if not args.keep:  # before peft's merge, which writes a merged model of its own
        for name in ("results", "resources"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    if not args.no_peft:
        import psutil

        rows = SHAPES[args.shape].get("extended_vocab", SHAPES[args.shape]["vocab"])
        limit = psutil.virtual_memory().available / 2**20 - 2048
        print(peft_merge(workdir, inputs, rows, 2, limit))
    if not args.keep:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
