"""Memory readings of a training run, phase by phase (forward, backward, optimizer).

Three sources, each behind the same small interface (`MemoryReader`) so the job does not care
which one runs:

- `CudaAllocatorReader`: torch's caching allocator, `max_memory_allocated` / `max_memory_reserved`,
  its peak counter reset at the start of each phase.
- `NvmlSampler`: the device-level `used` memory from NVML (nvidia-ml-py), sampled by a background
  thread, with a baseline taken before the model loads. It sees what the allocator cannot (CUDA
  context, other processes) and is absent on a machine without NVML: that becomes a note.
- `TracerReader`: on CPU, the live-tensor tracer (`lora_planner.measure.tracer.MemoryTracer`)
  supplies the allocator-level figures. Where it is missing the figures are None, with a note.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any


class MemoryReader:
    """What a job asks of a reading source. `attach` is called once the model and optimizer
    exist; the steps run inside `with reader:`; each part of a step inside `reader.phase(name)`."""

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
        # Step 1 runs before any optimizer state exists; from step 2 on the states are live
        # through forward and backward. Per-step peaks show the difference.
        self.step_peaks: list[int] = []

    def _take(self) -> tuple[int, int]:
        cuda = self.torch.cuda
        return cuda.max_memory_allocated(self.device), cuda.max_memory_reserved(self.device)

    def attach(self, model: Any, optimizer: Any) -> None:
        # Loading the model is a phase of its own: its peak is not seen by the step phases.
        allocated, reserved = self._take()
        self.phase_peaks["load"] = allocated
        self.peak_allocated, self.peak_reserved = allocated, reserved

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            allocated, reserved = self._take()
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), allocated)
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
    # Step 1 creates the optimizer states; step 2 runs with them all live, and every later step
    # repeats it. Tracing costs Python work per op, so later steps run untraced.
    read_steps = 2

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


def nvml_handle(pynvml: Any, cuda_index: int = 0, visible: str | None = None) -> Any:
    """The NVML handle of torch's CUDA device `cuda_index`.

    NVML numbers every GPU in the machine and ignores CUDA_VISIBLE_DEVICES; torch numbers only the
    visible ones. With CUDA_VISIBLE_DEVICES=3, torch's device 0 is NVML's device 3. Entries may be
    indices or UUIDs (GPU-...). Without the variable the numbering agrees (both follow PCI order
    when CUDA_DEVICE_ORDER=PCI_BUS_ID; the default, FASTEST_FIRST, agrees on one-GPU machines).
    """
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    entry = entries[cuda_index]
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    return pynvml.nvmlDeviceGetHandleByUUID(entry)


class NvmlSampler:
    """Device-level memory in use, sampled every `interval_s` by a background thread.

    `start()` takes the baseline (call it before the model loads) and starts sampling; `stop()`
    returns peak and baseline. Any NVML failure (library missing, no driver, a call raising)
    leaves the figures None and says why in `notes`; it never stops the job.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.005, background: bool = True) -> None:
        self.device_index = device_index  # torch's index, among the visible devices
        self.background = background  # False: sample only at phase ends (deterministic, for tests)
        self.interval_s = interval_s
        self.notes: list[str] = []
        self.baseline: int | None = None
        self.peak: int | None = None
        self.phase_name = "load"
        self.phase_peaks: dict[str, int] = {}
        self.driver: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

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
            self._handle = nvml_handle(pynvml, self.device_index)
            driver = pynvml.nvmlSystemGetDriverVersion()
            self.driver = driver.decode() if isinstance(driver, bytes) else str(driver)
            self.baseline = self.peak = self._used()
        except Exception as exc:  # pynvml raises NVMLError subclasses, or OSError without a driver
            self.notes.append(f"NVML figures absent: {type(exc).__name__}: {exc}")
            self._nvml = None
            return self
        if self.background:
            self._thread = threading.Thread(target=self._sample, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            time.sleep(self.interval_s)

    def sample_once(self) -> None:
        if self._nvml is None:
            return
        try:
            used = self._used()
        except Exception as exc:
            self.notes.append(f"NVML sampling stopped: {type(exc).__name__}: {exc}")
            self._nvml = None
            return
        self.peak = max(self.peak or 0, used)
        self.phase_peaks[self.phase_name] = max(self.phase_peaks.get(self.phase_name, 0), used)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.phase_name = self.phase_name, name
        try:
            yield
        finally:
            self.sample_once()  # the phase's end is often its high point
            self.phase_name = previous

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample_once()
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None
        return {"nvml_peak_used": self.peak, "nvml_baseline_used": self.baseline,
                "nvml_phase_peaks": dict(self.phase_peaks)}
