"""Exact live-tensor accounting of one training step, on CPU or under FakeTensorMode.

`MemoryTracer` is a `TorchDispatchMode`: every tensor an aten op returns passes through it, so it sees
each storage the step allocates, with its size, dtype, the op and the module that made it, and the phase
(forward, backward, optimizer) it was made in. A weak reference on the storage tells it when the storage
is freed. The running sum of live storage bytes is what a caching allocator would hand out before it
rounds block sizes; its maximum over the step is the allocator-level peak.

Under `FakeTensorMode` no memory is allocated but the same ops run with the same shapes, so the count is
the same byte for byte and a 70B slice traces in seconds on a laptop. Enter the tracer *inside* the fake
mode (the innermost mode sees the fake outputs).

Categories, decided once the step is over:

- parameters: the model's parameter storages (present before the step), a 4-bit parameter's
  quantisation state included (`quant_state_tensors`);
- buffers: the model's buffers (rotary tables and the like);
- inputs: the batch handed to the tracer (token ids, labels);
- gradients: storages that became a parameter's `.grad`;
- optimizer_states: storages the optimizer keeps in `optimizer.state` after its step;
- activations: storages made during forward and still alive when forward ended (what autograd saved,
  including the 16-bit weight copies autocast keeps for backward);
- temporaries: everything else (freed within its phase, or made in backward/optimizer and not kept).

Usage::

    tracer = MemoryTracer(model, optimizer)
    with tracer:
        with tracer.phase("forward"):
            loss = model(**batch).loss
        with tracer.phase("backward"):
            loss.backward()
        with tracer.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    report = tracer.report()

With `annotate=True` each op runs inside a `torch.profiler` range and the tracer keeps `calls`, the
ops it saw with the storages they returned, so that a profile of the same step can be read against
it (`allocator.reading`: the allocator's peak, and the bytes a dispatch mode cannot see).

Backward is also followed by where it is (`backward_positions`): at the head until the gradient of the
last decoder layer's output is made, then inside layer i from the moment the gradient of layer i's
output is made (where FSDP2's pre-backward hook gathers the layer), and at the embeddings once the
gradient of their output is made. The decoder layers are the children of the model's largest
`nn.ModuleList` (`decoder_layers`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("parameters", "buffers", "inputs", "gradients", "optimizer_states", "activations",
              "temporaries")
PHASES = ("forward", "backward", "optimizer")


@dataclass
class Block:
    """One storage the step allocated (or found already allocated)."""

    nbytes: int
    phase: str
    op: str
    shape: tuple[int, ...]
    dtype: str
    module: str = ""
    tag: str = ""  # parameters, buffers, gradients, optimizer_states: set when known
    alive_after_forward: bool = False
    freed: bool = False

    def category(self) -> str:
        if self.tag:
            return self.tag
        if self.phase == "forward" and self.alive_after_forward:
            return "activations"
        return "temporaries"


@dataclass(frozen=True)
class Call:
    """One op the tracer saw (kept with `annotate=True`): its phase, name, module, and the data
    addresses of the storages it returned (what the allocator reported allocating for them)."""

    phase: str
    op: str
    module: str
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class TraceReport:
    """What one traced step held.

    `peak_bytes` is the most bytes live at once; `at_peak` splits it by category; `phase_peaks` is
    the maximum within each phase. `terms` are the step's model-state and activation totals, each read
    at the moment it is complete: parameters and buffers (always), gradients (end of backward),
    optimizer states (after the step), activations (end of forward).
    """

    peak_bytes: int
    peak_phase: str
    at_peak: dict[str, int]
    phase_peaks: dict[str, int]
    terms: dict[str, int]
    largest_at_peak: tuple[Block, ...] = field(default=())
    # the gradients live at each phase's most (`phase_peaks`)
    phase_peak_gradients: dict[str, int] = field(default_factory=dict)
    # per phase: (the most bytes live beside the gradients, the gradients live then)
    phase_other_peaks: dict[str, tuple[int, int]] = field(default_factory=dict)
    # per position in backward ("head", "0".."L-1" for the decoder layers, "end"): (the most bytes
    # live there, the gradients then, the most beside the gradients, the gradients then, the
    # gradients live as the position was entered)
    backward_positions: dict[str, tuple[int, int, int, int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "peak": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "at_peak": dict(self.at_peak),
            "phase_peaks": dict(self.phase_peaks),
            "terms": dict(self.terms),
        }


def decoder_layers(model: torch.nn.Module) -> tuple[str, list[torch.nn.Module]]:
    """The decoder layers: the children of the `nn.ModuleList` holding the most parameters, and its
    name (empty with no such list)."""
    lists = [(sum(p.numel() for p in m.parameters()), name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return "", []
    _, name, layers = max(lists, key=lambda x: x[0])
    return name, list(layers)


def quant_state_tensors(p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors a 4-bit parameter keeps beside its packed codes, counted with the parameter:
    bitsandbytes' `Params4bit.quant_state` holds the per-block absmax and, double-quantised, the
    second level's absmax and the offset (what `quant.nf4_bytes` counts). Its 16- and 256-entry
    code books are lookup tables outside the count, as in the plan; none for any other parameter."""
    state = getattr(p, "quant_state", None)
    if state is None:
        return ()
    inner = getattr(state, "state2", None)
    kept = (state.absmax, getattr(state, "offset", None), inner.absmax if inner is not None else None)
    return tuple(t for t in kept if isinstance(t, torch.Tensor))


