"""Trace one real training step of a planned setup and put it beside the prediction.

The model is built from the planner's own `ModelSpec` (through `to_hf_config`), with random weights:
on CPU for real, or under `FakeTensorMode` (`fake=True`) so that shapes far beyond this machine's
memory trace in seconds. LoRA uses PEFT with the same targets the planner resolved. The step is
forward (causal-LM loss), backward, optimizer step, `zero_grad(set_to_none=True)`, run once
untraced (so the optimizer's states exist, as in every step of a run but the first) and then traced.
The setup's stack choices run as named: AdamW or SGD with the fused, foreach or for-loop kernel
forced, and the standard or chunked cross-entropy (`chunked_loss`); Liger's fused linear
cross-entropy needs a GPU and is refused here.

Supported precisions are those a plain PyTorch step realises: `fp32`, and `amp` (bf16 autocast over
fp32 weights); `pure-bf16` builds the model in bf16 (AdamW then keeps bf16 states). `mixed` and `bf16`
need an fp32 master copy or fp32 states over bf16 weights, which torch's AdamW does not keep.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

from ..errors import PlanError
from ..gpus import GPUS
from ..plan import make_plan
from ..spec import ModelSpec, TrainSetup, to_hf_config
from ..stacks import resolve

TRACEABLE_PRECISIONS = ("fp32", "amp", "pure-bf16")
TERMS = ("weights", "gradients", "optimizer_states", "activations")
TRACEABLE_OPTIMIZERS = ("adamw", "sgd", "sgd-momentum")


@dataclass(frozen=True)
class Comparison:
    predicted: dict[str, int]
    traced: dict[str, int]
    predicted_phase: str
    traced_phase: str
    # the most bytes live within each phase (forward, backward, optimizer), predicted and traced
    predicted_phases: dict[str, int] = field(default_factory=dict)
    traced_phases: dict[str, int] = field(default_factory=dict)

    def errors(self) -> dict[str, float | None]:
        """(predicted - traced) / traced per term and for the peak; None where nothing was traced."""
        keys = (*TERMS, "peak")
        return {k: (self.predicted[k] - self.traced[k]) / self.traced[k] if self.traced[k] else None
                for k in keys}

    def to_dict(self) -> dict:
        return {"predicted": self.predicted, "traced": self.traced,
                "peak_phase": {"predicted": self.predicted_phase, "traced": self.traced_phase},
                "phase_peaks": {"predicted": self.predicted_phases, "traced": self.traced_phases},
                "relative_error": self.errors()}


def sliced(spec: ModelSpec, layers: int | None) -> ModelSpec:
    """The same model with only its first `layers` decoder layers (a slice traces like the whole)."""
    if layers is None:
        return spec
    if layers < 1:
        raise PlanError(f"--layers must be at least 1, got {layers}")
    return replace(spec, num_layers=min(layers, spec.num_layers), name=f"{spec.name}[:{layers} layers]")


def _check(setup: TrainSetup) -> None:
    if setup.precision not in TRACEABLE_PRECISIONS:
        raise PlanError(f"trace runs plain PyTorch steps: precision must be one of "
                        f"{', '.join(TRACEABLE_PRECISIONS)}, got {setup.precision!r}")
    if setup.method not in ("full", "lora"):
        raise PlanError("trace supports full and lora (QLoRA needs bitsandbytes on a GPU)")
    if setup.optimizer not in TRACEABLE_OPTIMIZERS:
        raise PlanError(f"trace runs torch's {', '.join(TRACEABLE_OPTIMIZERS)}; plan other optimizers "
                        "with `lora-plan plan`")
    if setup.task != "causal-lm":
        raise PlanError("trace runs the causal-LM loss")
    if setup.loss == "fused-linear":
        raise PlanError("fused-linear cross-entropy runs Liger's Triton kernel on a GPU; trace --loss "
                        "standard or chunked on CPU")


def predicted_terms(spec: ModelSpec, setup: TrainSetup, device: str = "cpu") -> tuple[dict[str, int], str]:
    """The planner's figures for the traced step, on the device the trace runs on."""
    predicted, phase, _ = _prediction(spec, setup, device)
    return predicted, phase


def _prediction(spec: ModelSpec, setup: TrainSetup,
                device: str) -> tuple[dict[str, int], str, dict[str, int]]:
    """`predicted_terms`, and the most bytes the plan has live within each phase."""
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
    step = predict_step(spec, setup, precision, memory, device)
    predicted = {
        "weights": memory["weights"],
        "gradients": memory["gradients"],
        "optimizer_states": memory["optimizer_states"] + memory["master_weights"],
        "activations": step.activations,
        "peak": step.peak.bytes,
    }
    phases: dict[str, int] = {}
    for p in step.phases:
        phases[p.name] = max(phases.get(p.name, 0), p.bytes)
    return predicted, step.peak.name, phases


def _trainable_tensors(spec: ModelSpec, setup: TrainSetup) -> int:
    from ..architecture import layout
    from ..counts import lora_trainable

    if setup.method == "full":
        return len(layout(spec, setup.task, setup.num_labels).params)
    return len(lora_trainable(spec, setup).params)


