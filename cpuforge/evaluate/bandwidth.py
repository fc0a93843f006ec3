"""Generation against the machine's memory bandwidth: how close a GGUF's tokens/s comes to the physical bound.

Decoding one token reads every weight once (the embeddings only where they are also the output
projection: otherwise one row of them) and the KV cache of the positions before it; tokens/s x those
bytes is the bandwidth generation reached. The bound is measured on the same machine, in the same job,
at the same thread count, by a read-only kernel the project builds (read_bandwidth.c: threads summing
their share of a buffer far larger than the caches). Their ratio tells "memory bus full" from "slow".
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from cpuforge.io.files import atomic_output
from cpuforge.io.gguf import read_header

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("read_bandwidth.c")
ROUNDS = 5


def build(out: Path) -> None:
    """The kernel, compiled by the machine's C compiler: plain -O3, since a read loop is bound by the memory,
    not by the vector width (measured alike with -march=native here), so one binary serves any node."""
    with atomic_output(out) as tmp:
        subprocess.run([os.environ.get("CC", "cc"), "-O3", "-pthread", "-o", str(tmp), str(SOURCE)], check=True)


def read_bandwidth(kernel: Path, threads: int, mib: int) -> float:
    """The best of ROUNDS reads of `mib` MiB by `threads` threads, in GB/s."""
    out = subprocess.run([str(kernel), str(mib), str(threads), str(ROUNDS)], check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    best = json.loads(out)["best_gbps"]
    log.info("%2d threads: read bandwidth %.1f GB/s (%d MiB, best of %d)", threads, best, mib, ROUNDS)
    return best


def bytes_per_token(gguf: Path, gen_tokens: int) -> dict[str, float]:
    """The bytes one generated token reads, on average over llama-bench's `gen_tokens` tokens from an empty
    cache: every tensor (the embeddings only when tied to the output), and the f16 K and V of the positions
    before it."""
    header = read_header(gguf)
    arch = header.fields["general.architecture"]
    layers, hidden, heads = (header.fields[f"{arch}.{key}"] for key in ("block_count", "embedding_length",
                                                                         "attention.head_count"))  # fmt: skip
    kv_heads = header.fields.get(f"{arch}.attention.head_count_kv") or heads
    tied = "output.weight" not in header.tensors
    weights = sum(t.n_bytes for name, t in header.tensors.items() if tied or name != "token_embd.weight")
    kv_per_position = layers * kv_heads * (hidden // heads) * 2 * 2
    kv = kv_per_position * (gen_tokens - 1) / 2
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def effective(runs: list[dict], per_token: float) -> None:
    """Each run's generation bandwidth (tg tokens/s x bytes per token) and its fraction of the read bandwidth
    measured at its thread count, added to the run."""
    for r in runs:
        r["tg_gbps"] = r["tg_tps"] * per_token / 1e9
        r["tg_bandwidth_fraction"] = r["tg_gbps"] / r["read_gbps"]
        log.info("%2d threads: generation reads %.1f GB/s, %.0f %% of the %.1f GB/s measured", r["threads"],
                 r["tg_gbps"], 100 * r["tg_bandwidth_fraction"], r["read_gbps"])  # fmt: skip
