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
    # bitsandbytes' paged optimizers, as transformers 5.25's Trainer makes them for `optim`
    # paged_adamw_8bit, paged_adamw_32bit, paged_lion_8bit, paged_lion_32bit (`_get_bitsandbytes_optimizer`:
    # bnb AdamW / Lion with optim_bits 8 or 32, is_paged=True): the large states in CUDA unified
    # memory, outside the allocator (`paged_state_split`)
    "paged-adamw-8bit": "bitsandbytes PagedAdamW8bit: AdamW8bit's states, the large ones paged",
    "paged-adamw-32bit": "bitsandbytes PagedAdamW32bit: two fp32 states, the large ones paged",
    "paged-lion-8bit": "bitsandbytes PagedLion8bit: one 1-byte state + absmax, the large ones paged",
    "paged-lion-32bit": "bitsandbytes PagedLion32bit: one fp32 state, the large ones paged",
}
PAGED_OPTIMIZERS = ("paged-adamw-8bit", "paged-adamw-32bit", "paged-lion-8bit", "paged-lion-32bit")
# bitsandbytes `Optimizer8bit.get_state_buffer`: `if not self.is_paged or p.numel() < 1e5` the state
# buffer is an ordinary device tensor; only larger ones come from `F.get_paged` (unified memory)
BNB_PAGED_MIN = 100_000


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


def paged_state_split(optimizer: str, numel: int) -> tuple[int, int]:
    """(bytes in the device allocator, bytes in CUDA unified memory) of one tensor's states under a
    bitsandbytes paged optimizer, read from bitsandbytes 0.50.1 `optim/optimizer.py`:

    - `init_state`: AdamW keeps two state buffers (`Optimizer2State`), Lion one (`Optimizer1State`);
      8-bit ones are uint8 (1 B) unless numel < `min_8bit_size` (4,096), then fp32 (4 B), as 32-bit
      ones are; an 8-bit state adds an fp32 absmax per 256-value block (`torch.zeros((blocks,),
      device=p.device)`: never paged);
    - `get_state_buffer`: a state buffer is paged (`F.get_paged`, `cget_managed_ptr`) when numel
      >= 100,000, else an ordinary `torch.zeros_like` on the device.

    The paged bytes are not in the caching allocator (`torch.cuda.max_memory_allocated`); the driver
    counts them while resident (nvidia-smi) and evicts them to host memory under pressure.
    """
    states = 2 if optimizer.startswith("paged-adamw") else 1
    eight_bit = optimizer.endswith("8bit") and numel >= BNB_MIN_8BIT_SIZE
    buffers = states * numel * (1 if eight_bit else 4)
    absmax = states * math.ceil(numel / BNB_STATE_BLOCK) * 4 if eight_bit else 0
    if numel < BNB_PAGED_MIN:
        return buffers + absmax, 0
    return absmax, buffers


def paged_state_bytes(optimizer: str, numels: Iterable[int]) -> int:
    """The paged part of `paged_state_split` summed over the trainable tensors (0 for any other
    optimizer)."""
    if optimizer not in PAGED_OPTIMIZERS:
        return 0
    return sum(paged_state_split(optimizer, n)[1] for n in numels)


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
    """Sum of one optimizer's state bytes in the device allocator over the trainable tensors (with
    fused AdamW's step counters, which live on the device: `adamw_step_counter_bytes`; a paged
    optimizer's paged states are not among them: `paged_state_bytes`)."""
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
        elif optimizer in PAGED_OPTIMIZERS:  # the device part; the paged part is `paged_state_bytes`
            total += paged_state_split(optimizer, p.numel)[0]
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
    - bitsandbytes 8-bit AdamW and the paged optimizers: their update kernels work in place, 0;
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
