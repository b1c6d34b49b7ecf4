"""The GPU catalog as people type it, and a GPU known only by its memory: planned for memory, timed
only with --tflops. Time is checked against the wall-hours formula worked by hand from the JSON."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.gpus import MIB, get_gpu


def plan_json(*args: str) -> dict:
    result = CliRunner().invoke(main, ["plan", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("typed, name, mib", [
    ("A10G", "A10G-24GB", 23028), ("a10g", "A10G-24GB", 23028), ("L4", "L4-24GB", 23034),
    ("l40s", "L40S-48GB", 46068), ("RTX A6000", "RTX-A6000-48GB", 49140), ("rtx5090", "RTX-5090-32GB", 32607),
    ("B200", "B200-180GB", 183359), ("MI300X", "MI300X-192GB", 196592), ("H100", "H100-80GB", 81559)])
def test_catalog_names_ignore_case_and_memory_is_the_drivers_total(typed, name, mib):
    gpu = get_gpu(typed)
    assert gpu.name == name and gpu.memory_bytes == mib * MIB
    assert plan_json("--model", "gpt2", "--method", "lora", "--gpu", typed)["gpu"]["name"] == name


def test_a_gpu_given_by_its_memory_plans_no_time_or_cost_and_says_so():
    data = plan_json("--model", "gpt2", "--method", "lora", "--gpu-mem", "24GB", "--tokens", "1e8")
    assert data["gpu"]["peak_tflops"] is None and data["gpu"]["price_per_hour"] is None
    p = data["plans"][0]
    assert p["flops"] > 0 and p["wall_hours"] is None and p["cost_usd"] is None
    assert any("--tflops" in n for n in data["notes"])


def test_tflops_and_price_time_a_custom_gpu():
    data = plan_json("--model", "gpt2", "--method", "lora", "--gpu-mem", "24GB", "--tokens", "1e8",
                     "--tflops", "121", "--price", "0.5")
    p = data["plans"][0]
    hours = p["flops"] / (1 * 121e12 * 0.4) / 3600  # one GPU: gpt2 LoRA fits 24 GB
    assert p["num_gpus_for_time"] == 1
    assert p["wall_hours"] == pytest.approx(hours) and p["cost_usd"] == pytest.approx(hours * 0.5)
    assert not any("--tflops" in n for n in data["notes"])


def test_tflops_overrides_a_catalog_gpu():
    base = plan_json("--model", "gpt2", "--method", "lora", "--gpu", "l4", "--tokens", "1e8")
    faster = plan_json("--model", "gpt2", "--method", "lora", "--gpu", "l4", "--tokens", "1e8",
                       "--tflops", "242")
    assert faster["gpu"]["peak_tflops"] == 242
    assert faster["plans"][0]["wall_hours"] == pytest.approx(base["plans"][0]["wall_hours"] / 2)


def test_new_cards_have_no_invented_price():
    data = plan_json("--model", "gpt2", "--method", "lora", "--gpu", "b200", "--tokens", "1e8")
    assert data["plans"][0]["wall_hours"] > 0 and data["plans"][0]["cost_usd"] is None
    assert "HGX B200" in data["gpu"]["source"]
