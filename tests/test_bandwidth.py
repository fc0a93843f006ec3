"""Generation against the memory bus: the read-bandwidth kernel the workflow builds, and the bytes a generated
token reads (cpuforge.evaluate.bandwidth)."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers.llama import convert
from helpers.models import make_tiny_llama

from cpuforge.evaluate.bandwidth import ROUNDS, build, bytes_per_token, read_bandwidth
from cpuforge.io.gguf import read_header


def test_the_kernel_reads_its_buffer_at_every_thread_count(tmp_path):
    kernel = tmp_path / "read_bandwidth"
    build(kernel)
    for threads in (1, 2):
        out = json.loads(subprocess.run([str(kernel), "32", str(threads), "3"], check=True, capture_output=True,
                                        text=True).stdout)  # fmt: skip
        assert out["threads"] == threads and out["mib"] == 32 and len(out["rounds_gbps"]) == 3
        assert out["best_gbps"] == max(out["rounds_gbps"]) > 0
    assert read_bandwidth(kernel, 1, 32) > 0 and ROUNDS == 5
    refused = subprocess.run([str(kernel), "0", "1", "1"], capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "must be positive" in refused.stderr


@pytest.mark.llama
@pytest.mark.parametrize("tied", [False, True])
def test_a_token_reads_every_weight_once_and_the_cache_before_it(llama_bin, tmp_path, tied):
    """Untied, the embeddings are a lookup of one row, left out; tied, they are the output projection, read
    whole. The KV cache: f16 K and V of every layer, for the positions before each token, averaged."""
    gguf = convert(make_tiny_llama(tmp_path / "m", tie_word_embeddings=tied), tmp_path / "f16.gguf")
    tensors = read_header(gguf).tensors
    assert ("output.weight" in tensors) is not tied
    every = sum(t.n_bytes for t in tensors.values())
    weights = every if tied else every - tensors["token_embd.weight"].n_bytes
    # 2 layers, 2 KV heads of 32: 2 x 2 x 32 x (K, V) x 2 bytes per position; 8 tokens see 3.5 before on average
    per_token = bytes_per_token(gguf, 8)
    assert per_token == {"weights": weights, "kv_cache": 2 * 2 * 32 * 2 * 2 * 3.5, "total": weights + 1792.0}
