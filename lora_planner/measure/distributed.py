"""Per-rank memory of one data-parallel training step, traced, beside the per-GPU plan.

Run it under `torchrun`; each rank builds the same small GPT-2 (`TinyGPT2`: GPT-2's modules,
names and parameter shapes, written here so that a rank starts without importing transformers,
which dominates a CPU test's time), wraps it with PyTorch FSDP2
(`fully_shard` on every block and on the root: ZeRO-3) or DDP (replicated: no sharding), traces
one forward, backward and AdamW step with `MemoryTracer`, and rank 0 writes one JSON line per rank
with the traced peak, the plan's per-GPU prediction and the relative error
(predicted - measured) / measured::

    torchrun --nproc-per-node 2 -m lora_planner.measure.distributed --strategy fsdp --out ranks.jsonl

Without a GPU it runs on the CPU with the gloo backend. Training is in fp32 (the `fp32`
convention: 4 B weights and gradients, two 4 B AdamW states per parameter).

FSDP2 keeps each parameter as a DTensor whose local shard is a plain tensor; the tracer here counts
that local shard, so every rank sees its own bytes, not the global tensor's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

STRATEGIES = {"fsdp": "zero3", "ddp": "none"}  # measured engine -> the plan's sharding
# A GPT-2 small enough for a CPU test, large enough that model states are not lost in the noise.
DEFAULT_SHAPE = {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 512, "n_positions": 64}
STATE_TERMS = ("parameters", "gradients", "optimizer_states")


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)  # fused q, k, v
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # (B, T, d) each
        # (B, nh, T, hs) each
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, d)


class _Mlp(nn.Module):
    def __init__(self, d: int, inner: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, inner)
        self.c_proj = nn.Linear(inner, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, inner: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), _Attention(d, heads)
        self.ln_2, self.mlp = nn.LayerNorm(d), _Mlp(d, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT2(nn.Module):
    """GPT-2 with the output head tied to the token embedding; parameter names and sizes are
    transformers' (`transformer.h.0.attn.c_attn.weight`, ...), stored as nn.Linear (out, in)
    rather than Conv1D (in, out): the same bytes."""

    def __init__(self, spec) -> None:
        super().__init__()
        d = spec.hidden_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(spec.vocab_size, d),
            "wpe": nn.Embedding(spec.max_positions, d),
            "h": nn.ModuleList(_Block(d, spec.num_heads, spec.intermediate_size)
                               for _ in range(spec.num_layers)),
            "ln_f": nn.LayerNorm(d),
        })

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of (B, T) ids, the inputs as labels."""
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)  # (T,)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (B, T, d)
        for block in self.transformer.h:
            x = block(x)
        logits = self.transformer.ln_f(x) @ self.transformer.wte.weight.T  # (B, T, vocab)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def tiny_spec(shape: dict | None = None):
    """The planner's `ModelSpec` for the measured GPT-2 (the same shape builds the real model)."""
    from ..spec import spec_from_hf_config

    return spec_from_hf_config({"model_type": "gpt2", **(shape or DEFAULT_SHAPE)}, name="gpt2-tiny")


