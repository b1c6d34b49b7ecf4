"""Advice for a plan that does not fit: the cheapest changes that make each method fit, and what
gradient checkpointing would give, each found by planning the changed setup again.

Nothing here estimates: every number is read off `plan.make_plan` for the changed setup, and "fits"
is that plan's own verdict (`gpus.fits`). A method "does not fit" when its step does not fit one
GPU (or one of --num-gpus under the chosen sharding). The changes tried, alone and, where
checkpointing is off, beside checkpointing:

- `--grad-checkpointing`: keep each layer's input, recompute the rest in backward;
- `--batch-size B`: the largest micro-batch below the one asked that fits (`fit.largest`);
- `--method qlora` for LoRA: the frozen base in NF4;
- `--optimizer adamw-8bit` for AdamW: bitsandbytes' 8-bit states;
- `--activation-offload` (with checkpointing): the checkpointed inputs in CPU memory;
- a GPU count and strategy: the fewest GPUs that hold the (changed) step, over every strategy
  (under the chosen one when --num-gpus is given).

A change whose step still needs several GPUs is named with the fewest that hold it, so every
suggestion is a set of flags whose plan fits. Suggestions are ordered by GPUs, then by how many
things change, then by peak; one that adds a change to another without saving a GPU is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .errors import PlanError
from .fit import largest
from .gpus import Gpu
from .plan import MethodPlan, Plan, make_plan
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


def _candidates(setup: TrainSetup, p: MethodPlan,
                shaped: bool) -> list[tuple[tuple[str, ...], dict, tuple[str, ...]]]:
    """(names, TrainSetup changes, flags) of every change tried for this setup."""
    singles = []
    checkpointing = not setup.grad_checkpointing and shaped
    if setup.method == "lora":
        singles.append((("qlora",), {"method": "qlora"}, ("--method", "qlora")))
    # 8-bit states save at most the optimizer states term
    if setup.optimizer == "adamw" and p.memory["optimizer_states"].bytes >= WORTH * p.memory["peak"].bytes:
        singles.append((("8-bit optimizer",), {"optimizer": "adamw-8bit"}, ("--optimizer", "adamw-8bit")))
    out = list(singles)
    if checkpointing:
        gc = (("checkpointing",), {"grad_checkpointing": True}, ("--grad-checkpointing",))
        out.insert(0, gc)
        out += [(gc[0] + n, gc[1] | c, gc[2] + f) for n, c, f in singles]
    if shaped and not setup.activation_offload:
        names = (("checkpointing",) if checkpointing else ()) + ("activation offload",)
        flags = (("--grad-checkpointing",) if checkpointing else ()) + ("--activation-offload",)
        out.append((names, {"grad_checkpointing": True, "activation_offload": True}, flags))
    return out


def _rank(setup: TrainSetup) -> int | None:
    return None if setup.method == "full" else setup.rank


def _placed(setup: TrainSetup, names: tuple[str, ...], flags: tuple[str, ...],
            q: MethodPlan) -> Suggestion | None:
    """The suggestion for a changed plan `q`: as it is when it fits, else on the fewest GPUs that
    hold it (under the chosen sharding when --num-gpus was given); None when none do."""
    if q.fits:
        n = setup.num_gpus or 1
        strategy = "single" if n == 1 else _display(q.data_parallel.sharding.strategy)
        return Suggestion(setup.method, _rank(setup), names, flags, q.memory["peak"].bytes, n, strategy)
    dp = q.data_parallel
    if dp is None or not q.gpus_needed or dp.needed_peak is None:
        return None
    n = q.gpus_needed
    if setup.num_gpus:  # the chosen strategy and offload; only the count changes
        more: tuple[str, ...] = ("--num-gpus", str(n))
    else:
        more = ("--num-gpus", str(n), "--sharding", q.gpus_needed_strategy)
    return Suggestion(setup.method, _rank(setup), names + ("gpus",), flags + more, dp.needed_peak, n,
                      q.gpus_needed_strategy or "")


def _display(strategy: str) -> str:
    from .sharding import DISPLAY

    return DISPLAY.get(strategy, strategy)


def _scaled(setup: TrainSetup, p: MethodPlan) -> list[Suggestion]:
    """No change but the GPUs: the fewest that hold the step as planned, and with --num-gpus (no
    offload) the fewest under any strategy when another needs fewer."""
    rank = _rank(setup)
    out = []
    dp = p.data_parallel
    placed = _placed(setup, (), (), p)
    if placed is not None:
        out.append(placed)
    if setup.num_gpus and setup.offload == "none" and dp is not None:
        counts = [(c.gpus, s, c) for s, c in dp.min_gpus_count.items() if c is not None]
        if counts:
            n, s, c = min(counts, key=lambda t: t[0])
            if placed is None or n < placed.gpus:
                out.append(Suggestion(setup.method, rank, ("gpus", "strategy"),
                                      ("--num-gpus", str(n), "--sharding", _display(s)), c.peak, n,
                                      "single" if n == 1 else _display(s)))
    return out


def _smaller_batch(setup: TrainSetup, plan_one: Planner) -> Suggestion | None:
    """The largest micro-batch below the one asked whose step fits, by the planner's verdict."""
    if setup.batch_size <= 1:
        return None
    b = largest(lambda n: plan_one(setup.with_(batch_size=n)).fits, setup.batch_size - 1)
    if b == 0:
        return None
    return _placed(setup, ("batch",), ("--batch-size", str(b)), plan_one(setup.with_(batch_size=b)))


