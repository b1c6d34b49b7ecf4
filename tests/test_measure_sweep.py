"""Sweeps: grids from files and options, one subprocess per job, OOMs recorded, resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.errors import PlanError
from lora_planner.measure import sweep
from lora_planner.measure.job import FAULT_ENV
from lora_planner.measure.records import read_records

from .test_reports_validation import record

ROOT = Path(__file__).resolve().parents[1]
GPU_GRID = ROOT / "benchmarks" / "gpu_grid.toml"
TINY = {"model_type": "gpt2", "vocab_size": 300, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}

SPEC_TEXT = {
    ".toml": '[fixed]\nmodel = "gpt2"\ndevice = "cpu"\n[grid]\nmethod = ["full", "lora"]\nrank = [1, 8]\n',
    ".yaml": "fixed:\n  model: gpt2\n  device: cpu\ngrid:\n  method: [full, lora]\n  rank: [1, 8]\n",
    ".json": json.dumps({"fixed": {"model": "gpt2", "device": "cpu"},
                         "grid": {"method": ["full", "lora"], "rank": [1, 8]}}),
}


@pytest.mark.parametrize("suffix", list(SPEC_TEXT))
def test_spec_formats_expand_alike_and_full_has_no_rank(tmp_path, suffix):
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    path = tmp_path / f"spec{suffix}"
    path.write_text(SPEC_TEXT[suffix])
    jobs = sweep.expand(sweep.load_spec(path))
    assert [(j.to_dict()["method"], j.to_dict()["rank"]) for j in jobs] == [
        ("full", None), ("lora", 1), ("lora", 8)]
    assert len({j.id for j in jobs}) == 3


@pytest.mark.parametrize("text, message", [
    ("[grid]\nrank = 8\n", "must be a non-empty list"),
    ("[grids]\nrank = [8]\n", "unknown section"),
    ("[fixed]\ncolour = 'red'\n", "unknown job setting 'colour'"),
    ("[fixed\n", "cannot parse"),
])
def test_bad_specs_are_plan_errors(tmp_path, text, message):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    with pytest.raises(PlanError, match=message):
        sweep.expand(sweep.load_spec(path))


def test_command_line_values_are_typed_by_setting():
    grid = sweep.parse_assignments(["rank=1,8", "targets=c_attn,c_attn+c_fc", "grad-checkpointing=off,on"],
                                   as_lists=True)
    assert grid == {"rank": [1, 8], "targets": [["c_attn"], ["c_attn", "c_fc"]],
                    "grad_checkpointing": [False, True]}
    fixed = sweep.parse_assignments(["lr=3e-4", "weights=none", "dropout=none", "lora-dropout=0.1"],
                                    as_lists=False)
    assert fixed == {"lr": 3e-4, "weights": None, "dropout": None, "lora_dropout": 0.1}
    assert sweep.parse_assignments(["dropout=0.2"], as_lists=False) == {"dropout": 0.2}
    with pytest.raises(PlanError, match="setting dropout: expected a number or none, got 'high'"):
        sweep.parse_assignments(["dropout=high"], as_lists=False)
    with pytest.raises(PlanError, match="setting rank: expected a whole number or none, got 'eight'"):
        sweep.parse_assignments(["rank=eight"], as_lists=False)


def test_standard_gpu_grid_is_336_planned_cuda_jobs():
    jobs = sweep.expand(sweep.load_spec(GPU_GRID))
    assert len(jobs) == 3 * 7 * 2 * 2 * 2 * 2
    assert {j.run.device for j in jobs} == {"cuda"}
    assert {(j.to_dict()["method"], j.to_dict()["rank"], tuple(j.to_dict()["targets"])) for j in jobs} == {
        ("full", None, ())} | {("lora", r, t) for r in (1, 8, 64) for t in (("c_attn",), ("all-linear",))}
    assert {(j.setup.precision, j.run.amp_dtype) for j in jobs} == {("fp32", "bf16"), ("amp", "bf16")}
    predictions = sweep.check_jobs(jobs)
    assert all(p["peak"] > p["weights"] > 0 for p in predictions.values())


def test_dry_run_lists_jobs_and_what_is_done(tmp_path):
    output = tmp_path / "results.jsonl"
    args = ["measure", "sweep", "--set", "device=cpu", "--grid", "method=full,lora", "--grid", "rank=1,8",
            "-o", str(output), "--dry-run"]
    listed = [json.loads(line) for line in CliRunner().invoke(main, args).output.splitlines()]
    assert [(j["settings"]["method"], j["settings"]["rank"]) for j in listed] == [
        ("full", None), ("lora", 1), ("lora", 8)]
    assert not any(j["done"] for j in listed)
    output.write_text(json.dumps({**record("done", 1, 1), "id": listed[1]["id"]}) + "\n"
                      + json.dumps({"id": listed[2]["id"], "status": "ok"}) + "\n")  # not a record
    result = CliRunner().invoke(main, args)
    again = [json.loads(line) for line in result.stdout.splitlines()]
    assert [j["done"] for j in again] == [False, True, False]
    assert result.stderr.startswith(f"warning: skipped 1 line that is not a usable record: {output}:2 (")


@pytest.mark.parametrize("args, message", [
    (["--grid", "rank"], "expected KEY=VALUE"),
    (["--grid", "colour=red"], "unknown job setting 'colour'"),
    (["--set", "model=gpt2-huge"], "unknown model 'gpt2-huge'"),
    (["--set", "seq_len=4096"], "longer than gpt2's 1024 positions"),
    (["--set", "precision=bf16"], "runs precision fp32, amp"),
    (["missing.toml"], "no sweep spec at missing.toml"),
])
def test_sweep_mistakes_are_one_line_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(main, ["measure", "sweep", *args, "--set", "device=cpu",
                                       "-o", str(tmp_path / "r.jsonl"), "--dry-run"])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def _sweep_args(tmp_path: Path) -> tuple[list[str], list[str]]:
    """Three cheap jobs on a one-layer model, and their ids."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    fixed = ["--set", f"model={config}", "--set", "device=cpu", "--set", "steps=1", "--set", "seq_len=8"]
    grid = ["--grid", "rank=1,2,4"]
    spec = {"fixed": sweep.parse_assignments(fixed[1::2], False),
            "grid": sweep.parse_assignments(grid[1::2], True)}
    return [*fixed, *grid], [j.id for j in sweep.expand(spec)]


