"""The harness on a real GPU (`pytest -m gpu`): each case skips cleanly on a machine without CUDA.

Bands stated here are what the harness promises on a GPU, checked against torch's and NVML's own
counters (never against our formulas restated).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
# The allocator peak of a small GPT-2 step stays within this of the plan's peak.
ALLOCATOR_BAND = 0.10


def run_in_own_process(tmp_path, **settings) -> dict:
    """One job as a sweep runs it: a fresh process, so NVML's baseline is taken before its CUDA
    context exists and no cached block of an earlier test hides its growth."""
    import json

    from lora_planner.measure.job import Job
    from lora_planner.measure.records import read_records

    output = tmp_path / "record.jsonl"
    job = Job.from_dict(settings)
    done = subprocess.run([sys.executable, "-m", "lora_planner.measure.job", "--settings",
                           json.dumps(job.to_dict()), "-o", str(output)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    (record,) = read_records(output)
    return record


@pytest.mark.parametrize("kernels", [{"optimizer_impl": "fused"}, {"loss": "chunked"},
                                     {"optimizer_impl": "fused", "loss": "fused-linear"}],
                         ids=["fused-adamw", "chunked-ce", "liger"])
def test_the_training_stacks_kernels_on_cuda_are_within_the_band_of_the_plan(tmp_path, kernels):
    """Fused AdamW, torchtune's chunked cross-entropy and Liger's fused linear cross-entropy run
    for real (Liger's Triton kernel only runs on a GPU) and are planned with the same choices."""
    if kernels.get("loss") == "fused-linear":
        pytest.importorskip("liger_kernel.transformers")
    record = run_in_own_process(tmp_path, model="gpt2", method="full", batch_size=4, seq_len=512,
                                steps=3, precision="amp", device="cuda", data="synthetic", **kernels)
    assert record["status"] == "ok", record["error"]
    assert record["settings"] | kernels == record["settings"]
    assert abs(record["relative_error"]["peak_allocated"]) <= ALLOCATOR_BAND, record["relative_error"]


@pytest.mark.parametrize("precision, amp_dtype, method", [("fp32", "bf16", "full"), ("amp", "bf16", "lora"),
                                                          ("amp", "fp16", "lora")])
def test_a_small_gpt2_step_on_cuda_is_within_the_band_of_the_plan(tmp_path, precision, amp_dtype, method):
    if (precision, amp_dtype) == ("amp", "bf16") and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    record = run_in_own_process(tmp_path, model="gpt2", method=method, rank=8, batch_size=2, seq_len=256,
                                steps=3, precision=precision, amp_dtype=amp_dtype, device="cuda",
                                data="synthetic")
    assert record["status"] == "ok", record["error"]
    measured, predicted = record["measured"], record["predicted"]
    assert measured["source"] == "cuda" and len(measured["step_peaks"]) == 3
    assert abs(record["relative_error"]["peak_allocated"]) <= ALLOCATOR_BAND, record["relative_error"]
    assert predicted["device_overhead_bytes"] > 0
    assert record["env"]["sdpa_backend"] in ("flash", "efficient", "cudnn", "math")
    # NVML sees at least what the allocator reserved, and the allowance is recorded beside it
    if measured["nvml_peak_used"] is not None:
        growth = measured["nvml_peak_used"] - measured["nvml_baseline_used"]
        assert growth >= measured["peak_reserved"]
        assert record["relative_error"]["nvml_peak_used"] is not None


def test_nvml_reads_the_device_torch_uses():
    """Allocating 1 GiB on each visible device shows up in the NVML handle found by its UUID,
    whatever CUDA_VISIBLE_DEVICES and torch's device order were."""
    pytest.importorskip("pynvml")
    from lora_planner.measure.readings import NvmlSampler

    gib = 2**30
    for index in range(torch.cuda.device_count()):
        torch.cuda.empty_cache()  # a cached free block would serve the tensor without new device memory
        sampler = NvmlSampler(background=False).start()
        assert sampler.driver, sampler.notes
        sampler.bind(torch.cuda.get_device_properties(index).uuid)
        assert sampler.baseline is not None, sampler.notes
        with torch.cuda.device(index):
            block = torch.empty(gib, dtype=torch.uint8, device=f"cuda:{index}")
            torch.cuda.synchronize(index)
            with sampler.phase("hold"):
                pass
            result = sampler.stop()
            del block
        assert result["nvml_phase_peaks"]["hold"] - result["nvml_baseline_used"] >= gib


def test_the_steady_step_peak_holds_the_optimizer_states():
    """From the second step on AdamW's states are live through the whole step: torch's own
    counter at the step's peak is at least parameters + gradients + the states' tensors."""
    from lora_planner.measure.job import Job, build_model, model_spec
    from lora_planner.measure.step import optimizer_holds_states, train_step

    settings = Job.from_dict({"model": "gpt2", "method": "full", "batch_size": 1, "seq_len": 128})
    model = build_model(model_spec(settings), settings).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(0, 50257, (1, 128), device="cuda")
    train_step(model, optimizer, ids)
    assert optimizer_holds_states(optimizer)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, ids)
    torch.cuda.synchronize()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.is_cuda)
    assert states >= 2 * params  # exp_avg and exp_avg_sq
    assert torch.cuda.max_memory_allocated() >= params + params + states  # weights, grads, states


