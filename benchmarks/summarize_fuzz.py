"""The figures the README quotes about a fuzz run, read off its records.

    python benchmarks/summarize_fuzz.py results/trace/fuzz-cpu.jsonl
    python benchmarks/summarize_fuzz.py results/trace/fuzz-cpu-allocator.jsonl \
        --allocator-known tests/fuzz_allocator_known.json

Prints how many cases trace their activations byte for byte, how many peaks are within 1% and 2%,
the median peak error, the default suite's seeds (below 60), and the misses over 1% by kind
(checkpointed or not, under- or over-predicted), worst first. A run with the allocator's peak
(`fuzz_models.py --allocator`) adds the plan (each case planned again now) against the allocator
and the tracer against the allocator (median, 95th percentile, worst) and the ops the allocator's
extra bytes were made in;
--allocator-known writes the cases whose plan, made now, misses the allocator's peak by more than
1%, each with its bound and why (tests/test_fuzz_allocator.py holds them).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys

FAST_SEEDS = 60  # tests/test_fuzz.py's default suite
TOP_OPS = 8  # ops listed where the allocator's extra bytes were made


def _seed(case: str) -> int:
    found = re.match(r"seed=(\d+) ", case)
    if not found:
        raise ValueError(f"not a fuzz record: {case!r}")
    return int(found.group(1))


def summarize(rows: list[dict]) -> list[str]:
    errors = [r["relative_error"]["peak"] for r in rows]
    exact = sum(r["predicted"]["activations"] == r["traced"]["activations"] for r in rows)
    fast = [abs(r["relative_error"]["peak"]) <= 0.01 for r in rows if _seed(r["case"]) < FAST_SEEDS]
    misses = sorted((r for r in rows if abs(r["relative_error"]["peak"]) > 0.01),
                    key=lambda r: -abs(r["relative_error"]["peak"]))
    lines = [
        f"cases: {len(rows)}; activations exact: {exact}",
        f"peak within 1%: {sum(abs(e) <= 0.01 for e in errors)}; within 2%: "
        f"{sum(abs(e) <= 0.02 for e in errors)}; median |error| {statistics.median(map(abs, errors)):.2%}; "
        f"worst {max(map(abs, errors)):.2%}",
    ]
    if fast:  # a held-out run of later seeds has none
        lines.append(f"default suite (seeds below {FAST_SEEDS}): {sum(fast)} of {len(fast)} within 1%")
    lines.append(f"over 1%: {len(misses)}")
    kinds = {
        "checkpointed, under": lambda r: " ckpt" in r["case"] and r["relative_error"]["peak"] < 0,
        "checkpointed, over": lambda r: " ckpt" in r["case"] and r["relative_error"]["peak"] > 0,
        "not checkpointed, under": lambda r: " ckpt" not in r["case"] and r["relative_error"]["peak"] < 0,
        "not checkpointed, over": lambda r: " ckpt" not in r["case"] and r["relative_error"]["peak"] > 0,
    }
    for name, belongs in kinds.items():
        group = [r for r in misses if belongs(r)]
        if group:
            lines.append(f"  {name}: {len(group)}")
            lines += [f"    {r['relative_error']['peak']:+.2%} ({r['peak_phase']['predicted']}/"
                      f"{r['peak_phase']['traced']}) {r['case']}" for r in group]
    return lines


def _quantile(values: list[float], q: float) -> float:
    """The smallest value with at least a share `q` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _spread(name: str, values: list[float]) -> str:
    """The median error, the 95th percentile of its size, and the worst, signed."""
    return (f"{name}: median {statistics.median(values):+.2%}, 95th percentile of |error| "
            f"{_quantile([abs(v) for v in values], 0.95):.2%}, worst {max(values, key=abs):+.2%}")


def summarize_allocator(rows: list[dict]) -> list[str]:
    """Plan and tracer against the allocator's peak, and where the allocator's extra bytes were made."""
    from lora_planner.measure.fuzz import ALLOCATOR_TOLERANCE, plan_vs_allocator

    rows = [r for r in rows if r.get("allocator_peak")]
    if not rows:
        return []
    plan = [plan_vs_allocator(r) for r in rows]  # each case planned now, as the tests plan it
    within = sum(abs(e) <= ALLOCATOR_TOLERANCE for e in plan)
    lines = [f"allocator peaks: {len(rows)} cases; plan within {ALLOCATOR_TOLERANCE:.0%} of the "
             f"allocator: {within}",
             _spread("plan vs allocator", plan),
             _spread("allocator vs tracer", [r["allocator_vs_tracer"] for r in rows]),
             "allocator above the tracer, by the op its extra bytes were made in (cases, largest, "
             "largest share of the peak):"]
    by_op: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for extra in r["allocator_extra_by_op"]:
            by_op.setdefault(extra["op"], []).append((extra["bytes"], extra["bytes"] / r["allocator_peak"]))
    ranked = sorted(by_op.items(), key=lambda kv: -max(share for _, share in kv[1]))
    lines += [f"  {op}: {len(seen)}, {max(b for b, _ in seen):,} B, {max(s for _, s in seen):.1%}"
              for op, seen in ranked[:TOP_OPS]]
    return lines


def allocator_known(rows: list[dict]) -> dict[str, dict]:
    """Each case whose plan, made now, misses its allocator peak beyond the tolerance
    (`fuzz.allocator_known_entry`), by seed in record order."""
    from lora_planner.measure.fuzz import allocator_known_entry, record_seed

    known = {}
    for r in rows:
        entry = allocator_known_entry(r) if r.get("allocator_peak") else None
        if entry:
            known[str(record_seed(r))] = entry
    return known


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", help="a fuzz run's JSON lines (benchmarks/fuzz_models.py --jsonl)")
    ap.add_argument("--allocator-known", help="write the cases whose plan misses the allocator's peak "
                                              "by more than 1% to this JSON file")
    args = ap.parse_args()
    try:
        with open(args.records) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError("no records")
        lines = summarize(rows) + summarize_allocator(rows)
        known = allocator_known(rows) if args.allocator_known else None
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.records}: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if known is not None:
        with open(args.allocator_known, "w") as f:
            json.dump(known, f, indent=1)
        print(f"{len(known)} cases over 1% of the allocator's peak written to {args.allocator_known}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
