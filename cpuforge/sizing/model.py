"""A model's figures before anything is made: its architecture and tensors from the base's and the adapters'
headers (the demo's from the GGUF its base comes from: cpuforge.sizing.gguf_size.demo_model), what merging
them costs, and a task's lengths."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from cpuforge.constants import EMBED, LM_HEAD
from cpuforge.errors import InputError
from cpuforge.io.files import read_json
from cpuforge.io.safetensors import ITEMSIZE, weights_header
from cpuforge.merge.merge import output_dtype
from cpuforge.sizing.costs import utf8_tokens
from cpuforge.sizing.tuners import Module, f32, working_set
from cpuforge.text.task import answer, messages

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
NORM = "model.norm.weight"


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int, ...]
    dtype: str  # as stored, in safetensors' names (F16, BF16, F32, …)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Arch:
    """A LLaMA-family architecture, as config.json or a GGUF header states it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Model:
    """One model's figures before anything is made: the base and merged tensors and what merging costs."""

    arch: Arch
    base: dict[str, Tensor]
    merged: dict[str, Tensor]
    merge_peak: int  # bytes held at once for the merge's costliest tensor
    merge_macs: int  # multiply-accumulates of every LoRA delta
    adapter_bytes: int  # adapter files read whole (.bin)
    lora_params: tuple[int, ...] = ()  # elements of each adapter's low-rank pairs (its GGUF LoRA's tensors)
    merge_peak_tensor: str = ""  # the tensor that sets merge_peak


@dataclass(frozen=True)
class Task:
    """The sequences of a task stage: rows, and the longest prompt and answer in (estimated) tokens."""

    rows: int = 0
    longest_prompt: int = 0
    longest_answer: int = 0


ARCH_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


def arch_from_config(config: dict, vocab: int, source: str | Path = "config.json") -> Arch:
    missing = [k for k in ARCH_KEYS if not isinstance(config.get(k), int)]
    if missing:
        raise InputError(f"{source}: no {missing[0]}; cpuforge reads a LLaMA-family model's size from "
                         f"{', '.join(ARCH_KEYS)}.")  # fmt: skip
    heads = config["num_attention_heads"]
    return Arch(config["num_hidden_layers"], config["hidden_size"], heads,
                config.get("num_key_value_heads") or heads, config["intermediate_size"], vocab)  # fmt: skip


