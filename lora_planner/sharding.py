"""Model states on N data-parallel GPUs under ZeRO / FSDP sharding and CPU offload.

One pure transform turns the whole-model terms into per-GPU terms. What each strategy shards
(ZeRO paper, Rajbhandari et al. 2020; DeepSpeed's stages; PyTorch FSDP2 `fully_shard`, which shards
what ZeRO-3 shards but holds other buffers, see `fsdp`):

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

DeepSpeed ZeRO-3 at run time (`zero3_buffers`) holds, beside the shards: the module being run in
full plus what it prefetches (`stage3_prefetch_bucket_size` parameters, capped by
`stage3_max_live_parameters`), parameters of at most `stage3_param_persistence_threshold` elements
unpartitioned, and, when trained, the module's full gradient and a `reduce_bucket_size` bucket. The
defaults are the Hugging Face integration's "auto" values: reduce h^2, prefetch 0.9 h^2, persistence
10 h (h the hidden size). FSDP2's buffers depend on the moment of the step; `fsdp` adds them phase by
phase.

The fewest GPUs under a strategy is found from the per-GPU peak's shape, replicated + sharded / N
per phase, read off two evaluations, then checked against the fit rule (`gpus.fits`) at the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import PlanError
from .memory import Term
from .timeline import Phase, States

if TYPE_CHECKING:
    from .precision import Precision
    from .spec import ModelSpec, TrainSetup
    from .step import StepPrediction

STRATEGIES = ("none", "zero1", "zero2", "zero3", "fsdp", "fsdp1")
# the strategies every plan lists the fewest GPUs of; FSDP1 (`fsdp.flat_param_numels`) is planned when
# chosen, beside FSDP2's `fsdp`, which it nearly matches
SEARCHED = ("none", "zero1", "zero2", "zero3", "fsdp")
STRATEGY_ALIASES = {"ddp": "none"}
FSDP = ("fsdp", "fsdp1")  # PyTorch's FSDP2 and FSDP1: buffers phase by phase (`fsdp`)
OFFLOADS = ("none", "optimizer", "optimizer+params")
STAGE = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3, "fsdp1": 3}
# How `gpus_needed_strategy` names a strategy: one GPU is `single`, plain data parallelism `ddp`.
DISPLAY = {"none": "ddp", "zero1": "zero1", "zero2": "zero2", "zero3": "zero3", "fsdp": "fsdp",
           "fsdp1": "fsdp1"}
# Hugging Face's DeepSpeed integration fills "auto" ZeRO-3 settings from the hidden size h.
ZERO3_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's default for stage3_max_live_parameters
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
        if self.offload == "optimizer+params" and STAGE[self.strategy] != 3:
            raise PlanError("offloading parameters needs --sharding zero3 or fsdp: "
                            "only they stop keeping a full copy of the weights on each GPU")
        if self.strategy in FSDP and self.offload == "optimizer":
            raise PlanError("FSDP's CPU offload (FSDP2's CPUOffloadPolicy, FSDP1's CPUOffload) moves "
                            "parameters, gradients and optimizer states together: give --offload "
                            "optimizer+params")

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


@dataclass(frozen=True)
class Zero3Settings:
    """DeepSpeed ZeRO-3's run-time knobs, in parameters (elements), resolved for one model."""

    max_live_parameters: int
    prefetch_bucket_size: int
    reduce_bucket_size: int
    param_persistence_threshold: int


def zero3_settings(setup: TrainSetup, hidden_size: int) -> Zero3Settings:
    """The setup's ZeRO-3 knobs, each None replaced by the Hugging Face integration's "auto" value
    (`transformers.integrations.deepspeed`): reduce_bucket_size h^2, stage3_prefetch_bucket_size
    int(0.9 h^2), stage3_param_persistence_threshold 10 h; stage3_max_live_parameters 1e9, DeepSpeed's
    default."""
    h = hidden_size

    def pick(value: int | None, auto: int) -> int:
        return auto if value is None else value

    return Zero3Settings(pick(setup.zero3_max_live_parameters, ZERO3_MAX_LIVE_PARAMETERS),
                         pick(setup.zero3_prefetch_bucket_size, int(0.9 * h * h)),
                         pick(setup.reduce_bucket_size, h * h),
                         pick(setup.zero3_param_persistence_threshold, 10 * h))


