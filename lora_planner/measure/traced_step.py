"""Trace one real training step of a planned setup and put it beside the prediction.

The model is built from the planner's own `ModelSpec` (through `to_hf_config`), with random weights:
on CPU for real, or under `FakeTensorMode` (`fake=True`) so that shapes far beyond this machine's
memory trace in seconds. LoRA uses PEFT with the same targets the planner resolved. The step is
forward (causal-LM loss), backward, optimizer step, `zero_grad(set_to_none=True)`, run once
untraced (so the optimizer's states exist, as in every step of a run but the first) and then traced.
The setup's stack choices run as named: AdamW or SGD with the fused, foreach or for-loop kernel
forced (transformers' Adafactor has one implementation), and the standard or chunked cross-entropy
(`step.chunked_loss`); Liger's fused linear cross-entropy needs a GPU and is refused here.

A compiled setup (`--compile layers|model`, `compile_model`) runs torch.compile's inductor kernels:
a dispatch mode entered around them makes the compiled code fall back to eager, and they allocate
their buffers below the dispatcher, so the tracer is not entered and the allocator's peak is the
step's one reading (the other terms are left 0, their errors None).

Supported precisions are those a plain PyTorch step realises: `fp32`, and `amp` (bf16 autocast over
fp32 weights); `pure-bf16` builds the model in bf16 (AdamW then keeps bf16 states). `mixed` and `bf16`
need an fp32 master copy or fp32 states over bf16 weights, which torch's AdamW does not keep.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import PlanError
from ..gpus import GPUS
from ..plan import make_plan
from ..spec import ModelSpec, TrainSetup, check_runnable_attention, to_hf_config
from ..stacks import get_stack, resolve

if TYPE_CHECKING:
    from ..step import StepPrediction
    from ..timeline import Phase
    from .allocator import AllocatorReading
    from .tracer import TraceReport

TRACEABLE_PRECISIONS = ("fp32", "amp", "pure-bf16")
TERMS = ("weights", "gradients", "optimizer_states", "activations")
TRACEABLE_OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "adafactor")


@dataclass(frozen=True)
class Comparison:
    predicted: dict[str, int]
    traced: dict[str, int]
    predicted_phase: str
    traced_phase: str
    # the most bytes live within each phase (forward, backward, optimizer), predicted and traced
    predicted_phases: dict[str, int] = field(default_factory=dict)
    traced_phases: dict[str, int] = field(default_factory=dict)
    # the allocator's own count of the traced step (`trace(..., allocator=True)`), else None
    allocator: AllocatorReading | None = None
    # the plan's peak over the tracer's terms (`timeline.tracer_peak`), when it is not `predicted`'s:
    # the tracer's phases and peak are held against it, the allocator's peak against the whole
    predicted_tracer_peak: int | None = None
    # the moment of the plan's whole peak, spelt out (`timeline.Phase.what`)
    predicted_peak_what: str = ""

    @property
    def predicted_seen(self) -> dict[str, int]:
        """`predicted` over the tracer's own terms: its peak without the bytes made outside every op
        (`timeline.tracer_peak`), which the allocator's peak is held against instead."""
        if self.predicted_tracer_peak is None:
            return self.predicted
        return {**self.predicted, "peak": self.predicted_tracer_peak}

    def errors(self) -> dict[str, float | None]:
        """(predicted - traced) / traced per term and for the peak (`predicted_seen`); None where
        nothing was traced."""
        seen = self.predicted_seen
        return {k: (seen[k] - self.traced[k]) / self.traced[k] if self.traced[k] else None
                for k in (*TERMS, "peak")}

    def to_dict(self) -> dict:
        """The comparison; with an allocator reading, its keys too (`allocator_peak`, ...)."""
        out = {"predicted": self.predicted, "traced": self.traced,
               "peak_phase": {"predicted": self.predicted_phase, "traced": self.traced_phase},
               "phase_peaks": {"predicted": self.predicted_phases, "traced": self.traced_phases},
               "relative_error": self.errors()}
        if self.predicted_tracer_peak is not None and self.predicted_tracer_peak != self.predicted["peak"]:
            out["predicted_tracer_peak"] = self.predicted_tracer_peak
        if self.allocator is not None:
            out.update(self.allocator.to_dict(self.traced["peak"]))
        return out


