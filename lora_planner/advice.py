"""Advice for a plan that does not fit: the cheapest changes that make each method fit, and what
gradient checkpointing would give, each found by planning the changed setup again.

Nothing here estimates: every number is read off `plan.make_plan` for the changed setup, and "fits"
is that plan's own verdict (`gpus.fits`). A method "does not fit" when its step does not fit one
GPU (or one of --num-gpus under the chosen sharding). The changes tried, in every combination:

- `--grad-checkpointing`: keep each layer's input, recompute the rest in backward;
- `--method qlora` for LoRA: the frozen base in NF4;
- `--optimizer adamw-8bit` for AdamW: bitsandbytes' 8-bit states;
- `--activation-offload` (with checkpointing): the checkpointed inputs in CPU memory;
- with --num-gpus, a stronger rung of sharding and offload on that count (`LADDER`: zero1, zero2,
  zero3, zero3 with the optimizer offloaded, then the parameters too);
- `--batch-size B`: the largest micro-batch below the one asked that then fits (`fit.largest`),
  when the batch asked fits nowhere on the user's GPUs.

A combination that fits on no rung of the user's GPUs even at batch 1 is named with the fewest GPUs
that hold it as asked, and so is the unchanged step (over every strategy, or under the chosen one
with --num-gpus), so every suggestion is a set of flags whose plan fits. Suggestions on the user's
GPUs come first, then fewest GPUs, fewest changes, lowest peak; one that adds changes to another
without saving a GPU or allowing a larger batch is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .errors import PlanError
from .gpus import Gpu
from .plan import MethodPlan, Plan, make_plan
from .recorded import RecordedModel
from .spec import DenseSize, ModelSpec, TrainSetup

PER_METHOD = 3  # suggestions kept per method: a handful, not a search report


@dataclass(frozen=True)
class Suggestion:
    """One way to make one method fit: the flags to add and what the plan then says."""

    method: str
    rank: int | None
    changes: tuple[str, ...]  # what changes, by name (`checkpointing`, `qlora`, `gpus`, ...)
    flags: tuple[str, ...]  # the CLI flags to add, e.g. ("--grad-checkpointing", "--num-gpus", "15")
    peak: int  # per-GPU allocator peak after the change
    gpus: int  # GPUs the changed step is planned on
    strategy: str  # single, ddp, zero1, zero2, zero3 or fsdp
    batch: int  # the micro-batch the changed step is planned at

    @property
    def change(self) -> str:
        return " ".join(self.flags)


@dataclass(frozen=True)
class Advice:
    """`checkpointed`: the plan's methods planned again with gradient checkpointing, in order (empty
    when it is on, or when every method fits); `suggestions`: for each method that does not fit.
    Each plan made again searches GPU counts only as far as the fewest (`make_plan`'s `fewest_only`):
    the fewest, its strategy and its peak are all advice reads or shows."""

    checkpointed: tuple[MethodPlan, ...] = ()
    suggestions: tuple[Suggestion, ...] = ()


Planner = Callable[[TrainSetup], MethodPlan]


def _planner(model: ModelSpec | DenseSize, gpu: Gpu) -> Planner:
    """make_plan for one setup, remembered: the batch search and the changes share plans."""
    seen: dict[TrainSetup, MethodPlan] = {}

    def plan_one(setup: TrainSetup) -> MethodPlan:
        if setup not in seen:
            seen[setup] = make_plan(model, (setup,), gpu, fewest_only=True).plans[0]
        return seen[setup]
    plan_one.seen = seen  # type: ignore[attr-defined]
    return plan_one


# A change that can save less than this share of the peak is not worth naming (8-bit states for
# LoRA's few trainable parameters): it cannot move the GPU count but at a boundary.
WORTH = 0.01

Change = tuple[tuple[str, ...], dict, tuple[str, ...]]  # (names, TrainSetup changes, CLI flags)

# How data parallelism is made to hold more, weakest first, for a count the user gave: each rung
# keeps no more per GPU than the one before (ZeRO stages shard more, offload moves more to the CPU),
# which is what lets `_weakest` bisect the ladder. FSDP2 offloads only parameters and all together.
LADDER = (("none", "none"), ("zero1", "none"), ("zero2", "none"), ("zero3", "none"),
          ("zero3", "optimizer"), ("zero3", "optimizer+params"))
FSDP_LADDER = (("fsdp", "none"), ("fsdp", "optimizer+params"))
_STAGE = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3}
_OFFLOAD = {"none": 0, "optimizer": 1, "optimizer+params": 2}


def _knobs(setup: TrainSetup, p: MethodPlan, shaped: bool) -> list[Change]:
    """Every set of single-GPU changes tried, fewest first: checkpointing, QLoRA for LoRA, 8-bit
    AdamW where its states are worth it, activation offload (with checkpointing)."""
    single: list[Change] = []
    if shaped and not setup.grad_checkpointing:
        single.append((("checkpointing",), {"grad_checkpointing": True}, ("--grad-checkpointing",)))
    if setup.method == "lora":
        single.append((("qlora",), {"method": "qlora"}, ("--method", "qlora")))
    # 8-bit states save at most the optimizer states term
    if setup.optimizer == "adamw" and p.memory["optimizer_states"].bytes >= WORTH * p.memory["peak"].bytes:
        single.append((("8-bit optimizer",), {"optimizer": "adamw-8bit"}, ("--optimizer", "adamw-8bit")))
    sets: list[Change] = [((), {}, ())]
    for names, changes, flags in single:
        sets += [(n + names, c | changes, f + flags) for n, c, f in sets]
    if shaped and not setup.activation_offload:  # offload keeps checkpointed inputs: needs checkpointing
        ao = (("activation offload",), {"grad_checkpointing": True, "activation_offload": True},
              ("--activation-offload",))
        sets += [(n + ao[0], c | ao[1], f + ao[2]) for n, c, f in sets
                 if c.get("grad_checkpointing") or setup.grad_checkpointing]
    return sorted(sets, key=lambda s: len(s[0]))


def _ladder(setup: TrainSetup) -> list[Change]:
    """The user's own sharding and offload, then each stronger rung (only with --num-gpus: without
    it the GPU count is searched over every strategy anyway)."""
    own: Change = ((), {}, ())
    if not setup.num_gpus:
        return [own]
    rungs = FSDP_LADDER if setup.sharding == "fsdp" else LADDER
    out = [own]
    for s, o in rungs:
        if (s, o) == (setup.sharding, setup.offload) or _OFFLOAD[o] < _OFFLOAD[setup.offload]:
            continue
        if s != "fsdp" and _STAGE[s] < _STAGE.get(setup.sharding, 0):
            continue
        # named with their values: offloading the optimizer is not offloading the parameters too
        names = (((f"sharding {s}",) if s != setup.sharding else ())
                 + ((f"offload {o}",) if o != setup.offload else ()))
        flags = ((("--sharding", s) if s != setup.sharding else ())
                 + (("--offload", o) if o != setup.offload else ()))
        out.append((names, {"sharding": s, "offload": o}, flags))
    return out


def _rank(setup: TrainSetup) -> int | None:
    return None if setup.method == "full" else setup.rank


def _placed(asked: TrainSetup, setup: TrainSetup, names: tuple[str, ...], flags: tuple[str, ...],
            q: MethodPlan) -> Suggestion | None:
    """The suggestion for `asked`'s method changed to `setup`, planned as `q`: as it is when it
    fits, else on the fewest GPUs that hold it (under the chosen sharding when --num-gpus was
    given); None when none do."""
    if q.fits:
        n = setup.num_gpus or 1
        strategy = "single" if n == 1 else _display(q.data_parallel.sharding.strategy)
        return Suggestion(asked.method, _rank(asked), names, flags, q.memory["peak"].bytes, n, strategy,
                          setup.batch_size)
    dp = q.data_parallel
    if dp is None or not q.gpus_needed or dp.needed_peak is None:
        return None
    n = q.gpus_needed
    if setup.num_gpus:  # the chosen strategy and offload; only the count changes
        more: tuple[str, ...] = ("--num-gpus", str(n))
    else:
        more = ("--num-gpus", str(n), "--sharding", q.gpus_needed_strategy)
    return Suggestion(asked.method, _rank(asked), names + ("gpus",), flags + more, dp.needed_peak, n,
                      q.gpus_needed_strategy or "", setup.batch_size)


def _display(strategy: str) -> str:
    from .sharding import DISPLAY

    return DISPLAY.get(strategy, strategy)


def _scaled(setup: TrainSetup, p: MethodPlan) -> list[Suggestion]:
    """No change but the GPUs: the fewest that hold the step as planned, and with --num-gpus (no
    offload) the fewest under any strategy when another needs fewer."""
    rank = _rank(setup)
    out = []
    dp = p.data_parallel
    placed = _placed(setup, setup, (), (), p)
    if placed is not None:
        out.append(placed)
    if setup.num_gpus and setup.offload == "none" and dp is not None:
        counts = [(c.gpus, s, c) for s, c in dp.min_gpus_count.items() if c is not None]
        if counts:
            n, s, c = min(counts, key=lambda t: t[0])
            if placed is None or n < placed.gpus:
                out.append(Suggestion(setup.method, rank, ("gpus", "strategy"),
                                      ("--num-gpus", str(n), "--sharding", _display(s)), c.peak, n,
                                      "single" if n == 1 else _display(s), setup.batch_size))
    return out


def _fits(plan_one: Planner, setup: TrainSetup) -> bool:
    """The planner's verdict; a setup the planner refuses (a stack that forbids a change) does not fit."""
    try:
        return plan_one(setup).fits
    except PlanError:
        return False


