"""The activation walk held to what autograd really saves, layer by layer: a structural oracle.

Each case is a seeded random small config of a native family (`fuzz.random_config`) and a step
(`measure.saved_tape.random_case`). The real side builds the model from the config with random
weights and records every storage autograd keeps after its forward (`recorded_tape`); the walk's side
is what `activations.Graph` saved (`Profile.saves`). Per section (the embedding, each decoder layer,
the head) the two multisets of sizes must be equal. A comparison of peaks can hide two misses that
cancel; this cannot. A difference found and not fixed is listed per case, with its bound in bytes
and why, in saved_tape_known.json.
"""

import json
import random
from pathlib import Path

import pytest

from lora_planner.errors import PlanError
from lora_planner.measure.saved_tape import LORA_VARIANTS, METHODS, PRECISIONS, VARIANTS, random_case
from lora_planner.spec import FAMILIES, TrainSetup
from tests.tracing import check_traced_case, one_thread  # noqa: F401

pytest.importorskip("peft")

KNOWN = json.loads((Path(__file__).parent / "saved_tape_known.json").read_text())


def check(key: str, case) -> None:
    """The case's walk and recorded tapes agree per section, or differ only as its known entry says."""
    from lora_planner.measure.saved_tape import compare

    diffs = compare(case.config, case.setup)
    known = KNOWN.get(key)
    if known is None:
        assert not diffs, (case.label, [(d.section, d.walk_only, d.recorded_only) for d in diffs])
        return
    assert diffs, f"{case.label} agrees now: drop its entry from saved_tape_known.json"
    for d in diffs:
        bound = known["bytes"].get(d.section)
        assert bound is not None and abs(d.bytes) <= bound, (case.label, d)


def keys(seeds: range, variants: tuple[str, ...], precisions: tuple[str, ...] = PRECISIONS) -> list[str]:
    """'family seed variant method precision' of each case drawn (LoRA-only variants for LoRA)."""
    return [f"{family} {seed} {variant} {method} {precision}"
            for family in FAMILIES for seed in seeds for method in METHODS for precision in precisions
            for variant in variants if method == "lora" or variant not in LORA_VARIANTS]


def run(key: str) -> None:
    family, seed, variant, method, precision = key.split()
    case = random_case(family, int(seed), method, precision, variant)
    if case is None:
        pytest.skip("the planner refuses this draw (LoRA dropout or fp32 adapters on fused experts)")
    check(key, case)


SWEEP = keys(range(6), ("plain",))
VARIANT_SWEEP = keys(range(3), VARIANTS[1:], ("fp32",))


@pytest.mark.parametrize("key", [f"{family} 0 plain {METHODS[i % 2]} {PRECISIONS[i // 2 % 2]}"
                                 for i, family in enumerate(FAMILIES)])
def test_walk_saves_what_autograd_saves(key):
    """Seed 0 of every family, the method and precision turning with the family's place."""
    run(key)


@pytest.mark.slow
@pytest.mark.parametrize("key", SWEEP)
def test_walk_saves_what_autograd_saves_every_family(key):
    run(key)


@pytest.mark.slow
@pytest.mark.parametrize("key", VARIANT_SWEEP)
def test_walk_saves_what_autograd_saves_beyond_the_plain_step(key):
    """Autocast, fp32 adapters over a bf16 base, trained biases, DoRA, dropout, packing and the
    chunked loss."""
    run(key)


@pytest.mark.parametrize("key", ["gpt2 1 bias-all lora fp32", "deepseek_v3 1 fp32-adapters lora fp32",
                                 "gpt_oss 1 amp full fp32", "mixtral 1 dropout lora fp32",
                                 "gpt2 0 dora lora fp32", "llama 1 chunked-loss full fp32",
                                 "qwen2 0 packing lora fp32"])
def test_walk_saves_what_autograd_saves_fast_variants(key):
    run(key)


def test_the_oracle_sees_a_save_the_walk_forgets(monkeypatch):
    """The oracle can fail: a walk whose elementwise ops keep nothing misses SiLU's saved input in
    every layer, and the recorded side names the backward node that keeps it."""
    from lora_planner import activations
    from lora_planner.measure.saved_tape import compare

    monkeypatch.setattr(activations.Graph, "unary",
                        lambda self, x, saves="input": self.pointwise(x.numel, x.itemsize, x.grad, x))
    activations._profile.cache_clear()
    case = random_case("llama", 0, "full", "fp32")
    try:
        diffs = compare(case.config, case.setup)
    finally:
        activations._profile.cache_clear()
    layers = case.config["num_hidden_layers"]
    assert [d.section for d in diffs] == [f"layer {i}" for i in range(layers)]
    for d in diffs:
        assert d.walk_only == () and [s.op for s in d.recorded_only] == ["SiluBackward0.self"]


