"""Two CPU processes (gloo) train a small GPT-2 under FSDP2 / DDP; each rank's traced memory is
compared with the per-GPU plan."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def launch(strategy: str, out) -> list[dict]:
    """`torchrun --standalone --nproc-per-node 2 -m lora_planner.measure.distributed`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lora_planner.measure.distributed", "--strategy", strategy, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)  # the per-rank error lines, shown with `pytest -s`
    return [json.loads(line) for line in out.read_text().splitlines()]


def param_tensors() -> int:
    """Parameter tensors of the measured GPT-2 (its layout is checked against transformers elsewhere)."""
    from lora_planner.architecture import layout
    from lora_planner.measure.distributed import tiny_spec

    return len(layout(tiny_spec()).params)


def check_rows(rows: list[dict], strategy: str, record_property) -> None:
    assert sorted(r["rank"] for r in rows) == [0, 1] and {r["world_size"] for r in rows} == {2}
    for r in rows:
        assert r["backend"] == "gloo" and r["strategy"] == strategy
        terms, shards = r["measured"]["terms"], r["predicted"]["shards"]
        # Each rank holds exactly the planned share of weights and gradients...
        assert terms["parameters"] == shards["parameters"]
        assert terms["gradients"] == shards["gradients"]
        # ...and of AdamW's two moments; torch adds a 4-byte `step` counter per parameter tensor,
        # which the plan leaves out.
        assert terms["optimizer_states"] == shards["optimizer_states"] + 4 * param_tensors()
        measured, peak = r["measured"]["peak"], r["predicted"]["memory_bytes"]["peak"]
        error = r["relative_error"]["peak"]
        assert error == pytest.approx((peak - measured) / measured)
        assert math.isfinite(r["loss"])
        record_property(f"{strategy}_rank{r['rank']}_peak_relative_error", error)


def test_fsdp2_two_ranks_on_cpu(tmp_path, record_property):
    rows = launch("fsdp", tmp_path / "fsdp.jsonl")
    check_rows(rows, "fsdp", record_property)
    # FSDP shards the weights: each rank holds half of the model's fp32 parameters.
    from lora_planner.counts import total_params
    from lora_planner.measure.distributed import tiny_spec

    assert rows[0]["measured"]["terms"]["parameters"] == -(-4 * total_params(tiny_spec()) // 2)


@pytest.mark.slow
def test_ddp_two_ranks_on_cpu(tmp_path, record_property):
    rows = launch("ddp", tmp_path / "ddp.jsonl")
    check_rows(rows, "ddp", record_property)
