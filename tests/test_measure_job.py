"""One measured job on CPU: a real fine-tune, a complete record, the planner's prediction beside it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lora_planner.gpus import DEFAULT_GPU, get_gpu
from lora_planner.plan import make_plan
from lora_planner.render import to_dict
from lora_planner.spec import TrainSetup, spec_from_config_file
from tests.measure_models import tiny_config_file, torch

job = pytest.importorskip("lora_planner.measure.job")
JobSettings = job.JobSettings


def test_loss_goes_down_on_the_builtin_qa_set(tmp_path):
    settings = JobSettings(model=tiny_config_file(tmp_path), method="full", batch_size=2, seq_len=32,
                           steps=20, lr=3e-3, data="qa")
    record = job.run_job(settings)
    assert record["status"] == "ok", record["error"]
    losses = record["measured"]["losses"]
    assert len(losses) == 20
    # Byte-level text starts near ln(300) = 5.7; a model that learns it ends well below.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_cpu_record_has_the_schema_and_its_error_is_consistent(tmp_path):
    output = tmp_path / "results.jsonl"
    settings = JobSettings(model=tiny_config_file(tmp_path), method="lora", rank=4, targets=("c_attn",),
                           batch_size=2, seq_len=32, steps=3, precision="bf16")
    record = job.run_job(settings, str(output), command="lora-plan measure run ...")
    assert record["status"] == "ok", record["error"]
    assert json.loads(output.read_text()) == record
    assert record["format"] == 1 and record["id"] == settings.id
    assert record["settings"]["targets"] == ["c_attn"] and record["settings"]["device"] == "cpu"
    assert record["device"]["kind"] == "cpu" and record["device"]["torch"] == torch.__version__
    measured, predicted = record["measured"], record["predicted"]
    assert measured["source"] == "tracer"
    assert isinstance(measured["peak_allocated"], int) and measured["peak_allocated"] > 0
    assert measured["nvml_peak_used"] is None and record["relative_error"]["nvml_peak_used"] is None
    assert any("NVML" in note for note in record["notes"])
    assert measured["tokens_per_s"] == pytest.approx(2 * 32 / measured["step_time_s"])
    assert record["relative_error"]["peak_allocated"] == pytest.approx(
        (predicted["peak"] - measured["peak_allocated"]) / measured["peak_allocated"])
    assert measured["trainable_params"] == predicted["trainable_params"]
    # Term by term, the traced step holds what the planner's CPU variant of the step predicts:
    # fp32 parameters under bf16 autocast ("amp"), AdamW states with their step counters.
    assert measured["at_peak"]["parameters"] == predicted["weights"]
    assert measured["terms"]["gradients"] == predicted["gradients"]
    assert measured["at_peak"]["optimizer_states"] == predicted["optimizer_states"]


def test_prediction_is_the_planners_for_the_same_setup(tmp_path):
    path = tiny_config_file(tmp_path)
    # the job's loop is a plain torch one (foreach AdamW): the torch stack
    setup = TrainSetup(method="lora", rank=2, targets=("all-linear",), precision="amp", batch_size=2,
                       seq_len=16, grad_checkpointing=True, stack="torch")
    spec = spec_from_config_file(path)
    settings = JobSettings(model=path, method="lora", rank=2, targets=("all-linear",), precision="fp16",
                           batch_size=2, seq_len=16, grad_checkpointing=True, device="cuda")
    on_gpu = job.predict(settings, job.model_spec(settings))
    plan = to_dict(make_plan(spec, (setup,), get_gpu(DEFAULT_GPU)))["plans"][0]
    assert {k: on_gpu[k] for k in job.PREDICTED_KEYS} == plan["memory_bytes"]
    assert on_gpu["peak_phase"] == plan["peak_phase"]

    from lora_planner.measure.trace import predicted_terms

    on_cpu = job.predict(dataclasses.replace(settings, device="cpu"), spec)
    expected, phase = predicted_terms(spec, setup, "cpu")
    assert (on_cpu["peak"], on_cpu["activations"], on_cpu["peak_phase"]) == (
        expected["peak"], expected["activations"], phase)


def test_simulated_oom_is_recorded_with_the_prediction(tmp_path, monkeypatch):
    output = tmp_path / "results.jsonl"
    monkeypatch.setenv(job.FAULT_ENV, "oom")
    record = job.run_job(JobSettings(model=tiny_config_file(tmp_path), steps=1), str(output))
    assert record["status"] == "oom"
    assert "out of memory" in record["error"]
    assert record["predicted"]["peak"] > 0
    assert record["measured"]["peak_allocated"] is None
    assert json.loads(output.read_text())["status"] == "oom"


def test_out_of_memory_detection():
    assert job.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert job.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not job.is_out_of_memory(RuntimeError("shape mismatch"))


def test_settings_normalise_and_validate():
    full = JobSettings(method="full", rank=64, targets=("c_attn",)).checked()
    assert full.rank is None and full.targets == ()
    assert full.id == JobSettings(method="full", rank=1).checked().id
    assert JobSettings(rank=1).checked().id != JobSettings(rank=8).checked().id
    for bad in ({"method": "qlora"}, {"precision": "int8"}, {"steps": 0}, {"rank": 0}, {"colour": 1}):
        with pytest.raises(job.PlanError):
            JobSettings.from_dict(bad)


def test_an_oom_says_whether_the_planner_foresaw_it():
    assert job.foresight_note(90, 80).startswith("the planner foresaw it: predicted peak 90 B")
    assert job.foresight_note(70, 80).startswith("the planner did not foresee it")


def test_a_local_weights_folder_is_fine_tuned(tmp_path):
    from tests.measure_models import tiny_model

    folder = tmp_path / "pretrained"
    tiny_model(seed=5).save_pretrained(folder)
    common = {"method": "lora", "rank": 2, "batch_size": 2, "seq_len": 16, "steps": 1}
    loaded = job.run_job(JobSettings(model="unused-when-weights-given", weights=str(folder), **common))
    fresh = job.run_job(JobSettings(model=str(folder / "config.json"), **common))
    assert loaded["status"] == fresh["status"] == "ok"
    assert loaded["settings"]["weights"] == str(folder)
    assert loaded["predicted"] == fresh["predicted"]  # the same shape either way
    assert loaded["measured"]["first_loss"] != fresh["measured"]["first_loss"]  # other weights
