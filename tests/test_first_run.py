"""What a new user meets on a first run: flags that would do nothing say so, and each error names
its next step. Each case runs the real command (CliRunner), JSON parsed, exit code asserted."""

from __future__ import annotations

import sys

import pytest

from lora_planner.gpus import get_gpu
from tests.test_cli import plan_json, run

NEEDS_TOKENS = "time and cost need --tokens N (or --dataset-tokens N)"


def test_price_mfu_tflops_without_tokens_say_they_need_tokens():
    notes = plan_json("--model", "gpt2", "--price", "2", "--mfu", "0.3", "--tflops", "100")["notes"]
    line = [n for n in notes if NEEDS_TOKENS in n]
    assert line == ["--price, --mfu, --tflops given but time and cost need --tokens N "
                    "(or --dataset-tokens N); without it they are not planned"]
    table = run("--model", "gpt2", "--price", "2")
    assert table.exit_code == 0
    assert [x for x in table.output.splitlines() if NEEDS_TOKENS in x] == [
        "note: --price given but time and cost need --tokens N (or --dataset-tokens N); without it they "
        "are not planned"]
    markdown = run("--model", "gpt2", "--mfu", "0.3", "--format", "markdown")
    assert markdown.exit_code == 0 and NEEDS_TOKENS in markdown.output


@pytest.mark.parametrize("args", [("--price", "2", "--tokens", "1e6"),
                                  ("--price", "2", "--dataset-tokens", "1e6"), ()])
def test_no_tokens_note_when_tokens_are_given_or_nothing_is_unused(args):
    assert not any(NEEDS_TOKENS in n for n in plan_json("--model", "gpt2", *args)["notes"])


def test_gpu_mem_with_a_named_gpu_keeps_its_throughput_and_price():
    h100 = get_gpu("h100")
    sized = plan_json("--model", "8b", "--method", "lora", "--gpu", "h100", "--gpu-mem", "40GB",
                      "--tokens", "1e8")
    plain = plan_json("--model", "8b", "--method", "lora", "--gpu", "h100", "--tokens", "1e8")
    assert sized["gpu"]["name"] == h100.name
    assert sized["gpu"]["memory_bytes"] == 40 * 10**9
    assert sized["gpu"]["peak_tflops"] == h100.peak_tflops
    assert sized["gpu"]["price_per_hour"] == h100.price_per_hour
    # LoRA on 8B fits one GPU either way, so its time and cost are the full-size card's
    assert sized["plans"][0]["gpus_needed"] == plain["plans"][0]["gpus_needed"] == 1
    assert sized["plans"][0]["cost_usd"] == plain["plans"][0]["cost_usd"] is not None


def test_gpu_mem_alone_is_a_card_of_unknown_throughput():
    sized = plan_json("--model", "8b", "--method", "lora", "--gpu-mem", "40GB", "--tokens", "1e8")
    assert sized["gpu"]["name"] == "40GB GPU"
    assert (sized["gpu"]["peak_tflops"], sized["gpu"]["price_per_hour"]) == (None, None)
    assert sized["plans"][0]["cost_usd"] is None


@pytest.mark.parametrize("blocked, named", [(("torch", "safetensors"), "torch, safetensors"),
                                            (("safetensors",), "safetensors")])
def test_adapter_commands_name_every_missing_module(monkeypatch, tmp_path, blocked, named):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # as on a base install: the import fails
    adapter = tmp_path / "adapter_model.safetensors"
    adapter.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    result = run("adapter", "analyze", str(adapter))
    assert result.exit_code == 2, result.output
    assert result.output == (f"Error: adapter commands need torch and safetensors ({named} missing): "
                             "pip install 'lora-plan[measure]' (from a clone: pip install -e '.[measure]')\n")


@pytest.mark.parametrize("args, line", [
    (["70b"], "Error: Got unexpected extra argument (70b); did you mean --model 70b?"),
    (["plan", "--rank", "8", "Llama-3.1-8B"],
     "Error: Got unexpected extra argument (Llama-3.1-8B); did you mean --model Llama-3.1-8B?"),
    (["./my-model/config.json", "x"],
     "Error: Got unexpected extra arguments (./my-model/config.json x); did you mean --model "
     "./my-model/config.json?"),
    (["--model", "8b", "bananas"], "Error: Got unexpected extra argument (bananas)"),
])
def test_a_bare_model_name_suggests_the_model_option(args, line):
    result = run(*args)
    assert result.exit_code == 2
    assert result.output == line + "\n"


def test_an_unknown_target_lists_the_presets_too():
    result = run("--model", "llama-3.1-8b", "--targets", "all")
    assert result.exit_code == 2
    assert result.output == ("Error: target 'all' matches no module of llama-3.1-8b; linear layers are: "
                             "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj; "
                             "presets: default, qv, attn, mlp, all-linear\n")
