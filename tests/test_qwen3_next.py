"""Qwen3-Next (`qwen3_next`: gated-DeltaNet linear attention beside gated full attention, a routed
expert block with a gated shared expert), held to transformers (models built from random small configs
on the meta device), PEFT (the trainable count of every preset), the catalog entry to a meta-device
build of its config, and traced CPU steps of random configs (transformers' torch fallback of the
delta rule and the convolution: fla and causal_conv1d are not installed)."""

from __future__ import annotations

import random

import pytest

from lora_planner.architecture import layout
from lora_planner.catalog import get_model
from lora_planner.counts import expand_targets, lora_trainable
from lora_planner.measure.fuzz import random_case, random_config
from lora_planner.spec import TrainSetup, spec_from_hf_config, to_hf_config

from .test_cli import plan_json

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from .hf import build_meta, build_meta_from_config  # noqa: E402
from .tracing import one_thread  # noqa: E402,F401

SEEDS = [0, 1] + [pytest.param(s, marks=pytest.mark.slow) for s in range(2, 30)]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_configs_lay_out_as_transformers_builds(seed):
    """Every parameter's name and shape: linear and full layers in any order, value heads a multiple
    of key heads, partial rotary factors, dense layers among the sparse ones."""
    config = random_config(random.Random(seed), "qwen3_next")
    spec = spec_from_hf_config(config)
    model = build_meta_from_config(config)
    assert {p.name: p.shape for p in layout(spec).params} == {
        n: tuple(p.shape) for n, p in model.named_parameters()}
    # and the spec written back builds the same model
    assert layout(spec).total_params == sum(p.numel() for p in build_meta(spec).parameters())


@pytest.mark.parametrize("seed", SEEDS[:1] + SEEDS[2:8])
@pytest.mark.parametrize("targets", ["default", "qv", "attn", "mlp", "all-linear", "gate",
                                     "shared_expert_gate", "out_proj,k_proj"])
def test_presets_train_what_peft_trains(seed, targets):
    """PEFT converts Qwen3-Next's names as Qwen2-MoE's: gate_proj/up_proj/down_proj reach the fused
    experts only (the shared expert and dense MLPs stay unwrapped), `gate` the router; all-linear
    wraps the linear-attention projections and the shared expert's gate too."""
    config = random_config(random.Random(seed), "qwen3_next")
    config.pop("mlp_only_layers", None)
    config.pop("decoder_sparse_step", None)  # at least one sparse layer
    spec = spec_from_hf_config(config)
    setup = TrainSetup(rank=2, targets=tuple(targets.split(",")))
    names = expand_targets(spec, setup.targets)
    lora = peft.LoraConfig(r=2, target_modules="all-linear" if names == ("all-linear",) else list(names))
    with torch.device("meta"):
        wrapped = peft.get_peft_model(build_meta_from_config(config), lora)
    assert lora_trainable(spec, setup).count == wrapped.get_nb_trainable_parameters()[0]


def test_catalog_entry_counts_as_transformers_builds_it():
    """qwen3-next-80b-a3b: 79,674,391,296 parameters, the total published for this shape, equal to
    the meta-device build of its config (the checkpoint's mtp.* layer is not built)."""
    spec = get_model("qwen3-next-80b-a3b")
    config = to_hf_config(spec)
    assert config["layer_types"] == [
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(48)]
    model = build_meta_from_config(config)
    assert layout(spec).total_params == sum(p.numel() for p in model.parameters()) == 79_674_391_296


def test_catalog_entry_plans_lora_and_qlora_with_the_kernel_note():
    out = plan_json("--model", "Qwen/Qwen3-Next-80B-A3B-Instruct", "--method", "lora,qlora")
    assert [p["method"] for p in out["plans"]] == ["lora", "qlora"]
    assert any("flash-linear-attention" in n for n in out["notes"])


# (seed, activations bound, peak bound): the known misses of the walk against the CPU trace
TRACED = [(1, 0.002, 0.001)] + [pytest.param(*c, marks=pytest.mark.slow) for c in (
    (0, 0.013, 0.065), (2, 0.012, 0.07), (3, 0.015, 0.009))]


@pytest.mark.parametrize("seed,act,peak", TRACED)
def test_traced_steps_within_their_bounds(seed, act, peak):
    """Random Qwen3-Next steps planned, then traced on CPU: model states byte for byte, activations
    and the peak within each case's bound."""
    from lora_planner.measure.fuzz import real, run_case

    errors = run_case(real(random_case(seed, "qwen3_next"))).errors()
    for term in ("weights", "gradients", "optimizer_states"):
        assert errors[term] == 0, (seed, term, errors)
    assert abs(errors["activations"]) <= act, (seed, errors)
    assert abs(errors["peak"]) <= peak, (seed, errors)
