"""What each rule needs before it runs: peak memory, disk written and runtime, from headers alone.

One function per rule gives a `Need` from what the headers of the rule's inputs say and from the
config: the merge from the base's and the adapters' safetensors headers (the LoRA plan), everything
after it from the merged model those give, or from the real file's header once it exists (a GGUF's
tensors, types and vocabulary). The rules' `resources` (mem_mb, disk_mb, runtime: what SLURM is
asked for), the start-up preflight of a local run and `snakemake plan` all read these figures.

How each figure arises, so that the formulas can be checked against the code they describe:

- A step's processes start at BASE_MB: their interpreters and libraries, measured on a 2-layer model
  with LLaMA's 32000-token vocabulary, where the work is nothing; a step that holds tokenizers adds
  TOKENIZER_BYTES a token of the vocabulary.
- The merge holds one tensor at a time: the base tensor as read, an adapter's whole replacement, and
  for a LoRA target its f32 copy, the f32 delta and their f32 sum (peft's get_delta_weight).
- The torch stages (eval_perplexity_hf, eval_task_hf and the merged side of check_generation) stream
  the decoder one layer at a time (cpuforge.text.stream): the hidden states of every sequence in f32, beside
  the larger of one layer's weights in f32 with the tensor being read as stored and one sequence's
  activations inside the layer, or the output head as stored with HEAD_ROWS of its rows in f32 and a
  few chunks of STREAM_POSITIONS positions' logits.
- A llama.cpp run maps the GGUF (and reads all of it: every page counts as resident), holds a second,
  repacked copy of the matrices whose types this CPU's kernels interleave (REPACKED), and adds its KV
  cache (f16 K and V of every layer and position), its compute buffer (the graph of one micro-batch,
  chiefly that batch's logits) and its output buffer (the logits it keeps). llama-quantize holds one
  tensor mapped, its f32 copy and its quantized bytes.
- Disk is what a step writes, scratch included: the converter's and llama-quantize's output sits beside
  its copy (cpuforge.io.provenance) until the copy is complete.
- Runtimes are time limits: pessimistic rates of a small machine (forward passes at FLOPS_PER_THREAD,
  each generated token the time it takes to read the weights once, files at DISK_BYTES_PER_SECOND),
  times three.

Sizes are MiB (Snakemake's mem_mb and disk_mb, SLURM's --mem=…M), runtimes minutes.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.safetensors import ITEMSIZE

MIB = 1 << 20
# resident MiB of each step's processes before any work, measured on the `tiny` shape of
# benchmarks/scale.py (2 layers, hidden 256, LLaMA's tokenizer; the tokenizer's share taken out, see
# TOKENIZER_BYTES): the interpreters, torch and transformers where imported, the ggml backends
BASE_MB = {
    "merge": 250, "convert": 560, "quantize": 70, "make_imatrix": 550, "eval_perplexity": 40,
    "eval_kl_divergence": 40, "bench_threads": 15, "eval_task": 170, "eval_perplexity_hf": 300,
    "eval_task_hf": 250, "check_generation": 250, "compare_imatrix": 300, "check_tokenizer": 300,
    "check_chat_template": 270, "make_eval_text": 22, "make_eval_report": 60, "check_quality_gate": 15,
    "fetch_llama_cpp": 100, "build_llama_cpp": 60, "make_demo_base": 350, "train_demo_adapter": 450, "plan": 15,
    # make_unmerged_base measured at 37 and 60 MiB with its shell (tiny, 1b); convert_adapter and
    # bench_runtime_lora measured on the test suite's tiny model and checked on the 1b shape (1.00 and 0.77
    # to 0.86 of the plan); check_runtime_lora guessed as eval_task's llama-cpp-python
    "check_converter_vocab": 290, "make_unmerged_base": 55, "convert_adapter": 310, "check_runtime_lora": 250,
    "bench_runtime_lora": 170,
}  # fmt: skip
# a transformers tokenizer and a GGUF vocabulary held by a step, per token of the vocabulary
TOKENIZER_BYTES = 3 << 10
# transformers, imported to write a tokenizer.json where only a sentencepiece tokenizer.model came
TRANSFORMERS_MB = 300
# every memory figure is rounded up by this: allocator slack, the libraries' caches, sampling noise
MARGIN = 1.1
# pessimistic rates of a small machine, for the time limits
FLOPS_PER_THREAD = 10e9
BYTES_PER_SECOND = 4e9  # memory bandwidth: a generated token reads every weight once
DISK_BYTES_PER_SECOND = 100e6
QUANTIZE_WEIGHTS_PER_SECOND = 20e6  # per thread, for the legacy types; the others search scales longer
SLOW_QUANTIZE = 4
MINUTES_MIN = 5
# llama.cpp's default micro-batch, which llama-cpp-python also keeps a score array of
UBATCH = 512
# cpuforge.text.stream's chunks: positions per chunk of logits, rows of the output head upcast at a time
STREAM_POSITIONS = 128
HEAD_ROWS = 8192

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EMBED, LM_HEAD, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"

# bits per weight of each llama-quantize type's matrices (for the K- and I-mixes their average over a
# LLaMA's matrices, from the sizes llama-quantize states), and the ggml type most of them get; vectors
# stay f32, `output.weight` is at least q6_K
QUANT_TYPES = {
    "q4_0": (4.5, "q4_0"), "q4_1": (5.0, "q4_1"), "q5_0": (5.5, "q5_0"), "q5_1": (6.0, "q5_1"),
    "q8_0": (8.5, "q8_0"), "f16": (16, "f16"), "bf16": (16, "bf16"), "q2_k": (3.0, "q2_k"),
    "q2_k_s": (2.9, "q2_k"), "q3_k_s": (3.5, "q3_k"), "q3_k_m": (3.9, "q3_k"), "q3_k_l": (4.3, "q3_k"),
    "q4_k_s": (4.6, "q4_k"), "q4_k_m": (4.9, "q4_k"), "q5_k_s": (5.5, "q5_k"), "q5_k_m": (5.7, "q5_k"),
    "q6_k": (6.5625, "q6_k"), "iq1_s": (1.6, "iq1_s"), "iq1_m": (1.8, "iq1_m"), "iq2_xxs": (2.1, "iq2_xxs"),
    "iq2_xs": (2.35, "iq2_xs"), "iq2_s": (2.5, "iq2_s"), "iq2_m": (2.7, "iq2_s"), "iq3_xxs": (3.1, "iq3_xxs"),
    "iq3_xs": (3.3, "iq3_xxs"), "iq3_s": (3.45, "iq3_s"), "iq3_m": (3.7, "iq3_s"), "iq4_nl": (4.5, "iq4_nl"),
    "iq4_xs": (4.25, "iq4_xs"),
}  # fmt: skip
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "bf16")
# ggml types whose matrices the CPU backend repacks into an interleaved copy on x86 with AVX2 (q2_K with
# AVX-512; ggml-cpu/repack.cpp): counted on every machine, which is right on most and too much on some
REPACKED = ("q4_0", "q4_k", "iq4_nl", "q2_k")


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


@dataclass(frozen=True)
class Gguf:
    """A GGUF file's figures: its size, its architecture, and its tensors: elements, bytes, row length
    and ggml type of each."""

    arch: Arch
    nbytes: int
    tensors: dict[str, tuple[int, int, int, str]]

    @property
    def params(self) -> int:
        return sum(t[0] for t in self.tensors.values())

    @property
    def repacked(self) -> int:
        """Bytes of the matrices the CPU backend keeps a repacked copy of (not the embeddings: they are
        only looked up)."""
        return sum(t[1] for n, t in self.tensors.items() if t[3] in REPACKED and n != "token_embd.weight")


@dataclass(frozen=True)
class Task:
    """The sequences of a task stage: rows, and the longest prompt and answer in (estimated) tokens."""

    rows: int = 0
    longest_prompt: int = 0
    longest_answer: int = 0


@dataclass(frozen=True)
class Need:
    mem_mb: int
    disk_mb: int  # at the step's peak, scratch files included
    runtime: int  # minutes
    kept_mb: int = 0  # of disk_mb, what stays when the step is done


@dataclass(frozen=True)
class Cost:
    """A step's peak memory (MiB, its interpreter included), bytes written at its peak, estimated seconds,
    and bytes that stay written (its outputs; the rest is scratch)."""

    mem: float
    disk: float
    seconds: float
    kept: float | None = None  # None: all of `disk`

    def need(self) -> Need:
        # the time limit: three times the estimate
        runtime = max(MINUTES_MIN, math.ceil(3 * self.seconds / 60))
        kept = self.disk if self.kept is None else self.kept
        return Need(math.ceil(self.mem * MARGIN), max(1, math.ceil(self.disk / MIB)), runtime, math.ceil(kept / MIB))


def cost(rule: str, work_bytes: float, disk: float = 0, seconds: float = 0, kept: float | None = None) -> Cost:
    """A step of `rule`: its processes' BASE_MB plus `work_bytes`."""
    return Cost(BASE_MB[rule] + work_bytes / MIB, disk, seconds, kept)


