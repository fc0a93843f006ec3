"""FourierFT: a few trained coefficients at seeded random frequencies; the delta is their 2-D inverse DFT's real part.

Memory: the dense spectrum and its complex inverse are the size of the weight (8 bytes per element as complex64),
and the seeded permutation of all out × in positions is 8 bytes per element too."""

from __future__ import annotations

import torch

from .base import FAN_IN_FAN_OUT_LINEAR, Tuner, usual_fields

FIELDS = {
    **usual_fields(),
    "n_frequency": "exact",  # each module's count is its spectrum's length
    "n_frequency_pattern": "exact",
    "scaling": "exact",
    "random_loc_seed": "exact",
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
}


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's FourierFTLayer: the frequencies are the first n of a permutation of all out × in positions drawn from
    random_loc_seed (the same for every module); delta = real(ifft2(dense spectrum)) * scaling."""
    out_features, in_features = weight.shape
    spectrum = tensors["fourierft_spectrum"].float()
    generator = torch.Generator().manual_seed(config.get("random_loc_seed", 777))
    positions = torch.randperm(out_features * in_features, generator=generator)[: spectrum.numel()]
    dense = torch.zeros(out_features, in_features)
    dense[positions // in_features, positions % in_features] = spectrum
    return weight + torch.fft.ifft2(dense).real * config.get("scaling", 150.0)


TUNER = Tuner("FOURIERFT", FIELDS, ("fourierft_spectrum",), merged_weight)
