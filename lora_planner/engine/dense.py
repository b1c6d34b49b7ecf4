"""The dense decoder's forward written once as the ops transformers 5 runs, read from features.

GPT-2, the Llama shape (Llama, Mistral, Qwen2, Qwen3) and Phi-3's fused one differ here only in
`Features`, read from the model's layout (`architecture.layout`): the modules transformers builds, not
a family's name.
Each helper appends the ops one module runs (its allocations only; a view is a view), and a LoRA-wrapped
linear appends PEFT's `result + B(A(x)) * scaling`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..activations import fp32_norm_product, rotary_casts_back
from ..architecture import LINEAR_KINDS, Architecture, Module
from ..spec import EMBEDDING_DROPOUT_FAMILIES, GEMMA_FAMILIES, RESIDUAL_DROPOUT_FAMILIES, ModelSpec
from .tape import Tape

INT64, FP32 = 8, 4


@dataclass(frozen=True)
class Features:
    """What the forward does, read from the layout: LayerNorm with a bias or RMSNorm; learned
    positions (a second embedding table) or rotary; one fused q/k/v projection or three; a gated
    MLP (three linears) or an up/act/down one; q/k norms. An ungated MLP runs GPT-2's tanh GELU
    written in Python (`gelu_new`), a gated one SiLU: the activations these layouts are built with."""

    layer_norm: bool
    learned_positions: bool
    fused_qkv: bool
    gated: bool
    qk_norm: bool
    fused_gate_up: bool = False  # one projection of 2 x the MLP's width, chunked in two (Phi-3)
    residual_dropout: bool = False  # on both residual branches (`RESIDUAL_DROPOUT_FAMILIES`)
    embedding_dropout: bool = False  # after the embeddings (`EMBEDDING_DROPOUT_FAMILIES`)
    placement: str = "pre"  # where a layer's norms sit (`ModelSpec.norm_placement`)
    # Gemma's form (`GEMMA_FAMILIES`): RMSNorm times (1 + weight) in fp32, cast back; the embedding
    # scaled by sqrt(hidden) in its module; a gated MLP of tanh GELU; and the soft-caps its config has
    gemma: bool = False
    fp32_product: bool = False  # RMSNorm's weight times x in fp32, then cast (`fp32_norm_product`)
    head_qk_norm: bool = True  # q/k norms per head (Qwen3), else over the whole projection (OLMo 2)
    attn_softcap: bool = False
    final_softcap: bool = False
    rotary_casts_back: bool = False  # the rotated q and k cast back to their dtype (`rotary_casts_back`)

    @property
    def fp32_softmax(self) -> bool:
        """The Llama shape's eager softmax runs in fp32 and casts back; GPT-2's in the scores' dtype."""
        return not self.layer_norm

    @property
    def binds_branches(self) -> bool:
        """GPT-2's block binds its attention's and its MLP's outputs to locals until it returns (a
        recompute stopped early never returns: they live until it stops); the Llama shape rebinds
        the name to the sum."""
        return self.layer_norm

    @property
    def sliced_qkv(self) -> bool:
        """A fused q/k/v nn.Linear (Phi-3's `qkv_proj`) is cut into three slices, each a view whose
        backward makes a zeroed gradient of the whole; GPT-2's Conv1D output is `split` (one node).
        Its rotary embedding slices the rotated part off each head and concatenates the rest back
        (an empty rest too: the concatenation is a copy, (b, heads, s, d)-contiguous)."""
        return self.fused_qkv and not self.layer_norm

    @property
    def module_dropout(self) -> bool:
        """GPT-2's attention and MLP modules drop their own output (freed locals outlive it); Phi-3's
        decoder layer drops what each module returns."""
        return self.layer_norm


def _parent(m: Module | str) -> str:
    path = m if isinstance(m, str) else m.path
    return path.rsplit(".", 1)[0]


def _placed(placement: str, norms: list[Module]) -> tuple[tuple, tuple]:
    """A layer's norms (in layout order) as ((before attention, before the MLP), (after attention,
    after the MLP)): "pre" input_layernorm and post_attention_layernorm before each block; "sandwich"
    (Gemma-2) one before and one after each; "post" (OLMo 2) only after each."""
    if placement == "sandwich":
        return (norms[0], norms[2]), (norms[1], norms[3])
    if placement == "post":
        return (None, None), (norms[0], norms[1])
    return (norms[0], norms[1]), (None, None)