def tokenizer_bytes(arch: Arch) -> int:
    return TOKENIZER_BYTES * arch.vocab


def one_after_another(*costs: Cost, kept: float | None = None) -> Cost:
    """Steps run in turn by one process: the largest peak, everything written, all the time."""
    return Cost(max(c.mem for c in costs), sum(c.disk for c in costs), sum(c.seconds for c in costs), kept)


def estimated_tokens(nbytes: int) -> int:
    """Tokens of a text of `nbytes` UTF-8 bytes before a tokenizer is at hand: one per 3 bytes, which no
    LLaMA-family vocabulary falls short of on English (4 to 5 bytes a token) or CJK text (a character's
    3 bytes are one or two tokens)."""
    return math.ceil(nbytes / 3) + 1


def utf8_tokens(text: str) -> int:
    return estimated_tokens(len(text.encode("utf-8")))


# ---- the model, from headers ----


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


def merged_model(arch: Arch, base: dict[str, Tensor], adapters: list[AdapterSpec],
                 shapes: dict[str, tuple[int, ...]], dtype: str) -> Model:  # fmt: skip
    """The Model of a merge: `base` as stored, the adapters in order, `shapes` every output tensor's final
    shape (cpuforge.merge.plan.Plan.shapes) and `dtype` the merge dtype (f16, bf16, f32: the matrices'; vectors
    are f32, cpuforge.merge.merge.output_dtype). cpuforge.merge.merge.merged_tensor holds, for each tensor, the base's
    as read and every replacement an adapter brings; a LoRA target also its f32 copy, the f32 delta and
    their sum at once; any other tensor not in the output dtype yet, one copy in it."""
    from cpuforge.merge.merge import output_dtype

    merged, peak, macs = {}, 0, 0
    lora_params = tuple(sum(r * sum(shapes[t]) for t, ranks in a.loras.items() for r in ranks) for a in adapters)
    for name, shape in shapes.items():
        source = base.get(name) or base[EMBED]  # an lm_head untied from the embeddings starts as their copy
        replacements = [a.replace[name] for a in adapters if name in a.replace]
        merged[name] = out = Tensor(tuple(shape), output_dtype(dtype, source.dtype, list(shape)))
        n = math.prod(shape)
        ranks = [r for a in adapters for r in a.loras.get(name, [])]
        macs += n * sum(ranks)
        held = source.nbytes + sum(t.nbytes for t in replacements)
        if ranks:  # its cast to the output dtype comes after the copy and the delta are gone
            held += 3 * 4 * n
        elif out.dtype != (replacements or [source])[-1].dtype:
            held += out.nbytes
        peak = max(peak, held)
    arch = replace(arch, vocab=shapes[EMBED][0])
    return Model(arch, base, merged, peak, macs, sum(a.whole_file_bytes for a in adapters), lora_params)


