"""The record of published GPU fine-tuning runs (benchmarks/published/runs.json) against the planner.

Each measured figure is a published GPU run, independent of the planner; the record keeps where it
was read (repository, path, commit, the line quoted) and the settings the source states. A case the
planner can express runs here in-process and must stay within the bound the record gives it, with
the mechanism of a known miss written beside the bound. A case waiting for a planner option must
name an option that does not exist yet: when it lands, this test fails until the case is planned.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "published" / "table.py"
_spec = importlib.util.spec_from_file_location("published_table", TABLE)
table = sys.modules["published_table"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)

CASES = table.load_cases()
PLANNED = [c for c in CASES if not c["missing"]]
PENDING = [c for c in CASES if c["missing"] and all("option" in m for m in c["missing"])]


def _ids(cases):
    return [c["id"] for c in cases]


def test_record_schema():
    ids = _ids(CASES)
    assert len(ids) == len(set(ids))
    for case in CASES:
        where = case["id"]
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", where), where
        src, measured = case["source"], case["measured"]
        if "repo" in src:  # a file of a repository at a commit
            assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]), where
            assert src["url"] == f"https://github.com/{src['repo']}/blob/{src['commit']}/{src['path']}", where
        else:  # a web page, with the date it was read
            assert src["url"].startswith("https://"), where
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", src["read"]), where
        # The figure is copied from the quoted line, never typed apart from it.
        assert measured["value"] in src["quote"], where
        assert float(measured["value"]) > 0 and measured["unit"] in table.UNITS, where
        assert measured["quantity"] in table.QUANTITIES and measured["compare"] in table.COMPARES, where
        assert measured["how"], where
        assert tuple(case["settings"]) == table.SETTINGS, where
        assert all(isinstance(note, str) and note for note in case["notes"]), where
        for entry in case["missing"]:
            names_a_setting = entry.get("option", "").startswith("--") or entry.get("unpublished")
            assert entry["why"] and names_a_setting, where
        if case["command"] is None:
            assert any("unpublished" in m for m in case["missing"]), where
        else:
            assert case["command"].startswith(table.COMMAND + " "), where
        if case["missing"]:
            assert case["bound"] is None, where
        else:
            assert case["command"] and 0 < case["bound"] <= 0.5 and case["bound_why"], where


def test_waiting_options_do_not_exist_yet():
    """An option a case waits for that now exists: take its entry out of the case's `missing` (the
    command keeps the option); a case with nothing left missing is planned: run it and set its bound
    (with the mechanism of any miss over 5%)."""
    options = table.plan_options()
    landed = [(c["id"], m["option"]) for c in CASES for m in c["missing"]
              if "option" in m and table.option_exists(m["option"], options)]
    assert not landed, f"options landed, take them out of `missing`: {landed}"


@pytest.mark.parametrize("case", PLANNED, ids=_ids(PLANNED))
def test_planned_case_within_its_bound(case):
    row = table.evaluate(case, table.plan_options())
    assert row.status == "planned"
    assert abs(row.error) <= case["bound"], f"{row.error:+.1%} against a bound of {case['bound']:.0%}"


@pytest.mark.parametrize("case", PENDING, ids=_ids(PENDING))
def test_pending_command_runs_with_todays_nearest_options(case):
    """Everything but the missing option is a valid command today."""
    plan = table.run_plan(table.nearest_argv(case, table.plan_options()))
    assert table.planned_bytes(plan, case["measured"]["compare"]) > 0


def test_table_has_a_row_per_case_and_counts_them():
    text = table.markdown(table.evaluate_all(CASES))
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == _ids(CASES)
    assert f"{len(CASES)} published runs: {len(PLANNED)} planned" in text
