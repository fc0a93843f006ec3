"""BOFT: OFT with butterfly factorisation: blocks of Cayley rotations, permuted between butterfly factors, then the
output rows scaled by boft_s; merged as (R @ W^T)^T * s. The permutations are applied by indexing, which gives
what peft's multiplications by 0/1 permutation matrices give without their in × in × factors memory."""

from __future__ import annotations

import torch

from .base import DROPOUT, FAN_IN_FAN_OUT_LINEAR, Tuner, usual_fields

FIELDS = {
    **usual_fields(),
    # block size and count are the stored tensor's shape; the factor count too, and it fixes the permutations
    "boft_block_size": "exact",
    "boft_block_num": "exact",
    "boft_n_butterfly_factor": "exact",
    "boft_dropout": DROPOUT,
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
}


def butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """peft's BOFTLayer.block_butterfly_perm: within each block of n / b, the r-sized groups at even positions
    first, then those at odd positions."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    block_size = int(n // b)
    indices = torch.arange(n)
    step = block_size / r
    initial = torch.arange(block_size)
    order = torch.empty(block_size, dtype=torch.long)
    for i, pos in enumerate(torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)), dim=0)):
        order[int(i * r) : int(i * r + r)] = initial[int(pos * r) : int(pos * r + r)]
    for i in range(0, n, block_size):
        indices[i : i + block_size] = indices[i : i + block_size][order]
    return indices


def rotation(boft_r: torch.Tensor, in_features: int) -> torch.Tensor:
    """peft's BOFT Linear.get_delta_weight: per factor P B P^T (B the block-diagonal Cayley rotations), chained."""
    factors, block_num, block_size, _ = boft_r.shape
    data = boft_r.reshape(factors * block_num, block_size, block_size)
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(block_size).unsqueeze(0).expand(factors * block_num, block_size, block_size)
    blocks = torch.linalg.solve(eye + skew, eye - skew, left=False).view(factors, block_num, block_size, block_size)
    total = None
    for i in range(factors):
        perm = butterfly_perm(in_features, int(block_num / (2**i)), int(block_size / 2), factors - 1)
        # P @ M @ P^T with P[i, perm[i]] = 1 is M[perm][:, perm]
        mat = torch.block_diag(*torch.unbind(blocks[i]))[perm][:, perm]
        total = mat if total is None else mat @ total
    return total


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's BOFT Linear.merge: (R @ W^T)^T, each output row times boft_s."""
    r = rotation(tensors["boft_R"].float(), weight.shape[1])
    return torch.mm(r, weight.t()).t() * tensors["boft_s"].float()


TUNER = Tuner("BOFT", FIELDS, ("boft_R", "boft_s"), merged_weight)