def _weakest(plan_one: Planner, ladder: list[TrainSetup]) -> int | None:
    """The index of the first setup of `ladder` that fits, bisecting on the rungs' order (each holds
    no more per GPU than the one before); None when not even the strongest fits."""
    if not _fits(plan_one, ladder[-1]):
        return None
    lo, hi = 0, len(ladder) - 1  # ladder[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(plan_one, ladder[mid]):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _fitting(setup: TrainSetup, knob: Change, ladder: list[Change], plan_one: Planner) -> Suggestion | None:
    """One set of single-GPU changes made to fit the user's GPUs: on the weakest rung of the ladder
    that holds the batch asked, else on the weakest that holds one sequence with the largest batch
    that fits there; None when neither does."""
    rungs = [setup.with_(**knob[1], **rung[1]) for rung in ladder]
    i = _weakest(plan_one, rungs)
    if i is not None:
        return _placed(setup, rungs[i], knob[0] + ladder[i][0], knob[2] + ladder[i][2], plan_one(rungs[i]))
    if setup.batch_size <= 1:
        return None
    ones = [r.with_(batch_size=1) for r in rungs]
    i = _weakest(plan_one, ones)
    if i is None:
        return None
    from .fit import largest  # only a batch that fits nowhere is searched: not every plan's import

    b = largest(lambda n: _fits(plan_one, rungs[i].with_(batch_size=n)), setup.batch_size - 1)
    q = rungs[i].with_(batch_size=b)
    return _placed(setup, q, knob[0] + ladder[i][0] + ("batch",),
                   knob[2] + ladder[i][2] + ("--batch-size", str(b)), plan_one(q))


