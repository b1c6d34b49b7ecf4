"""The step engine's tape held to autograd's, op by op: the same ops keep the same sizes, per layer.

Each case is a seeded random small config of a family the engine models (`fuzz.random_config`,
drawn by `measure.saved_tape.random_case`), full fine-tuning or LoRA, fp32 or pure bf16 (a slow
sweep adds autocast and torchtune's chunked loss). The real side is a CPU forward of the model
transformers builds from that config with random weights, every storage autograd keeps recorded
and grouped by the backward node that first keeps it (`measure.op_tape.recorded_ops`); the
engine's side is its tape (`engine.forward_tape`), each op's rule translated to autograd's node
names by `op_tape.NODES`. A sum or a multiset of sizes can hide two ops that trade sizes; the
sequence cannot. A difference found and not fixed would be listed per case, with its bound in
bytes and why, in engine_tape_known.json.
"""

import json
from pathlib import Path

import pytest

from lora_planner.errors import PlanError
from lora_planner.measure.saved_tape import METHODS, PRECISIONS, random_case

pytest.importorskip("peft")

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "olmo2")  # the engine's
KNOWN = json.loads((Path(__file__).parent / "engine_tape_known.json").read_text())


def run(key: str) -> None:
    """'family seed variant method precision' (`saved_tape.random_case`'s): the engine's and the
    real op sequences agree in every section, or differ only within the case's known entry."""
    from lora_planner.engine import check
    from lora_planner.measure.op_tape import compare_ops
    from lora_planner.spec import spec_from_hf_config

    family, seed, variant, method, precision = key.split()
    case = random_case(family, int(seed), method, precision, variant)
    if case is None:
        pytest.skip("the planner refuses this draw")
    try:
        check(spec_from_hf_config(case.config), case.setup)
    except PlanError as exc:  # OLMo 2's fp32 norm product in pure bf16, so far
        pytest.skip(str(exc))
    diffs = compare_ops(case.config, case.setup)
    known = KNOWN.get(key)
    if known is None:
        assert not diffs, (case.label, {d.section: d.lines for d in diffs})
        return
    assert diffs, f"{case.label} agrees now: drop its entry from engine_tape_known.json"
    for d in diffs:
        bound = known["bytes"].get(d.section)
        assert bound is not None and abs(d.bytes) <= bound, (case.label, d.section, d.lines)


SWEEP = [f"{family} {seed} plain {method} {precision}" for family in FAMILIES for seed in range(1, 11)
         for method in METHODS for precision in PRECISIONS]
# autocast over fp32 weights and torchtune's chunked loss, the steps beyond the plain one the engine models
VARIANT_SWEEP = [f"{family} {seed} {variant} {method} fp32" for family in FAMILIES for seed in range(4)
                 for method in METHODS for variant in ("amp", "chunked-loss")]


@pytest.mark.parametrize("key", [f"{family} 0 plain {METHODS[i % 2]} {PRECISIONS[(i + 1) // 2 % 2]}"
                                 for i, family in enumerate(FAMILIES)])
def test_engine_tape_keeps_what_autograd_keeps(key):
    """Seed 0 of every family, the method and precision turning with the family's place."""
    run(key)


@pytest.mark.slow
@pytest.mark.parametrize("key", SWEEP)
def test_engine_tape_keeps_what_autograd_keeps_every_family(key):
    run(key)


@pytest.mark.slow
@pytest.mark.parametrize("key", VARIANT_SWEEP)
def test_engine_tape_keeps_what_autograd_keeps_beyond_the_plain_step(key):
    run(key)


def test_known_differences_are_explained():
    assert set(KNOWN) <= set(SWEEP) | set(VARIANT_SWEEP)
    for entry in KNOWN.values():
        assert entry["why"] and all(isinstance(v, int) and v > 0 for v in entry["bytes"].values())


def test_the_oracle_sees_an_op_keep_the_wrong_tensor(monkeypatch):
    """The oracle can fail: an engine whose SiLU keeps its output instead of its input keeps the
    storage the gate's product keeps too: each layer's silu keeps as many bytes as before (a sum per
    op agrees), its product one tensor fewer, the gate projection's output nowhere."""
    from lora_planner.engine import rules
    from lora_planner.measure.op_tape import compare_ops

    monkeypatch.setitem(rules.RULES, "silu", rules.Rule(rules._outputs, rules._fresh))
    case = random_case("llama", 0, "full", "fp32")
    diffs = compare_ops(case.config, case.setup)
    assert [d.section for d in diffs] == [f"layer {i}" for i in range(case.config["num_hidden_layers"])]
    for d in diffs:
        (_, engine, real), = d.runs
        assert [o.rule for o in engine] == [o.rule for o in real] == ["mul"]
        assert len(engine[0].sizes) == 1 and len(real[0].sizes) == 2 and d.bytes == -real[0].sizes[1]


def test_the_diff_tool_prints_each_layers_differing_ops(monkeypatch, capsys):
    """benchmarks/saved_tape.py --engine: every section agrees for a drawn case (exit 0); with the
    engine's SiLU keeping its output, each layer's differing product is printed (exit 1)."""
    import runpy
    import sys

    from lora_planner.engine import rules

    tool = str(Path(__file__).resolve().parent.parent / "benchmarks" / "saved_tape.py")
    monkeypatch.setattr(sys, "argv", [tool, "llama", "0", "--method", "full", "--engine"])
    with pytest.raises(SystemExit) as agreed:
        runpy.run_path(tool, run_name="__main__")
    assert agreed.value.code == 0 and "ops keep the same sizes, in the same order" in capsys.readouterr().out
    monkeypatch.setitem(rules.RULES, "silu", rules.Rule(rules._outputs, rules._fresh))
    with pytest.raises(SystemExit) as differed:
        runpy.run_path(tool, run_name="__main__")
    out = capsys.readouterr().out
    assert differed.value.code == 1 and out.count("| real mul[") == out.count("layer ") > 0
