"""The figures the README quotes about a fuzz run, read off its records.

    python benchmarks/summarize_fuzz.py results/trace/fuzz-cpu.jsonl

Prints how many cases trace their activations byte for byte, how many peaks are within 1% and 2%,
the median peak error, the default suite's seeds (below 60), and the misses over 1% by kind
(checkpointed or not, under- or over-predicted), worst first.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys

FAST_SEEDS = 60  # tests/test_fuzz.py's default suite


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", help="a fuzz run's JSON lines (benchmarks/fuzz_models.py --jsonl)")
    args = ap.parse_args()
    try:
        with open(args.records) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError("no records")
        lines = summarize(rows)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.records}: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
