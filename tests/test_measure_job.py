"""One measured job on CPU: a real fine-tune, a complete record, the planner's prediction beside it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lora_planner.contract import to_dict
from lora_planner.gpus import DEFAULT_GPU, get_gpu
from lora_planner.plan import MEMORY_KEYS, make_plan
from lora_planner.spec import TrainSetup, spec_from_config_file
from lora_planner.stacks import resolve
from tests.measure_models import tiny_config_file, torch

job = pytest.importorskip("lora_planner.measure.job")


def make(**settings) -> job.Job:
    """A checked job from flat settings, as a spec file or `--set` gives them."""
    return job.Job.from_dict(settings)


def test_loss_goes_down_on_the_builtin_qa_set(tmp_path):
    settings = make(model=tiny_config_file(tmp_path), method="full", batch_size=2, seq_len=32,
                           steps=20, lr=3e-3, data="qa")
    record = job.run_job(settings)
    assert record["status"] == "ok", record["error"]
    losses = record["measured"]["losses"]
    assert record["measured"]["warmup_steps"] == 1  # fp32: the first step creates AdamW's states
    assert len(losses) == 1 + 20
    # Byte-level text starts near ln(300) = 5.7; a model that learns it ends well below.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_cpu_record_has_the_schema_and_its_error_is_consistent(tmp_path):
    output = tmp_path / "results.jsonl"
    settings = make(model=tiny_config_file(tmp_path), method="lora", rank=4, targets=("c_attn",),
                           batch_size=2, seq_len=32, steps=3, precision="amp")
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
    settings = make(model=path, method="lora", rank=2, targets=("all-linear",), precision="amp",
                    amp_dtype="fp16", batch_size=2, seq_len=16, grad_checkpointing=True, device="cuda")
    # the job runs the planner's own setup object: the torch stack's, its kernels named
    assert settings.setup == resolve(setup)
    on_gpu = job.predict(settings, job.model_spec(settings))
    plan = to_dict(make_plan(spec, (setup,), get_gpu(DEFAULT_GPU)))["plans"][0]
    assert {k: on_gpu[k] for k in MEMORY_KEYS} == plan["memory_bytes"]
    assert on_gpu["peak_phase"] == plan["peak_phase"]

    from lora_planner.measure.traced_step import predicted_terms

    on_cpu = job.predict(dataclasses.replace(settings, run=dataclasses.replace(settings.run, device="cpu")),
                         spec)
    # a CPU job is read by the tracer: the plan's peak over the tracer's terms, without the CPU RNG
    # states this checkpointed step holds, which no op makes (the whole peak is above it)
    expected, phase = predicted_terms(spec, setup, "cpu", tracer=True)
    assert (on_cpu["peak"], on_cpu["activations"], on_cpu["peak_phase"]) == (
        expected["peak"], expected["activations"], phase)
    assert predicted_terms(spec, setup, "cpu")[0]["peak"] > expected["peak"]


def test_simulated_oom_is_recorded_with_the_prediction(tmp_path, monkeypatch):
    output = tmp_path / "results.jsonl"
    monkeypatch.setenv(job.FAULT_ENV, "oom")
    record = job.run_job(make(model=tiny_config_file(tmp_path), steps=1), str(output))
    assert record["status"] == "oom"
    assert "out of memory" in record["error"]
    assert record["predicted"]["peak"] > 0
    assert record["measured"]["peak_allocated"] is None
    assert json.loads(output.read_text())["status"] == "oom"


def test_out_of_memory_detection():
    assert job.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert job.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert job.is_out_of_memory(RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not job.is_out_of_memory(RuntimeError("shape mismatch"))


def test_settings_normalise_and_validate():
    full = make(method="full", rank=64, targets=("c_attn",), lora_dropout=0.1)
    assert full.to_dict()["rank"] is None and full.to_dict()["targets"] == []
    assert full.id == make(method="full", rank=1).id
    assert make(rank=1).id != make(rank=8).id
    assert make(precision="fp32", amp_dtype="fp16").id == make().id  # no autocast, no 16-bit type
    assert set(job.SETTING_KINDS) == {*job.SETUP_SETTINGS, *job.RUN_SETTINGS}  # every setting typed
    for bad in ({"method": "qlora"}, {"precision": "int8"}, {"steps": 0}, {"rank": 0}, {"colour": 1},
                {"dropout": 1.0}, {"lora_dropout": -0.1}, {"amp_dtype": "fp8"}):
        with pytest.raises(job.PlanError):
            job.Job.from_dict(bad)
    with pytest.raises(job.PlanError, match="does not vary bias"):
        job.Job(make().setup.with_(bias="all")).checked()


def test_the_jobs_default_sequence_is_the_planners():
    """A job without seq_len trains what `lora-plan plan` plans without --seq-len: 2,048 tokens, or
    the model's context when shorter (GPT-2: 1,024)."""
    from lora_planner.catalog import get_model
    from lora_planner.spec import default_seq_len

    assert make(model="gpt2").setup.seq_len == default_seq_len(get_model("gpt2")) == 1024


