"""Every job's needs predicted from headers before anything is made, as its resources, and a local run that
cannot fit refused at start-up in one sentence.

The 7B and 70B models here are headers over sparse files: real shapes, zeros that take no disk.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO
from helpers.llama import convert
from helpers.memory import peak_bytes
from helpers.workflow import TASK, snakemake, write_config

from cpuforge import paths
from cpuforge.io.safetensors import ITEMSIZE, safetensors_header, safetensors_layout
from cpuforge.merge.merge import merge
from cpuforge.merge.plan import check_inputs
from cpuforge.sizing.costs import MINUTES_MIN
from cpuforge.sizing.gguf_size import predicted_gguf, read_gguf
from cpuforge.sizing.model import Arch, base_arch, llama_shapes, plan_model
from cpuforge.sizing.needs import eval_perplexity_hf_need, merge_need
from cpuforge.sizing.tuners import Module, working_set

MIB = 1 << 20
LLAMA_7B = Arch(layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000)
LLAMA_70B = Arch(layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=32000)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_sparse_safetensors(path, specs: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file of `specs` (name -> dtype, shape) whose tensors are zeros that take no disk."""
    header, size = safetensors_layout(specs)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + size)


def make_sparse_llama(folder, arch: Arch, shards: int = 2):
    """A HF LLaMA folder of `arch` in f16 shards, as transformers saves one, with a tokenizer of its vocabulary."""
    folder.mkdir()
    shapes = llama_shapes(arch)
    names = list(shapes)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * len(names) // shards : (i + 1) * len(names) // shards]
        write_sparse_safetensors(folder / file, {n: ("F16", list(shapes[n])) for n in part})
        weight_map |= dict.fromkeys(part, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": arch.hidden,
              "num_hidden_layers": arch.layers, "num_attention_heads": arch.heads, "num_key_value_heads": arch.kv_heads,
              "intermediate_size": arch.ffn, "vocab_size": arch.vocab, "tie_word_embeddings": False}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, arch.vocab)
    return folder


def write_tokenizer(folder, size: int) -> None:
    vocab = {f"t{i}": i for i in range(size)}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab}, "added_tokens": []}))


def make_sparse_lora(folder, arch: Arch, rank: int, targets=PROJECTIONS, layers=None, rows=None):
    """A LoRA of rank `rank` on `targets` of every layer (or the first `layers`), f32 as peft trains them;
    with `rows`, embed_tokens and lm_head of that many rows saved whole in f16, and a tokenizer to match."""
    folder.mkdir()
    tensors = {}
    for name, shape in llama_shapes(arch).items():
        module = name.removesuffix(".weight")
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if module.rsplit(".", 1)[-1] in targets and (layers is None or (layer and int(layer[1]) < layers)):
            tensors[f"base_model.model.{module}.lora_A.weight"] = (rank, shape[1])
            tensors[f"base_model.model.{module}.lora_B.weight"] = (shape[0], rank)
    # f32 LoRA factors and f16 whole tensors in one file, as peft saves them
    specs = {n: ("F32", list(sh)) for n, sh in tensors.items()}
    if rows:
        whole = [f"base_model.model.{m}.weight" for m in ("model.embed_tokens", "lm_head")]
        specs |= {n: ("F16", [rows, arch.hidden]) for n in whole}
        write_tokenizer(folder, rows)
    write_sparse_safetensors(folder / "adapter_model.safetensors", specs)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory):
    work = tmp_path_factory.mktemp("llama7b")
    return make_sparse_llama(work / "base", LLAMA_7B), make_sparse_lora(work / "adapter", LLAMA_7B, 64)


@pytest.mark.unit
def test_7b_figures_follow_the_headers(llama_7b):
    base, adapter = llama_7b
    m = plan_model(check_inputs(base, [adapter]), "f16")
    # the GGUF sizes this pinned llama.cpp measured on a LLaMA-7B shape: f16 12,853.7 MiB, q4_0 3,648.6 MiB
    assert predicted_gguf(m, "f16").nbytes / MIB == pytest.approx(12853.7, rel=1e-3)
    assert predicted_gguf(m, "q4_0").nbytes / MIB == pytest.approx(3648.6, rel=1e-2)
    # the torch stages stream a layer at a time: above one layer in f32, far below the model in f32
    layer_f32 = 4 * sum(t.numel for n, t in m.merged.items() if n.startswith("model.layers.0.")) / MIB
    whole_f32 = 4 * sum(t.numel for t in m.merged.values()) / MIB
    streamed = eval_perplexity_hf_need(m.merged, m.arch, 512, 16, 2).mem_mb
    assert layer_f32 < streamed < whole_f32 / 5


