"""One training step of a setup, predicted: activations and the phase-by-phase peak.

This joins the pieces: which modules train (full fine-tuning: all; LoRA: the adapters, trainable
biases and modules_to_save), the activation profile of the forward (`activations`), and the model
states the plan already computed, into the `timeline` of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from .activations import FP32, INT64, Conditions, Profile, profile
from .adapter_dtype import FP32_ADAPTERS, adapter_autocast, fp32_adapters
from .architecture import Architecture, layout
from .counts import lora_trainable, training_key
from .errors import PlanError
from .memory import Term, adafactor_temporary_term, dequant_term, optimizer_temporary_term
from .optimizers import TORCH_OPTIMIZERS
from .precision import Precision
from .quant import check_quant, down_backward_bytes, quantised_numels, quantised_params, quantises_experts
from .spec import ModelSpec, TrainSetup
from .stacks import get_stack
from .timeline import Phase, States, peak_phase, step_phases

# Modules of a decoder layer whose backward runs before attention's: the MLP and the norms around it.
MLP_PART = ("mlp", "feed_forward", "ln_2", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm")
# ...of which the output projection's gradient comes first, before the MLP's backward peak.
# (LoRA on fused experts: PEFT's ParamWrapper on the down weight, its A and B made by baddbmm's backward
# right after the down grouped matmul's)
MLP_OUTPUT = ("mlp.down_proj", "mlp.c_proj", "mlp.experts.down_proj", "feed_forward.down_proj",
              "feed_forward.experts.down_proj")
# the token and position embeddings' modules (their gradients are made last in backward)
EMBEDDINGS = ("wte", "wpe", "embed_tokens")
# the attention's output projection: its gradient is made before the attention core's backward, the
# query, key and value projections' after it (Qwen3-Next's gated DeltaNet: its output projection's and
# its gated norm's, both run after the delta rule)
ATTN_OUTPUT = ("self_attn.o_proj", "attn.c_proj", "linear_attn.out_proj", "linear_attn.norm")


@dataclass(frozen=True)
class StepPrediction:
    """One step predicted: the forward's activation profile, the states, the phases and the peak."""

    profile: Profile
    states: States
    phases: tuple[Phase, ...]
    peak: Phase
    temporary: Term | None = None  # the optimizer step's temporary, for --explain
    dequant: Term | None = None  # QLoRA: one 4-bit weight's dequantisation transient, for --explain

    @property
    def activations(self) -> int:
        return self.profile.total