def test_fp16_warm_up_runs_until_the_scaler_lets_a_step_through(tmp_path):
    record = run_in_own_process(tmp_path, model="gpt2", method="full", batch_size=1, seq_len=128, steps=2,
                                precision="amp", amp_dtype="fp16", device="cuda", data="synthetic")
    assert record["status"] == "ok", record["error"]
    assert record["measured"]["warmup_steps"] >= 1
    assert not any("held no states" in note for note in record["notes"])


def test_a_real_oom_is_recorded_as_oom_and_the_sweep_goes_on(tmp_path):
    """A job limited by `set_per_process_memory_fraction` to a slice of the GPU runs out for real."""
    from lora_planner.measure.job import MEMORY_FRACTION_ENV
    from lora_planner.measure.records import read_records

    total = torch.cuda.get_device_properties(0).total_memory
    fraction = 1.5e9 / total  # about 1.5 GB of the device
    output = tmp_path / "results.jsonl"
    code = "import sys; from lora_planner.cli import main; main(sys.argv[1:], prog_name='lora-plan')"
    args = ["measure", "sweep", "--set", "model=gpt2", "--set", "device=cuda", "--set", "steps=1",
            "--set", "method=lora", "--set", "data=synthetic", "--grid", "batch_size=16,1",
            "--grid", "seq_len=1024,64", "--timeout", "300", "-o", str(output), "--no-progress"]
    env = {**os.environ, MEMORY_FRACTION_ENV: f"{fraction:.6f}"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    found = {(r["settings"]["batch_size"], r["settings"]["seq_len"]): r for r in read_records(output)}
    assert len(found) == 4
    big, small = found[(16, 1024)], found[(1, 64)]
    assert big["status"] == "oom", big["error"]
    assert big["relative_error"] == {"peak_allocated": None, "nvml_peak_used": None}
    assert big["device"]["memory_total"] <= 1.6e9
    # the 0.5 GB of GPT-2's weights and a short batch fit in the slice: the sweep went on past the oom
    assert small["status"] == "ok", small["error"]
    assert small["relative_error"]["peak_allocated"] is not None


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_cuda_trace_reads_the_caching_allocators_peak(tmp_path, method):
    """`trace --device cuda`: the allocator's peak is torch's own counter over the step, at or above
    the tracer's count of the GPU's storages, the profiler's events summed in time order come within
    1% of it (the caching allocator reports its blocks, rounded to 512 B, to the profiler; the
    baseline under them is the tracer's unrounded count), and the plan is within the harness's band."""
    import json

    from click.testing import CliRunner

    from lora_planner.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4,
        "n_positions": 256, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": 0, "eos_token_id": 0}))
    result = CliRunner().invoke(main, ["trace", "--model", str(config), "--method", method,
                                       "--device", "cuda",
                                       "--batch-size", "4", "--seq-len", "256", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    allocated, traced = data["allocator_peak"], data["traced"]["peak"]
    assert allocated >= traced
    assert abs(data["allocator_events_peak"] - allocated) <= 0.01 * allocated
    assert abs(data["predicted"]["peak"] - allocated) <= ALLOCATOR_BAND * allocated