def trace(spec: ModelSpec, setup: TrainSetup, *, fake: bool = False, seed: int = 0,
          hf_config: dict | None = None) -> Comparison:
    """Run (or fake) one step of `setup` on `spec` on CPU and compare it with the prediction.

    The model is built from `to_hf_config(spec)`, or from `hf_config` when given: a config.json the
    spec was read from, so that transformers, not our inverse mapping, decides what is built.
    """
    setup = resolve(setup)
    _check(setup)
    if setup.method == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise PlanError("tracing LoRA needs peft: pip install peft") from None
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoConfig, AutoModelForCausalLM

    from .step import enable_checkpointing, train_step
    from .tracer import MemoryTracer

    predicted, predicted_phase, predicted_phases = _prediction(spec, setup, "cpu")
    config = AutoConfig.for_model(**(to_hf_config(spec) if hf_config is None else hf_config))
    config.use_cache = False
    config._attn_implementation = setup.attention
    if setup.dropout is not None:
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, setup.dropout)
    dtype = torch.bfloat16 if setup.precision == "pure-bf16" else torch.float32
    torch.manual_seed(seed)
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    previous = torch.get_default_dtype()
    with mode:
        torch.set_default_dtype(dtype)  # fake parameters cannot be converted after the fact
        try:
            model = AutoModelForCausalLM.from_config(config)
            model.loss_type = "ForCausalLM"  # GPT2LMHeadModel names no loss: say it, no warning
        finally:
            torch.set_default_dtype(previous)
        model.train()
        if setup.grad_checkpointing:
            enable_checkpointing(model)
        if setup.method == "lora":
            model = _with_lora(model, spec, setup)
        ids = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len))
        labels = ids.clone()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(torch, params, setup)
        compute_dtype = torch.bfloat16 if setup.precision == "amp" else None
        loss_fn = ((lambda m, i, labels: chunked_loss(m, i, labels, setup.loss_chunks))
                   if setup.loss == "chunked" else None)

        def step(tracer: MemoryTracer | None) -> None:
            train_step(model, optimizer, ids, labels, compute_dtype=compute_dtype, loss_fn=loss_fn,
                       phase=tracer.phase if tracer else lambda _name: contextlib.nullcontext())

        with _unpacked(fake):
            step(None)  # the first step creates the optimizer's states; a run's later steps keep them
            tracer = MemoryTracer(model, optimizer, inputs=(ids, labels))
            with tracer:
                step(tracer)
    report = tracer.report()
    traced = {
        "weights": report.terms["parameters"],
        "gradients": report.terms["gradients"],
        "optimizer_states": report.terms["optimizer_states"],
        "activations": report.terms["activations"],
        "peak": report.peak_bytes,
    }
    return Comparison(predicted, traced, predicted_phase, report.peak_phase, predicted_phases,
                      dict(report.phase_peaks))


def chunked_loss(model, ids, labels, chunks: int):
    """torchtune 0.6.1's chunked head and loss, in plain PyTorch over a transformers model.

    `TransformerDecoder.chunked_output`: the LM head applied to `chunks` slices of the sequence, the
    list of logits returned; then `CEWithChunkedOutputLoss`: each chunk upcast to fp32 and its
    cross-entropy summed, divided by the number of labelled tokens. Labels are shifted as
    transformers' `ForCausalLMLoss` shifts them (padded with -100, then [1:]). Gemma-2's final
    soft-capping is applied per chunk.
    """
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)

    def project(h):
        x = head(h)  # (b, s / chunks, V)
        return torch.tanh(x / cap) * cap if cap else x

    def chunked_output():
        # torchtune's model returns the list of logits: the final hidden state is not held past it
        hidden = base.base_model(input_ids=ids).last_hidden_state  # (b, s, H)
        return [project(h) for h in hidden.chunk(chunks, dim=1)]

    logits = chunked_output()
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (b, s)
    total = (shifted != -100).sum()
    loss = 0.0
    for x, y in zip(logits, shifted.chunk(chunks, dim=1), strict=True):
        loss = loss + F.cross_entropy(x.reshape(-1, x.size(-1)).float(), y.reshape(-1), ignore_index=-100,
                                      reduction="sum")
    return loss / total


def _optimizer(torch, params, setup: TrainSetup):
    """The optimizer the setup names, with its implementation forced (on CPU torch would pick the
    for-loop by itself)."""
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True},
            "for-loop": {"foreach": False, "fused": False}}[setup.optimizer_impl]
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, **impl)
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


def _with_lora(model, spec: ModelSpec, setup: TrainSetup):
    from unittest import mock

    import torch
    from peft import LoraConfig, get_peft_model

    from ..counts import lora_trainable

    paths = sorted({a.module.path for a in lora_trainable(spec, setup).adapters})
    config = LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, target_modules=paths,
                        lora_dropout=setup.lora_dropout, bias=setup.bias, use_dora=setup.use_dora,
                        fan_in_fan_out=spec.family == "gpt2")  # GPT-2's Conv1D stores (in, out)
    # PEFT moves each new adapter onto its base layer's device and dtype with `Module.to()`, which
    # cannot swap fake parameters. Everything is already on CPU in the dtype the model was built
    # under, so the moves are skipped while adapters are injected.
    # PEFT upcasts 16-bit adapters to fp32 by default; pure-bf16 plans every tensor in bf16, so the
    # trace keeps the adapters in the model's dtype (autocast_adapter_dtype=False).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(next(model.parameters()).dtype)  # adapters made in the model's dtype
    try:
        with mock.patch.object(torch.nn.Module, "to", lambda self, *args, **kwargs: self):
            return get_peft_model(model, config, autocast_adapter_dtype=setup.precision != "pure-bf16")
    finally:
        torch.set_default_dtype(previous)
