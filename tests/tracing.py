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


def random_lora_setup(rng, precision: str, grad_checkpointing: bool | None = None,
                      lora_dropout: float | None = None, **fields):
    """A random small LoRA step of the torch stack, drawn from `rng` in one fixed order (rank,
    targets, batch, length, attention, then checkpointing and LoRA dropout unless given)."""
    from lora_planner.spec import TrainSetup

    rank, targets = rng.randint(1, 8), (rng.choice(("default", "qv", "attn", "mlp", "all-linear")),)
    batch_size, seq_len = rng.randint(1, 3), rng.randint(3, 48)
    attention = rng.choice(("sdpa", "eager"))
    if grad_checkpointing is None:
        grad_checkpointing = rng.random() < 0.5
    if lora_dropout is None:
        lora_dropout = rng.choice((0.0, 0.0, 0.1))
    return TrainSetup(method="lora", rank=rank, targets=targets, precision=precision,
                      batch_size=batch_size, seq_len=seq_len, attention=attention,
                      grad_checkpointing=grad_checkpointing, lora_dropout=lora_dropout, stack="torch",
                      **fields)
