"""Time and cost through the `plan` command: JSON keys, table rows, --explain, overrides, errors."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import plan_json, run

TIME_KEYS = ("flops", "wall_hours", "gpu_hours", "cost_usd")


def test_time_keys_are_null_without_tokens():
    for p in plan_json("--model", "gpt2")["plans"]:
        assert all(p[k] is None for k in TIME_KEYS)
        assert p["flops_per_token"] > 0


def test_time_and_cost_per_method():
    data = plan_json("--model", "8b", "--tokens", "1B", "--num-gpus", "8", "--gpu", "h100",
                     "--sharding", "zero3")
    gpu = data["gpu"]
    for p in data["plans"]:
        assert p["fits"]  # a step that does not fit on the 8 is not timed (test_cli_options)
        assert p["flops"] == p["flops_per_token"] * 10**9
        expected_wall = p["flops"] / (8 * gpu["peak_tflops"] * 1e12 * 0.4) / 3600
        assert p["wall_hours"] == pytest.approx(expected_wall)
        assert p["gpu_hours"] == pytest.approx(8 * p["wall_hours"])
        assert p["cost_usd"] == pytest.approx(p["gpu_hours"] * gpu["price_per_hour"])
    full, lora, qlora = data["plans"]
    # LoRA skips the base's weight gradients: about two thirds of full fine-tuning's FLOPs.
    assert 0.6 < lora["flops"] / full["flops"] < 0.75
    assert qlora["flops"] > lora["flops"]  # dequantisation
    assert data["workload"] == {"tokens": 10**9, "mfu": 0.4, "price_per_hour": None}


def test_dataset_tokens_times_epochs_equal_tokens():
    a = plan_json("--model", "gpt2", "--tokens", "3e6")
    b = plan_json("--model", "gpt2", "--dataset-tokens", "1M", "--epochs", "3")
    assert [p["flops"] for p in a["plans"]] == [p["flops"] for p in b["plans"]]


def test_gpus_for_time_default_to_the_fewest_that_fit():
    data = plan_json("--model", "70b", "--method", "full,lora", "--tokens", "1e6")
    for p in data["plans"]:
        assert p["num_gpus_for_time"] == p["gpus_needed"]


def test_mfu_and_price_overrides(tmp_path):
    base = plan_json("--model", "gpt2", "--method", "full", "--tokens", "1e9")["plans"][0]
    slower = plan_json("--model", "gpt2", "--method", "full", "--tokens", "1e9", "--mfu", "0.2")["plans"][0]
    assert slower["wall_hours"] == pytest.approx(2 * base["wall_hours"])
    priced = plan_json("--model", "gpt2", "--method", "full", "--tokens", "1e9", "--price", "1")["plans"][0]
    assert priced["cost_usd"] == pytest.approx(priced["gpu_hours"])
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"h100": 0.5, "a100": 9}))
    filed = plan_json("--model", "gpt2", "--method", "full", "--tokens", "1e9", "--price-file", str(prices))
    assert filed["plans"][0]["cost_usd"] == pytest.approx(0.5 * filed["plans"][0]["gpu_hours"])
    both = plan_json("--model", "gpt2", "--method", "full", "--tokens", "1e9", "--price-file", str(prices),
                     "--price", "2")
    assert both["plans"][0]["cost_usd"] == pytest.approx(2 * both["plans"][0]["gpu_hours"])


def test_table_and_explain_show_time_and_assumptions():
    out = run("--model", "8b", "--tokens", "1e9", "--num-gpus", "8").output
    for row in ("training FLOPs", "wall time", "GPU-hours", "cost (USD)",
                "min GPUs ddp/zero1/zero2/zero3/fsdp"):
        assert row in out
    assert "MFU 0.4" in out and "as of 2026-11" in out
    explain = run("--model", "8b", "--method", "lora", "--tokens", "1e9", "--explain").output
    assert "flops_per_token: 4 x " in explain and "wall_hours: " in explain


@pytest.mark.parametrize("args,fragment", [
    (("--tokens", "lots"), "cannot read --tokens"),
    (("--tokens", "1e9", "--dataset-tokens", "1e9"), "not both"),
    (("--epochs", "2"), "needs --dataset-tokens"),
    (("--tokens", "1e9", "--mfu", "0"), "--mfu must be in"),
    (("--tokens", "1e9", "--price", "-1"), "must not be negative"),
    (("--tokens", "1e9", "--price-file", "nowhere.json"), "no price file"),
])
def test_bad_time_options_are_one_line(args, fragment):
    result = run("--model", "gpt2", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.output
