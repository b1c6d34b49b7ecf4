"""The step engine: a training step's memory from an op tape, one liveness rule and a per-op table.

`plan_step(spec, setup)` writes the model's forward as a tape (`dense`), replays it (`replay`) over
the step's baseline (parameters, buffers, the batch, the optimizer's states) and returns the peak,
the peak a dispatch-level tracer would see, and the activations. It runs beside the planner's walk
(`activations`, `timeline`, `step`) and is held to real steps (tests/test_engine.py,
benchmarks/engine_vs_trace.py); the planner does not use it yet.

Covered: the dense families whose layout `dense.features` reads (GPT-2's, the Llama shape's:
Llama, Mistral, Qwen2, Qwen3; Phi-3's fused q/k/v and gate/up; Gemma-2's sandwich norms, offset
RMSNorm, scaled embedding and soft-caps, eager; OLMo 2's post norms in fp32 or amp), full
fine-tuning and LoRA, fp32, amp (bf16 autocast) and pure-bf16, SDPA (the CPU flash kernel; the math
fallback under attention dropout; a sliding window's mask) and eager attention, dropout,
non-reentrant checkpointing per layer, AdamW (foreach, for-loop, fused), SGD, SGD with momentum and
Adafactor, the standard and torchtune's chunked loss, on CPU. Not yet: MoE, latent attention,
Gemma 3 (sandwich norms with q/k norms), QLoRA, DoRA, LoRA dropout, packing, the fused-linear
loss, the CPU bf16 matmul's oneDNN scratchpad, GPU kernels' workspaces, torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..activations import cpu_rng_state_bytes
from ..architecture import Param, layout
from ..counts import lora_trainable
from ..errors import PlanError
from ..optimizers import adafactor_temporary_bytes, optimizer_state_bytes, optimizer_temporary_bytes
from ..spec import ModelSpec, TrainSetup
from ..stacks import resolve
from .dense import FP32, INT64, Writer, features
from .replay import Moment, replay
from .tape import Tape

ITEM = {"fp32": 4, "amp": 4, "pure-bf16": 2}  # the parameters' bytes per value


@dataclass(frozen=True)
class StepPlan:
    peak: Moment  # what the allocator counts
    tracer_peak: Moment  # what a dispatch-level tracer counts
    activations: int
    baseline: int
    phase_peaks: dict[str, int]
    ops: int


def check(spec: ModelSpec, setup: TrainSetup) -> None:
    """Refuse, in one line, a step the engine does not model yet."""
    if spec.num_experts or spec.kv_lora_rank or (spec.norm_placement == "sandwich" and spec.qk_norm):
        raise PlanError("the step engine models dense models, sandwich norms without q/k norms, so far")
    if setup.attention == "sdpa" and features(spec, layout(spec)).gemma and not spec.qk_norm:
        # Gemma-2's form (sandwich norms, no q/k norms): `_supports_sdpa = False`, for its soft-cap
        raise PlanError("transformers runs Gemma-2 without SDPA (it takes no soft-cap): use eager attention")
    if setup.precision == "pure-bf16" and features(spec, layout(spec)).fp32_product:
        # bf16 weights times fp32 normalised values: its saves and gradients not yet matched
        raise PlanError("the step engine models a norm's fp32 weight product (OLMo 2) in fp32 or amp so far")
    if setup.method not in ("full", "lora") or setup.precision not in ITEM:
        raise PlanError("the step engine models full and LoRA steps in fp32, amp or pure-bf16 so far")
    if setup.lora_dropout or setup.use_dora or setup.packing:
        raise PlanError("the step engine models steps without LoRA dropout, DoRA or packing so far")
    if setup.optimizer not in ("adamw", "sgd", "sgd-momentum", "adafactor"):
        raise PlanError("the step engine models AdamW, SGD (with or without momentum) and Adafactor so far")
    if ((setup.loss or "standard") not in ("standard", "chunked") or setup.task != "causal-lm"
            or setup.bias != "none"):
        raise PlanError("the step engine models the standard and chunked causal-LM losses without trained "
                        "biases so far")


def dropout_rates(spec: ModelSpec, setup: TrainSetup) -> tuple[float, float, float]:
    """(attention, residual, embedding) dropout: the setup's for all three, else the config's."""
    return spec.dropout_rates if setup.dropout is None else (setup.dropout,) * 3


def _parameters(tape: Tape, spec: ModelSpec, setup: TrainSetup, item: int) -> tuple[dict, dict, list[Param]]:
    """Every parameter as a tensor (trainable ones need a gradient), LoRA's A and B per wrapped
    module, and the trainable tensors' shapes in the optimizer's order (`model.parameters()`)."""
    arch = layout(spec)
    full = setup.method == "full"
    params = {p.name: tape.tensor(p.numel * item, "parameter", full, p.name) for p in arch.params}
    if spec.tied_embeddings:
        params[f"{arch.head_path}.weight"] = params[arch.params[0].name]
    lora: dict[str, tuple[int, int]] = {}
    trainable = list(arch.params) if full else []
    if not full:
        for a in lora_trainable(spec, setup).adapters:
            m, r = a.module, setup.rank
            lora[m.path] = (tape.tensor(r * m.in_features * item, "parameter", True),
                            tape.tensor(m.out_features * r * item, "parameter", True))
            trainable += [Param(f"{m.path}.lora_A", (r, m.in_features)),
                          Param(f"{m.path}.lora_B", (m.out_features, r))]
    return params, lora, trainable


def optimizer_memory(setup: TrainSetup, trainable: list[Param], item: int) -> tuple[int, int]:
    """(states, the step's largest temporary) over the trainable tensors. AdamW: exp_avg and
    exp_avg_sq in the parameters' dtype and a 4-byte step tensor per tensor (in CPU memory for
    every kernel, so on a CPU step the allocator's); SGD (with or without momentum) and Adafactor:
    `optimizer_state_bytes`; the temporaries of `optimizer_temporary_bytes` and, for Adafactor,
    `adafactor_temporary_bytes` (fp32 copies of 16-bit gradients and weights too)."""
    numels = [p.numel for p in trainable]
    if setup.optimizer == "adamw":
        states = 2 * item * sum(numels) + FP32 * len(numels)
        return states, optimizer_temporary_bytes("adamw", setup.optimizer_impl, numels, item)
    states = optimizer_state_bytes(setup.optimizer, trainable, item, setup.optimizer_impl)
    if setup.optimizer == "adafactor":
        return states, adafactor_temporary_bytes([p.shape for p in trainable], item == 2)
    return states, optimizer_temporary_bytes(setup.optimizer, setup.optimizer_impl, numels, item)


def forward_tape(spec: ModelSpec, setup: TrainSetup) -> tuple[Tape, int, list[Param], int]:
    """The step's forward written as a tape: (the tape, its loss tensor, the trainable tensors in
    the optimizer's order, bytes per parameter value)."""
    check(spec, setup)
    # checkpointing copies the CPU RNG state per layer, outside every op (`cpu_rng_state_bytes`)
    rng_bytes = cpu_rng_state_bytes() if setup.grad_checkpointing else 0
    setup = resolve(setup)
    item = ITEM[setup.precision]
    tape = Tape()
    params, lora, trainable = _parameters(tape, spec, setup, item)
    if spec.rotary_layer(0):
        params["inv_freq"] = tape.tensor(spec.rotary_dim // 2 * FP32, "buffer")
    if features(spec, layout(spec)).gemma:
        params["embed_scale"] = tape.tensor(FP32, "buffer")  # sqrt(hidden), a 0-d fp32 buffer
    batch = setup.batch_size * setup.seq_len * INT64
    ids, labels = tape.tensor(batch, "input"), tape.tensor(batch, "input")
    arch = layout(spec)
    writer = Writer(tape, spec, setup.batch_size, setup.seq_len, item, params, lora,
                    setup.attention == "eager", features(spec, arch), setup.grad_checkpointing, rng_bytes,
                    dropout=dropout_rates(spec, setup), amp=setup.precision == "amp",
                    chunks=setup.loss_chunks if setup.loss == "chunked" else 0)
    with tape.phase("forward"):
        loss = writer.forward(arch, ids, labels)
    return tape, loss, trainable, item


def plan_step(spec: ModelSpec, setup: TrainSetup, device: str = "cpu") -> StepPlan:
    """One steady-state step's peak (its phase and the module or range it is in), the peak a
    dispatch-level tracer would see, and the activations, on `device`."""
    if device != "cpu":
        raise PlanError("the step engine models CPU steps so far (no GPU kernel's workspace yet)")
    tape, loss, trainable, item = forward_tape(spec, setup)
    setup = resolve(setup)
    states, scratch = optimizer_memory(setup, trainable, item)
    base = sum(t.bytes for t in tape.tensors if t.role != "activation") + states
    r = replay(tape, base=base, base_seen=base, loss=loss, checkpointing=setup.grad_checkpointing,
               optimizer_scratch=(scratch,))
    return StepPlan(r.peak, r.tracer_peak, r.activations, base, r.phase_peaks, len(tape.ops))
