"""The planner's counts against independent ones: transformers' modules and PEFT's adapters,
built on the meta device for every catalog model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_planner.architecture import layout
from lora_planner.catalog import CATALOG, get_model
from lora_planner.counts import LINEAR_ROUTERS, expand_targets, lora_trainable, total_params
from lora_planner.errors import PlanError
from lora_planner.gpus import get_gpu
from lora_planner.plan import plan_lora
from lora_planner.spec import TrainSetup, spec_from_hf_config, to_hf_config

from .hf import build_meta, torch

peft = pytest.importorskip("peft")

NAMES = [s.name for s in CATALOG]
# PEFT over a meta-device 70B-405B model takes 1-2 s and repeats the structure of its family's first
# catalog entry: the default run applies PEFT to each family's first entry, the slow run to every one
_FIRST = {}
for _spec in CATALOG:
    _FIRST.setdefault(_spec.family, _spec.name)
PEFT_NAMES = [name if name in _FIRST.values() else pytest.param(name, marks=pytest.mark.slow)
              for name in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_total_params_equal_transformers(name):
    spec = get_model(name)
    model = build_meta(spec)
    assert total_params(spec) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_parameter_names_and_shapes_equal_transformers(name):
    # Checkpoint headers and target matching depend on exact names, not only on counts.
    spec = get_model(name)
    model = build_meta(spec)
    theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ours = {p.name: p.shape for p in layout(spec).params}
    assert ours == theirs


@pytest.mark.parametrize("name", NAMES)
def test_hf_config_round_trip(name):
    spec = get_model(name)
    back = spec_from_hf_config(to_hf_config(spec), name=spec.name, source=spec.source)
    assert replace(back, aliases=spec.aliases) == spec


def peft_counts(spec, setup: TrainSetup) -> tuple[int, int]:
    """PEFT's own (trainable, all) for the same LoraConfig, on a meta-device model."""
    model = build_meta(spec, setup.task, setup.num_labels)
    targets = expand_targets(spec, setup.targets)
    config = peft.LoraConfig(
        r=setup.rank,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        bias=setup.bias,
        use_dora=setup.use_dora,
        modules_to_save=list(setup.modules_to_save) or None,
        task_type="SEQ_CLS" if setup.task == "seq-cls" else None,
        init_lora_weights=False,
    )
    with torch.device("meta"):
        peft_model = peft.get_peft_model(model, config)
    return peft_model.get_nb_trainable_parameters()


def ours(spec, setup: TrainSetup) -> tuple[int, int]:
    plan = plan_lora(spec, setup, get_gpu("h100"))
    return plan.trainable_params, plan.all_params


@pytest.mark.parametrize("name", PEFT_NAMES)
@pytest.mark.parametrize("targets", [("default",), ("all-linear",)])
def test_lora_trainable_equals_peft_for_every_model(name, targets):
    spec = get_model(name)
    setup = TrainSetup(method="lora", rank=8, targets=targets)
    if spec.family in LINEAR_ROUTERS and targets == ("all-linear",):
        # PEFT wraps Llama 4's router (an nn.Linear) too, and the model's forward then fails: refused
        with pytest.raises(PlanError, match="router"):
            ours(spec, setup)
        return
    assert ours(spec, setup) == peft_counts(spec, setup)


SMALL = ["gpt2", "llama-3.2-1b", "qwen2.5-0.5b", "gemma-2-2b", "phi-3-mini", "mixtral-8x7b", "qwen3-0.6b",
         "qwen3-30b-a3b", "olmo-2-7b", "smollm3-3b", "gemma-3-1b"]


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize(
    "setup",
    [
        TrainSetup(rank=1, targets=("attn",)),
        TrainSetup(rank=64, targets=("mlp",)),
        TrainSetup(rank=16, targets=("qv",), use_dora=True),
        TrainSetup(rank=8, targets=("all-linear",), bias="all"),
        TrainSetup(rank=4, targets=("attn",), bias="lora_only"),
        TrainSetup(rank=8, targets=("default",), task="seq-cls", num_labels=3),
        TrainSetup(rank=8, targets=("all-linear",), task="seq-cls", num_labels=2, bias="all"),
    ],
    ids=["attn-r1", "mlp-r64", "qv-dora", "all-bias-all", "attn-lora-only", "seq-cls", "seq-cls-all"],
)
def test_lora_variants_equal_peft(name, setup):
    spec = get_model(name)
    if spec.num_experts and setup.use_dora:
        setup = setup.with_(targets=("q_proj", "v_proj"))  # PEFT refuses DoRA on fused experts
    assert ours(spec, setup) == peft_counts(spec, setup)


def test_explicit_suffix_and_regex_targets_equal_peft():
    spec = get_model("gpt2")
    for targets in [("attn.c_proj", "c_fc"), ("transformer.h.0.attn.c_attn",)]:
        setup = TrainSetup(rank=8, targets=targets)
        assert ours(spec, setup) == peft_counts(spec, setup)
    # A regex target is PEFT's string form of target_modules: a full match on the module path.
    setup = TrainSetup(rank=8, targets=(r"re:.*\.h\.[0-3]\.attn\.c_attn",))
    model = build_meta(spec)
    with torch.device("meta"):
        peft_model = peft.get_peft_model(
            model, peft.LoraConfig(r=8, target_modules=r".*\.h\.[0-3]\.attn\.c_attn", init_lora_weights=False)
        )
    assert lora_trainable(spec, setup).count == peft_model.get_nb_trainable_parameters()[0]


KIND_WORDS = {"linear layers": "linear", "embeddings": "embedding", "routers": "router",
              "fused expert gate_up tensors": "gate_up", "fused expert down tensors": "down"}


def peft_wrapped_kinds(spec, setup: TrainSetup) -> dict[str, int]:
    """How many layers of each kind PEFT wraps: LoRA linears and embeddings, and ParamWrappers on a
    router weight (2-D) or a fused expert tensor (3-D, named by the parameter it wraps)."""
    model = build_meta(spec)
    targets = expand_targets(spec, setup.targets)
    config = peft.LoraConfig(r=setup.rank, init_lora_weights=False,
                             target_modules="all-linear" if targets == ("all-linear",) else list(targets))
    with torch.device("meta"):
        peft_model = peft.get_peft_model(model, config)
    layer = peft.tuners.lora.layer
    kinds: dict[str, int] = {}
    for module in peft_model.modules():
        if isinstance(module, layer.ParamWrapper):
            param = module.get_param()
            kind = "router" if param.dim() == 2 else (
                "gate_up" if module.parameter_name == "gate_up_proj" else "down")
        elif isinstance(module, layer.Embedding):
            kind = "embedding"
        elif isinstance(module, layer.LoraLayer):
            kind = "linear"
        else:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("targets", [("default",), ("mlp",), ("all-linear",)])
def test_explained_adapter_formula_counts_what_peft_wraps(name, targets):
    """`--explain`'s trainable line names each kind of wrapped layer with its own formula; its
    counts are PEFT's, so a fused expert tensor is never described as one linear layer."""
    import re

    spec = get_model(name)
    setup = TrainSetup(method="lora", rank=8, targets=targets)
    formula = plan_lora(spec, setup, get_gpu("h100")).adapter_formula
    stated = {KIND_WORDS[words]: int(n)
              for n, words in re.findall(r"(\d+) ([a-z_ ]+?), ", formula)}
    assert stated == peft_wrapped_kinds(spec, setup), formula