def zero3_buffers(largest_module: int, persistent: int, trained_largest: int, trainable: int,
                  weight_bytes: int, grad_bytes: int, z: Zero3Settings) -> dict[str, Term]:
    """ZeRO-3's run-time buffers on each GPU, by name; `zero3_buffer_terms` adds them to the terms.

    - `zero3_live_params`, `zero3_prefetch`: the module being run, gathered in full, plus what is
      prefetched: max(0, min(stage3_max_live_parameters, largest module + stage3_prefetch_bucket_size)
      - largest module) x weight bytes;
    - `zero3_persistent`: parameters of at most stage3_param_persistence_threshold elements stay whole
      on every GPU (norms, biases): their count x weight bytes (their 1/N shard is also counted in the
      weights term, a slight overcount);
    - `zero3_module_grad`: the largest trained module's full gradient before its reduce-scatter;
    - `zero3_reduce_bucket`: min(reduce_bucket_size, trainable) x grad bytes.

    With the module gradient, the largest module in full at 16-bit weights and gradients is
    DeepSpeed's own `4 * largest_layer_params` (`estimate_zero3_model_states_mem_needs`).
    Assumption: every gathered parameter is prefetched at weight width; the prefetch bucket fills.
    """
    # the running module is gathered whatever the cap; the cap bounds what is prefetched beside it
    live = max(largest_module, min(z.max_live_parameters, largest_module + z.prefetch_bucket_size))
    out = {
        "zero3_live_params": Term(
            "zero3_live_params", largest_module * weight_bytes,
            f"largest module {largest_module:,} params x {weight_bytes} B"),
        "zero3_prefetch": Term(
            "zero3_prefetch", (live - largest_module) * weight_bytes,
            f"max(0, min(stage3_max_live_parameters {z.max_live_parameters:,}, {largest_module:,} + "
            f"stage3_prefetch_bucket_size {z.prefetch_bucket_size:,}) - {largest_module:,}) = "
            f"{live - largest_module:,} params x {weight_bytes} B"),
        "zero3_persistent": Term(
            "zero3_persistent", persistent * weight_bytes,
            f"{persistent:,} params in tensors of <= stage3_param_persistence_threshold "
            f"{z.param_persistence_threshold:,} elements x {weight_bytes} B"),
    }
    if trainable and grad_bytes:
        bucket = min(z.reduce_bucket_size, trainable)
        out["zero3_module_grad"] = Term("zero3_module_grad", trained_largest * grad_bytes,
                                        f"largest trained module {trained_largest:,} params x {grad_bytes} B")
        out["zero3_reduce_bucket"] = Term(
            "zero3_reduce_bucket", bucket * grad_bytes,
            f"min(reduce_bucket_size {z.reduce_bucket_size:,}, {trainable:,} trainable) x {grad_bytes} B")
    return out


def zero3_buffer_terms(buffers: dict[str, Term]) -> dict[str, Term]:
    """The buffers summed into the terms they belong to: weights, or gradients."""
    out: dict[str, Term] = {}
    for key, names in (("weights", ("zero3_live_params", "zero3_prefetch", "zero3_persistent")),
                       ("gradients", ("zero3_module_grad", "zero3_reduce_bucket"))):
        parts = [buffers[n] for n in names if n in buffers]
        if parts:
            total = sum(t.bytes for t in parts)
            out[key] = Term(key, total, " + ".join(f"{t.name} {t.bytes:,} B ({t.formula})" for t in parts))
    return out


def _on_gpu(term: Term, where: str, n: int, whole: int = 0) -> Term:
    if where == "replicated":
        return term
    if where == "cpu":
        return Term(term.name, 0, f"offloaded to CPU ({term.bytes:,} B)")
    if whole:
        share = math.ceil((term.bytes - whole) / n) + whole
        return Term(term.name, share, f"({term.formula} - {whole:,} B of NF4 quantisation state) / {n} GPUs "
                                      f"+ that state whole on every GPU = {share:,} B")
    share = math.ceil(term.bytes / n)
    return Term(term.name, share, f"({term.formula}) / {n} GPUs = {share:,} B")


