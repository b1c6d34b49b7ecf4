"""One measured fine-tuning job: build the model, train a few steps, read memory and speed, and
write one record beside the planner's prediction for the same settings.

Run in-process by `lora-plan measure run`, and as `python -m lora_planner.measure.job` (one
subprocess per job) by sweeps, so an out-of-memory error or a crash ends only its own job.

The job takes the planner's own `TrainSetup` (`Job.setup`) beside its run settings (`Job.run`),
so the prediction is made from the very setup that runs. Of the planner's precisions it runs
those a plain torch loop realises:

| precision | what runs                                                    |
|-----------|--------------------------------------------------------------|
| fp32      | fp32 weights, grads, AdamW states, compute                   |
| amp       | fp32 storage, torch.autocast compute: bf16 (`amp_dtype`), or fp16 with a GradScaler |
| pure-bf16 | the model (adapters included) cast to bf16: bf16 grads and AdamW states |

The GradScaler keeps one scale value and a few flags, far below a byte term worth planning, so
fp16 with a scaler is predicted as `amp` too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import PlanError
from ..record_schema import ENV_KEYS, make_record, settings_id
from ..spec import ModelSpec, TrainSetup, default_seq_len
from ..validate import real_number, whole_number
from .records import append_record

HARNESS_METHODS = ("full", "lora")  # what a measured job trains (the planner also plans qlora)
# The planner's precisions a plain torch loop runs: fp32; autocast over fp32 weights (`amp`), in
# bf16 or in fp16 with a grad scaler (`amp_dtype`); and a bf16 model (`pure-bf16`), whose AdamW
# states torch keeps in bf16 too. `mixed` and `bf16` keep 16-bit weights beside an fp32 master copy
# or fp32 states, which torch's AdamW does not.
JOB_PRECISIONS = ("fp32", "amp", "pure-bf16")
AMP_DTYPES = ("bf16", "fp16")
ATTENTIONS = ("eager", "sdpa")
DEVICES = ("cpu", "cuda")
DATA_SOURCES = ("qa", "synthetic")  # or the path of a local text file
# The step's kernels (as `--optimizer-impl` and `--loss` of the planner): AdamW fused, foreach or
# for-loop; the model's own loss, torchtune's chunked cross-entropy, or Liger's fused linear one.
OPTIMIZER_IMPLS = ("foreach", "fused", "for-loop")
LOSSES = ("standard", "chunked", "fused-linear")
# A grad scaler skips the steps whose fp16 gradients overflow; warm-up steps run until the
# optimizer holds its states, at most this many.
MAX_WARMUP_STEPS = 20
# What an allocation failure says when it is not torch's OutOfMemoryError.
OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                "cufft_alloc_failed", "cusparse_status_alloc_failed")

# Tests and rehearsals inject faults through this variable: `oom`, `error`, `hang` or `kill-sweep`,
# optionally `@<job id>` to hit one job of a sweep, several entries joined by commas.
# `kill-sweep` kills the parent process (the sweep) and exits without a record, as a machine that
# goes down mid-sweep would; `hang` sleeps until a sweep's timeout ends it.
FAULT_ENV = "LORA_PLAN_FAULT"
# A fraction of the GPU's memory the job may use (`torch.cuda.set_per_process_memory_fraction`):
# a smaller GPU played by a larger one, and a real out-of-memory error on demand in tests.
MEMORY_FRACTION_ENV = "LORA_PLAN_CUDA_MEMORY_FRACTION"

# What every measured job is, in the planner's terms: AdamW in a plain torch loop, every choice
# of its stack named (torch's default foreach AdamW on CUDA, the model's own loss, no offload). A
# job varies only `SETUP_SETTINGS` of it.
JOB_SETUP = TrainSetup(method="lora", precision="fp32", optimizer="adamw", stack="torch",
                       optimizer_impl="foreach", loss="standard", loss_chunks=8, activation_offload=False,
                       quant_backend="bnb")
# The TrainSetup fields a job varies, under the same names in spec files, `--set` and records.
SETUP_SETTINGS = ("method", "rank", "targets", "precision", "batch_size", "seq_len",
                  "grad_checkpointing", "attention", "dropout", "lora_dropout", "optimizer_impl",
                  "loss", "loss_chunks")


@dataclass(frozen=True)
class RunSettings:
    """What a measured run adds to the planner's `TrainSetup`: the model it builds (a catalog
    name or config path, or a local weights folder), LoRA's scaling (which moves no byte), the
    16-bit type of autocast, and how long, on what data and where it trains."""

    model: str = "gpt2"
    weights: str | None = None  # a local folder of pretrained weights; None: random weights
    alpha: float = 16.0
    rslora: bool = False
    amp_dtype: str = "bf16"  # precision amp only: bf16, or fp16 with a grad scaler
    steps: int = 10
    lr: float = 1e-4
    data: str = "qa"
    seed: int = 0
    device: str = "cpu"


RUN_SETTINGS = tuple(f.name for f in dataclasses.fields(RunSettings))
# How a setting is read from command-line text (`--set key=value`, `--grid key=v1,v2`).
SETTING_KINDS = {
    "method": "str", "rank": "int|none", "targets": "list", "precision": "str", "batch_size": "int",
    "seq_len": "int", "grad_checkpointing": "bool", "attention": "str", "dropout": "float|none",
    "lora_dropout": "float", "optimizer_impl": "str", "loss": "str", "loss_chunks": "int",
    "model": "str", "weights": "str|none", "alpha": "float", "rslora": "bool", "amp_dtype": "str",
    "steps": "int", "lr": "float", "data": "str", "seed": "int", "device": "str",
}
# Names a record once used, read as the settings they are now: until `dropout` named every dropout
# of the model (as in `plan`), it was LoRA's; `bf16` and `fp16` named autocast, the planner's `amp`.
LEGACY_PRECISIONS = {"bf16": ("amp", "bf16"), "fp16": ("amp", "fp16")}


@dataclass(frozen=True)
class Job:
    """Everything that defines a measured job: the planner's setup, so the prediction and the
    measurement cannot disagree about it, and the run's own settings. Two jobs with equal
    settings are the same job (`id`)."""

    setup: TrainSetup = JOB_SETUP
    run: RunSettings = RunSettings()

    @classmethod
    def from_dict(cls, values: dict) -> Job:
        """A checked job from flat settings (a spec file's, `--set`'s, a record's): the names of
        `SETUP_SETTINGS` and `RUN_SETTINGS`. A missing or null `seq_len` is the planner's default
        for the model (2,048 tokens, or its context when shorter)."""
        known = (*SETUP_SETTINGS, *RUN_SETTINGS)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise PlanError(f"unknown job setting {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(sorted(known))}")
        values = dict(values)
        if isinstance(values.get("targets"), str):
            values["targets"] = values["targets"].split(",")
        if "targets" in values:
            values["targets"] = tuple(t.strip() for t in values["targets"] if t.strip())
        run = RunSettings(**{k: v for k, v in values.items() if k in RUN_SETTINGS})
        if values.get("seq_len") is None:
            from ..resolve import resolve_model

            values["seq_len"] = default_seq_len(resolve_model(run.weights or run.model))
        setup = JOB_SETUP.with_(**{k: v for k, v in values.items() if k in SETUP_SETTINGS})
        return cls(setup, run).checked()

    @classmethod
    def from_record(cls, settings: dict) -> Job:
        """The job a record's settings describe, written under today's names or earlier ones
        (`LEGACY_PRECISIONS`; `dropout` as LoRA's where the record has no `lora_dropout`)."""
        values = dict(settings)
        if "lora_dropout" not in values and "dropout" in values:
            values["lora_dropout"] = values.pop("dropout")
        if values.get("precision") in LEGACY_PRECISIONS:
            values["precision"], values["amp_dtype"] = LEGACY_PRECISIONS[values["precision"]]
        return cls.from_dict(values)

    def checked(self) -> Job:
        """Validate, and normalise what does not apply (a full fine-tune has no rank or targets),
        so equal jobs get equal ids."""
        s, r = self.setup, self.run
        fixed = [f.name for f in dataclasses.fields(TrainSetup)
                 if f.name not in SETUP_SETTINGS and getattr(s, f.name) != getattr(JOB_SETUP, f.name)]
        if fixed:
            raise PlanError(f"a measured job trains with AdamW in a plain torch loop; it does not vary "
                            f"{', '.join(fixed)}")
        if s.method not in HARNESS_METHODS:
            raise PlanError(f"method must be one of {', '.join(HARNESS_METHODS)}, got {s.method!r}")
        if s.precision not in JOB_PRECISIONS:
            # bf16 and fp16 named autocast here once; in the plan bf16 keeps 16-bit weights
            legacy = LEGACY_PRECISIONS.get(s.precision)
            hint = f"; {s.precision} autocast is precision amp with amp_dtype {legacy[1]}" if legacy else ""
            raise PlanError(f"a measured job runs precision fp32, amp (autocast over fp32 weights, in bf16 "
                            f"or fp16 by amp_dtype, --amp-dtype) or pure-bf16, not {s.precision!r}{hint}")
        if r.amp_dtype not in AMP_DTYPES:
            raise PlanError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {r.amp_dtype!r}")
        if s.attention not in ATTENTIONS:
            raise PlanError(f"attention must be one of {', '.join(ATTENTIONS)}, got {s.attention!r}")
        if r.device not in DEVICES:
            raise PlanError(f"device must be one of {', '.join(DEVICES)}, got {r.device!r}")
        if r.data not in DATA_SOURCES and not Path(r.data).is_file():
            raise PlanError(f"data must be qa, synthetic or a local text file; no file at {r.data}")
        if s.optimizer_impl not in OPTIMIZER_IMPLS:
            raise PlanError(f"optimizer_impl must be one of {', '.join(OPTIMIZER_IMPLS)}, "
                            f"got {s.optimizer_impl!r}")
        if s.loss not in LOSSES:
            raise PlanError(f"loss must be one of {', '.join(LOSSES)}, got {s.loss!r}")
        if s.loss == "fused-linear" and r.device != "cuda":
            raise PlanError("loss fused-linear runs Liger's Triton kernel, on a CUDA device only")
        for name, value in (("batch_size", s.batch_size), ("seq_len", s.seq_len), ("steps", r.steps),
                            ("loss_chunks", s.loss_chunks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("dropout", s.dropout), ("lora_dropout", s.lora_dropout)):
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                                      or not 0 <= value < 1):
                raise PlanError(f"{name} must be a probability in [0, 1), got {value!r}")
        # a NaN or an infinity would train into NaN: checked here, so --set and spec files are too
        real_number("alpha", r.alpha, -1e6, 1e6)
        real_number("lr", r.lr, 0, 1e6, lo_open=True)
        whole_number("seed", r.seed, 0, 2**32 - 1)  # numpy's and torch's seeds both take it
        if s.loss != "chunked":  # the chunk count means nothing to another loss
            s = s.with_(loss_chunks=JOB_SETUP.loss_chunks)
        if s.precision != "amp":  # the 16-bit type means nothing without autocast
            r = dataclasses.replace(r, amp_dtype=RunSettings.amp_dtype)
        if s.method == "full":
            s = s.with_(rank=JOB_SETUP.rank, targets=JOB_SETUP.targets, lora_dropout=0.0)
            return Job(s, dataclasses.replace(r, alpha=0.0, rslora=False))
        if not isinstance(s.rank, int) or isinstance(s.rank, bool) or s.rank < 1:
            raise PlanError(f"LoRA rank must be a positive integer, got {s.rank!r}")
        return Job(s.with_(targets=s.targets or JOB_SETUP.targets), r)

    def to_dict(self) -> dict:
        """The flat settings a record and a sweep's subprocess carry (`from_dict` reads them back)."""
        s, r = self.setup, self.run
        full = s.method == "full"
        return {
            "model": r.model, "method": s.method, "rank": None if full else s.rank,
            "targets": [] if full else list(s.targets), "alpha": r.alpha, "lora_dropout": s.lora_dropout,
            "rslora": r.rslora, "dropout": s.dropout, "batch_size": s.batch_size, "seq_len": s.seq_len,
            "steps": r.steps, "precision": s.precision, "amp_dtype": r.amp_dtype,
            "grad_checkpointing": s.grad_checkpointing, "attention": s.attention, "device": r.device,
            "lr": r.lr, "data": r.data, "seed": r.seed, "weights": r.weights,
            "optimizer_impl": s.optimizer_impl, "loss": s.loss, "loss_chunks": s.loss_chunks,
        }

    @property
    def id(self) -> str:
        return settings_id(self.to_dict())


def model_spec(job: Job) -> ModelSpec:
    """The planner's shape for the job's model: a catalog name, a config path, or the config of
    the local weights folder."""
    from ..resolve import resolve_model

    spec = resolve_model(job.run.weights or job.run.model)
    if job.setup.seq_len > spec.max_positions:
        raise PlanError(f"seq_len {job.setup.seq_len} is longer than {spec.name}'s "
                        f"{spec.max_positions} positions")
    return spec


def predict(job: Job, spec: ModelSpec, gpu_name: str | None = None) -> dict:
    """The planner's bytes for the job's own setup, with the device allowance (`allowance`) for
    the GPU it runs on (`gpu_name`, a catalog name; the default GPU's generation when unknown).
    A CPU job has no allowance (0).

    The plan is for a CUDA device. A CPU job is set beside the planner's CPU variant of the same
    step (what `lora-plan trace` compares with): torch keeps a dropout mask in the input's dtype
    there instead of one byte, falls back to the math attention kernel under dropout, and keeps
    AdamW's step counters as tensors. A CPU job is read by the tracer, so its peak is the plan's over
    the tracer's terms (without checkpointing's CPU RNG states, which no op makes).
    """
    from ..allowance import allowance
    from ..gpus import DEFAULT_GPU, get_gpu
    from ..plan import MEMORY_KEYS, make_plan

    planned = make_plan(spec, (job.setup,), get_gpu(DEFAULT_GPU)).plans[0]
    predicted = {key: int(planned.memory[key].bytes) for key in MEMORY_KEYS}
    predicted["peak_phase"] = planned.peak_phase or None
    if job.run.device == "cpu":
        from .traced_step import predicted_terms

        on_cpu, phase = predicted_terms(spec, job.setup, "cpu", tracer=True)  # read by the tracer
        predicted |= {"optimizer_states": on_cpu["optimizer_states"] - predicted["master_weights"],
                      "activations": on_cpu["activations"], "peak": on_cpu["peak"], "peak_phase": phase}
    predicted["trainable_params"] = int(planned.trainable_params)
    predicted["device_overhead_bytes"] = (
        allowance(predicted["peak"], gpu_name).total if job.run.device == "cuda" else 0)
    return predicted


def device_info(device: str, driver: str | None = None) -> dict:
    """Where the job ran, without the host's name. A CUDA job that failed before CUDA started
    says what it can without starting it."""
    torch = sys.modules.get("torch")
    if device == "cuda" and torch is not None and torch.cuda.is_initialized():
        props = torch.cuda.get_device_properties(0)
        fraction = memory_fraction()  # the job may use only this part of the device
        return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "driver": driver,
                "cuda": torch.version.cuda, "torch": torch.__version__,
                "memory_total": int(props.total_memory * (fraction or 1)), "memory_fraction": fraction,
                "capability": [props.major, props.minor], "uuid": str(props.uuid)}
    if device == "cuda":
        return {"kind": "cuda", "name": None, "driver": driver, "cuda": None,
                "torch": torch.__version__ if torch is not None else None, "memory_total": None}
    version = torch.__version__ if torch is not None else importlib.metadata.version("torch")
    return {"kind": "cpu", "name": platform.processor() or platform.machine(), "driver": None,
            "cuda": None, "torch": version, "memory_total": None}


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or any error whose message says an allocation failed (older
    torch raises a plain RuntimeError; cuBLAS, cuDNN and NCCL word it their own way, as
    `CUBLAS_STATUS_ALLOC_FAILED` when a workspace cannot be had)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return any(message in text for message in OOM_MESSAGES)


def _fault(job_id: str) -> str | None:
    for entry in os.environ.get(FAULT_ENV, "").split(","):
        kind, _, target = entry.strip().partition("@")
        if kind and (not target or target == job_id):
            return kind
    return None


def _fault_error(kind: str) -> Exception:
    """The failure a rehearsal stands in for. `kill-sweep` does not return."""
    if kind == "oom":
        return RuntimeError(f"CUDA out of memory (simulated by {FAULT_ENV})")
    if kind == "error":
        return RuntimeError(f"simulated failure ({FAULT_ENV})")
    if kind == "hang":
        time.sleep(24 * 3600)
    if kind == "kill-sweep":
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(3)
    raise PlanError(f"{FAULT_ENV} must be oom, error, hang or kill-sweep, optionally @<job id>; got {kind!r}")


def _error_text(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"


# The config keys of the families' dropouts (GPT-2's three, Phi-3's residual one, the others'
# attention dropout): `TrainSetup.dropout` sets each one a config has.
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout")


def build_model(spec: ModelSpec, job: Job):
    """A transformers causal LM: random weights from the spec's config, or a local weights folder;
    every dropout at the setup's `dropout` when it sets one (as the planner plans it)."""
    import torch
    import transformers

    from ..spec import check_runnable_attention, to_hf_config
    from .step import quiet_default_loss_notice

    check_runnable_attention(spec, job.setup.attention)
    quiet_default_loss_notice()  # the causal-LM loss is the one meant: no notice on every run
    torch.manual_seed(job.run.seed)
    if job.run.weights:
        config = transformers.AutoConfig.from_pretrained(job.run.weights, local_files_only=True)
    else:
        values = to_hf_config(spec)
        if spec.family == "gpt2" and spec.vocab_size <= 50256:
            # GPT-2's config names token 50256 as bos/eos; a small test vocabulary has no such id.
            values |= {"bos_token_id": None, "eos_token_id": None}
        config = transformers.CONFIG_MAPPING[values.pop("model_type")](**values)
    if job.setup.dropout is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, job.setup.dropout)
    if job.run.weights:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            job.run.weights, config=config, local_files_only=True, attn_implementation=job.setup.attention)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=job.setup.attention)
    model.config.use_cache = False  # training keeps no key/value cache
    return model


