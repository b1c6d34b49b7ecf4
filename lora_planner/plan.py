"""One model, one or more training setups, in: a `Plan` of named byte terms out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import checkpoints, cost
from .architecture import Param, layout
from .counts import lora_trainable
from .errors import PlanError
from .fit import Fit, fit_limits
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
from .quant import quantised_params
from .sharding import (
    DataParallel,
    distribute,
    gathered_layer_buffer,
    sharding_notes,
    sharding_of,
    step_peak_on_gpu,
)
from .spec import DenseSize, ModelSpec, TrainSetup
from .step import input_gradient_skips, predict_step
from .timeline import Phase

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
    gpus_needed: int | None  # None: no number of GPUs fits under the chosen sharding
    peak_phase: str = ""  # which moment of the step sets the peak
    device_overhead: Term | None = None  # CUDA context + allocator slack above the peak (allowance)
    data_parallel: DataParallel | None = None  # placement on GPUs; `memory` is per GPU with --num-gpus
    flops_per_token: cost.Quantity | None = None
    compute: cost.Compute | None = None  # time and money, when tokens are given
    fit: Fit | None = None  # largest batch and sequence that fit the GPU, when asked


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
    workload: cost.Workload | None = None  # tokens, MFU and price behind `compute`


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
              setup: TrainSetup, spec: ModelSpec | None, gathered: dict[str, Term] | None = None,
              **fields) -> MethodPlan:
    """Model states plus, when the model's shape is known, the step's activations and timeline peak;
    with --num-gpus, all of it on one GPU under the chosen sharding."""
    weights = Term("weights", sum(t.bytes for t in weight_terms),
                   " + ".join(t.formula for t in weight_terms))
    memory = {"weights": weights, **states}
    if spec is None:
        memory["activations"] = no_activation_bytes()

        def peak(m: dict[str, Term], _sharding) -> Phase:
            total = peak_bytes(m[k] for k in MEMORY_KEYS[:-1])
            return Phase("", total.bytes, total.formula)
    else:
        precision = get_precision(setup.precision)
        predicted = predict_step(spec, setup, precision, {k: t.bytes for k, t in memory.items()})
        memory["activations"] = activation_term(predicted.profile)

        def peak(m: dict[str, Term], sharding) -> Phase:
            return step_peak_on_gpu(predicted, m, sharding, spec, setup, precision)
    placed = distribute(memory, sharding_of(setup.num_gpus, setup.sharding, setup.offload), gathered,
                        gpu.memory_bytes, lambda m, s: peak(m, s).bytes)
    memory = dict(placed.per_gpu)
    top = peak(memory, placed.sharding)
    if spec is None:
        memory["peak"] = peak_bytes(memory[k] for k in MEMORY_KEYS[:-1])
        phase, overhead = "", None
    else:
        memory["peak"] = timeline_peak_term(top)
        phase, overhead = top.name, device_overhead_term(top.bytes)
    needed = gpus_needed(memory["peak"].bytes, gpu.memory_bytes) if placed.sharding is None \
        else placed.gpus_needed
    return MethodPlan(method=method, weight_terms=weight_terms, memory=memory, gpus_needed=needed,
                      peak_phase=phase, device_overhead=overhead, data_parallel=placed, **fields)


def plan_full(spec: ModelSpec, setup: TrainSetup, gpu: Gpu) -> MethodPlan:
    """Full fine-tuning: every parameter is trained and saved."""
    precision = get_precision(setup.precision)
    arch = layout(spec, setup.task, setup.num_labels)
    params = arch.params
    total = arch.total_params
    dtype = _save_dtype(setup, precision)
    ckpt = checkpoints.safetensors_bytes(params, dtype)
    largest = max(m.numel for m in arch.modules)
    return _assemble(
        "full", gpu,
        (dense_weight_bytes("weights_trainable", total, precision.weight_bytes, "trainable"),),
        _states(total, params, setup, precision), setup, spec,
        gathered_layer_buffer(largest, precision.weight_bytes, precision.grad_bytes),
        flops_per_token=cost.full_flops_per_token(
            cost.matmul_params(spec, arch), cost.head_matmul_params(arch),
            cost.attention_forward_flops(spec, setup.seq_len), setup.grad_checkpointing),
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
    nf4: list[Param] = []
    if setup.method == "qlora":
        quantised = quantised_params(arch, trainable, setup.quantize_experts)
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
    skipped, attention_skipped = input_gradient_skips(spec, setup)
    flops = cost.lora_flops_per_token(
        cost.matmul_params(spec, arch), cost.head_matmul_params(arch), trainable.adapter_count,
        trainable.saved_module_count, cost.attention_forward_flops(spec, setup.seq_len),
        setup.grad_checkpointing, skipped, attention_skipped, spec.num_layers)
    if nf4:
        flops = cost.plus(flops, cost.dequant_flops_per_token(
            sum(p.numel for p in nf4), setup.batch_size * setup.seq_len, setup.grad_checkpointing))
    # The frozen base is gathered without gradients; the adapters' own are too small to matter.
    largest = max(m.numel for m in arch.modules)
    return _assemble(
        setup.method, gpu, tuple(weight_terms),
        _states(trainable.count, trainable.params, setup, precision), setup, spec,
        gathered_layer_buffer(largest, precision.weight_bytes, 0),
        flops_per_token=flops,
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
        _states(n, params, setup, precision), setup, None,
        flops_per_token=cost.dense_flops_per_token(n, setup.grad_checkpointing),
        rank=None, trainable_params=n, all_params=n, target_modules=(), wrapped_modules=0,
        checkpoint=Term("checkpoint", ckpt, f"{n:,} x {DTYPE_BYTES[dtype]} B ({dtype}), tensor data only"),
        full_checkpoint_bytes=ckpt,
        storage=checkpoints.storage_for_tasks(setup.tasks, ckpt, ckpt),
    )


def check_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    """The methods asked for, each one we plan, or a PlanError naming the choices."""
    for m in methods:
        if m not in METHODS:
            raise PlanError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return methods


def make_plan(model: ModelSpec | DenseSize, setups: tuple[TrainSetup, ...], gpu: Gpu,
              workload: cost.Workload | None = None, fit: bool = False) -> Plan:
    """Plan each setup (one per method and rank) for one model on one kind of GPU; with a workload
    of tokens, also its time and cost; with `fit`, the largest batch and sequence that fit."""
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
    if workload is not None and workload.tokens is not None:
        plans = [_with_compute(p, s, gpu, workload) for p, s in zip(plans, setups, strict=True)]
    if fit:
        if isinstance(model, DenseSize):
            raise PlanError("--fit needs the model's shape for activations; pass --model")
        plans = [replace(p, fit=fit_limits(model, s, gpu)) for p, s in zip(plans, setups, strict=True)]
    notes = sharding_notes(setups[0], isinstance(model, DenseSize))
    if isinstance(model, ModelSpec) and model.num_experts and any(s.method == "qlora" for s in setups):
        notes.append(
            "QLoRA keeps the fused 3-D expert weights in 16-bit: bitsandbytes quantises nn.Linear "
            "modules only (bitsandbytes#1849); --quantize-experts plans a stack that quantises them"
            if not setups[0].quantize_experts else
            "--quantize-experts: the fused expert weights are planned as NF4, which stock bitsandbytes "
            "does not do (bitsandbytes#1849)")
    notes += cost.notes(workload, gpu, isinstance(model, DenseSize))
    if isinstance(model, DenseSize):
        info = ModelInfo(model.name or f"dense {model.total_params:,} params", "dense", model.total_params)
        notes.append("--params: model states and checkpoint tensor data only; no activations "
                     "without the model's shape, so peak is the sum of model states")
    else:
        first = setups[0]
        if first.seq_len > model.max_positions:
            notes.append(f"--seq-len {first.seq_len:,} is longer than {model.name}'s context of "
                         f"{model.max_positions:,} positions: the model cannot train on it as is")
        info = ModelInfo(model.name, model.family,
                         layout(model, first.task, first.num_labels).total_params, model.source, model)
    return Plan(info, setups[0], gpu, tuple(plans), tuple(notes), workload)


def _with_compute(p: MethodPlan, setup: TrainSetup, gpu: Gpu, workload: cost.Workload) -> MethodPlan:
    """Time and cost on --num-gpus GPUs, or on the fewest that hold the model states."""
    num_gpus = setup.num_gpus or p.gpus_needed or 1
    return replace(p, compute=cost.training_time(p.flops_per_token, workload.tokens, gpu, num_gpus, workload))
