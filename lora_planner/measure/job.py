"""One measured fine-tuning job: build the model, train a few steps, read memory and speed, and
write one record beside the planner's prediction for the same settings.

Run in-process by `lora-plan measure run`, and as `python -m lora_planner.measure.job` (one
subprocess per job) by sweeps, so an out-of-memory error or a crash ends only its own job.

Precision names of a measured run and the planner convention each one is predicted with:

| measured | what runs                                   | planner |
|----------|---------------------------------------------|---------|
| fp32     | fp32 weights, grads, AdamW states, compute  | fp32    |
| bf16     | fp32 storage, torch.autocast bf16 compute   | amp     |
| fp16     | fp32 storage, autocast fp16 + a GradScaler  | amp     |

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
from ..spec import ModelSpec, TrainSetup
from .records import PREDICTED_KEYS, append_record, make_record, settings_id

METHODS = ("full", "lora")
PLANNER_PRECISION = {"fp32": "fp32", "bf16": "amp", "fp16": "amp"}
ATTENTIONS = ("eager", "sdpa")
DEVICES = ("cpu", "cuda")
DATA_SOURCES = ("qa", "synthetic")  # or the path of a local text file
PHASES = ("forward", "backward", "optimizer")

# Tests and rehearsals inject faults through this variable: `oom`, `error` or `kill-sweep`,
# optionally `@<job id>` to hit one job of a sweep, several entries joined by commas.
# `kill-sweep` kills the parent process (the sweep) and exits without a record, as a machine that
# goes down mid-sweep would.
FAULT_ENV = "LORA_PLAN_FAULT"


@dataclass(frozen=True)
class JobSettings:
    """Everything that defines a measured job. Two jobs with equal settings are the same job."""

    model: str = "gpt2"
    method: str = "lora"
    rank: int | None = 8
    targets: tuple[str, ...] = ("default",)
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    batch_size: int = 1
    seq_len: int = 128
    steps: int = 10
    precision: str = "fp32"
    grad_checkpointing: bool = False
    attention: str = "sdpa"
    device: str = "cpu"
    lr: float = 1e-4
    data: str = "qa"
    seed: int = 0
    weights: str | None = None  # a local folder of pretrained weights; None: random weights

    @classmethod
    def from_dict(cls, values: dict) -> JobSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PlanError(f"unknown job setting {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(sorted(known))}")
        values = dict(values)
        if isinstance(values.get("targets"), str):
            values["targets"] = values["targets"].split(",")
        if "targets" in values:
            values["targets"] = tuple(t.strip() for t in values["targets"] if t.strip())
        return cls(**values).checked()

    def checked(self) -> JobSettings:
        """Validate, and normalise what does not apply (a full fine-tune has no rank or targets),
        so equal jobs get equal ids."""
        if self.method not in METHODS:
            raise PlanError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.precision not in PLANNER_PRECISION:
            raise PlanError(f"precision must be one of {', '.join(PLANNER_PRECISION)}, "
                            f"got {self.precision!r}")
        if self.attention not in ATTENTIONS:
            raise PlanError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.device not in DEVICES:
            raise PlanError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.data not in DATA_SOURCES and not Path(self.data).is_file():
            raise PlanError(f"data must be qa, synthetic or a local text file; no file at {self.data}")
        for name in ("batch_size", "seq_len", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"{name} must be a positive integer, got {value!r}")
        if self.method == "full":
            return dataclasses.replace(self, rank=None, targets=(), alpha=0.0, dropout=0.0, rslora=False)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise PlanError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        return dataclasses.replace(self, targets=self.targets or ("default",))

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["targets"] = list(self.targets)
        return values

    @property
    def id(self) -> str:
        return settings_id(self.to_dict())


def model_spec(settings: JobSettings) -> ModelSpec:
    """The planner's shape for the job's model: a catalog name, a config path, or the config of
    the local weights folder."""
    from ..resolve import resolve_model

    spec = resolve_model(settings.weights or settings.model)
    if settings.seq_len > spec.max_positions:
        raise PlanError(f"seq_len {settings.seq_len} is longer than {spec.name}'s "
                        f"{spec.max_positions} positions")
    return spec


def planner_setup(settings: JobSettings) -> TrainSetup:
    """The planner's `TrainSetup` for the job, so prediction and measurement share one setting."""
    values = {
        "method": settings.method, "rank": settings.rank or 8,
        "targets": settings.targets or ("default",), "precision": PLANNER_PRECISION[settings.precision],
        "optimizer": "adamw", "batch_size": settings.batch_size, "seq_len": settings.seq_len,
        "grad_checkpointing": settings.grad_checkpointing, "attention": settings.attention,
        "lora_dropout": settings.dropout,
        "stack": "torch",  # the job's loop: foreach AdamW and the model's own loss
    }
    known = {f.name for f in dataclasses.fields(TrainSetup)}
    # Fields a planner without activation modelling does not know yet are left out.
    return TrainSetup(**{k: v for k, v in values.items() if k in known})


