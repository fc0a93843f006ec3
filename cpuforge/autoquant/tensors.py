"""The search's candidates made from tensors quantized once: each (tensor, type) kept in a file of its own,
shared by the uniform and listed files made with the search's importance matrix and by the mixes.

llama-quantize quantizes every matrix of the f16 GGUF each time it writes a file, while the candidates of
one search share most of their tensors: at the 1B shape, making three candidates that way took six times as
long as the KL runs that measured them. Here a matrix is quantized in a type once, by the function
llama-quantize calls (`ggml_quantize_chunk`, with the importance matrix as llama-quantize passes it, and
validated as it validates: the same bytes, tests/test_auto_quant.py), its rows shared out among the
threads; a candidate is then the f16 GGUF copied with those tensors in their recipe's types, its other
tensors as they are, and the keys llama-quantize sets (general.file_type, general.quantization_version,
quantize.imatrix.*)."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_VERSION, LlamaFileType

from cpuforge.autoquant import recipe
from cpuforge.autoquant.sensitivity import read_imatrix, read_rows
from cpuforge.io.files import atomic_output
from cpuforge.io.gguf import read_header, read_metadata
from cpuforge.io.provenance import copy_gguf_with_provenance
from cpuforge.llama.ggml import ggml_type, quantize

log = logging.getLogger(__name__)

CHUNK_WEIGHTS = 1 << 20  # the weights of one thread's share of a tensor: 4 MiB of f32 rows


class Tensors:
    """The matrices of the f16 GGUF `f16` quantized as the search asks, kept under `directory`."""

    def __init__(self, bin_dir: Path, f16: Path, imatrix: Path | None, directory: Path, threads: int):
        self.bin_dir, self.f16, self.directory, self.threads = bin_dir, f16, directory, threads
        self.header = read_header(f16).tensors
        self.weights = read_imatrix(imatrix) if imatrix else {}
        # the keys llama-quantize sets, read once; general.file_type is each mix's (write)
        self.keys = {"general.quantization_version": GGML_QUANT_VERSION}
        if imatrix is not None:  # as llama-quantize --imatrix records it
            chunks = read_metadata(imatrix, ["imatrix.chunk_count"]).get("imatrix.chunk_count")
            self.keys |= {"quantize.imatrix.file": os.fspath(imatrix),
                          "quantize.imatrix.entries_count": len(self.weights)}  # fmt: skip
            self.keys |= {"quantize.imatrix.chunks_count": int(chunks)} if chunks else {}
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, kind: str) -> Path:
        return self.directory / f"{name}.{kind.lower()}"

    def quantize(self, types: dict[str, str]) -> None:
        """Quantize every tensor of the mix `types` (name -> ggml type) not quantized in its type yet."""
        missing = [(name, kind) for name, kind in types.items() if not self.path(name, kind).exists()]
        started, weights = time.monotonic(), sum(self.header[name].n_elements for name, _ in missing)
        done = 0
        with open(self.f16, "rb") as f, ThreadPoolExecutor(self.threads) as pool:
            for i, (name, kind) in enumerate(missing, 1):
                self._quantize(pool, f, name, kind)
                done += self.header[name].n_elements
                if i % 16 == 0 or i == len(missing):
                    log.info("quantized %d/%d tensors (%.0f%% of %.2fG weights), %.0f s", i, len(missing),
                             100 * done / weights, weights / 1e9, time.monotonic() - started)  # fmt: skip

    def _quantize(self, pool: ThreadPoolExecutor, f, name: str, kind: str) -> None:
        t, k = self.header[name], ggml_type(kind)
        n_per_row, rows = t.shape
        step = max(1, CHUNK_WEIGHTS // n_per_row)

        def chunk(start: int) -> np.ndarray:
            return quantize(self.bin_dir, k, read_rows(f, t, np.arange(start, min(rows, start + step))),
                            self.weights.get(name))  # fmt: skip

        with atomic_output(self.path(name, kind)) as tmp, open(tmp, "wb") as out:
            for packed in pool.map(chunk, range(0, rows, step)):
                packed.tofile(out)

    def write(self, types: dict[str, str], out: Path, record: dict, qtype: str | None = None) -> None:
        """The f16 GGUF as `out`, the tensors of `types` in their types (quantized first where missing),
        `record` its provenance; `qtype`, the llama-quantize type it is made as (general.file_type), else the
        one whose type holds most of its bytes."""
        self.quantize(types)
        sizes = {name: self.path(name, kind).stat().st_size for name, kind in types.items()}
        base = qtype or recipe.base_type(types, sizes)
        keys = self.keys | {"general.file_type": int(LlamaFileType[f"MOSTLY_{base.upper()}"])}
        replace = {name: (ggml_type(kind), self.path(name, kind)) for name, kind in types.items()}
        copy_gguf_with_provenance(self.f16, out, "quantize", record, metadata=keys, replace=replace)
        recipe.check_written(out, types)
