"""Advice for a plan that does not fit, held to the CLI itself: every suggestion is run again as the
flags it names, and that separate plan must fit with the numbers the suggestion gave. The headline
checkpointing line is held to a separate --grad-checkpointing run, and --explain's account of the
GPU counts to plans made on those counts."""

from __future__ import annotations

import itertools
import json
import math
import random
import shlex

import pytest
from click.testing import CliRunner

from lora_planner.advice import PER_METHOD
from lora_planner.cli import main


def plan_json(*args: str) -> dict:
    result = CliRunner().invoke(main, ["plan", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def method_args(method: str, rank: int | None) -> list[str]:
    return ["--method", method] + ([] if rank is None else ["--rank", str(rank)])


def applied(base: list[str], suggestion: dict) -> list[str]:
    """The command the suggestion names: the base (one method) with its flags added; a change of
    method replaces the method rather than adding a second one."""
    change = shlex.split(suggestion["change"])
    method = suggestion["method"]
    if "--method" in change:
        i = change.index("--method")
        method = change[i + 1]
        change = change[:i] + change[i + 2:]
    return [*base, *method_args(method, suggestion["rank"]), *change]


def check_suggestions(base: list[str], method: str, rank: int | None) -> list[dict]:
    """Plan `base` for one method; run every suggestion as a fresh CLI plan and check it fits with
    the suggestion's numbers. Returns the suggestions."""
    data = plan_json(*base, *method_args(method, rank))
    p = data["plans"][0]
    suggestions = data["suggestions"]
    if p["fits"]:
        assert suggestions == [] and data["with_grad_checkpointing"] is None
        return []
    assert 0 < len(suggestions) <= PER_METHOD or p["gpus_needed"] is None
    target = data["setup"]["num_gpus"] or 1
    gpus = [max(s["effect"]["gpus"], target) for s in suggestions]
    assert gpus == sorted(gpus)  # the user's GPUs (or fewer) first, then fewest GPUs
    for s in suggestions:
        assert (s["method"], s["rank"]) == (method, rank)
        again = plan_json(*applied(base, s))
        q = again["plans"][0]
        assert q["fits"], (s, q["memory_bytes"])
        assert q["memory_bytes"]["peak"] == s["effect"]["peak_bytes_per_gpu"]
        assert (again["setup"]["num_gpus"] or 1) == s["effect"]["gpus"]
        assert again["suggestions"] == []
        if s["effect"]["gpus"] < (p["gpus_needed"] or math.inf):
            assert s["change"] != f"--num-gpus {p['gpus_needed']}"  # a change, not just more GPUs
    return suggestions


def _cases() -> list[tuple[str, str, int | None, str, int]]:
    """A seeded sample of models x methods x GPUs x batch sizes (most do not fit one GPU)."""
    models = ["llama-3.1-8b", "qwen2.5-7b", "gemma-2-2b", "llama-3.2-3b", "mistral-7b", "phi-3-mini"]
    grid = [(m, method, None if method == "full" else 8, gpu, batch)
            for m, method, gpu, batch in itertools.product(
                models, ["full", "lora", "qlora"], ["rtx4090", "l4", "t4", "a100-40gb", "a10g"], [4, 16])]
    return random.Random(29).sample(grid, 16)


@pytest.mark.parametrize("model, method, rank, gpu, batch", _cases())
def test_every_suggestion_fits_when_run_as_its_flags(model, method, rank, gpu, batch):
    check_suggestions(["--model", model, "--gpu", gpu, "--batch-size", str(batch), "--seq-len", "1024"],
                      method, rank)


@pytest.mark.parametrize("extra", [
    ["--num-gpus", "2", "--sharding", "zero2"],  # a count and strategy given: advice keeps them
    ["--num-gpus", "4", "--sharding", "fsdp"],
])
def test_suggestions_under_a_given_count_and_strategy(extra):
    base = ["--model", "llama-3.1-8b", "--gpu", "rtx4090", "--batch-size", "2", *extra]
    for method, rank in (("full", None), ("lora", 8)):
        for s in check_suggestions(base, method, rank):
            if "--sharding" not in s["change"]:  # only the count changes under the chosen strategy
                assert s["effect"]["strategy"] in ("single", extra[-1])


def test_the_dead_end_gets_a_way_out():
    """8B LoRA at batch 4 on a 24 GB card: not even one sequence fits without checkpointing."""
    base = ["--model", "llama-3.1-8b", "--gpu", "rtx4090", "--batch-size", "4"]
    suggestions = check_suggestions(base, "lora", 8)
    assert suggestions[0]["effect"]["gpus"] == 1
    table = CliRunner().invoke(main, ["plan", *base, "--method", "lora"]).output
    assert "to make it fit" in table and suggestions[0]["change"] in table


def test_a_smaller_batch_is_the_largest_that_fits():
    base = ["--model", "llama-3.2-1b", "--gpu", "l4", "--batch-size", "64"]
    suggestions = check_suggestions(base, "lora", 8)
    batch = [s for s in suggestions if s["change"].startswith("--batch-size")]
    assert batch, suggestions
    b = int(batch[0]["change"].split()[1])
    assert not plan_json(*base, *method_args("lora", 8), "--batch-size", str(b + 1))["plans"][0]["fits"]


def _everything(method: str, num_gpus: int | None) -> list[str]:
    """Every change the search may make at once, each at its strongest: what saves the most memory
    on the user's GPUs. When this fits, some combination in the search space does."""
    out = ["--grad-checkpointing", "--activation-offload", "--batch-size", "1"]
    out += {"full": ["--optimizer", "adamw-8bit"], "lora": ["--method", "qlora"]}.get(method, [])
    if num_gpus:
        out += ["--sharding", "zero3", "--offload", "optimizer+params"]
    return out


def _generated() -> list[tuple[str, str, str, int, int | None]]:
    """A seeded sample of models x methods x GPUs x batch sizes x GPU counts."""
    models = ["llama-3.1-8b", "qwen2.5-7b", "gemma-2-2b", "llama-3.2-3b", "mistral-7b", "llama-3.1-70b"]
    grid = itertools.product(models, ["full", "lora", "qlora"], ["rtx4090", "l4", "a100-40gb", "h100"],
                             [1, 4, 16], [None, 2, 8])
    return random.Random(7).sample(list(grid), 20)


@pytest.mark.parametrize("model, method, gpu, batch, num_gpus", _generated())
def test_a_way_out_whenever_one_exists(model, method, gpu, batch, num_gpus):
    """Whenever the strongest combination of changes fits the user's GPUs (an independent CLI run),
    advice names at least one suggestion on those GPUs; every suggestion fits when run as its flags."""
    rank = None if method == "full" else 8
    base = ["--model", model, "--gpu", gpu, "--batch-size", str(batch), "--seq-len", "2048",
            *([] if num_gpus is None else ["--num-gpus", str(num_gpus)])]
    suggestions = check_suggestions(base, method, rank)
    if not plan_json(*base, *method_args(method, rank))["plans"][0]["fits"]:
        strongest = CliRunner().invoke(main, ["plan", *base, *method_args(method, rank),
                                              *_everything(method, num_gpus), "--format", "json"])
        if strongest.exit_code == 0 and json.loads(strongest.output)["plans"][0]["fits"]:
            assert any(s["effect"]["gpus"] <= (num_gpus or 1) for s in suggestions), suggestions


def test_too_big_a_batch_gets_checkpointing_and_the_largest_batch_that_then_fits():
    """8B LoRA on a 24 GB card at batch 16 x 4,096 tokens fits nowhere, checkpointed or on more GPUs
    (activations are per GPU); checkpointing at batch 1 does, and batch 2 does not."""
    base = ["--model", "8b", "--gpu", "rtx4090", "--batch-size", "16", "--seq-len", "4096"]
    changes = [s["change"] for s in check_suggestions(base, "lora", 8)]
    assert "--grad-checkpointing --batch-size 1" in changes, changes
    again = [*base, *method_args("lora", 8), "--grad-checkpointing", "--batch-size", "2"]
    assert not plan_json(*again)["plans"][0]["fits"]


def test_a_given_gpu_count_is_tried_before_more_gpus():
    """70B full on 8 H100s: ZeRO-3 with checkpointing and the optimizer in CPU memory fits on those 8
    (docs/multi-gpu.md), so advice names a change on 8 before any larger count."""
    base = ["--model", "70b", "--num-gpus", "8"]
    suggestions = check_suggestions(base, "full", None)
    assert suggestions[0]["effect"]["gpus"] == 8
    assert "--grad-checkpointing --sharding zero3 --offload optimizer" in [s["change"] for s in suggestions]


def test_headline_checkpointing_line_is_a_checkpointed_plans_numbers():
    data = plan_json("--model", "70b", "--rank", "8")
    again = plan_json("--model", "70b", "--rank", "8", "--grad-checkpointing")
    assert data["with_grad_checkpointing"] is not None
    for line, q in zip(data["with_grad_checkpointing"], again["plans"], strict=True):
        assert (line["method"], line["rank"]) == (q["method"], q["rank"])
        assert line["gpus_needed"] == q["gpus_needed"]
        assert line["gpus_needed_strategy"] == q["gpus_needed_strategy"]
        assert line["activations_bytes"] == q["memory_bytes"]["activations"]
    assert [q["gpus_needed"] for q in again["plans"]] == [15, 2, 1]
    table = CliRunner().invoke(main, ["plan", "--model", "70b", "--rank", "8"]).output
    headline = "with --grad-checkpointing: full 15 GPUs (zero3), lora r=8 2 GPUs (zero3), qlora r=8 1 GPU"
    assert headline in table


def test_headline_suggestions_fit():
    base = ["--model", "70b"]
    for method, rank in (("full", None), ("lora", 8), ("qlora", 8)):
        assert check_suggestions(base, method, rank)


def test_a_plan_that_fits_has_no_advice():
    data = plan_json("--model", "gpt2", "--method", "lora")
    assert data["suggestions"] == [] and data["with_grad_checkpointing"] is None
    table = CliRunner().invoke(main, ["plan", "--model", "gpt2"]).output
    assert "to make it fit" not in table and "with --grad-checkpointing" not in table


def test_markdown_carries_the_advice():
    out = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-8b", "--method", "lora", "--gpu", "rtx4090",
                                    "--batch-size", "4", "--format", "markdown"]).output
    assert "- to make it fit (each change planned again):" in out
    assert "  - lora r=8: `--grad-checkpointing --method qlora` -> 1 GPU" in out


