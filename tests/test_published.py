"""Figures that papers, model cards and back-of-envelope tables publish, reproduced exactly."""

from __future__ import annotations

from lora_planner.catalog import get_model
from lora_planner.counts import lora_linear_params, lora_trainable, total_params
from lora_planner.gpus import Gpu, get_gpu
from lora_planner.plan import make_plan, plan_full, plan_lora
from lora_planner.spec import DenseSize, TrainSetup
from lora_planner.units import parse_bytes

H100 = get_gpu("h100")


def test_gpt2_small_has_124_439_808_parameters():
    assert total_params(get_model("gpt2")) == 124_439_808


def test_peft_gpt2_c_attn_rank_8():
    plan = plan_lora(get_model("gpt2"), TrainSetup(rank=8, targets=("c_attn",)), H100)
    assert plan.trainable_params == 294_912
    assert plan.all_params == 124_734_720


def test_peft_gpt2_two_label_classifier_c_attn_c_proj():
    setup = TrainSetup(rank=8, targets=("c_attn", "c_proj"), task="seq-cls", num_labels=2)
    assert lora_trainable(get_model("gpt2"), setup).count == 812_544


def test_square_matrix_lora_is_2dr():
    assert lora_linear_params(768, 768, 8) == 12_288


def test_840_gb_for_a_70b_model_in_bf16():
    setup = TrainSetup(method="full", precision="bf16")
    plan = make_plan(DenseSize(70 * 10**9), (setup,), Gpu("80GB", parse_bytes("80GB"))).plans[0]
    memory = {k: t.bytes for k, t in plan.memory.items()}
    assert memory["weights"] == 140 * 10**9
    assert memory["gradients"] == 140 * 10**9
    assert memory["master_weights"] == 0
    assert memory["optimizer_states"] == 560 * 10**9
    assert memory["peak"] == 840 * 10**9
    # ceil(840 / 80) = 11 is a lower bound; the device allowance (CUDA context + 5% slack) pushes
    # 840 / 11 = 76.4 GB per GPU past 80 GB, so ZeRO-3 needs 12.
    assert plan.gpus_needed == 12 and plan.gpus_needed_strategy == "zero3"


def test_ten_full_16_bit_checkpoints_of_70b_take_1400_gb():
    setup = TrainSetup(method="full", precision="bf16", tasks=10)
    plan = make_plan(DenseSize(70 * 10**9), (setup,), H100).plans[0]
    assert plan.storage["full_copies"] == 1_400 * 10**9


def test_16_bytes_per_trainable_parameter_under_mixed_and_fp32():
    for precision in ("mixed", "fp32", "amp"):
        plan = plan_full(get_model("gpt2"), TrainSetup(method="full", precision=precision), H100)
        n = plan.trainable_params
        assert _model_states(plan) == 16 * n
    pure = plan_full(get_model("gpt2"), TrainSetup(method="full", precision="pure-bf16"), H100)
    assert _model_states(pure) == 8 * pure.trainable_params


def _model_states(plan) -> int:
    return sum(plan.memory[k].bytes for k in ("weights", "gradients", "master_weights", "optimizer_states"))


def test_1b_adapter_is_tens_of_megabytes_against_2_gb_of_base():
    setup = TrainSetup(method="lora", rank=8, targets=("all-linear",), precision="fp32", save_dtype="fp32")
    plan = plan_lora(get_model("llama-3.2-1b"), setup, H100)
    assert 10 * 10**6 < plan.checkpoint.bytes < 100 * 10**6
    base_16bit = plan_lora(get_model("llama-3.2-1b"), setup.with_(save_dtype="bf16"), H100)
    assert 2 * 10**9 < base_16bit.full_checkpoint_bytes < 3 * 10**9


def test_qlora_base_is_about_a_quarter_of_16_bit():
    spec = get_model("llama-3.1-8b")
    lora = plan_lora(spec, TrainSetup(method="lora"), H100)
    qlora = plan_lora(spec, TrainSetup(method="qlora"), H100)
    ratio = qlora.memory["weights"].bytes / lora.memory["weights"].bytes
    # Embeddings and the LM head stay 16-bit: 1.05B of Llama-3.1-8B's 8.03B parameters.
    assert 0.3 < ratio < 0.4


# Parameter totals of the published safetensors checkpoints (weights only, tied embeddings once).
PUBLISHED_TOTALS = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-405b": 405_853_388_800,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "gemma-2-27b": 27_227_128_320,
    "phi-3-mini": 3_821_079_552,
    "llama-2-7b": 6_738_415_616,
}


def test_published_checkpoint_totals():
    for name, expected in PUBLISHED_TOTALS.items():
        assert total_params(get_model(name)) == expected, name
