"""Readings: NVML absent or failing is a note, never a crash; allocator peaks are kept per phase."""

from __future__ import annotations

import sys
import time
import types

import pytest

from lora_planner.measure import readings


class FakeNvmlError(Exception):
    pass


UUID = "GPU-5f3c0e8a-1111-2222-3333-444455556666"
TORCH_UUID = "5f3c0e8a-1111-2222-3333-444455556666"  # torch prints the UUID without NVML's prefix


def fake_pynvml(used: list[int], fail_init: bool = False, fail_after: int | None = None,
                others: list[int | None] | None = None):
    """A stand-in for nvidia-ml-py with one GPU (UUID) that reports `used` bytes, one value per
    call, and other processes holding `others` bytes."""
    calls = {"n": 0, "shutdown": 0}

    def init():
        if fail_init:
            raise FakeNvmlError("NVML Shared Library Not Found")

    def memory(_handle):
        calls["n"] += 1
        if fail_after is not None and calls["n"] > fail_after:
            raise FakeNvmlError("GPU is lost")
        return types.SimpleNamespace(used=used[min(calls["n"] - 1, len(used) - 1)], total=80 * 2**30)

    def processes(_handle):
        return [types.SimpleNamespace(pid=12345 + i, usedGpuMemory=u) for i, u in enumerate(others or [])]

    def no_mig(_handle):
        raise FakeNvmlError("Not Supported")

    module = types.SimpleNamespace(
        nvmlInit=init, nvmlShutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetUUID=lambda h: UUID.encode(), nvmlDeviceGetMaxMigDeviceCount=no_mig,
        nvmlDeviceGetMemoryInfo=memory, nvmlDeviceGetComputeRunningProcesses=processes,
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
    # each sample is one of ours: the baseline, then each phase's start and end, then the last
    module, calls = fake_pynvml([1 * gib, 3 * gib, 4 * gib, 7 * gib, 6 * gib, 5 * gib])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = readings.NvmlSampler(background=False).start().bind(TORCH_UUID)
    with sampler.phase("forward"):
        pass
    with sampler.phase("backward"):
        pass
    result = sampler.stop()
    assert result["nvml_baseline_used"] == 1 * gib
    assert result["nvml_peak_used"] == 7 * gib
    # the final sample (5 GiB) is no phase's: it counts for the peak only
    assert result["nvml_phase_peaks"] == {"forward": 4 * gib, "backward": 7 * gib}
    assert sampler.driver == "550.54.15" and calls["shutdown"] == 1 and sampler.notes == []


def test_nvml_failing_mid_run_keeps_what_it_saw(monkeypatch):
    module, _ = fake_pynvml([2, 9], fail_after=3)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = readings.NvmlSampler(background=False).start().bind(TORCH_UUID)
    with sampler.phase("forward"):
        pass
    with sampler.phase("backward"):  # the fourth reading raises
        pass
    result = sampler.stop()
    assert result["nvml_peak_used"] == 9 and result["nvml_baseline_used"] == 2
    assert sampler.notes == ["NVML sampling stopped: FakeNvmlError: GPU is lost"]


def test_cuda_allocator_reader_keeps_each_phases_peak(monkeypatch):
    torch = pytest.importorskip("torch")
    peaks = {"allocated": 0, "reserved": 0}
    script = iter([(100, 128), (950, 2048), (900, 1024), (400, 1024)])  # load, warm-up, forward, backward

    def reset(_device=None):
        peaks["allocated"], peaks["reserved"] = next(script, (0, 0))

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peaks["reserved"])
    reader = readings.CudaAllocatorReader()
    for name in ("load", "warmup"):
        with reader.phase(name):
            reset()
    reader.attach(None, None)
    reader.begin_step()
    for name in ("forward", "backward"):
        with reader.phase(name):
            reset()
    reader.begin_step()
    with reader.phase("forward"):
        reset()  # (0, 0): the script has run out
    # the warm-up's first step has no optimizer states yet: kept apart from the steady steps' peaks
    assert reader.result() == {"peak_allocated": 900, "peak_reserved": 1024,
                               "phase_peaks": {"load": 100, "warmup": 950, "forward": 900, "backward": 400},
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
    sampler = readings.NvmlSampler(interval_s=0.001).start().bind(TORCH_UUID)
    deadline = time.monotonic() + 5
    while calls["n"] < 4 and time.monotonic() < deadline:  # the thread samples on its own
        time.sleep(0.001)
    result = sampler.stop()
    assert result["nvml_baseline_used"] == 10 and result["nvml_peak_used"] == 50
    assert sampler.notes == []


def fake_machine(gpus: dict[str, list[str]]):
    """NVML of a machine whose GPUs (by UUID) carry MIG instances (their UUIDs), in PCI order."""
    names = list(gpus)
    children = {f"{g}/{i}": uuid for g, migs in gpus.items() for i, uuid in enumerate(migs)}

    def mig_handle(handle, index):
        if f"{handle}/{index}" not in children:
            raise FakeNvmlError("Not Found")  # an empty MIG slot
        return f"{handle}/{index}"

    return types.SimpleNamespace(
        nvmlDeviceGetCount=lambda: len(names), nvmlDeviceGetHandleByIndex=lambda i: names[i],
        nvmlDeviceGetUUID=lambda h: (gpus.get(h) is not None and h or children[h]).encode(),
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 7 if gpus[h] else 0,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle)


@pytest.mark.parametrize("torch_uuid, expected", [
    ("aaaaaaaa-0000-0000-0000-000000000002", "GPU-aaaaaaaa-0000-0000-0000-000000000002"),
    ("GPU-AAAAAAAA-0000-0000-0000-000000000001", "GPU-aaaaaaaa-0000-0000-0000-000000000001"),
    ("bbbbbbbb-0000-0000-0000-000000000002", "GPU-aaaaaaaa-0000-0000-0000-000000000001/1"),
    ("MIG-bbbbbbbb-0000-0000-0000-000000000001", "GPU-aaaaaaaa-0000-0000-0000-000000000001/0"),
    ("cccccccc-0000-0000-0000-000000000000", None),
])
def test_nvml_handle_is_found_by_torchs_uuid(torch_uuid, expected):
    """Whatever CUDA_VISIBLE_DEVICES held and whatever order torch numbered the GPUs in, the
    device read is the one whose UUID torch reports: full GPUs and MIG instances alike."""
    machine = fake_machine({"GPU-aaaaaaaa-0000-0000-0000-000000000001": [
                                "MIG-bbbbbbbb-0000-0000-0000-000000000001",
                                "MIG-bbbbbbbb-0000-0000-0000-000000000002"],
                            "GPU-aaaaaaaa-0000-0000-0000-000000000002": []})
    assert readings.nvml_handle(machine, torch_uuid) == expected


def test_other_processes_are_recorded_and_a_change_is_a_note(monkeypatch):
    gib = 2**30
    module, _ = fake_pynvml([gib, 2 * gib], others=[gib // 2])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = readings.NvmlSampler(background=False).start().bind(TORCH_UUID)
    module.nvmlDeviceGetComputeRunningProcesses = lambda _h: [
        types.SimpleNamespace(pid=1, usedGpuMemory=gib // 2), types.SimpleNamespace(pid=2, usedGpuMemory=gib)]
    result = sampler.stop()
    assert result["nvml_others_baseline_used"] == gib // 2 and result["nvml_others_end_used"] == 3 * gib // 2
    assert sampler.notes and "other processes changed their memory" in sampler.notes[0]


def test_a_uuid_nvml_does_not_know_is_a_note(monkeypatch):
    module, _ = fake_pynvml([1])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = readings.NvmlSampler(background=False).start().bind("cccccccc-0000-0000-0000-000000000000")
    assert sampler.stop()["nvml_peak_used"] is None
    assert sampler.notes == ["NVML figures absent: NVML has no device with torch's UUID "
                             "cccccccc-0000-0000-0000-000000000000"]


def test_phase_and_peaks_change_under_one_lock(monkeypatch):
    """A sample the thread takes while a phase ends is filed under that phase or none, never under
    the next: the sampler reads `used` and files it while holding the lock phases change under."""
    module, _ = fake_pynvml([1, 5, 9])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = readings.NvmlSampler(background=False).start().bind(TORCH_UUID)
    seen = []
    real_used = sampler._used

    def used(handle=None):
        seen.append(sampler._lock.locked())
        return real_used(handle)

    sampler._used = used
    with sampler.phase("forward"):
        sampler.sample_once()
    sampler.stop()
    assert seen and all(seen)
