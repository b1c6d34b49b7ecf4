"""Options that mean one thing: each combination answers in the format asked, says what it assumed,
and never drops what was asked for."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_planner import resolve
from lora_planner.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def plan_json(*args: str) -> dict:
    result = run(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-3.1-8B", "META-LLAMA/llama-3.1-8b",
                                    "mistralai/Mixtral-8x7B-v0.1"])
def test_catalog_hub_ids_are_answered_offline(hub_id, monkeypatch):
    def offline(repo, timeout=5.0):
        raise AssertionError(f"asked the hub for {repo}")

    monkeypatch.setattr(resolve, "fetch_hub_config", offline)
    data = plan_json("--model", hub_id, "--method", "lora")
    assert data["model"]["source"].lower() == hub_id.lower()
    by_name = plan_json("--model", data["model"]["name"], "--method", "lora")
    assert data == by_name
