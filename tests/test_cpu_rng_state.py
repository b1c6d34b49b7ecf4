"""Checkpointing's saved CPU RNG states: planned on a CPU step, against torch and the allocator."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_planner.activations import cpu_rng_state_bytes
from lora_planner.cli import main
from lora_planner.measure.traced_step import predicted_step
from lora_planner.resolve import spec_from_hf_config
from lora_planner.spec import TrainSetup

CONFIG = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
          "max_position_embeddings": 128}


def test_the_state_is_the_size_torch_returns():
    torch = pytest.importorskip("torch")
    assert cpu_rng_state_bytes() == torch.get_rng_state().nbytes


@pytest.mark.parametrize("checkpointing", [False, True])
def test_only_a_checkpointed_cpu_step_holds_rng_states(checkpointing):
    """On a GPU the states are host memory; without checkpointing none is saved."""
    spec = spec_from_hf_config(CONFIG, name="tiny")
    setup = TrainSetup(method="full", precision="fp32", batch_size=2, seq_len=16,
                       grad_checkpointing=checkpointing)
    on_gpu = predicted_step(spec, setup, "cuda")[1]
    on_cpu = predicted_step(spec, setup, "cpu")[1]
    assert not any(p.untraced for p in on_gpu.phases)
    assert any(p.untraced for p in on_cpu.phases) == checkpointing
    assert all(p.untraced % cpu_rng_state_bytes() == 0 for p in on_cpu.phases)


def test_a_checkpointed_fp32_step_plans_the_allocators_rng_states(tmp_path):
    """A real checkpointed fp32 step under the profiler (fp32 matmuls make no workspace on CPU): the
    plan's peak is within 1% of the allocator's, the RNG states it counts at its peak are the ones the
    allocator saw made outside every op, and the tracer is held against the plan without them."""
    pytest.importorskip("transformers")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    result = CliRunner().invoke(main, ["trace", "--model", str(config), "--method", "full",
                                       "--batch-size", "2", "--seq-len", "16", "--grad-checkpointing",
                                       "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    planned, allocated = data["predicted"]["peak"], data["allocator_peak"]
    assert abs(planned - allocated) / allocated <= 0.01
    rng = sum(e["bytes"] for e in data["allocator_extra_by_op"] if e["op"].endswith("get_state"))
    assert rng > 0 and planned - data["predicted_tracer_peak"] == rng
    tracer_error = (data["predicted_tracer_peak"] - data["traced"]["peak"]) / data["traced"]["peak"]
    assert data["relative_error"]["peak"] == pytest.approx(tracer_error) and abs(tracer_error) <= 0.01
