"""Differential fuzzing of the families added after the seeded suite: Qwen3 (per-head q/k norms),
Qwen3-MoE (those norms beside Mixtral's fused experts, with or without `norm_topk_prob`, dense
layers among them by `mlp_only_layers` or `decoder_sparse_step`), OLMo 2
(norms after each block only, q/k norms over the whole projection, fp32 rotary), SmolLM3 (Llama
with layers that skip the rotary embedding, and a sliding window on those) and Gemma 3 (Gemma-2's
sandwich norms with per-head q/k norms, sliding and global layers each with its own rotary
embedding, no attention soft-cap), GPT-OSS (eager attention with per-head sinks, its rotary
embedding over halves, fused experts with biases, top-k-then-softmax routing and the clamped SwiGLU),
DeepSeek-V3 (latent attention, dense layers first, shared experts beside fused routed ones, a grouped
sigmoid router) and GLM-4-MoE (that expert block beside Llama's attention with a partial rotary
embedding and optional q/k norms).

Each case is drawn by name (`random_case(seed, family)`), planned from its config.json and traced
from the same config by transformers, as in `test_fuzz.py`: activations byte for byte, the peak
within 1%. Two cases per family (DeepSeek-V3: three) run by default, the first 60 seeds of each
with `-m slow`.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from lora_planner.measure.fuzz import random_case  # noqa: E402
from tests.tracing import one_thread  # noqa: E402, F401 (autouse: traces run on one thread)

from .test_fuzz import PEAK_TOLERANCE, check  # noqa: E402

NEW_FAMILIES = ("qwen3", "qwen3_moe", "olmo2", "smollm3", "gemma3", "gpt_oss", "deepseek_v3", "glm4_moe")
# one LoRA case under autocast or a 16-bit model, one checkpointed or trained in full, per family
DEFAULT_SEEDS = {"qwen3": (6, 45),
                 # LoRA under autocast; full fine-tuning, checkpointed, with dense layers among sparse ones
                 "qwen3_moe": (2, 20), "olmo2": (15, 19), "smollm3": (20, 25),
                 # both with sliding and global layers, checkpointed: each rotary pair freed with its kind
                 "gemma3": (38, 25),
                 # LoRA on the fused experts (pure-bf16); LoRA under autocast, checkpointed
                 "gpt_oss": (56, 38),
                 # latent attention with and without the query bottleneck, dense layers first, shared
                 # experts; LoRA on the fused experts, and full fine-tuning with fp32 routers in bf16
                 "deepseek_v3": (25, 54, 14),
                 # half of each head rotating, q/k norms; checkpointed, and LoRA on experts and router
                 "glm4_moe": (11, 4)}


@pytest.mark.parametrize(("family", "seed"), [(f, s) for f in NEW_FAMILIES for s in DEFAULT_SEEDS[f]],
                         ids=lambda v: str(v))
def test_new_family_matches_its_trace(family, seed):
    check(random_case(seed, family), PEAK_TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "seed"), [(f, s) for f in NEW_FAMILIES for s in range(60)
                                              if s not in DEFAULT_SEEDS[f]], ids=lambda v: str(v))
def test_new_family_matches_its_trace_slow(family, seed):
    check(random_case(seed, family), PEAK_TOLERANCE)


def test_qwen3_moe_draws_both_router_forms():
    """The generator reaches both of Qwen3-MoE's routers: with and without `norm_topk_prob`."""
    drawn = {random_case(seed, "qwen3_moe").config["norm_topk_prob"] for seed in range(20)}
    assert drawn == {True, False}


def test_qwen3_moe_draws_dense_layers_both_ways():
    """The generator reaches Qwen3-MoE's dense layers by a list and by a step, and models without."""
    configs = [random_case(seed, "qwen3_moe").config for seed in range(40)]
    assert any(c.get("mlp_only_layers") for c in configs)
    assert any(c.get("decoder_sparse_step", 1) > 1 for c in configs)
    assert any(not c.get("mlp_only_layers") and c.get("decoder_sparse_step", 1) == 1 for c in configs)
