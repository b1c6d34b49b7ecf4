"""How long `lora-plan --model 70b --rank 8` takes against the floor of importing click and tabulate.

    python benchmarks/startup.py [--repeats 15] [--target 1.7]

Both commands run in fresh interpreters, interleaved, so that the machine's load affects them alike;
the medians and their ratio are printed. The planner needs click and tabulate and nothing heavier,
so their import is the least any answer can cost. Exits 1 when the ratio is above the target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

FLOOR = [sys.executable, "-c", "import click, tabulate"]
PLAN = [sys.executable, "-m", "lora_planner", "--model", "70b", "--rank", "8"]


# As installed: bytecode cached (pip compiles it at install time; an editable install writes it on
# the first run). PYTHONDONTWRITEBYTECODE would recompile the package on every run and measure that.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--target", type=float, default=1.7, help="largest acceptable plan/floor ratio")
    args = parser.parse_args(argv)
    wall_seconds(PLAN)  # warm the file cache and the bytecode cache first
    wall_seconds(FLOOR)
    floor, plan = [], []
    for _ in range(args.repeats):
        floor.append(wall_seconds(FLOOR))
        plan.append(wall_seconds(PLAN))
    floor_s, plan_s = statistics.median(floor), statistics.median(plan)
    ratio = plan_s / floor_s
    print(f"import click, tabulate:           median {floor_s * 1000:6.1f} ms over {args.repeats} runs")
    print(f"lora-plan --model 70b --rank 8:   median {plan_s * 1000:6.1f} ms over {args.repeats} runs")
    verdict = "within" if ratio <= args.target else "ABOVE"
    print(f"ratio {ratio:.2f} ({verdict} the target {args.target})")
    return 0 if ratio <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
