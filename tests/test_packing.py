"""--packing: the micro-batch's documents as one row of every token, position ids restarting per
document. transformers finds the document boundaries in the position ids
(`masking_utils.find_packed_sequence_indices`) and gives attention an explicit block-diagonal mask;
held to traced steps of random small configs given the same packed row and position ids.

Activations trace byte for byte; the peak within 1%.
"""

import json
import random

import pytest
from click.testing import CliRunner

from lora_planner.cli import main as cli
from lora_planner.gpus import GPUS
from lora_planner.plan import make_plan
from lora_planner.resolve import resolve_model
from lora_planner.spec import TrainSetup, spec_from_hf_config


def _case(seed: int, family: str, precision: str, method: str = "lora"):
    from lora_planner.measure.fuzz import Case, plannable_rank, random_config

    rng = random.Random(seed)
    config = random_config(rng, family)
    spec = spec_from_hf_config(config, name=f"packed-{seed}")
    setup = TrainSetup(
        method=method, rank=rng.randint(1, 8),
        targets=(rng.choice(("default", "qv", "attn", "mlp", "all-linear")),),
        precision=precision, batch_size=rng.randint(2, 4), seq_len=rng.randint(3, 40),
        attention=rng.choice(("sdpa", "eager")), grad_checkpointing=rng.random() < 0.5,
        stack="torch", packing=True)
    setup = plannable_rank(spec, setup)
    return Case(seed, config, setup, None, fake=rng.random() < 0.5)


def _check(case, peak: float = 0.01) -> None:
    from lora_planner.measure.fuzz import run_case

    errors = run_case(case).errors()
    assert errors["activations"] == 0, (case.label, errors)
    assert abs(errors["peak"]) <= peak, (case.label, errors)


# sdpa (the mask kept) and eager, checkpointed or not, LoRA and full
FAST = [(0, "llama", "pure-bf16", "lora"), (3, "qwen2", "amp", "lora"), (1, "gpt2", "fp32", "lora"),
        (4, "mistral", "fp32", "full")]


@pytest.mark.parametrize("seed,family,precision,method", FAST, ids=lambda v: str(v))
def test_packed_step_matches_its_trace(seed, family, precision, method):
    pytest.importorskip("peft")
    _check(_case(seed, family, precision, method))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("family", ("llama", "qwen2", "gpt2", "mistral"))
@pytest.mark.parametrize("precision", ("fp32", "amp", "pure-bf16"))
@pytest.mark.parametrize("method", ("lora", "full"))
def test_packed_random_configs(seed, family, precision, method):
    pytest.importorskip("peft")
    _check(_case(seed, family, precision, method))


def _plan(**changes):
    setup = TrainSetup(method="lora", precision="pure-bf16", **changes)
    return make_plan(resolve_model("llama-3.1-8b"), (setup,), GPUS[0]).plans[0]


def test_packing_plans_one_row_under_a_mask():
    """Four 1,024-token documents packed: SDPA's block-diagonal (1, 1, 4,096, 4,096) mask is kept
    (one byte each, and the additive copy in bf16 that each layer's kernel keeps), so the packed
    step holds more than the batch of four; one document has nothing to pack."""
    batch, packed = _plan(batch_size=4, seq_len=1024), _plan(batch_size=4, seq_len=1024, packing=True)
    assert packed.memory["activations"].bytes > batch.memory["activations"].bytes
    # the masked kernels compute the whole row's scores: attention's FLOPs per token at 4,096, not 1,024
    spec = resolve_model("llama-3.1-8b")
    per_position = 4 * spec.num_layers * spec.num_heads * spec.head_dim  # `cost.attention_forward_flops`
    extra = packed.flops_per_token.value - batch.flops_per_token.value
    assert extra > 0 and extra % (per_position * (4096 - 1024)) == 0
    one = _plan(batch_size=1, seq_len=4096)
    assert _plan(batch_size=1, seq_len=4096, packing=True).memory["peak"].bytes == one.memory["peak"].bytes


def test_cli_packing_in_setup_explain_and_help():
    runner = CliRunner()
    out = runner.invoke(cli, ["plan", "--model", "llama-3.1-8b", "--batch-size", "4", "--seq-len", "512",
                              "--packing", "--format", "json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["setup"]["packing"] is True
    explain = runner.invoke(cli, ["plan", "--model", "llama-3.1-8b", "--batch-size", "4", "--seq-len", "512",
                                  "--packing", "--explain"])
    assert "packing: 4 documents of 512 tokens as one row of 2,048" in explain.output
    for command in ("plan", "trace"):
        assert "--packing" in runner.invoke(cli, [command, "--help"]).output
    bad = runner.invoke(cli, ["trace", "--model", "llama-3.1-8b", "--layers", "1", "--seq-len", "8",
                              "--batch-size", "2", "--packing", "--loss", "chunked", "--fake"])
    assert bad.exit_code == 2 and "--loss standard" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