def per_gpu_states(memory: dict[str, Term], sharding: Sharding,
                   buffer: dict[str, Term] | None = None,
                   unsharded: dict[str, int] | None = None) -> dict[str, Term]:
    """The whole-model terms (weights, gradients, master weights, optimizer states, activations) ->
    the same terms on one GPU of `sharding.num_gpus`. Sharded terms take ceil(bytes / N), but for
    the part of a term no strategy shards (`unsharded`: QLoRA's quantisation state, see
    `quant.nf4_state_bytes`), which every GPU holds whole; offloaded terms take 0 on the GPU. Under
    ZeRO-3 the run-time buffers (see `zero3_buffers`) are added to the terms they belong to; they
    stay on the GPU whatever is offloaded. FSDP2's buffers depend on the moment of the step and are
    added to the timeline's phases instead (`fsdp.phase_extras`)."""
    n = sharding.num_gpus
    kept = unsharded or {}
    out = {key: _on_gpu(term, placement(key, sharding), n, kept.get(key, 0)) for key, term in memory.items()}
    if sharding.strategy == "zero3":
        for key, part in (buffer or {}).items():
            t = out[key]
            total = t.bytes + part.bytes
            out[key] = Term(t.name, total, f"{t.formula}; + ZeRO-3 buffers: {part.formula} = {total:,} B")
    return out


def cpu_bytes(memory: dict[str, Term], sharding: Sharding) -> int:
    """Bytes each GPU's process keeps in CPU memory under offload: its 1/N shard of every offloaded
    term (every offloadable term is sharded in every strategy that allows offload)."""
    n = sharding.num_gpus
    return sum(math.ceil(t.bytes / n) for key, t in memory.items() if placement(key, sharding) == "cpu")


PhasesOf = Callable[[dict[str, Term], "Sharding | None"], "tuple[Phase, ...]"]
PhaseBytesOf = Callable[[dict[str, Term], "Sharding | None"], "tuple[int, ...]"]


def _first_fitting(fits_on: Callable[[int], bool], guess: int) -> int | None:
    """The least n in [1, MAX_GPUS] with fits_on(n), for fits_on false then true (monotone), searched
    outward from `guess` by doubling steps, then bisection."""
    guess = min(max(guess, 1), MAX_GPUS)
    if fits_on(guess):
        hi, step = guess, 1
        lo = guess - 1
        while lo >= 1 and fits_on(lo):
            hi, step = lo, step * 2
            lo = max(0, hi - step)
        # lo does not fit (or is 0), hi fits
    else:
        lo, step = guess, 1
        hi = guess + 1
        while True:
            if hi > MAX_GPUS:
                return None
            if fits_on(hi):
                break
            lo, step = hi, step * 2
            hi = min(MAX_GPUS + 1, lo + step) if lo < MAX_GPUS else MAX_GPUS + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits_on(mid) else (mid, hi)
    return hi


def fewest_gpus(phase_bytes: Callable[[int], tuple[int, ...]], budget: int, shards: bool) -> int | None:
    """Fewest GPUs n whose every phase's per-GPU bytes are within `budget` (the largest peak the
    fit rule allows), or None when no n up to MAX_GPUS does.

    Each phase's per-GPU bytes have the shape r + s / n (r replicated, s sharded, each share rounded
    up). r and s are read off n = 1 and n = MAX_GPUS; the least n with r + s / n <= budget for every
    phase is the guess, and the exact fit is then checked around it (the bytes never grow with n),
    so a few evaluations replace a scan."""
    one = phase_bytes(1)
    if max(one) <= budget:
        return 1
    if not shards or budget < 0:
        return None
    far = phase_bytes(MAX_GPUS)
    if max(far) > budget:
        return None
    m = MAX_GPUS
    guess = 1
    for a, b in zip(one, far, strict=True):
        s = (a - b) * m / (m - 1)  # sharded part
        r = a - s
        if a > budget:
            room = budget - r
            guess = max(guess, math.ceil(s / room) if room > 0 else m)
    return _first_fitting(lambda n: max(phase_bytes(n)) <= budget, guess)


