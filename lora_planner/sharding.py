"""Model states on N data-parallel GPUs under ZeRO / FSDP sharding and CPU offload.

One pure transform turns the whole-model terms into per-GPU terms. What each strategy shards
(ZeRO paper, Rajbhandari et al. 2020; DeepSpeed's stages; FSDP full shard = ZeRO-3):

| strategy | weights (frozen and trainable) | gradients | fp32 master + optimizer states |
|----------|--------------------------------|-----------|--------------------------------|
| none     | replicated (plain DDP)         | replicated | replicated                    |
| zero1    | replicated                     | replicated | sharded 1/N                   |
| zero2    | replicated                     | sharded    | sharded                       |
| zero3    | sharded                        | sharded    | sharded                       |

With LoRA the frozen base has no gradients or optimizer states, so only ZeRO-3 reduces it (it
shards every parameter); ZeRO-1/2 shard only the adapters' gradients and states, which are small.
Activations are per micro-batch on each GPU and are never sharded by data parallelism.

Offload (ZeRO-Offload, Ren et al. 2021): `optimizer` moves the fp32 master weights and optimizer
states to CPU memory, and the gradient shards too where gradients are sharded (ZeRO-2/3), since
the optimizer step then runs on the CPU; `optimizer+params` also moves the weights (ZeRO-3 only),
leaving on the GPU the layer being gathered.

ZeRO-3 gathers one layer's full weights (and, when it is trained, its full gradient before the
reduce-scatter) at a time: the gathered-layer buffer, sized, as DeepSpeed sizes it, by the largest
module's own parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import PlanError
from .memory import Term

if TYPE_CHECKING:
    from .precision import Precision
    from .spec import ModelSpec, TrainSetup
    from .step import StepPrediction
    from .timeline import Phase

STRATEGIES = ("none", "zero1", "zero2", "zero3")
STRATEGY_ALIASES = {"fsdp": "zero3", "ddp": "none"}
OFFLOADS = ("none", "optimizer", "optimizer+params")
STAGE = {s: i for i, s in enumerate(STRATEGIES)}
# The largest data-parallel group searched for a minimum; beyond it a plan "does not fit".
MAX_GPUS = 1 << 20


def strategy_name(name: str) -> str:
    """`fsdp` -> `zero3`, `ddp` -> `none`; anything unknown is a user error."""
    key = name.strip().lower()
    key = STRATEGY_ALIASES.get(key, key)
    if key not in STRATEGIES:
        known = ", ".join([*STRATEGIES, *STRATEGY_ALIASES])
        raise PlanError(f"unknown sharding {name!r}; choose from {known}")
    return key


@dataclass(frozen=True)
class Sharding:
    """N GPUs in one data-parallel group, what is sharded across them and what lives on the CPU."""

    num_gpus: int
    strategy: str = "none"
    offload: str = "none"

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise PlanError(f"--num-gpus must be at least 1, got {self.num_gpus}")
        if self.strategy not in STRATEGIES:
            raise PlanError(f"unknown sharding {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.offload not in OFFLOADS:
            raise PlanError(f"unknown offload {self.offload!r}; choose from {', '.join(OFFLOADS)}")
        if self.offload != "none" and self.strategy == "none":
            raise PlanError("--offload needs ZeRO: give --sharding zero1, zero2 or zero3")
        if self.offload == "optimizer+params" and self.strategy != "zero3":
            raise PlanError("offloading parameters needs --sharding zero3 (fsdp): "
                            "only ZeRO-3 stops keeping a full copy of the weights on each GPU")

    def with_gpus(self, num_gpus: int) -> Sharding:
        return Sharding(num_gpus, self.strategy, self.offload)


def placement(key: str, sharding: Sharding) -> str:
    """Where one model-state term lives: `replicated`, `sharded` (1/N per GPU) or `cpu`."""
    stage = STAGE[sharding.strategy]
    offload = sharding.offload
    if key == "weights":
        if offload == "optimizer+params":
            return "cpu"
        return "sharded" if stage == 3 else "replicated"
    if key == "gradients":
        if stage < 2:
            return "replicated"
        return "cpu" if offload != "none" else "sharded"
    if key in ("master_weights", "optimizer_states"):
        if stage < 1:
            return "replicated"
        return "cpu" if offload != "none" else "sharded"
    return "replicated"  # activations: each GPU runs its own micro-batch


def gathered_layer_buffer(largest_layer_params: int, weight_bytes: int, grad_bytes: int) -> dict[str, Term]:
    """ZeRO-3's gathered layer, by the term it adds to: the largest module's parameters in full at
    weight width (`weights`) and, when that module is trained, its full gradient before the
    reduce-scatter (`gradients`). Under `mixed` full fine-tuning the two make DeepSpeed's
    `4 * largest_layer_params`.

    Assumption: one layer is gathered at a time (no prefetch of the next one).
    """
    n = largest_layer_params
    buffer = {"weights": Term("gathered_layer", n * weight_bytes,
                              f"largest module {n:,} params x {weight_bytes} B")}
    if grad_bytes:
        buffer["gradients"] = Term("gathered_layer_grad", n * grad_bytes,
                                   f"largest module {n:,} params x {grad_bytes} B")
    return buffer


def _on_gpu(term: Term, where: str, n: int) -> Term:
    if where == "replicated":
        return term
    if where == "cpu":
        return Term(term.name, 0, f"offloaded to CPU ({term.bytes:,} B)")
    share = math.ceil(term.bytes / n)
    return Term(term.name, share, f"({term.formula}) / {n} GPUs = {share:,} B")


def per_gpu_states(memory: dict[str, Term], sharding: Sharding,
                   buffer: dict[str, Term] | None = None) -> dict[str, Term]:
    """The whole-model terms (weights, gradients, master weights, optimizer states, activations) ->
    the same terms on one GPU of `sharding.num_gpus`. Sharded terms take ceil(bytes / N); offloaded
    terms take 0 on the GPU. Under ZeRO-3 the gathered-layer buffer (see `gathered_layer_buffer`)
    is added to the terms it belongs to; it stays on the GPU whatever is offloaded."""
    n = sharding.num_gpus
    out = {key: _on_gpu(term, placement(key, sharding), n) for key, term in memory.items()}
    if sharding.strategy == "zero3":
        for key, part in (buffer or {}).items():
            t = out[key]
            total = t.bytes + part.bytes
            out[key] = Term(t.name, total, f"{t.formula}; + gathered layer: {part.formula} = {total:,} B")
    return out


def cpu_bytes(memory: dict[str, Term], sharding: Sharding) -> int:
    """Bytes each GPU's process keeps in CPU memory under offload: its 1/N shard of every offloaded
    term (every offloadable term is sharded in every strategy that allows offload)."""
    n = sharding.num_gpus
    return sum(math.ceil(t.bytes / n) for key, t in memory.items() if placement(key, sharding) == "cpu")


PeakOf = Callable[[dict[str, Term], "Sharding | None"], int]


def min_gpus(memory: dict[str, Term], sharding: Sharding, capacity: int, buffer: dict[str, Term] | None,
             peak: PeakOf) -> int | None:
    """Fewest GPUs whose per-GPU peak fits `capacity` under this strategy and offload, or None when
    no number does (replicated terms alone overflow one GPU). `peak` turns per-GPU terms (and the
    sharding that made them) into the per-GPU peak, so this follows however the plan assembles it.

    Per-GPU memory never grows with N, so the answer is found by doubling, then bisection.
    """
    def fits(n: int) -> bool:
        on_n = sharding.with_gpus(n)
        return peak(per_gpu_states(memory, on_n, buffer), on_n) <= capacity

    if fits(1):
        return 1
    if sharding.strategy == "none":
        return None
    hi = 2
    while not fits(hi):
        if hi >= MAX_GPUS:
            return None
        hi *= 2
    lo = hi // 2  # does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


@dataclass(frozen=True)
class DataParallel:
    """A method's model states placed on GPUs: what `plan` keeps per method.

    `per_gpu` holds the terms on one GPU (the whole-model terms when no GPU count is given);
    `min_gpus` is the fewest GPUs for each strategy without offload (None: does not fit at any
    count); `gpus_needed` is that minimum for the chosen strategy and offload.
    """

    sharding: Sharding | None
    per_gpu: dict[str, Term]
    cpu_bytes: int
    gpus_needed: int | None
    min_gpus: dict[str, int | None]


def distribute(memory: dict[str, Term], sharding: Sharding | None, buffer: dict[str, Term] | None,
               capacity: int, peak: PeakOf) -> DataParallel:
    """Place whole-model terms on GPUs: per-GPU terms for the chosen sharding (unchanged when
    `sharding` is None), CPU bytes under offload, and the minimum GPU count for every strategy."""
    minimum = {s: min_gpus(memory, Sharding(1, s), capacity, buffer, peak) for s in STRATEGIES}
    if sharding is None:
        return DataParallel(None, dict(memory), 0, None, minimum)
    return DataParallel(sharding, per_gpu_states(memory, sharding, buffer), cpu_bytes(memory, sharding),
                        min_gpus(memory, sharding, capacity, buffer, peak), minimum)


def sharding_of(num_gpus: int | None, strategy: str, offload: str) -> Sharding | None:
    """The setup's sharding, or None when no GPU count was given (whole-model totals)."""
    if num_gpus is None:
        if strategy != "none" or offload != "none":
            raise PlanError("--sharding and --offload need --num-gpus N")
        return None
    return Sharding(num_gpus, strategy_name(strategy), offload)


