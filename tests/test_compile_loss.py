"""`--compile layers+loss`: the loss compiled apart from the model, as torchtune's compile=True does.

torchtune (recipes/*_single_device.py `training.compile_loss`, torchtune/training/_compile.py)
compiles `CEWithChunkedOutputLoss.compute_cross_entropy`, the upcast and cross-entropy of one chunk.
torchtune is not installed here: `_chunked_loss` writes the few lines of that loss in plain torch,
and the CPU allocator's live bytes (torch.profiler memory events) through a real compiled forward
and backward are the oracle for the plan's head-and-loss terms.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_planner.activations import Conditions, Graph, head_and_loss, loss_compiled
from lora_planner.catalog import lookup
from tests.test_cli import plan_json, run

torch = pytest.importorskip("torch")
from tests.tracing import one_thread  # noqa: E402,F401

MARK = 196_672  # an allocation of this size marks the start of backward in the profile


def _chunked_loss(chunks, labels, n: int, compute):
    """torchtune 0.6.1 CEWithChunkedOutputLoss.forward: labels chunked like the logits, each chunk's
    `compute(logits.float() cross-entropy, reduction sum)`, summed and divided by the labelled count."""
    total = (labels != -100).sum()
    parts = [c.reshape(-1) for c in labels.chunk(n, dim=1)]
    loss = 0.0
    for logits, lab in zip(chunks, parts, strict=True):
        loss = loss + compute(logits.reshape(-1, logits.size(-1)), lab)
    return loss / total


def _compute_cross_entropy(logits, labels):
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


def _allocator_reading(b: int, s: int, vocab: int, n: int) -> tuple[int, int]:
    """Bytes the step holds after the loss's forward beyond its inputs and the logits, and its peak
    over the inputs through the loss's backward: bf16 logits in n chunks, the loss compiled."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    compiled = torch.compile(_compute_cross_entropy)
    labels = torch.randint(0, vocab, (b, s))
    # each chunk's logits a fresh bf16 tensor (a clone, whose backward passes the gradient on, as
    # the head's output would); the leaves stand for the head, whose own backward (CPU matmul
    # workspaces) is not the loss's
    leaves = [torch.randn(*c.shape, vocab, dtype=torch.bfloat16, requires_grad=True)
              for c in labels.chunk(n, dim=1)]

    def step():
        chunks = [leaf.clone() for leaf in leaves]
        loss = _chunked_loss(chunks, labels, n, compiled)
        del chunks
        torch.empty(MARK, dtype=torch.uint8)
        loss.backward()

    step()  # compile outside the profile
    for leaf in leaves:
        leaf.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    found, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            f = event.extra_fields
            if f.device.type == "cpu" and f.alloc_size:
                found.append((event.start_time_ns, f.alloc_size))
        stack.extend(event.children)
    live, peak, after_forward = 0, 0, None
    for _, nbytes in sorted(found):
        if abs(nbytes) == MARK:
            after_forward = live if after_forward is None else after_forward
            continue
        live += nbytes
        peak = max(peak, live)
    logits = b * s * vocab * 2
    return after_forward - logits, peak


def _planned(b: int, s: int, hidden: int, vocab: int, n: int) -> tuple[int, int]:
    """The plan's saved head-and-loss bytes beyond the logits, and what it holds through the loss's
    backward (saved + the head's backward term), for the same frozen head."""
    spec = replace(lookup("llama-3.2-1b"), vocab_size=vocab, hidden_size=hidden)
    cond = Conditions(batch_size=b, seq_len=s, weight_bytes=2, autocast=False, loss="chunked",
                      loss_chunks=n, compile="layers+loss")
    g = Graph(cond, {}, set())
    g.section = "head"
    h = g.new(b * s * hidden, 2, True)
    logits, _, backward = head_and_loss(g, spec, h, "lm_head")
    saved = g.saved_bytes("head")
    return saved, saved + backward


@pytest.mark.slow
@pytest.mark.parametrize("b,s,hidden,vocab,n", [(2, 256, 64, 4096, 8), (1, 96, 32, 3000, 3),
                                                (3, 64, 48, 2048, 4)])
def test_compiled_chunked_loss_follows_the_allocator(one_thread, b, s, hidden, vocab, n):  # noqa: F811
    saved, peak = _allocator_reading(b, s, vocab, n)
    plan_saved, plan_peak = _planned(b, s, hidden, vocab, n)
    # the saved set is per-row statistics and labels (a one-row chunk's labels are a view: the plan
    # counts the padded labels once more, under 1 KB here)
    assert abs(plan_saved - saved) <= 1024, (plan_saved, saved)
    # backward: all logits (saved by the compiled loss) and the gradients replacing them
    assert abs(plan_peak - peak) <= 0.002 * peak, (plan_peak, peak)


def test_compiled_loss_keeps_no_fp32_logits():
    """Fast check: compiled, no vocab-wide fp32 tensor is planned in forward or backward."""
    assert loss_compiled("layers+loss") and loss_compiled("model") and not loss_compiled("layers")
    b, s, hidden, vocab, n = 2, 256, 64, 4096, 8
    saved, held = _planned(b, s, hidden, vocab, n)
    assert saved < b * s * vocab  # eager keeps the fp32 log-softmax: 4 B per logit
    assert held - saved == b * s * vocab * 2 + b * (s // n) * vocab * 2


def test_layers_loss_option_in_help_setup_and_explain():
    assert "layers+loss" in run("plan", "--help").output
    args = ("--model", "llama-3.2-1b", "--method", "lora", "--stack", "torchtune")
    assert plan_json(*args, "--compile", "layers+loss")["setup"]["compile"] == "layers+loss"
    eager = plan_json(*args, "--compile", "layers")["plans"][0]["per_gpu_peak_bytes"]
    compiled = plan_json(*args, "--compile", "layers+loss")["plans"][0]["per_gpu_peak_bytes"]
    assert compiled < eager
    explained = run(*args, "--compile", "layers+loss", "--explain").output
    assert "each layer and the loss compiled" in explained


def test_trace_refuses_layers_loss(tmp_path):
    """The traced step runs the model's own loss eagerly: tracing a compiled loss is refused in one
    line (exit 2) rather than read as if it were compiled."""
    result = run("trace", "--model", "llama-3.2-1b", "--method", "lora", "--compile", "layers+loss")
    assert result.exit_code == 2 and "trace --compile layers" in result.output
    assert "Traceback" not in result.output
