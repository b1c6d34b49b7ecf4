"""Differential fuzzing: random small architectures of every family, planned from their config.json,
against a traced step built by transformers from the same config (`lora_planner/measure/fuzz.py`).

Every case must trace the activations byte for byte and the peak within 1%. The cases the fuzzer
found wrong and fixed are kept below as named regressions, each with the config that exposed it. A
case still missed is listed in `fuzz_known.json` with its own bounds and reason, so a regression
beyond them fails.

The default run traces five random seeds (`DEFAULT_SEEDS`); the other seeds and the named
regressions are marked slow (`pytest -m slow`).
"""

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from lora_planner.measure.fuzz import Case, random_case, random_config, run_case  # noqa: E402
from lora_planner.spec import FAMILIES, TrainSetup, spec_from_hf_config  # noqa: E402
from tests.tracing import one_thread  # noqa: E402, F401 (autouse: traces run on one thread)

PEAK_TOLERANCE = 0.01


# Misses the fuzzer found and not yet fixed, one bound per seed (from the recorded run of seeds
# 0-3999, results/trace/fuzz-cpu.jsonl, each |error| rounded up): `fuzz_known.json` gives the seed's
# case, its peak bound, its activation bound (0: exact; every seed is exact now) and why. None
# remains beyond the tests' tolerances; the file stays so a new miss is bounded, not hidden.
# `python benchmarks/fuzz_models.py --seeds 0:4000 --known tests/fuzz_known.json` rewrites the list.
KNOWN: dict[int, dict] = {int(k): v for k, v in
                          json.loads((Path(__file__).parent / "fuzz_known.json").read_text()).items()}
SLOW_TOLERANCE = 0.02  # the independent check: every family within 2%


def check(case: Case, tolerance: float = PEAK_TOLERANCE, activations: float = 0.0) -> None:
    result = run_case(case)
    errors = result.errors()
    assert abs(errors["activations"]) <= activations, (case.label, errors)
    for term in ("weights", "gradients", "optimizer_states"):
        assert abs(errors[term]) <= 0.05, (case.label, term, errors)
    assert abs(errors["peak"]) <= tolerance, (case.label, errors["peak"], result.predicted_phase,
                                               result.traced_phase)


def _bounds(seed: int, tolerance: float) -> tuple[float, float]:
    known = KNOWN.get(seed)
    return (max(known["peak"], tolerance), known["activations"]) if known else (tolerance, 0.0)


# The seeds the default run traces, between them: Mistral LoRA over a bf16 base under checkpointing
# (fake tensors), Gemma-2 full pure-bf16 with eager attention, GPT-2 LoRA under autocast with SDPA,
# Qwen2 LoRA over a bf16 base with checkpointing, Mixtral LoRA on every linear (its experts) under
# autocast with checkpointing. The grid's default cases (test_step_grid.py) cover the rest.
DEFAULT_SEEDS = (9, 47, 14, 46, 38)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s in DEFAULT_SEEDS else pytest.mark.slow)
                                  for s in range(60)], ids=lambda s: f"seed{s}")
def test_random_architecture_matches_its_trace(seed):
    check(random_case(seed), *_bounds(seed, PEAK_TOLERANCE))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(60, 4000), ids=lambda s: f"seed{s}")
def test_random_architecture_matches_its_trace_slow(seed):
    check(random_case(seed), *_bounds(seed, SLOW_TOLERANCE))


# --- regressions the fuzzer found, each with the config that showed it ---------------------------

def _regression(config: dict, layers: int | None = None, fake: bool = False, **setup) -> Case:
    return Case(seed=0, config=config, setup=TrainSetup(**setup), layers=layers, fake=fake)


TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 117, "n_embd": 12, "n_layer": 3, "n_head": 4,
             "n_positions": 128, "tie_word_embeddings": True, "attn_pdrop": 0.0, "embd_pdrop": 0.0}


@pytest.mark.slow
def test_pure_bf16_lora_keeps_adapters_in_bf16():
    """PEFT upcast 16-bit adapters to fp32 (and a mocked `.to` left them fp32): the trace realised a
    different precision from the one planned (-17% activations)."""
    check(_regression({"model_type": "llama", "vocab_size": 331, "hidden_size": 27, "num_hidden_layers": 2,
                       "num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 105,
                       "max_position_embeddings": 128, "tie_word_embeddings": True, "pad_token_id": None,
                       "bos_token_id": None, "eos_token_id": None, "head_dim": 4, "mlp_bias": True},
                      fake=True, method="lora", rank=4, targets=("attn",), precision="pure-bf16",
                      seq_len=40))


@pytest.mark.slow
def test_checkpointed_autocast_caches_weight_copies_until_the_loss():
    """Under checkpointing the 16-bit weight copies autocast caches are not saved but live until
    forward ends; GPT-2's sdpa was also planned as the math kernel without any attention dropout."""
    check(_regression(TINY_GPT2, method="full", precision="amp", seq_len=39, grad_checkpointing=True))


@pytest.mark.slow
def test_cpu_layer_norm_statistics_are_bf16_under_pure_bf16():
    check(_regression({**TINY_GPT2, "n_embd": 33, "n_layer": 1, "n_head": 3, "n_inner": 67,
                       "tie_word_embeddings": False}, fake=True, method="full", precision="pure-bf16",
                      batch_size=3, seq_len=11, dropout=0.0))


@pytest.mark.slow
def test_checkpointed_lora_keeps_the_embedding_leaf_and_its_gradient():
    """PEFT makes the embedding output a leaf under checkpointing: it and its gradient outlive
    backward, into the optimizer step."""
    check(_regression({"model_type": "mistral", "vocab_size": 187, "hidden_size": 36, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 75,
                       "max_position_embeddings": 128, "tie_word_embeddings": True, "pad_token_id": None,
                       "bos_token_id": None, "eos_token_id": None, "head_dim": 10, "sliding_window": None},
                      method="lora", rank=8, targets=("all-linear",), precision="pure-bf16", seq_len=19,
                      grad_checkpointing=True))


