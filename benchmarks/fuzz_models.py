"""Run ranges of the differential fuzz cases (`lora_planner/measure/fuzz.py` says what a case is)
and write their records.

    python benchmarks/fuzz_models.py --seeds 0:200            # one line per case, worst error last
    python benchmarks/fuzz_models.py --seeds 0:4000 --jsonl results/trace/fuzz-cpu.jsonl
    python benchmarks/fuzz_models.py --seeds 0:4000 --known tests/fuzz_known.json  # the known misses
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

# the generator lives in the package (lora_planner/measure/fuzz.py); its names stay importable from
# here for the other scripts (saved_diff.py)
from lora_planner.measure.fuzz import (  # noqa: F401
    FAST_SEEDS,
    FAST_TOLERANCE,
    SLOW_TOLERANCE,
    TARGET_PRESETS,
    Case,
    known_entry,
    random_case,
    random_config,
    run_case,
)


def _seeds(text: str) -> range:
    start, _, stop = text.partition(":")
    return range(int(start), int(stop)) if stop else range(int(start), int(start) + 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0:60", help="a range START:STOP of seeds, or one seed")
    ap.add_argument("--jsonl", help="also write one JSON object per case to this file")
    ap.add_argument("--over", type=float, default=0.01, help="list cases whose peak misses by more")
    ap.add_argument("--known", help="write the run's misses beyond the tests' tolerances to this JSON "
                                    "file (tests/fuzz_known.json's format)")
    args = ap.parse_args()
    known: dict[str, dict] = {}
    out = open(args.jsonl, "a") if args.jsonl else None
    origin = None
    if out:
        from step_grid import provenance

        origin = provenance(fake=False) | {"device": "cpu (fake tensors where a case says so)"}
    worst, misses = 0.0, []
    for seed in _seeds(args.seeds):
        case = random_case(seed)
        start = time.perf_counter()
        r = run_case(case)
        err = r.errors()
        worst = max(worst, abs(err["peak"]))
        exact = r.predicted["activations"] == r.traced["activations"]
        acts = "exact" if exact else f"{err['activations']:+.3%}"
        print(f"{case.label:70s} peak {err['peak']:+.3%} ({r.predicted_phase}/{r.traced_phase}) "
              f"activations {acts} "
              f"[{time.perf_counter() - start:.1f}s]", flush=True)
        if abs(err["peak"]) > args.over or not exact:
            misses.append(case.label)
        entry = known_entry(case, r)
        if entry:
            known[str(seed)] = entry
        if out:
            out.write(json.dumps({"case": case.label, "config": case.config,
                                  "setup": replace(case.setup).__dict__, **r.to_dict(),
                                  "provenance": origin}) + "\n")
            out.flush()
    print(f"{len(_seeds(args.seeds))} cases, worst peak error {worst:.3%}; {len(misses)} over "
          f"{args.over:.1%} or with inexact activations")
    for label in misses:
        print("  ", label)
    if args.known:
        with open(args.known, "w") as f:
            json.dump(known, f, indent=1)  # seeds in run order, each entry's keys sorted
    return 0


if __name__ == "__main__":
    sys.exit(main())
