"""Merge LoRA adapters into their base model, tensor by tensor, straight from safetensors.

    python -m scripts.merge --base BASE --adapter A1 [--adapter A2 ...] --out MERGED [--verify]

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

import argparse
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from scripts.common import (
    InputError,
    atomic_output,
    check_threads,
    provenance,
    read_json,
    run,
    safetensors_header,
    write_provenance,
)

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# logits of the merged model must match peft's unmerged ones within this, relative to the largest logit
VERIFY_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 1e-1}
PREFIX = "base_model.model."
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class Lora:
    """One LoRA delta: scale · B @ A added to `target`, transposed for embeddings and fan_in_fan_out."""

    target: str
    a: str
    b: str
    scale: float
    transpose: bool


@dataclass
class Adapter:
    """What one adapter does to the base: whole tensors it replaces, then the deltas it adds."""

    folder: Path
    weights: Path
    replace: dict[str, str] = field(default_factory=dict)  # target -> adapter tensor
    loras: list[Lora] = field(default_factory=list)


@dataclass
class Plan:
    base_files: dict[str, Path]  # base tensor -> shard
    adapters: list[Adapter]
    shapes: dict[str, list[int]]  # every output tensor's final shape
    dtypes: dict[str, str]  # every base tensor's safetensors dtype
    tied: bool  # the output still ties lm_head to the embeddings
    tokenizer: Path


def base_shards(base: Path) -> dict[str, Path]:
    """Map each base tensor name to the safetensors file that holds it."""
    if not base.is_dir():
        raise InputError(f"{base}: base model folder not found.")
    if not (base / "config.json").is_file():
        raise InputError(f"{base}: not a HF model folder (no config.json).")
    index = base / "model.safetensors.index.json"
    if index.is_file():
        files = {name: base / f for name, f in read_json(index)["weight_map"].items()}
    elif (base / "model.safetensors").is_file():
        files = dict.fromkeys(safetensors_header(base / "model.safetensors"), base / "model.safetensors")
    else:
        raise InputError(f"{base}: no model.safetensors or model.safetensors.index.json.")
    for f in set(files.values()):
        if not f.is_file():
            raise InputError(f"{f}: shard named in {index.name} is missing.")
    return files


def adapter_weights_file(adapter: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            return adapter / name
    raise InputError(f"{adapter}: no adapter_model.safetensors or adapter_model.bin.")


def adapter_shapes(path: Path) -> dict[str, list[int]]:
    if path.suffix == ".safetensors":
        return {k: v["shape"] for k, v in safetensors_header(path).items()}
    return {k: list(t.shape) for k, t in load_bin(path).items()}


def load_bin(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: cannot be read as a PyTorch state dict ({e}).") from None


def lora_scale(config: dict, module: str, rank: int) -> float:
    """LoRA's scale: alpha / r, or alpha / sqrt(r) under rsLoRA; per-module alpha from alpha_pattern."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def whole_tensor_target(name: str) -> str:
    """The base tensor an adapter's whole tensor stands for: peft saves resized layers as
    `<module>.base_layer.weight`, and `modules_to_save` copies as
    `<module>.modules_to_save.weight` (other versions: `.modules_to_save.<adapter>.weight`)."""
    parts = name.removeprefix(PREFIX).replace(".base_layer.", ".").split(".")
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        del parts[i : i + 1 if i + 2 == len(parts) else i + 2]
    return ".".join(parts)


def check_shape(weights: Path, name: str, target: str, want: list[int], shapes: dict, files: dict) -> None:
    if shapes[target] != want:
        where = files.get(target, "the adapters before it")
        raise InputError(
            f"{weights}: tensor {name} expects {target} of shape {want}, but {where} has "
            f"{shapes[target]}; this adapter was made for another base model."
        )


def plan_adapter(folder: Path, shapes: dict[str, list[int]], files: dict[str, Path]) -> Adapter:
    """Check one adapter against the model so far, from headers alone; updates `shapes`."""
    config_path = folder / "adapter_config.json"
    config = read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise InputError(f"{config_path}: peft_type {config.get('peft_type')!r} cannot be merged linearly; only LORA can.")
    if config.get("use_dora"):
        raise InputError(f"{config_path}: DoRA adapters (use_dora) are not linear merges; cpuforge will not merge them.")
    weights = adapter_weights_file(folder)
    tensors = adapter_shapes(weights)
    adapter = Adapter(folder, weights)
    for name, shape in sorted(tensors.items()):
        if ".lora_B." in name or name.endswith(".lora_embedding_B") or ".original_module." in name:
            continue  # B is read with its A; original_module is the base's own copy
        if ".lora_A." in name or name.endswith(".lora_embedding_A"):
            continue
        target = whole_tensor_target(name)
        if target not in shapes:
            raise InputError(f"{weights}: tensor {name} replaces {target}, which the base model does not have.")
        if shape != shapes[target] and not (target in (EMBED, LM_HEAD) and shape[1:] == shapes[target][1:]):
            check_shape(weights, name, target, shape, shapes, files)
        adapter.replace[target] = name
        shapes[target] = shape
    for name, a_shape in sorted(tensors.items()):
        embedding = name.endswith(".lora_embedding_A")
        if ".lora_A." not in name and not embedding:
            continue
        module = name.removeprefix(PREFIX).split(".lora_A.")[0].removesuffix(".lora_embedding_A")
        b = name.replace(".lora_A.", ".lora_B.").replace("lora_embedding_A", "lora_embedding_B")
        target = f"{module}.weight"
        if b not in tensors:
            raise InputError(f"{weights}: tensor {name} has no matching {b}.")
        if target not in shapes:
            raise InputError(f"{weights}: tensor {name} adapts {target}, which the base model does not have.")
        out_features, rank = tensors[b]
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        want = [a_shape[1], out_features] if transpose else [out_features, a_shape[1]]
        if a_shape[0] != rank:
            raise InputError(f"{weights}: tensor {name} has rank {a_shape[0]} but {b} has rank {rank}.")
        check_shape(weights, name, target, want, shapes, files)
        adapter.loras.append(Lora(target, name, b, lora_scale(config, module, rank), transpose))
    if not adapter.loras and not adapter.replace:
        raise InputError(f"{weights}: holds no LoRA or whole tensors.")
    return adapter


