"""Published GPU fine-tuning runs beside the plan of the same settings, computed now.

    .venv/bin/python benchmarks/published/table.py                      # the markdown table
    .venv/bin/python benchmarks/published/table.py --check-sources DIR  # quotes against git mirrors

The record is `runs.json` beside this file: one case per published figure, with its source
(repository, path, commit, address and the line quoted verbatim), the settings as the source
states them, what was measured, the `lora-plan` command that expresses the run, and what keeps the
command from expressing it (`missing`). A case is

- **planned** when `missing` is empty: the command runs here, in-process, and its figure is set
  beside the measurement; `bound` is the largest error the case is allowed (`tests/
  test_published_runs.py` holds it);
- **pending** when a missing entry names a planner option (`"option": "--compile"`) that does not
  exist yet. The command is written as it will read once the option lands; when one does, the test
  fails until its entry leaves `missing` (the command keeps the option), and a case left with
  nothing missing is planned and given its bound;
- **not expressible** when a missing entry is `unpublished`: an input the source does not state
  (the longest batch of a padded dataset, the recipe's config), which no option can supply.

The planned figure is the plan's peak on one GPU (`compare: "peak"`, for torch's allocator
counters) or that peak plus the device allowance (`"peak+allowance"`, for what a GPU monitor
shows). Error = (planned - measured) / measured.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECORD = Path(__file__).with_name("runs.json")
COMMAND = "lora-plan plan"
UNITS = {"B": 1, "GB": 10**9, "GiB": 2**30}
COMPARES = ("peak", "peak+allowance")
QUANTITIES = ("active_peak", "max_memory_allocated", "max_memory_reserved", "nvml", "unstated")
SETTINGS = ("model", "method", "rank", "targets", "lora_alpha", "lora_dropout", "dora", "precision",
            "adapter_dtype", "batch_size", "seq_len", "packing", "grad_checkpointing", "optimizer",
            "compile", "loss", "attention", "framework", "gpu", "num_gpus", "sharding", "offload")


def load_cases(path: Path = RECORD) -> list[dict]:
    """The record's cases, in the order they are written."""
    return json.loads(path.read_text())["cases"]


def measured_bytes(case: dict) -> float:
    """The published figure in bytes: its value as quoted times its unit (GB = 10^9, GiB = 2^30)."""
    measured = case["measured"]
    return float(measured["value"]) * UNITS[measured["unit"]]


def plan_options() -> dict[str, object]:
    """`lora-plan plan`'s options now: each spelling (--compile) -> its click parameter."""
    import click

    from lora_planner.cli import main

    command = main.get_command(click.Context(main), "plan")
    return {opt: param for param in command.params for opt in param.opts}


def option_exists(spelling: str, options: dict[str, object]) -> bool:
    """Whether `--name` (or `--name value`, for a new choice of an existing option) exists."""
    name, _, value = spelling.partition(" ")
    param = options.get(name)
    if param is None:
        return False
    choices = getattr(param.type, "choices", None)
    return not value or choices is None or value in choices


def replace(argv: list[str], spelling: str, nearest: str = "") -> list[str]:
    """`argv` with the tokens of one missing option (`--compile`, `--sharding fsdp1`) replaced by
    the nearest option that exists (`--sharding fsdp`), or dropped."""
    tokens = spelling.split()
    for start in range(len(argv) - len(tokens) + 1):
        if argv[start:start + len(tokens)] == tokens:
            return argv[:start] + nearest.split() + argv[start + len(tokens):]
    raise ValueError(f"{spelling!r} is not in the command")


def nearest_argv(case: dict, options: dict[str, object]) -> list[str]:
    """A pending case's command as today's options allow: each missing option that does not exist
    yet dropped, or replaced by the `nearest` its entry names."""
    argv = plan_argv(case["command"])
    for entry in case["missing"]:
        if not option_exists(entry["option"], options):
            argv = replace(argv, entry["option"], entry.get("nearest", ""))
    return argv


def plan_argv(command: str) -> list[str]:
    """The arguments after `lora-plan` of a recorded command, with JSON output."""
    argv = shlex.split(command)
    if argv[:2] != COMMAND.split():
        raise ValueError(f"a command starts with {COMMAND!r}: {command!r}")
    return [*argv[1:], "--format", "json"]


def run_plan(argv: list[str]) -> dict:
    """Run the planner in-process on `argv` (after `lora-plan`) and return its JSON."""
    from click.testing import CliRunner

    from lora_planner.cli import main

    result = CliRunner().invoke(main, argv, catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"lora-plan {shlex.join(argv)} exited {result.exit_code}: {result.output}")
    return json.loads(result.output)


def planned_bytes(plan: dict, compare: str) -> int:
    """The plan's figure to set beside the measurement: the first method's peak on one GPU, plus the
    device allowance (CUDA context, allocator slack) when the measurement is a GPU monitor's."""
    first = plan["plans"][0]
    peak = first["per_gpu_peak_bytes"]
    return peak + first["device_overhead_bytes"] if compare == "peak+allowance" else peak