def _storage_key(t: torch.Tensor) -> tuple[int, torch.UntypedStorage]:
    storage = t.untyped_storage()
    return id(storage), storage


class MemoryTracer(TorchDispatchMode):
    """Count live tensor storage bytes through one training step; see the module docstring."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 inputs: object = None, keep_largest: int = 12, record_timeline: bool = False,
                 annotate: bool = False, device: str | None = None) -> None:
        super().__init__()
        # on a GPU only the device's storages are the step's memory: the optimizer's step counters
        # and the like live in host memory and are not the allocator's (None: every storage)
        self.device = device
        self.timeline: list[tuple[str, str, str, int]] | None = [] if record_timeline else None
        self.calls: list[Call] | None = [] if annotate else None
        self.model = model
        self.optimizer = optimizer
        self.keep_largest = keep_largest
        self._live: dict[int, tuple[weakref.ref, Block]] = {}
        self._current = 0
        self._peak = 0
        self._peak_blocks: list[Block] = []
        self._peak_phase = ""
        self._phase = "setup"
        self._phase_peaks: dict[str, int] = {}
        self._phase_peak_gradients: dict[str, int] = {}
        self._phase_other_peaks: dict[str, tuple[int, int]] = {}
        self._where = ""  # the position in backward (`backward_positions`)
        self._positions: dict[str, list[int]] = {}
        self._gradients = 0  # bytes of live storages tagged as gradients
        self._module_stack: list[str] = []
        self._hooks: list = []
        self._terms: dict[str, int] = {}
        self._adopt_model()
        for t in tree_flatten(inputs)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, "input", "inputs")

    # --- bookkeeping -------------------------------------------------------------------------
    def _track(self, t: torch.Tensor, op: str, tag: str = "") -> Block | None:
        if t.device.type == "meta" or (self.device is not None and t.device.type != self.device):
            return None
        key, storage = _storage_key(t)
        if key in self._live:
            block = self._live[key][1]
            if tag and not block.tag:
                block.tag = tag
                self._gradients += block.nbytes if tag == "gradients" else 0
            return block
        block = Block(storage.nbytes(), self._phase, op, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                      self._module_stack[-1] if self._module_stack else "", tag)

        def _free(_ref, key=key, block=block) -> None:
            if self._live.pop(key, None) is not None:
                block.freed = True
                self._current -= block.nbytes
                self._gradients -= block.nbytes if block.tag == "gradients" else 0

        self._live[key] = (weakref.ref(storage, _free), block)
        self._current += block.nbytes
        self._gradients += block.nbytes if tag == "gradients" else 0
        self._phase_peak(self._phase)
        if self._current > self._peak:
            self._peak = self._current
            self._peak_phase = self._phase
            self._peak_blocks = [b for _, b in self._live.values()]
        return block

    def _phase_peak(self, phase: str) -> None:
        """Keep the phase's most live bytes, and the gradients' part of them at that moment (a
        gradient counts once its parameter's hook has tagged it); and the most bytes beside the
        gradients, with the gradients then."""
        if self._current > self._phase_peaks.get(phase, -1):
            self._phase_peaks[phase] = self._current
            self._phase_peak_gradients[phase] = self._gradients
        other = self._current - self._gradients
        if other > self._phase_other_peaks.get(phase, (-1, 0))[0]:
            self._phase_other_peaks[phase] = (other, self._gradients)
        if phase == "backward" and self._where:
            at = self._positions.setdefault(self._where, [-1, 0, -1, 0, self._gradients])
            if self._current > at[0]:
                at[0:2] = self._current, self._gradients
            if other > at[2]:
                at[2:4] = other, self._gradients

    def _enter_position(self, where: str) -> None:
        """Backward has reached `where` (a decoder layer's index, or "end"): what is live now counts
        towards it."""
        if self._phase == "backward":
            self._where = where
            self._phase_peak("backward")

    def _mark(self, where: str):
        """A forward hook that marks backward's arrival at `where` once its output's gradient is made."""
        def hook(_module, _args, output) -> None:
            first = next((t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)), None)
            if self._phase == "forward" and first is not None and first.requires_grad:
                first.register_hook(lambda _grad: self._enter_position(where))
        return hook

    def _adopt_model(self) -> None:
        for name, p in self.model.named_parameters():
            self._track(p, f"parameter {name}", "parameters")
            for i, t in enumerate(quant_state_tensors(p)):
                self._track(t, f"quant state {name}[{i}]", "parameters")
            if p.grad is not None:
                self._track(p.grad, f"grad {name}", "gradients")
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._tag_grad))
        for name, b in self.model.named_buffers():
            self._track(b, f"buffer {name}", "buffers")
        self._tag_optimizer_state()
        for name, module in self.model.named_modules():
            self._hooks.append(module.register_forward_pre_hook(self._enter(name)))
            self._hooks.append(module.register_forward_hook(self._leave))
        for i, layer in enumerate(decoder_layers(self.model)[1]):
            self._hooks.append(layer.register_forward_hook(self._mark(str(i))))
        embedding = getattr(self.model, "get_input_embeddings", lambda: None)()
        if isinstance(embedding, torch.nn.Module):
            self._hooks.append(embedding.register_forward_hook(self._mark("end")))

    def _enter(self, name: str):
        def hook(_module, _args) -> None:
            self._module_stack.append(name)
        return hook

    def _leave(self, _module, _args, _output) -> None:
        if self._module_stack:
            self._module_stack.pop()

    def _tag_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._track(p.grad, "grad", "gradients")

    def _tag_optimizer_state(self) -> None:
        if self.optimizer is None:
            return
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._track(value, "optimizer state", "optimizer_states")

    def _live_bytes(self, category: str) -> int:
        return sum(b.nbytes for _, b in self._live.values() if b.category() == category)

    # --- the dispatch hook ---------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.calls is None:
            out = func(*args, **(kwargs or {}))
        else:
            from .allocator import CALL_RANGE, profiler_range

            with profiler_range(f"{CALL_RANGE}{len(self.calls)}"):
                out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in tensors:
            self._track(t, str(func.overloadpacket.__name__))
        if self.calls is not None:
            module = self._module_stack[-1] if self._module_stack else ""
            self.calls.append(Call(self._phase, func.overloadpacket.__name__, module,
                                   tuple(t.untyped_storage().data_ptr() for t in tensors
                                         if t.device.type != "meta")))
        if self.timeline is not None:
            module = self._module_stack[-1] if self._module_stack else ""
            self.timeline.append((self._phase, func.overloadpacket.__name__, module, self._current))
        return out

    # --- phases --------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {name!r}")
        self._phase = name
        # a checkpointed recompute that stops early leaves its modules' forward hooks unrun: no
        # module a phase ran in is still running when the next begins
        self._module_stack.clear()
        self._where = "head" if name == "backward" else ""
        # what is live as the phase begins counts towards its peak (a phase may allocate nothing)
        self._phase_peak(name)
        marked = contextlib.nullcontext()
        if self.calls is not None:
            from .allocator import PHASE_RANGE, profiler_range

            marked = profiler_range(f"{PHASE_RANGE}{name}")
        try:
            with marked:
                yield
        finally:
            if name == "forward":
                for _, block in self._live.values():
                    if block.phase == "forward":
                        block.alive_after_forward = True
                self._terms["activations"] = self._live_bytes("activations")
            elif name == "backward":
                for p in self.model.parameters():
                    if p.grad is not None:
                        self._track(p.grad, "grad", "gradients")
                self._terms["gradients"] = self._live_bytes("gradients")
            elif name == "optimizer":
                self._tag_optimizer_state()
                self._terms["optimizer_states"] = self._live_bytes("optimizer_states")
            self._phase = "after " + name

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return super().__exit__(*exc)

    # --- results -------------------------------------------------------------------------------
    def live_bytes(self) -> int:
        """The bytes the tracer counts live now."""
        return self._current

    def report(self) -> TraceReport:
        at_peak = {c: 0 for c in CATEGORIES}
        for block in self._peak_blocks:
            at_peak[block.category()] += block.nbytes
        terms = {
            "parameters": sum(b.nbytes for b in self._peak_blocks if b.tag == "parameters"),
            "buffers": sum(b.nbytes for b in self._peak_blocks if b.tag == "buffers"),
            "inputs": sum(b.nbytes for b in self._peak_blocks if b.tag == "inputs"),
            "gradients": self._terms.get("gradients", 0),
            "optimizer_states": self._terms.get("optimizer_states", 0),
            "activations": self._terms.get("activations", 0),
        }
        largest = tuple(sorted(self._peak_blocks, key=lambda b: -b.nbytes)[: self.keep_largest])
        return TraceReport(self._peak, self._peak_phase.removeprefix("after "), at_peak,
                           dict(self._phase_peaks), terms, largest, dict(self._phase_peak_gradients),
                           dict(self._phase_other_peaks),
                           {k: tuple(v) for k, v in self._positions.items()})
