"""Model-state memory, one pure function per term.

Each function returns a `Term`: the bytes, and the formula with the numbers put in, which is what
`--explain` prints. Nothing here rounds: bytes are ints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .architecture import Param
from .optimizers import (
    BNB_PAGED_MIN,
    OPTIMIZERS,
    PAGED_OPTIMIZERS,
    adamw_step_counter_bytes,
    optimizer_state_bytes,
    paged_state_bytes,
)
from .precision import Precision
from .quant import check_quant, dequant_transient, nf4_bytes, torchao_nf4_bytes


@dataclass(frozen=True)
class Term:
    """A named number of bytes and the formula, with its numbers, that gives it."""

    name: str
    bytes: int
    formula: str


def _n(x: int) -> str:
    return f"{x:,}"


def dense_weight_bytes(name: str, numel: int, bytes_per: int, what: str) -> Term:
    """Weights stored densely: numel x bytes per element."""
    return Term(name, numel * bytes_per, f"{_n(numel)} {what} x {bytes_per} B = {_n(numel * bytes_per)} B")


def quantized_weight_bytes(params: Iterable[Param], double_quant: bool, backend: str = "bnb",
                           dtype_bytes: int = 2) -> Term:
    """QLoRA's 4-bit base: the sum over each quantised weight tensor of `nf4_bytes` (bitsandbytes) or
    `torchao_nf4_bytes` (torchao, always double-quantised, its constants in the weight's dtype)."""
    params = tuple(params)
    numel = sum(p.numel for p in params)
    if backend == "torchao":
        total = sum(torchao_nf4_bytes(p.numel, dtype_bytes) for p in params)
        how = f"torchao NF4Tensor, scalers double-quantised, constants in {dtype_bytes} B"
    else:
        total = sum(nf4_bytes(p.numel, double_quant) for p in params)
        how = f"bitsandbytes NF4 {'with' if double_quant else 'without'} double quantisation"
    per = total / numel if numel else 0.0
    return Term(
        "weights_nf4", total,
        f"{_n(numel)} weights in {len(params)} linear layers as {how} "
        f"(0.5 B + block constants, {per:.4f} B each) = {_n(total)} B",
    )


def dequant_term(setup, numels: list[int], precision: Precision) -> Term:
    """QLoRA's dequantisation transient: the most one 4-bit matmul holds to rebuild its weight, for the
    largest quantised weight (`quant.dequant_transient`); the model is loaded in the precision's
    weight dtype, so that is the dtype bitsandbytes dequantises into first."""
    _, compute, _ = check_quant(setup.quant_backend, setup.bnb_version, setup.bnb_compute_dtype,
                                precision.weight_bytes)
    load = precision.weight_bytes
    total = dequant_transient(setup.quant_backend, numels, compute, load)
    largest = max(numels, default=0)
    if setup.quant_backend == "torchao":
        how = (f"torchao get_original_weight (eager): 8 B int64 codes + 3 x {load} B halves, scaled halves "
               f"and stacked weight + scalers, per weight")
    elif compute != load:
        how = f"bitsandbytes dequantize_4bit in the load dtype ({load} B) then .to(compute, {compute} B)"
    else:
        how = f"bitsandbytes dequantize_4bit to the compute dtype, {compute} B per weight"
    return Term("dequant_transient", total,
                f"{how}; largest 4-bit weight {_n(largest)} values = {_n(total)} B")


def gradient_bytes(trainable: int, precision: Precision) -> Term:
    """Gradients: one per trainable parameter, trainable x grad bytes. Frozen weights get none."""
    g = precision.grad_bytes
    return Term("gradients", trainable * g,
                f"{_n(trainable)} trainable x {g} B ({precision.name}) = {_n(trainable * g)} B")


def master_weight_bytes(trainable: int, precision: Precision) -> Term:
    """fp32 master weights: trainable x 4 B under `mixed`, none under the other conventions."""
    m = precision.master_bytes
    if not m:
        return Term("master_weights", 0, f"no fp32 master copy under {precision.name}")
    return Term("master_weights", trainable * m,
                f"{_n(trainable)} trainable x {m} B = {_n(trainable * m)} B")


def optimizer_bytes(optimizer: str, params: Iterable[Param], precision: Precision,
                    impl: str = "foreach") -> Term:
    """Optimizer states summed over the trainable tensors (see `optimizers`); fused AdamW adds its
    per-tensor fp32 step counters, which it keeps on the device."""
    params = tuple(params)
    numel = sum(p.numel for p in params)
    total = optimizer_state_bytes(optimizer, params, precision.state_bytes, impl)
    per = total / numel if numel else 0.0
    steps = adamw_step_counter_bytes(len(params), impl) if optimizer == "adamw" else 0
    counters = f" (incl. {len(params)} fused step counters x 4 B)" if steps else ""
    if optimizer in PAGED_OPTIMIZERS:
        counters = " in the allocator (absmax, and the states of tensors under 100,000 values)"
    return Term(
        "optimizer_states", total,
        f"{OPTIMIZERS[optimizer]}; {_n(numel)} trainable in {len(params)} tensors, "
        f"{per:.4g} B each{counters} = {_n(total)} B",
    )


def paged_optimizer_term(optimizer: str, params: Iterable[Param]) -> Term | None:
    """A bitsandbytes paged optimizer's states in CUDA unified memory (`optimizers.paged_state_split`):
    outside the caching allocator, so outside the peak and the fit check; None for any other."""
    if optimizer not in PAGED_OPTIMIZERS:
        return None
    numels = [p.numel for p in params]
    total = paged_state_bytes(optimizer, numels)
    large = sum(1 for n in numels if n >= BNB_PAGED_MIN)
    return Term("paged_optimizer_states", total,
                f"{optimizer} state buffers of the {large} of {len(numels)} trainable tensors with "
                f">= {BNB_PAGED_MIN:,} values, in CUDA unified memory (not in the allocator peak; "
                f"evictable to host memory) = {_n(total)} B")


def no_activation_bytes() -> Term:
    """A model known only by its size has no shapes to walk: activations 0, and the plan says so."""
    return Term("activations", 0, "unknown without the model's shape (--params)")


def activation_term(prof) -> Term:
    """Saved activations at the end of forward: embedding + each layer + head (see `activations`)."""
    if prof.checkpointed and prof.offloaded:
        body = (f"{len(prof.layer_inputs)} checkpointed layer inputs offloaded to CPU memory "
                f"({_n(prof.cpu_bytes)} B), 2 in flight on the GPU {_n(prof.in_flight)} B + "
                f"their shared arguments {_n(prof.checkpoint_args)} B")
    elif prof.checkpointed and prof.kept_layers:
        n = len(prof.layers)
        ckpt = [i for i in range(n) if prof.checkpointed_at(i)]
        kept = [i for i in range(n) if not prof.checkpointed_at(i)]
        body = (f"{len(ckpt)} checkpointed layer inputs {_n(sum(prof.layer_inputs[i] for i in ckpt))} B + "
                f"{len(kept)} layers not checkpointed (every activation kept) "
                f"{_n(sum(prof.held_after_forward(i) for i in kept))} B + "
                f"their shared arguments {_n(prof.checkpoint_args)} B")
    elif prof.checkpointed:
        body = (f"{len(prof.layer_inputs)} checkpointed layer inputs {_n(sum(prof.layer_inputs))} B + "
                f"their shared arguments {_n(prof.checkpoint_args)} B")
    else:
        last = len(prof.layers) - 1
        attn, mlp = prof.layers[last] - prof.mlp_layers[last], prof.mlp_layers[last]
        body = (f"{len(prof.layers)} layers (each about attention {_n(attn)} B + MLP {_n(mlp)} B) "
                f"= {_n(sum(prof.layers))} B")
    if prof.checkpointed and prof.sac_kept:
        cached = sum(prof.sac_kept[i] for i in range(len(prof.layers)) if prof.checkpointed_at(i))
        body += (f" + op outputs the checkpoints cache (torchtitan's op policy: every other matmul's, "
                 f"the fused attention kernel's) {_n(cached)} B")
    compiled = {"layers": " (each layer compiled: ",
                "layers+loss": " (each layer and the loss compiled: ",
                "model": " (whole model compiled: "}.get(prof.compiled)
    if compiled:
        compiled += ("a pointwise result is saved only where cheaper than what backward recomputes it "
                     "from, torch's min-cut partition)")
    return Term("activations", prof.total,
                f"embedding {_n(prof.embedding)} B + {body} + head and loss {_n(prof.head)} B "
                f"= {_n(prof.total)} B{compiled or ''}")


def timeline_peak_term(phase) -> Term:
    """The step's peak: the largest live total over the moments `timeline.step_phases` follows."""
    return Term("peak", phase.bytes, f"{phase.name}: {phase.what} = {_n(phase.bytes)} B")


def device_overhead_term(allocator_peak: int, gpu_name: str | None = None) -> Term:
    """Device-level allowance above the allocator peak, term by term (see `allowance`): CUDA
    context + cuBLAS workspaces + allocator segments + allocator cache, for the GPU's generation."""
    from .allowance import allowance

    a = allowance(allocator_peak, gpu_name)
    how = "fitted" if a.fitted else "context and cache assumed"
    return Term("device_overhead", a.total,
                f"CUDA context {_n(a.context)} B + cuBLAS workspaces {_n(a.cublas_workspaces)} B + "
                f"allocator segments {_n(a.segments)} B + allocator cache {_n(a.cache)} B "
                f"= {_n(a.total)} B ({a.generation}; {how}, not measured here)")


def peak_bytes(terms: Iterable[Term]) -> Term:
    """Peak: the sum of the terms (model states plus activations, once activations exist)."""
    terms = tuple(terms)
    total = sum(t.bytes for t in terms)
    return Term("peak", total, " + ".join(_n(t.bytes) for t in terms) + f" = {_n(total)} B")


def adafactor_temporary_term(shapes: tuple[tuple[int, ...], ...], precision: Precision) -> Term:
    """Adafactor's step temporary (see `optimizers.adafactor_temporary_bytes`): fp32 copies of 16-bit
    gradients and weights when the optimizer updates them directly (no fp32 master copy)."""
    from .optimizers import adafactor_temporary_bytes

    sixteen = precision.grad_bytes == 2 and not precision.master_bytes
    total = adafactor_temporary_bytes(shapes, sixteen)
    copies = ", plus fp32 copies of the 16-bit gradient and weight" if sixteen else ""
    return Term("optimizer_temporary", total,
                "adafactor: one tensor at a time, its squared gradient, the update and the factored "
                f"estimate or the negated update beside the previous update (4 B each){copies} "
                f"= {_n(total)} B")


def optimizer_temporary_term(optimizer: str, impl: str, numels: tuple[int, ...], state_bytes: int) -> Term:
    """The optimizer step's largest temporary (see `optimizers.optimizer_temporary_bytes`)."""
    from .optimizers import optimizer_temporary_bytes

    total = optimizer_temporary_bytes(optimizer, impl, numels, state_bytes)
    if not total:
        return Term("optimizer_temporary", 0, f"{impl} {optimizer}: updates in place, no temporary")
    if impl == "foreach":
        how = f"sqrt(v) of every trainable tensor at once: {_n(sum(numels))} x {state_bytes} B"
    else:
        how = f"sqrt(v) and its quotient for the largest tensor: 2 x {_n(max(numels))} x {state_bytes} B"
    return Term("optimizer_temporary", total, f"{impl} {optimizer}: {how} = {_n(total)} B")
