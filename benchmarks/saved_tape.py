"""The activation walk's saved tensors beside the real model's, layer by layer.

    python benchmarks/saved_tape.py FAMILY SEED [--method lora] [--variant dora] [--all]
    python benchmarks/saved_tape.py --config config.json --method lora --rank 8 --targets all-linear
    python benchmarks/saved_tape.py FAMILY SEED --engine [--precision pure-bf16]

A family and seed draw the oracle test's case (`measure.saved_tape.random_case`, its key in
tests/test_saved_tape.py is "FAMILY SEED VARIANT METHOD PRECISION"); `--config` takes a config.json
of a native family instead. The other options change the setup drawn. The real side builds the model
from the config with random weights on CPU and lists what autograd keeps after forward
(`recorded_tape`); the walk's side is `Profile.saves`, each named by the line of activations.py
that saved it. Sizes are matched as multisets per section: what is left is one side's alone. With
`--all`, every section's saves are listed in order, matched or not.

With `--engine`, the step engine's tape (`engine.forward_tape`) is held to the real one op by op
instead (`measure.op_tape`): per section, each op that keeps tensors, with the sizes it is the first
to keep, engine and real aligned; each run of ops that differs is printed (with `--all`, both whole
sequences). The engine models the dense families' full and LoRA steps in fp32, amp and pure bf16,
with the standard or chunked loss (no QLoRA, DoRA, LoRA dropout, packing or trained biases).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections import Counter

from lora_planner.errors import PlanError
from lora_planner.measure.saved_tape import VARIANTS, random_case, recorded_tape, tape_diff, walk_tape
from lora_planner.spec import TrainSetup, spec_from_hf_config


def walk_with_lines(spec, setup):
    """`walk_tape`, and for each section the activations.py function:line of every save, in order."""
    from lora_planner import activations

    lines: dict[str, list[str]] = {}
    original = activations.Graph._keep

    def keep(self, *tensors):
        frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                     if f.name not in ("save", "_keep"))
        for t in tensors:
            if t.key not in self.saved and t.nbytes:
                lines.setdefault(self.section.removesuffix(" mlp"), []).append(f"{frame.name}:{frame.lineno}")
        original(self, *tensors)

    activations._profile.cache_clear()
    activations.Graph._keep = keep
    try:
        return walk_tape(spec, setup), lines
    finally:
        activations.Graph._keep = original
        activations._profile.cache_clear()


def engine_diff(config: dict, setup, every: bool) -> int:
    """Print the engine's op tape against the real one (`op_tape.compare_ops`); 1 if they differ."""
    from lora_planner.measure.op_tape import engine_ops, op_diff, recorded_ops

    engine, real = engine_ops(config, setup), recorded_ops(config, setup)
    print(json.dumps(config))
    diffs = op_diff(engine, real)
    if not diffs:
        print("every section's ops keep the same sizes, in the same order")
    for d in diffs:
        print(f"\n{d.section}: engine - recorded = {d.bytes:+d} bytes")
        for line in d.lines:
            print(f"   {line}")
    if every:
        for section in (*engine, *(s for s in real if s not in engine)):
            print(f"\n{section}:\n   engine {' '.join(map(str, engine.get(section, ())))}"
                  f"\n   real   {' '.join(map(str, real.get(section, ())))}")
    return 1 if diffs else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", nargs="?")
    ap.add_argument("seed", nargs="?", type=int, default=0)
    ap.add_argument("--config", help="a config.json of a native family, instead of FAMILY SEED")
    ap.add_argument("--method", default="lora", choices=("full", "lora"))
    ap.add_argument("--variant", default="plain", choices=VARIANTS, help="the test's change to the setup")
    ap.add_argument("--precision", choices=("fp32", "pure-bf16", "amp", "mixed", "bf16"),
                    help="fp32 by default; mixed and bf16 need --adapter-dtype fp32 (LoRA)")
    ap.add_argument("--loss", choices=("standard", "chunked"))
    ap.add_argument("--packing", action="store_true", default=None)
    ap.add_argument("--dora", action="store_true", default=None)
    ap.add_argument("--adapter-dtype", choices=("auto", "fp32"))
    ap.add_argument("--bias", choices=("none", "all", "lora_only"), help="PEFT's bias option")
    ap.add_argument("--dropout", type=float, help="every dropout of the model")
    ap.add_argument("--lora-dropout", type=float)
    ap.add_argument("--rank", type=int, help="LoRA rank (--config: 8)")
    ap.add_argument("--targets", help="LoRA targets preset or comma-separated names (--config: default)")
    ap.add_argument("--attention", choices=("sdpa", "eager"))
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--all", action="store_true", help="list every save of every section")
    ap.add_argument("--engine", action="store_true", help="the step engine's tape op by op, not the walk's")
    args = ap.parse_args()
    try:
        if args.config:
            with open(args.config) as f:
                config = json.load(f)
            setup = TrainSetup(method=args.method, rank=8, precision="fp32", batch_size=2, seq_len=16,
                               stack="torch")
        elif args.family:
            case = random_case(args.family, args.seed, args.method, args.precision or "fp32", args.variant)
            if case is None:
                raise PlanError(f"the planner refuses seed {args.seed}'s {args.method} {args.variant} step "
                                f"of {args.family}, or the variant needs LoRA")
            config, setup = case.config, case.setup
            print(case.label, "(before the options)")
        else:
            ap.error("give FAMILY SEED or --config")
        changes = {"precision": args.precision, "loss": args.loss, "packing": args.packing,
                   "use_dora": args.dora, "adapter_dtype": args.adapter_dtype, "bias": args.bias,
                   "dropout": args.dropout, "lora_dropout": args.lora_dropout, "rank": args.rank,
                   "attention": args.attention, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "targets": tuple(args.targets.split(",")) if args.targets else None}
        setup = setup.with_(**{k: v for k, v in changes.items() if v is not None})
        if args.engine:
            return engine_diff(config, setup, args.all)
        walk, lines = walk_with_lines(spec_from_hf_config(config), setup)
        recorded = recorded_tape(config, setup)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(config))
    diffs = tape_diff(walk, recorded)
    if not diffs:
        print("every section's saved sizes agree")
    for d in diffs:
        print(f"\n{d.section}: walk - recorded = {d.bytes:+d} bytes")
        where = dict(enumerate(lines.get(d.section, ())))
        extra = Counter(d.walk_only)
        for i, s in enumerate(walk.get(d.section, ())):
            if extra[s.nbytes]:
                extra[s.nbytes] -= 1
                print(f"   walk only {s.nbytes:9d}  {where.get(i, '')}")
        for s in d.recorded_only:
            print(f"   real only {s.nbytes:9d}  {s.op:40s} {s.shape} {s.dtype}")
    if args.all:
        for section in (*walk, *(s for s in recorded if s not in walk)):
            print(f"\n{section}:")
            mine = lines.get(section, ())
            for i, s in enumerate(walk.get(section, ())):
                print(f"   walk {s.nbytes:9d}  {mine[i] if i < len(mine) else ''}")
            for s in recorded.get(section, ()):
                print(f"   real {s.nbytes:9d}  {s.op:40s} {s.shape} {s.dtype}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
