"""QLoRA's NF4 storage and AdamW8bit's states, asked of bitsandbytes itself (it runs on CPU).

The planner's byte counts (`quant.nf4_bytes`, `optimizers.optimizer_state_bytes`) are compared with
the tensors bitsandbytes actually makes, for seeded random shapes, so a change in either side shows.
"""

import math

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_planner.architecture import Param  # noqa: E402
from lora_planner.optimizers import optimizer_state_bytes  # noqa: E402
from lora_planner.quant import nf4_bytes  # noqa: E402


def _nf4_storage(weight, double_quant: bool) -> int:
    """Bytes bitsandbytes keeps for one NF4 weight: packed codes, absmax and, with double
    quantisation, the second level's absmax and offset. The 16- and 256-entry code books are shared
    lookup tables and are left out, as the planner's docstring says."""
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    total = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        inner = state.state2
        total += inner.absmax.numel() * inner.absmax.element_size()
        total += state.offset.numel() * state.offset.element_size()
    return total


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 700), st.integers(1, 300), st.booleans())
def test_nf4_bytes_match_bitsandbytes(rows, cols, double_quant):
    weight = torch.randn(rows, cols, dtype=torch.bfloat16)
    assert nf4_bytes(rows * cols, double_quant) == _nf4_storage(weight, double_quant)


def test_nf4_bytes_of_a_large_layer_match_bitsandbytes():
    # more than 256 blocks: the second level of double quantisation has several blocks
    weight = torch.randn(1024, 1040, dtype=torch.bfloat16)
    for dq in (False, True):
        assert nf4_bytes(weight.numel(), dq) == _nf4_storage(weight, dq)


def _adamw8bit_state_bytes(shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """(per-parameter state bytes, shared bytes) of bitsandbytes' AdamW8bit after one step on CPU."""
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    per_param, shared = 0, {}
    for p in params:
        for key, value in opt.state[p].items():
            if not torch.is_tensor(value) or value.dim() == 0 and key == "step":
                continue
            if key.startswith("qmap"):  # the quantisation maps: one per optimizer, shared by all
                shared[value.untyped_storage().data_ptr()] = value.numel() * value.element_size()
            else:
                per_param += value.numel() * value.element_size()
    return per_param, sum(shared.values())


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 90)), min_size=1, max_size=4))
def test_adamw_8bit_states_match_bitsandbytes(shapes):
    per_param, shared = _adamw8bit_state_bytes(shapes)
    predicted = optimizer_state_bytes("adamw-8bit", [Param(f"p{i}", s) for i, s in enumerate(shapes)], 4)
    assert predicted == per_param
    assert shared <= 2 * 256 * 4  # two 256-entry fp32 maps, whatever the model's size


def test_adamw_8bit_states_switch_at_bitsandbytes_minimum():
    # either side of min_8bit_size (4,096 values): fp32 states below, 8-bit above
    for shape in ((63, 65), (64, 64), (4096, 3)):
        per_param, _ = _adamw8bit_state_bytes([shape])
        assert optimizer_state_bytes("adamw-8bit", [Param("p", shape)], 4) == per_param


def _traced_nf4_step(out_features: int, in_features: int, compute_dtype):
    """A bitsandbytes 4-bit layer (bf16 weight, quantised by the move to CPU) run forward and
    backward on a batch of 4 in `compute_dtype` under the tracer: the tracer's timeline, and the bytes
    live when backward began."""
    from lora_planner.measure.tracer import MemoryTracer

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, dtype=torch.bfloat16),
                                     requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # moving the layer is what quantises its weight
    x = torch.randn(4, in_features, dtype=compute_dtype, requires_grad=True)
    tracer = MemoryTracer(layer, record_timeline=True)
    with tracer:
        with tracer.phase("forward"):
            y = layer(x)
        with tracer.phase("backward"):
            before = tracer.live_bytes()
            y.sum().backward()
    return tracer.timeline, before


@pytest.mark.parametrize(("out_features", "in_features"), [(160, 96), (77, 200)])
def test_dequant_transient_is_the_16_bit_weight_bitsandbytes_makes(out_features, in_features):
    """A 4-bit layer's backward dequantises its weight to the compute dtype: the tracer sees that
    storage appear, and its size is what the timeline adds for QLoRA."""
    from lora_planner.quant import bnb_dequant_bytes

    steps, _ = _traced_nf4_step(out_features, in_features, torch.bfloat16)
    made = [now - before for (_, _, _, before), (_, op, _, now) in zip(steps, steps[1:], strict=False)
            if op == "dequantize_4bit"]
    assert made == [bnb_dequant_bytes(out_features * in_features, 2, 2)]


