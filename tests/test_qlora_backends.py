"""QLoRA's 4-bit layers as each implementation runs them: what the matmul keeps for backward, what
dequantising a weight holds, and what the weights take, asked of bitsandbytes (and torchao, where it
is installed) on CPU and compared with the plan.

bitsandbytes' releases differ in one line of `MatMul4Bit.forward` (commit 9e753741, first in 0.43.2):
`ctx.tensors = (A, B)` before, `(None, B)` after. The installed release is traced as it is; the older
behaviour is traced by making the installed MatMul4Bit keep A the way that line did, so the tracer,
not the plan's formula, says what keeping it costs in a real model (inputs shared with other ops
count once).
"""

from __future__ import annotations

import contextlib
import random

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_planner.quant import (  # noqa: E402
    BNB_DROPS_SAVED_INPUT,
    bnb_saves_input,
    parse_bnb_version,
    torchao_dequant_bytes,
    torchao_nf4_bytes,
)
from tests.tracing import one_thread  # noqa: E402, F401


def _quantise(model, compute_dtype) -> None:
    """Every nn.Linear but the LM head swapped for bitsandbytes' Linear4bit (NF4, double
    quantisation), as transformers' `replace_with_bnb_linear` does; quantised by moving to CPU."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and f"{name}.{child_name}".lstrip(".") != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                setattr(module, child_name, q.to("cpu"))


@contextlib.contextmanager
def _keeping_input():
    """bitsandbytes before 0.43.2: MatMul4Bit.forward ends with `ctx.tensors = (A, B)` when any of A
    and B needs a gradient (the line commit 9e753741 changed to `(None, B)`)."""
    from bitsandbytes.autograd._functions import MatMul4Bit

    original = MatMul4Bit.forward

    def forward(ctx, A, B, out=None, bias=None, quant_state=None):
        output = original(ctx, A, B, out, bias, quant_state)
        if any(ctx.needs_input_grad[:2]):
            ctx.tensors = (A, ctx.tensors[1])
        return output

    MatMul4Bit.forward = staticmethod(forward)
    try:
        yield
    finally:
        MatMul4Bit.forward = original


def _config(rng: random.Random) -> dict:
    heads = rng.choice([2, 4])
    return {"model_type": "llama", "vocab_size": 64 * rng.randint(2, 4), "hidden_size": 16 * heads,
            "intermediate_size": 16 * rng.randint(3, 8), "num_hidden_layers": rng.randint(1, 3),
            "num_attention_heads": heads, "num_key_value_heads": rng.choice([1, heads]),
            "max_position_embeddings": 64, "attention_dropout": 0.0}


def _traced_activations(config: dict, targets: list[str], lora_dropout: float, quant: str | None,
                        batch: int, seq: int, compute: str = "bf16") -> int:
    """Bytes autograd keeps at the end of a forward (bf16 model and adapters; 4-bit layers computing
    in `compute`): LoRA (`quant` None) or QLoRA with the installed bitsandbytes (`new`) or as before
    0.43.2 (`old`)."""
    return _traced(config, targets, lora_dropout, quant, batch, seq, compute).terms["activations"]


def _traced(config: dict, targets: list[str], lora_dropout: float, quant: str | None, batch: int, seq: int,
            compute: str = "bf16"):
    """The tracer's report of one step (`_traced_activations`)."""
    import peft
    import transformers

    from lora_planner.measure.step import train_step
    from lora_planner.measure.tracer import MemoryTracer

    torch.manual_seed(0)
    hf = transformers.AutoConfig.for_model(**config)
    hf.use_cache, hf._attn_implementation = False, "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(hf).to(torch.bfloat16)
    if quant:
        _quantise(model, {"bf16": torch.bfloat16, "fp32": torch.float32}[compute])
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       lora_dropout=lora_dropout),
                                autocast_adapter_dtype=False)
    # PEFT gives the adapters on a 4-bit layer its compute dtype (`_get_base_layer_device_and_dtype`),
    # which the plan notes but does not model: bf16 adapters keep the 4-bit layers' own terms apart
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    model.train()
    ids = torch.randint(0, config["vocab_size"], (batch, seq))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    with _keeping_input() if quant == "old" else contextlib.nullcontext():
        tracer = MemoryTracer(model, optimizer, inputs=(ids, ids))
        with tracer:
            train_step(model, optimizer, ids, ids, phase=tracer.phase)
    return tracer.report()


def _planned_activations(config: dict, targets: list[str], lora_dropout: float, version: str | None,
                         batch: int, seq: int, compute: str = "bf16") -> int:
    """The plan's activations for the traced setup on CPU (where a dropout mask takes the input's
    dtype): LoRA (`version` None) or QLoRA on that release."""
    from lora_planner.measure.traced_step import predicted_terms
    from lora_planner.spec import TrainSetup, spec_from_hf_config

    spec = spec_from_hf_config(config, name="qlora-trace")
    setup = TrainSetup(method="qlora" if version else "lora", rank=4, targets=tuple(targets),
                       precision="pure-bf16", batch_size=batch, seq_len=seq, lora_dropout=lora_dropout,
                       bnb_version=version or "0.50.1", bnb_compute_dtype=compute, stack="torch",
                       optimizer="sgd")
    return predicted_terms(spec, setup, "cpu")[0]["activations"]


