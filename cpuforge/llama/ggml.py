"""ggml's own quantizers and dequantizers, called through ctypes from the pinned build's libggml-base.

llama-quantize quantizes every row of a tensor with `ggml_quantize_chunk`; calling the same function on a
sample of rows gives, in milliseconds, the exact rounding a type would give those rows in the written file
(the importance matrix weighting it as llama-quantize's --imatrix does)."""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from cpuforge.errors import InputError
from cpuforge.io.gguf import row_bytes

_FLOATS = ctypes.POINTER(ctypes.c_float)


def ggml_type(name: str) -> GGMLQuantizationType:
    """A ggml tensor type by its name, in any case (`q4_k`, `Q4_K`)."""
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise InputError(f"{name!r} is not a ggml tensor type.") from None


def type_name(kind: GGMLQuantizationType) -> str:
    """ggml's own spelling, as llama-quantize --tensor-type and the GGUF header name it: q4_K, iq2_xxs, f16."""
    name = kind.name.lower()
    return name[:-1] + "K" if name.endswith("_k") else name


def fits(kind: GGMLQuantizationType, n_per_row: int) -> bool:
    """Whether a row of `n_per_row` weights is whole blocks of the type: llama-quantize falls back to
    another type otherwise."""
    return n_per_row % GGML_QUANT_SIZES[kind][0] == 0


@cache
def _lib(bin_dir: str) -> ctypes.CDLL:
    path = Path(bin_dir) / "libggml-base.so"
    if not path.is_file():
        raise InputError(f"{bin_dir}: no libggml-base.so (build llama.cpp with `snakemake -c2 llama_cpp`).")
    lib = ctypes.CDLL(os.fspath(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, _FLOATS, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, _FLOATS]  # fmt: skip
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return lib


def requires_imatrix(bin_dir: str | os.PathLike, kind: GGMLQuantizationType) -> bool:
    return bool(_lib(os.fspath(bin_dir)).ggml_quantize_requires_imatrix(int(kind)))


def quantize(bin_dir: str | os.PathLike, kind: GGMLQuantizationType, rows: np.ndarray,
             imatrix: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """`rows` (float32, n x n_per_row) quantized to `kind` by ggml as llama-quantize quantizes them with
    `imatrix` (one weight per column, or None), and validated as it validates them: the packed bytes."""
    lib = _lib(os.fspath(bin_dir))
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, n_per_row = rows.shape
    if not fits(kind, n_per_row):
        raise ValueError(f"a row of {n_per_row} is not whole blocks of {type_name(kind)}")
    if imatrix is None and lib.ggml_quantize_requires_imatrix(int(kind)):
        raise ValueError(f"{type_name(kind)} needs an importance matrix")  # ggml would abort the process
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    packed = np.empty(n * row_bytes(kind, n_per_row), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(kind), rows.ctypes.data_as(_FLOATS), packed.ctypes.data, 0, n, n_per_row,
                            None if weights is None else weights.ctypes.data_as(_FLOATS))  # fmt: skip
    if not lib.ggml_validate_row_data(int(kind), packed.ctypes.data, packed.nbytes):
        raise ValueError(f"ggml's {type_name(kind)} rounding gave invalid blocks (a weight or scale not finite)")
    return packed


def round_trip(bin_dir: str | os.PathLike, kind: GGMLQuantizationType, rows: np.ndarray,
               imatrix: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """`rows` (float32, n x n_per_row) quantized to `kind` by ggml, as llama-quantize would with `imatrix`
    (one weight per column, or None), and read back as float32."""
    packed = quantize(bin_dir, kind, rows, imatrix)
    lib = _lib(os.fspath(bin_dir))
    return _dequantize(lib, kind, packed, rows.size).reshape(rows.shape)


def _dequantize(lib: ctypes.CDLL, kind: GGMLQuantizationType, packed: np.ndarray, count: int) -> np.ndarray:
    out = np.empty(count, dtype=np.float32)
    to_float = getattr(lib, f"dequantize_row_{type_name(kind)}")
    to_float.restype = None
    to_float.argtypes = [ctypes.c_void_p, _FLOATS, ctypes.c_int64]
    to_float(packed.ctypes.data, out.ctypes.data_as(_FLOATS), count)
    return out