def _ordered(found: list[Suggestion]) -> tuple[Suggestion, ...]:
    """Fewest GPUs first, then fewest changes, then lowest peak; a suggestion whose changes hold
    another's and that needs no fewer GPUs is dropped; at most PER_METHOD."""
    def dominated(s: Suggestion) -> bool:
        mine = set(s.changes) - {"gpus", "strategy"}
        return any(o is not s and set(o.changes) - {"gpus", "strategy"} < mine and o.gpus <= s.gpus
                   for o in found)

    kept = {s.flags: s for s in found if not dominated(s)}.values()
    return tuple(sorted(kept, key=lambda s: (s.gpus, len(s.changes), s.peak))[:PER_METHOD])


def suggestions_for(setup: TrainSetup, p: MethodPlan, model: ModelSpec | DenseSize,
                    plan_one: Planner) -> tuple[Suggestion, ...]:
    """The cheapest changes that make this method's step fit (see the module's docstring)."""
    found = _scaled(setup, p)
    batch = _smaller_batch(setup, plan_one)
    if batch is not None:
        found.append(batch)
    enough: list[set[str]] = []  # changes that fit as they are: adding to them cannot help
    for names, changes, flags in _candidates(setup, p, isinstance(model, ModelSpec)):
        if any(e < set(names) for e in enough):
            continue
        try:
            q = plan_one(setup.with_(**changes))
        except PlanError:  # a change this setup cannot take (e.g. a stack that forbids it)
            continue
        s = _placed(setup, names, flags, q)
        if s is not None:
            found.append(s)
            if q.fits:
                enough.append(set(names))
    return _ordered(found)


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
    if isinstance(model, ModelSpec) and not any(s.grad_checkpointing for s in setups):
        on = tuple(s.with_(grad_checkpointing=True) for s in setups)
        checkpointed = make_plan(model, on, gpu, fewest_only=True).plans
        plan_one.seen.update(zip(on, checkpointed, strict=True))  # type: ignore[attr-defined]
    found: list[Suggestion] = []
    for setup, p in zip(setups, plan.plans, strict=True):
        if not p.fits:
            found += suggestions_for(setup, p, model, plan_one)
    return replace(plan, advice=Advice(checkpointed, tuple(found)))