def predicted(spec, strategy: str, world_size: int, batch_size: int, seq_len: int) -> dict:
    """The plan's per-GPU bytes for full fp32 fine-tuning with AdamW on `world_size` GPUs, and the
    whole-model terms divided as the sharding divides them (without the gathered layer)."""
    from ..gpus import get_gpu
    from ..plan import make_plan
    from ..spec import TrainSetup

    # TinyGPT2 has no dropout layers, so none is planned (GPT-2's config default would be 0.1).
    setup = TrainSetup(method="full", precision="fp32", optimizer="adamw", batch_size=batch_size,
                       seq_len=seq_len, dropout=0.0, num_gpus=world_size, sharding=STRATEGIES[strategy],
                       stack="torch")
    whole = make_plan(spec, (setup.with_(num_gpus=None, sharding="none"),), get_gpu("h100")).plans[0]
    per_gpu = make_plan(spec, (setup,), get_gpu("h100")).plans[0]
    divisor = world_size if strategy == "fsdp" else 1
    return {
        "memory_bytes": {k: t.bytes for k, t in per_gpu.memory.items()},
        "shards": {  # the model states without the gathered layer, by the tracer's names
            "parameters": -(-whole.memory["weights"].bytes // divisor),
            "gradients": -(-whole.memory["gradients"].bytes // divisor),
            "optimizer_states": -(-whole.memory["optimizer_states"].bytes // divisor),
        },
    }


def _shard_aware_tracer():
    """`MemoryTracer` counting a DTensor's local shard rather than the global tensor."""
    from torch.distributed.tensor import DTensor

    from .tracer import MemoryTracer

    class ShardTracer(MemoryTracer):
        def _track(self, t, op, tag=""):
            if isinstance(t, DTensor):
                t = t._local_tensor
            return super()._track(t, op, tag)

    return ShardTracer


def _wrap(model, strategy: str, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world_size,))
    for block in model.transformer.h:  # one gathered unit per transformer block
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def measure_rank(strategy: str, batch_size: int, seq_len: int, shape: dict | None = None) -> dict:
    """Trace one steady-state step on this rank (the process group must be up); return its row."""
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    spec = tiny_spec(shape)
    torch.manual_seed(0)  # every rank starts from the same weights, as data parallelism requires
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    model = TinyGPT2(spec).to(device)
    model.train()
    model = _wrap(model, strategy, world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)  # each rank its own micro-batch
    ids = torch.randint(0, spec.vocab_size, (batch_size, seq_len), generator=generator).to(device)

    # One untraced step first: the optimizer's states then exist, as in every step of a run but
    # the first, which is the step the plan describes.
    model(ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracer = _shard_aware_tracer()(model, optimizer)
    with tracer:
        with tracer.phase("forward"):
            loss = model(ids)
        with tracer.phase("backward"):
            loss.backward()
        with tracer.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    report = tracer.report()
    plan = predicted(spec, strategy, world_size, batch_size, seq_len)
    peak = plan["memory_bytes"]["peak"]
    return {
        "rank": rank, "world_size": world_size, "strategy": strategy, "sharding": STRATEGIES[strategy],
        "backend": dist.get_backend(), "model": asdict(spec),
        "batch_size": batch_size, "seq_len": seq_len,
        "measured": report.to_dict(),
        "predicted": plan,
        "relative_error": {"peak": (peak - report.peak_bytes) / report.peak_bytes},
        "loss": float(loss),
    }


def run(strategy: str, batch_size: int, seq_len: int, out: str | None) -> list[dict] | None:
    """Initialise the process group from torchrun's environment, measure, gather rows on rank 0."""
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        row = measure_rank(strategy, batch_size, seq_len)
        rows: list = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
    finally:
        dist.destroy_process_group()
    if row["rank"] != 0:
        return None
    if out:
        with open(out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


def summary(rows: list[dict]) -> str:
    """One line per rank: traced and predicted peak, and the error."""
    lines = []
    for r in rows:
        m, p = r["measured"], r["predicted"]["memory_bytes"]
        lines.append(f"rank {r['rank']}/{r['world_size']} {r['strategy']} ({r['sharding']}): traced peak "
                     f"{m['peak']:,} B in {m['peak_phase']}, predicted {p['peak']:,} B, "
                     f"error {100 * r['relative_error']['peak']:+.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_planner.measure.distributed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="fsdp")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--out", help="write one JSON line per rank here (rank 0 writes)")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run under torchrun: torchrun --nproc-per-node 2 -m lora_planner.measure.distributed")
    rows = run(args.strategy, args.batch_size, args.seq_len, args.out)
    if rows is not None:
        print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