def test_the_diff_tool_prints_each_layers_difference(monkeypatch, capsys):
    """benchmarks/saved_tape.py: every section agrees for a drawn case (exit 0); with the walk's
    elementwise saves dropped, each layer's real-only save is printed with its node (exit 1)."""
    import runpy
    import sys

    from lora_planner import activations

    tool = str(Path(__file__).resolve().parent.parent / "benchmarks" / "saved_tape.py")
    monkeypatch.setattr(sys, "argv", [tool, "llama", "0", "--method", "full"])
    with pytest.raises(SystemExit) as agreed:
        runpy.run_path(tool, run_name="__main__")
    assert agreed.value.code == 0 and "every section's saved sizes agree" in capsys.readouterr().out
    monkeypatch.setattr(activations.Graph, "unary",
                        lambda self, x, saves="input": self.pointwise(x.numel, x.itemsize, x.grad, x))
    with pytest.raises(SystemExit) as differed:
        runpy.run_path(tool, run_name="__main__")
    out = capsys.readouterr().out
    assert differed.value.code == 1 and out.count("SiluBackward0.self") == out.count("layer ") > 0


def test_known_entries_name_cases_the_tests_draw():
    assert set(KNOWN) <= set(SWEEP) | set(VARIANT_SWEEP)
    for entry in KNOWN.values():
        assert entry["case"] and entry["why"]
        assert all(isinstance(v, int) and v > 0 for v in entry["bytes"].values())


def test_a_checkpointed_step_is_refused_in_one_line():
    from lora_planner.measure.saved_tape import walk_tape
    from lora_planner.spec import spec_from_hf_config

    case = random_case("llama", 0, "lora", "fp32")
    with pytest.raises(PlanError, match="as it first runs: drop gradient checkpointing"):
        walk_tape(spec_from_hf_config(case.config), case.setup.with_(grad_checkpointing=True))


# --- what the oracle found, held to the tracer's whole step too ----------------------------------

def _traced_case(family: str, seed: int, **setup):
    from lora_planner.measure.fuzz import Case, random_config

    config = random_config(random.Random(f"{family} {seed}"), family)
    return Case(seed, config, TrainSetup(method="lora", stack="torch", **setup), None, fake=False)


def test_trained_biases_make_their_outputs_need_a_gradient():
    """PEFT's bias="all" over frozen weights: the first layer's LayerNorm saves its input and
    statistics once its bias trains, and everything after the trained q/k/v biases saves as for a
    trained layer (this step's activations traced 0.95% above the walk before, others' up to 4.9%)."""
    check_traced_case(_traced_case("gpt2", 1, rank=4, targets=("qv",), precision="amp", bias="all",
                                   batch_size=2, seq_len=19, attention="eager"))


def test_autocast_over_fp32_adapters_runs_a_sigmoid_router_in_bf16():
    """The Trainer's bf16 autocast over a bf16 model with fp32 adapters: GLM-4-MoE's router casts its
    input to fp32 and autocast casts it back, so its logits, scores and weight copy are bf16 (this
    step's activations were planned 0.2% above the trace before, another step's peak 5.9%)."""
    check_traced_case(_traced_case("glm4_moe", 4, rank=4, targets=("attn",), precision="bf16",
                                   adapter_dtype="fp32", batch_size=2, seq_len=23, attention="sdpa"))


def test_a_chunked_head_keeps_a_copy_of_each_strided_chunk():
    """torchtune's chunked head over several sequences: a chunk of the sequence is not contiguous and
    the head's matmul keeps a copy of it, except a one-position chunk, which its reshape views (and so
    keeps all of h); this step's activations traced 0.96% above the walk before, which counted h
    once."""
    from lora_planner.measure.fuzz import Case

    case = random_case("gpt2", 0, "full", "fp32", "chunked-loss")
    check_traced_case(Case(0, case.config, case.setup, None, fake=False))
