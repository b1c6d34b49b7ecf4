"""The step grid's cases: tiny configs of every family, and fake-traced slices of large models.

`benchmarks/step_grid.py` traces them and prints predicted against traced; the tests draw their tiny
models from `TINY` too. `provenance` is what every trace record (step grid, fuzz) says of its run.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import replace

from ..catalog import get_model
from ..spec import ModelSpec, TrainSetup

TINY = {
    "gpt2": ModelSpec("tiny-gpt2", "gpt2", 512, 64, 2, 4, 4, 16, 256, True, 256, True, True, True),
    "llama": ModelSpec("tiny-llama", "llama", 512, 64, 2, 4, 2, 16, 160, False, 256),
    "qwen2": ModelSpec("tiny-qwen2", "qwen2", 512, 64, 2, 4, 2, 16, 160, True, 256, qkv_bias=True),
    "gemma2": ModelSpec("tiny-gemma2", "gemma2", 512, 64, 2, 4, 2, 16, 160, True, 256),
    "phi3": ModelSpec("tiny-phi3", "phi3", 512, 64, 2, 4, 4, 16, 160, False, 256),
    "mixtral": ModelSpec("tiny-mixtral", "mixtral", 512, 64, 2, 4, 2, 16, 96, False, 256,
                         num_experts=4, experts_per_token=2),
}
SHAPES = ((2, 32), (1, 128), (4, 64))


def grid(families=tuple(TINY)):
    for family, method, precision, ckpt, attention, (b, s) in itertools.product(
            families, ("full", "lora"), ("fp32", "amp"), (False, True), ("sdpa", "eager"), SHAPES):
        if family == "gemma2" and attention == "sdpa":
            continue  # transformers runs Gemma-2 with eager attention only (logit soft-capping)
        # a plain PyTorch step with foreach AdamW is what the trace runs: plan that stack
        setup = TrainSetup(method=method, rank=4, precision=precision, batch_size=b, seq_len=s,
                           grad_checkpointing=ckpt, attention=attention, stack="torch")
        yield TINY[family], setup


def large():
    """2-layer slices of 7B, 8B and 70B at 4,096 tokens, and the whole 7B at 2,048."""
    for name, layers, s in (("llama-2-7b", 2, 4096), ("llama-3.1-8b", 2, 4096), ("llama-3.1-70b", 2, 4096),
                            ("llama-2-7b", None, 2048)):
        spec = get_model(name)
        if layers:
            spec = replace(spec, num_layers=layers, name=f"{name}[:{layers} layers]")
        for method, ckpt in itertools.product(("full", "lora"), (False, True)):
            yield spec, TrainSetup(method=method, precision="amp", batch_size=1, seq_len=s,
                                   grad_checkpointing=ckpt, stack="torch")


def sum_of_terms(predicted: dict) -> int:
    """What calculators that add terms report: model states plus activations."""
    return sum(predicted[k] for k in ("weights", "gradients", "optimizer_states", "activations"))


def provenance(fake: bool) -> dict:
    """Where and how the numbers were made (no hostname)."""
    import datetime
    import platform

    import peft
    import torch
    import transformers

    return {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu, FakeTensorMode" if fake else "cpu",
        "machine": platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }
