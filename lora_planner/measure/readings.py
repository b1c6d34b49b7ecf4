"""Memory readings of a training run, phase by phase (forward, backward, optimizer).

Three sources, each behind the same small interface (`MemoryReader`) so the job does not care
which one runs:

- `CudaAllocatorReader`: torch's caching allocator, `max_memory_allocated` / `max_memory_reserved`,
  its peak counter reset at the start of each phase.
- `NvmlSampler`: the device-level `used` memory from NVML (nvidia-ml-py), sampled at every phase
  boundary and by a background thread, with a baseline taken before CUDA starts. The device is
  the one torch uses, found by UUID. It sees what the allocator cannot (CUDA context, cuBLAS
  workspaces, the allocator's cache) and is absent on a machine without NVML: that becomes a note.
- `TracerReader`: on CPU, the live-tensor tracer (`lora_planner.measure.tracer.MemoryTracer`)
  supplies the allocator-level figures. Where it is missing the figures are None, with a note.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

STEP_PHASES = ("forward", "backward", "optimizer")

class MemoryReader:
    """What a job asks of a reading source. `phase("load")` and `phase("warmup")` wrap building
    the model and the warm-up steps; `attach` is called after the warm-up, when the optimizer
    holds its states; the steady steps run inside `with reader:`, each part of a step inside
    `reader.phase(name)`."""

    source = "none"
    read_steps: int | None = None  # steps to read; None: every step

    def __init__(self) -> None:
        self.notes: list[str] = []

    def attach(self, model: Any, optimizer: Any) -> None:
        pass

    def __enter__(self) -> MemoryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def begin_step(self) -> None:
        """A new training step starts (readers that keep per-step peaks count from here)."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def result(self) -> dict:
        """peak_allocated, peak_reserved (bytes or None), phase_peaks {phase: bytes}."""
        return {"peak_allocated": None, "peak_reserved": None, "phase_peaks": {}}


class CudaAllocatorReader(MemoryReader):
    """Peaks of torch's CUDA caching allocator: the whole run's, and each phase's."""

    source = "cuda"

    def __init__(self, device: Any = None) -> None:
        super().__init__()
        import torch

        self.torch = torch
        self.device = device
        torch.cuda.reset_peak_memory_stats(device)
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.phase_peaks: dict[str, int] = {}
        # One peak per steady-state step (after the warm-up, with the optimizer's states live).
        self.step_peaks: list[int] = []

    def _take(self) -> tuple[int, int]:
        cuda = self.torch.cuda
        return cuda.max_memory_allocated(self.device), cuda.max_memory_reserved(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Peaks of one phase. `load` and `warmup` are kept in `phase_peaks` but are not the
        step's: the run's peaks are those of the steady-state steps' phases."""
        self.torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            allocated, reserved = self._take()
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), allocated)
            if name in STEP_PHASES:
                if self.step_peaks:
                    self.step_peaks[-1] = max(self.step_peaks[-1], allocated)
                self.peak_allocated = max(self.peak_allocated, allocated)
                self.peak_reserved = max(self.peak_reserved, reserved)

    def begin_step(self) -> None:
        self.step_peaks.append(0)

    def result(self) -> dict:
        return {"peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved,
                "phase_peaks": dict(self.phase_peaks), "step_peaks": list(self.step_peaks)}


class TracerReader(MemoryReader):
    """Allocator-level figures on CPU, from the live-tensor tracer."""

    source = "tracer"
    # Attached after the warm-up, the tracer adopts the optimizer's states; the first steady step
    # runs with them all live, and every later step repeats it. Tracing costs Python work per op,
    # so later steps run untraced.
    read_steps = 1

    def __init__(self) -> None:
        super().__init__()
        self.tracer = None
        self.report = None
        try:
            from .tracer import MemoryTracer
        except ImportError:
            self.tracer_class = None
            self.notes.append("CPU run without the memory tracer: allocator-level figures are absent")
        else:
            self.tracer_class = MemoryTracer

    def attach(self, model: Any, optimizer: Any) -> None:
        if self.tracer_class is not None:
            self.tracer = self.tracer_class(model, optimizer)

    def __enter__(self) -> TracerReader:
        if self.tracer is not None:
            self.tracer.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tracer is not None:
            self.tracer.__exit__(*exc)
            self.report = self.tracer.report()

    def phase(self, name: str):
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.phase(name)

    def result(self) -> dict:
        if self.report is None:
            return super().result()
        return {"peak_allocated": int(self.report.peak_bytes), "peak_reserved": None,
                "phase_peaks": {k: int(v) for k, v in self.report.phase_peaks.items()},
                "peak_phase": self.report.peak_phase,
                "at_peak": {k: int(v) for k, v in self.report.at_peak.items()},
                "terms": {k: int(v) for k, v in getattr(self.report, "terms", {}).items()}}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def uuid_key(uuid: Any) -> str:
    """A UUID as torch and NVML both can give it, compared without its `GPU-` or `MIG-` prefix
    and case: torch's `get_device_properties(i).uuid` prints bare hex groups, NVML prefixes them."""
    text = _text(uuid).strip().lower()
    for prefix in ("gpu-", "mig-"):
        text = text.removeprefix(prefix)
    return text


