"""Merge LoRA adapters into their base model, tensor by tensor, straight from safetensors (or the
PyTorch .bin shards of the seed's era, memory-mapped a shard at a time; the output is safetensors).

Adapters are applied in the order given, each on the result of the ones before.
Every input is checked from its headers before any weight is read. Then each
base shard is read one tensor at a time, the adapters' whole tensors
(`modules_to_save`, resized embeddings) replace it and their LoRA deltas are
added in f32, and the shard is written out: peak memory is one shard plus one
tensor, not the model. The merged folder gets the base's config (vocab size
and embedding tying updated) and the tokenizer files of the last adapter that
has them, else the base's: no file needs copying by hand. A sentencepiece
tokenizer.model that comes without tokenizer.json gets one that merges in
score order, as sentencepiece and llama.cpp do.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from cpuforge.constants import EMBED, LM_HEAD
from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output, read_json, write_json
from cpuforge.merge.adapter import Adapter, Lora, Tuned
from cpuforge.merge.plan import DTYPES, Plan, adapter_embedding_rows, check_inputs, lora_delta
from cpuforge.merge.folders import TOKENIZER_FILES, merged_shard_name
from cpuforge.merge.formats import MLX, check_with_peft
from cpuforge.merge.lora import dora_weight, residual_base
from cpuforge.io.safetensors import SAFETENSORS_DTYPES, SafetensorsReader, SafetensorsWriter, open_weights

log = logging.getLogger(__name__)


# logits of the merged model must match peft's unmerged ones within this, relative to the largest logit
VERIFY_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 1e-1}


def write_sentencepiece_tokenizer_json(folder: Path) -> None:
    """Give a folder that holds a sentencepiece BPE `tokenizer.model` but no `tokenizer.json` the
    tokenizer.json that applies the model's merges in the order of its piece scores.

    sentencepiece (and llama.cpp) merge by score. transformers 4 converted such a file with its merges
    ordered by score too; transformers 5 orders them by piece id and ignores the scores. For a
    vocabulary extended Chinese-LLaMA style (pieces appended with high scores) that makes transformers
    split the added words into old pieces while the GGUF uses the added ones. Written here, the
    merged folder reads the same in transformers, sentencepiece and llama.cpp."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        return  # unigram models carry their scores into tokenizer.json as they are
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        return
    scores = {p.piece: p.score for p in proto.pieces}
    data["model"]["merges"] = [list(m) for m in generate_merges(data["model"]["vocab"], scores)]
    write_json(folder / "tokenizer.json", data, ensure_ascii=False)
    log.info("tokenizer.json written from tokenizer.model with its merges in score order")


