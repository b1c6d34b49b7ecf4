"""The CPU allocator's own count of a traced step, beside the tracer's.

The tracer (`tracer.MemoryTracer`) counts the storages that ops return. A kernel's own workspace, and
a storage made outside any op (`torch.get_rng_state`, which checkpointing calls once per layer),
reach the allocator but never a dispatch mode. Under `torch.profiler.profile(profile_memory=True)` the
CPU allocator reports every allocation and free with its address and size, inside the op that made
it. Their sum in time order, on top of what was live when the step began (the tracer's own count
then: parameters, buffers, inputs, gradients, optimizer states), is the allocator's live bytes; its
maximum is the allocator's peak.

The tracer, built with `annotate=True`, runs each op it sees inside a profiler range named by the
op's place in its call list, and remembers which storages the op returned. So each allocation is
matched to the op it was made in, and by address to the moment the tracer began to count it (the end
of the op that returned it). At the allocator's peak, the live allocations the tracer does not count
(and will not count when the running op returns) are the extra bytes: the running op's workspace,
what earlier ops allocated and never returned, and what was made outside every op the tracer saw.
`extra_by_op` groups them by the op they were made in.

On a GPU the caching allocator reports its blocks to the profiler the same way, so the same sum
places the peak's phase and extra bytes; the peak itself is the allocator's own counter
(`torch.cuda.max_memory_allocated`, reset as the step begins), the figure a GPU run reads.

A free of a block allocated before profiling began is not reported by torch (it warns once); such a
block is not in the baseline either, so the sum stays consistent.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

# The profiler ranges the tracer opens (`tracer.MemoryTracer(annotate=True)`): one around each op it
# sees, one around each phase
CALL_RANGE = "lora_plan.trace#"
PHASE_RANGE = "lora_plan.phase:"
TOP_OPS = 5
# What torch's profiler writes to stderr on every run (kineto's start/stop lines; the warning about
# blocks allocated before it started): not the user's to act on, so not shown.
PROFILER_NOTICES = ("USDT:", "Memory block of unknown size was allocated before the profiling started")


@dataclass(frozen=True)
class OpExtra:
    """Bytes live at the allocator's peak that the tracer did not count, made in one op."""

    op: str
    module: str
    phase: str
    bytes: int

    def to_dict(self) -> dict:
        return {"op": self.op, "module": self.module, "phase": self.phase, "bytes": self.bytes}


@dataclass(frozen=True)
class AllocatorReading:
    """The allocator's peak over a step (None where nothing was allocated, with the reason), the
    phase it was reached in, and the extra bytes over the tracer's count at that moment, by op."""

    peak_bytes: int | None
    reason: str = ""
    phase: str = ""
    extra_by_op: tuple[OpExtra, ...] = ()
    # on a GPU, the caching allocator's own counter over the step (`torch.cuda.max_memory_allocated`,
    # reset as the step began): the peak; `peak_bytes` is then that counter and `events_peak` the
    # profiler's events summed in time order, whose moment places the phase and the extra bytes
    events_peak: int | None = None

    def to_dict(self, tracer_peak: int) -> dict:
        """`allocator_vs_tracer` is (allocator - tracer) / tracer, on the two peaks."""
        versus = None
        if self.peak_bytes is not None and tracer_peak:
            versus = (self.peak_bytes - tracer_peak) / tracer_peak
        out = {"allocator_peak": self.peak_bytes, "allocator_vs_tracer": versus,
               "allocator_peak_phase": self.phase or None, "allocator_reason": self.reason or None,
               "allocator_extra_by_op": [e.to_dict() for e in self.extra_by_op]}
        if self.events_peak is not None:
            out["allocator_events_peak"] = self.events_peak
        return out


def profiler_range(name: str):
    """A profiler range that dispatches no op, so a dispatch mode may open it without seeing
    itself (`torch.profiler.record_function` runs an op)."""
    from torch._C._profiler import _RecordFunctionFast

    return _RecordFunctionFast(name)


def unavailable(reason: str) -> AllocatorReading:
    return AllocatorReading(None, reason)


def with_cuda_counter(events: AllocatorReading, max_allocated: int) -> AllocatorReading:
    """A GPU step's reading: the caching allocator's counter is the peak, beside the events' sum."""
    return replace(events, peak_bytes=max_allocated, events_peak=events.peak_bytes)


def running_peak(deltas: Iterable[int], baseline: int) -> tuple[int, int]:
    """max over i of baseline + deltas[0] + ... + deltas[i], and the i where it is first reached
    (-1: the baseline itself, when nothing rises above it). Allocations are positive, frees negative."""
    level = peak = baseline
    where = -1
    for i, delta in enumerate(deltas):
        level += delta
        if level > peak:
            peak, where = level, i
    return peak, where


@dataclass
class _Allocation:
    time: int
    ptr: int
    nbytes: int
    call: int | None  # the traced op it was made in
    op: str
    module: str
    phase: str
    freed: int | None = None
    counted: int | None = None  # when the tracer began to count it: the end of the op that returned it


@contextlib.contextmanager
def profiled() -> Iterator[object]:
    """`torch.profiler.profile` of the CPU with memory events, its stderr notices held back (other
    lines written to stderr meanwhile are passed on)."""
    from torch.profiler import ProfilerActivity, profile

    with _filtered_stderr(PROFILER_NOTICES), profile(activities=[ProfilerActivity.CPU],
                                                     profile_memory=True, with_stack=True) as prof:
        yield prof


