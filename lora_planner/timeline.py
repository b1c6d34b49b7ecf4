"""The peak of a training step, followed phase by phase instead of summed.

The step planned is a steady-state one (the second and every later step): weights and optimizer
states (with any fp32 master copy) are live throughout, gradients from backward until the
optimizer has used them. On top of them each phase holds something else:

- forward, at the loss: every saved activation, the logits, their fp32 copy under 16-bit compute,
  autocast's cached 16-bit copies of trained weights that are not saved (all of them under
  checkpointing) and the final hidden state the model still holds (the decoder's attention masks
  are freed when it returns, before the head);
- forward, inside a layer (no checkpointing): the largest of its ops' moments (`Graph.moment`):
  everything saved so far and what the code holds unsaved there;
- backward, at the head: every saved activation plus two fp32 (tokens x vocab) gradients, the loss's
  and log-softmax's;
- backward, layer by layer: what is still saved (checkpointing: the recomputed layer, and the
  recompute's own forward peak, with the gradients that wait for it), less what the ops after the
  MLP's activation and after attention's core kept (used and freed first), the gradients produced
  so far, the layer's own transient gradients (`activations.layer_backward_transients`); for QLoRA,
  one dequantised weight at the moments a 4-bit matmul's backward runs, not on the MLP's activation
  backward: the down projection's (`quant.down_backward_bytes`; before a checkpointed layer's
  recompute when it and the ops after it keep nothing), the gated MLP's up projection's
  (`Profile.up_dequant_backward`) and attention's; an expert block's combine backward, before the
  down projection's weight gradient exists (`activations.moe_combine_backward`; recomputed:
  `moe_recompute_combine`);
  a LoRA up projection's input gradient in a narrow MLP, and a LoRA attention output projection's
  (`activations.lora_input_gradient_sum`);
  the math SDPA kernel's probs @ v backward (`activations.value_product_backward`);
  a recomputed expert block's un-sort backward (`Graph.unsort`) and
  Gemma-2's post-feedforward and post-attention norms (`activations.rms_norm_backward`), whose
  backward runs while the block before them is still saved; the norm before the MLP, once the MLP's
  saved tensors are gone (`activations.pre_mlp_norm_backward`); at the attention core only the
  output projection's gradient exists (`States.attn_out_gradients`). A recomputed dense layer peaks
  at its attention kernel's end or where its recompute stops (`activations.math_attention_internals`,
  `recompute_stop_transient`), with the gradients that wait for it (`mlp_output_pending`);
- end of backward: all gradients, the trained embedding's backward (`step.embedding_backward`: a
  tied embedding's two partial gradients being summed, or an untied one's incoming gradient), and
  under checkpointing the embedding output PEFT makes a leaf, with its gradient;
- optimizer: gradients, states, and the optimizer kernel's temporary (foreach AdamW: one tensor per
  trainable parameter, the square root of the second moment; fused: none; see `optimizers`).
- with the optimizer stepped in backward (torchtune's `optimizer_in_bwd`, `States.in_backward`): no
  gradient is kept and there is no optimizer phase; instead each layer's backward holds, at the
  moment its largest tensor of each part is stepped, that tensor's gradient and its optimizer's
  temporary beside what that part of the layer has not yet freed, and so do the head's and the
  embeddings' steps.
- a step planned on CPU under checkpointing: the RNG state each checkpointed layer saved, alive until
  its backward is done, and one more during a recompute (`checkpoint_rng_states`); made outside every
  op, so an op-level tracer does not count them (`Phase.untraced`, `tracer_peak`).

The largest of these is the allocator-level peak; the phase that sets it is reported. What the CUDA
caching allocator and the CUDA context add on a real GPU is a separate, documented allowance
(`device_overhead_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .activations import FP32, Profile


@dataclass(frozen=True)
class States:
    weights: int  # parameters (+ buffers) live all the time
    gradients: int
    optimizer_states: int  # including fp32 master copies where the convention keeps them
    optimizer_temporary: int  # the optimizer step's temporary (`optimizers.optimizer_temporary_bytes`)
    inputs: int  # token ids and labels
    head_gradients: int  # gradients produced at the LM head (lm_head / tied embedding)
    # per decoder layer: (attention part, the rest of the MLP part, the MLP's output projection)
    layer_gradients: tuple[tuple[int, int, int], ...]
    temporary_what: str = "foreach temporary"  # which implementation makes `optimizer_temporary`
    # beyond all gradients as backward ends: the trained embedding's backward (`step.embedding_backward`)
    embedding_backward: int = 0
    # QLoRA: what dequantising the NF4 weight being multiplied holds (`quant.dequant_transient`)
    dequant_transient: int = 0
    # QLoRA, per decoder layer: the MLP's down projection's 4-bit backward (`quant.down_backward_bytes`)
    dequant_backward: tuple[int, ...] = ()
    # per decoder layer: the fused experts' gate/up gradient, made before the rest of the MLP part's
    expert_up_gradients: tuple[int, ...] = ()
    # per decoder layer: the attention output projection's part of the attention gradients, the only
    # one made when the attention core's backward runs (() or a larger value: all of them counted)
    attn_out_gradients: tuple[int, ...] = ()
    # per layer: the up projection's part of the MLP's gradients (made before its input gradient)
    mlp_up_gradients: tuple[int, ...] = ()
    # the optimizer stepped in backward (`step.in_backward_steps`): per decoder layer, the most one of
    # its tensors holds while stepped (its gradient and the step's temporary), by part (the MLP's output
    # projection, the rest of the MLP, attention's output projection, the rest of attention); the same
    # for the head and final norm, and for the embeddings; () when the optimizer steps after backward
    in_backward: tuple[tuple[int, int, int, int], ...] = ()
    in_backward_head: int = 0
    in_backward_embedding: int = 0


# what every backward moment holds besides its own transients
SO_FAR = "weights + optimizer states + saved activations left + gradients so far"
# a moment inside decoder layer {} (`Phase.text`)
_THROUGH = SO_FAR + ", backward through layer {}'s "
_RECOMPUTING = SO_FAR + ", recomputing layer {}'s forward"


class Phase(NamedTuple):
    """One moment of the step: its part (forward, backward, optimizer), live bytes and what they are.
    A named tuple, not a frozen dataclass: the fewest-GPU search builds tens of thousands of them,
    and reads their bytes alone; so a moment inside a decoder layer keeps its description as a
    template (`text`, "{}" for the layer) and `what` spells it out only when asked.

    `layer`: the decoder layer the moment is inside (-1: none); `part`: "MLP" or "attention" for the
    backward through that part of the layer (FSDP2's buffers depend on it), "end" for the end of
    backward, else empty. `untraced`: the part of `bytes` made outside every op (checkpointing's CPU
    RNG states, `checkpoint_rng_states`), which an allocator counts and an op-level tracer cannot.
    """

    name: str
    bytes: int
    text: str
    layer: int = -1
    part: str = ""
    untraced: int = 0

    @property
    def what(self) -> str:
        return self.text.format(self.layer) if self.layer >= 0 else self.text


def step_phases(states: States, prof: Profile, vocab: int, tokens: int) -> tuple[Phase, ...]:
    """Live bytes at each moment of the step that can set the peak (see the module docstring)."""
    # A run takes many steps: from the second on, the optimizer's states (and fp32 master weights)
    # are live through forward and backward too. The steady-state step is the one planned.
    base = states.weights + states.inputs + states.optimizer_states
    acts = prof.total
    logits = prof.logits + prof.logits_fp32
    phases = [Phase("forward", base + acts + logits + prof.autocast_cache + prof.final_hidden,
                     "weights + optimizer states + saved activations + logits at the loss (+ autocast's "
                     "weight cache)")]
    if prof.forward_live:
        phases.append(Phase("forward", base + prof.forward_live,
                            "weights + optimizer states + activations saved so far + the tensors one "
                            "op inside a layer's forward holds"))
    head_grads = 2 * tokens * vocab * FP32 if prof.head_backward is None else prof.head_backward
    phases.append(Phase("backward", base + acts + head_grads,
                        "weights + optimizer states + saved activations + two fp32 logits gradients"
                        if prof.head_backward is None else "weights + optimizer states + saved "
                        "activations + the head's "
                        "backward (chunked or fused loss)"))
    if prof.norm_backward:
        phases.append(Phase("backward", base + acts - prof.head + prof.final_norm + states.head_gradients
                            + prof.norm_backward - prof.final_norm_freed,
                            f"{SO_FAR}, backward through the final norm"))
    grads = states.head_gradients
    saved_below = acts - prof.head
    n = len(prof.layers)
    resid, mlp, attn = prof.transients
    for i in reversed(range(n)):
        attn_grads, mlp_grads, out_grads = states.layer_gradients[i]
        # a checkpointed layer is recomputed when backward first needs one of its saved tensors:
        # before its output projection's gradient exists
        pending = prof.recompute_pending[i] if prof.recompute_pending else 0
        if prof.checkpointed_at(i):
            saved_below -= prof.held_after_forward(i)
            # op-level selective checkpointing: the recompute takes each cached op output back as it
            # reaches its op (those no op saves are alive until then, in `recompute_peaks`); those it
            # stops before stay alive through the layer's backward
            # before its recompute: the layer's input, kept by the checkpoint, and what lies below
            unrecomputed = saved_below + prof.layer_inputs[i] - prof.input_saved_by_layer[i]
            live = (unrecomputed + prof.layers[i]
                    + (prof.sac_unconsumed[i] if prof.sac_unconsumed else 0))
            if prof.offloaded:  # on the GPU: this layer's input and the next one's, prefetched
                live += prof.embedding + prof.checkpoint_args + (prof.layer_inputs[i - 1] if i else 0) \
                    - saved_below
            if prof.recompute_peaks and prof.recompute_peaks[i]:
                held = (saved_below + prof.layer_inputs[i] - prof.input_saved_by_layer[i]
                        + prof.recompute_peaks[i])
                phases.append(Phase("backward", base + held + grads + resid + pending,
                                    _RECOMPUTING, i))
            if prof.recompute_unsort and prof.recompute_unsort[i]:
                held = (saved_below + prof.layer_inputs[i] - prof.input_saved_by_layer[i]
                        + prof.recompute_unsort[i])
                phases.append(Phase("backward", base + held + grads + resid + pending,
                                    _THROUGH + "expert un-sort", i))
            if prof.recompute_combine and prof.recompute_combine[i]:
                # the combine's backward after it: the incoming gradient (`pending`) is used up
                held = (saved_below + prof.layer_inputs[i] - prof.input_saved_by_layer[i]
                        + prof.recompute_combine[i])
                phases.append(Phase("backward", base + held + grads + resid,
                                    _THROUGH + "expert combine", i))
        else:
            live = unrecomputed = saved_below
            saved_below -= prof.held_after_forward(i)
        if prof.dora_backward and prof.dora_backward[i]:
            phases.append(Phase("backward", base + live + grads + resid + prof.dora_backward[i],
                                _THROUGH + "DoRA's magnitude scaling", i))
        if prof.post_norm_transient:
            phases.append(Phase("backward", base + live + grads + resid + prof.post_norm_transient,
                                _THROUGH + "post-feedforward norm", i))
        if prof.expert_combine and prof.expert_combine[i]:
            # an expert block's combine backward, before the down projection's weight gradient exists
            phases.append(Phase("backward", base + live + grads + resid + prof.expert_combine[i],
                                _THROUGH + "expert combine", i))
        grads += out_grads
        # the MLP's backward runs first, with the whole layer still saved; by the attention's, the
        # MLP's saved tensors are gone
        tail = prof.mlp_tails[i] if prof.mlp_tails else 0
        dq = states.dequant_transient
        mlp_held = (prof.mlp_transients[i] if prof.mlp_transients else mlp) - tail  # beyond the saved
        if prof.expert_backward and prof.expert_backward[i]:
            # LoRA on fused experts (PEFT's ParamWrapper): a merged weight's full gradient, when larger
            # (`merged_weight_backward` counts what is freed by then itself)
            mlp_held = max(mlp_held, prof.expert_backward[i])
        phases.append(Phase("backward", base + live + grads + resid + mlp_held,
                            _THROUGH + "MLP", i, "MLP"))
        if states.dequant_backward:
            # the down projection's backward runs first, what it and the ops after it kept (the tail)
            # still alive; when they kept nothing it needs no saved tensor, so a checkpointed layer
            # is not recomputed yet
            held = unrecomputed if not tail and not prof.offloaded else live
            phases.append(Phase("backward", base + held + grads + resid + states.dequant_backward[i],
                                _THROUGH + "MLP's 4-bit down projection", i, "MLP"))
        if states.in_backward:
            # a weight's step in its gradient's hook, beside the incoming gradient and the input
            # gradient the same node made: the MLP's output projection's with its input used (the
            # MLP's tail freed), the rest of the MLP's once the MLP's saved tensors are gone, and
            # attention's once attention's tail is gone too (autograd frees a node's saved tensors
            # as it runs, before the weight's gradient is accumulated and its hook runs)
            out_step, mlp_step, attn_out_step, attn_step = states.in_backward[i]
            tail = prof.mlp_tails[i] if prof.mlp_tails else 0
            attn_tail = prof.attn_tails[i] if prof.attn_tails else 0
            held = base + grads + 2 * resid
            for freed, step, where in ((tail, out_step, "MLP output projection"),
                                       (prof.mlp_layers[i], mlp_step, "MLP"),
                                       (prof.mlp_layers[i] + attn_tail, max(attn_out_step, attn_step),
                                        "attention")):
                if step:
                    phases.append(Phase("backward", held + live - freed + step,
                                        _THROUGH + where + ", one tensor stepped in backward", i,
                                        "attention" if where == "attention" else "MLP"))
        if prof.up_input_backward and prof.up_input_backward[i][1]:
            freed, held = prof.up_input_backward[i]
            up = states.mlp_up_gradients[i] if states.mlp_up_gradients else 0
            phases.append(Phase("backward", base + live - tail - freed + grads + up + resid + held,
                                _THROUGH + "MLP at the up projection's input gradient", i, "MLP"))
        if prof.up_dequant_backward and prof.up_dequant_backward[i][1]:
            freed, held = prof.up_dequant_backward[i]
            up = states.mlp_up_gradients[i] if states.mlp_up_gradients else 0
            phases.append(Phase("backward", base + live - tail - freed + grads + up + resid + held + dq,
                                _THROUGH + "MLP's 4-bit up projection", i, "MLP"))
        if prof.post_norm_transient:
            phases.append(Phase("backward", base + live - prof.mlp_layers[i] + grads + mlp_grads + resid
                                + prof.post_norm_transient,
                                _THROUGH + "post-attention norm", i))
        if prof.expert_up_backward and prof.expert_up_backward[i][1]:
            freed, held = prof.expert_up_backward[i]
            up = states.expert_up_gradients[i] if states.expert_up_gradients else 0
            phases.append(Phase("backward", base + live - tail - freed + grads + up + resid + held,
                                _THROUGH + "expert gate/up projection", i))
        # the norm before the MLP, once the MLP's other saved tensors are gone (`pre_mlp_norm_backward`)
        norm_backward = prof.mlp_norm_backward[i] if prof.mlp_norm_backward else 0
        if norm_backward:
            phases.append(Phase("backward", base + live - prof.mlp_layers[i] + grads + mlp_grads + resid
                                + norm_backward,
                                _THROUGH + "norm before the MLP", i))
        grads += mlp_grads + attn_grads + (prof.dora_weight_grads[i] if prof.dora_weight_grads else 0)
        attn_tail = prof.attn_tails[i] if prof.attn_tails else 0
        # the query, key and value projections' gradients come after the attention core's backward
        later = max(attn_grads - states.attn_out_gradients[i], 0) if states.attn_out_gradients else 0
        # the residual's gradient waits through attention's backward for the layer's input, unless
        # that input needs none: then the add hands its one gradient to the attention branch alone
        skip = resid if not prof.layer_input_grads or prof.layer_input_grads[i] else 0
        core = base + live - prof.mlp_layers[i] - attn_tail + grads - later + skip + dq
        mixer = prof.mixer_backward[i] if prof.mixer_backward else None
        phases.append(Phase("backward", core + (attn if mixer is None else mixer), _THROUGH + (
            "attention" if mixer is None else "linear attention's chunked delta rule"), i, "attention"))
        if prof.out_input_backward and prof.out_input_backward[i]:
            phases.append(Phase("backward", core + prof.out_input_backward[i],
                                _THROUGH + "attention output projection's input gradient", i, "attention"))
        if prof.value_product_backward and prof.value_product_backward[i]:
            phases.append(Phase("backward", core + prof.value_product_backward[i],
                                _THROUGH + "attention probabilities @ v", i,
                                "attention"))
        saved_below -= prof.args_freed[i] if prof.args_freed else 0
    leaf = 2 * prof.input_leaf  # the embedding output made a leaf, and its gradient
    if states.in_backward:
        # the head's (or final norm's) step: the head's saved tensors used, its input gradient made;
        # the embedding's: at the end, beside what the embedding's backward holds
        phases.append(Phase("backward", base + acts - prof.head + resid + states.head_gradients
                            + states.in_backward_head,
                            "weights + optimizer states + saved activations below the head + the head's "
                            "input gradient + its weight's gradient, stepped in backward"))
        phases.append(Phase("backward",
                            base + states.embedding_backward + leaf + states.in_backward_embedding,
                            "end of backward: weights + optimizer states + the embedding's backward + "
                            "its gradient, stepped in backward", part="end"))
    phases.append(Phase("backward", base + states.gradients + states.embedding_backward + leaf,
                        "end of backward: weights + optimizer states + all gradients + the embedding's "
                        "backward", part="end"))
    phases.append(Phase("optimizer",
                        base + states.gradients + states.optimizer_temporary + leaf,
                        "weights + gradients + optimizer states (and any fp32 master weights) + "
                        f"{states.temporary_what}"))
    ckpt = tuple(prof.checkpointed_at(i) for i in range(n))
    return checkpoint_rng_states(tuple(phases), prof.rng_state, ckpt)


def rng_states_live(phase: Phase, ckpt: tuple[bool, ...]) -> int:
    """How many of checkpointing's saved RNG states are alive at `phase`
    (`activations.checkpoint_rng_state_bytes`): forward saves one per checkpointed layer (`ckpt`),
    kept until that layer's backward is done, so all of them through the forward's end and the
    backward above the layers, those of the checkpointed layers 0..i inside layer i's backward, and
    one more while layer i is recomputed (fork_rng's copy of the current state); none once backward
    has finished."""
    if phase.name == "optimizer" or phase.part == "end":
        return 0
    if phase.layer < 0:
        return sum(ckpt)
    return sum(ckpt[:phase.layer + 1]) + (phase.text == _RECOMPUTING)


def checkpoint_rng_states(phases: tuple[Phase, ...], state: int, ckpt: tuple[bool, ...]) -> tuple[Phase, ...]:
    """Each moment with the checkpointed layers' CPU RNG states alive then (`rng_states_live` x
    `state` bytes) added, as bytes made outside every op (`Phase.untraced`); unchanged when `state` is
    0 (no checkpointing, or a GPU, where the states are not device memory)."""
    if not state:
        return phases
    out = []
    for p in phases:
        count = rng_states_live(p, ckpt)
        out.append(p._replace(bytes=p.bytes + count * state, untraced=count * state,
                              text=f"{p.text} + checkpointing's saved CPU RNG states ({count} x "
                                   f"{state:,} B)") if count else p)
    return tuple(out)


def tracer_peak(phases: tuple[Phase, ...]) -> Phase:
    """The peak over what an op-level tracer counts: each moment less its `untraced` bytes."""
    return max((p._replace(bytes=p.bytes - p.untraced, untraced=0) for p in phases), key=lambda p: p.bytes)


def peak_phase(phases: tuple[Phase, ...]) -> Phase:
    return max(phases, key=lambda p: p.bytes)


def device_overhead_bytes(allocator_peak: int, gpu_name: str | None = None) -> int:
    """The device allowance above the allocator-level peak (`allowance.allowance`, term by term)."""
    from .allowance import allowance

    return allowance(allocator_peak, gpu_name).total
