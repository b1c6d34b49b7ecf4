"""The peak of a training step, followed phase by phase instead of summed.

The step planned is a steady-state one (the second and every later step): weights and optimizer
states (with any fp32 master copy) are live throughout, gradients from backward until the
optimizer has used them. On top of them each phase holds something else:

- forward, at the loss: every saved activation, the logits, their fp32 copy under 16-bit compute, the
  eager attention mask, autocast's cached 16-bit copies of trained weights that are not saved (all of
  them under checkpointing) and the final hidden state the model still holds;
- backward, at the head: every saved activation plus two fp32 (tokens x vocab) gradients, the loss's
  and log-softmax's;
- backward, layer by layer: what is still saved (checkpointing: the recomputed layer, and the
  recompute's own forward peak), less what the ops after the MLP's activation and after attention's
  core kept (used and freed first), the gradients produced so far, the layer's own transient
  gradients (`activations.layer_backward_transients`) and, for QLoRA, one dequantised weight;
- end of backward: all gradients, a tied embedding's two partial gradients being summed, and under
  checkpointing the embedding output PEFT makes a leaf, with its gradient;
- optimizer: gradients, states, and foreach AdamW's temporary (one tensor per trainable parameter, the
  square root of the second moment), the default on GPUs.

The largest of these is the allocator-level peak; the phase that sets it is reported. What the CUDA
caching allocator and the CUDA context add on a real GPU is a separate, documented allowance
(`device_overhead_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .activations import FP32, Profile

# Device-level allowance: CUDA context plus what the caching allocator reserves beyond what it hands
# out. The context of a CUDA 12 process with cuBLAS loaded takes roughly 500 MiB on Hopper; the
# allocator rounds blocks to 2 MiB segments and keeps freed blocks cached, which we allow as 5% of the
# allocator peak. Both are assumptions until the measurement harness has readings to fit them.
CUDA_CONTEXT_BYTES = 500 * 2**20
ALLOCATOR_SLACK = 0.05


@dataclass(frozen=True)
class States:
    weights: int  # parameters (+ buffers) live all the time
    gradients: int
    optimizer_states: int  # including fp32 master copies where the convention keeps them
    optimizer_temporary: int  # foreach AdamW's sqrt(v): trainable numel x state bytes
    inputs: int  # token ids and labels
    head_gradients: int  # gradients produced at the LM head (lm_head / tied embedding)
    # per decoder layer: (attention part, the rest of the MLP part, the MLP's output projection)
    layer_gradients: tuple[tuple[int, int, int], ...]
    # A trained embedding tied to the head: its gradient arrives twice (the head's, the lookup's)
    tied_embedding_gradients: int = 0
    # QLoRA: the 16-bit copy of the NF4 weight being multiplied (`quant.dequant_transient_bytes`)
    dequant_transient: int = 0


@dataclass(frozen=True)
class Phase:
    name: str
    bytes: int
    what: str


def step_phases(states: States, prof: Profile, vocab: int, tokens: int) -> tuple[Phase, ...]:
    """Live bytes at each moment of the step that can set the peak (see the module docstring)."""
    # A run takes many steps: from the second on, the optimizer's states (and fp32 master weights)
    # are live through forward and backward too. The steady-state step is the one planned.
    base = states.weights + states.inputs + states.optimizer_states
    acts = prof.total
    logits = prof.logits + prof.logits_fp32
    mask = 0 if prof.checkpointed else prof.eager_mask
    phases = [Phase("forward", base + acts + logits + mask + prof.autocast_cache + prof.final_hidden,
                     "weights + saved activations + logits at the loss (+ autocast's weight cache)")]
    head_grads = 2 * tokens * vocab * FP32
    phases.append(Phase("backward", base + acts + head_grads,
                        "weights + saved activations + two fp32 logits gradients"))
    grads = states.head_gradients
    saved_below = acts - prof.head
    n = len(prof.layers)
    resid, mlp, attn = prof.transients
    for i in reversed(range(n)):
        attn_grads, mlp_grads, out_grads = states.layer_gradients[i]
        grads += out_grads
        if prof.checkpointed:
            saved_below -= prof.layer_inputs[i]
            live = saved_below + prof.layers[i] + prof.layer_inputs[i] - prof.input_saved_by_layer[i]
            if prof.recompute_peaks and prof.recompute_peaks[i]:
                held = (saved_below + prof.layer_inputs[i] - prof.input_saved_by_layer[i]
                        + prof.recompute_peaks[i])
                phases.append(Phase("backward", base + held + grads + resid,
                                    f"recomputing layer {i}'s forward"))
        else:
            live = saved_below
            saved_below -= prof.layers[i]
        # the MLP's backward runs first, with the whole layer still saved; by the attention's, the
        # MLP's saved tensors are gone
        tail = prof.mlp_tails[i] if prof.mlp_tails else 0
        dq = states.dequant_transient
        phases.append(Phase("backward", base + live - tail + grads + resid + mlp + dq,
                            f"backward through layer {i}'s MLP"))
        grads += mlp_grads + attn_grads
        attn_tail = prof.attn_tails[i] if prof.attn_tails else 0
        phases.append(Phase("backward",
                            base + live - prof.mlp_layers[i] - attn_tail + grads + resid + attn + dq,
                            f"backward through layer {i}'s attention"))
    leaf = 2 * prof.input_leaf  # the embedding output made a leaf, and its gradient
    phases.append(Phase("backward", base + states.gradients + end_of_backward_extra(states) + leaf,
                        "end of backward: weights + optimizer states + all gradients"))
    phases.append(Phase("optimizer",
                        base + states.gradients + states.optimizer_temporary + leaf,
                        "weights + gradients + optimizer states (and any fp32 master weights) + "
                        "foreach temporary"))
    return tuple(phases)


def end_of_backward_extra(states: States) -> int:
    """What the last backward op holds beyond the finished gradients.

    A tied embedding's two gradients, the head's (kept by autograd since the start of backward)
    and the lookup's (embedding_dense_backward), are both alive while they are summed into the one
    `.grad`: 2 x the embedding's gradient bytes on top of the gradients. Untied, the lookup's
    gradient becomes `.grad` itself and nothing is added.
    """
    return 2 * states.tied_embedding_gradients


def peak_phase(phases: tuple[Phase, ...]) -> Phase:
    return max(phases, key=lambda p: p.bytes)


def device_overhead_bytes(allocator_peak: int) -> int:
    """CUDA context plus caching-allocator slack above the allocator-level peak (an allowance)."""
    return CUDA_CONTEXT_BYTES + int(allocator_peak * ALLOCATOR_SLACK)
