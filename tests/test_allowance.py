"""The device allowance: named terms, every catalog GPU placed in a generation, one fit rule that
agrees with the planner's --fit search, and a fit that recovers the assumed terms from readings."""

from __future__ import annotations

import random

import pytest

from lora_planner import allowance
from lora_planner.gpus import GPUS, fits, get_gpu
from lora_planner.plan import make_plan
from lora_planner.resolve import resolve_model
from lora_planner.spec import TrainSetup


def test_every_catalog_gpu_has_a_generation():
    assert {g.name for g in GPUS} <= set(allowance.GPU_GENERATIONS)
    assert set(allowance.GPU_GENERATIONS.values()) <= set(allowance.GENERATIONS.values())


@pytest.mark.parametrize("capability, generation", [((9, 0), "hopper"), ((8, 0), "ampere"), ((8, 9), "ada"),
                                                     ((7, 5), "turing"), ((10, 3), "blackwell")])
def test_generation_from_compute_capability(capability, generation):
    assert allowance.generation_of(None, capability) == generation


def test_terms_add_up_and_the_plan_shows_them():
    spec = resolve_model("gpt2")
    plan = make_plan(spec, (TrainSetup(method="lora"),), get_gpu("a100")).plans[0]
    a = allowance.allowance(plan.memory["peak"].bytes, "A100-80GB")
    assert a.generation == "ampere" and a.total == a.context + a.cublas_workspaces + a.segments + a.cache
    assert plan.device_overhead.bytes == a.total
    for value in (a.context, a.cublas_workspaces, a.segments, a.cache):
        assert f"{value:,} B" in plan.device_overhead.formula
    # Hopper's cuBLAS workspace is about four times the other generations' (32 MiB against 8 MiB)
    assert allowance.cublas_workspace_bytes("hopper") > 3 * allowance.cublas_workspace_bytes("ampere")
    assert allowance.cublas_workspace_bytes("blackwell") == allowance.cublas_workspace_bytes("ampere")


@pytest.mark.parametrize("peak", [0, 1, 2**21 - 1, 2**21, 123_456_789])
def test_segments_round_the_peak_to_2_mib(peak):
    extra = allowance.allocator_segment_bytes(peak)
    assert (peak + extra - allowance.SMALL_SEGMENT - allowance.LARGE_SEGMENT) % (2 * 2**20) == 0
    assert 0 <= extra - allowance.SMALL_SEGMENT - allowance.LARGE_SEGMENT < 2 * 2**20


def test_the_fit_rule_agrees_with_the_planners_fit_search():
    """The plan's verdict and `gpus.fits` decide by the plan; `allowance.fits` by the three numbers."""
    rng = random.Random(7)
    spec = resolve_model("gpt2-medium")
    for _ in range(12):
        gpu = get_gpu(rng.choice(["t4", "l4", "a100-40gb", "h100"]))
        setup = TrainSetup(method=rng.choice(["full", "lora"]), batch_size=rng.choice([1, 8, 32, 64]),
                           seq_len=rng.choice([128, 512, 1024]))
        plan = make_plan(spec, (setup,), gpu).plans[0]
        by_numbers = allowance.fits(plan.memory["peak"].bytes, plan.device_overhead.bytes, gpu.memory_bytes)
        assert by_numbers == plan.fits == fits(plan.memory["peak"].bytes, gpu)


def test_fit_recovers_context_and_cache_fraction_from_noisy_readings():
    rng = random.Random(3)
    context, fraction = 431 * 2**20, 0.031
    points = []
    for _ in range(40):
        # NVML growth = context + what the allocator reserved: its peak (workspaces included),
        # segment rounding and the cache of freed blocks; plus a little noise
        peak = rng.randrange(10**8, 6 * 10**10)
        growth = context + peak + allowance.allocator_segment_bytes(peak) + int(fraction * peak) \
            + rng.randrange(-2**20, 2**20)
        points.append((peak, growth))
    fitted = allowance.fit_allowance(points, "ampere")
    assert fitted.context_bytes == pytest.approx(context, abs=4 * 2**20)
    assert fitted.cache_fraction == pytest.approx(fraction, abs=1e-4)
    assert allowance.fit_allowance(points[:1], "ampere") is None


@pytest.mark.parametrize("model, method", [("llama-3.1-70b", "full"), ("llama-3.1-70b", "lora"),
                                           ("llama-3.1-8b", "full")])
def test_the_allowance_is_on_one_of_the_gpus_the_plan_shows(model, method):
    """Without --num-gpus, a step that needs N GPUs gets its allowance on the peak of one of those N,
    the same as a plan made on N GPUs under that strategy says (not on one GPU holding it all)."""
    spec, gpu = resolve_model(model), get_gpu("h100")
    setup = TrainSetup(method=method, seq_len=2048)
    whole = make_plan(spec, (setup,), gpu).plans[0]
    assert whole.gpus_needed > 1 and not whole.fits
    on_n = make_plan(spec, (setup.with_(num_gpus=whole.gpus_needed, sharding=whole.gpus_needed_strategy),),
                     gpu).plans[0]
    assert on_n.fits
    assert whole.per_gpu_peak == on_n.memory["peak"].bytes
    assert whole.device_overhead.bytes == on_n.device_overhead.bytes \
        == allowance.allowance(on_n.memory["peak"].bytes, gpu.name).total
    assert whole.device_overhead.bytes < 0.1 * gpu.memory_bytes  # 70B full was 57.1 GB on one GPU


def test_a_step_on_one_gpu_keeps_its_allowance_on_its_peak():
    plan = make_plan(resolve_model("gpt2"), (TrainSetup(method="lora"),), get_gpu("h100")).plans[0]
    assert plan.fits and plan.per_gpu_peak == plan.memory["peak"].bytes
