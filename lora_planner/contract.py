"""The plan's JSON contract: what `--format json` prints and what `measure`, `reports` and `serve`
read. Bytes are integers; every method and rank is one entry of `plans`. One place for the schema, so
a renderer's layout can change without changing what other code reads."""

from __future__ import annotations

from dataclasses import fields

from .gpus import largest_fitting_peak
from .plan import MEMORY_KEYS, MethodPlan, Plan
from .spec import TrainSetup


def trainable_percent(p: MethodPlan, total: int) -> float:
    return 100.0 * p.trainable_params / total if total else 0.0


# TrainSetup fields that differ between the entries of `plans`: each entry carries its own.
PER_PLAN_FIELDS = ("method", "rank")


def setup_dict(setup: TrainSetup) -> dict:
    """The JSON `setup`: every `TrainSetup` field, read off the dataclass so that a new field
    cannot be left out, but the per-plan ones (`PER_PLAN_FIELDS`); tuples as lists."""
    return {f.name: list(value) if isinstance(value := getattr(setup, f.name), tuple) else value
            for f in fields(TrainSetup) if f.name not in PER_PLAN_FIELDS}


def to_dict(plan: Plan) -> dict:
    """The JSON contract: integer bytes under `memory_bytes`, one entry per method and rank."""
    s = plan.setup
    return {
        "model": {
            "name": plan.model.name,
            "family": plan.model.family,
            "total_params": plan.model.total_params,
            "source": plan.model.source,
        },
        "setup": setup_dict(s),
        "gpu": {"name": plan.gpu.name, "memory_bytes": plan.gpu.memory_bytes,
                "largest_fitting_peak_bytes": largest_fitting_peak(plan.gpu),
                "peak_tflops": plan.gpu.peak_tflops, "price_per_hour": plan.gpu.price_per_hour,
                "source": plan.gpu.source},
        "plans": [
            {
                "method": p.method,
                "rank": p.rank,
                "trainable_params": p.trainable_params,
                "trainable_percent": trainable_percent(p, plan.model.total_params),
                "all_params": p.all_params,
                "target_modules": list(p.target_modules),
                "wrapped_modules": p.wrapped_modules,
                "memory_bytes": {k: p.memory[k].bytes for k in MEMORY_KEYS},
                "peak_phase": p.peak_phase or None,
                # the allowance is on the per-GPU peak of the GPUs shown (see `MethodPlan.per_gpu_peak`)
                "per_gpu_peak_bytes": p.per_gpu_peak,
                "device_overhead_bytes": p.device_overhead.bytes if p.device_overhead else None,
                "activation_cpu_bytes": p.activation_cpu_bytes,
                # a bitsandbytes paged optimizer's states in CUDA unified memory, per GPU (null for
                # any other optimizer): outside memory_bytes, the peak and the fit check
                "paged_optimizer_bytes": (p.paged_optimizer_states.bytes if p.paged_optimizer_states
                                          else None),
                "weights_bytes": {t.name: t.bytes for t in p.weight_terms},
                "checkpoint_bytes": p.checkpoint.bytes,
                "full_checkpoint_bytes": p.full_checkpoint_bytes,
                "storage_bytes": dict(p.storage),
                "gpus_needed": p.gpus_needed,
                "gpus_needed_strategy": p.gpus_needed_strategy,
                "fits": p.fits,
                "fit": None if p.fit is None else {
                    "max_batch_size": p.fit.max_batch_size, "max_seq_len": p.fit.max_seq_len},
                **_scale_dict(p),
            }
            for p in plan.plans
        ],
        "workload": None if plan.workload is None else {
            "tokens": plan.workload.tokens, "mfu": plan.workload.mfu,
            "price_per_hour": plan.workload.price_per_hour},
        "notes": list(plan.notes),
        **_advice_dict(plan),
    }


def _advice_dict(plan: Plan) -> dict:
    """`suggestions`: for each method whose step does not fit, the changes that make it fit (the
    CLI flags to add) and what the plan then gives; `with_grad_checkpointing`: every method planned
    again with checkpointing (null when it is on, or when every method fits)."""
    advice = plan.advice
    suggestions = [] if advice is None else [
        {"method": s.method, "rank": s.rank, "change": s.change,
         "effect": {"peak_bytes_per_gpu": s.peak, "gpus": s.gpus, "strategy": s.strategy}}
        for s in advice.suggestions]
    checkpointed = None if advice is None or not advice.checkpointed else [
        {"method": q.method, "rank": q.rank, "gpus_needed": q.gpus_needed,
         "gpus_needed_strategy": q.gpus_needed_strategy, "fits": q.fits,
         "activations_bytes": q.memory["activations"].bytes, "peak_bytes": q.memory["peak"].bytes,
         "per_gpu_peak_bytes": q.per_gpu_peak}
        for q in advice.checkpointed]
    return {"suggestions": suggestions, "with_grad_checkpointing": checkpointed}


def planned_gpus(p: MethodPlan) -> int | None:
    """The GPU count a method was planned on (None: whole-model totals on one GPU)."""
    dp = p.data_parallel
    return dp.sharding.num_gpus if dp is not None and dp.sharding is not None else None


def step_is_timed(p: MethodPlan) -> bool:
    """Whether the step fits on the GPUs its time is computed for: the GPUs given (the fit rule's
    verdict), else the fewest that fit (none when nothing fits at any count). A step that does not
    fit is given no wall time, GPU-hours or cost."""
    return p.fits if planned_gpus(p) is not None else p.gpus_needed is not None


def _scale_dict(p: MethodPlan) -> dict:
    """Per-plan JSON keys for data parallelism and compute; time keys are null without tokens, and
    null (with `timed` false) for a step that does not fit on the GPUs it would be timed on."""
    dp, c = p.data_parallel, p.compute
    timed = c is not None and step_is_timed(p)
    return {
        "min_gpus": dict(dp.min_gpus) if dp else {},
        "zero3_buffer_bytes": {k: t.bytes for k, t in dp.buffers.items()} if dp else {},
        "cpu_offload_bytes": dp.cpu_bytes if dp else 0,
        "flops_per_token": int(p.flops_per_token.value) if p.flops_per_token else None,
        "flops": c.flops if c else None,
        "num_gpus_for_time": c.num_gpus if c else None,
        "timed": timed,
        "wall_hours": c.wall_hours if timed else None,
        "gpu_hours": c.gpu_hours if timed else None,
        "cost_usd": c.cost_usd if timed else None,
    }