def sharding_notes(setup: TrainSetup, dense: bool) -> list[str]:
    """What the reader must know to read per-GPU numbers."""
    sharding = sharding_of(setup.num_gpus, setup.sharding, setup.offload)
    if sharding is None:
        return []
    notes = [f"memory is per GPU: one of {sharding.num_gpus} data-parallel GPUs, sharding "
             f"{sharding.strategy}, offload {sharding.offload}; activations are per GPU (not sharded)"]
    if dense and sharding.strategy == "zero3":
        notes.append("--params: layer sizes are unknown, so ZeRO-3's gathered-layer buffer is not counted")
    return notes


def step_peak_on_gpu(predicted: StepPrediction, per_gpu: dict[str, Term], sharding: Sharding | None,
                     spec: ModelSpec, setup: TrainSetup, precision: Precision) -> Phase:
    """The step's timeline peak on one GPU: the whole-model `StepPrediction` with its model states
    replaced by the per-GPU terms, and the gradients each layer produces and foreach AdamW's
    temporary divided as their terms are (a shard of each, or none on the GPU when offloaded).
    Activations are unchanged: each GPU runs a whole micro-batch. Without sharding this is the
    prediction's own peak."""
    if sharding is None:
        return predicted.peak
    from dataclasses import replace

    from .step import conditions
    from .timeline import peak_phase, step_phases

    def share(value: int, key: str) -> int:
        where = placement(key, sharding)
        if where == "replicated":
            return value
        return 0 if where == "cpu" else math.ceil(value / sharding.num_gpus)

    s = predicted.states
    states = replace(
        s,
        weights=per_gpu["weights"].bytes,
        gradients=per_gpu["gradients"].bytes,
        optimizer_states=per_gpu["optimizer_states"].bytes + per_gpu["master_weights"].bytes,
        optimizer_temporary=share(s.optimizer_temporary, "optimizer_states"),
        head_gradients=share(s.head_gradients, "gradients"),
        layer_gradients=tuple(tuple(share(g, "gradients") for g in parts) for parts in s.layer_gradients),
    )
    vocab = spec.vocab_size if setup.task == "causal-lm" else setup.num_labels  # as `predict_step`
    tokens = conditions(setup, precision).tokens
    return peak_phase(step_phases(states, predicted.profile, vocab, tokens))
