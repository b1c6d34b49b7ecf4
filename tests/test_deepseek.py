"""DeepSeek-V3 (`deepseek_v3`: multi-head latent attention, dense layers first, shared experts and a
grouped sigmoid router) and GLM-4-MoE (`glm4_moe`: the same expert block beside Llama's attention
with a partial rotary embedding and optional q/k norms), held to transformers (models built from
random small configs on the meta device) and PEFT (the trainable count of every preset), and the
catalog entries to their published shapes. Traced steps of random configs are in
tests/test_fuzz_families.py."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from lora_planner.architecture import layout
from lora_planner.catalog import get_model
from lora_planner.counts import expand_targets, lora_trainable
from lora_planner.measure.fuzz import random_case, random_config
from lora_planner.spec import TrainSetup, spec_from_hf_config

from .test_cli import plan_json, run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from .hf import build_meta_from_config  # noqa: E402

FAMILIES = ("deepseek_v3", "glm4_moe")


def _config(seed: int, sparse: bool = False, family: str = "deepseek_v3") -> dict:
    config = random_config(random.Random(seed), family)
    if sparse:  # at least one layer of routed experts
        layers = config["num_hidden_layers"]
        config["first_k_dense_replace"] = min(config["first_k_dense_replace"], layers - 1)
    return config


# a few seeds by default, more with -m slow
SEEDS = [0, 1] + [pytest.param(s, marks=pytest.mark.slow) for s in range(2, 12)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_configs_lay_out_as_transformers_builds(family, seed):
    """Every parameter's name and shape, for latent attention with and without the query's
    bottleneck, GLM's attention with and without q/k norms and biases, and 0 to all layers dense."""
    config = _config(seed, family=family)
    spec = spec_from_hf_config(config)
    model = build_meta_from_config(config)
    assert {p.name: p.shape for p in layout(spec).params} == {
        n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", SEEDS[:1] + SEEDS[2:8])
@pytest.mark.parametrize("targets", ["default", "qv", "attn", "mlp", "all-linear", "gate", "o_proj,k_proj"])
def test_presets_train_what_peft_trains(family, seed, targets):
    """PEFT maps the v4 expert names (gate_proj, up_proj, down_proj, gate) to the fused experts and
    the router: `mlp` and `all-linear` leave the dense layers' and shared experts' linear layers
    unwrapped, as PEFT does."""
    config = _config(seed, sparse=True, family=family)
    spec = spec_from_hf_config(config)
    if family == "deepseek_v3":  # latent attention has no k_proj
        targets = targets.replace("k_proj", "kv_a_proj_with_mqa")
    setup = TrainSetup(rank=4, targets=tuple(targets.split(",")))
    names = expand_targets(spec, setup.targets)
    lora = peft.LoraConfig(r=4, target_modules="all-linear" if names == ("all-linear",) else list(names))
    with torch.device("meta"):
        wrapped = peft.get_peft_model(build_meta_from_config(config), lora)
    assert lora_trainable(spec, setup).count == wrapped.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("pattern", [r".*shared_experts\.(gate|up|down)_proj",
                                     r".*layers\.0\.mlp\.(gate|up|down)_proj",
                                     r".*layers\.1\.self_attn\.o_proj", r".*\.kv_b_proj"])
def test_regex_targets_are_read_as_peft_reads_them(pattern):
    """On a model whose experts PEFT converts from v4 names, a regex is resolved to the last names of
    what it matches: a shared or dense MLP's name reaches the fused experts, one layer's o_proj
    every layer's."""
    config = _config(0, sparse=True)
    spec = spec_from_hf_config(config)
    with torch.device("meta"):
        wrapped = peft.get_peft_model(build_meta_from_config(config),
                                      peft.LoraConfig(r=4, target_modules=pattern))
    setup = TrainSetup(rank=4, targets=(f"re:{pattern}",))
    assert lora_trainable(spec, setup).count == wrapped.get_nb_trainable_parameters()[0]


def test_latent_attention_presets_follow_the_query_bottleneck():
    spec = get_model("deepseek-v3")
    assert expand_targets(spec, ("default",)) == ("q_a_proj", "q_b_proj", "kv_b_proj")
    assert expand_targets(spec, ("attn",)) == ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                               "o_proj")
    direct = spec_from_hf_config({**_config(0), "q_lora_rank": None})
    assert expand_targets(direct, ("qv",)) == ("q_proj", "kv_b_proj")


def test_the_generator_draws_each_form():
    """The fuzz cases reach both query forms, both rotary layouts, models with and without dense
    layers first and with every layer dense."""
    configs = [random_case(seed, "deepseek_v3").config for seed in range(30)]
    assert {c["q_lora_rank"] is None for c in configs} == {True, False}
    assert {c["rope_interleave"] for c in configs} == {True, False}
    dense = {min(c["first_k_dense_replace"], c["num_hidden_layers"]) / c["num_hidden_layers"]
             for c in configs}
    assert 0 in dense and 1 in dense and any(0 < d < 1 for d in dense)


