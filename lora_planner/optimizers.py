"""Optimizer state bytes, tensor by tensor.

Some optimizers keep state whose size depends on a tensor's shape (Adafactor's factored second
moment) or size (8-bit Adam keeps small tensors in fp32), so states are summed over the trainable
tensors rather than multiplied by a parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .architecture import Param
from .errors import PlanError

# bitsandbytes 8-bit optimizers: tensors with fewer elements than this keep 32-bit states
# (`min_8bit_size`), and 8-bit states are quantised blockwise with one fp32 absmax per block.
BNB_MIN_8BIT_SIZE = 4096
BNB_STATE_BLOCK = 256

OPTIMIZERS = {
    "adamw": "AdamW: first and second moment per parameter",
    "adamw-8bit": "bitsandbytes AdamW8bit: two 1-byte states plus an fp32 absmax per 256-value block",
    "sgd": "SGD without momentum: no state",
    "sgd-momentum": "SGD with momentum: one momentum buffer per parameter",
    "adafactor": "Adafactor (beta1=None): factored second moment, rows + columns per matrix",
}


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return name


def adamw_state_bytes(numel: int, state_bytes: int) -> int:
    """AdamW: 2 states (exp_avg, exp_avg_sq) x numel x bytes per state element.

    torch's per-tensor `step` counter is a CPU scalar unless `capturable`/`fused`, so it is left out.
    """
    return 2 * numel * state_bytes


def adamw_8bit_state_bytes(numel: int) -> int:
    """bitsandbytes AdamW8bit: 2 x (numel x 1 B + ceil(numel / 256) x 4 B absmax) per tensor.

    Tensors under 4,096 elements (`min_8bit_size`) keep two fp32 states instead: 2 x numel x 4 B.
    The shared 256-entry quantisation maps are counted once per optimizer, not here.
    """
    if numel < BNB_MIN_8BIT_SIZE:
        return 2 * numel * 4
    return 2 * (numel + math.ceil(numel / BNB_STATE_BLOCK) * 4)


def sgd_momentum_state_bytes(numel: int, state_bytes: int) -> int:
    """SGD with momentum: one momentum buffer, numel x bytes per state element."""
    return numel * state_bytes


def adafactor_state_bytes(shape: tuple[int, ...]) -> int:
    """Adafactor without first moment: a matrix (..., r, c) keeps a row vector (..., r) and a
    column vector (..., c) of second moments; a vector keeps a full second moment. 4 B each; plus
    `state["RMS"]`, the parameter's RMS as a 0-d fp32 tensor on the parameter's device: 4 B.

    Follows transformers 5.23's `Adafactor` with beta1=None (its default), which upcasts gradients
    and keeps its states in fp32 whatever the weights' dtype; `step` is a Python int (no bytes).
    """
    if len(shape) >= 2:
        lead = math.prod(shape[:-2])
        return lead * (shape[-2] + shape[-1]) * 4 + 4
    return math.prod(shape) * 4 + 4


def adafactor_temporary_bytes(shapes: Sequence[tuple[int, ...]], sixteen_bit: bool) -> int:
    """The most bytes transformers 5.23's `Adafactor.step` (beta1=None) holds beyond its states, going
    through the trainable tensors one at a time in the optimizer's order, all in fp32 (4 B):

    - `update = grad**2 + eps`: grad squared and the sum, 2n, while `update` still holds the previous
      tensor's update, n_prev;
    - a matrix (factored): `_approx_sq_grad` makes the row factor (..., r), the column factor (..., c)
      and their product, n, beside the old update, n: 2n + r + c;
    - `p.add_(-update)`: the negated copy beside the update, 2n (as the vector path's rsqrt, 2n);
    - 16-bit gradients and weights (no fp32 master copy): `grad.float()` and `p.float()`, n each,
      live through the tensor's whole update.

    max over tensors of 4 x (2n + max(n_prev, r + c if factored else 0)) (+ 2 x 4n in 16 bits).
    """
    most, previous = 0, 0
    for shape in shapes:
        n = math.prod(shape)
        factors = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else 0
        held = 4 * (2 * n + max(previous, factors)) + (8 * n if sixteen_bit else 0)
        most, previous = max(most, held), n
    return most


def optimizer_state_bytes(optimizer: str, params: Iterable[Param], state_bytes: int,
                          impl: str = "foreach") -> int:
    """Sum of one optimizer's state bytes over the trainable tensors (with fused AdamW's step
    counters, which live on the device: `adamw_step_counter_bytes`)."""
    check_optimizer(optimizer)
    params = tuple(params)
    total = adamw_step_counter_bytes(len(params), impl) if optimizer == "adamw" else 0
    for p in params:
        if optimizer == "adamw":
            total += adamw_state_bytes(p.numel, state_bytes)
        elif optimizer == "adamw-8bit":
            total += adamw_8bit_state_bytes(p.numel)
        elif optimizer == "sgd-momentum":
            total += sgd_momentum_state_bytes(p.numel, state_bytes)
        elif optimizer == "adafactor":
            total += adafactor_state_bytes(p.shape)
    return total



# Optimizers whose torch implementation has the fused / foreach / for-loop choice; the others run
# one implementation (bitsandbytes' in-place blockwise kernel, transformers' Adafactor loop).
TORCH_OPTIMIZERS = ("adamw", "sgd", "sgd-momentum")


def adamw_step_counter_bytes(tensors: int, impl: str) -> int:
    """torch AdamW's `step`: one fp32 scalar per parameter tensor, kept on the parameters' device
    only by the fused (or capturable) implementation; foreach and for-loop keep it in CPU memory.

    torch 2.13 `Adam._init_group`: `torch.zeros((), dtype=float32, device=p.device)` if fused, else
    `torch.tensor(0.0)` on the CPU. 4 B x tensors on the device when fused, else 0.
    """
    return 4 * tensors if impl == "fused" else 0


def optimizer_temporary_bytes(optimizer: str, impl: str, numels: Iterable[int], state_bytes: int) -> int:
    """The largest temporary the optimizer step allocates, with torch 2.13's defaults (no weight
    decay on SGD, no amsgrad, no maximize, lr a float).

    - AdamW foreach (`_multi_tensor_adam`): `torch._foreach_sqrt(exp_avg_sqs)` makes sqrt(v) for
      every trainable tensor at once: sum(numel) x state bytes;
    - AdamW for-loop (`_single_tensor_adam`): `(exp_avg_sq.sqrt() / bias_correction2_sqrt)` holds the
      square root and the quotient of one tensor at once: 2 x max(numel) x state bytes;
    - AdamW fused (`torch._fused_adamw_`): updates in place, 0;
    - SGD, with or without momentum, every implementation: `param.add_(grad)` and
      `buf.mul_().add_(grad)` in place, 0 (the momentum buffer is made on the first step only);
    - bitsandbytes 8-bit AdamW: its blockwise update kernel works in place, 0;
    - Adafactor: see `adafactor_temporary_bytes` (it needs the shapes; 0 here).
    """
    numels = tuple(numels)
    if optimizer != "adamw" or not numels:
        return 0
    if impl == "foreach":
        return sum(numels) * state_bytes
    if impl == "for-loop":
        return 2 * max(numels) * state_bytes
    return 0
