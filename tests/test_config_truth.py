"""What a config.json says is what is planned: dropout, soft-caps, and which weights QLoRA quantises.

Each check asks an independent source: the transformers config class for defaults, the modules
transformers builds (on the meta device) for what bitsandbytes would replace.
"""

from __future__ import annotations

import json

import pytest

from lora_planner.catalog import get_model
from lora_planner.spec import spec_from_hf_config
from tests.test_cli import plan_json, run


def _activations(data: dict) -> int:
    return data["plans"][0]["memory_bytes"]["activations"]


def test_dropout_rates_default_as_transformers_config_classes_do():
    transformers = pytest.importorskip("transformers")
    for family in ("gpt2", "llama", "mistral", "qwen2", "gemma2", "phi3", "mixtral", "qwen3", "qwen3_moe",
                   "olmo2", "smollm3", "gemma3_text"):
        config = transformers.CONFIG_MAPPING[family]()
        attn, resid, embd = spec_from_hf_config({**config.to_dict(), "pad_token_id": None}).dropout_rates
        if family == "gpt2":
            assert (attn, resid, embd) == (config.attn_pdrop, config.resid_pdrop, config.embd_pdrop)
        else:
            assert attn == config.attention_dropout
        if family == "phi3":
            assert resid == config.resid_pdrop


def test_gpt2_config_without_dropout_plans_no_masks(tmp_path):
    config = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
              "n_positions": 1024, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    args = ("--method", "lora", "--seq-len", "512", "--attention", "eager")
    without = _activations(plan_json("--model", str(path), *args))
    catalog = _activations(plan_json("--model", "gpt2", *args))  # GPT-2's class default, 0.1
    assert without < catalog
    assert _activations(plan_json("--model", "gpt2", *args, "--dropout", "0")) == without
    assert _activations(plan_json("--model", str(path), *args, "--dropout", "0.1")) == catalog


def test_dropout_option_is_checked():
    result = run("--model", "gpt2", "--dropout", "1.5")
    assert result.exit_code == 2
    assert "--dropout" in result.output


def test_a_malformed_config_names_the_file_given(tmp_path):
    path = tmp_path / "my-model.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": "wide", "num_attention_heads": 4}))
    result = run("--model", str(path))
    assert result.exit_code == 2
    assert "my-model.json" in result.output
    assert "Traceback" not in result.output


def test_explain_peak_line_names_weights():
    result = run("--model", "8b", "--method", "full", "--explain")
    assert result.exit_code == 0
    line = next(x for x in result.output.splitlines() if x.strip().startswith("peak:"))
    assert "weights" in line and "optimizer states" in line


@pytest.mark.parametrize(("name", "whole", "quantised_below"),
                         [("mixtral-8x7b", 90e9, 30e9), ("qwen3-30b-a3b", 55e9, 20e9),
                          ("gpt-oss-20b", 38e9, 15e9)])
def test_moe_qlora_keeps_fused_experts_at_16_bit(name, whole, quantised_below):
    """bitsandbytes replaces nn.Linear modules; transformers' fused experts are not: the meta-device
    model says which parameters stay 16-bit."""
    torch = pytest.importorskip("torch")
    from tests.hf import build_meta

    spec = get_model(name)
    model = build_meta(spec)
    linear = {f"{path}.weight" for path, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and path != "lm_head"}
    dense = sum(p.numel() for path, p in model.named_parameters() if path not in linear)
    data = plan_json("--model", name, "--method", "qlora", "--precision", "bf16")
    assert data["plans"][0]["weights_bytes"]["weights_frozen"] == 2 * dense
    assert data["plans"][0]["memory_bytes"]["weights"] > whole
    quantised = plan_json("--model", name, "--method", "qlora", "--precision", "bf16",
                          "--quantize-experts")
    assert quantised["plans"][0]["memory_bytes"]["weights"] < quantised_below
    notes = " ".join(data["notes"])
    assert "bitsandbytes#1849" in notes


