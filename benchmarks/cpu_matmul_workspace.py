"""The CPU allocator's workspace inside one `torch.mm` on isolated operands, by shape, layout, dtype.

    python benchmarks/cpu_matmul_workspace.py [--seed 0] [--cases 12]

Each product runs once under torch's profiler (`profile_memory=True`, one thread); its workspace is
every byte allocated inside the op beyond the output it returns (what the tracer cannot see and the
allocator can). Printed: the dtypes and layouts (n: row-major, t: a transposed view) over seeded
random (M, K, N); for K = N = 64, the workspace by M (a single row: torch's gemv, none); and for
one shape the change when K or N doubles beside K x N x 2 bytes, a packed 16-bit copy of the second
operand's growth. The sizes come from oneDNN's scratchpad for the host's
instruction set, so they are this host's; docs/accuracy.md reads them.
"""

from __future__ import annotations

import argparse
import random


def workspace(torch, a, b) -> int:
    """The most bytes live inside `torch.mm(a, b)` beyond its output."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = torch.mm(a, b)
    live = most = 0
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]":
            live += event.nbytes()
            most = max(most, live)
    return most - out.nbytes


def operands(torch, m: int, k: int, n: int, layout: str, dtype):
    a = torch.randn(k, m, dtype=dtype).t() if layout[0] == "t" else torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, k, dtype=dtype).t() if layout[1] == "t" else torch.randn(k, n, dtype=dtype)
    return a, b


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    print(f"host: {torch.backends.cpu.get_cpu_capability()}, oneDNN {torch.backends.mkldnn.is_available()}")
    print("dtype     layout      M     K     N  workspace B")
    for _ in range(args.cases):
        m, k, n = (rng.randint(1, 256) for _ in range(3))
        layout = rng.choice(("nn", "tn", "nt", "tt"))
        for dtype in (torch.float32, torch.bfloat16):
            ws = workspace(torch, *operands(torch, m, k, n, layout, dtype))
            print(f"{str(dtype)[6:]:9} {layout:6} {m:5} {k:5} {n:5} {ws:12,}")
    by_m = {m: workspace(torch, *operands(torch, m, 64, 64, "nn", torch.bfloat16)) for m in (1, 32, 48, 64)}
    print("bfloat16 nn, K=N=64, by M: " + ", ".join(f"M={m} {ws:,} B" for m, ws in by_m.items()))
    base = workspace(torch, *operands(torch, 64, 128, 128, "nn", torch.bfloat16))
    for name, (k, n) in (("K", (256, 128)), ("N", (128, 256))):
        grown = workspace(torch, *operands(torch, 64, k, n, "nn", torch.bfloat16))
        print(f"bfloat16 nn, M=64: {name} 128 -> 256 adds {grown - base:,} B; K x N x 2 adds "
              f"{2 * (k * n - 128 * 128):,} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
