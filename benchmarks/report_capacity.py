"""How long the default capacity report takes: `lora-plan report capacity -o capacity.md`.

Target: under 10 s on a 2-core machine without a GPU. Each run is a fresh process, so the time
includes starting Python and importing pandas and matplotlib, as a user would see it.

    python benchmarks/report_capacity.py            # 3 runs
    python benchmarks/report_capacity.py --runs 5 --target 10

Prints each run's wall time and the slowest; exits 1 when the slowest is over the target.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def lora_plan_command() -> list[str]:
    """The installed `lora-plan` beside this Python, or the module when it is not installed."""
    script = Path(sys.executable).with_name("lora-plan")
    return [str(script)] if script.exists() else [sys.executable, "-c",
                                                  "from lora_planner.cli import main; main()"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--target", type=float, default=10.0, help="seconds")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="capacity-bench-"))
    times = []
    try:
        for run in range(1, args.runs + 1):
            start = time.perf_counter()
            subprocess.run([*lora_plan_command(), "report", "capacity", "-o", str(folder / "capacity.md")],
                           check=True, capture_output=True)
            times.append(time.perf_counter() - start)
            print(f"run {run}: {times[-1]:.2f} s")
    finally:
        shutil.rmtree(folder)
    slowest = max(times)
    verdict = "within" if slowest <= args.target else "OVER"
    print(f"slowest {slowest:.2f} s, {verdict} the {args.target:g} s target")
    return 0 if slowest <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