def _check_against_lora(config: dict, targets: list[str], dropout: float, batch: int, seq: int,
                        compute: str = "bf16") -> None:
    """The saved activations of LoRA and of QLoRA on the installed release and on one before 0.43.2
    (4-bit layers computing in `compute`), traced and planned, byte for byte."""
    for quant, version in ((None, None), ("new", "0.45.0"), ("old", "0.43.1")):
        traced = _traced_activations(config, targets, dropout, quant, batch, seq, compute)
        assert traced == _planned_activations(config, targets, dropout, version, batch, seq, compute), \
            (quant, targets, dropout, compute)


def test_installed_bitsandbytes_keeps_what_the_plan_says_its_release_keeps():
    """The installed release's MatMul4Bit, asked directly: does it keep its input? The plan's rule
    for that release (`bnb_saves_input`) must agree, so a future release that changes it fails here."""
    from bitsandbytes.functional import quantize_4bit

    weight = torch.randn(32, 64, dtype=torch.bfloat16)
    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.randn(300, 64, dtype=torch.bfloat16, requires_grad=True)
    y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    kept = y.grad_fn.tensors[0]  # the custom Function's ctx
    assert (kept is not None) == bnb_saves_input(parse_bnb_version(bnb.__version__))
    assert parse_bnb_version(bnb.__version__) >= BNB_DROPS_SAVED_INPUT or kept is not None


def test_old_bitsandbytes_keeps_the_inputs_of_unwrapped_4bit_layers():
    """LoRA on the attention output only: the 4-bit q, k, v, gate, up and down projections are
    unwrapped, so before 0.43.2 their matmuls keep inputs no other op keeps (the MLP product
    feeding down_proj); the installed release keeps nothing more than LoRA."""
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 64, "attention_dropout": 0.0}
    _check_against_lora(config, ["o_proj"], 0.0, 1, 8)
    old = _planned_activations(config, ["o_proj"], 0.0, "0.43.1", 1, 8)
    assert old > _planned_activations(config, ["o_proj"], 0.0, "0.43.2", 1, 8)


@pytest.mark.slow
@settings(max_examples=24, deadline=None)
@given(st.integers(0, 10**6))
def test_qlora_activations_match_traced_bitsandbytes_forwards(seed):
    """Random small llamas with real Linear4bit layers and PEFT adapters, targets and LoRA dropout
    drawn, and the 4-bit layers' compute dtype (bnb_4bit_compute_dtype bf16 or fp32): the saved
    activations of LoRA and of QLoRA per release, traced and planned, byte for byte."""
    rng = random.Random(seed)
    config = _config(rng)
    targets = rng.choice([["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"], ["o_proj"]])
    _check_against_lora(config, targets, rng.choice([0.0, 0.1]), rng.randint(1, 2), rng.choice([8, 16]),
                        rng.choice(["bf16", "fp32"]))


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10**6))
def test_qlora_step_peak_matches_traced_bitsandbytes_steps(seed):
    """The whole step's peak beyond the weights, traced and planned, within 1%, per release (the
    quantisation state is a module attribute made before the step, which the tracer does not count
    among the parameters, so the weights are set aside on both sides)."""
    from lora_planner.measure.traced_step import predicted_terms
    from lora_planner.spec import TrainSetup, spec_from_hf_config

    rng = random.Random(seed)
    config = _config(rng)
    targets = rng.choice([["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"], ["o_proj"]])
    dropout, batch, seq = rng.choice([0.0, 0.1]), rng.randint(1, 2), rng.choice([8, 16])
    for quant, version in (("new", "0.50.1"), ("old", "0.43.1")):
        report = _traced(config, targets, dropout, quant, batch, seq)
        setup = TrainSetup(method="qlora", rank=4, targets=tuple(targets), precision="pure-bf16",
                           batch_size=batch, seq_len=seq, lora_dropout=dropout, bnb_version=version,
                           stack="torch", optimizer="sgd")
        predicted, _ = predicted_terms(spec_from_hf_config(config, name="qlora-peak"), setup, "cpu")
        traced = report.peak_bytes - report.terms["parameters"]
        assert abs(predicted["peak"] - predicted["weights"] - traced) <= 0.01 * traced, (quant, seed)