@dataclass(frozen=True)
class Row:
    case: dict
    status: str  # planned | pending | option landed | not expressible
    planned: int | None
    error: float | None
    nearest_error: float | None = None  # pending: the error of the command without the missing options
    waiting: tuple[str, ...] = ()  # pending: the missing options that do not exist yet


def evaluate(case: dict, options: dict[str, object]) -> Row:
    """Plan a case if its command can express it; say why not otherwise."""
    missing = case["missing"]
    if any("unpublished" in m for m in missing):
        return Row(case, "not expressible", None, None)
    pending = [m["option"] for m in missing if not option_exists(m["option"], options)]
    if missing and not pending:
        return Row(case, "option landed", None, None)
    measured = measured_bytes(case)
    if pending:
        nearest = planned_bytes(run_plan(nearest_argv(case, options)), case["measured"]["compare"])
        return Row(case, "pending", None, None, (nearest - measured) / measured, tuple(pending))
    planned = planned_bytes(run_plan(plan_argv(case["command"])), case["measured"]["compare"])
    return Row(case, "planned", planned, (planned - measured) / measured)


def evaluate_all(cases: list[dict]) -> list[Row]:
    options = plan_options()
    return [evaluate(case, options) for case in cases]


def _source_cell(case: dict) -> str:
    src = case["source"]
    if not src.get("repo"):
        return f"[page]({src['url']})"
    name = f"{src['repo'].split('/')[1]} {Path(src['path']).name}@{src['commit'][:7]}"
    return f"[{name}]({src['url']})"


def _measured_cell(case: dict) -> str:
    m = case["measured"]
    shown = f"{measured_bytes(case) / 1e9:.2f} GB" if m["unit"] == "B" else f"{m['value']} {m['unit']}"
    return f"{shown} ({m['quantity']})"


def _planned_cell(row: Row) -> str:
    if row.planned is None:
        return "-"
    unit = row.case["measured"]["unit"]
    unit = "GB" if unit == "B" else unit
    return f"{row.planned / UNITS[unit]:.1f} {unit}"


def _status_cell(row: Row) -> str:
    if row.status == "planned":
        return f"planned, bound {row.case['bound']:.0%}"
    missing = row.case["missing"]
    options = ", ".join(f"`{m['option']}`" for m in missing if "option" in m)
    if row.status == "not expressible":
        unpublished = ", ".join(m["unpublished"] for m in missing if "unpublished" in m)
        return f"not published: {unpublished}" + (f"; needs {options}" if options else "")
    if row.status == "option landed":
        return f"{options} landed: plan it"
    waiting = ", ".join(f"`{option}`" for option in row.waiting)
    return f"needs {waiting} (nearest plan today: {row.nearest_error:+.1%})"


def markdown(rows: list[Row]) -> str:
    """The table, one line per case, then the counts."""
    lines = ["| case | measured | planned | error | status | source |",
             "|:--|--:|--:|--:|:--|:--|"]
    for row in rows:
        error = f"{row.error:+.1%}" if row.error is not None else "-"
        lines.append(f"| {row.case['id']} | {_measured_cell(row.case)} | {_planned_cell(row)} | {error} "
                     f"| {_status_cell(row)} | {_source_cell(row.case)} |")
    planned = [r for r in rows if r.status == "planned"]
    within = [r for r in planned if abs(r.error) <= 0.05]
    waiting = [r for r in rows if r.status in ("pending", "option landed")]
    lines += ["", f"{len(rows)} published runs: {len(planned)} planned ({len(within)} within 5%), "
                  f"{len(waiting)} waiting for a planner option, {len(rows) - len(planned) - len(waiting)} "
                  "not expressible (an input the source does not publish)."]
    return "\n".join(lines)


def check_sources(mirrors: Path, cases: list[dict]) -> list[str]:
    """Problems found reading each quote in `mirrors/<owner>+<name>/repo` at the case's commit:
    a quote that is not a line of the file, or a measured value that is not in its quote."""
    problems = []
    for case in cases:
        src = case["source"]
        if case["measured"]["value"] not in src["quote"]:
            problems.append(f"{case['id']}: the value is not in the quote")
        if not src.get("repo"):
            continue
        git_dir = mirrors / src["repo"].replace("/", "+") / "repo"
        shown = subprocess.run(["git", "-C", str(git_dir), "show", f"{src['commit']}:{src['path']}"],
                               capture_output=True, text=True)
        lines = {line.strip() for line in shown.stdout.splitlines()}
        for key in ("quote", "context"):
            if key in src and src[key] not in lines:
                where = f"{src['repo']} {src['path']}@{src['commit']}"
                problems.append(f"{case['id']}: {key} is not a line of {where}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-sources", type=Path, metavar="DIR",
                        help="folder of git mirrors named owner+name/repo: check every quote")
    args = parser.parse_args(argv)
    cases = load_cases()
    if args.check_sources:
        problems = check_sources(args.check_sources, cases)
        print("\n".join(problems) or f"{len(cases)} quotes found verbatim at their commits")
        return 1 if problems else 0
    print(markdown(evaluate_all(cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
