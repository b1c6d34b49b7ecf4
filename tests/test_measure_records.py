"""The JSONL record file: stable ids, fsync'ed appends, lines cut short by a crash skipped."""

from __future__ import annotations

import json

from lora_planner.measure import records

SETTINGS = {"model": "gpt2", "method": "lora", "rank": 8, "targets": ["c_attn"], "batch_size": 1,
            "seq_len": 128, "steps": 5, "precision": "fp32", "grad_checkpointing": False,
            "attention": "sdpa", "device": "cuda"}
PREDICTED = {"weights": 400, "gradients": 8, "master_weights": 0, "optimizer_states": 16,
             "activations": 100, "peak": 600, "peak_phase": "backward", "device_overhead_bytes": 150}


def record(status: str = "ok", **measured) -> dict:
    return records.make_record(SETTINGS, status=status, device={"kind": "cuda"}, predicted=PREDICTED,
                               measured={"source": "cuda", **measured}, command="lora-plan measure run")


def test_ids_are_stable_and_follow_every_setting():
    shuffled = dict(reversed(list(SETTINGS.items())))
    assert records.settings_id(shuffled) == records.settings_id(SETTINGS)
    assert records.settings_id({**SETTINGS, "grad_checkpointing": True}) != records.settings_id(SETTINGS)
    assert records.settings_id({**SETTINGS, "model": "./models/tiny/config.json"}).startswith("config.json-")


def test_relative_errors_are_predicted_minus_measured_over_measured():
    r = record(peak_allocated=500, nvml_peak_used=1300, nvml_baseline_used=500)
    assert r["relative_error"]["peak_allocated"] == (600 - 500) / 500
    # NVML growth holds the CUDA context and the allocator's cache: set beside peak + allowance
    assert r["relative_error"]["nvml_peak_used"] == (600 + 150 - 800) / 800
    assert set(r["measured"]) >= set(records.MEASURED_KEYS)
    assert record()["relative_error"] == {"peak_allocated": None, "nvml_peak_used": None}
    # a job that failed has at most a partial peak: no error enters the statistics
    for status in ("oom", "error", "timeout"):
        failed = record(status, peak_allocated=500, nvml_peak_used=1300, nvml_baseline_used=500)
        assert failed["relative_error"] == {"peak_allocated": None, "nvml_peak_used": None}


def test_append_fsyncs_and_survives_a_line_cut_short(tmp_path, monkeypatch):
    synced = []
    real_fsync = records.os.fsync
    monkeypatch.setattr(records.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "results.jsonl"
    first = record(peak_allocated=500)
    records.append_record(path, first)
    with open(path, "a") as f:
        f.write(json.dumps(record(peak_allocated=1))[:40])  # a kill in the middle of a write
    second = {**record(peak_allocated=700), "id": "other"}
    records.append_record(path, second)
    assert len(synced) == 2
    assert records.read_records(path) == [first, second]
    assert records.finished_ids(path) == {first["id"], "other"}
    assert records.read_records(tmp_path / "missing.jsonl") == []


def test_one_schema_written_by_measure_and_read_by_reports():
    """The schema lives in the core, stdlib only: measure writes with it, reports read with it,
    and neither imports the other."""
    import ast
    import sys
    from pathlib import Path

    from lora_planner import record_schema
    from lora_planner.reports import validation

    tree = ast.parse(Path(record_schema.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
    assert records.make_record is record_schema.make_record and records.FORMAT == record_schema.FORMAT
    assert validation.check_record is record_schema.check_record
    for package, other in (("measure", "reports"), ("reports", "measure")):
        for path in (Path(record_schema.__file__).parent / package).glob("*.py"):
            assert f"{other}" not in {n.module.split(".")[0] for n in ast.walk(ast.parse(path.read_text()))
                                      if isinstance(n, ast.ImportFrom) and n.level == 2 and n.module}, path
    # a record measure writes is one reports reads
    assert record_schema.check_record(record(peak_allocated=500)) is None