def nvml_devices(pynvml: Any) -> list[tuple[str, Any]]:
    """(UUID, handle) of every GPU NVML sees, and of every MIG instance on a GPU in MIG mode."""
    devices = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        devices.append((_text(pynvml.nvmlDeviceGetUUID(handle)), handle))
        try:
            count = pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        except Exception:  # no MIG support on this GPU or driver
            count = 0
        for mig in range(count or 0):
            try:
                child = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig)
            except Exception:  # an empty MIG slot
                continue
            devices.append((_text(pynvml.nvmlDeviceGetUUID(child)), child))
    return devices


def nvml_handle(pynvml: Any, torch_uuid: Any) -> Any:
    """The NVML handle of the device torch uses, found by its UUID (`torch.cuda.
    get_device_properties(i).uuid`), so CUDA_VISIBLE_DEVICES (indices, UUIDs, their prefixes, MIG
    UUIDs) and torch's FASTEST_FIRST order cannot make us read another GPU. None when NVML has
    no device with that UUID."""
    key = uuid_key(torch_uuid)
    return next((handle for uuid, handle in nvml_devices(pynvml) if uuid_key(uuid) == key), None)


class NvmlSampler:
    """Device-level memory in use: sampled at every phase boundary, and by a background thread.

    `start()` (before CUDA starts in this process) takes the baseline of every device NVML sees;
    `bind(uuid)`, once torch has said which device it uses, picks that device's baseline and
    starts the thread; `stop()` returns the peak, the baseline and the other processes' use.
    Phases are entered with `phase(name)`; samples outside a phase count for the peak only. The
    phase and the peaks are changed under one lock, so the thread never files a sample under a
    phase that has ended. Any NVML failure (library missing, no driver, a call raising) leaves
    the figures None and says why in `notes`; it never stops the job.
    """

    def __init__(self, interval_s: float = 0.05, background: bool = True) -> None:
        self.background = background  # False: sample only at phase boundaries (deterministic, for tests)
        self.interval_s = interval_s
        self.notes: list[str] = []
        self.baseline: int | None = None
        self.peak: int | None = None
        self.others_baseline: int | None = None
        self.others_end: int | None = None
        self.phase_name: str | None = None
        self.phase_peaks: dict[str, int] = {}
        self.driver: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._baselines: dict[str, tuple[int, int | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _used(self, handle: Any = None) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(handle or self._handle).used)

    def _others(self, handle: Any = None) -> int | None:
        """Memory other processes hold on the device (None where NVML cannot say, as in a
        container that hides other processes' ids)."""
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle or self._handle)
        except Exception:
            return None
        used = [p.usedGpuMemory for p in processes if p.pid != os.getpid()]
        return None if any(u is None for u in used) else int(sum(used))

    def start(self) -> NvmlSampler:
        try:
            import pynvml
        except ImportError:
            self.notes.append("NVML figures absent: nvidia-ml-py is not installed "
                              "(pip install nvidia-ml-py)")
            return self
        try:
            pynvml.nvmlInit()
            self._nvml = pynvml
            self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
            for uuid, handle in nvml_devices(pynvml):
                self._baselines[uuid_key(uuid)] = (self._used(handle), self._others(handle))
        except Exception as exc:  # pynvml raises NVMLError subclasses, or OSError without a driver
            self._fail(f"NVML figures absent: {type(exc).__name__}: {exc}")
        return self

    def bind(self, torch_uuid: Any) -> NvmlSampler:
        """Read the device torch uses from now on (see `nvml_handle`)."""
        if self._nvml is None:
            return self
        try:
            self._handle = nvml_handle(self._nvml, torch_uuid)
        except Exception as exc:
            self._fail(f"NVML figures absent: {type(exc).__name__}: {exc}")
            return self
        key = uuid_key(torch_uuid)
        if self._handle is None or key not in self._baselines:
            self._fail(f"NVML figures absent: NVML has no device with torch's UUID {torch_uuid}")
            return self
        self.baseline, self.others_baseline = self._baselines[key]
        self.peak = self.baseline
        if self.background:
            self._thread = threading.Thread(target=self._sample, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def _fail(self, note: str) -> None:
        self.notes.append(note)
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        self._nvml = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def sample_once(self) -> None:
        with self._lock:
            if self._nvml is None or self._handle is None:
                return
            try:
                used = self._used()
            except Exception as exc:
                self.notes.append(f"NVML sampling stopped: {type(exc).__name__}: {exc}")
                self._nvml = None
                return
            self.peak = max(self.peak or 0, used)
            if self.phase_name is not None:
                self.phase_peaks[self.phase_name] = max(self.phase_peaks.get(self.phase_name, 0), used)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._lock:
            previous, self.phase_name = self.phase_name, name
        self.sample_once()  # the boundary: what the previous part left is where this one starts
        try:
            yield
        finally:
            self.sample_once()  # the phase's end is often its high point
            with self._lock:
                self.phase_name = previous

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample_once()
        if self._nvml is not None and self._handle is not None:
            self.others_end = self._others()
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None
        if (self.others_baseline is not None and self.others_end is not None
                and abs(self.others_end - self.others_baseline) > 64 * 2**20):
            self.notes.append(f"other processes changed their memory on this GPU during the job "
                              f"({self.others_baseline:,} B to {self.others_end:,} B): NVML growth "
                              f"includes them")
        return {"nvml_peak_used": self.peak, "nvml_baseline_used": self.baseline,
                "nvml_phase_peaks": dict(self.phase_peaks),
                "nvml_others_baseline_used": self.others_baseline,
                "nvml_others_end_used": self.others_end}