def sliced(spec: ModelSpec, layers: int | None) -> ModelSpec:
    """The same model with only its first `layers` decoder layers (a slice traces like the whole)."""
    if layers is None:
        return spec
    if layers < 1:
        raise PlanError(f"--layers must be at least 1, got {layers}")
    return replace(spec, num_layers=min(layers, spec.num_layers), name=f"{spec.name}[:{layers} layers]")


def _fp32_adapters(setup: TrainSetup) -> bool:
    """fp32 LoRA adapters over a 16-bit base (`adapter_dtype`): PEFT's default."""
    from ..adapter_dtype import fp32_adapters
    from ..precision import get_precision

    return fp32_adapters(setup.method, get_precision(setup.precision), setup.adapter_dtype)


def _check(setup: TrainSetup) -> None:
    if setup.precision in ("mixed", "bf16") and _fp32_adapters(setup):
        pass  # the trainable tensors are fp32: a plain torch step over a bf16 model, under autocast
    elif setup.precision not in TRACEABLE_PRECISIONS:
        raise PlanError(f"trace runs plain PyTorch steps: precision must be one of "
                        f"{', '.join(TRACEABLE_PRECISIONS)}, got {setup.precision!r} (mixed and bf16 "
                        "trace LoRA with --adapter-dtype fp32, whose fp32 adapters need no master copy)")
    if setup.method not in ("full", "lora", "qlora"):
        raise PlanError(f"trace supports full, lora and qlora, got {setup.method!r}")
    if setup.method == "qlora":
        _check_qlora(setup)
    if setup.optimizer not in TRACEABLE_OPTIMIZERS:
        raise PlanError(f"trace runs torch's {', '.join(TRACEABLE_OPTIMIZERS)}; plan other optimizers "
                        "with `lora-plan plan`")
    if setup.task != "causal-lm":
        raise PlanError("trace runs the causal-LM loss")
    if setup.packing and (setup.loss or "standard") != "standard":
        raise PlanError("a packed trace gives the model its position ids: trace --packing with "
                        "--loss standard")
    if setup.loss == "fused-linear":
        raise PlanError("fused-linear cross-entropy runs Liger's Triton kernel on a GPU; trace --loss "
                        "standard or chunked on CPU")


def _check_qlora(setup: TrainSetup) -> None:
    """A QLoRA trace runs bitsandbytes' Linear4bit on CPU: real 4-bit storage and MatMul4Bit."""
    if setup.quant_backend != "bnb":
        raise PlanError(f"trace runs QLoRA with bitsandbytes' Linear4bit, and {setup.quant_backend} is "
                        "this setup's 4-bit backend: trace another --stack (torchao's NF4 is held to its "
                        "tensors in tests/test_qlora_backends.py)")
    if setup.compile != "none":
        raise PlanError("trace runs QLoRA's 4-bit matmul eagerly: drop --compile")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PlanError("tracing QLoRA needs bitsandbytes: pip install bitsandbytes") from None


def installed_bnb_version() -> str:
    """The bitsandbytes release a QLoRA trace runs, which its plan models (`quant.check_quant`)."""
    from importlib.metadata import version

    return version("bitsandbytes")


def quantise_bnb(model, compute_dtype, device: str = "cpu") -> None:
    """Every `nn.Linear` and GPT-2 `Conv1D` but the output head swapped for bitsandbytes'
    `Linear4bit` (NF4, double quantised, computing in `compute_dtype`), as transformers'
    `replace_with_bnb_linear` does with the output embeddings left out; a Conv1D's (in, out) weight
    is transposed first, as transformers does before quantising it. The weight is quantised on its
    move to `device` (`Params4bit._quantize`)."""
    import bitsandbytes as bnb
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            conv = isinstance(child, Conv1D)
            if not (conv or type(child) is torch.nn.Linear) or child is head:
                continue
            weight = child.weight.data.t().contiguous() if conv else child.weight.data  # (out, in)
            q = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, q.to(device))


def predicted_terms(spec: ModelSpec, setup: TrainSetup, device: str = "cpu",
                    tracer: bool = False) -> tuple[dict[str, int], str]:
    """The planner's figures for the traced step, on the device the trace runs on, and the phase of
    its peak: the whole peak, or with `tracer` the peak over the terms the tracer counts
    (`timeline.tracer_peak`), for a step the tracer reads."""
    predicted, seen, _, whole = _prediction(spec, setup, device)
    if tracer:
        return {**predicted, "peak": seen.bytes}, seen.name
    return predicted, whole.name