def predict(settings: JobSettings, spec: ModelSpec) -> dict:
    """The planner's bytes for the job (read by key from the plan's JSON contract).

    The plan is for a CUDA device. A CPU job is set beside the planner's CPU variant of the same
    step (what `lora-plan trace` compares with): torch keeps a dropout mask in the input's dtype
    there instead of one byte, falls back to the math attention kernel under dropout, and keeps
    AdamW's step counters as tensors.
    """
    from ..gpus import DEFAULT_GPU, get_gpu
    from ..plan import make_plan
    from ..render import to_dict

    setup = planner_setup(settings)
    entry = to_dict(make_plan(spec, (setup,), get_gpu(DEFAULT_GPU)))["plans"][0]
    predicted = {key: int(entry["memory_bytes"][key]) for key in PREDICTED_KEYS}
    predicted["peak_phase"] = entry.get("peak_phase") or None
    if settings.device == "cpu":
        from .trace import predicted_terms

        on_cpu, phase = predicted_terms(spec, setup, "cpu")
        predicted |= {"optimizer_states": on_cpu["optimizer_states"] - predicted["master_weights"],
                      "activations": on_cpu["activations"], "peak": on_cpu["peak"], "peak_phase": phase}
    predicted["trainable_params"] = int(entry["trainable_params"])
    return predicted


def device_info(device: str, driver: str | None = None) -> dict:
    """Where the job ran, without the host's name."""
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "driver": driver,
                "cuda": torch.version.cuda, "torch": torch.__version__,
                "memory_total": int(props.total_memory)}
    torch = sys.modules.get("torch")  # a rehearsed failure never loads it
    version = torch.__version__ if torch is not None else importlib.metadata.version("torch")
    return {"kind": "cpu", "name": platform.processor() or platform.machine(), "driver": None,
            "cuda": None, "torch": version, "memory_total": None}


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or any error whose message says it ran out of memory (older
    torch raises a plain RuntimeError; cuBLAS and NCCL word it their own way)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower()


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
    if kind == "kill-sweep":
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(3)
    raise PlanError(f"{FAULT_ENV} must be oom, error or kill-sweep, optionally @<job id>; got {kind!r}")


def _error_text(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"


def build_model(spec: ModelSpec, settings: JobSettings):
    """A transformers causal LM: random weights from the spec's config, or a local weights folder."""
    import torch
    import transformers

    from ..spec import to_hf_config

    torch.manual_seed(settings.seed)
    if settings.weights:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            settings.weights, local_files_only=True, attn_implementation=settings.attention)
    else:
        values = to_hf_config(spec)
        if spec.family == "gpt2" and spec.vocab_size <= 50256:
            # GPT-2's config names token 50256 as bos/eos; a small test vocabulary has no such id.
            values |= {"bos_token_id": None, "eos_token_id": None}
        config = transformers.CONFIG_MAPPING[values.pop("model_type")](**values)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=settings.attention)
    model.config.use_cache = False  # training keeps no key/value cache
    return model


def _train(settings: JobSettings, spec: ModelSpec, reader, nvml, save_adapter: str | None) -> dict:
    import torch

    from . import lora
    from .data import batches

    device = torch.device(settings.device)
    model = build_model(spec, settings).to(device)
    if settings.method == "lora":
        lora.inject(model, settings.targets, settings.rank, settings.alpha, settings.dropout,
                    settings.rslora)
    if settings.grad_checkpointing:
        checkpointing = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # foreach: torch's default on CUDA and what the planner's optimizer phase assumes (its sqrt(v)
    # temporary); on CPU torch would otherwise step tensor by tensor.
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, foreach=True)
    scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    reader.attach(model, optimizer)

    read_steps = settings.steps if reader.read_steps is None else min(reader.read_steps, settings.steps)

    def phase(name: str, step: int) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if step < read_steps:
            stack.enter_context(reader.phase(name))
        if nvml is not None:
            stack.enter_context(nvml.phase(name))
        return stack

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    data = batches(settings.data, settings.batch_size, settings.seq_len, spec.vocab_size, settings.seed)
    losses, times = [], []
    with contextlib.ExitStack() as reading:
        reading.enter_context(reader)
        for step, input_ids in zip(range(settings.steps), data, strict=False):  # data is endless
            if step == read_steps:
                reading.close()  # the reader has seen the steady state; time the rest untouched
            if step < read_steps:
                reader.begin_step()
            input_ids = input_ids.to(device)  # (B, T)
            labels = input_ids.clone()  # (B, T): a collator's separate labels, as the planner counts
            sync()
            start = time.perf_counter()
            with phase("forward", step):
                autocast = (torch.autocast(device.type, dtype=compute) if compute
                            else contextlib.nullcontext())
                with autocast:
                    loss = model(input_ids=input_ids, labels=labels).loss
            with phase("backward", step):
                (scaler.scale(loss) if scaler else loss).backward()
            with phase("optimizer", step):
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
    if save_adapter:
        lora.save_adapter(model, save_adapter, base_model=settings.weights or settings.model)
    # The first step allocates optimizer states and warms kernels up, and steps under a tracer pay
    # for its bookkeeping: time the steady, unread steps when there are any.
    first_timed = max(1, read_steps if reader.read_steps is not None else 1)
    timed = times[first_timed:] or times[1:] or times
    step_time = sum(timed) / len(timed)
    return {
        "step_time_s": step_time,
        "tokens_per_s": settings.batch_size * settings.seq_len / step_time,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "trainable_params": sum(p.numel() for p in trainable),
    }


