"""Options that mean one thing: each combination answers in the format asked, says what it assumed,
and never drops what was asked for."""

from __future__ import annotations

import json

import pytest

from lora_planner import resolve
from tests.test_cli import plan_json, run


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


def test_explain_in_json_is_inside_the_json_and_matches_the_text():
    plain = plan_json("--model", "gpt2", "--rank", "8")
    explained = plan_json("--model", "gpt2", "--rank", "8", "--explain")
    entries = explained.pop("explain")
    assert explained == plain  # the plan itself is unchanged
    assert [(e["method"], e["rank"]) for e in entries] == [(p["method"], p["rank"]) for p in plain["plans"]]
    # the same terms as the text derivation, method by method
    text = run("--model", "gpt2", "--rank", "8", "--explain").output
    for entry in entries:
        label = entry["method"] if entry["rank"] is None else f"{entry['method']} r={entry['rank']}"
        block = text.split(f"[{label}]\n", 1)[1].split("\n\n", 1)[0]
        assert [line.removeprefix("  ") for line in block.splitlines()] == entry["terms"]
        assert any(t.startswith("peak: ") for t in entry["terms"])


def test_explain_in_markdown_follows_the_table():
    out = run("--model", "gpt2", "--method", "lora", "--format", "markdown", "--explain").output
    table, section = out.split("## How each term is computed", 1)
    assert "| trainable params" in table
    assert "### lora r=8" in section and "```text\ntrainable: 294,912 in 12 wrapped modules" in section


def test_explain_has_no_csv_form():
    result = run("--model", "gpt2", "--format", "csv", "--explain")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--explain has no CSV form" in result.output


def test_csv_carries_the_fit():
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(run("--model", "gpt2", "--format", "csv", "--fit").output)))
    fits = plan_json("--model", "gpt2", "--fit")["plans"]
    assert [(int(r["max_batch_size"]), int(r["max_seq_len"])) for r in rows] == [
        (p["fit"]["max_batch_size"], p["fit"]["max_seq_len"]) for p in fits]
    assert "max_batch_size" not in run("--model", "gpt2", "--format", "csv").output


def test_sharding_without_num_gpus_plans_each_method_on_its_fewest():
    auto = plan_json("--model", "70b", "--rank", "8", "--sharding", "fsdp")
    counts = [p["min_gpus"]["fsdp"] for p in plan_json("--model", "70b", "--rank", "8")["plans"]]
    assert [p["gpus_needed"] for p in auto["plans"]] == counts and all(p["fits"] for p in auto["plans"])
    assert auto["notes"][0].startswith("memory is per GPU: no --num-gpus, so each method is planned on "
                                       "the fewest GPUs that fit under fsdp")
    assert not any(n.startswith("memory is per GPU: one of") for n in auto["notes"])
    for p, n in zip(auto["plans"], counts, strict=True):
        given = plan_json("--model", "70b", "--rank", "8", "--method", p["method"], "--sharding", "fsdp",
                          "--num-gpus", str(n))["plans"][0]
        assert given["memory_bytes"] == p["memory_bytes"]
        fewer = plan_json("--model", "70b", "--rank", "8", "--method", p["method"], "--sharding", "fsdp",
                          "--num-gpus", str(n - 1))["plans"][0] if n > 1 else None
        assert fewer is None or not fewer["fits"]
    table = run("--model", "70b", "--rank", "8", "--sharding", "fsdp").output
    assert table.count("GPUs planned") == 1