@lru_cache(maxsize=64)
def conditions(setup: TrainSetup, precision: Precision, device: str = "cuda") -> Conditions:
    """What the activation walk needs from a setup: shape, dtypes, attention, checkpointing.
    Cached: the GPU-count search asks for the same setup's at every count it tries."""
    if (setup.loss or "standard") != "standard" and setup.task != "causal-lm":
        raise PlanError(f"--loss {setup.loss} replaces the LM head's loss: it needs --task causal-lm")
    if setup.activation_offload and not setup.grad_checkpointing:
        raise PlanError("--activation-offload moves the checkpointed layer inputs to CPU memory: "
                        "it needs --grad-checkpointing")
    if setup.checkpoint_every < 1:
        raise PlanError(f"--checkpoint-every must be at least 1, got {setup.checkpoint_every}")
    if setup.checkpoint_every > 1 and not setup.grad_checkpointing:
        raise PlanError("--checkpoint-every K checkpoints every K-th layer: it needs checkpointing on "
                        "(drop --no-grad-checkpointing)")
    if setup.checkpoint_ops and not setup.grad_checkpointing:
        raise PlanError("--checkpoint-ops chooses what checkpointed layers keep: it needs checkpointing "
                        "on (drop --no-grad-checkpointing)")
    if setup.checkpoint_ops and setup.method != "full":
        raise PlanError("--checkpoint-ops (torchtitan's op-level selective checkpointing) is planned "
                        "for --method full, as torchtitan trains")
    if (setup.checkpoint_every > 1 or setup.checkpoint_ops) and setup.activation_offload:
        raise PlanError("--activation-offload is planned with every layer checkpointed to its input: "
                        "drop --checkpoint-every / --checkpoint-ops or the offload")
    if setup.batch_size < 1 or setup.seq_len < 1:
        raise PlanError(f"batch size and sequence length must be positive, got {setup.batch_size} "
                        f"and {setup.seq_len}")
    if setup.optimizer_in_backward and (setup.num_gpus or 1) > 1:
        raise PlanError("--optimizer-in-backward is planned on one GPU (torchtune's single-device "
                        "recipes); drop --num-gpus")
    fp32 = fp32_adapters(setup.method, precision, setup.adapter_dtype)
    # packed: the batch's sequences are one row of every token, attended under a block-diagonal mask
    # (one sequence is no packing: transformers finds no document boundary and runs causal)
    packed = setup.packing and setup.batch_size > 1
    batch, seq = (1, setup.batch_size * setup.seq_len) if packed else (setup.batch_size, setup.seq_len)
    return Conditions(
        adapter_bytes=FP32 if fp32 else 0, adapter_autocast=fp32 and adapter_autocast(precision),
        packed=packed, batch_size=batch, seq_len=seq, weight_bytes=precision.weight_bytes,
        autocast=precision.name == "amp", attention=setup.attention,
        grad_checkpointing=setup.grad_checkpointing, device=device,
        checkpoint_every=setup.checkpoint_every, checkpoint_offset=get_stack(setup.stack).checkpoint_offset,
        checkpoint_ops=setup.checkpoint_ops,
        dropout=setup.dropout, lora_dropout=setup.lora_dropout,
        loss=setup.loss or "standard", loss_chunks=setup.loss_chunks or 8,
        activation_offload=bool(setup.activation_offload),
        dora=setup.use_dora and setup.method == "lora",
        compile=setup.compile or "none",
        **qlora_conditions(setup, precision),
    )


def qlora_conditions(setup: TrainSetup, precision: Precision) -> dict:
    """The activation walk's QLoRA fields: which layers are 4-bit, and what their matmul keeps of its
    input (`quant.check_quant`); none for LoRA and full fine-tuning."""
    if setup.method != "qlora":
        return {}
    _, _, saved = check_quant(setup.quant_backend, setup.bnb_version, setup.bnb_compute_dtype,
                              precision.weight_bytes)
    return {"quantised_base": True, "nf4_saved_input": saved,
            "nf4_output_in_input_dtype": (setup.quant_backend or "bnb") == "bnb"}


def _training(spec: ModelSpec, setup: TrainSetup,
              arch: Architecture) -> tuple[dict[str, int], set[str], dict[str, int]]:
    """Wrapped modules (path -> rank), modules whose weights train (and the names of biases that
    train without their module's weight, PEFT's `bias`), and trainable numel by path."""
    if setup.method == "full":
        return {}, {m.path for m in arch.modules}, {m.path: m.numel for m in arch.modules}
    trainable = lora_trainable(spec, setup)
    wrapped = {a.module.path: setup.rank for a in trainable.adapters}
    by_path = {a.module.path: a.numel for a in trainable.adapters}
    saved = {m.path for m in trainable.saved_modules} | {p.name for p in trainable.biases}
    for m in trainable.saved_modules:
        by_path[m.path] = by_path.get(m.path, 0) + m.numel
    for p in trainable.biases:
        path = p.name.rsplit(".", 1)[0]
        by_path[path] = by_path.get(path, 0) + p.numel
    return wrapped, saved, by_path


def _experts_down_numel(arch: Architecture, path: str, numel: int) -> int:
    """The fused experts' down projection, when all of an expert block trains: its gradient comes
    first in the block's backward, like a dense MLP's output projection (0 for any other module)."""
    module = arch.experts.get(path)
    if module is None or numel != module.numel:
        return 0
    return sum(p.numel for p in module.params if p.name.endswith(".down_proj"))