@pytest.mark.parametrize("precision, message", [
    ("bf16", "not 'bf16'; bf16 autocast is precision amp with amp_dtype bf16"),
    ("fp16", "not 'fp16'; fp16 autocast is precision amp with amp_dtype fp16"),
    ("mixed", "runs precision fp32, amp"), ("bf16", "or pure-bf16, not 'bf16'")])
def test_precision_means_what_it_means_in_the_plan(precision, message):
    """`bf16` is the planner's 16-bit weights without a master copy, not autocast: a job refuses
    what a plain torch loop does not run, naming what it does."""
    with pytest.raises(job.PlanError, match=message):
        make(precision=precision)


def test_dropout_reaches_the_model_as_the_planner_plans_it(tmp_path):
    """`dropout` sets every dropout of the built model and `lora_dropout` the adapters', as the
    plan reads them: the traced step holds the planned activations, masks included, in each case."""
    path = tiny_config_file(tmp_path)
    activations = []
    for dropouts in ({}, {"dropout": 0.0}, {"dropout": 0.3, "lora_dropout": 0.1}):
        record = job.run_job(make(model=path, rank=2, steps=1, seq_len=16, **dropouts))
        assert record["status"] == "ok", record["error"]
        assert record["measured"]["terms"]["activations"] == record["predicted"]["activations"], dropouts
        activations.append(record["predicted"]["activations"])
    assert len(set(activations)) == 3  # GPT-2's own 0.1, none, and LoRA's masks on top


def test_a_pure_bf16_job_holds_the_planned_terms(tmp_path):
    """pure-bf16 is the plan's: the model, adapters included, in bf16, and AdamW's states with it
    (torch keeps them in the parameters' dtype). The traced terms are the planned ones, half fp32's."""
    path = tiny_config_file(tmp_path)
    records = {p: job.run_job(make(model=path, rank=2, steps=1, seq_len=16, batch_size=2, precision=p))
               for p in ("fp32", "pure-bf16")}
    for record in records.values():
        measured, predicted = record["measured"], record["predicted"]
        assert record["status"] == "ok", record["error"]
        assert measured["at_peak"]["parameters"] == predicted["weights"]
        assert measured["terms"]["gradients"] == predicted["gradients"]
        assert measured["at_peak"]["optimizer_states"] == predicted["optimizer_states"]
        assert measured["terms"]["activations"] == predicted["activations"]
    fp32, bf16 = (records[p]["predicted"] for p in ("fp32", "pure-bf16"))
    assert 2 * bf16["weights"] == fp32["weights"] and 2 * bf16["gradients"] == fp32["gradients"]


def test_records_written_under_earlier_names_read_as_today(tmp_path):
    """Until `dropout` named every dropout of the model, it was LoRA's; `bf16` and `fp16` named
    autocast. A record under those names reads as the same job, with the same id."""
    old = {"model": "gpt2", "method": "lora", "rank": 8, "targets": ["c_attn"], "alpha": 16.0,
           "dropout": 0.05, "rslora": False, "batch_size": 1, "seq_len": 128, "steps": 6,
           "precision": "fp16", "grad_checkpointing": False, "attention": "sdpa", "device": "cuda",
           "lr": 1e-4, "data": "synthetic", "seed": 0, "weights": None}
    read = job.Job.from_record(old)
    assert (read.setup.lora_dropout, read.setup.dropout) == (0.05, None)
    assert (read.setup.precision, read.run.amp_dtype) == ("amp", "fp16")
    assert read == make(**(old | {"dropout": None, "lora_dropout": 0.05, "precision": "amp",
                                  "amp_dtype": "fp16"}))
    fp32 = old | {"precision": "fp32"}
    assert job.Job.from_record(fp32).id == job.settings_id(fp32)  # an fp32 job keeps its id
    # every dropout of the model set: a job of its own
    assert make(**(old | {"precision": "fp32", "dropout": 0.0, "lora_dropout": 0.05})).id != \
        job.settings_id(fp32)


