"""Readers of records files keep every good record: bad bytes, bad lines and wrong types cost one
line each, are named (file:line, why) in one warning, and never make a reader raise."""

from __future__ import annotations

import copy
import json
import sys

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_planner import record_schema
from lora_planner.cli import main
from lora_planner.measure import records

from .test_reports_validation import CPU, H100, record

pytest.importorskip("pandas")
from lora_planner.reports import validation  # noqa: E402  (pandas-backed tables)

GOOD = [record(f"job-{i}", 1_000_000 + i, 900_000 + i, nvml=1_200_000, device=H100 if i % 2 else CPU)
        for i in range(7)]


def good_file(path) -> bytes:
    data = "".join(json.dumps(r) + "\n" for r in GOOD).encode()
    path.write_bytes(data)
    return data


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def with_value(path: tuple[str, ...], value) -> bytes:
    bad = copy.deepcopy(GOOD[0])
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(bad).encode()


# Each found by probing the readers; each cost a whole file or a traceback before.
HOSTILE = {
    "non-UTF-8 byte": (b'{"format": 1, "id": "\xff"}', "not UTF-8 (byte 0xff at column 22)"),
    "truncated line": (json.dumps(GOOD[0]).encode()[:50], "not valid JSON"),
    "deep nesting": (deep(100_000), "nested too deeply"),
    "5,000-digit integer": (b'{"format": ' + b"9" * 5000 + b"}", ""),
    "measured a string": (with_value(("measured",), "x"), "`measured` is 'x', not a JSON object"),
    "peak 1e300": (with_value(("predicted", "peak"), 1e300), "predicted.peak is 1e+300, not a whole"),
    "peak a string": (with_value(("predicted", "peak"), "x"), "predicted.peak is 'x'"),
    "peak a list": (with_value(("predicted", "peak"), [1]), "predicted.peak is [1]"),
    "peak past 2^63": (with_value(("predicted", "peak"), 10**30), "outside 0 to 2^63 bytes"),
    "measured peak huge": (with_value(("measured", "peak_allocated"), 10**400), "measured.peak_allocated"),
    "capability empty": (with_value(("device", "capability"), []), "device.capability is []"),
    "relative error a list": (with_value(("relative_error",), [1]), "`relative_error` is [1]"),
    "at_peak a list": (with_value(("measured", "at_peak"), [1]), "measured.at_peak is [1]"),
    "notes of numbers": (with_value(("notes",), [1]), "`notes` is [1]"),
    "status a list": (with_value(("status",), ["ok"]), "`status` is ['ok'], not a string"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_line_costs_that_line_only(tmp_path, name):
    line, why = HOSTILE[name]
    path = tmp_path / "r.jsonl"
    data = good_file(path)
    lines = data.split(b"\n")
    path.write_bytes(b"\n".join([*lines[:3], line, *lines[3:]]))  # in the middle, line 4
    found, skipped = record_schema.read_records_file(path)
    assert [r["id"] for _, r in found] == [r["id"] for r in GOOD]
    assert [n for n, _ in found] == [1, 2, 3, 5, 6, 7, 8]
    (only,) = skipped
    assert only.where == f"{path}:4" and why in only.why
    if name == "5,000-digit integer" and sys.version_info >= (3, 11):
        assert "digit" in only.why or "limit" in only.why
    assert records.read_records(path) == GOOD
    loaded, problems = validation.read_records([path])
    assert [item.record for item in loaded] == GOOD and len(problems) == 1


def test_a_non_utf8_byte_costs_one_line_of_the_report_not_the_file(tmp_path):
    path = tmp_path / "r.jsonl"
    data = good_file(path)
    path.write_bytes(data[:10] + b"\xfe" + data[10:])  # inside the first record
    out = tmp_path / "v.md"
    result = CliRunner().invoke(main, ["report", "validation", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    (warning,) = result.stderr.strip().splitlines()
    assert warning == (f"warning: skipped 1 unusable input (listed in the report): {path}:1 "
                       "(not UTF-8 (byte 0xfe at column 11))")
    assert "- records read: 6; problems: 1" in out.read_text()


def test_sweep_dry_run_reads_past_bad_lines_and_warns_once(tmp_path):
    output = tmp_path / "r.jsonl"
    args = ["measure", "sweep", "--set", "device=cpu", "--grid", "method=full,lora", "--grid", "rank=1,8",
            "-o", str(output), "--dry-run"]
    listed = [json.loads(line) for line in CliRunner().invoke(main, args).stdout.splitlines()]
    done = {**GOOD[0], "id": listed[1]["id"]}
    output.write_bytes(b"\xff\xfe\n" + deep(50_000) + b"\n" + json.dumps(done).encode() + b"\n"
                       + with_value(("measured",), "x") + b"\n")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["done"] for line in result.stdout.splitlines()] == [False, True, False]
    (warning,) = result.stderr.strip().splitlines()
    assert warning.startswith("warning: skipped 3 lines that are not a usable record: ")
    assert f"{output}:1 (not UTF-8" in warning and f"{output}:2 (JSON nested too deeply" in warning
    assert f"{output}:4 (`measured` is 'x'" in warning


# --- properties -------------------------------------------------------------------------------

garbage_line = st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" "))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
# Every place a reader looks, and a few it does not.
FIELDS = [("id",), ("status",), ("error",), ("settings",), ("settings", "rank"), ("settings", "model"),
          ("device",), ("device", "name"), ("device", "memory_total"), ("device", "capability"),
          ("predicted",), ("predicted", "peak"), ("predicted", "weights"), ("predicted", "peak_phase"),
          ("predicted", "device_overhead_bytes"), ("measured",), ("measured", "peak_allocated"),
          ("measured", "nvml_peak_used"), ("measured", "nvml_baseline_used"), ("measured", "source"),
          ("measured", "at_peak"), ("measured", "peak_phase"), ("relative_error",),
          ("relative_error", "peak_allocated"), ("command",), ("created",), ("notes",), ("format",)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(garbage_line, max_size=6), where=st.integers(min_value=0, max_value=7))
def test_garbage_lines_anywhere_never_raise_and_never_lose_a_good_record(tmp_path, lines, where):
    path = tmp_path / "r.jsonl"
    good = [json.dumps(r).encode() for r in GOOD]
    path.write_bytes(b"\n".join(good[:where] + lines + good[where:]) + b"\n")
    kept = records.read_records(path)
    assert [r["id"] for r in kept if r in GOOD] == [r["id"] for r in GOOD]
    loaded, problems = validation.read_records([path])
    assert [item.record for item in loaded if item.record in GOOD] == GOOD
    assert len(loaded) + len(problems) == len(good) + sum(1 for line in lines if line.strip())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(max_size=2000) | st.lists(st.sampled_from(
    [b"\n", b"\xff", b"{", b"[" * 3000, b'"', b"9" * 4400, b"\r", b"\x00", b"\xe2\x80\xa8", b"NaN",
     json.dumps(GOOD[0]).encode()[:-1]]), max_size=30).map(b"".join))