@dataclass(frozen=True)
class Count:
    """The fewest GPUs under one strategy and why: at that count the phase that sets the per-GPU
    peak holds `whole` bytes on every GPU (activations, replicated states, gathered buffers) and a
    1/N share of `sharded` bytes, so N = ceil(sharded / (budget - whole)) up to the shares' rounding.
    `whole` and `sharded` are read off that phase at 1 and at MAX_GPUS GPUs, as `fewest_gpus` does."""

    gpus: int
    peak: int  # per-GPU allocator peak at `gpus`
    whole: int
    sharded: int


def _count(n: int | None, on: Callable[[int], tuple[int, ...]]) -> Count | None:
    """The `Count` for n GPUs from the search's own evaluations `on` (cached: no new plan work but
    the two ends, which the search has read whenever n > 1)."""
    if n is None:
        return None
    at = on(n)
    j = max(range(len(at)), key=at.__getitem__)
    if n == 1:
        return Count(1, at[j], at[j], 0)
    a, b, m = on(1)[j], on(MAX_GPUS)[j], MAX_GPUS
    sharded = round((a - b) * m / (m - 1))
    return Count(n, at[j], a - sharded, sharded)


@dataclass(frozen=True)
class DataParallel:
    """A method's model states placed on GPUs: what `plan` keeps per method.

    `per_gpu` holds the terms on one GPU (the whole-model terms when no GPU count is given);
    `min_gpus` is the fewest GPUs for each strategy without offload (None: does not fit at any
    count); `gpus_needed` is the fewest over the strategies (or, with a sharding, under it and its
    offload) and `gpus_needed_strategy` names it (`single` when one GPU holds the step).
    `buffers` are ZeRO-3's run-time buffers by name (under zero3).
    """

    sharding: Sharding | None
    per_gpu: dict[str, Term]
    cpu_bytes: int
    gpus_needed: int | None
    min_gpus: dict[str, int | None]
    gpus_needed_strategy: str | None = None
    buffers: dict[str, Term] = field(default_factory=dict)
    # per strategy, at its fewest GPUs: the per-GPU peak, and that peak's phase split as whole bytes
    # every GPU holds + bytes sharded 1/N (`Count`); None where the strategy does not fit
    min_gpus_count: dict[str, Count | None] = field(default_factory=dict)
    needed_peak: int | None = None  # the per-GPU peak on `gpus_needed` GPUs (the count shown)


def _strategy_label(n: int | None, strategy: str) -> str | None:
    if n is None:
        return None
    return "single" if n == 1 else DISPLAY[strategy]


