"""PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) in its own right: what one GPU holds, moment by
moment, beyond the 1/N shards of weights, gradients and optimizer states.

The wrapping planned is the usual one: `fully_shard` on every decoder layer (a block), then on the
model (the root), which keeps what no block holds: the embeddings, the final norm and the head. From
PyTorch's source (`_fully_shard/_fsdp_param_group.py`, `_fsdp_state.py`, torch 2.13):

- the root is not resharded after forward (`reshard_after_forward=None` means False for the root):
  its parameters are whole from the start of forward to the end of backward;
- a block's parameters are all-gathered before its forward and, with `reshard_after_forward` on
  (the default), freed after it; in forward the all-gather's flat output is kept until the next
  block's has been copied out (to overlap copy-out and the next all-gather), and the last one until
  the root's forward ends, so the loss is computed beside one block's flat output;
- in backward a block's pre-backward hook gathers it again (unless it was never resharded) and
  prefetches the block before it: two blocks are whole at once;
- a block's gradients are whole until its post-backward hook reduce-scatters them; the
  reduce-scatter's input (a copy of them) is kept until the next block's post-backward (one buffer in
  flight, `reduce_scatter_max_input_buffers=1`), the last one until backward ends;
- the root's gradients (the tied head's, produced first in backward) are whole until the root's
  post-backward at the very end; the embedding's backward produces its gradient whole, and a tied
  head's gradient is then summed with it out of place (three copies at once);
- the root's all-gather output is kept beside its parameters until the first block is gathered,
  so the forward starts with the root twice and the first block twice (`start_phase`);
- with `reshard_after_forward` off, every block stays whole from its forward to its backward;
- `CPUOffloadPolicy` (`--offload optimizer+params`) keeps the shards of parameters, gradients and
  optimizer states in CPU memory; what is gathered, and the whole gradients, are still on the GPU.

Gathered parameters are at the weights' width, gradients at the gradients' (FSDP2's
`MixedPrecisionPolicy` with param and reduce dtypes equal to the convention's). QLoRA's NF4 weights
are gathered as stored: FSDP shards and gathers a 4-bit layer's packed codes (bitsandbytes'
`bnb_4bit_quant_storage` set to the 16-bit dtype, as FSDP requires), ceil(numel / 2) bytes, while its
quantisation state is a module attribute, never gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

from .architecture import layout
from .precision import Precision
from .spec import ModelSpec, TrainSetup
from .timeline import Phase, States


@dataclass(frozen=True)
class Units:
    """FSDP2's units for one setup: per block the bytes of its parameters as gathered (all of them,
    frozen ones too) and its trained gradient bytes by part (attention, MLP, the MLP's output
    projection); the root's parameter bytes and the gradient bytes produced at the head."""

    block_bytes: tuple[int, ...]
    block_grads: tuple[tuple[int, int, int], ...]
    root_bytes: int
    head_grads: int
    embedding_grads: int = 0  # the token embedding's gradient, when it is trained
    tied: bool = False  # the head is the token embedding
    root_grads: int = 0  # every trained root parameter's gradient (embeddings, norm, head)
    # FSDP1 (`--sharding fsdp1`): each unit one flat parameter of `itemsize`-byte elements, gathered
    # whole with its padding (`flat_param_numels`); no all-gather output beside it
    flat: bool = False
    itemsize: int = 2

    def gathered(self, nbytes: int, n: int) -> int:
        """A unit's bytes as all-gathered on `n` GPUs: FSDP2's as they are; FSDP1's flat parameter
        padded to a multiple of n elements."""
        if not self.flat:
            return nbytes
        return flat_param_numels(-(-nbytes // self.itemsize), n)[1] * self.itemsize


def flat_param_numels(numel: int, world: int) -> tuple[int, int]:
    """FSDP1's flat parameter of a wrapped unit of `numel` elements on `world` GPUs: (each GPU's
    shard, the unsharded flat parameter as all-gathered) = (ceil(numel / world), world x that).

    torch/distributed/fsdp/_flat_param.py: `FlatParamHandle` flattens the unit's parameters into one
    1-D tensor (with use_orig_params=False, no alignment padding between them) and `_get_shard`
    chunks it into `world` pieces of ceil(numel / world), padding the last; `_full_param_padded`,
    which the all-gather fills, holds world x that. Assumption: the unit's parameters share a dtype
    (FSDP1 requires it of a flat parameter)."""
    shard = -(-numel // world)
    return shard, shard * world


def _block_prefix(spec: ModelSpec) -> str:
    return "transformer.h." if spec.family == "gpt2" else "model.layers."


@lru_cache(maxsize=32)
def _model_blocks(spec: ModelSpec, task: str, num_labels: int) -> tuple[tuple[int, ...], int, int]:
    """The model's own parameters per decoder layer, the root's (every other parameter) and the
    token embedding's: the same for every method of a plan, so counted once."""
    arch = layout(spec, task, num_labels)
    prefix = _block_prefix(spec)
    blocks = [0] * spec.num_layers
    for m in arch.modules:
        if m.path.startswith(prefix):
            blocks[int(m.path[len(prefix):].split(".", 1)[0])] += m.numel
    root = arch.total_params - sum(m.numel for m in arch.modules if m.path.startswith(prefix))
    embedding = sum(m.numel for m in arch.modules if m.path.endswith(("wte", "embed_tokens")))
    return tuple(blocks), root, embedding


def nf4_gathered_saving(spec: ModelSpec, setup: TrainSetup, weight_bytes: int) -> tuple[tuple[int, ...], int]:
    """QLoRA: per block (and for the root) the bytes FSDP gathers less than it would at weight width,
    because each NF4 weight travels as its packed codes: numel x weight bytes - ceil(numel / 2)
    (torchao's NF4Tensor: less its sharded scalers too, `quant.nf4_gathered_bytes`)."""
    from .counts import lora_trainable
    from .quant import nf4_gathered_bytes, quantised_params, quantises_experts

    arch = layout(spec, setup.task, setup.num_labels)
    quantised = quantised_params(arch, lora_trainable(spec, setup), quantises_experts(spec, setup))
    prefix = _block_prefix(spec)
    blocks, root = [0] * spec.num_layers, 0
    for p in arch.params:
        if p.name in quantised:
            saving = p.numel * weight_bytes - nf4_gathered_bytes(setup.quant_backend, p.numel, weight_bytes)
            if p.name.startswith(prefix):
                blocks[int(p.name[len(prefix):].split(".", 1)[0])] += saving
            else:
                root += saving
    return tuple(blocks), root


@lru_cache(maxsize=32)
def units(spec: ModelSpec, setup: TrainSetup, precision: Precision, whole: States,
          flat: bool = False) -> Units:
    """Blocks are the decoder layers (`transformer.h.i`, `model.layers.i`), adapters included; the
    root is every other parameter. `whole` is the whole-model step's states (unsharded gradients).
    `flat`: FSDP1's flat parameters (`Units.flat`). Cached: the GPU-count search asks for the same
    setup's units at every count it tries."""
    arch = layout(spec, setup.task, setup.num_labels)
    blocks, root, embedding = _model_blocks(spec, setup.task, setup.num_labels)
    if setup.method != "full" and precision.grad_bytes:  # the adapters live in their blocks
        blocks = tuple(b + sum(g) // precision.grad_bytes
                       for b, g in zip(blocks, whole.layer_gradients, strict=True))
    trained = setup.method == "full"
    g = precision.grad_bytes if trained else 0
    w = precision.weight_bytes
    block_bytes, root_bytes = tuple(b * w for b in blocks), root * w
    if setup.method == "qlora":
        savings, root_saving = nf4_gathered_saving(spec, setup, w)
        block_bytes = tuple(b - s for b, s in zip(block_bytes, savings, strict=True))
        root_bytes -= root_saving
    return Units(block_bytes, whole.layer_gradients, root_bytes, whole.head_gradients,
                 embedding * g, arch.tied_head, root * g, flat, w)


def _share(value: int, n: int, offloaded: bool) -> int:
    return 0 if offloaded else math.ceil(value / n)


def extra_bytes(phase: Phase, u: Units, n: int, reshard_after_forward: bool,
                grads_offloaded: bool = False, describe: bool = True) -> tuple[int, str]:
    """Bytes FSDP2 holds at `phase` beyond the shards the timeline already counts, and what they are
    (left empty with `describe` off: the GPU-count search reads the bytes alone).

    forward (at the loss): the root whole + the last block's flat all-gather output (+ every block
    whole without resharding). Backward at the head: the root whole + the last block prefetched.
    Backward through layer i: the root whole + block i and the prefetched block i-1 whole (without
    resharding: blocks 0..i) + block i's gradients so far whole rather than a shard + the previous
    block's reduce-scatter input + the head's gradients whole. End of backward: the root whole + block
    0's reduce-scatter input + the head's gradients whole. Optimizer: nothing (all sharded).

    FSDP1 (`Units.flat`) all-gathers each unit straight into its padded flat parameter and frees it
    in its post-forward hook: at the loss only the root is whole (FULL_SHARD) or every unit
    (SHARD_GRAD_OP), with no all-gather output beside them; in backward as FSDP2 (BACKWARD_PRE
    prefetches the unit before), each unit at its padded size (`Units.gathered`)."""
    root = u.gathered(u.root_bytes, n)
    if u.flat:
        u = replace(u, block_bytes=tuple(u.gathered(b, n) for b in u.block_bytes))
    last = len(u.block_bytes) - 1
    if phase.name == "optimizer":
        return 0, ""
    if phase.name == "forward":
        output = 0 if u.flat else u.block_bytes[last]
        if reshard_after_forward:
            return root + output, "root whole" + ("" if u.flat else " + last block's all-gather output")
        return (root + sum(u.block_bytes) + output,
                "root and every block whole" + ("" if u.flat else " + last block's all-gather output"))
    if phase.part == "end":
        # The embedding's backward makes its gradient whole; tied to the head, it is added to the
        # head's gradient out of place (FSDP2 holds the unsharded gradient), three copies at once.
        # The timeline counts every gradient's shard and half the head's; before the root's
        # reduce-scatter its gradients are whole instead, with two more copies of a tied embedding's.
        copies = 2 * u.embedding_grads if u.tied else 0
        counted = _share(u.root_grads, n, grads_offloaded) + _share(u.head_grads, n, grads_offloaded) // 2
        return root + sum(u.block_grads[0]) + u.root_grads + copies - counted, \
            "root whole + block 0's reduce-scatter input + the root's gradients whole"
    if phase.part not in ("MLP", "attention"):  # backward at the head, before any block
        gathered = u.block_bytes[last] if reshard_after_forward else sum(u.block_bytes)
        return root + gathered, "root whole + last block prefetched"
    i, part = phase.layer, phase.part
    attn, mlp, out = u.block_grads[i]
    # what the timeline counts as produced by then: the output projection's gradient before the
    # MLP's backward, the whole layer's before the attention's
    produced = out if part == "MLP" else attn + mlp + out
    return block_extra(u, i, produced, n, reshard_after_forward, grads_offloaded, describe)


def block_extra(u: Units, i: int, produced: int, n: int, reshard_after_forward: bool,
                grads_offloaded: bool = False, describe: bool = True) -> tuple[int, str]:
    """`extra_bytes` inside decoder layer i's backward, once `produced` bytes of its gradients exist
    (counted by the timeline as a 1/N share): the root whole + block i and the prefetched block i-1
    gathered (without resharding: blocks 0..i) + those gradients whole rather than a share + block
    i+1's reduce-scatter input + the head's gradients whole rather than a share. Units as gathered
    (`Units.gathered`: FSDP1's padded)."""
    root = u.gathered(u.root_bytes, n)
    head = u.head_grads - _share(u.head_grads, n, grads_offloaded)
    if reshard_after_forward:
        gathered = sum(u.gathered(b, n) for b in u.block_bytes[max(i - 1, 0): i + 1])
    else:
        gathered = sum(u.gathered(b, n) for b in u.block_bytes[: i + 1])
    produced_whole = produced - _share(produced, n, grads_offloaded)
    held = sum(u.block_grads[i + 1]) if i < len(u.block_bytes) - 1 else 0
    extra = root + gathered + produced_whole + held + head
    if not describe:
        return extra, ""
    return (extra,
            f"root whole + blocks gathered {gathered:,} B + layer {i}'s gradients whole "
            f"+ reduce-scatter input {held:,} B + head gradients whole")


def start_phase(states: States, embedding: int, u: Units, n: int = 1) -> Phase:
    """The start of forward, which the timeline does not follow: the root's all-gather output is
    kept beside the root's parameters until the first layer has been gathered, so at the first
    layer's copy-out the GPU holds the root twice and the first layer twice, beside the shards and
    the inputs: 2 x root + 2 x first layer, as gathered. It sets the peak when the root (the
    embeddings and an untied head) is large beside the rest of the step. FSDP1 gathers into the
    flat parameters themselves: the root and the first layer once each, padded on `n` GPUs."""
    copies = 1 if u.flat else 2
    gathered = copies * (u.gathered(u.root_bytes, n) + u.gathered(u.block_bytes[0], n))
    base = states.weights + states.inputs + states.optimizer_states  # as the timeline's phases
    what = ("FSDP1 buffers (the root's and the first layer's flat parameters)" if u.flat else
            "FSDP2 buffers (the root's all-gather output and parameters, the first layer's)")
    return Phase("forward", base + embedding + gathered, f"start of forward; + {what} {gathered:,} B")


def phase_extras(phase: Phase, u: Units, n: int, reshard_after_forward: bool,
                 grads_offloaded: bool = False, describe: bool = True) -> Phase:
    """`phase` with FSDP2's buffers added (see `extra_bytes`), spelt out when `describe`."""
    extra, what = extra_bytes(phase, u, n, reshard_after_forward, grads_offloaded, describe)
    if not extra:
        return phase
    if not describe:
        return phase._replace(bytes=phase.bytes + extra)
    kind = "FSDP1" if u.flat else "FSDP2"
    return phase._replace(bytes=phase.bytes + extra,
                          text=f"{phase.what}; + {kind} buffers ({what}) {extra:,} B")
