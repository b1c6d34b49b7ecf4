"""What the traced-step tests share."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; one keeps the suite fast on a busy machine.
    A test module that imports this fixture runs its traces on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_traced_case(case, peak: float = 0.01) -> None:
    """A random case (`lora_planner.measure.fuzz.Case`) planned and traced: activations and model
    states byte for byte, the peak within `peak`."""
    from lora_planner.measure.fuzz import run_case

    errors = run_case(case).errors()
    assert errors["activations"] == 0, (case.label, errors)
    for term in ("weights", "gradients", "optimizer_states"):
        assert errors[term] == 0, (case.label, term, errors)
    assert abs(errors["peak"]) <= peak, (case.label, errors)