# One adapted weight merged as cpuforge.merge merges it (merge.lora_weight / merge.tuned_weight, then the
# finiteness check's flat view of it, a copy where the result is transposed; its isfinite runs 4M elements at a
# time, nothing beside a 7B tensor but all of these small ones, so it is left out), with torch's own allocations
# counted (helpers.memory): a wide weight and a tall one, since some working sets grow with in × in and others
# with out × out.
SHAPES = [(64, 192), (192, 64)]
RANK = 4


class Reads(dict):
    """An adapter file's reader: each read makes a new tensor, as SafetensorsReader's do."""

    def __getitem__(self, name):
        return super().__getitem__(name).clone()


def tuner_tensors(kind: str, out: int, inp: int) -> tuple[dict, dict]:
    """A module's trained tensors for `kind` (suffix -> tensor) and its config, at small values so the
    rotations stay invertible."""
    r = RANK
    small = lambda *shape: torch.randn(*shape) * 0.01  # noqa: E731
    return {
        "IA3": ({"ia3_l": torch.rand(out, 1)}, {}),
        "LOHA": ({"hada_w1_a": small(out, r), "hada_w1_b": small(r, inp), "hada_w2_a": small(out, r),
                  "hada_w2_b": small(r, inp)}, {"r": r, "alpha": 8}),  # fmt: skip
        "LOKR": ({"lokr_w1": small(4, 4), "lokr_w2_a": small(out // 4, r), "lokr_w2_b": small(r, inp // 4)},
                 {"r": r, "alpha": 8}),  # fmt: skip
        "ADALORA": ({"lora_A": small(r, inp), "lora_B": small(out, r), "lora_E": small(r, 1)}, {}),
        "VERA": ({"vera_lambda_b": torch.rand(out), "vera_lambda_d": torch.rand(r)}, {"r": r}),
        "GLORA": ({"glora_A.Xd": small(out, r), "glora_A.Xu": small(r, inp), "glora_B.Xd": small(out, r),
                   "glora_B.Xu": small(r, inp)}, {}),  # fmt: skip
        "OFT": ({"oft_R.weight": small(inp // 16, 16 * 15 // 2)}, {}),
        "BOFT": ({"boft_R": small(2, inp // 8, 8, 8), "boft_s": torch.rand(out, 1)}, {}),
        "HRA": ({"hra_u": torch.randn(inp, r)}, {"apply_GS": True}),
        "C3A": ({"c3a_kernel": small(out // 32, inp // 32, 32)}, {}),
        "ROAD": ({"road_theta": small(out // 2), "road_alpha": torch.rand(out // 2)}, {"group_size": 32}),
        "FOURIERFT": ({"fourierft_spectrum": torch.randn(50)}, {}),
    }[kind]


def traced_tuner(kind: str, weight) -> tuple[int, Module]:
    """Torch's peak bytes beside `weight` while a tuner merges one module into it, and the sizing's Module of it."""
    from cpuforge.merge.merge import tuned_weight
    from cpuforge.merge.adapter import Adapter, Tuned

    out, inp = weight.shape
    tensors, config = tuner_tensors(kind, out, inp)
    reader = Reads({f"m.{s}": t for s, t in tensors.items()})
    adapter = Adapter(Path("a"), Path("a/adapter_model.safetensors"), tuner=kind, config=config)
    if kind == "VERA":  # the shared projections, read for every module
        reader |= {"vera_A": torch.randn(RANK, inp), "vera_B": torch.randn(out, RANK)}
        adapter.shared = {"vera_A": "vera_A", "vera_B": "vera_B"}
    tuned = Tuned("m.weight", "m", {s: f"m.{s}" for s in tensors})

    def merge_one():
        merged = tuned_weight(weight, tuned, adapter, reader)
        merged.reshape(-1)  # merge.all_finite's flat view
        return merged

    shapes = {s: tuple(t.shape) for s, t in {**tensors, **{k: reader[k] for k in adapter.shared}}.items()}
    copy = 0 if weight.dtype == torch.float32 else 4 * weight.numel()
    return peak_bytes(merge_one), Module(out, inp, copy, config, shapes)


def traced_lora(kind: str, weight) -> int:
    """Torch's peak bytes beside `weight` while a LoRA of `kind` (LORA, LORA+dora, +pissa, +olora) merges into it."""
    from cpuforge.merge.merge import lora_weight
    from cpuforge.merge.adapter import Lora

    out, inp = weight.shape
    init = kind.partition("+")[2]
    reader = Reads({"a": torch.randn(RANK, inp), "b": torch.randn(out, RANK), "m": torch.rand(out)})
    lora = Lora("m.weight", "a", "b", 2.0, False, "m" if init == "dora" else None,
                init if init in ("pissa", "olora") else None, RANK)  # fmt: skip

    def merge_one():
        merged = lora_weight(weight, lora, reader)
        merged.reshape(-1)  # merge.all_finite's flat view
        return merged

    return peak_bytes(merge_one)


def base_weight(out: int, inp: int, dtype: str):
    return torch.randn(out, inp).to(getattr(torch, dtype))


@pytest.mark.unit
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("out, inp", SHAPES)
@pytest.mark.parametrize("kind", ["IA3", "LOHA", "LOKR", "ADALORA", "VERA", "GLORA"])
def test_dense_delta_working_sets_are_torchs(kind, out, inp, dtype):
    """Tuners that build a dense delta (or scaling) and add it: the sizing's figure is what torch allocates,
    the f32 copy of a half-precision weight included (the module's own small tensors aside)."""
    traced, module = traced_tuner(kind, base_weight(out, inp, dtype))
    assert working_set(kind, module) == pytest.approx(traced, rel=0.1)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("out, inp", SHAPES)
@pytest.mark.parametrize("kind", ["OFT", "BOFT", "HRA", "ROAD"])
def test_rotation_working_sets_are_torchs(kind, out, inp, dtype):
    """Tuners that build a rotation, in × in (OFT, BOFT, HRA) or out × out (RoAd): the figure follows the
    side that grows, on a wide weight and a tall one."""
    traced, module = traced_tuner(kind, base_weight(out, inp, dtype))
    assert working_set(kind, module) == pytest.approx(traced, rel=0.1)


@pytest.mark.unit
@pytest.mark.parametrize("out, inp", SHAPES)
@pytest.mark.parametrize("kind", ["C3A", "FOURIERFT"])
def test_fft_working_sets_are_torchs(kind, out, inp):
    """C3A's circulant from an in × in identity and FourierFT's permutation of every position, both through
    complex FFTs (8 bytes an element). C3A's einsum runs a batched matmul over the in × in complex FFT, which
    the matmul copies to contiguous matrices inside its kernel, where the count does not see it: one in × in
    complex64 more (measured at the 7B widths: C3A's merge peaked 1 GB, that copy, above what torch shows here)."""
    traced, module = traced_tuner(kind, base_weight(out, inp, "float32"))
    unseen = 8 * inp * inp if kind == "C3A" and inp * inp > out * inp else 0  # the circulant phase only
    assert working_set(kind, module) == pytest.approx(traced + unseen, rel=0.1)


@pytest.mark.unit
@pytest.mark.parametrize("out, inp", SHAPES)
def test_lora_and_dora_working_sets(out, inp):
    """LoRA on an f32 weight: torch holds B @ A and the scaled delta, then the delta and the sum, two f32 tensors;
    the sizing counts an f32 copy besides, which only a half-precision weight needs (kept: the demo's plan stands
    on it). DoRA holds one tensor more than torch's LoRA (the delta, W + ΔW, the rescaled rows): LoRA's figure."""
    n4 = 4 * out * inp
    for dtype, copy in (("float32", 0), ("float16", n4)):
        weight = base_weight(out, inp, dtype)
        assert traced_lora("LORA", weight) == pytest.approx(2 * n4 + copy, rel=0.05)
        assert working_set("LORA", Module(out, inp, copy)) == 3 * n4
        assert working_set("LORA+dora", Module(out, inp, copy)) == pytest.approx(traced_lora("LORA+dora", weight),
                                                                                rel=0.1)  # fmt: skip


@pytest.mark.unit
@pytest.mark.parametrize("out, inp", [*SHAPES, (128, 128)])
@pytest.mark.parametrize("kind", ["LORA+pissa", "LORA+olora"])
def test_pissa_and_olora_working_sets(kind, out, inp):
    """The residual base's SVD / QR: torch sees the factors and the products; LAPACK beneath it holds its own
    copy of the matrix and, for the SVD, ?gesdd's workspace (LWORK 4k² + 7k for JOBZ='S', k the smaller side, as
    LAPACK's documentation gives it), which the figure must add and no more."""
    weight = base_weight(out, inp, "float32")
    traced, k = traced_lora(kind, weight), min(out, inp)
    lapack = 4 * out * inp + (4 * (4 * k * k + 7 * k) if kind == "LORA+pissa" else 0)
    # (the figure leaves out the few vectors of the size of one side: the SVD's S, QR's tau)
    assert 0.95 * traced <= working_set(kind, Module(out, inp, 0)) <= traced + lapack


# The merge's own peak: VmHWM, which starts afresh with the new program. Not getrusage's ru_maxrss: Linux
# keeps that across fork and exec, so it held this pytest process's RSS (about 380 MiB with torch loaded)
# and the merge seemed to peak above its plan; it peaks at about 227 MiB.
PEAK_RSS = """import re, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module("scripts.merge", run_name="__main__")
finally:
    print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1], file=sys.stderr)
"""


@pytest.mark.unit
@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_merge_prediction_holds_against_a_real_merge(tmp_path, tiny_base, tiny_adapter, dtype):
    """The merge's figures against a real merge of the tiny model: the merged tensors' bytes are the safetensors
    data it writes, byte for byte (f32 merges write twice an f16 one's), and the peak RSS measured in its process
    is under the predicted memory without being far under it (a prediction that counted a tensor twice fails)."""
    m = plan_model(check_inputs(tiny_base, [tiny_adapter]), dtype)
    out = tmp_path / "merged"
    cmd = [sys.executable, "-c", PEAK_RSS, "merge", "--base", str(tiny_base), "--adapter", str(tiny_adapter),
           "--out", str(out), "--dtype", dtype]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stderr.split()[-1]) / 1024
    data = 0
    for shard in out.glob("*.safetensors"):
        header = safetensors_header(shard)
        data += sum(math.prod(h["shape"]) * ITEMSIZE[h["dtype"]] for n, h in header.items() if n != "__metadata__")
    assert data == sum(t.nbytes for t in m.merged.values())
    need = merge_need(m, 1)
    assert 0.6 * need.mem_mb < peak_mib <= need.mem_mb, (peak_mib, need)
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert written <= need.disk_mb * MIB


@pytest.mark.unit
def test_chinese_llama_figures(tmp_path, llama_7b):
    """The seed's model: embeddings and head replaced whole at 49953 rows, a LoRA r=64 and one stacked on it."""
    base, _ = llama_7b
    first = make_sparse_lora(tmp_path / "first", LLAMA_7B, 64, rows=49953)
    second = make_sparse_lora(tmp_path / "second", LLAMA_7B, 16, PROJECTIONS[:4])
    m = plan_model(check_inputs(base, [first, second]), "f16")
    assert m.arch.vocab == 49953 and m.merged["lm_head.weight"].shape == (49953, 4096)
    # the costliest tensor is now the embeddings: the base's as read beside the replacement, already f16;
    # a real merge of this model measured 898 MiB peak RSS, which the prediction must cover, with little to spare;
    # 126 MiB more since the merge loads each adapter_config.json with peft's config class (peft's import, measured)
    assert 898 + 126 <= merge_need(m, 2).mem_mb <= (898 + 126) * 1.25
    # every LoRA delta's multiply-accumulates (out x in x rank), counted from the adapters' own headers
    macs = 0
    for folder in (first, second):
        header = safetensors_header(folder / "adapter_model.safetensors")
        for name, b in header.items():
            if name.endswith(".lora_B.weight"):
                a = header[name.replace(".lora_B.", ".lora_A.")]["shape"]
                macs += b["shape"][0] * a[1] * a[0]
    assert m.merge_macs == macs
    f16 = predicted_gguf(m)
    assert f16.tensors["token_embd.weight"][:2] == (49953 * 4096, 49953 * 4096 * 2)
    base_stage = eval_perplexity_hf_need(m.base, base_arch(m), 512, 16, 2)
    assert base_stage.mem_mb < eval_perplexity_hf_need(m.merged, m.arch, 512, 16, 2).mem_mb


def test_predicted_f16_gguf_is_the_converters(tmp_path, tiny_base, tiny_adapter, llama_bin):
    """Tensor for tensor, the f16 GGUF the prediction describes is the one the pinned converter writes."""
    merge(tiny_base, [tiny_adapter], tmp_path / "merged", "f16")
    real = read_gguf(convert(tmp_path / "merged", tmp_path / "f16.gguf"))
    predicted = predicted_gguf(plan_model(check_inputs(tiny_base, [tiny_adapter]), "f16"))
    assert predicted.tensors == real.tensors
    assert predicted.arch == real.arch
    weights = sum(t[1] for t in real.tensors.values())
    assert 0 < real.nbytes - weights < predicted.nbytes - weights


def plan(workdir, config, *args) -> dict[tuple[str, str], dict]:
    """`snakemake plan`'s table, by rule and job."""
    out = snakemake(workdir, "plan", "--configfile", str(config), *args).stdout
    assert re.search(r"^rule\s+model\s+job\s+peak_rss_mib\s+disk_mib\s+runtime_min$", out, re.M), out
    with open(workdir / "results" / "plan.tsv") as f:
        return {(r["rule"], r["job"]): r for r in csv.DictReader(f, delimiter="\t")}


def dry_run_jobs(workdir, config, target="all", *args) -> list[dict]:
    """Each job of a dry run: its rule, wildcards and resources as Snakemake prints them."""
    out = snakemake(workdir, "-n", target, "--configfile", str(config), *args).stdout
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        if m := re.match(r"(?:local)?rule (\w+):", block):
            wildcards = re.search(r"^    wildcards: (.*)$", block, re.M)
            figures = re.search(r"^    resources: (.*)$", block, re.M)
            jobs.append({"rule": m[1], "wildcards": dict(re.findall(r"(\w+)=([^,\s]+)", wildcards[1] if wildcards else "")),
                         "resources": dict(re.findall(r"\b(mem_mb|disk_mb|runtime)=(\d+)", figures[1] if figures else ""))})  # fmt: skip
    return jobs


def test_rules_ask_for_the_plans_figures(tmp_path, llama_7b):
    """The plan lists every job `all` runs (both come from Snakemake's DAG), and each job's resources under SLURM
    are the plan's figures."""
    base, adapter = llama_7b
    models = [{"name": "big", "base": str(base), "adapters": [str(adapter)], "task_data": TASK}]
    config = write_config(tmp_path / "big.yaml", models, quant_types=["q4_0", "q4_k_m"], imatrix={"use_for": ["q4_k_m"]})
    # the profile's portable llama.cpp, which may not be built yet here (the tests build the native one)
    planned = plan(tmp_path, config, "--config", "llama_cpp={cpu: portable}")
    jobs = [j for j in dry_run_jobs(tmp_path, config, "all", "--profile", str(REPO / "profiles" / "slurm")) if j["rule"] != "all"]
    keys = {(j["rule"], ",".join(f"{k}={v}" for k, v in sorted(j["wildcards"].items()) if k != "model")) for j in jobs}
    assert keys == set(planned)
    for job in jobs:
        key = (job["rule"], ",".join(f"{k}={v}" for k, v in sorted(job["wildcards"].items()) if k != "model"))
        row = planned[key]
        # (runtimes follow the threads, which the profile sets apart from the plan's -c)
        assert (job["resources"]["mem_mb"], job["resources"]["disk_mb"]) == (row["peak_rss_mib"], row["disk_mib"])
        assert int(job["resources"]["runtime"]) >= MINUTES_MIN
    # what the issue found fixed: the torch stages follow the model, and no rule asks for the model in f32
    figures = {k: int(r["peak_rss_mib"]) for k, r in planned.items()}
    assert figures[("eval_perplexity_hf", "hf_stage=merged")] not in (4000, 2000, 1000)
    assert max(figures.values()) < 4 * 6.7e9 / MIB  # LLaMA-7B in f32
    assert figures[("check_generation", "")] < 2 * figures[("eval_perplexity", "")]


@pytest.mark.workflow
def test_plan_counts_made_outputs_but_not_a_made_build(tmp_path, llama_7b):
    """A plan is of a run from scratch: a job whose output exists keeps its row, with its figures; the shared
    llama.cpp build gets rows only where its source or tools are missing."""
    base, adapter = llama_7b
    build = tmp_path / "build"
    models = [{"name": "big", "base": str(base), "adapters": [str(adapter)]}]
    config = write_config(tmp_path / "big.yaml", models, llama_cpp={"build_dir": str(build), "cpu": "native"})
    planned = plan(tmp_path, config)
    assert {"fetch_llama_cpp", "build_llama_cpp", "make_eval_text"} <= {rule for rule, _ in planned}
    # the source fetched (build/<commit>/source): only the build is left
    source = Path(planned[("fetch_llama_cpp", "")]["output"])
    commit = source.parent.name
    source.mkdir(parents=True)
    rules = {rule for rule, _ in plan(tmp_path, config)}
    assert "fetch_llama_cpp" not in rules and "build_llama_cpp" in rules
    # the tools built and an output made: no build, the made output's job still planned
    for tool in paths.llama_outputs(build, commit, "native"):
        tool.parent.mkdir(parents=True, exist_ok=True)
        tool.touch()
    (tmp_path / "results" / "big" / "report").mkdir(parents=True)
    (tmp_path / "results" / "big" / "report" / "eval_text.txt").write_text("made\n")
    planned = plan(tmp_path, config)
    assert not {"fetch_llama_cpp", "build_llama_cpp"} & {rule for rule, _ in planned}
    assert planned[("make_eval_text", "")]["output"] == "results/big/report/eval_text.txt"


def refused(result) -> str:
    assert result.returncode != 0, result.stdout
    out = result.stdout + result.stderr
    m = re.search(r"^rule \w+ .*$", out, re.M)
    assert m, out
    return m[0]


def test_lowered_memory_limit_refuses_the_run_at_start_up(tmp_path, tiny_base, tiny_adapter, llama_bin):
    """merged_model runs the converter's vocabulary check, then the merge: one MiB less than the larger of the
    two needs refuses that one (on the tiny model the check's interpreter outweighs the merge)."""
    models = [{"name": "tiny", "base": str(tiny_base), "adapters": [str(tiny_adapter)]}]
    planned = plan(tmp_path, write_config(tmp_path / "plan.yaml", models))
    need, rule = max((int(planned[(r, "")]["peak_rss_mib"]), r) for r in ("check_converter_vocab", "merge"))
    config = write_config(tmp_path / "small.yaml", models, preflight={"mem_mb": need - 1})
    sentence = refused(snakemake(tmp_path, "-c1", "merged_model", "--configfile", str(config), check=False))
    assert sentence == (f"rule {rule} for model tiny needs {need} MiB of memory, but this machine has {need - 1} MiB; "
                        "run it on a larger one (or with --profile profiles/slurm).")  # fmt: skip
    assert not (tmp_path / "results" / "tiny").exists()


def test_disk_the_earlier_rules_write_counts(tmp_path, tiny_base, tiny_adapter, llama_bin):
    """Free disk for the merge but not for the GGUF after it: refused before the merge runs, naming convert.
    (The merge's output stays; convert's scratch copy would not count for the rules after it.)"""
    models = [{"name": "tiny", "base": str(tiny_base), "adapters": [str(tiny_adapter)]}]
    planned = plan(tmp_path, write_config(tmp_path / "plan.yaml", models))
    merge_mb, convert_mb = (int(planned[(r, "")]["disk_mib"]) for r in ("merge", "convert"))
    config = write_config(tmp_path / "small.yaml", models, preflight={"disk_mb": merge_mb + convert_mb - 1})
    sentence = refused(snakemake(tmp_path, "-c1", "f16_model", "--configfile", str(config), check=False))
    assert sentence == (f"rule convert for model tiny needs {convert_mb} MiB of disk on top of the {merge_mb} MiB that "
                        f"the run writes before it, but {merge_mb + convert_mb - 1} MiB are free where it writes.")  # fmt: skip
    assert not (tmp_path / "results" / "tiny").exists()


def test_70b_is_refused_at_start_up(tmp_path):
    """On this machine (or any with less than the memory a 70B f16 GGUF maps), `all` stops before any rule runs."""
    base = make_sparse_llama(tmp_path / "base", LLAMA_70B, shards=4)
    adapter = make_sparse_lora(tmp_path / "adapter", LLAMA_70B, 8, ["q_proj"], layers=1)
    config = write_config(tmp_path / "70b.yaml", [{"name": "llama70b", "base": str(base), "adapters": [str(adapter)]}])
    sentence = refused(snakemake(tmp_path, "-c1", "all", "--configfile", str(config), check=False))
    assert re.fullmatch(r"rule \w+ .*for model llama70b needs \d+ MiB of (memory|disk).*, but (this machine has \d+ MiB|"
                        r"\d+ MiB are free where it writes).*", sentence), sentence  # fmt: skip
    assert not (tmp_path / "results").exists()
    # the plan states every figure, and which ones this machine cannot give
    out = snakemake(tmp_path, "plan", "--configfile", str(config)).stdout
    assert re.search(r"^here: rule \w+ .*for model llama70b needs", out, re.M), out
