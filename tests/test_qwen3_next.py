"""Qwen3-Next (`qwen3_next`: gated-DeltaNet linear attention beside gated full attention, a routed
expert block with a gated shared expert), held to transformers (models built from random small configs
on the meta device), PEFT (the trainable count of every preset), the catalog entry to a meta-device
build of its config, and traced CPU steps of random configs (transformers' torch fallback of the
delta rule and the convolution: fla and causal_conv1d are not installed)."""

from __future__ import annotations

import random

import pytest

from lora_planner.architecture import layout
from lora_planner.catalog import get_model
from lora_planner.counts import expand_targets, lora_trainable
from lora_planner.measure.fuzz import random_case, random_config, real
from lora_planner.spec import TrainSetup, spec_from_hf_config, to_hf_config

from .test_cli import plan_json

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from .hf import build_meta, build_meta_from_config  # noqa: E402
from .tracing import check_traced_case, one_thread  # noqa: E402,F401

SEEDS = [0, 1] + [pytest.param(s, marks=pytest.mark.slow) for s in range(2, 30)]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_configs_lay_out_as_transformers_builds(seed):
    """Every parameter's name and shape: linear and full layers in any order, value heads a multiple
    of key heads, partial rotary factors, dense layers among the sparse ones."""
    config = random_config(random.Random(seed), "qwen3_next")
    spec = spec_from_hf_config(config)
    model = build_meta_from_config(config)
    assert {p.name: p.shape for p in layout(spec).params} == {
        n: tuple(p.shape) for n, p in model.named_parameters()}
    # and the spec written back builds the same model
    assert layout(spec).total_params == sum(p.numel() for p in build_meta(spec).parameters())


@pytest.mark.parametrize("seed", SEEDS[:1] + SEEDS[2:8])
@pytest.mark.parametrize("targets", ["default", "qv", "attn", "mlp", "all-linear", "gate",
                                     "shared_expert_gate", "out_proj,k_proj"])
def test_presets_train_what_peft_trains(seed, targets):
    """PEFT converts Qwen3-Next's names as Qwen2-MoE's: gate_proj/up_proj/down_proj reach the fused
    experts only (the shared expert and dense MLPs stay unwrapped), `gate` the router; all-linear
    wraps the linear-attention projections and the shared expert's gate too."""
    config = random_config(random.Random(seed), "qwen3_next")
    config.pop("mlp_only_layers", None)
    config.pop("decoder_sparse_step", None)  # at least one sparse layer
    if "," in targets:  # names of both kinds of layer: a model with both (a preset keeps what is there)
        layers = max(2, config["num_hidden_layers"])
        config.pop("full_attention_interval", None)
        config.update(num_hidden_layers=layers,
                      layer_types=[("linear_attention", "full_attention")[i % 2] for i in range(layers)])
    spec = spec_from_hf_config(config)
    setup = TrainSetup(rank=2, targets=tuple(targets.split(",")))
    names = expand_targets(spec, setup.targets)
    lora = peft.LoraConfig(r=2, target_modules="all-linear" if names == ("all-linear",) else list(names))
    with torch.device("meta"):
        wrapped = peft.get_peft_model(build_meta_from_config(config), lora)
    assert lora_trainable(spec, setup).count == wrapped.get_nb_trainable_parameters()[0]


def test_catalog_entry_counts_as_transformers_builds_it():
    """qwen3-next-80b-a3b: 79,674,391,296 parameters, the total published for this shape, equal to
    the meta-device build of its config (the checkpoint's mtp.* layer is not built)."""
    spec = get_model("qwen3-next-80b-a3b")
    config = to_hf_config(spec)
    assert config["layer_types"] == [
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(48)]
    model = build_meta_from_config(config)
    assert layout(spec).total_params == sum(p.numel() for p in model.parameters()) == 79_674_391_296


def test_catalog_entry_plans_lora_and_qlora_with_the_kernel_note():
    out = plan_json("--model", "Qwen/Qwen3-Next-80B-A3B-Instruct", "--method", "lora,qlora")
    assert [p["method"] for p in out["plans"]] == ["lora", "qlora"]
    assert any("flash-linear-attention" in n for n in out["notes"])