def tokenizer_source(base: Path, adapters: list[Path]) -> Path:
    """The last adapter that brings tokenizer files, else the base."""
    for folder in [*reversed(adapters), base]:
        if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            return folder
    raise InputError(f"{base}: no tokenizer.json or tokenizer.model here or in any adapter.")


def tokenizer_size(folder: Path) -> tuple[int, Path]:
    """Number of token ids the tokenizer in `folder` can produce, and the file that says so."""
    added = {}
    if (folder / "tokenizer.json").is_file():
        source = folder / "tokenizer.json"
        data = read_json(source)
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in data.get("added_tokens", [])]
        return max(ids) + 1, source
    import sentencepiece

    source = folder / "tokenizer.model"
    n = sentencepiece.SentencePieceProcessor(model_file=str(source)).get_piece_size()
    if (folder / "added_tokens.json").is_file():
        added = read_json(folder / "added_tokens.json")
    return max([n - 1, *added.values()]) + 1, source


def check_inputs(base: Path, adapters: list[Path]) -> Plan:
    """Every check that needs only headers; raises InputError naming the file at the first problem."""
    files = base_shards(base)
    shapes, dtypes = {}, {}
    for f in sorted(set(files.values())):
        for name, info in safetensors_header(f).items():
            shapes[name], dtypes[name] = info["shape"], info["dtype"]
    if EMBED not in shapes:
        raise InputError(f"{base}: no tensor {EMBED}; cpuforge merges LLaMA-family models.")
    tied = LM_HEAD not in shapes  # a base without lm_head reads its embeddings (tie_word_embeddings)
    if tied:
        shapes[LM_HEAD], dtypes[LM_HEAD] = shapes[EMBED], dtypes[EMBED]  # tied: lm_head reads the embeddings
    base_rows = shapes[EMBED][0]
    plans = [plan_adapter(a, shapes, files) for a in adapters]
    if tied and any(LM_HEAD in p.replace or any(lo.target == LM_HEAD for lo in p.loras) for p in plans):
        tied = False  # an adapter changed lm_head alone: the output needs its own
    if tied:
        del shapes[LM_HEAD]
    tokenizer = tokenizer_source(base, adapters)
    size, source = tokenizer_size(tokenizer)
    rows = shapes[EMBED][0]
    if (rows != base_rows and size != rows) or size > rows:
        raise InputError(f"{source}: tokenizer has {size} tokens but the merged embeddings have {rows} rows.")
    if not tied and LM_HEAD in shapes and shapes[LM_HEAD][0] != rows:
        raise InputError(f"{adapters[-1]}: lm_head has {shapes[LM_HEAD][0]} rows but the embeddings have {rows}.")
    return Plan(files, plans, shapes, dtypes, tied, tokenizer)


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
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    log.info("tokenizer.json written from tokenizer.model with its merges in score order")


def lora_delta(a, b, scale: float, transpose: bool):
    """scale · B @ A in f32, transposed for embeddings and fan_in_fan_out layers (peft get_delta_weight)."""
    delta = (b.float() @ a.float()) * scale
    return delta.T if transpose else delta


class SafetensorsReader:
    """Reads one tensor at a time with plain reads. Not mmap: every page of a mapped file that
    was read counts as resident, so a mapped 14 GB base would show as 14 GB of memory."""

    TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip

    def __init__(self, path: Path):
        self.header = safetensors_header(path)
        self.file = open(path, "rb")
        self.start = 8 + int.from_bytes(self.file.read(8), "little")

    def __getitem__(self, name: str):
        import torch

        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = getattr(torch, self.TORCH_DTYPES[info["dtype"]])
        if begin == end:
            return torch.empty(info["shape"], dtype=dtype)
        buffer = bytearray(end - begin)
        self.file.seek(self.start + begin)
        self.file.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])

    def close(self) -> None:
        self.file.close()


