"""--checkpoint-every K: selective layer checkpointing, every K-th decoder layer checkpointed and the
others keeping their saved tensors (torchtune's ac_mode selective / ac_option K, torchtitan's
selective_ac_option K, transformers' every_n_layers).

Held to traced steps of random small configs in which transformers' own checkpointing runs
(non-reentrant `torch.utils.checkpoint`) on the chosen layers only: activations byte for byte, the
peak within 1%. Which layers transformers picks is read from the model it builds, not from ours.
"""

import json
import random
from dataclasses import replace

import pytest
from click.testing import CliRunner

from lora_planner.activations import Conditions, checkpointed_layers
from lora_planner.cli import main as cli
from lora_planner.gpus import GPUS
from lora_planner.plan import make_plan
from lora_planner.resolve import resolve_model
from lora_planner.spec import TrainSetup, spec_from_hf_config
from lora_planner.stacks import get_stack


def _case(seed: int):
    """Seed `seed`'s fuzz case, whole model, checkpointed every 2nd or 3rd layer under the torch
    stack's count (torchtitan's, layers K-1, 2K-1, ...) or the Trainer's (transformers', 0, K, ...)."""
    from lora_planner.measure.fuzz import random_case

    case = random_case(seed)
    rng = random.Random(seed)
    setup = case.setup.with_(grad_checkpointing=True, checkpoint_every=rng.choice((2, 3)),
                             stack=rng.choice(("torch", "hf-trainer")))
    return replace(case, setup=setup, layers=None)


def _mixed(case) -> bool:
    """Whether the case checkpoints some layers and keeps others (the selective part)."""
    spec = spec_from_hf_config(case.config, name="x")
    chosen = checkpointed_layers(spec.num_layers, Conditions(
        1, 1, 4, False, grad_checkpointing=True, checkpoint_every=case.setup.checkpoint_every,
        checkpoint_offset=get_stack(case.setup.stack).checkpoint_offset))
    return any(chosen) and not all(chosen)


def _mixed_seeds(seeds: range, count: int | None = None) -> list[int]:
    found = [s for s in seeds if _mixed(_case(s))]
    return found[:count] if count else found


@pytest.mark.parametrize("seed", _mixed_seeds(range(60), 6))
def test_selective_step_matches_its_trace(seed):
    pytest.importorskip("peft")
    from tests.tracing import check_traced_case

    check_traced_case(_case(seed))


@pytest.mark.slow
@pytest.mark.parametrize("seed", _mixed_seeds(range(60, 200)))
def test_selective_step_matches_its_trace_more_seeds(seed):
    pytest.importorskip("peft")
    from tests.tracing import check_traced_case

    check_traced_case(_case(seed))


@pytest.mark.parametrize("seed", (5, 18))
def test_no_layer_reached_plans_as_unchecked_with_a_leaf_input(seed):
    """Every K-th of fewer than K layers (torchtune's count) checkpoints none: the step keeps every
    saved set, with the embedding output a leaf that requires grad (held by its AccumulateGrad)."""
    pytest.importorskip("peft")
    from lora_planner.measure.fuzz import random_case
    from tests.tracing import check_traced_case

    case = random_case(seed)
    spec = spec_from_hf_config(case.config, name="x")
    setup = case.setup.with_(grad_checkpointing=True, checkpoint_every=spec.num_layers + 1, stack="torch")
    check_traced_case(replace(case, setup=setup, layers=None))