def llama_shapes(arch: Arch, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """The tensors of a LLaMA model of this architecture, named as transformers saves them."""
    kv = arch.kv_heads * arch.head_dim
    shapes = {EMBED: (arch.vocab, arch.hidden)}
    for i in range(arch.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (arch.hidden, arch.hidden),
            p + "self_attn.k_proj.weight": (kv, arch.hidden),
            p + "self_attn.v_proj.weight": (kv, arch.hidden),
            p + "self_attn.o_proj.weight": (arch.hidden, arch.hidden),
            p + "mlp.gate_proj.weight": (arch.ffn, arch.hidden),
            p + "mlp.up_proj.weight": (arch.ffn, arch.hidden),
            p + "mlp.down_proj.weight": (arch.hidden, arch.ffn),
            p + "input_layernorm.weight": (arch.hidden,),
            p + "post_attention_layernorm.weight": (arch.hidden,),
        }
    shapes[NORM] = (arch.hidden,)
    return shapes if tied else shapes | {LM_HEAD: (arch.vocab, arch.hidden)}


@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter costs the merge: the whole tensors it replaces (target -> the replacement as
    stored), its LoRA ranks by target, and the bytes of a .bin file, which is loaded whole."""

    replace: dict[str, Tensor] = field(default_factory=dict)
    loras: dict[str, list[int]] = field(default_factory=dict)
    whole_file_bytes: int = 0
    # target -> how it is merged where that is not plain LoRA: a cpuforge.sizing.tuners.WORKING_SET key (or
    # another peft_type) and the module's adapter tensors' shapes; a bias target's key ends in ".bias"
    tuned: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def merged_model(arch: Arch, base: dict[str, Tensor], adapters: list[AdapterSpec],
                 shapes: dict[str, tuple[int, ...]], dtype: str) -> Model:  # fmt: skip
    """The Model of a merge: `base` as stored, the adapters in order, `shapes` every output tensor's final
    shape (cpuforge.merge.plan.Plan.shapes) and `dtype` the merge dtype (f16, bf16, f32: the matrices'; vectors
    are f32, cpuforge.merge.merge.output_dtype). cpuforge.merge.merge.merged_tensor holds, for each tensor, the base's
    as read and every replacement an adapter brings; a LoRA target also its f32 copy, the f32 delta and
    their sum at once; any other tensor not in the output dtype yet, one copy in it."""

    def stored(name: str) -> tuple[Tensor, list[Tensor]]:
        source = base.get(name) or base[EMBED]  # an lm_head untied from the embeddings starts as their copy
        return source, [a.replace[name] for a in adapters if name in a.replace]

    def tuned_held(name: str, shape) -> int:
        """A tensor a tuner other than plain LoRA merges into: as read, and the costliest adapter's working set
        (tuners.WORKING_SET) beside it, and the f32 result of the adapters before it where there are some."""
        source, replacements = stored(name)
        n, work = math.prod(shape), 0
        copy = 0 if (replacements or [source])[-1].dtype == "F32" else f32(n)
        for i, a in enumerate(adapters):
            if name in a.tuned:
                kind, tensors = a.tuned[name]
                before = f32(n) if any(name in b.tuned or name in b.loras for b in adapters[:i]) else 0
                out, inp = (*shape, 1)[:2]  # a vector (a norm's weight) as one column
                module = Module(out, inp, 0 if before else copy, a.config, tensors)
                work = max(work, before + working_set(kind, module))
        return source.nbytes + sum(t.nbytes for t in replacements) + work

    merged, peak, macs, costliest = {}, 0, 0, ""
    lora_params = tuple(sum(r * sum(shapes[t]) for t, ranks in a.loras.items() for r in ranks) for a in adapters)
    for name, shape in shapes.items():
        source, replacements = stored(name)
        merged[name] = out = Tensor(tuple(shape), output_dtype(dtype, source.dtype, list(shape)))
        n = math.prod(shape)
        ranks = [r for a in adapters for r in a.loras.get(name, [])]
        macs += n * sum(ranks)
        held = source.nbytes + sum(t.nbytes for t in replacements)
        if any(a.tuned[name][0].endswith(".bias") for a in adapters if name in a.tuned):
            # a bias a tuner changes: its module's weight is merged again beside it (merge.weight_before), then
            # the tuner's bias update runs beside that f32 weight, with no more than its working set for the weight
            weight = name.removesuffix(".bias") + ".weight"
            held += tuned_held(weight, shapes[weight]) + f32(math.prod(shapes[weight]))
        elif any(name in a.tuned for a in adapters):  # its cast comes after the working set is gone
            held = tuned_held(name, shape)
        elif ranks:  # its cast to the output dtype comes after the copy and the delta are gone
            held += 3 * 4 * n
        elif out.dtype != (replacements or [source])[-1].dtype:
            held += out.nbytes
        if held > peak:
            peak, costliest = held, name
    arch = replace(arch, vocab=shapes[EMBED][0])
    return Model(arch, base, merged, peak, macs, sum(a.whole_file_bytes for a in adapters), lora_params, costliest)


def adapter_spec(adapter) -> AdapterSpec:
    """An AdapterSpec of a cpuforge.merge.adapter.Adapter, from its safetensors header (a .bin file is read)."""
    header = weights_header(adapter.weights)
    tensors = {n: Tensor(tuple(h["shape"]), h["dtype"]) for n, h in header.items()}
    whole = 0 if adapter.weights.suffix == ".safetensors" else adapter.weights.stat().st_size
    loras: dict[str, list[int]] = {}
    tuned: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {}
    for lora in adapter.loras:
        loras.setdefault(lora.target, []).append(lora.rank)
        if lora.magnitude or lora.init:  # DoRA's rescaling, PiSSA's SVD, OLoRA's QR: more than LoRA's working set
            tuned[lora.target] = (f"LORA+{lora.init or 'dora'}", {})
    shared = {key: tensors[name].shape for key, name in adapter.shared.items()}
    for t in adapter.tuned:
        kind = f"{adapter.tuner}.bias" if t.bias else adapter.tuner
        tuned[t.target] = (kind, {s: tensors[n].shape for s, n in t.tensors.items()} | shared)
    return AdapterSpec({t: tensors[n] for t, n in adapter.replace.items()}, loras, whole, tuned, adapter.config)


def plan_model(plan, dtype: str) -> Model:
    """The Model of a checked merge (cpuforge.merge.plan.check_inputs' Plan): the base's headers and config.json,
    and the adapters' headers."""
    base = {}
    for shard in sorted(set(plan.base_files.values())):
        base |= {n: Tensor(tuple(h["shape"]), h["dtype"]) for n, h in weights_header(shard).items()}
    config = Path(next(iter(plan.base_files.values()))).parent / "config.json"
    arch = arch_from_config(read_json(config), base[EMBED].shape[0], config)
    adapters = [adapter_spec(a) for a in plan.adapters]
    return merged_model(arch, base, adapters, plan.shapes, dtype)


def task_figures(rows: list[dict]) -> Task:
    """A Task of held-out rows: their prompts' turns and answers, in estimated tokens (with 8 a turn for
    the chat template's markers)."""
    prompts = [sum(utf8_tokens(m["content"]) + 8 for m in messages(r)) for r in rows]
    answers = [utf8_tokens(answer(r) or "") for r in rows]
    return Task(len(rows), max(prompts, default=0), max(answers, default=0))


def base_arch(m: Model) -> Arch:
    """The base's architecture: the merged model's, with the base's own vocabulary."""
    return replace(m.arch, vocab=m.base[EMBED].shape[0])


def unmerged_base(m: Model) -> Model:
    """results/{model}/base, the runtime-LoRA base (cpuforge.merge.runtime_lora.make_unmerged_base): the base's
    tensors as stored, linked not copied, so convert_base and quantize_base see the base, not the merge."""
    return replace(m, arch=base_arch(m), merged=dict(m.base), merge_peak=0, merge_macs=0, adapter_bytes=0)


def lora_gguf_bytes(m: Model) -> list[int]:
    """Each adapter's GGUF LoRA (convert_adapter's default outtype f16) with a little header: what
    convert_adapter writes and what a llama.cpp context loads beside the base for each."""
    return [2 * n + (1 << 20) for n in m.lora_params]