def _run_sweep(args: list[str], output: Path, fault: str) -> subprocess.CompletedProcess:
    code = "import sys; from lora_planner.cli import main; main(sys.argv[1:], prog_name='lora-plan')"
    env = {**os.environ, FAULT_ENV: fault}
    return subprocess.run([sys.executable, "-c", code, "measure", "sweep", *args, "-o", str(output),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT)


def test_oom_is_recorded_and_the_sweep_goes_on(tmp_path):
    """Faults are rehearsed before torch loads, so each job costs one Python start."""
    args, ids = _sweep_args(tmp_path)
    output = tmp_path / "results.jsonl"
    done = _run_sweep(args, output, f"error@{ids[0]},oom@{ids[1]},error@{ids[2]}")
    assert done.returncode == 0, done.stderr
    found = read_records(output)
    assert [(r["id"], r["status"]) for r in found] == [(ids[0], "error"), (ids[1], "oom"), (ids[2], "error")]
    assert "out of memory" in found[1]["error"] and found[1]["predicted"]["peak"] > 0
    assert "3 jobs: 0 already in the results file; ran 2 error, 1 oom" in done.stderr


def test_killed_sweep_loses_no_finished_job_and_resumes(tmp_path):
    args, ids = _sweep_args(tmp_path)
    output = tmp_path / "results.jsonl"
    killed = _run_sweep(args, output, f"error@{ids[0]},kill-sweep@{ids[1]}")
    assert killed.returncode == -9  # the sweep itself was killed, mid-grid
    first_lines = output.read_text().splitlines()
    assert [json.loads(line)["id"] for line in first_lines] == [ids[0]]

    resumed = _run_sweep(args, output, "error")
    assert resumed.returncode == 0, resumed.stderr
    lines = output.read_text().splitlines()
    assert lines[0] == first_lines[0]  # the finished job was neither lost nor rerun
    assert [json.loads(line)["id"] for line in lines] == ids
    assert "3 jobs: 1 already in the results file; ran 2 error" in resumed.stderr


def test_a_job_that_dies_without_a_record_gets_an_error_record(tmp_path):
    args, ids = _sweep_args(tmp_path)
    jobs = [j for j in sweep.expand({"fixed": sweep.parse_assignments(args[1:8:2], False),
                                     "grid": {"rank": [1]}})]
    output = tmp_path / "results.jsonl"
    result = sweep.run_sweep(jobs, output, launcher=lambda *args: sweep.Launch(-9, "Killed\n"),
                             progress=False)
    (record,) = read_records(output)
    assert result.statuses == {"error": 1}
    assert record["status"] == "error" and "signal 9" in record["error"] and record["predicted"]["peak"] > 0


def test_a_job_past_its_timeout_is_killed_and_recorded(tmp_path):
    args, ids = _sweep_args(tmp_path)
    output = tmp_path / "results.jsonl"
    done = _run_sweep([*args, "--timeout", "3"], output, f"hang@{ids[1]},error")
    assert done.returncode == 0, done.stderr
    found = {r["id"]: r for r in read_records(output)}
    assert [found[i]["status"] for i in ids] == ["error", "timeout", "error"]
    assert "ran past the 3 s timeout" in found[ids[1]]["error"]
    timed_out = found[ids[1]]
    assert timed_out["predicted"]["peak"] > 0 and timed_out["relative_error"]["peak_allocated"] is None
    assert not list(tmp_path.glob(".*.part"))  # nothing left behind


def test_devices_run_one_job_per_gpu_at_a_time(tmp_path, monkeypatch):
    """Each job process sees one GPU through CUDA_VISIBLE_DEVICES."""
    args, _ = _sweep_args(tmp_path)
    fixed = sweep.parse_assignments(args[1:8:2], False) | {"device": "cuda"}
    jobs = sweep.expand({"fixed": fixed, "grid": {"rank": [1, 2, 4], "seq_len": [8, 16]}})
    output = tmp_path / "results.jsonl"
    # Rehearsed failures happen before CUDA starts, so a machine without GPUs can run this.
    monkeypatch.setenv(FAULT_ENV, "error")
    result = sweep.run_sweep(jobs, output, progress=False, devices=("3", "5"))
    assert result.statuses == {"error": 6}
    found = read_records(output)
    assert len(found) == 6 and {r["settings"]["device"] for r in found} == {"cuda"}
    assert {r["env"]["CUDA_VISIBLE_DEVICES"] for r in found} == {"3", "5"}


def test_devices_share_the_jobs_and_never_double_book_a_gpu(tmp_path):
    args, _ = _sweep_args(tmp_path)
    spec = {"fixed": sweep.parse_assignments(args[1:8:2], False), "grid": {"rank": [1, 2, 4, 8, 16, 32]}}
    jobs = sweep.expand(spec)
    busy: set[str] = set()
    seen: list[str] = []
    lock = threading.Lock()

    def launcher(job, part, command, device, timeout):
        with lock:
            assert device not in busy  # one job per GPU at a time
            busy.add(device)
            seen.append(device)
        time.sleep(0.05)
        with lock:
            busy.discard(device)
        return sweep.Launch(1, "")

    result = sweep.run_sweep(jobs, tmp_path / "r.jsonl", launcher=launcher, progress=False,
                             devices=("0", "1"))
    assert result.statuses == {"error": 6} and sorted(set(seen)) == ["0", "1"]
    assert len(read_records(tmp_path / "r.jsonl")) == 6


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_are_disjoint_and_cover_the_grid(count):
    jobs = sweep.expand(sweep.load_spec(GPU_GRID))
    shards = [sweep.shard_jobs(jobs, sweep.parse_shard(f"{k}/{count}")) for k in range(count)]
    ids = [j.id for shard in shards for j in shard]
    assert sorted(ids) == sorted(j.id for j in jobs) and len(ids) == len(set(ids))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "0/0"])