def test_a_plan_that_does_not_fit_is_not_timed_or_priced():
    out = run("--model", "70b", "--rank", "8", "--num-gpus", "16", "--tokens", "1e9").output
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert rows["fits on 16 (peak + allowance)"].split()[-3:] == ["no", "no", "no"]
    assert rows["wall time"].count("does not fit on 16") == 3
    assert "$" not in rows["cost (USD)"] and " h" not in rows["GPU-hours"]
    lines = out.splitlines()
    assert lines.index(rows["fits on 16 (peak + allowance)"]) < lines.index(rows["wall time"])
    fits = run("--model", "70b", "--rank", "8", "--num-gpus", "16", "--sharding", "zero3",
               "--method", "qlora", "--tokens", "1e9").output
    assert "h on 16" in fits and "$" in fits
    explain = run("--model", "70b", "--rank", "8", "--num-gpus", "16", "--tokens", "1e9", "--explain").output
    assert explain.count("wall_hours: none: the step does not fit on 16 GPU(s)") == 3
    for p in plan_json("--model", "70b", "--rank", "8", "--num-gpus", "16", "--tokens", "1e9")["plans"]:
        assert (p["fits"], p["timed"], p["wall_hours"], p["gpu_hours"], p["cost_usd"]) == (
            False, False, None, None, None)
        assert p["flops"] > 0  # the work is still counted; only its time on these GPUs is withheld
    priced = plan_json("--model", "70b", "--rank", "8", "--num-gpus", "16", "--sharding", "zero3",
                       "--method", "qlora", "--tokens", "1e9")["plans"][0]
    assert priced["timed"] and priced["wall_hours"] > 0 and priced["cost_usd"] > 0


@pytest.mark.parametrize(("args", "where"), [
    ((), "one GPU"),
    (("--num-gpus", "8", "--sharding", "zero3"), "one of 8 GPUs, zero3"),
])
def test_fit_rows_say_which_gpus_they_mean(args, where):
    out = run("--model", "gpt2", "--method", "lora", "--fit", *args).output
    assert f"largest batch at 1024 tokens ({where})" in out
    assert f"longest sequence at batch 1 ({where})" in out


@pytest.mark.parametrize(("targets", "line"), [
    ((), "default LoRA targets for llama: q_proj, v_proj"),
    (("--targets", "all-linear"), "LoRA targets: all-linear (every linear layer but the output head)"),
    (("--targets", "attn"), "LoRA targets: q_proj, k_proj, v_proj, o_proj (--targets attn)"),
])
def test_header_names_the_targets_used(targets, line):
    out = run("--model", "8b", *targets).output
    assert line in out.splitlines()
    if targets:
        assert "default LoRA targets" not in out


def test_choices_are_read_in_any_case():
    lower = plan_json("--model", "gpt2", "--method", "lora,qlora", "--precision", "bf16", "--optimizer",
                      "adamw", "--attention", "eager", "--stack", "trl", "--sharding", "zero3",
                      "--num-gpus", "2", "--units", "GiB")
    mixed = plan_json("--model", "GPT2", "--method", "LoRA,QLoRA", "--precision", "BF16", "--optimizer",
                      "AdamW", "--attention", "Eager", "--stack", "TRL", "--sharding", "ZeRO3",
                      "--num-gpus", "2", "--units", "gib")
    assert mixed == lower and mixed["setup"]["precision"] == "bf16"
    assert run("--model", "gpt2", "--format", "JSON").output.startswith("{")


def test_lora_dropout_is_planned_and_shown():
    plain = plan_json("--model", "gpt2", "--method", "full,lora")
    dropped = plan_json("--model", "gpt2", "--method", "full,lora", "--lora-dropout", "0.1")
    assert dropped["setup"]["lora_dropout"] == 0.1 and plain["setup"]["lora_dropout"] == 0.0
    full, lora = (p["memory_bytes"]["activations"] for p in dropped["plans"])
    assert full == plain["plans"][0]["memory_bytes"]["activations"]  # no adapter, no LoRA dropout
    assert lora > plain["plans"][1]["memory_bytes"]["activations"]
    result = run("--model", "gpt2", "--lora-dropout", "1")
    assert result.exit_code == 2


def test_every_subcommand_reads_choices_in_any_case():
    # measure run checks its choices before it needs the model: an unknown model is the first error
    result = run("measure", "run", "--device", "CPU", "--method", "LoRA", "--model", "gpt2-huge")
    assert result.exit_code == 2 and "unknown model 'gpt2-huge'" in result.output
    assert json.loads(run("models", "--format", "JSON").output)[0]["name"] == "gpt2"
