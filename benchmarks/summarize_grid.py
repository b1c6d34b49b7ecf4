"""Summarise a step-grid JSONL (from `step_grid.py --jsonl`): ours against the sum of terms.

    python benchmarks/summarize_grid.py results/trace/step-grid-cpu.jsonl

Prints a markdown table of the absolute peak error, median / p90 / max, for the step timeline and for
the sum-of-terms estimate (model states + activations) on the same traced steps; then, with and
without gradient checkpointing, how many steps are within 1% and 2% and how many have their
activations byte for byte.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl", help="records written by `step_grid.py --jsonl`")
    path = parser.parse_args(argv).jsonl
    try:
        with open(path) as lines:
            records = [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"cannot read {path}: {e}")
    if not records:
        parser.error(f"{path} holds no records")
    ours = [abs(r["relative_error"]["peak"]) for r in records]
    summed = [abs(r["sum_of_terms_error"]) for r in records]
    within = sum(e <= 0.02 for e in ours)
    print(f"{len(records)} traced steps ({records[0]['provenance']['device']}, torch "
          f"{records[0]['provenance']['torch']}); peak within 2%: {within}/{len(records)}\n")
    print("| estimate | median abs error | p90 | max |")
    print("|---|---:|---:|---:|")
    for name, errs in (("step timeline (lora-plan)", ours), ("sum of terms", summed)):
        print(f"| {name} | {statistics.median(errs):.2%} | {quantile(errs, 0.9):.2%} | {max(errs):.2%} |")
    print("\n| steps | count | peak within 1% | within 2% | worst | activations exact |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, checkpointed in (("without checkpointing", False), ("checkpointed", True)):
        part = [r for r in records if ("ckpt" in r["case"].split()) == checkpointed]
        if not part:
            continue
        errs = [abs(r["relative_error"]["peak"]) for r in part]
        exact = sum(r["predicted"]["activations"] == r["traced"]["activations"] for r in part)
        print(f"| {label} | {len(part)} | {sum(e <= 0.01 for e in errs)} | {sum(e <= 0.02 for e in errs)} "
              f"| {max(errs):.2%} | {exact} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