def copy_tokenizer(source: Path, folder: Path) -> None:
    """The tokenizer files of `source` into `folder`, with a tokenizer.json where only a sentencepiece
    tokenizer.model came: the merged model's tokenizer, and the unmerged base's for run-time LoRA."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        write_sentencepiece_tokenizer_json(folder)


FLOATING = ("F32", "F16", "BF16", "F64")


def output_dtype(dtype: str, stored: str, shape: list[int]) -> str:
    """The safetensors dtype a merged tensor is written in: matrices in `dtype`, vectors (norms, biases)
    in f32, as the f16 GGUF keeps them (the converter writes every tensor of one dimension in f32), so an
    f16 merge holds every bit of the f16 GGUF at half the disk of an f32 one; other tensors as they are."""
    if stored not in FLOATING:
        return stored
    return SAFETENSORS_DTYPES[DTYPES[dtype] if len(shape) > 1 else "float32"]


def all_finite(tensor) -> bool:
    """torch.isfinite a slice at a time: on a whole f16 embedding its temporaries take twice the tensor."""
    import torch

    return all(torch.isfinite(part).all() for part in tensor.reshape(-1).split(1 << 22))


def merged_tensor(name: str, base_tensor, plan: Plan, readers: list, upto: int | None = None):
    """The output tensor `name`: replaced and adapted by each adapter in order (the first `upto` of them), in f32."""
    import torch

    weight = base_tensor
    for i, (adapter, reader) in enumerate(zip(plan.adapters[:upto], readers[:upto], strict=True)):
        if name in adapter.replace:
            weight = reader[adapter.replace[name]]
        for rows in adapter.rows:
            if rows.target == name:  # peft's TrainableTokens merge: the trained rows copied over the base's
                weight = weight.float().index_copy(0, torch.tensor(rows.indices), reader[rows.tensor].float())
        for tuned in adapter.tuned:
            if tuned.target == name:
                module_weight = weight_before(plan, readers, i, f"{tuned.module}.weight") if tuned.bias else None
                weight = tuned_weight(weight, tuned, adapter, reader, module_weight)
        for lora in adapter.loras:
            if lora.target == name:
                weight = lora_weight(weight, lora, reader)
        for bias in adapter.biases:
            if bias.target == name:
                weight = weight.float() + bias.scale * reader[bias.tensor].float()
    if weight is not base_tensor and not all_finite(weight):
        raise InputError(f"{plan.adapters[-1].weights}: merging into {name} gives non-finite values.")
    return weight


def weight_before(plan: Plan, readers: list, upto: int, name: str):
    """The weight `name` as the adapter `upto` found it (the base with the adapters before it merged), for a
    tuner whose bias update reads it (GLoRA's W @ C, IA3's scaling): one more tensor in memory, recomputed."""
    source = open_weights(plan.base_files[name])
    try:
        return merged_tensor(name, source[name], plan, readers, upto).float()
    finally:
        source.close()


def tuned_weight(weight, tuned: Tuned, adapter: Adapter, reader, module_weight=None):
    """`weight` (or the bias) with one module of a tuner other than LoRA merged, by that tuner's own formula."""
    from cpuforge.merge.tuners import TUNERS

    tuner = TUNERS[adapter.tuner]
    tensors = {suffix: reader[name] for suffix, name in tuned.tensors.items()}
    shared = {key: reader[name] for key, name in adapter.shared.items()}
    if len(shared) < len(tuner.shared):  # not saved (VeRA's save_projection false): drawn again from the seed, once
        adapter.drawn = adapter.drawn or tuner.make_shared(adapter.config, adapter.module_shapes)
        shared = adapter.drawn
    try:
        if tuned.bias:
            return tuner.merged_bias(weight.float(), tensors, adapter.config, tuned.module, shared, module_weight)
        return tuner.merged_weight(weight.float(), tensors, adapter.config, tuned.module, shared)
    except (RuntimeError, ValueError, IndexError) as e:  # what the plan's dry run on shapes could not try
        raise InputError(
            f"{adapter.weights}: the {adapter.tuner} tensors of {tuned.module} do not fit {tuned.target} ({e}); "
            "this adapter was made for another base model."
        ) from None


def lora_weight(weight, lora: Lora, reader):
    """`weight` with one LoRA merged as peft merges it, in f32 (half-precision matmuls are slow on many CPUs and
    lose bits): onto the residual base of a PiSSA / OLoRA initialisation, rescaled row by row under DoRA."""
    if lora.init:
        weight = residual_base(weight, lora.init, lora.rank, lora.scale)
    a, b = reader[lora.a], reader[lora.b]
    if lora.transposed_factors:  # mlx-lm's lora_a (in, r) and lora_b (r, out) are peft's A and B transposed
        a, b = a.T, b.T
    delta = lora_delta(a, b, lora.scale, lora.transpose)
    if lora.magnitude:
        return dora_weight(weight, delta, reader[lora.magnitude])
    return weight.float() + delta


def write_model_files(base: Path, plan: Plan, dtype: str, folder: Path) -> None:
    """Everything of the merged folder but its weights: config.json (vocabulary size and tying as
    merged), generation_config.json and the tokenizer files."""
    config = read_json(base / "config.json")
    config |= {"dtype": DTYPES[dtype], "vocab_size": plan.shapes[EMBED][0], "tie_word_embeddings": plan.tied}
    write_json(folder / "config.json", config, sort_keys=True)
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", folder)
    copy_tokenizer(plan.tokenizer, folder)


