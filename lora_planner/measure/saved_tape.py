"""A structural oracle for the activation walk: what autograd really saves, layer by layer.

The native walk (`activations.Graph`) writes a family's forward as the ops transformers runs and
keeps, per op, what PyTorch's derivative saves. Comparing its peak with a trace checks a sum; this
module checks the parts. It runs the forward of a small model built from the same config.json with
random weights (real CPU tensors), under `torch.autograd.graph.saved_tensors_hooks`, and lists every
storage autograd packed for backward that is still alive when the forward has returned, by the
decoder layer it was first saved in. A storage counts once however many ops save it (views of one
output, a norm's output read by q, k and v), as the walk counts a tensor once; parameters, buffers
and the batch are not activations and are left out. Each storage is named by the first backward node
(in the graph reachable from the loss) that holds it, e.g. `MmBackward0.self`.

Sections are the walk's: `embedding` (before the first decoder layer), `layer i` (the walk's
`layer i` and `layer i mlp`), `head` (after the last layer: final norm, LM head, loss).

Checkpointing (its recompute saves again) and torch.compile are not compared; Liger's fused loss
needs a GPU. QLoRA runs bitsandbytes' 4-bit layers on CPU.
"""

from __future__ import annotations

import contextlib
import random
import weakref
from collections import Counter
from dataclasses import dataclass

from ..errors import PlanError
from ..spec import FAMILIES, ModelSpec, TrainSetup, check_runnable_attention, spec_from_hf_config
from ..stacks import resolve

EMBEDDING, HEAD = "embedding", "head"


@dataclass(frozen=True)
class Saved:
    """One saved storage: its bytes and, on the recorded side, the backward node that keeps it, the
    saved tensor's shape and dtype (the view saved, which may be smaller than its storage)."""

    nbytes: int
    op: str = ""
    shape: tuple[int, ...] = ()
    dtype: str = ""
    node: int = -1  # that node's sequence number: one number per op instance, in forward order


Tape = dict[str, tuple[Saved, ...]]  # section -> saves, in the order first saved


def check_comparable(setup: TrainSetup) -> TrainSetup:
    """The resolved setup when its forward is one the oracle compares (see the module docstring)."""
    from .traced_step import _check

    setup = resolve(setup)
    _check(setup)
    refused = {"gradient checkpointing": setup.grad_checkpointing,
               "torch.compile": (setup.compile or "none") != "none"}
    named = [k for k, v in refused.items() if v]
    if named:
        raise PlanError("the saved-tensor oracle compares one forward as it first runs: drop "
                        f"{', '.join(named)}")
    return setup


def _walked(spec: ModelSpec, setup: TrainSetup):
    """The walk's arguments for the setup's step on CPU: (conditions, wrapped, trainable)."""
    from ..architecture import layout
    from ..precision import get_precision
    from ..step import _training, check_walkable, conditions

    setup = check_comparable(setup)
    wrapped, trainable, _ = _training(spec, setup, layout(spec, setup.task, setup.num_labels))
    cond = conditions(setup, get_precision(setup.precision), "cpu")
    check_walkable(spec, setup, cond)
    return cond, wrapped, trainable


def walk_tape(spec: ModelSpec, setup: TrainSetup) -> Tape:
    """What the native walk saves for the setup's step on CPU, by section (`Profile.saves`)."""
    from ..activations import profile

    tape: dict[str, list[Saved]] = {}
    for nbytes, section in profile(spec, *_walked(spec, setup)).saves:
        if nbytes:
            tape.setdefault(section.removesuffix(" mlp"), []).append(Saved(nbytes))
    return {k: tuple(v) for k, v in tape.items()}


def recorded_tape(config: dict, setup: TrainSetup, seed: int = 0) -> Tape:
    """What autograd saves in one forward of the causal LM transformers builds from `config` (a
    config.json dict), with the setup's LoRA adapters, precision, attention, loss and packing, by
    section."""
    import torch
    from transformers import AutoConfig

    from .step import quiet_libraries, step_loss
    from .traced_step import _with_lora, autocast_dtype, build_model, configure

    setup = check_comparable(setup)
    spec = spec_from_hf_config(config)
    hf = AutoConfig.for_model(**config)
    configure(hf, setup)
    torch.manual_seed(seed)
    with quiet_libraries():
        model = build_model(hf, setup, lambda m: _with_lora(m, spec, setup))
    extra = {}
    if setup.packing and setup.batch_size > 1:  # one row, positions restarting per sequence
        ids = torch.randint(0, spec.vocab_size, (1, setup.batch_size * setup.seq_len))  # (1, T)
        extra["position_ids"] = torch.arange(setup.seq_len).repeat(setup.batch_size)[None]  # (1, T)
    else:
        ids = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len))  # (b, s)
    labels = ids.clone()
    loss_fn = step_loss(setup.loss or "standard", setup.loss_chunks or 8)
    compute = autocast_dtype(setup)
    with _recording(decoder_layers(model)) as packed, \
            torch.autocast("cpu", dtype=compute) if compute else contextlib.nullcontext():
        loss = (loss_fn(model, ids, labels) if loss_fn is not None
                else model(input_ids=ids, labels=labels, **extra).loss)  # () fp32
    inputs = (*model.parameters(), *model.buffers(), ids, labels, *extra.values())
    tape = _alive(packed, {t.untyped_storage().data_ptr() for t in inputs}, saved_by(loss))
    # the step holds the loss itself until backward starts from it: alive at the end of forward like
    # a saved tensor, and the walk counts it among the head's
    tape.setdefault(HEAD, []).append(Saved(loss.untyped_storage().nbytes(), "loss", (), str(loss.dtype)))
    return {k: tuple(v) for k, v in tape.items()}


