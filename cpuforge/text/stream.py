"""A LLaMA-family forward pass streamed from the safetensors, one decoder layer at a time.

The HF stages (perplexity, task accuracy, generation parity) need the model's
next-token distributions over a set of sequences known in advance, never free
generation. So the sequences go through the decoder in layer-major order: every
sequence passes layer k before layer k+1 is read. Memory is the activations of
all sequences (tokens × hidden size in f32) beside the larger of one decoder
layer's weights in f32 (and the stored copy of the tensor being read), or the
output head as stored with HEAD_ROWS of its rows in f32 and a few chunks of
POSITIONS positions' logits; never the whole model (a 7B layer is 0.8 GB in f32,
its f16 head 0.4 GB, the model 27 GB). The numerics are transformers' own: one
`LlamaDecoderLayer`, `LlamaRotaryEmbedding` and `LlamaRMSNorm` built from the
folder's config, the layer's weights replaced (upcast to f32) before each pass,
sdpa attention with its causal mask, each sequence a batch of one, as
`from_pretrained(dtype=torch.float32)` runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from cpuforge.constants import EMBED, LM_HEAD
from cpuforge.errors import InputError
from cpuforge.merge.folders import base_shards
from cpuforge.io.safetensors import open_weights

log = logging.getLogger(__name__)


# the architectures whose modules this pass builds; anything else would be run wrong, not refused, by them
KNOWN = {"llama": "LlamaForCausalLM"}


# positions per chunk of logits: 128 × 49953 logits in f32 are 26 MB
POSITIONS = 128


# rows of the output head upcast to f32 at a time: the head stays as stored (a 7B's f16 head is 0.4 GB,
# half a layer in f32), not upcast whole beside its stored copy (1.2 GB, more than a layer)
HEAD_ROWS = 8192


class Weights:
    """A HF folder's tensors, each read from the shard that holds it when it is asked for."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = base_shards(folder)
        self.readers: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str):
        if name not in self.files:
            raise InputError(f"{self.folder}: the model has no tensor {name}.")
        path = self.files[name]
        if path not in self.readers:
            self.readers[path] = open_weights(path)  # a .bin shard memory-mapped
        return self.readers[path][name]

    def load(self, module, prefix: str) -> None:
        """Copy the tensors under `prefix` into the module's parameters, upcast to their f32."""
        for name, param in module.named_parameters():
            tensor = self[prefix + name]
            if list(tensor.shape) != list(param.shape):
                raise InputError(f"{self.folder}: {prefix + name} has shape {list(tensor.shape)}, its config "
                                 f"says {list(param.shape)}.")  # fmt: skip
            param.copy_(tensor)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def llama_config(folder: Path):
    """The folder's config, refused unless its architecture is one this pass knows."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in KNOWN:
        raise InputError(f"{folder}: the streamed forward pass knows the architectures {', '.join(KNOWN.values())}, "
                         f"not {config.model_type!r} ({', '.join(config.architectures or [])}).")  # fmt: skip
    # sdpa, as from_pretrained chooses on CPU; with no mask given it applies the causal one
    config._attn_implementation = "sdpa"
    return config


def next_token_logits(folder: Path, sequences: list[list[int]], starts: list[int]) -> Iterator[tuple]:
    """The model's f32 logits of the token after each position from `starts[i]` to the end of
    `sequences[i]`, yielded as (i, position, logits) chunks: logits[j] follows sequences[i][position + j]."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    config = llama_config(folder)
    weights = Weights(Path(folder))
    try:
        embed = weights[EMBED]
        # the f32 model's embedding rows are these rows upcast, so upcast only the rows used
        hidden = [embed[torch.tensor(s)].float()[None] for s in sequences]
        del embed
        rotary = LlamaRotaryEmbedding(config)
        # no gradients: nothing here trains, and a graph would keep every layer's activations
        layer = LlamaDecoderLayer(config, layer_idx=0).eval().requires_grad_(False)
        n = config.num_hidden_layers
        for k in range(n):
            weights.load(layer, f"model.layers.{k}.")
            for i, h in enumerate(hidden):
                positions = torch.arange(h.shape[1])[None]
                hidden[i] = layer(h, position_embeddings=rotary(h, positions), position_ids=positions)
            log.info("layer %d/%d: %d sequences, %d tokens", k + 1, n, len(hidden), sum(h.shape[1] for h in hidden))
        del layer  # before the output head is read, so the two are never in memory together
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).requires_grad_(False)
        weights.load(norm, "model.norm.")
        head = weights[EMBED if config.tie_word_embeddings else LM_HEAD]
        for i, start in enumerate(starts):
            states = norm(hidden[i][0, start:])
            hidden[i] = None
            for j in range(0, len(states), POSITIONS):
                part = states[j : j + POSITIONS]
                logits = torch.empty(len(part), len(head))
                for r in range(0, len(head), HEAD_ROWS):
                    logits[:, r : r + HEAD_ROWS] = torch.nn.functional.linear(part, head[r : r + HEAD_ROWS].float())
                yield i, start + j, logits
            log.info("output head: sequence %d/%d", i + 1, len(starts))
    finally:
        weights.close()


def next_token_argmax(folder: Path, sequences: list[list[int]], starts: list[int]) -> list[list[int]]:
    """The greedy choice after each position from `starts[i]` to the end of `sequences[i]`."""
    out = [[] for _ in sequences]
    for i, _, logits in next_token_logits(folder, sequences, starts):
        out[i] += logits.argmax(-1).tolist()
    return out


def next_token_nll(folder: Path, sequences: list[list[int]], start: int) -> list[list[float]]:
    """Negative log-likelihood of every token of each sequence after position `start`, given those before it."""
    import torch

    out = [[] for _ in sequences]
    for i, position, logits in next_token_logits(folder, sequences, [start] * len(sequences)):
        targets = torch.tensor(sequences[i][position + 1 : position + 1 + len(logits)])
        logp = torch.log_softmax(logits[: len(targets)], dim=-1)
        out[i] += (-logp.gather(1, targets[:, None])[:, 0]).double().tolist()
    return out