def layer_modules(arch: Architecture, layers: int) -> list[list[Module]]:
    """Each decoder layer's modules, in layout order: those whose path's first number is the layer."""
    out: list[list[Module]] = [[] for _ in range(layers)]
    for m in arch.modules:
        index = next((int(p) for p in m.path.split(".") if p.isdigit()), None)
        if index is not None and index < layers:
            out[index].append(m)
    return out


def features(spec: ModelSpec, arch: Architecture) -> Features:
    first = layer_modules(arch, 1)[0]
    linears = [m for m in first if m.kind in LINEAR_KINDS]
    norms = [m for m in first if m.kind == "norm"]
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    fused = linears[0].out_features == qkv
    gemma = spec.family in GEMMA_FAMILIES
    return Features(layer_norm=norms[-1].bias is not None,
                    learned_positions=sum(m.kind == "embedding" for m in arch.modules) > 1,
                    fused_qkv=fused, gated=len(linears) - (2 if fused else 4) == 3,
                    qk_norm=bool(spec.qk_norm),
                    fused_gate_up=linears[-2].out_features == 2 * spec.mlp_width(0),
                    residual_dropout=spec.family in RESIDUAL_DROPOUT_FAMILIES,
                    embedding_dropout=spec.family in EMBEDDING_DROPOUT_FAMILIES,
                    placement=spec.norm_placement, gemma=gemma, attn_softcap=gemma and spec.attn_softcap,
                    final_softcap=gemma and spec.final_softcap, fp32_product=fp32_norm_product(spec),
                    head_qk_norm=spec.qk_norm != "full", rotary_casts_back=rotary_casts_back(spec))


