"""OFT: the weight's input side is rotated by a block-diagonal orthogonal matrix, each block the Cayley transform
of a trained skew-symmetric matrix (its upper triangle stored); merged as W @ R^T."""

from __future__ import annotations

import math

import torch

from .base import DROPOUT, FAN_IN_FAN_OUT_LINEAR, Tuner, usual_fields

FIELDS = {
    **usual_fields(),
    # r, oft_block_size and block_share fix the blocks' count and size, which the stored tensor's shape gives
    "r": "exact",
    "oft_block_size": "exact",
    "block_share": "exact",
    "coft": "exact",
    "eps": "exact",
    "use_cayley_neumann": "exact",
    "num_cayley_neumann_terms": "exact",
    "module_dropout": DROPOUT,
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
}


def skew(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """Skew-symmetric blocks from their strict upper triangles, row-major (torch.triu_indices' order)."""
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    matrix = torch.zeros(vec.shape[0], block_size, block_size)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT's constraint (peft's OFTRotationModule._project_batch): each block pulled into an eps-ball around 0."""
    q = skew(vec, block_size)
    eps = eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    q = torch.where((norm <= eps).bool(), q, eps * (q / norm))
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    return q[:, rows, cols]


def cayley(vec: torch.Tensor, block_size: int, neumann: bool, terms: int) -> torch.Tensor:
    """peft's _cayley_batch: (I + Q)(I - Q)^-1 exactly, or its Neumann series I + 2Q + 2Q² + … + Q^(terms-1)."""
    q = skew(vec, block_size)
    if not neumann:
        eye = torch.eye(block_size).unsqueeze(0).expand(q.shape[0], block_size, block_size)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = torch.eye(block_size).repeat(q.shape[0], 1, 1)
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            power = torch.bmm(power, q)
            r.add_(power)
    return r


def block_size_of(n_elements: int) -> int:
    """The block size b whose strict upper triangle has n_elements = b(b-1)/2 entries."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    if b * (b - 1) // 2 != n_elements:
        raise ValueError(f"oft_R.weight rows have {n_elements} entries, not the upper triangle of a square block")
    return b


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's OFT Linear.merge: W ← (R @ W^T)^T, R the block-diagonal rotation (one block repeated under
    block_share, in_features / block_size blocks in all)."""
    vec = tensors["oft_R.weight"].float()
    b = block_size_of(vec.shape[1])
    if config.get("coft", False):
        vec = project(vec, b, config.get("eps", 6e-5))
    blocks = cayley(vec, b, config.get("use_cayley_neumann", True), config.get("num_cayley_neumann_terms", 5))
    rank = weight.shape[1] // b
    rotation = torch.block_diag(*[blocks[0 if blocks.shape[0] == 1 else i] for i in range(rank)])
    return torch.mm(rotation, weight.t()).t()


TUNER = Tuner("OFT", FIELDS, ("oft_R.weight",), merged_weight)