def adapter_spec(adapter) -> AdapterSpec:
    """An AdapterSpec of a cpuforge.merge.plan.Adapter, from its safetensors header (a .bin file is read)."""
    from cpuforge.io.safetensors import weights_header

    header = weights_header(adapter.weights)
    tensors = {n: Tensor(tuple(h["shape"]), h["dtype"]) for n, h in header.items()}
    whole = 0 if adapter.weights.suffix == ".safetensors" else adapter.weights.stat().st_size
    loras: dict[str, list[int]] = {}
    for lora in adapter.loras:
        loras.setdefault(lora.target, []).append(tensors[lora.a].shape[0])
    return AdapterSpec({t: tensors[n] for t, n in adapter.replace.items()}, loras, whole)


def plan_model(plan, dtype: str) -> Model:
    """The Model of a checked merge (cpuforge.merge.plan.check_inputs' Plan): the base's headers and config.json,
    and the adapters' headers."""
    from cpuforge.io.files import read_json
    from cpuforge.io.safetensors import weights_header

    base = {}
    for shard in sorted(set(plan.base_files.values())):
        base |= {n: Tensor(tuple(h["shape"]), h["dtype"]) for n, h in weights_header(shard).items()}
    config = Path(next(iter(plan.base_files.values()))).parent / "config.json"
    arch = arch_from_config(read_json(config), base[EMBED].shape[0], config)
    adapters = [adapter_spec(a) for a in plan.adapters]
    return merged_model(arch, base, adapters, plan.shapes, dtype)


def demo_model(gguf: str | Path, rank: int, targets: list[str], dtype: str) -> Model:
    """The demo's Model before its base exists: the architecture of the GGUF it is made from, the base in
    f32 (cpuforge.demo), its LoRA of rank `rank` on `targets` in every layer."""
    g = read_gguf(gguf)
    shapes = llama_shapes(g.arch, tied="output.weight" not in g.tensors)
    base = {n: Tensor(s, "F32") for n, s in shapes.items()}
    lora = AdapterSpec(loras={n: [rank] for n in shapes if n.split(".")[-2] in targets})
    return merged_model(g.arch, base, [lora], shapes, dtype)