@contextlib.contextmanager
def _filtered_stderr(notices: tuple[str, ...]) -> Iterator[None]:
    """Point file descriptor 2 at a temporary file (the profiler writes from C++, below Python's
    sys.stderr), then write back every line that contains none of `notices`."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(n in line for n in notices)]
            if kept:
                sys.stderr.write("".join(kept))


def reading(prof, calls: list, baseline: int, device: str = "cpu") -> AllocatorReading:
    """The allocator's peak over the profiled step and the extra bytes at it; `calls` is the
    annotating tracer's list (`MemoryTracer.calls`), `baseline` its live bytes as the profile began,
    `device` the allocator's (`cpu`, or `cuda`: the caching allocator reports its blocks alike)."""
    allocations, events = _events(prof, calls, device)
    peak, where = running_peak((delta for _, _, delta, _ in events), baseline)
    if where < 0:
        return AllocatorReading(peak)
    moment, _, _, rising = events[where]
    extra: dict[tuple[str, str, str], int] = {}
    for a in allocations:
        live = a.time <= moment and (a.freed is None or a.freed > moment)
        # what the running op returns the tracer counts as it returns: not extra
        returned = a.counted is not None and (a.counted <= moment or a.call == rising.call)
        if live and not returned:
            key = (a.op, a.module, a.phase)
            extra[key] = extra.get(key, 0) + a.nbytes
    top = sorted(extra.items(), key=lambda kv: -kv[1])[:TOP_OPS]
    return AllocatorReading(peak, phase=rising.phase, extra_by_op=tuple(OpExtra(*k, b) for k, b in top))


def _events(prof, calls: list, device: str) -> tuple[list[_Allocation], list[tuple[int, int, int, object]]]:
    """The step's allocations on `device`, each with its op, free time and counted time; and the allocation
    and free events in time order as (time, order, bytes, allocation), frees negative."""
    ranges, found = _walk(prof.profiler.kineto_results.experimental_event_tree(), device)
    # time order; at one instant an allocation or free precedes the end of the op it happened in
    timeline = sorted([(t, 0, ptr, n, ctx) for t, ptr, n, ctx in found]
                      + [(end, 1, index, 0, None) for index, end in ranges])
    live: dict[int, _Allocation] = {}
    allocations: list[_Allocation] = []
    events: list[tuple[int, int, int, object]] = []
    for time, kind, key, nbytes, ctx in timeline:
        if kind == 1:  # call `key` returned: the tracer counts its outputs from now
            for ptr in calls[key].outputs:
                a = live.get(ptr)
                if a is not None and a.counted is None:
                    a.counted = time
            continue
        if nbytes > 0:
            a = _Allocation(time, key, nbytes, ctx[0], *_label(ctx, calls))
            live[key] = a
            allocations.append(a)
        else:
            a = live.pop(key, None)
            if a is not None:
                a.freed = time
        events.append((time, len(events), nbytes, a))
    return allocations, events


def _label(ctx: tuple[int | None, str, str], calls: list) -> tuple[str, str, str]:
    """(op, module, phase) of an allocation: the traced op it was made in, or the profiler's
    innermost op or Python function around it (made outside every op the tracer saw)."""
    index, op, phase = ctx
    if index is not None:
        call = calls[index]
        return call.op, call.module, call.phase
    return f"outside traced ops: {op or 'no op'}", "", phase


def _walk(roots, device: str) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, tuple]]]:
    """The end time of each traced op's range, and each allocation event on `device` as (time, address,
    bytes, (traced op index or None, innermost profiler op or Python function around it, phase))."""
    from torch._C._profiler import _EventType

    spans: list[tuple[int, int, int]] = []  # (start, end, index) of each traced op's range
    phases: list[tuple[int, int, str]] = []
    found: list[tuple[int, int, int, str]] = []
    stack = [(e, "") for e in reversed(roots)]
    while stack:
        event, op = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == device and fields.alloc_size:
                found.append((event.start_time_ns, fields.ptr, fields.alloc_size, op))
            continue
        name = event.name
        if name.startswith(CALL_RANGE):
            spans.append((event.start_time_ns, event.end_time_ns, int(name.removeprefix(CALL_RANGE))))
        elif name.startswith(PHASE_RANGE):
            phases.append((event.start_time_ns, event.end_time_ns, name.removeprefix(PHASE_RANGE)))
        elif event.tag == _EventType.TorchOp and name != "PythonDispatchMode":
            op = name
        elif event.tag in (_EventType.PyCall, _EventType.PyCCall):
            op = name.split(" of ")[0].split(" at 0x")[0].removeprefix("<").removesuffix(">")
        stack.extend((child, op) for child in reversed(event.children))
    # the traced ops never nest (a dispatch mode is off while it runs an op), nor do phases, so
    # each's ranges are disjoint: an allocation belongs to the one whose span holds its time, found
    # by time, not by the event tree's parents (which Python call events reorder)
    spans.sort()
    phases.sort()
    placed = [(time, ptr, nbytes, (_within(spans, time), op, _within(phases, time) or ""))
              for time, ptr, nbytes, op in found]
    return [(index, end) for _, end, index in spans], placed


def _within(spans: list[tuple[int, int, object]], time: int):
    """The label of the span (start, end, label) that holds `time`, or None; `spans` are disjoint
    and sorted."""
    i = bisect.bisect_right(spans, time, key=lambda s: s[0]) - 1
    return spans[i][2] if i >= 0 and time <= spans[i][1] else None