@contextlib.contextmanager
def _recording(layers):
    """Inside: every tensor autograd saves is listed as (section, weak reference to its storage,
    shape, dtype), the section set by hooks on the decoder `layers`."""
    import torch

    section = [EMBEDDING]
    packed: list[tuple[str, weakref.ref, tuple[int, ...], str]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append((section[0], weakref.ref(t.untyped_storage()), tuple(t.shape), str(t.dtype)))
        # kept without its grad_fn, as autograd keeps a saved output: the tensor itself would make a
        # cycle (its node saving it) that outlives a graph no one holds until the garbage collector
        return t.detach()

    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: section.__setitem__(0, f"layer {i}"))
             for i, layer in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(lambda *_: section.__setitem__(0, HEAD)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield packed
    finally:
        for h in hooks:
            h.remove()


def _alive(packed, excluded: set[int], names: dict[int, tuple[int, str]]) -> dict[str, list[Saved]]:
    """The packed storages still alive, once each, by the section of their first save; those at an
    `excluded` address (parameters, buffers, the batch) left out."""
    tape: dict[str, list[Saved]] = {}
    seen: set[int] = set()
    for where, ref, shape, dtype in packed:
        storage = ref()
        if storage is None or not storage.nbytes():
            continue  # freed during the forward: its node is not in the loss's graph
        ptr = storage.data_ptr()
        if ptr in excluded or ptr in seen:
            continue
        seen.add(ptr)
        node, name = names.get(ptr, (-1, "?"))
        tape.setdefault(where, []).append(Saved(storage.nbytes(), name, shape, dtype, node))
    return tape


def decoder_layers(model):
    """The model's decoder layers: its `ModuleList` named `layers` (`h` for GPT-2)."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h"):
            return module
    raise PlanError(f"{type(model).__name__} has no ModuleList of decoder layers named layers or h")


def saved_by(loss) -> dict[int, tuple[int, str]]:
    """storage address -> (sequence number, `Node.attribute`) of the earliest backward node (by
    sequence number) reachable from `loss` that saves a tensor on it."""
    import torch

    first: dict[int, tuple[int, str]] = {}
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
        order = node._sequence_nr()
        for attr in dir(node):
            if not attr.startswith("_saved_") and attr != "saved_tensors":
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # freed, or not saved in this configuration
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    ptr = t.untyped_storage().data_ptr()
                    name = f"{node.name()}.{attr.removeprefix('_saved_')}"
                    if ptr not in first or order < first[ptr][0]:
                        first[ptr] = (order, name)
    return first


@dataclass(frozen=True)
class SectionDiff:
    """One section's saves one side has and the other has not, matched by size (a multiset)."""

    section: str
    walk_only: tuple[int, ...]
    recorded_only: tuple[Saved, ...]

    @property
    def bytes(self) -> int:
        """walk - recorded, in bytes."""
        return sum(self.walk_only) - sum(s.nbytes for s in self.recorded_only)


def tape_diff(walk: Tape, recorded: Tape) -> tuple[SectionDiff, ...]:
    """Per section (in walk order, then any the walk lacks), the sizes saved on one side only;
    sections that agree are left out."""
    out = []
    for section in (*walk, *(s for s in recorded if s not in walk)):
        mine = Counter(s.nbytes for s in walk.get(section, ()))
        theirs = Counter(s.nbytes for s in recorded.get(section, ()))
        extra = mine - theirs
        missing = theirs - mine
        if not extra and not missing:
            continue
        left = Counter(missing)
        recorded_only = []
        for s in recorded.get(section, ()):
            if left[s.nbytes]:
                left[s.nbytes] -= 1
                recorded_only.append(s)
        out.append(SectionDiff(section, tuple(sorted(extra.elements(), reverse=True)), tuple(recorded_only)))
    return tuple(out)


def compare(config: dict, setup: TrainSetup, seed: int = 0) -> tuple[SectionDiff, ...]:
    """The walk's saved tape against the real model's, for `config` (a config.json dict) and `setup`."""
    spec = spec_from_hf_config(config)
    return tape_diff(walk_tape(spec, setup), recorded_tape(config, setup, seed))


PRECISIONS = ("fp32", "pure-bf16")
METHODS = ("full", "lora")
# transformers 5 builds Gemma-2 without an SDPA path, and GPT-OSS's SDPA takes no attention sinks
EAGER_ONLY = ("gemma2", "gpt_oss")
# setups beyond the plain step, each a change to the case's: autocast over fp32 weights; fp32
# adapters over a bf16 base under the Trainer's autocast (LoRA); every bias trained (PEFT's
# bias="all", LoRA); DoRA (LoRA); every dropout of the model on, and LoRA's own (where PEFT allows
# it); the batch packed into one row; torchtune's chunked loss; QLoRA (bitsandbytes' 4-bit layers on
# CPU, LoRA), in the model's precision and under autocast
VARIANTS = ("plain", "amp", "fp32-adapters", "bias-all", "dora", "dropout", "packing", "chunked-loss",
            "qlora", "qlora-amp")
LORA_VARIANTS = ("fp32-adapters", "bias-all", "dora", "qlora", "qlora-amp")


@dataclass(frozen=True)
class Case:
    """One seeded comparison: a random small config of `family` (`fuzz.random_config`) and a step."""

    family: str
    seed: int
    variant: str
    config: dict
    setup: TrainSetup

    @property
    def label(self) -> str:
        s = self.setup
        lora = f" r={s.rank} {s.targets[0]}" if s.method == "lora" else ""
        return (f"{self.family} seed={self.seed} {self.variant} {s.method}{lora} {s.precision} {s.attention} "
                f"b={s.batch_size} s={s.seq_len}")


def random_case(family: str, seed: int, method: str, precision: str, variant: str = "plain") -> Case | None:
    """Seed `seed`'s config of `family` and a step of `method` in `precision` (random LoRA rank and
    targets, batch, length and attention: eager only where transformers runs nothing else), changed
    as `variant` says; None where the variant does not apply (or the planner refuses it)."""
    from ..counts import LINEAR_ROUTERS
    from .fuzz import LINEAR_ROUTER_TARGETS, TARGET_PRESETS, plannable_rank, random_config

    if family not in FAMILIES:
        raise PlanError(f"no native walk for {family!r}; families: {', '.join(FAMILIES)}")
    rng = random.Random(f"saved-tape {family} {seed}")
    config = random_config(rng, family)
    spec = spec_from_hf_config(config)
    attention = "eager" if family in EAGER_ONLY else rng.choice(("sdpa", "eager"))
    check_runnable_attention(spec, attention)
    setup = TrainSetup(method=method, rank=rng.randint(1, 8), targets=(rng.choice(TARGET_PRESETS),),
                       precision=precision, batch_size=rng.randint(1, 3), seq_len=rng.randint(3, 40),
                       attention=attention, stack="torch")
    if setup.targets == ("mlp",) and spec.num_experts and not any(spec.sparse_layer(i)
                                                                 for i in range(spec.num_layers)):
        setup = setup.with_(targets=("attn",))  # PEFT's expert names reach no layer of a dense model
    if setup.targets == ("all-linear",) and spec.family in LINEAR_ROUTERS:
        setup = setup.with_(targets=LINEAR_ROUTER_TARGETS)  # (all-linear would wrap Llama 4's router)
    if method == "lora":
        setup = plannable_rank(spec, setup)
    setup = _variant(setup, variant)
    if setup is None:
        return None
    try:  # the planner's refusals (LoRA dropout on PEFT's ParamWrapper, fp32 adapters on experts)
        _walked(spec, setup)
    except PlanError:
        return None
    return Case(family, seed, variant, config, setup)


def _variant(setup: TrainSetup, variant: str) -> TrainSetup | None:
    if variant not in VARIANTS:
        raise PlanError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    lora = setup.method == "lora"
    if variant in LORA_VARIANTS and not lora:
        return None
    changes = {"plain": {}, "amp": {"precision": "amp"},
               "fp32-adapters": {"precision": "bf16", "adapter_dtype": "fp32"}, "bias-all": {"bias": "all"},
               "dora": {"use_dora": True},
               "packing": {"packing": True, "batch_size": max(2, setup.batch_size)},
               "chunked-loss": {"loss": "chunked", "loss_chunks": 4}, "qlora": {"method": "qlora"},
               "qlora-amp": {"method": "qlora", "precision": "amp"},
               "dropout": {"dropout": 0.1, "lora_dropout": 0.1 if lora else 0.0}}[variant]
    return setup.with_(**changes)
