"""A LoRA rank above a module's size: PEFT accepts it and trains every parameter it makes, so the
plan counts it too (checked against PEFT on the same config.json) and says, for every such module
at once, that the rank there is wasted."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_planner.catalog import get_model
from lora_planner.cli import main
from lora_planner.counts import oversized_rank_note
from lora_planner.spec import TrainSetup


def plan_json(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# A small Mixtral whose router (4 experts) and k/v projections (1 kv head of 8) are narrower than
# rank 16: every kind of module PEFT wraps under all-linear has a size below the rank somewhere.
SMALL_MIXTRAL = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 256,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 1, "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
}


def peft_trainable(config: dict, rank: int) -> int:
    """PEFT's own trainable count for all-linear at `rank`, on the transformers model the config
    builds (meta device: shapes, no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    values = dict(config)
    hf_config = transformers.CONFIG_MAPPING[values.pop("model_type")](**values)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules="all-linear",
                                                             init_lora_weights=False))
    return wrapped.get_nb_trainable_parameters()[0]


def test_small_mixtral_rank_above_router_and_kv_equals_peft(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL_MIXTRAL))
    data = plan_json("--model", str(path), "--method", "lora", "--rank", "16", "--targets", "all-linear")
    assert data["plans"][0]["trainable_params"] == peft_trainable(SMALL_MIXTRAL, 16)
    note = next(n for n in data["notes"] if n.startswith("rank 16 is above"))
    assert "gate (64 -> 4)" in note and "k_proj (64 -> 8)" in note and "v_proj (64 -> 8)" in note


def test_mixtral_8x7b_all_linear_rank_16_equals_peft():
    """The router of Mixtral-8x7B has 8 outputs; PEFT wraps it at r=16 (lora_B is 8 x 16)."""
    from lora_planner.spec import to_hf_config

    data = plan_json("--model", "mixtral-8x7b", "--method", "lora", "--rank", "16", "--targets", "all-linear")
    assert data["plans"][0]["trainable_params"] == peft_trainable(to_hf_config(get_model("mixtral-8x7b")), 16)
    assert any(n.startswith("rank 16 is above the size of gate (4096 -> 8)") for n in data["notes"])


def test_rank_above_every_limit_is_planned_and_named_at_once():
    # llama-3.1-8b: q_proj/o_proj 4096 x 4096, k_proj/v_proj 4096 -> 1024
    data = plan_json("--model", "llama-3.1-8b", "--method", "lora", "--rank", "5000",
                     "--targets", "attn")
    (note,) = [n for n in data["notes"] if n.startswith("rank 5000")]
    for name in ("q_proj (4096 -> 4096)", "k_proj (4096 -> 1024)", "v_proj (4096 -> 1024)",
                 "o_proj (4096 -> 4096)"):
        assert name in note
    # A (r, in) + B (out, r) per layer, as PEFT makes them: r x (in + out)
    per_layer = 5000 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)
    assert data["plans"][0]["trainable_params"] == 32 * per_layer


def test_rank_within_every_module_has_no_note():
    spec = get_model("llama-3.1-8b")
    assert oversized_rank_note(spec, TrainSetup(method="lora", rank=1024, targets=("attn",))) is None
    assert oversized_rank_note(spec, TrainSetup(method="lora", rank=1025, targets=("attn",))) is not None
    data = plan_json("--model", "llama-3.1-8b", "--method", "lora", "--rank", "8")
    assert not [n for n in data["notes"] if "rank 8" in n]
