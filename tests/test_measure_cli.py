"""`lora-plan measure run`: one summary line (the record with --format json), the file appended,
every mistake one line."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from tests.measure_models import tiny_config_file, torch


def run(*args: str):
    return CliRunner().invoke(main, ["measure", "run", *args])


def test_run_prints_the_record_and_appends_it(tmp_path):
    output = tmp_path / "results.jsonl"
    adapter = tmp_path / "adapter"
    result = run("--model", tiny_config_file(tmp_path), "--method", "lora", "--rank", "2", "--targets",
                 "c_attn,c_fc", "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
                 "--save-adapter", str(adapter), "-o", str(output), "--format", "json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert json.loads(output.read_text()) == record
    assert record["status"] == "ok"
    assert record["settings"]["targets"] == ["c_attn", "c_fc"] and record["settings"]["rank"] == 2
    assert record["command"].startswith("lora-plan")
    assert isinstance(record["measured"]["peak_allocated"], int)
    assert record["predicted"]["peak"] > 0
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert "predicted peak" in result.stderr


def test_dropout_and_precision_mean_what_they_mean_in_the_plan(tmp_path):
    """--dropout sets every dropout of the model and --lora-dropout the adapters' (as in `plan`);
    --precision amp is the plan's autocast over fp32 weights."""
    result = run("--model", tiny_config_file(tmp_path), "--rank", "2", "--steps", "1", "--seq-len", "16",
                 "--device", "cpu", "--dropout", "0.0", "--lora-dropout", "0.1", "--precision", "amp",
                 "--amp-dtype", "fp16", "--no-grad-checkpointing", "--format", "json")
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["settings"]
    assert (settings["dropout"], settings["lora_dropout"]) == (0.0, 0.1)
    assert (settings["precision"], settings["amp_dtype"]) == ("amp", "fp16")
    assert settings["grad_checkpointing"] is False
    # no model dropout left: torch's CPU SDPA keeps its flash kernel (GPT-2's own 0.1 falls back to math)
    assert json.loads(result.stdout)["env"]["sdpa_backend"] != "math"
    # measure's former fp16 is amp in fp16 now: the choice list is the plan's
    refused = run("--precision", "fp16", "--device", "cpu")
    assert refused.exit_code == 2 and "'fp16' is not one of 'fp32', 'amp', 'mixed'" in refused.output


