"""`lora-plan report validation` on small synthetic JSONL records (made up here for parsing and
formatting checks only; they are not measurements)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.reports.validation import read_records

from .markdown_doc import (
    assert_images_are_png,
    assert_percent_matches,
    assert_size_matches,
    image_links,
    table_under,
    tables,
)

H100 = {"kind": "cuda", "name": "Synthetic GPU A", "driver": "1.0", "cuda": "12.0", "torch": "2.13.0",
        "memory_total": 80 * 10**9}
CPU = {"kind": "cpu", "name": "Synthetic CPU", "driver": None, "cuda": None, "torch": "2.13.0",
       "memory_total": None}


BASELINE = 500_000_000  # device memory in use before a job's model loads
ALLOWANCE = 300_000_000  # the device allowance the plan adds to its peak (made up)


def record(job: str, predicted_peak: int, allocated: int | None, nvml: int | None = None,
           device: dict = H100, status: str = "ok", stored_error: float | None = None, **extra) -> dict:
    """One format-1 record with made-up numbers; `nvml` is the growth over the baseline."""
    return {
        "format": 1, "id": job, "status": status, "error": extra.pop("error", None),
        "settings": {"model": "gpt2", "method": "lora", "rank": 8, "targets": ["c_attn"], "batch_size": 4,
                     "seq_len": 128, "steps": 3, "precision": "mixed", "grad_checkpointing": False,
                     "attention": "sdpa", "device": device["kind"]},
        "device": device,
        "predicted": {"weights": 1000, "gradients": 10, "master_weights": 20, "optimizer_states": 40,
                      "activations": 500, "peak": predicted_peak, "peak_phase": "backward",
                      "device_overhead_bytes": extra.pop("allowance", ALLOWANCE)},
        "measured": {"peak_allocated": allocated, "peak_reserved": None,
                     "nvml_peak_used": None if nvml is None else nvml + BASELINE,
                     "nvml_baseline_used": None if nvml is None else BASELINE,
                     "step_time_s": 0.5, "tokens_per_s": 1024.0,
                     "first_loss": 10.0, "last_loss": 9.0,
                     "source": "cuda" if device["kind"] == "cuda" else "tracer",
                     **extra.pop("measured", {})},
        "relative_error": {"peak_allocated": stored_error, "nvml_peak_used": None},
        "command": f"lora-plan measure run --job {job}", "created": "2026-01-01T00:00:00Z",
        "lora_plan_version": "0.1.0", "notes": extra.pop("notes", []),
    }


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run(*args: str):
    return CliRunner().invoke(main, list(args))


GPU_JOBS = [
    record("a", 1_100_000_000, 1_000_000_000, 1_300_000_000),
    record("b", 2_000_000_000, 2_500_000_000, 2_700_000_000),
    record("c", 500_000_000, 480_000_000),
    record("d", 3_000_000_000, 1_000_000_000),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("validation")
    results = write_jsonl(tmp_path / "gpu.jsonl", GPU_JOBS)
    cpu = write_jsonl(tmp_path / "cpu.jsonl", [record("e", 700_000, 600_000, device=CPU)])
    out = tmp_path / "out" / "validation.md"
    result = run("report", "validation", str(results), str(cpu), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return out


def test_jobs_table_predicted_against_measured(report):
    jobs = table_under(report.read_text(), "cuda: Synthetic GPU A", "Jobs")
    assert jobs.column("job") == ["a", "b", "c", "d"]
    for row, rec in zip(jobs.rows, GPU_JOBS, strict=True):
        measured = rec["measured"]
        assert_size_matches(row["predicted peak"], rec["predicted"]["peak"])
        assert_size_matches(row["allocator peak"], measured["peak_allocated"])
        expected = 100 * (rec["predicted"]["peak"] - measured["peak_allocated"]) / measured["peak_allocated"]
        assert_percent_matches(row["error, allocator peak"], expected, 1)
        if measured["nvml_peak_used"] is None:
            assert row["device growth (NVML)"] == "-" and row["error, device growth (NVML)"] == "-"
        else:
            growth = measured["nvml_peak_used"] - measured["nvml_baseline_used"]
            assert_size_matches(row["device growth (NVML)"], growth)
            planned = rec["predicted"]["peak"] + ALLOWANCE  # NVML sees the context and cache too
            assert_size_matches(row["+ allowance"], planned)
            assert_percent_matches(row["error, device growth (NVML)"], 100 * (planned - growth) / growth, 1)
        assert (row["method"], row["batch x seq"], row["precision"], row["source"]) == (
            "lora r=8", "4 x 128", "mixed", "cuda")


def test_error_distribution_median_p90_max(report):
    dist = table_under(report.read_text(), "cuda: Synthetic GPU A", "Error distribution")
    errors = np.array([(r["predicted"]["peak"] - r["measured"]["peak_allocated"])
                       / r["measured"]["peak_allocated"] for r in GPU_JOBS])
    row = dist.rows[0]
    assert row["metric"] == "allocator peak" and row["jobs"] == "4"
    assert_percent_matches(row["median |error|"], 100 * np.median(abs(errors)), 1)
    assert_percent_matches(row["p90 |error|"], 100 * np.percentile(abs(errors), 90), 1)
    assert_percent_matches(row["max |error|"], 100 * abs(errors).max(), 1)
    assert_percent_matches(row["median error"], 100 * np.median(errors), 1)
    assert dist.rows[1]["metric"] == "device growth (NVML)" and dist.rows[1]["jobs"] == "2"


def test_worst_cases_first(report):
    worst = table_under(report.read_text(), "cuda: Synthetic GPU A", "Worst cases")
    assert worst.column("job")[0] == "d"  # +200%
    sizes = [abs(float(e.rstrip("%"))) for e in worst.column("error")]
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == 5


def test_grouped_by_device(report):
    text = report.read_text()
    devices = table_under(text, "Devices")
    assert devices.column("device") == ["cuda: Synthetic GPU A", "cpu: Synthetic CPU"]
    assert devices.column("jobs") == ["4", "1"]
    assert table_under(text, "cpu: Synthetic CPU", "Jobs").column("job") == ["e"]


def test_provenance_of_every_record(report):
    tmp_path = report.parent.parent
    prov = table_under(report.read_text(), "Provenance")
    assert prov.column("job") == ["a", "b", "c", "d", "e"]
    assert prov.column("record") == [f"{tmp_path / 'gpu.jsonl'}:{n}" for n in (1, 2, 3, 4)] + [
        f"{tmp_path / 'cpu.jsonl'}:1"]
    assert prov.rows[0]["command"] == "`lora-plan measure run --job a`"
    assert prov.rows[0]["driver"] == "1.0" and prov.rows[4]["CUDA"] == "-"


def test_scatter_per_device(report):
    images = assert_images_are_png(report)
    assert [p.name for p in images] == ["validation-scatter-1.png", "validation-scatter-2.png"]


def test_oom_foreseen_or_not(tmp_path):
    gb = 10**9
    jobs = [
        record("foreseen", 90 * gb, None, status="oom"),
        record("missed", 50 * gb, None, status="oom"),
        # the fit rule counts the allowance: 79.9 GB + 0.3 GB does not fit in 80 GB
        record("allowance-foreseen", 79_900_000_000, 70 * gb, status="oom"),
        record("false-alarm", 85 * gb, 79 * gb),
        record("fine", 10 * gb, 10 * gb),
        record("cpu-oom", gb, None, status="oom", device=CPU),
        record("crashed", gb, None, status="error", error="CUDA error:\n  launch failure"),
        record("slow", gb, None, status="timeout", error="the job ran past the 60 s timeout"),
    ]
    out = tmp_path / "v.md"
    result = run("report", "validation", str(write_jsonl(tmp_path / "r.jsonl", jobs)), "-o", str(out))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    ooms = table_under(text, "cuda: Synthetic GPU A", "Out of memory")
    verdicts = {r["job"]: r["verdict"] for r in ooms.rows}
    assert verdicts == {"foreseen": "foreseen", "missed": "not foreseen", "allowance-foreseen": "foreseen",
                        "false-alarm": "predicted out of memory, but it ran",
                        "crashed": "failed, not for memory; the plan said it fits",
                        "slow": "timed out, not for memory; the plan said it fits"}
    cpu = table_under(text, "cpu: Synthetic CPU", "Out of memory")
    assert cpu.rows[0]["verdict"] == "ran out; device memory unknown"
    assert "- `crashed`: CUDA error: launch failure" in text
    assert "- `slow`: the job ran past the 60 s timeout" in text
    # the partial peak of a job that ran out enters no statistic
    dist = table_under(text, "cuda: Synthetic GPU A", "Error distribution")
    assert dist.rows[0]["jobs"] == "2"
    assert "allowance-foreseen" not in table_under(text, "cuda: Synthetic GPU A", "Worst cases").column("job")


def test_stored_relative_error_is_used_when_present(tmp_path):
    rec = record("x", 1_100, 1_000, stored_error=0.25)
    (loaded,), problems = read_records([write_jsonl(tmp_path / "r.jsonl", [rec])])
    assert problems == []
    out = tmp_path / "v.md"
    run("report", "validation", str(tmp_path / "r.jsonl"), "-o", str(out))
    row = table_under(out.read_text(), "cuda: Synthetic GPU A", "Jobs").rows[0]
    assert row["error, allocator peak"] == "+25.0%"


def test_traced_terms_at_peak_beside_planned_terms(tmp_path):
    at_peak = {"parameters": 1250, "gradients": 5, "inputs": 64, "activations": 400}
    rec = record("t", 2000, 1900, device=CPU, measured={"at_peak": at_peak, "peak_phase": "forward"})
    out = tmp_path / "v.md"
    run("report", "validation", str(write_jsonl(tmp_path / "r.jsonl", [rec])), "-o", str(out))
    terms = table_under(out.read_text(), "cpu: Synthetic CPU", "Memory by term at the peak")
    assert terms.column("traced") == list(at_peak)
    assert terms.column("planned term") == ["weights", "gradients", "-", "activations"]
    assert set(terms.column("peak phase (planned / traced)")) == {"backward / forward"}
    weights = terms.rows[0]
    assert_size_matches(weights["planned"], rec["predicted"]["weights"])
    assert_size_matches(weights["traced at peak"], 1250)
    assert_percent_matches(weights["error"], 100 * (1000 - 1250) / 1250, 1)
    assert terms.rows[2]["planned"] == "-" and terms.rows[2]["error"] == "-"


def test_bad_input_reported_with_file_and_line_and_rest_written(tmp_path):
    good = record("good", 1_100_000, 1_000_000)
    old = {**record("old", 1, 1), "format": 0}
    newer = {**record("new", 1, 1), "format": 2}
    results = write_jsonl(tmp_path / "mixed.jsonl",
                          [good, '{"format": 1, "id": "cut', old, "", newer, {"format": 1, "id": "bare"},
                           [1, 2]])
    missing = tmp_path / "missing.jsonl"
    out = tmp_path / "validation.md"
    result = run("report", "validation", str(results), str(missing), "-o", str(out))
    assert result.exit_code == 0, result.output
    expected = {
        f"{results}:2": "not valid JSON",
        f"{results}:3": "record format 0 is older than format 1",
        f"{results}:5": "record format 2 is newer",
        f"{results}:6": "`status` is None, not a string",
        f"{results}:7": "not a JSON object",
        str(missing): "no such file",
    }
    (warning,) = result.stderr.strip().splitlines()  # one warning, however many problems
    assert warning.startswith("warning: skipped 6 unusable inputs (listed in the report): ")
    text = out.read_text()
    problems = text.split("## Input problems")[1].split("## ")[0]
    named = [where for where, message in expected.items() if f"{where} ({message}" in warning]
    assert len(named) == 5 and warning.endswith("; and 1 more")  # the first five, then a count
    for where, message in expected.items():
        assert f"- `{where}`: " in problems and message in problems
    assert table_under(text, "cuda: Synthetic GPU A", "Jobs").column("job") == ["good"]
    assert table_under(text, "Provenance").column("record") == [f"{results}:1"]


def test_only_bad_input_still_writes_a_report_and_exits_1(tmp_path):
    out = tmp_path / "validation.md"
    result = run("report", "validation", str(tmp_path / "none.jsonl"), "-o", str(out))
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: no usable record in the input; the report says why"
    text = out.read_text()
    assert "No usable records." in text and "no such file" in text
    assert tables(text) == []


def test_folder_stands_for_its_jsonl_files(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", [record("one", 10, 10)])
    write_jsonl(folder / "2.jsonl", [record("two", 10, 10)])
    (loaded), problems = read_records([folder])
    assert [item.record["id"] for item in loaded] == ["one", "two"] and problems == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [str(p) for p in read_records([empty])[1]] == [f"{empty}: folder holds no .jsonl files"]


def test_without_matplotlib_no_images_and_says_so(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "validation.md"
    result = run("report", "validation", str(write_jsonl(tmp_path / "r.jsonl", GPU_JOBS)), "-o", str(out))
    assert result.exit_code == 0
    assert "matplotlib is not installed" in result.stderr
    text = out.read_text()
    assert image_links(text) == [] and "No plot: matplotlib is not installed" in text
    assert list(tmp_path.glob("*.png")) == []


def test_help_and_missing_argument():
    assert "lora-plan report validation results/measure/*.jsonl -o validation.md" in run(
        "report", "validation", "--help").output
    result = run("report", "validation")
    assert result.exit_code == 2 and "Missing argument" in result.output


def test_without_pandas_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    for args in (("validation", str(tmp_path / "r.jsonl")), ("capacity", "--models", "gpt2")):
        result = run("report", *args, "-o", str(tmp_path / "out.md"))
        assert result.exit_code == 2
        assert result.output.strip() == ("Error: reports need pandas: pip install 'lora-plan[reports]' "
                                         "(from a clone: pip install -e '.[reports]')")
    assert not (tmp_path / "out.md").exists()
