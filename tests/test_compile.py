"""`--compile`: what a compiled graph saves, planned against torch's own partition and the allocator.

Three oracles, none of them our formula: the saved set AOTAutograd's min-cut partition chooses for a
real decoder layer (slow: it compiles), the CPU allocator's peak over real compiled steps recorded by
`benchmarks/compile_step.py` (fast: the record is planned again here), and the CLI's own output.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lora_planner.activations import Tensor, compiled_section, recompute_frontier
from tests.test_cli import plan_json, run

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "results" / "trace" / "compile-cpu.json"
# how far the plan of a compiled step may be from the allocator's peak of a real one
PEAK_BOUND = 0.05


def _benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compile_step

    return compile_step


def _planned(case: dict, mode: str) -> int:
    from lora_planner.measure.traced_step import predicted_terms

    bench = _benchmark()
    spec, _ = bench.model(case["model"])
    setup = replace(bench.setup_of(case["method"], case["precision"], case["grad_checkpointing"], mode),
                    batch_size=case["batch_size"], seq_len=case["seq_len"])
    return predicted_terms(spec, setup, "cpu")[0]["peak"]


def test_record_has_provenance_and_compiled_cases():
    data = json.loads(RECORD.read_text())
    assert data["provenance"]["command"].startswith("python benchmarks/compile_step.py")
    assert {"torch", "transformers", "date"} <= set(data["provenance"])
    assert len(data["cases"]) == len(_benchmark().CASES)
    assert {c["compile"] for c in data["cases"]} == {"layers", "model"}


@pytest.mark.parametrize("index", range(len(_benchmark().CASES)))
def test_compiled_plan_follows_the_recorded_allocator(index):
    """Each recorded case planned now: the compiled plan within PEAK_BOUND of the allocator's peak
    of the real compiled step, and where compiling moved the allocator's peak by more than 1%, the
    plan moves the same way, by at least half as much and at most twice."""
    case = json.loads(RECORD.read_text())["cases"][index]
    eager, compiled = _planned(case, "none"), _planned(case, case["compile"])
    measured = case["compiled"]["allocator_peak"]
    assert abs(compiled - measured) / measured <= PEAK_BOUND, (case, compiled)
    change = measured - case["eager"]["allocator_peak"]
    if abs(change) > 0.01 * measured:
        planned_change = compiled - eager
        assert 0.5 <= planned_change / change <= 2, (case, planned_change, change)


def test_frontier_recomputes_a_pointwise_chain_from_what_is_saved():
    """silu(gate) with the gate saved is rebuilt from it, and without, the gate is kept instead (a
    fused-away result weighs twice its bytes); a sum of two unsaved outputs weighs as much as itself
    and is kept; a tensor made before the compiled region is kept, not rebuilt inside it."""
    gate = Tensor(100, 2, True, 1)
    act = Tensor(100, 2, True, 2, (gate,))
    assert recompute_frontier(act, {gate.key: 0}) == ()
    assert recompute_frontier(act, {}) == (gate,)
    up = Tensor(100, 2, True, 3)
    bigger = Tensor(100, 4, True, 4, (gate,))  # an fp32 cast of a 16-bit gate
    assert recompute_frontier(bigger, {}) == (gate,)
    assert recompute_frontier(Tensor(100, 2, True, 5, (gate, up)), {}) is None
    # made before the region (its input): kept as it is, not rebuilt from the saved gate
    mid = Tensor(100, 4, True, 6, (gate,))
    top = Tensor(100, 4, True, 7, (mid,))
    assert recompute_frontier(top, {gate.key: 0}) == ()
    assert recompute_frontier(top, {gate.key: 0}, region_start=7) == (mid,)
    assert recompute_frontier(mid, {}, region_start=7) is None
    assert compiled_section("layers", True) and not compiled_section("layers", False)
    assert compiled_section("model", False) and not compiled_section("none", True)


def test_compile_option_in_help_setup_and_explain():
    help_text = run("plan", "--help").output
    assert "--compile" in help_text and "torchtune" in help_text
    data = plan_json("--model", "llama-3.1-8b", "--method", "lora", "--compile", "layers")
    assert data["setup"]["compile"] == "layers"
    assert plan_json("--model", "llama-3.1-8b", "--method", "lora")["setup"]["compile"] == "none"
    explained = run("--model", "llama-3.1-8b", "--method", "lora", "--compile", "layers", "--explain")
    assert "each layer compiled" in explained.output and "compile layers" in explained.output
    bad = run("--model", "llama-3.1-8b", "--compile", "jit")
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_compile_lowers_saved_activations_of_a_large_model():
    """Full fine-tuning of an 8B model: compiling the layers drops the norms' normalised fp32
    tensors and silu(gate) from every layer's saved set."""
    eager = plan_json("--model", "llama-3.1-8b", "--method", "full", "--precision", "amp")
    compiled = plan_json("--model", "llama-3.1-8b", "--method", "full", "--precision", "amp",
                         "--compile", "layers")
    before, after = (d["plans"][0]["memory_bytes"] for d in (eager, compiled))
    assert after["activations"] < before["activations"] and after["peak"] < before["peak"]