@pytest.mark.slow
def test_mlp_backward_frees_what_the_down_projection_kept():
    """GPT-2's eager softmax runs in the scores' dtype, and the down projection's LoRA input and the
    output dropout's mask are gone before the MLP's backward peak (+11% before)."""
    check(_regression({**TINY_GPT2, "vocab_size": 190, "n_embd": 40, "n_layer": 1, "attn_pdrop": 0.25,
                       "embd_pdrop": 0.25}, method="lora", rank=4, targets=("mlp",), precision="pure-bf16",
                      seq_len=35, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_gpt2_recompute_stops_at_the_lora_output_projection_with_its_gradients_waiting():
    """A checkpointed GPT-2 layer under autocast, LoRA on c_proj: the recompute stops at lora_B's weight
    copy, with the base output, PEFT's fp32 copy of the GELU output and the block's `attn_output`
    alive, while the residual gradient's 16-bit cast and the scaled branch's gradient wait (seed 966,
    -1.99% before; 1015 and 1043, with residual dropout, -1.74% and -1.59%)."""
    check(_regression({**TINY_GPT2, "vocab_size": 210, "n_embd": 32, "n_layer": 1, "n_inner": 87,
                       "resid_pdrop": 0.0}, method="lora", rank=3, targets=("all-linear",),
                      precision="amp", batch_size=3, seq_len=11, grad_checkpointing=True))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["amp", "fp32"])
def test_gpt2_wide_mlp_recompute_sets_the_peak(precision):
    """The same moment made the peak: a wide MLP beside a small vocabulary, so a checkpointed layer's
    recompute outweighs the logits' gradients (amp: -12.3% before, the fp32 copy of the GELU output
    missing; fp32, where PEFT makes no copy, stays exact)."""
    check(_regression({**TINY_GPT2, "vocab_size": 60, "n_embd": 32, "n_layer": 2, "n_inner": 400,
                       "resid_pdrop": 0.0}, method="lora", rank=4, targets=("mlp",), precision=precision,
                      batch_size=4, seq_len=32, grad_checkpointing=True))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gpt2_forward_peak_counts_what_the_model_and_block_bind(attention):
    """Without checkpointing a wide MLP's LoRA output projection sets the forward's peak, beside what
    GPT2Model binds (token and position embeddings, position ids, eager's mask) and GPT2Block binds
    (`residual`, the MLP's input, `attn_output`, eager's weights as `_`): sdpa -5.3% before, and
    eager's weights a further -2.7% once the rest was counted."""
    check(_regression({**TINY_GPT2, "vocab_size": 60, "n_embd": 32, "n_layer": 1, "n_inner": 400,
                       "resid_pdrop": 0.0}, fake=True, method="lora", rank=4, targets=("mlp",),
                      precision="amp", batch_size=4, seq_len=32, attention=attention))


@pytest.mark.slow
def test_gpt2_block_holds_the_attention_output_through_a_recomputed_mlp():
    """With residual dropout after c_proj the recompute runs through the whole MLP: `attn_output` is
    still bound by GPT2Block, and only the residual gradient's 16-bit cast waits (seed 1015, -1.74%)."""
    check(_regression({"model_type": "gpt2", "vocab_size": 194, "n_embd": 44, "n_layer": 1, "n_head": 4,
                       "n_positions": 128, "tie_word_embeddings": False, "attn_pdrop": 0.1},
                      fake=True, method="lora", rank=2, targets=("mlp",), precision="amp", batch_size=2,
                      seq_len=35, grad_checkpointing=True))


@pytest.mark.slow
def test_mixtral_lora_plans_the_expert_block_once():
    check(_regression({"model_type": "mixtral", "vocab_size": 343, "hidden_size": 48, "num_hidden_layers": 2,
                       "num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 24,
                       "max_position_embeddings": 128, "tie_word_embeddings": False, "pad_token_id": None,
                       "bos_token_id": None, "eos_token_id": None, "head_dim": 12, "sliding_window": 62,
                       "num_local_experts": 3, "num_experts_per_tok": 1},
                      method="lora", rank=7, targets=("qv",), precision="fp32", batch_size=3, seq_len=12,
                      attention="eager"))


@pytest.mark.slow
@pytest.mark.parametrize("pdrop", [0.0, 0.1])
def test_gpt2_dropout_is_read_from_the_config(pdrop):
    """A GPT-2 config.json with its dropouts at 0 was planned with the class default 0.1 (+8-33%)."""
    config = {**TINY_GPT2, "attn_pdrop": pdrop, "resid_pdrop": pdrop, "embd_pdrop": pdrop}
    check(_regression(config, method="lora", rank=4, precision="fp32", batch_size=2, seq_len=24,
                      attention="eager"))


@pytest.mark.slow
def test_full_fine_tuning_of_a_tied_slice_matches_the_readme_example():
    """`lora-plan trace --model gpt2 --method full --seq-len 256 --layers 2` was 8.1% under: the tied
    embedding's two gradients are summed at the end of backward."""
    from lora_planner.catalog import get_model
    from lora_planner.measure.traced_step import sliced, trace

    result = trace(sliced(get_model("gpt2"), 2), TrainSetup(method="full", precision="fp32", seq_len=256),
                   fake=True)
    assert result.predicted["activations"] == result.traced["activations"]
    assert abs(result.errors()["peak"]) <= 0.01


def _dense(family: str, **config) -> dict:
    """A small config.json of a rotary family, token ids left out."""
    return {"model_type": family, "max_position_embeddings": 128, "pad_token_id": None, "bos_token_id": None,
            "eos_token_id": None, **config}


@pytest.mark.slow
def test_lora_input_is_cast_to_the_adapters_dtype_under_autocast():
    """PEFT casts a LoRA layer's input to lora_A's dtype (fp32 under amp) before autocast casts it back:
    o_proj's 16-bit input became a new 16-bit copy that lora_A keeps (-3.5% activations before)."""
    check(_regression(_dense("llama", vocab_size=136, hidden_size=15, num_hidden_layers=2,
                             num_attention_heads=3, num_key_value_heads=3, intermediate_size=36,
                             tie_word_embeddings=False, head_dim=8, mlp_bias=True),
                      fake=True, method="lora", rank=5, targets=("attn",), precision="amp", seq_len=15))


@pytest.mark.slow
def test_sliding_window_mask_makes_sdpa_repeat_k_and_v():
    """A sliding window no longer than the sequence hands SDPA a mask: transformers repeats k and v
    to every head and the kernel keeps them and the mask (-8.4% activations before)."""
    check(_regression(_dense("qwen2", vocab_size=338, hidden_size=80, num_hidden_layers=3,
                             num_attention_heads=8, num_key_value_heads=2, intermediate_size=28,
                             tie_word_embeddings=True, head_dim=16, use_sliding_window=True,
                             sliding_window=12, max_window_layers=2),
                      fake=True, method="lora", rank=8, targets=("qv",), precision="fp32", batch_size=2,
                      seq_len=25))


@pytest.mark.slow
def test_masked_sdpa_keeps_one_kv_head_as_a_view():
    """From one k/v head repeat_kv is an expanded view: nothing is copied (-4.6% activations before)."""
    check(_regression(_dense("mistral", vocab_size=189, hidden_size=33, num_hidden_layers=4,
                             num_attention_heads=3, num_key_value_heads=1, intermediate_size=16,
                             tie_word_embeddings=False, head_dim=12, sliding_window=6),
                      method="full", precision="pure-bf16", batch_size=3, seq_len=27))


@pytest.mark.slow
def test_eager_one_kv_head_under_autocast_copies_only_what_autocast_casts():
    """One k/v head and one sequence keep k and v as views; under amp the fp32 k is cast (a copy at
    every head) but the bf16 v is not. Qwen2 with a sliding layer builds two masks."""
    check(_regression(_dense("qwen2", vocab_size=234, hidden_size=27, num_hidden_layers=1,
                             num_attention_heads=3, num_key_value_heads=1, intermediate_size=39,
                             tie_word_embeddings=True, head_dim=14, use_sliding_window=True,
                             sliding_window=48, max_window_layers=0),
                      fake=True, method="full", precision="amp", seq_len=39, attention="eager"))


PHI3 = _dense("phi3", vocab_size=340, hidden_size=60, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, intermediate_size=77, tie_word_embeddings=True)


@pytest.mark.slow
def test_phi3_repeat_kv_copies_v_from_several_kv_heads():
    """Phi-3's v is a slice of the fused projection; from several k/v heads repeat_kv copies it, so the
    fused output is not what attention keeps (+3.4% activations before)."""
    check(_regression(PHI3, layers=3, method="full", precision="fp32", seq_len=13, attention="eager"))


@pytest.mark.slow
def test_phi3_one_head_attention_output_is_a_view():
    """With one head the SDPA output's (b, s, heads * d) layout is a view: no copy for o_proj."""
    check(_regression({**PHI3, "vocab_size": 108, "hidden_size": 12, "num_hidden_layers": 2,
                       "num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 53,
                       "tie_word_embeddings": False},
                      method="lora", rank=3, targets=("all-linear",), precision="pure-bf16", batch_size=3,
                      seq_len=19))


@pytest.mark.slow
def test_phi3_one_head_keeps_the_fused_projection_for_several_sequences():
    """With one head a slice of the fused projection batches for bmm as a view also for b > 1."""
    check(_regression({**PHI3, "vocab_size": 135, "hidden_size": 8, "num_hidden_layers": 4,
                       "num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 28,
                       "tie_word_embeddings": False, "attention_dropout": 0.0, "resid_pdrop": 0.0},
                      fake=True, method="lora", rank=2, precision="fp32", batch_size=2, seq_len=20,
                      attention="eager"))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_chunked_loss_with_several_sequences_copies_each_chunk(family):
    """torchtune's chunks of the hidden state are not contiguous for b > 1: the head keeps a copy of
    each, and the hidden state itself is freed with the model's forward (-1.1% before: it was counted
    as the copies)."""
    config = _dense(family, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=False)
    check(_regression(config, method="full", precision="fp32", batch_size=4, seq_len=64, loss="chunked",
                      loss_chunks=4, stack="torch"))


@pytest.mark.slow
def test_chunked_loss_frees_gemma2_soft_cap_outputs_with_each_chunks_head():
    """Gemma-2's final soft-cap is undone with its chunk's head: the chunks done by the head's gradient
    sum have freed their tanh outputs (+2.25% before)."""
    config = _dense("gemma2", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=True, head_dim=16)
    check(_regression(config, method="full", precision="fp32", batch_size=2, seq_len=32, attention="eager",
                      loss="chunked", loss_chunks=4, stack="torch"))


@pytest.mark.parametrize("seed", range(0, 300, 7))
def test_sliding_layers_match_transformers_layer_types(seed):
    """The spec's sliding-window layers are those transformers' config marks `sliding_attention`; a
    config class without `layer_types` (Qwen3-MoE's) hands its `sliding_window` to every layer."""
    from transformers import AutoConfig

    family = FAMILIES[seed % len(FAMILIES)]
    config = random_config(random.Random(seed), family)
    spec = spec_from_hf_config(config)
    built = AutoConfig.for_model(**config)
    window = getattr(built, "sliding_window", None)
    types = getattr(built, "layer_types", None) or (
        ["sliding_attention" if window is not None else "full_attention"] * spec.num_layers)
    assert [spec.sliding_layer(i) for i in range(spec.num_layers)] == \
        [t == "sliding_attention" and window is not None for t in types]
    if any(spec.sliding_layer(i) for i in range(spec.num_layers)):
        assert spec.sliding_window == window


MIXTRAL = _dense("mixtral", vocab_size=155, hidden_size=16, num_hidden_layers=4, num_attention_heads=1,
                 num_key_value_heads=1, intermediate_size=96, tie_word_embeddings=True, head_dim=4,
                 sliding_window=None, num_local_experts=3, num_experts_per_tok=3)


@pytest.mark.slow
def test_expert_backward_runs_in_the_hidden_states_dtype():
    """The experts' grouped matmuls are not autocast: under amp their backward's gradients are fp32,
    and the down output is freed (by the routing weights' gradient) before that peak (-16.6% before)."""
    check(_regression(MIXTRAL, layers=1, method="lora", rank=3, targets=("qv",), precision="amp",
                      batch_size=3, seq_len=46, attention="eager"))


@pytest.mark.slow
def test_expert_lora_frees_the_merged_down_weight_with_the_down_backward():
    """LoRA on the fused experts (PEFT's ParamWrapper): the merged down weight the down matmul saved
    is freed by its backward, before the activation's backward peak (+1.6% before)."""
    check(_regression(MIXTRAL, layers=1, method="lora", rank=7, targets=("mlp",), precision="amp",
                      batch_size=3, seq_len=46, attention="eager"))


@pytest.mark.slow
def test_final_norm_backward_holds_five_fp32_hidden_sized_tensors():
    """A wide hidden state beside a small vocabulary: the final RMSNorm's fp32 backward sets the peak
    (-9.9% before)."""
    check(_regression({**MIXTRAL, "vocab_size": 109, "hidden_size": 192, "num_hidden_layers": 1,
                       "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 104,
                       "head_dim": 14, "num_local_experts": 2, "num_experts_per_tok": 1},
                      method="lora", rank=7, targets=("qv",), precision="fp32", batch_size=2, seq_len=35,
                      attention="eager"))


@pytest.mark.slow
def test_eager_mask_is_freed_before_the_loss():
    """The decoder's attention mask dies when the decoder returns: the forward at the loss holds no mask
    (+1.7% before, where the forward set the peak)."""
    check(_regression(_dense("qwen2", vocab_size=49, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, intermediate_size=43,
                             tie_word_embeddings=False, head_dim=8),
                      fake=True, method="lora", rank=8, targets=("mlp",), precision="amp", seq_len=32,
                      attention="eager"))


@pytest.mark.slow
def test_checkpointed_layers_keep_sdpas_sliding_window_mask():
    """A checkpointed layer keeps its arguments: with a sliding window no longer than the sequence
    that includes SDPA's boolean (1, 1, s, s) mask (-1.7% activations before)."""
    check(_regression(_dense("qwen2", vocab_size=92, hidden_size=28, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, intermediate_size=105,
                             tie_word_embeddings=False, head_dim=12, use_sliding_window=True,
                             sliding_window=16, max_window_layers=0),
                      method="full", precision="pure-bf16", batch_size=3, seq_len=37,
                      grad_checkpointing=True))


# --- forward peaks inside a layer (no checkpointing) -----------------------------------------------

@pytest.mark.slow
def test_math_sdpa_in_a_layer_without_gradient_peaks_in_the_forward():
    """Attention dropout on CPU runs SDPA's math kernel: with LoRA on the MLP only, attention needs no
    gradient, keeps nothing, and its fp32 copies, scores, probabilities, dropout mask and dropped
    probabilities set the step's peak in the forward (-37.7% before, planned in the backward)."""
    check(_regression(_dense("qwen2", vocab_size=137, hidden_size=8, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=75,
                             tie_word_embeddings=False, head_dim=14, attention_dropout=0.1),
                      layers=1, fake=True, method="lora", rank=3, targets=("mlp",), precision="amp",
                      batch_size=2, seq_len=45))


@pytest.mark.slow
def test_math_sdpa_probs_times_v_backward_keeps_what_it_saved():
    """In the math kernel's backward, probs @ v runs with the dropped probabilities and v it saved
    still alive, beside the output's contiguous gradient, v's and the probabilities' (all fp32): with
    nine heads of 14 over a hidden size of 18 that moment, not softmax's, is the step's peak (-2.8%
    before)."""
    check(_regression(_dense("qwen2", vocab_size=60, hidden_size=18, num_hidden_layers=1,
                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=52,
                             tie_word_embeddings=True, head_dim=14),
                      method="full", precision="fp32", batch_size=2, seq_len=8, dropout=0.1))


@pytest.mark.slow
def test_pre_mlp_norm_backward_does_not_count_an_fp32_input_twice():
    """Under autocast the norm before the MLP reads the fp32 residual stream itself: the phase counted
    its saved input on top of the stream's own bytes (+3.3% before)."""
    check(_regression(_dense("qwen2", vocab_size=60, hidden_size=39, num_hidden_layers=2,
                             num_attention_heads=3, num_key_value_heads=3, intermediate_size=44,
                             tie_word_embeddings=True, head_dim=6),
                      fake=True, method="lora", rank=3, targets=("qv",), precision="amp", batch_size=3,
                      seq_len=41, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_gemma2_forward_holds_only_the_scaled_embedding():
    """Gemma-2's embedding module returns the lookup scaled by sqrt(hidden) and frees the lookup: the
    forward holds one embedding output, not two (+1.0% before, a forward peak)."""
    check(_regression(_dense("gemma2", vocab_size=41, hidden_size=39, num_hidden_layers=2,
                             num_attention_heads=3, num_key_value_heads=3, intermediate_size=105,
                             tie_word_embeddings=True, head_dim=16, sliding_window=20,
                             attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
                      fake=True, method="lora", rank=2, targets=("all-linear",), precision="amp",
                      batch_size=1, seq_len=38, attention="eager"))


@pytest.mark.slow
def test_math_sdpa_forward_holds_the_scaled_query_and_its_contiguous_copy():
    """The math kernel scales q in its transposed layout and the score matmul copies it contiguous
    (the copy is saved for k's gradient): both are alive at probs @ v, a pure-bf16 step's forward
    peak (-3.0% before)."""
    check(_regression(_dense("qwen2", vocab_size=211, hidden_size=117, num_hidden_layers=2,
                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=64,
                             tie_word_embeddings=True, head_dim=16, attention_dropout=0.1,
                             use_sliding_window=True, sliding_window=79, max_window_layers=1),
                      fake=True, method="lora", rank=6, targets=("mlp",), precision="pure-bf16",
                      batch_size=3, seq_len=29))


@pytest.mark.slow
def test_lora_up_projection_input_gradient_sets_a_narrow_mlps_peak():
    """With the hidden size five times the intermediate one, a LoRA-wrapped up projection's input
    gradient (the base layer's, the adapter's and their sum, each tokens x hidden) outweighs the
    product's backward (-1.3% before, checkpointed fp32)."""
    check(_regression(_dense("mistral", vocab_size=202, hidden_size=156, num_hidden_layers=1,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=31,
                             tie_word_embeddings=False, head_dim=10, sliding_window=37),
                      fake=True, method="lora", rank=7, targets=("all-linear",), precision="fp32",
                      batch_size=3, seq_len=23, grad_checkpointing=True))


@pytest.mark.slow
def test_first_layer_over_frozen_embeddings_keeps_no_residual_gradient():
    """The first layer's input (frozen embeddings, no checkpointing) needs no gradient: the
    attention's residual add hands its gradient to the attention branch alone, so none waits
    through the attention's backward (+2.0% before)."""
    check(_regression(_dense("phi3", vocab_size=60, hidden_size=36, num_hidden_layers=1,
                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=11,
                             tie_word_embeddings=False),
                      method="lora", rank=1, targets=("qv",), precision="pure-bf16", batch_size=1,
                      seq_len=20, attention="eager"))


@pytest.mark.slow
def test_qwen2_sliding_mask_is_freed_with_its_lowest_checkpointed_layer():
    """Qwen2's layers from max_window_layers on slide: their eager mask lives in their checkpoints
    only, so it is gone by the time the full-attention layers below run their backward (+1.3%
    before)."""
    check(_regression(_dense("qwen2", vocab_size=134, hidden_size=24, num_hidden_layers=3,
                             num_attention_heads=6, num_key_value_heads=3, intermediate_size=78,
                             tie_word_embeddings=False, head_dim=12, use_sliding_window=True,
                             sliding_window=70, max_window_layers=2),
                      method="full", precision="amp", batch_size=2, seq_len=39, attention="eager",
                      grad_checkpointing=True))


@pytest.mark.slow
def test_attention_module_locals_stay_bound_through_a_lora_output_projection():
    """The attention module keeps its rotated query and key (fp32 under autocast) and its value in
    variables until it returns after o_proj: beside a LoRA o_proj's outputs they set the forward's
    peak (-1.7% before)."""
    check(_regression(_dense("qwen2", vocab_size=44, hidden_size=18, num_hidden_layers=3,
                             num_attention_heads=6, num_key_value_heads=2, intermediate_size=11,
                             tie_word_embeddings=False, head_dim=10, use_sliding_window=True,
                             sliding_window=14, max_window_layers=1),
                      layers=1, fake=True, method="lora", rank=6, targets=("all-linear",),
                      precision="amp", batch_size=1, seq_len=27, attention="eager", dropout=0.0))


@pytest.mark.slow
def test_phi3_recompute_stops_at_the_down_projections_last_save():
    """A recomputed Phi-3 layer stops at the down projection's weight copy, its last save, with every
    saved tensor rebuilt and the MLP's product still bound; with five tokens the 16-bit weight
    copies dominate and that moment is the step's peak (-5.1% before)."""
    check(_regression(_dense("phi3", vocab_size=82, hidden_size=36, num_hidden_layers=1,
                             num_attention_heads=3, num_key_value_heads=1, intermediate_size=83,
                             tie_word_embeddings=True),
                      fake=True, method="lora", rank=4, targets=("attn",), precision="amp",
                      batch_size=1, seq_len=5, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_eager_attention_weights_stay_bound_through_the_mlp():
    """The decoder layer binds eager attention's returned weights to `_` until it returns: beside the
    down projection's LoRA outputs, the embedding output and the residuals, they set the forward's
    peak (-8.9% before)."""
    check(_regression(_dense("mistral", vocab_size=111, hidden_size=78, num_hidden_layers=1,
                             num_attention_heads=6, num_key_value_heads=2, intermediate_size=93,
                             tie_word_embeddings=True, head_dim=10, attention_dropout=0.0,
                             sliding_window=None),
                      method="lora", rank=7, targets=("mlp",), precision="amp", batch_size=3, seq_len=23,
                      attention="eager"))


@pytest.mark.slow
def test_eager_softmax_upcasts_16_bit_scores():
    """Under pure-bf16 eager softmax makes a fp32 copy of the scores beside them and its fp32 output,
    with repeat_kv's copies of k and v alive (-4.8% before)."""
    check(_regression(_dense("mistral", vocab_size=130, hidden_size=81, num_hidden_layers=1,
                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=42,
                             tie_word_embeddings=False, head_dim=12, sliding_window=None),
                      fake=True, method="lora", rank=5, targets=("mlp",), precision="pure-bf16",
                      batch_size=1, seq_len=19, attention="eager"))


@pytest.mark.slow
def test_expert_block_forward_peaks_at_the_combine():
    """The expert block's forward holds the gathered rows, the rows weighted by the fp32 routing
    weights and their un-sorted copy at once, beside the router's and the sort's locals (-1.8%
    before)."""
    check(_regression(_dense("mixtral", vocab_size=116, hidden_size=48, num_hidden_layers=1,
                             num_attention_heads=6, num_key_value_heads=3, intermediate_size=64,
                             tie_word_embeddings=True, head_dim=12, attention_dropout=0.0,
                             sliding_window=None, num_local_experts=2, num_experts_per_tok=2),
                      method="lora", rank=6, targets=("attn",), precision="fp32", batch_size=2, seq_len=42,
                      attention="eager"))


@pytest.mark.slow
def test_eager_softmax_backward_holds_v_gradient_before_the_projections():
    """Eager attention's softmax backward runs with v's gradient waiting beside the probabilities'
    and the scores' gradients (-1.6% before), but before the q, k, v projections make theirs: counting
    those too over-predicted a full fine-tuning step (+2.6% before, the second case)."""
    check(_regression(_dense("qwen2", vocab_size=56, hidden_size=16, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=20,
                             tie_word_embeddings=False, head_dim=16, attention_dropout=0.0),
                      fake=True, method="lora", rank=7, precision="fp32", batch_size=1, seq_len=47,
                      attention="eager"))
    check(_regression(_dense("qwen2", vocab_size=94, hidden_size=88, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, intermediate_size=82,
                             tie_word_embeddings=True, head_dim=8),
                      layers=1, fake=True, method="full", precision="fp32", batch_size=1, seq_len=40,
                      attention="eager"))


@pytest.mark.slow
def test_trained_final_norm_frees_its_product_before_its_backward_peak():
    """A trained final norm's weight product runs its backward first and frees the normalised input
    it saved before the norm's own backward peaks (+1.2% before, planned in the backward)."""
    check(_regression(_dense("phi3", vocab_size=106, hidden_size=84, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=2, intermediate_size=74,
                             tie_word_embeddings=True, attention_dropout=0.0, resid_pdrop=0.1),
                      method="full", precision="amp", batch_size=3, seq_len=29, attention="eager"))


@pytest.mark.slow
def test_norm_before_the_mlp_holds_its_fp32_input_through_its_backward():
    """A wide hidden state beside a narrow MLP in a 16-bit model: the backward of the norm before the
    MLP (five fp32 gradients beside the fp32 copy of its input it saved) sets the peak, after the
    MLP's saved tensors are gone (-7.0% before)."""
    check(_regression(_dense("llama", vocab_size=78, hidden_size=54, num_hidden_layers=1,
                             num_attention_heads=6, num_key_value_heads=2, intermediate_size=34,
                             tie_word_embeddings=True, head_dim=16, attention_bias=False, mlp_bias=True),
                      method="lora", rank=5, targets=("qv",), precision="pure-bf16", batch_size=2, seq_len=5,
                      grad_checkpointing=True))


@pytest.mark.slow
def test_eager_softmax_backward_holds_the_value_gradient_and_only_o_projs():
    """Eager attention's softmax backward runs while v's (repeated) gradient waits, and before the
    query, key and value projections have made their weights' gradients: only o_proj's exists
    (-1.4% before; +1.8% with the value's gradient but every attention gradient counted)."""
    check(_regression(_dense("llama", vocab_size=50, hidden_size=48, num_hidden_layers=2,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=10,
                             tie_word_embeddings=False, head_dim=8, attention_bias=False, mlp_bias=True),
                      fake=True, method="full", precision="fp32", batch_size=3, seq_len=43, attention="eager",
                      grad_checkpointing=True))


@pytest.mark.slow
def test_recomputed_math_attention_holds_its_kernels_fp32_copies():
    """On CPU, attention dropout sends SDPA to torch's math kernel: recomputing the layer for its
    backward, the kernel's fp32 copies, scaled q, repeated k, causal mask and fp32 product sit beside
    the module's q, k, v and the gradients the LoRA down projection has already made (-17.1% before)."""
    check(_regression(_dense("mistral", vocab_size=50, hidden_size=18, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=2, intermediate_size=43,
                             tie_word_embeddings=True, head_dim=8, sliding_window=None),
                      method="lora", rank=2, targets=("mlp",), precision="amp", batch_size=3, seq_len=34,
                      dropout=0.1, grad_checkpointing=True))


@pytest.mark.slow
def test_recomputed_eager_attention_holds_its_returned_weights():
    """Recomputing an eager layer under autocast: the fp32 dropped weights the attention returns, the
    rotated q and k and the product before its contiguous copy are alive at the kernel's end
    (-5.7% before)."""
    check(_regression(_dense("llama", vocab_size=131, hidden_size=8, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=9,
                             tie_word_embeddings=False, head_dim=8, attention_bias=False, mlp_bias=True),
                      layers=1, method="lora", rank=5, targets=("default",), precision="amp", batch_size=2,
                      seq_len=48, attention="eager", dropout=0.1, grad_checkpointing=True))


@pytest.mark.slow
def test_recomputed_masked_math_attention_works_at_every_head():
    """A sliding window no longer than the sequence: transformers repeats k and v before the math
    kernel, which then copies at every head and converts the mask itself (-11.9% before)."""
    check(_regression(_dense("mistral", vocab_size=151, hidden_size=60, num_hidden_layers=1,
                             num_attention_heads=6, num_key_value_heads=3, intermediate_size=30,
                             tie_word_embeddings=False, head_dim=12, attention_dropout=0.1, sliding_window=9),
                      fake=True, method="full", precision="amp", batch_size=2, seq_len=40,
                      grad_checkpointing=True))


@pytest.mark.slow
def test_recompute_stops_once_the_down_projection_has_saved_its_input():
    """Non-reentrant checkpointing stops a layer's recompute at its last saved tensor: LoRA's down
    projection never makes its adapter output and scaled copy again, while the scaled gradient its
    backward made first waits through the recompute (+3.0% before)."""
    check(_regression(_dense("llama", vocab_size=54, hidden_size=81, num_hidden_layers=3,
                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=82,
                             tie_word_embeddings=True, head_dim=12, attention_dropout=0.0,
                             attention_bias=False, mlp_bias=True),
                      method="lora", rank=3, targets=("mlp",), precision="fp32", batch_size=3, seq_len=39,
                      grad_checkpointing=True))


@pytest.mark.slow
def test_eager_weights_stay_alive_through_the_recomputed_mlp():
    """The decoder layer binds the attention's returned weights to `_`: under autocast with attention
    dropout the fp32 dropped weights (not what probs @ v keeps) live until the layer returns, so a
    recompute stopping at the down projection still holds them (-4.3% before)."""
    check(_regression(_dense("llama", vocab_size=204, hidden_size=36, num_hidden_layers=3,
                             num_attention_heads=6, num_key_value_heads=2, intermediate_size=87,
                             tie_word_embeddings=True, head_dim=14, attention_dropout=0.1,
                             attention_bias=False, mlp_bias=True),
                      fake=True, method="lora", rank=6, targets=("all-linear",), precision="amp",
                      batch_size=1, seq_len=35, attention="eager", grad_checkpointing=True))


# --- checkpointed recompute of Phi-3, Gemma-2 and Mixtral layers ----------------------------------
# What a recomputed layer holds at its forward's peak, and what waits for it, beyond its saved tensors.

PHI3 = _dense("phi3", vocab_size=46, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, intermediate_size=18, tie_word_embeddings=True)


@pytest.mark.slow
def test_recompute_holds_attentions_locals_at_the_output_projection():
    """At o_proj's LoRA in a recomputed layer the normed input, the rotated fp32 q and k, Phi-3's fused
    qkv output (v is a slice of it) and autocast's 16-bit copy of the residual gradient are alive
    (-9.8% before; fuzz seed 720)."""
    check(_regression(PHI3, fake=True, method="lora", rank=5, targets=("attn",), precision="amp",
                      batch_size=2, seq_len=31, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_norm_before_the_mlp_sets_the_backward_peak():
    """The pre-MLP RMSNorm's fp32 backward (five hidden-sized tensors beside its saved fp32 input) in a
    wide, shallow layer (-6.7% before; fuzz seed 230)."""
    check(_regression({**PHI3, "vocab_size": 194, "hidden_size": 64, "intermediate_size": 11}, fake=True,
                      method="lora", rank=1, targets=("attn",), precision="pure-bf16", batch_size=3,
                      seq_len=15, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_gemma2_recompute_ends_at_the_post_feedforward_norm():
    """Gemma-2's recompute ends with the post-feedforward norm, the MLP's output and the eager
    probabilities still bound; its `type_as` backward leaves a fp32 gradient waiting (-3.8% before;
    fuzz seed 474)."""
    check(_regression(_dense("gemma2", vocab_size=65, hidden_size=42, num_hidden_layers=1,
                             num_attention_heads=6, num_key_value_heads=3, intermediate_size=55,
                             tie_word_embeddings=False, head_dim=8, attention_dropout=0.1, sliding_window=26,
                             attn_logit_softcapping=None, final_logit_softcapping=None),
                      method="full", precision="amp", batch_size=2, seq_len=33, attention="eager",
                      grad_checkpointing=True))


@pytest.mark.slow
def test_value_gradient_waits_through_the_softmax_backward():
    """Eager softmax backward holds the repeated value's gradient; the q and v adapters' gradients come
    after it (-4.6% before, +0.8% with the first alone; fuzz seed 432)."""
    check(_regression(_dense("gemma2", vocab_size=72, hidden_size=48, num_hidden_layers=4,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=39,
                             tie_word_embeddings=False, head_dim=14, sliding_window=64,
                             attn_logit_softcapping=None, final_logit_softcapping=None),
                      layers=3, method="lora", rank=8, targets=("qv",), precision="fp32", batch_size=3,
                      seq_len=32, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_recomputed_math_kernel_holds_its_upcasts_and_output():
    """Attention dropout sends CPU SDPA to the math kernel: its recompute holds fp32 upcasts, the
    repeated key, the mask and the output; with one expert per token no un-sort gradient waits
    (-9.5% before; fuzz seed 206)."""
    check(_regression(_dense("mixtral", vocab_size=80, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                             tie_word_embeddings=False, head_dim=16, attention_dropout=0.1,
                             sliding_window=None, num_local_experts=3, num_experts_per_tok=1),
                      method="lora", rank=5, targets=("attn",), precision="amp", batch_size=3, seq_len=45,
                      grad_checkpointing=True))


@pytest.mark.slow
def test_math_kernel_needs_no_query_copy_after_phi3s_rotary():
    """Phi-3's rotary concatenation leaves q contiguous: the math kernel makes no copy of it (+1.7%
    with one; fuzz seed 587)."""
    check(_regression({**PHI3, "vocab_size": 61, "hidden_size": 48, "num_hidden_layers": 3,
                       "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 93,
                       "tie_word_embeddings": False}, fake=True, method="lora", rank=4, targets=("qv",),
                      precision="amp", batch_size=2, seq_len=34, grad_checkpointing=True, dropout=0.1))


@pytest.mark.slow
def test_expert_unsort_gradients_are_fp32_under_pure_bf16():
    """The rows were weighted by fp32 routing weights: the un-sort's buffers and the top-k sum's
    gradient are fp32 in a bf16 model (-8.2% before; fuzz seed 822)."""
    check(_regression(_dense("mixtral", vocab_size=244, hidden_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=80,
                             tie_word_embeddings=True, head_dim=14, sliding_window=None,
                             num_local_experts=5, num_experts_per_tok=3),
                      method="lora", rank=5, targets=("attn",), precision="pure-bf16", batch_size=1,
                      seq_len=42, grad_checkpointing=True))


@pytest.mark.slow
def test_down_projection_lora_gradient_waits_through_the_recompute():
    """LoRA on the MLP's output projection: the scale's backward makes the adapter branch's gradient
    before lora_B's backward sets off the recompute (-2.9% before; fuzz seed 1056)."""
    check(_regression({**PHI3, "vocab_size": 129, "hidden_size": 32, "num_hidden_layers": 1,
                       "num_key_value_heads": 2, "intermediate_size": 71, "tie_word_embeddings": False},
                      method="lora", rank=2, targets=("mlp",), precision="fp32", batch_size=3, seq_len=48,
                      attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_decoder_binds_a_bf16_residual_through_the_mlp():
    """Under pure-bf16 the norm saves a fp32 copy of the residual, so the 16-bit residual the decoder
    layer binds through the MLP is not saved, but alive (-2.3% before; fuzz seed 69)."""
    check(_regression({**PHI3, "vocab_size": 89, "hidden_size": 12, "num_hidden_layers": 1,
                       "num_attention_heads": 1, "intermediate_size": 52}, fake=True, method="lora", rank=8,
                      targets=("mlp",), precision="pure-bf16", batch_size=2, seq_len=36, attention="eager",
                      grad_checkpointing=True))


@pytest.mark.slow
def test_recomputed_expert_block_ends_with_its_weighted_rows():
    """A recomputed expert block's last op (the inverse permutation's scatter) runs with the rows
    weighted by the fp32 routing weights and the gathered input rows alive (-2.7% before; fuzz seed
    164)."""
    check(_regression(_dense("mixtral", vocab_size=194, hidden_size=192, num_hidden_layers=1,
                             num_attention_heads=8, num_key_value_heads=2, intermediate_size=104,
                             tie_word_embeddings=True, head_dim=10, sliding_window=None,
                             num_local_experts=3, num_experts_per_tok=2),
                      method="lora", rank=8, targets=("attn",), precision="fp32", batch_size=3, seq_len=38,
                      grad_checkpointing=True, dropout=0.1))


@pytest.mark.slow
def test_recompute_stops_at_the_layers_last_saved_tensor():
    """torch's checkpoint stops recomputing once the layer's last saved tensor exists: with LoRA on the
    down projection in fp32 that is lora_A's output, so lora_B's output and its scaled copy are never
    made again (+5.1% with them; fuzz seed 552)."""
    check(_regression({**PHI3, "vocab_size": 78, "hidden_size": 42, "num_hidden_layers": 1,
                       "num_attention_heads": 3, "num_key_value_heads": 3, "intermediate_size": 37,
                       "tie_word_embeddings": False}, fake=True, method="lora", rank=4,
                      targets=("all-linear",), precision="fp32", batch_size=3, seq_len=26,
                      grad_checkpointing=True))


# --- LoRA on Mixtral's fused experts (PEFT's ParamWrapper), found once the fuzzer drew mlp/all-linear

def _mixtral(**overrides) -> dict:
    return {"model_type": "mixtral", "max_position_embeddings": 128, "tie_word_embeddings": True,
            "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "sliding_window": None,
            **overrides}


@pytest.mark.slow
def test_merged_expert_weights_stay_cached_until_the_experts_return():
    """PEFT merges each wrapped expert weight inside `parametrize.cached()`: with LoRA on the MLP only,
    layer 0's input needs no gradient, so no matmul saves the merged gate/up weight, yet it is alive
    through the block, beside the un-sort's copies (-20.4% before)."""
    check(_regression(_mixtral(vocab_size=109, hidden_size=192, num_hidden_layers=1, num_attention_heads=8,
                               num_key_value_heads=2, intermediate_size=104, head_dim=14, num_local_experts=2,
                               num_experts_per_tok=1),
                      method="lora", rank=7, targets=("mlp",), precision="fp32", batch_size=2, seq_len=35,
                      attention="eager"))


@pytest.mark.slow
def test_expert_combine_backward_keeps_what_the_down_projection_saved():
    """The routing weights' product is backpropagated before the down projection: its input and the
    merged down weight it saved are still alive then (-3.7% before)."""
    check(_regression(_mixtral(vocab_size=113, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=1, intermediate_size=32, head_dim=8, sliding_window=76,
                               num_local_experts=3, num_experts_per_tok=3),
                      layers=2, fake=True, method="lora", rank=3, targets=("all-linear",),
                      precision="pure-bf16", batch_size=3, seq_len=5, attention="eager"))


@pytest.mark.slow
def test_recompute_stops_before_a_last_lora_layers_outputs_under_autocast():
    """Under autocast lora_B's matmul saves its weight's 16-bit copy before its output exists: a
    recompute stopping at that save never makes the LoRA output and its scaled copy (+2.2% before)."""
    check(_regression({"model_type": "mistral", "vocab_size": 143, "hidden_size": 108, "num_hidden_layers": 1,
                       "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 119,
                       "max_position_embeddings": 128, "tie_word_embeddings": False, "pad_token_id": None,
                       "bos_token_id": None, "eos_token_id": None, "head_dim": 16, "sliding_window": 61},
                      method="lora", rank=2, targets=("all-linear",), precision="amp", batch_size=2,
                      seq_len=25, grad_checkpointing=True))


@pytest.mark.slow
def test_expert_output_cast_gradient_waits_through_the_recompute():
    """Under pure-bf16 the expert block casts its fp32 top-k sum back to bf16: that cast's backward
    makes a fp32 copy of the incoming gradient, which waits through the recompute even with one
    expert per token (-3.1% before; fuzz seed 843)."""
    check(_regression(_mixtral(vocab_size=400, hidden_size=144, num_hidden_layers=1, num_attention_heads=9,
                               num_key_value_heads=3, intermediate_size=80, head_dim=6, attention_dropout=0.0,
                               sliding_window=13, num_local_experts=3, num_experts_per_tok=1),
                      fake=True, method="lora", rank=6, targets=("mlp",), precision="pure-bf16", batch_size=2,
                      seq_len=31, grad_checkpointing=True))


@pytest.mark.slow
def test_recomputed_expert_combine_holds_three_fp32_row_gradients():
    """After a recomputed block's un-sort, the routing weights' product is backpropagated: the
    scattered gradient and both products' gradients (fp32 rows x hidden) are alive at once (-1.5%
    before; fuzz seed 31)."""
    check(_regression(_mixtral(vocab_size=280, hidden_size=96, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=1, intermediate_size=16, head_dim=6, attention_dropout=0.0,
                               num_local_experts=2, num_experts_per_tok=1),
                      method="full", precision="amp", batch_size=1, seq_len=40, grad_checkpointing=True,
                      dropout=0.1))


@pytest.mark.slow
def test_full_expert_combine_comes_before_the_down_weights_gradient():
    """Trained in full, the expert block's combine backward runs before the down projection's weight
    gradient exists: counting it there put the peak in backward, not at the optimizer (+1.4% before;
    fuzz seed 318)."""
    check(_regression(_mixtral(vocab_size=272, hidden_size=288, num_hidden_layers=1, num_attention_heads=12,
                               num_key_value_heads=3, intermediate_size=80, head_dim=6, sliding_window=50,
                               num_local_experts=3, num_experts_per_tok=2),
                      method="full", precision="amp", batch_size=3, seq_len=32))


@pytest.mark.slow
def test_math_kernel_repeats_one_kv_head_to_every_head():
    """torch's math SDPA kernel (CPU, attention dropout) repeats k and v to every query head
    (`enable_gqa`) also from one k/v head: the repeated k, which only its scaled copy outlives, is
    alive in a recomputed layer's attention as the output is cast back (-3.2% before; fuzz seed 1693)."""
    check(_regression(_dense("phi3", vocab_size=120, hidden_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, intermediate_size=43,
                             tie_word_embeddings=False, attention_dropout=0.1, resid_pdrop=0.1),
                      fake=True, method="lora", rank=5, targets=("mlp",), precision="pure-bf16", batch_size=3,
                      seq_len=28, grad_checkpointing=True))


@pytest.mark.slow
def test_math_kernel_keeps_phi3_value_upcast_for_the_value_product():
    """The math kernel's fp32 upcast of Phi-3's v (a slice of the fused projection, so the upcast is
    contiguous) is what probs @ v keeps: counting it also as a transient over-predicted a recomputed
    layer's attention (+1.4% before; fuzz seed 1952)."""
    check(_regression(_dense("phi3", vocab_size=223, hidden_size=30, num_hidden_layers=3,
                             num_attention_heads=3, num_key_value_heads=3, intermediate_size=45,
                             tie_word_embeddings=False, attention_dropout=0.1),
                      fake=True, method="lora", rank=5, targets=("attn",), precision="amp", batch_size=1,
                      seq_len=42, grad_checkpointing=True))


@pytest.mark.slow
def test_recomputed_expert_block_peaks_at_its_last_op_the_un_sort():
    """A recomputed expert block's last op scatters the weighted rows into a zeroed fp32 buffer while
    the sorted expert ids and the per-expert counts are still bound: more than the un-sort's backward
    holds once the recompute's locals are gone (-1.2% before; fuzz seed 2509)."""
    check(_regression(_mixtral(vocab_size=46, hidden_size=8, num_hidden_layers=4, num_attention_heads=1,
                               num_key_value_heads=1, intermediate_size=8, head_dim=4, attention_dropout=0.1,
                               tie_word_embeddings=False, num_local_experts=3, num_experts_per_tok=3),
                      method="lora", rank=2, targets=("all-linear",), precision="pure-bf16", batch_size=1,
                      seq_len=29, grad_checkpointing=True))


@pytest.mark.slow
def test_math_kernel_copies_phi3_value_from_one_kv_head():
    """With one k/v head and no mask, the math SDPA kernel repeats Phi-3's v to every head itself
    (`enable_gqa`): probs @ v keeps that copy, not the fused projection's output (+1.5% activations
    and +1.3% peak before; fuzz seed 3093)."""
    check(_regression(_dense("phi3", vocab_size=44, hidden_size=24, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=1, intermediate_size=28,
                             tie_word_embeddings=True, resid_pdrop=0.1),
                      method="lora", rank=6, targets=("attn",), precision="fp32", batch_size=1, seq_len=39,
                      dropout=0.1))


@pytest.mark.slow
def test_eager_attention_without_gradients_frees_autocasts_query_and_key_copies():
    """Attention whose q, k and v need no gradient (LoRA on the MLP of a one-layer model) saves
    nothing: autocast's 16-bit copies of q and the repeated k are freed after the score matmul, so
    the softmax's moment does not hold them (+6.7% before; fuzz seed 2734)."""
    check(_regression(_dense("qwen2", vocab_size=135, hidden_size=63, num_hidden_layers=1,
                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=61, head_dim=16,
                             tie_word_embeddings=False, attention_dropout=0.0),
                      fake=True, method="lora", rank=8, targets=("mlp",), precision="amp", batch_size=2,
                      seq_len=32, attention="eager"))


@pytest.mark.slow
def test_gemma2_one_layer_slice_builds_both_masks():
    """Gemma2Model builds its full and its sliding-window mask whatever layers it has: a one-layer
    slice under eager attention holds both through its forward (-1.8% before; fuzz seed 2840)."""
    check(_regression(_dense("gemma2", vocab_size=132, hidden_size=27, num_hidden_layers=3,
                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=48, head_dim=8,
                             tie_word_embeddings=True, attention_dropout=0.1, sliding_window=48,
                             attn_logit_softcapping=None, final_logit_softcapping=30.0),
                      layers=1, method="lora", rank=5, targets=("mlp",), precision="amp", batch_size=1,
                      seq_len=31, attention="eager"))


@pytest.mark.slow
def test_gemma2_post_feedforward_norm_is_a_forward_moment():
    """Gemma-2's post-feedforward norm multiplies in fp32 beside its fp32 input copy and normalised
    tensor, while the layer still binds the attention weights: a forward moment of its own once the
    MLP's input is gone (-0.8% before, +1.8% before the eager autocast fix; fuzz seed 3155)."""
    check(_regression(_dense("gemma2", vocab_size=101, hidden_size=156, num_hidden_layers=1,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=46, head_dim=10,
                             tie_word_embeddings=False, sliding_window=80, attn_logit_softcapping=50.0,
                             final_logit_softcapping=30.0),
                      fake=True, method="lora", rank=4, targets=("mlp",), precision="amp", batch_size=2,
                      seq_len=41, attention="eager"))


@pytest.mark.slow
def test_gpt2_math_kernel_recompute_holds_the_block_and_attention_locals():
    """A recomputed GPT-2 layer under autocast with attention dropout (CPU's math SDPA kernel): the
    block's fp32 `hidden_states` and the attention's fused q, k, v output are bound, unsaved, while
    the kernel runs, and the kernel's fp32 upcast of v is copied for probs @ v with several sequences
    and heads (-7.4% before; fuzz seed 3773)."""
    check(_regression({"model_type": "gpt2", "vocab_size": 148, "n_embd": 18, "n_layer": 3, "n_head": 2,
                       "n_positions": 128, "tie_word_embeddings": True, "n_inner": 20, "attn_pdrop": 0.25,
                       "embd_pdrop": 0.1},
                      method="lora", rank=4, targets=("qv",), precision="amp", batch_size=2, seq_len=48,
                      grad_checkpointing=True))


@pytest.mark.slow
def test_phi3_layer_binds_eager_attention_weights_through_the_mlp():
    """Phi3DecoderLayer binds the eager attention's returned weights (`self_attn_weights`) until it
    returns: alive at the MLP's LoRA moment in the forward (-3.5% before; fuzz seed 3485)."""
    check(_regression(_dense("phi3", vocab_size=91, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=126,
                             tie_word_embeddings=True, attention_dropout=0.1),
                      fake=True, method="lora", rank=7, targets=("mlp",), precision="fp32", batch_size=3,
                      seq_len=14, attention="eager"))


@pytest.mark.slow
def test_mlp_activation_is_alive_through_the_up_projection():
    """`act_fn(gate_proj(x)) * up_proj(x)` makes the activation before the up projection runs: with LoRA
    on a wide MLP the gate output and its activation are alive at the up projection's LoRA moment
    (-2.1% before; fuzz seed 3435)."""
    check(_regression(_dense("gemma2", vocab_size=43, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=8,
                             tie_word_embeddings=False, sliding_window=60, attn_logit_softcapping=None,
                             final_logit_softcapping=None),
                      method="lora", rank=1, targets=("mlp",), precision="fp32", batch_size=2, seq_len=20,
                      attention="eager"))


@pytest.mark.slow
def test_lora_output_projection_input_gradient_sets_a_wide_attentions_peak():
    """With many heads beside a small hidden size, a LoRA o_proj's input gradient (the base layer's,
    the adapter's and their sum, heads x head_dim wide) outweighs the q, k and v gradients flash
    backward returns (-3.9% before; fuzz seed 4607)."""
    check(_regression(_dense("llama", vocab_size=133, hidden_size=24, num_hidden_layers=3,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=17, head_dim=12,
                             tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
                      fake=True, method="lora", rank=3, targets=("all-linear",), precision="pure-bf16",
                      batch_size=2, seq_len=30, grad_checkpointing=True, dropout=0.0))


@pytest.mark.slow
def test_math_kernel_keeps_the_scaled_query_itself_for_one_sequence():
    """For one sequence the math SDPA kernel's scaled q reshapes for the score matmul as a view: the
    matmul keeps it, with no contiguous copy beside it (+2.3% before; fuzz seed 3593)."""
    check(_regression(_dense("mistral", vocab_size=240, hidden_size=42, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=3, intermediate_size=70, head_dim=8,
                             tie_word_embeddings=False, attention_dropout=0.1, sliding_window=None),
                      method="lora", rank=4, targets=("default",), precision="pure-bf16", batch_size=1,
                      seq_len=34, grad_checkpointing=True))


@pytest.mark.slow
def test_phi3_eager_score_matmul_keeps_the_rotated_query_itself():
    """Phi-3's rotary embedding concatenates q into a (b, heads, s, d)-contiguous tensor, which eager
    attention's score matmul batches as a view and keeps: no copy of it beside the original (+1.9%
    before; fuzz seed 3695)."""
    check(_regression(_dense("phi3", vocab_size=187, hidden_size=168, num_hidden_layers=4,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=62,
                             tie_word_embeddings=True, attention_dropout=0.1),
                      layers=1, method="lora", rank=5, targets=("mlp",), precision="fp32", batch_size=1,
                      seq_len=24, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_gpt2_recompute_stops_before_the_residual_dropouts_output():
    """GPT-2's MLP residual dropout saves its mask as the product's input, packed before the product
    runs: a recompute stops there, before the dropped output exists (+1.7% before; fuzz seed 3983)."""
    check(_regression({"model_type": "gpt2", "vocab_size": 79, "n_embd": 24, "n_layer": 2, "n_head": 4,
                       "n_positions": 128, "tie_word_embeddings": True, "n_inner": 20, "attn_pdrop": 0.25,
                       "resid_pdrop": 0.25},
                      fake=True, method="lora", rank=8, targets=("default",), precision="fp32", batch_size=1,
                      seq_len=35, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_eager_value_product_backward_is_a_moment():
    """Eager attention's probs @ v backward makes the probabilities' gradient (s x s per head) and v's
    while the probabilities, dropout's mask and the dropped copy are all still saved: with many heads
    beside a small hidden size it sets the step's peak (-7.2% before; fuzz seed 4990)."""
    check(_regression(_dense("phi3", vocab_size=192, hidden_size=72, num_hidden_layers=1,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=12,
                             tie_word_embeddings=True, attention_dropout=0.1, resid_pdrop=0.0),
                      fake=True, method="lora", rank=6, targets=("qv",), precision="fp32", batch_size=1,
                      seq_len=38, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_phi3_math_kernel_forward_moments():
    """Phi-3 under SDPA with attention dropout runs torch's math kernel on CPU: its forward moments
    (the fp32 upcasts, the scores, softmax, dropout and the probabilities' 16-bit copy) hold the
    fused projection's whole output, v being a slice of it (-2.9% before; fuzz seed 4808)."""
    check(_regression(_dense("phi3", vocab_size=55, hidden_size=48, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=16,
                             tie_word_embeddings=False, attention_dropout=0.1),
                      fake=True, method="lora", rank=1, targets=("default",), precision="pure-bf16",
                      batch_size=1, seq_len=44))


@pytest.mark.slow
def test_eager_attention_without_gradients_frees_the_score_matmuls_copies():
    """Without autocast too, the score matmul's contiguous copies of q and the expanded one-head k
    (several sequences and heads) are its own temporaries: with no gradient needed they are freed
    before the softmax (+10.2% before; fuzz seed 5511)."""
    check(_regression(_dense("mistral", vocab_size=78, hidden_size=6, num_hidden_layers=1,
                             num_attention_heads=3, num_key_value_heads=1, intermediate_size=25, head_dim=14,
                             tie_word_embeddings=False, sliding_window=None),
                      method="lora", rank=5, targets=("mlp",), precision="pure-bf16", batch_size=2,
                      seq_len=42, attention="eager", dropout=0.1))


@pytest.mark.slow
def test_masked_math_kernel_forward_moments():
    """A sliding window no longer than the sequence gives SDPA a mask; with attention dropout CPU runs
    the math kernel on k and v that transformers repeated to every head, with an additive mask in q's
    dtype: its scores, softmax, dropout mask and dropped copy set the forward's peak, even in an
    attention that needs no gradient (-46.6% before; fuzz seed 7527)."""
    check(_regression(_dense("mistral", vocab_size=109, hidden_size=12, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, intermediate_size=28, head_dim=8,
                             tie_word_embeddings=True, attention_dropout=0.0, sliding_window=17),
                      layers=1, method="lora", rank=4, targets=("mlp",), precision="amp", batch_size=3,
                      seq_len=47, dropout=0.1))


@pytest.mark.slow
def test_gpt2_math_kernel_forward_moments():
    """GPT-2 under SDPA with its default attention dropout runs torch's math kernel on CPU: its
    forward moments hold the fused q, k, v output whole, each slice's fp32 upcast, and, for several
    sequences and heads, v's strided upcast beside the contiguous copy probs @ v keeps (-6.5% before;
    fuzz seed 7203)."""
    check(_regression({"model_type": "gpt2", "vocab_size": 51, "n_embd": 48, "n_layer": 1, "n_head": 4,
                       "n_positions": 128, "tie_word_embeddings": True, "n_inner": 49, "resid_pdrop": 0.1},
                      fake=True, method="lora", rank=1, targets=("qv",), precision="pure-bf16", batch_size=3,
                      seq_len=12))


@pytest.mark.slow
def test_phi3_eager_forward_moments():
    """Phi-3's eager attention runs transformers' shared function on its rotated q and k and a slice
    of the fused projection: the softmax's fp32 upcast and output beside the 16-bit scores set the
    forward's peak in an attention that needs no gradient (-3.0% before; fuzz seed 8028)."""
    check(_regression(_dense("phi3", vocab_size=281, hidden_size=120, num_hidden_layers=1,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=54,
                             tie_word_embeddings=True),
                      fake=True, method="lora", rank=6, targets=("mlp",), precision="pure-bf16", batch_size=2,
                      seq_len=26, attention="eager"))


@pytest.mark.slow
def test_rotary_embedding_is_a_forward_moment():
    """Rotating a wide q (many heads beside a small hidden size) holds q, q * cos, rotate_half(q)
    and its product with sin at once, beside k and v: a forward moment of its own in an attention
    that needs no gradient (-1.5% before; fuzz seed 8702)."""
    check(_regression(_dense("llama", vocab_size=118, hidden_size=72, num_hidden_layers=1,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=114,
                             head_dim=16, tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
                      fake=True, method="lora", rank=1, targets=("mlp",), precision="fp32", batch_size=1,
                      seq_len=18))


@pytest.mark.slow
def test_qwen2_builds_the_full_mask_beside_the_sliding_one():
    """Qwen2Model builds its full causal mask whatever its layers are, and a sliding one when any layer
    slides: under eager attention both are held through the forward (-5.7% before; fuzz seed 18148)."""
    check(_regression(_dense("qwen2", vocab_size=67, hidden_size=8, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=45, head_dim=10,
                             tie_word_embeddings=False, use_sliding_window=True, sliding_window=18,
                             max_window_layers=0),
                      layers=1, method="lora", rank=5, targets=("mlp",), precision="fp32", batch_size=3,
                      seq_len=32, attention="eager"))


@pytest.mark.slow
def test_recomputed_rotary_embedding_under_autocast_holds_three_fp32_products():
    """A recomputed layer rotates its 16-bit q again, and under autocast q * cos, rotate_half(q) * sin
    and their sum are fp32 (cos is): with wide heads beside a small hidden size that moment, with the
    gradients waiting for the layer, is the step's peak (-16.6% before; fuzz seed 9241)."""
    check(_regression(_dense("llama", vocab_size=77, hidden_size=12, num_hidden_layers=3,
                             num_attention_heads=6, num_key_value_heads=2, intermediate_size=8, head_dim=16,
                             tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
                      method="lora", rank=7, targets=("mlp",), precision="amp", batch_size=3, seq_len=44,
                      grad_checkpointing=True))


@pytest.mark.slow
def test_recomputed_expert_block_ends_with_its_sorted_expert_ids_bound():
    """A recomputed expert block stops at its inverse permutation, with the sorted expert ids still
    bound beside the arange scattered into it (-1.1% before; fuzz seed 3965)."""
    check(_regression(_dense("mixtral", vocab_size=96, hidden_size=8, num_hidden_layers=2,
                             num_attention_heads=1, num_key_value_heads=1, intermediate_size=8, head_dim=16,
                             tie_word_embeddings=True, sliding_window=59, num_local_experts=4,
                             num_experts_per_tok=3),
                      layers=2, method="lora", rank=2, targets=("default",), precision="fp32", batch_size=1,
                      seq_len=17, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_expert_gate_up_backward_holds_the_down_projections_lora_gradients():
    """LoRA on both fused expert weights: by the gate/up grouped matmul's backward, the down
    projection's A and B gradients exist beside the merged gate/up weight's full gradient (-1.2%
    before; fuzz seed 9600)."""
    check(_regression(_dense("mixtral", vocab_size=309, hidden_size=192, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=2, intermediate_size=24, head_dim=10,
                             tie_word_embeddings=False, attention_dropout=0.1, sliding_window=None,
                             num_local_experts=5, num_experts_per_tok=1),
                      layers=2, method="lora", rank=7, targets=("mlp",), precision="amp", batch_size=1,
                      seq_len=4, grad_checkpointing=True))


@pytest.mark.slow
def test_expert_lora_factor_gradients_after_the_first_layers_gate_up_backward():
    """After the gate/up grouped matmul's backward, baddbmm's turns the merged weight's gradient into
    B's and A's (each a bmm and its scaled copy): with a wide hidden size A's two copies set the peak.
    In the first layer over frozen embeddings the residual stream's gradient is used up by then
    (+0.7% and -1.3% before; fuzz seed 16747)."""
    check(_regression(_dense("mixtral", vocab_size=208, hidden_size=144, num_hidden_layers=1,
                             num_attention_heads=6, num_key_value_heads=3, intermediate_size=8, head_dim=14,
                             tie_word_embeddings=True, sliding_window=None, num_local_experts=5,
                             num_experts_per_tok=3),
                      method="lora", rank=7, targets=("mlp",), precision="amp", batch_size=2, seq_len=4,
                      attention="eager"))


@pytest.mark.slow
def test_lora_output_projection_reads_the_saved_attention_output_under_autocast():
    """PEFT's fp32 copy of o_proj's 16-bit input is alive beside the input itself, which SDPA's flash
    kernel saved as its output (the transposed output is a view): counted once, not again as a
    transient (+4.4% before; fuzz seed 13528)."""
    check(_regression(_dense("qwen2", vocab_size=272, hidden_size=36, num_hidden_layers=3, head_dim=16,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=117,
                             tie_word_embeddings=True, use_sliding_window=True, sliding_window=67,
                             max_window_layers=1),
                      fake=True, method="lora", rank=3, targets=("attn",), precision="amp", batch_size=3,
                      seq_len=40, grad_checkpointing=True))


@pytest.mark.slow
def test_recomputed_eager_attention_reaches_its_softmax_moment_again():
    """A recomputed layer's eager attention makes its scores again: under autocast the masked scores
    and softmax's output are fp32 (b x heads x s x s each) beside the repeated k and v, the
    recompute's peak (-1.5% before; fuzz seed 10644)."""
    check(_regression(_dense("qwen2", vocab_size=134, hidden_size=36, num_hidden_layers=4,
                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=16, head_dim=10,
                             tie_word_embeddings=True),
                      fake=True, method="lora", rank=3, targets=("default",), precision="amp", batch_size=3,
                      seq_len=26, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_eager_softmax_moment_comes_before_dropouts_mask():
    """Eager attention's softmax moments come before dropout saves its mask, and with one sequence
    the score matmul's saved q is the module's q itself: a recomputed layer's softmax moment counted
    neither (+2.4% before; fuzz seed 20542)."""
    check(_regression(_dense("qwen2", vocab_size=116, hidden_size=36, num_hidden_layers=4,
                             num_attention_heads=6, num_key_value_heads=2, intermediate_size=50, head_dim=8,
                             tie_word_embeddings=False),
                      method="lora", rank=3, targets=("qv",), precision="pure-bf16", batch_size=1,
                      seq_len=40, attention="eager", grad_checkpointing=True, dropout=0.1))


@pytest.mark.slow
def test_expert_gated_backward_holds_the_down_projections_lora_gradients():
    """LoRA on the fused experts' down weight: its A and B gradients are made right after the down
    grouped matmul's backward, so they are alive at the gated product's backward, the MLP's peak
    (-1.8% before; fuzz seed 20212). In the first layer over frozen embeddings the residual stream's
    gradient and the routing weights are used up by then (fuzz seed 157, +0.1% before)."""
    mixtral = _dense("mixtral", vocab_size=101, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                     num_key_value_heads=1, intermediate_size=80, head_dim=8, tie_word_embeddings=True,
                     attention_dropout=0.1, sliding_window=None, num_local_experts=4, num_experts_per_tok=3)
    check(_regression(mixtral, method="lora", rank=4, targets=("all-linear",), precision="amp", batch_size=3,
                      seq_len=9, grad_checkpointing=True), tolerance=0.002)
    check(_regression({**mixtral, "hidden_size": 16, "intermediate_size": 96, "num_local_experts": 3,
                       "head_dim": 4, "attention_dropout": 0.0},
                      method="lora", rank=7, targets=("mlp",), precision="amp", batch_size=3, seq_len=46,
                      attention="eager"), tolerance=0.002)


@pytest.mark.slow
def test_eager_probs_times_v_holds_q_k_and_the_repeated_k_without_a_gradient():
    """Eager attention with no gradient through it (the first layer over frozen embeddings, LoRA on
    the MLP only), fp32: at probs @ v nothing is saved, and q, k and repeat_kv's copy of k, bound
    until the function returns, were missed (-9.3% before; fuzz seed 24382)."""
    check(_regression(_dense("llama", vocab_size=196, hidden_size=36, num_hidden_layers=1,
                             num_attention_heads=12, num_key_value_heads=3, intermediate_size=58, head_dim=16,
                             tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
                      fake=True, method="lora", rank=4, targets=("mlp",), precision="fp32", batch_size=3,
                      seq_len=16, attention="eager"))


@pytest.mark.slow
def test_math_fallback_reads_one_repeated_kv_head_as_a_view():
    """SDPA with attention dropout runs torch's math fallback on CPU; given a sliding-window mask,
    transformers repeats one k/v head as an expanded view, which probs @ v batches as it is for one
    fp32 sequence: it keeps v itself, not a copy at every head (activations +4.2% before; fuzz seed
    24496)."""
    check(_regression(_dense("mixtral", vocab_size=94, hidden_size=24, num_hidden_layers=4,
                             num_attention_heads=3, num_key_value_heads=1, intermediate_size=40, head_dim=16,
                             tie_word_embeddings=False, attention_dropout=0.1, sliding_window=6,
                             num_local_experts=2, num_experts_per_tok=2),
                      layers=1, method="lora", rank=6, targets=("attn",), precision="fp32", batch_size=1,
                      seq_len=7))


@pytest.mark.slow
def test_eager_probs_times_v_under_autocast_with_dropout():
    """Under autocast eager attention's q and k are fp32 (the rotary embedding's products) and bound
    with repeat_kv's fp32 copy of k through probs @ v, which keeps autocast's 16-bit copy of the
    dropped probabilities it saves (-2.7% before; fuzz seed 25537)."""
    check(_regression(_dense("llama", vocab_size=42, hidden_size=36, num_hidden_layers=3, head_dim=6,
                             num_attention_heads=9, num_key_value_heads=3, intermediate_size=17,
                             tie_word_embeddings=False, attention_dropout=0.1, attention_bias=False,
                             mlp_bias=True),
                      layers=1, fake=True, method="lora", rank=5, targets=("default",), precision="amp",
                      batch_size=2, seq_len=17, attention="eager", dropout=0.1))


@pytest.mark.slow
def test_decoder_frees_its_masks_before_the_lm_head():
    """The decoder model returns after its final norm, freeing the embedding output, the position ids
    and Gemma-2's two eager masks it held: the LM head's matmul does not hold them (+3.0% before;
    fuzz seed 25989)."""
    check(_regression({"model_type": "gemma2", "vocab_size": 51, "hidden_size": 22, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 15,
                       "max_position_embeddings": 128, "tie_word_embeddings": False, "pad_token_id": None,
                       "bos_token_id": None, "eos_token_id": None, "head_dim": 10, "sliding_window": 35,
                       "attn_logit_softcapping": 50.0, "final_logit_softcapping": None},
                      fake=True, method="lora", rank=4, targets=("attn",), precision="amp", batch_size=1,
                      seq_len=46, attention="eager"))


@pytest.mark.slow
def test_recomputed_gemma2_layer_ends_inside_its_post_feedforward_norm():
    """A recomputed Gemma-2 layer's last save is its post-feedforward norm's (1 + weight): the
    recompute reaches the moment before the product, with the MLP's output, its fp32 copy and the
    normalised tensor alive beside the recomputed attention (-2.1% before; fuzz seed 25688)."""
    check(_regression({"model_type": "gemma2", "vocab_size": 164, "hidden_size": 96, "num_hidden_layers": 4,
                       "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 67,
                       "max_position_embeddings": 128, "tie_word_embeddings": False, "pad_token_id": None,
                       "bos_token_id": None, "eos_token_id": None, "head_dim": 4, "attention_dropout": 0.1,
                       "sliding_window": 71, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
                      layers=1, fake=True, method="lora", rank=5, targets=("qv",), precision="amp",
                      batch_size=3, seq_len=45, attention="eager", grad_checkpointing=True))


@pytest.mark.slow
def test_eager_one_sequence_operands_are_the_modules_own_tensors():
    """Eager attention on one sequence without autocast: the matmuls read q, k and v as they are, so
    the operands they save are the attention module's q, k and v, not copies beside them: a
    recomputed layer's kernel end counted them twice (+5.4% before; fuzz seed 27042)."""
    check(_regression(_dense("llama", vocab_size=94, hidden_size=15, num_hidden_layers=2, head_dim=16,
                             num_attention_heads=3, num_key_value_heads=3, intermediate_size=19,
                             tie_word_embeddings=True, attention_bias=False, mlp_bias=True),
                      fake=True, method="lora", rank=1, targets=("all-linear",), precision="fp32",
                      batch_size=1, seq_len=22, attention="eager", grad_checkpointing=True))
