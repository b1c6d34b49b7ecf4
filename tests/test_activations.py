"""Activation and timeline arithmetic: pure Python, no torch."""

import pytest

from lora_planner.activations import Conditions, profile
from lora_planner.architecture import layout
from lora_planner.catalog import get_model
from lora_planner.errors import PlanError
from lora_planner.gpus import get_gpu
from lora_planner.plan import make_plan
from lora_planner.spec import TrainSetup

H100 = get_gpu("h100")


def _plan(model: str, **setup):
    return make_plan(get_model(model), (TrainSetup(**setup),), H100).plans[0]


def _profile(name: str, method: str, **cond):
    spec = get_model(name)
    arch = layout(spec, "causal-lm", 2)
    trainable = {m.path for m in arch.modules} if method == "full" else set()
    wrapped = {} if method == "full" else {
        m.path: 8 for m in arch.modules if m.path.endswith(("q_proj", "v_proj", "c_attn"))}
    base = {"batch_size": 2, "seq_len": 256, "weight_bytes": 2, "autocast": False}
    return profile(spec, Conditions(**{**base, **cond}), wrapped, trainable)


@pytest.mark.parametrize("model", ["gpt2", "llama-3.1-8b", "qwen2.5-7b", "gemma-2-2b", "phi-3-mini",
                                   "mixtral-8x7b"])
def test_frozen_base_saves_less_than_full_fine_tuning(model):
    attention = "eager" if model.startswith("gemma") else "sdpa"
    full = _profile(model, "full", attention=attention)
    lora = _profile(model, "lora", attention=attention)
    assert lora.total < full.total
    # the head's log-softmax output is kept either way: tokens x vocab x 4 B
    spec = get_model(model)
    assert lora.head >= 2 * 256 * spec.vocab_size * 4


def test_checkpointing_keeps_layer_inputs_only():
    plain = _profile("llama-3.1-8b", "full")
    ckpt = _profile("llama-3.1-8b", "full", grad_checkpointing=True)
    hidden = 2 * 256 * 4096 * 2  # batch x seq x hidden x bf16
    assert ckpt.layer_inputs == (hidden,) * 32
    assert ckpt.total < plain.total / 5


def test_eager_attention_keeps_the_square_scores():
    sdpa = _profile("llama-3.1-8b", "full", seq_len=1024)
    eager = _profile("llama-3.1-8b", "full", seq_len=1024, attention="eager")
    probs = 2 * 32 * 1024 * 1024  # batch x heads x s x s
    # per layer: the fp32 softmax output and its bf16 copy at least
    assert (eager.layers[0] - sdpa.layers[0]) >= probs * (4 + 2) - 3 * 2 * 1024 * 4096 * 2


def test_activations_grow_linearly_in_batch_for_sdpa():
    one = _profile("llama-3.1-8b", "lora", batch_size=1, seq_len=512)
    four = _profile("llama-3.1-8b", "lora", batch_size=4, seq_len=512)
    # layer 0 also holds the rotary cos/sin tables, which do not depend on the batch
    assert four.layers[1:] == tuple(4 * n for n in one.layers[1:])
    assert four.layers[0] - 4 * one.layers[0] == -3 * 2 * 512 * 128 * 2


def test_gpu_dropout_masks_are_one_byte():
    """On CUDA dropout keeps a bool mask (1 B per element, `native_dropout`); on CPU the fp32 noise
    it multiplied by (4 B). GPT-2 small (12 layers, 12 heads, 768 wide, dropout 0.1) drops out the
    attention probabilities (batch x heads x s x s) and both residual branches (batch x s x 768) in
    every layer, and the embeddings once: the plans differ by 3 B on each of those elements."""
    gpu = _profile("gpt2", "full", device="cuda", weight_bytes=4, attention="eager")
    cpu = _profile("gpt2", "full", device="cpu", weight_bytes=4, attention="eager")
    layers, heads, width, batch, seq = 12, 12, 768, 2, 256
    masked = layers * (batch * heads * seq * seq + 2 * batch * seq * width) + batch * seq * width
    assert cpu.total - gpu.total == (4 - 1) * masked


def test_peak_is_a_phase_of_the_step_and_holds_the_model_states():
    # a plain torch loop (foreach AdamW): 8B full fine-tuning's states and their temporary dominate
    p = _plan("llama-3.1-8b", method="full", precision="mixed", batch_size=1, seq_len=2048, stack="torch")
    states = sum(p.memory[k].bytes for k in ("weights", "gradients", "master_weights", "optimizer_states"))
    assert p.peak_phase == "optimizer"
    assert p.memory["peak"].bytes >= states
    lora = _plan("llama-3.1-8b", method="lora", precision="mixed", batch_size=8, seq_len=4096)
    assert lora.peak_phase in ("forward", "backward")
    assert lora.memory["peak"].bytes > lora.memory["weights"].bytes + lora.memory["activations"].bytes


def test_bad_step_settings_are_plan_errors():
    with pytest.raises(PlanError, match="attention must be one of"):
        _plan("gpt2", method="lora", attention="flash3")
    with pytest.raises(PlanError, match="batch size and sequence length must be positive"):
        _plan("gpt2", method="lora", batch_size=0)


@pytest.mark.parametrize("model", ["gpt2", "llama-3.1-8b", "gemma-2-2b", "mixtral-8x7b"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_activation_offload_shares_the_walk_without_it(model, method):
    """`profile` answers activation offload with the walk made without it (offload moves the
    checkpointed layer inputs to CPU memory; the forward saves the same): the walk itself, run
    with offload on, gives the same profile."""
    from lora_planner import activations

    spec = get_model(model)
    arch = layout(spec, "causal-lm", 2)
    trainable = {m.path for m in arch.modules} if method == "full" else set()
    wrapped = {} if method == "full" else {
        m.path: 8 for m in arch.modules if m.path.endswith(("q_proj", "v_proj", "c_attn"))}
    cond = Conditions(batch_size=2, seq_len=256, weight_bytes=2, autocast=False, grad_checkpointing=True,
                      activation_offload=True)
    walked = activations._profile.__wrapped__(spec, cond, tuple(sorted(wrapped.items())),
                                              frozenset(trainable))
    shared = profile(spec, cond, wrapped, trainable)
    assert walked.offloaded and shared == walked