def predicted_step(spec: ModelSpec, setup: TrainSetup,
                   device: str = "cpu") -> tuple[dict[str, int], StepPrediction]:
    """The plan's model-state bytes and step for the traced step on `device`."""
    from ..precision import get_precision
    from ..step import predict_step

    setup = resolve(setup)
    plan = make_plan(spec, (setup,), GPUS[0]).plans[0]
    memory = {k: t.bytes for k, t in plan.memory.items()}
    precision = get_precision(setup.precision)
    if device == "cpu" and setup.optimizer == "adamw" and setup.optimizer_impl != "fused":
        # foreach and for-loop AdamW keep the step counter as a 4-byte tensor per parameter tensor
        # in CPU memory (fused keeps it on the device, and the plan counts it already)
        memory["optimizer_states"] += 4 * _trainable_tensors(spec, setup)
    return memory, predict_step(spec, setup, precision, memory, device)


def _prediction(spec: ModelSpec, setup: TrainSetup,
                device: str) -> tuple[dict[str, int], Phase, dict[str, int], Phase]:
    """`predicted_terms`' figures (the whole peak's bytes), the moment of the plan's peak over the
    terms the tracer counts, the most bytes of those the plan has live within each phase, and the
    moment of the whole peak."""
    from ..timeline import tracer_peak

    memory, step = predicted_step(spec, setup, device)
    # the tracer sees ops' tensors only: its peak is held against the plan's over the same terms,
    # without what the plan counts made outside every op (`timeline.tracer_peak`)
    seen = tracer_peak(step.phases)
    predicted = {
        "weights": memory["weights"],
        "gradients": memory["gradients"],
        "optimizer_states": memory["optimizer_states"] + memory["master_weights"],
        "activations": step.activations,
        "peak": step.peak.bytes,
    }
    phases: dict[str, int] = {}
    for p in step.phases:
        phases[p.name] = max(phases.get(p.name, 0), p.bytes - p.untraced)
    return predicted, seen, phases, step.peak


def _trainable_tensors(spec: ModelSpec, setup: TrainSetup) -> int:
    from ..architecture import layout
    from ..counts import lora_trainable

    if setup.method == "full":
        return len(layout(spec, setup.task, setup.num_labels).params)
    return len(lora_trainable(spec, setup).params)


def trace(spec: ModelSpec, setup: TrainSetup, *, fake: bool = False, seed: int = 0,
          hf_config: dict | None = None, allocator: bool = False, device: str = "cpu") -> Comparison:
    """Run (or fake) one step of `setup` on `spec` on `device` (cpu, or cuda: the first GPU torch
    sees) and compare it with the prediction for that device.

    The model is built from `to_hf_config(spec)`, or from `hf_config` when given: a config.json the
    spec was read from, so that transformers, not our inverse mapping, decides what is built.
    With `allocator`, the traced step also runs under torch's profiler, and the comparison carries
    the allocator's peak beside the tracer's (`allocator.reading`); a fake step has none.
    """
    setup = resolve(setup)
    _check(setup)
    if setup.method == "qlora":  # the plan models the release that runs
        setup = replace(setup, bnb_version=installed_bnb_version())
    check_runnable_attention(spec, setup.attention)
    compiled = setup.compile != "none"
    if fake and setup.method == "qlora":
        raise PlanError("bitsandbytes quantises real weights: trace --method qlora without --fake")
    if compiled and fake:
        raise PlanError("a compiled step runs inductor's kernels on real tensors: trace --compile without "
                        "--fake")
    if setup.compile == "layers+loss":
        raise PlanError("trace runs its loss eagerly (the model's own): trace --compile layers; the "
                        "compiled loss is held to the allocator in tests/test_compile_loss.py")
    allocator = allocator or compiled  # a compiled step's only reading is the allocator's
    check_device(device, fake)
    if fake and spec.num_experts and setup.precision != "pure-bf16":
        # torch's fake (meta) kernel for _grouped_mm accepts bf16 operands only, as its CUDA kernel does
        raise PlanError("a fake trace runs the experts' grouped matmul through torch's meta kernel, which "
                        "takes bf16 only: trace fused experts with --fake --precision pure-bf16, or "
                        "without --fake")
    from transformers import AutoConfig

    predicted, seen, predicted_phases, whole = _prediction(spec, setup, device)
    config = AutoConfig.for_model(**(to_hf_config(spec) if hf_config is None else hf_config))
    report, reading = run_step(config, setup, spec.vocab_size, fake=fake, seed=seed, allocator=allocator,
                               adapt=lambda model: _with_lora(model, spec, setup), device=device)
    if report is None:  # compiled: only the peak is measured, the other terms left 0 (errors None)
        traced = dict.fromkeys(TERMS, 0) | {"peak": reading.peak_bytes}
        return Comparison(predicted, traced, whole.name, reading.phase, predicted_phases, {}, reading,
                          predicted_peak_what=whole.what)
    traced = {
        "weights": report.terms["parameters"],
        "gradients": report.terms["gradients"],
        "optimizer_states": report.terms["optimizer_states"],
        "activations": report.terms["activations"],
        "peak": report.peak_bytes,
    }
    return Comparison(predicted, traced, seen.name, report.peak_phase, predicted_phases,
                      dict(report.phase_peaks), reading, seen.bytes, whole.what)


