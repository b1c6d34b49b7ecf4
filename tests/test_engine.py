"""The step engine (`lora_planner.engine`) held to real CPU steps: the allocator's peak and the
tracer's activations of steps transformers and PEFT run, not the planner's walk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_planner.engine import plan_step
from lora_planner.errors import PlanError
from lora_planner.measure.engine_check import compare, engine_case
from lora_planner.measure.fuzz import recorded_case
from lora_planner.measure.traced_step import sliced
from lora_planner.spec import TrainSetup, spec_from_hf_config

RECORDS = Path(__file__).resolve().parents[1] / "results/trace/fuzz-cpu-allocator.jsonl"
# Recorded cases the engine misses by more than 1%, each bounded (|error| rounded up to 0.5%): all
# pure-bf16 steps of a few dozen tokens whose bf16 matmul backward allocates an fp32 workspace on
# CPU (`allocator_extra_by_op`: mm, from oneDNN's scratchpad for this host), which no rule carries;
# their tracer-level peaks are within 0.1%.
KNOWN_MISSES = {84: 0.095, 308: 0.105, 582: 0.11, 774: 0.02, 884: 0.095, 956: 0.035, 1222: 0.095,
                1226: 0.025, 1236: 0.025, 1369: 0.045, 1443: 0.12, 1565: 0.03, 1583: 0.155, 1624: 0.085,
                1722: 0.05, 1971: 0.055, 2255: 0.095, 2265: 0.06, 2312: 0.075, 2787: 0.06, 2790: 0.025,
                2829: 0.06, 3154: 0.065, 3208: 0.08, 3544: 0.15, 3621: 0.055, 3756: 0.18, 3763: 0.06,
                3784: 0.11, 3928: 0.05, 3936: 0.025}
ISSUE_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 64, "n_layer": 2, "n_head": 4,
              "n_positions": 1024, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}


def _held(result: dict) -> None:
    assert abs(result["engine_vs_allocator"]) <= 0.01, result
    assert abs(result["engine_activations"] - result["activations"]) <= 0.005 * result["activations"], result


# a GPT-2 bf16 eager step and a Qwen2 fp32 eager step, both checkpointed; a Mistral LoRA bf16 SDPA step
FAST = (10, 13, 22)


@pytest.mark.parametrize("seed", FAST)
def test_engine_matches_the_cpu_allocator(seed):
    case = engine_case(seed)
    _held(compare(case.config, case.setup))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [s for s in range(60) if s not in FAST])
def test_engine_matches_the_cpu_allocator_sweep(seed):
    case = engine_case(seed)
    _held(compare(case.config, case.setup))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_layer_gpt2_sdpa_step_within_1pct_of_the_allocator(method):
    setup = TrainSetup(method=method, precision="fp32", batch_size=4, seq_len=256, attention="sdpa",
                       stack="torch")
    _held(compare(ISSUE_GPT2, setup))


def test_recorded_allocator_cases_replanned_by_the_engine():
    """Every recorded allocator case the engine models, re-planned (no torch): its activations
    byte-exact and its tracer-level peak within 0.1% of the recorded tracer's, its peak within 1% of
    the recorded allocator's, or within its bound in KNOWN_MISSES."""
    modelled = 0
    for line in RECORDS.read_text().splitlines():
        row = json.loads(line)
        case = recorded_case(row)
        spec = sliced(spec_from_hf_config(case.config, name=f"fuzz-{case.seed}"), case.layers)
        try:
            plan = plan_step(spec, case.setup)
        except PlanError:
            continue
        modelled += 1
        assert plan.activations == row["traced"]["activations"], case.label
        assert abs(plan.tracer_peak.seen - row["traced"]["peak"]) <= 0.001 * row["traced"]["peak"], case.label
        error = (plan.peak.bytes - row["allocator_peak"]) / row["allocator_peak"]
        assert abs(error) <= KNOWN_MISSES.get(case.seed, 0.01), (case.label, error)
    assert modelled >= 330


def test_unmodelled_steps_are_refused_in_one_line():
    spec = spec_from_hf_config({"model_type": "mixtral", "vocab_size": 64, "hidden_size": 16,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "intermediate_size": 8, "num_local_experts": 2, "num_experts_per_tok": 1})
    with pytest.raises(PlanError, match="dense pre-norm models so far"):
        plan_step(spec, TrainSetup(method="full", precision="fp32", stack="torch"))