def embedding_backward(trains: bool, tied: bool, head_gradients: int, incoming: int) -> int:
    """Bytes beyond all gradients as backward ends, in the trained token embedding's backward.

    Untied: `embedding_dense_backward` writes the weight's gradient while the incoming (tokens x
    hidden) gradient is alive: + incoming. Tied to the LM head: the head's gradient waits in
    autograd's input buffer until the embedding's arrives, and the two are summed into a third
    tensor (the `.grad`): + 2 x the head's gradient bytes. Nothing when the embedding is frozen.
    """
    if not trains:
        return 0
    return 2 * head_gradients if tied else incoming


def gradient_bytes_by_path(spec: ModelSpec, setup: TrainSetup, precision: Precision,
                           by_path: dict[str, int]) -> dict[str, int]:
    """Gradient bytes of each trained module: numel x the precision's gradient bytes, except that
    fp32 adapters over a 16-bit base (`adapter_dtype`) have 4-byte gradients (a wrapped layer's own
    trained bias keeps the base's width)."""
    widths = {path: numel * precision.grad_bytes for path, numel in by_path.items()}
    if fp32_adapters(setup.method, precision, setup.adapter_dtype):
        for a in lora_trainable(spec, setup).adapters:
            widths[a.module.path] += a.numel * (FP32_ADAPTERS.grad_bytes - precision.grad_bytes)
    return widths