def _dominated(s: Suggestion, o: Suggestion) -> bool:
    """`o` makes `s` pointless: it changes a subset of what `s` changes (a smaller batch aside),
    needs no more GPUs and keeps a batch at least as large, and is not the same."""
    mine, theirs = (set(x.changes) - {"batch"} for x in (s, o))
    return (o is not s and theirs <= mine and o.gpus <= s.gpus and o.batch >= s.batch
            and (theirs < mine or o.gpus < s.gpus or o.batch > s.batch))


def _ordered(found: list[Suggestion], target: int) -> tuple[Suggestion, ...]:
    """Those on the user's GPUs (one, or --num-gpus; fewer count as that many) first, then fewest
    GPUs, then fewest changes, then lowest peak; a suggestion another dominates (`_dominated`) is
    dropped; at most PER_METHOD."""
    kept = {s.flags: s for s in found if not any(_dominated(s, o) for o in found)}.values()
    return tuple(sorted(kept, key=lambda s: (max(s.gpus, target), len(s.changes), s.peak))[:PER_METHOD])


def suggestions_for(setup: TrainSetup, p: MethodPlan, model: ModelSpec | DenseSize,
                    plan_one: Planner) -> tuple[Suggestion, ...]:
    """The cheapest changes that make this method's step fit (see the module's docstring): every
    set of single-GPU changes, fewest first, each on the weakest sharding rung and the largest batch
    that hold it on the user's GPUs (one, or --num-gpus); when a set holds nowhere there, the fewest
    GPUs that hold it as asked. The search stops at a number of changes no suggestion left to find
    could beat: PER_METHOD already found on the user's GPUs with no more changes than that."""
    target = setup.num_gpus or 1
    found = _scaled(setup, p)
    ladder = _ladder(setup)
    for names, changes, flags in _knobs(setup, p, isinstance(model, (ModelSpec, RecordedModel))):
        near = sorted(len(s.changes) for s in found if s.gpus <= target)
        if len(near) >= PER_METHOD and near[PER_METHOD - 1] <= len(names):
            break
        # a set holding a smaller one that fits as asked can only be dominated by it
        if any(set(s.changes) < set(names) and s.gpus <= target for s in found):
            continue
        s = _fitting(setup, (names, changes, flags), ladder, plan_one)
        if s is None and names:
            try:
                q = plan_one(setup.with_(**changes))
            except PlanError:  # a change this setup cannot take (e.g. a stack that forbids it)
                continue
            s = _placed(setup, setup.with_(**changes), names, flags, q)
        if s is not None:
            found.append(s)
    return _ordered(found, target)


