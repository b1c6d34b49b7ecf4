"""Per-GPU model states under ZeRO / FSDP, against DeepSpeed's published estimators."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.errors import PlanError
from lora_planner.memory import Term
from lora_planner.sharding import Sharding, min_gpus, per_gpu_states, sharding_of

STATE_KEYS = ("weights", "gradients", "master_weights", "optimizer_states")


def plan_json(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def model_states(plan: dict, method: str) -> int:
    """Per-GPU model-state bytes of one method (activations left out: DeepSpeed's estimators
    count model states only)."""
    p = next(p for p in plan["plans"] if p["method"] == method)
    return sum(p["memory_bytes"][k] for k in STATE_KEYS)


# DeepSpeed 0.19.8, deepspeed/runtime/zero/stage_1_and_2.py and stage3.py: the GPU half of
# `estimate_zero2_model_states_mem_needs` and `estimate_zero3_model_states_mem_needs`, transcribed.
def deepspeed_zero2_gpu(total_params: int, gpus: int, cpu_offload: bool) -> int:
    if cpu_offload:
        return 2 * total_params
    return 2 * total_params + int(18 * total_params / gpus)


def deepspeed_zero3_gpu(total_params: int, largest_layer_params: int, gpus: int, cpu_offload: bool,
                        cpu_offload_params: bool) -> int:
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload and cpu_offload_params:
        return largest_layer_memory
    if cpu_offload:
        return largest_layer_memory + int(2 * total_params / gpus)
    return largest_layer_memory + int(18 * total_params / gpus)


LLAMA_8B_PARAMS = 8_030_261_248
LLAMA_8B_LARGEST = 128_256 * 4_096  # the embedding (and the untied head): 525,336,576


@pytest.mark.parametrize("sharding,offload,deepspeed,fp32_grad_copy", [
    ("zero2", "optimizer", deepspeed_zero2_gpu(LLAMA_8B_PARAMS, 8, True), 0),
    ("zero3", "optimizer", deepspeed_zero3_gpu(LLAMA_8B_PARAMS, LLAMA_8B_LARGEST, 8, True, False), 0),
    ("zero3", "optimizer+params", deepspeed_zero3_gpu(LLAMA_8B_PARAMS, LLAMA_8B_LARGEST, 8, True, True), 0),
    ("zero2", "none", deepspeed_zero2_gpu(LLAMA_8B_PARAMS, 8, False), 4 * LLAMA_8B_PARAMS // 8),
    ("zero3", "none", deepspeed_zero3_gpu(LLAMA_8B_PARAMS, LLAMA_8B_LARGEST, 8, False, False),
     2 * LLAMA_8B_PARAMS // 8),
])
def test_full_fine_tuning_agrees_with_deepspeed(sharding, offload, deepspeed, fp32_grad_copy):
    """Llama-3.1-8B, full fine-tuning, `mixed` precision with AdamW, 8 GPUs: N = 8,030,261,248,
    largest module L = 525,336,576 (DeepSpeed's largest_layer_params: the embedding), N / 8 =
    1,003,782,656.

    Where both count the same things the bytes agree exactly:
    - ZeRO-2 + optimizer offload: DeepSpeed 2N = 16,060,522,496; ours: 16-bit weights 2N, gradient
      shards, master weights and Adam states on the CPU.
    - ZeRO-3 + optimizer offload: DeepSpeed 4L + 2N/8 = 2,101,346,304 + 2,007,565,312 =
      4,108,911,616; ours: weight shard 2N/8, plus the gathered layer, 2L of weights + 2L of gradient.
    - ZeRO-3 + optimizer and parameter offload: DeepSpeed 4L = 2,101,346,304; ours: the gathered layer.

    Deliberate differences, both DeepSpeed's fp32 copy of the gradient shard, which it builds for the
    fp32 optimizer step and which lora-plan's `mixed` convention (2 B weights, 2 B gradients, 4 B
    master, 8 B Adam) does not count:
    - ZeRO-2: DeepSpeed 2N + 18N/8 = 34,128,610,304, its comment splitting the 18 into 2 (16-bit
      grads) + 4 (fp32 grads) + 4 (fp32 params) + 8 (Adam); ours 2N + 14N/8 = 30,113,479,680. The
      difference is 4N/8 = 4,015,130,624.
    - ZeRO-3: DeepSpeed 4L + 18N/8 = 20,169,434,112 reuses the same 18 though the 16-bit weights are
      now sharded too (2 + 18 would be 20); ours 4L + 16N/8 = 18,161,868,800. The difference is
      2N/8 = 2,007,565,312.
    """
    # DeepSpeed's Adam keeps its step count in Python, not as fused AdamW's per-tensor counters on
    # the device: plan the stack that has none
    plan = plan_json("--model", "llama-3.1-8b", "--method", "full", "--num-gpus", "8",
                     "--sharding", sharding, "--offload", offload, "--stack", "torch")
    assert plan["model"]["total_params"] == LLAMA_8B_PARAMS
    assert model_states(plan, "full") + fp32_grad_copy == deepspeed


def test_deepspeed_worked_numbers():
    # The docstring's arithmetic, so a typo in the transcription cannot hide.
    assert deepspeed_zero2_gpu(LLAMA_8B_PARAMS, 8, False) == 34_128_610_304
    assert deepspeed_zero3_gpu(LLAMA_8B_PARAMS, LLAMA_8B_LARGEST, 8, False, False) == 20_169_434_112
    assert deepspeed_zero3_gpu(LLAMA_8B_PARAMS, LLAMA_8B_LARGEST, 8, True, False) == 4_108_911_616


def test_what_each_strategy_shards_under_lora():
    """LoRA: the frozen base is reduced only by ZeRO-3; ZeRO-1 shards the adapters' master weights
    and optimizer states, ZeRO-2 also their gradients."""
    args = ("--model", "llama-3.1-8b", "--method", "lora", "--num-gpus", "4")
    by = {s: next(iter(plan_json(*args, "--sharding", s)["plans"]))["memory_bytes"]
          for s in ("none", "zero1", "zero2", "zero3")}
    total = plan_json("--model", "llama-3.1-8b", "--method", "lora")["plans"][0]["memory_bytes"]
    assert by["none"] == total
    assert by["zero1"]["weights"] == by["zero2"]["weights"] == total["weights"]
    assert by["zero1"]["gradients"] == total["gradients"]
    assert by["zero2"]["gradients"] == -(-total["gradients"] // 4)
    for key in ("master_weights", "optimizer_states"):
        assert by["zero1"][key] == by["zero3"][key] == -(-total[key] // 4)
    largest = 128_256 * 4_096 * 2  # the gathered embedding at 2 B, no gradient (frozen)
    assert by["zero3"]["weights"] == -(-total["weights"] // 4) + largest


def test_memory_is_per_gpu_and_min_gpus_are_consistent():
    plan = plan_json("--model", "llama-3.1-70b", "--method", "full", "--num-gpus", "16", "--sharding", "fsdp")
    (p,) = plan["plans"]
    assert plan["setup"]["sharding"] == "zero3" and plan["setup"]["num_gpus"] == 16
    capacity = plan["gpu"]["memory_bytes"]
    n = p["gpus_needed"]
    assert (p["memory_bytes"]["peak"] <= capacity) == (n <= 16)
    assert n == p["min_gpus"]["zero3"]
    at_min = plan_json("--model", "llama-3.1-70b", "--method", "full", "--num-gpus", str(n),
                       "--sharding", "zero3")["plans"][0]["memory_bytes"]["peak"]
    below = plan_json("--model", "llama-3.1-70b", "--method", "full", "--num-gpus", str(n - 1),
                      "--sharding", "zero3")["plans"][0]["memory_bytes"]["peak"]
    assert at_min <= capacity < below
    # Below ZeRO-3 every GPU keeps all 16-bit weights, 141 GB, more than one H100 holds.
    assert p["min_gpus"]["none"] is p["min_gpus"]["zero1"] is p["min_gpus"]["zero2"] is None
    eight_b = plan_json("--model", "8b", "--method", "full")["plans"][0]["min_gpus"]
    assert eight_b["none"] is None and eight_b["zero1"] >= eight_b["zero2"] >= eight_b["zero3"] >= 2


def test_offload_reports_cpu_bytes():
    plan = plan_json("--model", "8b", "--method", "full", "--num-gpus", "8", "--sharding", "zero2",
                     "--offload", "optimizer", "--stack", "torch")  # no fused step counters
    (p,) = plan["plans"]
    # Each rank holds its shard of gradients (2 B), master weights (4 B) and Adam (8 B).
    assert p["cpu_offload_bytes"] == 14 * LLAMA_8B_PARAMS // 8
    assert p["memory_bytes"]["gradients"] == p["memory_bytes"]["optimizer_states"] == 0


def test_transform_is_pure_and_rounds_up():
    memory = {"weights": Term("weights", 10, "w"), "gradients": Term("gradients", 10, "g"),
              "master_weights": Term("master_weights", 0, "m"),
              "optimizer_states": Term("optimizer_states", 7, "o"),
              "activations": Term("activations", 5, "a")}
    out = per_gpu_states(memory, Sharding(3, "zero3"))
    assert {k: t.bytes for k, t in out.items()} == {"weights": 4, "gradients": 4, "master_weights": 0,
                                                    "optimizer_states": 3, "activations": 5}
    assert memory["weights"].bytes == 10  # input untouched
    peak = lambda m, _sharding: sum(t.bytes for t in m.values())  # noqa: E731
    # 5 replicated + ceil(10/n) + ceil(10/n) + ceil(7/n) <= 12 first holds at n = 5 (n = 4: 13).
    assert min_gpus(memory, Sharding(1, "zero3"), 12, None, peak) == 5
    assert min_gpus(memory, Sharding(1, "zero3"), 5, None, peak) is None


@pytest.mark.parametrize("args,fragment", [
    (("--sharding", "zero3"), "need --num-gpus"),
    (("--num-gpus", "0"), "at least 1"),
    (("--num-gpus", "2", "--offload", "optimizer"), "needs ZeRO"),
    (("--num-gpus", "2", "--sharding", "zero2", "--offload", "optimizer+params"), "needs --sharding zero3"),
])
def test_bad_sharding_is_one_line(args, fragment):
    result = CliRunner().invoke(main, ["--model", "gpt2", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.output


def test_sharding_of_without_gpus():
    assert sharding_of(None, "none", "none") is None
    with pytest.raises(PlanError):
        sharding_of(None, "zero1", "none")


def test_one_gpu_without_sharding_is_the_single_gpu_plan():
    args = ("--model", "8b", "--seq-len", "1024")
    alone = plan_json(*args)["plans"]
    on_one = plan_json(*args, "--num-gpus", "1")["plans"]
    for a, b in zip(alone, on_one, strict=True):
        assert a["memory_bytes"] == b["memory_bytes"] and a["peak_phase"] == b["peak_phase"]


def test_step_peak_per_gpu_shrinks_with_sharding_but_keeps_activations():
    args = ("--model", "8b", "--method", "full", "--seq-len", "1024", "--num-gpus", "8")
    by = {s: plan_json(*args, "--sharding", s)["plans"][0]["memory_bytes"] for s in ("none", "zero1", "zero2",
                                                                                     "zero3")}
    assert by["none"]["peak"] > by["zero1"]["peak"] > by["zero2"]["peak"] > by["zero3"]["peak"]
    assert len({m["activations"] for m in by.values()}) == 1  # data parallel: a whole micro-batch each
    for m in by.values():
        assert m["peak"] >= m["weights"] + m["activations"]


@pytest.mark.parametrize("strategy,offload,expected", [
    ("none", "none", ("replicated", "replicated", "replicated")),
    ("zero1", "none", ("replicated", "replicated", "sharded")),
    ("zero2", "none", ("replicated", "sharded", "sharded")),
    ("zero3", "none", ("sharded", "sharded", "sharded")),
    ("zero1", "optimizer", ("replicated", "replicated", "cpu")),
    ("zero2", "optimizer", ("replicated", "cpu", "cpu")),
    ("zero3", "optimizer+params", ("cpu", "cpu", "cpu")),
])
def test_placement_table(strategy, offload, expected):
    """The table in `sharding`'s docstring: weights, gradients, master weights and optimizer states."""
    from lora_planner.sharding import placement

    s = Sharding(4, strategy, offload)
    got = (placement("weights", s), placement("gradients", s), placement("optimizer_states", s))
    assert got == expected
    assert placement("master_weights", s) == got[2] and placement("activations", s) == "replicated"


def test_help_teaches_scale_options():
    out = CliRunner().invoke(main, ["plan", "--help"]).output
    for word in ("--num-gpus", "--sharding", "fsdp", "--offload", "--tokens", "--dataset-tokens", "--epochs",
                 "--mfu", "--price", "--price-file", "lora-plan --model 8b --tokens 1e9 --num-gpus 8"):
        assert word in out, word