def test_catalog_entry_is_the_published_shape():
    """deepseek-ai/DeepSeek-V3's config.json (as transformers' DeepseekV3Config defaults state it,
    with the published 163,840 positions) plans as the catalog entry, field for field."""
    published = {**transformers.DeepseekV3Config().to_dict(), "max_position_embeddings": 163840,
                 "pad_token_id": None}
    spec = spec_from_hf_config(published, name="deepseek-v3", source="deepseek-ai/DeepSeek-V3")
    entry = get_model("deepseek-v3")
    assert replace(spec, attn_dropout=None) == replace(entry, aliases=())
    assert get_model("deepseek-ai/DeepSeek-V3") is entry


@pytest.mark.parametrize(("key", "value", "says"), [
    ("num_key_value_heads", 1, "num_kv_heads must equal num_heads"),
    ("head_dim", 128, "must equal qk_rope_head_dim"),
    ("qk_rope_head_dim", 3, "must be even"),
    ("n_routed_experts", 3, "do not split into 2 groups"),
])
def test_a_bad_config_is_one_line(tmp_path, key, value, says):
    config = {**_config(1), key: value}
    if key == "qk_rope_head_dim":
        config["head_dim"] = value
    if key == "n_routed_experts":
        config.update(n_group=2, topk_group=1, num_experts_per_tok=1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = run("--model", str(path))
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output


def test_glm_catalog_entry_is_the_published_shape():
    """GLM-4.5-Air's config.json fields (as republished with PrimeIntellect/INTELLECT-3-Base, built on
    GLM-4.5-Air-Base) plan as the catalog entry, field for field: 106.85B parameters as transformers
    builds them, the 106B the model card states."""
    published = {"model_type": "glm4_moe", "attention_bias": True, "head_dim": 128, "hidden_size": 4096,
                 "partial_rotary_factor": 0.5, "intermediate_size": 10944, "max_position_embeddings": 131072,
                 "moe_intermediate_size": 1408, "norm_topk_prob": True, "num_attention_heads": 96,
                 "n_group": 1, "topk_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
                 "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
                 "num_hidden_layers": 46, "num_key_value_heads": 8, "tie_word_embeddings": False,
                 "use_qk_norm": False, "vocab_size": 151552}
    spec = spec_from_hf_config(published, name="glm-4.5-air", source="zai-org/GLM-4.5-Air")
    assert spec == replace(get_model("glm-4.5-air"), aliases=())


def test_glm_readers_defaults_are_the_config_class():
    """The defaults the reader fills in for GLM-4-MoE (experts, their width, dense layers, shared
    experts, the routing groups, the rotary half, no q/k norms) are Glm4MoeConfig's."""
    built = transformers.Glm4MoeConfig(hidden_size=1536, num_hidden_layers=3)
    left_out = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace",
                "n_shared_experts", "n_group", "topk_group", "norm_topk_prob", "partial_rotary_factor",
                "rope_parameters", "use_qk_norm", "max_position_embeddings")
    spec = spec_from_hf_config({k: v for k, v in built.to_dict().items() if k not in left_out})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(built)
    assert {p.name: p.shape for p in layout(spec).params} == {
        n: tuple(p.shape) for n, p in model.named_parameters()}
    head_dim = getattr(built, "head_dim", None) or built.hidden_size // built.num_attention_heads
    assert spec.rotary_dim == head_dim // 2


@pytest.mark.parametrize(("targets", "noted"), [("mlp", True), ("all-linear", True), ("default", False)])
def test_a_plan_says_what_the_mlp_targets_leave_frozen(targets, noted):
    data = plan_json("--model", "glm-4.5-air", "--method", "lora", "--targets", targets)
    says = [n for n in data["notes"] if "fused routed experts" in n]
    assert bool(says) == noted
    assert not says or "the dense layer's MLP and the shared experts stay frozen" in says[0]


def test_plan_answers_for_lora_and_qlora_and_says_the_base_is_fp8():
    data = plan_json("--model", "deepseek-v3", "--method", "lora,qlora", "--grad-checkpointing",
                     "--num-gpus", "32", "--sharding", "zero3")
    lora, qlora = data["plans"]
    assert lora["per_gpu_peak_bytes"] < 80e9 and lora["gpus_needed"] <= 32  # 671B over 32 GPUs
    assert lora["trainable_params"] == qlora["trainable_params"] > 0
    # QLoRA quantises the linear layers, not the fused experts or the fp32 routers
    assert 0 < qlora["memory_bytes"]["weights"] < lora["memory_bytes"]["weights"]
    assert any("FP8" in note for note in data["notes"])
