"""Our LoRA layer: a no-op at init, exact merge/unmerge, the planner's counts, PEFT's file layout."""

from __future__ import annotations

import copy
import json

import pytest

from lora_planner.counts import lora_trainable
from lora_planner.errors import PlanError
from lora_planner.spec import TrainSetup, spec_from_hf_config
from tests.measure_models import tiny_model, tokens, torch, transformers

lora = pytest.importorskip("lora_planner.measure.lora")

TARGETS = [("default",), ("all-linear",), ("attn",), ("mlp",), ("c_fc",), (r"re:.*\.1\.attn\.c_attn",)]


def randomise_adapters(model, seed: int = 3) -> None:
    """Give B non-zero values, as training would, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("targets", [("default",), ("all-linear",)])
def test_wrapped_model_equals_base_at_init(targets):
    base = tiny_model()
    x = tokens()
    expected = base(input_ids=x).logits
    wrapped = copy.deepcopy(base)
    lora.inject(wrapped, targets, rank=4)
    assert lora.lora_layers(wrapped)
    assert (wrapped(input_ids=x).logits - expected).abs().max().item() == 0.0


def test_merge_then_unmerge_restores_weights_and_merged_logits_match():
    model = tiny_model()
    lora.inject(model, ("all-linear",), rank=4, alpha=8)
    randomise_adapters(model)
    x = tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged_logits = model(input_ids=x).logits
    lora.merge(model)
    assert any((model.state_dict()[k] - before[k]).abs().max() > 0 for k in before if "base_layer" in k)
    merged_logits = model(input_ids=x).logits
    assert (merged_logits - unmerged_logits).abs().max().item() < 1e-5
    lora.unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    assert (model(input_ids=x).logits - unmerged_logits).abs().max().item() < 1e-6


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_and_conv1d_give_the_same_update(rslora):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 20)
    conv = Conv1D(20, 12)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    a, b = lora.LoraLayer(linear, 3, 6.0, rslora=rslora), lora.LoraLayer(conv, 3, 6.0, rslora=rslora)
    with torch.no_grad():
        b.lora_A.weight.copy_(a.lora_A.weight)
        a.lora_B.weight.normal_()
        b.lora_B.weight.copy_(a.lora_B.weight)
    x = torch.randn(2, 5, 12)
    scale = 6.0 / 3**0.5 if rslora else 6.0 / 3
    by_hand = linear(x) + (x @ a.lora_A.weight.T @ a.lora_B.weight.T) * scale  # (B, T, out)
    torch.testing.assert_close(a(x), by_hand)
    torch.testing.assert_close(b(x), by_hand)
    assert b.delta_weight().shape == conv.weight.shape


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("rank", [1, 8])
def test_trainable_counts_equal_the_planners(targets, rank):
    model = tiny_model()
    lora.inject(model, targets, rank=rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    spec = spec_from_hf_config(model.config.to_dict())
    assert trainable == lora_trainable(spec, TrainSetup(method="lora", rank=rank, targets=targets)).count
    assert all(lora.is_lora_param(n) for n, p in model.named_parameters() if p.requires_grad)


def test_gpt2_small_on_meta_device_matches_published_count():
    """PEFT reports 294,912 trainable parameters for GPT-2 with r=8 on c_attn."""
    config = transformers.GPT2Config()
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    paths = lora.inject(model, ("c_attn",), rank=8)
    assert len(paths) == 12
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 294_912


def test_unknown_target_is_a_plan_error():
    with pytest.raises(PlanError, match="matches no module"):
        lora.inject(tiny_model(), ("q_proj",), rank=4)


def test_adapter_files_load_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model()
    ours = copy.deepcopy(base)
    lora.inject(ours, ("all-linear",), rank=4, alpha=8)
    randomise_adapters(ours)
    lora.save_adapter(ours, tmp_path, base_model="tiny-gpt2")

    config = json.loads((tmp_path / lora.ADAPTER_CONFIG).read_text())
    assert config["fan_in_fan_out"] is True and config["r"] == 4
    from safetensors import safe_open

    with safe_open(tmp_path / lora.ADAPTER_WEIGHTS, "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    # The names PEFT itself saves for the same LoraConfig.
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{
        k: config[k] for k in ("r", "lora_alpha", "target_modules", "fan_in_fan_out")}))
    assert keys == set(peft.get_peft_model_state_dict(reference))

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = tokens()
    expected = ours.eval()(input_ids=x).logits
    assert (loaded(input_ids=x).logits - expected).abs().max().item() < 1e-5
    assert (base(input_ids=x).logits - expected).abs().max().item() > 1e-3  # the adapter matters


def test_saved_adapter_files_follow_the_umask(tmp_path):
    import os

    model = tiny_model()
    lora.inject(model, ("all-linear",), rank=2)
    previous = os.umask(0o022)
    try:
        lora.save_adapter(model, tmp_path)
    finally:
        os.umask(previous)
    for name in (lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
