"""Checkpoint sizes against files really written by transformers and PEFT (tiny models)."""

from __future__ import annotations

import pytest

from lora_planner.gpus import get_gpu
from lora_planner.plan import plan_full, plan_lora
from lora_planner.spec import ModelSpec, TrainSetup

from .hf import hf_config, torch, transformers

peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

GPU = get_gpu("h100")

TINY = {
    "gpt2": ModelSpec(name="tiny-gpt2", family="gpt2", vocab_size=97, hidden_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=4, head_dim=8, intermediate_size=128,
                      tied_embeddings=True, max_positions=64, qkv_bias=True, out_bias=True,
                      mlp_bias=True),
    "llama": ModelSpec(name="tiny-llama", family="llama", vocab_size=101, hidden_size=32,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                       tied_embeddings=False, max_positions=64),
    "qwen2": ModelSpec(name="tiny-qwen2", family="qwen2", vocab_size=101, hidden_size=32,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                       tied_embeddings=True, max_positions=64, qkv_bias=True),
}


def build(spec: ModelSpec, task: str, dtype, num_labels: int = 2):
    config = hf_config(spec)
    config.num_labels = num_labels
    auto = (transformers.AutoModelForSequenceClassification if task == "seq-cls"
            else transformers.AutoModelForCausalLM)
    torch.manual_seed(0)
    return auto.from_config(config, dtype=dtype)


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("save_dtype", ["fp32", "bf16"])
def test_full_checkpoint_size_is_exact(tmp_path, family, save_dtype):
    spec = TINY[family]
    dtype = torch.float32 if save_dtype == "fp32" else torch.bfloat16
    build(spec, "causal-lm", dtype).save_pretrained(tmp_path)
    predicted = plan_full(spec, TrainSetup(method="full", save_dtype=save_dtype), GPU).checkpoint.bytes
    assert (tmp_path / "model.safetensors").stat().st_size == predicted


ADAPTER_SETUPS = [
    TrainSetup(rank=4, targets=("default",)),
    TrainSetup(rank=8, targets=("all-linear",), use_dora=True),
    TrainSetup(rank=2, targets=("attn",), bias="all"),
    TrainSetup(rank=4, targets=("default",), task="seq-cls", num_labels=3),
]


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("setup", ADAPTER_SETUPS, ids=["default", "dora", "bias-all", "seq-cls"])
def test_adapter_file_size_is_exact(tmp_path, family, setup):
    spec = TINY[family]
    model = build(spec, setup.task, torch.float32, setup.num_labels)
    from lora_planner.counts import expand_targets

    targets = expand_targets(spec, setup.targets)
    config = peft.LoraConfig(
        r=setup.rank, target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        bias=setup.bias, use_dora=setup.use_dora,
        task_type="SEQ_CLS" if setup.task == "seq-cls" else None,
    )
    peft.get_peft_model(model, config).save_pretrained(tmp_path)
    predicted = plan_lora(spec, setup.with_(precision="fp32"), GPU).checkpoint.bytes
    assert (tmp_path / "adapter_model.safetensors").stat().st_size == predicted

