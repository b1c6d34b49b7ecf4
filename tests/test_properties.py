"""Invariants over random shapes and settings (hypothesis)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from lora_planner.contract import to_dict
from lora_planner.counts import lora_trainable, total_params
from lora_planner.gpus import get_gpu
from lora_planner.plan import make_plan
from lora_planner.spec import ModelSpec, TrainSetup

GPU = get_gpu("a100")


@st.composite
def specs(draw):
    family = draw(st.sampled_from(["gpt2", "llama", "qwen2", "gemma2", "phi3", "mistral"]))
    kv = draw(st.integers(1, 4))
    heads = kv * draw(st.integers(1, 4))
    head_dim = draw(st.integers(8, 64))
    hidden = heads * head_dim if family in ("gpt2",) else draw(st.integers(64, 512))
    if family == "gpt2":
        kv = heads
    return ModelSpec(
        name="random", family=family, vocab_size=draw(st.integers(100, 5000)), hidden_size=hidden,
        num_layers=draw(st.integers(1, 6)), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        intermediate_size=draw(st.integers(64, 1024)), tied_embeddings=draw(st.booleans()),
        max_positions=256, qkv_bias=family in ("gpt2", "qwen2"), out_bias=family == "gpt2",
        mlp_bias=family == "gpt2",
    )


targets = st.sampled_from([("default",), ("attn",), ("mlp",), ("all-linear",), ("qv",)])


@settings(max_examples=60, deadline=None)
@given(specs(), targets, st.integers(1, 8))
def test_lora_count_is_linear_in_rank(spec, target, rank):
    one = lora_trainable(spec, TrainSetup(rank=1, targets=target)).count
    assert lora_trainable(spec, TrainSetup(rank=rank, targets=target)).count == rank * one


@settings(max_examples=60, deadline=None)
@given(specs(), targets, st.integers(1, 8))
def test_lora_trains_less_than_full(spec, target, rank):
    assert lora_trainable(spec, TrainSetup(rank=rank, targets=target)).count < total_params(spec)


@settings(max_examples=40, deadline=None)
@given(specs(), targets, st.integers(1, 4), st.integers(1, 4),
       st.sampled_from(["fp32", "amp", "mixed", "bf16", "pure-bf16"]),
       st.sampled_from(["adamw", "adamw-8bit", "sgd", "sgd-momentum", "adafactor"]))
def test_memory_is_monotone_in_rank(spec, target, r1, extra, precision, optimizer):
    base = TrainSetup(method="lora", targets=target, precision=precision, optimizer=optimizer)
    small, large = make_plan(spec, (base.with_(rank=r1), base.with_(rank=r1 + extra)), GPU).plans
    keys = ["weights", "gradients", "master_weights"]
    if optimizer != "adamw-8bit":
        # bitsandbytes keeps fp32 states below 4,096 values, so a larger rank can shrink them.
        keys += ["optimizer_states", "peak"]
    for key in keys:
        assert small.memory[key].bytes <= large.memory[key].bytes
    assert small.checkpoint.bytes < large.checkpoint.bytes


@settings(max_examples=30, deadline=None)
@given(specs(), targets, st.integers(1, 8), st.integers(1, 64), st.integers(16, 4096))
def test_memory_is_monotone_in_batch(spec, target, rank, batch, seq):
    # More sequences per step keep more activations, and nothing else shrinks.
    setup = TrainSetup(method="lora", rank=rank, targets=target, batch_size=batch, seq_len=seq)
    small, large = make_plan(spec, (setup, setup.with_(batch_size=batch + 1)), GPU).plans
    assert small.memory["peak"].bytes <= large.memory["peak"].bytes


@settings(max_examples=30, deadline=None)
@given(specs(), targets, st.integers(1, 8))
def test_json_round_trips(spec, target, rank):
    setups = (TrainSetup(method="full"), TrainSetup(method="qlora", rank=rank, targets=target))
    data = to_dict(make_plan(spec, setups, GPU))
    assert json.loads(json.dumps(data)) == data