def check_device(device: str, fake: bool) -> None:
    """A one-line error for a device the step cannot run on here."""
    if device == "cpu":
        return
    if device != "cuda":
        raise PlanError(f"trace runs on cpu or cuda, got {device!r}")
    if fake:
        raise PlanError("a fake step allocates nothing on any device: trace --fake on cpu")
    import torch

    if not torch.cuda.is_available():
        raise PlanError("trace --device cuda needs a CUDA GPU, and torch sees none here")


def run_step(config, setup: TrainSetup, vocab_size: int, *, fake: bool = False, seed: int = 0,
             allocator: bool = False, adapt=None,
             device: str = "cpu") -> tuple[TraceReport | None, AllocatorReading | None]:
    """Build the causal LM transformers makes of `config` (a `PretrainedConfig`, changed in place:
    no KV cache, the setup's attention and dropout), run one untraced step and trace the next (see
    the module docstring); `adapt(model)` returns it with LoRA applied when the setup is LoRA.
    The tracer's report, and with `allocator` the allocator's reading (none for a fake step); a
    compiled setup has no report (None), only the allocator's reading. On `cuda` the model, its
    adapters and the batch are made on the GPU (a device context around the build: PEFT's moves of
    new adapters are skipped, `apply_lora`), and the tracer counts the GPU's storages only."""
    # a fake step cannot run inductor's kernels: it runs eagerly (`trace` refuses the pair)
    compiled = (setup.compile or "none") != "none" and not fake
    if setup.method in ("lora", "qlora"):
        try:
            import peft  # noqa: F401
        except ImportError:
            raise PlanError("tracing LoRA needs peft: pip install peft") from None
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import allocator as alloc
    from .step import step_loss, train_step
    from .tracer import MemoryTracer

    configure(config, setup)
    torch.manual_seed(seed)
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode, torch.device(device):
        model = build_model(config, setup, adapt, device)
        compile_model(model, setup.compile if compiled else "none")
        positions = None
        packed = setup.packing and setup.batch_size > 1  # one sequence has nothing to pack
        if packed:  # the batch's sequences as one row, positions restarting per sequence
            ids = torch.randint(0, vocab_size, (1, setup.batch_size * setup.seq_len))
            positions = torch.arange(setup.seq_len).repeat(setup.batch_size)[None]  # (1, T)
        else:
            ids = torch.randint(0, vocab_size, (setup.batch_size, setup.seq_len))
        labels = ids.clone()
        params = [p for p in model.parameters() if p.requires_grad]
        if setup.optimizer_in_backward:
            optimizer = StepInBackward(params, lambda group: _optimizer(torch, group, setup))
        else:
            optimizer = _optimizer(torch, params, setup)
        compute_dtype = autocast_dtype(setup)
        loss_fn = step_loss(setup.loss, setup.loss_chunks)

        def step(tracer: MemoryTracer | None) -> None:
            train_step(model, optimizer, ids, labels, compute_dtype=compute_dtype, loss_fn=loss_fn,
                       phase=tracer.phase if tracer else lambda _name: contextlib.nullcontext(),
                       position_ids=positions)

        with _unpacked(fake and not packed):
            step(None)  # the first step creates the optimizer's states; a run's later steps keep them
            profiling = allocator and not fake
            inputs = (ids, labels) if positions is None else (ids, labels, positions)
            tracer = MemoryTracer(model, optimizer, inputs=inputs, annotate=profiling and not compiled,
                                  device=None if device == "cpu" else device)
            baseline = tracer.live_bytes()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()  # the step's own peak, from what is live now
            # a dispatch mode makes the compiled code fall back to eager: a compiled step is profiled
            # with no tracer entered (the allocator's peak is then its only reading)
            with alloc.profiled() if profiling else contextlib.nullcontext() as prof, \
                    tracer if not compiled else contextlib.nullcontext():
                if compiled:  # the phases marked for the allocator's reading, no tracer
                    train_step(model, optimizer, ids, labels, compute_dtype=compute_dtype, loss_fn=loss_fn,
                               phase=lambda name: alloc.profiler_range(f"{alloc.PHASE_RANGE}{name}"),
                               position_ids=positions)
                else:
                    step(tracer)
    reading = None
    if allocator:
        reading = (alloc.reading(prof, [] if compiled else tracer.calls, baseline, device) if not fake else
                   alloc.unavailable("under FakeTensorMode nothing is allocated"))
        if device == "cuda":
            reading = alloc.with_cuda_counter(reading, torch.cuda.max_memory_allocated())
    return (None if compiled else tracer.report()), reading


