"""A model with no walk of ours, planned from transformers' own code: what the plan takes from it.

For a `model_type` none of our families lays out (`spec.MODEL_TYPE_TO_FAMILY`), `measure.recorded`
builds the real class on the meta device (every parameter's name and shape, and PEFT's adapters
on it) and records the real training step under fake tensors on a few decoder layers. This module
holds what comes out, as plain values (`RecordedModel`, `RecordedStep`), and the rules that turn
them into the plan's terms: standard library only, so the plan path stays free of torch.

A recorded quantity is one `Line`: bytes = base + per_layer x layers, fitted through the step
recorded at two depths and checked against a third.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .architecture import Param
from .errors import PlanError
from .spec import TrainSetup

# Setup fields that change no single GPU's step: a recording made for one value serves every value
RECORDING_FREE = {"num_gpus": None, "sharding": "none", "offload": "none", "reshard_after_forward": True,
                  "zero3_max_live_parameters": None, "zero3_prefetch_bucket_size": None,
                  "reduce_bucket_size": None, "zero3_param_persistence_threshold": None, "tasks": 1,
                  "save_dtype": "auto", "double_quant": True}


def recording_setup(setup: TrainSetup) -> TrainSetup:
    """The setup as far as one GPU's step depends on it (`RECORDING_FREE` set to its defaults)."""
    return replace(setup, **RECORDING_FREE)


@dataclass(frozen=True)
class Line:
    """Bytes that grow by the same amount with every decoder layer: base + per_layer x layers."""

    base: int
    per_layer: int

    def at(self, layers: int) -> int:
        return self.base + self.per_layer * layers

    def formula(self, layers: int) -> str:
        return f"{self.base:,} + {self.per_layer:,} x {layers} layers = {self.at(layers):,} B"


def fit_line(first: int, values: tuple[int, ...]) -> tuple[Line, tuple[int, ...]]:
    """The line through the last two of `values`, bytes recorded at `first`, `first` + 1, ...
    layers, and every increment per layer between consecutive depths (all equal when the layers
    repeat exactly).

    Assumption: every decoder layer adds the same bytes; the deepest two recordings set the line
    (the first layer may differ: its input needs no gradient)."""
    steps = tuple(b - a for a, b in zip(values, values[1:], strict=False))
    slope = steps[-1] if steps else 0  # one recording: a model of one layer, recorded whole
    deepest = first + len(values) - 1
    return Line(values[-1] - slope * deepest, slope), steps


@dataclass(frozen=True)
class RecordedStep:
    """One setup's training step, recorded on `depths` decoder layers and fitted per layer.

    Every line's bytes are read from the traced step at the setup's batch and sequence, in
    `traced_precision` (what a plain PyTorch step realises of the plan's precision):

    - `activations`: what forward left saved for backward (the tracer's activations at its end);
    - `forward`, `backward`: the most bytes live within that phase, less the parameters and the
      optimizer states (so the plan puts its own model-state terms under them); backward's keeps
      the gradients made so far (at its end, all of them), which `backward_gradients` gives apart
      (sharded gradients put a GPU's share in their place);
    - `resident`: buffers and the batch's token ids and labels, live through the optimizer's step.
    """

    traced_precision: str
    depths: tuple[int, ...]
    activations: Line
    forward: Line
    backward: Line
    backward_gradients: Line  # of `backward`, the gradients live at its most
    # backward's moment of the most bytes beside the gradients (where sharded gradients may move
    # the peak), less the parameters and optimizer states, and the gradients live then
    backward_other: Line
    backward_other_gradients: Line
    resident: int
    increments: dict[str, tuple[int, ...]]  # per line: the per-layer increments seen between depths
    trainable: tuple[Param, ...]  # every trainable tensor of the whole model, adapters first
    adapter_params: int  # of which LoRA's (or DoRA's) own tensors
    wrapped_modules: int
    target_modules: tuple[str, ...]
    all_params: int  # PEFT's count: base + adapters + modules_to_save copies

    def irregular(self) -> list[str]:
        """The lines whose per-layer increment was not the same between every two depths."""
        return [k for k, steps in self.increments.items() if len(set(steps)) > 1]


