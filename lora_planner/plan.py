"""One model, one or more training setups, in: a `Plan` of named byte terms out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from . import checkpoint_sizes, cost, stacks
from .activations import every_kth_layer
from .adapter_dtype import FP32_ADAPTERS, fp32_adapters
from .architecture import Architecture, Param, kept_in_fp32, layout
from .catalog import PUBLISHED_NOTES
from .counts import lora_trainable, unwrapped_mlp_note
from .errors import PlanError
from .gpus import Gpu, fits, largest_fitting_peak
from .memory import (
    Term,
    activation_term,
    adafactor_temporary_term,
    dense_weight_bytes,
    dequant_term,
    device_overhead_term,
    gradient_bytes,
    master_weight_bytes,
    no_activation_bytes,
    optimizer_bytes,
    optimizer_temporary_term,
    paged_optimizer_term,
    peak_bytes,
    quantized_weight_bytes,
    timeline_peak_term,
)
from .optimizers import PAGED_OPTIMIZERS, check_optimizer
from .precision import DTYPE_BYTES, Precision, get_precision, weight_dtype
from .quant import (
    COMPUTE_DTYPES,
    bnb_bias_bytes,
    check_split_expert_targets,
    nf4_state_bytes,
    parse_bnb_version,
    quant_notes,
    quantised_params,
    quantises_experts,
    torchao_replicated_bytes,
)
from .recorded import (
    RecordedModel,
    RecordedStep,
    fsdp_units,
    is_adapter,
    recorded_phases,
    recorded_position_phases,
)
from .sharding import (
    DataParallel,
    distribute,
    placement,
    sharding_notes,
    sharding_of,
    step_phase_bytes_on_gpu,
    step_phases_on_gpu,
    zero3_buffers,
    zero3_settings,
)
from .spec import DenseSize, ModelSpec, TrainSetup
from .step import input_gradient_skips, predict_step, qlora_conditions
from .timeline import Phase, peak_phase

METHODS = ("full", "lora", "qlora")
MEMORY_KEYS = ("weights", "gradients", "master_weights", "optimizer_states", "activations", "peak")


@dataclass(frozen=True)
class MethodPlan:
    """One method (and rank) planned: parameters, memory by term, GPUs, checkpoint and cost."""

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
    gpus_needed: int | None  # fewest GPUs over the strategies (under the chosen one with --num-gpus)
    peak_phase: str = ""  # which moment of the step sets the peak
    device_overhead: Term | None = None  # CUDA context + allocator slack above the peak (allowance)
    data_parallel: DataParallel | None = None  # placement on GPUs; `memory` is per GPU with --num-gpus
    flops_per_token: cost.Quantity | None = None
    compute: cost.Compute | None = None  # time and money, when tokens are given
    fit: object | None = None  # `fit.Fit`: largest batch and sequence that fit the GPU, when asked
    gpus_needed_strategy: str | None = None  # single, ddp, zero1, zero2, zero3 or fsdp
    adapter_formula: str = ""  # how trainable_params is made, by kind of wrapped module
    fits: bool = False  # the fit rule for the planned step: one GPU, or one of --num-gpus
    optimizer_temporary: Term | None = None  # the optimizer step's temporary (whole model)
    dequant_transient: Term | None = None  # QLoRA: one 4-bit weight's dequantisation (whole model)
    # a bitsandbytes paged optimizer's states in CUDA unified memory, per GPU: not in `memory`
    paged_optimizer_states: Term | None = None
    activation_cpu_bytes: int = 0  # checkpointed layer inputs in CPU memory (--activation-offload)
    # per-GPU allocator peak on the GPUs shown (`device_overhead` is on it): the peak on one GPU or
    # one of --num-gpus, or without --num-gpus on one of the fewest `gpus_needed` when that is > 1
    per_gpu_peak: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """The model planned, as the plan names it."""

    name: str
    family: str
    total_params: int
    source: str = ""
    spec: ModelSpec | None = None


@dataclass(frozen=True)
class Plan:
    """A model, the first setup, the GPU, and one `MethodPlan` per method and rank."""

    model: ModelInfo
    setup: TrainSetup
    gpu: Gpu
    plans: tuple[MethodPlan, ...]
    notes: tuple[str, ...] = field(default=())
    workload: cost.Workload | None = None  # tokens, MFU and price behind `compute`
    advice: object | None = None  # `advice.Advice`: changes that make a method fit, when asked


def checkpointed_share(setup: TrainSetup, num_layers: int) -> tuple[int, int]:
    """(checkpointed layers, layers) under --checkpoint-every (`activations.checkpointed_layers`,
    by the stack's count): the share of the layers whose forward backward runs again."""
    offset = stacks.get_stack(setup.stack).checkpoint_offset
    chosen = every_kth_layer(num_layers, setup.checkpoint_every, offset)
    return sum(chosen), max(num_layers, 1)


def _save_dtype(setup: TrainSetup, precision: Precision) -> str:
    if setup.save_dtype == "auto":
        return weight_dtype(precision)
    if setup.save_dtype not in DTYPE_BYTES:
        raise PlanError(f"save dtype must be auto, {', '.join(DTYPE_BYTES)}; got {setup.save_dtype!r}")
    return setup.save_dtype


def _states(trainable: int, params: tuple[Param, ...], setup: TrainSetup,
            precision: Precision, tensors_known: bool = True) -> dict[str, Term]:
    # fused AdamW's per-tensor step counters need the tensor count, unknown for --params
    impl = (setup.optimizer_impl or "foreach") if tensors_known else "foreach"
    grads = gradient_bytes(trainable, precision)
    if setup.optimizer_in_backward and params:
        # each gradient is stepped and freed as it is made: one tensor's at a time, the largest
        largest = max(p.numel for p in params)
        grads = Term("gradients", largest * precision.grad_bytes,
                     f"optimizer in backward: one tensor's gradient at a time, the largest {largest:,} x "
                     f"{precision.grad_bytes} B = {largest * precision.grad_bytes:,} B")
    return {
        "gradients": grads,
        "master_weights": master_weight_bytes(trainable, precision),
        "optimizer_states": optimizer_bytes(setup.optimizer, params, precision, impl),
    }


def _attended(setup: TrainSetup) -> int:
    """Positions each token attends over in the attention's FLOPs: the sequence, or packed (several
    documents in one row under a block-diagonal mask, which SDPA's masked kernels and eager
    attention compute in full) the whole row."""
    if setup.packing and setup.batch_size > 1:
        return setup.batch_size * setup.seq_len
    return setup.seq_len


def _split_states(trainable, setup: TrainSetup, precision: Precision) -> dict[str, Term]:
    """Model states of fp32 adapters (`adapter_dtype.FP32_ADAPTERS`: 4 B gradients, no master copy,
    fp32 optimizer states) beside any other trained tensors at the precision's widths."""
    adapters = tuple(p for a in trainable.adapters for p in a.params)
    rest = trainable.params[len(adapters):]  # `Trainable.params`: the adapters' tensors first
    return _adapter_and_rest_states(adapters, rest, setup, precision)


def _adapter_and_rest_states(adapters: tuple[Param, ...], rest: tuple[Param, ...], setup: TrainSetup,
                             precision: Precision) -> dict[str, Term]:
    """`_split_states` of the adapters' tensors and the other trained tensors, given apart."""
    parts = [_states(sum(p.numel for p in adapters), adapters, setup, FP32_ADAPTERS)]
    if rest:
        parts.append(_states(sum(p.numel for p in rest), rest, setup, precision))
    if len(parts) == 1:
        return parts[0]
    return _joined_states(*parts, "adapters")


def _joined_states(rest: dict[str, Term], apart: dict[str, Term], what: str) -> dict[str, Term]:
    """Model states of tensors at two widths, summed term by term: `apart` (named `what`) and the rest."""
    return {k: Term(k, rest[k].bytes + apart[k].bytes,
                    f"{what}: {apart[k].formula}; other: {rest[k].formula}") for k in rest}


def _fp32_kept(spec: ModelSpec, arch: Architecture, precision: Precision) -> tuple[Param, ...]:
    """The parameters transformers keeps in fp32 (`kept_in_fp32`), where the model's weights are not."""
    return kept_in_fp32(spec, arch) if precision.weight_bytes < 4 else ()


def _fp32_weight_term(params) -> Term:
    return dense_weight_bytes("weights_fp32", sum(p.numel for p in params), 4,
                              "kept in fp32 by transformers (router weights)")


def _assemble(method: str, gpu: Gpu, weight_terms: tuple[Term, ...], states: dict[str, Term],
              setup: TrainSetup, spec: ModelSpec | None, buffers: dict[str, Term] | None = None,
              unsharded: dict[str, int] | None = None, fewest_only: bool = False,
              recorded: RecordedStep | None = None, recorded_layers: int = 0, dequant: int = 0,
              recorded_units=None, **fields) -> MethodPlan:
    """Model states plus, when the model's shape is known, the step's activations and timeline peak;
    with --num-gpus, all of it on one GPU under the chosen sharding. GPU counts and the verdict come
    from the one fit rule, `gpus.fits` (`fewest_only`: see `sharding.distribute`). A `recorded` step
    (a model of no family of ours, `recorded.py`) of `recorded_layers` layers gives the activations
    and phases instead of the walk (under FSDP2 with its `recorded_units`, `fsdp.Units`, and the
    embeddings' output as `start_input`); `dequant`: QLoRA's dequantised weight in its backward."""
    weights = Term("weights", sum(t.bytes for t in weight_terms),
                   " + ".join(t.formula for t in weight_terms))
    memory = {"weights": weights, **states}
    if recorded is not None:
        memory["activations"] = Term("activations", recorded.activations.at(recorded_layers),
                                     "recorded: " + recorded.activations.formula(recorded_layers))
        fields["optimizer_temporary"] = _recorded_temporary(recorded, setup)
        whole = memory["gradients"].bytes

        def phases(m: dict[str, Term], sharding) -> tuple[Phase, ...]:
            if recorded.positions and recorded_units is not None:
                u, start_input = recorded_units
                return recorded_position_phases(recorded, recorded_layers, m, sharding,
                                                fields["optimizer_temporary"], u, start_input, dequant,
                                                whole, setup.reshard_after_forward)
            return recorded_phases(recorded, recorded_layers, m, sharding, fields["optimizer_temporary"],
                                   dequant, whole)
        phase_bytes = None
    elif spec is None:
        memory["activations"] = no_activation_bytes()

        def phases(m: dict[str, Term], _sharding) -> tuple[Phase, ...]:
            total = peak_bytes(m[k] for k in MEMORY_KEYS[:-1])
            return (Phase("", total.bytes, total.formula),)
        phase_bytes = None
    else:
        precision = get_precision(setup.precision)
        predicted = predict_step(spec, setup, precision, {k: t.bytes for k, t in memory.items()})
        memory["activations"] = activation_term(predicted.profile)
        fields["optimizer_temporary"] = predicted.temporary
        fields["dequant_transient"] = predicted.dequant
        fields["activation_cpu_bytes"] = predicted.profile.cpu_bytes

        def phases(m: dict[str, Term], sharding) -> tuple[Phase, ...]:
            return step_phases_on_gpu(predicted, m, sharding, spec, setup, precision)

        def phase_bytes(m: dict[str, Term], sharding) -> tuple[int, ...]:
            return step_phase_bytes_on_gpu(predicted, m, sharding, spec, setup, precision)
    placed = distribute(memory, sharding_of(setup.num_gpus, setup.sharding, setup.offload), buffers,
                        largest_fitting_peak(gpu), phases, phase_bytes, unsharded, fewest_only)
    memory = dict(placed.per_gpu)
    if fields.get("paged_optimizer_states") is not None and placed.sharding is not None:
        fields["paged_optimizer_states"] = paged_on_gpu(fields["paged_optimizer_states"], placed.sharding)
    top = peak_phase(phases(memory, placed.sharding))
    if spec is None and recorded is None:
        memory["peak"] = peak_bytes(memory[k] for k in MEMORY_KEYS[:-1])
        phase = ""
    else:
        memory["peak"] = timeline_peak_term(top)
        phase = top.name
    # The allowance is per GPU, on the GPUs the plan shows: one of --num-gpus, one GPU when one
    # holds the step, else one of the fewest that do (not one GPU holding the whole model)
    shown = top.bytes
    if placed.sharding is None and placed.gpus_needed and placed.gpus_needed > 1:
        shown = placed.needed_peak
    return MethodPlan(method=method, weight_terms=weight_terms, memory=memory,
                      gpus_needed=placed.gpus_needed, gpus_needed_strategy=placed.gpus_needed_strategy,
                      fits=fits(top.bytes, gpu), peak_phase=phase,
                      device_overhead=device_overhead_term(shown, gpu.name), data_parallel=placed,
                      per_gpu_peak=shown, **fields)


def paged_on_gpu(term: Term, sharding) -> Term:
    """A paged optimizer's states on one GPU: where the optimizer states are placed
    (`sharding.placement`): whole when replicated, 1/N when sharded, none when offloaded."""
    where = placement("optimizer_states", sharding)
    n = sharding.num_gpus
    share = 0 if where == "cpu" else -(-term.bytes // n) if where == "sharded" else term.bytes
    how = {"cpu": "offloaded: 0 on the GPU", "sharded": f"/ {n} GPUs", "replicated": "on every GPU"}[where]
    return Term(term.name, share, f"{term.formula}; {how} = {share:,} B")


@lru_cache(maxsize=32)
def _matmul_params(spec: ModelSpec, task: str, num_labels: int) -> tuple[int, int]:
    """`cost.matmul_params` and `cost.head_matmul_params` of the model: the same for every method."""
    arch = layout(spec, task, num_labels)
    return cost.matmul_params(spec, arch), cost.head_matmul_params(arch)


def _zero3(spec: ModelSpec, setup: TrainSetup, arch: Architecture, precision: Precision,
           trained: dict[str, int], trainable: int) -> dict[str, Term]:
    """ZeRO-3's run-time buffers for this model (see `sharding.zero3_buffers`); `trained` maps a
    trained module's path to its trainable numel."""
    z = zero3_settings(setup, spec.hidden_size)
    persistent = sum(p.numel for p in arch.params if p.numel <= z.param_persistence_threshold)
    return zero3_buffers(max(m.numel for m in arch.modules), persistent, max(trained.values(), default=0),
                         trainable, precision.weight_bytes, precision.grad_bytes, z)


def plan_full(spec: ModelSpec, setup: TrainSetup, gpu: Gpu, fewest_only: bool = False) -> MethodPlan:
    """Full fine-tuning: every parameter is trained and saved."""
    precision = get_precision(setup.precision)
    arch = layout(spec, setup.task, setup.num_labels)
    params = arch.params
    total = arch.total_params
    dtype = _save_dtype(setup, precision)
    ckpt = checkpoint_sizes.safetensors_bytes(params, dtype)
    wide = _fp32_kept(spec, arch, precision)
    weights = (dense_weight_bytes("weights_trainable", total - sum(p.numel for p in wide),
                                  precision.weight_bytes, "trainable"),)
    states = _states(total, params, setup, precision)
    if wide:
        names = {p.name for p in wide}
        rest = tuple(p for p in params if p.name not in names)
        weights += (_fp32_weight_term(wide),)
        states = _joined_states(_states(total - sum(p.numel for p in wide), rest, setup, precision),
                                _states(sum(p.numel for p in wide), wide, setup, FP32_ADAPTERS),
                                "kept in fp32")
    return _assemble(
        "full", gpu, weights, states, setup, spec,
        _zero3(spec, setup, arch, precision, {m.path: m.numel for m in arch.modules}, total),
        flops_per_token=cost.full_flops_per_token(
            *_matmul_params(spec, setup.task, setup.num_labels),
            cost.attention_forward_flops(spec, _attended(setup)), setup.grad_checkpointing,
            checkpointed_share(setup, spec.num_layers)),
        paged_optimizer_states=paged_optimizer_term(setup.optimizer, params),
        rank=None, trainable_params=total, all_params=total, target_modules=(),
        wrapped_modules=0,
        checkpoint=Term("checkpoint", ckpt, f"safetensors, {len(params)} tensors in {dtype}"),
        full_checkpoint_bytes=ckpt,
        storage=checkpoint_sizes.storage_for_tasks(setup.tasks, ckpt, ckpt),
        fewest_only=fewest_only,
    )


def _split_4bit_biases(frozen: list[Param], quantised: set[str], setup: TrainSetup, precision: Precision,
                       weight_terms: list[Term]) -> list[Param]:
    """The frozen biases of bitsandbytes' 4-bit layers as their own term when the release holds them
    at another width than the weights' (`quant.bnb_bias_bytes`); the other frozen tensors returned."""
    if setup.quant_backend != "bnb":
        return frozen
    width = bnb_bias_bytes(parse_bnb_version(setup.bnb_version), COMPUTE_DTYPES[setup.bnb_compute_dtype],
                           precision.weight_bytes)
    biases = [p for p in frozen if p.name.endswith(".bias")
              and p.name.removesuffix(".bias") + ".weight" in quantised]
    if width == precision.weight_bytes or not biases:
        return frozen
    weight_terms.append(dense_weight_bytes(
        "weights_4bit_biases", sum(p.numel for p in biases), width,
        f"4-bit layers' bias (bitsandbytes {setup.bnb_version} Linear4bit casts it to "
        f"bnb_4bit_compute_dtype {setup.bnb_compute_dtype} in its first forward)"))
    names = {p.name for p in biases}
    return [p for p in frozen if p.name not in names]


def plan_lora(spec: ModelSpec, setup: TrainSetup, gpu: Gpu, fewest_only: bool = False) -> MethodPlan:
    """LoRA or QLoRA: a frozen base (16-bit, or NF4 linear layers for QLoRA) plus adapters."""
    precision = get_precision(setup.precision)
    arch = layout(spec, setup.task, setup.num_labels)
    trainable = lora_trainable(spec, setup)
    in_place = {p.name for p in trainable.biases}  # trained where they are, not copied
    frozen = [p for p in arch.params if p.name not in in_place]

    weight_terms: list[Term] = []
    nf4: list[Param] = []
    if setup.method == "qlora":
        check_split_expert_targets(spec, setup, trainable)
        quantised = quantised_params(arch, trainable, quantises_experts(spec, setup))
        nf4 = [p for p in frozen if p.name in quantised]
        frozen = [p for p in frozen if p.name not in quantised]
        if setup.quant_backend == "torchao" and not setup.double_quant:
            raise PlanError("--no-double-quant: torchao's NF4Tensor always quantises its block scalers "
                            "(to_nf4); drop it or plan --quant-backend bnb")
        weight_terms.append(quantized_weight_bytes(nf4, setup.double_quant, setup.quant_backend,
                                                   precision.weight_bytes))
        frozen = _split_4bit_biases(frozen, quantised, setup, precision, weight_terms)
    wide = {p.name for p in _fp32_kept(spec, arch, precision)}
    if wide:
        weight_terms.append(_fp32_weight_term([p for p in frozen if p.name in wide]))
        frozen = [p for p in frozen if p.name not in wide]
    frozen_numel = sum(p.numel for p in frozen)
    weight_terms.append(dense_weight_bytes("weights_frozen", frozen_numel, precision.weight_bytes, "frozen"))
    fp32 = fp32_adapters(setup.method, precision, setup.adapter_dtype)
    if fp32:  # PEFT's default: fp32 adapters over the 16-bit base; the rest trains in the base's dtype
        weight_terms.append(dense_weight_bytes("weights_adapters", trainable.adapter_count,
                                               FP32_ADAPTERS.weight_bytes, "fp32 adapter"))
        rest = trainable.count - trainable.adapter_count
        if rest:
            weight_terms.append(dense_weight_bytes("weights_trainable", rest, precision.weight_bytes,
                                                   "other trainable"))
        states = _split_states(trainable, setup, precision)
    else:
        weight_terms.append(dense_weight_bytes("weights_trainable", trainable.count,
                                               precision.weight_bytes, "trainable"))
        states = _states(trainable.count, trainable.params, setup, precision)

    base_dtype = _save_dtype(setup, precision)
    # PEFT saves the adapters as they are stored: fp32 adapters in fp32, unless a dtype is asked for
    dtype = "fp32" if fp32 and setup.save_dtype == "auto" else base_dtype
    adapter_params = trainable.file_params
    adapter = checkpoint_sizes.safetensors_bytes(adapter_params, dtype)
    base = checkpoint_sizes.safetensors_bytes(arch.params, base_dtype)
    skipped, attention_skipped = input_gradient_skips(spec, setup)
    flops = cost.lora_flops_per_token(
        *_matmul_params(spec, setup.task, setup.num_labels), trainable.adapter_count,
        trainable.saved_module_count, cost.attention_forward_flops(spec, _attended(setup)),
        setup.grad_checkpointing, skipped, attention_skipped, spec.num_layers,
        checkpointed_share(setup, spec.num_layers))
    if nf4:
        flops = cost.plus(flops, cost.dequant_flops_per_token(
            sum(p.numel for p in nf4), setup.batch_size * setup.seq_len, setup.grad_checkpointing,
            checkpointed_share(setup, spec.num_layers)))
    # The frozen base is gathered without gradients; the adapters' are the trained modules.
    return _assemble(
        setup.method, gpu, tuple(weight_terms),
        states, setup, spec,
        _zero3(spec, setup, arch, precision, {a.module.path: a.numel for a in trainable.adapters},
               trainable.count),
        unsharded={"weights": unsharded_quant_state(nf4, setup)},
        flops_per_token=flops,
        paged_optimizer_states=paged_optimizer_term(setup.optimizer, trainable.params),
        rank=setup.rank, trainable_params=trainable.count,
        all_params=arch.total_params + trainable.adapter_count + trainable.saved_module_count,
        target_modules=trainable.target_names, wrapped_modules=len(trainable.adapters),
        adapter_formula=trainable.formula,
        checkpoint=Term("checkpoint", adapter,
                        f"adapter_model.safetensors, {len(adapter_params)} tensors in {dtype}"),
        full_checkpoint_bytes=base,
        storage=checkpoint_sizes.storage_for_tasks(setup.tasks, base, adapter),
        fewest_only=fewest_only,
    )


def unsharded_quant_state(nf4: list[Param], setup: TrainSetup) -> int:
    """The part of the 4-bit base no sharding strategy shards. bitsandbytes keeps each layer's
    quantisation state in `quant_state`, a module attribute, not a parameter: every GPU holds it
    whole (`quant.nf4_state_bytes`). torchao 0.18.0's NF4Tensor shards its scalers with its codes
    (`nf4_tensor.py`, `nf4_split` / `nf4_all_gather_into_tensor`), all but its mean and code table
    (`quant.torchao_replicated_bytes`)."""
    if setup.quant_backend == "torchao":
        return len(nf4) * torchao_replicated_bytes(get_precision(setup.precision).weight_bytes)
    return sum(nf4_state_bytes(p.numel, setup.double_quant) for p in nf4)


def plan_dense(size: DenseSize, setup: TrainSetup, gpu: Gpu, fewest_only: bool = False) -> MethodPlan:
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
        _states(n, params, setup, precision, tensors_known=False), setup, None,
        flops_per_token=cost.dense_flops_per_token(n, setup.grad_checkpointing),
        paged_optimizer_states=paged_optimizer_term(setup.optimizer, params),
        rank=None, trainable_params=n, all_params=n, target_modules=(), wrapped_modules=0,
        checkpoint=Term("checkpoint", ckpt, f"{n:,} x {DTYPE_BYTES[dtype]} B ({dtype}), tensor data only"),
        full_checkpoint_bytes=ckpt,
        storage=checkpoint_sizes.storage_for_tasks(setup.tasks, ckpt, ckpt),
        fewest_only=fewest_only,
    )


def _recorded_temporary(step: RecordedStep, setup: TrainSetup) -> Term:
    """The optimizer step's temporary over the recorded trainable tensors, as `step._temporary`
    makes it: with fp32 adapters over a 16-bit base, the larger of the two dtype groups'."""
    precision = get_precision(setup.precision)
    impl = setup.optimizer_impl or "foreach"
    fp32 = setup.method != "full" and fp32_adapters(setup.method, precision, setup.adapter_dtype)
    adapters = tuple(p for p in step.trainable if fp32 and is_adapter(p.name))
    rest = tuple(p for p in step.trainable if not (fp32 and is_adapter(p.name)))

    def of(params: tuple[Param, ...], convention: Precision) -> Term:
        if setup.optimizer == "adafactor":
            return adafactor_temporary_term(tuple(p.shape for p in params), convention)
        return optimizer_temporary_term(setup.optimizer, impl, tuple(p.numel for p in params),
                                        convention.state_bytes)
    groups = [of(g, c) for g, c in ((adapters, FP32_ADAPTERS), (rest, precision)) if g]
    return max(groups, key=lambda t: t.bytes)


def _recorded_zero3(model: RecordedModel, trainable: tuple[Param, ...], setup: TrainSetup,
                    precision: Precision) -> dict[str, Term]:
    """ZeRO-3's run-time buffers (`sharding.zero3_buffers`) from the recorded model's tensors, as
    `_zero3` takes them from a layout: a module's numel is its own tensors'; a trained module's, its
    trainable tensors' (an adapter's A and B belong to the layer they wrap)."""
    z = zero3_settings(setup, model.hidden_size)
    modules: dict[str, int] = {}
    for p in model.params:
        path = p.name.rsplit(".", 1)[0]
        modules[path] = modules.get(path, 0) + p.numel
    trained: dict[str, int] = {}
    for p in trainable:
        path = p.name.split(".lora_")[0] if is_adapter(p.name) else p.name.rsplit(".", 1)[0]
        trained[path] = trained.get(path, 0) + p.numel
    persistent = sum(p.numel for p in model.params if p.numel <= z.param_persistence_threshold)
    return zero3_buffers(max(modules.values()), persistent, max(trained.values(), default=0),
                         sum(p.numel for p in trainable), precision.weight_bytes, precision.grad_bytes, z)


def _check_recorded_qlora(setup: TrainSetup, precision: Precision) -> None:
    """A recorded QLoRA step is LoRA's over the 16-bit base: a 4-bit layer that keeps its input for
    backward (bitsandbytes before 0.43.2, `quant.nf4_saved_input_bytes`) is not in the recording."""
    if qlora_conditions(setup, precision).get("nf4_saved_input"):
        raise PlanError(f"bitsandbytes {setup.bnb_version} keeps each 4-bit layer's input for backward, "
                        "which a model recorded from transformers does not count: plan a release from "
                        "0.43.2 on")


# What a plan of gated-DeltaNet layers models, and what the GPU kernels transformers prefers would keep
# instead (read from fla's `ChunkGatedDeltaRuleFunction` and causal-conv1d's `CausalConv1dFn`)
LINEAR_ATTENTION_NOTE = (
    "linear-attention layers are planned as transformers runs them without the optional kernels (its "
    "torch fallback: F.conv1d + silu, torch_chunk_gated_delta_rule in 64-token chunks, which keeps "
    "fp32 (chunk x chunk) blocks and every chunk's recurrent state); with flash-linear-attention and "
    "causal-conv1d installed on a GPU, the delta rule keeps only the l2-normed q and k with their "
    "rstd, v, the cumulative decay, beta and the solved (chunk x chunk) system, recomputing the "
    "chunk states in backward, and the convolution keeps its input and weight (silu fused, its "
    "output recomputed): fewer activation bytes than planned here")


def _recorded_units(model: RecordedModel, step: RecordedStep, setup: TrainSetup, precision: Precision,
                    nf4: list[Param]) -> tuple:
    """FSDP2's units of a recorded model (`recorded.fsdp_units`) and the embeddings' output, which the
    start of forward holds: tokens x hidden x weight bytes (the embedding's output at the weights'
    width)."""
    from .quant import nf4_gathered_bytes

    w = precision.weight_bytes
    fp32 = setup.method != "full" and fp32_adapters(setup.method, precision, setup.adapter_dtype)
    quantised = {p.name for p in nf4}

    def grad_bytes(p: Param) -> int:
        return FP32_ADAPTERS.grad_bytes if fp32 and is_adapter(p.name) else precision.grad_bytes

    def nf4_saving(p: Param) -> int:
        return p.numel * w - nf4_gathered_bytes(setup.quant_backend, p.numel, w) if p.name in quantised else 0
    head = step.positions["top"][4].at(model.num_layers) if "top" in step.positions else 0
    return (fsdp_units(model, step.trainable, w, grad_bytes, head, nf4_saving),
            setup.batch_size * setup.seq_len * model.hidden_size * w)


def plan_recorded(model: RecordedModel, setup: TrainSetup, gpu: Gpu, fewest_only: bool = False) -> MethodPlan:
    """Any method for a model planned from its recorded step (`recorded.py`): the model states from
    the meta-device build's tensors, exactly as `plan_full` and `plan_lora` count them; activations
    and the step's phases from the recorded lines; FLOPs by `cost.full_flops_per_token` and
    `cost.lora_flops_per_token` over its linear weights, without an attention term."""
    if setup.checkpoint_every > 1:
        raise PlanError("--checkpoint-every is planned for the families laid out natively; a model "
                        "recorded from transformers is recorded with every layer checkpointed or none")
    precision = get_precision(setup.precision)
    step = model.step(setup)
    params, total = model.params, model.total_params
    base_dtype = _save_dtype(setup, precision)
    base = checkpoint_sizes.safetensors_bytes(params, base_dtype)
    no_attention = cost.Quantity("attention_flops", 0, "attention not counted (recorded model)")
    if setup.method == "full":
        return _assemble(
            "full", gpu,
            (dense_weight_bytes("weights_trainable", total, precision.weight_bytes, "trainable"),),
            _states(total, params, setup, precision), setup, None,
            _recorded_zero3(model, params, setup, precision), fewest_only=fewest_only,
            recorded=step, recorded_layers=model.num_layers,
            recorded_units=_recorded_units(model, step, setup, precision, []),
            flops_per_token=cost.full_flops_per_token(model.matmul_params, model.head_params, no_attention,
                                                      setup.grad_checkpointing,
                                                      checkpointed_share(setup, model.num_layers)),
            paged_optimizer_states=paged_optimizer_term(setup.optimizer, params),
            rank=None, trainable_params=total, all_params=total, target_modules=(), wrapped_modules=0,
            checkpoint=Term("checkpoint", base, f"safetensors, {len(params)} tensors in {base_dtype}"),
            full_checkpoint_bytes=base, storage=checkpoint_sizes.storage_for_tasks(setup.tasks, base, base))
    in_place = {p.name for p in step.trainable}  # trained biases: trained where they are
    frozen = [p for p in params if p.name not in in_place]
    weight_terms: list[Term] = []
    nf4: list[Param] = []
    if setup.method == "qlora":
        _check_recorded_qlora(setup, precision)
        quantisable = set(model.quantisable)
        nf4 = [p for p in frozen if p.name in quantisable]
        frozen = [p for p in frozen if p.name not in quantisable]
        weight_terms.append(quantized_weight_bytes(nf4, setup.double_quant, setup.quant_backend,
                                                   precision.weight_bytes))
        frozen = _split_4bit_biases(frozen, quantisable, setup, precision, weight_terms)
    weight_terms.append(dense_weight_bytes("weights_frozen", sum(p.numel for p in frozen),
                                           precision.weight_bytes, "frozen"))
    count = sum(p.numel for p in step.trainable)
    fp32 = fp32_adapters(setup.method, precision, setup.adapter_dtype)
    if fp32:
        adapters = tuple(p for p in step.trainable if is_adapter(p.name))
        rest = tuple(p for p in step.trainable if not is_adapter(p.name))
        weight_terms.append(dense_weight_bytes("weights_adapters", step.adapter_params,
                                               FP32_ADAPTERS.weight_bytes, "fp32 adapter"))
        if rest:
            weight_terms.append(dense_weight_bytes("weights_trainable", count - step.adapter_params,
                                                   precision.weight_bytes, "other trainable"))
        states = _adapter_and_rest_states(adapters, rest, setup, precision)
    else:
        weight_terms.append(dense_weight_bytes("weights_trainable", count, precision.weight_bytes,
                                               "trainable"))
        states = _states(count, step.trainable, setup, precision)
    dtype = "fp32" if fp32 and setup.save_dtype == "auto" else base_dtype
    adapter = checkpoint_sizes.safetensors_bytes(step.trainable, dtype)
    flops = cost.lora_flops_per_token(model.matmul_params, model.head_params, step.adapter_params,
                                      count - step.adapter_params, no_attention, setup.grad_checkpointing,
                                      share=checkpointed_share(setup, model.num_layers))
    return _assemble(
        setup.method, gpu, tuple(weight_terms), states, setup, None,
        _recorded_zero3(model, step.trainable, setup, precision), fewest_only=fewest_only,
        recorded=step, recorded_layers=model.num_layers,
        recorded_units=_recorded_units(model, step, setup, precision, nf4),
        dequant=dequant_term(setup, [p.numel for p in nf4], precision).bytes if nf4 else 0,
        unsharded={"weights": unsharded_quant_state(nf4, setup)},
        paged_optimizer_states=paged_optimizer_term(setup.optimizer, step.trainable),
        flops_per_token=flops, rank=setup.rank, trainable_params=count, all_params=step.all_params,
        target_modules=step.target_modules, wrapped_modules=step.wrapped_modules,
        adapter_formula="counted on PEFT's model built on the meta device",
        checkpoint=Term("checkpoint", adapter,
                        f"adapter_model.safetensors, {len(step.trainable)} tensors in {dtype}"),
        full_checkpoint_bytes=base, storage=checkpoint_sizes.storage_for_tasks(setup.tasks, base, adapter))


def check_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    """The methods asked for, each one we plan, or a PlanError naming the choices."""
    for m in methods:
        if m not in METHODS:
            raise PlanError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return methods


def make_plan(model: ModelSpec | DenseSize | RecordedModel, setups: tuple[TrainSetup, ...], gpu: Gpu,
              workload: cost.Workload | None = None, fewest_only: bool = False) -> Plan:
    """Plan each setup (one per method and rank) for one model on one kind of GPU; with a workload
    of tokens, also its time and cost. (`fit.with_fit` adds the largest batch and sequence.)
    `fewest_only`: each method's GPU counts are searched only as far as the fewest that hold it,
    which is all advice reads (`sharding.distribute`)."""
    if not setups:
        raise PlanError("nothing to plan: give at least one method")
    if workload is not None and workload.peak_tflops is not None:  # --tflops: this card's throughput
        gpu = replace(gpu, peak_tflops=workload.peak_tflops)
    setups = tuple(stacks.resolve(s) for s in setups)  # the stack's preset fills open choices
    plans = []
    for setup in setups:
        check_optimizer(setup.optimizer)
        get_precision(setup.precision)
        if setup.tasks < 1:
            raise PlanError(f"--tasks must be at least 1, got {setup.tasks}")
        if setup.method not in METHODS:
            raise PlanError(f"unknown method {setup.method!r}; choose from {', '.join(METHODS)}")
        if isinstance(model, DenseSize):
            plans.append(plan_dense(model, setup, gpu, fewest_only))
        elif isinstance(model, RecordedModel):
            plans.append(plan_recorded(model, setup, gpu, fewest_only))
        elif setup.method == "full":
            plans.append(plan_full(model, setup, gpu, fewest_only))
        else:
            plans.append(plan_lora(model, setup, gpu, fewest_only))
    if workload is not None and workload.tokens is not None:
        plans = [_with_compute(p, s, gpu, workload) for p, s in zip(plans, setups, strict=True)]
    notes = sharding_notes(setups[0], isinstance(model, DenseSize))
    qlora = [s for s in setups if s.method == "qlora"]
    if isinstance(model, ModelSpec) and model.num_experts and qlora and quantises_experts(model, qlora[0]) \
            and not qlora[0].quantize_experts:
        notes.append(
            f"QLoRA quantises {model.family}'s experts: transformers' bitsandbytes loading replaces the "
            "fused experts by one nn.Linear per expert and projection (SequentialLlama4TextExperts), "
            "which bitsandbytes makes 4-bit; its per-expert loop is planned as the fused bmm's activations")
    elif isinstance(model, ModelSpec) and model.num_experts and qlora:
        notes.append(
            "QLoRA keeps the fused 3-D expert weights in 16-bit: bitsandbytes quantises nn.Linear "
            "modules only (bitsandbytes#1849); --quantize-experts plans a stack that quantises them"
            if not setups[0].quantize_experts else
            "--quantize-experts: the fused expert weights are planned as NF4, which stock bitsandbytes "
            "does not do (bitsandbytes#1849)")
    if isinstance(model, ModelSpec):
        notes += family_notes(model, setups[0])
    if setups[0].optimizer in PAGED_OPTIMIZERS:
        notes.append(f"--optimizer {setups[0].optimizer}: bitsandbytes keeps the state buffers of tensors "
                     "with 100,000 values or more in CUDA unified memory (paged_optimizer_states): outside "
                     "the allocator, so outside the peak and the fit check; nvidia-smi counts them while "
                     "resident, and the driver moves them to host memory when the GPU runs short")
    qlora = next((s for s in setups if s.method == "qlora"), None)
    if qlora is not None:
        notes += quant_notes(qlora.quant_backend, qlora.bnb_version, qlora.bnb_compute_dtype,
                             get_precision(qlora.precision).weight_bytes)
    notes += cost.notes(workload, gpu, isinstance(model, DenseSize))
    if any(s.use_dora and fp32_adapters(s.method, get_precision(s.precision), s.adapter_dtype)
           for s in setups):
        # measured, not modelled: CPU traces of PEFT put such steps up to 6% above the plan
        notes.append("--dora with fp32 adapters is not yet held to traces: checkpointed steps traced "
                     "up to 6% above this plan")
    if isinstance(model, ModelSpec) and (setups[0].compile or "none") != "none":
        notes.append(compile_note(setups[0].compile, setups[0].grad_checkpointing))
    if any(s.use_dora and s.method == "qlora" for s in setups):
        notes.append("--dora with QLoRA counts the magnitude vectors only: PEFT dequantises the 4-bit "
                     "weight to form W + s*BA in every forward, which is not planned")
    if isinstance(model, RecordedModel):
        notes += [model.note(), *model.caveats]
        if any(s.method == "qlora" for s in setups):
            notes.append("QLoRA's step is recorded as LoRA's over the 16-bit base, plus one dequantised "
                         "weight in backward; the NF4 weights are every nn.Linear but the LM head")
        info = ModelInfo(model.name, model.model_type, model.total_params, model.source)
    elif isinstance(model, DenseSize):
        info = ModelInfo(model.name or "a dense model", "dense", model.total_params)
        notes.append("--params: model states and checkpoint tensor data only; no activations "
                     "without the model's shape, so peak is the sum of model states")
    else:
        first = setups[0]
        if first.seq_len > model.max_positions:
            notes.append(f"--seq-len {first.seq_len:,} is longer than {model.name}'s context of "
                         f"{model.max_positions:,} positions: the model cannot train on it as is")
        if model.source in PUBLISHED_NOTES:
            notes.append(PUBLISHED_NOTES[model.source])
        if model.linear_layers:
            notes.append(LINEAR_ATTENTION_NOTE)
        lora = next((s for s in setups if s.method != "full"), None)
        mlp_note = unwrapped_mlp_note(model, lora) if lora is not None else None
        if mlp_note:
            notes.append(mlp_note)
        info = ModelInfo(model.name, model.family,
                         layout(model, first.task, first.num_labels).total_params, model.source, model)
    return Plan(info, setups[0], gpu, tuple(plans), tuple(notes), workload)


def compile_note(mode: str, checkpointed: bool) -> str:
    """What `--compile` changes in the plan and what it leaves as eager's."""
    text = (f"--compile {mode}: each compiled graph saves what torch's min-cut partition keeps "
            "(pointwise results recomputed in backward, matmul and attention inputs kept, one cast per "
            "tensor); the transients inside a compiled layer are planned as eager's")
    if mode == "model":
        text += ("; the whole model builds an explicit causal mask (SDPA then repeats k and v to every "
                 "head) and fuses the loss's fp32 upcast")
    if checkpointed:
        text += ("; with the `kernels` package installed, transformers' hub-kernel layers break the "
                 "graph inside a checkpointed layer, which then runs (and saves) as in eager")
    return text


def family_notes(model: ModelSpec, setup: TrainSetup) -> list[str]:
    """What a family's plan assumes beyond its shape: GPT-OSS's MXFP4 checkpoint, dequantised to
    bf16 for training (`checkpoint_sizes.mxfp4_tensor_bytes`), and which kernel --attention sdpa
    stands for when transformers' SDPA takes no attention sinks."""
    from .units import format_bytes

    notes = []
    if model.family in checkpoint_sizes.MXFP4_FAMILIES:
        experts, rest = checkpoint_sizes.mxfp4_tensor_bytes(layout(model).params)
        notes.append(f"{model.name} as OpenAI publishes it stores its experts in MXFP4 "
                     f"({format_bytes(experts + rest)} of tensor data, {format_bytes(experts)} of it "
                     "experts); transformers trains it dequantised (Mxfp4Config(dequantize=True)), so "
                     "every weight planned here is bf16")
    if model.attention_sinks and setup.attention == "sdpa":
        notes.append("--attention sdpa with attention sinks plans a fused kernel that takes them "
                     "(kernels-community/vllm-flash-attn3: q, k, v, output and log-sum-exp kept); "
                     "transformers' own SDPA does not, and on CPU the model runs --attention eager")
    return notes


def _with_compute(p: MethodPlan, setup: TrainSetup, gpu: Gpu, workload: cost.Workload) -> MethodPlan:
    """Time and cost on --num-gpus GPUs, or on the fewest that hold the model states."""
    num_gpus = setup.num_gpus or p.gpus_needed or 1
    return replace(p, compute=cost.training_time(p.flops_per_token, workload.tokens, gpu, num_gpus, workload))
