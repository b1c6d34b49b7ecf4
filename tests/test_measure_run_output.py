"""`measure run -o`: a results file that cannot take the record is refused before the job trains,
and a write that still fails at the end prints the record instead of losing it."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.measure import job as job_module
from lora_planner.measure import records
from lora_planner.measure.job import FAULT_ENV

pytest.importorskip("torch")


def run(*args: str):
    return CliRunner().invoke(main, ["measure", "run", "--model", "gpt2", "--steps", "1", "--seq-len", "8",
                                     "--device", "cpu", *args])


@pytest.fixture
def no_training(monkeypatch):
    """The job must not start: any call is a failure of the check that should have come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the job started before its output was checked")

    monkeypatch.setattr(job_module, "run_job", refuse)


@pytest.mark.parametrize("target, message", [
    ("folder", "the results file {path} is a folder; name a file"),
    ("/dev/full", "the results file /dev/full is not a regular file"),
    ("file/r.jsonl", "cannot write the results file {path}: {tmp}/file is not a folder"),
])
def test_an_output_that_cannot_take_the_record_is_refused_before_training(tmp_path, no_training, target,
                                                                           message):
    if target.startswith("/") and not os.path.exists(target):
        pytest.skip(f"no {target} here")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    path = target if target.startswith("/") else str(tmp_path / target)
    result = run("-o", path)
    assert result.exit_code == 2, result.output
    assert result.output == "Error: " + message.format(path=path, tmp=tmp_path) + "\n"


def test_an_adapter_folder_holding_other_files_is_refused_before_training(tmp_path, no_training):
    (tmp_path / "notes.txt").write_text("mine")
    result = run("--save-adapter", str(tmp_path))
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert "already holds other files (notes.txt)" in result.output


@pytest.mark.parametrize("fmt", ["summary", "json"])
def test_a_final_write_that_fails_prints_the_record_and_exits_1(tmp_path, monkeypatch, fmt):
    monkeypatch.setenv(FAULT_ENV, "error")  # a record at once, without training

    def disk_full(path, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records, "append_record", disk_full)
    output = tmp_path / "r.jsonl"
    result = run("-o", str(output), "--format", fmt)
    assert result.exit_code == 1
    printed = result.stdout if fmt == "json" else result.stderr
    record = json.loads(printed.splitlines()[0])
    assert record["status"] == "error" and record["predicted"]["peak"] > 0
    where = "on stdout above" if fmt == "json" else "the JSON line above"
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot append the record to {output} (No space left on device); the record is {where}")
    assert not output.exists()
