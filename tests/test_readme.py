"""The README's planning commands run as written, and the outputs it shows are the planner's own."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_planner.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def plan_commands() -> list[tuple[str, tuple[str, ...]]]:
    """Every `lora-plan` line of the README's bash blocks that plans (no measuring or tracing), with
    the `echo ... > FILE` lines before it in its block, which make the files it reads."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        setup: list[str] = []
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("echo "):
                    setup.append(part)
                if part.startswith(".venv/bin/"):
                    part = part[len(".venv/bin/"):]
                if not part.startswith("lora-plan"):
                    continue
                words = shlex.split(part)[1:]
                command = words[0] if words and words[0] in SUBCOMMANDS else "plan"
                if command in ("plan", "models") and "./my-model/config.json" not in words:
                    commands.append((part, tuple(setup)))
    return commands


def test_the_readme_has_plan_commands():
    assert "lora-plan --model 70b --rank 8" in [command for command, _ in plan_commands()]


@pytest.mark.parametrize(("command", "setup"), plan_commands(), ids=[c for c, _ in plan_commands()])
def test_readme_plan_command_runs(command, setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for line in setup:
        subprocess.run(line, shell=True, check=True, cwd=tmp_path)
    result = CliRunner().invoke(main, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output


def test_readme_example_outputs_are_current():
    check = subprocess.run([sys.executable, "benchmarks/readme_examples.py", "--check"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr + (
        "\nrefresh them with: python benchmarks/readme_examples.py")
