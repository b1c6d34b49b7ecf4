"""Planned versus measured peak of a compiled training step (torch.compile, inductor, on CPU).

    python benchmarks/compile_step.py                       # the cases, printed
    python benchmarks/compile_step.py --record results/trace/compile-cpu.json

A compiled step runs inductor's kernels, which no dispatch mode sees (a tracer entered makes the
compiled code fall back to eager): the reading is the CPU allocator's peak (`measure/allocator.py`)
over one step, after a first step that compiled the graphs and made the optimizer's states. Each
case runs eager and compiled on one model, and the plan's peak is put beside each, so the record
holds what compiling changed in the allocator and in the plan. `--record` writes the cases with the
command and versions that made them; `tests/test_compile.py` plans them again and compares.

The models: tiny Llama and GPT-2 shapes, and configs drawn by the fuzzer's generator
(`measure/fuzz.random_config`) from a seed, built by transformers from the config dict.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import replace

from lora_planner.spec import ModelSpec, TrainSetup, spec_from_hf_config

TINY = {
    "gpt2": ModelSpec("tiny-gpt2", "gpt2", 512, 64, 2, 4, 4, 16, 256, True, 256, True, True, True),
    "llama": ModelSpec("tiny-llama", "llama", 512, 64, 2, 4, 2, 16, 160, False, 256),
}
# (model: a TINY key, or "family:seed" for a generated config), method, precision, checkpointing, mode
CASES = (
    ("llama", "full", "fp32", False, "layers"),
    ("llama", "lora", "amp", False, "layers"),
    ("llama", "full", "amp", False, "model"),
    ("llama", "lora", "fp32", False, "model"),
    ("gpt2", "full", "fp32", False, "layers"),
    ("gpt2", "lora", "amp", False, "layers"),
    ("gpt2", "full", "fp32", True, "layers"),
    ("gpt2", "lora", "fp32", False, "model"),
    ("llama:3", "full", "fp32", False, "layers"),
    ("gpt2:5", "lora", "fp32", False, "layers"),
    ("qwen2:4", "lora", "amp", False, "layers"),
    ("gpt2:9", "full", "amp", False, "model"),
    ("llama:8", "lora", "fp32", False, "model"),
    ("qwen3:5", "full", "fp32", False, "layers"),
)
BATCH, SEQ = 2, 64


def model(name: str) -> tuple[ModelSpec, dict | None]:
    """The spec, and the config dict transformers builds (None: the spec's own)."""
    if ":" not in name:
        return TINY[name], None
    from lora_planner.measure.fuzz import random_config

    family, seed = name.split(":")
    config = random_config(random.Random(int(seed)), family)
    return spec_from_hf_config(config, name=f"{family}-seed{seed}"), config


def setup_of(method: str, precision: str, ckpt: bool, mode: str) -> TrainSetup:
    """A plain PyTorch step (the torch stack) with the for-loop AdamW torch picks on CPU."""
    return TrainSetup(method=method, rank=4, precision=precision, batch_size=BATCH, seq_len=SEQ,
                      grad_checkpointing=ckpt, stack="torch", optimizer_impl="for-loop", compile=mode)


def provenance() -> dict:
    import datetime
    import platform

    import peft
    import torch
    import transformers

    return {"command": "python " + " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": "cpu, inductor", "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", type=int, action="append", help="run only these case indices")
    ap.add_argument("--record", help="write the cases and their provenance to this JSON file")
    args = ap.parse_args()
    import torch

    from lora_planner.measure.traced_step import trace

    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    records = []
    for index in args.case or range(len(CASES)):
        name, method, precision, ckpt, mode = CASES[index]
        spec, config = model(name)
        setup = setup_of(method, precision, ckpt, mode)
        start = time.perf_counter()
        eager = trace(spec, replace(setup, compile="none"), hf_config=config, allocator=True)
        compiled = trace(spec, setup, hf_config=config, allocator=True)
        readings = {"eager": eager, "compiled": compiled}
        row = {"model": name, "method": method, "precision": precision, "grad_checkpointing": ckpt,
               "compile": mode, "batch_size": BATCH, "seq_len": SEQ}
        for key, r in readings.items():
            row[key] = {"allocator_peak": r.allocator.peak_bytes, "planned_peak": r.predicted["peak"]}
        e, c = row["eager"], row["compiled"]
        error = (c["planned_peak"] - c["allocator_peak"]) / c["allocator_peak"]
        print(f"[{index}] {name} {method} {precision}{' ckpt' if ckpt else ''} compile={mode}: allocator "
              f"{e['allocator_peak']:,} -> {c['allocator_peak']:,}, planned {e['planned_peak']:,} -> "
              f"{c['planned_peak']:,} ({error:+.2%}) [{time.perf_counter() - start:.0f}s]", flush=True)
        records.append(row)
    if args.record:
        tmp = args.record + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"provenance": provenance(), "batch_size": BATCH, "seq_len": SEQ, "cases": records},
                      f, indent=1)
            f.write("\n")
        os.replace(tmp, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
