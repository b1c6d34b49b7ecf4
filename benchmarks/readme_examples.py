"""Re-run the outputs shown in README.md and the hand-written pages under docs/ and write them back
(or check they are current); with --docs, also remake each report under docs/ from the command it
records under "made by".

    python benchmarks/readme_examples.py            # rewrite the shown outputs
    python benchmarks/readme_examples.py --docs     # ... and docs' generated reports with their images
    python benchmarks/readme_examples.py --check    # exit 1, listing the stale outputs
    python benchmarks/readme_examples.py --gpu-catalog   # the GPU catalog as a markdown table

Two kinds of shown output:

- An example: a fenced ```text block whose lines start with `$ ` and a command (a trailing `\\`
  continues it on the next line); everything after a command up to the next `$ ` line or the fence
  is that command's output. An output holding a line `...` is abridged: each other line it shows
  is replaced by the output's line with the same label (the text before the first run of two
  spaces, or before the first `: `), in order, so the rows chosen stay and their numbers follow.
- A region: the lines between `<!-- output of: COMMAND -->` and `<!-- end of output -->` are the
  command's output verbatim (for output that is itself markdown, such as a table).

Commands are `lora-plan ...` or `.venv/bin/lora-plan ...` (run as `python -m lora_planner ...`)
and `.venv/bin/python ...` (run with this interpreter), in the repository's root. A page under
docs/ that records how it was made ("made by") is a generated report, not a hand-written page.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_planner.reports.markdown import hand_written

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)$")
REGION_START = re.compile(r"^<!-- output of: (.+) -->$")
REGION_END = "<!-- end of output -->"
ABRIDGED = "..."


def pages() -> list[Path]:
    """README.md and the hand-written pages under docs/ (not the reports the tool writes there)."""
    return hand_written(ROOT)


@dataclass(frozen=True)
class Shown:
    command: str  # as shown, without "$ ", continuation lines joined
    start: int  # index of the first output line
    end: int  # index one past the last output line
    shown: str
    region: bool  # a markdown region (verbatim, blank lines kept) rather than a text example


def examples(lines: list[str]) -> list[Shown]:
    found: list[Shown] = []
    i, in_text = 0, False
    while i < len(lines):
        region = None if in_text else REGION_START.match(lines[i])
        if region:
            start = i = i + 1
            while i < len(lines) and lines[i] != REGION_END:
                i += 1
            if i == len(lines):
                raise SystemExit(f"no {REGION_END!r} after the region of {region.group(1)!r}")
            found.append(Shown(region.group(1), start, i, "\n".join(lines[start:i]), True))
            continue
        fence = FENCE.match(lines[i])
        if fence:
            in_text = not in_text and fence.group(1) == "text"
            i += 1
            continue
        if in_text and lines[i].startswith("$ "):
            command = lines[i][2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].strip()
            start = i = i + 1
            while i < len(lines) and not lines[i].startswith("$ ") and not FENCE.match(lines[i]):
                i += 1
            end = i
            while end > start and not lines[end - 1].strip():
                end -= 1  # blank lines between examples are layout, not output
            found.append(Shown(command, start, end, "\n".join(lines[start:end]), False))
            continue
        i += 1
    return found


def argv(command: str) -> list[str]:
    """The command as this interpreter runs it from the repository root."""
    words = shlex.split(command)
    if words[0] in ("lora-plan", ".venv/bin/lora-plan"):
        return [sys.executable, "-m", "lora_planner", *words[1:]]
    if words[0] == ".venv/bin/python":
        return [sys.executable, *words[1:]]
    raise SystemExit(f"not a command this script runs: {command}")


def run(command: str) -> str:
    result = subprocess.run(argv(command), cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"example failed ({result.returncode}): {command}\n{result.stderr}")
    return result.stdout.rstrip("\n")


def label(line: str) -> str:
    """What names a line of a plan's output: a table row's first cell, a header's key; the column
    headings and the rule under them by their place."""
    if not line.strip():
        return ""
    if set(line.strip()) <= set("- "):
        return "---"
    if line.startswith(" "):
        return "(column headings)"
    cells = re.split(r" {2,}", line.strip())
    return cells[0] if len(cells) > 1 else line.split(": ")[0]


def abridge(shown: str, output: str, command: str) -> str:
    """The shown lines of an abridged output, each replaced by the output's line with its label."""
    out = output.splitlines()
    at, kept = 0, []
    for line in shown.splitlines():
        if line == ABRIDGED:
            kept.append(line)
            continue
        want = label(line)
        match = next((j for j in range(at, len(out)) if label(out[j]) == want), None)
        if match is None:
            raise SystemExit(f"abridged example: no line {want!r} (after line {at}) in the output of "
                             f"{command}")
        kept.append(out[match])
        at = match + 1
    return "\n".join(kept)


def current(example: Shown) -> str:
    output = run(example.command)
    if not example.region and ABRIDGED in example.shown.splitlines():
        return abridge(example.shown, output, example.command)
    return output


def refresh(path: Path) -> tuple[str, list[str]]:
    """The page with every shown output made current, and the commands whose output was stale."""
    lines = path.read_text().splitlines()
    stale = []
    for example in reversed(examples(lines)):  # from the end, so earlier indices stay valid
        output = current(example)
        if output != example.shown:
            stale.append(example.command)
            lines[example.start:example.end] = output.splitlines()
    return "\n".join(lines) + "\n", stale[::-1]


def gpu_catalog() -> str:
    """The GPU catalog as a markdown table, read from `lora_planner.gpus`."""
    from lora_planner.gpus import GPUS, MIB

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    sources = any(getattr(g, "source", None) for g in GPUS)
    head = ["GPU", "aliases", "NVML MiB", "dense 16-bit TFLOP/s", "USD per GPU-hour"]
    rows = ["| " + " | ".join(head + ["source"] * sources) + " |",
            "|---|---|---:|---:|---:|" + "---|" * sources]
    for g in GPUS:
        cells = [g.name, ", ".join(g.aliases) or "-", f"{g.memory_bytes // MIB:,}",
                 cell(g.peak_tflops, "g"), cell(g.price_per_hour, ".2f")]
        if sources:
            cells.append(str(getattr(g, "source", None) or "-"))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def remake_docs() -> int:
    """Run each docs/*.md report's own "made by" command from the repository root."""
    made = 0
    for markdown in sorted((ROOT / "docs").glob("*.md")):
        made_by = [line for line in markdown.read_text().splitlines() if line.startswith("- made by: `")]
        if not made_by:
            continue
        run(made_by[0].removeprefix("- made by: `").removesuffix("`"))
        made += 1
    return made


def main(argv_: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale outputs")
    parser.add_argument("--docs", action="store_true", help="also remake the reports under docs/")
    parser.add_argument("--gpu-catalog", action="store_true", help="print the GPU catalog table")
    args = parser.parse_args(argv_)
    if args.gpu_catalog:
        print(gpu_catalog())
        return 0
    all_stale = []
    for path in pages():
        text, stale = refresh(path)
        name = path.relative_to(ROOT)
        all_stale += [f"{name}: $ {command}" for command in stale]
        if not args.check and stale:
            path.write_text(text)
    if args.check:
        for line in all_stale:
            print(f"stale: {line}")
        return 1 if all_stale else 0
    print(f"rewrote {len(all_stale)} output(s)")
    if args.docs:
        print(f"remade {remake_docs()} report(s) under docs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