def _start_cuda(nvml) -> None:
    """Start CUDA in this process and point the NVML sampler at the device torch uses."""
    import torch

    torch.cuda.init()
    if nvml is not None:
        nvml.bind(torch.cuda.get_device_properties(0).uuid)
    fraction = memory_fraction()
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(fraction, 0)


def memory_fraction() -> float | None:
    """The fraction of GPU memory set through `MEMORY_FRACTION_ENV`, or None."""
    text = os.environ.get(MEMORY_FRACTION_ENV)
    if not text:
        return None
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise PlanError(f"{MEMORY_FRACTION_ENV} must be a number in (0, 1], got {text!r}")
    return fraction


def _run_env() -> dict:
    """The environment that changes what a GPU run holds (allocator settings, lazy module loading,
    which devices are visible), as the job saw it once CUDA had started."""
    return {key: os.environ.get(key) for key in (*ENV_KEYS, MEMORY_FRACTION_ENV)}


def _train(job: Job, spec: ModelSpec, reader, nvml, save_adapter: str | None, facts: dict) -> dict:
    """Build the model, warm up until the optimizer holds its states, then run `job.run.steps`
    steady-state steps: the reader reads the first `reader.read_steps` of them (all when None),
    and the rest are timed untouched. `facts` collects what the run found out (SDPA backend,
    warm-up steps), even when it fails later."""
    import torch

    from . import lora
    from .data import batches
    from .step import (
        ADAMW_KERNEL,
        OpNames,
        attention_backend,
        enable_checkpointing,
        optimizer_holds_states,
        step_loss,
        train_step,
    )

    setup, run = job.setup, job.run
    device = torch.device(run.device)

    wall = facts.setdefault("wall_s", {})

    def phase(name: str, read: bool = True) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if name in ("load", "warmup"):  # where a job's time goes beside its measured steps
            stack.enter_context(_timed(wall, name))
        if read:
            stack.enter_context(reader.phase(name))
        if nvml is not None:
            stack.enter_context(nvml.phase(name))
        return stack

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with phase("load"):
        # random weights are made where they train: initialising GPT-2 large on the host takes
        # longer than the steps measured
        with torch.device(device) if not run.weights else contextlib.nullcontext():
            model = build_model(spec, job)
        model = model.to(device)
        if setup.method == "lora":
            lora.inject(model, setup.targets, setup.rank, run.alpha, setup.lora_dropout, run.rslora)
        if setup.precision == "pure-bf16":  # every tensor bf16, the adapters too; AdamW's states follow
            model = model.to(torch.bfloat16)
        if setup.grad_checkpointing:
            enable_checkpointing(model)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        # the kernel forced, as planned: on CPU torch would otherwise step tensor by tensor
        optimizer = torch.optim.AdamW(trainable, lr=run.lr, **ADAMW_KERNEL[setup.optimizer_impl])
        loss_fn = step_loss(setup.loss, setup.loss_chunks)
        autocast = setup.precision == "amp"
        scaler = torch.amp.GradScaler(device.type) if autocast and run.amp_dtype == "fp16" else None
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}[run.amp_dtype] if autocast else None
    data = batches(run.data, setup.batch_size, setup.seq_len, spec.vocab_size, run.seed)
    losses, times = [], []

    def step(input_ids, phases=lambda name: contextlib.nullcontext()) -> None:
        input_ids = input_ids.to(device)  # (B, T)
        labels = input_ids.clone()  # (B, T): a collator's separate labels, as the planner counts
        sync()
        start = time.perf_counter()
        loss = train_step(model, optimizer, input_ids, labels, compute_dtype=compute, scaler=scaler,
                          phase=phases, loss_fn=loss_fn)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))

    # Warm-up: the first step creates the optimizer's states (a grad scaler may skip a few
    # first); the planned step is a steady-state one, with them live throughout.
    warmup = 0
    with phase("warmup"):
        while warmup < MAX_WARMUP_STEPS and (warmup == 0 or not optimizer_holds_states(optimizer)):
            if warmup == 0 and setup.attention == "sdpa":
                with OpNames() as ops:
                    step(next(data))
                facts["sdpa_backend"] = attention_backend(ops.names)
            else:
                step(next(data))
            warmup += 1
    facts["warmup_steps"] = warmup
    if not optimizer_holds_states(optimizer):
        facts.setdefault("notes", []).append(
            f"the optimizer held no states after {warmup} warm-up steps (the grad scaler skipped "
            "them): the steps read are not steady-state ones")
    reader.attach(model, optimizer)
    read_steps = run.steps if reader.read_steps is None else min(reader.read_steps, run.steps)
    with contextlib.ExitStack() as reading:
        reading.enter_context(reader)
        for index in range(run.steps):
            if index == read_steps:
                reading.close()  # the reader has seen the steady state; time the rest untouched
            if index < read_steps:
                reader.begin_step()
            step(next(data), lambda name, read=index < read_steps: phase(name, read))
    if save_adapter:
        lora.save_adapter(model, save_adapter, base_model=run.weights or run.model)
    # Time the steady steps; under a tracer (CPU) only those it did not read, when there are any.
    steady = times[warmup:]
    timed = steady[read_steps:] if reader.source == "tracer" else steady
    timed = timed or steady
    step_time = sum(timed) / len(timed)
    return {
        "step_time_s": step_time,
        "timed_steps": len(timed),
        "warmup_steps": warmup,
        "tokens_per_s": setup.batch_size * setup.seq_len / step_time,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "trainable_params": sum(p.numel() for p in trainable),
    }


