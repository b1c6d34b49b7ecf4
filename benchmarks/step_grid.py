"""Predicted versus traced step memory over a grid of small models, one line per case.

    python benchmarks/step_grid.py            # the CI grid (tiny configs of every family)
    python benchmarks/step_grid.py --fake     # the same under FakeTensorMode
    python benchmarks/step_grid.py --large    # fake traces: 2-layer slices of 7B/8B/70B, all of 7B
    python benchmarks/step_grid.py --optimizer-impl fused     # the grid with another AdamW kernel
    python benchmarks/step_grid.py --loss chunked --loss-chunks 4

Each line: the case, the traced peak and phase, the predicted peak and phase, the error of the
peak and of each term, and the error of the old sum-of-terms estimate (model states + activations).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace

from lora_planner.catalog import get_model
from lora_planner.spec import ModelSpec, TrainSetup

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


def main() -> int:
    from lora_planner.measure.traced_step import trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fake", action="store_true")
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--family", action="append")
    ap.add_argument("--jsonl", help="also write one JSON object per case to this file")
    ap.add_argument("--optimizer-impl", choices=("fused", "foreach", "for-loop"),
                    help="trace and plan this AdamW kernel instead of the torch stack's foreach")
    ap.add_argument("--loss", choices=("standard", "chunked"), help="the loss to trace and plan")
    ap.add_argument("--loss-chunks", type=int, help="chunks of the chunked loss (default 8)")
    args = ap.parse_args()
    cases = list(large() if args.large else grid(tuple(args.family or TINY)))
    stack = {k: v for k, v in (("optimizer_impl", args.optimizer_impl), ("loss", args.loss),
                               ("loss_chunks", args.loss_chunks)) if v is not None}
    cases = [(spec, replace(setup, **stack)) for spec, setup in cases]
    out = open(args.jsonl, "a") if args.jsonl else None
    origin = provenance(args.fake or args.large) if out else None
    worst = 0.0
    for spec, setup in cases:
        start = time.perf_counter()
        r = trace(spec, setup, fake=args.fake or args.large)
        err = r.errors()
        old = (sum_of_terms(r.predicted) - r.traced["peak"]) / r.traced["peak"]
        worst = max(worst, abs(err["peak"]))
        label = (f"{spec.name} {setup.method} {setup.precision} b={setup.batch_size} s={setup.seq_len} "
                 f"{setup.attention}{' ckpt' if setup.grad_checkpointing else ''}"
                 + "".join(f" {k}={v}" for k, v in stack.items()))
        terms = " ".join(f"{k}={v:+.2%}" for k, v in err.items() if v is not None and k != "peak")
        print(f"{label:55s} traced {r.traced['peak']:>14,} ({r.traced_phase:9s}) predicted "
              f"{r.predicted['peak']:>14,} ({r.predicted_phase:9s}) peak {err['peak']:+.2%} | {terms} "
              f"| sum-of-terms {old:+.2%} [{time.perf_counter() - start:.1f}s]", flush=True)
        if out:
            record = {"case": label, **r.to_dict(), "sum_of_terms_error": old, "provenance": origin}
            out.write(json.dumps(record) + "\n")
            out.flush()
    print(f"{len(cases)} cases, worst peak error {worst:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
