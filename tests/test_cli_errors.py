"""A user mistake (`PlanError`) raised anywhere below a command ends as one line and exit 2, in one
place (the main group), not in a try/except of each command."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.errors import PlanError


@pytest.mark.parametrize("target, args", [
    ("lora_planner.cli.commands.plan_output", ["--model", "gpt2"]),
    ("lora_planner.measure.sweep.expand", ["measure", "sweep", "--set", "device=cpu", "--dry-run"]),
    ("lora_planner.reports.capacity.write_capacity_report", ["report", "capacity", "--model", "gpt2"]),
], ids=["plan", "measure sweep", "report capacity"])
def test_a_plan_error_below_any_command_is_one_line(monkeypatch, tmp_path, target, args):
    def fail(*args, **kwargs):
        raise PlanError("the mistake, said once")

    monkeypatch.setattr(target, fail)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*args, "-o", "out"] if args[0] != "--model" else args)
    assert (result.exit_code, result.output) == (2, "Error: the mistake, said once\n")
