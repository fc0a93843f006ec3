"""What merging one adapted tensor holds beside the base tensor as read, tuner by tuner: one formula per tuner,
each counting the tensors cpuforge.merge (lora.py, tuners/) has alive at once at its costliest moment.

Figures in bytes; `f32(k)` is k elements in f32, the dtype every merge computes in. `copy` is the weight's f32 copy
(`weight.float()`), which costs nothing where the base is stored in f32: torch returns the tensor itself. LoRA's
own figure counts that copy always, as the sizing has since the demo's plan was first made; it is kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


def f32(elements: int) -> int:
    return 4 * elements


@dataclass(frozen=True)
class Module:
    """One adapted weight as the merge meets it: its (out, in) shape, the bytes of its f32 copy (0 when the
    weight reaching the tuner is f32 already), the adapter's config and the module's adapter tensors' shapes
    (suffix -> shape; the tuner's shared tensors, VeRA's projections, under their shared names)."""

    out: int
    inp: int
    copy: int
    config: dict = field(default_factory=dict)
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.out * self.inp

    @property
    def k(self) -> int:
        return min(self.out, self.inp)


def lora(m: Module) -> int:
    """The f32 copy, the delta scale · B @ A and their sum (peft's get_delta_weight; B @ A and its scaled copy
    are alive together too, before the sum)."""
    return 3 * f32(m.n)


def dora(m: Module) -> int:
    """The delta, W + ΔW and its rows rescaled, at once (lora.dora_weight); the f32 copy is gone by then (it
    makes W + ΔW): LoRA's three tensors, counted as LoRA counts them."""
    return lora(m)


def gesdd_work(k: int) -> int:
    """LAPACK ?gesdd's workspace for a reduced SVD of a matrix whose smaller side is k (its LWORK for the
    JOBZ='S' paths: 4k² + 7k, the bidiagonal solver's 3k² + 4k and the k × k triangle it is copied to)."""
    return f32(4 * k * k + 7 * k)


def pissa(m: Module) -> int:
    """lora.residual_base's SVD (torch.linalg.svd, full_matrices=False): the copy, LAPACK's own copy of the
    matrix and its workspace, U (out × k) and Vh (k × in); then U and Vh stay while scale · B₀ @ A₀ and the
    residual W - that are made; then LoRA's merge on the residual (the residual, the delta and their sum)."""
    factors = f32(m.k * (m.out + m.inp))
    svd = m.copy + factors + max(f32(m.n) + gesdd_work(m.k), 2 * f32(m.n))
    return max(svd, 3 * f32(m.n))


def olora(m: Module) -> int:
    """lora.residual_base's QR (torch.linalg.qr, reduced): the copy, Q (out × k), R (k × in) and, while
    Householder's copy of the matrix is gone, scale · B₀ @ A₀ and the residual; then LoRA's merge on the residual."""
    return max(m.copy + f32(m.k * (m.out + m.inp)) + 2 * f32(m.n), 3 * f32(m.n))


def additive(m: Module) -> int:
    """A tuner that builds a dense delta and adds it (AdaLoRA, LoKr, VeRA, …): the copy, the delta being
    scaled (its product and the scaled product) or the delta and the sum."""
    return m.copy + 2 * f32(m.n)


def ia3(m: Module) -> int:
    """W * l: the copy and the product."""
    return m.copy + f32(m.n)


def loha(m: Module) -> int:
    """(w1_a @ w1_b) * (w2_a @ w2_b): both products and the Hadamard product, with the copy."""
    return m.copy + 3 * f32(m.n)


def glora(m: Module) -> int:
    """W + (W ⊙ A + B) with A and B low-rank products: W ⊙ A, B and their sum at once, with the copy."""
    return m.copy + 3 * f32(m.n)


def vera(m: Module) -> int:
    """The delta and the sum, with the copy; and the shared projections, read from the file for each module."""
    return additive(m) + sum(f32(math.prod(s)) for key, s in m.tensors.items() if key in ("vera_A", "vera_B"))


def oft(m: Module) -> int:
    """The block-diagonal rotation, in × in, and R @ Wᵀ beside the copy; then, those gone, the transposed result
    and the contiguous copy the finiteness check reads (merge.all_finite)."""
    return max(m.copy + f32(m.inp * m.inp) + f32(m.n), 2 * f32(m.n))


def boft(m: Module) -> int:
    """Per butterfly factor the block-diagonal rotation (in × in) and its rows then columns permuted, the
    product of the factors chained beside them; then the rotation, R @ Wᵀ and its rows scaled by boft_s."""
    factors = m.tensors.get("boft_R", (1,))[0]
    rotations = f32(m.inp * m.inp) * (2 if factors == 1 else 3)
    return m.copy + max(rotations, f32(m.inp * m.inp) + 2 * f32(m.n))


def hra(m: Module) -> int:
    """H (in × in) and, per reflection, H @ u uᵀ, twice it and H minus that (or, under apply_GS, I, 2 U Uᵀ and
    their difference): three in × in; then H and W @ H."""
    return m.copy + max(3 * f32(m.inp * m.inp), f32(m.inp * m.inp) + f32(m.n))


def c3a(m: Module) -> int:
    """peft's get_circulant_fast over in × in: the identity (f32) and its inverse FFT (complex64, 8 bytes an
    element), the contiguous copy of that FFT the batched matmul under einsum makes for BLAS, and einsum's product
    with the kernels' FFT (in × out complex); then that product and its forward FFT (in × out complex), whose real
    part, divided, and the sum follow when the product is gone. Measured at the 7B widths: 2.7 GB on down_proj."""
    circulant = f32(m.inp * m.inp) + 2 * 8 * m.inp * m.inp + 8 * m.n
    return m.copy + max(circulant, 2 * 8 * m.n)


def road(m: Module) -> int:
    """The rotation R, out × out, built as diag(first) plus diag(second) with half groups swapped (its diag and
    the indexed copy): three out × out; then R and R @ W."""
    return m.copy + max(3 * f32(m.out * m.out), f32(m.out * m.out) + f32(m.n))


def fourierft(m: Module) -> int:
    """The seeded permutation of all out × in positions (int64, kept by the slice of it that is used), the dense
    spectrum, its complex64 copy and the complex inverse FFT (8 bytes an element each), then its real part scaled
    beside them, with the copy."""
    return m.copy + 8 * m.n + f32(m.n) + 2 * 8 * m.n


# peft_type (LoRA by its initialisation or DoRA) -> the bytes merging one adapted weight holds beside it
WORKING_SET: dict[str, Callable[[Module], int]] = {
    "LORA": lora,
    "LORA+dora": dora,
    "LORA+pissa": pissa,
    "LORA+olora": olora,
    "IA3": ia3,
    "LOHA": loha,
    "GLORA": glora,
    "VERA": vera,
    "OFT": oft,
    "BOFT": boft,
    "HRA": hra,
    "C3A": c3a,
    "ROAD": road,
    "FOURIERFT": fourierft,
}


def working_set(kind: str, m: Module) -> int:
    """Bytes held beside the weight while `kind` (a WORKING_SET key or any other peft_type) merges into it."""
    return WORKING_SET.get(kind, additive)(m)
