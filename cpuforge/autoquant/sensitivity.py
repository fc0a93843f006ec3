"""How much each tensor loses in each candidate type, measured on the model's own data.

For a matrix W and the inputs x it sees, the error a type adds to its output is E|(Q(W) - W) x|^2; with
the importance matrix's mean squared input of each column (llama-imatrix on the task's training rows and
prose, never the held-out rows), that is sum_j imatrix_j * sum_i (Q(W) - W)_ij^2. Divided by the same sum
for W itself it is the tensor's relative output noise, comparable between tensors of any scale: the
figure llama.cpp PR #15550 allocates bits by. Q is ggml's own quantizer with the importance matrix, as
llama-quantize runs it (cpuforge.llama.ggml), on an evenly spaced sample of each tensor's rows: as many
rows as make `sample_weights` weights (at least MIN_ROWS), so the cost is the same per matrix at any width
and the figure rests on as many blocks; the tensors are shared out among the threads.

A tensor's row length decides which types fit it (whole blocks: 32 weights for the legacy types and
iq4_nl, 256 for the K- and the other I-types); a type that needs an importance matrix is offered only to
tensors the matrix covers, as llama-quantize refuses it for the others.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output
from cpuforge.io.gguf import TensorInfo, open_gguf, read_header, row_bytes
from cpuforge.llama.ggml import fits, ggml_type, requires_imatrix, round_trip, type_name
from cpuforge.llama.quant import IMATRIX_TENSOR_TYPES

log = logging.getLogger(__name__)

COLUMNS = ("tensor", "type", "bytes", "error")
MIN_ROWS = 16


@dataclass(frozen=True)
class Option:
    """One type for one tensor: the bytes the tensor takes in it and its relative output noise."""

    type: str
    bytes: int
    error: float


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """The tensors llama-quantize quantizes in a LLaMA: every matrix; the norms stay f32."""
    return name.endswith(".weight") and len(shape) == 2


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """llama-imatrix's GGUF as each matrix's mean squared input per column."""
    reader = open_gguf(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    weights = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            matrix = name.removesuffix(".in_sum2")
            counts = tensors.get(matrix + ".counts")
            if counts is None or counts.ravel()[0] <= 0:
                raise InputError(f"{path}: {matrix} has sums of squares but no count of the rows behind them.")
            weights[matrix] = (sums.reshape(-1) / counts.ravel()[0]).astype(np.float32)
    if not weights:
        raise InputError(f"{path}: no importance-matrix entries (llama-imatrix's *.in_sum2 tensors).")
    return weights


def needs_imatrix(bin_dir: Path, kind: GGMLQuantizationType, tensor: str) -> bool:
    """Whether ggml cannot round the type without an importance matrix, or llama-quantize will not write it
    into this tensor without one (any matrix but the embeddings and the output)."""
    if requires_imatrix(bin_dir, kind):
        return True
    return type_name(kind).lower() in IMATRIX_TENSOR_TYPES and tensor not in ("token_embd.weight", "output.weight")


def rows_for(n_per_row: int, rows: int, weights: int) -> int:
    """How many of a tensor's rows make `weights` weights: at least MIN_ROWS, at most all (all when 0)."""
    if weights <= 0:
        return rows
    return min(rows, max(MIN_ROWS, -(-weights // n_per_row)))


def sample_rows(rows: int, limit: int) -> np.ndarray:
    """`limit` row indices spread evenly over the tensor (all of them when it has no more)."""
    if limit <= 0 or rows <= limit:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, limit).round().astype(np.int64))


def relative_error(w: np.ndarray, q: np.ndarray, weights: np.ndarray | None) -> float:
    col = np.ones(w.shape[1], dtype=np.float64) if weights is None else weights.astype(np.float64)
    noise = ((q.astype(np.float64) - w) ** 2).sum(axis=0) @ col
    signal = (w.astype(np.float64) ** 2).sum(axis=0) @ col
    return float(noise / signal) if signal > 0 else 0.0


def measure(bin_dir: Path, gguf: Path, imatrix: Path | None, types: list[str], sample_weights: int,
            threads: int = 1) -> dict[str, list[Option]]:  # fmt: skip
    """Every quantizable tensor of the f16 `gguf` with the options it has among `types` (ggml type names),
    `threads` tensors at a time (ggml rounds with the GIL released)."""
    kinds = [ggml_type(t) for t in types]
    weights = read_imatrix(imatrix) if imatrix else {}
    tensors = [t for t in read_header(gguf).tensors.values() if quantizable(t.name, t.shape)]
    table, started = {}, time.monotonic()
    with open(gguf, "rb") as f, ThreadPoolExecutor(threads) as pool:
        def options(t: TensorInfo) -> list[Option]:
            limit = rows_for(t.shape[0], t.shape[1], sample_weights)
            return tensor_options(bin_dir, f, t, weights.get(t.name), kinds, limit, imatrix)

        for i, (t, found) in enumerate(zip(tensors, pool.map(options, tensors), strict=True), 1):
            table[t.name] = found
            if i % 16 == 0 or i == len(tensors):
                log.info("sensitivity: %d/%d tensors, %.0f s", i, len(tensors), time.monotonic() - started)
    return table


def read_rows(f, t: TensorInfo, picked: np.ndarray) -> np.ndarray:
    """Rows `picked` of tensor `t` (f16, bf16 or f32) as float32, read from the file rather than mapped, so
    the process holds only them (a mapped row brings its neighbours into the resident set)."""
    n_per_row, row = t.shape[0], t.n_bytes // t.shape[1]
    raw = b"".join(os.pread(f.fileno(), row, t.offset + int(r) * row) for r in picked)
    data = np.frombuffer(raw, dtype=np.uint8).reshape(len(picked), row)
    return dequantize(data, ggml_type(t.type)).reshape(len(picked), n_per_row).astype(np.float32)


def tensor_options(bin_dir: Path, f, t: TensorInfo, imat: np.ndarray | None, kinds: list[GGMLQuantizationType], limit: int,
                   imatrix: Path | None) -> list[Option]:  # fmt: skip
    """One tensor's options: each type that fits it, with its bytes and its relative output noise."""
    n_per_row, rows = t.shape
    w = read_rows(f, t, sample_rows(rows, limit))
    if imat is not None and imat.size != n_per_row:
        raise InputError(f"{imatrix}: {t.name} has {imat.size} weights per row, the model {n_per_row}.")
    options = []
    for kind in kinds:
        if not fits(kind, n_per_row) or (imat is None and needs_imatrix(bin_dir, kind, t.name)):
            continue
        q = round_trip(bin_dir, kind, w, imat)
        options.append(Option(type_name(kind), rows * row_bytes(kind, n_per_row), relative_error(w, q, imat)))
    if not options:
        raise InputError(f"{t.name} (rows of {n_per_row}) fits none of auto_quant.types "
                         f"{[type_name(k) for k in kinds]}.")  # fmt: skip
    return options


def write_table(path: Path, table: dict[str, list[Option]]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        out = csv.writer(f, delimiter="\t", lineterminator="\n")
        out.writerow(COLUMNS)
        for name, options in table.items():
            for o in options:
                out.writerow([name, o.type, o.bytes, f"{o.error:.6e}"])


def read_table(path: Path) -> dict[str, list[Option]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise InputError(f"{path}: not a sensitivity table (columns {', '.join(COLUMNS)}).")
    table: dict[str, list[Option]] = {}
    for r in rows:
        table.setdefault(r["tensor"], []).append(Option(r["type"], int(r["bytes"]), float(r["error"])))
    return table