def test_an_oom_says_whether_the_planner_foresaw_it():
    assert job.foresight_note(90, 80).startswith("the planner foresaw it: predicted peak + allowance 90 B")
    assert job.foresight_note(70, 80).startswith("the planner did not foresee it")


def test_a_local_weights_folder_is_fine_tuned(tmp_path):
    from tests.measure_models import tiny_model

    folder = tmp_path / "pretrained"
    tiny_model(seed=5).save_pretrained(folder)
    common = {"method": "lora", "rank": 2, "batch_size": 2, "seq_len": 16, "steps": 1}
    loaded = job.run_job(make(model="unused-when-weights-given", weights=str(folder), **common))
    fresh = job.run_job(make(model=str(folder / "config.json"), **common))
    assert loaded["status"] == fresh["status"] == "ok"
    assert loaded["settings"]["weights"] == str(folder)
    assert loaded["predicted"] == fresh["predicted"]  # the same shape either way
    assert loaded["measured"]["first_loss"] != fresh["measured"]["first_loss"]  # other weights


def _scaler_skipping_first_steps(monkeypatch):
    """A grad scaler whose first scale overflows fp16 gradients, so it skips optimizer steps (on a
    GPU the default scale does that for a few steps)."""
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**30))


def test_fp16_warm_up_runs_until_the_optimizer_holds_its_states(tmp_path, monkeypatch):
    _scaler_skipping_first_steps(monkeypatch)
    settings = make(model=tiny_config_file(tmp_path), method="full", precision="amp", amp_dtype="fp16",
                    steps=2, batch_size=1, seq_len=16)
    record = job.run_job(settings)
    assert record["status"] == "ok", record["error"]
    measured = record["measured"]
    assert measured["warmup_steps"] > 1  # the skipped steps did not count as steady ones
    assert len(measured["losses"]) == measured["warmup_steps"] + 2
    # the read step is a steady one: AdamW's states (torch's own tensors) were live at its peak
    assert measured["at_peak"]["optimizer_states"] > 0
    assert not any("held no states" in note for note in record["notes"])


def test_a_warm_up_that_never_gets_states_says_so(tmp_path, monkeypatch):
    _scaler_skipping_first_steps(monkeypatch)
    monkeypatch.setattr(job, "MAX_WARMUP_STEPS", 2)
    record = job.run_job(make(model=tiny_config_file(tmp_path), method="full", precision="amp",
                              amp_dtype="fp16", steps=1, batch_size=1, seq_len=16))
    assert record["measured"]["warmup_steps"] == 2
    assert any("held no states after 2 warm-up steps" in note for note in record["notes"])


def test_a_cuda_start_failure_is_an_error_record_not_a_traceback(tmp_path, monkeypatch):
    def fail():
        raise RuntimeError("CUDA driver initialization failed, you might not have a CUDA gpu.")

    monkeypatch.setattr(torch.cuda, "init", fail)
    output = tmp_path / "results.jsonl"
    record = job.run_job(make(model=tiny_config_file(tmp_path), device="cuda", steps=1), str(output))
    assert record["status"] == "error" and "CUDA driver initialization failed" in record["error"]
    assert record["device"]["kind"] == "cuda" and record["device"]["memory_total"] is None
    assert record["predicted"]["device_overhead_bytes"] > 0
    assert json.loads(output.read_text())["id"] == record["id"]