def adapter_reader(weights: Path):
    """An adapter's tensors by name: read one at a time (safetensors) or loaded whole (.bin)."""
    return SafetensorsReader(weights) if weights.suffix == ".safetensors" else load_bin(weights)


def merged_tensor(name: str, base_tensor, plan: Plan, readers: list):
    """The output tensor `name`: replaced and adapted by each adapter in order, in f32."""
    import torch

    weight = base_tensor
    for adapter, reader in zip(plan.adapters, readers, strict=True):
        if name in adapter.replace:
            weight = reader[adapter.replace[name]]
        for lora in adapter.loras:
            if lora.target == name:
                # merge in f32: half-precision matmuls are slow on many CPUs and lose bits
                weight = weight.float() + lora_delta(reader[lora.a], reader[lora.b], lora.scale, lora.transpose)
    if weight is not base_tensor and not torch.isfinite(weight).all():
        raise InputError(f"{plan.adapters[-1].weights}: merging into {name} gives non-finite values.")
    return weight


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def safetensors_layout(specs: dict[str, tuple[str, list[int]]]) -> tuple[bytes, int]:
    """The header of a safetensors file holding `specs` (name -> dtype, shape) in name order, and its data size."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        size = sizes[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, offset


def merge(base: Path, adapters: list[Path], out: Path, dtype: str, verify_prompts: list[str] = ()) -> float | None:
    """Write the merged model to `out`; with `verify_prompts`, check it against peft before it gets its name.

    Each output shard's header is known from the plan, so it is written first and the
    tensors follow one at a time: memory holds one tensor, never a shard or the model.
    Returns the largest |logit difference| found by the check, if it ran."""
    import torch
    from tqdm import tqdm

    plan = check_inputs(base, adapters)
    readers = [adapter_reader(a.weights) for a in plan.adapters]
    out_dtype = getattr(torch, DTYPES[dtype])
    shards = sorted(set(plan.base_files.values()))
    weight_map, total = {}, 0
    progress = tqdm(total=len(plan.shapes), desc="merging", unit="tensor", mininterval=5)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        for i, shard in enumerate(shards, 1):
            names = [n for n, f in plan.base_files.items() if f == shard]
            if EMBED in names and not plan.tied and LM_HEAD not in plan.base_files:
                names.append(LM_HEAD)  # untied from the base's embeddings, kept beside them
            floating = {"F32", "F16", "BF16", "F64"}
            specs = {
                n: (SAFETENSORS_DTYPES[DTYPES[dtype]] if plan.dtypes[n] in floating else plan.dtypes[n], plan.shapes[n])
                for n in names
            }
            header, size = safetensors_layout(specs)
            f = SafetensorsReader(shard)
            with open(tmp / shard.name, "wb") as w:
                w.write(header)
                for name in sorted(names):
                    source = EMBED if name == LM_HEAD and LM_HEAD not in plan.base_files else name
                    weight = merged_tensor(name, f[source], plan, readers)
                    if weight.is_floating_point():
                        weight = weight.to(out_dtype)
                    if list(weight.shape) != specs[name][1]:
                        raise InputError(f"{shard}: {name} came out as {list(weight.shape)}, planned {specs[name][1]}.")
                    w.write(memoryview(weight.contiguous().view(-1).view(torch.uint8).numpy()))
                    progress.update()
            f.close()
            total += size
            weight_map |= dict.fromkeys(names, shard.name)
            log.info("merged shard %d/%d: %s (%d tensors)", i, len(shards), shard.name, len(names))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = read_json(base / "config.json")
        config |= {"dtype": DTYPES[dtype], "vocab_size": plan.shapes[EMBED][0], "tie_word_embeddings": plan.tied}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if (base / "generation_config.json").is_file():
            shutil.copy2(base / "generation_config.json", tmp)
        for name in TOKENIZER_FILES:
            if (plan.tokenizer / name).is_file():
                shutil.copy2(plan.tokenizer / name, tmp / name)
        if (tmp / "tokenizer.model").is_file() and not (tmp / "tokenizer.json").is_file():
            write_sentencepiece_tokenizer_json(tmp)
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


def adapter_embedding_rows(adapter: Path) -> int | None:
    for name, shape in adapter_shapes(adapter_weights_file(adapter)).items():
        if whole_tensor_target(name) == EMBED and ".original_module." not in name:
            return shape[0]
    return None


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="HF model folder")
    parser.add_argument("--adapter", type=Path, action="append", required=True, help="PEFT LoRA folder; repeat, in order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="dtype of the merged weights")
    parser.add_argument("--verify", action="store_true", help="check the merged logits against peft's unmerged model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(check_threads(args.threads))
    worst = merge(args.base, args.adapter, args.out, args.dtype, VERIFY_PROMPTS if args.verify else ())
    facts = {"step": "merge", "dtype": args.dtype, "verify_max_abs_logit_diff": worst}
    inputs = {"base": args.base, **{f"adapter{i}": a for i, a in enumerate(args.adapter, 1)}}
    write_provenance(args.out, provenance(args.out, inputs, **facts))
    log.info("merged model written to %s", args.out)


if __name__ == "__main__":
    run(main)