def configure(config, setup: TrainSetup) -> None:
    """`config` (a `PretrainedConfig`, changed in place) as a step of `setup` runs it: no KV cache,
    the setup's attention, and its dropout over every rate the config states."""
    config.use_cache = False
    config._attn_implementation = setup.attention
    if setup.dropout is not None:
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, setup.dropout)


def build_model(config, setup: TrainSetup, adapt=None, device: str = "cpu"):
    """The causal LM of `config` in training mode, in the setup's dtype (fp32 for fp32 and amp, else
    bf16), checkpointed when the setup is, its linear layers quantised by bitsandbytes for QLoRA
    (`quantise_bnb`), and `adapt(model)` when it is LoRA or QLoRA. Inside a `FakeTensorMode` its
    tensors are fake."""
    import torch
    from transformers import AutoModelForCausalLM

    from .step import enable_checkpointing

    dtype = torch.float32 if setup.precision in ("fp32", "amp") else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # fake parameters cannot be converted after the fact
    try:
        model = AutoModelForCausalLM.from_config(config)
        model.loss_type = "ForCausalLM"  # GPT2LMHeadModel names no loss: say it, no warning
    finally:
        torch.set_default_dtype(previous)
    model.train()
    if setup.grad_checkpointing:
        enable_checkpointing(model, setup.checkpoint_every, get_stack(setup.stack).checkpoint_offset == 1,
                             setup.checkpoint_ops)
    if setup.method == "qlora":
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        quantise_bnb(model, dtypes[setup.bnb_compute_dtype], device)
    if setup.method in ("lora", "qlora"):
        model = adapt(model)
    return model


def autocast_dtype(setup: TrainSetup):
    """The dtype the step's forward autocasts to, or None: bf16 for amp, and for the Trainer's
    bf16=True autocast over a bf16 model with fp32 adapters (mixed, bf16)."""
    import torch

    return torch.bfloat16 if setup.precision in ("amp", "mixed", "bf16") else None


def compile_model(model, mode: str | None) -> None:
    """torch.compile (inductor, in place) as the stacks apply it: `layers` compiles each decoder layer
    as torchtune's `training.compile_model` does (`module.compile()` on every transformer layer; its
    loss compile is not run here), `model` the whole model as the Trainer's `torch_compile`."""
    if mode in (None, "none"):
        return
    import torch

    # a fresh cache of compiled frames: the layers of models traced before share this one's code, and
    # past dynamo's recompile limit it would run them eagerly
    torch._dynamo.reset()
    if mode == "model":
        model.compile()
        return
    for module in model.modules():
        if type(module).__name__.endswith(("DecoderLayer", "Block")) and hasattr(module, "mlp"):
            module.compile()


class StepInBackward:
    """torchtune's `optimizer_in_bwd`: one optimizer per parameter, stepped in the parameter's
    post-accumulate-grad hook and then zeroed (`set_to_none`), so each gradient is freed as soon as
    it has been used (torchtune's `create_optim_in_bwd_wrapper` / `register_optim_in_bwd_hooks`).
    `step` and `zero_grad` are left with nothing to do; `state` is every optimizer's, for the tracer."""

    def __init__(self, params, make) -> None:
        self.optimizers = {p: make([p]) for p in params}
        for p in self.optimizers:
            p.register_post_accumulate_grad_hook(self._step)

    def _step(self, param) -> None:
        optimizer = self.optimizers[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @property
    def state(self) -> dict:
        merged: dict = {}
        for optimizer in self.optimizers.values():
            merged.update(optimizer.state)
        return merged

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def _optimizer(torch, params, setup: TrainSetup):
    """The optimizer the setup names, with its implementation forced (on CPU torch would pick the
    for-loop by itself)."""
    from .step import ADAMW_KERNEL

    impl = ADAMW_KERNEL[setup.optimizer_impl]  # torch's SGD takes the same two switches
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, **impl)
    if setup.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # as the Trainer makes it for `optim="adafactor"`: a fixed lr, beta1=None (one kernel only)
        return Adafactor(params, lr=1e-4, scale_parameter=False, relative_step=False)
    momentum = 0.9 if setup.optimizer == "sgd-momentum" else 0.0
    return torch.optim.SGD(params, lr=1e-4, momentum=momentum, **impl)


