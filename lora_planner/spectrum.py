"""The spectrum of a low-rank update, and how many of its directions are worth keeping.

A LoRA layer adds ΔW = s·B·A to a frozen weight, with B (d, r), A (r, k) and the scaling
s = alpha/r (or alpha/sqrt(r) with rsLoRA). ΔW is d x k but has rank at most r, so its singular
values come from r x r work: with the thin QR factorisations B = Q_B R_B and Aᵀ = Q_A R_A,

    ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ,

and Q_B, Q_A have orthonormal columns, so the singular values of ΔW are those of the r x r core
s R_B R_Aᵀ, and its singular vectors are Q_B U and Q_A V for the core's SVD U Σ Vᵀ. Nothing of
size d x k is ever formed: the largest tensors are the factors themselves (in float64).

A direction's *energy* is its squared singular value; the energies sum to ||ΔW||_F². The best
rank-k approximation (Eckart-Young) keeps the top k directions, and its relative Frobenius error
is sqrt(sum of the dropped energies / total energy).

torch is imported inside the functions that need it; the rest is plain Python on lists of floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import PlanError

ENERGY_LEVELS = (0.9, 0.95, 0.99)
CRITERIA = ("rank", "energy", "fro", "sv_ratio")
DENSE_FLOAT64_LIMIT = 2**22  # entries; a larger dense update is decomposed in float32
# Shares are compared with this slack, so that a share of exactly 1.0 computed as 0.9999999999999998
# still counts as all of the energy.
_SLACK = 1e-12


def factored_svd(B, A, scaling: float = 1.0):
    """The thin SVD of ΔW = scaling·B·A from its factors: (U (d, q), S (q,), Vh (q, k)), q = min(r, d, k).

    QR of B and of Aᵀ, then the SVD of the small core (see the module docstring). Computed in
    float64, so bf16 or fp32 factors lose nothing to the arithmetic. S is descending.
    """
    import torch

    B = B.detach().to(torch.float64)  # (d, r)
    A = A.detach().to(torch.float64)  # (r, k)
    q_b, r_b = torch.linalg.qr(B)  # (d, min(d, r)), (min(d, r), r)
    q_a, r_a = torch.linalg.qr(A.T)  # (k, min(k, r)), (min(k, r), r)
    core = scaling * (r_b @ r_a.T)  # (min(d, r), min(k, r))
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T  # (d, q), (q,), (q, k)


def factored_singular_values(B, A, scaling: float = 1.0) -> list[float]:
    """The singular values of scaling·B·A, descending, from the r x r core alone."""
    import torch

    B = B.detach().to(torch.float64)
    A = A.detach().to(torch.float64)
    r_b = torch.linalg.qr(B, mode="r").R  # (min(d, r), r)
    r_a = torch.linalg.qr(A.T, mode="r").R  # (min(k, r), r)
    return torch.linalg.svdvals(scaling * (r_b @ r_a.T)).tolist()


def dense_singular_values(delta) -> list[float]:
    """Singular values of a dense update (a full fine-tune's W_after - W_before), descending.

    A weight of more than two dimensions (a convolution) is read as (out, everything else)."""
    import torch

    delta = delta.detach()
    if delta.dim() > 2:
        delta = delta.reshape(delta.shape[0], -1)
    # float64 where it is cheap; a large matrix (an 8B model's MLP) stays in float32, whose singular
    # values are exact to ~1e-7 of σ1, far below any energy share that matters.
    dtype = torch.float64 if delta.numel() <= DENSE_FLOAT64_LIMIT else torch.float32
    return torch.linalg.svdvals(delta.to(dtype)).tolist()


def cumulative_energy(singular_values: Sequence[float]) -> list[float]:
    """Share of ||ΔW||_F² held by the top k directions, for k = 1..len: cumsum(σ²) / sum(σ²).

    A zero update has no energy to share: every entry is 1.0 (nothing is lost by dropping it)."""
    energies = [s * s for s in singular_values]
    total = math.fsum(energies)
    if total == 0.0:
        return [1.0] * len(energies)
    shares, running = [], 0.0
    for e in energies:
        running += e
        shares.append(min(running / total, 1.0))
    return shares


def energy_rank(singular_values: Sequence[float], level: float) -> int:
    """The fewest directions that hold `level` of the energy: min k with cumsum(σ²)_k >= level·sum(σ²).

    0 for an update of no energy (no direction holds anything)."""
    if not 0.0 < level <= 1.0:
        raise PlanError(f"an energy share must be in (0, 1], got {level}")
    if math.fsum(s * s for s in singular_values) == 0.0:
        return 0
    for k, share in enumerate(cumulative_energy(singular_values), start=1):
        if share >= level - _SLACK:
            return k
    return len(singular_values)


def frobenius_error(singular_values: Sequence[float], keep: int) -> float:
    """Relative Frobenius error of the best rank-`keep` approximation (Eckart-Young):
    sqrt(sum_{i > keep} σ_i²) / sqrt(sum_i σ_i²); 0 for a zero update."""
    total = math.fsum(s * s for s in singular_values)
    if total == 0.0:
        return 0.0
    dropped = math.fsum(s * s for s in singular_values[keep:])
    return math.sqrt(dropped / total)


@dataclass(frozen=True)
class Criterion:
    """How many directions to keep in each layer, after kohya-ss's `resize_lora.py`:

    - `rank`: a fixed rank R (never more than the layer has);
    - `energy`: the fewest directions holding a share F of sum σ² (cumulative energy);
    - `fro`: the fewest holding a share F of the Frobenius norm, sqrt(cumsum σ²) / ||ΔW||_F
      (the same as `energy` at F²);
    - `sv_ratio`: every direction with σ_i >= σ_1 / X (kohya's `sv_ratio`).

    A dynamic criterion gives each layer its own rank; at least one direction is always kept.
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in CRITERIA:
            raise PlanError(f"unknown criterion {self.kind!r}; choose one of {', '.join(CRITERIA)}")
        if self.kind == "rank" and (self.value < 1 or self.value != int(self.value)):
            raise PlanError(f"--rank must be a positive integer, got {self.value:g}")
        if self.kind in ("energy", "fro") and not 0.0 < self.value <= 1.0:
            raise PlanError(f"--{self.kind} must be a share in (0, 1], got {self.value:g}")
        if self.kind == "sv_ratio" and self.value < 1.0:
            raise PlanError(f"--sv-ratio must be at least 1 (σ_1 / σ_i), got {self.value:g}")

    @property
    def dynamic(self) -> bool:
        return self.kind != "rank"

    def describe(self) -> str:
        return {
            "rank": f"rank {int(self.value)} in every layer",
            "energy": f"the fewest directions holding {self.value:.4g} of each layer's energy (sum σ²)",
            "fro": f"the fewest directions holding {self.value:.4g} of each layer's Frobenius norm",
            "sv_ratio": f"every direction with σ >= σ_1 / {self.value:g}",
        }[self.kind]

    def keep(self, singular_values: Sequence[float]) -> int:
        """The number of directions this criterion keeps for one layer: 1 <= k <= len(σ)."""
        n = len(singular_values)
        if self.kind == "rank":
            k = int(self.value)
        elif self.kind == "energy":
            k = energy_rank(singular_values, self.value)
        elif self.kind == "fro":
            k = energy_rank(singular_values, self.value**2)
        else:
            floor = singular_values[0] / self.value if n else 0.0
            k = sum(1 for s in singular_values if s > 0 and s >= floor * (1 - _SLACK))
        return max(1, min(k, n))