def test_any_bytes_appended_to_a_good_file_never_raise_and_lose_nothing(tmp_path, tail):
    path = tmp_path / "r.jsonl"
    path.write_bytes(good_file(path) + tail)
    assert records.read_records(path)[: len(GOOD)] == GOOD
    loaded, _ = validation.read_records([path])
    assert [item.record for item in loaded][: len(GOOD)] == GOOD


@settings(max_examples=80, deadline=None)
@given(changes=st.lists(st.tuples(st.sampled_from(FIELDS), json_values), min_size=1, max_size=3))
def test_a_record_the_check_passes_never_makes_the_report_raise(changes):
    """Right-shaped records with values of any type: the check refuses them, or the report
    (every table, the fit of the allowance, the provenance) renders them."""
    bad = copy.deepcopy(GOOD[1])
    for path, value in changes:
        target = bad
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target[path[-1]] = value
    line = json.dumps(bad).encode()
    record, why = record_schema.parse_line(line)
    assert (record is None) == (why is not None)
    if record is None:
        return
    loaded = [validation.Loaded(r, f"r.jsonl:{n}") for n, r in enumerate([GOOD[0], record, GOOD[3]], 1)]
    text = validation.validation_markdown(loaded, [], ["r.jsonl"], "lora-plan report validation", "GB", 5,
                                          None, validation.Path("v.md"), "no plots here")
    assert "## Provenance" in text