def _unpacked(fake: bool):
    """transformers looks for packed sequences in the position ids by reading their values; a fake
    tensor has none, so it assumes packing and builds a causal mask a real run would skip. Our
    batches are one sequence per row, never packed: say so, and the fake run takes the real path."""
    if not fake:
        return contextlib.nullcontext()
    from unittest import mock

    from transformers import masking_utils

    return mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda *a, **k: None)


def _peft_targets(adapters) -> tuple[list[str], list[str], set[str]]:
    """PEFT targets for the plan's adapters: module paths for `target_modules`; for Mixtral's router
    and fused 3-D experts (transformers 5), the parameter names for `target_parameters`, which PEFT
    0.21 wraps with `ParamWrapper`; and the leaf names of the fused gate/up parameters."""
    modules, parameters, fused = set(), set(), set()
    for a in adapters:
        module = a.module
        if module.kind == "router":
            parameters.add(f"{module.path}.weight")
        elif module.kind == "experts":
            parameters.add(module.path)  # the pseudo-module's path is the parameter's name
            leaf = module.path.rsplit(".", 1)[-1]
            if leaf == "gate_up_proj":
                fused.add(leaf)
        else:
            modules.add(module.path)
    return sorted(modules), sorted(parameters), fused


def _with_lora(model, spec: ModelSpec, setup: TrainSetup):
    from peft import LoraConfig

    from ..counts import gate_up_rank_factor, lora_trainable

    modules, parameters, fused = _peft_targets(lora_trainable(spec, setup).adapters)
    # w1 and w3 live in one fused parameter: PEFT's own v4 -> v5 conversion gives it rank and alpha
    # times two (`_convert_peft_config_moe`), and so does the plan (GPT-OSS's is targeted by name: r)
    factor = gate_up_rank_factor(spec)
    patterns = {rf".*\.{re.escape(leaf)}": factor for leaf in fused if factor != 1}
    config = LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, target_modules=modules or None,
                        target_parameters=parameters or None,
                        rank_pattern={k: n * setup.rank for k, n in patterns.items()},
                        alpha_pattern={k: n * 2 * setup.rank for k, n in patterns.items()},
                        lora_dropout=setup.lora_dropout, bias=setup.bias, use_dora=setup.use_dora,
                        # GPT-2's Conv1D stores (in, out); its 4-bit replacement is a Linear4bit
                        fan_in_fan_out=spec.family == "gpt2" and setup.method != "qlora")
    return apply_lora(model, config, setup)


def apply_lora(model, config, setup: TrainSetup):
    """PEFT's `get_peft_model` with `config` (a `LoraConfig`), on a real, fake or meta model."""
    from unittest import mock

    import torch
    from peft import get_peft_model

    # PEFT moves each new adapter onto its base layer's device and dtype with `Module.to()`, which
    # cannot swap fake parameters. Everything is already on CPU in the dtype the model was built
    # under, so the moves are skipped while adapters are injected.
    # PEFT upcasts 16-bit adapters to fp32 by default; pure-bf16 plans every tensor in bf16, so the
    # trace keeps the adapters in the model's dtype (autocast_adapter_dtype=False), unless the setup
    # asks for PEFT's default (--adapter-dtype fp32).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(next(model.parameters()).dtype)  # adapters made in the model's dtype
    try:
        with mock.patch.object(torch.nn.Module, "to", lambda self, *args, **kwargs: self), \
                warnings.catch_warnings():
            # PEFT checks the patterns against targeted modules only and warns, but applies them to
            # the targeted parameters (the adapter on gate_up_proj gets rank 2r)
            warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys")
            return get_peft_model(model, config, autocast_adapter_dtype=setup.precision != "pure-bf16"
                                  or _fp32_adapters(setup))
    finally:
        torch.set_default_dtype(previous)
