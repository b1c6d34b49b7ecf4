"""Differential fuzzing: random small architectures of every family, planned from their config.json,
against a traced step built by transformers from the same config (`benchmarks/fuzz_models.py`).

Every case must trace the activations byte for byte and the peak within 1%. The cases the fuzzer
found wrong and fixed are kept below as named regressions, each with the config that exposed it. A
case still missed is listed in `fuzz_known.json` with its own bounds and reason, so a regression
beyond them fails.
"""

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzz_models import Case, random_case, run_case  # noqa: E402

from lora_planner.spec import TrainSetup  # noqa: E402

PEAK_TOLERANCE = 0.01


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads; one keeps the suite fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Misses the fuzzer found and this change did not fix, one bound per seed (from the recorded runs of
# seeds 0-259, each |error| rounded up): `fuzz_known.json` gives the seed's case, its peak bound, its
# activation bound (0: exact) and why. Checkpointed Mixtral and Gemma-2 steps (recompute transients
# not listed), forward peaks inside attention when hidden is tiny beside seq x heads, and some
# activation-walk misses (Mixtral LoRA under autocast, SDPA on CPU with attention dropout) remain.
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


@pytest.mark.parametrize("seed", range(60), ids=lambda s: f"seed{s}")
def test_random_architecture_matches_its_trace(seed):
    check(random_case(seed), *_bounds(seed, PEAK_TOLERANCE))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(60, 1060), ids=lambda s: f"seed{s}")
def test_random_architecture_matches_its_trace_slow(seed):
    check(random_case(seed), *_bounds(seed, SLOW_TOLERANCE))


# --- regressions the fuzzer found, each with the config that showed it ---------------------------

def _regression(config: dict, layers: int | None = None, fake: bool = False, **setup) -> Case:
    return Case(seed=0, config=config, setup=TrainSetup(**setup), layers=layers, fake=fake)


TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 117, "n_embd": 12, "n_layer": 3, "n_head": 4,
             "n_positions": 128, "tie_word_embeddings": True, "attn_pdrop": 0.0, "embd_pdrop": 0.0}


def test_pure_bf16_lora_keeps_adapters_in_bf16():
    """PEFT upcast 16-bit adapters to fp32 (and a mocked `.to` left them fp32): the trace realised a
    different precision from the one planned (-17% activations)."""
    check(_regression({"model_type": "llama", "vocab_size": 331, "hidden_size": 27, "num_hidden_layers": 2,
                       "num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 105,
                       "max_position_embeddings": 128, "tie_word_embeddings": True, "pad_token_id": None,
                       "bos_token_id": None, "eos_token_id": None, "head_dim": 4, "mlp_bias": True},
                      fake=True, method="lora", rank=4, targets=("attn",), precision="pure-bf16",
                      seq_len=40))


def test_checkpointed_autocast_caches_weight_copies_until_the_loss():
    """Under checkpointing the 16-bit weight copies autocast caches are not saved but live until
    forward ends; GPT-2's sdpa was also planned as the math kernel without any attention dropout."""
    check(_regression(TINY_GPT2, method="full", precision="amp", seq_len=39, grad_checkpointing=True))


def test_cpu_layer_norm_statistics_are_bf16_under_pure_bf16():
    check(_regression({**TINY_GPT2, "n_embd": 33, "n_layer": 1, "n_head": 3, "n_inner": 67,
                       "tie_word_embeddings": False}, fake=True, method="full", precision="pure-bf16",
                      batch_size=3, seq_len=11, dropout=0.0))


def test_checkpointed_lora_keeps_the_embedding_leaf_and_its_gradient():
    """PEFT makes the embedding output a leaf under checkpointing: it and its gradient outlive
    backward, into the optimizer step."""
    check(_regression({"model_type": "mistral", "vocab_size": 187, "hidden_size": 36, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 75,
                       "max_position_embeddings": 128, "tie_word_embeddings": True, "pad_token_id": None,
                       "bos_token_id": None, "eos_token_id": None, "head_dim": 10, "sliding_window": None},
                      method="lora", rank=8, targets=("all-linear",), precision="pure-bf16", seq_len=19,
                      grad_checkpointing=True))


def test_mlp_backward_frees_what_the_down_projection_kept():
    """GPT-2's eager softmax runs in the scores' dtype, and the down projection's LoRA input and the
    output dropout's mask are gone before the MLP's backward peak (+11% before)."""
    check(_regression({**TINY_GPT2, "vocab_size": 190, "n_embd": 40, "n_layer": 1, "attn_pdrop": 0.25,
                       "embd_pdrop": 0.25}, method="lora", rank=4, targets=("mlp",), precision="pure-bf16",
                      seq_len=35, attention="eager", grad_checkpointing=True))


def test_mixtral_lora_plans_the_expert_block_once():
    check(_regression({"model_type": "mixtral", "vocab_size": 343, "hidden_size": 48, "num_hidden_layers": 2,
                       "num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 24,
                       "max_position_embeddings": 128, "tie_word_embeddings": False, "pad_token_id": None,
                       "bos_token_id": None, "eos_token_id": None, "head_dim": 12, "sliding_window": 62,
                       "num_local_experts": 3, "num_experts_per_tok": 1},
                      method="lora", rank=7, targets=("qv",), precision="fp32", batch_size=3, seq_len=12,
                      attention="eager"))


@pytest.mark.parametrize("pdrop", [0.0, 0.1])
def test_gpt2_dropout_is_read_from_the_config(pdrop):
    """A GPT-2 config.json with its dropouts at 0 was planned with the class default 0.1 (+8-33%)."""
    config = {**TINY_GPT2, "attn_pdrop": pdrop, "resid_pdrop": pdrop, "embd_pdrop": pdrop}
    check(_regression(config, method="lora", rank=4, precision="fp32", batch_size=2, seq_len=24,
                      attention="eager"))


def test_full_fine_tuning_of_a_tied_slice_matches_the_readme_example():
    """`lora-plan trace --model gpt2 --method full --seq-len 256 --layers 2` was 8.1% under: the tied
    embedding's two gradients are summed at the end of backward."""
    from lora_planner.catalog import get_model
    from lora_planner.measure.traced_step import sliced, trace

    result = trace(sliced(get_model("gpt2"), 2), TrainSetup(method="full", precision="fp32", seq_len=256),
                   fake=True)
    assert result.predicted["activations"] == result.traced["activations"]
    assert abs(result.errors()["peak"]) <= 0.01