def task_figures(rows: list[dict]) -> Task:
    """A Task of held-out rows: their prompts' turns and answers, in estimated tokens (with 8 a turn for
    the chat template's markers)."""
    from cpuforge.text.task import answer, messages

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


# ---- the GGUF files: predicted from the merged model, or read from a header ----


GGUF_NAMES = {EMBED: "token_embd.weight", LM_HEAD: "output.weight", NORM: "output_norm.weight"}
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def gguf_name(name: str) -> str:
    """The converter's name for a LLaMA tensor (gguf-py's tensor map)."""
    if m := LAYER.match(name):
        module, _, kind = name[m.end() :].rpartition(".")
        return f"blk.{m[1]}.{GGUF_LAYER_NAMES.get(module, module)}.{kind}"
    return GGUF_NAMES.get(name, name)


def predicted_gguf(model: Model, qtype: str = "f16") -> Gguf:
    """The GGUF the converter (f16) or llama-quantize (`qtype`) makes of the merged model: matrices in the
    type, vectors in f32 (as the converter keeps them), `output.weight` at least q6_K; plus the header,
    whose vocabulary takes about 32 bytes a token."""
    bits, kind = QUANT_TYPES[qtype]
    q6_k = QUANT_TYPES["q6_k"]
    tensors = {}
    for name, t in model.merged.items():
        out = gguf_name(name)
        b, k = (32, "f32") if len(t.shape) == 1 else max((bits, kind), q6_k) if out == "output.weight" else (bits, kind)
        tensors[out] = (t.numel, math.ceil(t.numel * b / 8), t.shape[-1], k)
    header = 32 * model.arch.vocab + (64 << 10)
    return Gguf(model.arch, header + sum(t[1] for t in tensors.values()), tensors)