@pytest.mark.parametrize(("out_features", "in_features"), [(256, 128), (128, 384)])
def test_torchao_nf4_bytes_and_dequant_transient(out_features, in_features):
    """torchao's NF4Tensor (torchtune's QLoRA): its storage, and the most its linear holds while it
    dequantises the weight, traced (skipped where torchao is not installed)."""
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    from lora_planner.measure.tracer import MemoryTracer

    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    t = nf4.to_nf4(weight)
    inner = (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4)
    numel = weight.numel()
    assert sum(x.numel() * x.element_size() for x in inner) == torchao_nf4_bytes(numel, 2)
    x = torch.randn(4, in_features, dtype=torch.bfloat16, requires_grad=True)
    tracer = MemoryTracer(torch.nn.Module(), record_timeline=True)
    with tracer:
        with tracer.phase("forward"):
            y = nf4.linear_nf4(x, t)
        with tracer.phase("backward"):
            y.sum().backward()
    forward = max(live for phase, _, _, live in tracer.timeline if phase == "forward")
    # beyond the dequantisation: the input's bf16 copy the tracer saw made, none; the output after it
    assert torchao_dequant_bytes(numel, 2) <= forward <= torchao_dequant_bytes(numel, 2) + 1024


def _cli(*args: str):
    from click.testing import CliRunner

    from lora_planner.cli import main

    return CliRunner().invoke(main, ["--model", "llama-3.2-1b", "--method", "qlora", *args])


@pytest.mark.parametrize(("args", "message"), [
    (("--bnb-version", "0.38"), "has no 4-bit layers"),
    (("--bnb-version", "latest"), "must be a version"),
    (("--quant-backend", "torchao", "--no-double-quant"), "always quantises its block scalers"),
])
def test_bad_quant_choices_are_one_line_errors(args, message):
    result = _cli(*args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_the_planned_release_is_in_setup_notes_and_explain():
    import json

    old = json.loads(_cli("--bnb-version", "0.43.1", "--format", "json", "--explain").output)
    new = json.loads(_cli("--format", "json", "--explain").output)
    assert old["setup"]["bnb_version"] == "0.43.1" and new["setup"]["bnb_version"] == "0.50.1"
    assert new["setup"]["quant_backend"] == "bnb" and new["setup"]["bnb_compute_dtype"] == "bf16"
    assert any("0.43.2" in n for n in old["notes"]) and not any("0.43.2" in n for n in new["notes"])
    assert old["plans"][0]["memory_bytes"]["activations"] > new["plans"][0]["memory_bytes"]["activations"]
    assert any(t.startswith("dequant_transient: ") for t in new["explain"][0]["terms"])
    text = _cli("--bnb-version", "0.43.1", "--explain").output
    assert "QLoRA base: bitsandbytes 0.43.1" in text and "keeps its bf16 input" in text


def test_torchtune_stack_plans_torchao_nf4():
    """torchtune's QLoRA quantises with torchao: its preset picks that backend, and an explicit
    --quant-backend wins over the preset."""
    import json

    tune = json.loads(_cli("--stack", "torchtune", "--format", "json").output)
    chosen = json.loads(_cli("--stack", "torchtune", "--quant-backend", "bnb", "--format", "json").output)
    assert tune["setup"]["quant_backend"] == "torchao" and chosen["setup"]["quant_backend"] == "bnb"
    nf4 = [d["plans"][0]["weights_bytes"]["weights_nf4"] for d in (tune, chosen)]
    assert nf4[0] != nf4[1]


def test_torchao_shards_all_but_its_mean_and_table():
    """What FSDP shards of a torchao NF4Tensor: the inner tensors torchao splits and all-gathers
    (`_INNER_TENSOR_NAMES_FOR_SHARDING`), split along rows; the rest is replicated (skipped where
    torchao is not installed)."""
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    from lora_planner.quant import nf4_gathered_bytes, torchao_replicated_bytes

    weight = torch.randn(512, 64, dtype=torch.bfloat16)
    t = nf4.to_nf4(weight)
    sharded = sum(getattr(t, name).numel() * getattr(t, name).element_size()
                  for name in nf4._INNER_TENSOR_NAMES_FOR_SHARDING)
    assert sharded == nf4_gathered_bytes("torchao", weight.numel(), 2)
    assert sharded + torchao_replicated_bytes(2) == torchao_nf4_bytes(weight.numel(), 2)
    halves = torch.split(t, 256)
    assert [sum(getattr(h, name).numel() * getattr(h, name).element_size()
                for name in nf4._INNER_TENSOR_NAMES_FOR_SHARDING) for h in halves] == [sharded // 2] * 2


@pytest.mark.parametrize("compute", ["bf16", "fp32"])
def test_installed_bitsandbytes_holds_a_4bit_bias_where_the_plan_says(compute):
    """An fp32 Linear4bit's bias after one forward, asked of the installed release: its width is
    what `bnb_bias_bytes` says for that release and compute dtype (from 0.50.0 the compute dtype)."""
    from lora_planner.quant import COMPUTE_DTYPES, bnb_bias_bytes

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute]
    layer = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    assert layer.bias.dtype == torch.float32
    layer(torch.randn(3, 64, requires_grad=True)).sum().backward()
    planned = bnb_bias_bytes(parse_bnb_version(bnb.__version__), COMPUTE_DTYPES[compute], 4)
    assert layer.bias.element_size() == planned