def _module_saved_bytes(module, x, autocast: bool) -> int:
    """Bytes the tracer (`MemoryTracer`) finds made by `module(x)` and alive at its forward's end,
    its output aside: what autograd keeps for backward, and autocast's cached 16-bit weight copies
    (the forward is read inside autocast, as a step's is)."""
    from lora_planner.measure.tracer import MemoryTracer

    tracer = MemoryTracer(module, inputs=(x,))
    with tracer, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with tracer.phase("forward"):
            out = module(x)
    return tracer.report().terms["activations"] - out.untyped_storage().nbytes()


# (precision, batch, tokens: 1 to 3 chunks of 64, what trains: everything, or one in-projection alone
# over an input that needs no gradient, as LoRA on the first layer)
MODULE_CASES = [("fp32", 2, 5, "all"), ("bf16", 2, 70, "all"), ("amp", 1, 140, "all"),
                ("fp32", 2, 70, "in_proj_qkvz"), ("amp", 2, 5, "in_proj_qkvz"),
                ("fp32", 1, 140, "in_proj_ba"), ("bf16", 2, 5, "in_proj_ba")]


def _one_delta_net(heads: tuple[int, int], precision: str):
    """(spec, module, dtype): one transformers `Qwen3NextGatedDeltaNet` of a tiny config with `heads`
    (key heads, value heads), random weights in the precision's dtype, and the planner's spec of it."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    config = {"model_type": "qwen3_next", "vocab_size": 32, "hidden_size": 24, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "num_experts": 2,
              "num_experts_per_tok": 1, "linear_num_key_heads": heads[0], "linear_num_value_heads": heads[1],
              "linear_key_head_dim": 6, "linear_value_head_dim": 10, "layer_types": ["linear_attention"]}
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    module = Qwen3NextGatedDeltaNet(build_meta_from_config(config).config, 0).to(dtype)
    return spec_from_hf_config(config), module, dtype


@pytest.mark.parametrize("heads", [(2, 4), (3, 3)])
@pytest.mark.parametrize("precision,batch,seq,trains", MODULE_CASES)
def test_gated_delta_net_saves_what_autograd_keeps(precision, batch, seq, trains, heads):
    """The walk of one gated-DeltaNet (`gated_delta_net`, with `chunk_delta_rule_saves` or
    `autocast_delta_rule_saves`) keeps the bytes autograd keeps for transformers' module as it runs
    without fla and causal-conv1d, byte for byte; with as many value heads as key heads (3, 3) an fp32
    q, k and z are views the ops keep whole, with more (2, 4) copies."""

    from lora_planner.activations import Conditions, Graph, gated_delta_net

    spec, module, dtype = _one_delta_net(heads, precision)
    everything = trains == "all"
    for name, p in module.named_parameters():
        p.requires_grad_(everything or name.startswith(trains))
    # (not a leaf, as a layer's normed input is not: autocast would cache one cast of a leaf)
    x = torch.randn(batch, seq, 24, dtype=dtype, requires_grad=everything) * 1
    traced = _module_saved_bytes(module, x, precision == "amp")

    a = "model.layers.0.linear_attn"
    paths = {a, *(f"{a}.{m}" for m in ("conv1d", "in_proj_qkvz", "in_proj_ba", "norm", "out_proj"))}
    g = Graph(Conditions(batch, seq, 2 if precision == "bf16" else 4, precision == "amp"), {},
              paths if everything else {f"{a}.{trains}"})
    h = g.new(batch * seq * 24, 2 if precision == "bf16" else 4, everything)
    gated_delta_net(g, spec, a, h)
    assert g.saved_bytes() - (h.nbytes if h.key in g.saved else 0) == traced


@pytest.mark.parametrize("heads", [(2, 4), (3, 3), (1, 3)])
@pytest.mark.parametrize("precision,batch,seq", [("fp32", 2, 5), ("bf16", 2, 70), ("amp", 1, 140),
                                                 ("fp32", 1, 140), ("amp", 2, 5)])
def test_gated_delta_net_forward_peak_without_gradients(precision, batch, seq, heads):
    """A gated-DeltaNet none of whose tensors needs a gradient (LoRA on the MLPs only, the first
    layer) saves nothing, so its forward's most is a transient inside the delta rule: the walk's
    forward moments (`delta_rule_forward_live`, `delta_rule_loop_unsaved`) reach the traced peak of
    transformers' module byte for byte, over 1 to 3 chunks, with key heads regrouped (2, 4), not
    (3, 3), or one key head (1, 3)."""

    from lora_planner.activations import Conditions, Graph, gated_delta_net
    from lora_planner.measure.tracer import MemoryTracer

    spec, module, dtype = _one_delta_net(heads, precision)
    module.requires_grad_(False)
    x = torch.randn(batch, seq, 24, dtype=dtype)
    tracer = MemoryTracer(module, inputs=(x,))
    with tracer, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "amp"):
        with tracer.phase("forward"):
            module(x)
    report = tracer.report()
    traced = report.phase_peaks["forward"] - report.terms["parameters"]

    g = Graph(Conditions(batch, seq, 2 if precision == "bf16" else 4, precision == "amp"), {}, set())
    gated_delta_net(g, spec, "model.layers.0.linear_attn", g.new(batch * seq * 24, dtype.itemsize, False))
    assert g.forward_live == traced


# random steps, traced on CPU: a few by default, more with -m slow
# (beyond 60: steps with LoRA on the MLPs only, where the first layer's delta rule runs with no
# gradient and its forward transient sets the peak, and one full fine-tune's known miss)
TRACED = [1, 3, 104] + [pytest.param(s, marks=pytest.mark.slow)
                        for s in (*range(0, 61), 89, 102, 112) if s not in (1, 3)]
# the peaks planned more than 1% off the trace (activations exact in all): a full fine-tune of one layer
# whose backward peak is under by 1.3%
KNOWN_PEAK_MISSES: dict[int, float] = {112: 0.014}


@pytest.mark.parametrize("seed", TRACED)
def test_traced_steps(seed):
    """Random Qwen3-Next steps planned, then traced on CPU: model states and activations byte for
    byte, the peak within 1% (or the case's known bound)."""
    check_traced_case(real(random_case(seed, "qwen3_next")), KNOWN_PEAK_MISSES.get(seed, 0.01))


ALLOCATOR_SEEDS = [3, pytest.param(5, marks=pytest.mark.slow), pytest.param(6, marks=pytest.mark.slow),
                   pytest.param(2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("seed", ALLOCATOR_SEEDS)
def test_planned_peak_matches_the_allocator(seed):
    """A random step traced with the CPU allocator's reading too (`measure/allocator.py`): the plan's
    whole peak (checkpointing's CPU RNG states included) within 1% of the allocator's."""
    from lora_planner.measure.fuzz import run_case

    case = real(random_case(seed, "qwen3_next"))
    result = run_case(case, allocator=True)
    allocated = result.allocator.peak_bytes
    assert abs(result.predicted["peak"] - allocated) / allocated <= 0.01, (case.label, allocated)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("seed", [3, 7])
def test_the_native_walk_agrees_with_the_recording(seed, method):
    """A structural cross-check: one random Qwen3-Next config (linear and full layers, at full depth)
    planned by the native walk and from transformers' own layers recorded under fake tensors
    (`measure.recorded`, each kind of layer on its own), in pure bf16 (the fake grouped matmul of the
    experts takes bf16 only): activations and peak within 1%, model states equal."""
    from lora_planner.gpus import GPUS
    from lora_planner.measure.recorded import recorded_model
    from lora_planner.plan import make_plan

    config = random_config(random.Random(seed), "qwen3_next")
    spec = spec_from_hf_config(config, name="qwen3-next-small")
    setup = TrainSetup(method=method, precision="pure-bf16", batch_size=2, seq_len=80, stack="torch",
                       targets=("all-linear",))
    native = make_plan(spec, (setup,), GPUS[0]).plans[0]
    recorded = make_plan(recorded_model(config, spec.name, "", (setup,)), (setup,), GPUS[0]).plans[0]
    assert recorded.trainable_params == native.trainable_params
    for key in ("weights", "gradients", "optimizer_states"):
        assert recorded.memory[key].bytes == native.memory[key].bytes, key
    for key in ("activations", "peak"):
        ours, walked = recorded.memory[key].bytes, native.memory[key].bytes
        assert abs(ours - walked) <= 0.01 * walked, (key, ours, walked)