def merge(base: Path, adapters: list[Path], out: Path, dtype: str, verify_prompts: list[str] = ()) -> float | None:
    """Write the merged model to `out`; with `verify_prompts`, check it against peft before it gets its name.

    Each output shard's header is known from the plan, so it is written first and the
    tensors follow one at a time: memory holds one tensor, never a shard or the model.
    Returns the largest |logit difference| found by the check, if it ran."""
    import torch
    from tqdm import tqdm

    plan = check_inputs(base, adapters)
    check_with_peft(adapters)
    for adapter in plan.adapters if verify_prompts else []:
        if adapter.tuner.startswith(MLX):
            raise InputError(
                f"{adapter.folder}: merge.verify compares the merge with peft, which cannot load an mlx-lm adapter; "
                "turn verify off for this model."
            )
    readers = [open_weights(a.weights) for a in plan.adapters]
    shards = sorted(set(plan.base_files.values()))
    weight_map, total = {}, 0
    progress = tqdm(total=len(plan.shapes), desc="merging", unit="tensor", mininterval=5)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        for i, shard in enumerate(shards, 1):
            names = [n for n, f in plan.base_files.items() if f == shard]
            if EMBED in names and not plan.tied and LM_HEAD not in plan.base_files:
                names.append(LM_HEAD)  # untied from the base's embeddings, kept beside them
            specs = {n: (output_dtype(dtype, plan.dtypes[n], plan.shapes[n]), plan.shapes[n]) for n in names}
            f = open_weights(shard)  # a .bin shard is memory-mapped: one shard's pages at a time
            with SafetensorsWriter(tmp / merged_shard_name(shard), specs) as w:
                for name in sorted(names):
                    source = EMBED if name == LM_HEAD and LM_HEAD not in plan.base_files else name
                    weight = merged_tensor(name, f[source], plan, readers)
                    if weight.is_floating_point():
                        weight = weight.to(getattr(torch, SafetensorsReader.TORCH_DTYPES[specs[name][0]]))
                    w.write(name, weight)
                    progress.update()
            f.close()
            total += w.size
            weight_map |= dict.fromkeys(names, merged_shard_name(shard))
            log.info("merged shard %d/%d: %s (%d tensors)", i, len(shards), merged_shard_name(shard), len(names))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(tmp / "model.safetensors.index.json", index)
        write_model_files(base, plan, dtype, tmp)
        progress.close()
        log.info("tokenizer files taken from %s", plan.tokenizer)
        return verify(base, adapters, tmp, dtype, verify_prompts) if verify_prompts else None


def peft_reference(base: Path, adapters: list[Path]):
    """base + adapters through peft itself: all but the last merged by peft, the last one unmerged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for i, adapter in enumerate(adapters):
        rows = adapter_embedding_rows(adapter)
        if rows and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, adapter)
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    return model.eval()


def verify(base: Path, adapters: list[Path], merged: Path, dtype: str, prompts: list[str]) -> float:
    """Largest |logit difference| between the merged model and peft's unmerged base + adapters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    reference = peft_reference(base, adapters)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    worst = 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want, got = reference(ids).logits, model(ids).logits
        diff = (want - got).abs().max().item()
        limit = VERIFY_TOLERANCE[dtype] * max(1.0, want.abs().max().item())
        if diff > limit:
            raise InputError(f"{merged}: logits differ from peft's by {diff:.3g} on {prompt!r} (limit {limit:.3g}).")
        worst = max(worst, diff)
    log.info("verified against peft on %d prompts: max |logit difference| %.3g", len(prompts), worst)
    return worst


VERIFY_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Shares of Contoso Bank rose after it posted net income of $50.1 million for the quarter.",
    "def add(a, b):\n    return a + b\n",
]
