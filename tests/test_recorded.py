"""Models of a model_type no family of ours lays out, planned from transformers' own code
(`lora_planner.measure.recorded`), held to a real CPU step of the real class at full depth: the
tracer's peak and the allocator's, and the parameter counts of the model transformers builds."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.gpus import GPUS
from lora_planner.plan import make_plan
from lora_planner.spec import TrainSetup

from .tracing import one_thread  # noqa: F401

pytest.importorskip("peft")


@pytest.fixture(autouse=True, scope="module")
def cache(tmp_path_factory):
    """The tests of this module record into one cache folder of their own (a test that plans a
    setup another recorded reads it back)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_PLAN_CACHE", str(folder))
        yield folder


def small_config(model_type: str, seed: int, layers: int) -> dict:
    """A small random decoder of `model_type`: widths, heads and vocabulary drawn from `seed`."""
    rng = random.Random(seed)
    heads = rng.choice((2, 4))
    head_dim = rng.choice((8, 16))
    config = {"model_type": model_type, "vocab_size": rng.randrange(200, 700),
              "hidden_size": heads * head_dim, "intermediate_size": rng.choice((48, 96, 160)),
              "num_hidden_layers": layers, "num_attention_heads": heads, "head_dim": head_dim,
              "num_key_value_heads": rng.choice((1, heads)), "max_position_embeddings": 512,
              "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    if model_type == "falcon":  # Falcon's config names its key/value heads so, and picks its layout
        config.update(num_kv_heads=config.pop("num_key_value_heads"), new_decoder_architecture=True)
        del config["head_dim"]  # a property of FalconConfig: hidden_size / heads
    return config


def planned_and_traced(config: dict, setup: TrainSetup) -> tuple[int, int, int, object, object]:
    """(planned peak, the tracer's peak, the allocator's peak, the plan, the tracer's report) of the
    setup's step on the whole small model, planned from the recording and run for real on CPU; the
    planned peak with the CPU's optimizer step counters (see below)."""
    from lora_planner.measure.recorded import record_slice, recorded_model, traced_setup
    from lora_planner.stacks import resolve

    setup = resolve(setup)
    model = recorded_model(config, "small", "", (setup,))
    plan = make_plan(model, (setup,), GPUS[0]).plans[0]
    planned = plan.memory["peak"].bytes
    if setup.optimizer == "adamw" and setup.optimizer_impl != "fused":
        # on CPU, foreach AdamW keeps each tensor's step counter in host memory (4 B)
        planned += 4 * len(model.step(setup).trainable)
    report, reading = record_slice(config, config["model_type"], traced_setup(setup),
                                   config["num_hidden_layers"], fake=False, allocator=True)
    return planned, report.peak_bytes, reading.peak_bytes, plan, report


def real_counts(config: dict, setup: TrainSetup) -> tuple[int, int]:
    """(parameters, trainable parameters) of the model transformers builds, with PEFT's adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_planner.measure.recorded import hf_config, lora_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(config))
    total = sum(p.numel() for p in model.parameters())
    if setup.method == "full":
        return total, total
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(model, config["model_type"], setup)[0])
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def check(config: dict, setup: TrainSetup) -> None:
    import torch

    planned, traced, allocated, plan, report = planned_and_traced(config, setup)
    assert abs(planned - traced) <= 0.01 * traced, (planned, traced, plan.peak_phase)
    # model states byte for byte (the CPU's step counters as `planned_and_traced` adds them)
    counters = planned - plan.memory["peak"].bytes
    assert plan.memory["weights"].bytes == report.terms["parameters"]
    assert plan.memory["gradients"].bytes == report.terms["gradients"]
    assert plan.memory["optimizer_states"].bytes + counters == report.terms["optimizer_states"]
    # on CPU, checkpointing keeps the CPU generator's state (`torch.get_rng_state()`) per layer, made
    # outside any op: the allocator sees it, a dispatch mode (and so the recording) does not; on a
    # GPU the state kept is the CUDA generator's few bytes
    rng = len(torch.get_rng_state()) * config["num_hidden_layers"] if setup.grad_checkpointing else 0
    assert abs(planned + rng - allocated) <= 0.02 * allocated, (planned, rng, allocated)
    total, trainable = real_counts(config, setup)
    assert plan.trainable_params == trainable


def test_a_granite_lora_step_is_planned_within_a_percent_of_its_real_trace():
    check(small_config("granite", 1, 4), TrainSetup(method="lora", precision="fp32", batch_size=2,
                                                    seq_len=64, stack="torch"))


@pytest.mark.slow
@pytest.mark.parametrize("model_type, seed, layers", [("granite", 2, 6), ("starcoder2", 3, 5),
                                                      ("falcon", 4, 4), ("starcoder2", 5, 4),
                                                      ("helium", 6, 1)])
@pytest.mark.parametrize("method, precision, checkpointing", [("full", "fp32", False),
                                                             ("lora", "pure-bf16", False),
                                                             ("lora", "fp32", True)])
def test_other_families_are_planned_within_a_percent_of_their_real_trace(model_type, seed, layers, method,
                                                                          precision, checkpointing):
    setup = TrainSetup(method=method, precision=precision, grad_checkpointing=checkpointing,
                       batch_size=2, seq_len=96, targets=("all-linear",) if seed % 2 else ("default",),
                       stack="torch")
    check(small_config(model_type, seed, layers), setup)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{"use_dora": True}, {"modules_to_save": ("lm_head",), "bias": "all"},
                                     {"loss": "chunked", "loss_chunks": 4}, {"packing": True}])
def test_peft_options_and_stack_choices_are_recorded_as_run(changes):
    setup = TrainSetup(method="lora", precision="fp32", batch_size=2, seq_len=64, stack="torch",
                       targets=("all-linear",), **changes)
    check(small_config("starcoder2", 14, 4), setup)


def test_the_plan_counts_the_parameters_transformers_builds():
    from lora_planner.measure.recorded import meta_model

    config = small_config("starcoder2", 7, 3)
    model = meta_model(config, "starcoder2", "small", "")
    assert model.total_params == real_counts(config, TrainSetup(method="full"))[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_llama_planned_from_its_recording_agrees_with_the_native_walk(method):
    """A structural cross-check: one model, planned by our walk of Llama and from transformers'
    LlamaDecoderLayer recorded on 1-3 layers and scaled to 8, at the default mixed precision."""
    from lora_planner.measure.recorded import recorded_model
    from lora_planner.spec import ModelSpec, to_hf_config

    spec = ModelSpec(name="llama-small", family="llama", vocab_size=1000, hidden_size=128, num_layers=8,
                     num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=344,
                     tied_embeddings=False, max_positions=2048)
    setup = TrainSetup(method=method, batch_size=2, seq_len=256)
    native = make_plan(spec, (setup,), GPUS[0]).plans[0]
    model = recorded_model(to_hf_config(spec), spec.name, "", (setup,))
    recorded = make_plan(model, (setup,), GPUS[0]).plans[0]
    assert recorded.trainable_params == native.trainable_params
    for key in ("weights", "gradients", "master_weights", "optimizer_states"):
        assert recorded.memory[key].bytes == native.memory[key].bytes, key
    for key in ("activations", "peak"):
        ours, walked = recorded.memory[key].bytes, native.memory[key].bytes
        assert abs(ours - walked) <= 0.01 * walked, (key, ours, walked)


def test_a_recording_is_cached_and_a_corrupt_entry_is_recorded_again(tmp_path, monkeypatch):
    from lora_planner.measure import recorded

    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_PLAN_CACHE", str(cache))
    config = small_config("helium", 8, 2)
    setup = TrainSetup(method="lora", precision="fp32", seq_len=32, stack="torch")
    first = recorded.recorded_model(config, "small", "", (setup,))
    # two entries: the model's meta-device build and the step's recording
    (entry,) = (e for e in cache.iterdir() if "resident" in json.loads(e.read_text()))
    assert len(list(cache.iterdir())) == 2
    (step,) = first.steps.values()
    calls = []

    def again(*args, **kwargs):
        calls.append(args)
        return step
    monkeypatch.setattr(recorded, "record_step", again)
    assert recorded.recorded_model(config, "small", "", (setup,)).steps == first.steps
    assert calls == []  # read back, not recorded
    for broken in ("{not json", json.dumps({"activations": 1}), json.dumps({**json.loads(entry.read_text()),
                                                                            "resident": "many"})):
        entry.write_text(broken)
        assert recorded.recorded_model(config, "small", "", (setup,)).steps == first.steps
        assert json.loads(entry.read_text())["resident"] == step.resident  # replaced by a good one
    assert len(calls) == 3


def test_a_plan_asked_again_imports_neither_torch_nor_transformers(tmp_path, monkeypatch):
    """Asking again is answered from the cache alone: the plan path of a cached model loads no torch."""
    import subprocess
    import sys

    from lora_planner.measure import recorded

    monkeypatch.setenv("LORA_PLAN_CACHE", str(tmp_path / "cache"))
    config = small_config("helium", 8, 2)
    setup = TrainSetup(method="lora", precision="fp32", seq_len=32, stack="torch")
    first = recorded.recorded_model(config, "small", "", (setup,))
    script = (
        "import json, sys\n"
        "from lora_planner.measure.recorded import recorded_model\n"
        "from lora_planner.spec import TrainSetup\n"
        f"model = recorded_model(json.loads({json.dumps(json.dumps(config))}), 'small', '',\n"
        "                       (TrainSetup(method='lora', precision='fp32', seq_len=32, stack='torch'),))\n"
        "print(model.total_params, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "LORA_PLAN_CACHE": str(tmp_path / "cache")})
    assert out.stdout.split() == [str(first.total_params), "False", "False"]


def write_config(tmp_path, config: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_the_plan_names_the_recording_in_a_note(tmp_path):
    # the setup of the granite step above: its recording is read back
    path = write_config(tmp_path, small_config("granite", 1, 4))
    result = CliRunner().invoke(main, ["--model", path, "--seq-len", "64", "--batch-size", "2",
                                       "--method", "lora", "--precision", "fp32", "--stack", "torch",
                                       "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["model"]["family"] == "granite"
    (note,) = [n for n in out["notes"] if n.startswith("activations recorded from transformers")]
    assert "GraniteDecoderLayer" in note and "1, 2 and 3 layers, scaled to 4" in note


def test_without_torch_an_other_model_type_names_the_measure_extra(tmp_path, monkeypatch):
    path = write_config(tmp_path, small_config("granite", 10, 2))
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a base install: `import torch` fails
    result = CliRunner().invoke(main, ["--model", path])
    assert result.exit_code == 2, result.output
    assert result.output == ("Error: planning model_type 'granite' (recorded from transformers) needs torch: "
                             "pip install 'lora-plan[measure]' (from a clone: pip install -e '.[measure]')\n")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, "is not supported"),
    ({"model_type": "bart"}, "is not supported"),
    ({"model_type": "no_such_type"}, "is not supported"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers"),
    ({"hidden_size": -3}, "hidden_size"),
])
def test_a_config_transformers_cannot_plan_is_refused_in_one_line(tmp_path, change, message):
    path = write_config(tmp_path, {**small_config("granite", 11, 2), **change})
    result = CliRunner().invoke(main, ["--model", path, "--seq-len", "32"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output


def test_fit_is_refused_for_a_recorded_model(tmp_path):
    path = write_config(tmp_path, small_config("granite", 12, 2))
    result = CliRunner().invoke(main, ["--model", path, "--fit"])
    assert result.exit_code == 2 and "--fit" in result.output, result.output


@pytest.mark.slow
@pytest.mark.parametrize("name, attention", [("llama-3.1-8b", "sdpa"), ("qwen3-8b", "sdpa"),
                                             ("mixtral-8x7b", "sdpa"), ("gemma-2-2b", "eager"),
                                             ("llama-3.1-70b", "sdpa")])
def test_catalog_models_recorded_at_full_size_agree_with_the_walk(name, attention):
    """The same structural cross-check on published shapes at the default step (2,048 tokens,
    mixed precision), whole and on 8 GPUs under ZeRO-3: every peak within 1%, the same GPU counts
    under every strategy but FSDP2 (whose gather buffers a recording does not follow)."""
    from lora_planner.catalog import get_model
    from lora_planner.measure.recorded import recorded_model
    from lora_planner.spec import to_hf_config
    from lora_planner.stacks import resolve

    spec = get_model(name)
    for method in ("full", "lora", "qlora"):
        for gpus in (None, 8):
            setup = resolve(TrainSetup(method=method, attention=attention, num_gpus=gpus,
                                       sharding="zero3" if gpus else "none"))
            model = recorded_model(to_hf_config(spec), spec.name, "", (setup,))
            recorded = make_plan(model, (setup,), GPUS[0]).plans[0]
            native = make_plan(spec, (setup,), GPUS[0]).plans[0]
            ours, walked = recorded.memory["peak"].bytes, native.memory["peak"].bytes
            assert abs(ours - walked) <= 0.01 * walked, (method, gpus, ours, walked)
            counts = {k: v for k, v in recorded.data_parallel.min_gpus.items() if k != "fsdp"}
            assert counts == {k: v for k, v in native.data_parallel.min_gpus.items() if k != "fsdp"}


def test_a_line_is_fitted_through_the_deepest_two_recordings_and_checked_against_the_first():
    from lora_planner.recorded import fit_line

    line, steps = fit_line(1, (1_000 + 300, 1_000 + 2 * 300, 1_000 + 3 * 300))
    assert (line.base, line.per_layer, line.at(80), steps) == (1_000, 300, 1_000 + 80 * 300, (300, 300))
    line, steps = fit_line(1, (1_500, 1_600, 1_900))  # a first layer unlike the others
    assert (line.base, line.per_layer, steps) == (1_000, 300, (100, 300))


@pytest.mark.slow
@pytest.mark.parametrize("model_type, precision", [("cohere2", "fp32"), ("qwen3_5_moe_text", "pure-bf16")])
def test_layers_of_several_kinds_are_recorded_kind_by_kind(tmp_path, model_type, precision):
    """Cohere 2 mixes sliding and full attention layers (every 4th full); Qwen3.5-MoE linear
    attention (gated delta rule) and full attention layers, over fused experts (whose fake grouped
    matmul takes bf16 only). The first three layers are of one kind: each kind is recorded on its
    own, the plan held to the real step at full depth and the note saying so. (Qwen3-Next, the
    same layers, is planned natively: tests/test_qwen3_next.py holds it to its recording.)"""
    config = {**small_config(model_type, 13, 8), "sliding_window": 16}
    if model_type == "qwen3_5_moe_text":
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, linear_num_value_heads=2, linear_num_key_heads=2,
                      linear_key_head_dim=8, linear_value_head_dim=8)
    for method in ("full", "lora"):
        check(config, TrainSetup(method=method, precision=precision, batch_size=2, seq_len=96, stack="torch",
                                 targets=("all-linear",)))
    result = CliRunner().invoke(main, ["--model", write_config(tmp_path, config), "--seq-len", "96",
                                       "--batch-size", "2", "--method", "lora", "--precision", precision,
                                       "--stack", "torch", "--targets", "all-linear", "--format", "json"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    assert any("layer_types mixes layer kinds (" in n and "each kind is recorded on its own" in n
               for n in notes), notes


def test_an_old_bitsandbytes_that_keeps_the_4bit_input_is_refused_for_a_recorded_model(tmp_path):
    # the setup of the granite step above, as QLoRA: its recording is LoRA's, which misses the input
    # bitsandbytes before 0.43.2 keeps in every 4-bit layer
    path = write_config(tmp_path, small_config("granite", 1, 4))
    result = CliRunner().invoke(main, ["--model", path, "--seq-len", "64", "--batch-size", "2",
                                       "--method", "qlora", "--bnb-version", "0.43.1"])
    assert result.exit_code == 2, result.output
    assert "0.43.2" in result.output and len(result.output.strip().splitlines()) == 1, result.output
