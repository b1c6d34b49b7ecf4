"""--fit: the limits it reports fit, and one more does not."""

import json

from click.testing import CliRunner

from lora_planner.catalog import get_model
from lora_planner.cli import main
from lora_planner.fit import largest
from lora_planner.gpus import Gpu
from lora_planner.plan import make_plan
from lora_planner.spec import TrainSetup


def step_fits(spec, setup, gpu) -> bool:
    return make_plan(spec, (setup,), gpu).plans[0].fits


def test_largest_bisects_a_monotone_predicate():
    assert largest(lambda n: n <= 37, 1000) == 37
    assert largest(lambda n: n <= 5000, 1000) == 1000
    assert largest(lambda n: False, 1000) == 0


def test_reported_limits_are_tight():
    gpu = Gpu("24GB", 24 * 10**9)
    result = CliRunner().invoke(main, ["--model", "gpt2", "--method", "full,lora", "--seq-len", "1024",
                                       "--gpu-mem", "24GB", "--fit", "--format", "json"])
    assert result.exit_code == 0, result.output
    spec = get_model("gpt2")
    for p in json.loads(result.output)["plans"]:
        setup = TrainSetup(method=p["method"], rank=p["rank"] or 8, seq_len=1024)
        batch, seq = p["fit"]["max_batch_size"], p["fit"]["max_seq_len"]
        assert batch > 1
        assert step_fits(spec, setup.with_(batch_size=batch), gpu)
        assert not step_fits(spec, setup.with_(batch_size=batch + 1), gpu)
        assert seq == spec.max_positions  # GPT-2's 1,024-token context is the limit here


def test_fit_table_and_errors():
    ok = CliRunner().invoke(main, ["--model", "llama-3.1-70b", "--method", "full,lora", "--fit"])
    assert ok.exit_code == 0
    assert "largest batch at 2048 tokens" in ok.output and "does not fit" in ok.output
    dense = CliRunner().invoke(main, ["--params", "7e9", "--fit"])
    assert dense.exit_code == 2
    assert "--fit needs the model's shape" in dense.output