@dataclass(frozen=True)
class RecordedModel:
    """A model transformers builds and no family of ours lays out: its base parameters (exact, from
    the meta-device build) and the recorded step of each setup planned (`recording_setup`)."""

    name: str
    model_type: str
    source: str
    num_layers: int
    hidden_size: int
    layer_class: str  # the decoder layer's class, as transformers names it
    versions: tuple[str, str]  # ("transformers X", "torch Y")
    params: tuple[Param, ...]
    quantisable: tuple[str, ...]  # the nn.Linear (and GPT-2 Conv1D) weights QLoRA quantises, not the head
    matmul_params: int  # nn.Linear and Conv1D weights, the head's included (a tied head: the embedding's)
    head_params: int
    max_positions: int
    steps: dict[TrainSetup, RecordedStep]
    caveats: tuple[str, ...] = ()  # what the recording leaves out for this model, one note each

    @property
    def total_params(self) -> int:
        return sum(p.numel for p in self.params)

    def step(self, setup: TrainSetup) -> RecordedStep:
        try:
            return self.steps[recording_setup(setup)]
        except KeyError:
            raise PlanError(f"no recorded step of {self.name} for this setup (a bug: record it first)") \
                from None

    def note(self) -> str:
        depths = sorted({d for s in self.steps.values() for d in s.depths})
        shown = (", ".join(map(str, depths[:-1])) + f" and {depths[-1]} layers, scaled to {self.num_layers}"
                 if len(depths) > 1 else "the whole model of 1 layer")
        note = (f"activations recorded from {self.versions[0]}'s {self.layer_class} under fake tensors "
                f"({self.versions[1]}, CPU kernels), {shown}; parameters from a meta-device build of "
                "the real class")
        irregular = sorted({k for s in self.steps.values() for k in s.irregular()})
        if irregular:
            note += (f"; the per-layer increment of {', '.join(irregular)} was not constant across "
                     "those depths (layers of more than one kind?): the deepest two set the scale")
        return note


def recorded_fields() -> tuple[str, ...]:
    """The fields a cached `RecordedStep` must have (a cache entry without all of them is ignored)."""
    return tuple(f.name for f in fields(RecordedStep))


def recorded_phases(step: RecordedStep, layers: int, m: dict, sharding, temporary, dequant: int = 0,
                    whole_gradients: int = 0) -> tuple:
    """The step's moments on one GPU from its per-GPU model-state terms `m` and the recorded lines
    at `layers` layers: forward's and backward's recorded most over the weights, master weights and
    optimizer states, backward's gradients as the GPU holds them (its `m` share of the
    `whole_gradients`); the optimizer's step over those, the gradients, the optimizer's `temporary`
    (a `Term`; divided as the optimizer states are) and the `resident` buffers and batch. `dequant`:
    QLoRA's dequantised 16-bit weight, added to backward. Under plain data parallelism on more
    than one GPU every moment gains DDP's gradient buckets (`sharding.ddp_bucket_bytes`).

    Assumption: the gradients live at backward's most are sharded as all of them are; FSDP2's
    gather buffers are not recorded (ZeRO-3's are model states, `sharding.zero3_buffers`)."""
    import math

    from .sharding import ddp_bucket_bytes, placement
    from .timeline import Phase

    held = m["weights"].bytes + m["optimizer_states"].bytes + m["master_weights"].bytes
    temp = temporary.bytes
    if sharding is not None:
        where = placement("optimizer_states", sharding)
        temp = 0 if where == "cpu" else temp if where == "replicated" else math.ceil(temp / sharding.num_gpus)
    bucket = 0
    if sharding is not None and sharding.strategy == "none" and sharding.num_gpus > 1:
        bucket = ddp_bucket_bytes(m["gradients"].bytes)
    ddp = f" + DDP gradient buckets {bucket:,} B" if bucket else ""
    qlora = f" + one dequantised weight {dequant:,} B" if dequant else ""
    states = f"weights and optimizer states {held:,} B"

    def on_gpu(most: Line, gradients: Line) -> tuple[int, str]:
        """A recorded backward moment with its gradients replaced by this GPU's share of them."""
        grads = gradients.at(layers)
        if not whole_gradients or m["gradients"].bytes == whole_gradients:
            return most.at(layers), ""
        shared = math.ceil(grads * m["gradients"].bytes / whole_gradients)
        return (most.at(layers) - grads + shared,
                f" (of which gradients {grads:,} B, {shared:,} B on this GPU)")
    backward, shard = on_gpu(step.backward, step.backward_gradients)
    other, other_shard = on_gpu(step.backward_other, step.backward_other_gradients)
    return (
        Phase("forward", held + step.forward.at(layers) + bucket,
              f"{states} + the recorded forward's most beside them (saved activations, logits, "
              f"buffers, batch): {step.forward.formula(layers)}{ddp}"),
        Phase("backward", held + backward + dequant + bucket,
              f"{states} + the recorded backward's most beside them (activations still saved, "
              f"gradients so far, transients): {step.backward.formula(layers)}{shard}{qlora}{ddp}"),
        Phase("backward", held + other + dequant + bucket,
              f"{states} + the recorded backward's most beside the gradients (activations still "
              f"saved, transients) and the gradients then: {step.backward_other.formula(layers)}"
              f"{other_shard}{qlora}{ddp}"),
        Phase("optimizer", held + m["gradients"].bytes + temp + step.resident + bucket,
              f"{states} + gradients {m['gradients'].bytes:,} B + {temporary.formula} + buffers and "
              f"batch {step.resident:,} B{ddp}"),
    )


def is_adapter(name: str) -> bool:
    """Whether a trainable tensor is one of PEFT's LoRA or DoRA tensors (not a trained bias or a
    modules_to_save copy)."""
    return ".lora_" in name or name.startswith("lora_")
