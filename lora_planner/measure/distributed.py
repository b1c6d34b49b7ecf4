"""Per-rank memory of one data-parallel training step, traced, beside the per-GPU plan.

Run it under `torchrun`; each rank builds the same transformers model from the planner's
`ModelSpec` (a catalog name or a config.json, optionally its first `--layers N` decoder layers),
adds PEFT LoRA adapters for `--method lora`, wraps it with PyTorch FSDP2 (`fully_shard` on every
decoder layer and on the root) or DDP, traces one steady-state forward, backward and foreach AdamW
step with `MemoryTracer`, and rank 0 writes one JSON line per rank with the traced peak, the plan's
per-GPU prediction and the relative error (predicted - measured) / measured::

    torchrun --nproc-per-node 2 -m lora_planner.measure.distributed --strategy fsdp --out ranks.jsonl

Without a GPU it runs on the CPU with the gloo backend, the plan taken for the CPU (its attention
kernels, AdamW's 4-byte step counter per tensor in CPU memory). Precision is `fp32` or `amp` (bf16
autocast over fp32 weights), what a plain PyTorch step runs.

FSDP2 keeps each parameter as a DTensor whose local shard is a plain tensor; the tracer here counts
that local shard, so every rank sees its own bytes, not the global tensor's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import warnings

import torch

STRATEGIES = {"fsdp": "fsdp", "ddp": "none"}  # measured engine -> the plan's sharding
# A GPT-2 small enough for a CPU test, large enough that model states are not lost in the noise.
DEFAULT_SHAPE = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 512,
                 "n_positions": 64}
STATE_TERMS = ("parameters", "gradients", "optimizer_states")
_BLOCK = re.compile(r"(^|\.)(transformer\.h|model\.layers)\.\d+$")


def job_spec(model: str | None, layers: int | None = None):
    """The measured model's `ModelSpec`: a catalog name or config.json (sliced to `layers`), or the
    small default GPT-2."""
    from ..measure.traced_step import sliced
    from ..spec import spec_from_hf_config

    if model is None:
        spec = spec_from_hf_config(DEFAULT_SHAPE, name="gpt2-tiny")
    else:
        from ..resolve import resolve_model

        spec = resolve_model(model)
    return sliced(spec, layers)


def job_setup(strategy: str, world_size: int, method: str = "full", rank: int = 8,
              targets: tuple[str, ...] = ("default",), precision: str = "fp32", batch_size: int = 2,
              seq_len: int = 32, grad_checkpointing: bool = False, reshard_after_forward: bool = True):
    """The `TrainSetup` each rank runs and the plan describes. No dropout: the job runs without it,
    so that every rank's step is deterministic (GPT-2's config default would be 0.1)."""
    from ..spec import TrainSetup

    return TrainSetup(method=method, rank=rank, targets=targets, precision=precision, optimizer="adamw",
                      batch_size=batch_size, seq_len=seq_len, grad_checkpointing=grad_checkpointing,
                      dropout=0.0, num_gpus=world_size, sharding=STRATEGIES[strategy],
                      reshard_after_forward=reshard_after_forward,
                      stack="torch")  # the job's loop: foreach AdamW and the model's own loss


def predicted(spec, setup) -> dict:
    """The plan's per-GPU bytes for `setup` on the CPU: the per-GPU terms and the step's peak from
    the same functions the plan uses (`sharding.step_phases_on_gpu` on a CPU step prediction, its
    peak over the terms the tracer counts: `timeline.tracer_peak`), plus torch's 4-byte AdamW step
    counter per trainable tensor, which lives in CPU memory. `shards` are the whole-model terms
    divided as the sharding divides them (without run-time buffers)."""
    from ..gpus import get_gpu
    from ..measure.traced_step import _trainable_tensors
    from ..plan import make_plan
    from ..precision import get_precision
    from ..sharding import sharding_of, step_phases_on_gpu
    from ..step import predict_step
    from ..timeline import tracer_peak

    gpu = get_gpu("h100")
    whole = make_plan(spec, (setup.with_(num_gpus=None, sharding="none"),), gpu).plans[0]
    per_gpu = make_plan(spec, (setup,), gpu).plans[0]
    precision = get_precision(setup.precision)
    step = predict_step(spec, setup, precision, {k: t.bytes for k, t in whole.memory.items()}, device="cpu")
    sharding = sharding_of(setup.num_gpus, setup.sharding, setup.offload)
    phases = step_phases_on_gpu(step, per_gpu.data_parallel.per_gpu, sharding, spec, setup, precision)
    top = tracer_peak(phases)  # the tracer's terms: not the CPU RNG states checkpointing keeps
    counters = 4 * _trainable_tensors(spec, setup)
    divisor = setup.num_gpus if setup.sharding == "fsdp" else 1
    memory = {k: t.bytes for k, t in per_gpu.memory.items()}
    memory["peak"] = top.bytes + counters
    return {
        "memory_bytes": memory,
        "peak_phase": top.name,
        "peak_what": top.what,
        "step_counters": counters,
        "shards": {  # the model states by the tracer's names
            "parameters": -(-whole.memory["weights"].bytes // divisor),
            "gradients": -(-whole.memory["gradients"].bytes // divisor),
            "optimizer_states": -(-(whole.memory["optimizer_states"].bytes
                                    + whole.memory["master_weights"].bytes) // divisor),
        },
    }


def _shard_aware_tracer():
    """`MemoryTracer` for FSDP2: it counts a DTensor's local shard rather than the global tensor, and
    follows storages resized in place. FSDP2 frees a gathered parameter with
    `untyped_storage().resize_(0)` and gathers it again into the same storage, calls a dispatch mode
    never sees; so before and after every op each live storage's size is read again, and the peak's
    blocks are copied when the peak is set, so later resizes do not rewrite it."""
    from dataclasses import replace

    from torch.distributed.tensor import DTensor

    from .tracer import MemoryTracer

    class ShardTracer(MemoryTracer):
        def _track(self, t, op, tag=""):
            if isinstance(t, DTensor):
                t = t._local_tensor
            return super()._track(t, op, tag)

        def _resync(self) -> None:
            for ref, block in self._live.values():
                storage = ref()
                if storage is None:
                    continue
                n = storage.nbytes()
                if n != block.nbytes:
                    self._current += n - block.nbytes
                    block.nbytes = n
            self._note_peak()

        def _note_peak(self) -> None:
            self._phase_peaks[self._phase] = max(self._phase_peaks.get(self._phase, 0), self._current)
            if self._current >= self._peak:
                self._peak = self._current
                self._peak_phase = self._phase
                self._peak_blocks = [replace(b) for _, b in self._live.values()]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._resync()
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self._note_peak()
            self._resync()
            return out

    return ShardTracer


def _settle_collectives() -> None:
    """On gloo a collective returns when its work is done, but gloo's worker thread may drop its own
    reference to the buffers a moment later; under load that moment falls after the next
    allocation and one rank reads a higher peak than the others. A short yield after each of
    FSDP2's collectives lets the worker let go first (CPU measurement only: on a GPU the caching
    allocator's stream order decides, not a thread)."""
    import time

    import torch.distributed as dist

    for name in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
                 "reduce_scatter_tensor"):
        original = getattr(dist, name, None)
        if original is None or getattr(original, "_settled", False):
            continue

        def settled(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            time.sleep(0.002)
            return out

        settled._settled = True
        setattr(dist, name, settled)


def _wrap(model, strategy: str, world_size: int, reshard_after_forward: bool):
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    if device == "cpu":
        _settle_collectives()
    mesh = init_device_mesh(device, (world_size,))
    blocks = [m for name, m in model.named_modules() if _BLOCK.search(name)]
    for block in blocks:  # one gathered unit per decoder layer
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head
    return model


def build_model(spec, setup, device):
    """The transformers model of `spec` (random weights, no dropout), with PEFT LoRA for `lora`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..spec import check_runnable_attention, to_hf_config
    from .step import enable_checkpointing
    from .traced_step import _with_lora

    check_runnable_attention(spec, setup.attention)
    config = AutoConfig.for_model(**to_hf_config(spec))
    config.use_cache = False
    config._attn_implementation = setup.attention
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    model = AutoModelForCausalLM.from_config(config)
    model.loss_type = "ForCausalLM"  # GPT2LMHeadModel names no loss: say it, no warning
    model.train()
    if setup.grad_checkpointing:
        enable_checkpointing(model)
    if setup.method == "lora":
        model = _with_lora(model, spec, setup)
    return model.to(device)


def measure_rank(spec, setup, strategy: str) -> dict:
    """Trace one steady-state step on this rank (the process group must be up); return its row."""
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # every rank starts from the same weights, as data parallelism requires
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    model = _wrap(build_model(spec, setup, device), strategy, world_size, setup.reshard_after_forward)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    generator = torch.Generator().manual_seed(rank)  # each rank its own micro-batch
    ids = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len), generator=generator).to(device)
    labels = ids.clone()
    compute_dtype = torch.bfloat16 if setup.precision == "amp" else None

    def step(tracer=None):
        import contextlib

        from .step import train_step

        return train_step(model, optimizer, ids, labels, compute_dtype=compute_dtype,
                          phase=tracer.phase if tracer else lambda _name: contextlib.nullcontext())

    # One untraced step first: the optimizer's states then exist, as in every step of a run but
    # the first, which is the step the plan describes.
    step()
    tracer = _shard_aware_tracer()(model, optimizer, inputs=(ids, labels))
    # Python's cycle collector runs when it likes: a collection in the middle of a step frees
    # cyclic garbage early on one rank and not on another. Collected before, off during: each rank
    # counts what reference counting frees, the same on every rank.
    gc.collect()
    gc.disable()
    try:
        with tracer:
            loss = step(tracer)
    finally:
        gc.enable()
    report = tracer.report()
    plan = predicted(spec, setup)
    peak = plan["memory_bytes"]["peak"]
    from dataclasses import asdict

    return {
        "rank": rank, "world_size": world_size, "strategy": strategy, "sharding": STRATEGIES[strategy],
        "backend": dist.get_backend(), "model": asdict(spec),
        "setup": {k: v for k, v in asdict(setup).items()},
        "batch_size": setup.batch_size, "seq_len": setup.seq_len,
        "measured": report.to_dict(),
        "predicted": plan,
        "relative_error": {"peak": (peak - report.peak_bytes) / report.peak_bytes},
        "loss": loss.item(),
    }


def versions() -> dict:
    """What ran: torch, transformers, peft (when installed), Python."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run(cases: list[tuple], out: str | None, command: str = "") -> list[dict] | None:
    """Initialise the process group from torchrun's environment, measure each (spec, setup, strategy)
    case in turn, gather rows on rank 0, which writes them with the command and versions that
    produced them. One launch for many cases: starting the ranks costs more than a small step."""
    import datetime

    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    gathered: list[dict] = []
    try:
        for spec, setup, strategy in cases:
            row = measure_rank(spec, setup, strategy)
            rows: list = [None] * dist.get_world_size()
            dist.all_gather_object(rows, row)
            gathered += rows
        rank = dist.get_rank()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    provenance = {"command": command, "versions": versions(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    gathered = [{**r, "provenance": provenance} for r in gathered]
    if out:
        with open(out, "a") as f:
            for r in gathered:
                f.write(json.dumps(r) + "\n")
    return gathered


def summary(rows: list[dict]) -> str:
    """One line per rank: traced and predicted peak, and the error."""
    lines = []
    for r in rows:
        m, p = r["measured"], r["predicted"]["memory_bytes"]
        s = r["setup"]
        what = (f"{r['model']['name']} {s['method']} {s['precision']}"
                + (" ckpt" if s["grad_checkpointing"] else "")
                + ("" if s["reshard_after_forward"] or r["strategy"] != "fsdp" else " no-reshard"))
        lines.append(f"rank {r['rank']}/{r['world_size']} {r['strategy']} {what}: traced peak "
                     f"{m['peak']:,} B in {m['peak_phase']}, predicted {p['peak']:,} B in "
                     f"{r['predicted']['peak_phase']}, error {100 * r['relative_error']['peak']:+.2f}%")
    return "\n".join(lines)


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_planner.measure.distributed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="fsdp", help="fsdp, ddp, or both comma-separated")
    parser.add_argument("--model", help="catalog names or config.json paths, comma-separated "
                                        "(default: a 2-layer GPT-2 of width 128)")
    parser.add_argument("--layers", type=int, help="only the first N decoder layers")
    parser.add_argument("--method", default="full", help="full, lora, or both comma-separated")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--targets", default="default", help="LoRA targets, comma-separated (as `plan`)")
    parser.add_argument("--precision", choices=("fp32", "amp"), default="fp32")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                        help="fsdp: free each layer's gathered weights after its forward")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--out", help="append one JSON line per rank and case here (rank 0 writes)")
    args = parser.parse_args(argv)
    strategies, methods = _list(args.strategy), _list(args.method)
    for value, known in ((strategies, STRATEGIES), (methods, ("full", "lora"))):
        bad = [v for v in value if v not in known]
        if bad or not value:
            parser.error(f"choose from {', '.join(known)}, got {', '.join(bad) or 'nothing'}")
    if "RANK" not in os.environ:
        parser.error("run under torchrun: torchrun --nproc-per-node 2 -m lora_planner.measure.distributed")
    # Third-party notices (PEFT, transformers, FSDP's own) are not the job's output.
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    world = int(os.environ["WORLD_SIZE"])
    targets = tuple(_list(args.targets)) or ("default",)
    cases = [(job_spec(model, args.layers),
              job_setup(strategy, world, method, args.rank, targets, args.precision, args.batch_size,
                        args.seq_len, args.grad_checkpointing, args.reshard_after_forward), strategy)
             for model in (_list(args.model) if args.model else [None])
             for method in methods for strategy in strategies]
    command = "torchrun --nproc-per-node {} -m lora_planner.measure.distributed {}".format(
        world, " ".join(sys.argv[1:] if argv is None else argv))
    rows = run(cases, args.out, command)
    if rows is not None:
        print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
