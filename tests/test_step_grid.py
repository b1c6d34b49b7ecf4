"""The validation grid: the predicted step against a real CPU trace, for every family.

{full, lora} x {fp32, bf16 autocast} x {checkpointing off, on} x {eager, sdpa} x three batch/sequence
shapes, on tiny configs of each family (GPT-2, Llama, Qwen2, Gemma-2, Phi-3, Mixtral). The activation
walk must match the trace byte for byte, the model-state terms within 5%, the allocator-level peak
within 1% (or a known miss's own bound, listed in `KNOWN`).

The default run traces one case of each family (`DEFAULT`); the rest of the grid is marked slow
(`pytest -m slow`).
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from lora_planner.measure.grid import grid, large  # noqa: E402
from lora_planner.measure.traced_step import trace  # noqa: E402
from tests.tracing import one_thread  # noqa: E402, F401 (autouse: traces run on one thread)

# Cases the timeline still misses by more than 1%, each with its own bound (the miss recorded in
# results/trace/step-grid-cpu.jsonl, rounded up): the activation terms are asserted exact for them as
# for every case, and the peak within the bound, so a regression shows. None at present: the
# checkpointed backward (recomputed expert blocks, Gemma-2's post-norms) is modelled moment by moment.
KNOWN: dict[tuple, float] = {}


def _key(spec, s):
    return (spec.name, s.method, s.precision, s.batch_size, s.seq_len, s.attention, s.grad_checkpointing)


# One case per family, between them: full and LoRA, fp32 and bf16 autocast, checkpointing off and
# on, SDPA and eager, and each of the three shapes
DEFAULT = {
    ("tiny-gpt2", "full", "fp32", 4, 64, "sdpa", False),
    ("tiny-llama", "lora", "amp", 1, 128, "sdpa", True),
    ("tiny-qwen2", "full", "amp", 2, 32, "eager", False),
    ("tiny-gemma2", "lora", "fp32", 4, 64, "eager", True),
    ("tiny-phi3", "lora", "amp", 2, 32, "sdpa", False),
    ("tiny-mixtral", "full", "fp32", 1, 128, "eager", True),
}
CASES = [pytest.param(spec, setup, id="-".join(map(str, _key(spec, setup))),
                      marks=() if _key(spec, setup) in DEFAULT else pytest.mark.slow)
         for spec, setup in grid()]


def test_every_default_case_is_in_the_grid():
    assert DEFAULT <= {_key(spec, setup) for spec, setup in grid()}


@pytest.mark.parametrize(("spec", "setup"), CASES)
def test_predicted_step_matches_the_trace(spec, setup):
    result = trace(spec, setup)
    errors = result.errors()
    assert result.predicted["activations"] == result.traced["activations"]
    for term in ("weights", "gradients", "optimizer_states"):
        assert abs(errors[term]) <= 0.05, (term, errors)
    assert abs(errors["peak"]) <= KNOWN.get(_key(spec, setup), 0.01), errors


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "setup"), [pytest.param(s, u, id=f"{s.name}-{u.method}-"
                                                          f"{'ckpt' if u.grad_checkpointing else 'plain'}")
                                             for s, u in large()])
def test_large_models_under_fake_tensors(spec, setup):
    """2-layer slices of 7B/8B/70B at 4,096 tokens and all of 7B, traced without their memory."""
    result = trace(spec, setup, fake=True)
    assert result.predicted["activations"] == result.traced["activations"]
    assert abs(result.errors()["peak"]) <= 0.02