def _partition_saved_bytes(config: dict, method: str, autocast: bool, targets: list[str]) -> list[int]:
    """Compile each decoder layer of a 2-layer model built from `config` and run a step; return, for
    each graph compiled (the first layer's again when its input needs no gradient and the second's
    does), the bytes of the tensors the min-cut partition saved for backward: its forward graph's
    outputs past the user's, views counted once by their base, parameters and the rotary cos and sin
    (inputs shared by every layer) left out."""
    import contextlib

    import torch
    import torch._inductor.compile_fx as compile_fx
    from transformers import AutoConfig, AutoModelForCausalLM

    torch._dynamo.reset()
    found: list[int] = []
    partition = compile_fx.min_cut_rematerialization_partition

    def recorded(joint, inputs, **kwargs):
        fw, bw = partition(joint, inputs, **kwargs)
        outputs = next(iter(fw.graph.find_nodes(op="output"))).args[0][kwargs["num_fwd_outputs"]:]
        bases = {}
        for node in outputs:
            base = node
            while base.op == "call_function" and base.target in VIEWS:
                base = base.args[0]
            value = base.meta.get("val")
            if not isinstance(value, torch.Tensor):
                continue
            if base.op == "placeholder":
                if tuple(value.shape) != (2, 16, hidden):
                    continue  # a parameter, or the rotary cos and sin
            bases[base.name] = value.numel() * value.element_size()
        found.append(sum(bases.values()))
        return fw, bw

    aten = torch.ops.aten
    VIEWS = {aten.view.default, aten.permute.default, aten.t.default, aten._unsafe_view.default,
             aten.transpose.int, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
             aten.reshape.default, aten.slice.Tensor, aten.select.int, aten.alias.default}
    hidden = config.get("hidden_size", config.get("n_embd"))
    hf = AutoConfig.for_model(**config)
    hf.use_cache = False
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf)
    model.train()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                 fan_in_fan_out=config["model_type"] == "gpt2"))
    for module in model.modules():
        if type(module).__name__.endswith(("DecoderLayer", "Block")) and hasattr(module, "mlp"):
            module.compile()
    ids = torch.randint(0, config["vocab_size"], (2, 16))
    compile_fx.min_cut_rematerialization_partition = recorded
    # no cached graph: the partition runs
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    finally:
        compile_fx.min_cut_rematerialization_partition = partition
        torch._dynamo.reset()
    assert found, "no graph was partitioned"
    return found


LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 72,
         "max_position_embeddings": 64, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
         "tie_word_embeddings": False}
# GPT-2's default dropout (0.1): on CPU attention runs torch's math kernel, masks are kept
GPT2 = {"model_type": "gpt2", "vocab_size": 96, "n_embd": 48, "n_layer": 2, "n_head": 4,
        "n_positions": 64, "bos_token_id": None, "eos_token_id": None}


@pytest.mark.slow
@pytest.mark.parametrize("config,targets,method,precision,first_miss", [
    (LLAMA, ["q_proj", "v_proj"], "full", "fp32", 0), (LLAMA, ["q_proj", "v_proj"], "full", "amp", 0),
    (LLAMA, ["q_proj", "v_proj"], "lora", "amp", 0), (GPT2, ["c_attn"], "full", "fp32", 0),
    # the first layer over frozen embeddings: the partition keeps ln_2's normalised input and one
    # statistic where the walk keeps the block's input, c_proj's output and both statistics
    (GPT2, ["c_attn"], "lora", "amp", 0.04)],
    ids=["llama-full-fp32", "llama-full-amp", "llama-lora-amp", "gpt2-full-fp32", "gpt2-lora-amp"])
def test_layer_saved_set_is_the_partitioners(config, targets, method, precision, first_miss):
    """The walk's compiled saved set of a decoder layer, byte for byte against the forward graph
    outputs torch's min-cut partition made for a real compiled layer (each layer's own graph; a
    first layer whose input needs no gradient gets a graph of its own, within `first_miss`)."""
    from lora_planner.activations import profile
    from lora_planner.architecture import layout
    from lora_planner.precision import get_precision
    from lora_planner.spec import TrainSetup, spec_from_hf_config
    from lora_planner.stacks import resolve
    from lora_planner.step import _training, conditions

    spec = spec_from_hf_config(config)
    setup = resolve(TrainSetup(method=method, rank=4, targets=tuple(targets), precision=precision,
                               batch_size=2, seq_len=16, stack="torch", compile="layers"))
    wrapped, trainable, _ = _training(spec, setup, layout(spec))
    walk = profile(spec, conditions(setup, get_precision(precision), "cpu"), wrapped, trainable)
    graphs = _partition_saved_bytes(config, method, precision == "amp", targets)
    assert walk.layers[-1] == graphs[-1]
    if len(graphs) > 1:  # the first layer's own graph; the walk saves the rotary cos and sin there
        rotary = 2 * setup.seq_len * spec.head_dim * 4 if config is LLAMA else 0
        assert abs(walk.layers[0] - rotary - graphs[0]) <= first_miss * graphs[0], (walk.layers, graphs)


def test_trace_refuses_a_fake_compiled_step(tmp_path):
    """Inductor's kernels run on real tensors: --compile with --fake is one line and exit 2."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_embd": 64, "n_layer": 2,
                                  "n_head": 4, "n_positions": 128}))
    result = run("trace", "--model", str(config), "--compile", "layers", "--fake")
    assert result.exit_code == 2 and "without --fake" in result.output and "Traceback" not in result.output