def test_bad_shards_are_one_line(tmp_path, text):
    result = CliRunner().invoke(main, ["measure", "sweep", "--set", "device=cpu", "--shard", text,
                                       "-o", str(tmp_path / "r.jsonl"), "--dry-run"])
    assert result.exit_code == 2 and "--shard takes K/N" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_shard_runs_its_jobs_and_merges_by_id(tmp_path):
    args, ids = _sweep_args(tmp_path)
    output = tmp_path / "results.jsonl"
    first = _run_sweep([*args, "--shard", "1/2"], output, "error")
    assert first.returncode == 0, first.stderr
    assert [r["id"] for r in read_records(output)] == [ids[1]]
    assert "3 jobs (2 left to other shards)" not in first.stderr  # one shard of three jobs: 1 job
    assert "1 jobs (2 left to other shards): 0 already in the results file; ran 1 error" in first.stderr
    rest = _run_sweep(args, output, "error")
    assert [r["id"] for r in read_records(output)] == [ids[1], ids[0], ids[2]]
    assert "3 jobs: 1 already in the results file; ran 2 error" in rest.stderr


@pytest.mark.slow
def test_a_real_sweep_trains_every_job_in_its_own_process(tmp_path):
    args, ids = _sweep_args(tmp_path)
    output = tmp_path / "results.jsonl"
    done = _run_sweep([*args, "--set", "steps=3"], output, "")
    assert done.returncode == 0, done.stderr
    found = read_records(output)
    assert len(found) == 3 and {r["status"] for r in found} == {"ok"}
    assert all(isinstance(r["measured"]["peak_allocated"], int) for r in found)
    assert [r["predicted"]["trainable_params"] for r in found] == sorted(
        r["predicted"]["trainable_params"] for r in found)  # rank 1 < 2 < 4