def _temporary(spec: ModelSpec, setup: TrainSetup, arch: Architecture, precision: Precision,
               impl: str) -> Term:
    """The optimizer step's temporary. With fp32 adapters over a 16-bit base the adapters and any
    other trained tensors (biases, modules_to_save) differ in dtype; torch's optimizers step each
    dtype's tensors as a group, one group after the other, so the larger group's temporary is the one."""
    def of(shapes: tuple[tuple[int, ...], ...], convention: Precision) -> Term:
        if setup.optimizer == "adafactor":
            return adafactor_temporary_term(shapes, convention)
        return optimizer_temporary_term(setup.optimizer, impl, tuple(_numel(s) for s in shapes),
                                        convention.state_bytes)

    if not fp32_adapters(setup.method, precision, setup.adapter_dtype):
        if setup.optimizer == "adafactor":
            return adafactor_temporary_term(_trainable_shapes(spec, setup, arch), precision)
        return optimizer_temporary_term(setup.optimizer, impl, _trainable_numels(spec, setup, arch),
                                        precision.state_bytes)
    shapes = _trainable_shapes(spec, setup, arch)
    adapters = tuple(p.shape for a in lora_trainable(spec, setup).adapters for p in a.params)
    rest = shapes[len(adapters):]  # `Trainable.params`: the adapters' tensors first
    groups = [of(adapters, FP32_ADAPTERS)] + ([of(rest, precision)] if rest else [])
    return max(groups, key=lambda t: t.bytes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _trainable_numels(spec: ModelSpec, setup: TrainSetup, arch: Architecture) -> tuple[int, ...]:
    """Element counts of the trainable tensors, one per tensor (what the optimizer loops over)."""
    if setup.method == "full":
        return tuple(p.numel for p in arch.params)
    return tuple(p.numel for p in lora_trainable(spec, setup).params)


def _trainable_shapes(spec: ModelSpec, setup: TrainSetup, arch: Architecture) -> tuple[tuple[int, ...], ...]:
    """Shapes of the trainable tensors, in the order the optimizer goes through them."""
    if setup.method == "full":
        return tuple(p.shape for p in arch.params)
    return tuple(p.shape for p in lora_trainable(spec, setup).params)


@dataclass(frozen=True)
class LayerGradients:
    """Where the trained tensors' gradients are made, in the order backward makes them (bytes)."""

    # per decoder layer: (attention part, rest of the MLP part, the MLP's output projection)
    per_layer: tuple[tuple[int, int, int], ...]
    expert_up: tuple[int, ...]  # per layer: fused experts' gate/up, twice the down projection's
    attn_out: tuple[int, ...]  # per layer: the attention's output projection's
    mlp_up: tuple[int, ...]  # per layer: the MLP's up projection's
    head: int  # the LM head's (the tied embedding's, when the embedding trains)
    embed_trains: bool  # whether the token (or position) embedding trains


@lru_cache(maxsize=64)
def layer_gradients(spec: ModelSpec, setup: TrainSetup, precision: Precision) -> LayerGradients:
    """Each trained module's gradient bytes (`gradient_bytes_by_path`), summed by the part of the
    step whose backward makes it. Depends on what trains and its dtypes alone: `predict_step` asks
    with `counts.training_key(setup)`, so the setups advice and --fit plan again share one answer."""
    arch = layout(spec, setup.task, setup.num_labels)
    _, _, by_path = _training(spec, setup, arch)
    grad_bytes = precision.grad_bytes
    prefix = "transformer.h." if spec.family == "gpt2" else "model.layers."
    per_layer = [[0, 0, 0] for _ in range(spec.num_layers)]
    expert_up = [0] * spec.num_layers
    attn_out = [0] * spec.num_layers
    mlp_up = [0] * spec.num_layers
    head = 0
    nbytes = gradient_bytes_by_path(spec, setup, precision, by_path)
    for path, numel in by_path.items():
        if path.startswith(prefix):
            index, _, rest = path[len(prefix):].partition(".")
            part = 2 if rest.startswith(MLP_OUTPUT) else 1 if rest.startswith(MLP_PART) else 0
            down = _experts_down_numel(arch, path, numel)
            per_layer[int(index)][2] += down * grad_bytes
            expert_up[int(index)] += 2 * down * grad_bytes  # gate/up: twice the down projection
            per_layer[int(index)][part] += nbytes[path] - down * grad_bytes
            attn_out[int(index)] += nbytes[path] if rest.startswith(ATTN_OUTPUT) else 0
            up = rest.startswith(("mlp.up_proj", "feed_forward.up_proj"))
            mlp_up[int(index)] += nbytes[path] if up else 0
        elif path == arch.head_path or (arch.tied_head and path.endswith(("wte", "embed_tokens"))):
            head += nbytes[path]
    embed_trains = any(path.endswith(("wte", "embed_tokens")) for path in by_path)
    return LayerGradients(tuple(tuple(parts) for parts in per_layer), tuple(expert_up), tuple(attn_out),
                          tuple(mlp_up), head, embed_trains)


def input_gradient_skips(spec: ModelSpec, setup: TrainSetup) -> tuple[int, int]:
    """(weights whose input needs no gradient, attention layers with no gradient) in this setup's
    backward, from the activation walk; what `cost.lora_flops_per_token` takes off."""
    from .precision import get_precision

    arch = layout(spec, setup.task, setup.num_labels)
    wrapped, trainable, _ = _training(spec, setup, arch)
    prof = profile(spec, conditions(setup, get_precision(setup.precision)), wrapped, trainable)
    return prof.no_input_grad_params, prof.attention_without_grad


def check_walkable(spec: ModelSpec, setup: TrainSetup, cond: Conditions) -> None:
    """Refuse in one line a setup the activation walk does not model: fp32 adapters (`adapter_dtype`)
    on a router or fused experts, which PEFT wraps in a `ParamWrapper`."""
    if cond.adapter_bytes and any(a.module.kind in ("router", "experts")
                                  for a in lora_trainable(spec, setup).adapters):
        raise PlanError("--adapter-dtype fp32 is not modelled for adapters on a router or fused experts "
                        "(PEFT's ParamWrapper): leave them out of --targets, or plan --adapter-dtype auto")


def predict_step(spec: ModelSpec, setup: TrainSetup, precision: Precision, memory: dict[str, int],
                 device: str = "cuda") -> StepPrediction:
    """The step's activations and peak, given the plan's model-state bytes in `memory`."""
    arch = layout(spec, setup.task, setup.num_labels)
    cond = conditions(setup, precision, device)
    wrapped, trainable, _ = _training(spec, setup, arch)
    check_walkable(spec, setup, cond)
    prof = profile(spec, cond, wrapped, trainable)
    grads = layer_gradients(spec, training_key(setup), precision)
    head, embed_trains = grads.head, grads.embed_trains
    impl = setup.optimizer_impl or "foreach"
    temporary = _temporary(spec, setup, arch, precision, impl)
    temp = temporary.bytes
    kernel = f"{impl} " if setup.optimizer in TORCH_OPTIMIZERS else ""  # Adafactor, 8-bit: one kernel
    dequant = None
    if setup.method == "qlora":
        nf4 = quantised_params(arch, lora_trainable(spec, setup), quantises_experts(spec, setup))
        dequant = dequant_term(setup, quantised_numels(spec, arch, nf4), precision)
    states = States(
        weights=memory["weights"],
        gradients=memory["gradients"],
        optimizer_states=memory["optimizer_states"] + memory["master_weights"],
        optimizer_temporary=temp,
        # token ids and labels, and the position ids a packed batch is given
        inputs=(3 if cond.packed else 2) * cond.tokens * INT64,
        head_gradients=head,
        dequant_transient=dequant.bytes if dequant else 0,
        dequant_backward=_down_backward(spec, setup, arch, precision, cond, dequant.bytes)
        if dequant and dequant.bytes else (),
        expert_up_gradients=grads.expert_up,
        attn_out_gradients=grads.attn_out,
        mlp_up_gradients=grads.mlp_up,
        layer_gradients=grads.per_layer,
        embedding_backward=embedding_backward(embed_trains, arch.tied_head, head, prof.transients[0]),
        temporary_what=f"{kernel}{setup.optimizer} temporary" if temp else f"{kernel}{setup.optimizer}, "
                       "no temporary",
    )
    vocab = spec.vocab_size if setup.task == "causal-lm" else setup.num_labels
    if setup.optimizer_in_backward:
        steps = in_backward_steps(spec, setup, arch, precision, impl)
        prefix = "transformer.h." if spec.family == "gpt2" else "model.layers."
        states = replace(
            states, gradients=0, optimizer_temporary=0, layer_gradients=((0, 0, 0),) * spec.num_layers,
            expert_up_gradients=(), attn_out_gradients=(), mlp_up_gradients=(),
            # a tied head's gradient waits in autograd's buffer for the embedding's, as without
            head_gradients=head if arch.tied_head and embed_trains else 0,
            temporary_what="stepped in backward", **in_backward_states(steps, prefix, spec.num_layers))
        if cond.autocast and arch.tied_head and embed_trains:
            # the tied head's partial gradient is made in 16 bits and cast to the fp32 one that waits
            states = replace(states, in_backward_head=max(states.in_backward_head, head // 2))
        # the embedding's step is its own phase (`in_backward_embedding`), not on top of all gradients
        states = replace(states, embedding_backward=embedding_backward(
            embed_trains, arch.tied_head, head, prof.transients[0]) - (head if arch.tied_head and embed_trains
                                                                       else 0))
        phases = tuple(p for p in step_phases(states, prof, vocab, cond.tokens) if p.name != "optimizer")
        temporary = Term("optimizer_temporary", max(steps.values(), default=0),
                         "optimizer in backward: one tensor's gradient and its step's temporary at a time, "
                         f"the largest {max(steps.values(), default=0):,} B")
        return StepPrediction(prof, states, phases, peak_phase(phases), temporary, dequant)
    phases = step_phases(states, prof, vocab, cond.tokens)
    return StepPrediction(prof, states, phases, peak_phase(phases), temporary, dequant)


def _down_backward(spec: ModelSpec, setup: TrainSetup, arch: Architecture, precision: Precision,
                   cond: Conditions, dequant: int) -> tuple[int, ...]:
    """Per decoder layer, `quant.down_backward_bytes`: the largest 4-bit weight in the dtype its matmul
    multiplies in, and the down projection's input gradient, tokens x the MLP's width in compute dtype."""
    _, compute, _ = check_quant(setup.quant_backend, setup.bnb_version, setup.bnb_compute_dtype,
                                precision.weight_bytes)
    nf4 = quantised_params(arch, lora_trainable(spec, setup), quantises_experts(spec, setup))
    weight = max(quantised_numels(spec, arch, nf4), default=0) * compute
    return tuple(down_backward_bytes(dequant, weight, cond.tokens * spec.mlp_width(i) * cond.compute_bytes)
                 for i in range(spec.num_layers))


def in_backward_steps(spec: ModelSpec, setup: TrainSetup, arch: Architecture, precision: Precision,
                      impl: str) -> dict[str, int]:
    """Per trained module: the most one of its tensors holds while it is stepped in backward (torchtune's
    `optimizer_in_bwd`): its gradient, and the temporary of an optimizer that holds that tensor alone
    (`optimizers.optimizer_temporary_bytes` of one tensor: foreach AdamW's sqrt(v) of it, for-loop's
    two, fused none)."""
    from .optimizers import adafactor_temporary_bytes, optimizer_temporary_bytes

    fp32 = fp32_adapters(setup.method, precision, setup.adapter_dtype)
    tensors: list[tuple[str, tuple[int, ...], Precision]] = []
    if setup.method == "full":
        tensors = [(p.name.rsplit(".", 1)[0], p.shape, precision) for p in arch.params]
    else:
        trainable = lora_trainable(spec, setup)
        for a in trainable.adapters:
            tensors += [(a.module.path, p.shape, FP32_ADAPTERS if fp32 else precision) for p in a.params]
        tensors += [(p.name.rsplit(".", 1)[0], p.shape, precision) for p in trainable.biases]
        tensors += [(m.path, p.shape, precision) for m in trainable.saved_modules for p in m.params]
    steps: dict[str, int] = {}
    for path, shape, convention in tensors:
        numel = _numel(shape)
        if setup.optimizer == "adafactor":
            sixteen = convention.grad_bytes == 2 and not convention.master_bytes
            temp = adafactor_temporary_bytes((shape,), sixteen)
        else:
            temp = optimizer_temporary_bytes(setup.optimizer, impl, (numel,), convention.state_bytes)
        steps[path] = max(steps.get(path, 0), numel * convention.grad_bytes + temp)
    return steps


def in_backward_states(steps: dict[str, int], prefix: str, layers: int) -> dict:
    """`States.in_backward` (per decoder layer) and `in_backward_outside` from `in_backward_steps`.
    With the optimizer stepped in backward there is no optimizer phase: every tensor was stepped by
    the end of backward. Assumption: each gradient is freed by its hook (`zero_grad(set_to_none=True)`)
    before the next is made, as torchtune's hooks do."""
    per_layer = [[0, 0, 0, 0] for _ in range(layers)]
    head = embedding = 0
    for path, nbytes in steps.items():
        if path.startswith(prefix):
            index, _, rest = path[len(prefix):].partition(".")
            part = (0 if rest.startswith(MLP_OUTPUT) else 1 if rest.startswith(MLP_PART)
                    else 2 if rest.startswith(ATTN_OUTPUT) else 3)
            per_layer[int(index)][part] = max(per_layer[int(index)][part], nbytes)
        elif path.endswith(EMBEDDINGS):
            embedding = max(embedding, nbytes)
        else:
            head = max(head, nbytes)
    return {"in_backward": tuple(tuple(parts) for parts in per_layer), "in_backward_head": head,
            "in_backward_embedding": embedding}
