"""The families planned natively since Qwen3: asked for by catalog name, by hub id (offline) and by the
config.json their repositories publish, through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lora_planner.catalog import get_model
from lora_planner.spec import spec_from_hf_config

from .test_cli import plan_json, run

# Qwen/Qwen3-8B's config.json as published (token ids and generation keys included: they are read
# past, not refused)
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
# openai/gpt-oss-20b's config.json as published (its MXFP4 quantization_config included: read past)
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
                                                       "model.layers.*.mlp.router", "model.embed_tokens",
                                                       "lm_head"],
                            "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
    "use_cache": True, "vocab_size": 201088,
}

QWEN3_30B_A3B = {
    **QWEN3_8B, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_window_layers": 48, "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "mlp_only_layers": [], "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}


def test_qwen3_8b_lora_rank_16_trains_q_and_v():
    """PEFT's Qwen3 default targets q_proj and v_proj: per layer 16 x (4096 + 32 x 128) and
    16 x (4096 + 8 x 128), over 36 layers."""
    plan = plan_json("--model", "qwen3-8b", "--method", "lora", "--rank", "16")["plans"][0]
    assert plan["trainable_params"] == 36 * (16 * (4096 + 4096) + 16 * (4096 + 1024))
    assert plan["peak_phase"] in ("forward", "backward", "optimizer")


@pytest.mark.parametrize(("config", "name"), [(QWEN3_8B, "qwen3-8b"), (QWEN3_30B_A3B, "qwen3-30b-a3b"),
                                                 (GPT_OSS_20B, "gpt-oss-20b")])
def test_a_published_config_json_plans_as_its_catalog_entry(tmp_path, config, name):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    from_file = plan_json("--model", str(path), "--method", "lora,qlora", "--rank", "16")
    from_catalog = plan_json("--model", name, "--method", "lora,qlora", "--rank", "16")
    assert from_file["model"]["total_params"] == from_catalog["model"]["total_params"]
    for ours, theirs in zip(from_file["plans"], from_catalog["plans"], strict=True):
        assert ours["memory_bytes"] == theirs["memory_bytes"]
        assert ours["trainable_params"] == theirs["trainable_params"]


def test_the_catalog_entries_copy_their_published_configs():
    """The catalog's Qwen3 entries are what their config.json files say, field for field."""
    for config, name in [(QWEN3_8B, "qwen3-8b"), (QWEN3_30B_A3B, "qwen3-30b-a3b")]:
        entry = get_model(name)
        read = spec_from_hf_config(config, name=entry.name, source=entry.source)
        assert read.dropout_rates == entry.dropout_rates == (0.0, 0.0, 0.0)
        # the config states its attention dropout (0.0); the entry leaves the class default (also 0)
        assert replace(read, aliases=entry.aliases, attn_dropout=None) == entry


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B", "allenai/OLMo-2-1124-7B",
                                    "microsoft/phi-4", "meta-llama/Llama-3.3-70B-Instruct",
                                    "HuggingFaceTB/SmolLM3-3B", "google/gemma-3-1b-pt",
                                    "google/gemma-3-27b-pt"])
def test_a_catalog_hub_id_is_answered_offline(hub_id, monkeypatch):
    import lora_planner.resolve as resolve

    def offline(*_args, **_kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(resolve, "fetch_hub_config", offline)
    assert plan_json("--model", hub_id, "--method", "lora")["model"]["source"] == hub_id


def test_models_lists_the_new_entries():
    result = run("models")
    assert result.exit_code == 0
    names = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    assert {"qwen3-0.6b", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b", "olmo-2-7b",
            "llama-3.3-70b", "mistral-small-3.1-24b", "phi-4", "smollm3-3b", "gemma-3-1b", "gemma-3-4b",
            "gemma-3-12b", "gemma-3-27b"} <= names


@pytest.mark.parametrize(("key", "value"), [("mlp_only_layers", "0,1"), ("mlp_only_layers", [0, -1]),
                                            ("decoder_sparse_step", 0)])
def test_qwen3_moe_with_bad_dense_layers_is_refused_in_one_line(tmp_path, key, value):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**QWEN3_30B_A3B, key: value}))
    result = run("--model", str(path))
    assert result.exit_code == 2
    assert key in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