# --- one sweep per results file; jobs end with their sweep ----------------------------------


def _start_sweep(args: list[str], output: Path, fault: str) -> subprocess.Popen:
    code = "import sys; from lora_planner.cli import main; main(sys.argv[1:], prog_name='lora-plan')"
    return subprocess.Popen([sys.executable, "-c", code, "measure", "sweep", *args, "-o", str(output),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, FAULT_ENV: fault}, cwd=ROOT)


def _until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, from /proc (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever adopted it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_two_sweeps_on_one_file_give_each_job_exactly_one_record(tmp_path):
    args, ids = _sweep_args(tmp_path)
    output = tmp_path / "results.jsonl"
    first = _start_sweep([*args, "--timeout", "3"], output, f"hang@{ids[1]},error")
    assert _until((tmp_path / ".results.jsonl.lock").exists), first.communicate()
    refused = _run_sweep(args, output, "error")
    assert refused.returncode == 2
    assert refused.stderr == (f"Error: {output} is in use by another sweep (pid {first.pid} on "
                              f"{os.uname().nodename}); wait for it to end, or pass --wait to start "
                              "when it does\n")
    waiting = _start_sweep([*args, "--wait"], output, "error")
    _, first_err = first.communicate(timeout=60)
    _, waiting_err = waiting.communicate(timeout=60)
    assert first.returncode == 0 and waiting.returncode == 0, (first_err, waiting_err)
    assert "3 jobs: 3 already in the results file; ran nothing" in waiting_err
    found = read_records(output)
    assert sorted(r["id"] for r in found) == sorted(ids)  # each job once, no false `error` twin
    assert [r["status"] for r in found] == ["error", "timeout", "error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "tiny.json"]


def test_kill_9_of_a_sweep_leaves_no_job_running(tmp_path):
    args, ids = _sweep_args(tmp_path)
    sweep_process = _start_sweep(args, tmp_path / "results.jsonl", f"hang@{ids[0]}")
    assert _until(lambda: _children(sweep_process.pid)), sweep_process.communicate()
    (job,) = _children(sweep_process.pid)
    time.sleep(0.5)  # past the job's start: it is hanging in its own session now
    assert _alive(job) and os.getpgid(job) == job != os.getpgid(sweep_process.pid)
    sweep_process.kill()
    sweep_process.communicate()
    assert _until(lambda: not _alive(job), 5), f"job {job} outlived its sweep"


def test_sigterm_kills_the_running_job_and_the_same_command_resumes(tmp_path):
    args, ids = _sweep_args(tmp_path)
    output = tmp_path / "results.jsonl"
    sweep_process = _start_sweep(args, output, f"error@{ids[0]},hang@{ids[1]}")
    assert _until(lambda: read_records(output) and _children(sweep_process.pid)), sweep_process.communicate()
    (job,) = _children(sweep_process.pid)
    sweep_process.terminate()
    _, err = sweep_process.communicate(timeout=20)
    assert sweep_process.returncode == 128 + 15
    assert err.strip().splitlines()[-1] == (
        "3 jobs: 0 already in the results file; ran 1 error; stopped by SIGTERM with 2 jobs not run: "
        "run the same command again to run them")
    assert not _alive(job)
    assert [r["id"] for r in read_records(output)] == [ids[0]]  # the killed job has no record
    resumed = _run_sweep(args, output, "error")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["id"] for r in read_records(output)] == ids


def test_ctrl_c_twice_kills_the_running_job_and_exits_130(tmp_path):
    import signal

    args, ids = _sweep_args(tmp_path)
    output = tmp_path / "results.jsonl"
    sweep_process = _start_sweep(args, output, f"hang@{ids[0]}")
    assert _until(lambda: _children(sweep_process.pid)), sweep_process.communicate()
    sweep_process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert sweep_process.poll() is None  # the first Ctrl-C waits for the running job
    sweep_process.send_signal(signal.SIGINT)
    _, err = sweep_process.communicate(timeout=20)
    assert sweep_process.returncode == 130
    lines = err.strip().splitlines()
    assert "stopping after the running job (Ctrl-C again kills it; it then runs again on resume)" in lines
    assert lines[-1].endswith("stopped by Ctrl-C with 3 jobs not run: run the same command again to run them")
    assert read_records(output) == []


def test_ctrl_c_stops_after_the_running_job_and_keeps_its_record(tmp_path):
    """A launcher that stands for a job during which the user presses Ctrl-C."""
    import signal

    args, ids = _sweep_args(tmp_path)
    jobs = sweep.expand({"fixed": sweep.parse_assignments(args[1:8:2], False), "grid": {"rank": [1, 2, 4]}})
    started = []

    def launcher(job, part, command, device, timeout):
        started.append(job.id)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs in the main thread meanwhile
        return sweep.Launch(1, "failed on purpose")

    output = tmp_path / "r.jsonl"
    before = signal.getsignal(signal.SIGINT)
    result = sweep.run_sweep(jobs, output, launcher=launcher, progress=False)
    assert started == [ids[0]] and [r["id"] for r in read_records(output)] == [ids[0]]
    assert result.stopped_by == signal.SIGINT and result.not_run == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler the sweep found is back
    assert result.summary().endswith("stopped by Ctrl-C with 2 jobs not run: run the same command again "
                                     "to run them")


def test_a_record_left_in_a_killed_sweeps_part_file_is_kept(tmp_path):
    args, ids = _sweep_args(tmp_path)
    jobs = sweep.expand({"fixed": sweep.parse_assignments(args[1:8:2], False), "grid": {"rank": [1, 2]}})
    output = tmp_path / "r.jsonl"
    left = {**record("x", 1, 1), "id": ids[1]}
    (tmp_path / f".r.jsonl.{ids[1]}.4242.part").write_text(json.dumps(left) + "\n")
    ran = []
    result = sweep.run_sweep(jobs, output, progress=False,
                             launcher=lambda job, *rest: ran.append(job.id) or sweep.Launch(1, ""))
    assert ran == [ids[0]] and result.skipped == 1
    assert sorted(r["id"] for r in read_records(output)) == sorted(ids[:2])
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("where, message", [(".", "is a folder"), ("/dev/full", "is not a regular file")])
def test_a_results_file_that_cannot_be_written_is_refused_before_any_job(tmp_path, where, message):
    args, _ = _sweep_args(tmp_path)
    output = tmp_path if where == "." else Path(where)
    result = CliRunner().invoke(main, ["measure", "sweep", *args, "-o", str(output), "--no-progress"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert message in result.output
