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

from dataclasses import dataclass, field, fields, replace

from .architecture import Param
from .errors import PlanError
from .spec import TrainSetup

# Setup fields that change no single GPU's step: a recording made for one value serves every value
RECORDING_FREE = {"num_gpus": None, "sharding": "none", "offload": "none", "reshard_after_forward": True,
                  "zero3_max_live_parameters": None, "zero3_prefetch_bucket_size": None,
                  "reduce_bucket_size": None, "zero3_param_persistence_threshold": None, "tasks": 1,
                  "save_dtype": "auto", "double_quant": True}


# Optimizers a recorded step runs as they are; any other's step is run as AdamW's (its own states,
# temporary and step are planned, not recorded), so its recording is AdamW's
RECORDED_OPTIMIZERS = ("adamw", "sgd", "sgd-momentum")


def recording_setup(setup: TrainSetup) -> TrainSetup:
    """The setup as far as one GPU's recorded step depends on it (`RECORDING_FREE` set to its
    defaults, the optimizer as run: `RECORDED_OPTIMIZERS`)."""
    optimizer = setup.optimizer if setup.optimizer in RECORDED_OPTIMIZERS else "adamw"
    return replace(setup, **RECORDING_FREE, optimizer=optimizer)


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


# Backward's positions recorded (the tracer's `backward_positions`): at the head, inside the top
# decoder layer (the last, entered first), inside the bottom one (layer 0), at the embeddings
POSITIONS = ("head", "top", "bottom", "end")
# per position, five lines: its most bytes beside the parameters and optimizer states and the
# gradients then; its most beside the gradients too (with them) and the gradients then; the
# gradients live as backward entered it
MOMENT = ("most", "most_gradients", "other", "other_gradients", "entry_gradients")


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
    # backward by position (`POSITIONS`), each a `MOMENT` of lines: where FSDP2's buffers differ
    positions: dict[str, tuple[Line, ...]] = field(default_factory=dict)
    # with layers of several kinds (the config's layer_types, one per layer): each other kind's
    # positions, recorded on slices of that kind alone
    layer_kinds: tuple[str, ...] = ()
    kind_positions: dict[str, dict[str, tuple[Line, ...]]] = field(default_factory=dict)

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
    layers_prefix: str  # the decoder layers' parameters' prefix ("model.layers."), FSDP2's units
    layer_class: str  # the decoder layer's class, as transformers names it
    versions: tuple[str, str]  # ("transformers X", "torch Y")
    params: tuple[Param, ...]
    quantisable: tuple[str, ...]  # the nn.Linear (and GPT-2 Conv1D) weights QLoRA quantises, not the head
    matmul_params: int  # nn.Linear and Conv1D weights, the head's included (a tied head: the embedding's)
    head_params: int
    max_positions: int
    steps: dict[TrainSetup, RecordedStep]
    caveats: tuple[str, ...] = ()  # what the recording leaves out for this model, one note each
    # records (or reads from the cache) the step of a setup not yet recorded: what lets --fit and
    # advice re-plan changed setups; given by `measure.recorded`, so this module needs no torch
    recorder: object = field(default=None, compare=False, repr=False)

    @property
    def total_params(self) -> int:
        return sum(p.numel for p in self.params)

    def step(self, setup: TrainSetup) -> RecordedStep:
        """The setup's recorded step; one not recorded yet is recorded now by `recorder` (and kept)."""
        key = recording_setup(setup)
        if key not in self.steps:
            if self.recorder is None:
                raise PlanError(f"no recorded step of {self.name} for this setup (a bug: record it first)")
            self.steps[key] = self.recorder(key)
        return self.steps[key]

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

    Assumption: the gradients live at backward's most are sharded as all of them are. A step
    recorded position by position is planned by `recorded_position_phases` instead (FSDP2's buffers
    included), which takes its optimizer's moment from here; this whole-backward form serves a step
    with no positions (a model whose decoder layers were not found)."""
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


def fsdp_units(model: RecordedModel, trainable: tuple[Param, ...], weight_bytes: int, grad_bytes,
               head_grads: int, nf4_saving=None):
    """FSDP2's units (`fsdp.Units`) from the meta-device build, as `fsdp.units` takes them from a
    layout: a block is a decoder layer (every parameter under `layers_prefix` + i, adapters in it
    included), gathered at weight width (an adapter at its own, that of its gradient: `grad_bytes(p)`
    of a trained tensor); the root every other parameter. `nf4_saving(p)`:
    the bytes a QLoRA NF4 weight gathers less than at weight width (`fsdp.nf4_gathered_saving`).
    `head_grads`: the gradients made at the head, as recorded."""
    from .fsdp import Units

    prefix = model.layers_prefix
    blocks = [0] * model.num_layers
    grads = [0] * model.num_layers
    root = root_grads = 0

    def layer(name: str) -> int | None:
        if not prefix or not name.startswith(prefix):
            return None
        index = name[len(prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() and int(index) < model.num_layers else None
    base = {p.name for p in model.params}
    for p in model.params:  # gathered at weight width, or as NF4 codes
        at = layer(p.name)
        gathered = p.numel * weight_bytes - (nf4_saving(p) if nf4_saving is not None else 0)
        if at is None:
            root += gathered
        else:
            blocks[at] += gathered
    for p in trainable:
        at = layer(p.name)
        if p.name not in base and at is not None:
            blocks[at] += p.numel * grad_bytes(p)  # an adapter, gathered at its own width
        if at is None:
            root_grads += p.numel * grad_bytes(p)
        else:
            grads[at] += p.numel * grad_bytes(p)
    return Units(tuple(blocks), tuple((0, g, 0) for g in grads), root, head_grads, 0, False, root_grads)


def position_value(step: RecordedStep, layers: int):
    """`value(name, j, n, own)`: line j (`MOMENT`) of backward's position `name` over the first n
    decoder layers: its line at n layers; with layers of several kinds (`layer_kinds`), the base of
    the line of layer `own`'s kind + the per-layer bytes of each of the first n layers, from the line
    of its own kind (the running sums made once, as the GPU-count search asks again and again)."""
    kinds = step.layer_kinds
    if not kinds:
        return lambda name, j, n, own=0: step.positions[name][j].at(n)

    def line(kind: str, name: str, j: int) -> Line:
        return (step.positions if kind == kinds[0] else step.kind_positions[kind])[name][j]
    sums: dict[tuple[str, int], list[int]] = {}

    def value(name: str, j: int, n: int, own: int = 0) -> int:
        if (name, j) not in sums:
            running = [0]
            for kind in kinds[:layers]:
                running.append(running[-1] + line(kind, name, j).per_layer)
            sums[name, j] = running
        return line(kinds[own], name, j).base + sums[name, j][n]
    return value


def recorded_position_phases(step: RecordedStep, layers: int, m: dict, sharding, temporary, u=None,
                             start_input: int = 0, dequant: int = 0, whole_gradients: int = 0,
                             reshard: bool = True) -> tuple:
    """The step's moments on one GPU from backward's recorded positions (`POSITIONS`), layer by
    layer, with the gradients as the GPU holds them; under FSDP2 (`u`, the units from `fsdp_units`)
    with its buffers at each moment (`fsdp.extra_bytes`, `fsdp.block_extra`): the blocks' gradients
    a 1/N share once reduce-scattered, the layer's own and the root's whole until theirs.

    - start of forward (FSDP2): weights and optimizer states + buffers and batch + the embeddings'
      output (`start_input`) + the root's and the first block's all-gather output beside their
      parameters (2 x root + 2 x block 0), as `fsdp.start_phase`;
    - forward: the recorded forward's most (FSDP2: + the root whole + the last block's all-gather
      output);
    - backward at the head: its recorded moments (FSDP2: + the root whole + the last block
      prefetched, every block without resharding; the head's gradients whole);
    - inside layer i (i >= 1): the moment recorded inside the top layer of a slice of i + 1 layers
      (the same activations still saved), with the gradients of the layers above (`u`'s, per layer)
      added; layer 0: the bottom layer's moments at full depth; QLoRA's `dequant` weight added;
    - at the embeddings: the recorded moments (FSDP2: + the root whole + block 0's reduce-scatter
      input + the root's gradients made so far whole);
    - optimizer: as `recorded_phases`. Without FSDP2, DDP's buckets on every moment as there.

    With layers of several kinds each moment counts every layer's bytes by its own kind's lines, and
    a moment inside a layer takes that layer's kind's (`position_value`)."""
    from .fsdp import extra_bytes
    from .sharding import ddp_bucket_bytes, placement
    from .timeline import Phase

    fsdp = sharding is not None and sharding.strategy == "fsdp"
    n = sharding.num_gpus if sharding is not None else 1
    bucket = 0
    if sharding is not None and sharding.strategy == "none" and n > 1:
        bucket = ddp_bucket_bytes(m["gradients"].bytes)
    offloaded = sharding is not None and placement("gradients", sharding) == "cpu"
    gpu = _OnGpu(m["weights"].bytes + m["optimizer_states"].bytes + m["master_weights"].bytes,
                 m["gradients"].bytes / whole_gradients if whole_gradients else 1.0, bucket,
                 u if fsdp else None, n, reshard, offloaded)
    pos, value = step.positions, position_value(step, layers)
    root = u.root_bytes if fsdp else 0
    held, states = gpu.held, f"weights and optimizer states {gpu.held:,} B"
    out = []
    forward = extra_bytes(Phase("forward", 0, ""), u, n, reshard, gpu.offloaded)[0] if fsdp else bucket
    if fsdp:
        start = 2 * root + 2 * u.block_bytes[0]
        out.append(Phase("forward", held + step.resident + start_input + start,
                         f"start of forward: {states} + buffers and batch {step.resident:,} B + the "
                         f"embeddings' output {start_input:,} B + FSDP2 buffers (the root's all-gather "
                         f"output and parameters, the first layer's) {start:,} B"))
    out.append(Phase("forward", held + step.forward.at(layers) + forward,
                     f"{states} + the recorded forward's most beside them (saved activations, logits, "
                     f"buffers, batch): {step.forward.formula(layers)}"
                     + (f"; + FSDP2 buffers (root whole + last block's all-gather output) {forward:,} B"
                        if fsdp else gpu.ddp)))
    if "head" in pos:
        gathered = (u.block_bytes[-1] if reshard else sum(u.block_bytes)) if fsdp else 0
        for a, g, what in VARIANTS:
            b, grads = value("head", a, layers), value("head", g, layers)
            kept = grads if fsdp else gpu.share(grads)  # FSDP2 keeps the root's gradients whole
            extra = root + gathered if fsdp else bucket
            out.append(Phase("backward", held + b - grads + kept + extra,
                             f"{states} + the recorded backward's {what} at the head, before any decoder "
                             f"layer: {b - grads:,} B beside the gradients + gradients {kept:,} B"
                             + (f" + FSDP2 buffers (root whole + last block prefetched) {extra:,} B"
                                if fsdp else gpu.ddp)))
    per_layer = [sum(g) for g in u.block_grads] if u is not None else [0] * layers
    out += _layer_moments(step, layers, value, gpu, per_layer, dequant)
    if "end" in pos:
        for a, g, what in VARIANTS:
            b, grads = value("end", a, layers), value("end", g, layers)
            extra = bucket
            if fsdp:
                mine = max(0, grads - sum(per_layer))  # the root's gradients made by then: whole
                extra = root + per_layer[0] + mine - gpu.share(mine)
            out.append(Phase("backward", held + b - grads + gpu.share(grads) + extra,
                             f"{states} + the recorded backward's {what} at the embeddings: {b - grads:,} B "
                             f"beside the gradients + gradients {gpu.share(grads):,} B"
                             + (f" + FSDP2 buffers (root whole + block 0's reduce-scatter input + the "
                                f"root's gradients whole) {extra:,} B" if fsdp else gpu.ddp), part="end"))
    return (*out, recorded_phases(step, layers, m, sharding, temporary)[-1])


# the two recorded moments of each position: (its bytes, its gradients) as `MOMENT` indexes them
VARIANTS = ((0, 1, "most"), (2, 3, "most beside the gradients"))


@dataclass(frozen=True)
class _OnGpu:
    """What `recorded_position_phases` puts on one GPU beside a recorded moment: the weights and
    optimizer states `held`, the gradients' share `ratio` (this GPU's gradient bytes over the
    whole model's), DDP's `bucket`, FSDP2's units `u` (None: not FSDP2) on `n` GPUs."""

    held: int
    ratio: float
    bucket: int
    u: object
    n: int
    reshard: bool
    offloaded: bool

    def share(self, gradients: int) -> int:
        import math

        return math.ceil(gradients * self.ratio)

    @property
    def ddp(self) -> str:
        return f" + DDP gradient buckets {self.bucket:,} B" if self.bucket else ""


def _layer_moments(step: RecordedStep, layers: int, value, gpu: _OnGpu, per_layer: list[int],
                   dequant: int) -> list:
    """`recorded_position_phases`' moments inside each decoder layer, from the top down: the top
    layer's moments of a slice of i + 1 layers for layer i (the bottom layer's at full depth for
    layer 0), the gradients of the layers above (`per_layer`, whole-model bytes) and the layer's own
    so far on this GPU as `gpu` holds them; QLoRA's dequantised weight; FSDP2's `fsdp.block_extra`."""
    from .fsdp import block_extra
    from .timeline import Phase

    out = []
    qlora = f" + one dequantised weight {dequant:,} B" if dequant else ""
    above = 0  # the gradients of the blocks above layer i
    for i in reversed(range(layers)):
        at, depth = ("top", i + 1) if i else ("bottom", layers)
        if at not in step.positions:
            continue
        where = (f"the top layer's moment in {depth} layers, on the recorded line" if i else
                 "the first layer's, on the recorded line")
        entered = value(at, 4, depth, i)
        entry = entered + (above if i else 0)
        for a, g, what in VARIANTS:
            b, grads = value(at, a, depth, i), value(at, g, depth, i)
            own = grads - entered
            extra = (block_extra(gpu.u, i, own, gpu.n, gpu.reshard, gpu.offloaded, describe=False)[0]
                     if gpu.u is not None else gpu.bucket)
            shared = gpu.share(entry + own)
            out.append(Phase("backward", gpu.held + b - grads + shared + dequant + extra,
                             f"weights and optimizer states {gpu.held:,} B + the recorded backward's "
                             f"{what} inside layer {{}}: {b - grads:,} B beside the gradients ({where}) + "
                             f"gradients so far {entry + own:,} B"
                             + (f", {shared:,} B on this GPU" if gpu.ratio != 1 else "") + qlora
                             + (f" + FSDP2 buffers (root whole, blocks gathered, this layer's gradients "
                                f"whole, the reduce-scatter input, the head's gradients whole) {extra:,} B"
                                if gpu.u is not None else gpu.ddp), layer=i))
        above += per_layer[i]
    return out


def is_adapter(name: str) -> bool:
    """Whether a trainable tensor is one of PEFT's LoRA or DoRA tensors (not a trained bias or a
    modules_to_save copy)."""
    return ".lora_" in name or name.startswith("lora_")
