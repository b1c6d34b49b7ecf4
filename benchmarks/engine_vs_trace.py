"""The step engine beside real CPU steps, in one command.

    python benchmarks/engine_vs_trace.py [--seeds 0:40] [--recorded N]

1. The issue's 2-layer GPT-2 (n_embd 64, 4 heads, dropout 0), fp32 SDPA, batch 4 x 256, full and
   LoRA: traced with the CPU allocator, the engine's peak beside it and the walk's.
2. Random small dense steps (`measure.engine_check.engine_case`), traced likewise.
3. The recorded allocator fuzz cases (results/trace/fuzz-cpu-allocator.jsonl) the engine models,
   re-planned by the engine and by the walk, held to the recorded allocator peak.
Each part prints how many cases land within 1% of the allocator.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_planner.spec import TrainSetup

ISSUE_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 64, "n_layer": 2, "n_head": 4,
              "n_positions": 1024, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
RECORDS = Path(__file__).resolve().parents[1] / "results/trace/fuzz-cpu-allocator.jsonl"


def summary(name: str, engine: list[float], walk: list[float]) -> str:
    def within(errs: list[float], tol: float) -> int:
        return sum(abs(e) <= tol for e in errs)

    worst = max(engine, key=abs) if engine else 0.0
    return (f"{name}: {len(engine)} cases; engine within 1% {within(engine, 0.01)}, within 0.1% "
            f"{within(engine, 0.001)}, worst {worst:+.4%}; walk within 1% {within(walk, 0.01)}, "
            f"within 0.1% {within(walk, 0.001)}, worst {max(walk, key=abs) if walk else 0.0:+.4%}")


def recorded(limit: int) -> tuple[list[float], list[float], int]:
    """The engine's and the walk's peak errors against each recorded allocator peak it models, and
    how many records it refuses."""
    from lora_planner.measure.engine_check import replanned_records
    from lora_planner.measure.fuzz import planned_peak

    engine, walk = [], []
    modelled, refused = replanned_records(RECORDS, limit)
    for row, case, plan in modelled:
        ref = row["allocator_peak"]
        engine.append((plan.peak.bytes - ref) / ref)
        walk.append((planned_peak(case) - ref) / ref)
    return engine, walk, refused


def main() -> None:
    from lora_planner.measure.engine_check import compare, engine_case

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0:40", help="random dense cases, start:stop")
    parser.add_argument("--recorded", type=int, default=1000, help="recorded fuzz cases to re-plan")
    args = parser.parse_args()
    for method in ("full", "lora"):
        setup = TrainSetup(method=method, precision="fp32", batch_size=4, seq_len=256, attention="sdpa",
                           stack="torch")
        r = compare(ISSUE_GPT2, setup)
        print(f"GPT-2 2 layers {method} fp32 sdpa 4 x 256: allocator {r['allocator_peak']:,}, engine "
              f"{r['engine_peak']:,} ({r['engine_vs_allocator']:+.5%}), walk {r['walk_peak']:,} "
              f"({r['walk_vs_allocator']:+.5%}); activations traced {r['activations']:,}, engine "
              f"{r['engine_activations']:,}")
    start, stop = (int(x) for x in args.seeds.split(":"))
    engine, walk, exact = [], [], 0
    for seed in range(start, stop):
        case = engine_case(seed)
        r = compare(case.config, case.setup)
        engine.append(r["engine_vs_allocator"])
        walk.append(r["walk_vs_allocator"])
        exact += abs(r["engine_activations"] - r["activations"]) <= 0.001 * r["activations"]
        print(f"{case.label:58s} engine {r['engine_vs_allocator']:+.4%} walk {r['walk_vs_allocator']:+.4%} "
              f"activations {r['engine_activations'] - r['activations']:+,} B", flush=True)
    print(summary("random dense steps", engine, walk) + f"; activations within 0.1%: {exact}")
    engine, walk, skipped = recorded(args.recorded)
    print(summary("recorded allocator fuzz cases", engine, walk) + f"; {skipped} not modelled (skipped)")


if __name__ == "__main__":
    main()
