"""The README and the hand-written pages under docs/ work as written: the set-up commands are the ones
CI runs, every planning command runs, the outputs they show are the planner's own, the quick start
stays short, and every link points at something that exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_planner.cli import SUBCOMMANDS, main
from lora_planner.reports.markdown import hand_written

from .markdown_doc import tables

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = hand_written(ROOT)  # the rule benchmarks/readme_examples.py rewrites by
VENV_BIN = ".venv/bin/"
QUICK_START_MAX_LINES = 100


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def lora_plan_lines(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """Every `lora-plan` command of a page's bash blocks, as shown (comments dropped, continuation
    lines joined), with the `echo ... > FILE` lines before it in its block, which make the files it
    reads."""
    commands = []
    for block in bash_blocks(text):
        setup: list[str] = []
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("echo "):
                    setup.append(part)
                if part.removeprefix(VENV_BIN).startswith("lora-plan"):
                    commands.append((part, tuple(setup)))
    return commands


def subcommand(command: str) -> str:
    words = shlex.split(command)[1:]
    return words[0] if words and words[0] in SUBCOMMANDS else "plan"


def plan_commands(page: Path) -> list[tuple[str, tuple[str, ...]]]:
    """The commands of a page that plan (`plan`, `models`): no torch, no files written."""
    return [(c, s) for c, s in lora_plan_lines(page.read_text()) if subcommand(c) in ("plan", "models")]


CASES = [(page, command, setup) for page in PAGES for command, setup in plan_commands(page)]


def test_the_pages_have_plan_commands():
    readme = [command for command, _ in plan_commands(README)]
    assert ".venv/bin/lora-plan --model 70b --rank 8" in readme
    assert {page.name for page, _, _ in CASES} >= {"README.md", "planning.md", "multi-gpu.md"}


@pytest.mark.parametrize(("page", "command", "setup"), CASES,
                         ids=[f"{p.relative_to(ROOT)}: {c}" for p, c, _ in CASES])
def test_plan_command_runs(page, command, setup, tmp_path, monkeypatch):
    """Run as a reader would, from a checkout: the repository's `results/` and `benchmarks/` are
    there, and files the page makes with `echo` are made first."""
    for name in ("results", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    for line in setup:
        subprocess.run(line, shell=True, check=True, cwd=tmp_path)
    assert command.startswith(VENV_BIN), f"{command!r}: the set-up leaves lora-plan in {VENV_BIN}"
    result = CliRunner().invoke(main, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output


def setup_commands() -> list[str]:
    """The README's first code block: the two set-up commands."""
    first = bash_blocks(README.read_text())[0]
    return [line for line in first.splitlines() if line.strip()]


def test_the_readme_opens_with_the_two_setup_commands():
    plan, tests = setup_commands()
    text = README.read_text()
    assert text.index("```bash") < text.index("## Quick start")
    assert plan == ("python3 -m venv .venv && .venv/bin/pip install -e . "
                    "&& .venv/bin/lora-plan --model 70b --rank 8")
    assert tests.startswith("python3 -m venv .venv && .venv/bin/pip install torch==")
    assert tests.endswith(" -e '.[test]' && .venv/bin/python -m pytest")


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs the README's second set-up command as written, so what CI passes is what a
    reader runs."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci


def quick_start_lines(text: str) -> int:
    """Lines from the quick start's heading to the first list of links after it."""
    lines = text.splitlines()
    start = lines.index("## Quick start")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("- ["))
    return end - start


def test_the_quick_start_fits_on_two_screens():
    assert quick_start_lines(README.read_text()) <= QUICK_START_MAX_LINES


def test_the_quick_start_measure_counts_what_it_says():
    text = "intro\n## Quick start\n" + "line\n" * 5 + "## More\n- [a](a.md)\n"
    assert quick_start_lines(text) == 7


def test_the_quick_start_explains_rows_the_output_has():
    """Each row the quick start explains in bold is a row of the output shown above it, so a row
    renamed in the table cannot leave its explanation behind."""
    text = README.read_text()
    quick = text[text.index("## Quick start"):text.index("The questions people ask")]
    output = re.search(r"^```text\n(.*?)^```", quick, flags=re.S | re.M).group(1).splitlines()
    explained = {t.rstrip(":") for t in re.findall(r"\*\*(.+?)\*\*", quick)}
    explained -= {"Header", "Columns", "Below the table"}  # parts of the output, not rows
    assert len(explained) >= 8
    for row in explained:
        assert any(line.startswith(row) for line in output), f"no row {row!r} in the quick start's output"


def test_shown_outputs_are_current():
    check = subprocess.run([sys.executable, "benchmarks/readme_examples.py", "--check"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr + (
        "\nrefresh them with: .venv/bin/python benchmarks/readme_examples.py")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_anchor_follows_github():
    assert anchor("Many GPUs, time and cost") == "many-gpus-time-and-cost"
    assert anchor("A local page: `lora-plan serve`") == "a-local-page-lora-plan-serve"


def links(text: str) -> list[str]:
    """Relative links of a page (outside code blocks and code spans)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_point_at_what_exists(page):
    for link in links(page.read_text()):
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} -> {target} is missing"
        if fragment and target.suffix == ".md":
            headings = re.findall(r"^#{1,6} (.+)$", target.read_text(), flags=re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page.name}: no heading #{fragment}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_tables_are_well_formed(page):
    """Every table has a header, a separator and rows as wide as the header (`tables` asserts it
    while it parses); code blocks are left out, since a plan's output is not a table."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    assert all(table.rows for table in tables(text))


def test_every_hand_written_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    for page in PAGES:
        if page.parent.name == "docs" and page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


def readme_torch_commands() -> list[str]:
    """The README's commands that need the second set-up command (torch), in order."""
    return [c for c, _ in lora_plan_lines(README.read_text()) if subcommand(c) not in ("plan", "models")]


@pytest.mark.slow
def test_readme_torch_commands_run_in_order(tmp_path):
    """The README's `measure` and `adapter` commands, run in order as written from a fresh folder:
    the adapter the first one saves is the one the next reads."""
    commands = readme_torch_commands()
    assert commands, "the README shows no command that needs torch"
    for command in commands:
        words = shlex.split(command)
        result = subprocess.run([sys.executable, "-m", "lora_planner", *words[1:]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
