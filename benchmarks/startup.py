"""How long `lora-plan --model 70b --rank 8` takes against the floor of importing click and tabulate.

    python benchmarks/startup.py [--repeats 15] [--target 1.7]

Both commands run in fresh interpreters, interleaved, so that the machine's load affects them alike;
the medians and their ratio are printed. The planner needs click and tabulate and nothing heavier,
so their import is the least any answer can cost. Exits 1 when the ratio is above the target.

Each run's CPU time (user + system, from the operating system's account of the finished child) is
printed beside its wall time: on a shared machine, waiting for a core stretches both commands'
wall time by about the same number of milliseconds and so pulls their ratio towards 1, while CPU
time does not count the wait. The verdict is the wall-time ratio's.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

FLOOR = [sys.executable, "-c", "import click, tabulate"]
PLAN = [sys.executable, "-m", "lora_planner", "--model", "70b", "--rank", "8"]


# As installed: bytecode cached (pip compiles it at install time; an editable install writes it on
# the first run). PYTHONDONTWRITEBYTECODE would recompile the package on every run and measure that.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def seconds(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of `command` in a fresh process."""
    cpu, start = _children_cpu(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - start, _children_cpu() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--target", type=float, default=1.7, help="largest acceptable plan/floor ratio")
    args = parser.parse_args(argv)
    seconds(PLAN)  # warm the file cache and the bytecode cache first
    seconds(FLOOR)
    floor, plan = [], []
    for _ in range(args.repeats):
        floor.append(seconds(FLOOR))
        plan.append(seconds(PLAN))
    floor_s, plan_s = (statistics.median(w for w, _ in runs) for runs in (floor, plan))
    floor_cpu, plan_cpu = (statistics.median(c for _, c in runs) for runs in (floor, plan))
    ratio = plan_s / floor_s
    for what, wall, cpu in (("import click, tabulate:        ", floor_s, floor_cpu),
                            ("lora-plan --model 70b --rank 8:", plan_s, plan_cpu)):
        print(f"{what}   median {wall * 1000:6.1f} ms over {args.repeats} runs (CPU {cpu * 1000:6.1f} ms)")
    verdict = "within" if ratio <= args.target else "ABOVE"
    print(f"ratio {ratio:.2f} ({verdict} the target {args.target}); CPU time ratio "
          f"{plan_cpu / floor_cpu:.2f}")
    return 0 if ratio <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
