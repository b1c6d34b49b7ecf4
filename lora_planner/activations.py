"""Activation memory: what autograd keeps from the forward pass, op by op.

A layer's forward is written here as the ops transformers runs, over symbolic tensors that know only
their element count, bytes per element and whether they require grad. Each op saves for backward what
PyTorch's derivative for it saves, and only when a gradient will flow through it: a frozen linear layer
(LoRA's base) keeps its weight for the input gradient but not its input, a norm whose input needs no
gradient keeps nothing. A tensor saved by several ops (the norm output feeding q, k and v) counts once.

Assumptions, each a field of `Conditions` or stated where it is used:

- transformers 5 modules, training mode, no KV cache, causal LM loss (logits upcast to fp32, log-softmax
  saved, shifted labels copied);
- `sdpa` attention keeps q, k, v, the output and a fp32 log-sum-exp per query (flash / memory-efficient
  kernels). On CPU torch falls back to the math kernel when attention dropout is on; the tracer runs on
  CPU, so `device="cpu"` models that fallback (probabilities, dropout mask, dropped probabilities);
- `eager` attention keeps the s x s probabilities (fp32 softmax output, and its 16-bit copy under autocast);
- dropout keeps its mask: one byte per element on CUDA (bool), the input's dtype on CPU;
- autocast (`amp`) casts each linear's input and weight to bf16 and those copies are what backward keeps;
  norms and the loss run in fp32;
- gradient checkpointing is Hugging Face's per-decoder-layer, non-reentrant: a layer keeps only its
  input; backward recomputes one layer at a time.

Nothing here imports torch: it is arithmetic over the model's shape.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace

from .architecture import router_path, shared_expert_path
from .counts import gate_up_rank_factor
from .errors import PlanError
from .spec import COMPLEX_ROPE, GEMMA_FAMILIES, QWEN_WINDOWS, ModelSpec

ATTENTION = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")
INT64 = 8
FP32 = 4



@dataclass(frozen=True)
class Conditions:
    """How a step runs, as far as activations care."""

    batch_size: int
    seq_len: int
    weight_bytes: int  # 4 for fp32/amp, 2 when the model is stored in 16 bits
    autocast: bool  # amp: fp32 weights, bf16 matmuls
    attention: str = "sdpa"
    grad_checkpointing: bool = False
    # selective layer checkpointing: only layers i with (i + checkpoint_offset) % checkpoint_every == 0
    # are checkpointed, the rest keep their whole saved set (`checkpointed_layers`)
    checkpoint_every: int = 1
    checkpoint_offset: int = 0
    # torchtitan's op-level selective checkpointing (`sac_saves`): a checkpointed layer keeps, beside
    # its input, the outputs of every other matmul and of the fused attention kernel
    checkpoint_ops: bool = False
    device: str = "cuda"
    dropout: float | None = None  # None: the model's own rates (`ModelSpec.dropout_rates`)
    lora_dropout: float = 0.0
    loss: str = "standard"  # standard | chunked | fused-linear (see `head_and_loss`)
    loss_chunks: int = 8
    activation_offload: bool = False  # checkpointed layer inputs in CPU memory (see `Profile`)
    # fp32 LoRA adapters over a 16-bit base (`adapter_dtype`): 4; 0 for adapters in the precision's
    # dtype. `adapter_autocast`: their matmuls then run under autocast (mixed, bf16), on 16-bit copies
    adapter_bytes: int = 0
    adapter_autocast: bool = False
    # packed documents (`--packing`): one row of every token, position ids restarting per document;
    # transformers then hands attention an explicit block-diagonal (1, 1, s, s) mask
    packed: bool = False
    # DoRA (`use_dora`): PEFT's `DoraLinearLayer` beside every wrapped Linear (see `Graph.dora`)
    dora: bool = False
    # torch.compile (`--compile`): none, layers (each decoder layer one graph) or model; see
    # `recompute_frontier` for what a compiled graph saves instead
    compile: str = "none"
    # QLoRA: every frozen linear but the LM head is 4-bit (`quant.quantised_params`); its matmul keeps
    # no 16-bit weight, and keeps its input only as `quant.nf4_saved_input_bytes` says (0: not at all)
    quantised_base: bool = False
    nf4_saved_input: int = 0
    # bitsandbytes' Linear4bit casts its output back to its input's dtype (`.to(inp_dtype)`, every
    # release read, 0.39.1 to 0.50.1); torchao's linear_nf4 returns F.linear's, autocast's under amp
    nf4_output_in_input_dtype: bool = False

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def compute_bytes(self) -> int:
        return 2 if self.autocast else self.weight_bytes


@dataclass
class Tensor:
    numel: int
    itemsize: int
    grad: bool
    key: int = 0
    # a pointwise op's result: the tensors it is computed from elementwise (a compiled backward may
    # recompute it from them, `recompute_frontier`); None for a kernel's output or an input
    sources: tuple[Tensor, ...] | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def checkpointed_layers(num_layers: int, cond: Conditions) -> tuple[bool, ...]:
    """Which decoder layers a step checkpoints: none without checkpointing; with it, layer i when
    (i + offset) % every == 0.

    every = 1 is every layer (Hugging Face's `gradient_checkpointing_enable`). every = k > 1 is
    selective layer checkpointing; the frameworks count the layers differently. transformers 5's
    `_set_gradient_checkpointing(every_n_layers=k)` checkpoints layer_index % k == 0 (offset 0:
    layers 0, k, 2k, ...); torchtune's `training.activations.checkpoint_wrapper` (ac_mode selective,
    ac_option k) and torchtitan's `apply_ac` (selective_ac_option "k") count wrapped layers from 1 and
    wrap the count % k == 0 ones (offset 1: layers k-1, 2k-1, ...).
    """
    if not cond.grad_checkpointing:
        return (False,) * num_layers
    return every_kth_layer(num_layers, cond.checkpoint_every, cond.checkpoint_offset)


def sac_saves(op: str, mm_count: int, device: str) -> bool:
    """Whether torchtitan's op-level selective checkpointing policy caches an op's outputs in
    forward (MUST_SAVE) rather than recompute them in backward.

    torchtitan's `_apply_ac_to_transformer_block` (selective_ac_option "op") saves the outputs of
    `aten.mm` but every second one counted within a layer's forward (`mm_count` odd: the 1st, 3rd,
    ... matmul), and of the fused attention kernels `_scaled_dot_product_flash_attention` and
    `_scaled_dot_product_efficient_attention` (CUDA's; CPU's flash kernel is another op, not on the
    list), and recomputes everything else. A linear with a bias runs `addmm`, neither saved nor
    counted. (Its list's reduce_scatter, abs and max do not run in a plain step's layers.)
    """
    if op == "mm":
        return mm_count % 2 == 1
    return op == "sdpa" and device == "cuda"


def every_kth_layer(num_layers: int, every: int, offset: int) -> tuple[bool, ...]:
    """Per layer, (i + offset) % every == 0 (see `checkpointed_layers`)."""
    return tuple((i + offset) % every == 0 for i in range(num_layers))


@dataclass
class Graph:
    """A forward pass being written down: which tensors autograd keeps, in order, by layer."""

    cond: Conditions
    wrapped: dict[str, int]  # module path -> LoRA rank
    # module paths whose own weights train (full fine-tuning: all), and `<path>.bias` for a bias that
    # trains without its weight (PEFT's bias="all" / "lora_only")
    trainable: set[str]
    saved: dict[int, tuple[int, str]] = field(default_factory=dict)
    rates: tuple[float, float, float] = (0.0, 0.0, 0.0)  # attention, residual, embedding dropout
    biases: frozenset[str] = frozenset()  # module paths that have a bias
    transposed_weights: bool = False  # GPT-2's Conv1D: weights stored (in, out)
    # by section: the most one DoRA layer's backward of its scaling holds (see `dora`)
    dora_backward: dict[str, int] = field(default_factory=dict)
    dora_weight_grads: dict[str, int] = field(default_factory=dict)
    # autocast's cache of 16-bit copies of trained parameters, by section: [all, those also saved]
    cache: dict[str, list[int]] = field(default_factory=dict)
    # per layer: bytes saved by the ops after the MLP's activation (down projection, output norm and
    # dropout); backward uses and frees them before it reaches the activation
    tails: list[int] = field(default_factory=list)
    _tail_from: int = 0  # bytes saved before the MLP's tail began
    # ...and after attention's core (softmax, or the fused kernel): freed before that core's backward
    attn_tails: list[int] = field(default_factory=list)
    # per MoE layer: what the backward of an expert matmul under PEFT's ParamWrapper holds beyond the
    # layer's saved tensors (see `_moe`); 0 where no expert weight is wrapped
    expert_backward: list[int] = field(default_factory=list)
    _attn_from: int = 0  # ... before attention's tail began
    # weights whose input needs no gradient (its product is skipped in backward), and attention
    # layers whose q, k and v need none (their backward does not run at all)
    no_input_grad_params: int = 0
    attention_without_grad: int = 0
    # by section: gradients backward has made and still holds when it first needs the layer's saved
    # tensors (beyond the residual stream's), alive through a checkpointed layer's recompute
    pending: dict[str, int] = field(default_factory=dict)
    # by section: what a recomputed expert block holds at its un-sort's backward (see `_moe`)
    unsort: dict[str, int] = field(default_factory=dict)
    # by section: a trained expert block's gate/up backward, (saved bytes freed by then, transient)
    up_backward: dict[str, tuple[int, int]] = field(default_factory=dict)
    # by section: an expert block's combine backward without checkpointing (see `_moe`)
    combine: dict[str, int] = field(default_factory=dict)
    # by section: a recomputed expert block at its combine's backward (`moe_recompute_combine`)
    recompute_combine: dict[str, int] = field(default_factory=dict)
    # by section: the MLP's pre-norm backward, what it holds beyond the saved tensors left once the
    # MLP's own are freed (`pre_mlp_norm_backward`)
    mlp_norm_backward: dict[str, int] = field(default_factory=dict)
    # by section: torch's CPU math kernel's probs @ v backward, the core's saves after softmax still
    # alive plus `value_product_backward` (beyond what the layer saved before them)
    pv_backward: dict[str, int] = field(default_factory=dict)
    # by section: a gated-DeltaNet layer's token mixer backward beyond its saves left then
    # (`delta_rule_backward`), in place of the attention's transient
    mixer_backward: dict[str, int] = field(default_factory=dict)
    # by section: a LoRA-wrapped up projection's input gradient, (saved bytes freed by then, held)
    up_input_backward: dict[str, tuple[int, int]] = field(default_factory=dict)
    # by section: a 4-bit up projection's backward, (saved bytes freed by then, held beside the
    # dequantised weight)
    up_dequant_backward: dict[str, tuple[int, int]] = field(default_factory=dict)
    # by section: a LoRA-wrapped attention output projection's input gradient (`lora_input_gradient_sum`)
    out_input_backward: dict[str, int] = field(default_factory=dict)
    norm_copy: int = 0  # the fp32 copy of its input the last `rms_norm` saved (0: the input was fp32)
    # keys of the tensors held around the current decoder layer (its input, the model's locals)
    outer: frozenset[int] = frozenset()
    section: str = ""
    # tensors a caller holds as arguments while the current block runs (the MLP's input)
    args: tuple[Tensor, ...] = ()
    # the last `attention`: the weights eager attention returns, and what the kernel holds at its end
    # beyond its inputs, its saved tensors and its output (`math_attention_internals`, eager's product)
    attn_weights: Tensor | None = None
    attn_internal: int = 0
    _keys: itertools.count = field(default_factory=lambda: itertools.count(1))
    # the first key made inside the current compiled region (`enter_region`): older tensors are its inputs
    region_start: int = 0
    in_loss: bool = False  # walking the loss (compiled on its own under `layers+loss`)
    _casts: dict[tuple[int, int], Tensor] = field(default_factory=dict)  # (key, itemsize): one cast
    # every forward moment as (saves made so far, bytes held) by layer, and each layer's last save: a
    # recompute stops at its layer's last saved tensor (`recompute_peak`)
    # (each moment also notes the newest tensor key then: op-level selective checkpointing's cached
    # outputs made later are alive beside it in a recompute, `recompute_peak`)
    moments: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    _saves: int = 0
    _last_save: dict[str, int] = field(default_factory=dict)
    _section_bytes: dict[str, int] = field(default_factory=dict)
    _saved_total: int = 0
    # tensors the model's Python code holds in variables while later ops run (the embedding output,
    # masks, rotary cos and sin, the residual stream, attention's returned weights), by key; what
    # no op saved of them is alive beside the saved set (see `moment`)
    held: dict[int, Tensor] = field(default_factory=dict)
    # autocast's 16-bit copies of trained parameters no op saved: alive from their linear to the loss
    _cache_unsaved: int = 0
    # the most the whole forward holds at once before the loss, without checkpointing (`moment`)
    forward_live: int = 0
    # a trained final norm: its weight's product has used and freed what it saved by the backward's
    # peak inside the norm (`trained_norm_product_bytes`)
    final_norm_freed: int = 0
    # the layer being walked is checkpointed (`checkpointed_layers`): its forward saves nothing past
    # its input, so its moments are not the forward's own (`moment`)
    checkpointed: bool = False
    # saved bytes of the checkpointed layers walked so far that their forward did not keep (all but
    # their input, their shared arguments and autocast's weight copies): `moment` takes them off
    dropped: int = 0
    # op-level selective checkpointing (`Conditions.checkpoint_ops`): the current layer's matmuls so
    # far, and by layer the op outputs its checkpoint caches in forward (`sac_saves`)
    mm_count: int = 0
    sac: dict[str, list[Tensor]] = field(default_factory=dict)
    _last_save_key: dict[str, int] = field(default_factory=dict)  # the newest key at a layer's last save

    def sac_unconsumed(self, layer: str) -> int:
        """Cached op outputs (op-level selective checkpointing) that a layer's recompute never takes
        back: those of ops at or after its last save, where torch's non-reentrant checkpoint stops
        recomputing (autograd packs an op's inputs before it runs the op). No op saves them; the
        checkpoint holds them until the layer's backward is done."""
        last = self._last_save_key.get(layer, 0)
        return sum(t.nbytes for t in self.sac.get(layer, ()) if t.key not in self.saved and t.key > last)

    def sac_op(self, op: str, *outputs: Tensor) -> None:
        """An op ran inside a checkpointed layer: under op-level selective checkpointing, the
        checkpoint caches its outputs when the policy says so (`sac_saves`)."""
        if not (self.checkpointed and self.cond.checkpoint_ops):
            return
        self.mm_count += op == "mm"
        if sac_saves(op, self.mm_count, self.cond.device):
            self.sac.setdefault(self.section.removesuffix(" mlp"), []).extend(outputs)

    def recompute_peak(self, layer: str) -> int:
        """The most a checkpointed layer's recompute holds: its forward's moments up to the op that
        saves its last tensor. torch's non-reentrant checkpoint stops recomputing there (early stop),
        so what forward did after it (a last LoRA layer's lora_B output and its scaled copy, when the
        adapter's input was its last save) does not happen again."""
        last = self._last_save.get(layer, 0)
        # op-level selective checkpointing: the recompute is handed each cached output as it reaches
        # that op; until then the cache holds it, beside what the moment counts (the saves so far)
        cached = [(t.key, t.nbytes) for t in self.sac.get(layer, ())]
        return max((held + sum(n for key, n in cached if key > now)
                    for saves, held, now in self.moments.get(layer, ()) if saves < last), default=0)

    # --- tensors ---------------------------------------------------------------------------------
    def new(self, numel: int, itemsize: int, grad: bool) -> Tensor:
        return Tensor(numel, itemsize, grad, next(self._keys))

    def pointwise(self, numel: int, itemsize: int, grad: bool, *sources: Tensor) -> Tensor:
        """The result of an elementwise op over `sources` (a cast, an activation, a product, a sum)."""
        return Tensor(numel, itemsize, grad, next(self._keys), sources)

    def enter_region(self) -> None:
        """A decoder layer begins: under `--compile layers` a compiled region of its own, whose
        inputs (what was made before it) its backward cannot recompute, and whose casts are its own.
        Under `--compile model` the whole model is one region."""
        if self.cond.compile in ("layers", "layers+loss"):
            self.region_start = next(self._keys)
            self._casts = {}

    def compiled_here(self) -> bool:
        """Whether the op being walked runs inside a compiled graph (`compiled_section`)."""
        return (compiled_section(self.cond.compile, self.section.startswith("layer"))
                or (self.in_loss and loss_compiled(self.cond.compile)))

    def save(self, *tensors: Tensor, kernel: bool = False) -> None:
        """Autograd keeps `tensors` for backward. Inside a compiled graph, a pointwise result saved
        for a pointwise op's backward (`kernel` False) is replaced by the cheaper set backward can
        recompute it from (`recompute_frontier`); one a kernel's backward reads (`kernel`: a matmul,
        attention) is kept as is."""
        for t in tensors:
            frontier = (recompute_frontier(t, self.saved, self.region_start)
                        if not kernel and self.compiled_here() else None)
            self._keep(*(frontier if frontier is not None else (t,)))

    def _keep(self, *tensors: Tensor) -> None:
        for t in tensors:
            if t.key not in self.saved:
                self.saved[t.key] = (t.nbytes, self.section)
                self._section_bytes[self.section] = self._section_bytes.get(self.section, 0) + t.nbytes
                self._saved_total += t.nbytes
                self._saves += 1
                self._last_save[self.section.removesuffix(" mlp")] = self._saves
                if self.checkpointed and self.cond.checkpoint_ops:
                    self._last_save_key[self.section.removesuffix(" mlp")] = next(self._keys)

    def saved_bytes(self, section: str | None = None) -> int:
        # running totals per section: a walk of 80 layers asks for each layer's bytes
        if section is None:
            return sum(self._section_bytes.values())
        return self._section_bytes.get(section, 0)

    # --- elementwise and norms ------------------------------------------------------------------
    def cast(self, x: Tensor, itemsize: int) -> Tensor:
        """`.to(dtype)`: a no-op for the same dtype, else a copy (its backward keeps nothing).

        Eager autocast casts a linear's input anew for each linear that reads it (q, k and v each get
        a copy); a compiled graph computes one cast once (AOTAutograd's common-subexpression
        elimination, `fx_graph_cse` in torch/_functorch/compile_utils.py)."""
        if x.itemsize == itemsize:
            return x
        if not self.compiled_here():
            return self.pointwise(x.numel, itemsize, x.grad, x)
        return self._casts.setdefault((x.key, itemsize), self.pointwise(x.numel, itemsize, x.grad, x))

    def unary(self, x: Tensor, saves: str = "input") -> Tensor:
        """An elementwise op that keeps its input (silu, gelu, pow) or its output (tanh, rsqrt)."""
        out = self.pointwise(x.numel, x.itemsize, x.grad, x)
        if x.grad:
            self.save(x if saves == "input" else out)
        return out

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        """a * b keeps b for a's gradient and a for b's."""
        out = self.pointwise(max(a.numel, b.numel), max(a.itemsize, b.itemsize), a.grad or b.grad, a, b)
        if a.grad:
            self.save(b)
        if b.grad:
            self.save(a)
        return out

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self.pointwise(max(a.numel, b.numel), max(a.itemsize, b.itemsize), a.grad or b.grad, a, b)

    def dropout_op(self, x: Tensor, p: float) -> Tensor:
        """Dropout keeps its mask. A compiled graph draws it from a random op, which the partitioner
        never recomputes, and keeps it as a bool (`dropout_mask_bytes`)."""
        if p <= 0:
            return x
        mask = self.new(x.numel, dropout_mask_bytes(self.cond.device, x.itemsize, self.compiled_here()),
                        False)
        if x.grad:
            self.save(mask)
        return self.pointwise(x.numel, x.itemsize, x.grad, x, mask)

    def rms_norm(self, x: Tensor, path: str, dim: int, offset_weight: bool = False,
                 recompute_alive: tuple[Tensor, ...] | None = None, fp32_product: bool = False,
                 weighted: bool = True) -> Tensor:
        """RMSNorm: h = x.float(); h * rsqrt(mean(h^2) + eps); times the weight, cast back.

        pow keeps h, rsqrt keeps its (rows,) output; the weight product keeps the normalised tensor only
        when the weight trains. Gemma-2's form multiplies by (1 + weight) in fp32 before the cast;
        OLMo 2's (`fp32_product`) by the weight itself in fp32 before the cast (the product keeps the
        parameter, no new tensor).
        `recompute_alive`: what a recomputed layer holds beside the norm, whose (1 + weight) is the
        layer's last save (Gemma-2's post-feedforward norm): the recompute reaches the moment before
        the product, the input, its fp32 copy and the normalised tensor alive.
        `weighted` False: no weight (Llama 4's `Llama4TextWeightlessRMSNorm`), the normalised tensor
        cast back is the output.
        """
        trains = path in self.trainable
        h = self.cast(x, FP32)
        rstd = self.new(x.numel // dim, FP32, False)  # a reduction's output: never recomputed
        if h.grad:
            self.save(h, rstd)
        self.norm_copy = h.nbytes if h.grad and h is not x else 0
        normed = self.pointwise(h.numel, FP32, h.grad, h, rstd)
        if offset_weight or fp32_product:
            if trains:
                self.save(normed)
            if h.grad and offset_weight:
                self.save(self.new(dim, FP32, False))  # (1 + weight) in fp32
            if recompute_alive is not None:
                self.peak_at(self.unsaved(x, h, normed, *recompute_alive))
            product = self.pointwise(h.numel, FP32, h.grad or trains, normed)
            self.moment(x, h, normed, product)  # the fp32 product, before its cast back
            return self.cast(product, x.itemsize)
        normed = self.cast(normed, x.itemsize)
        if not weighted:
            return normed
        if trains:
            self.save(normed)
        return self.pointwise(h.numel, max(x.itemsize, self.cond.weight_bytes), h.grad or trains, normed)

    def layer_norm(self, x: Tensor, path: str, dim: int) -> Tensor:
        """native_layer_norm keeps its input and mean and rstd per row (autocast runs it in fp32).

        CUDA keeps the statistics in fp32 (the accumulate type); the CPU kernel in the input's dtype.
        """
        trains = path in self.trainable or f"{path}.bias" in self.trainable
        if self.cond.autocast:
            x = self.cast(x, FP32)
        rows = x.numel // dim
        stat = FP32 if self.cond.device == "cuda" else x.itemsize
        mean, rstd = self.new(rows, stat, False), self.new(rows, stat, False)
        if x.grad or trains:
            self.save(x, mean, rstd)
        return self.pointwise(x.numel, x.itemsize, x.grad or trains, x, mean, rstd)

    def attn_tail_start(self) -> None:
        self._attn_from = self._saved_total

    def attn_tail_end(self) -> None:
        # tensors are only ever added, once each: what was saved since the start is the growth
        self.attn_tails.append(self._saved_total - self._attn_from)

    def tail_start(self) -> None:
        self._tail_from = self._saved_total

    def tail_end(self) -> None:
        self.tails.append(self._saved_total - self._tail_from)

    def unsaved(self, *tensors: Tensor) -> int:
        """Bytes of `tensors` no op has saved: alive here as arguments or results, freed later."""
        keys = {t.key: t.nbytes for t in tensors if t.key not in self.saved}
        return sum(keys.values())

    def peak_at(self, transient: int, after_saves: bool = False) -> None:
        """The layer's forward holds everything saved so far plus `transient` bytes here.

        `after_saves`: a moment a recompute skips when no tensor is saved after it (see
        `recompute_peak`); otherwise the walk's order of saves need not be the ops' (the expert block's).
        """
        layer = self.section.removesuffix(" mlp")
        held = self.saved_bytes(layer) + self.saved_bytes(f"{layer} mlp") + transient
        at = self._saves if after_saves else -1
        self.moments.setdefault(layer, []).append((at, held, next(self._keys)))

    def cached(self, nbytes: int, saved: bool) -> None:
        """A 16-bit copy of a trained parameter: autocast keeps it until forward ends."""
        entry = self.cache.setdefault(self.section, [0, 0])
        entry[0] += nbytes
        entry[1] += nbytes if saved else 0
        self._cache_unsaved += 0 if saved else nbytes

    # --- the forward's own moments (no checkpointing) ---------------------------------------------
    def hold(self, *tensors: Tensor) -> None:
        """The model's code keeps `tensors` in variables from here (until `release`)."""
        for t in tensors:
            self.held[t.key] = t

    def release(self, *tensors: Tensor) -> None:
        for t in tensors:
            self.held.pop(t.key, None)

    def moment(self, *tensors: Tensor, extra: int = 0) -> int:
        """Live bytes of the forward at one op, when nothing is checkpointed: every tensor saved so
        far (all layers before and this one's so far), autocast's unsaved weight copies, and the
        tensors alive here that no op saved: those held in variables (`held`), `tensors` (the op's
        inputs and output) and `extra` bytes of anonymous ones. Each tensor counts once. (`args` is
        the recompute's own account of what a checkpointed layer holds, not read here.) Keeps the
        largest in `forward_live`, which the timeline compares with the forward's end at the loss.
        """
        seen, unsaved, saved = set(), 0, self.saved
        for t in itertools.chain(self.held.values(), tensors):
            if t.key not in saved and t.key not in seen:  # size only what no op saved, once
                seen.add(t.key)
                unsaved += t.numel * t.itemsize
        live = self._saved_total - self.dropped + self._cache_unsaved + extra + unsaved
        if not self.checkpointed:
            self.forward_live = max(self.forward_live, live)
        return live

    def _layer_held(self) -> list[Tensor]:
        """What the layer's own code holds (the MLP's activation beside the up projection): a layer's
        moment counts it beside the layer's saves; what the model holds around the layer, the
        timeline counts."""
        return [t for k, t in self.held.items() if k not in self.outer]

    # --- linear layers --------------------------------------------------------------------------
    def linear(self, x: Tensor, path: str, in_features: int, out_features: int) -> Tensor:
        """y = x W^T (+ b), plus LoRA's B(A(dropout(x))) * scale when the module is wrapped.

        Backward needs x for W's gradient (kept only when W trains) and W for x's gradient (kept only
        when x needs one; under autocast that is a bf16 copy of W, otherwise the parameter itself).
        """
        trains = path in self.trainable
        # a trained bias alone saves nothing (its gradient sums the output's), but its output then
        # needs a gradient, and so does what is computed from it
        bias_trains = f"{path}.bias" in self.trainable
        rank = self.wrapped.get(path)
        rows = x.numel // in_features
        if not x.grad:
            self.no_input_grad_params += in_features * out_features + in_features * (rank or 0)
        # the Trainer's autocast over a 16-bit base (fp32 adapters) reaches a base layer only where the
        # model itself made its input fp32 (DeepSeek-V3's and GLM-4-MoE's router): autocast casts that
        # input and the weight back to bf16
        casts = self.cond.autocast or (self.cond.adapter_autocast and x.itemsize == FP32)
        xin = self.cast(x, 2) if casts else x
        if trains:
            self.save(xin, kernel=True)
        quantised = self.nf4_input(x, path, trains)  # QLoRA's 4-bit base: no autocast weight copy
        if casts and (x.grad or trains) and not quantised:
            self.save(self.new(in_features * out_features, 2, False))  # the bf16 weight copy
        if casts and trains:
            self.cached(in_features * out_features * 2, saved=True)
        if casts and (trains or bias_trains) and path in self.biases:
            self.cached(out_features * 2, saved=False)
        # bitsandbytes' Linear4bit returns `matmul_4bit(...).to(inp_dtype)`: under autocast its output
        # keeps its input's dtype, where an autocast linear's is 16-bit
        same = quantised and self.cond.nf4_output_in_input_dtype
        out = self.new(rows * out_features, x.itemsize if same else xin.itemsize,
                       x.grad or trains or bias_trains)
        self.sac_op("addmm" if path in self.biases else "mm", out)
        # the matmul's moment: its input, autocast's copies of the input and (when no op keeps it)
        # of the weight, and its output
        self.moment(x, xin, out, extra=in_features * out_features * 2
                    if casts and not (x.grad or trains or quantised) else 0)
        if rank is None:
            return out
        # PEFT casts the adapter's input to lora_A's dtype first: under autocast the adapters are fp32,
        # so a 16-bit input (attention's output, the MLP's product) makes a fp32 copy, and lora_A's
        # autocast a new 16-bit copy of that, which it keeps
        # fp32 adapters over a 16-bit base (`adapter_dtype`): PEFT's cast of every input to fp32,
        # their matmuls under autocast (mixed, bf16) or in fp32 (pure-bf16)
        fp32_adapters = bool(self.cond.adapter_bytes)
        autocast = self.cond.autocast or self.cond.adapter_autocast
        xc = self.cast(x, FP32) if self.cond.autocast or fp32_adapters else x
        xd = self.dropout_op(xc, self.cond.lora_dropout)
        kept = self.dora_weight_norm(x, xc, xd, out, in_features, out_features, rank) if self.cond.dora else 0
        xa = self.cast(xd, 2) if autocast else xd
        self.save(xa, kernel=True)  # lora_A's weight trains
        if autocast and xd.grad:
            self.save(self.new(in_features * rank, 2, False))
        a = self.new(rows * rank, xa.itemsize, True)
        self.save(a)  # lora_B's input
        layer = self.section.removesuffix(" mlp")
        # base output, lora_B's output and its scaled copy (in lora_B's dtype), on top of what the
        # layer saved so far, its input and the block's when no op saved them. PEFT casts an input
        # of another dtype to the adapter's (`_cast_input_dtype`) and that copy stays bound until
        # the layer returns; the 16-bit copy autocast then makes of it is what lora_A saves, not
        # the input itself.
        # With fp32 adapters every tensor alive here is sized once, those the model's code holds too.
        if fp32_adapters:
            # (the dropped copy, when lora_A keeps autocast's 16-bit copy of it, is gone by now)
            alive = self.unsaved(x, xc, *self.args, *self._layer_held())
        else:
            recast = x.itemsize != self.cond.weight_bytes
            alive = ((x.numel * self.cond.weight_bytes if recast else 0) + self.unsaved(x)
                     + self.unsaved(*(a for a in self.args if a.key != x.key)))
        held = (self.saved_bytes(layer) + self.saved_bytes(f"{layer} mlp")
                + rows * out_features * (out.itemsize + 2 * xa.itemsize) + alive + kept)
        if autocast:
            self.save(self.new(rank * out_features, 2, False))
            self.cached(in_features * rank * 2, saved=xd.grad)
            self.cached(rank * out_features * 2, saved=True)
        # lora_B's matmul saved its weight's 16-bit copy before this moment's outputs exist: a
        # recompute that stops at that save never reaches it
        self.moments.setdefault(layer, []).append((self._saves, held, next(self._keys)))
        if (fp32_adapters or self.cond.autocast) and xd is not xc:
            # lora_A's output made, the dropped fp32 copy still alive beside PEFT's cast of the input
            # (the dropped copy is freed after, when autocast's 16-bit copy of it is what lora_A kept)
            at_a = self.unsaved(x, xc, xd, out, *self.args, *self._layer_held())
            saved = self.saved_bytes(layer) + self.saved_bytes(f"{layer} mlp")
            self.moments[layer].append((self._saves, saved + at_a, next(self._keys)))
            self.moment(x, xc, xd, out)
        # the same moment in the whole forward: the base output, lora_B's output and its scaled copy
        # beside the input and PEFT's cast of it (`xd`, the input itself when of the adapter's dtype)
        self.moment(x, *((xc,) if fp32_adapters else (xd,)), out,
                    extra=2 * rows * out_features * xa.itemsize + kept)
        if self.cond.dora:
            self.dora(x, xc, xd, out, path, in_features, out_features, xa.itemsize, kept)
        # PEFT casts the sum back to the base output's dtype (`result.to(torch_result_dtype)`)
        return self.cast(self.add(out, self.new(rows * out_features, xa.itemsize, True)), out.itemsize)

    def nf4_input(self, x: Tensor, path: str, trains: bool) -> bool:
        """Whether `path` is a 4-bit base layer (QLoRA: every frozen linear but the LM head and an MoE
        router, as `quant.quantised_params` plans them), saving what its matmul keeps of its input:
        in bitsandbytes before 0.43.2 the input cast to the compute dtype (`quant.nf4_saved_input_bytes`).
        Its packed weight is a parameter, so nothing else is kept, and autocast makes no copy of it."""
        quantised = (self.cond.quantised_base and not trains and path != "lm_head"
                     and not path.endswith(".mlp.gate"))
        if quantised and self.cond.nf4_saved_input and x.grad:
            self.save(self.cast(x, self.cond.nf4_saved_input))
        return quantised

    def dora_weight_norm(self, x: Tensor, xc: Tensor, xd: Tensor, out: Tensor, in_features: int,
                         out_features: int, rank: int) -> int:
        """The moment PEFT's DoRA forms ||W + s·B·A|| per output, before lora_A sees the input; returns
        the bytes it leaves alive until the wrapped layer returns.

        `get_lora_weight` makes B·A as lora_B(lora_A(I)) with an (in, in) identity: autograd keeps
        the identity (its 16-bit copy under autocast) and lora_A's (in, r) output for as long as
        B·A is alive, and B·A (in the adapter's dtype, cast up from autocast's 16-bit output) stays
        bound until the layer returns, as does W cast to the adapter's dtype when that is a copy. The
        norm's s·B·A and W + s·B·A, both (out, in) in the adapter's dtype, are alive at the sum;
        under autocast the moment B·A is made, with the identity and its 16-bit copy, can be larger
        (a down projection, in much wider than out).
        """
        adapter = self.cond.adapter_bytes or self.cond.weight_bytes
        compute = 2 if self.cond.autocast or self.cond.adapter_autocast else adapter
        weight = in_features * out_features
        kept = (in_features * in_features + in_features * rank) * compute + weight * adapter
        kept += weight * adapter if adapter != self.cond.weight_bytes else 0
        # B·A made, the identity in the adapter's dtype still bound beside autocast's copy of it
        made = (in_features * in_features * (adapter + (compute if compute != adapter else 0))
                + (in_features * rank + weight) * compute)
        transient = max(made, kept + 2 * weight * adapter)
        alive = (x, xc, xd, out)
        self.peak_at(self.unsaved(*alive, *self.args, *self._layer_held()) + transient, after_saves=True)
        self.moment(*alive, extra=transient)
        return kept

    def dora(self, x: Tensor, xc: Tensor, xd: Tensor, out: Tensor, path: str, in_features: int,
             out_features: int, branch_bytes: int, kept: int) -> None:
        """What PEFT's `DoraLinearLayer.forward` saves beside LoRA's own: with m the magnitude and
        n = ||W + s·B·A|| per output (detached, the paper's section 4.3), the result gains
        (m/n - 1) * base + (m/n) * lora_B(lora_A(x)) * s. The divide keeps n, the first product
        keeps the base output and m/n - 1, the second lora_B's output and m/n: two (rows, out)
        tensors and three (out,) vectors in the adapter's dtype.

        The base output is the base layer's own, less its bias (a new tensor in the promoted dtype),
        or with LoRA dropout `F.linear(dropout(x), W)` again (16-bit under autocast, which then keeps
        the weight's 16-bit copy for x's gradient; without autocast a 16-bit W cast up to the
        adapter's dtype is a copy it keeps; Conv1D's transposed W trains, so the input is kept).
        """
        rows = out.numel // out_features
        adapter = self.cond.adapter_bytes or self.cond.weight_bytes
        dropped = self.cond.lora_dropout > 0
        # PEFT's `transpose` wraps Conv1D's W.T in a new Parameter, which requires a gradient: the
        # re-run base matmul then keeps its input and its output needs a gradient, layer 0's too
        weight_grad = dropped and self.transposed_weights
        grad = xd.grad or weight_grad
        self.save(self.new(out_features, adapter, False))  # n, kept by the divide
        if dropped:
            autocast = self.cond.autocast or self.cond.adapter_autocast
            base = self.new(rows * out_features, 2 if autocast else xd.itemsize, grad)
            copy = in_features * out_features * (2 if autocast else adapter)
            if weight_grad and autocast:
                # autocast caches the new Parameter's 16-bit copy (a trained leaf) until forward ends
                self.cached(copy, saved=xd.grad)
            if xd.grad and (autocast or adapter != self.cond.weight_bytes):
                self.save(self.new(in_features * out_features, 2 if autocast else adapter, False))
            if weight_grad:
                self.save(self.cast(xd, 2) if autocast else xd)
                # that Parameter's gradient, in the adapter's dtype: under checkpointing it outlives
                # the layer's backward (measured with the tracer; without, the peak is elsewhere)
                layer = self.section.removesuffix(" mlp")
                self.dora_weight_grads[layer] = (self.dora_weight_grads.get(layer, 0)
                                                 + in_features * out_features * adapter)
        elif path in self.biases:
            base = self.new(out.numel, max(out.itemsize, self.cond.weight_bytes), out.grad)
        else:
            base = out
        self.save(base)
        if grad:
            self.save(self.new(out_features, adapter, True))  # m/n - 1, for the base output's gradient
        promoted = max(adapter, base.itemsize, branch_bytes)
        alive = (x, xc, xd, out, base)
        # (m/n - 1) * base made: a recompute stopping at the second product's saves holds it
        self.peak_at(self.unsaved(*alive, *self.args, *self._layer_held()) + kept
                     + rows * out_features * promoted, after_saves=True)
        self.save(self.new(out_features, adapter, True), self.new(rows * out_features, branch_bytes, True))
        # backward of (m/n) * lora: the scaled incoming gradient, lora's gradient and the product
        # summed into m's, each (rows, out) in the promoted dtype, beside the incoming one
        # (under autocast also the fp32 gradient of the sum PEFT cast back and its 16-bit cast): the
        # MLP's output projection's, whose backward runs with all the layer's saves alive
        if path.endswith((".mlp.down_proj", ".mlp.c_proj")):
            back = rows * out_features * ((4 if dropped else 3) * promoted
                                          + (FP32 + 2 if self.cond.autocast else 0))
            self.dora_backward[self.section.removesuffix(" mlp")] = back
        # (m/n - 1) * base, (m/n) * lora and its scaled copy, in the promoted dtype, beside the saves
        self.peak_at(self.unsaved(*alive, *self.args, *self._layer_held()) + kept
                     + 3 * rows * out_features * promoted, after_saves=True)
        self.moment(*alive, extra=kept + 3 * rows * out_features * promoted)

    def merged_linear(self, x: Tensor, path: str, in_features: int, out_features: int,
                      weight_bytes: int = 0) -> Tensor:
        """y = x (W + s B A)^T with PEFT's `ParamWrapper` on a 2-D parameter (`_LoraParameterProxy`):
        `get_delta_weight` makes B @ A (autocast: from bf16 copies of A and B, which mm keeps; on
        CPU a 16-bit model's A and B are upcast to fp32 copies first), W + delta is a new weight that
        trains, so the matmul keeps x, and keeps that weight (its bf16 copy under autocast) when x
        needs a gradient. `weight_bytes`: the weight's own width where it is not the model's (a router
        kept in fp32: the merged weight is then fp32 too).
        """
        rank = self.wrapped[path]
        rows = x.numel // in_features
        if self.cond.autocast:
            self.save(self.new(rank * in_features, 2, False), self.new(out_features * rank, 2, False))
        elif self.cond.weight_bytes < FP32 and self.cond.device == "cpu":
            self.save(self.new(rank * in_features, FP32, False), self.new(out_features * rank, FP32, False))
        if not x.grad:
            self.no_input_grad_params += in_features * out_features
        xin = self.cast(x, 2) if self.cond.autocast else x
        self.save(xin, kernel=True)
        if x.grad:
            wb = 2 if self.cond.autocast else weight_bytes or self.cond.weight_bytes
            self.save(self.new(in_features * out_features, wb, False))
        return self.new(rows * out_features, xin.itemsize, True)

    # --- attention ------------------------------------------------------------------------------
    def attention(self, q: Tensor, k: Tensor, v: Tensor, heads: int, kv_heads: int, head_dim: int,
                  attn_dropout: float, softcap: bool = False, contiguous_q: bool = False,
                  fused: Tensor | None = None, softmax_fp32: bool = True, masked: bool = False,
                  value_dim: int = 0, contiguous_k: bool = False, cast_probs: bool = True) -> Tensor:
        """Attention over projected (and rotated) q, k, v; returns the (b, s, heads * head_dim) output
        as o_proj reads it.

        Flash / memory-efficient SDPA keeps its inputs, its output and a fp32 log-sum-exp per query;
        k and v stay at kv_heads (GQA handled in the kernel). Eager attention and torch's math
        fallback keep contiguous copies of q, k and v at `heads`, the s x s softmax output (fp32 for
        eager), its 16-bit copy and, with dropout, the mask and the dropped probabilities.
        `masked`: SDPA is given an explicit mask (a sliding window no longer than the sequence), see
        `sdpa_mask_bytes`. `value_dim`: each head's value (and output) when narrower or wider than q's
        and k's (latent attention; 0: `head_dim`). torch's fused CPU kernel needs one head size for
        all three, so on CPU such attention runs the math kernel; on CUDA the memory-efficient one.
        `contiguous_k`: k is (b, heads, s, d)-contiguous at every head (latent attention's key, filled
        into a new tensor), so eager attention's score matmul keeps k itself, not a copy.
        `cast_probs` False: eager attention leaves the softmax's output in its dtype (Llama 4's, with
        no fp32 softmax of its own: fp32 only under autocast), dropout and the matmul's autocast copy
        after it.
        """
        b, s = self.cond.batch_size, self.cond.seq_len
        grad = q.grad or k.grad or v.grad
        self.attention_without_grad += not grad
        self.attn_weights, self.attn_internal = None, 0
        inputs = (q, k, v)
        q_in, v_in = q.itemsize, v.itemsize  # before autocast: what `.to(query.dtype)` casts back to
        q0, k0, v0 = q, k, v  # as the module holds them (`attention_moments`)
        full = b * heads * s * head_dim
        vfull = b * heads * s * (value_dim or head_dim)  # v (kv_heads == heads where they differ) and out
        probs = b * heads * s * s
        flash = self.cond.attention == "sdpa" and not (self.cond.device == "cpu" and (
            attn_dropout > 0 or value_dim not in (0, head_dim)))
        # with a mask transformers does not ask SDPA for grouped-query attention: it repeats k and v
        # to every head (`repeat_kv`). From several k/v heads that is a copy; from one it stays an
        # expanded view of the original, until autocast's cast copies it at full size.
        repeat = flash and masked and kv_heads < heads
        if repeat and kv_heads > 1:
            k, v = self.new(full, k.itemsize, k.grad), self.new(full, v.itemsize, v.grad)
        k_in, v_in_t = k, v
        if self.cond.autocast:
            q = self.cast(q, 2)
            k, v = ((self.new(full, 2, t.grad) if repeat and t.itemsize != 2 else self.cast(t, 2))
                    for t in (k, v))
            if value_dim and v is not v_in_t:  # the cast of a slice of a fused output copies the slice
                v = self.new(vfull, 2, v.grad)
        cb = max(q.itemsize, v.itemsize)
        if flash:
            out = self.new(vfull, cb, grad)
            lse = b * heads * s * FP32
            if masked:
                mask, lse = sdpa_mask_bytes(b, heads, s, cb, self.cond.device)
                if grad:
                    # each call converts the mask anew; one compiled graph converts it once for all
                    # its layers (`cast`)
                    converted = self.new(mask, 1, False)
                    if self.compiled_here():
                        converted = self._casts.setdefault((0, mask), converted)
                    self.save(converted)
            lse_t = self.new(lse, 1, False)
            if grad:
                self.save(q, k, v, out, lse_t, kernel=True)
            self.sac_op("sdpa", out, lse_t)
            self.attn_tail_start()
            # the kernel lays its output out like q: when q is (b, heads, s, d)-contiguous (Phi-3's
            # rotary concatenates), o_proj's (b, s, heads * d) view needs a copy, unless one head
            # or one position makes it a view
            return self.new(vfull, cb, grad) if contiguous_q and heads > 1 and s > 1 else out
        eager = self.cond.attention == "eager"
        if not eager:
            # with a mask transformers repeats k and v to every head first (`repeat_kv`: copies from
            # several k/v heads, an expanded view of one), and the kernel then works at every head
            rep = masked and kv_heads < heads
            kv_numel = full if rep else b * kv_heads * s * head_dim
            v_numel = kv_numel * (value_dim or head_dim) // head_dim
            casts = (q.nbytes if q is not inputs[0] else 0) + sum(
                n * t.itemsize for t, t0, n in zip((k, v), inputs[1:], (kv_numel, v_numel), strict=True)
                if t is not t0)
            copies = kv_numel * (inputs[1].itemsize + inputs[2].itemsize) if rep and kv_heads > 1 else 0
            self.attn_internal = copies + math_attention_internals(
                b, heads, heads if rep else kv_heads, s, head_dim, q.itemsize, attn_dropout,
                causal=not masked, casts=casts, q_copied=not contiguous_q and b > 1 and heads > 1 and s > 1,
                value_dim=value_dim)
            if masked:  # the boolean mask converted to an additive one in q's dtype, not kept
                self.attn_internal += b * s * s * q.itemsize
            if rep:
                # the repeated v is contiguous: its fp32 copy (or, in fp32, the repeat itself) is what
                # probs @ v keeps, not a transient
                self.attn_internal -= (full * FP32 if q.itemsize != FP32 else
                                       full * inputs[2].itemsize if kv_heads > 1 else 0)
            if not self.compiled_here():
                # torch's CPU math kernel computes in fp32 whatever the input dtype; compiled, its
                # decomposition (`_scaled_dot_product_attention_math`) keeps the inputs' dtype
                cb = FP32
        qc, kc, vc = (self.new(n, cb, t.grad) for t, n in zip((q, k, v), (full, full, vfull), strict=True))
        # (contiguous, repeated copies)
        if eager and kv_heads == 1 and heads > 1 and b == 1:
            # one k/v head and one sequence: repeat_kv's expand-and-reshape, and matmul's batching of
            # it, stay views, so k and v are kept as they are, unless autocast's cast copies one (at
            # every head: the cast of an expanded view is laid out in full)
            kc = k if k is k_in else kc
            vc = v if v is v_in_t else vc
        if (not eager and masked and kv_heads == 1 and heads > 1 and b == 1 and v is v_in_t
                and v.itemsize == FP32):
            # the math fallback given a mask: repeat_kv's expanded view of one k/v head batches for
            # probs @ v as it is (one sequence; fp32, so no upcast copies it): the product keeps v
            # itself
            vc = v
        if eager and contiguous_q:
            # a (b, heads, s, d)-contiguous q (Phi-3's rotary concatenation, or autocast's cast of it)
            # batches for the score matmul as a view: the matmul keeps q itself
            qc = q
        if eager and contiguous_k and kv_heads == heads and k.itemsize == kc.itemsize:
            kc = k  # likewise k, when no cast copied it
        if (fused is not None and (b == 1 or heads == 1) and vc.itemsize == fused.itemsize
                and kv_heads in (1, heads) and (eager or masked or kv_heads == heads)):
            # one sequence (or one head): slices of the fused projection reshape for bmm without a
            # copy, and keeping one keeps the whole fused output (eager uses q and k so too; the
            # math kernel scales copies of them). repeat_kv from several k/v heads copies v instead,
            # and so does the math kernel's own repeat (`enable_gqa`, no mask) from one.
            vc = fused
            if eager and qc.itemsize == fused.itemsize and q.key == fused.key:  # q a slice too (GPT-2)
                qc = kc = fused
        if kc.grad:
            self.save(qc, kernel=True)  # q @ k^T keeps q for k's gradient and k for q's
        if qc.grad:
            self.save(kc, kernel=True)
        if softcap and (qc.grad or kc.grad):
            self.save(self.new(probs, cb, True))  # tanh(scores / cap) keeps its output
        # eager softmax runs in fp32 (an explicit dtype, or autocast's fp32 list); GPT-2's has no
        # dtype, so without autocast it runs in the scores' dtype. The math kernel's runs in `cb`
        # (fp32 on CPU) and, compiled (its inputs' dtype), in autocast's fp32
        soft = FP32 if (eager and softmax_fp32) or self.cond.autocast else cb
        p = self.new(probs, soft, qc.grad or kc.grad)
        if p.grad:
            self.save(p, kernel=True)  # softmax keeps its output (a reduction's: never recomputed)
        self.attn_tail_start()
        # the forward's moments inside the core: SDPA's math kernel for every family, eager attention
        # for the families that run transformers' shared function (not GPT-2's own)
        moments = not eager or (softmax_fp32 and not masked)
        if eager:
            # back to the query's dtype (GPT-2: the value's) as the module wrote it, dropout there,
            # and autocast's matmul makes the 16-bit copy that probs @ v keeps
            pw = self.cast(p, q_in if softmax_fp32 else v_in) if cast_probs else p
            if moments:
                dropped, bound = self.eager_moments((q0, k0, v0), (qc, kc, vc), p, pw, attn_dropout, heads,
                                                    kv_heads, head_dim)
            else:
                dropped = self.dropout_op(pw, attn_dropout)
            self.attn_weights = dropped  # returned beside the output, alive until the module returns
            # the product's (b, heads, s, d) output, before the transpose's contiguous copy
            self.attn_internal = vfull * max(q.itemsize, v.itemsize) if heads > 1 and s > 1 else 0
            p = self.cast(dropped, 2) if self.cond.autocast else dropped
            if moments:
                self.eager_output_moment(v0, bound, vc, dropped, p, heads, value_dim or head_dim)
                self.hold(dropped)  # the attention weights it returns: the layer binds them to `_`
        else:
            soft_p = p
            p = self.dropout_op(self.cast(p, cb), attn_dropout)
            if moments:
                if fused is not None:  # slices of the fused output (v; GPT-2's q and k too): the
                    # kernel upcasts each slice
                    q, k, v = (Tensor(n, t.itemsize, t.grad, t.key) if t.key == fused.key else t
                               for t, n in zip((q, k, v), (full, b * kv_heads * s * head_dim,
                                                           b * kv_heads * s * (value_dim or head_dim)),
                                               strict=True))
                kernel_kv, repeats = (k, v), ()
                if masked and kv_heads < heads:
                    kernel_kv, repeats = self.repeated_kv((k_in, v_in_t), full, kv_heads)
                self.math_moments((q0, k0, v0), (q, *kernel_kv), (qc, vc), soft_p, p, heads,
                                  heads if masked else kv_heads, head_dim, contiguous_q, fused is not None,
                                  b * s * s * q.itemsize if masked else None, repeats,
                                  v_contiguous=masked and kv_heads < heads, value_dim=value_dim)
        # a compiled math kernel under autocast rebuilds the dropped 16-bit probabilities from the
        # fp32 softmax output and the dropout mask it keeps; in one dtype it keeps them (both seen in
        # the partitions torch 2.13 makes for GPT-2 on CPU; the rule for the difference is not known)
        rebuilt = self.compiled_here() and not eager and attn_dropout > 0 and soft != cb
        if vc.grad:  # probs @ v keeps the probabilities for v's gradient, v for theirs
            self.save(p, kernel=not rebuilt)
        if p.grad:
            self.save(vc, kernel=True)
        if eager and not self.cond.autocast and (b == 1 or heads == 1):
            # for one sequence or one head the matmuls read q, k and v as they are: a saved operand
            # is the module's tensor itself, which its locals hold then as saved
            for t0, tc in ((q0, qc), (k0, kc), (v0, vc)):
                if tc.key in self.saved and t0.numel == tc.numel and t0.itemsize == tc.itemsize:
                    self.saved.setdefault(t0.key, (0, self.section))
        if p.grad or vc.grad:
            # probs @ v's backward runs with the core's later saves still alive (`value_product_backward`)
            self.pv_backward[self.section] = self._saved_total - self._attn_from + value_product_backward(
                vfull, probs, self.cond.device, max(p.itemsize, vc.itemsize) if eager else None)
        out = self.new(vfull, max(q.itemsize, v.itemsize), grad)  # contiguous (b, s, heads * hd)
        if eager:
            self.peak_at(eager_output_transient(self, k_in, kv_heads, heads, full, out.nbytes))
        else:
            b_s = b * s
            # v upcast is what probs @ v keeps when the kernel does not repeat it and bmm can read it
            # as it is: the upcast keeps v's transposed (b, s, heads, d) layout, which reshapes to
            # (b x heads, s, d) without a copy only for one sequence or one head
            v_kept = kv_heads == heads and (b == 1 or heads == 1)
            self.peak_at(self.unsaved(*self.args) + math_kernel_transient(
                b_s * heads * head_dim, b_s * kv_heads * head_dim, b * heads * s * s, s * s,
                q_in if not self.cond.autocast or q_in == 2 else 2, q_in, kv_heads, heads,
                not contiguous_q and b > 1 and heads > 1 and s > 1,
                masked, v_kept, out_full=vfull))
        return out

    def sink_attention(self, q: Tensor, k: Tensor, v: Tensor, heads: int, kv_heads: int, head_dim: int,
                       attn_dropout: float, sinks_train: bool) -> Tensor:
        """GPT-OSS's `eager_attention_forward`, op by op: k and v repeated to every head (`repeat_kv`:
        copies from several k/v heads, an expanded view of one), the scores q @ k^T scaled and
        masked, each head's sink logit concatenated as one more column (b, heads, s, s + 1), the
        row maxima subtracted (max keeps its int64 indices), softmax in that dtype (it keeps its
        output), the sink column dropped (a view), dropout, the cast to v's dtype (a copy under
        autocast, where v is 16-bit and the scores fp32 through the mask), then probs @ v and its
        transposed contiguous copy. Returns the (b, s, heads * head_dim) output.

        q and k come from the rotary embedding's concatenation, (b, heads, s, d)-contiguous: the score
        matmul reads them as views. Under autocast both matmuls keep 16-bit copies of their operands.
        The softmax's inputs are promoted by the additive mask (the embeddings' dtype) and by the
        sinks (the weights' dtype). Source: transformers 5 `models/gpt_oss/modeling_gpt_oss.py`.
        """
        b, s = self.cond.batch_size, self.cond.seq_len
        auto = self.cond.autocast
        grad = q.grad or k.grad or v.grad
        self.attention_without_grad += not grad
        self.attn_weights, self.attn_internal = None, 0
        full, scores_n, probs_n = b * heads * s * head_dim, b * heads * s * s, b * heads * s * (s + 1)
        q0, k0, v0 = q, k, v

        kr, vr, qo, ko = self.sink_operands(q, k, v, heads, kv_heads, full)
        if ko.grad:
            self.save(qo)
        if qo.grad:
            self.save(ko)
        cb = qo.itemsize if auto else max(q.itemsize, k.itemsize)
        mask_bytes = FP32 if auto else self.cond.weight_bytes
        ldt = max(cb, mask_bytes, self.cond.weight_bytes)  # the scores with the mask and the sinks
        logits_grad = qo.grad or ko.grad or sinks_train
        live = [t for t in (q0, k0, v0, kr, vr) if t.key not in self.saved]
        masked = scores_n * max(cb, mask_bytes)
        self.moment(*live, extra=scores_n * (2 * cb))  # the matmul's output and its scaled copy
        self.moment(*live, extra=scores_n * cb + masked)  # the mask's sum
        # the shifted logits: the concatenation, its row maxima and their difference, beside the
        # masked scores (bound as `attn_weights` until the probabilities replace them)
        self.moment(*live, extra=masked + 2 * probs_n * ldt + b * heads * s * ldt)
        if logits_grad:
            self.save(self.new(b * heads * s, INT64, False))  # max's indices
        p = self.new(probs_n, ldt, logits_grad)
        if p.grad:
            self.save(p)  # softmax keeps its output
        self.attn_tail_start()
        # the shifted logits (`combined_logits`) stay bound until the function returns
        shifted = self.new(probs_n, ldt, False)
        live.append(shifted)
        self.moment(*live, p, extra=masked)  # softmax
        # the sink column dropped: a view of the probabilities (b, heads, s, s), strided rows
        view = Tensor(scores_n, ldt, p.grad, p.key)
        dropped = self.dropout_op(view, attn_dropout)
        if dropped is view:
            dropped = p  # no copy: the view keeps the softmax's output
        else:
            self.moment(*live, p, dropped, extra=masked)
        w = self.cast(dropped, v.itemsize) if dropped.itemsize != v.itemsize else dropped
        if w is not dropped:
            w = self.new(scores_n, v.itemsize, dropped.grad)
            self.moment(*live, p, dropped, w, extra=masked)
        self.attn_weights = w  # returned beside the output, alive until the module returns
        wo = self.cast(w, 2) if auto and w.itemsize != 2 else w
        vo = self.cast(vr, 2) if auto else vr
        if vo is v0 and b > 1 and heads > 1:
            vo = self.new(full, v.itemsize, v.grad)  # v's strided layout (or expanded view): bmm copies it
        if vo.grad:
            self.save(wo)
        if wo.grad:
            self.save(vo)
        ob = max(wo.itemsize, vo.itemsize)
        out = self.new(full, ob, grad)
        self.moment(*live, w, extra=2 * full * ob)
        self.attn_internal = full * ob + shifted.nbytes
        self.peak_at(self.unsaved(*self.args, w, kr, vr, shifted) + 2 * full * ob)
        return out

    def sink_operands(self, q: Tensor, k: Tensor, v: Tensor, heads: int, kv_heads: int,
                      full: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """GPT-OSS's eager attention's k and v repeated to every head (`repeat_kv`: a copy from several
        k/v heads, an expanded view of one), and the score matmul's operands: autocast's 16-bit copies
        (at every head), else q and the repeated k themselves (contiguous), but for one k/v head over
        several sequences, whose expanded view bmm copies. Returns (k, v repeated, q and k operands)."""
        auto, b = self.cond.autocast, self.cond.batch_size

        def repeated(t: Tensor) -> Tensor:
            return self.new(full, t.itemsize, t.grad) if 1 < kv_heads < heads else t

        kr, vr = repeated(k), repeated(v)
        qo = self.cast(q, 2) if auto else q
        if auto:
            ko = self.new(full, 2, k.grad) if kv_heads < heads and k.itemsize != 2 else self.cast(kr, 2)
        else:
            ko = self.new(full, k.itemsize, k.grad) if kv_heads == 1 < heads and b > 1 else kr
        return kr, vr, qo, ko

    def eager_moments(self, inputs: tuple[Tensor, Tensor, Tensor], operands: tuple[Tensor, Tensor, Tensor],
                      p: Tensor, pw: Tensor, attn_dropout: float, heads: int, kv_heads: int,
                      head_dim: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        """transformers' `eager_attention_forward`, op by op, as the forward's moments: repeat_kv's
        copies of k and v (from several k/v heads; from one it is a view), the scores (scaled, plus
        the mask: promoted to the mask's dtype, fp32 under autocast), softmax's fp32 copy of them when
        they are 16-bit and its fp32 output, the cast back to the query's dtype (`pw`), then dropout's
        mask (the input's dtype on CPU, one byte on CUDA) and output, which it returns with the
        tensors still bound when probs @ v runs (`eager_output_moment`). Dropout saves
        its mask after the softmax's moments. A recomputed layer reaches the same
        moments beside the attention module's locals (`args`), q and k among them unless the matmul
        reads them as they are (then `qc` and `kc` stand for them).

        What the q @ k^T matmul works on (`operands`, the walk's saved copies) is q or k itself when
        no copy is needed: without autocast, a repeated k (contiguous) or, for one sequence or one
        head, the projection's transposed view reshapes for bmm as it is.
        """
        b, s = self.cond.batch_size, self.cond.seq_len
        q0, k0, v0 = inputs
        qc, kc, _ = operands
        full = b * heads * s * head_dim
        copies = 1 < kv_heads < heads
        rep_k = self.new(full, k0.itemsize, False) if copies else None
        rep_v = self.new(full, v0.itemsize, False) if copies else None
        live = [v0] + ([rep_v] if rep_v else [])
        if self.cond.autocast or not (b == 1 or heads == 1):
            live.append(q0)
        if self.cond.autocast or copies or not (b == 1 or heads == 1):
            live.append(k0)
        if rep_k and self.cond.autocast:
            live.append(rep_k)
        if not self.cond.autocast:
            # for one sequence or one head the matmul reads q and k as they are (`qc`, `kc` stand for
            # them), and a repeated k is repeat_kv's local; otherwise they are the matmul's own
            # contiguous copies, alive past it only when saved (q's for k's gradient, k's for q's)
            view = b == 1 or heads == 1
            live += [t for t, kept in ((qc, view or kc.grad), (kc, view or copies or qc.grad)) if kept]
        # (autocast's 16-bit casts of q and k are the matmul's own: alive past it only when saved,
        # and the saved ones are counted as such)
        probs = b * heads * s * s
        scores = probs * (FP32 if self.cond.autocast else max(q0.itemsize, self.cond.weight_bytes))
        upcast = probs * FP32 if scores != probs * FP32 else 0
        module_locals = tuple(a for a in self.args if a.key not in (q0.key, k0.key))

        def at(*tensors: Tensor, extra: int) -> None:
            self.moment(*tensors, extra=extra)
            self.peak_at(self.unsaved(*module_locals, *tensors) + extra)

        at(*live, p, extra=scores + upcast)  # softmax
        if pw is not p:
            at(*live, p, pw, extra=scores)  # .to(query.dtype)
        dropped = self.dropout_op(pw, attn_dropout)
        if dropped is not pw:
            noise = 0 if pw.grad else probs * (1 if self.cond.device == "cuda" else pw.itemsize)
            at(*live, pw, dropped, extra=noise)
        if self.cond.autocast:
            # q and k (fp32 from the rotary embedding) and repeat_kv's fp32 copy of k; autocast's
            # 16-bit casts for the score matmul are freed after it unless saved
            return dropped, (v0, q0, k0) + ((rep_k,) if rep_k else ())
        return dropped, tuple(t for t in live if t is not rep_v)

    def eager_output_moment(self, v0: Tensor, bound: tuple[Tensor, ...], vc: Tensor, weights: Tensor,
                            wa: Tensor, heads: int, head_dim: int) -> None:
        """probs @ v and its transposed contiguous copy: the weights (and autocast's 16-bit copy),
        v as the matmul reads it, and the output twice (b, heads, s, d then (b, s, heads, d)), beside
        what is bound since the scores (`bound`, from `eager_moments`): q, k, v and repeat_kv's
        copies, which stay bound until the function returns (under autocast q and k are fp32, the
        rotary embedding's products). In a layer with no gradient through its attention none of them
        is saved (q, k and the repeated k are alive beside them)."""
        b, s = self.cond.batch_size, self.cond.seq_len
        full = b * heads * s * head_dim
        # what the product reads: repeat_kv's copy of v (from several k/v heads), bound, 16-bit under
        # autocast too; else a contiguous copy of v, and autocast's 16-bit copy of the weights, the
        # product's own, kept only when it saves them (it does so after this moment)
        repeated = vc.numel == full and v0.numel != full
        live = [*bound, weights] + ([vc] if repeated or wa.grad else []) + ([wa] if vc.grad else [])
        itemsize = 2 if self.cond.autocast else max(weights.itemsize, vc.itemsize)
        self.moment(*live, extra=2 * full * itemsize)

    def repeated_kv(self, kv: tuple[Tensor, Tensor], full: int,
                    kv_heads: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, ...]]:
        """k and v as SDPA gets them with a mask: transformers repeats them to every head first
        (`repeat_kv`: copies from several k/v heads, bound in `sdpa_attention_forward`; an expanded
        view of one, sharing its storage), then autocast casts each to 16 bits, laid out in full.
        Returns the kernel's k and v, and the repeat copies."""
        kernel, repeats = [], []
        for t in kv:
            if kv_heads > 1:
                rep = self.new(full, t.itemsize, t.grad)
                repeats.append(rep)
            else:
                rep = Tensor(full, t.itemsize, t.grad, t.key)
            if self.cond.autocast and t.itemsize != 2:
                rep = self.new(full, 2, t.grad)
            kernel.append(rep)
        return (kernel[0], kernel[1]), tuple(repeats)

    def math_moments(self, inputs: tuple[Tensor, Tensor, Tensor], args: tuple[Tensor, Tensor, Tensor],
                     operands: tuple[Tensor, Tensor], p: Tensor, dropped: Tensor, heads: int,
                     kv_heads: int, head_dim: int, contiguous_q: bool = False,
                     fused_v: bool = False, mask_bytes: int | None = None,
                     repeats: tuple[Tensor, ...] = (), v_contiguous: bool = False,
                     value_dim: int = 0) -> None:
        """torch's math SDPA kernel (`_scaled_dot_product_attention_math`, which CPU runs when attention
        dropout is on), op by op, as the forward's moments.

        It holds the module's q, k, v (`inputs`), the arguments it was given (`args`: autocast's 16-bit
        copies), fp32 copies of 16-bit ones, q scaled (`operands[0]`), the causal mask made fp32
        (s x s), k and v repeated to every head (`enable_gqa`: copies from fewer k/v heads, else the
        fp32 ones themselves; v's is `operands[1]`), q scaled in its transposed layout beside the
        contiguous copy the score matmul makes of it (several sequences and heads), then the scores
        and softmax's output; dropout's
        mask (fp32 on CPU) and output; last the output (fp32), and, for a 16-bit query, both results
        cast back (the probabilities first: the arguments of its return are built right to left).
        `contiguous_q`: q is (b, heads, s, d)-contiguous (Phi-3's rotary concatenation), so the score
        matmul reads its scaled copy as a view; `fused_v`: v is a slice of Phi-3's fused projection,
        whose whole output stays alive (`inputs[2]`; `args[2]` is the slice the kernel upcasts).
        Given a mask (a sliding window no longer than the sequence), the kernel builds no causal
        mask but converts the boolean one to an additive one (`mask_bytes`: b x s x s in q's dtype),
        and gets k and v already repeated to every head (`repeated_kv`; `repeats`: the copies), laid
        out contiguous (`v_contiguous`: v's fp32 copy is then what probs @ v keeps).
        """
        b, s = self.cond.batch_size, self.cond.seq_len
        full, probs = b * heads * s * head_dim, b * heads * s * s
        out = b * heads * s * (value_dim or head_dim)  # the output (latent attention's v heads differ)
        qc, vc = operands
        acc = [t if t.itemsize == FP32 else self.new(t.numel, FP32, False) for t in args]
        live = [*inputs, *repeats, *args, acc[0], acc[1], qc]
        if kv_heads < heads:
            live += [acc[2], self.new(full, FP32, False), vc]
        elif b == 1 or heads == 1 or v_contiguous:
            # bmm reads v's fp32 copy (or v) as it is: that is what it keeps (a slice of a fused
            # output keeps the whole output alive)
            live = [t for t in live if t.key != acc[2].key or (fused_v and t is inputs[2])] + [vc]
        else:  # the fp32 copy keeps v's transposed layout: bmm copies it contiguous (`vc`)
            live += [acc[2], vc]
        if args[1].grad and b > 1 and heads > 1 and s > 1 and not contiguous_q:
            # q scaled keeps q's transposed layout, so the score matmul's (b x heads, s, d) reshape
            # copies it: `qc` is that copy, saved for k's gradient; the strided product stays bound
            # in the kernel (without k's gradient the copy is freed after the matmul instead)
            live.append(self.new(full, FP32, False))
        mask = (s * s * FP32 if s > 1 else 0) if mask_bytes is None else mask_bytes
        self.moment(*live, p, extra=mask + probs * FP32)  # softmax, beside the scores
        noise = 0 if p.grad else probs * FP32
        self.moment(*live, p, dropped, extra=mask + noise)
        origin = args[0].itemsize
        cast = (probs + out) * origin if origin != FP32 else 0
        self.moment(*live, dropped, extra=mask + out * FP32 + cast)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, alive: tuple[Tensor, ...] = (),
             cast_back: bool = False, halves: bool = False, interleaved: bool = False) -> Tensor:
        """x * cos + rotate_half(x) * sin: the products keep cos and sin (shared by all layers).

        A forward moment at the second product: x * cos, rotate_half(x) and its product with sin
        (in the wider of x's and cos's dtypes) beside `alive`, what the attention module holds then
        (its projections; x itself among them unless it is a slice of a fused output). A recompute
        reaches the same moment: under autocast x is 16-bit and cos fp32, so the three fp32 products
        are six times a 16-bit q and can set a checkpointed step's peak.
        `cast_back`: the sum is cast back to x's dtype (OLMo 2's fp32 cos and sin), a copy when wider.
        `halves`: GPT-OSS's form, x's two halves each times cos and sin (head_dim / 2 wide), the
        rotated halves concatenated: at most four half-size products, or both rotated halves and
        their concatenation, alive at once (2 x the output); the output is (b, heads, s, d)-contiguous.
        `interleaved`: DeepSeek's rotation of the even and odd elements (`rope_interleave`): each half
        of the result is a difference or sum of two half-sized products, the first half alive beside
        the second's two products and their sum, then both halves beside their concatenation: twice
        the output at most.
        """
        if x.grad:
            self.save(cos, sin)
        out = self.pointwise(x.numel, max(x.itemsize, cos.itemsize), x.grad, x, cos, sin)
        temps = (2 if halves or interleaved else 3) * out.nbytes
        self.moment(*alive, extra=temps)
        self.peak_at(self.unsaved(*self.args, *alive) + temps)
        if cast_back and out.itemsize != x.itemsize:
            back = self.cast(out, x.itemsize)
            self.moment(*alive, out, back)
            self.peak_at(self.unsaved(*self.args, *alive, out, back))
            return back
        return out


def recompute_frontier(t: Tensor, saved: dict[int, object],
                       region_start: int = 0) -> tuple[Tensor, ...] | None:
    """What a compiled graph saves instead of the pointwise result `t`: the tensors backward
    recomputes it from, when keeping them costs less than keeping `t`; None to keep `t`.

    torch.compile's AOTAutograd splits the joint forward-backward graph with a min cut
    (`min_cut_rematerialization_partition` / `solve_min_cut` in torch/_functorch/partitioners.py):
    pointwise ops and casts are recomputable (`get_default_op_list`: `pointwise_ops()`, views),
    while matmuls and attention (`compute_intensive_ops`), random ops (dropout's draw) and
    reductions (an output 4x smaller than its inputs, `ban_recompute_reductions`) never are; nor is
    a tensor a kernel's backward reads (`is_materialized_backwards`: the caller's `kernel` save).
    The cut's weights (`get_node_weight`): a tensor's bytes, doubled for one only pointwise ops read
    (inductor would fuse it away, so keeping it costs a write and a read); a kernel's output or the
    graph's input counts once. Here, walking back from `t` through its `sources`, each tensor is
    free when already saved, else kept at its weight or rebuilt from its own sources, whichever
    weighs less; a tensor made before the compiled region (`region_start`: the graph's input) is
    not rebuilt inside it. Ties keep the tensor.
    Examples: RMSNorm's normalised fp32 tensor (rebuilt from the saved input and 1/rms), SwiGLU's
    silu(gate) (from the saved gate projection), GPT-2's tanh-GELU chain (from c_fc's output), the
    residual sum a norm reads (from the layer's input and the output projection's result).
    Assumption: a greedy walk in forward order, without the partitioner's bias towards tensors made
    near backward (`dist_from_bw`); it agrees with the partition torch 2.13 makes for the decoder
    layers the tests compile (`tests/test_compile.py`).
    """
    if t.sources is None or t.key in saved or t.key < region_start:
        return None
    memo: dict[int, dict[int, Tensor]] = {}

    def weight(u: Tensor) -> int:
        fused = u.sources is not None and u.key >= region_start
        return u.nbytes * (2 if fused else 1)

    def cheapest(u: Tensor) -> dict[int, Tensor]:
        if u.key in saved:
            return {}
        if u.sources is None or u.key < region_start:
            return {u.key: u}
        if u.key not in memo:
            rebuilt: dict[int, Tensor] = {}
            for s in u.sources:
                rebuilt.update(cheapest(s))
            memo[u.key] = rebuilt if sum(map(weight, rebuilt.values())) < weight(u) else {u.key: u}
        return memo[u.key]

    rebuilt: dict[int, Tensor] = {}
    for s in t.sources:
        rebuilt.update(cheapest(s))
    return tuple(rebuilt.values()) if sum(map(weight, rebuilt.values())) < weight(t) else None


def compiled_section(mode: str, in_layer: bool) -> bool:
    """Whether a part of the model runs as a compiled graph under `--compile mode`: `layers`
    compiles each decoder layer, `model` everything.

    A checkpointed decoder layer is compiled too: dynamo traces `torch.utils.checkpoint` as a
    higher-order op whose backward recomputes the layer's compiled forward, so the recompute keeps
    the compiled saved set. Not modelled: a layer whose forward mutates state outside the op (with
    the `kernels` package installed, transformers' hub-kernel RMSNorm sets a context variable) breaks
    the graph there ("HOP: Unsafe side effect", torch/_dynamo/variables/higher_order_ops.py) and
    runs eagerly, eager's saved set; see the plan's note.
    """
    if in_layer:
        return mode in ("layers", "layers+loss", "model")
    return mode == "model"


def loss_compiled(mode: str) -> bool:
    """Whether the loss runs as a compiled graph: under `model` with the rest, and under
    `layers+loss` on its own (torchtune's compile=True: `training.compile_loss` in
    recipes/*_single_device.py; torchtune/training/_compile.py compiles
    `CEWithChunkedOutputLoss.compute_cross_entropy`, the upcast and cross-entropy of one chunk, or
    the whole loss module otherwise). Its input, the logits, comes from the eager head."""
    return mode in ("layers+loss", "model")


def compiled_loss_alone_backward(grad_numel: int, logits_itemsize: int) -> int:
    """What a loss compiled apart from the head (`--compile layers+loss`) holds in its backward
    beyond the saved tensors: the logits' gradient, numel x the logits' itemsize.

    Inductor fuses the whole cross-entropy backward (`exp(x - max - lse) * g`, minus g at the label,
    the upcast's cast back) into one kernel that reads the saved 16-bit logits and the two fp32
    statistics per row and writes the gradient in the logits' dtype: no fp32 buffer of the vocab's
    width is made (measured with the CPU allocator on torch 2.13 inductor,
    `tests/test_compile_loss.py`). Its forward saves the logits themselves (already alive) and the
    per-row max and log-sum-exp instead of the fp32 log-softmax, and never materialises the upcast.
    """
    return grad_numel * logits_itemsize


def compiled_loss_backward(logits_numel: int, logits_itemsize: int) -> int:
    """What the standard loss's backward holds beyond the saved tensors when the loss is compiled
    with the model: numel x (fp32 + the logits' itemsize).

    The compiled backward computes log-softmax's gradient in fp32 from the saved logits and the
    row statistics (`exp(x - max - lse) * g - ...`, a `sub` over the upcast logits) and casts it to
    the logits' dtype for the head's matmul backward; both buffers exist at once. Eager's two fp32
    gradients (log-softmax's and the upcast's) are the same bytes in fp32; under autocast the second
    is 16-bit. Its forward never makes the fp32 copy of the logits (`Profile.logits_fp32` 0): the
    upcast is fused into the loss's kernels.
    """
    return logits_numel * (FP32 + logits_itemsize)


def explicit_causal_mask(cond: Conditions) -> bool:
    """Whether SDPA is handed an explicit mask where a plain causal run would get none: packed
    documents (block-diagonal), and a whole-model compile. transformers skips the causal mask only
    outside tracing (`masking_utils._ignore_causal_mask_sdpa`: torch before 2.14 reads
    `is_exporting()` as True under dynamo), so a compiled model builds the (b, 1, s, s) mask, and
    SDPA then gets k and v repeated to every head (`sdpa_mask_bytes`, `Graph.attention`)."""
    return cond.packed or cond.compile == "model"


def dropout_mask_bytes(device: str, itemsize: int, compiled: bool) -> int:
    """Bytes per element of dropout's saved mask: eager CUDA's bool, eager CPU's input dtype
    (`native_dropout`); a compiled graph's bool (inductor's decomposition draws `rand < 1 - p`, a
    bool tensor, torch/_decomp/decompositions.py `native_dropout`)."""
    return 1 if device == "cuda" or compiled else itemsize


def recompute_stop_transient(cond: Conditions, in_numel: int, out_numel: int, wrapped: bool) -> int:
    """What a recomputed dense layer holds, beyond its saved tensors and the down projection's input,
    when its recompute stops: once the last saved tensor is recomputed (torch's non-reentrant
    checkpoint, early stop), which is the down projection's. Without LoRA that is its matmul, before
    its output; with LoRA, lora_B's matmul, after the base layer's output (tokens x hidden, compute
    dtype) and, when PEFT cast the 16-bit input to the adapter's fp32 (autocast), that fp32 copy. The
    LoRA output, its scaled copy and the residual sum are never made again.
    """
    if not wrapped:
        return 0
    # under autocast lora_A keeps a 16-bit copy of its input: LoRA dropout's fp32 output, which the
    # recompute stops beside (lora_A's output is the last save), is alive and unsaved there too
    dropped = in_numel * FP32 if cond.lora_dropout > 0 and (cond.autocast or cond.adapter_autocast) else 0
    if cond.adapter_bytes:  # fp32 adapters over a 16-bit base: PEFT's fp32 copy of the input,
        # unsaved when autocast's 16-bit copy of it is what lora_A keeps
        return out_numel * cond.compute_bytes + (in_numel * FP32 if cond.adapter_autocast else 0) + dropped
    return out_numel * cond.compute_bytes + (in_numel * cond.weight_bytes if cond.autocast else 0) + dropped


def gpt2_recompute_stop(g: Graph, h: Tensor, act: Tensor, attn_out: Tensor, out_numel: int,
                        wrapped: bool) -> int:
    """What a recomputed GPT-2 layer holds beyond its saved tensors when its recompute stops at the
    MLP's output projection (c_proj), its last save when no residual dropout follows.

    GPT2Block binds the MLP's normed input (`hidden_states`) and the attention's output
    (`attn_output`) until it returns, and GPT2MLP the GELU's output, c_proj's input; those no op
    saved are alive. c_proj's own part is `recompute_stop_transient`: with LoRA, the base layer's
    output and, under autocast, PEFT's fp32 copy of the 16-bit input; lora_B's output, its scaled copy
    and their sum are never made again. Assumption: transformers 5's GPT2Block and GPT2MLP, PEFT's
    LoRA on Conv1D, torch's non-reentrant checkpoint with early stop; measured with the tracer (GPT-2
    LoRA on all linear layers under amp, checkpointed).
    """
    return g.unsaved(h, act, attn_out) + recompute_stop_transient(g.cond, act.numel, out_numel, wrapped)


def gpt2_model_locals(g: Graph, spec: ModelSpec, embeds: Tensor, ids: Tensor) -> tuple[Tensor, ...]:
    """What GPT2Model's forward binds until it returns, beside the layers: the token embeddings
    (`inputs_embeds`, b x s x hidden), the position ids (s int64), the position embeddings
    (`position_embeds`, s x hidden: one sequence, broadcast over the batch) and, under eager attention,
    the causal mask (`forward_mask_bytes`). Their sum, the first layer's input, is the caller's.
    Assumption: transformers 5's GPT2Model; measured with the tracer (a wide-MLP GPT-2 LoRA step under
    amp without checkpointing, whose forward peaks inside the last layer's MLP).
    """
    return (embeds, ids, g.new(g.cond.seq_len * spec.hidden_size, g.cond.weight_bytes, False),
            g.new(forward_mask_bytes(spec, g.cond), 1, False))


def mlp_output_pending(cond: Conditions, numel: int, wrapped: bool) -> int:
    """Gradients a dense (or GPT-2) layer's backward has made when it first needs the layer's saved
    tensors (the down projection's, GPT-2's c_proj's): alive through a checkpointed layer's
    recompute, beside the residual stream's.

    Under autocast the MLP's 16-bit output was added to the fp32 residual stream: the add's backward
    casts the incoming gradient to 16 bits (tokens x hidden). A LoRA-wrapped down projection scales
    its adapter's output by a Python float, whose backward saves nothing and runs first: the scaled
    gradient (tokens x hidden, compute dtype) waits too. Assumption: transformers 5's dense and
    GPT-2 MLPs, PEFT's `lora_B(lora_A(x)) * scaling`; measured with the tracer.
    """
    if wrapped and cond.adapter_bytes and not cond.adapter_autocast:
        # fp32 adapters, no autocast: the sum PEFT cast back to 16 bits gets an fp32 gradient; the
        # base output's is cast to 16 bits, the adapter's scaled in fp32, and a second 16-bit copy
        # waits beside them (measured with the tracer: two tokens x hidden 16-bit casts and one fp32)
        return numel * (2 * cond.weight_bytes + FP32)
    if wrapped and cond.dora and cond.autocast:
        # DoRA under autocast: the fp32 sum PEFT cast back gets an fp32 gradient, the base output's
        # is cast to 16 bits, and the scaled branch's is fp32 (promoted by the fp32 magnitude)
        return numel * (2 + FP32 + 2 + FP32)
    return numel * cond.compute_bytes * ((1 if cond.autocast else 0) + (1 if wrapped else 0))


def math_attention_internals(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int, itemsize: int,
                             dropout: float, causal: bool, casts: int, q_copied: bool = True,
                             value_dim: int = 0) -> int:
    """What torch's math SDPA kernel (the CPU fallback under attention dropout) holds at its end,
    beyond its inputs, the tensors it saved and its output, all freed when it returns.

    `_scaled_dot_product_attention_math` upcasts 16-bit q, k and v to fp32 (heads, kv heads, kv heads
    x (b x s x head_dim) x 4 B), scales q (a new fp32 tensor, which the matmul then copies
    contiguous and keeps when `q_copied`: several sequences, heads and positions; otherwise the
    scaled q itself is kept), builds the causal mask (s x s fp32) when it is given none, repeats k to
    every head for grouped-query attention (k^T's scaled copy is what it keeps), and ends with the
    probabilities @ v product in fp32, cast back to the input's dtype; with a 16-bit input it also
    makes a 16-bit copy of the dropped probabilities. `casts`: autocast's 16-bit copies of q, k and v
    made for the call (the kernel keeps fp32 copies instead). Measured op by op with the tracer
    (torch 2.13, CPU); the scores and their masked sum are freed by the softmax. `value_dim`: v's
    and the output's head size where it is not q's (latent attention; 0: `head_dim`).
    """
    full, kv = batch * heads * seq * head_dim, batch * kv_heads * seq * head_dim
    vd = value_dim or head_dim
    v, out = kv * vd // head_dim, batch * heads * seq * vd
    half = itemsize != FP32
    return (casts + ((full + kv + v) * FP32 if half else 0) + (full * FP32 if q_copied else 0)
            + (seq * seq * FP32 if causal else 0) + (full * FP32 if kv_heads < heads else 0)
            + (batch * heads * seq * seq * itemsize if half and dropout > 0 else 0)
            + (out * FP32 if half else 0))


def sdpa_mask_bytes(batch: int, heads: int, seq: int, itemsize: int, device: str) -> tuple[int, int]:
    """(mask, log-sum-exp) bytes a fused SDPA kernel keeps when it is given an explicit mask.

    transformers hands SDPA a boolean (b, 1, s, s) mask when a sliding window is no longer than the
    sequence (`masking_utils._ignore_causal_mask_sdpa`); torch converts it to an additive mask in
    the query's dtype (`convert_boolean_attn_mask`: b x s x s x itemsize) and the kernel keeps it
    for backward. On CUDA the mask rules out flash attention: the memory-efficient kernel runs, which
    pads the mask's rows to a multiple of 8 elements when they are not (`preprocess_mask`: s + 8 -
    s % 8) and its fp32 log-sum-exp to a multiple of 32 queries (`kAlignLSE`). On CPU the flash
    kernel takes the mask as it is, with a log-sum-exp of one fp32 per query and head.
    """
    if device == "cuda":
        row = seq if seq % 8 == 0 else seq + 8 - seq % 8
        return batch * seq * row * itemsize, batch * heads * (-(-seq // 32) * 32) * FP32
    return batch * seq * seq * itemsize, batch * heads * seq * FP32


def _layers_prefix(spec: ModelSpec) -> str:
    return "transformer.h" if spec.family == "gpt2" else "model.layers"


def _decoder_layer(g: Graph, spec: ModelSpec, i: int, x: Tensor, rot: tuple[Tensor, Tensor] | None) -> Tensor:
    """One decoder layer of `spec`'s family, as transformers 5 writes it."""
    H, hd = spec.hidden_size, spec.head_dim
    nh, nkv, inter = spec.num_heads, spec.num_kv_heads, spec.mlp_width(i)
    p = f"{_layers_prefix(spec)}.{i}"
    if spec.family == "gpt2":
        attn_drop, drop = g.rates[0], g.rates[1]
        h = g.layer_norm(x, f"{p}.ln_1", H)
        g.hold(h)  # GPT2Block's `hidden_states`, until the attention's output replaces it
        qkv = g.linear(h, f"{p}.attn.c_attn", H, 3 * H)
        qkv_view = Tensor(qkv.numel, qkv.itemsize, qkv.grad, qkv.key)  # q, k, v: views of one output
        # GPT2Attention binds q, k and v until it returns (after c_proj), GPT2Block `hidden_states`
        g.args = (h, qkv)
        a = g.attention(qkv_view, qkv_view, qkv_view, nh, nh, hd, attn_drop, fused=qkv_view,
                        softmax_fp32=False,
                        masked=explicit_causal_mask(g.cond) and g.cond.attention == "sdpa")
        a = g.dropout_op(g.linear(a, f"{p}.attn.c_proj", H, H), drop)
        x = g.add(x, a)
        g.release(h)
        # GPT2Block's `residual` and `attn_output` and, from eager attention, the weights it binds to `_`
        weights = (g.attn_weights,) if g.attn_weights is not None else ()
        g.hold(x, a, *weights)
        g.attn_tail_end()
        g.section += " mlp"
        h = g.layer_norm(x, f"{p}.ln_2", H)
        g.hold(h)  # the MLP's input, until the block returns
        # GPT2Block binds the attention's output (`attn_output`) until it returns: alive through the MLP
        g.args = (h, a, *weights)
        f = g.linear(h, f"{p}.mlp.c_fc", H, inter)
        # NewGELU: 0.5 * f * (1 + tanh(c * (f + 0.044715 f^3))): pow keeps f, tanh its output, the last
        # product both factors
        t = g.unary(g.unary(f, "input"), "output")
        act = g.mul(g.pointwise(f.numel, f.itemsize, f.grad, f), g.pointwise(t.numel, t.itemsize, t.grad, t))
        g.tail_start()
        out = g.linear(act, f"{p}.mlp.c_proj", inter, H)
        # c_proj's output beside its input: a recompute reaches it only when a residual dropout saves after
        g.peak_at(g.unsaved(h, act, out, a), after_saves=True)
        # a recompute that stops at c_proj's last save (lora_B's, or the base layer's) never makes its
        # output; the base output and PEFT's fp32 copy of the input may exist (`gpt2_recompute_stop`)
        g.peak_at(gpt2_recompute_stop(g, h, act, a, out.numel, f"{p}.mlp.c_proj" in g.wrapped))
        m = g.dropout_op(out, drop)
        # the residual dropout's mask, the layer's last save: it is saved as the product's input, so a
        # recompute stops before the dropped output exists
        g.peak_at(g.unsaved(h, out, a) if m is not out else 0)
        g.tail_end()
        g.args = ()
        # gradients waiting through the recompute: autocast's 16-bit cast of the residual gradient and,
        # without residual dropout (whose mask sets off the recompute first), LoRA's scaled branch's
        g.pending[f"layer {i}"] = mlp_output_pending(g.cond, out.numel,
                                                     f"{p}.mlp.c_proj" in g.wrapped and m is out)
        return g.add(x, m)
    gemma, offset = spec.family in GEMMA_FAMILIES, spec.offset_norms
    # OLMo 2 normalises only each block's output: attention and the MLP read the residual stream
    post_only = spec.norm_placement == "post"
    post_norms = spec.norm_placement in ("sandwich", "post")
    product = fp32_norm_product(spec)
    h = x if post_only else g.rms_norm(x, f"{p}.input_layernorm", H, offset, fp32_product=product)
    g.hold(h)  # the attention's input, until it returns
    g.args, g.attn_weights = (h,), None  # the attention's input, bound by the decoder layer
    if spec.linear_layer(i):
        return _linear_attention_layer(g, spec, i, p, x, h)
    gate = None
    if spec.family == "phi3":
        qkv = g.linear(h, f"{p}.self_attn.qkv_proj", H, (nh + 2 * nkv) * hd)
        # q and k are slices that rope copies; v is a slice too, and keeping it keeps the fused output
        q = Tensor(g.cond.tokens * nh * hd, qkv.itemsize, qkv.grad, -1)
        k = Tensor(g.cond.tokens * nkv * hd, qkv.itemsize, qkv.grad, -1)
        v = Tensor(qkv.numel, qkv.itemsize, qkv.grad, qkv.key)
    elif spec.kv_lora_rank:
        q, k, v = _latent_qkv(g, spec, p, h, rot)
    elif spec.family in COMPLEX_ROPE:
        q, k, v = complex_rope_qkv(g, spec, p, i, h, rot)
    elif spec.family in ("gemma3", "glm4_moe"):
        # Gemma 3 and GLM-4-MoE project q, k and v first, then normalise q and k (each head; Gemma's
        # form, Llama's) where they have the norms
        q, k, v = project_qkv(g, spec, p, h)
        q = qk_norm(g, spec, q, f"{p}.self_attn.q_norm", nh)
        g.args = (h, q, k, v)
        k = qk_norm(g, spec, k, f"{p}.self_attn.k_norm", nkv)
    else:
        # (Llama 4's weightless norm only on its rotary layers)
        normed = spec.qk_norm_layer(i)
        if spec.attention_output_gate:
            q, gate = gated_query(g, spec, p, h)
        else:
            q = g.linear(h, f"{p}.self_attn.q_proj", H, nh * hd)
            g.args = (h, q)
            q = qk_norm(g, spec, q, f"{p}.self_attn.q_norm", nh) if normed else q
        g.args = (h, q)
        k = g.linear(h, f"{p}.self_attn.k_proj", H, nkv * hd)
        g.args = (h, q, k)
        k = qk_norm(g, spec, k, f"{p}.self_attn.k_norm", nkv) if normed else k
        g.args = (h, q, k)
        v = g.linear(h, f"{p}.self_attn.v_proj", H, nkv * hd)
    assert rot is not None
    # the module holds its projections while rope runs (Phi-3's q and k are slices of `v`'s output)
    sliced = spec.family == "phi3"
    # rope's caller still binds the projected q while k is rotated
    back, halves = fp32_rotary(spec), rotary_halves(spec)
    if concatenated_rope(spec):
        q, k = partial_rope(g, spec, q, k, v, rot)
    # (latent attention and Llama 4's complex form rotate in their own functions)
    elif spec.rotary_layer(i) and not spec.kv_lora_rank and spec.family not in COMPLEX_ROPE:
        # SmolLM3's NoPE layers attend with q and k as projected
        q_projected, q = q, g.rope(q, *rot, alive=(v,) if sliced else (q, k, v), cast_back=back,
                                   halves=halves)
        k = g.rope(k, *rot, alive=(q, v) if sliced else (q_projected, q, k, v), cast_back=back,
                   halves=halves)
    if not spec.kv_lora_rank:
        g.args = attention_locals(h, q, k, v)
    masked = g.cond.attention == "sdpa" and (explicit_causal_mask(g.cond) or local_mask(spec, i, g.cond))
    if spec.attention_sinks and g.cond.attention == "eager":
        a = g.sink_attention(q, k, v, nh, nkv, hd, g.rates[0], f"{p}.self_attn" in g.trainable)
    else:
        # (GPT-OSS under sdpa: a fused kernel that takes the sinks, vllm-flash-attn3's, kept as
        # flash attention's q, k, v, output and log-sum-exp.) Phi-3's rotary concatenation, GPT-OSS's
        # halves and latent attention's make q (b, heads, s, d)-contiguous; Phi-3's and latent
        # attention's v is a slice of a fused output (qkv_proj's, kv_b_proj's). A partial rotary
        # concatenates too.
        fused = spec.family == "phi3" or bool(spec.kv_lora_rank)
        a = g.attention(q, k, v, nh, nkv, hd, g.rates[0], softcap=gemma and spec.attn_softcap,
                        softmax_fp32=spec.family not in HALF_SOFTMAX,
                        cast_probs=spec.family not in HALF_SOFTMAX,
                        contiguous_q=fused or halves or concatenated_rope(spec), fused=v if fused else None,
                        masked=masked, value_dim=spec.v_head_dim, contiguous_k=bool(spec.kv_lora_rank))
    # the attention modules of Llama's form (OLMo 2's too); the MLP of Llama's form is the layer's
    # last op only with the norms before the blocks (`dense`)
    llama_attention = spec.family in ("llama", "mistral", "qwen2", "qwen3", "olmo2", "smollm3", "deepseek_v3",
                                      "glm4_moe", "qwen3_next", "llama4")
    if gate is not None:
        # the attention's output times sigmoid(gate): sigmoid keeps its output, the product both factors
        a = g.mul(a, g.unary(gate, "output"))
    dense = llama_attention and not post_norms
    if llama_attention:
        # the attention module keeps q, k, v (and eager's weights) and the layer its normed input until
        # the module returns: through the kernel's end and o_proj, what a recomputed layer reaches again
        # (latent attention's module binds more: `latent_locals`)
        g.args = tuple(t for t in (*(g.args if spec.kv_lora_rank else (h, q, k, v)), g.attn_weights)
                       if t is not None)
        g.peak_at(g.unsaved(*g.args, a) + g.attn_internal)
    elif g.attn_weights is not None:  # bound by the attention module until it returns
        g.args += (g.attn_weights,)
    # the layer binds the returned weights to `_`: they stay alive until the layer returns
    weights = (g.attn_weights,) if llama_attention and g.attn_weights else ()
    if g.attn_weights is not None:
        g.hold(g.attn_weights)  # (Phi-3's as `self_attn_weights`), through the MLP in the forward too
    # the attention module's locals (`attention_locals`) are bound through o_proj in the forward too
    module_locals = tuple(t for t in g.args if t is not g.attn_weights) if spec.kv_lora_rank else (q, k, v)
    g.hold(*module_locals)
    o = g.linear(a, f"{p}.self_attn.o_proj", nh * spec.value_head_dim, H)
    # (Qwen3-Next's output gate, held since q_proj, is a local of the module too)
    g.release(*module_locals, *((gate,) if gate is not None else ()))
    g.hold(h)
    if f"{p}.self_attn.o_proj" in g.wrapped and a.grad:
        g.out_input_backward[f"layer {i}"] = lora_input_gradient_sum(a.nbytes)
    g.peak_at(g.unsaved(a, o, *g.args))
    a = o
    if llama_attention:
        g.args = ()
    if spec.family == "phi3":
        a = g.dropout_op(a, g.rates[1])  # resid_attn_dropout
    if post_norms:
        a = g.rms_norm(a, f"{p}.post_attention_layernorm", H, offset, fp32_product=post_only)
    x = g.add(x, a)
    g.release(h)
    # Llama 4's layer binds the attention's output (`attention_states`) until it returns
    return _mlp_half(g, spec, i, p, x, dense, weights, (a,) if spec.family in BOUND_ATTENTION_OUTPUT else ())


def _mlp_half(g: Graph, spec: ModelSpec, i: int, p: str, x: Tensor, dense: bool,
              weights: tuple[Tensor, ...], bound: tuple[Tensor, ...] = ()) -> Tensor:
    """A decoder layer from the residual after its token mixer on: the norm before the MLP, the MLP
    (dense or the expert block) and the residual add. `bound`: tensors the layer's code keeps in
    variables until it returns."""
    H, inter, sparse = spec.hidden_size, spec.mlp_width(i), spec.sparse_layer(i)
    gemma, offset = spec.family in GEMMA_FAMILIES, spec.offset_norms
    post_only = spec.norm_placement == "post"
    post_norms = spec.norm_placement in ("sandwich", "post")
    g.hold(x)  # the residual, until the layer returns
    g.hold(*bound)
    g.attn_tail_end()
    g.section += " mlp"
    h = x if post_only else g.rms_norm(
        x, f"{p}.pre_feedforward_layernorm" if gemma else f"{p}.post_attention_layernorm", H, offset,
        fp32_product=fp32_norm_product(spec))
    if x.grad and not post_only:
        norm = f"{p}.pre_feedforward_layernorm" if gemma else f"{p}.post_attention_layernorm"
        g.mlp_norm_backward[f"layer {i}"] = pre_mlp_norm_backward(
            g.cond.tokens, H, g.norm_copy, offset and norm in g.trainable)
    g.hold(h)  # the MLP's input, until it returns
    if dense:
        # the layer binds the residual after attention until it returns: an expert block's recompute
        # moments read it here (the dense MLP's moments name what they hold themselves)
        g.args = (h, x, *weights, *bound)
    else:
        # the decoder layer also binds the residual (the stream after attention) until the MLP returns;
        # it is saved already unless the norm upcast a 16-bit copy of it
        g.args = (h, x) if g.attn_weights is None else (h, x, g.attn_weights)
    if sparse:
        ran = gated_shared_mlp_first(g, spec, p, h) if spec.shared_expert_gate else None
        before = g._saved_total
        m = _moe(g, spec, p, h) if spec.expert_dispatch == "gathered" else every_expert_block(g, spec, p, h)
        routed = m
        if spec.shared_experts:
            m = shared_experts(g, spec, p, h, m, g._saved_total - before, ran)
        if spec.expert_dispatch == "every-expert":  # (after the shared expert's account: not its own)
            layer = f"layer {i}"
            g.pending[layer] = g.pending.get(layer, 0) + every_expert_pending(g, spec, p, m, routed)
    elif spec.family == "phi3":
        gu = g.linear(h, f"{p}.mlp.gate_up_proj", H, 2 * inter)
        # gate and up are halves of one output: keeping either keeps all of it
        act = g.new(gu.numel // 2, gu.itemsize, gu.grad)
        if gu.grad:
            g.save(gu, act)
        m = g.new(gu.numel // 2, gu.itemsize, gu.grad)
        g.tail_start()
        out = g.linear(m, f"{p}.mlp.down_proj", inter, H)
        # the down projection's last save (its weight's 16-bit copy under autocast, or lora_B's), where
        # a recompute stops when nothing after it saves: everything saved, before its output exists
        g.peak_at(g.unsaved(h, m, *g.args) + recompute_stop_transient(
            g.cond, m.numel, out.numel, f"{p}.mlp.down_proj" in g.wrapped))
        g.peak_at(g.unsaved(h, m, out, *g.args), after_saves=True)
        m = g.dropout_op(out, g.rates[1])  # resid_mlp_dropout
        g.peak_at(g.unsaved(h, out, m, *g.args) if m is not out else 0, after_saves=True)
    else:
        # act_fn(gate_proj(x)) * up_proj(x): the activation is made before the up projection runs,
        # and is alive through it
        gate = g.linear(h, f"{p}.{spec.mlp_module}.gate_proj", H, inter)
        gate_act = g.unary(gate, "input")
        g.hold(gate_act)
        before_up = g._saved_total
        up = g.linear(h, f"{p}.{spec.mlp_module}.up_proj", H, inter)
        up_saved = g._saved_total - before_up
        g.release(gate_act)
        before_mul = g._saved_total
        act = g.mul(gate_act, up)
        if f"{p}.{spec.mlp_module}.up_proj" in g.wrapped and h.grad:
            # by the up projection's input gradient, the product's and the up projection's saved
            # tensors are freed and the gate branch's gradient waits (`lora_input_gradient_sum`)
            g.up_input_backward[g.section.removesuffix(" mlp")] = (
                up_saved + g._saved_total - before_mul, gate_act.nbytes + lora_input_gradient_sum(h.nbytes))
        if g.cond.quantised_base and h.grad:
            # bitsandbytes' MatMul4Bit backward on the up projection: the same saved tensors freed, the
            # gate branch's gradient waiting, the incoming gradient in compute dtype (Linear4bit's
            # `.to(inp_dtype)` casts it back first) beside the weight it dequantises
            g.up_dequant_backward[g.section.removesuffix(" mlp")] = (
                up_saved + g._saved_total - before_mul, gate_act.nbytes + up.numel * g.cond.compute_bytes)
        g.tail_start()
        m = g.linear(act, f"{p}.{spec.mlp_module}.down_proj", inter, H)
        if dense:
            # the down projection is the layer's last op to save anything: a recompute stops once it
            # has (non-reentrant checkpointing's early stop), before the projection's outputs exist
            g.peak_at(g.unsaved(h, act, *weights) + recompute_stop_transient(
                g.cond, act.numel, m.numel, f"{p}.{spec.mlp_module}.down_proj" in g.wrapped))
            g.pending[f"layer {i}"] = mlp_output_pending(g.cond, m.numel,
                                                         f"{p}.{spec.mlp_module}.down_proj" in g.wrapped)
        else:
            g.peak_at(g.unsaved(h, act, m, *g.args), after_saves=True)
    block_out = m
    if post_norms:
        g.release(h)  # the MLP's normed input, gone once the MLP returns
        m = g.rms_norm(m, f"{p}.post_feedforward_layernorm", H, offset,
                       recompute_alive=tuple(a for a in g.args if a.key != h.key), fp32_product=post_only)
        # the block's output is bound until the norm returns; the MLP's normed input is gone by then
        g.peak_at(g.unsaved(block_out, *(a for a in g.args if a.key != h.key)))
    if not sparse:  # the expert block records its own tail (`_moe`)
        g.tail_end()
        if spec.num_experts:
            g.expert_backward.append(0)  # (a dense layer of an expert model: DeepSeek-V3's first)
    g.args, g.attn_weights = (), None
    layer = g.section.removesuffix(" mlp")
    if m.itemsize < x.itemsize and not post_norms and not dense:
        # autocast: the add's backward casts the fp32 residual gradient to the block's 16-bit output;
        # that copy waits through the recompute its first saved tensor sets off
        g.pending[layer] = g.pending.get(layer, 0) + m.nbytes
    if (f"{p}.{spec.mlp_module}.down_proj" in g.wrapped and not post_norms and not sparse and not dense
            and (spec.family != "phi3" or g.rates[1] <= 0)):
        # LoRA on the output projection: the scale's backward needs no saved tensor, so the scaled
        # branch's gradient is made before lora_B's backward sets off the recompute (fp32 adapters
        # without autocast: `mlp_output_pending`'s casts)
        fp32 = g.cond.adapter_bytes and not g.cond.adapter_autocast
        g.pending[layer] = g.pending.get(layer, 0) + (
            mlp_output_pending(g.cond, block_out.numel, True) if fp32 else block_out.nbytes)
    if post_norms and block_out.itemsize < FP32:
        # Gemma-2's post-feedforward norm returns `type_as` its 16-bit input (OLMo 2's `.to` it): the
        # backward of that cast makes a fp32 gradient, which waits for the norm's saved tensors (the
        # recompute)
        g.pending[layer] = g.pending.get(layer, 0) + block_out.numel * FP32
    return g.add(x, m)


def gated_query(g: Graph, spec: ModelSpec, p: str, h: Tensor) -> tuple[Tensor, Tensor]:
    """Qwen3-Next's query and attention output gate: q_proj makes each head's query and gate side by
    side (2 x heads x head_dim); the gate's reshape copies its strided half, and the query, a strided
    view, goes through q_norm: a 16-bit query is copied by the norm's float(), an fp32 one is kept by
    pow as the view, which keeps q_proj's whole output. Source: transformers 5
    `Qwen3NextAttention.forward`."""
    H, nh, hd = spec.hidden_size, spec.num_heads, spec.head_dim
    both = g.linear(h, f"{p}.self_attn.q_proj", H, 2 * nh * hd)
    g.args = (h, both)
    gate = g.pointwise(both.numel // 2, both.itemsize, both.grad, both)
    if both.itemsize == FP32 and both.grad:
        g.save(both)
    view = Tensor(both.numel // 2, both.itemsize, both.grad, both.key)
    q = qk_norm(g, spec, view, f"{p}.self_attn.q_norm", nh)
    g.hold(gate)
    return q, gate


def chunk_delta_rule_saves(heads: int, seq: int, k_dim: int, v_dim: int, qkv_grad: bool, gate_grad: bool,
                           chunk: int = 64) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """fp32 elements `torch_chunk_gated_delta_rule` keeps for backward past its l2 norms, for `heads`
    = batch x value heads, as transformers 5.25's code does when q, k and v need gradients
    (`qkv_grad`), beta and the decay do (`gate_grad`), or both; nothing when neither: (those kept by
    the ops up to its first triangular solve, those kept by the later ops), as backward frees the
    later ones first (`delta_rule_backward`). The sequence is padded to S = ceil(seq / chunk) x chunk
    (F.pad copies even when nothing is padded), n = S / chunk chunks.

    Kept whenever anything needs a gradient: the padded key and scaled query (heads x S x k_dim
    each), k x beta (x k_dim), the pairwise decay's exp and the triangular system (heads x S x
    chunk each), the within-chunk attention (as wide), two exps of the cumulative decay (heads x S
    each), the two triangular solves' results (new values, heads x S x v_dim; decayed keys, x k_dim),
    and per chunk the recurrent state it reads (heads x k_dim x v_dim, the first one zeros) and its
    corrected values (heads x chunk x v_dim). The last chunk's state update is dropped with the final
    state (not asked for), and what only it kept with it: the key with its decay applied (heads x S x
    k_dim) and that decay's exp (heads x S) are kept from two chunks on; the decayed query (x k_dim)
    too, by the second chunk's read of a state that needs a gradient; the chunks' decay (heads x n)
    from two chunks on by its exp with `gate_grad`, from three without (the second chunk's update
    scales a state that needs a gradient). With `qkv_grad` the padded beta (heads x S) is kept for the
    value's and key's gradients; with `gate_grad` the padded value (x v_dim) for beta's, the (chunk,
    chunk) mask the decay is filled through, and the two (heads, S, chunk) products the pairwise
    decay multiplies."""
    if not (qkv_grad or gate_grad):
        return (), ()
    padded = -(-seq // chunk) * chunk
    n = padded // chunk
    rows, wide = heads * padded, heads * padded * chunk
    # up to the first solve: key, query, k x beta, the pairwise decay's exp, the system, the first exp,
    # the new values
    before = [rows * k_dim, rows * k_dim, rows * k_dim, wide, wide, rows, rows * v_dim]
    before += [rows] * qkv_grad  # beta, padded
    before += [rows * v_dim, wide, wide] * gate_grad  # the padded value; k_beta @ k^T and q @ k^T
    after = [wide, rows, rows * k_dim] + [heads * k_dim * v_dim, heads * chunk * v_dim] * n  # (per chunk)
    if n > 1:
        after += [rows * k_dim, rows * k_dim, rows]  # the decayed query and key, the key's decay
    if n > 2 or (n > 1 and gate_grad):
        after.append(heads * n)  # the chunks' decay
    return tuple(before), tuple(after)


def autocast_delta_rule_saves(heads: int, seq: int, k_dim: int, v_dim: int, qkv_grad: bool, gate_grad: bool,
                              chunk: int = 64) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(elements, bytes each) `torch_chunk_gated_delta_rule` keeps past its l2 norms under autocast,
    split as `chunk_delta_rule_saves` splits it
    (amp), where each of its matmuls runs on bf16 copies of its fp32 operands and saves those copies
    instead (the element-wise ops and the triangular solves stay fp32). Derived from transformers
    5.25's code as `chunk_delta_rule_saves` is, with S, n and `heads` as there.

    fp32, whenever anything needs a gradient: the pairwise decay's exp and the triangular system
    (heads x S x chunk each), the cumulative decay's first two exps (heads x S each), the solves'
    results (heads x S x v_dim and x k_dim); from two chunks on, the key's decay exp (heads x S); the
    chunks' decay (heads x n) as in `chunk_delta_rule_saves`. With `qkv_grad` the padded beta. With
    `gate_grad`: the padded value, key and scaled query (the products that read them keep them for
    the decay's and beta's gradients), k x beta, and every state a later chunk reads but the first
    (heads x k_dim x v_dim each, kept by its decay's product).
    bf16 copies: the key's transpose for k_beta @ k^T (heads x S x k_dim); with `qkv_grad` k x beta,
    the key's transpose again and the query for q @ k^T (x k_dim each); with `gate_grad` the two
    products (heads x S x chunk). Per chunk, twice the state it reads (for the decayed keys' and the
    query's products), its corrected values and its within-chunk attention slice (heads x chunk x
    v_dim, x chunk); from the second chunk on the decayed keys' and query's slices (x k_dim each);
    and but for the last (whose state update is dropped) the corrected values again and the decayed
    key's slice (x k_dim), read by the state update."""
    if not (qkv_grad or gate_grad):
        return (), ()
    padded = -(-seq // chunk) * chunk
    n = padded // chunk
    rows, wide = heads * padded, heads * padded * chunk
    state, block = heads * k_dim * v_dim, heads * chunk
    # up to the first solve (fp32: exp, system, first exp, new values; padded beta; with `gate_grad`
    # the padded value and key and k x beta), then after it
    before = [wide, wide, rows, rows * v_dim] + [rows] * qkv_grad
    before += [rows * v_dim, rows * k_dim, rows * k_dim] * gate_grad
    after = [rows, rows * k_dim] + [rows] * (n > 1) + [heads * n] * (n > 2 or (n > 1 and gate_grad))
    after += ([rows * k_dim] + [state] * (n - 1)) * gate_grad  # the padded query (kept by q x exp)
    half = [rows * k_dim] + [rows * k_dim] * 3 * qkv_grad + [wide, wide] * gate_grad
    late = []
    for i in range(n):
        late += [state, state, block * v_dim, block * chunk]
        late += [block * k_dim, block * k_dim] * (i > 0) + [block * v_dim, block * k_dim] * (i < n - 1)
    return (tuple((e, FP32) for e in before) + tuple((e, 2) for e in half),
            tuple((e, FP32) for e in after) + tuple((e, 2) for e in late))


def delta_rule_backward(heads: int, seq: int, k_dim: int, v_dim: int, qkv_grad: bool, gate_grad: bool,
                        chunk: int = 64) -> int:
    """fp32 bytes live in `torch_chunk_gated_delta_rule`'s backward beyond what its layer still keeps
    saved, at the backward of its first triangular solve (new values = solve(system, v x beta)), the
    layer's most: everything the later ops kept is freed by then (`chunk_delta_rule_saves`' second
    part), while gradients of what the earlier ops made wait for those ops' backward.

    The solve's backward holds its incoming gradient and the right side's (heads x S x v_dim each),
    and makes the system's gradient, -tril(grad_B @ X^T), through two (heads, S, chunk) temporaries;
    the later solve's system gradient (as wide) waits to be summed with it, and so does the
    within-chunk attention's (as wide, made by the chunk loop). With `qkv_grad` the padded query's
    gradient waits (heads x S x k_dim), and from two chunks on the key's (as wide: with one chunk the
    decayed key feeds only the dropped last state update, which backward never runs); the decayed
    k x beta's always (x k_dim); with
    `gate_grad` the cumulative decay's (heads x S). S = ceil(seq / chunk) x chunk. Derived from
    transformers 5.25's code and torch's `linalg_solve_triangular` backward; autograd runs a node
    after every node made later in forward."""
    if not (qkv_grad or gate_grad):
        return 0
    n = -(-seq // chunk)
    rows = heads * n * chunk
    wide = rows * chunk
    k_grads = 1 + qkv_grad * (1 + (n > 1))  # the decayed k x beta's; the query's; the key's
    return FP32 * (4 * wide + 2 * rows * v_dim + rows * k_dim * k_grads + rows * gate_grad)


def delta_rule_forward_live(heads: int, seq: int, k_dim: int, v_dim: int, qkv_grad: bool, gate_grad: bool,
                            matmul_bytes: int = FP32, chunk: int = 64) -> int:
    """Bytes `torch_chunk_gated_delta_rule`'s own tensors past its l2 norms hold at its largest forward
    moment, saved or not (the walk adds them before it records the delta rule's saves), for `heads` =
    batch x value heads, S and n as in `chunk_delta_rule_saves`; `matmul_bytes` 2 under autocast, whose
    matmuls return bf16 and keep bf16 copies of their operands. Derived from transformers 5.25's code.

    Always alive from the padding on: the padded scaled query and key, k x beta (heads x S x k_dim
    each), the padded value and v x beta (x v_dim), the padded beta and decay and the cumulative decay
    (heads x S each), and the (chunk, chunk) bool mask (counted here unless the decay needs a gradient,
    when `delta_rule_mask_bytes` saves it). Two moments can be the largest:
    - the within-chunk attention, (q @ k^T) x pairwise decay: the pairwise decay's exp, the triangular
      system and the product (heads x S x chunk, fp32 each), and the matmul's output (as wide, in the
      matmul's dtype), with `gate_grad` the system's matmul output too (kept for the decay's gradient);
    - after both triangular solves, the key's decay applied (`key * (...).exp()`): the three fp32 wide
      tensors and those matmul outputs kept with `gate_grad`; beside the locals above, the decayed
      k x beta, both solves' results (x k_dim, x v_dim), the zero output (x v_dim), the zero recurrent
      state (heads x k_dim x v_dim), the decayed query and the new key (x k_dim each) with that exp
      (heads x S); when anything needs a gradient, the scaled query (kept by the decayed query's
      product) and the two exps of the cumulative decay before it (heads x S each).
    Under autocast with a gradient, the bf16 operand copies the matmuls keep are alive at both: the
    key's for k x beta @ k^T, and with `qkv_grad` k x beta's, the key's again and the query's (x k_dim).
    A checkpointed layer's recompute runs the same ops with gradients on, so reaches the same moment."""
    any_grad = qkv_grad or gate_grad
    n = -(-seq // chunk)
    rows = heads * n * chunk
    wide = rows * chunk
    common = FP32 * (rows * (3 * k_dim + 2 * v_dim + 3) + 3 * wide) + (0 if gate_grad else chunk * chunk)
    copies = 2 * rows * k_dim * (any_grad + 3 * qkv_grad) if matmul_bytes < FP32 and any_grad else 0
    within = matmul_bytes * wide * (1 + gate_grad)
    after_solves = (matmul_bytes * wide * 2 * gate_grad + FP32 * heads * k_dim * v_dim
                    + FP32 * rows * ((3 + any_grad) * k_dim + 2 * v_dim + 1 + 2 * any_grad))
    return common + copies + max(within, after_solves)


def delta_rule_loop_unsaved(heads: int, seq: int, k_dim: int, v_dim: int, qkv_grad: bool, gate_grad: bool,
                            matmul_bytes: int = FP32, chunk: int = 64) -> int:
    """Bytes alive in `torch_chunk_gated_delta_rule`'s chunk loop that no op keeps, at the last chunk's
    within-chunk product (`intra_chunk_attn[:, :, i] @ v_new`), when every tensor the rule keeps
    (`chunk_delta_rule_saves`; `autocast_delta_rule_saves` when `matmul_bytes` is 2) is made: with
    heads, S, n as there, a block = heads x chunk rows. Derived from transformers 5.25's code.

    Alive there (the padded query and key are freed by then, rebound to their decayed copies, as are
    the states before the last): v x beta and the zero output (heads x S x v_dim), the decayed
    k x beta (x k_dim), the padded decay and its cumulative sum (heads x S), none of which any op
    keeps; the chunk's read of the state and the product (block x v_dim each, in the matmul's dtype),
    then their sum (as wide), unsaved. Unsaved unless kept by the rule as those functions list: the
    padded value (the decay's gradient), the padded beta (q's, k's, v's), the chunks' decay (heads x n)
    and the mask; k x beta, the decayed query and key (x k_dim each); the pairwise decay's exp, the
    system and the within-chunk attention (heads x S x chunk each); the solves' results (x v_dim,
    x k_dim); the state read (heads x k_dim x v_dim) and the corrected values (block x v_dim). Under
    autocast the matmuls keep bf16 copies instead of the within-chunk attention, the decayed query and
    key, the corrected values, and (unless the decay needs a gradient) k x beta and the state; without
    any gradient the corrected values' and the attention slice's bf16 copies (block x v_dim, x chunk)
    are alive beside the product too."""
    grad, amp = qkv_grad or gate_grad, matmul_bytes < FP32
    n = -(-seq // chunk)
    rows, block = heads * n * chunk, heads * chunk
    decayed_kept = grad and n > 1 and not amp
    fp32 = [rows * v_dim, rows * v_dim, rows * k_dim, rows, rows,
            rows * v_dim * (not gate_grad), rows * (not qkv_grad),
            heads * n * (not (grad and (n > 2 or (n > 1 and gate_grad)))),
            rows * k_dim * (not (grad and (gate_grad or not amp))),  # k x beta
            2 * rows * k_dim * (not decayed_kept),  # the decayed query and key
            rows * chunk * (2 * (not grad) + (not grad or amp)),  # exp, system; the attention
            rows * (v_dim + k_dim) * (not grad),  # the solves' results
            heads * k_dim * v_dim * (not grad or (amp and not (gate_grad and n > 1))),  # the state read
            block * v_dim * (not grad or amp)]  # the corrected values
    # the product made beside its operands' bf16 copies, or the sum with the read made (the copies freed)
    copies = 2 * block * (v_dim + chunk) if amp and not grad else 0
    mask = 0 if gate_grad else chunk * chunk
    product = matmul_bytes * block * v_dim
    return FP32 * sum(fp32) + 2 * product + max(copies, product) + mask


def delta_rule_mask_bytes(gate_grad: bool, chunk: int = 64) -> int:
    """The (chunk, chunk) bool mask `masked_fill` keeps when the decay needs a gradient."""
    return chunk * chunk if gate_grad else 0


def _linear_attention_layer(g: Graph, spec: ModelSpec, i: int, p: str, x: Tensor, h: Tensor) -> Tensor:
    """A Qwen3-Next decoder layer whose token mixer is the gated DeltaNet (`gated_delta_net`)."""
    g.attn_tail_start()  # (from the delta rule's first solve on, when it runs: `gated_delta_net`)
    o = gated_delta_net(g, spec, f"{p}.linear_attn", h)
    g.peak_at(g.unsaved(h, o))
    g.args = ()
    x = g.add(x, o)
    g.release(h)
    return _mlp_half(g, spec, i, p, x, True, ())


def gated_delta_net(g: Graph, spec: ModelSpec, a: str, h: Tensor) -> Tensor:
    """`Qwen3NextGatedDeltaNet.forward` as transformers 5.25 runs it without fla or causal_conv1d:
    in_proj_qkvz and in_proj_ba; q, k and v copied out of their heads' groups and concatenated; the
    causal depthwise conv1d (its input cast to the weight's dtype, then autocast's 16-bit) keeps its
    input and its padded output, which silu keeps; beta = sigmoid(b) keeps its output; the decay
    -exp(A_log) x softplus(a + dt_bias) in fp32; the chunked delta rule (fp32 copies of q, k, v, beta
    and the decay; each l2 norm keeps its input and rsqrt; then `chunk_delta_rule_saves`); the
    gated RMSNorm over each value head (fp32 input and rsqrt kept, the weight product and silu of the
    fp32 gate z each keeping what their backward reads) and out_proj."""
    t, H = g.cond.tokens, spec.hidden_size
    # packed documents are one row: the convolution and the chunks run over all of its tokens (the
    # torch fallback takes no sequence boundaries)
    batch, seq = (1, t) if g.cond.packed else (g.cond.batch_size, g.cond.seq_len)
    nk, nv = spec.linear_key_heads, spec.linear_value_heads
    dk, dv, kernel = spec.linear_key_head_dim, spec.linear_value_head_dim, spec.linear_conv_kernel
    keys, values = nk * dk, nv * dv
    channels = 2 * keys + values
    qkvz = g.linear(h, f"{a}.in_proj_qkvz", H, 2 * keys + 2 * values)
    g.args = (h, qkvz)
    ba = g.linear(h, f"{a}.in_proj_ba", H, 2 * nv)
    own, conv = f"{a}" in g.trainable, f"{a}.conv1d" in g.trainable
    mixed = g.new(t * channels, qkvz.itemsize, qkvz.grad)  # the concatenated q, k, v copies
    if g.cond.autocast:  # .to(fp32 weight), then autocast's bf16 copy for the conv
        mixed = g.cast(g.cast(mixed, FP32), 2)
        if mixed.grad:
            g.save(g.new(channels * kernel, 2, False))  # the weight's bf16 copy
    if conv or mixed.grad:
        g.save(mixed)
    padded = g.new(batch * channels * (seq + kernel - 1), mixed.itemsize, mixed.grad or conv)
    if padded.grad:
        g.save(padded)  # silu keeps its input, a slice of the padded output
    qkv = g.new(t * channels, mixed.itemsize, padded.grad)
    cb = qkv.itemsize
    b = g.new(t * nv, ba.itemsize, ba.grad)
    beta = g.pointwise(t * nv, ba.itemsize, ba.grad, b)
    if ba.grad:
        g.save(beta)
    decay_in = g.new(t * nv, FP32, ba.grad or own)  # a.float() + dt_bias
    if decay_in.grad:
        g.save(decay_in)  # softplus keeps its input
    if own:
        g.save(g.new(nv, FP32, False), g.new(t * nv, FP32, False))  # exp(A_log) and softplus's output
    if ba.grad or own:
        g.save(g.new(nv, FP32, False))  # -exp(A_log), the product's other factor
    heads, gate_grad = batch * nv, ba.grad or own
    if qkv.grad:
        rows = heads * seq
        # each l2 norm keeps its input and rsqrt: q and k in fp32, copies made by .to(float32) (or by
        # repeat_interleave, when key heads serve several value heads); an fp32 q or k of its own
        # heads is not copied (.to aliases it), so the norms keep the conv's output they view
        aliased = nv == nk and qkv.itemsize == FP32
        if aliased:
            g.save(qkv)
        for _ in "qk":
            g.save(*(() if aliased else (g.new(rows * dk, FP32, False),)), g.new(rows, FP32, False))
    if gate_grad:
        g.save(g.new(delta_rule_mask_bytes(gate_grad), 1, False))
    amp = g.cond.autocast or g.cond.adapter_autocast  # (fp32 adapters' autocast spans the whole forward)
    # inside the delta rule, before any of its saves is recorded: the module's tensors beside it (its
    # input, the projections, the conv's output, beta and the decay) and all the rule's own alive
    live = delta_rule_forward_live(heads, seq, dk, dv, qkv.grad, gate_grad, 2 if amp else FP32)
    # z, b and a leave `fix_query_key_value_ordering` as copies when several key heads serve several
    # value heads each (the reshape merges the two head dims of a strided slice), as views otherwise
    regrouped = nk > 1 and nv != nk
    z = g.new(t * values, qkvz.itemsize, qkvz.grad) if regrouped else None
    copies = (z, b, g.new(t * nv, ba.itemsize, False)) if regrouped else ()
    alive = (h, qkvz, ba, qkv, beta, g.new(t * nv, FP32, gate_grad), *copies)
    g.peak_at(g.unsaved(*alive, *g.args, *g._layer_held()) + live)
    g.moment(*alive, extra=live)
    if amp:
        before, after = autocast_delta_rule_saves(heads, seq, dk, dv, qkv.grad, gate_grad)
    else:
        before, after = (tuple((e, FP32) for e in part) for part in
                         chunk_delta_rule_saves(heads, seq, dk, dv, qkv.grad, gate_grad))
    for numel, size in before:
        g.save(g.new(numel, size, False))
    # what the ops after the first triangular solve keep (and the layer's later ops) is freed by that
    # solve's backward, the layer's peak (`delta_rule_backward`)
    g.attn_tail_start()
    for numel, size in after:
        g.save(g.new(numel, size, False))
    # (the last chunk's within-chunk product, when every save of the rule is made)
    loop = delta_rule_loop_unsaved(heads, seq, dk, dv, qkv.grad, gate_grad, 2 if amp else FP32)
    g.peak_at(g.unsaved(*alive, *g.args, *g._layer_held()) + loop)
    g.moment(*alive, extra=loop)
    if qkv.grad or gate_grad:
        g.mixer_backward[g.section] = delta_rule_backward(heads, seq, dk, dv, qkv.grad, gate_grad)
    core = g.new(t * values, cb, qkv.grad or ba.grad or own)
    if nv == nk:
        # z flattened to (tokens x heads, v_dim) is a view of in_proj_qkvz's output when each key head
        # has one value head; an fp32 one is then kept by silu as that whole output
        z = Tensor(t * values, qkvz.itemsize, qkvz.grad, qkvz.key)
        if qkvz.itemsize == FP32 and qkvz.grad:
            g.save(qkvz)
    elif z is None:
        z = g.new(t * values, qkvz.itemsize, qkvz.grad)  # the flattening's copy (one key head)
    if z.grad and g.mixer_backward.get(g.section):
        # z's gradient, made by the gate's backward, waits through the delta rule's for the in-projection's
        g.mixer_backward[g.section] += z.nbytes
    normed = g.rms_norm(core, f"{a}.norm", dv)
    z32 = g.cast(z, FP32)
    gate = g.unary(z32, "input")
    out = g.cast(g.mul(normed, gate), cb)
    g.peak_at(g.unsaved(h, qkvz, z, out))
    return g.linear(out, f"{a}.out_proj", values, H)


def _latent_qkv(g: Graph, spec: ModelSpec, p: str, h: Tensor,
                rot: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-head latent attention's q, k and v as `DeepseekV3Attention.forward` makes them: q from
    q_proj, or q_a_proj, its RMSNorm and q_b_proj; the latent and the shared rotary key from one
    projection (kv_a_proj_with_mqa), the latent's slice through kv_a_layernorm (in fp32 the norm's
    `.to(float32)` is no copy, so it keeps a view of the whole projection), kv_b_proj to every head's
    key part and value. Each head's last `rope_head_dim` values of q, and the one rotary key, rotate;
    q is then the concatenation of its parts (contiguous, in the wider dtype), k a new tensor the key
    parts are copied into, v a view of kv_b_proj's output (keeping it keeps all of it).
    Leaves in `g.args` what the module binds until it returns (`latent_locals`)."""
    H, nh, hd = spec.hidden_size, spec.num_heads, spec.head_dim
    rd, vd, latent = spec.rotary_dim, spec.value_head_dim, spec.kv_lora_rank
    t, a = g.cond.tokens, f"{p}.self_attn"
    if spec.q_lora_rank:
        qa = g.linear(h, f"{a}.q_a_proj", H, spec.q_lora_rank)
        g.args = (h, qa)
        qa = g.rms_norm(qa, f"{a}.q_a_layernorm", spec.q_lora_rank)
        g.args = (h, qa)
        q = g.linear(qa, f"{a}.q_b_proj", spec.q_lora_rank, nh * hd)
    else:
        q = g.linear(h, f"{a}.q_proj", H, nh * hd)
    g.args = (h, q)
    ckv = g.linear(h, f"{a}.kv_a_proj_with_mqa", H, latent + rd)
    g.args = (h, q, ckv)
    if ckv.grad and ckv.itemsize == FP32:
        g.save(ckv)  # the norm's pow keeps its input, a view of the projection's whole output
    kv_in = g.rms_norm(Tensor(t * latent, ckv.itemsize, ckv.grad, ckv.key), f"{a}.kv_a_layernorm", latent)
    g.args = (h, q, ckv, kv_in)
    assert rot is not None
    q_rot = g.rope(Tensor(t * nh * rd, q.itemsize, q.grad, -1), *rot, alive=g.args,
                   interleaved=spec.rope_interleave)
    g.args = (h, q, ckv, kv_in, q_rot)
    k_rot = g.rope(Tensor(t * rd, ckv.itemsize, ckv.grad, -1), *rot, alive=g.args,
                   interleaved=spec.rope_interleave)
    query = g.new(t * nh * hd, max(q.itemsize, q_rot.itemsize), q.grad)  # cat((q_pass, q_rot))
    g.args = (h, q, ckv, kv_in, q_rot, k_rot, query)
    g.moment(*g.args)
    kv = g.linear(kv_in, f"{a}.kv_b_proj", latent, nh * (hd - rd + vd))
    key = g.new(t * nh * hd, kv.itemsize, kv.grad or k_rot.grad)  # new_empty, then two copy_
    g.args = latent_locals(h, q, ckv, kv_in, q_rot, k_rot, query, kv, key)
    g.hold(*g.args)  # through the kernel and o_proj (the layer releases them)
    g.moment()
    return query, key, Tensor(kv.numel, kv.itemsize, kv.grad, kv.key)


# Families whose `apply_rotary_pos_emb` slices the rotating part and concatenates the rest back
# whatever their `partial_rotary_factor` (GLM-4-MoE's, and Qwen3-Next's adapted from it)
SLICED_ROPE = ("glm4_moe", "qwen3_next")
# Families whose decoder layer keeps the attention's output in a variable of its own through the MLP
# (Llama 4's `attention_states`)
BOUND_ATTENTION_OUTPUT = ("llama4",)
# Families whose eager attention takes the softmax in the scores' dtype, with no fp32 (Llama 4's
# `eager_attention_forward`)
HALF_SOFTMAX = ("llama4",)


def project_qkv(g: Graph, spec: ModelSpec, p: str, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q_proj, k_proj and v_proj of the attention's input `h`, in that order; the module binds each
    result while the next runs (`Graph.args`)."""
    H, hd = spec.hidden_size, spec.head_dim
    q = g.linear(h, f"{p}.self_attn.q_proj", H, spec.num_heads * hd)
    g.args = (h, q)
    k = g.linear(h, f"{p}.self_attn.k_proj", H, spec.num_kv_heads * hd)
    g.args = (h, q, k)
    v = g.linear(h, f"{p}.self_attn.v_proj", H, spec.num_kv_heads * hd)
    g.args = (h, q, k, v)
    return q, k, v


def complex_rope_qkv(g: Graph, spec: ModelSpec, p: str, i: int, h: Tensor,
                     rot: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """Llama 4's q, k and v as `Llama4TextAttention.forward` makes them: the three projections; on a
    rotary layer q and k rotated as complex numbers (`complex_rope`), then through the weightless
    q/k norm where the config has it; on a NoPE layer, with temperature tuning, q scaled per position
    (`nope_temperature`). Each step's inputs are freed as its result replaces them, unless saved."""
    nh, nkv = spec.num_heads, spec.num_kv_heads
    q, k, v = project_qkv(g, spec, p, h)
    if spec.rotary_layer(i):
        assert rot is not None
        q, k = complex_rope(g, q, k, rot[0], (h, q, k, v))
        g.args = (h, q, k, v)
        if spec.qk_norm_layer(i):
            q = qk_norm(g, spec, q, f"{p}.self_attn.qk_norm", nh)
            g.args = (h, q, k, v)
            k = qk_norm(g, spec, k, f"{p}.self_attn.qk_norm", nkv)
    elif spec.nope_temperature:
        q = nope_temperature(g, q, (h, k, v))
    return q, k, v


def complex_rope(g: Graph, q: Tensor, k: Tensor, freqs: Tensor,
                 alive: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Llama 4's `apply_rotary_emb`: q and k in fp32 (a copy of a 16-bit one), viewed as complex
    pairs, times the complex64 `freqs_cis` (a new fp32-sized tensor each), viewed back as real and
    cast back to their dtype. The product keeps only `freqs_cis` (its other factor needs no
    gradient); the function's locals (both fp32 copies and both products) are alive at its last cast,
    beside `alive`, what the attention module holds (its projections)."""
    if q.grad or k.grad:
        g.save(freqs)
    qf, kf = g.cast(q, FP32), g.cast(k, FP32)
    qo = g.pointwise(q.numel, FP32, q.grad, qf, freqs)
    ko = g.pointwise(k.numel, FP32, k.grad, kf, freqs)
    qb, kb = g.cast(qo, q.itemsize), g.cast(ko, k.itemsize)
    temps = (qf, kf, qo, ko, qb, kb)
    g.moment(*alive, *temps)
    g.peak_at(g.unsaved(*g.args, *alive, *temps))
    return qb, kb


def nope_temperature(g: Graph, q: Tensor, alive: tuple[Tensor, ...]) -> Tensor:
    """Llama 4's attention temperature on a NoPE layer: q times a fp32 scale per position
    (log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1, expanded over the batch), which promotes
    the product to fp32, cast back to q's dtype. The product keeps the scales (one fp32 value per
    position of a row) when q needs a gradient. Source: transformers 5 `Llama4TextAttention.forward`."""
    row = g.cond.tokens if g.cond.packed else g.cond.seq_len
    scales = g.new(row, FP32, False)
    if q.grad:
        g.save(scales)
    prod = g.pointwise(q.numel, FP32, q.grad, q, scales)
    out = g.cast(prod, q.itemsize)
    g.moment(*alive, q, prod, out)
    g.peak_at(g.unsaved(*g.args, *alive, q, prod, out))
    return out


def concatenated_rope(spec: ModelSpec) -> bool:
    """Whether the rotary embedding rotates a slice of each head and concatenates the rest back
    (`partial_rope`): GLM-4-MoE's does so whatever its `partial_rotary_factor`, 1 too (the rest is
    then empty, the concatenation a copy); a partial rotary embedding of another family would too.
    Latent attention rotates its own part (`_latent_qkv`)."""
    return not spec.kv_lora_rank and (bool(spec.rope_head_dim) or spec.family in SLICED_ROPE)


def partial_rope(g: Graph, spec: ModelSpec, q: Tensor, k: Tensor, v: Tensor,
                 rot: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """GLM-4-MoE's partial rotary embedding: the first `rope_head_dim` values of each query and key
    head rotate (slices of the projections), then each is concatenated with its unrotated rest into a
    new (b, heads, s, head_dim) tensor, in the wider of the two dtypes (fp32 under autocast, whose
    cos and sin are fp32). Both rotated parts are made before either concatenation; the projections
    are bound until the function returns. Source: transformers 5 glm4_moe `apply_rotary_pos_emb`."""
    t, rd = g.cond.tokens, spec.rotary_dim
    nh, nkv = spec.num_heads, spec.num_kv_heads
    q_rot = g.rope(Tensor(t * nh * rd, q.itemsize, q.grad, -1), *rot, alive=(q, k, v))
    k_rot = g.rope(Tensor(t * nkv * rd, k.itemsize, k.grad, -1), *rot, alive=(q, k, v, q_rot))
    q_cat = g.new(q.numel, max(q.itemsize, q_rot.itemsize), q.grad)
    g.moment(q, k, v, q_rot, k_rot, q_cat)
    g.peak_at(g.unsaved(*g.args, q, k, v, q_rot, k_rot, q_cat))
    k_cat = g.new(k.numel, max(k.itemsize, k_rot.itemsize), k.grad)
    g.moment(q, k, v, k_rot, q_cat, k_cat)
    g.peak_at(g.unsaved(*g.args, q, k, v, k_rot, q_cat, k_cat))
    return q_cat, k_cat


def latent_locals(*tensors: Tensor) -> tuple[Tensor, ...]:
    """What latent attention's forward binds while the kernel and o_proj run, beyond what they save:
    the layer's normed input, the projected query (its unrotated part a view of it), the latent
    projection (the rotary key's view of it), the normed latent, the rotated query part and key,
    the query, kv_b_proj's output (the value a view of it) and the key. Source: transformers 5
    `DeepseekV3Attention.forward` and `expand_kv`, whose locals are freed as it returns."""
    return tensors


def qk_norm(g: Graph, spec: ModelSpec, x: Tensor, path: str, heads: int) -> Tensor:
    """The projected query or key through the attention's RMSNorm, where the family has one
    (`ModelSpec.qk_norm`): Qwen3's over each head's head_dim values, in Llama's form, OLMo 2's over
    the whole projection (a row of heads x head_dim), in its own (`fp32_norm_product`); the
    projection's output is freed once normed unless an op saved it. Source: transformers 5
    `Qwen3Attention.forward`, `Olmo2Attention.forward`."""
    if spec.qk_norm is None:
        return x
    dim = spec.head_dim if spec.qk_norm in ("head", "l2") else heads * spec.head_dim
    return g.rms_norm(x, path, dim, spec.offset_norms, fp32_product=fp32_norm_product(spec),
                      weighted=spec.qk_norm != "l2")


def rotary_kind(spec: ModelSpec, i: int) -> bool:
    """Which rotary embedding layer `i` rotates with: Gemma 3's sliding layers a local one
    (`rope_local_base_freq`), its global layers another, each with its own cos and sin; every other
    family one for all layers. Source: transformers 5 `Gemma3RotaryEmbedding`, `Gemma3TextModel`."""
    return spec.family == "gemma3" and spec.sliding_type(i)


def fp32_rotary(spec: ModelSpec) -> bool:
    """Whether the rotary embedding hands the layers fp32 cos and sin and rotates q and k in fp32,
    casting the results back to their dtype (OLMo 2), rather than cos and sin in the hidden states'
    dtype (Llama). Source: transformers 5 `Olmo2RotaryEmbedding`, olmo2's `apply_rotary_pos_emb`."""
    return spec.family == "olmo2"


def fp32_norm_product(spec: ModelSpec) -> bool:
    """Whether the family's RMSNorm multiplies by its weight in fp32 and then casts back (OLMo 2's
    and GPT-OSS's `(self.weight * hidden_states).to(input_dtype)`), rather than casting back first
    (Llama's)."""
    return spec.family in ("olmo2", "gpt_oss")


def rotary_casts_back(spec: ModelSpec) -> bool:
    """Whether the rotary embedding casts the rotated q and k back to their own dtype (OLMo 2's
    `apply_rotary_pos_emb`: `q_embed.to(q_type)`), rather than leaving them in the wider of q's and
    cos's (Llama's): under autocast a bf16 q times fp32 cos stays fp32 there. Source: transformers 5
    `modeling_olmo2.apply_rotary_pos_emb`."""
    return spec.family == "olmo2"


def rotary_halves(spec: ModelSpec) -> bool:
    """Whether the rotary embedding rotates q's and k's two halves by cos and sin of head_dim / 2
    and concatenates them (GPT-OSS's `_apply_rotary_emb`), rather than x * cos + rotate_half(x) * sin
    with cos and sin of head_dim (Llama's). Source: transformers 5 `GptOssRotaryEmbedding`."""
    return spec.family == "gpt_oss"


def rotary_tables(spec: ModelSpec, cond: Conditions) -> tuple[tuple[int, int], tuple[int, int]]:
    """(values, bytes per value) of the rotary embedding's cos and of its sin, one position each per
    token of a sequence (the model makes (1, s) position ids): `rotary_width` values each, fp32
    (`fp32_rotary`) or in the weights' dtype. Llama 4's complex form is one complex64 `freqs_cis` of
    head_dim / 2 values per position (8 bytes each), counted as the cos, with no sin. Source:
    transformers 5 `Llama4TextRotaryEmbedding.forward`."""
    if spec.family in COMPLEX_ROPE:
        return (cond.seq_len * rotary_width(spec) // 2, 8), (0, 8)
    per = (cond.seq_len * rotary_width(spec), FP32 if fp32_rotary(spec) else cond.weight_bytes)
    return per, per


def rotary_width(spec: ModelSpec) -> int:
    """Elements per position of the rotary cos (and of sin): head_dim, GPT-OSS's head_dim / 2, the
    rotating part of a head where only part rotates (`ModelSpec.rotary_dim`)."""
    return spec.head_dim // 2 if rotary_halves(spec) else spec.rotary_dim


def eager_output_transient(g: Graph, k: Tensor, kv_heads: int, heads: int, full: int, out: int) -> int:
    """What eager attention holds beyond the saved tensors as it makes its output contiguous.

    `eager_attention_forward` binds until it returns: the repeated key (`repeat_kv`: a copy at every
    head when 1 < kv heads < heads, in the rotated key's dtype; under autocast that is not the 16-bit
    copy the matmul keeps), the probabilities it returns (after dropout, in the query's dtype; unsaved
    when autocast's matmul keeps its own 16-bit copy), the matmul's (b, heads, s, d) output and its
    transposed contiguous copy (2 x `out`). The caller's locals (`Graph.args`) are alive too.
    """
    local = [] if g.attn_weights is None else [g.attn_weights]
    if g.cond.autocast and 1 < kv_heads < heads and k.itemsize != 2:
        local.append(g.new(full, k.itemsize, False))
    return g.unsaved(*g.args, *local) + 2 * out


def math_kernel_transient(full: int, kv_full: int, probs: int, square: int, itemsize: int,
                          query_itemsize: int, kv_heads: int, heads: int, q_copied: bool,
                          masked: bool = False, v_kept: bool = False, out_full: int = 0) -> int:
    """What torch's CPU math attention kernel (`_scaled_dot_product_attention_math`, the fallback when
    attention dropout is on) holds beyond what it saves, as its output is cast back to the inputs'
    dtype: 16-bit inputs upcast to fp32 (q, k, v), k repeated over the query heads (`enable_gqa`: a
    copy, from one k/v head too; with a mask, transformers' `repeat_kv` already gave the kernel
    every head, copied from several k/v heads, an expanded view of one), the scaled query beside
    the contiguous copy the score matmul makes of it (`q_copied`: several sequences, heads and
    positions, unless the rotary embedding made q contiguous: Phi-3's concatenation), the causal
    mask built as a fp32 (s x s) tensor, the dropped probabilities cast back to the inputs' dtype for
    probs @ v, the fp32 output and its cast. Under autocast, the 16-bit casts of a fp32 rotated q and
    k are alive too.
    `full`, `kv_full`: elements of q and of k (or v); `probs`: b x heads x s x s. `v_kept`: v's fp32
    upcast is itself what probs @ v keeps (counted as saved), not a transient beside a copy.
    Assumption: torch 2.13's CPU math kernel, as the tracer lists its tensors; the saved copies
    (scaled q and k, v, probabilities, dropout mask, dropped probabilities) are counted by `attention`.
    `out_full`: elements of v and of the output where their heads are not q's (latent attention).
    """
    out = out_full or full
    v_full = kv_full * out // full
    upcast = itemsize != FP32
    held = square * FP32 + out * FP32  # the mask, the fp32 output
    if q_copied:
        held += full * FP32
    if upcast:
        held += (full + kv_full + (0 if v_kept else v_full)) * FP32 + probs * itemsize + out * itemsize
    if kv_heads < heads and (kv_heads > 1 or not masked):
        held += full * FP32
    if query_itemsize != itemsize:  # autocast's casts of the fp32 rotated query and key
        held += full * itemsize + kv_full * itemsize
    return held


def attention_locals(h: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
    """Tensors alive in local variables while attention and its output projection run, beyond what
    they save: the decoder layer's normed input (`hidden_states`, bound until `self_attn` returns),
    and the attention module's rotated query and key and its value (`query_states`, `key_states`,
    `value_states`), bound until it returns after o_proj. Phi-3's value is a slice of the fused
    qkv output, so it holds all of it. What an op saved is counted there (`Graph.unsaved` skips it).
    Assumption: transformers 5's attention modules (llama form), which rebind q and k to their rotated
    copies, so the projections' own outputs are freed unless saved.
    """
    return (h, q, k, v)


def _moe(g: Graph, spec: ModelSpec, p: str, h: Tensor) -> Tensor:
    """Mixtral's sparse block as transformers 5 runs it: a router, then the tokens sorted by expert and
    two grouped matmuls over all (token, expert) rows at once (`grouped_mm_experts_forward`).

    The router keeps its fp32 softmax, the top-k indices, the normaliser and the normalised weights.
    The experts keep, each only when a gradient needs it: the row index of the gather (hidden states'
    gradient), the sort permutation (routing weights' gradient), the inverse permutation and the group
    offsets, each row's routing weight, the gate/up output and the activation, the down output (for the
    routing weights' gradient), and, when an expert weight trains, the gathered input rows (gate/up)
    or the down projection's input (down). Grouped matmuls are not autocast: they run in the hidden
    states' dtype.

    LoRA on the fused experts or the router is PEFT 0.21's `ParamWrapper` (`target_parameters`): the
    weight is re-made each forward as a new tensor, W + s x B A (`_LoraFactorsProxy`, one `baddbmm`
    in the weight's dtype, for 3-D experts; `_LoraParameterProxy`, W + delta, for the router), and a
    matmul whose input needs a gradient keeps that merged weight: E x out x in x weight bytes.

    Qwen3-MoE runs the same block, but divides the top-k weights by their sum only with
    `norm_topk_prob` (`ModelSpec.norm_topk`: without it the router keeps no normaliser and no
    normalised weights) and casts them back to the router logits' dtype, so the rows are weighted,
    un-sorted and summed in the wider of that and the hidden states' dtype (`routing_weight_bytes`).
    """
    H, inter, E = spec.hidden_size, spec.intermediate_size, spec.num_experts
    t = g.cond.tokens
    # every expert takes every token (Llama 4's repeat, weighted by its 0-or-sigmoid score), else the
    # k chosen rows of each token
    gathered = spec.expert_dispatch == "gathered"
    rows = t * spec.expert_rows_per_token
    logits = route(g, spec, router_path(spec, p), h)
    rw = routing_weight_bytes(spec, logits.itemsize)
    full = f"{p}.{spec.mlp_module}.experts" in g.trainable
    up_rank, down_rank = (g.wrapped.get(f"{p}.{spec.mlp_module}.experts.{leaf}", 0)
                          for leaf in ("gate_up_proj", "down_proj"))
    up_lora, down_lora = up_rank > 0, down_rank > 0
    up_trains, down_trains = full or up_lora, full or down_lora
    up_grad = h.grad or up_trains  # the gate/up output, the activation and the down input
    down_grad = up_grad or down_trains  # the down output
    if not (down_grad or logits.grad):
        # (no gradient reaches the block: it saves nothing and its backward has no moments; a shared
        # expert's trained weights may still add theirs)
        g.tails.append(0)
        g.expert_backward.append(0)
        return g.new(t * H, h.itemsize, False)
    xb, wb = h.itemsize, g.cond.weight_bytes
    cw = max(xb, rw)  # the weighted rows, their un-sorted copy and their sum
    if h.grad and gathered:
        g.save(g.new(rows, INT64, False))  # perm // k, the gather's index
    if logits.grad and gathered:
        g.save(g.new(rows, INT64, False))  # perm, the routing weights' gather
    if gathered:
        g.save(g.new(rows, INT64, False))  # the inverse permutation
    if full and spec.mlp_bias:
        g.save(g.new(rows, INT64, False))  # the sorted expert ids, the expert biases' gather index
    if (up_grad or down_trains) and gathered:
        g.save(g.new(E, 4, False))  # the offsets, int32
    if down_grad:
        g.save(g.new(rows, rw, False))  # each row's routing weight
    if up_trains:
        g.save(g.new(rows * H, xb, True))  # the gathered rows
    if up_lora and h.grad:
        g.save(g.new(E * 2 * inter * H, wb, True))  # the merged gate/up weight
    if up_grad:
        g.save(*(g.new(n, xb, True) for n in gate_saved_numels(spec, rows)))
    if down_trains:
        g.save(g.new(rows * inter, xb, True))  # the down projection's input
    if down_lora and up_grad:
        g.save(g.new(E * H * inter, wb, True))  # the merged down weight
    if logits.grad:
        g.save(g.new(rows * H, xb, True))  # the down output
    # (GPT-OSS's k-wide routing weights are softmax's output, saved when the logits need a gradient)
    bound = 0 if spec.routing == "topk-softmax" and logits.grad else rw
    local = (moe_locals(t, rows, E, 0 if h.key in g.saved else h.nbytes, logits.itemsize, bound)
             + g.unsaved(*(a for a in g.args if a.key != h.key)))
    # PEFT's merged expert weights no matmul saved stay cached until the experts return
    cached = merged_weights_cached(E, H, inter, wb, up_lora and not h.grad, down_lora and not up_grad)
    forward_local = moe_locals(t, rows, E, 0, logits.itemsize, bound) + cached
    if spec.expert_gate == "clamped-swiglu":
        swiglu_block_moments(g, spec, rows, xb, (up_trains, up_grad, down_trains, full, logits.grad),
                             (up_lora and not h.grad, down_lora and up_grad), (local, forward_local, cached))
    # GPT-OSS's down biases, gathered per row, are bound from the down projection to the block's end
    down_bias = rows * H * wb if spec.mlp_bias else 0
    g.peak_at(moe_down_transient(rows, H, inter, xb, up_trains, down_trains) + down_bias + local + cached)
    # the whole forward's moments in the block (its input is among the block's arguments)
    g.moment(extra=forward_local + down_bias + moe_forward_transient(
        t, rows, H, inter, xb, up_trains, up_grad, down_grad, logits.grad, rw))
    g.peak_at(moe_end_transient(rows, H, xb, up_trains, cw) + down_bias + local + cached)
    # a checkpointed block's first backward op, the un-sort's, holds the recomputed saved set, its
    # incoming gradient (`pending`), a zeroed (rows x hidden) buffer and its scattered copy; the
    # recompute's locals are gone by then, the sorted expert ids with them. The rows were weighted by
    # the routing weights, so these gradients are in the weighted rows' dtype (`cw`: Mixtral's fp32
    # whatever the hidden states' dtype).
    layer = g.section.removesuffix(" mlp")
    g.unsort[layer] = (g.saved_bytes(layer) + g.saved_bytes(f"{layer} mlp") - rows * INT64
                       + 2 * rows * H * cw)
    g.peak_at(moe_unsort_transient(rows, H, E, cw))  # the recompute's last op, the un-sort itself
    # then the combine's backward, the un-sort's buffers and the gradient it scattered freed
    g.recompute_combine[layer] = (g.saved_bytes(layer) + g.saved_bytes(f"{layer} mlp") - rows * INT64
                                  + moe_recompute_combine(rows, H, logits.grad, cw))
    # backward reaches the block's saved tensors through the un-sort, after the sum over top-k has
    # handed back a (rows x hidden) gradient: it waits through the recompute (`moe_pending`)
    g.pending[layer] = moe_pending(t, rows, H, xb, cw)
    # by the gated product's backward (the MLP's peak), the un-sort's inverse permutation, the down
    # output (kept for the routing weights' gradient) and the down projection's input (kept for its
    # weight's gradient) have been used and freed
    down_kept = ((rows * inter * xb if down_trains else 0)
                 + (E * H * inter * wb if down_lora and up_grad else 0))  # and the merged down weight
    tail = rows * INT64 + (rows * H * xb if logits.grad else 0) + down_kept
    # (with nothing before the block needing a gradient, the residual stream's gradient is used up
    # by then too, and so is each row's routing weight, when kept, by the combine's backward)
    residual = 0 if h.grad else residual_gradient_bytes(spec, g.cond)
    used_up = 0 if h.grad else residual + (rows * rw if down_grad else 0)
    g.tails.append(tail + used_up)
    if full:
        # the gate/up grouped matmul's backward: its gradient and the gathered rows' (rows x hidden)
        # beside the gate/up output's gradient; what the gate kept is used up
        g.up_backward[layer] = (sum(gate_saved_numels(spec, rows)) * xb, rows * (2 * inter + H) * xb)
    merged = merged_weight_backward(spec, rows, xb, wb, up_rank, down_rank, h.grad, up_grad, down_trains,
                                    logits.grad, rw)
    # the combine's backward comes before the down projection's: what that keeps under LoRA (its input,
    # the merged weight) is not freed yet, though the tail takes it off the MLP's peak. (Trained in
    # full, the down weight's gradient, counted at the MLP's peak, does not exist yet either.)
    # (the timeline counts the down projection's LoRA gradients as made before the MLP's peak; they
    # are not, yet)
    down_grads = expert_lora_gradients(E, H, inter, down_rank, wb)[1]
    combine = (0 if g.checkpointed else
               moe_combine_backward(rows, H, xb, cw) - tail + down_kept - down_grads)
    if merged and not h.grad:
        # nothing before the block needs a gradient (the first layer over frozen embeddings): the
        # residual stream's gradient, which the timeline holds through every layer, is the block's
        # incoming one alone, used up by its first backward op
        merged -= residual
    g.expert_backward.append(max(merged, combine) if down_lora else merged)
    # its own moment, before the down projection's weight gradient exists (a full one when trained)
    g.combine[layer] = combine
    return g.new(t * H, xb, True)


def every_expert_block(g: Graph, spec: ModelSpec, p: str, h: Tensor) -> Tensor:
    """Llama 4's routed experts as transformers 5 runs them (`Llama4TextMoe`, `Llama4TextExperts`):
    the router's scores for every expert (0 where not chosen), every token repeated once per expert
    (E x tokens rows) and weighted by its score, then two bmm over all experts at once, E x tokens x
    2 inter and E x tokens x hidden, summed over the experts. The shared expert runs after (its own
    function) and the sum is added into its output in place.

    Saved, each only when a gradient needs it: the column of scores (rows, the logits' dtype) and the
    repeated rows (rows x hidden) by their product; the weighted rows (their 16-bit copy under
    autocast, which casts bmm's operands) when the gate/up weight trains; the gate/up output and
    silu's output; the gated product when the down weight trains; under autocast the 16-bit copy
    of each expert weight a gradient flows through (cached until forward ends when it trains).
    What backward holds beyond them: the down bmm's input gradient beside a contiguous copy of the
    incoming one (the sum's expanded gradient reshaped, rows x hidden) (`Graph.combine`); then the
    gated product's (three rows x inter, `mlp_backward_transients`), once the down bmm's saved tensors
    are freed (`Graph.tails`)."""
    H, inter, E, t = spec.hidden_size, spec.intermediate_size, spec.num_experts, g.cond.tokens
    rows = t * E
    mlp = f"{p}.{spec.mlp_module}"
    logits = route(g, spec, router_path(spec, p), h)
    full = f"{mlp}.experts" in g.trainable
    scores = g.new(t * E, logits.itemsize, logits.grad)  # `router_scores`, bound until the block returns
    column = g.new(rows, logits.itemsize, logits.grad)  # its transpose as one column: a copy
    repeated = g.new(rows * H, h.itemsize, h.grad)
    bound = (h, logits, scores)
    g.moment(*bound, column, repeated)
    x = g.mul(repeated, column)
    g.moment(*bound, repeated, x)
    weighted_from = g._saved_total
    cb = 2 if g.cond.autocast else x.itemsize  # autocast runs bmm on 16-bit copies of both operands
    xc = g.cast(x, cb)
    if full:
        g.save(xc, kernel=True)  # for the gate/up weight's gradient
    weights = expert_weight_copies(g, E * H * 2 * inter, x.grad, full)
    gu = g.new(rows * 2 * inter, cb, x.grad or full)
    g.moment(*bound, x, xc, gu, extra=weights)
    g.peak_at(g.unsaved(*g.args, *bound, x, xc, gu) + weights)
    act = g.pointwise(rows * inter, cb, gu.grad, gu)
    if gu.grad:
        # silu keeps the gate and the product up, views of gu; the product keeps silu's output
        g.save(gu, act)
    prod = g.pointwise(rows * inter, cb, gu.grad, gu, act)
    g.moment(*bound, x, gu, act, prod)
    g.tail_start()
    if full:
        g.save(prod, kernel=True)  # for the down weight's gradient
    weights = expert_weight_copies(g, E * inter * H, prod.grad, full)
    out = g.new(rows * H, cb, prod.grad or full)
    g.moment(*bound, x, gu, prod, out, extra=weights)
    g.peak_at(g.unsaved(*g.args, *bound, x, gu, prod, out) + weights)
    layer = g.section.removesuffix(" mlp")
    # the weighting's backward, once the experts' saved tensors are used: the weighted rows' gradient
    # and the product's two (the scores' before its sum over hidden), rows x hidden each, beside the
    # shared expert's input gradient (waiting to be summed with this one) and its weight gradients
    if x.grad:
        g.up_backward[layer] = (g._tail_from - weighted_from,
                                rows * H * (x.itemsize + (h.itemsize if h.grad else 0)
                                            + (x.itemsize if logits.grad else 0))
                                + (h.nbytes if h.grad else 0) + shared_expert_gradients(g, spec, p))
    g.tail_end()
    # the down bmm's backward: its input's gradient beside the incoming one, reshaped from the sum's
    # expanded gradient into a contiguous copy (rows x hidden)
    combine = rows * H * cb + rows * inter * cb if out.grad else 0
    g.combine[layer] = combine
    # recomputed (checkpointing), the same moment holds the layer's whole saved set again, the
    # recompute's locals gone by then
    g.recompute_combine[layer] = (g.saved_bytes(layer) + g.saved_bytes(f"{layer} mlp") + combine
                                  if combine else 0)
    g.expert_backward.append(0)
    summed = g.new(t * H, cb, out.grad)
    g.moment(*bound, x, out, summed)
    # the block binds the router's scores and logits and the weighted rows until it returns: alive
    # through the shared expert, which runs after the routed experts (in a recompute as in forward)
    g.hold(logits, scores, x)
    g.args += (logits, scores, x)
    return Tensor(out.numel, out.itemsize, out.grad, out.key)  # `routed_out`, summed when added


def every_expert_pending(g: Graph, spec: ModelSpec, p: str, out: Tensor, routed: Tensor) -> int:
    """Gradients Llama 4's expert block has made when backward first needs its saved tensors, alive
    through a checkpointed layer's recompute: the shared expert's down projection is the block's last
    op to save, as a dense MLP's is, so the same wait as for a dense MLP's output (`out`,
    `mlp_output_pending`), beside the routed sum's contiguous copy (`expert_sum_gradient_copy`).
    Added after the shared expert's own account of what waits (`shared_backward_moments`), whose
    input gradient is not made yet when these are."""
    shared_down = f"{shared_expert_path(spec, p)}.down_proj"
    return ((mlp_output_pending(g.cond, out.numel, shared_down in g.wrapped) if spec.shared_experts else 0)
            + (expert_sum_gradient_copy(routed) if routed.grad else 0))


def expert_sum_gradient_copy(routed: Tensor) -> int:
    """Llama 4's gradient of its routed rows, waiting through a checkpointed layer's recompute.

    The block adds the sum over experts of its (experts x tokens, hidden) routed output into the
    shared expert's output. The sum's backward expands the incoming gradient over the experts, and
    the reshape back to rows copies that expanded view into a contiguous one: rows x hidden in the
    routed output's dtype. The reshape and sum were recorded after the shared expert ran, so backward
    runs them first; the shared expert's backward then needs its saved tensors and sets off the
    recompute with the copy alive, and it lives until the down bmm's backward uses it.
    Source: transformers 5 `Llama4TextMoe.forward`; measured with the tracer."""
    return routed.nbytes


def expert_compute_bytes(spec: ModelSpec, cond: Conditions) -> int:
    """Bytes per value of the experts' matmuls: the weights' dtype for grouped matmuls, which autocast
    leaves alone; the compute dtype for Llama 4's bmm, which autocast runs in 16 bits."""
    return cond.weight_bytes if spec.expert_dispatch == "gathered" else cond.compute_bytes


def expert_weight_copies(g: Graph, numel: int, input_grad: bool, trains: bool) -> int:
    """Autocast's 16-bit copy of one fused expert weight for its bmm: saved when the input needs a
    gradient, cached until forward ends when the weight trains (then counted as saved too); otherwise
    a transient (its bytes returned). 0 without autocast."""
    if not g.cond.autocast:
        return 0
    if input_grad or trains:
        g.save(g.new(numel, 2, False))
    if trains:
        g.cached(numel * 2, saved=True)
    return 0 if input_grad or trains else numel * 2


def route(g: Graph, spec: ModelSpec, router: str, h: Tensor) -> Tensor:
    """The sparse block's router and its logits (whose dtype the routing weights take,
    `routing_weight_bytes`), with what it saves (`router_saves`). A sigmoid router (DeepSeek-V3,
    GLM-4-MoE) casts its input to fp32 (a copy of a 16-bit one) for its fp32 weight (autocast still
    runs it in 16 bits; a LoRA-merged weight is fp32 too). Source: transformers 5
    `DeepseekV3TopkRouter`."""
    H, E, t = spec.hidden_size, spec.num_experts, g.cond.tokens
    rows = t * spec.experts_per_token
    sigmoid = spec.routing == "sigmoid-group-topk"
    if sigmoid:
        h = g.cast(h, FP32)
    logits = (g.merged_linear(h, router, H, E, FP32 if sigmoid else 0) if router in g.wrapped
              else g.linear(h, router, H, E))
    if logits.grad:
        g.save(*router_saves(g, spec, t, rows, routing_weight_bytes(spec, logits.itemsize)))
    return logits


def shared_mlp(g: Graph, spec: ModelSpec, p: str, h: Tensor) -> tuple[Tensor, Tensor, int]:
    """The shared experts' gated MLP over the block's input, down_proj(act(gate_proj(h)) x
    up_proj(h)), and its forward moments beside what the layer binds (`g.args`, `g.held`): (its
    output, the gated product, what the down projection saved)."""
    H, inter = spec.hidden_size, spec.shared_width
    path = shared_expert_path(spec, p)
    gate = g.linear(h, f"{path}.gate_proj", H, inter)
    gate_act = g.unary(gate, "input")
    g.hold(gate_act)
    up = g.linear(h, f"{path}.up_proj", H, inter)
    # (a recompute reaches each moment only when a tensor is saved after it: early stop)
    g.peak_at(g.unsaved(h, gate_act, up, *g.args), after_saves=True)
    act = g.mul(gate_act, up)
    g.moment(up, act)  # the product beside its factors (the activation held)
    g.release(gate_act)
    down_from = g._saved_total
    down = f"{path}.down_proj"
    out = g.linear(act, down, inter, H)
    if g._saved_total > down_from or act.grad:
        # the down projection, when it saves anything (a frozen weight too, for its input's gradient),
        # saves the layer's last tensor: a recompute stops there, once it has, before its output
        g.peak_at(g.unsaved(h, act, *g.args) + recompute_stop_transient(g.cond, act.numel, out.numel,
                                                                         down in g.wrapped))
    g.peak_at(g.unsaved(h, act, out, *g.args), after_saves=True)
    return out, act, g._saved_total - down_from


def gated_shared_mlp_first(g: Graph, spec: ModelSpec, p: str, h: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """Qwen3-Next's block runs its shared expert's MLP before the router and the routed experts, and
    binds its output through them, to scale it by its gate after (transformers 5.25
    `Qwen3NextSparseMoeBlock.forward`): `shared_mlp`, its output bound; what it saved is added."""
    before = g._saved_total
    out, act, down_saved = shared_mlp(g, spec, p, h)
    g.hold(out)
    g.args += (out,)
    return out, act, down_saved, g._saved_total - before


def shared_experts(g: Graph, spec: ModelSpec, p: str, h: Tensor, routed: Tensor,
                   routed_saved: int = 0, ran: tuple[Tensor, Tensor, int, int] | None = None) -> Tensor:
    """DeepSeek-V3's shared experts: a gated MLP of shared_experts x intermediate_size over the block's
    input, run after the routed experts (whose output is bound meanwhile) and added to it. What it
    saves is used and freed first in backward (its ops were recorded last), before the routed
    experts' peak: it joins the block's tail. Its own peak, the gated product's backward (its
    gradient and the two it hands back, tokens x width each in compute dtype), comes with every
    routed expert's saved tensor still alive and only the down projection's freed: a moment of the
    block's backward beyond its saved tensors (`Graph.expert_backward`). Its input's gradient then
    waits through all of the routed experts' backward, to be summed with theirs: every later moment
    of the block holds it too (the un-sort's and the combine's, the recompute's, the gated product's
    and a merged expert weight's). Source: transformers 5 `DeepseekV3MoE.forward`. `ran`: what
    `gated_shared_mlp_first` returned, where the MLP ran before the routed experts (Qwen3-Next's)."""
    H = spec.hidden_size
    g.args += (routed,)
    g.hold(routed)
    if ran is None:  # (run after the routed experts, whose output is bound meanwhile)
        before = g._saved_total
        out, act, down_saved = shared_mlp(g, spec, p, h)
        mlp_saved = g._saved_total - before
    else:
        out, act, down_saved, mlp_saved = ran
    gate_from = g._saved_total
    if spec.shared_expert_gate:
        # Qwen3-Next scales the shared expert by sigmoid(shared_expert_gate(h)): sigmoid keeps its
        # (tokens, 1) output, the product both factors
        out = g.mul(g.unary(g.linear(h, f"{p}.mlp.shared_expert_gate", H, 1), "output"), out)
    g.release(routed, *((ran[0],) if ran else ()))
    g.args = tuple(a for a in g.args if a.key != routed.key and not (ran and a.key == ran[0].key))
    # Qwen3-Next's gated shared expert runs before the routed experts: its backward comes after
    # theirs, so its MLP's saved tensors stay through them (not part of the block's tail), and two
    # (tokens x hidden) gradients wait meanwhile: its output's (from the gate's product) and its
    # input's share from the gate's projection. The gate and its product run after the routed
    # experts, so their backward comes first, freeing what they saved (the MLP's output among it).
    # DeepSeek-V3's shared experts run after the routed ones, backward first.
    first = spec.shared_expert_gate
    if g.tails and not first:
        g.tails[-1] += g._saved_total - gate_from + mlp_saved
    waits = (h.nbytes if h.grad else 0) + (out.nbytes if first and out.grad else 0)
    shared_backward_moments(g, spec, p, waits, (mlp_saved, g._saved_total - gate_from),
                            down_saved if act.grad else None,
                            out.nbytes if out.itemsize < routed.itemsize else 0, routed_saved)
    # (Llama 4's routed output is every expert's rows, summed into the shared expert's output)
    return g.pointwise(out.numel, max(routed.itemsize, out.itemsize), routed.grad or out.grad, routed, out)


def shared_expert_gradients(g: Graph, spec: ModelSpec, p: str) -> int:
    """The shared experts' weight gradients: hidden x `shared_width` for each of gate_proj, up_proj
    and down_proj that trains."""
    path = shared_expert_path(spec, p)
    return sum(spec.hidden_size * spec.shared_width * g.cond.weight_bytes
               for leaf in ("gate_proj", "up_proj", "down_proj") if f"{path}.{leaf}" in g.trainable)


def shared_backward_moments(g: Graph, spec: ModelSpec, p: str, waits: int, saves: tuple[int, int],
                            down_saved: int | None, cast: int, routed_saved: int = 0) -> None:
    """The shared experts' share of the sparse block's backward moments (see `shared_experts`): their
    input's gradient (`waits`) alive through the routed experts' backward, what they saved (`saves`:
    the MLP's, then its gate's and the gate's product's) freed by then, and, trained in full, their
    three weight gradients made by then; under autocast the 16-bit cast of their gradient (`cast`)
    waiting through a recompute. Their own gated product's moment (`down_saved`: what the down
    projection saved; None when no gradient reaches it) holds only the down projection's weight
    gradient, not yet the routed experts' down one, which the timeline counts before the block's
    backward. A gated shared expert (Qwen3-Next's) runs before
    the routed experts, so its product's backward comes after theirs, once their `routed_saved` bytes
    are freed and all their weight gradients made; its gate's product and projection, made after the
    routed experts, run their backward before them, freeing what they saved."""
    H, inter, wb = spec.hidden_size, spec.shared_width, g.cond.weight_bytes
    layer = g.section.removesuffix(" mlp")
    # (a gated shared expert, run before the routed ones, has made none by their backward)
    made = 0 if spec.shared_expert_gate else shared_expert_gradients(g, spec, p)
    first = spec.shared_expert_gate
    # (run first, a gated shared expert's MLP's saves are alive through the routed experts' backward:
    # freed by none of their moments, and already in the recomputed set the un-sort's and the
    # recompute's combine moments hold; its gate's are freed before any of them)
    kept, gone = saves
    mine = kept + gone
    for moments, freed in ((g.pending, 0), (g.combine, gone if first else mine), (g.recompute_combine, 0)):
        if moments.get(layer):  # (the un-sort's and the recompute's were written before these saves)
            moments[layer] += waits + made - freed
    # (the un-sort's moment adds `pending`, which holds `waits`; the gradients are made before it)
    g.pending[layer] = g.pending.get(layer, 0) + cast - (made if g.pending.get(layer) else 0)
    if g.unsort.get(layer):
        g.unsort[layer] += made
        if first:
            # a checkpointed block's recompute is started by the gate's product, the first op backward
            # reaches that kept anything: before the routed rows' sum and the product have handed back
            # anything, so their gradients wait from the un-sort on, not through the recompute
            g.unsort[layer] += g.pending[layer] - cast
            g.pending[layer] = cast
    routed_peak = (3 * g.cond.tokens * spec.expert_rows_per_token * spec.intermediate_size
                   * expert_compute_bytes(spec, g.cond)
                   - (g.tails[-1] if g.tails else 0))
    routed_trains = f"{p}.{spec.mlp_module}.experts" in g.trainable
    routed_grad = spec.num_experts * H * spec.intermediate_size * wb if routed_trains else 0
    shared_down = f"{shared_expert_path(spec, p)}.down_proj"
    down_grad = H * inter * wb if shared_down in g.trainable else 0
    shared = (0 if down_saved is None else
              3 * g.cond.tokens * inter * g.cond.compute_bytes - down_saved + down_grad - routed_grad)
    if spec.shared_expert_gate and shared:
        # run last in backward: the routed experts' saved tensors are freed by then, their gate/up
        # weight's gradient made beside the down one
        shared += 3 * routed_grad - routed_saved - gone
    if not g.expert_backward:  # (a block no gradient reaches: `_moe` returned before its moments)
        return
    merged = g.expert_backward[-1]
    g.expert_backward[-1] = max(merged + waits + made - (gone if first else mine) if merged else 0,
                                routed_peak + waits + made - (gone if first else 0) if waits else 0, shared)


def expert_lora_gradients(experts: int, out_f: int, in_f: int, rank: int, itemsize: int) -> tuple[int, int]:
    """LoRA on a fused expert weight (E x out x in): (the most its B and A gradients hold while
    `baddbmm`'s backward makes them, B's first, each a bmm and its scaled copy; both, once made)."""
    b, a = experts * out_f * rank * itemsize, experts * rank * in_f * itemsize
    return max(2 * b, b + 2 * a), a + b


def merged_weight_backward(spec: ModelSpec, rows: int, xb: int, wb: int, up_rank: int, down_rank: int,
                           input_grad: bool, up_grad: bool, down_saves_input: bool,
                           routing_grad: bool, routing_bytes: int = FP32) -> int:
    """Bytes beyond the layer's saved tensors while a grouped matmul over a ParamWrapper weight runs
    its backward (ranks 0: not wrapped), at two moments per weight. By the first of them the routing
    weights' product and the un-permuting gather have run their backward, freeing what they saved:
    the inverse permutation, each row's routing weight and (when the router has a gradient) the down
    output.

    - the matmul's: the merged weight's full gradient (E x out x in, the weight's dtype) beside the
      incoming gradient and the one the matmul returns for its input;
    - `baddbmm`'s backward after it, which turns that gradient into the small B and A gradients (B's
      first, each a bmm and its scaled copy, in the adapters' dtype): the incoming gradient, the merged
      weight and the input the matmul saved are freed by then, the input's gradient is not.

    Down projection: incoming rows x H, input rows x inter (its gradient only when the gate/up side
    needs one). Gate/up (rank 2r where PEFT fuses two projections, r for GPT-OSS): incoming rows x 2
    inter, input rows x H (its gradient when the hidden states need one); by then the activation's
    backward has freed the gate/up output and the activation it saved, the down projection its input and
    its merged weight, and the down projection's LoRA gradients exist: the timeline counts them with the
    MLP's output projection's, before the MLP's peak, so the down projection's own moments take them
    off. The largest (0 with neither wrapped); the timeline takes the larger of this and the MLP's own
    transient (`layer_backward_transients`).
    """
    H, inter, E = spec.hidden_size, spec.intermediate_size, spec.num_experts
    combined = rows * INT64 + rows * routing_bytes + (rows * H * xb if routing_grad else 0)
    moments = [0]
    down_grads = 0
    if down_rank:
        making, down_grads = expert_lora_gradients(E, H, inter, down_rank, wb)
        weight_grad, input_grad_d = E * H * inter * wb, (rows * inter * xb if up_grad else 0)
        moments.append(rows * H * xb + weight_grad + input_grad_d - combined - down_grads)
        freed_d = (E * H * inter * wb if up_grad else 0) + (rows * inter * xb if down_saves_input else 0)
        moments.append(weight_grad + input_grad_d + making - combined - down_grads - freed_d)
    if up_rank:
        # (rank 2r where PEFT fuses two v4 linears into it, r where it is targeted by name: GPT-OSS)
        making, _ = expert_lora_gradients(E, 2 * inter, H, gate_up_rank_factor(spec) * up_rank, wb)
        freed = (rows * 2 * inter * xb + rows * inter * xb + (rows * inter * xb if down_saves_input else 0)
                 + (E * H * inter * wb if down_rank and up_grad else 0))
        weight_grad, input_grad_u = E * 2 * inter * H * wb, (rows * H * xb if input_grad else 0)
        at_matmul = rows * 2 * inter * xb + weight_grad + input_grad_u - freed - combined
        moments.append(at_matmul)
        # the incoming gradient, the merged weight (saved when the input needs a gradient), the
        # gathered rows and the group offsets (int32) are freed once the matmul's backward is done
        moments.append(at_matmul - rows * 2 * inter * xb - (weight_grad if input_grad else 0)
                       - rows * H * xb - E * 4 + making)
    return max(moments)


def moe_down_transient(rows: int, hidden: int, inter: int, itemsize: int, up_trains: bool,
                       down_trains: bool) -> int:
    """What the expert block holds beyond its saved tensors at its peak, the down grouped matmul.

    The gathered input rows (rows x hidden) and the gated activation that the down projection reads
    (rows x intermediate) are local variables alive until the block returns; when the gate/up (the
    down) weights train, fully or through an adapter, the rows (the activation) are saved already,
    otherwise they are transients. Assumption: transformers 5's grouped_mm experts
    (`integrations/moe.py`), rows = tokens x top-k, in the hidden states' dtype.
    """
    return ((0 if up_trains else rows * hidden) + (0 if down_trains else rows * inter)) * itemsize


def moe_forward_transient(tokens: int, rows: int, hidden: int, inter: int, itemsize: int, up_trains: bool,
                          up_grad: bool, down_grad: bool, routing_grad: bool,
                          routing_bytes: int = FP32) -> int:
    """The most the expert block's forward holds beyond its saved tensors and `moe_locals`, at the
    down grouped matmul or at the combine after it (the larger).

    Both: the sorted expert ids (rows x int64), the sort permutation and each row's routing weight
    when not saved, and the gathered input rows unless the gate/up weights train (then saved).
    Down matmul: its input (the gated activation, rows x intermediate, unless saved) and its output
    (rows x hidden). Combine: the down output (unless saved for the routing weights' gradient); the
    rows weighted by the fp32 routing weights (fp32) and their un-sorted copy, together at the
    un-sort; then the un-sorted rows, their sum over top-k (tokens x hidden, fp32) and its cast back
    to the hidden states' dtype when that is 16-bit. Source: transformers 5
    `grouped_mm_experts_forward`; rows = tokens x top-k. `routing_bytes`: the routing weights' dtype
    (`routing_weight_bytes`); the weighted rows are in the wider of it and the hidden states'.
    """
    cw = max(itemsize, routing_bytes)
    both = (rows * INT64 + (0 if routing_grad else rows * INT64) + (0 if down_grad else rows * routing_bytes)
            + (0 if up_trains else rows * hidden * itemsize))
    down = (0 if up_grad else rows * inter * itemsize) + rows * hidden * itemsize
    out = 0 if routing_grad else rows * hidden * itemsize
    unsort = out + 2 * rows * hidden * cw
    summed = out + rows * hidden * cw + tokens * hidden * (cw + (itemsize if itemsize != cw else 0))
    return both + max(down, unsort, summed)


def moe_pending(tokens: int, rows: int, hidden: int, itemsize: int, combine_bytes: int = FP32) -> int:
    """The expert block's output gradient made before backward first needs its saved tensors (the
    un-sort's inverse permutation), alive through a checkpointed block's recompute.

    The block sums its un-sorted rows over top-k in fp32 and casts the sum back to the hidden states'
    dtype when that is 16-bit. Backward runs the cast's backward (a tokens x hidden fp32 copy of the
    incoming gradient), then the sum's (expand, then a contiguous rows x hidden fp32 clone for the
    un-sort's scatter, after which the cast's copy is freed). With top-1 the expand flattens to rows
    as a view: only the cast's copy, none at fp32. Source: transformers 5 `grouped_mm_experts_forward`
    (`.sum(dim=1)` then `.to(hidden_states.dtype)`); rows = tokens x top-k. `combine_bytes`: the
    weighted rows' dtype (fp32 for Mixtral; see `routing_weight_bytes`).
    """
    if rows > tokens:
        return rows * hidden * combine_bytes
    return tokens * hidden * combine_bytes if itemsize != combine_bytes else 0


def moe_unsort_transient(rows: int, hidden: int, experts: int, combine_bytes: int = FP32) -> int:
    """What a recomputed expert block holds beyond its saved tensors at its last op, the un-sort's
    scatter of the weighted rows back to token order (`index_put` into a zeroed buffer): the buffer
    and its scattered copy (rows x hidden, fp32 since the routing weights are fp32), and the
    per-expert counts `histc` made and their running sum (experts x fp32 each), still bound. The
    sorted expert ids are alive too (the walk counts them among the saved tensors). Assumption:
    transformers 5's grouped_mm experts; measured with the tracer (Mixtral LoRA on all linear
    layers, pure-bf16, checkpointed). `combine_bytes`: the weighted rows' dtype.
    """
    return 2 * rows * hidden * combine_bytes + 2 * experts * FP32


def moe_recompute_combine(rows: int, hidden: int, routing_grad: bool, combine_bytes: int = FP32) -> int:
    """What a recomputed expert block holds beyond its saved tensors (less the sorted expert ids, a
    recompute local gone by then) at the backward of the rows' weighting by the fp32 routing weights,
    the op after the un-sort's. The un-sort has used and freed the inverse permutation (rows int64),
    its zeroed buffer and the incoming gradient (`moe_pending`); its scattered rows x hidden gradient
    is alive beside the product's two gradients, the down output's and (when the router's logits need
    one) the routing weights', all fp32 (rows x hidden) since the weights are fp32. Assumption:
    transformers 5's grouped_mm experts; rows = tokens x top-k; `combine_bytes`: the weighted rows'
    dtype (fp32 for Mixtral).
    """
    return (3 if routing_grad else 2) * rows * hidden * combine_bytes - rows * INT64


def moe_end_transient(rows: int, hidden: int, itemsize: int, up_trains: bool,
                      combine_bytes: int = FP32) -> int:
    """What the expert block holds beyond its saved tensors as it ends: the gathered input rows (a
    local, saved already when the gate/up weights train), the down output weighted by the fp32 routing
    weights (rows x hidden, fp32 or wider), the sorted expert ids (`expert_ids_g`, rows int64, bound
    until the block returns) and the arange the inverse permutation is scattered from (rows int64).
    The gated activation the down projection read is gone by then. Assumption: transformers 5's
    grouped_mm experts, as the tracer lists them at the block's last op.
    """
    return ((0 if up_trains else rows * hidden * itemsize) + rows * hidden * max(itemsize, combine_bytes)
            + 2 * rows * INT64)


def moe_combine_backward(rows: int, hidden: int, itemsize: int, combine_bytes: int = FP32) -> int:
    """The backward of the rows' weighting by the fp32 routing weights, beyond the saved tensors: the
    weighted rows' gradient and the two products' (fp32, rows x hidden), a cast back to the hidden
    states' dtype when that is 16-bit, beside the down output and the inverse permutation (rows int64)
    it frees after. Assumption: transformers 5's grouped_mm experts, without checkpointing.
    `combine_bytes`: the weighted rows' dtype (fp32 for Mixtral)."""
    cw = combine_bytes
    return rows * hidden * (3 * cw + (itemsize if itemsize != cw else 0) + itemsize) + rows * INT64


def merged_weights_cached(experts: int, hidden: int, inter: int, weight_bytes: int, up_unsaved: bool,
                          down_unsaved: bool) -> int:
    """PEFT's ParamWrapper merges a fused expert weight (W + s B A) inside `parametrize.cached()`, so
    each merged weight stays alive until the wrapped experts' forward returns, saved or not. The ones
    no matmul saved (its input needed no gradient) are counted here: gate/up E x 2 inter x hidden,
    down E x hidden x inter, in the weight's dtype. Source: PEFT 0.21 `ParamWrapper._activate_lora`.
    """
    return ((2 * inter * hidden if up_unsaved else 0)
            + (hidden * inter if down_unsaved else 0)) * experts * weight_bytes


def moe_locals(tokens: int, rows: int, experts: int, block_input: int, logits_itemsize: int,
               routing_bytes: int = FP32) -> int:
    """Unsaved tensors the sparse block's forward keeps in local variables until it returns.

    The block's input (`block_input`: its bytes when no op saved it), the router logits (returned and
    bound to `_`, tokens x experts in the router's compute dtype), the top-k routing weights before
    their in-place normalisation was recorded (rows fp32; autograd saved a clone), the float copy of
    the sorted expert ids `histc` counts (rows x 4 B) and its per-expert counts (experts x 4 B).
    Source: transformers 5 `MixtralSparseMoeBlock.forward` and `grouped_mm_experts_forward`.
    `routing_bytes`: the routing weights' dtype as the block binds them (`routing_weight_bytes`).
    """
    return block_input + tokens * experts * logits_itemsize + rows * routing_bytes + rows * 4 + experts * 4


def swiglu_block_moments(g: Graph, spec: ModelSpec, rows: int, xb: int, flags: tuple[bool, ...],
                         merged: tuple[bool, bool], held: tuple[int, int, int]) -> None:
    """GPT-OSS's expert block's two moments of its own (`expert_gate_moments`), as a recompute and the
    forward reach them. `flags`: the gate/up weights train, the gate/up output needs a gradient, the
    down weights train, the experts train in full, the router's logits need a gradient; `merged`:
    PEFT's merged gate/up weight unsaved, its merged down weight saved; `held`: the block's locals
    beside a recompute, beside the forward, and PEFT's merged weights cached (`_moe`). What the
    block saves later is taken off: the inverse permutation, the down output and, at the gate, the
    merged down weight; of the merged weights only the gate/up one exists at the gate."""
    H, inter, E, wb = spec.hidden_size, spec.intermediate_size, spec.num_experts, g.cond.weight_bytes
    up_trains, up_grad, down_trains, full, routing_grad = flags
    local, forward_local, cached = held
    gate, down = expert_gate_moments(spec, rows, xb, wb, up_trains, up_grad, down_trains, full, routing_grad)
    later = rows * INT64 + (rows * H * xb if routing_grad else 0)
    gate -= later + (E * H * inter * wb if merged[1] else 0)
    merged_up = merged_weights_cached(E, H, inter, wb, merged[0], False)
    g.peak_at(gate + local + merged_up)
    g.moment(extra=gate + forward_local - cached + merged_up)
    g.peak_at(down - later + local + cached)
    g.moment(extra=down - later + forward_local)


def expert_gate_moments(spec: ModelSpec, rows: int, xb: int, wb: int, up_trains: bool, up_grad: bool,
                        down_trains: bool, full: bool, routing_grad: bool) -> tuple[int, int]:
    """What GPT-OSS's expert block holds beyond the saved tensors and `moe_locals` at two moments:
    the clamped SwiGLU's last op, (up + 1) * glu, and the gather of the down biases per row, when
    the gate/up ones are still bound.

    Both: the gathered input rows (a local, saved when the gate/up weights train), the gate/up biases
    gathered per row (rows x 2 inter, the weights' dtype), the sorted expert ids (rows int64; saved
    when the biases train) and, without a routing gradient, the router's top-k indices and the
    sort's permutation (rows int64 each, saved otherwise). At the gate, of its intermediates those
    not saved: with a gradient, the clamped up; without, the gate/up output, both clamps, glu and
    up + 1 (6 x rows x inter); and the product unless the down weights train. At the down biases:
    those too (rows x hidden), and the product when nothing saved it. Source: transformers 5
    `GptOssExperts._apply_gate`, `grouped_mm_experts_forward`.
    """
    H, inter = spec.hidden_size, spec.intermediate_size
    ids = (0 if full and spec.mlp_bias else rows * INT64) + (0 if routing_grad else 2 * rows * INT64)
    bound = (0 if up_trains else rows * H * xb) + rows * 2 * inter * wb + ids
    product = 0 if down_trains else rows * inter * xb
    gate = (1 if up_grad else 6) * rows * inter * xb + product
    return bound + gate, bound + rows * H * wb + product


def router_saves(g: Graph, spec: ModelSpec, tokens: int, rows: int, routing_bytes: int) -> tuple[Tensor, ...]:
    """What the router keeps when its logits need a gradient. Softmax then top-k (Mixtral,
    Qwen3-MoE): the fp32 softmax over every expert (tokens x experts) and top-k's indices, then with
    `norm_topk` the normaliser and the quotient. Top-k then softmax (GPT-OSS): top-k's indices and
    the softmax over the k selected logits (rows, in the logits' dtype). Rows = tokens x top-k.
    Top-k then sigmoid (Llama 4): top-k's indices and the fp32 sigmoid over every expert's score
    (the top-k logits scattered into a row of -inf). Source: transformers 5 `MixtralTopKRouter`,
    `Qwen3MoeTopKRouter`, `GptOssTopKRouter`, `Llama4Router`."""
    if spec.routing == "topk-softmax":
        return g.new(rows, INT64, False), g.new(rows, routing_bytes, True)
    # a sigmoid router (DeepSeek-V3, GLM-4-MoE) keeps its scores and the gather's indices of the
    # chosen ones, and with `norm_topk` the normaliser and the quotient, in the logits' dtype; the
    # choice itself (correction bias, group scores and masks, top-k) keeps nothing
    scores = routing_bytes if spec.routing == "sigmoid-group-topk" else FP32
    kept = (g.new(tokens * spec.num_experts, scores, True), g.new(rows, INT64, False))
    if spec.norm_topk:
        kept += (g.new(tokens, scores, False), g.new(rows, scores, True))
    return kept


def gate_saved_numels(spec: ModelSpec, rows: int) -> tuple[int, ...]:
    """Elements of each tensor the experts' gate keeps when the gate/up output needs a gradient
    (rows = tokens x top-k). silu(gate) * up: the gate/up output (silu and the product keep its halves,
    views of it) and silu's output, rows x 2 inter and rows x inter. GPT-OSS's clamped SwiGLU: the
    gate/up output (both clamps keep views of it), the clamped gate, sigmoid's output, gate x sigmoid
    and up + 1, four rows x inter. Source: transformers 5 `_default_apply_gate`,
    `GptOssExperts._apply_gate`."""
    inter = spec.intermediate_size
    if spec.expert_gate == "clamped-swiglu":
        return (rows * 2 * inter, *(rows * inter,) * 4)
    return rows * 2 * inter, rows * inter


def routing_weight_bytes(spec: ModelSpec, logits_itemsize: int) -> int:
    """Bytes per top-k routing weight as the experts get them: Mixtral's router hands over the
    softmax's fp32 values; Qwen3-MoE's casts them back to the router logits' dtype (16-bit under
    autocast or a 16-bit model). Source: transformers 5 `MixtralTopKRouter`, `Qwen3MoeTopKRouter`."""
    return FP32 if spec.family == "mixtral" else logits_itemsize


def head_and_loss(g: Graph, spec: ModelSpec, h: Tensor, head: str) -> tuple[Tensor, int, int]:
    """The LM head and the loss when they are not transformers' standard pair; returns the logits
    alive at the loss (compute dtype), the fp32 bytes beside them, and what the head's backward holds
    beyond the saved activations.

    `chunked`, torchtune 0.6.1 (`TransformerDecoder.chunked_output` + `CEWithChunkedOutputLoss`): the
    head runs on `loss_chunks` slices of the sequence (torch.chunk: ceil(s / n) positions each) and
    the whole list of logits is alive at the loss; each chunk is upcast to fp32 on its own, so only
    one chunk's fp32 copy exists at a time, but every chunk's log-softmax output (fp32) is saved.
    Per chunk the head keeps its input (a bf16 copy under autocast) when its weight trains, and
    under autocast a bf16 copy of a frozen weight (autocast caches the copy of a trained one, so that
    one is kept once). nll_loss keeps each chunk's labels (a copy when rows > 1) and its total weight.
    In backward autograd runs every chunk's loss before any chunk's head (they were made later):
    the first loss backward holds the nll and log-softmax gradients of one chunk (2 x 4 B x chunk
    tokens x vocab) beside everything saved.

    `fused-linear`, Liger-kernel 0.8.5 (`fused_linear_cross_entropy_forward`): the head's matmul and
    the loss in chunks of next_pow2(ceil(tokens / ceil(vocab / hidden))) tokens, the gradients
    computed in the forward. It keeps the input's gradient (tokens x hidden, the input's dtype) and,
    when the head trains, the weight's (vocab x hidden, the weight's dtype); at the loss one chunk's
    logits exist (compute dtype), plus the per-token fp32 losses. Its backward only scales them.
    """
    cond, V, H = g.cond, spec.vocab_size, spec.hidden_size
    b, s, t = cond.batch_size, cond.seq_len, cond.tokens
    trains = head in g.trainable
    grad = h.grad or trains
    if cond.loss == "fused-linear":
        inc = -(-V // H)
        rows = min(1 << max(-(-t // inc) - 1, 0).bit_length(), t)
        g.save(g.new(t * H, h.itemsize, False))  # grad_input
        if trains:
            g.save(g.new(V * H, cond.weight_bytes, False))  # grad_weight
        return g.new(rows * V, cond.compute_bytes, False), t * FP32, 0
    if cond.loss != "chunked":
        raise PlanError(f"loss must be standard, chunked or fused-linear, got {cond.loss!r}")
    size = -(-s // max(cond.loss_chunks, 1))
    widths = [min(size, s - start) for start in range(0, s, size)]
    cb = cond.compute_bytes
    # compiled (`loss_compiled`): each chunk's loss keeps its 16-bit logits (alive anyway until its
    # backward) and two fp32 values per row; no fp32 copy nor log-softmax output of the vocab's width
    compiled = loss_compiled(cond.compile)
    if trains and not cond.autocast:
        # a chunk is a view of h when the head's reshape can view it (one sequence, one position or
        # all of them): keeping it keeps all of h; any other chunk is not contiguous, and the head's
        # matmul keeps a copy of it
        g.save(*(h if b == 1 or w in (1, s) else g.new(b * w * H, h.itemsize, False) for w in widths))
    if cond.autocast and trains and grad:
        g.save(g.new(V * H, 2, False))  # the cached bf16 copy of the trained weight, once
    for w in widths:
        rows = b * w
        if cond.autocast and trains:
            g.save(g.new(rows * H, 2, False))  # the chunk's bf16 input
        if cond.autocast and h.grad and not trains:
            g.save(g.new(V * H, 2, False))  # a frozen weight's bf16 copy, made per chunk
        if spec.family in GEMMA_FAMILIES and spec.final_softcap and grad:
            g.save(g.new(rows * V, cb, True))  # final soft-cap: tanh keeps its output
        if grad and compiled:
            g.save(g.new(rows, FP32, False), g.new(rows, FP32, False))  # per row: max, log-sum-exp
        elif grad:
            g.save(g.new(rows * V, FP32, True))  # log_softmax keeps its output
            g.save(g.new(1, FP32, False))  # nll's total weight
        if b > 1 and w > 1:
            g.save(g.new(rows, INT64, False))  # the chunk's labels, made contiguous
    if b == 1 or min(widths) == 1:
        # a one-row (or one-column) chunk of the labels flattens as a view of the padded labels
        g.save(g.new(b * (s + 1), INT64, False))
    if grad:
        # the count of labelled tokens the sum is divided by, and the loss
        g.save(g.new(1, INT64, False), g.new(1, FP32, False))
    logits = g.new(t * V, cb, grad)
    # at chunk j's loss its fp32 copy exists and the later chunks' log-softmax outputs do not yet
    fp32, later = 0, 0
    for w in reversed(widths if not compiled else ()):
        if cb != FP32:
            fp32 = max(fp32, b * w * V * FP32 - later)
        later += b * w * V * FP32 if grad else 0
    # for several rows the padded labels are alive through the loss too; the head's input is not
    # (the model has returned the list of logits), unless backward keeps it
    fp32 += b * (s + 1) * INT64 if b > 1 else 0
    # chunks are undone last to first; by chunk j's loss backward the later chunks' log-softmax
    # outputs are freed and their logits gradients (compute dtype) wait for the head's backward
    after, worst = 0, 0
    if compiled and grad:
        # the logits stay saved until their chunk's backward, which writes that chunk's gradient
        # (`compiled_loss_alone_backward`): all logits plus one chunk's gradient, then the gradients
        # replace the logits chunk by chunk
        worst = t * V * cb + compiled_loss_alone_backward(b * max(widths) * V, cb)
    for w in reversed(widths if not compiled else ()):
        worst = max(worst, after + 2 * b * w * V * FP32)
        after += b * w * V * (cb - FP32)
    # then the heads, last chunk first: every log-softmax output is gone, the logits gradients not yet
    # used wait, and a trained weight's gradients are summed chunk by chunk (the sum so far, the
    # second chunk's and their sum: 3 weight-sized tensors in compute dtype). Gemma-2's soft-cap is
    # undone with its chunk's head: the two chunks done have freed their tanh outputs.
    if len(widths) > 1 and trains:
        done = b * (widths[-1] + widths[-2])
        capped = done * V * cb if spec.family in GEMMA_FAMILIES and spec.final_softcap else 0
        freed = 0 if compiled else t * V * FP32  # the log-softmax outputs saved (eager)
        freed += 0 if cond.autocast else chunk_inputs_freed(b, s, widths, H, h.itemsize)
        worst = max(worst, -freed + (t - done) * V * cb + 3 * V * H * cb - capped)
    return logits, fp32, (worst if grad else 0)


def chunk_inputs_freed(batch: int, seq: int, widths: list[int], hidden: int, itemsize: int) -> int:
    """What the chunked head's saved inputs give back, net, once the last two chunks' heads have run
    backward (the moment their weight gradients are summed), without autocast. A copied chunk gives
    back its copy and leaves its input gradient (the same shape and dtype) waiting for the rest of
    h's gradient: nothing net. h itself, which a chunk keeps as a view (one sequence, one position or
    all of them; see `head_and_loss`), is freed once no chunk still to run views it, less the waiting
    gradients of the viewing chunks done."""
    views = [batch == 1 or w in (1, seq) for w in widths]
    if not any(views[-2:]) or any(views[:-2]):
        return 0
    done = sum(w for w, view in zip(widths[-2:], views[-2:], strict=True) if view)
    return batch * (seq - done) * hidden * itemsize


def residual_gradient_bytes(spec: ModelSpec, cond: Conditions) -> int:
    """The residual stream's gradient, tokens x hidden: fp32 under autocast (the stream is fp32)."""
    return cond.tokens * spec.hidden_size * (FP32 if cond.autocast else cond.weight_bytes)


def layer_backward_transients(spec: ModelSpec, cond: Conditions) -> tuple[int, int, int]:
    """Gradients alive at once inside one layer's backward, beyond what the forward saved.

    The gradient of the residual stream flows through every layer (fp32 under autocast). On top of
    it, the larger of: the MLP's, where the product of the two branches (or GELU's last product)
    hands back two (tokens x intermediate) gradients while the incoming one is still alive; and the
    attention's, where flash backward returns q, k and v gradients beside the output's, and eager
    backward holds the gradient of the s x s probabilities and of the scores. Returned apart
    (residual, MLP, attention) because the MLP's saved tensors are freed before attention's backward.
    What the down projection and the ops after it kept is freed before the MLP's peak: the timeline
    takes it off (`Profile.mlp_tails`).
    """
    t, cb = cond.tokens, cond.compute_bytes
    resid = residual_gradient_bytes(spec, cond)
    rows = t * max(spec.expert_rows_per_token, 1)
    # grouped expert matmuls are not autocast: they run in the hidden states' (the weights') dtype;
    # so do bitsandbytes' 4-bit layers' outputs, cast back to their input's dtype by Linear4bit
    # (`.to(inp_dtype)`, fp32 under amp), and the MLP's gradients with them
    # (a model with dense layers or shared experts has its own per layer: `mlp_backward_transients`)
    stream = spec.num_experts or (cond.quantised_base and cond.nf4_output_in_input_dtype)
    mlp = 3 * rows * spec.intermediate_size * (cond.weight_bytes if stream else cb)
    # An expert block's first backward op without checkpointing, the combine's (the rows' weighting by
    # the fp32 routing weights), is its own phase (`Profile.expert_combine`, `moe_combine_backward`):
    # it comes before the down projection's weight gradient exists.
    qkv = qkv_backward_bytes(spec, cond)
    attn_dropout = spec.dropout_rates[0] if cond.dropout is None else cond.dropout
    # torch's CPU math fallback (attention dropout) keeps the probabilities as eager does
    if cond.attention == "eager" or (cond.device == "cpu" and attn_dropout > 0):
        # softmax backward: the fp32 gradient of the probabilities and of the scores, once the
        # 16-bit probabilities kept for probs @ v (under 16-bit compute) have been freed
        probs = cond.batch_size * spec.num_heads * cond.seq_len * cond.seq_len
        # GPT-2's eager softmax runs in the scores' dtype; the others' (and the math kernel) in fp32
        soft = cb if spec.family == "gpt2" and not cond.autocast and cond.attention == "eager" else FP32
        attn = max(qkv, probs * 2 * soft + value_gradient_bytes(spec, cond))
    else:
        attn = qkv
    return resid, mlp, attn


def mlp_backward_transients(spec: ModelSpec, cond: Conditions) -> tuple[int, ...]:
    """Per layer, the MLP's part of `layer_backward_transients` for a model whose layers' MLPs differ
    (DeepSeek-V3's dense layers first, its shared experts beside the routed ones); () for the rest.
    A dense layer's gated product hands back two (tokens x width) gradients beside the incoming one,
    in compute dtype; a sparse layer's the larger of its routed experts' (rows x expert width, in the
    weights' dtype) and its shared experts' (tokens x shared width, compute dtype)."""
    if not (spec.dense_layers or spec.shared_experts):
        return ()
    t, cb = cond.tokens, cond.compute_bytes
    routed = 3 * t * spec.expert_rows_per_token * spec.intermediate_size * expert_compute_bytes(spec, cond)
    shared = 3 * t * spec.shared_width * cb
    # (a gated shared expert's product runs after the routed experts' backward: `shared_experts`)
    shared = 0 if spec.shared_expert_gate else shared
    return tuple(max(routed, shared) if spec.sparse_layer(i) else 3 * t * spec.mlp_width(i) * cb
                 for i in range(spec.num_layers))


def cpu_rng_state_bytes() -> int:
    """Bytes of `torch.get_rng_state()`: the CPU generator's state copied into a uint8 tensor, the
    size of ATen's `CPUGeneratorImplState` (aten/src/ATen/CPUGeneratorImpl.cpp). Formula, C layout
    with 8-byte alignment: the legacy part (seed u64, left i32, seeded i32, next u64, the Mersenne
    twister's 624 x u64 state, three doubles, an int) padded to 8, then a float and a bool, padded
    to 8: 5,048 + 8 = 5,056."""
    def padded(n: int) -> int:
        return -(-n // 8) * 8

    mersenne_state_n = 624  # at::MERSENNE_STATE_N (ATen/core/MT19937RNGEngine.h)
    legacy = padded(8 + 4 + 4 + 8 + mersenne_state_n * 8 + 3 * 8 + 4)
    return padded(legacy + 4 + 1)


def checkpoint_rng_state_bytes(cond: Conditions) -> int:
    """Bytes of the CPU RNG state one checkpointed layer keeps, when the planned device's memory holds
    it: `cpu_rng_state_bytes()` on CPU under checkpointing, else 0.

    torch/utils/checkpoint.py (`_checkpoint_without_reentrant_generator`, preserve_rng_state=True, the
    default) calls `torch.get_rng_state()` as each checkpointed layer's forward starts; the state lives
    in the layer's `_CheckpointFrame` (its `recompute_fn`'s closure) until the last node of the layer's
    backward has run. Its recompute runs under `torch.random.fork_rng`, which copies the current state
    once more for as long as the recompute runs (`timeline.checkpoint_rng_states` places both). Both
    are CPU tensors made outside every op; a CUDA step's generator state (`get_device_states`) is a CPU
    tensor too, so on a GPU none of them is device memory.
    """
    return cpu_rng_state_bytes() if cond.grad_checkpointing and cond.device == "cpu" else 0


def section_layer(section: str) -> int:
    """The decoder layer a walk's section names ("layer 3", "layer 3 mlp" -> 3)."""
    return int(section.split()[1])


def checkpoint_masks_freed(spec: ModelSpec, cond: Conditions,
                           ckpt: tuple[bool, ...] | None = None) -> tuple[int, ...]:
    """Per layer, the attention-mask bytes freed once that layer's checkpointed backward is done.

    A checkpointed layer keeps the mask its kind of layer gets among its arguments, and backward
    runs from the last layer to the first: a kind's mask is let go with the checkpoint of the
    lowest checkpointed layer using it (`ckpt`, `checkpointed_layers`; None: every layer). Eager
    attention gets one (b, 1, s, s) mask per kind (full, sliding; Gemma-2 alternates them from a
    sliding layer 0), in the embeddings' dtype (fp32 under autocast);
    SDPA only a boolean (1, 1, s, s) one for sliding layers whose window is no longer than the
    sequence. Source: transformers 5 `masking_utils` and each model's `layer_types`.
    """
    b, s = cond.batch_size, cond.seq_len
    eager = cond.attention == "eager"
    eager_bytes = b * s * s * (FP32 if cond.autocast else cond.weight_bytes)
    lowest: dict[bool, int] = {}
    for i in reversed(range(spec.num_layers)):
        # (a linear-attention layer gets no mask: no padding, None)
        if (ckpt is None or ckpt[i]) and not spec.linear_layer(i):
            lowest[spec.sliding_type(i)] = i
    freed = [0] * spec.num_layers
    for sliding, i in lowest.items():
        if eager:
            freed[i] += eager_bytes
        elif cond.packed or (sliding and s >= (spec.local_span(i) or 0)):
            freed[i] += s * s if cond.packed else sdpa_local_mask_bytes(spec, cond)
    # Gemma 3's rotary embeddings likewise: a kind's cos and sin go with the lowest layer using it
    # (the one layer 0 rotates with stays through the embedding's backward, as in every family)
    rotary_low: dict[bool, int] = {}
    for i in reversed(range(spec.num_layers)):
        if ckpt is None or ckpt[i]:
            rotary_low[rotary_kind(spec, i)] = i
    pair = sum(n * size for n, size in rotary_tables(spec, cond))
    for i in rotary_low.values():
        freed[i] += pair if i else 0
    return tuple(freed)


def local_mask(spec: ModelSpec, i: int, cond: Conditions) -> bool:
    """Whether SDPA gets an explicit mask for layer `i`: a sliding window or attention chunk
    (`ModelSpec.local_span`) no longer than the sequence; shorter sequences run causal."""
    span = spec.local_span(i)
    return span is not None and cond.seq_len >= span


def forward_mask_bytes(spec: ModelSpec, cond: Conditions) -> int:
    """The attention masks the model's forward builds once and holds through its layers.

    Eager attention gets an additive (b, 1, s, s) mask in the embeddings' dtype (fp32 under autocast)
    per kind of layer (full, sliding; Gemma-2 always both, even for a one-layer slice, and Qwen2
    always the full one); SDPA a
    boolean (1, 1, s, s) one when a sliding window is no longer than the sequence, and none otherwise
    (it runs causal). Source: transformers 5
    `masking_utils` (`create_causal_mask`, `create_sliding_window_causal_mask`).
    """
    # Gemma2Model builds both masks whatever layers it has (a one-layer slice too); Qwen2Model the
    # full one always, and the sliding one when any layer slides
    kinds = {spec.sliding_layer(i) or spec.chunked_layer(i) for i in range(spec.num_layers)}
    if spec.family in ("smollm3", "gpt_oss", *QWEN_WINDOWS, *GEMMA_FAMILIES):
        # (GptOssModel builds both too)
        kinds |= {True, False} if spec.family in (*GEMMA_FAMILIES, "gpt_oss") else {False}
    if cond.attention == "eager":
        return len(kinds) * cond.batch_size * cond.seq_len * cond.seq_len * (
            FP32 if cond.autocast else cond.weight_bytes)
    sliding = any(local_mask(spec, i, cond) for i in range(spec.num_layers))
    if cond.packed:  # one block-diagonal mask per kind of layer
        return len(kinds) * cond.seq_len * cond.seq_len
    return sdpa_local_mask_bytes(spec, cond) if sliding else 0


def sdpa_local_mask_bytes(spec: ModelSpec, cond: Conditions) -> int:
    """The boolean mask the model builds for SDPA's local layers (`local_mask`): a sliding window's
    (1, 1, s, s), expanded over the batch without a copy; Llama 4's chunked one (b, 1, s, s), since
    its chunks start after each row's left padding (`chunked_causal_mask_function`). Source:
    transformers 5 `masking_utils`."""
    per_row = spec.attention_chunk is not None  # (no family has both chunks and a sliding window)
    return cond.seq_len * cond.seq_len * (cond.batch_size if per_row else 1)


def trained_norm_product_bytes(numel: int, itemsize: int, offset_weight: bool) -> int:
    """What an RMSNorm whose weight trains saved for that weight's gradient: the normalised input
    (cast back to the input's dtype; fp32 in Gemma-2's (1 + w) form). The weight's product is the
    norm's last op, so its backward runs first and frees it before the norm's own backward peaks
    (`rms_norm_backward`, at pow's). Source: the traced step of a fully fine-tuned Phi-3 under amp.
    """
    return numel * (FP32 if offset_weight else itemsize)


def qkv_backward_bytes(spec: ModelSpec, cond: Conditions) -> int:
    """The gradients of q, k, v and of attention's output alive at once when the core's backward
    returns: tokens x (heads + k/v heads) x (head_dim + v head_dim) in compute dtype (latent
    attention's values are v_head_dim wide; elsewhere 2 x head_dim)."""
    return (cond.tokens * (spec.num_heads + spec.num_kv_heads) * (spec.head_dim + spec.value_head_dim)
            * cond.compute_bytes)


def value_gradient_bytes(spec: ModelSpec, cond: Conditions) -> int:
    """The value's gradient eager (or the math kernel's) attention holds through its softmax backward.

    probs @ v's backward returns the probabilities' gradient and v's: (batch x heads x seq x
    head_dim), at every query head (GQA's repeated v), in the matmul's dtype (the compute dtype; fp32
    in torch's CPU math kernel). Autograd runs the softmax's branch first (it was recorded after v's
    repeat), so v's gradient waits beside the probabilities' and the scores' gradients.
    """
    math = cond.attention != "eager"
    return cond.tokens * spec.num_heads * spec.value_head_dim * (FP32 if math else cond.compute_bytes)


def lora_input_gradient_sum(input_bytes: int) -> int:
    """A LoRA-wrapped layer's input gradient as autograd builds it: the base layer's and the
    adapter's (through lora_A) gradients of the input, and their sum, alive at once; each the size
    and dtype of the input (`input_bytes`). In a dense MLP whose hidden size is large beside its
    intermediate size, the up projection's (its backward runs before the gate's) sets the MLP's
    peak. Assumption: PEFT's `result = base(x) + lora_B(lora_A(dropout(x))) * scaling`, autograd's
    accumulation of two gradients into a new tensor, as the tracer lists them. The attention output
    projection's is a moment of the attention's backward too: its input, (heads x head_dim) wide,
    can outweigh the q, k and v gradients flash backward returns.
    """
    return 3 * input_bytes


def value_product_backward(full: int, probs: int, device: str, eager_itemsize: int | None = None) -> int:
    """What the backward of probs @ v holds beyond the saved tensors: the output's gradient as bmm
    reads it, v's gradient at every head and the (dropped) probabilities' gradient. The
    probabilities and v it saved are still alive then; softmax's backward, where the timeline's
    attention phase sits, comes after they are freed.

    Inside torch's CPU math kernel (SDPA with attention dropout) all three are fp32 (the output's
    gradient made contiguous for bmm: the module's transpose back to (b, s, heads, d) leaves it
    strided); on CUDA SDPA runs a fused kernel instead (0). Eager attention (`eager_itemsize`: the
    matmul's dtype) runs the same product on any device. Assumption: torch 2.13's kernels as the
    tracer lists their tensors.
    """
    if eager_itemsize is not None:
        return (2 * full + probs) * eager_itemsize
    return (2 * full + probs) * FP32 if device == "cpu" else 0


def rms_norm_backward(tokens: int, hidden: int, weight_trains: bool = False) -> int:
    """Gradients alive at once in an RMSNorm's backward, beyond the incoming one.

    The norm computes in fp32 whatever the model's dtype (h = x.float(); h * rsqrt(mean(h^2) + eps),
    then the weight): at the backward of h^2 five (tokens x hidden) fp32 tensors are alive: the
    gradient of the normalised product, the mean's gradient spread over the row, and pow's backward
    (h^1, and two products). In Gemma-2's (1 + w) form a trained w has by then used and freed the
    normalised h it saved for its gradient: one fewer. Assumption: transformers 5's RMSNorm classes,
    autograd's decomposition of pow / mean / mul (as the tracer lists the tensors).
    """
    return (4 if weight_trains else 5) * tokens * hidden * FP32


def pre_mlp_norm_backward(tokens: int, hidden: int, fp32_copy: int, offset_weight_trains: bool) -> int:
    """What the backward of the RMSNorm before the MLP holds beyond the saved tensors left, the
    gradients so far and the residual stream's gradient, at the backward of h^2: the five fp32
    (tokens x hidden) gradients of `rms_norm_backward` (four for Gemma-2's (1 + w) form with w
    trained) and, for a 16-bit model, the fp32 copy h = x.float() the norm saved (`fp32_copy`
    bytes), which pow's backward still reads. By then the MLP's backward has used and freed what the
    MLP saved, the norm's 1/rms with it; an fp32 input (amp, fp32) is the residual stream itself,
    whose saved copy the recomputed graph has already handed over and let go.

    Assumption: transformers 5's RMSNorm, autograd's decomposition of pow / mean / mul; measured
    op by op with the tracer on llama, mistral and qwen2 steps (16-bit and amp), and checked on Phi-3
    fp32 and amp steps (counting an fp32 input's saved copy as well over-predicted them by 1-2%).
    """
    return fp32_copy + rms_norm_backward(tokens, hidden, offset_weight_trains)


@dataclass(frozen=True)
class Profile:
    """Saved bytes of one step's forward, by place.

    `embedding`: before the first layer (dropout mask, position ids, rotary cos/sin); `layers`: each
    decoder layer's full saved set (what backward recomputes under checkpointing); `layer_inputs`:
    what a checkpointed layer keeps instead (its input); `head`: final norm, LM head and loss (the
    log-softmax output, shifted labels); `logits`: the head's transient logits bytes in compute
    dtype and, under 16-bit compute, their fp32 copy; `mlp_layers`: the part of each layer's saved
    bytes its MLP keeps; `transients`: see
    `layer_backward_transients`.
    """

    embedding: int
    layers: tuple[int, ...]
    layer_inputs: tuple[int, ...]
    # the part of `layers[i]` alive anyway under checkpointing: the layer's own input, and the rotary
    # cos and sin the first rotary layer saves (also checkpoint arguments)
    input_saved_by_layer: tuple[int, ...]
    head: int
    logits: int
    logits_fp32: int
    eager_mask: int
    mlp_layers: tuple[int, ...]
    transients: tuple[int, int, int]
    checkpoint_args: int

    checkpointed: bool = False
    # live beyond the saved activations in the head's backward; None: the standard loss's two fp32
    # (tokens x vocab) gradients (see `head_and_loss` for the other losses)
    head_backward: int | None = None
    # activation offload (torchtune's / TRL's OffloadActivations) with checkpointing: the checkpointed
    # layer inputs are copied to CPU memory as forward makes them; the GPU keeps the two in flight
    offloaded: bool = False

    @property
    def in_flight(self) -> int:
        """Layer inputs an offloaded run keeps on the GPU: the last two (the copy stream's and the
        backward's prefetch)."""
        return sum(self.layer_inputs[-2:])

    @property
    def cpu_bytes(self) -> int:
        """Checkpointed layer inputs held in CPU memory under activation offload (all of them)."""
        return sum(self.layer_inputs) if self.offloaded and self.checkpointed else 0
    # autocast's 16-bit copies of trained parameters alive at the loss but not saved: biases, and
    # under checkpointing the weight copies of the layers (their saved sets are dropped)
    autocast_cache: int = 0
    # checkpointing with a frozen embedding: PEFT makes the embedding output a leaf that requires
    # grad; it and its `.grad` stay alive after backward, for as long as the step's loss is held
    input_leaf: int = 0
    # per layer: what the MLP's backward frees before its peak (`Graph.tails`), and attention's
    mlp_tails: tuple[int, ...] = ()
    attn_tails: tuple[int, ...] = ()
    # per layer: the most its forward holds at once up to its last save (`Graph.recompute_peak`),
    # reached again when a checkpointed layer is recomputed
    recompute_peaks: tuple[int, ...] = ()
    expert_backward: tuple[int, ...] = ()
    # per layer, the MLP's backward transient where layers' MLPs differ (`mlp_backward_transients`)
    mlp_transients: tuple[int, ...] = ()  # per layer, ParamWrapper'd experts (`merged_weight_backward`)
    # per layer: gradients alive through its recompute besides the residual stream's (`Graph.pending`)
    recompute_pending: tuple[int, ...] = ()
    # per layer: the most a DoRA layer's backward of its scaling holds beyond the layer's saves and
    # the residual's gradient (`Graph.dora`); empty without DoRA
    dora_backward: tuple[int, ...] = ()
    # per layer: the gradients of the Parameters PEFT wraps Conv1D's W.T in under DoRA with LoRA
    # dropout (`Graph.dora`), alive once its backward has run while the recomputed graph lives on
    dora_weight_grads: tuple[int, ...] = ()
    # Gemma-2's norms after attention and after the MLP: their backward runs while the block before
    # them is still saved (`rms_norm_backward`); 0 for the other families
    post_norm_transient: int = 0
    # per layer: a trained expert block's gate/up backward (`Graph.up_backward`), () without one
    expert_up_backward: tuple[tuple[int, int], ...] = ()
    # per layer: checkpoint arguments no lower layer uses, freed when this layer's backward is done
    args_freed: tuple[int, ...] = ()
    # per layer: a recomputed expert block at its first backward op (`Graph.unsort`); 0 without experts
    recompute_unsort: tuple[int, ...] = ()
    # per layer: the MLP's pre-norm backward beyond the saved tensors left (`pre_mlp_norm_backward`)
    mlp_norm_backward: tuple[int, ...] = ()
    # per layer: a LoRA-wrapped up projection's input gradient, (saved bytes freed by then, held)
    up_input_backward: tuple[tuple[int, int], ...] = ()
    # per layer: a 4-bit up projection's backward, (saved bytes freed by then, held beside the
    # dequantised weight the timeline adds)
    up_dequant_backward: tuple[tuple[int, int], ...] = ()
    # per layer: a LoRA-wrapped attention output projection's input gradient, beside what the
    # attention core's backward holds (0: not wrapped)
    out_input_backward: tuple[int, ...] = ()
    # per layer: whether its input needs a gradient; when not (the first layer over frozen
    # embeddings, unchecked), the residual stream's gradient is not kept past the attention's add
    layer_input_grads: tuple[bool, ...] = ()
    # per layer: the math kernel's probs @ v backward, the core's later saves and its gradients
    # (`value_product_backward`); () when no layer runs it
    value_product_backward: tuple[int, ...] = ()
    # per layer: an expert block's combine backward beyond its saved tensors, no checkpointing
    # (`moe_combine_backward`); () without experts
    expert_combine: tuple[int, ...] = ()
    # per layer: a recomputed expert block at its combine's backward (`moe_recompute_combine`); 0
    # without experts
    recompute_combine: tuple[int, ...] = ()
    # per layer: a gated-DeltaNet layer's token-mixer backward transient (`delta_rule_backward`), in
    # place of `transients`' attention one; None for an attention layer, () when no layer has one
    mixer_backward: tuple[int | None, ...] = ()
    # backward work not done (see `Graph.no_input_grad_params`); `cost` takes it off the FLOPs
    no_input_grad_params: int = 0
    attention_without_grad: int = 0
    # the final norm's output: the model's forward holds it (as its last hidden state) until the
    # loss, also when backward does not keep it
    final_hidden: int = 0
    # what the final norm saved (part of `head`), and what its backward holds beyond it
    # (`rms_norm_backward`; none for GPT-2's fused LayerNorm backward)
    final_norm: int = 0
    norm_backward: int = 0
    # without checkpointing: the most the forward holds at once inside a layer (`Graph.moment`)
    forward_live: int = 0
    # a trained final norm: its weight's product has used and freed what it saved by the backward's
    # peak inside the norm (`trained_norm_product_bytes`)
    final_norm_freed: int = 0
    compiled: str = "none"  # `Conditions.compile`: the saved sets are a compiled graph's
    # checkpointing on CPU: the RNG state each checkpointed layer keeps (`checkpoint_rng_state_bytes`)
    rng_state: int = 0
    # selective layer checkpointing (`checkpointed_layers`): per layer, True where the layer is not
    # checkpointed and keeps its whole saved set; () when every layer is checkpointed or none is
    kept_layers: tuple[bool, ...] = ()
    # per layer: the rotary cos and sin it saved (part of `layers[i]`), which checkpointing counts
    # among the shared arguments instead
    args_saved_by_layer: tuple[int, ...] = ()

    # per layer, op-level selective checkpointing (`sac_saves`): the op outputs a checkpointed layer
    # caches from forward to its backward, and those of them its recompute never reaches
    # (`Graph.sac_unconsumed`), alive through its backward
    sac_kept: tuple[int, ...] = ()
    sac_unconsumed: tuple[int, ...] = ()
    # every tensor the walk saved, in the order saved: (bytes, section of its first save); the
    # structural oracle (`measure/saved_tape.py`) holds it against the real model's saved tensors
    saves: tuple[tuple[int, str], ...] = field(default=(), compare=False, repr=False)

    def checkpointed_at(self, i: int) -> bool:
        """Whether layer i is checkpointed (keeps its input, recomputes its saved set in backward)."""
        return self.checkpointed and not (self.kept_layers and self.kept_layers[i])

    def held_after_forward(self, i: int) -> int:
        """What layer i keeps from its forward until its backward: a checkpointed layer its input;
        any other its saved set, less the rotary cos and sin a checkpointed step counts among the
        shared arguments (`checkpoint_args`)."""
        if self.checkpointed_at(i):
            return self.layer_inputs[i] + (self.sac_kept[i] if self.sac_kept else 0)
        return self.layers[i] - (self.args_saved_by_layer[i] if self.checkpointed else 0)

    @property
    def checkpointed_count(self) -> int:
        return sum(self.checkpointed_at(i) for i in range(len(self.layers)))

    @property
    def total(self) -> int:
        """Activations alive at the end of forward."""
        if self.checkpointed and self.offloaded:
            return self.embedding + self.in_flight + self.checkpoint_args + self.head
        if self.checkpointed:
            return (self.embedding + sum(self.held_after_forward(i) for i in range(len(self.layers)))
                    + self.checkpoint_args + self.head)
        return self.embedding + sum(self.layers) + self.head


def profile(spec: ModelSpec, cond: Conditions, wrapped: dict[str, int], trainable: set[str]) -> Profile:
    """Walk the model's forward once and collect what autograd keeps, by place. A plan asks for the
    same walk several times (the peak, the FLOPs' input-gradient skips), so each is made once.

    Activation offload moves the checkpointed inputs to CPU memory after forward saved them: it
    changes where they live, not what the forward saves, so its walk is the one without it (advice
    plans checkpointing with and without offload; a test runs the walk with it to hold this)."""
    items, paths = tuple(sorted(wrapped.items())), frozenset(trainable)
    if cond.activation_offload:
        return replace(_profile(spec, replace(cond, activation_offload=False), items, paths), offloaded=True)
    return _profile(spec, cond, items, paths)


@functools.lru_cache(maxsize=64)
def _profile(spec: ModelSpec, cond: Conditions, wrapped_items: tuple[tuple[str, int], ...],
             trainable_paths: frozenset[str]) -> Profile:
    wrapped, trainable = dict(wrapped_items), set(trainable_paths)
    if cond.attention not in ATTENTION:
        raise PlanError(f"attention must be one of {', '.join(ATTENTION)}, got {cond.attention!r}")
    if cond.device not in DEVICES:
        raise PlanError(f"device must be one of {', '.join(DEVICES)}, got {cond.device!r}")
    rates = spec.dropout_rates if cond.dropout is None else (cond.dropout,) * 3
    from .architecture import layout

    biases = frozenset(m.path for m in layout(spec).modules if m.bias is not None)
    g = Graph(cond, wrapped, trainable, rates=rates, biases=biases, transposed_weights=spec.family == "gpt2")
    t, H, wb = cond.tokens, spec.hidden_size, cond.weight_bytes
    positions = 0 if cond.packed else cond.seq_len  # position ids the model makes itself
    g.section = "embedding"
    # PEFT makes the embedding output require grad when checkpointing (enable_input_require_grads)
    input_grad = cond.grad_checkpointing
    if spec.family == "gpt2":
        wte, wpe = "transformer.wte", "transformer.wpe"
        # the position ids the model makes (packed: the caller's input, counted with the token ids)
        ids, embeds = g.new(positions, INT64, False), g.new(t * H, wb, wte in trainable or input_grad)
        if wpe in trainable:
            g.save(ids)  # position ids
        x = g.new(t * H, wb, wte in trainable or wpe in trainable or input_grad)
        if input_grad and not {wte, wpe} & trainable:
            # the hook makes the token embeddings a leaf that requires grad; the graph holds it, and
            # the checkpointed layers hold the position ids
            g.save(embeds, ids)
        # GPT2Model's forward holds these until it returns (`gpt2_model_locals`)
        g.hold(*gpt2_model_locals(g, spec, embeds, ids))
        x = g.dropout_op(x, g.rates[2])
        rots = {}
    else:
        x = g.new(t * H, wb, "model.embed_tokens" in trainable or input_grad)
        if spec.family in GEMMA_FAMILIES:
            # scaled by sqrt(hidden) inside the embedding module (`Gemma2TextScaledWordEmbedding`):
            # the product keeps a scalar, and the unscaled lookup is freed as the module returns
            x = g.new(t * H, wb, x.grad)
        # a cos and sin per rotary embedding the layers use (Gemma 3's local and global ones)
        rots = {kind: tuple(g.new(n, size, False) for n, size in rotary_tables(spec, cond))
                for kind in sorted({rotary_kind(spec, i) for i in range(spec.num_layers)})}
    layers, mlps, inputs, overlap = [], [], [], []
    input_grads: list[bool] = []
    if spec.family != "gpt2":
        # the model's forward holds these until it returns: the embedding output (`inputs_embeds`),
        # the position ids, the rotary cos and sin, and the attention masks
        g.hold(x, g.new(positions, INT64, False), *(r for rot in rots.values() for r in rot),
               g.new(forward_mask_bytes(spec, cond), 1, False))
    ckpt = checkpointed_layers(spec.num_layers, cond)
    rot_saved: list[int] = []
    leaf_held = 0
    sac_kept: list[int] = []  # per layer, op-level selective checkpointing's cached outputs
    sac_unconsumed: list[int] = []  # ... those of them its recompute does not reach
    for i in range(spec.num_layers):
        g.section = f"layer {i}"
        g.checkpointed = ckpt[i]
        g.mm_count = 0  # torchtitan's policy counts a layer's matmuls afresh at each checkpoint
        x_in = x
        outer = dict(g.held)
        g.hold(x_in)  # the caller's hidden states, until the layer returns
        g.enter_region()  # under `--compile layers`, each decoder layer is one graph
        g.outer = frozenset(g.held)  # what the model holds around the layer (the timeline's own)
        x = _decoder_layer(g, spec, i, x, rots.get(rotary_kind(spec, i)))
        g.held = outer
        # a checkpointed layer keeps its input; when the layer's own ops save it too, the recomputed
        # set already holds it (count it once)
        kept = g.saved.get(x_in.key)
        inputs.append(x_in.nbytes)
        input_grads.append(x_in.grad)
        overlap.append(x_in.nbytes if kept and kept[1].startswith(f"layer {i}") else 0)
        # the rotary cos and sin are saved once, by the first layer that uses them; a checkpointed
        # layer keeps them among its arguments (`checkpoint_args`) already
        rot_saved.append(sum(r.nbytes for rot in rots.values() for r in rot
                             if g.saved.get(r.key, (0, ""))[1].startswith(f"layer {i}")))
        overlap[-1] += rot_saved[-1]
        mlps.append(g.saved_bytes(f"layer {i} mlp"))
        layers.append(g.saved_bytes(f"layer {i}") + mlps[-1])
        if (i == 0 and input_grad and not ckpt[0] and spec.family != "gpt2"
                and "model.embed_tokens" not in trainable and x_in.key not in g.saved):
            # under checkpointing the embedding output is made a leaf that requires grad, and its
            # AccumulateGrad node holds it until backward is done: a first layer left unchecked that
            # saves no copy of it leaves it alive all the same
            leaf_held = x_in.nbytes
            g.dropped -= leaf_held
        cached = {t.key: t for t in g.sac.get(f"layer {i}", ())}
        sac_kept.append(sum(t.nbytes for t in cached.values()))
        sac_unconsumed.append(g.sac_unconsumed(f"layer {i}"))
        if ckpt[i] and (not all(ckpt) or cond.checkpoint_ops):
            # selective checkpointing: the later forward moments hold this layer's input (unless
            # another section saved it), its arguments, autocast's weight copies and what the op
            # policy cached, not its saves
            elsewhere = kept is not None and not kept[1].startswith(f"layer {i}")
            g.dropped += layers[-1] - (0 if elsewhere else x_in.nbytes) - rot_saved[-1] - sum(
                g.cache.get(where, [0, 0])[1] for where in (f"layer {i}", f"layer {i} mlp")) - sac_kept[-1]
    g.checkpointed = False
    g.section = "head"
    norm = "transformer.ln_f" if spec.family == "gpt2" else "model.norm"
    if spec.family == "gpt2":
        h = g.layer_norm(x, norm, H)
    else:
        h = g.rms_norm(x, norm, H, spec.offset_norms, fp32_product=fp32_norm_product(spec))
    final_norm = g.saved_bytes("head")
    # the decoder model returns after its final norm: what its forward held (the embedding output,
    # position ids, rotary cos and sin, attention masks) is freed before the head, unless saved
    # (Gemma-2's two eager masks at the LM head's matmul, for one)
    g.held = {}
    head = "lm_head"
    head_loss = None
    compiled_loss = cond.loss == "standard" and loss_compiled(cond.compile)
    alone = cond.compile == "layers+loss"
    if cond.loss != "standard":
        head_loss = head_and_loss(g, spec, h, head)
        logits, fp32 = head_loss[0], head_loss[1]
    else:
        logits = g.linear(h, head, H, spec.vocab_size)
        if spec.family in GEMMA_FAMILIES and spec.final_softcap and logits.grad:
            g.save(g.new(logits.numel, logits.itemsize, True))  # final soft-cap: tanh keeps its output
        fp32 = t * spec.vocab_size * FP32
        # nll_loss keeps the shifted labels: a contiguous copy, or for one sequence the padded labels
        # themselves (their [1:] slice is already contiguous)
        g.save(g.new(t if cond.batch_size > 1 else cond.seq_len + 1, INT64, False))
        if logits.grad:
            # log_softmax keeps its output, elementwise of the (upcast) logits and two reductions per
            # row (max, log-sum-exp): a compiled loss keeps those instead when they are smaller
            g.in_loss = True
            stats = (g.new(t, FP32, False), g.new(t, FP32, False))
            if alone:
                g.save(*stats)  # and the logits, alive anyway: in the head's backward term
            else:
                g.save(g.pointwise(t * spec.vocab_size, FP32, True, logits, *stats))
            g.in_loss = False
            g.save(g.new(1, FP32, False), g.new(1, FP32, False))  # the loss and nll's total weight
    mask = cond.batch_size * cond.seq_len * cond.seq_len * (FP32 if cond.autocast else wb)
    # Gemma-2 alternates sliding-window and global layers, and Qwen2's layers from max_window_layers on
    # slide: each kind of layer gets its own mask
    # A checkpointed layer also keeps its other arguments: the attention mask its kind of layer gets
    # (eager) and, for rotary families, cos, sin and the position ids. Under selective checkpointing
    # only the kinds of the checkpointed layers keep a mask alive.
    held_by = [i for i in range(spec.num_layers) if ckpt[i] or not cond.grad_checkpointing]
    # (a linear-attention layer gets no mask)
    kinds = {spec.sliding_type(i) for i in held_by if not spec.linear_layer(i)}
    eager_mask = mask * len(kinds) if cond.attention == "eager" else 0
    shared = eager_mask + (sum(r.nbytes for rot in rots.values() for r in rot) + positions * INT64
                           if rots else 0)
    if cond.attention == "sdpa" and (cond.packed or any(local_mask(spec, i, cond) for i in held_by)):
        # SDPA's sliding-window mask (`sdpa_local_mask_bytes`); packed, each kind of layer's
        # block-diagonal mask
        shared += (len(kinds) * cond.seq_len * cond.seq_len if cond.packed
                   else sdpa_local_mask_bytes(spec, cond))
    return Profile(
        embedding=g.saved_bytes("embedding") + leaf_held,
        layers=tuple(layers),
        layer_inputs=tuple(inputs),
        layer_input_grads=tuple(input_grads),
        input_saved_by_layer=tuple(overlap),
        head=g.saved_bytes("head"),
        logits=logits.nbytes if head_loss is None else head_loss[0].nbytes,
        logits_fp32=(0 if compiled_loss else fp32 if logits.itemsize != FP32 else 0) if head_loss is None
        else head_loss[1],
        head_backward=((logits.nbytes + compiled_loss_alone_backward(logits.numel, logits.itemsize)
                        if alone else compiled_loss_backward(logits.numel, logits.itemsize))
                       if compiled_loss and logits.grad else None)
        if head_loss is None else head_loss[2],
        eager_mask=eager_mask,
        checkpoint_args=shared,
        mlp_layers=tuple(mlps),
        transients=layer_backward_transients(spec, cond),
        mlp_transients=mlp_backward_transients(spec, cond),
        mlp_tails=tuple(g.tails),
        expert_backward=tuple(g.expert_backward) if len(g.expert_backward) == spec.num_layers else (),
        attn_tails=tuple(g.attn_tails),
        up_input_backward=tuple(g.up_input_backward.get(f"layer {i}", (0, 0)) for i in range(spec.num_layers))
        if g.up_input_backward else (),
        up_dequant_backward=tuple(g.up_dequant_backward.get(f"layer {i}", (0, 0))
                                  for i in range(spec.num_layers))
        if g.up_dequant_backward else (),
        out_input_backward=tuple(g.out_input_backward.get(f"layer {i}", 0) for i in range(spec.num_layers))
        if g.out_input_backward else (),
        value_product_backward=tuple(g.pv_backward.get(f"layer {i}", 0) for i in range(spec.num_layers))
        if g.pv_backward else (),
        mixer_backward=tuple(g.mixer_backward.get(f"layer {i}") for i in range(spec.num_layers))
        if g.mixer_backward else (),
        no_input_grad_params=g.no_input_grad_params,
        attention_without_grad=g.attention_without_grad,
        recompute_peaks=tuple(g.recompute_peak(f"layer {i}") for i in range(spec.num_layers)),
        recompute_pending=tuple(g.pending.get(f"layer {i}", 0) for i in range(spec.num_layers)),
        dora_backward=tuple(g.dora_backward.get(f"layer {i}", 0) for i in range(spec.num_layers))
        if cond.dora else (),
        dora_weight_grads=tuple(g.dora_weight_grads.get(f"layer {i}", 0) if ckpt[i] else 0
                                for i in range(spec.num_layers))
        if cond.dora and cond.grad_checkpointing else (),
        post_norm_transient=rms_norm_backward(cond.tokens, H, any(
            p.endswith("post_feedforward_layernorm") for p in trainable))
        if spec.norm_placement != "pre" else 0,
        args_freed=checkpoint_masks_freed(spec, cond, ckpt) if cond.grad_checkpointing else (),
        kept_layers=tuple(not c for c in ckpt) if any(ckpt) and not all(ckpt) else (),
        args_saved_by_layer=tuple(rot_saved),
        sac_kept=tuple(sac_kept) if any(sac_kept) else (),
        sac_unconsumed=tuple(sac_unconsumed) if any(sac_kept) else (),
        expert_up_backward=tuple(g.up_backward.get(f"layer {i}", (0, 0)) for i in range(spec.num_layers))
        if g.up_backward else (),
        recompute_unsort=tuple(g.unsort.get(f"layer {i}", 0) for i in range(spec.num_layers)),
        mlp_norm_backward=tuple(g.mlp_norm_backward.get(f"layer {i}", 0) for i in range(spec.num_layers)),
        expert_combine=tuple(g.combine.get(f"layer {i}", 0) for i in range(spec.num_layers))
        if g.combine else (),
        recompute_combine=tuple(g.recompute_combine.get(f"layer {i}", 0) for i in range(spec.num_layers))
        if g.recompute_combine else (),
        # selective checkpointing of fewer layers than every k-th reaches checkpoints none: the step
        # then keeps every saved set, as without checkpointing (the embedding output still a leaf)
        checkpointed=any(ckpt),
        rng_state=checkpoint_rng_state_bytes(cond),
        saves=tuple(g.saved.values()),
        offloaded=cond.activation_offload,
        compiled=cond.compile,
        # a chunked or fused loss counts the head's input alive through the loss itself (`head_and_loss`)
        final_hidden=0 if h.key in g.saved or cond.loss != "standard" else h.nbytes,
        final_norm=final_norm,
        # GPT-2's LayerNorm backward is one fused kernel: its gradient, no more
        norm_backward=(rms_norm_backward(cond.tokens, H)
                       if spec.family != "gpt2" and (x.grad or norm in trainable) else 0),
        forward_live=0 if cond.grad_checkpointing and all(ckpt) else g.forward_live,
        final_norm_freed=trained_norm_product_bytes(x.numel, x.itemsize,
                                                    spec.offset_norms or fp32_norm_product(spec))
        if spec.family != "gpt2" and norm in trainable else 0,
        input_leaf=t * H * wb if input_grad and not trainable & {"model.embed_tokens", "transformer.wte",
                                                                 "transformer.wpe"} else 0,
        autocast_cache=sum(total - kept + (kept if where.startswith("layer") and ckpt[section_layer(where)]
                                           else 0) for where, (total, kept) in g.cache.items()),
    )
