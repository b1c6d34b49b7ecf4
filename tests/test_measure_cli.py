"""`lora-plan measure run`: the record on stdout, the file appended, every mistake one line."""

from __future__ import annotations

import json

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
                 "--save-adapter", str(adapter), "-o", str(output))
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


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt2-huge"], "unknown model 'gpt2-huge'"),
    (["--targets", "q_proj"], "matches no module"),
    (["--seq-len", "2048"], "longer than gpt2's 1024 positions"),
    (["--method", "full", "--save-adapter", "out"], "--save-adapter needs --method lora"),
    (["--data", "no-such-file.txt"], "no file at no-such-file.txt"),
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