@contextlib.contextmanager
def _timed(wall: dict, name: str):
    start = time.monotonic()
    try:
        yield
    finally:
        wall[name] = round(time.monotonic() - start, 3)


def memory_guard(job: Job, predicted: dict) -> None:
    """Refuse a job whose planned peak exceeds the memory it would run in (host RAM on CPU, free
    GPU memory from `torch.cuda.mem_get_info` on CUDA), before any model is built."""
    from .guard import check_fits, cuda_free_bytes, host_available_bytes

    advice = "use a smaller model, batch or sequence (--batch-size, --seq-len, --grad-checkpointing)"
    if job.run.device == "cpu":
        check_fits(predicted["peak"], host_available_bytes(), "host RAM", advice)
    else:
        check_fits(predicted["peak"] + predicted["device_overhead_bytes"], cuda_free_bytes(),
                   "free GPU memory", advice)


def run_job(job: Job, output: str | None = None, command: str = "",
            save_adapter: str | None = None, force: bool = True) -> dict:
    """Run one job and return its record (appended to `output` when given).

    A settings mistake raises `PlanError` before anything runs, and so does a job whose planned
    peak does not fit where it would run, unless `force`. Once the job starts, an out-of-memory
    error becomes status `oom` and any other failure (CUDA failing to start included) status
    `error`: both are recorded with the prediction, so a sweep can tell whether the planner
    foresaw them.
    """
    started = time.monotonic()
    job = job.checked()
    if save_adapter and job.setup.method != "lora":
        raise PlanError("--save-adapter needs --method lora")
    spec = model_spec(job)
    predicted = predict(job, spec)
    fault = _fault(job.id)
    if fault:  # a rehearsal: fail before torch loads, so it costs no training
        exc = _fault_error(fault)
        record = make_record(
            job.to_dict(), status="oom" if is_out_of_memory(exc) else "error", error=_error_text(exc),
            device=device_info(job.run.device), predicted=predicted,
            measured={"source": "cuda" if job.run.device == "cuda" else "tracer"}, command=command,
            notes=[f"failure simulated through {FAULT_ENV} before the model loaded"], env=_run_env())
        if output:
            append_record(output, record)
        return record
    if not force and job.run.device == "cpu":
        memory_guard(job, predicted)

    from .readings import CudaAllocatorReader, NvmlSampler, TracerReader

    notes: list[str] = []
    facts: dict = {}
    nvml = reader = None
    status, error = "ok", None
    measured: dict = {"source": "cuda" if job.run.device == "cuda" else "tracer"}
    try:
        if job.run.device == "cuda":
            nvml = NvmlSampler().start()  # baselines before this process starts CUDA
            _start_cuda(nvml)
            predicted["device_overhead_bytes"] = device_allowance(predicted["peak"])
            if not force:
                memory_guard(job, predicted)
            reader = CudaAllocatorReader()
        else:
            reader = TracerReader()
            notes.append("CPU run: NVML figures are absent (no GPU)")
        facts["wall_s"] = {"start": round(time.monotonic() - started, 3)}  # plan, torch, CUDA
        measured |= _train(job, spec, reader, nvml, save_adapter, facts)
    except PlanError:
        if nvml is not None:
            nvml.stop()
        raise  # a settings mistake found late (a vocabulary too small for byte data): no record
    except Exception as exc:  # recorded, not raised: the record says what went wrong
        status, error = ("oom" if is_out_of_memory(exc) else "error"), _error_text(exc)
    readings = reader.result() if reader is not None else {}
    measured |= readings
    if reader is not None:
        notes += reader.notes
    notes += facts.pop("notes", [])
    # wall seconds: before the model (plan, torch, CUDA), building it, warming up, and the whole job
    measured["wall_s"] = facts.get("wall_s", {}) | {"job": round(time.monotonic() - started, 3)}
    driver = None
    if nvml is not None:
        measured |= nvml.stop()
        notes += nvml.notes
        driver = nvml.driver
    if status == "ok" and measured.get("trainable_params") != predicted["trainable_params"]:
        notes.append(f"trainable parameters differ: measured {measured.get('trainable_params')}, "
                     f"planned {predicted['trainable_params']}")
    if status == "ok" and reader.source == "tracer" and measured.get("timed_steps") == job.run.steps \
            and readings.get("peak_allocated") is not None and job.run.steps <= (reader.read_steps or 0):
        notes.append("CPU step time includes the tracer's bookkeeping")
    device = device_info(job.run.device, driver)
    env = _run_env() | {"sdpa_backend": facts.get("sdpa_backend") if job.setup.attention == "sdpa"
                        else "eager"}
    if status == "oom" and device["memory_total"]:
        notes.append(foresight_note(predicted["peak"] + predicted["device_overhead_bytes"],
                                    device["memory_total"]))
    record = make_record(job.to_dict(), status=status, error=error, device=device,
                         predicted=predicted, measured=measured, command=command, notes=notes, env=env)
    if output:
        append_record(output, record)
    return record


