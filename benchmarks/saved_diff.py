"""Why a fuzz case misses: the traced step's saved tensors beside the activation walk's, and the
live tensors at the traced peak beside the planned phases.

    python benchmarks/saved_diff.py SEED [--peak] [--timeline]

The traced side lists every storage made in forward and alive when forward ended (op, module,
shape, dtype, bytes); the walk's side lists every tensor `activations.Graph.save` kept (bytes,
section, the line of activations.py that saved it). Sizes are matched greedily, so what is left on
either side is what one side has and the other has not.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from collections import Counter

from lora_planner.measure.fuzz import random_case, run_case
from lora_planner.spec import spec_from_hf_config


def walk_saves(case) -> list[tuple[int, str, str]]:
    """(bytes, section, where) for every tensor the walk saves."""
    from lora_planner import activations
    from lora_planner.measure.traced_step import _prediction, sliced

    saves: list[tuple[int, str, str]] = []
    walk: dict[str, int] = {}
    original = activations.Graph.save

    def save(self, *tensors):
        if self.cond.device != "cpu":
            return original(self, *tensors)
        if id(self) != walk.get("graph"):  # a new walk: keep only the last one (the trace's device)
            walk["graph"] = id(self)
            saves.clear()
        frame = traceback.extract_stack(limit=3)[0]
        for t in tensors:
            if t.key not in self.saved:
                saves.append((t.nbytes, self.section, f"{frame.name}:{frame.lineno}"))
        original(self, *tensors)

    activations._profile.cache_clear()
    activations.Graph.save = save
    try:
        spec = sliced(spec_from_hf_config(case.config, name=f"fuzz-{case.seed}"), case.layers)
        predicted, seen, phases, _ = _prediction(spec, case.setup, "cpu")
    finally:
        activations.Graph.save = original
        activations._profile.cache_clear()
    return saves, predicted, seen.name, phases


def traced_blocks(case, timeline: bool):
    """Trace the case keeping the blocks alive after forward and those live at the peak."""
    from lora_planner.measure import tracer as tracer_mod

    kept: dict[str, list] = {}

    class Recording(tracer_mod.MemoryTracer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k, keep_largest=10_000, record_timeline=timeline)
            kept["tracer"] = self

        @contextlib.contextmanager
        def phase(self, name):
            with super().phase(name):
                yield
            if name == "forward":
                kept["forward"] = [b for _, b in self._live.values() if b.category() == "activations"]

    original = tracer_mod.MemoryTracer
    tracer_mod.MemoryTracer = Recording  # trace() imports it from the module when it runs
    try:
        result = run_case(case)
    finally:
        tracer_mod.MemoryTracer = original
    return result, kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed", type=int)
    ap.add_argument("--peak", action="store_true", help="also list the live blocks at the traced peak")
    ap.add_argument("--timeline", action="store_true", help="print the traced live bytes op by op")
    args = ap.parse_args()
    case = random_case(args.seed)
    print(case.label)
    saves, predicted, phase, phases = walk_saves(case)
    result, kept = traced_blocks(case, args.timeline)
    err = result.errors()
    print(f"peak {err['peak']:+.3%} ({result.predicted_phase}/{result.traced_phase}); activations "
          f"predicted {result.predicted['activations']} traced {result.traced['activations']} "
          f"({result.predicted['activations'] - result.traced['activations']:+d})")
    print("phases predicted", result.predicted_phases, "traced", result.traced_phases)
    traced = sorted(kept.get("forward", []), key=lambda b: -b.nbytes)
    left = Counter(b.nbytes for b in traced)
    walk_left = []
    for nbytes, section, where in saves:
        if left[nbytes]:
            left[nbytes] -= 1
        else:
            walk_left.append((nbytes, section, where))
    print("\nwalk saves the trace lacks:")
    for row in walk_left:
        print("  ", row)
    print("\ntraced saves the walk lacks:")
    pool = Counter(n for n, _, _ in saves)
    for b in traced:
        if pool[b.nbytes]:
            pool[b.nbytes] -= 1
        else:
            print(f"   {b.nbytes:8d} {b.op:28s} {b.module:45s} {b.shape} {b.dtype}")
    if args.peak:
        tr = kept["tracer"]
        print(f"\nlive at the traced peak ({tr._peak} bytes, {tr._peak_phase}):")
        for b in sorted(tr._peak_blocks, key=lambda b: -b.nbytes):
            if b.tag in ("parameters", "optimizer_states", "inputs", "buffers"):
                continue
            print(f"   {b.nbytes:8d} {b.category():12s} {b.phase:9s} {b.op:28s} {b.module:40s} "
                  f"{b.shape} {b.dtype}")
    if args.timeline:
        for row in kept["tracer"].timeline:
            print("  ", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