@pytest.mark.parametrize("every", (2, 3, 5))
def test_transformers_picks_the_layers_planned(every):
    """The Trainer stack's count is transformers' own `every_n_layers`: the layers the model built
    with it flags for checkpointing are the planner's."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lora_planner.measure.step import enable_checkpointing

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=7, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)
    model = LlamaForCausalLM(config)
    enable_checkpointing(model, every)
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    flags = tuple(m.gradient_checkpointing for m in blocks)
    offset = get_stack("hf-trainer").checkpoint_offset
    planned = checkpointed_layers(7, Conditions(1, 1, 4, False, grad_checkpointing=True,
                                                checkpoint_every=every, checkpoint_offset=offset))
    assert flags == planned


def _peak(setup: TrainSetup) -> int:
    return make_plan(resolve_model("llama-3.2-1b"), (setup,), GPUS[0]).plans[0].memory["peak"].bytes


def test_selective_peak_lies_between_none_and_every_layer():
    base = TrainSetup(method="lora", batch_size=2, seq_len=2048, stack="torchtune")
    none = _peak(base.with_(grad_checkpointing=False))
    every = _peak(base.with_(grad_checkpointing=True))
    halves = [_peak(base.with_(grad_checkpointing=True, checkpoint_every=k)) for k in (2, 4, 8)]
    assert every < halves[0] < halves[1] < halves[2] < none


def test_cli_json_and_explain_show_the_option():
    runner = CliRunner()
    args = ["plan", "--model", "llama-3.2-1b", "--method", "full", "--checkpoint-every", "4", "--stack",
            "torchtune"]
    out = runner.invoke(cli, [*args, "--format", "json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["setup"]["checkpoint_every"] == 4 and data["setup"]["grad_checkpointing"] is True
    text = runner.invoke(cli, [*args, "--explain"]).output
    assert "on 1 layer in 4 (4 of 16: layers 3, 7, 11, ...; torchtune's and torchtitan's count)" in text
    assert "4 checkpointed layer inputs" in text and "12 layers not checkpointed" in text
    assert "4 of 16 layers checkpointed" in text  # the recomputed forward's FLOPs


@pytest.mark.parametrize("args,message", [
    (["--checkpoint-every", "2", "--no-grad-checkpointing"], "needs checkpointing on"),
    (["--checkpoint-every", "2", "--activation-offload"], "--activation-offload is planned with every layer"),
    (["--checkpoint-every", "0"], "Invalid value for '--checkpoint-every'"),
])
def test_cli_refuses_in_one_line(args, message):
    out = CliRunner().invoke(cli, ["plan", "--model", "llama-3.2-1b", *args])
    assert out.exit_code != 0
    assert message in out.output and "Traceback" not in out.output


# --- --checkpoint-ops: torchtitan's op-level policy ---------------------------------------------------

def _ops_case(seed: int):
    """Seed `seed`'s fuzz case as a full fine-tune on real tensors, every layer (or every 2nd)
    checkpointed under torchtitan's op policy, which the traced step applies to transformers'
    checkpoints as torchtitan's `context_fn` (`measure.step.torchtitan_op_context`)."""
    from lora_planner.measure.fuzz import random_case

    case = random_case(seed)
    rng = random.Random(seed)
    setup = case.setup.with_(method="full", grad_checkpointing=True, checkpoint_ops=True, stack="torch",
                             checkpoint_every=rng.choice((1, 1, 2)))
    return replace(case, setup=setup, layers=None, fake=False)


@pytest.mark.parametrize("seed", (1, 2, 9, 11, 15, 27))
def test_op_policy_step_matches_its_trace(seed):
    """The op outputs the checkpoint caches (every other matmul's; on CPU, no attention kernel's:
    torch's CPU flash kernel is not on torchtitan's list) byte for byte, the peak within 1%: the
    recompute takes a cached output back as it reaches its op, and one at or after its early stop
    stays alive through the layer's backward."""
    from tests.tracing import check_traced_case

    check_traced_case(_ops_case(seed))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(30, 100))
def test_op_policy_step_matches_its_trace_more_seeds(seed):
    from tests.tracing import check_traced_case

    check_traced_case(_ops_case(seed))


def test_op_policy_keeps_every_other_matmul_and_the_cuda_attention_output():
    """Llama 3.1 8B, batch 2 x 8,192 in bf16 on CUDA: per layer q_proj's, v_proj's, gate_proj's and
    down_proj's outputs (the 1st, 3rd, 5th and 7th matmul) and the flash kernel's output and
    log-sum-exp, counted from the model's shapes."""
    base = TrainSetup(method="full", precision="pure-bf16", batch_size=2, seq_len=8192, stack="torch",
                      grad_checkpointing=True)
    spec = resolve_model("llama-3.1-8b")
    plain = make_plan(spec, (base,), GPUS[0]).plans[0].memory["activations"].bytes
    ops = make_plan(spec, (base.with_(checkpoint_ops=True),), GPUS[0]).plans[0].memory["activations"].bytes
    t, hidden, inter = 2 * 8192, spec.hidden_size, spec.intermediate_size
    kv = spec.num_kv_heads * spec.head_dim
    per_layer = 2 * t * (hidden + kv + inter + hidden) + 2 * t * hidden + 4 * t * spec.num_heads
    assert ops - plain == spec.num_layers * per_layer


def test_op_policy_refuses_lora():
    out = CliRunner().invoke(cli, ["plan", "--model", "llama-3.2-1b", "--method", "lora", "--checkpoint-ops"])
    assert out.exit_code != 0 and "--method full" in out.output and "Traceback" not in out.output
