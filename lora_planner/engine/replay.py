"""One liveness rule, replayed over a tape: forward, backward (with recompute), the optimizer step.

A storage is live from the op that makes it until its last forward use, or, if an op saved it, until
that op's backward has run. Backward walks the tape in reverse (autograd's order on one thread: the
node made last runs first once its gradients are in); each node allocates what its rule says, then
lets go of its incoming gradients and its saved tensors, then hands each input its gradient, summing
it with one already waiting there (a new tensor: both addends freed). A checkpointed region keeps
nothing in forward but its input; the first backward node reached in it replays the region's ops up
to the last one that saves a tensor (torch's early stop). The optimizer step is its kernels'
temporaries on top of the states. Every op boundary is a moment; the peak is the largest.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rules import RULES
from .tape import Tape


@dataclass(frozen=True)
class Moment:
    """The bytes live at one op boundary: all of them (what the allocator counts) and those a
    dispatch-level tracer sees (no kernel workspace, nothing made outside an op)."""

    phase: str
    where: str
    bytes: int
    seen: int
    op: str = ""  # the op's rule (its backward, in backward)


@dataclass(frozen=True)
class Replay:
    peak: Moment
    tracer_peak: Moment
    activations: int  # traced bytes made in forward and live as it ends (the tracer's term)
    phase_peaks: dict[str, int]
    moments: tuple[Moment, ...] = ()  # every moment, with `replay(..., moments=True)`


class _Live:
    """Storages by key with a count of holders; the running totals and the largest moments."""

    def __init__(self, base: int, base_seen: int) -> None:
        self.held: dict[object, list] = {}
        self.total, self.seen = base, base_seen
        self.peak = self.tracer_peak = Moment("start", "", base, base_seen)
        self.phase_peaks: dict[str, int] = {}
        self.moments: list[Moment] | None = None  # every moment, when asked for
        self._n = 0

    def add(self, key: object, nbytes: int, traced: bool = True) -> object:
        if key in self.held:
            self.held[key][2] += 1
            return key
        self.held[key] = [nbytes, traced, 1]
        self.total += nbytes
        self.seen += nbytes if traced else 0
        return key

    def new(self, nbytes: int) -> object:
        self._n += 1
        return self.add(("grad", self._n), nbytes)

    def drop(self, key: object) -> None:
        entry = self.held.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] == 0:
            del self.held[key]
            self.total -= entry[0]
            self.seen -= entry[0] if entry[1] else 0

    def moment(self, phase: str, where: str, scratch: int = 0, seen_scratch: int = 0, op: str = "") -> None:
        m = Moment(phase, where, self.total + scratch, self.seen + seen_scratch, op)
        self.peak = max(self.peak, m, key=lambda x: x.bytes)
        self.tracer_peak = max(self.tracer_peak, m, key=lambda x: x.seen)
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), m.bytes)
        if self.moments is not None:
            self.moments.append(m)


def _last_uses(tape: Tape) -> dict[int, int]:
    """The index of each activation storage's last forward use (its making, if never read)."""
    last: dict[int, int] = {}
    for i, op in enumerate(tape.ops):
        for t in (*op.inputs, *op.outputs):
            last[tape.root(t)] = i
    return last


def _region_of(tape: Tape, checkpointing: bool) -> dict[int, int]:
    """op index -> its checkpointed region's index (no entries without checkpointing)."""
    if not checkpointing:
        return {}
    return {i: r for r, (start, end, _) in enumerate(tape.regions) for i in range(start, end)}


def _run_forward(tape: Tape, live: _Live, ops: range, keys: dict[int, object], phase: str,
                 keeps: set[int] | None, last: dict[int, int], stop_early: bool = False) -> None:
    """Run `ops` forward: each output's storage from its op to its last use in `ops` (`last`), held
    longer by each op that saves it (those in `keeps`; None: all); `keys` maps a tensor to its
    live storage.
    `stop_early`: the last op's saves end a recompute; an op packs the inputs it saves before its
    kernel runs, so one that saves none of its outputs stops it without running."""
    ends: dict[int, list[int]] = {}
    for t, i in last.items():
        ends.setdefault(i, []).append(t)
    for i in ops:
        op = tape.ops[i]
        runs = not (stop_early and i == ops[-1] and not set(op.saved) & set(op.outputs))
        for o in op.outputs if runs else ():
            t = tape.tensors[o]
            if t.base is None:
                keys[o] = live.add((phase, o), t.bytes, t.traced)
        if runs:
            live.moment(phase, op.where, op.workspace, 0, op.rule)
        if keeps is None or i in keeps:  # parameters and inputs are live all step: only activations held
            for s in op.saved:
                if tape.root(s) in keys:
                    live.add(keys[tape.root(s)], 0)
        for t in ends.get(i, ()):
            if t in keys:
                live.drop(keys[t])