def distribute(memory: dict[str, Term], sharding: Sharding | None, buffers: dict[str, Term] | None,
               budget: int, phases: PhasesOf, phase_bytes: PhaseBytesOf | None = None,
               unsharded: dict[str, int] | None = None, fewest_only: bool = False) -> DataParallel:
    """Place whole-model terms on GPUs: per-GPU terms for the chosen sharding (unchanged when
    `sharding` is None), CPU bytes under offload, the fewest GPUs for every strategy, and the fewest
    overall. `budget` is the largest per-GPU peak the fit rule allows (`gpus.largest_fitting_peak`);
    `phases` gives the step's phases on one GPU from its per-GPU terms, and `phase_bytes` (when
    given) their bytes alone, which is all the search for the fewest GPUs reads. `unsharded`: the
    part of a term every GPU keeps whole (see `per_gpu_states`).

    `fewest_only`: only the fewest overall (or under the chosen sharding) is wanted, as advice's
    re-plans read it: a strategy that does not hold the step on one GPU fewer than a strategy before
    it needs is not searched (bytes never grow with N, so it can need no fewer), and `min_gpus` and
    `min_gpus_count` leave it out; under a chosen sharding only that strategy is searched."""
    buffer = zero3_buffer_terms(buffers or {})
    if phase_bytes is None:
        def phase_bytes(m: dict[str, Term], sh: Sharding | None) -> tuple[int, ...]:
            return tuple(p.bytes for p in phases(m, sh))

    def least(s: Sharding) -> Count | None:
        # every phase holds the weights on the GPU: where they alone (as sharded as they get) are
        # over the budget, no count fits, and no phase need be evaluated (ddp, zero1 and zero2 keep
        # the weights whole: a 70B model's 141 GB never fits an 80 GB card under them)
        if per_gpu_states(memory, s.with_gpus(MAX_GPUS), buffer, unsharded)["weights"].bytes > budget:
            return None
        tried: dict[int, tuple[int, ...]] = {}  # the search may come back to a count

        def on(n: int) -> tuple[int, ...]:
            if n not in tried:
                sh = s.with_gpus(n)
                tried[n] = phase_bytes(per_gpu_states(memory, sh, buffer, unsharded), sh)
            return tried[n]
        return _count(fewest_gpus(on, budget, s.strategy != "none"), on)

    def holds(s: str, n: int) -> bool:
        """Whether strategy `s` holds the step on `n` GPUs, by the search's own test."""
        if n < 1:
            return False
        sh = Sharding(n, s)
        m = per_gpu_states(memory, sh, buffer, unsharded)
        return m["weights"].bytes <= budget and max(phase_bytes(m, sh)) <= budget

    if not fewest_only:
        counts = {s: least(Sharding(1, s)) for s in SEARCHED}
    elif sharding is not None:
        searched = (sharding.strategy,) if sharding.offload == "none" else ()
        counts = {s: least(Sharding(1, s)) for s in searched}
    else:  # a later strategy must need fewer GPUs to be the fewest (ties go to the earlier)
        counts = {}
        for s in SEARCHED:
            found = [c.gpus for c in counts.values() if c is not None]
            if not found or holds(s, min(found) - 1):
                counts[s] = least(Sharding(1, s))
    minimum = {s: None if c is None else c.gpus for s, c in counts.items()}
    if sharding is None:
        fewest = [(c.gpus, SEARCHED.index(s), s) for s, c in counts.items() if c is not None]
        n, _, best = min(fewest) if fewest else (None, 0, "none")
        return DataParallel(None, dict(memory), 0, n, minimum, _strategy_label(n, best),
                            min_gpus_count=counts, needed_peak=counts[best].peak if n else None)
    searched = sharding.offload == "none" and sharding.strategy in counts
    chosen = counts[sharding.strategy] if searched else least(sharding)
    n = None if chosen is None else chosen.gpus
    kept = buffers if sharding.strategy == "zero3" else {}
    return DataParallel(sharding, per_gpu_states(memory, sharding, buffer, unsharded),
                        cpu_bytes(memory, sharding), n, minimum, _strategy_label(n, sharding.strategy),
                        dict(kept or {}), counts, None if chosen is None else chosen.peak)


# What every GPU holds whole (not divided by N) under each strategy, beside the activations of its
# own micro-batch, at the moment of the step that sets its GPU count.
HELD_WHOLE = {
    "none": "every model state (plain data parallelism shards nothing)",
    "zero1": "the weights and gradients (zero1 shards only master weights and optimizer states)",
    "zero2": "the weights (zero2 shards gradients, master weights and optimizer states)",
    "zero3": "DeepSpeed's run-time buffers: the module being run gathered in full with the "
             "prefetch bucket (stage3_prefetch_bucket_size), small persistent parameters, that "
             "module's gradient and the reduce bucket",
    "fsdp": "FSDP2's buffers: the root (embeddings, final norm, head) gathered from forward to the "
            "end of backward, two decoder blocks gathered in backward (the one run and the one "
            "prefetched), a block's gradients whole until their reduce-scatter, the previous "
            "block's reduce-scatter input and the head's gradients whole",
    "fsdp1": "FSDP1's buffers: each wrapped unit's flat parameter all-gathered whole (padded to the "
             "GPU count), the root's from forward to the end of backward, two decoder blocks' in "
             "backward, a block's gradients whole until their reduce-scatter",
}


