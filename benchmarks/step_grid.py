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
import json
import sys
import time
from dataclasses import replace

# the cases live in the package (the tests draw their tiny models from them too)
from lora_planner.measure.grid import TINY, grid, large, provenance, sum_of_terms


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