def foresight_note(predicted_peak: int, memory_total: int) -> str:
    """Whether the planner saw an out-of-memory error coming: its peak against the device total."""
    verdict = "foresaw it" if predicted_peak > memory_total else "did not foresee it"
    return (f"the planner {verdict}: predicted peak {predicted_peak:,} B, device total "
            f"{memory_total:,} B")


def run_job(settings: JobSettings, output: str | None = None, command: str = "",
            save_adapter: str | None = None) -> dict:
    """Run one job and return its record (appended to `output` when given).

    A settings mistake raises `PlanError` before anything runs. Once the job starts, an
    out-of-memory error becomes status `oom` and any other failure status `error`: both are
    recorded with the prediction, so a sweep can tell whether the planner foresaw them.
    """
    settings = settings.checked()
    if save_adapter and settings.method != "lora":
        raise PlanError("--save-adapter needs --method lora")
    spec = model_spec(settings)
    predicted = predict(settings, spec)
    fault = _fault(settings.id)
    if fault:  # a rehearsal: fail before torch loads, so it costs no training
        exc = _fault_error(fault)
        record = make_record(
            settings.to_dict(), status="oom" if is_out_of_memory(exc) else "error", error=_error_text(exc),
            device=device_info(settings.device), predicted=predicted,
            measured={"source": "cuda" if settings.device == "cuda" else "tracer"}, command=command,
            notes=[f"failure simulated through {FAULT_ENV} before the model loaded"])
        if output:
            append_record(output, record)
        return record

    from .readings import CudaAllocatorReader, NvmlSampler, TracerReader

    notes: list[str] = []
    nvml = None
    if settings.device == "cuda":
        nvml = NvmlSampler().start()  # baseline before the model loads
        reader = CudaAllocatorReader()
    else:
        reader = TracerReader()
        notes.append("CPU run: NVML figures are absent (no GPU)")
    status, error = "ok", None
    measured: dict = {"source": reader.source}
    try:
        measured |= _train(settings, spec, reader, nvml, save_adapter)
    except PlanError:
        if nvml is not None:
            nvml.stop()
        raise  # a settings mistake found late (a vocabulary too small for byte data): no record
    except Exception as exc:  # recorded, not raised: the record says what went wrong
        status, error = ("oom" if is_out_of_memory(exc) else "error"), _error_text(exc)
    readings = reader.result()
    measured |= readings
    notes += reader.notes
    driver = None
    if nvml is not None:
        measured |= nvml.stop()
        notes += nvml.notes
        driver = nvml.driver
    if status == "ok" and measured.get("trainable_params") != predicted["trainable_params"]:
        notes.append(f"trainable parameters differ: measured {measured.get('trainable_params')}, "
                     f"planned {predicted['trainable_params']}")
    if (status == "ok" and reader.source == "tracer" and readings["peak_allocated"] is not None
            and settings.steps <= (reader.read_steps or 0)):
        notes.append("CPU step time includes the tracer's bookkeeping")
    device = device_info(settings.device, driver)
    if status == "oom" and device["memory_total"]:
        notes.append(foresight_note(predicted["peak"], device["memory_total"]))
    record = make_record(settings.to_dict(), status=status, error=error, device=device,
                         predicted=predicted, measured=measured, command=command, notes=notes)
    if output:
        append_record(output, record)
    return record


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry point: `python -m lora_planner.measure.job --settings JSON -o FILE`."""
    parser = argparse.ArgumentParser(prog="python -m lora_planner.measure.job")
    parser.add_argument("--settings", required=True, help="the job's settings as a JSON object")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--command", default="")
    args = parser.parse_args(argv)
    try:
        run_job(JobSettings.from_dict(json.loads(args.settings)), args.output, args.command)
    except PlanError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
