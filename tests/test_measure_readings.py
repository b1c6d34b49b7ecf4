"""Readings: NVML absent or failing is a note, never a crash; allocator peaks are kept per phase."""

from __future__ import annotations

import sys
import time
import types

import pytest

from lora_planner.measure import readings


class FakeNvmlError(Exception):
    pass


def fake_pynvml(used: list[int], fail_init: bool = False, fail_after: int | None = None):
    """A stand-in for nvidia-ml-py that reports `used` bytes, one value per call."""
    calls = {"n": 0, "shutdown": 0}

    def init():
        if fail_init:
            raise FakeNvmlError("NVML Shared Library Not Found")

    def memory(_handle):
        calls["n"] += 1
        if fail_after is not None and calls["n"] > fail_after:
            raise FakeNvmlError("GPU is lost")
        return types.SimpleNamespace(used=used[min(calls["n"] - 1, len(used) - 1)], total=80 * 2**30)

    module = types.SimpleNamespace(
        nvmlInit=init, nvmlShutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}", nvmlDeviceGetMemoryInfo=memory,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
    )
    return module, calls


def test_nvml_absent_gives_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    sampler = readings.NvmlSampler().start()
    with sampler.phase("forward"):
        pass
    result = sampler.stop()
    assert result["nvml_peak_used"] is None and result["nvml_baseline_used"] is None
    assert sampler.notes == ["NVML figures absent: nvidia-ml-py is not installed (pip install nvidia-ml-py)"]


def test_nvml_failing_to_start_gives_a_note(monkeypatch):
    module, _ = fake_pynvml([1], fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = readings.NvmlSampler().start()
    assert sampler.stop()["nvml_peak_used"] is None
    assert sampler.notes == ["NVML figures absent: FakeNvmlError: NVML Shared Library Not Found"]


def test_nvml_peak_baseline_and_phases(monkeypatch):
    gib = 2**30
    module, calls = fake_pynvml([1 * gib, 3 * gib, 7 * gib, 5 * gib])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = readings.NvmlSampler(background=False).start()  # each sample is one of ours
    with sampler.phase("forward"):
        pass
    with sampler.phase("backward"):
        pass
    result = sampler.stop()
    assert result["nvml_baseline_used"] == 1 * gib
    assert result["nvml_peak_used"] == 7 * gib
    assert result["nvml_phase_peaks"] == {"forward": 3 * gib, "backward": 7 * gib, "load": 5 * gib}
    assert sampler.driver == "550.54.15" and calls["shutdown"] == 1 and sampler.notes == []


def test_nvml_failing_mid_run_keeps_what_it_saw(monkeypatch):
    module, _ = fake_pynvml([2, 9], fail_after=2)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = readings.NvmlSampler(background=False).start()
    with sampler.phase("forward"):
        pass
    with sampler.phase("backward"):  # the third reading raises
        pass
    result = sampler.stop()
    assert result["nvml_peak_used"] == 9 and result["nvml_baseline_used"] == 2
    assert sampler.notes == ["NVML sampling stopped: FakeNvmlError: GPU is lost"]


def test_cuda_allocator_reader_keeps_each_phases_peak(monkeypatch):
    torch = pytest.importorskip("torch")
    peaks = {"allocated": 0, "reserved": 0}
    script = iter([(100, 128), (900, 1024), (400, 1024)])  # load, forward, backward

    def reset(_device=None):
        peaks["allocated"], peaks["reserved"] = next(script, (0, 0))

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peaks["reserved"])
    reader = readings.CudaAllocatorReader()
    reset()
    reader.attach(None, None)
    reader.begin_step()
    for name in ("forward", "backward"):
        with reader.phase(name):
            reset()
    reader.begin_step()
    with reader.phase("forward"):
        reset()  # (0, 0): the script has run out
    assert reader.result() == {"peak_allocated": 900, "peak_reserved": 1024,
                               "phase_peaks": {"load": 100, "forward": 900, "backward": 400},
                               "step_peaks": [900, 0]}


def test_tracer_reader_without_the_tracer_gives_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "lora_planner.measure.tracer", None)
    reader = readings.TracerReader()
    reader.attach(object(), None)
    with reader, reader.phase("forward"):
        pass
    assert reader.result()["peak_allocated"] is None
    assert "without the memory tracer" in reader.notes[0]


def test_nvml_background_thread_finds_the_peak(monkeypatch):
    module, calls = fake_pynvml([10, 20, 50, 30])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = readings.NvmlSampler(interval_s=0.001).start()
    deadline = time.monotonic() + 5
    while calls["n"] < 4 and time.monotonic() < deadline:  # the thread samples on its own
        time.sleep(0.001)
    result = sampler.stop()
    assert result["nvml_baseline_used"] == 10 and result["nvml_peak_used"] == 50
    assert sampler.notes == []


def test_nvml_handle_follows_cuda_visible_devices():
    calls = []
    fake = types.SimpleNamespace(nvmlDeviceGetHandleByIndex=lambda i: calls.append(("index", i)) or i,
                                 nvmlDeviceGetHandleByUUID=lambda u: calls.append(("uuid", u)) or u)
    readings.nvml_handle(fake, 0, visible="")
    readings.nvml_handle(fake, 0, visible="3,1")
    readings.nvml_handle(fake, 1, visible="3,1")
    readings.nvml_handle(fake, 0, visible="GPU-5f3c0e8a-1111-2222-3333-444455556666")
    assert calls == [("index", 0), ("index", 3), ("index", 1),
                     ("uuid", "GPU-5f3c0e8a-1111-2222-3333-444455556666")]