def read_gguf(path: str | Path) -> Gguf:
    """A GGUF file's figures from its header; no tensor data is read."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = reader.fields
    prefix = fields["general.architecture"].contents() + "."

    def value(key):
        return fields[prefix + key].contents() if prefix + key in fields else None

    heads = value("attention.head_count")
    vocab = len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else 0
    arch = Arch(value("block_count"), value("embedding_length"), heads, value("attention.head_count_kv") or heads,
                value("feed_forward_length"), vocab)  # fmt: skip
    tensors = {t.name: (int(t.n_elements), int(t.n_bytes), int(t.shape[0]), t.tensor_type.name.lower())
               for t in reader.tensors}  # fmt: skip
    return Gguf(arch, Path(path).stat().st_size, tensors)


# ---- what the parts cost ----


def kv_cache_bytes(arch: Arch, n_ctx: int) -> int:
    """f16 K and V of every layer and position; llama.cpp pads the context to a multiple of 256."""
    return 256 * math.ceil(n_ctx / 256) * arch.layers * arch.kv_heads * arch.head_dim * 2 * 2


def compute_buffer_bytes(arch: Arch, n_ubatch: int) -> int:
    """ggml's graph of one micro-batch (flash attention, as llama.cpp chooses on a CPU): per token its
    logits and the widest intermediates (measured: 35.25 MiB for 256 tokens of a 32000-token, hidden-2048
    LLaMA, which this gives within 16 %)."""
    return 4 * n_ubatch * (arch.vocab + 2 * arch.hidden + arch.ffn)


def llama_run(rule: str, g: Gguf, n_ctx: int, n_outputs: int, threads: int, tokens: int = 0,
              generated: int = 0) -> Cost:  # fmt: skip
    """A llama.cpp context on the GGUF: the mapped file, the repacked matrices, the KV cache, the compute
    and output buffers; `tokens` evaluated in batches and `generated` one at a time."""
    work = (g.nbytes + g.repacked + kv_cache_bytes(g.arch, n_ctx) + compute_buffer_bytes(g.arch, min(UBATCH, n_ctx))
            + 4 * n_outputs * g.arch.vocab)  # fmt: skip
    seconds = 2 * g.params * tokens / (FLOPS_PER_THREAD * threads) + generated * g.nbytes / BYTES_PER_SECOND
    return cost(rule, work, seconds=seconds)


def kld_bytes(arch: Arch, ctx: int, chunks: int) -> int:
    """llama-perplexity's --kl-divergence-base file: the tokens, then for every scored position the
    vocabulary's log-probabilities as uint16 (an even count, plus 4 for their scale)."""
    return 16 + 4 * ctx * chunks + chunks * (ctx - 1 - ctx // 2) * 2 * (2 * ((arch.vocab + 1) // 2) + 4)


def streamed_forward(rule: str, tensors: dict[str, Tensor], arch: Arch, tokens: int, longest: int,
                     threads: int) -> Cost:  # fmt: skip
    """cpuforge.text.stream over sequences of `tokens` tokens in all, the longest `longest`: the hidden states of
    all of them (and one sequence's new ones) in f32, beside the largest of the embeddings as read, a
    layer's phase (its weights in f32, the tensor being read as stored, one sequence's activations inside
    the layer: attention's q, k, v, output and scores, the MLP's gate, up and their product) and the
    output head's (as stored, HEAD_ROWS rows in f32, three chunks of logits: the chunk, a slice's
    product and the log-softmax)."""
    layers: dict[int, list[Tensor]] = {}
    for name, t in tensors.items():
        if m := LAYER.match(name):
            layers.setdefault(int(m[1]), []).append(t)
    layer = max(sum(4 * t.numel for t in ts) + max(t.nbytes for t in ts) for ts in layers.values())
    inside = 4 * longest * (3 * arch.ffn + 6 * arch.hidden) + 4 * arch.heads * longest * longest
    head = tensors.get(LM_HEAD) or tensors[EMBED]
    head_phase = head.nbytes + 4 * HEAD_ROWS * arch.hidden + 3 * 4 * STREAM_POSITIONS * arch.vocab
    hidden = 4 * arch.hidden * (tokens + longest)
    work = hidden + max(layer + inside, head_phase, tensors[EMBED].nbytes) + tokenizer_bytes(arch)
    seconds = 2 * sum(t.numel for t in tensors.values()) * tokens / (FLOPS_PER_THREAD * threads)
    seconds += sum(t.nbytes for t in tensors.values()) / DISK_BYTES_PER_SECOND
    return cost(rule, work, seconds=seconds)


# ---- one function per rule ----


def merge(m: Model, threads: int) -> Need:
    written = sum(t.nbytes for t in m.merged.values()) + (8 << 20)  # and the tokenizer files
    seconds = (sum(t.nbytes for t in m.base.values()) + written) / DISK_BYTES_PER_SECOND
    seconds += 2 * m.merge_macs / (FLOPS_PER_THREAD * threads)
    return cost("merge", m.merge_peak + m.adapter_bytes, written, seconds).need()


def convert(m: Model, f16: Gguf) -> Need:
    """The converter, a child of scripts.convert (which holds the tokenizer), maps a tensor, converts it
    when it is not f16 already, and writes it; then its scratch file is copied with the provenance added,
    64 MiB at a time."""
    largest = max(m.merged.values(), key=lambda t: t.numel)
    work = largest.nbytes + (0 if largest.dtype == "F16" else 2 * largest.numel) + tokenizer_bytes(m.arch)
    seconds = (sum(t.nbytes for t in m.merged.values()) + 3 * f16.nbytes) / DISK_BYTES_PER_SECOND
    return cost("convert", work, 2 * f16.nbytes, seconds, kept=f16.nbytes).need()


def _quantize(rule: str, f16: Gguf, out: Gguf, qtype: str, threads: int) -> Cost:
    """llama-quantize: a tensor mapped, its f32 copy and its quantized bytes (its buffers keep the largest)."""
    n, nbytes = max(t[:2] for t in f16.tensors.values())
    work = nbytes + 4 * n + max(t[1] for t in out.tensors.values())
    rate = QUANTIZE_WEIGHTS_PER_SECOND * threads / (1 if qtype in LEGACY else SLOW_QUANTIZE)
    seconds = f16.params / rate + 3 * out.nbytes / DISK_BYTES_PER_SECOND
    return cost(rule, work, 2 * out.nbytes, seconds, kept=out.nbytes)


def quantize(f16: Gguf, out: Gguf, qtype: str, threads: int) -> Need:
    return _quantize("quantize", f16, out, qtype, threads).need()


def make_imatrix(f16: Gguf, ctx: int, chunks: int, threads: int) -> Need:
    """llama-imatrix over `chunks` windows of `ctx` tokens with every position's logits, beside the Python
    that rendered the calibration text; the matrix holds a sum and a count per matrix column."""
    run = llama_run("make_imatrix", f16, ctx, ctx, threads, tokens=ctx * chunks)
    matrix = sum(8 * t[2] for t in f16.tensors.values()) + (1 << 20)
    return Cost(run.mem + tokenizer_bytes(f16.arch) / MIB, matrix, run.seconds).need()


def _perplexity_gguf(rule: str, g: Gguf, ctx: int, chunks: int, threads: int, save_logits: bool) -> Cost:
    """llama-perplexity, one window per batch, every position's logits; with `save_logits` it writes every
    scored position's log-probabilities, which the quants' KL divergence reads a window at a time."""
    run = llama_run(rule, g, ctx, ctx, threads, tokens=ctx * chunks)
    return Cost(run.mem, kld_bytes(g.arch, ctx, chunks) if save_logits else 0, run.seconds)


def eval_perplexity(g: Gguf, ctx: int, chunks: int, threads: int) -> Need:
    return _perplexity_gguf("eval_perplexity", g, ctx, chunks, threads, True).need()


def eval_kl_divergence(g: Gguf, ctx: int, chunks: int, threads: int) -> Need:
    return _perplexity_gguf("eval_kl_divergence", g, ctx, chunks, threads, False).need()


def _task_gguf(rule: str, g: Gguf, task: Task, max_new_tokens: int, threads: int, n_ctx: int = 0) -> Cost:
    """llama-cpp-python answering every row in turn, beside the merged model's tokenizer: a context for the
    longest prompt and answer (or `n_ctx`), and its own score array of one micro-batch of logits."""
    run = llama_run(rule, g, n_ctx or task.longest_prompt + max_new_tokens + 16, UBATCH, threads,
                    tokens=task.rows * task.longest_prompt, generated=task.rows * max_new_tokens)  # fmt: skip
    return Cost(run.mem + tokenizer_bytes(g.arch) / MIB, 0, run.seconds)


def eval_task(g: Gguf, task: Task, max_new_tokens: int, threads: int) -> Need:
    return _task_gguf("eval_task", g, task, max_new_tokens, threads).need()


def bench_threads(g: Gguf, prompt_tokens: int, gen_tokens: int, repetitions: int, sweep: list[int]) -> Need:
    """llama-bench: for every thread count a warm-up and `repetitions` runs of each test."""
    runs = [llama_run("bench_threads", g, prompt_tokens + gen_tokens, 1, t, prompt_tokens, gen_tokens) for t in sweep]
    return Cost(runs[0].mem, 0, (repetitions + 1) * sum(r.seconds for r in runs)).need()


def eval_perplexity_hf(tensors: dict[str, Tensor], arch: Arch, ctx: int, chunks: int, threads: int) -> Need:
    return streamed_forward("eval_perplexity_hf", tensors, arch, ctx * chunks, ctx, threads).need()


def eval_task_hf(tensors: dict[str, Tensor], arch: Arch, task: Task, max_new_tokens: int, threads: int) -> Need:
    """Teacher forcing: one streamed pass over every prompt and its answer (at most max_new_tokens of it)."""
    longest = task.longest_prompt + min(task.longest_answer, max_new_tokens) + 1
    return streamed_forward("eval_task_hf", tensors, arch, task.rows * longest, longest, threads).need()


def check_generation(m: Model, f16: Gguf, task: Task, max_new_tokens: int, threads: int) -> Need:
    """The f16 GGUF answers every prompt and is closed; then one streamed pass of the merged model over
    every prompt and that answer."""
    longest = task.longest_prompt + max_new_tokens
    gguf = _task_gguf("check_generation", f16, task, max_new_tokens, threads)
    hf = streamed_forward("check_generation", m.merged, m.arch, task.rows * longest, longest, threads)
    return one_after_another(gguf, hf).need()


def compare_imatrix(f16: Gguf, quant: Gguf, qtype: str, ctx: int, chunks: int, task: Task, threads: int) -> Need:
    """Quantize without the matrix, llama-perplexity on the f16 (saving its log-probabilities), then on both
    quants against them, then each quant's task answers: one model at a time, beside the Python, which
    holds the merged model's tokenizer from the start."""
    rule, tokenizer = "compare_imatrix", tokenizer_bytes(f16.arch) / MIB
    llama_steps = [_quantize(rule, f16, quant, qtype, threads), _perplexity_gguf(rule, f16, ctx, chunks, threads, True),
                   *[_perplexity_gguf(rule, quant, ctx, chunks, threads, False)] * 2]  # fmt: skip
    return one_after_another(
        *[replace(c, mem=c.mem + tokenizer) for c in llama_steps],
        *[_task_gguf(rule, quant, task, 48, threads, n_ctx=1024)] * 2,  # cpuforge.llama.imatrix.task_accuracy; counts it
        kept=0,  # its quant, logits and text are scratch
    ).need()


def check_tokenizer(arch: Arch, text_bytes: int) -> Need:
    """Both tokenizers of the vocabulary (no weights) over the task data and fixed corpora."""
    return cost("check_tokenizer", tokenizer_bytes(arch) + 20 * text_bytes, seconds=60 + text_bytes / 1e4).need()


def check_chat_template(arch: Arch) -> Need:
    return cost("check_chat_template", tokenizer_bytes(arch), seconds=60).need()


def build_llama_cpp(threads: int) -> Need:
    """One compiler per thread; ggml's largest sources need about 500 MB each."""
    return cost("build_llama_cpp", threads * (500 << 20), 800 << 20, 20 * 60).need()


def make_demo_base(m: Model) -> Need:
    """transformers dequantizes the demo GGUF into an f32 model and copies its weights into a fresh one,
    which it saves (measured: twice the f32 weights at its peak)."""
    weights = sum(4 * t.numel for t in m.base.values())
    return cost("make_demo_base", 2 * weights, weights, 5 * 60).need()


def train_demo_adapter(m: Model, batch_size: int, steps: int, threads: int, longest: int) -> Need:
    """peft trains the LoRA on the f32 base: its weights, and the activations of a batch of the longest
    examples kept for the backward pass."""
    weights = sum(4 * t.numel for t in m.base.values())
    per_token = m.arch.layers * (4 * m.arch.ffn + 16 * m.arch.hidden) + 3 * m.arch.vocab
    seconds = 6 * weights / 4 * batch_size * longest * steps / (FLOPS_PER_THREAD * threads)
    return cost("train_demo_adapter", weights + 4 * batch_size * longest * per_token, 64 << 20, seconds).need()


def check_converter_vocab(arch: Arch) -> Need:
    """The pinned converter's vocabulary code on the tokenizer the merged model will carry (no weights)."""
    return cost("check_converter_vocab", tokenizer_bytes(arch), seconds=60).need()


def make_unmerged_base(m: Model, tokenizer: Path | None) -> Need:
    """Links the base's shards and copies its config and the merged model's tokenizer files (from the folder
    `tokenizer`; None: one that has a tokenizer.json); where only a sentencepiece tokenizer.model came,
    transformers writes the tokenizer.json (cpuforge.merge.merge.copy_tokenizer)."""
    writes_json = tokenizer is not None and not (tokenizer / "tokenizer.json").is_file()
    work = TRANSFORMERS_MB * MIB + tokenizer_bytes(m.arch) if writes_json else 0
    return cost("make_unmerged_base", work, 16 << 20, 60).need()


def convert_adapter(m: Model, index: int) -> Need:
    """convert_lora_to_gguf.py holds the adapter's pairs as peft saved them (f32 at worst) and their f16
    copy; its scratch file sits beside the copy that gets the provenance."""
    params = m.lora_params[index]
    out = lora_gguf_bytes(m)[index]
    return cost("convert_adapter", 4 * params + 2 * params, 2 * out, 60 + 3 * out / DISK_BYTES_PER_SECOND, out).need()


def with_loras(c: Cost, loras: list[int], tokens: int = 0, threads: int = 1) -> Cost:
    """A llama.cpp context with GGUF LoRAs applied: their tensors loaded beside the mapped base, and their
    low-rank products on every token."""
    seconds = 2 * sum(loras) / 2 * tokens / (FLOPS_PER_THREAD * threads)
    return replace(c, mem=c.mem + sum(loras) / MIB, seconds=c.seconds + seconds)


def eval_kl_divergence_lora(base: Gguf, loras: list[int], ctx: int, chunks: int, threads: int) -> Need:
    run = _perplexity_gguf("eval_kl_divergence", base, ctx, chunks, threads, False)
    return with_loras(run, loras, ctx * chunks, threads).need()


def eval_task_lora(base: Gguf, loras: list[int], task: Task, max_new_tokens: int, threads: int) -> Need:
    run = _task_gguf("eval_task", base, task, max_new_tokens, threads)
    return with_loras(run, loras, task.rows * (task.longest_prompt + max_new_tokens), threads).need()


def both_alive(rule: str, *costs: Cost) -> Cost:
    """Contexts one process holds at once: their work added, its interpreter once, their times added."""
    work = sum(c.mem - BASE_MB[rule] for c in costs)
    return Cost(BASE_MB[rule] + work, sum(c.disk for c in costs), sum(c.seconds for c in costs))


def check_runtime_lora(merged: Gguf, base: Gguf, loras: list[int], task: Task, max_new_tokens: int,
                       threads: int) -> Need:  # fmt: skip
    """Greedy answers of the merged GGUF, then of the base with the LoRAs; the first context is not freed
    before the second is made (cpuforge.merge.runtime_lora.check_runtime_lora), so both count."""
    rule, tokens = "check_runtime_lora", task.rows * (task.longest_prompt + max_new_tokens)
    merged_run = _task_gguf(rule, merged, task, max_new_tokens, threads)
    base_run = with_loras(_task_gguf(rule, base, task, max_new_tokens, threads), loras, tokens, threads)
    return both_alive(rule, merged_run, base_run).need()


def bench_runtime_lora(merged: Gguf, base: Gguf, loras: list[int], prompt_tokens: int, gen_tokens: int,
                       rounds: int, threads: int) -> Need:  # fmt: skip
    """Both sides' contexts alive at once (cpuforge.merge.runtime_lora.speed_side_by_side), a warm-up and
    `rounds` runs of each."""
    rule, n_ctx = "bench_runtime_lora", max(prompt_tokens, gen_tokens) + 16
    sides = [llama_run(rule, merged, n_ctx, 1, threads, prompt_tokens, gen_tokens),
             with_loras(llama_run(rule, base, n_ctx, 1, threads, prompt_tokens, gen_tokens), loras,
                        prompt_tokens + gen_tokens, threads)]  # fmt: skip
    run = both_alive(rule, *sides)
    return replace(run, seconds=(rounds + 1) * run.seconds).need()


def small(rule: str, work: int = 0, disk: int = 1 << 20, seconds: float = 60) -> Need:
    """A step whose cost does not grow with the model."""
    return cost(rule, work, disk, seconds).need()


SMALL = {
    "fetch_llama_cpp": small("fetch_llama_cpp", disk=200 << 20, seconds=5 * 60),
    "make_eval_text": small("make_eval_text"),
    "make_eval_report": small("make_eval_report", 10 << 20, 10 << 20),
    "check_quality_gate": small("check_quality_gate"),
}


# ---- the machine, and the preflight ----


def machine_memory_mb() -> int:
    """MemTotal of /proc/meminfo, in MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo states no MemTotal.")


def file_system(path: str | Path) -> tuple[int, int]:
    """The device of the file system that holds `path`, or would hold it (its nearest existing parent),
    and its free MiB."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path.stat().st_dev, shutil.disk_usage(path).free // MIB


def free_disk_mb(path: str | Path) -> int:
    return file_system(path)[1]


@dataclass(frozen=True)
class Job:
    """One job of a run with its figures: the row of the plan table."""

    rule: str
    model: str
    job: str  # the other wildcards, e.g. qtype=q4_0
    output: str
    need: Need


def refusal(job: Job, memory_mb: int, free_mb: int, written_before_mb: int = 0) -> str | None:
    """The one sentence that stops a local run before any rule runs, or None when `job` fits the machine:
    its memory, or its disk on top of `written_before_mb` that the jobs before it leave on the same disk."""
    what = f"rule {job.rule}" + (f" ({job.job})" if job.job else "") + f" for model {job.model}"
    if job.need.mem_mb > memory_mb:
        return (f"{what} needs {job.need.mem_mb} MiB of memory, but this machine has {memory_mb} MiB; run it on a "
                "larger one (or with --profile profiles/slurm).")  # fmt: skip
    if written_before_mb + job.need.disk_mb > free_mb:
        # the jobs before it are named only when they are what leaves too little
        fits_alone = job.need.disk_mb <= free_mb
        before = f" on top of the {written_before_mb} MiB that the run writes before it" if fits_alone else ""
        return f"{what} needs {job.need.disk_mb} MiB of disk{before}, but {free_mb} MiB are free where it writes."
    return None


COLUMNS = ("rule", "model", "job", "peak_rss_mib", "disk_mib", "runtime_min", "output")


def plan_table(jobs: list[Job]) -> str:
    """The jobs' figures as an aligned table; last the run's: its largest peak, the disk it needs (what
    it leaves, and its largest scratch file beside that) and the sum of the time limits."""
    rows = [COLUMNS[:-1]] + [(j.rule, j.model, j.job, j.need.mem_mb, j.need.disk_mb, j.need.runtime) for j in jobs]
    kept = sum(j.need.kept_mb for j in jobs)
    scratch = max((j.need.disk_mb - j.need.kept_mb for j in jobs), default=0)
    rows.append(("all", "", "", max((j.need.mem_mb for j in jobs), default=0), kept + scratch,
                 sum(j.need.runtime for j in jobs)))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(str(v).rjust(w) if isinstance(v, int) else str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def write_plan(jobs: list[Job], path: str | Path) -> None:
    """The plan as TSV, one job a line, with the output each job makes."""
    from cpuforge.io.files import atomic_output

    lines = ["\t".join(COLUMNS)]
    lines += ["\t".join(map(str, (j.rule, j.model, j.job, j.need.mem_mb, j.need.disk_mb, j.need.runtime, j.output)))
              for j in jobs]  # fmt: skip
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
