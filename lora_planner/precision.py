"""Precision conventions: how many bytes each model-state term takes per parameter.

Calculators disagree by 2x mostly because they silently pick different conventions. Each one is
named here, and the plan prints which it used.

| name      | weights | grads | fp32 master | Adam state (each of 2) | AdamW bytes per trainable param |
|-----------|---------|-------|-------------|------------------------|----------------------------------|
| fp32      | 4       | 4     | -           | 4                      | 16                               |
| amp       | 4       | 4     | -           | 4                      | 16 (16-bit compute, fp32 storage) |
| mixed     | 2       | 2     | 4           | 4                      | 16 (ZeRO paper, the default)     |
| bf16      | 2       | 2     | -           | 4                      | 12 ("840 GB for 70B" tables)     |
| pure-bf16 | 2       | 2     | -           | 2                      | 8 (model loaded in bf16)         |

Frozen weights take the weight width of the convention; under QLoRA the quantised layers are 4-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlanError


@dataclass(frozen=True)
class Precision:
    """A precision convention: bytes per weight, gradient, master copy and optimizer state value."""

    name: str
    weight_bytes: int  # per stored weight, trainable or frozen
    grad_bytes: int  # per gradient of a trainable weight
    master_bytes: int  # per fp32 master copy of a trainable weight (0: no master copy)
    state_bytes: int  # per optimizer state element (AdamW keeps two per trainable weight)
    compute: str  # dtype of matmuls
    summary: str


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", 4, 4, 0, 4, "fp32", "everything in fp32"),
        Precision("amp", 4, 4, 0, 4, "bf16",
                  "torch autocast: fp32 weights, grads and states; bf16 compute"),
        Precision("mixed", 2, 2, 4, 4, "bf16",
                  "16-bit weights and grads, fp32 master weights and optimizer states"),
        Precision("bf16", 2, 2, 0, 4, "bf16",
                  "16-bit weights and grads, fp32 optimizer states, no master copy"),
        Precision("pure-bf16", 2, 2, 0, 2, "bf16",
                  "weights, grads and optimizer states all bf16"),
    )
}
DEFAULT_PRECISION = "mixed"

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SAFETENSORS_DTYPE = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def get_precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise PlanError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}") from None


def weight_dtype(precision: Precision) -> str:
    """The dtype weights are stored in under a convention (what a checkpoint saves by default)."""
    return "fp32" if precision.weight_bytes == 4 else "bf16"
