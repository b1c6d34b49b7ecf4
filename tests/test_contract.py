"""The JSON contract's `setup`: every TrainSetup field, read off the dataclass."""

from __future__ import annotations

import dataclasses
import json

from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.contract import PER_PLAN_FIELDS, to_dict
from lora_planner.gpus import DEFAULT_GPU, get_gpu
from lora_planner.plan import make_plan
from lora_planner.resolve import resolve_model
from lora_planner.spec import TrainSetup


def test_every_setup_field_is_in_the_json():
    """A field is either in `setup` or, when it differs between methods, in each entry of `plans`;
    `setup` and an entry's method and rank give back the very setup that was planned."""
    setup = TrainSetup(method="qlora", rank=4, targets=("q_proj", "v_proj"), precision="bf16",
                       quantize_experts=True, task="seq-cls", num_labels=5, dropout=0.2, lora_dropout=0.05,
                       batch_size=2, seq_len=64, stack="torch", optimizer_impl="for-loop", loss="standard",
                       loss_chunks=8, activation_offload=False, quant_backend="bnb")
    data = json.loads(json.dumps(to_dict(make_plan(resolve_model("mixtral-8x7b"), (setup,),
                                                   get_gpu(DEFAULT_GPU)))))
    names = {f.name for f in dataclasses.fields(TrainSetup)}
    assert set(data["setup"]) == names - set(PER_PLAN_FIELDS)
    entry = data["plans"][0]
    rebuilt = {k: tuple(v) if isinstance(v, list) else v for k, v in data["setup"].items()}
    assert TrainSetup(**rebuilt, **{k: entry[k] for k in PER_PLAN_FIELDS}) == setup


def test_the_settings_the_json_left_out_are_there():
    """dropout, lora_dropout, quantize_experts and num_labels were missing from `setup`."""
    result = CliRunner().invoke(main, ["--model", "mixtral-8x7b", "--method", "qlora", "--task", "seq-cls",
                                       "--num-labels", "3", "--dropout", "0.1", "--quantize-experts",
                                       "--format", "json"])
    assert result.exit_code == 0, result.output
    setup = json.loads(result.output)["setup"]
    assert (setup["dropout"], setup["lora_dropout"], setup["quantize_experts"], setup["num_labels"]) == (
        0.1, 0.0, True, 3)
