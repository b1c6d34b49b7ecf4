"""The step engine's tape held to autograd's, op by op: same ops, same saved sizes, per section.

`saved_tape.recorded_tape` lists every storage a real CPU forward keeps for backward, named by the
earliest backward node holding it (its sequence number is the op instance). The engine's tape
(`engine.forward_tape`) names each op's rule and the tensors it keeps. Here both become, per
section (`embedding`, `layer i`, `head`), a sequence of op instances, each with the sizes of the
storages it is the first to keep: the engine's rule translated to autograd's node names through
`NODES`, autograd's node name as recorded. Two tapes agree when these sequences are equal; a
multiset of sizes (`saved_tape.tape_diff`) cannot tell two ops that swap sizes, nor an op saved
under the wrong name.

A storage counts once, under the first op that keeps it (a norm's output read by q, k and v is
q's projection's), as on the recorded side. Parameters, buffers and the batch are not activations
and are left out on both sides; the loss the step holds is the head's last entry (`loss`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..spec import TrainSetup, spec_from_hf_config
from .saved_tape import EMBEDDING, HEAD, check_comparable, recorded_tape

# the engine's rule -> the autograd nodes that rule stands for (torch 2.x CPU, read from recorded
# tapes): a linear is mm over the flattened rows (addmm with a bias, GPT-2's Conv1D); a batched
# matmul of eager attention is bmm (torch.matmul folds 4-D operands into 3-D ones); rules that keep
# nothing (a cast, a view, an addition) have no entry
NODES: dict[str, tuple[str, ...]] = {
    "linear": ("MmBackward0", "AddmmBackward0"),
    "matmul": ("BmmBackward0",),
    "mul": ("MulBackward0",),
    "div": ("DivBackward0",),
    "pow": ("PowBackward0",),
    "rsqrt": ("RsqrtBackward0",),
    "silu": ("SiluBackward0",),
    "gelu": ("GeluBackward0",),
    "tanh": ("TanhBackward0",),
    # SDPA's math fallback (under attention dropout) calls `_safe_softmax`: zeros for a row wholly masked
    "softmax": ("SoftmaxBackward0", "SafeSoftmaxBackward0"),
    "log_softmax": ("LogSoftmaxBackward0",),
    "layer_norm": ("NativeLayerNormBackward0",),
    "embedding": ("EmbeddingBackward0",),
    "sdpa": ("ScaledDotProductFlashAttentionForCpuBackward0",),
    "nll_loss": ("NllLossBackward0",),
    "loss": ("loss",),
}
NODE_RULE = {node: rule for rule, nodes in NODES.items() for node in nodes}


@dataclass(frozen=True)
class OpSaves:
    """One op instance: its rule (autograd's node name mapped through `NODES`, or the node name
    itself where the table has none) and the sizes of the storages it first keeps, largest first."""

    rule: str
    sizes: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.rule}{list(self.sizes)}"


OpTape = dict[str, tuple[OpSaves, ...]]  # section -> op instances, in forward order


def engine_ops(config: dict, setup: TrainSetup) -> OpTape:
    """The engine's forward for the setup's step, as op instances per section."""
    from ..engine import forward_tape

    setup = check_comparable(setup)
    tape, loss, _, _ = forward_tape(spec_from_hf_config(config), setup)
    # a decoder layer's phase is one inside the forward's that no other (but the forward's) holds
    inner = [(start, end) for label, start, end in tape.phases if label not in ("forward", "loss")]
    layers = sorted(r for r in inner if not any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in inner))

    def section(i: int) -> str:
        if i < layers[0][0]:
            return EMBEDDING
        found = next((n for n, (start, end) in enumerate(layers) if start <= i < end), None)
        return HEAD if found is None else f"layer {found}"

    out: dict[str, list[OpSaves]] = {}
    seen: set[int] = set()
    for i, op in enumerate(tape.ops):
        sizes = []
        for t in op.saved:
            root = tape.root(t)
            if root in seen or tape.tensors[root].role != "activation" or not tape.tensors[root].bytes:
                continue
            seen.add(root)
            sizes.append(tape.tensors[root].bytes)
        if sizes:
            out.setdefault(section(i), []).append(OpSaves(op.rule, tuple(sorted(sizes, reverse=True))))
    out.setdefault(HEAD, []).append(OpSaves("loss", (tape.tensors[loss].bytes,)))
    return {k: tuple(v) for k, v in out.items()}


def recorded_ops(config: dict, setup: TrainSetup, seed: int = 0) -> OpTape:
    """The real forward's saves (`recorded_tape`) as op instances per section: storages grouped by
    the node that first keeps them, in the nodes' order."""
    out: OpTape = {}
    for section, saves in recorded_tape(config, setup, seed).items():
        groups: dict[int | str, list] = {}
        for s in saves:
            # the loss and any storage no node names stand alone, after every op of the section
            key = s.node if s.node >= 0 else f"{s.op} {len(groups)}"
            groups.setdefault(key, []).append(s)
        ordered = sorted(groups.values(), key=lambda g: (g[0].node < 0, g[0].node))
        out[section] = tuple(
            OpSaves(NODE_RULE.get(g[0].op.split(".")[0], g[0].op.split(".")[0]),
                    tuple(sorted((s.nbytes for s in g), reverse=True)))
            for g in ordered)
    return out


@dataclass(frozen=True)
class OpDiff:
    """One section where the sequences differ: each run of ops that differs, as (index of its first
    op on the engine's side, the engine's ops, the real ones), either side possibly empty."""

    section: str
    runs: tuple[tuple[int, tuple[OpSaves, ...], tuple[OpSaves, ...]], ...]

    @property
    def bytes(self) -> int:
        """engine - recorded over the differing ops, in bytes."""
        return sum(sum(o.sizes) for _, a, _ in self.runs for o in a) - \
            sum(sum(o.sizes) for _, _, b in self.runs for o in b)

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(f"op {i}: engine {' '.join(map(str, a)) or '-'} | real {' '.join(map(str, b)) or '-'}"
                     for i, a, b in self.runs)


def op_diff(engine: OpTape, recorded: OpTape) -> tuple[OpDiff, ...]:
    """Per section (the engine's order, then any it lacks), the runs of ops that differ (difflib's
    alignment of the two sequences: ops replaced, only the engine's, only the real model's)."""
    out = []
    for section in (*engine, *(s for s in recorded if s not in engine)):
        mine, theirs = engine.get(section, ()), recorded.get(section, ())
        if mine == theirs:
            continue
        codes = difflib.SequenceMatcher(a=mine, b=theirs, autojunk=False).get_opcodes()
        out.append(OpDiff(section, tuple((i1, mine[i1:i2], theirs[j1:j2])
                                         for tag, i1, i2, j1, j2 in codes if tag != "equal")))
    return tuple(out)


def compare_ops(config: dict, setup: TrainSetup, seed: int = 0) -> tuple[OpDiff, ...]:
    """The engine's op tape against the real model's, for `config` (a config.json dict) and `setup`."""
    return op_diff(engine_ops(config, setup), recorded_ops(config, setup, seed))
