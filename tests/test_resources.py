"""Every job's needs predicted from headers before anything is made, as its resources, and a local run that
cannot fit refused at start-up in one sentence.

The 7B and 70B models here are headers over sparse files: real shapes, zeros that take no disk.
"""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
from helpers import REPO
from helpers.llama import convert
from helpers.workflow import TASK, snakemake, write_config

from cpuforge.sizing import resources
from cpuforge.merge.plan import check_inputs
from cpuforge.merge.merge import merge
from cpuforge.io.safetensors import safetensors_layout

MIB = 1 << 20
LLAMA_7B = resources.Arch(layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000)
LLAMA_70B = resources.Arch(layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=32000)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_sparse_safetensors(path, specs: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file of `specs` (name -> dtype, shape) whose tensors are zeros that take no disk."""
    header, size = safetensors_layout(specs)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + size)


def make_sparse_llama(folder, arch: resources.Arch, shards: int = 2):
    """A HF LLaMA folder of `arch` in f16 shards, as transformers saves one, with a tokenizer of its vocabulary."""
    folder.mkdir()
    shapes = resources.llama_shapes(arch)
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


def make_sparse_lora(folder, arch: resources.Arch, rank: int, targets=PROJECTIONS, layers=None, rows=None):
    """A LoRA of rank `rank` on `targets` of every layer (or the first `layers`), f32 as peft trains them;
    with `rows`, embed_tokens and lm_head of that many rows saved whole in f16, and a tokenizer to match."""
    folder.mkdir()
    tensors = {}
    for name, shape in resources.llama_shapes(arch).items():
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


def test_7b_figures_follow_the_headers(llama_7b):
    base, adapter = llama_7b
    m = resources.plan_model(check_inputs(base, [adapter]), "f16")
    # the merge's costliest tensor: gate_proj (11008 x 4096) as read in f16, its f32 copy, delta and sum
    assert m.merge_peak == 11008 * 4096 * (2 + 3 * 4)
    assert resources.merge(m, 2).disk_mb == math.ceil((sum(t.nbytes for t in m.merged.values()) + 8 * MIB) / MIB)
    # the GGUF sizes this pinned llama.cpp measured on a LLaMA-7B shape: f16 12,853.7 MiB, q4_0 3,648.6 MiB
    assert resources.predicted_gguf(m, "f16").nbytes / MIB == pytest.approx(12853.7, rel=1e-3)
    assert resources.predicted_gguf(m, "q4_0").nbytes / MIB == pytest.approx(3648.6, rel=1e-2)
    # the torch stages stream a layer at a time: above one layer in f32, far below the model in f32
    layer_f32 = 4 * sum(t.numel for n, t in m.merged.items() if n.startswith("model.layers.0.")) / MIB
    whole_f32 = 4 * sum(t.numel for t in m.merged.values()) / MIB
    streamed = resources.eval_perplexity_hf(m.merged, m.arch, 512, 16, 2).mem_mb
    assert layer_f32 < streamed < whole_f32 / 5


def test_merge_counts_a_copy_only_where_the_dtype_changes():
    """An f16 merge writes an f16 tensor as read; a bf16 or f32 one takes a copy in f16 beside it."""
    arch = resources.Arch(layers=1, hidden=8, heads=1, kv_heads=1, ffn=16, vocab=100)
    for stored, copy in (("F16", 0), ("BF16", 2), ("F32", 2)):
        base = {"model.embed_tokens.weight": resources.Tensor((100, 8), stored)}
        m = resources.merged_model(arch, base, [], {"model.embed_tokens.weight": (100, 8)}, "f16")
        assert m.merge_peak == 100 * 8 * (resources.ITEMSIZE[stored] + copy), stored
        assert m.merged["model.embed_tokens.weight"].dtype == "F16"


def test_chinese_llama_figures(tmp_path, llama_7b):
    """The seed's model: embeddings and head replaced whole at 49953 rows, a LoRA r=64 and one stacked on it."""
    base, _ = llama_7b
    first = make_sparse_lora(tmp_path / "first", LLAMA_7B, 64, rows=49953)
    second = make_sparse_lora(tmp_path / "second", LLAMA_7B, 16, PROJECTIONS[:4])
    m = resources.plan_model(check_inputs(base, [first, second]), "f16")
    assert m.arch.vocab == 49953 and m.merged["lm_head.weight"].shape == (49953, 4096)
    # the costliest tensor is now the embeddings: the base's as read beside the replacement, already f16
    # (measured: 898 MiB peak RSS at the embeddings, the interpreter's 250 and these 640)
    assert m.merge_peak == 4096 * (32000 * 2 + 49953 * 2)
    layer = 4096 * (4 * 4096 + 3 * 11008)
    assert m.merge_macs == 32 * (64 * layer + 16 * 4 * 4096 * 4096)
    f16 = resources.predicted_gguf(m)
    assert f16.tensors["token_embd.weight"][:2] == (49953 * 4096, 49953 * 4096 * 2)
    base_stage = resources.eval_perplexity_hf(m.base, resources.base_arch(m), 512, 16, 2)
    assert base_stage.mem_mb < resources.eval_perplexity_hf(m.merged, m.arch, 512, 16, 2).mem_mb


def test_predicted_f16_gguf_is_the_converters(tmp_path, tiny_base, tiny_adapter, llama_bin):
    """Tensor for tensor, the f16 GGUF the prediction describes is the one the pinned converter writes."""
    merge(tiny_base, [tiny_adapter], tmp_path / "merged", "f16")
    real = resources.read_gguf(convert(tmp_path / "merged", tmp_path / "f16.gguf"))
    predicted = resources.predicted_gguf(resources.plan_model(check_inputs(tiny_base, [tiny_adapter]), "f16"))
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
    """The plan lists every job `all` runs, and each job's resources under SLURM are the plan's figures."""
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
        assert int(job["resources"]["runtime"]) >= resources.MINUTES_MIN
    # what the issue found fixed: the torch stages follow the model, and no rule asks for the model in f32
    figures = {k: int(r["peak_rss_mib"]) for k, r in planned.items()}
    assert figures[("eval_perplexity_hf", "hf_stage=merged")] not in (4000, 2000, 1000)
    assert max(figures.values()) < 4 * 6.7e9 / MIB  # LLaMA-7B in f32
    assert figures[("check_generation", "")] < 2 * figures[("eval_perplexity", "")]


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