def advise(plan: Plan, model: ModelSpec | DenseSize, setups: tuple[TrainSetup, ...], gpu: Gpu) -> Plan:
    """`plan` with its `advice`: for every method that does not fit, the cheapest changes that make
    it fit; and, when checkpointing is off, every method planned again with it. `setups` are the
    plan's, in order, as given to `make_plan`."""
    if all(p.fits for p in plan.plans):
        return plan
    plan_one = _planner(model, gpu)
    # a change can land on a setup already planned (LoRA's `--method qlora` is the plan's own QLoRA
    # column): its verdict and GPUs are read off that plan, not planned again (a method's plan is
    # the same alone or beside others; only `compute` differs, which advice does not read)
    plan_one.seen.update(zip(setups, plan.plans, strict=True))  # type: ignore[attr-defined]
    checkpointed: tuple[MethodPlan, ...] = ()
    if isinstance(model, (ModelSpec, RecordedModel)) and not any(s.grad_checkpointing for s in setups):
        on = tuple(s.with_(grad_checkpointing=True) for s in setups)
        checkpointed = make_plan(model, on, gpu, fewest_only=True).plans
        plan_one.seen.update(zip(on, checkpointed, strict=True))  # type: ignore[attr-defined]
    found: list[Suggestion] = []
    for setup, p in zip(setups, plan.plans, strict=True):
        if not p.fits:
            found += suggestions_for(setup, p, model, plan_one)
    return replace(plan, advice=Advice(checkpointed, tuple(found)))
