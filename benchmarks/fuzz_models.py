"""Run ranges of the differential fuzz cases (`lora_planner/measure/fuzz.py` says what a case is)
and write their records.

    python benchmarks/fuzz_models.py --seeds 0:200            # one line per case, worst error last
    python benchmarks/fuzz_models.py --seeds 0:4000 --jsonl results/trace/fuzz-cpu.jsonl
    python benchmarks/fuzz_models.py --seeds 0:4000 --known tests/fuzz_known.json  # the known misses
    python benchmarks/fuzz_models.py --seeds 0:4000 --sample 300 --allocator \\
        --jsonl results/trace/fuzz-cpu-allocator.jsonl    # the CPU allocator's peak beside the tracer's

With --jsonl, a seed the file already holds is not run again: a run cut short is resumed by running
the same command. --allocator runs every case on real tensors (a fake case too: the models are small)
under torch's profiler and records the allocator's peak. Seeds from 100,000 upward are held out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from lora_planner.measure.fuzz import (
    HELD_OUT,
    Case,
    known_entry,
    random_case,
    real,
    record_seed,
    run_case,
    sample_seeds,
)


def _seeds(text: str) -> range:
    start, _, stop = text.partition(":")
    return range(int(start), int(stop)) if stop else range(int(start), int(start) + 1)


def recorded_seeds(path: str | None) -> set[int]:
    """The seeds whose records `path` already holds (none when it does not exist)."""
    if not path or not Path(path).exists():
        return set()
    with open(path) as f:
        return {record_seed(json.loads(line)) for line in f if line.strip()}


def _line(case: Case, r, seconds: float) -> str:
    err = r.errors()
    exact = r.predicted["activations"] == r.traced["activations"]
    acts = "exact" if exact else f"{err['activations']:+.3%}"
    line = (f"{case.label:70s} peak {err['peak']:+.3%} ({r.predicted_phase}/{r.traced_phase}) "
            f"activations {acts}")
    if r.allocator is not None and r.allocator.peak_bytes:
        line += f" allocator {(r.predicted['peak'] - r.allocator.peak_bytes) / r.allocator.peak_bytes:+.3%}"
    return f"{line} [{seconds:.1f}s]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0:60", help="a range START:STOP of seeds, or one seed")
    ap.add_argument("--sample", type=int, help="run this many seeds of the range, drawn at random "
                                               "(seeded: the same command draws the same seeds)")
    ap.add_argument("--allocator", action="store_true",
                    help="run each case for real under torch's profiler and record the allocator's peak")
    ap.add_argument("--jsonl", help="also write one JSON object per case to this file (appended; "
                                    "seeds it holds are skipped)")
    ap.add_argument("--over", type=float, default=0.01, help="list cases whose peak misses by more")
    ap.add_argument("--known", help="write the run's misses beyond the tests' tolerances to this JSON "
                                    "file (tests/fuzz_known.json's format)")
    ap.add_argument("--held-out", action="store_true",
                    help=f"allow seeds from {HELD_OUT:,} upward, held out for a later unseen run")
    args = ap.parse_args()
    seeds = _seeds(args.seeds)
    if seeds.stop > HELD_OUT and not args.held_out:
        ap.error(f"seeds from {HELD_OUT:,} upward are held out; pass --held-out to run them")
    order = sample_seeds(seeds, args.sample) if args.sample else list(seeds)
    done = recorded_seeds(args.jsonl)
    if done and args.known:
        ap.error(f"--known lists the misses of a whole run: {args.jsonl} holds {len(done)} seeds already; "
                 "write the run to a new file")
    order = [s for s in order if s not in done]
    known: dict[str, dict] = {}
    out = open(args.jsonl, "a") if args.jsonl else None
    origin = None
    if out:
        from lora_planner.measure.grid import provenance

        device = "cpu" if args.allocator else "cpu (fake tensors where a case says so)"
        origin = provenance(fake=False) | {"device": device}
    if done:
        print(f"{len(done)} seeds already in {args.jsonl}; running {len(order)}")
    worst, misses = 0.0, []
    for seed in order:
        case = real(random_case(seed)) if args.allocator else random_case(seed)
        start = time.perf_counter()
        r = run_case(case, allocator=args.allocator)
        err = r.errors()
        worst = max(worst, abs(err["peak"]))
        print(_line(case, r, time.perf_counter() - start), flush=True)
        if abs(err["peak"]) > args.over or r.predicted["activations"] != r.traced["activations"]:
            misses.append(case.label)
        entry = known_entry(case, r)
        if entry:
            known[str(seed)] = entry
        if out:
            out.write(json.dumps({"case": case.label, "config": case.config,
                                  "setup": replace(case.setup).__dict__, **r.to_dict(),
                                  "provenance": origin}) + "\n")
            out.flush()
    print(f"{len(order)} cases, worst peak error {worst:.3%}; {len(misses)} over "
          f"{args.over:.1%} or with inexact activations")
    for label in misses:
        print("  ", label)
    if args.known:
        with open(args.known, "w") as f:
            json.dump(known, f, indent=1)  # seeds in run order, each entry's keys sorted
    return 0


if __name__ == "__main__":
    sys.exit(main())