def test_a_cpu_record_carries_the_run_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    record = job.run_job(make(model=tiny_config_file(tmp_path), steps=1, seq_len=16))
    assert record["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    # GPT-2 trains with attention dropout: torch's CPU SDPA falls back to the math kernel under it
    assert record["env"]["sdpa_backend"] == "math"
    assert record["predicted"]["device_overhead_bytes"] == 0  # no GPU, no allowance


def test_the_gpu_guard_counts_the_allowance_against_free_memory(tmp_path, monkeypatch):
    from lora_planner.measure import guard

    settings = make(model=tiny_config_file(tmp_path), device="cuda", steps=1)
    predicted = job.predict(settings, job.model_spec(settings))
    need = predicted["peak"] + predicted["device_overhead_bytes"]
    monkeypatch.setattr(guard, "cuda_free_bytes", lambda index=0: need - 1)
    with pytest.raises(job.PlanError, match="of free GPU memory available"):
        job.memory_guard(settings, predicted)
    monkeypatch.setattr(guard, "cuda_free_bytes", lambda index=0: need)
    job.memory_guard(settings, predicted)


def test_cuda_start_binds_nvml_to_torchs_device_and_records_it(monkeypatch):
    """The CUDA path on a machine without a GPU, torch's CUDA calls stood in for: NVML is pointed
    at the UUID torch reports, the memory fraction is applied, and the device and allowance
    follow the device's compute capability."""
    import types

    from lora_planner.allowance import allowance

    props = types.SimpleNamespace(uuid="5f3c0e8a-1111-2222-3333-444455556666", major=8, minor=0,
                                  total_memory=80 * 10**9)
    applied = []
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Stand-in A100")
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=0: applied.append((f, d)))
    monkeypatch.setenv(job.MEMORY_FRACTION_ENV, "0.5")
    bound = []
    job._start_cuda(types.SimpleNamespace(bind=bound.append))
    assert bound == [props.uuid] and applied == [(0.5, 0)]
    info = job.device_info("cuda", driver="550.54.15")
    assert info["memory_total"] == 40 * 10**9 and info["memory_fraction"] == 0.5
    assert info["capability"] == [8, 0] and info["uuid"] == props.uuid and info["name"] == "Stand-in A100"
    peak = 3 * 10**9
    assert job.device_allowance(peak) == allowance(peak, capability=(8, 0)).total
    assert job.device_allowance(peak) != allowance(peak, capability=(9, 0)).total  # Hopper's workspaces
    monkeypatch.setenv(job.MEMORY_FRACTION_ENV, "1.5")
    with pytest.raises(job.PlanError, match="must be a number in"):
        job.memory_fraction()


@pytest.mark.parametrize("kernels", [{"optimizer_impl": "fused"}, {"optimizer_impl": "for-loop"},
                                     {"loss": "chunked", "loss_chunks": 3}],
                         ids=["fused", "for-loop", "chunked"])
def test_the_step_runs_the_kernels_it_names_and_is_planned_with_them(tmp_path, kernels):
    """A job with another AdamW kernel or loss runs it (its traced peak moves as the kernel's
    temporaries do) and is predicted with the same choice; the foreach job is the reference."""
    common = {"model": tiny_config_file(tmp_path), "method": "full", "batch_size": 2, "seq_len": 32,
              "steps": 1}
    reference = job.run_job(make(**common))
    record = job.run_job(make(**common, **kernels))
    assert record["status"] == "ok", record["error"]
    assert record["id"] != reference["id"]
    setup = TrainSetup(method="full", precision="fp32", batch_size=2, seq_len=32, stack="torch", **kernels)
    spec = spec_from_config_file(common["model"])
    from lora_planner.measure.traced_step import predicted_terms

    assert record["predicted"]["peak"] == predicted_terms(spec, setup, "cpu")[0]["peak"]
    # the optimizer phase holds another temporary; a chunked loss other logits than the whole
    phase = "optimizer" if "optimizer_impl" in kernels else "forward"
    assert record["measured"]["phase_peaks"][phase] != reference["measured"]["phase_peaks"][phase]
    assert abs(record["relative_error"]["peak_allocated"]) <= 0.02


def test_settings_added_later_keep_earlier_ids():
    """Records written before the kernel settings existed resume: at the kernels every earlier job
    ran (foreach AdamW, the model's loss), a job's id is what it was."""
    from pathlib import Path

    records = sorted((Path(__file__).resolve().parents[1] / "results" / "measure").glob("*.jsonl"))
    assert records, "no committed measure records to check"
    for path in records:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert "optimizer_impl" not in record["settings"] or path.name != "cpu-tiny-gpt2.jsonl"
            assert job.Job.from_record(record["settings"]).id == record["id"], record["id"]
    assert make(loss="standard", loss_chunks=3).id == make().id
    with pytest.raises(job.PlanError, match="CUDA"):
        make(loss="fused-linear")


def test_a_record_says_where_the_jobs_time_went(tmp_path):
    """The sweep's overhead beside its measured steps: wall seconds before the model, building it,
    warming up and in all, each a part of the whole."""
    record = job.run_job(make(model=tiny_config_file(tmp_path), method="full", seq_len=16, steps=2))
    wall = record["measured"]["wall_s"]
    assert set(wall) == {"start", "load", "warmup", "job"}
    assert all(v >= 0 for v in wall.values())
    assert wall["start"] + wall["load"] + wall["warmup"] <= wall["job"]
    assert record["measured"]["step_time_s"] * 2 <= wall["job"]
