"""C3A: the delta is a block-circulant matrix, each block the circular convolution by a trained kernel.

Memory: the circulant is built from an identity of in × in (as peft builds it) and its complex FFT, so a module
needs about three times its in × in × 8 bytes beside the weight."""

from __future__ import annotations

import torch

from .base import Tuner, usual_fields

FIELDS = {
    **usual_fields(lacks="exclude_modules"),
    "block_size": "exact",  # each module's block size is its kernel's last dimension
    "block_size_pattern": "exact",
}


def circulant(kernel: torch.Tensor) -> torch.Tensor:
    """peft's c3a get_circulant_fast: the (m·b) × (n·b) block-circulant matrix of an m × n × b kernel."""
    _, n, b = kernel.shape
    x = torch.eye(n * b).reshape(n * b, n, b)
    x = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(x), torch.fft.fft(kernel))
    return torch.fft.fft(x).real.flatten(start_dim=1).T


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's C3ALayer.get_delta_weight: the circulant over in_features, added to the weight."""
    return weight + circulant(tensors["c3a_kernel"].float()) / weight.shape[-1]


TUNER = Tuner("C3A", FIELDS, ("c3a_kernel",), merged_weight)