@dataclass
class Writer:
    """Appends a dense model's forward to `tape`: `params` maps each parameter name to its tensor,
    `lora` a wrapped linear's path to its (A, B) tensors. Each activation's dtype is tracked (`dt`):
    a pointwise op's output takes the wider of its inputs' (type promotion), and under autocast
    (`amp`) a matmul's fp32 operands are cast to bf16 first, a trainable weight once per forward
    (autocast's cache of leaf casts, let go as autocast exits), any other tensor at every use."""

    tape: Tape
    spec: ModelSpec
    batch: int
    seq: int
    item: int  # bytes per value of the model's dtype (its parameters)
    params: dict[str, int]
    lora: dict[str, tuple[int, int]]
    eager: bool
    features: Features
    checkpointing: bool = False
    rng_bytes: int = 0
    dropout: tuple[float, float, float] = (0.0, 0.0, 0.0)  # attention, residual, embedding
    amp: bool = False
    chunks: int = 0  # torchtune's chunked loss over this many slices of the sequence (0: the model's)
    mask: int | None = None  # the running layer's additive causal mask (eager)
    dt: dict[int, int] = field(default_factory=dict)
    cache: dict[int, int] = field(default_factory=dict)
    # heads viewed out of a (b, s, heads, d) projection: (b, heads, s, d) views that are not contiguous
    strided: set[int] = field(default_factory=set)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def compute(self) -> int:
        """Bytes per value a matmul computes in: bf16 under autocast, else the model's dtype."""
        return 2 if self.amp else self.item

    def size(self, x: int) -> int:
        return self.dt.get(x, self.item)

    def numel(self, x: int) -> int:
        return self.tape.tensors[x].bytes // self.size(x)

    def new(self, rule: str, inputs: tuple[int, ...], numel: int, item: int, **kw) -> int:
        x = self.tape.one(rule, inputs, numel * item, **kw)
        self.dt[x] = item
        return x

    def ew(self, rule: str, inputs: tuple[int, ...]) -> int:
        """A pointwise op: the largest input's shape (broadcasting), the widest input's dtype, the
        layout of a full-size input (TensorIterator keeps it)."""
        numel = max(self.numel(x) for x in inputs)
        y = self.new(rule, inputs, numel, max(self.size(x) for x in inputs))
        if any(x in self.strided and self.numel(x) == numel for x in inputs):
            self.strided.add(y)
        return y

    def cast(self, x: int, item: int) -> int:
        """`.to(dtype)`, which keeps the input's strides."""
        if self.size(x) == item:
            return x
        y = self.new("cast", (x,), self.numel(x), item)
        if x in self.strided:
            self.strided.add(y)
        return y

    def batched(self, x: int) -> int:
        """An operand of a 4-D `torch.matmul`, reshaped to (b * heads, ...): a copy when its heads
        are strided and batch, heads and positions are all above one (no stride merges), else a view."""
        if x not in self.strided or min(self.batch, self.spec.num_heads, self.seq) == 1:
            return x
        return self.new("copy", (x,), self.numel(x), self.size(x))

    def low(self, x: int) -> int:
        """A matmul's operand under autocast: cast to bf16, a trainable parameter once per forward."""
        if not self.amp or self.size(x) == 2:
            return x
        t = self.tape.tensors[x]
        if t.role == "parameter" and t.grad:
            if x not in self.cache:
                self.cache[x] = self.cast(x, 2)
            return self.cache[x]
        return self.cast(x, 2)

    def split(self, rule: str, x: int, numels: tuple[int, ...]) -> tuple[int, ...]:
        parts = self.tape.view(rule, x, tuple(n * self.size(x) for n in numels))
        for part in parts:
            self.dt[part] = self.size(x)
        return parts

    def block_rate(self, which: int, inside: bool = True) -> float:
        """The residual (1) or embedding (2) dropout, where the model has one (residual: run inside
        the module, `inside`, or by the layer on what it returns)."""
        f = self.features
        if which == 2:
            return self.dropout[2] if f.embedding_dropout else 0.0
        return self.dropout[1] if f.residual_dropout and inside == f.module_dropout else 0.0

    def drop(self, x: int, p: float) -> int:
        """Dropout on CPU (`at::dropout`'s unfused path): a mask in the input's dtype drawn and
        scaled, then x * mask, which keeps the mask; at p = 0 torch returns the input itself."""
        if not p:
            return x
        return self.ew("mul", (x, self.new("constant", (), self.numel(x), self.size(x))))

    def linear(self, m: Module, x: int) -> int:
        """nn.Linear / Conv1D (mm or addmm) over x's rows, then PEFT's adapter when `m` is wrapped."""
        n = self.numel(x) // m.in_features
        inputs = (self.low(x), self.low(self.params[f"{m.path}.weight"]))
        if m.bias is not None:
            inputs += (self.low(self.params[m.bias.name]),)
        y = self.new("linear", inputs, n * m.out_features, self.compute, where=m.path)
        if m.path not in self.lora:
            return y
        a, b = self.lora[m.path]
        rank = self.tape.tensors[a].bytes // (m.in_features * self.item)
        # PEFT casts the adapter's input to its weight's dtype first (`_cast_input_dtype`): under
        # autocast a bf16 input becomes an fp32 copy, which the matmul casts back to a bf16 one
        bound = self.cast(x, self.item)  # PEFT rebinds `x` to it until its forward returns
        low = self.new("linear", (self.low(bound), self.low(a)), n * rank, self.compute, where=m.path)
        up = self.new("linear", (low, self.low(b)), n * m.out_features, self.compute, where=m.path)
        out = self.ew("add", (y, self.ew("scale", (up,))))
        self.tape.hold(x, bound)  # and the caller its argument `x`
        return out

    def norm(self, m: Module, x: int, rows: int, width: int) -> int:
        """LayerNorm (`native_layer_norm`: y, mean, rstd in the input's dtype) or Llama's RMSNorm in
        Python: x in fp32, pow, mean, + eps, rsqrt, x * rsqrt, back to x's dtype, weight * x (Gemma's:
        times 1 + the weight in fp32, then back)."""
        t, w = self.tape, self.params[f"{m.path}.weight"]
        if m.bias is not None:
            stats = (rows * self.size(x), False)
            y = t.op("layer_norm", (x, w, self.params[m.bias.name]),
                     (rows * width * self.size(x), stats, stats), where=m.path)[0]
            self.dt[y] = self.size(x)
            return y
        h = self.cast(x, FP32)
        var = self.new("mean", (self.ew("pow", (h,)),), rows, FP32, where=m.path)
        r = self.ew("rsqrt", (self.ew("add", (var,)),))
        if self.features.gemma:  # (x * rsqrt) * (1 + weight.float()), then `type_as(x)`
            return self.cast(self.ew("mul", (self.ew("mul", (h, r)), self.ew("add", (self.cast(w, FP32),)))),
                             self.size(x))
        if self.features.fp32_product:
            out = self.cast(self.ew("mul", (w, self.ew("mul", (h, r)))), self.size(x))
        else:
            out = self.ew("mul", (w, self.cast(self.ew("mul", (h, r)), self.size(x))))
        self.tape.hold(var)  # `variance`, bound until the norm returns
        return out

    def rotate(self, x: int, cos: int, sin: int) -> int:
        """q * cos + rotate_half(q) * sin: rotate_half slices the halves, negates one and concatenates.
        A concatenating rotary embedding (`Features.sliced_qkv`) rotates q[..., :d] and concatenates
        q[..., d:] (here empty) back after it."""
        numel, whole = self.numel(x), x
        if self.features.sliced_qkv:
            x, rest = self.split("slice", whole, (numel,))[0], self.split("slice", whole, (0,))[0]
            self.strided.add(x)
        half, cosine = (numel // 2,), self.ew("mul", (x, cos))  # Python evaluates q * cos first
        first, second = self.split("slice", x, half)[0], self.split("slice", x, half)[0]
        turned = self.new("cat", (self.ew("neg", (second,)), first), numel, self.size(x))
        out = self.ew("add", (cosine, self.ew("mul", (turned, sin))))
        if not self.features.sliced_qkv:
            return out
        return self.new("cat", (out, rest), numel, self.size(out))

    def attention(self, mods: list[Module], norms: list[Module], x: int,
                  rope: tuple[int, int] | None) -> tuple[int, int | None]:
        """q, k, v (one fused projection split in three, or three), q/k norms, rotary, the attention
        kernel (SDPA's CPU flash kernel, or eager: scores, scale, mask, softmax, values), output."""
        spec, n = self.spec, self.tokens
        q_numel, kv_numel = n * spec.num_heads * spec.head_dim, n * spec.num_kv_heads * spec.head_dim
        if len(mods) == 2 and self.features.sliced_qkv:
            qkv = self.linear(mods[0], x)
            q, k, v = (self.split("slice", qkv, (numel,))[0] for numel in (q_numel, kv_numel, kv_numel))
        elif len(mods) == 2:
            q, k, v = self.split("split", self.linear(mods[0], x), (q_numel, kv_numel, kv_numel))
        else:  # q/k norms (per head or over each token's projection) run right after their projection
            heads = (spec.num_heads, spec.num_kv_heads) if self.features.head_qk_norm else (1, 1)
            q, k, v = (self.project(m, x, norms[i] if i < len(norms) else None, n * rows)
                       for i, (m, rows) in enumerate(zip(mods[:3], (*heads, 1), strict=True)))
        self.strided |= {q, k, v}
        if rope is not None:
            projected = (q, k)
            q, k = rotated = self.rotate(q, *rope), self.rotate(k, *rope)
            if self.features.rotary_casts_back:  # both rotated first, then each cast back
                q, k = (self.cast(r, self.size(p)) for r, p in zip(rotated, projected, strict=True))
            # bound by rope's arguments and the caller (and its locals) until it returns
            self.tape.hold(*projected, *rotated)
        if self.eager:
            out, weights = self.eager_core(q, k, v, q_numel)
        else:
            out, weights = self.sdpa(q, k, v, q_numel, _parent(mods[0])), None  # SDPA returns no weights
        out = self.drop(self.linear(mods[-1], out), self.block_rate(1))
        self.tape.hold(q, k, v)  # the module's locals until it returns: q, k, v (rotated)
        return out, weights

    def project(self, m: Module, x: int, norm: Module | None, rows: int) -> int:
        """One of q, k, v: its projection, viewed as heads (strided once transposed), then its RMSNorm
        over `rows` rows where it has one (`self.q_norm(self.q_proj(x))`)."""
        y = self.linear(m, x)
        self.strided.add(y)
        return y if norm is None else self.norm(norm, y, rows, self.numel(y) // rows)

    def sdpa(self, q: int, k: int, v: int, q_numel: int, where: str) -> int:
        """F.scaled_dot_product_attention on CPU (q, k, v cast to bf16 under autocast): the flash
        kernel, which lays its output out like q, or, under attention dropout, the math fallback.
        Handed a layer's boolean mask (a window shorter than the sequence), transformers first repeats
        k and v to every head (`repeat_kv`: a copy, a view of one k/v head), and torch converts the
        mask to an additive one in q's dtype, which the kernel keeps. transformers makes the (b,
        heads, s, d) output's transpose contiguous: a copy unless it is laid out (b, s, heads, d)
        already, or one head or one position makes it so."""
        spec, mask = self.spec, None
        if self.mask is not None and spec.num_kv_heads < spec.num_heads:
            k, v = (self.repeat(x, q_numel) for x in (k, v))
        q, k, v = self.low(q), self.low(k), self.low(v)
        if self.mask is not None:
            mask = self.new("constant", (self.mask,), self.batch * self.seq * self.seq, self.size(q))
        if self.dropout[0]:
            out = self.math_core(q, k, v, q_numel, mask)
        else:
            lse = (self.batch * spec.num_heads * self.seq * FP32, False)
            inputs = (q, k, v) if mask is None else (q, k, v, mask)
            out = self.tape.op("sdpa", inputs, (q_numel * self.compute, lse), where=where)[0]
            self.dt[out] = self.compute
            if q in self.strided:
                self.strided.add(out)
        self.tape.hold(q, k, v)  # autocast's casts live until the call returns
        if out in self.strided or spec.num_heads == 1 or self.seq == 1:
            return out
        return self.new("copy", (out,), q_numel, self.size(out))

    def repeat(self, x: int, q_numel: int) -> int:
        """`repeat_kv`: k or v expanded to every query head and reshaped, a view of one k/v head's
        (its heads' stride 0), else a copy."""
        if self.spec.num_kv_heads > 1:
            return self.new("repeat", (x,), q_numel, self.size(x))
        view = self.split("repeat", x, (q_numel,))[0]
        self.strided.add(view)
        return view

    def math_core(self, q: int, k: int, v: int, q_numel: int, given: int | None = None) -> int:
        """torch's `_scaled_dot_product_attention_math`, as a dispatch-level trace of it runs: 16-bit
        q, k, v upcast to fp32; q scaled by the scale's square root; the causal mask built (ones,
        tril, then an additive s x s fp32 `where`) unless one is `given`; k and v repeated to every
        head (without a mask transformers passes `enable_gqa`: expand and clone); k^T scaled; scores,
        plus the mask (out of place, as under a dispatch mode), softmax, dropout; the probabilities
        cast back (returned beside the output, a copy when 16-bit: C++ evaluates that argument
        first), @ v, cast back. Its locals live until it returns."""
        spec, item, s2 = self.spec, self.size(q), self.seq * self.seq
        q, k, v = acc = tuple(self.cast(x, FP32) for x in (q, k, v))
        query = self.ew("scale", (q,))
        if given is None:  # no mask handed: the causal one, from ones and tril (bool)
            tril = self.new("constant", (self.new("constant", (), s2, 1),), s2, 1)
            mask = self.new("constant", (tril,), s2, FP32)
        else:
            mask = given
        if spec.num_kv_heads < spec.num_heads and given is None:
            k, v = (self.new("repeat", (x,), q_numel, FP32) for x in (k, v))
        scores = self.batch * spec.num_heads * s2
        s = self.new("matmul", (self.batched(query), self.ew("scale", (k,))), scores, FP32)
        p = self.drop(self.ew("softmax", (self.ew("add", (s, mask)),)), self.dropout[0])
        weights = self.cast(p, item)
        out = self.cast(self.new("matmul", (p, self.batched(v)), q_numel, FP32), item)
        self.tape.hold(*acc, k, v, query, mask, weights)
        return out

    def eager_core(self, q: int, k: int, v: int, q_numel: int) -> tuple[int, int]:
        """transformers' `eager_attention_forward`: k and v repeated to every query head, q @ k^T
        scaled, the causal mask added, softmax (the Llama shape's in fp32, cast back to q's dtype;
        GPT-2's in the scores' dtype, cast to v's), @ v, then made contiguous."""
        spec = self.spec
        scores = self.batch * spec.num_heads * self.seq * self.seq
        # k and v expanded to every head: reshaped to (b * heads, s, d) for the batched product, a
        # view only where one batch row and one k/v head leave a single stride to merge; else a copy
        if spec.num_kv_heads == 1 < spec.num_heads and self.batch == 1:
            k, v = (self.split("repeat", x, (q_numel,))[0] for x in (k, v))
        elif spec.num_kv_heads < spec.num_heads:
            k, v = (self.new("repeat", (x,), q_numel, self.size(x)) for x in (k, v))
        cast = (self.low(q), self.low(k))  # autocast's casts live while the product runs
        s = self.new("matmul", tuple(self.batched(x) for x in cast), scores, self.compute)
        self.tape.hold(*cast)
        s = self.ew("scale", (s,))
        if self.features.attn_softcap:  # tanh(s / cap) * cap
            s = self.ew("scale", (self.ew("tanh", (self.ew("scale", (s,)),)),))
        s = self.ew("add", (s, self.mask))
        if self.features.fp32_softmax:  # softmax(dtype=float32) on CPU casts its input first
            p = self.cast(self.ew("softmax", (self.cast(s, FP32),)), self.size(q))
        else:
            p = self.cast(self.ew("softmax", (s,)), self.size(v))
        p = self.drop(p, self.dropout[0])
        cast = (self.low(p), self.low(v))
        o = self.new("matmul", (cast[0], self.batched(cast[1])), q_numel, self.compute)
        self.tape.hold(*cast, k, v)  # and the repeated k and v, bound until the function returns
        return self.new("copy", (o,), q_numel, self.compute), p  # made contiguous; and the weights

    def mlp(self, mods: list[Module], x: int) -> int:
        if self.features.fused_gate_up:  # gate, up = gate_up(x).chunk(2); down(up * silu(gate))
            width = self.tokens * mods[-1].in_features
            gate, up = self.split("split", self.linear(mods[0], x), (width, width))
            out = self.linear(mods[1], self.ew("mul", (up, self.ew("silu", (gate,)))))
            self.tape.hold(gate)  # `gate` binds the fused output until the MLP returns
            return out
        if len(mods) == 3:  # down(act(gate(x)) * up(x)); the Llama shape drops nothing here
            act = self.ew("gelu" if self.features.gemma else "silu", (self.linear(mods[0], x),))
            return self.linear(mods[2], self.ew("mul", (act, self.linear(mods[1], x))))
        h = self.linear(mods[0], x)  # gelu_new: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        half = self.ew("scale", (h,))
        cube = self.ew("scale", (self.ew("pow", (h,)),))
        inner = self.ew("scale", (self.ew("add", (h, cube)),))
        gate = self.ew("add", (self.ew("tanh", (inner,)),))
        out = self.linear(mods[1], self.ew("mul", (half, gate)))
        return self.drop(out, self.block_rate(1))

    def layer(self, mods: list[Module], x: int, rope: tuple[int, int] | None) -> int:
        """A decoder block: x + post(attention(pre(x))), then x + post(mlp(pre(x))), with the norms
        `Features.placement` puts before and after each (`_placed`)."""
        t, f, n, width = self.tape, self.features, self.tokens, self.spec.hidden_size
        linears = [m for m in mods if m.kind in LINEAR_KINDS]
        norms = [m for m in mods if m.kind == "norm"]
        qk, block = (norms[:2], norms[2:]) if f.qk_norm else ([], norms)
        before, after = _placed(f.placement, block)
        split = 2 if f.fused_qkv else 4
        h = self.norm(before[0], x, n, width) if before[0] else x
        with t.phase(_parent(linears[0])):  # the tape range of the attention, then of the MLP
            a, weights = self.attention(linears[:split], qk, h, rope)
        t.hold(h)  # `hidden_states` is the norm's output until the attention's replaces it
        branch = self.norm(after[0], a, n, width) if after[0] else a
        x = self.ew("add", (x, self.drop(branch, self.block_rate(1, inside=False))))
        h = self.norm(before[1], x, n, width) if before[1] else x
        with t.phase(_parent(linears[split])):
            m = self.mlp(linears[split:], h)
        t.hold(h)
        branch = self.norm(after[1], m, n, width) if after[1] else m
        out = self.ew("add", (x, self.drop(branch, self.block_rate(1, inside=False))))
        if f.binds_branches:
            t.hold(a, m)
        if weights is not None:  # the layer binds the weights attention returns (`_`) until it returns
            t.hold(weights)
        return out

    def rotary(self, positions: int) -> tuple[int, int]:
        """cos and sin of (1, T, rotary_dim): inverse frequencies @ positions (fp32), concatenated
        twice, cos / sin, times the attention scaling, cast to the embeddings' dtype."""
        d = self.spec.rotary_dim
        pos = self.new("cast", (positions,), self.seq, FP32)
        freqs = self.new("matmul", (self.params["inv_freq"], pos), self.seq * d // 2, FP32)
        both = self.new("cat", (freqs,), self.seq * d, FP32)
        out = []
        for _ in ("cos", "sin"):
            x = self.new("constant", (self.new("constant", (both,), self.seq * d, FP32),), self.seq * d, FP32)
            out.append(self.cast(x, self.item))
        return out[0], out[1]

    def masks(self) -> dict[bool, int]:
        """Eager attention's additive causal masks, (b, 1, s, s) in the embeddings' dtype: one per
        kind of layer (full, sliding) the model has (`ModelSpec.sliding_type`), made before the layers
        run. SDPA gets a boolean (b, 1, s, s) mask, expanded from one (s, s) storage, for sliding
        layers whose window is no longer than the sequence, else none (`is_causal`)."""
        if not self.eager:
            spec = self.spec
            short = any(spec.sliding_layer(i) and spec.sliding_window <= self.seq
                        for i in range(spec.num_layers))
            return {True: self.new("constant", (), self.seq * self.seq, 1)} if short else {}
        kinds = {self.spec.sliding_type(i) for i in range(self.spec.num_layers)}
        return {kind: self.new("constant", (), self.batch * self.seq * self.seq, self.item)
                for kind in sorted(kinds)}

    def forward(self, arch: Architecture, ids: int, labels: int) -> int:
        """The causal LM's forward and loss; returns the loss tensor."""
        t, n, spec = self.tape, self.tokens, self.spec
        tables = [m for m in arch.modules if m.kind == "embedding"]
        table = self.params[f"{tables[0].path}.weight"]
        x = self.new("embedding", (table, ids), n * spec.hidden_size, self.item)
        if self.features.gemma:  # times sqrt(hidden): a 0-d buffer cast to the table's dtype
            x = self.ew("mul", (x, self.cast(self.params["embed_scale"], self.item)))
        if self.checkpointing and self.lora:
            # PEFT readies a checkpointed model with `enable_input_require_grads`: a hook makes the
            # input embedding's output a leaf that needs a gradient, held by its AccumulateGrad node
            t.tensors[x] = replace(t.tensors[x], grad=True)
            t.keep(x)
        positions = self.new("constant", (), self.seq, INT64)  # cache_position / position ids
        rope, kept = None, [positions]
        if self.features.learned_positions:
            pe = self.new("embedding", (self.params[f"{tables[1].path}.weight"], positions),
                          self.seq * spec.hidden_size, self.item)
            x = self.ew("add", (x, pe))
        else:
            rope = self.rotary(positions)
            kept += rope
        x = self.drop(x, self.block_rate(2))
        masks = self.masks()
        for i, mods in enumerate(layer_modules(arch, spec.num_layers)):
            self.mask = masks.get(spec.sliding_type(i))
            with t.phase(_parent(_parent(mods[0]))):
                if self.checkpointing:
                    # every tensor argument of the layer is saved: the positions, cos and sin, its mask
                    mask = () if self.mask is None else (self.mask,)
                    with t.checkpointed((x, *kept, *mask), self.rng_bytes):
                        x = self.layer(mods, x, rope)
                else:
                    x = self.layer(mods, x, rope)
        final = [m for m in arch.modules if m.kind == "norm"][-1]
        x = self.norm(final, x, n, spec.hidden_size)
        t.hold(*kept, *masks.values())  # the base model's locals, let go as it returns
        head = next(m for m in arch.modules if m.path == arch.head_path)
        with t.phase("loss"):
            loss = self.chunked_loss(head, x, labels) if self.chunks else self.loss(head, x, labels)
        if not self.chunks:  # the causal LM binds the base model's last hidden state until it returns
            t.hold(x)
        t.hold(*self.cache.values())  # autocast's cached weight casts, let go as it exits
        return loss

    def loss(self, head: Module, x: int, labels: int) -> int:
        """transformers' ForCausalLMLoss: logits in fp32, labels padded and shifted, log_softmax,
        nll_loss (mean)."""
        n, v = self.tokens, self.spec.vocab_size
        output = self.linear(head, x)  # the model's output holds the logits until forward returns
        if self.features.final_softcap:  # tanh(logits / cap) * cap, rebound to `logits`
            output = self.ew("scale", (self.ew("tanh", (self.ew("scale", (output,)),)),))
        logits = self.cast(output, FP32)
        padded = self.new("constant", (labels,), self.batch * (self.seq + 1), INT64)
        # labels[..., 1:].contiguous(): a copy, except of one row (already contiguous)
        shifted = self.new("constant", (padded,), n, INT64) if self.batch > 1 else padded
        logp = self.new("log_softmax", (logits,), n * v, FP32)
        loss = self.tape.op("nll_loss", (logp, shifted), (FP32, (FP32, False)))[0]
        self.tape.hold(output, logits, padded)  # the loss function's locals until it returns
        return loss

    def chunked_loss(self, head: Module, x: int, labels: int) -> int:
        """torchtune's chunked head and loss (`measure.step.chunked_loss`): the last hidden state cut
        along the sequence (torch.chunk: ceil(s / n) positions each), the head (and a final soft-cap)
        on each chunk, a chunk of several rows copied for the product (after autocast's cast), the
        list of logits bound until the loss returns; labels padded and shifted once, their count
        taken; per chunk the logits in fp32, log_softmax and nll_loss (sum; its labels a copy when
        rows and positions are both above one), summed into a running 0-d loss, which is divided by
        the count."""
        t, b, width, v = self.tape, self.batch, self.spec.hidden_size, self.spec.vocab_size
        size = -(-self.seq // self.chunks)
        widths = [min(size, self.seq - start) for start in range(0, self.seq, size)]
        logits = []
        parts = self.split("chunk", x, tuple(b * w * width for w in widths))
        for part, w in zip(parts, widths, strict=True):
            if b > 1 and w > 1:  # matmul's reshape of a non-contiguous chunk (one position: contiguous)
                low = self.low(part)
                part = self.new("copy", (low,), b * w * width, self.size(low))
            out = self.linear(head, part)
            if self.features.final_softcap:
                out = self.ew("scale", (self.ew("tanh", (self.ew("scale", (out,)),)),))
            logits.append(out)
        t.hold(x)  # `hidden`, bound until every chunk is projected
        padded = self.new("constant", (labels,), b * (self.seq + 1), INT64)
        count = self.new("constant", (self.new("constant", (padded,), b * self.seq, 1),), 1, INT64)
        loss = None
        for out, w in zip(logits, widths, strict=True):
            # y.reshape(-1) of a (b, w) slice of the padded labels: a view when one row or one
            # position leaves a single stride, else a copy
            target = self.new("constant", (padded,), b * w, INT64) if b > 1 and w > 1 else padded
            logp = self.new("log_softmax", (self.cast(out, FP32),), b * w * v, FP32)
            ce = t.op("nll_loss", (logp, target), (FP32, (FP32, False)))[0]
            loss = self.new("add", (ce,) if loss is None else (loss, ce), 1, FP32)
        total = self.new("div", (loss, count), 1, FP32)
        t.hold(*logits, padded, count)
        return total