def count_reasons(dp: DataParallel, budget: int) -> list[str]:
    """Why the strategies need different GPU counts, from the search's own numbers (`Count`): at
    the moment that sets a strategy's count every GPU holds W bytes whole and S / N of the rest, so
    the fewest N with W + S / N <= budget is about S / (budget - W). Where ZeRO-3 and FSDP differ,
    the difference in W (what each holds whole) is the reason."""
    lines = []
    for s, c in dp.min_gpus_count.items():
        name = DISPLAY[s]
        if c is None:
            lines.append(f"{name}: no count fits: what every GPU keeps whole, its activations and "
                         f"{HELD_WHOLE[s]}, is over the {budget:,} B a GPU allows")
        elif c.gpus == 1:
            lines.append(f"{name}: 1 GPU holds the step (peak {c.peak:,} B <= {budget:,} B)")
        else:
            room = budget - c.whole
            lines.append(f"{name} {c.gpus}: {c.whole:,} B whole on every GPU (activations and "
                         f"{HELD_WHOLE[s]}) + {c.sharded:,} B / N; N >= {c.sharded:,} / ({budget:,} - "
                         f"{c.whole:,}) = {c.sharded / room:,.1f}")
    z, f = dp.min_gpus_count.get("zero3"), dp.min_gpus_count.get("fsdp")
    if z and f and z.gpus != f.gpus and min(z.gpus, f.gpus) > 1:
        more, fewer = ("fsdp", "zero3") if f.gpus > z.gpus else ("zero3", "fsdp")
        hi, lo = (f, z) if more == "fsdp" else (z, f)
        lines.append(f"{more} needs {hi.gpus} GPUs where {fewer} needs {lo.gpus}: it holds "
                     f"{hi.whole - lo.whole:,} B more whole on every GPU, which leaves "
                     f"{budget - hi.whole:,} B for its shards instead of {budget - lo.whole:,} B"
                     + (" (FSDP2 keeps the root and two blocks gathered, DeepSpeed one module and "
                        "its prefetch bucket)" if more == "fsdp" else
                        " (DeepSpeed's prefetch and reduce buckets beside the gathered module, "
                        "against FSDP2's root and two blocks)"))
    return lines


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
    if dense and STAGE[sharding.strategy] == 3:
        notes.append("--params: layer sizes are unknown, so ZeRO-3's and FSDP2's gathered-layer buffers "
                     "are not counted")
    if sharding.strategy == "fsdp":
        notes.append("fsdp: PyTorch FSDP2, fully_shard on each decoder layer and on the root; "
                     f"reshard_after_forward {'on' if setup.reshard_after_forward else 'off'}")
    if sharding.strategy == "fsdp1":
        notes.append("fsdp1: PyTorch FSDP1 (FullyShardedDataParallel), each decoder layer and the root "
                     "one flat parameter (use_orig_params=False), padded to a multiple of the GPU "
                     f"count; {'FULL_SHARD' if setup.reshard_after_forward else 'SHARD_GRAD_OP'}, "
                     "backward prefetch BACKWARD_PRE")
    return notes


def ddp_bucket_bytes(gradient_bytes: int) -> int:
    """PyTorch DDP's gradient buckets: with `gradient_as_bucket_view=False` (the default) the
    reducer keeps flat bucket tensors as large as all the trained gradients together, live for the
    whole step, and copies each gradient into them for the all-reduce: + trainable x grad bytes.
    Measured to the byte on CPU (`measure.distributed`); one GPU runs no DDP and holds none."""
    return gradient_bytes


def _states_on_gpu(predicted: StepPrediction, per_gpu: dict[str, Term], sharding: Sharding) -> States:
    """The whole-model step's states with the model states replaced by the per-GPU terms, and the
    gradients each layer produces and foreach AdamW's temporary divided as their terms are."""
    from dataclasses import replace

    n = sharding.num_gpus
    grads_where = placement("gradients", sharding)

    def share(value: int, where: str) -> int:
        if where == "replicated":
            return value
        return 0 if where == "cpu" else math.ceil(value / n)

    s = predicted.states
    if grads_where == "replicated":
        layer_gradients = s.layer_gradients
    elif grads_where == "cpu":
        layer_gradients = tuple((0, 0, 0) for _ in s.layer_gradients)
    else:
        ceil = math.ceil
        layer_gradients = tuple((ceil(a / n), ceil(b / n), ceil(c / n)) for a, b, c in s.layer_gradients)
    # the output projection's part of each layer's attention gradients, placed as those are
    attn_out = s.attn_out_gradients
    mlp_up = s.mlp_up_gradients
    if grads_where != "replicated":
        attn_out = tuple(0 if grads_where == "cpu" else math.ceil(g / n) for g in attn_out)
        mlp_up = tuple(0 if grads_where == "cpu" else math.ceil(g / n) for g in mlp_up)
    return replace(
        s,
        attn_out_gradients=attn_out,
        mlp_up_gradients=mlp_up,
        weights=per_gpu["weights"].bytes,
        gradients=per_gpu["gradients"].bytes,
        optimizer_states=per_gpu["optimizer_states"].bytes + per_gpu["master_weights"].bytes,
        optimizer_temporary=share(s.optimizer_temporary, placement("optimizer_states", sharding)),
        head_gradients=share(s.head_gradients, grads_where),
        layer_gradients=layer_gradients,
    )


