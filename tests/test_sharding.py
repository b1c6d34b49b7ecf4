"""Per-GPU model states under ZeRO / FSDP, against DeepSpeed's published estimators."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.errors import PlanError
from lora_planner.memory import Term
from lora_planner.sharding import Sharding, fewest_gpus, per_gpu_states, sharding_of

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


# Run-time buffers lora-plan adds under ZeRO-3 beyond what DeepSpeed's model-state estimator counts
# (the prefetch bucket, the persistent small parameters, the gradient reduce bucket).
LLAMA_8B_PARAMS = 8_030_261_248
RUNTIME_BUFFERS = ("zero3_prefetch", "zero3_persistent", "zero3_reduce_bucket")


def plan_entry(*args: str) -> dict:
    (p,) = plan_json(*args)["plans"]
    return p


@pytest.mark.parametrize("model", ["llama-3.1-8b", "gpt2", "qwen2.5-7b", "mistral-7b"])
@pytest.mark.parametrize("gpus", [2, 8, 64])
@pytest.mark.parametrize("sharding,offload", [("zero2", "optimizer"), ("zero2", "none"),
                                              ("zero3", "optimizer"), ("zero3", "optimizer+params"),
                                              ("zero3", "none")])
def test_full_fine_tuning_agrees_with_deepspeed_estimators(model, gpus, sharding, offload):
    """`mixed` full fine-tuning with AdamW against DeepSpeed's own
    `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (GPU half),
    given our parameter count and largest module.

    Where both count the same things the bytes agree to rounding (DeepSpeed truncates one product,
    we round each share up): ZeRO-2 with optimizer offload (2N), ZeRO-3 with optimizer offload
    (4L + 2N/n) or optimizer and parameter offload (4L), 4L being the largest module gathered at 16
    bits with its 16-bit gradient. Deliberate differences, both DeepSpeed's fp32 copy of the gradient
    shard, which it builds for the fp32 optimizer step and `mixed` (2 B weights, 2 B gradients, 4 B
    master, 8 B Adam) does not count: ZeRO-2 without offload 18N/n against our 14N/n (+ 4N/n);
    ZeRO-3 without offload DeepSpeed reuses the same 18 though the 16-bit weights are then sharded
    too, against our 16N/n (+ 2N/n). The run-time buffers (`RUNTIME_BUFFERS`) are not in DeepSpeed's
    estimate and are left out.
    """
    pytest.importorskip("deepspeed")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from lora_planner.architecture import layout
    from lora_planner.catalog import get_model

    arch = layout(get_model(model))
    n_params, largest = arch.total_params, max(m.numel for m in arch.modules)
    p = plan_entry("--model", model, "--method", "full", "--num-gpus", str(gpus), "--sharding", sharding,
                   "--offload", offload, "--stack", "torch")
    # DeepSpeed's Adam keeps its step count in Python, not as fused AdamW's per-tensor counters on
    # the device: plan the stack that has none
    ours = model_states_of(p) - sum(p["zero3_buffer_bytes"].get(k, 0) for k in RUNTIME_BUFFERS)
    cpu_offload = offload != "none"
    if sharding == "zero2":
        _, theirs = estimate_zero2_model_states_mem_needs(n_params, gpus, 1, cpu_offload)
        fp32_grad_copy = 0 if cpu_offload else 4 * n_params // gpus
    else:
        _, theirs, _ = estimate_zero3_model_states_mem_needs(n_params, largest, gpus, 1, cpu_offload,
                                                             offload == "optimizer+params")
        fp32_grad_copy = 0 if cpu_offload else 2 * n_params // gpus
    assert ours + fp32_grad_copy == pytest.approx(theirs, abs=8)


def model_states_of(p: dict) -> int:
    return sum(p["memory_bytes"][k] for k in STATE_KEYS)


def test_what_each_strategy_shards_under_lora():
    """LoRA: the frozen base is reduced only by ZeRO-3; ZeRO-1 shards the adapters' master weights
    and optimizer states, ZeRO-2 also their gradients."""
    args = ("--model", "llama-3.1-8b", "--method", "lora", "--num-gpus", "4")
    entries = {s: next(iter(plan_json(*args, "--sharding", s)["plans"]))
               for s in ("none", "zero1", "zero2", "zero3")}
    by = {s: e["memory_bytes"] for s, e in entries.items()}
    total = plan_json("--model", "llama-3.1-8b", "--method", "lora")["plans"][0]["memory_bytes"]
    # plain DDP: every term as on one GPU; the peak adds DDP's gradient buckets, one more copy of
    # the trained gradients
    for key in STATE_KEYS + ("activations",):
        assert by["none"][key] == total[key]
    assert by["none"]["peak"] == total["peak"] + total["gradients"]
    assert by["zero1"]["weights"] == by["zero2"]["weights"] == total["weights"]
    assert by["zero1"]["gradients"] == total["gradients"]
    assert by["zero2"]["gradients"] == -(-total["gradients"] // 4)
    for key in ("master_weights", "optimizer_states"):
        assert by["zero1"][key] == by["zero3"][key] == -(-total[key] // 4)
    buffers = entries["zero3"]["zero3_buffer_bytes"]
    assert buffers["zero3_live_params"] == 128_256 * 4_096 * 2  # the gathered embedding at 2 B
    # the frozen base is gathered without gradients; the bucket holds the adapters' 16-bit gradients
    assert buffers["zero3_reduce_bucket"] == min(4_096**2, total["gradients"] // 2) * 2
    gathered = buffers["zero3_live_params"] + buffers["zero3_prefetch"] + buffers["zero3_persistent"]
    assert by["zero3"]["weights"] == -(-total["weights"] // 4) + gathered


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_memory_is_per_gpu_and_min_gpus_are_consistent(strategy):
    args = ("--model", "llama-3.1-70b", "--method", "full", "--seq-len", "1024", "--sharding", strategy)
    plan = plan_json(*args, "--num-gpus", "16")
    (p,) = plan["plans"]
    assert plan["setup"]["sharding"] == strategy and plan["setup"]["num_gpus"] == 16
    n = p["gpus_needed"]
    assert p["gpus_needed_strategy"] == strategy
    assert p["fits"] == (n <= 16)
    assert n == p["min_gpus"][strategy]
    # the fit rule's verdict flips exactly at the reported count
    assert plan_json(*args, "--num-gpus", str(n))["plans"][0]["fits"]
    assert not plan_json(*args, "--num-gpus", str(n - 1))["plans"][0]["fits"]
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
    def phases(n: int) -> tuple[int, ...]:
        return (sum(t.bytes for t in per_gpu_states(memory, Sharding(n, "zero3")).values()),)

    # 5 replicated + ceil(10/n) + ceil(10/n) + ceil(7/n) <= 12 first holds at n = 5 (n = 4: 13).
    assert fewest_gpus(phases, 12, True) == 5
    assert fewest_gpus(phases, 5, True) is None
    assert fewest_gpus(phases, 12, False) is None  # replicated: one GPU or none


@pytest.mark.parametrize("args,fragment", [
    (("--num-gpus", "0"), "0"),
    (("--num-gpus", "2", "--offload", "optimizer"), "needs ZeRO"),
    (("--num-gpus", "2", "--sharding", "zero2", "--offload", "optimizer+params"), "needs --sharding zero3"),
    (("--num-gpus", "2", "--sharding", "fsdp", "--offload", "optimizer"), "CPUOffloadPolicy"),
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
    by = {s: plan_json(*args, "--sharding", s)["plans"][0]["memory_bytes"]
          for s in ("none", "zero1", "zero2", "zero3", "fsdp")}
    assert by["none"]["peak"] > by["zero1"]["peak"] > by["zero2"]["peak"] > by["zero3"]["peak"]
    assert by["zero2"]["peak"] > by["fsdp"]["peak"]
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
    ("fsdp", "none", ("sharded", "sharded", "sharded")),
    ("fsdp", "optimizer+params", ("cpu", "cpu", "cpu")),
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


@pytest.mark.parametrize("model", ["llama-3.1-8b", "gpt2", "qwen2.5-0.5b"])
def test_zero3_defaults_are_the_hugging_face_auto_values(model):
    """The ZeRO-3 knobs' defaults against transformers' own "auto" fill
    (`HfTrainerDeepSpeedConfig.trainer_config_finalize`) and DeepSpeed's default
    `stage3_max_live_parameters`; then each knob, set, moves its buffer as `--explain` says."""
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from lora_planner.catalog import get_model
    from lora_planner.sharding import zero3_settings
    from lora_planner.spec import TrainSetup

    spec = get_model(model)
    hf = HfTrainerDeepSpeedConfig({"zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto"}})
    hf.trainer_config_finalize(SimpleNamespace(get_warmup_steps=lambda n: 0),
                               SimpleNamespace(config=SimpleNamespace(hidden_size=spec.hidden_size)), 10)
    auto = hf.config["zero_optimization"]
    # the config registers itself globally: while it lives, transformers builds every model under
    # DeepSpeed's ZeRO-3 init, so later tests' models would be partitioned
    unset_hf_deepspeed_config()
    del hf
    z = zero3_settings(TrainSetup(), spec.hidden_size)
    assert z.reduce_bucket_size == auto["reduce_bucket_size"]
    assert z.prefetch_bucket_size == auto["stage3_prefetch_bucket_size"]
    assert z.param_persistence_threshold == auto["stage3_param_persistence_threshold"]
    assert z.max_live_parameters == DeepSpeedZeroConfig().max_live_parameters

    args = ("--model", model, "--method", "full", "--num-gpus", "8", "--sharding", "zero3")
    base = plan_entry(*args)["zero3_buffer_bytes"]
    set_ = plan_entry(*args, "--zero3-prefetch-bucket-size", "0", "--reduce-bucket-size", "1000",
                      "--zero3-param-persistence-threshold", "0")["zero3_buffer_bytes"]
    assert base["zero3_prefetch"] > 0 and set_["zero3_prefetch"] == 0
    assert set_["zero3_reduce_bucket"] == 1000 * 2 and set_["zero3_persistent"] == 0
    capped = plan_entry(*args, "--zero3-max-live-parameters", "1000")["zero3_buffer_bytes"]
    assert capped["zero3_prefetch"] == 0  # the largest module alone passes the cap; nothing prefetched


def test_the_gpu_count_search_reads_the_bytes_of_the_phases_the_plan_shows():
    """`step_phase_bytes_on_gpu` (what the fewest-GPU search reads) is the bytes of
    `step_phases_on_gpu` (what the plan shows), for seeded random setups, strategies and counts."""
    import random

    from lora_planner.catalog import get_model
    from lora_planner.gpus import get_gpu
    from lora_planner.plan import make_plan
    from lora_planner.precision import get_precision
    from lora_planner.sharding import OFFLOADS, STRATEGIES, step_phase_bytes_on_gpu, step_phases_on_gpu
    from lora_planner.spec import TrainSetup
    from lora_planner.stacks import resolve
    from lora_planner.step import predict_step

    rng = random.Random(16)
    for _ in range(24):
        spec = get_model(rng.choice(["gpt2", "qwen2.5-0.5b", "llama-3.2-1b", "gemma-2-2b", "mixtral-8x7b"]))
        setup = resolve(TrainSetup(method=rng.choice(["full", "lora", "qlora"]), rank=rng.choice([1, 8]),
                                   seq_len=rng.choice([128, 512]), grad_checkpointing=rng.random() < 0.5,
                                   reshard_after_forward=rng.random() < 0.5))
        memory = dict(make_plan(spec, (setup,), get_gpu("h100")).plans[0].memory)
        memory.pop("peak")
        precision = get_precision(setup.precision)
        predicted = predict_step(spec, setup, precision,
                                 {k: t.bytes for k, t in memory.items() if k != "activations"})
        for strategy in STRATEGIES:
            for offload in OFFLOADS:
                try:
                    sharding = Sharding(rng.choice([1, 2, 3, 8, 1 << 20]), strategy, offload)
                except PlanError:
                    continue  # a combination the planner refuses
                per_gpu = per_gpu_states(memory, sharding)
                shown = step_phases_on_gpu(predicted, per_gpu, sharding, spec, setup, precision)
                assert step_phase_bytes_on_gpu(predicted, per_gpu, sharding, spec, setup, precision) == \
                    tuple(p.bytes for p in shown), (spec.name, setup.method, strategy, offload)


@pytest.mark.parametrize("model, gpu", [("llama-3.1-70b", "h100"), ("llama-3.1-8b", "l4"),
                                        ("qwen2.5-7b", "rtx4090"), ("mixtral-8x7b", "a100-80gb"),
                                        # zero3 needs one GPU fewer than zero2 (full, batch 4 and 1)
                                        ("phi-3-mini", "l4"), ("gpt2-xl", "a10g")])
def test_the_fewest_only_search_finds_what_the_full_search_finds(model, gpu):
    """Advice's re-plans search GPU counts only as far as the fewest over the strategies (or under
    the chosen one): the fewest, its strategy, its peak, the verdict and every per-GPU term are the
    full search's, and each strategy it did search has the full search's count."""
    from lora_planner.catalog import get_model
    from lora_planner.gpus import get_gpu
    from lora_planner.plan import METHODS, make_plan
    from lora_planner.spec import TrainSetup

    spec, g = get_model(model), get_gpu(gpu)
    placements = ({}, {"num_gpus": 3, "sharding": "zero2"}, {"num_gpus": 2, "sharding": "zero3"},
                  {"num_gpus": 4, "sharding": "fsdp"},
                  {"num_gpus": 2, "sharding": "zero3", "offload": "optimizer"})
    for method in METHODS:
        for batch, checkpointing in ((1, False), (4, True), (16, False)):
            for placed in placements:
                setup = TrainSetup(method=method, rank=16, batch_size=batch, grad_checkpointing=checkpointing,
                                   **placed)
                full = make_plan(spec, (setup,), g).plans[0]
                fewest = make_plan(spec, (setup,), g, fewest_only=True).plans[0]
                read = lambda p: (p.fits, p.gpus_needed, p.gpus_needed_strategy,  # noqa: E731
                                  p.data_parallel.needed_peak, p.memory, p.per_gpu_peak, p.peak_phase)
                assert read(fewest) == read(full), setup
                searched = fewest.data_parallel.min_gpus_count
                assert searched == {s: full.data_parallel.min_gpus_count[s] for s in searched}
