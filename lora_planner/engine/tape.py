"""The forward of a training step as a tape: every op that allocates, in the order it runs.

A `Tensor` is one storage (a view is the tensor it views: it allocates nothing); it has bytes, a
role (activation, parameter, buffer, input) and whether a gradient flows to it. An `Op` names its
rule (`rules.RULES`), its inputs and outputs, the tensors it keeps for backward (decided by its rule
from which inputs need a gradient, as autograd's generated code decides) and a kernel workspace that
lives only while it runs. Phases are labels on ranges of ops; a checkpointed region is a range too.

The tape knows nothing about backward, recompute or the optimizer: `replay` derives them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tensor:
    """One storage. `traced` is False for a storage no dispatch-level tracer sees (made outside every
    op, as `torch.get_rng_state`), which the allocator counts."""

    id: int
    bytes: int
    role: str = "activation"  # activation | parameter | buffer | input
    grad: bool = False  # a gradient flows to it
    name: str = ""
    traced: bool = True
    base: int | None = None  # a view: the tensor whose storage it shares


@dataclass(frozen=True)
class Op:
    rule: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    saved: tuple[int, ...]  # kept for backward (none when no input needs a gradient)
    workspace: int = 0  # the kernel's own scratch, live only while the op runs
    where: str = ""  # the module it runs in, for --explain
    backward_workspace: int = 0  # scratch its backward allocates beside the gradients


@dataclass
class Tape:
    tensors: list[Tensor] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    phases: list[tuple[str, int, int]] = field(default_factory=list)  # (label, first op, end op)
    regions: list[tuple[int, int, int]] = field(default_factory=list)  # checkpointed (first, end, input)
    kept: list[int] = field(default_factory=list)  # held through the whole step (`keep`)
    _open: list[str] = field(default_factory=list)

    def tensor(self, nbytes: int, role: str = "activation", grad: bool = False, name: str = "",
               traced: bool = True) -> int:
        self.tensors.append(Tensor(len(self.tensors), int(nbytes), role, grad, name, traced))
        return len(self.tensors) - 1

    def op(self, rule: str, inputs: tuple[int, ...], outputs: tuple[int, ...] | tuple[tuple[int, bool], ...],
           *, workspace: int = 0, backward_workspace: int = 0, where: str = "") -> tuple[int, ...]:
        """Append an op; `outputs` are byte sizes (or (bytes, differentiable) pairs: an index or a
        statistic takes no gradient). Returns the new tensors' ids."""
        from .rules import RULES

        needs = tuple(self.tensors[i].grad for i in inputs)
        made = []
        for out in outputs:
            nbytes, differentiable = out if isinstance(out, tuple) else (out, True)
            made.append(self.tensor(nbytes, grad=differentiable and any(needs)))
        saved = RULES[rule].saves(inputs, tuple(made), needs) if any(needs) else ()
        self.ops.append(Op(rule, tuple(inputs), tuple(made), tuple(saved), workspace, where or self.where,
                           backward_workspace))
        return tuple(made)

    def view(self, rule: str, base: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Views of `base` (a split, a transpose): no storage of their own; `sizes` are the bytes a
        gradient of each has. Their rule says what their backward allocates."""
        root = self.root(base)
        made = []
        for nbytes in sizes:
            self.tensors.append(Tensor(len(self.tensors), nbytes, grad=self.tensors[base].grad, base=root))
            made.append(len(self.tensors) - 1)
        self.ops.append(Op(rule, (base,), tuple(made), (), where=self.where))
        return tuple(made)

    def root(self, t: int) -> int:
        base = self.tensors[t].base
        return t if base is None else base

    def hold(self, *ids: int) -> None:
        """The model's code still binds `ids` here (a local, an argument): they live at least until
        this point of the forward."""
        self.ops.append(Op("hold", tuple(ids), (), (), where=self.where))

    def keep(self, t: int) -> None:
        """`t` lives through the step: the loss the caller holds, or a leaf that autograd's
        AccumulateGrad node holds until backward is over."""
        self.kept.append(t)

    def one(self, rule: str, inputs: tuple[int, ...], nbytes: int, **kw) -> int:
        return self.op(rule, inputs, (nbytes,), **kw)[0]

    @property
    def where(self) -> str:
        return self._open[-1] if self._open else ""

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        start = len(self.ops)
        self._open.append(label)
        try:
            yield
        finally:
            self._open.pop()
            self.phases.append((label, start, len(self.ops)))

    @contextlib.contextmanager
    def checkpointed(self, inputs: tuple[int, ...], rng_bytes: int) -> Iterator[None]:
        """A region run under non-reentrant checkpointing: its tensor arguments are saved by the
        region's first op (torch's `_NoopSaveInputs`), with the CPU RNG state it copies (made
        outside every op: untraced); its own ops save nothing until backward recomputes them."""
        rng = self.tensor(rng_bytes, name="checkpoint RNG state", traced=False)
        self.ops.append(Op("checkpoint", tuple(inputs), (rng,), (*inputs, rng), where=self.where))
        start = len(self.ops)
        yield
        self.regions.append((start, len(self.ops), inputs[0]))