def _timeline_on_gpu(predicted: StepPrediction, per_gpu: dict[str, Term], sharding: Sharding, spec: ModelSpec,
                     setup: TrainSetup, precision: Precision) -> tuple[States, tuple[Phase, ...]]:
    """The per-GPU states and the timeline's phases on them, before DDP's or FSDP2's buffers."""
    from .step import conditions
    from .timeline import step_phases

    states = _states_on_gpu(predicted, per_gpu, sharding)
    vocab = spec.vocab_size if setup.task == "causal-lm" else setup.num_labels  # as `predict_step`
    tokens = conditions(setup, precision).tokens
    return states, step_phases(states, predicted.profile, vocab, tokens)


def step_phases_on_gpu(predicted: StepPrediction, per_gpu: dict[str, Term], sharding: Sharding | None,
                       spec: ModelSpec, setup: TrainSetup, precision: Precision,
                       describe: bool = True) -> tuple[Phase, ...]:
    """The step's timeline on one GPU: the whole-model `StepPrediction` with its model states
    replaced by the per-GPU terms, and the gradients each layer produces and foreach AdamW's
    temporary divided as their terms are (a shard of each, or none on the GPU when offloaded).
    Activations are unchanged: each GPU runs a whole micro-batch. Under FSDP2 each phase gains the
    buffers FSDP2 holds at that moment (`fsdp.phase_extras`). Without sharding these are the
    prediction's own phases. With `describe` off the buffers added are not spelt out (the
    fewest-GPU search reads bytes alone, at every count it tries)."""
    if sharding is None:
        return predicted.phases
    states, phases = _timeline_on_gpu(predicted, per_gpu, sharding, spec, setup, precision)
    if sharding.strategy == "none" and sharding.num_gpus > 1:
        bucket = ddp_bucket_bytes(predicted.states.gradients)
        if not describe:
            return tuple(p._replace(bytes=p.bytes + bucket) for p in phases)
        return tuple(p._replace(bytes=p.bytes + bucket, text=f"{p.what}; + DDP gradient buckets {bucket:,} B")
                     for p in phases)
    if sharding.strategy not in FSDP:
        return phases
    from .fsdp import phase_extras, start_phase, units

    u = units(spec, setup, precision, predicted.states, sharding.strategy == "fsdp1")
    return (start_phase(states, predicted.profile.embedding, u, sharding.num_gpus),) + tuple(
        phase_extras(p, u, sharding.num_gpus, setup.reshard_after_forward,
                     placement("gradients", sharding) == "cpu", describe) for p in phases)


def step_phase_bytes_on_gpu(predicted: StepPrediction, per_gpu: dict[str, Term], sharding: Sharding | None,
                            spec: ModelSpec, setup: TrainSetup, precision: Precision) -> tuple[int, ...]:
    """The bytes of `step_phases_on_gpu`'s phases: what the GPU-count search reads. Under FSDP2 the
    buffers are added to the bytes directly (`fsdp.extra_bytes`), no phase rebuilt: the search reads
    every phase at every count it tries."""
    if sharding is None or sharding.strategy not in FSDP:
        return tuple(p.bytes for p in step_phases_on_gpu(predicted, per_gpu, sharding, spec, setup, precision,
                                                          describe=False))
    from .fsdp import extra_bytes, start_phase, units

    states, phases = _timeline_on_gpu(predicted, per_gpu, sharding, spec, setup, precision)
    u = units(spec, setup, precision, predicted.states, sharding.strategy == "fsdp1")
    n, reshard = sharding.num_gpus, setup.reshard_after_forward
    offloaded = placement("gradients", sharding) == "cpu"
    return (start_phase(states, predicted.profile.embedding, u, n).bytes,) + tuple(
        p.bytes + extra_bytes(p, u, n, reshard, offloaded, False)[0] for p in phases)
