"""The plan table's layout against tabulate itself, over many real plans."""

from __future__ import annotations

import random

import pytest

from lora_planner.catalog import CATALOG
from lora_planner.gpus import GPUS
from lora_planner.plan import make_plan
from lora_planner.render import _rows, aligned_table, plan_label
from lora_planner.spec import TrainSetup

tabulate = pytest.importorskip("tabulate").tabulate


def plans():
    rng = random.Random(11)
    for _ in range(24):
        spec = rng.choice(CATALOG)
        setups = [TrainSetup(method="full", batch_size=rng.choice([1, 4]), seq_len=rng.choice([256, 1024]))]
        setups += [TrainSetup(method=m, rank=r) for m in ("lora", "qlora") for r in rng.sample([1, 8, 64], 2)]
        yield make_plan(spec, tuple(setups), rng.choice(GPUS))


@pytest.mark.parametrize("markdown", [False, True])
def test_the_plan_table_is_laid_out_as_tabulate_lays_it_out(markdown):
    for plan in plans():
        for unit in ("GB", "GiB"):
            headers = [""] + [plan_label(p) for p in plan.plans]
            rows = _rows(plan, unit)
            expected = tabulate(rows, headers=headers, tablefmt="github" if markdown else "simple",
                                colalign=("left",) + ("right",) * len(plan.plans))
            assert aligned_table(rows, headers, markdown) == expected
