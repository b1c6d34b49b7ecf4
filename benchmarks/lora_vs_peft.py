"""Our LoRA layer against PEFT's on the same GPT-2 fine-tuning job: step time and peak memory.

    python benchmarks/lora_vs_peft.py                              # GPT-2 small, CPU or GPU
    python benchmarks/lora_vs_peft.py --model gpt2-medium --batch-size 8 --seq-len 1024 --device cuda
    python benchmarks/lora_vs_peft.py --targets all-linear --rank 64 --format json

Both wrap the same modules of the same randomly initialised model (same seed), train with AdamW
on the same batches through the harness's one `train_step`, and are timed over the steps after
the first two (optimizer states and kernel warm-up). Each implementation runs in a process of its
own (no allocator cache or warm kernels carried from one to the other), and the order alternates
over `--repeats` runs, so neither always goes first; the table shows medians over the runs. Peak
memory is the CUDA allocator's on a GPU, and on CPU the live-tensor tracer's over one extra traced
step. Needs `pip install -e '.[measure,test]'` (PEFT).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from tabulate import tabulate

from lora_planner.measure import lora
from lora_planner.measure.data import batches
from lora_planner.measure.job import Job, build_model, model_spec
from lora_planner.measure.step import train_step

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
        losses.append(float(train_step(model, optimizer, input_ids, compute_dtype=compute)))
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
            train_step(model, optimizer, input_ids, compute_dtype=compute, phase=tracer.phase)
        peak, source = tracer.report().peak_bytes, "tracer"
    step = statistics.median(times[WARMUP_STEPS:])
    return {"implementation": name, "trainable_params": sum(p.numel() for p in trainable),
            "step_ms": 1000 * step, "tokens_per_s": args.batch_size * args.seq_len / step,
            "peak_bytes": peak, "peak_source": source, "first_loss": losses[0]}


IMPLEMENTATIONS = {"lora-plan": wrap_ours, "peft": wrap_peft}


def median_row(rows: list[dict]) -> dict:
    """One implementation's runs: median step time and throughput, the largest peak."""
    step = statistics.median(r["step_ms"] for r in rows)
    return {**rows[0], "step_ms": step, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "peak_bytes": max(r["peak_bytes"] for r in rows), "runs": len(rows)}


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
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each implementation, each in its own process, order alternating")
    parser.add_argument("--only", choices=list(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.only:  # one implementation, in this process: what the parent runs in a child
        settings = Job.from_dict({"model": args.model, "seq_len": args.seq_len})
        args.model_args = (model_spec(settings), settings)
        print(json.dumps(measure(args.only, IMPLEMENTATIONS[args.only], args)))
        return 0
    runs: dict[str, list[dict]] = {name: [] for name in IMPLEMENTATIONS}
    child = ["--model", args.model, "--rank", str(args.rank), "--alpha", str(args.alpha), "--targets",
             args.targets, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
             "--steps", str(args.steps), "--precision", args.precision]
    for repeat in range(args.repeats):
        order = list(IMPLEMENTATIONS) if repeat % 2 == 0 else list(reversed(IMPLEMENTATIONS))
        for name in order:
            done = subprocess.run([sys.executable, __file__, *child, "--device", args.device, "--only", name],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [median_row(runs[name]) for name in IMPLEMENTATIONS]
    if rows[0]["trainable_params"] != rows[1]["trainable_params"]:
        print("warning: the two wrap different numbers of parameters", file=sys.stderr)
    if args.format == "json":
        print(json.dumps({"settings": vars(args),
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