def test_dequant_transient_of_a_fp32_compute_dtype():
    """bnb_4bit_compute_dtype fp32 over a bf16-loaded weight: the backward dequantises to bf16 (the
    weight's dtype when quantised) and copies to fp32, both alive at once; the tracer sees it."""
    from lora_planner.quant import bnb_dequant_bytes

    out_features, in_features = 96, 128
    steps, before = _traced_nf4_step(out_features, in_features, torch.float32)
    held = max(live for phase, _, _, live in steps if phase == "backward") - before
    numel = out_features * in_features
    # beyond the dequantised weight: the incoming gradient and the input gradient (4 x in, 4 x out fp32)
    assert held - 4 * 4 * (in_features + out_features) <= bnb_dequant_bytes(numel, 4, 2)
    assert held >= bnb_dequant_bytes(numel, 4, 2)


def _quantised_block_bytes(config: dict, targets: list[str]) -> tuple[list[int], int, int]:
    """What FSDP shards and gathers per decoder layer and for the rest (the root) of a QLoRA model
    built for it: every nn.Linear but the head swapped for bitsandbytes' Linear4bit with
    `quant_storage=bfloat16` and quantised on CPU, PEFT's adapters on top, everything else in bf16
    (FSDP2's parameter dtype). Bytes are the parameters' storage, as FSDP flattens them. Third: the
    bytes of every layer's `quant_state` (absmax, and double quantisation's second level), which are
    module attributes, not parameters."""
    import peft
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    model.to(torch.bfloat16)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and f"{name}.{child_name}".lstrip(".") != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4",
                                      quant_storage=torch.bfloat16)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             quant_storage=torch.bfloat16)
                if child.bias is not None:
                    q.bias = child.bias
                setattr(module, child_name, q.to("cpu"))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))
    model.to(torch.bfloat16)  # the adapters, as FSDP2 gathers them under a bf16 param dtype
    layers = model.base_model.model.model.layers
    blocks = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers]
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            q = m.weight.quant_state
            state += q.absmax.numel() * q.absmax.element_size()
            if q.nested:
                state += q.state2.absmax.numel() * q.state2.absmax.element_size()
                state += q.offset.numel() * q.offset.element_size()
    return blocks, everything - sum(blocks), state


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 10**6))
def test_fsdp_gathers_qlora_blocks_as_bitsandbytes_stores_them(seed):
    """FSDP's gathered-layer buffers under QLoRA: NF4 weights travel as their packed codes (0.5 B
    per weight), not at 16 bits; the planner's per-block bytes equal the real quantised layers'."""
    import random

    from lora_planner.fsdp import units
    from lora_planner.gpus import get_gpu
    from lora_planner.plan import plan_lora
    from lora_planner.precision import get_precision
    from lora_planner.spec import TrainSetup, spec_from_hf_config
    from lora_planner.stacks import resolve
    from lora_planner.step import predict_step

    rng = random.Random(seed)
    heads = rng.choice([2, 4])
    config = {"model_type": "llama", "vocab_size": 64 * rng.randint(2, 6), "hidden_size": 8 * heads,
              "intermediate_size": 4 * rng.randint(5, 20), "num_hidden_layers": rng.randint(1, 3),
              "num_attention_heads": heads, "num_key_value_heads": rng.choice([1, heads]),
              "tie_word_embeddings": rng.random() < 0.5, "max_position_embeddings": 64}
    targets = rng.choice([["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"]])
    blocks, root, state = _quantised_block_bytes(config, targets)

    spec = spec_from_hf_config(config, name="qlora-fsdp")
    setup = resolve(TrainSetup(method="qlora", rank=4, targets=tuple(targets), precision="mixed",
                               num_gpus=2, sharding="fsdp"))
    precision = get_precision(setup.precision)
    plan = plan_lora(spec, setup, get_gpu("h100"))
    memory = {k: t.bytes for k, t in plan.memory.items()}
    u = units(spec, setup, precision, predict_step(spec, setup, precision, memory).states)
    assert list(u.block_bytes) == blocks
    assert u.root_bytes == root
    # each GPU holds a 1/N shard of the weights but the whole quantisation state
    gpu = get_gpu("h100")
    whole = plan_lora(spec, setup.with_(num_gpus=None, sharding="none"), gpu).memory["weights"].bytes
    for n, strategy in ((2, "fsdp"), (3, "zero3"), (8, "fsdp")):
        placed = plan_lora(spec, setup.with_(num_gpus=n, sharding=strategy), gpu).data_parallel
        weight_buffers = ("zero3_live_params", "zero3_prefetch", "zero3_persistent")
        buffers = sum(placed.buffers[k].bytes for k in weight_buffers
                      if k in placed.buffers)  # ZeRO-3's run-time buffers, added to the weights
        assert placed.per_gpu["weights"].bytes - buffers == math.ceil((whole - state) / n) + state
