"""One model, one or more training setups, in: a `Plan` of named byte terms out."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import checkpoints
from .architecture import LINEAR_KINDS, Param, layout
from .counts import lora_trainable
from .errors import PlanError
from .gpus import Gpu, gpus_needed
from .memory import (
    Term,
    activation_term,
    dense_weight_bytes,
    device_overhead_term,
    gradient_bytes,
    master_weight_bytes,
    no_activation_bytes,
    optimizer_bytes,
    peak_bytes,
    quantized_weight_bytes,
    timeline_peak_term,
)
from .optimizers import check_optimizer
from .precision import DTYPE_BYTES, Precision, get_precision, weight_dtype
from .spec import DenseSize, ModelSpec, TrainSetup
from .step import predict_step

METHODS = ("full", "lora", "qlora")
MEMORY_KEYS = ("weights", "gradients", "master_weights", "optimizer_states", "activations", "peak")


@dataclass(frozen=True)
class MethodPlan:
    method: str
    rank: int | None
    trainable_params: int
    all_params: int  # PEFT's count: base model + adapters + modules_to_save copies
    target_modules: tuple[str, ...]
    wrapped_modules: int
    weight_terms: tuple[Term, ...]  # what `weights` is made of
    memory: dict[str, Term]  # MEMORY_KEYS
    checkpoint: Term  # what this method saves: the full model, or the adapter
    full_checkpoint_bytes: int
    storage: dict[str, int]  # for `tasks` fine-tunes
    gpus_needed: int
    peak_phase: str = ""  # which moment of the step sets the peak
    device_overhead: Term | None = None  # CUDA context + allocator slack above the peak (allowance)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    total_params: int
    source: str = ""
    spec: ModelSpec | None = None


@dataclass(frozen=True)
class Plan:
    model: ModelInfo
    setup: TrainSetup
    gpu: Gpu
    plans: tuple[MethodPlan, ...]
    notes: tuple[str, ...] = field(default=())


def _save_dtype(setup: TrainSetup, precision: Precision) -> str:
    if setup.save_dtype == "auto":
        return weight_dtype(precision)
    if setup.save_dtype not in DTYPE_BYTES:
        raise PlanError(f"save dtype must be auto, {', '.join(DTYPE_BYTES)}; got {setup.save_dtype!r}")
    return setup.save_dtype


def _states(trainable: int, params: tuple[Param, ...], setup: TrainSetup,
            precision: Precision) -> dict[str, Term]:
    return {
        "gradients": gradient_bytes(trainable, precision),
        "master_weights": master_weight_bytes(trainable, precision),
        "optimizer_states": optimizer_bytes(setup.optimizer, params, precision),
    }


def _assemble(method: str, gpu: Gpu, weight_terms: tuple[Term, ...], states: dict[str, Term],
              step: tuple[ModelSpec, TrainSetup] | None, **fields) -> MethodPlan:
    """Model states plus, when the model's shape is known, the step's activations and timeline peak."""
    weights = Term("weights", sum(t.bytes for t in weight_terms),
                   " + ".join(t.formula for t in weight_terms))
    memory = {"weights": weights, **states}
    if step is None:
        memory["activations"] = no_activation_bytes()
        memory["peak"] = peak_bytes(memory[k] for k in MEMORY_KEYS[:-1])
        phase, overhead = "", None
    else:
        spec, setup = step
        precision = get_precision(setup.precision)
        predicted = predict_step(spec, setup, precision, {k: t.bytes for k, t in memory.items()})
        memory["activations"] = activation_term(predicted.profile)
        memory["peak"] = timeline_peak_term(predicted.peak)
        phase = predicted.peak.name
        overhead = device_overhead_term(predicted.peak.bytes)
    return MethodPlan(method=method, weight_terms=weight_terms, memory=memory,
                      gpus_needed=gpus_needed(memory["peak"].bytes, gpu.memory_bytes),
                      peak_phase=phase, device_overhead=overhead, **fields)


def plan_full(spec: ModelSpec, setup: TrainSetup, gpu: Gpu) -> MethodPlan:
    """Full fine-tuning: every parameter is trained and saved."""
    precision = get_precision(setup.precision)
    arch = layout(spec, setup.task, setup.num_labels)
    params = arch.params
    total = arch.total_params
    dtype = _save_dtype(setup, precision)
    ckpt = checkpoints.safetensors_bytes(params, dtype)
    return _assemble(
        "full", gpu,
        (dense_weight_bytes("weights_trainable", total, precision.weight_bytes, "trainable"),),
        _states(total, params, setup, precision), (spec, setup),
        rank=None, trainable_params=total, all_params=total, target_modules=(),
        wrapped_modules=0,
        checkpoint=Term("checkpoint", ckpt, f"safetensors, {len(params)} tensors in {dtype}"),
        full_checkpoint_bytes=ckpt,
        storage=checkpoints.storage_for_tasks(setup.tasks, ckpt, ckpt),
    )


def plan_lora(spec: ModelSpec, setup: TrainSetup, gpu: Gpu) -> MethodPlan:
    """LoRA or QLoRA: a frozen base (16-bit, or NF4 linear layers for QLoRA) plus adapters."""
    precision = get_precision(setup.precision)
    arch = layout(spec, setup.task, setup.num_labels)
    trainable = lora_trainable(spec, setup)
    in_place = {p.name for p in trainable.biases}  # trained where they are, not copied
    frozen = [p for p in arch.params if p.name not in in_place]

    weight_terms: list[Term] = []
    if setup.method == "qlora":
        saved_paths = {m.path for m in trainable.saved_modules}
        # bitsandbytes quantises every linear layer but the output head; biases stay 16-bit.
        # Fused 3-D expert weights are assumed quantised the same way.
        quantised = {
            p.name for m in arch.modules
            if (m.kind in LINEAR_KINDS or m.kind == "experts")
            and m.path != arch.head_path and m.path not in saved_paths
            for p in m.params if not p.name.endswith(".bias")
        }
        nf4 = [p for p in frozen if p.name in quantised]
        frozen = [p for p in frozen if p.name not in quantised]
        weight_terms.append(quantized_weight_bytes(nf4, setup.double_quant))
    frozen_numel = sum(p.numel for p in frozen)
    weight_terms.append(dense_weight_bytes("weights_frozen", frozen_numel, precision.weight_bytes, "frozen"))
    weight_terms.append(dense_weight_bytes("weights_trainable", trainable.count,
                                           precision.weight_bytes, "trainable"))

    dtype = _save_dtype(setup, precision)
    adapter_params = trainable.file_params
    adapter = checkpoints.safetensors_bytes(adapter_params, dtype)
    base = checkpoints.safetensors_bytes(arch.params, dtype)
    return _assemble(
        setup.method, gpu, tuple(weight_terms),
        _states(trainable.count, trainable.params, setup, precision), (spec, setup),
        rank=setup.rank, trainable_params=trainable.count,
        all_params=arch.total_params + trainable.adapter_count + trainable.saved_module_count,
        target_modules=trainable.target_names, wrapped_modules=len(trainable.adapters),
        checkpoint=Term("checkpoint", adapter,
                        f"adapter_model.safetensors, {len(adapter_params)} tensors in {dtype}"),
        full_checkpoint_bytes=base,
        storage=checkpoints.storage_for_tasks(setup.tasks, base, adapter),
    )


def plan_dense(size: DenseSize, setup: TrainSetup, gpu: Gpu) -> MethodPlan:
    """A model known only by its parameter count: full fine-tuning's model states and checkpoint
    data (no header: tensor names are unknown)."""
    if setup.method != "full":
        raise PlanError("--params plans full fine-tuning only: LoRA needs layer shapes; pass --model")
    if setup.optimizer == "adafactor":
        raise PlanError("Adafactor's state depends on tensor shapes; pass --model to plan it")
    precision = get_precision(setup.precision)
    n = size.total_params
    params = (Param("weights", (n,)),)
    dtype = _save_dtype(setup, precision)
    ckpt = n * DTYPE_BYTES[dtype]
    return _assemble(
        "full", gpu,
        (dense_weight_bytes("weights_trainable", n, precision.weight_bytes, "trainable"),),
        _states(n, params, setup, precision), None,
        rank=None, trainable_params=n, all_params=n, target_modules=(), wrapped_modules=0,
        checkpoint=Term("checkpoint", ckpt, f"{n:,} x {DTYPE_BYTES[dtype]} B ({dtype}), tensor data only"),
        full_checkpoint_bytes=ckpt,
        storage=checkpoints.storage_for_tasks(setup.tasks, ckpt, ckpt),
    )


def make_plan(model: ModelSpec | DenseSize, setups: tuple[TrainSetup, ...], gpu: Gpu) -> Plan:
    """Plan each setup (one per method and rank) for one model on one kind of GPU."""
    if not setups:
        raise PlanError("nothing to plan: give at least one method")
    plans = []
    for setup in setups:
        check_optimizer(setup.optimizer)
        get_precision(setup.precision)
        if setup.tasks < 1:
            raise PlanError(f"--tasks must be at least 1, got {setup.tasks}")
        if setup.method not in METHODS:
            raise PlanError(f"unknown method {setup.method!r}; choose from {', '.join(METHODS)}")
        if isinstance(model, DenseSize):
            plans.append(plan_dense(model, setup, gpu))
        elif setup.method == "full":
            plans.append(plan_full(model, setup, gpu))
        else:
            plans.append(plan_lora(model, setup, gpu))
    notes = []
    if isinstance(model, DenseSize):
        info = ModelInfo(model.name or f"dense {model.total_params:,} params", "dense", model.total_params)
        notes.append("--params: model states and checkpoint tensor data only; no activations "
                     "without the model's shape, so peak is the sum of model states")
    else:
        first = setups[0]
        info = ModelInfo(model.name, model.family,
                         layout(model, first.task, first.num_labels).total_params, model.source, model)
    return Plan(info, setups[0], gpu, tuple(plans), tuple(notes))
