"""FLOPs per token against torch's own FLOP counter, and hours and dollars from FLOPs.

`torch.utils.flop_counter.FlopCounterMode` counts the matmuls a real GPT-2 step dispatches (addmm,
mm, bmm, attention): an independent count of what `cost` predicts from shapes alone.
"""

from __future__ import annotations

import json

import pytest

from lora_planner import cost
from lora_planner.architecture import layout
from lora_planner.catalog import CATALOG
from lora_planner.counts import lora_trainable
from lora_planner.errors import PlanError
from lora_planner.gpus import GPUS, Gpu, get_gpu
from lora_planner.spec import TrainSetup, spec_from_hf_config
from lora_planner.step import input_gradient_skips

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BATCH, SEQ = 2, 16
TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 101, "n_positions": 32}
TARGETS = ("c_attn", "c_proj")


def counted_flops(lora_rank: int | None, grad_checkpointing: bool) -> int:
    """FLOPs torch counts for one forward and backward of a tiny GPT-2 on BATCH x SEQ tokens."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = transformers.GPT2Config(**{k: v for k, v in TINY.items() if k != "model_type"})
    model = transformers.GPT2LMHeadModel(config)
    if grad_checkpointing:
        # before PEFT, as a training script does: PEFT then makes the embedding output require grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_rank is not None:
        # a plain PEFT model: without checkpointing, no input gradient below the first adapter
        model = get_peft_model(model, LoraConfig(r=lora_rank, target_modules=list(TARGETS), lora_dropout=0.0))
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


def predicted_flops(lora_rank: int | None, grad_checkpointing: bool) -> int:
    spec = spec_from_hf_config(TINY)
    arch = layout(spec)
    n, head = cost.matmul_params(spec, arch), cost.head_matmul_params(arch)
    attention = cost.attention_forward_flops(spec, SEQ)
    if lora_rank is None:
        per_token = cost.full_flops_per_token(n, head, attention, grad_checkpointing)
    else:
        setup = TrainSetup(rank=lora_rank, targets=TARGETS, batch_size=BATCH, seq_len=SEQ,
                           grad_checkpointing=grad_checkpointing)
        trainable = lora_trainable(spec, setup)
        skipped, attention_skipped = input_gradient_skips(spec, setup)
        per_token = cost.lora_flops_per_token(n, head, trainable.adapter_count, trainable.saved_module_count,
                                              attention, grad_checkpointing, skipped, attention_skipped,
                                              spec.num_layers)
    return int(per_token.value) * BATCH * SEQ


@pytest.mark.parametrize("grad_checkpointing", [False, True])
@pytest.mark.parametrize("lora_rank", [None, 4])
def test_flops_per_token_match_torch_flop_counter(lora_rank, grad_checkpointing):
    assert predicted_flops(lora_rank, grad_checkpointing) == counted_flops(lora_rank, grad_checkpointing)


def test_lora_saves_the_frozen_weight_gradients():
    # Without the adapters the LoRA count is the full count less the base's weight gradients, 2N.
    spec = spec_from_hf_config(TINY)
    arch = layout(spec)
    n, head = cost.matmul_params(spec, arch), cost.head_matmul_params(arch)
    attention = cost.attention_forward_flops(spec, SEQ)
    full = cost.full_flops_per_token(n, head, attention, False).value
    bare = cost.lora_flops_per_token(n, head, 0, 0, attention, False).value
    assert full - bare == 2 * n


def test_matmul_params_of_a_mixture_count_active_experts_only():
    """Mixtral per layer: q, k, v, o, the router, and k of E experts (gate, up, down); plus the head."""
    spec = next(s for s in CATALOG if s.family == "mixtral")
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = 2 * h * q + 2 * h * kv + spec.num_experts * h \
        + spec.experts_per_token * 3 * h * spec.intermediate_size
    expected = spec.num_layers * per_layer + spec.vocab_size * h
    assert cost.matmul_params(spec, layout(spec)) == expected


def test_dequantisation_worked_example():
    """4 FLOPs x 1,000,000 NF4 weights x 2 passes (forward, backward) / 2,000 tokens = 4,000 per
    token; with checkpointing 3 passes: 6,000."""
    assert cost.dequant_flops_per_token(1_000_000, 2_000, False).value == 4_000
    assert cost.dequant_flops_per_token(1_000_000, 2_000, True).value == 6_000


def test_time_and_cost_follow_from_flops():
    """Worked: 100 FLOPs/token x 3.6e15 tokens = 3.6e17 FLOPs on 2 GPUs of 100 TFLOP/s at MFU 0.5
    take 3.6e17 / (2 x 1e14 x 0.5) = 3,600 s = 1 h: 2 GPU-hours, $5 at $2.50 (or $2 at $1)."""
    gpu = Gpu("test", 1, (), 100.0, 2.5)
    per_token = cost.Quantity("flops_per_token", 100, "")
    c = cost.training_time(per_token, 36 * 10**14, gpu, 2, cost.Workload(tokens=1, mfu=0.5))
    assert c.flops == 36 * 10**16
    assert c.wall_hours == pytest.approx(1.0)
    assert c.gpu_hours == pytest.approx(2.0)
    assert c.cost_usd == pytest.approx(5.0)
    priced = cost.training_time(per_token, 36 * 10**14, gpu, 2, cost.Workload(tokens=1, mfu=0.5,
                                                                               price_per_hour=1.0))
    assert priced.cost_usd == pytest.approx(2.0)


def test_catalog_has_throughput_and_source_for_every_gpu_and_the_old_prices():
    priced = {"H100-80GB", "H100-PCIe-80GB", "H200-141GB", "A100-80GB", "A100-40GB", "L4-24GB",
              "L40S-48GB", "RTX-4090-24GB", "RTX-3090-24GB", "V100-32GB", "V100-16GB", "T4-16GB"}
    added = {"A10G-24GB", "RTX-A6000-48GB", "RTX-5090-32GB", "B200-180GB", "MI300X-192GB"}
    assert priced | added <= {g.name for g in GPUS}
    for g in GPUS:
        assert g.peak_tflops and g.peak_tflops > 0 and g.source
        # a price only where one was always chosen; the cards added later have none
        assert (g.price_per_hour is not None and g.price_per_hour > 0) == (g.name in priced)
    assert get_gpu("h100-pcie").peak_tflops < get_gpu("h100-sxm").peak_tflops
    assert get_gpu("h100-pcie").memory_bytes == get_gpu("h100").memory_bytes


def test_training_tokens():
    assert cost.training_tokens(10, None, None) == 10
    assert cost.training_tokens(None, 1000, 3) == 3000
    assert cost.training_tokens(None, 1000, None) == 1000
    assert cost.training_tokens(None, None, None) is None
    with pytest.raises(PlanError, match="not both"):
        cost.training_tokens(10, 1000, 2)
    with pytest.raises(PlanError, match="needs --dataset-tokens"):
        cost.training_tokens(None, None, 2)


@pytest.mark.parametrize("name,text", [("p.json", json.dumps({"h100": 2.25, "A100-80GB": 1})),
                                       ("p.toml", 'h100 = 2.25\n"A100-80GB" = 1\n')])
def test_price_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert cost.load_prices(path) == {"H100-80GB": 2.25, "A100-80GB": 1.0}


@pytest.mark.parametrize("text,fragment", [('{"h1000": 2}', "unknown GPU"), ('{"h100": "two"}', "number"),
                                           ('{"h100": -1}', "number"), ("[1]", "maps GPU names"),
                                           ("{oops", "cannot read prices")])
def test_bad_price_file(tmp_path, text, fragment):
    path = tmp_path / "prices.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=fragment):
        cost.load_prices(path)