def replay(tape: Tape, *, base: int, base_seen: int, loss: int, checkpointing: bool,
           optimizer_scratch: tuple[int, ...] = (), moments: bool = False) -> Replay:
    """The step's moments over a baseline of `base` bytes (parameters, buffers, inputs, optimizer
    states; `base_seen` of them traced); `loss` is the tensor backward starts from."""
    live = _Live(base, base_seen)
    live.moments = [] if moments else None
    regions = _region_of(tape, checkpointing)
    keys: dict[int, object] = {}
    last = _last_uses(tape)
    for t in (loss, *tape.kept):
        last[tape.root(t)] = len(tape.ops)
    # outside a checkpointed region an op keeps what it saves; inside, nothing until its recompute
    outside = {i for i in range(len(tape.ops)) if i not in regions}
    _run_forward(tape, live, range(len(tape.ops)), keys, "forward", outside, last)
    activations = sum(e[0] for k, e in live.held.items() if e[1])
    _backward(tape, live, keys, regions, loss, last)
    for scratch in optimizer_scratch:  # the step's kernels, one after another
        live.moment("optimizer", "optimizer.step", scratch, scratch)
    return Replay(live.peak, live.tracer_peak, activations, dict(live.phase_peaks), tuple(live.moments or ()))


def _recompute(tape: Tape, live: _Live, keys: dict[int, object], region: int, last: dict[int, int]) -> None:
    """Replay the region's forward up to its last op that saves a tensor, keeping what each saves,
    under `torch.random.fork_rng`, which copies the RNG state once more while the replay runs."""
    start, end, _ = tape.regions[region]
    rng = tape.tensors[tape.ops[start - 1].outputs[0]]  # the region's `checkpoint` op made its state
    fork = live.add(("fork_rng", region), rng.bytes, traced=False)
    stop = max((i for i in range(start, end) if tape.ops[i].saved), default=start - 1)
    ops = range(start, stop + 1)
    # what the region's code still holds when the early stop unwinds it lives until then
    uses = {tape.root(o): min(last[tape.root(o)], stop) for i in ops for o in tape.ops[i].outputs}
    _run_forward(tape, live, ops, keys, "recompute", None, uses, stop_early=True)
    live.drop(fork)


def _backward(tape: Tape, live: _Live, keys: dict[int, object], regions: dict[int, int], loss: int,
              last: dict[int, int]) -> None:
    grads: dict[int, object] = {loss: live.new(tape.tensors[loss].bytes)}
    size = lambda t: tape.tensors[t].bytes  # noqa: E731
    done: set[int] = set()
    live.moment("backward", "loss")
    for i in reversed(range(len(tape.ops))):
        op = tape.ops[i]
        needs = tuple(tape.tensors[t].grad for t in op.inputs)
        if op.rule == "hold" or (not any(needs) and not op.saved):  # no autograd node
            continue
        if op.rule != "checkpoint" and op.outputs and not any(o in grads for o in op.outputs):
            continue  # no gradient reaches it (an output nothing used): autograd never runs it
        # a recompute is set off by the first node that unpacks a saved tensor: ones that save
        # nothing (an addition, a scale) run before it
        if i in regions and regions[i] not in done and op.saved:
            done.add(regions[i])
            _recompute(tape, live, keys, regions[i], last)
        incoming = [grads.pop(o) for o in op.outputs if o in grads]
        sizes, scratch = RULES[op.rule].backward(op, size, needs)
        made = []
        for t, g in zip(op.inputs, sizes, strict=True):
            if g is None:
                continue
            if g == 0 and incoming:
                made.append((t, live.add(incoming[0], 0)))
            else:
                made.append((t, live.new(g)))
        extra = scratch + op.backward_workspace
        live.moment("backward", op.where, extra, extra, op.rule)
        for g in incoming:
            live.drop(g)
        for s in op.saved:
            key = keys.get(tape.root(s))
            if key is not None:
                live.drop(key)
        for t, g in made:
            if t in grads:  # a second gradient for the same tensor: summed into a new one
                total = live.new(size(t))
                live.moment("backward", op.where)
                live.drop(grads[t])
                live.drop(g)
                grads[t] = total
            else:
                grads[t] = g
