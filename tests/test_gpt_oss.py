"""GPT-OSS planned natively: its published configs read as the catalog entries, its counts as
transformers builds them, and what LoRA trains on its attention, router and fused experts as PEFT
0.21 trains it (`target_modules` for the linear layers, `target_parameters` for the router weight
and the 3-D expert tensors), on random tiny configs."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from lora_planner.catalog import get_model
from lora_planner.counts import lora_trainable, total_params
from lora_planner.spec import TrainSetup, spec_from_hf_config

from .test_cli import plan_json
from .test_cli_families import GPT_OSS_20B

torch = pytest.importorskip("torch")
from tests.tracing import one_thread  # noqa: E402, F401 (autouse: traces run on one thread)

# openai/gpt-oss-120b's config.json: the 20b's (tests/test_cli_families.py) with more layers and experts
GPT_OSS_120B = {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 18}


@pytest.mark.parametrize(("config", "name"), [(GPT_OSS_20B, "gpt-oss-20b"), (GPT_OSS_120B, "gpt-oss-120b")])
def test_the_catalog_entries_copy_their_published_configs(config, name):
    entry = get_model(name)
    read = spec_from_hf_config(config, name=entry.name, source=entry.source)
    assert replace(read, attn_dropout=None) == entry



def test_published_sizes():
    """20.9B and 116.8B parameters, as OpenAI's model card states them (the meta-device build is
    held to the same count in tests/test_parity.py)."""
    assert round(total_params(get_model("gpt-oss-20b")) / 1e9, 1) == 20.9
    assert round(total_params(get_model("gpt-oss-120b")) / 1e9, 1) == 116.8


TARGETS = (("q_proj", "v_proj"), ("gate_up_proj",), ("down_proj",), ("router",), ("mlp",),
           ("all-linear",), ("router", "gate_up_proj", "down_proj", "o_proj"), ("attn",))


def _random_config(rng: random.Random) -> dict:
    heads = rng.choice((2, 4))
    layers = rng.randint(1, 3)
    return {"model_type": "gpt_oss", "vocab_size": rng.randint(16, 90), "hidden_size": 8 * rng.randint(1, 4),
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": rng.choice([k for k in (1, 2, 4) if heads % k == 0]),
            "head_dim": 2 * rng.randint(2, 6), "intermediate_size": 8 * rng.randint(1, 3),
            "num_local_experts": (experts := rng.randint(2, 5)),
            "num_experts_per_tok": rng.randint(1, min(3, experts)), "sliding_window": rng.randint(2, 9),
            "layer_types": [rng.choice(("sliding_attention", "full_attention")) for _ in range(layers)],
            "attention_bias": rng.random() < 0.8, "tie_word_embeddings": rng.random() < 0.3,
            "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


@pytest.mark.parametrize("seed", range(6))
def test_lora_trainable_equals_peft_on_random_configs(seed):
    """PEFT's own trainable count, on a random tiny GPT-OSS built from its config, for targets over
    the attention, the router weight (a ParamWrapper of rank r) and the fused expert tensors (rank r
    each: targeted by name, no v4 conversion doubles gate_up_proj), with and without biases."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_planner.measure.traced_step import _peft_targets

    rng = random.Random(seed)
    config = _random_config(rng)
    spec = spec_from_hf_config(config)
    built = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(built)
    assert total_params(spec) == sum(p.numel() for p in model.parameters())
    setup = TrainSetup(rank=rng.choice((1, 2, 4, 8)), targets=rng.choice(TARGETS),
                       bias=rng.choice(("none", "all")))
    trainable = lora_trainable(spec, setup)
    modules, parameters, _ = _peft_targets(trainable.adapters)
    lora = peft.LoraConfig(r=setup.rank, target_modules=modules or None, bias=setup.bias,
                           target_parameters=parameters or None, init_lora_weights=False)
    with torch.device("meta"):
        peft_model = peft.get_peft_model(model, lora)
    assert trainable.count == peft_model.get_nb_trainable_parameters()[0], (setup.targets, setup.bias)


# Traced steps held to the allocator as well as to the tracer: full and LoRA, fp32 and 16-bit,
# checkpointing off and on. Two by default, the rest with -m slow.
ALLOCATOR_SEEDS = (4, 15)  # full fp32; LoRA under autocast, checkpointed
ALLOCATOR_SLOW_SEEDS = (0, 6, 7, 11, 17, 22, 24, 34, 37, 44, 45, 60)


def _allocator_case(seed: int):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from lora_planner.measure.fuzz import random_case
    from lora_planner.measure.step import quiet_libraries
    from lora_planner.measure.traced_step import sliced, trace

    case = random_case(seed, "gpt_oss")
    spec = sliced(spec_from_hf_config(case.config, name=f"fuzz-{seed}"), case.layers)
    with quiet_libraries():
        result = trace(spec, case.setup, seed=seed, hf_config=case.build_config(), allocator=True)
    errors = result.errors()
    assert errors["activations"] == 0, (case.label, errors)
    for term in ("weights", "gradients", "optimizer_states"):
        assert errors[term] == 0, (case.label, term, errors)
    assert abs(errors["peak"]) <= 0.01, (case.label, errors)
    # the plan's whole peak, checkpointing's saved CPU RNG states included, against the allocator's
    allocated = result.allocator.peak_bytes
    assert abs(result.predicted["peak"] - allocated) / allocated <= 0.01, (case.label, allocated)