def foresight_note(predicted_need: int, memory_total: int) -> str:
    """Whether the planner saw an out-of-memory error coming, by the one fit rule: its peak plus
    the device allowance against the device total."""
    from ..allowance import fits

    verdict = "did not foresee it" if fits(predicted_need, 0, memory_total) else "foresaw it"
    return (f"the planner {verdict}: predicted peak + allowance {predicted_need:,} B, device total "
            f"{memory_total:,} B")


def device_allowance(peak: int) -> int:
    """The device allowance for torch's CUDA device 0, by its compute capability."""
    import torch

    from ..allowance import allowance

    props = torch.cuda.get_device_properties(0)
    return allowance(peak, capability=(props.major, props.minor)).total


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry point: `python -m lora_planner.measure.job --settings JSON -o FILE`."""
    parser = argparse.ArgumentParser(prog="python -m lora_planner.measure.job")
    parser.add_argument("--settings", required=True, help="the job's settings as a JSON object")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--command", default="")
    parser.add_argument("--guard", action="store_true",
                        help="refuse a CPU job whose planned peak exceeds the host RAM available")
    args = parser.parse_args(argv)
    try:
        run_job(Job.from_dict(json.loads(args.settings)), args.output, args.command,
                force=not args.guard)
    except PlanError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
