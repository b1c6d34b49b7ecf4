"""Qwen3-MoE with dense layers among its sparse ones (`mlp_only_layers`, `decoder_sparse_step`): a
dense layer's MLP is a gated one of `intermediate_size`, the experts `moe_intermediate_size` wide.
Held to transformers (the layout of a meta-device build of random small configs), PEFT (trainable
counts of each preset) and traced CPU steps (activations byte for byte, the peak within 1%)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from lora_planner.architecture import layout
from lora_planner.counts import expand_targets, lora_trainable, total_params
from lora_planner.measure.fuzz import random_case, random_config
from lora_planner.spec import TrainSetup, spec_from_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.tracing import check_traced_case, one_thread  # noqa: E402, F401 (autouse: one thread)

from .hf import build_meta_from_config  # noqa: E402


def _mixed(config: dict, seed: int) -> dict:
    """`config` with three layers at least, some dense: layer 0 by `mlp_only_layers` (odd seeds) or
    every other layer by `decoder_sparse_step` 2 (even seeds), at a dense width of its own."""
    rng = random.Random(seed)
    config = {**config, "num_hidden_layers": max(config["num_hidden_layers"], 3),
              "intermediate_size": 8 * rng.randint(1, 12)}
    config.update(mlp_only_layers=[0]) if seed % 2 else config.update(decoder_sparse_step=2)
    return config


def _config(seed: int) -> dict:
    return _mixed(random_config(random.Random(seed), "qwen3_moe"), seed)


@pytest.mark.parametrize("seed", range(4))
def test_dense_layers_lay_out_as_transformers_builds(seed):
    config = _config(seed)
    spec = spec_from_hf_config(config)
    model = build_meta_from_config(config)
    sparse = {i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}
    assert spec.dense_layers and set(spec.dense_layers) == set(range(len(model.model.layers))) - sparse
    assert {p.name: p.shape for p in layout(spec).params} == {
        n: tuple(p.shape) for n, p in model.named_parameters()}
    assert total_params(spec) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("targets", ["default", "mlp", "all-linear", "attn", "gate"])
def test_presets_train_what_peft_trains(seed, targets):
    """PEFT reads gate_proj, up_proj and down_proj as the fused experts: the dense layers' gated
    MLPs, nn.Linear layers under those names, stay unwrapped."""
    config = _config(seed)
    spec = spec_from_hf_config(config)
    setup = TrainSetup(rank=4, targets=(targets,))
    names = expand_targets(spec, setup.targets)
    lora = peft.LoraConfig(r=4, target_modules="all-linear" if names == ("all-linear",) else list(names))
    with torch.device("meta"):
        wrapped = peft.get_peft_model(build_meta_from_config(config), lora)
    assert lora_trainable(spec, setup).count == wrapped.get_nb_trainable_parameters()[0]


def test_the_dense_width_default_is_the_config_classes():
    """Left out, the dense layers' `intermediate_size` is Qwen3MoeConfig's (and a config it saves names
    the experts `num_local_experts`)."""
    built = transformers.CONFIG_MAPPING["qwen3_moe"](hidden_size=256, num_hidden_layers=4, num_experts=4,
                                                     num_experts_per_tok=2,
                                                     decoder_sparse_step=2, vocab_size=1000)
    config = {k: v for k, v in built.to_dict().items() if k != "intermediate_size"}
    spec = spec_from_hf_config({**config, "pad_token_id": None})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(built)
    assert spec.dense_layers == (0, 2)
    assert total_params(spec) == sum(p.numel() for p in model.parameters())


# LoRA on every linear layer under autocast (more with -m slow; the fuzz sampler draws dense layers too)
@pytest.mark.parametrize("seed", [2] + [pytest.param(s, marks=pytest.mark.slow) for s in (1, 3, 4)])
def test_a_step_with_dense_layers_matches_its_trace(seed):
    case = random_case(seed, "qwen3_moe")
    check_traced_case(dataclasses.replace(case, config=_mixed(case.config, seed), layers=None))