def test_explain_says_why_fsdp_needs_more_gpus_than_zero3():
    """70B full on H100: zero3 96, fsdp 255. Each count's split into what every GPU holds whole (W)
    and what it shares (S) must reproduce the peak a plan on that count reports, and the count."""
    out = CliRunner().invoke(main, ["plan", "--model", "70b", "--method", "full", "--explain"]).output
    assert "fsdp needs 255 GPUs where zero3 needs 96: it holds" in out
    budget = None
    for strategy, n in (("zero3", 96), ("fsdp", 255)):
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{strategy} {n}:"))
        numbers = [int(t.replace(",", "")) for t in line.replace("(", " ").replace(")", " ").split()
                   if t.replace(",", "").isdigit() and "," in t]
        whole, sharded, budget = numbers[0], numbers[1], numbers[3]
        assert math.ceil(sharded / (budget - whole)) == n
        peak = plan_json("--model", "70b", "--method", "full", "--num-gpus", str(n), "--sharding",
                         strategy)["plans"][0]["memory_bytes"]["peak"]
        assert abs(peak - (whole + sharded / n)) < 2e-4 * peak  # shares round up, tensor by tensor


def test_a_methods_plan_is_the_same_alone_or_beside_others():
    """Advice reads a changed setup's verdict off the plan's own column when the change lands on it
    (LoRA's `--method qlora`): that is sound because planning a method beside others changes
    nothing of its plan."""
    from lora_planner.catalog import get_model
    from lora_planner.gpus import get_gpu
    from lora_planner.plan import make_plan
    from lora_planner.spec import TrainSetup

    spec, gpu = get_model("llama-3.1-8b"), get_gpu("l4")
    setups = tuple(TrainSetup(method=m, rank=8, batch_size=4, grad_checkpointing=g)
                   for m in ("full", "lora", "qlora") for g in (False, True))
    together = make_plan(spec, setups, gpu).plans
    assert together == tuple(make_plan(spec, (s,), gpu).plans[0] for s in setups)


@pytest.mark.parametrize("field, value", [
    ("grad_checkpointing", True), ("activation_offload", True), ("optimizer", "adamw-8bit"),
    ("optimizer_impl", "fused"), ("batch_size", 7), ("seq_len", 333), ("num_gpus", 4),
    ("sharding", "zero3"), ("offload", "optimizer")])
def test_what_trains_does_not_read_the_step_options(field, value):
    """Advice and --fit plan setups that differ in how the step runs again and again; what LoRA
    trains is remembered across them (`counts._STEP_ONLY`), so it must not depend on them: the
    uncached count with the option changed is the same."""
    from lora_planner.catalog import get_model
    from lora_planner.counts import _lora_trainable, lora_trainable
    from lora_planner.spec import TrainSetup

    spec = get_model("mixtral-8x7b")
    setup = TrainSetup(method="lora", rank=8, targets=("all-linear",), bias="all",
                       modules_to_save=("lm_head",))
    changed = setup.with_(**{field: value})
    assert _lora_trainable.__wrapped__(spec, changed) == lora_trainable(spec, setup)