def test_run_prints_one_summary_line_by_default(tmp_path):
    output = tmp_path / "results.jsonl"
    result = run("--model", tiny_config_file(tmp_path), "--method", "lora", "--rank", "2", "--steps", "2",
                 "--seq-len", "16", "--device", "cpu", "-o", str(output))
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    record = json.loads(output.read_text())
    peak, error = record["measured"]["peak_allocated"], record["relative_error"]["peak_allocated"]
    assert line.startswith("ok: ") and " lora r=2, fp32, batch 1 x 16 tokens, 2 steps on cpu: " in line
    predicted = record["predicted"]["peak"]
    assert f"predicted peak {predicted:,} B, measured {peak:,} B ({100 * error:+.1f}%)" in line
    assert line.endswith(f"; appended to {output}") and result.stderr == ""


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt2-huge"], "unknown model 'gpt2-huge'"),
    (["--targets", "q_proj"], "matches no module"),
    (["--seq-len", "2048"], "longer than gpt2's 1024 positions"),
    (["--method", "full", "--save-adapter", "out"], "--save-adapter needs --method lora"),
    (["--data", "no-such-file.txt"], "no file at no-such-file.txt"),
    # `bf16` is the plan's: 16-bit weights without a master copy, which a plain torch loop does not run
    (["--precision", "bf16"], "a measured job runs precision fp32, amp"),
])
def test_run_mistakes_are_one_line_exit_2(args, message):
    result = run("--device", "cpu", "--steps", "1", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_line():
    result = run("--device", "cuda")
    assert result.exit_code == 2
    assert result.output.strip() == (f"Error: --device cuda: no CUDA device is available here "
                                     f"(torch {torch.__version__}); use --device cpu")


def test_help_teaches_with_examples():
    result = CliRunner().invoke(main, ["measure", "run", "--help"])
    assert result.exit_code == 0
    assert "lora-plan measure run --model gpt2 --method lora --rank 8" in result.output


@pytest.mark.parametrize("args, what", [
    (["measure", "run", "--device", "cpu"], "lora-plan measure run"),
    (["measure", "run"], "lora-plan measure run"),
    (["measure", "sweep", "--set", "device=cpu", "-o", "r.jsonl"], "lora-plan measure sweep"),
    (["measure", "sweep", "-o", "r.jsonl", "--dry-run"], "--device auto"),
    (["trace", "--model", "gpt2", "--layers", "1"], "lora-plan trace"),
    (["trace", "--model", "gpt2", "--fake"], "lora-plan trace"),
])
def test_base_install_names_the_extra_in_one_line(monkeypatch, tmp_path, args, what):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a base install: `import torch` fails
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output == (f"Error: {what} needs torch: pip install 'lora-plan[measure]' "
                             "(from a clone: pip install -e '.[measure]')\n")


def test_listing_a_cpu_grid_needs_no_torch(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    result = CliRunner().invoke(main, ["measure", "sweep", "--set", "device=cpu", "--grid", "rank=1,8",
                                       "-o", str(tmp_path / "r.jsonl"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 2


def test_an_oversized_cpu_job_is_refused_before_the_model_is_built():
    start = time.monotonic()
    result = run("--model", "llama-3.1-70b", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert time.monotonic() - start < 10
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "GB of host RAM available" in line and "--force" in line


def test_the_guard_compares_the_planned_peak_with_host_ram(tmp_path, monkeypatch):
    from lora_planner.measure import guard, job

    config = tiny_config_file(tmp_path)
    settings = job.Job.from_dict({"model": config, "steps": 1, "seq_len": 16})
    peak = job.predict(settings, job.model_spec(settings))["peak"]
    monkeypatch.setattr(guard, "host_available_bytes", lambda: peak - 1)
    refused = run("--model", config, "--device", "cpu", "--steps", "1", "--seq-len", "16")
    assert refused.exit_code == 2 and "exceeds the" in refused.output
    forced = run("--model", config, "--device", "cpu", "--steps", "1", "--seq-len", "16", "--force")
    assert forced.exit_code == 0, forced.output
    monkeypatch.setattr(guard, "host_available_bytes", lambda: peak)
    assert run("--model", config, "--device", "cpu", "--steps", "1", "--seq-len", "16").exit_code == 0


def test_host_ram_is_read_from_the_system():
    available = __import__("lora_planner.measure.guard", fromlist=["x"]).host_available_bytes()
    assert available is None or 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_run_does_not_print_transformers_default_loss_notice(tmp_path, monkeypatch):
    """transformers warns "`loss_type=None` was set in the config but it is unrecognized" for a model
    built from a config (the causal-LM loss is then used, the one meant); a run drops that notice."""
    import logging

    from transformers.utils import logging as hf_logging

    from lora_planner.measure.step import DefaultLossNotice

    logger = logging.getLogger("transformers.modeling_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    kept = [f for f in logger.filters if not isinstance(f, DefaultLossNotice)]
    monkeypatch.setattr(logger, "filters", kept)
    logger.addHandler(handler)
    try:
        hf_logging.warning_once.cache_clear()  # transformers warns once a process
        from tests.measure_models import tiny_model

        assert tiny_model().loss_function is not None  # the control: the notice as transformers prints it
        notice = "`loss_type=None` was set in the config but it is unrecognized"
        assert any(m.startswith(notice) for m in seen)
        seen.clear()
        hf_logging.warning_once.cache_clear()
        result = run("--model", tiny_config_file(tmp_path), "--rank", "2", "--steps", "1", "--seq-len", "16",
                     "--device", "cpu", "-o", str(tmp_path / "r.jsonl"))
        assert result.exit_code == 0, result.output
        assert not [m for m in seen if "loss_type" in m]
    finally:
        logger.removeHandler(handler)
