"""Our LoRA layer against PEFT's on the same GPT-2 fine-tuning job: step time and peak memory.

    python benchmarks/lora_vs_peft.py                              # GPT-2 small, CPU or GPU
    python benchmarks/lora_vs_peft.py --model gpt2-medium --batch-size 8 --seq-len 1024 --device cuda
    python benchmarks/lora_vs_peft.py --targets all-linear --rank 64 --format json

Both wrap the same modules of the same randomly initialised model (same seed), train with AdamW
on the same batches, and are timed over the steps after the first two (optimizer states and
kernel warm-up). Peak memory is the CUDA allocator's on a GPU, and on CPU the live-tensor
tracer's over one extra traced step. Needs `pip install -e '.[measure,test]'` (PEFT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
from tabulate import tabulate

from lora_planner.measure import lora
from lora_planner.measure.data import batches
from lora_planner.measure.job import JobSettings, build_model, model_spec

WARMUP_STEPS = 2


def wrap_ours(model, args) -> torch.nn.Module:
    lora.inject(model, tuple(args.targets.split(",")), args.rank, args.alpha)
    return model


def wrap_peft(model, args) -> torch.nn.Module:
    import peft

    # The same modules ours wraps: the planner resolves the targets for both.
    paths = list(lora.lora_layers(wrap_ours(build_model(*args.model_args), args)))
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=paths, fan_in_fan_out=True,
                             lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def train_step(model, optimizer, input_ids, compute) -> float:
    autocast = torch.autocast(input_ids.device.type, dtype=compute) if compute else contextlib.nullcontext()
    with autocast:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(name: str, wrap, args) -> dict:
    device = torch.device(args.device)
    model = wrap(build_model(*args.model_args), args).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    compute = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    data = batches("synthetic", args.batch_size, args.seq_len, model.config.vocab_size, seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)  # GPT-2's dropout draws the same masks for both implementations
    times, losses = [], []
    for _ in range(WARMUP_STEPS + args.steps):
        input_ids = next(data).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, input_ids, compute))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak, source = torch.cuda.max_memory_allocated(), "cuda allocator"
    else:
        from lora_planner.measure.tracer import MemoryTracer

        input_ids = next(data)
        tracer = MemoryTracer(model, optimizer)
        with tracer:
            with tracer.phase("forward"):
                loss = model(input_ids=input_ids, labels=input_ids).loss
            with tracer.phase("backward"):
                loss.backward()
            with tracer.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        peak, source = tracer.report().peak_bytes, "tracer"
    step = statistics.median(times[WARMUP_STEPS:])
    return {"implementation": name, "trainable_params": sum(p.numel() for p in trainable),
            "step_ms": 1000 * step, "tokens_per_s": args.batch_size * args.seq_len / step,
            "peak_bytes": peak, "peak_source": source, "first_loss": losses[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="catalog name or config.json (default gpt2)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="c_attn", help="comma-separated, as the planner takes them")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after two warm-up steps")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    settings = JobSettings(model=args.model, seq_len=args.seq_len)
    args.model_args = (model_spec(settings), settings)

    rows = [measure("lora-plan", wrap_ours, args), measure("peft", wrap_peft, args)]
    if rows[0]["trainable_params"] != rows[1]["trainable_params"]:
        print("warning: the two wrap different numbers of parameters", file=sys.stderr)
    if args.format == "json":
        print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "model_args"},
                          "torch": torch.__version__, "results": rows}, indent=2))
        return 0
    print(f"{args.model}, LoRA r={args.rank} on {args.targets}, batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.precision}, {args.device} (torch {torch.__version__})")
    print(tabulate([[r["implementation"], f"{r['trainable_params']:,}", f"{r['step_ms']:.1f}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['peak_bytes']:,}", r["peak_source"],
                     f"{r['first_loss']:.4f}"] for r in rows],
                   headers=["LoRA", "trainable", "step ms (median)", "tokens/s", "peak bytes", "peak from",
                            "first loss"], colalign=("left", "right", "right", "right", "right")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
