"""bitsandbytes' paged optimizers, asked of bitsandbytes itself: which state buffers it puts in CUDA
unified memory (outside the allocator) and what the rest take, against `optimizers.paged_state_split`
and the plan's `paged_optimizer_states`.

No GPU here: bitsandbytes' own `init_state` runs over meta-device parameters with `F.get_paged` (the
call that allocates unified memory) recording what it is asked for, so the choice of what to page is
bitsandbytes' code, not ours; a CPU step (where bitsandbytes falls back to ordinary buffers) gives the
states' total after a real update.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
from click.testing import CliRunner  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_planner.architecture import Param  # noqa: E402
from lora_planner.cli import main  # noqa: E402
from lora_planner.optimizers import PAGED_OPTIMIZERS, optimizer_state_bytes, paged_state_bytes  # noqa: E402

CLASSES = {"paged-adamw-8bit": "PagedAdamW8bit", "paged-adamw-32bit": "PagedAdamW32bit",
           "paged-lion-8bit": "PagedLion8bit", "paged-lion-32bit": "PagedLion32bit"}
# either side of min_8bit_size (4,096) and of the paging threshold (100,000 values)
SHAPES = st.lists(st.sampled_from([(63, 65), (64, 64), (8, 4096), (300, 333), (100, 1000), (99, 1010),
                                   (400, 300), (7, 11)]), min_size=1, max_size=4)


def _split(name: str, shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """(device bytes, paged bytes) of the states bitsandbytes' `init_state` makes for these shapes."""
    import bitsandbytes.optim.optimizer as optimizer_module

    paged = []

    def get_paged(*shape, dtype=torch.float32, device=None):
        t = torch.empty(*shape, dtype=dtype, device="meta")
        paged.append(t)
        return t

    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    opt = getattr(bnb.optim, CLASSES[name])(params, lr=1e-3)
    with mock.patch.object(optimizer_module.F, "get_paged", get_paged), \
            mock.patch.object(optimizer_module.F, "fill", lambda *a, **k: None):
        for i, p in enumerate(params):
            opt.init_state(opt.param_groups[0], p, 0, i)
    ids = {id(t) for t in paged}
    device = in_pages = 0
    for p in params:
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and not key.startswith("qmap"):  # the maps are shared by all
                size = value.numel() * value.element_size()
                if id(value) in ids:
                    in_pages += size
                else:
                    device += size
    return device, in_pages


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(PAGED_OPTIMIZERS), SHAPES)
def test_paged_split_is_what_bitsandbytes_pages(name, shapes):
    device, paged = _split(name, shapes)
    params = [Param(f"p{i}", s) for i, s in enumerate(shapes)]
    assert optimizer_state_bytes(name, params, 4) == device
    assert paged_state_bytes(name, [p.numel for p in params]) == paged


@pytest.mark.parametrize("name", PAGED_OPTIMIZERS)
def test_paged_states_after_a_cpu_step(name):
    """On CPU bitsandbytes keeps every state as an ordinary tensor: after one update their total is
    what the plan splits between the allocator and unified memory."""
    shapes = [(300, 400), (16, 64), (8, 4096)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = getattr(bnb.optim, CLASSES[name])(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        opt.step()
    total = sum(v.numel() * v.element_size() for p in params for k, v in opt.state[p].items()
                if torch.is_tensor(v) and not k.startswith("qmap"))
    planned = [Param(f"p{i}", s) for i, s in enumerate(shapes)]
    paged = paged_state_bytes(name, [p.numel for p in planned])
    assert total == optimizer_state_bytes(name, planned, 4) + paged


def _plan(*args: str) -> dict:
    result = CliRunner().invoke(main, ["--model", "llama-3.2-1b", "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_paged_states_stay_out_of_the_peak_and_the_fit():
    """The paged states are their own line: the same step with AdamW8bit holds them in the allocator
    (its peak is higher by exactly them), the paged one does not, and the JSON, --explain and the
    notes say so."""
    args = ("--method", "full", "--grad-checkpointing")
    paged = _plan(*args, "--optimizer", "paged-adamw-8bit", "--explain")
    plain = _plan(*args, "--optimizer", "adamw-8bit")
    p, q = paged["plans"][0], plain["plans"][0]
    assert paged["setup"]["optimizer"] == "paged-adamw-8bit"
    assert p["paged_optimizer_bytes"] > 0 and q["paged_optimizer_bytes"] is None
    moved = q["memory_bytes"]["optimizer_states"] - p["memory_bytes"]["optimizer_states"]
    assert moved == p["paged_optimizer_bytes"]
    assert q["memory_bytes"]["peak"] - p["memory_bytes"]["peak"] == moved
    assert any(t.startswith("paged_optimizer_states: ") for t in paged["explain"][0]["terms"])
    assert any("unified memory" in n for n in paged["notes"])


def test_paged_states_per_gpu_follow_the_optimizer_states():
    one = _plan("--method", "full", "--optimizer", "paged-adamw-32bit")["plans"][0]["paged_optimizer_bytes"]
    for sharding, share in (("ddp", one), ("zero1", -(-one // 4)), ("fsdp", -(-one // 4))):
        data = _plan("--method", "full", "--optimizer", "paged-adamw-32bit", "--num-gpus", "4",
                     "--sharding", sharding)
        assert data["plans"][0]["paged_optimizer_bytes"] == share, sharding