@pytest.mark.parametrize("seed", ALLOCATOR_SEEDS)
def test_planned_peak_matches_the_tracer_and_the_allocator(seed):
    _allocator_case(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", ALLOCATOR_SLOW_SEEDS)
def test_planned_peak_matches_the_tracer_and_the_allocator_many(seed):
    _allocator_case(seed)


def test_mxfp4_checkpoint_bytes_are_the_blocks_and_scales_transformers_dequantises():
    """The MXFP4 experts' bytes: for each fused expert tensor, the `_blocks` (E, out, in/32, 16) and
    `_scales` (E, out, in/32) uint8 tensors that transformers' own dequantiser turns back into the
    (E, in, out) parameter the model trains; every other tensor in bf16."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from lora_planner.architecture import layout
    from lora_planner.checkpoint_sizes import mxfp4_tensor_bytes

    config = {**_random_config(random.Random(0)), "hidden_size": 64, "intermediate_size": 96}
    spec = spec_from_hf_config(config)
    params = layout(spec).params
    stored, bf16 = 0, 0
    for p in params:
        if len(p.shape) == 3 and not p.name.endswith("_bias"):
            e, d_in, d_out = p.shape
            blocks = torch.zeros(e, d_out, d_in // 32, 16, dtype=torch.uint8)
            scales = torch.full((e, d_out, d_in // 32), 127, dtype=torch.uint8)
            assert tuple(convert_moe_packed_tensors(blocks, scales).shape) == p.shape
            stored += blocks.numel() + scales.numel()
        else:
            bf16 += 2 * p.numel
    assert mxfp4_tensor_bytes(params) == (stored, bf16)


def test_plan_notes_say_what_gpt_oss_is_stored_and_trained_as():
    data = plan_json("--model", "gpt-oss-20b", "--method", "lora,qlora")
    notes = " ".join(data["notes"])
    assert "MXFP4" in notes and "dequantize=True" in notes and "bitsandbytes#1849" in notes
    assert "vllm-flash-attn3" in notes
    eager = plan_json("--model", "gpt-oss-20b", "--attention", "eager")
    assert "vllm-flash-attn3" not in " ".join(eager["notes"])
    # the larger model answers every method, QLoRA storing less than LoRA (its attention in NF4)
    big = plan_json("--model", "gpt-oss-120b", "--method", "full,lora,qlora")
    assert [p["method"] for p in big["plans"]] == ["full", "lora", "qlora"]
    assert big["plans"][2]["memory_bytes"]["weights"] < big["plans"][1]["memory_bytes"]["weights"]


EXPERT_TARGETS = (("gate_up_proj",), ("down_proj",), ("router",), ("gate_up_proj", "down_proj"),
                  ("q_proj", "down_proj"), ("router", "gate_up_proj", "v_proj"))


def _expert_lora_case(seed: int):
    """A random GPT-OSS step with LoRA on its router and fused experts (PEFT's ParamWrapper over
    the router's weight, with its bias, and the (E, in, out) expert tensors), traced: activations and
    model states exact, the peak within 1%."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from lora_planner.measure.fuzz import random_case
    from lora_planner.measure.step import quiet_libraries
    from lora_planner.measure.traced_step import sliced, trace

    rng = random.Random(seed)
    case = random_case(seed, "gpt_oss")
    setup = case.setup.with_(method="lora", targets=rng.choice(EXPERT_TARGETS), rank=rng.choice((1, 2, 4)),
                             lora_dropout=0.0)
    spec = sliced(spec_from_hf_config(case.config, name=f"fuzz-{seed}"), case.layers)
    with quiet_libraries():
        result = trace(spec, setup, seed=seed, hf_config=case.build_config())
    errors = result.errors()
    for term in ("weights", "gradients", "optimizer_states", "activations"):
        assert errors[term] == 0, (setup.targets, term, errors)
    assert abs(errors["peak"]) <= 0.01, (setup.targets, errors)


@pytest.mark.parametrize("seed", (0, 7))  # gate_up_proj and down_proj; the router
def test_expert_and_router_lora_match_the_trace(seed):
    _expert_lora_case(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 40))
def test_expert_and_router_lora_match_the_trace_many(seed):
    _expert_lora_case(seed)


def test_trace_command_runs_a_real_gpt_oss_layer_eager_and_refuses_sdpa():
    """One layer of gpt-oss-20b at its real shape, under fake tensors: every term as planned. Under
    sdpa transformers would not build it: one line, exit 2."""
    from .test_cli import run

    common = ("trace", "--model", "gpt-oss-20b", "--layers", "1", "--seq-len", "16", "--fake",
              "--precision", "pure-bf16", "--method", "lora", "--targets", "q_proj,down_proj",
              "--format", "json")
    refused = run(*common)
    assert refused.exit_code == 2 and "--attention eager" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    result = run(*common, "--attention", "eager")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for term in ("weights", "gradients", "optimizer_states", "activations"):
        assert data["predicted"][term] == data["traced"][term], term
    assert abs(data["relative_error"]["peak"]) <= 0.001
