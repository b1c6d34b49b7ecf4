"""Re-run the README's shown `lora-plan` outputs and write them back (or check they are current);
with --docs, also remake each report under docs/ from the command it records under "made by".

    python benchmarks/readme_examples.py            # rewrite README.md's example outputs
    python benchmarks/readme_examples.py --docs     # ... and docs/*.md with their images
    python benchmarks/readme_examples.py --check    # exit 1, listing the stale README examples

An example is a fenced ```text block whose lines start with `$ lora-plan ...` (a trailing `\\`
continues the command on the next line); everything after a command up to the next `$ ` line or
the fence is that command's output. Only `lora-plan` commands are run, each as
`python -m lora_planner ...` in the repository's root.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)$")


@dataclass(frozen=True)
class Example:
    command: str  # as shown, without "$ ", continuation lines joined
    start: int  # index of the first output line
    end: int  # index one past the last output line
    shown: str


def examples(lines: list[str]) -> list[Example]:
    found: list[Example] = []
    i, in_text = 0, False
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence:
            in_text = not in_text and fence.group(1) == "text"
            i += 1
            continue
        if in_text and lines[i].startswith("$ lora-plan"):
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
            found.append(Example(command, start, end, "\n".join(lines[start:end])))
            continue
        i += 1
    return found


def run(command: str) -> str:
    words = shlex.split(command)
    assert words[0] == "lora-plan", command
    result = subprocess.run([sys.executable, "-m", "lora_planner", *words[1:]], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"README example failed ({result.returncode}): {command}\n{result.stderr}")
    return result.stdout.rstrip("\n")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale examples")
    parser.add_argument("--docs", action="store_true", help="also remake the reports under docs/")
    args = parser.parse_args(argv)
    lines = README.read_text().splitlines()
    stale = []
    for example in reversed(examples(lines)):  # from the end, so earlier indices stay valid
        output = run(example.command)
        if output != example.shown:
            stale.append(example.command)
            lines[example.start:example.end] = output.splitlines()
    if args.check:
        for command in reversed(stale):
            print(f"stale: $ {command}")
        return 1 if stale else 0
    README.write_text("\n".join(lines) + "\n")
    print(f"rewrote {len(stale)} example(s)")
    if args.docs:
        print(f"remade {remake_docs()} report(s) under docs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