# the keys whose default the reader fills in itself, per family (the shapes it always needs)
READER_DEFAULTS = {"qwen3": ("head_dim", "num_key_value_heads"),
                   "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                 "norm_topk_prob", "head_dim"),
                   "olmo2": ("num_key_value_heads", "head_dim", "max_position_embeddings"),
                   "smollm3": ("no_rope_layers", "layer_types", "tie_word_embeddings",
                               "max_position_embeddings"),
                   "gpt_oss": ("num_local_experts", "num_experts_per_tok", "head_dim", "attention_bias",
                               "layer_types", "sliding_window", "max_position_embeddings",
                               "tie_word_embeddings"),
                   "gemma3_text": ("head_dim", "max_position_embeddings", "layer_types",
                                   "tie_word_embeddings", "attn_logit_softcapping",
                                   "final_logit_softcapping", "sliding_window"),
                   "deepseek_v3": ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                   "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                                   "moe_intermediate_size", "first_k_dense_replace", "n_shared_experts",
                                   "n_group", "topk_group", "norm_topk_prob", "head_dim",
                                   "num_key_value_heads")}


@pytest.mark.parametrize("family", sorted(READER_DEFAULTS))
def test_the_readers_defaults_are_the_config_classes(family):
    """The defaults the reader fills in (Qwen3's head_dim 128, Qwen3-MoE's experts and their width,
    OLMo 2's head_dim from hidden / heads) are the config class's: its default config, those keys
    left out, counts as transformers builds the class's default model (on the meta device)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lora_planner.counts import total_params

    # a hidden size whose hidden / heads is not Qwen3's head_dim 128, so that default shows
    built = transformers.CONFIG_MAPPING[family](hidden_size=1024)
    config = {k: v for k, v in built.to_dict().items() if k not in READER_DEFAULTS[family]}
    spec = spec_from_hf_config({**config, "pad_token_id": None})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(built)
    assert total_params(spec) == sum(p.numel() for p in model.parameters())
    assert spec.max_positions == built.max_position_embeddings


@pytest.mark.parametrize("pattern", [None, 1, 4])
def test_gemma3_layer_kinds_and_caps_are_its_config_classes(pattern):
    """Gemma 3's global layers (every `sliding_window_pattern`-th, 6 by default) and its soft-caps
    (none by default) as `Gemma3TextConfig` fills them in, from a config that leaves them out."""
    transformers = pytest.importorskip("transformers")
    stated = {} if pattern is None else {"sliding_window_pattern": pattern}
    built = transformers.CONFIG_MAPPING["gemma3_text"](num_hidden_layers=13, **stated)
    config = {k: v for k, v in built.to_dict().items()
              if k not in ("layer_types", "attn_logit_softcapping", "final_logit_softcapping")}
    spec = spec_from_hf_config({**config, **stated, "pad_token_id": None})
    kinds = built.layer_types
    assert spec.global_layers == tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")
    assert spec.attn_softcap == (built.attn_logit_softcapping is not None)
    assert spec.final_softcap == (built.final_logit_softcapping is not None)


# google/gemma-3-4b-pt's text_config as published (the rest are Gemma3TextConfig's defaults)
GEMMA3_4B_TEXT = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                  "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                  "sliding_window": 1024}


@pytest.mark.parametrize("text_config", [None, GEMMA3_4B_TEXT], ids=["class-default", "gemma-3-4b"])
def test_multimodal_gemma3_plans_its_language_model(text_config):
    """A multimodal Gemma 3 config.json (model_type gemma3) is planned as its language model: the
    parameters count as those of the text model and LM head transformers builds (on the meta
    device), without the vision tower."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lora_planner.counts import total_params

    stated = {} if text_config is None else {"text_config": text_config}
    built = transformers.CONFIG_MAPPING["gemma3"](**stated)
    spec = spec_from_hf_config(built.to_dict())
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(built)
    language = model.model.language_model
    head = 0 if model.lm_head.weight is language.embed_tokens.weight else model.lm_head.weight.numel()
    assert total_params(spec) == sum(p.numel() for p in language.parameters()) + head


def test_published_gemma3_4b_config_plans_as_its_catalog_entry():
    from lora_planner.catalog import get_model

    entry = get_model("gemma-3-4b")
    read = spec_from_hf_config({"model_type": "gemma3", "text_config": GEMMA3_4B_TEXT},
                               name=entry.name, source=entry.source)
    assert read == entry
