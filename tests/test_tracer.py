"""The live-tensor tracer: exact on CPU, the same under FakeTensorMode, categories that add up."""

import pytest

torch = pytest.importorskip("torch")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from lora_planner.measure.tracer import MemoryTracer  # noqa: E402

MB = 2**20


def test_peak_follows_allocations_and_frees():
    model = torch.nn.Linear(4, 4, bias=False)  # 64 B of parameters
    tracer = MemoryTracer(model)
    with tracer:
        with tracer.phase("forward"):
            a = torch.empty(MB, dtype=torch.uint8)
            b = torch.empty(MB, dtype=torch.uint8)
            del a
            c = torch.empty(MB // 2, dtype=torch.uint8)
            del b, c
    report = tracer.report()
    assert report.peak_bytes == 64 + 2 * MB
    assert report.peak_phase == "forward"
    assert report.at_peak["parameters"] == 64
    assert report.at_peak["temporaries"] == 2 * MB  # freed before forward ended
    assert report.terms["activations"] == 0


def _step(model, ids, lr=1e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, foreach=True)
    tracer = MemoryTracer(model, opt, inputs=ids)
    with tracer:
        with tracer.phase("forward"):
            loss = model(ids).float().pow(2).mean()
        with tracer.phase("backward"):
            loss.backward()
        with tracer.phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tracer.report(), params


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 32), torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 32))
    model[0].weight.requires_grad_(False)  # a frozen embedding, like LoRA's base
    return model


def test_categories_add_up_to_model_states():
    model = _mlp()
    ids = torch.randint(0, 50, (4, 16))
    report, params = _step(model, ids)
    trainable = sum(p.numel() * 4 for p in params)
    assert report.terms["parameters"] == sum(p.numel() * 4 for p in model.parameters())
    assert report.terms["gradients"] == trainable
    # AdamW: two fp32 moments per value and a 4-byte step counter per tensor
    assert report.terms["optimizer_states"] == 2 * trainable + 4 * len(params)
    assert report.terms["inputs"] == ids.numel() * 8
    assert sum(report.at_peak.values()) == report.peak_bytes


def test_fake_tensors_trace_byte_for_byte():
    real, _ = _step(_mlp(), torch.randint(0, 50, (4, 16)))
    with FakeTensorMode():
        model = _mlp()
        fake, _ = _step(model, torch.randint(0, 50, (4, 16)))
    assert fake.to_dict() == real.to_dict()


def test_unknown_phase_is_refused():
    tracer = MemoryTracer(torch.nn.Linear(2, 2))
    with tracer, pytest.raises(ValueError, match="phase must be one of"):
        with tracer.phase("warmup"):
            pass


# --- the allocator beside the tracer ---------------------------------------------------------------

from lora_planner.measure import allocator  # noqa: E402


def test_running_peak_is_the_largest_prefix_sum():
    assert allocator.running_peak([3, -1, 5, -7, 2], 10) == (17, 2)
    assert allocator.running_peak([-4, 2], 10) == (10, -1)  # never above what was live before
    assert allocator.running_peak([], 0) == (0, -1)


def _profiled_phase(body):
    """Run `body` in a traced, annotated, profiled forward phase; the tracer's report and the reading."""
    model = torch.nn.Linear(4, 4, bias=False)  # 64 B of parameters
    tracer = MemoryTracer(model, annotate=True)
    baseline = tracer.live_bytes()
    with allocator.profiled() as prof, tracer:
        with tracer.phase("forward"):
            body()
    return baseline, tracer.report(), allocator.reading(prof, tracer.calls, baseline)


def test_allocator_peak_of_known_allocations_is_their_sum():
    """torch.empty of known sizes: the allocator's peak is the live parameters plus the two largest
    blocks alive together, byte for byte, and the tracer agrees."""
    def body():
        a = torch.empty(MB, dtype=torch.uint8)
        b = torch.empty(3 * MB // 4, dtype=torch.float32)  # 3 MiB
        del a
        c = torch.empty(MB // 2, dtype=torch.uint8)
        del b, c

    baseline, report, reading = _profiled_phase(body)
    assert baseline == 64
    assert reading.peak_bytes == 64 + MB + 3 * MB == report.peak_bytes
    assert reading.phase == "forward"
    assert reading.extra_by_op == ()


def test_allocation_outside_any_op_is_the_allocators_extra_and_named():
    """`torch.get_rng_state` allocates without dispatching an op (checkpointing calls it per layer): the
    allocator counts its bytes, the tracer cannot, and the reading names where they were made."""
    states = []

    def body():
        states.append(torch.get_rng_state())
        big = torch.empty(MB, dtype=torch.uint8)
        del big

    _, report, reading = _profiled_phase(body)
    state = states[0].untyped_storage().nbytes()  # the generator's own size for its state
    assert report.peak_bytes == 64 + MB
    assert reading.peak_bytes == 64 + MB + state
    (extra,) = reading.extra_by_op
    assert extra.bytes == state and "get_state" in extra.op and extra.phase == "forward"
