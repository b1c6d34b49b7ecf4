"""The dense decoder's forward written once as the ops transformers 5 runs, read from features.

GPT-2 and the Llama shape (Llama, Mistral, Qwen2, Qwen3) differ here only in `Features`, read from
the model's layout (`architecture.layout`): the modules transformers builds, not a family's name.
Each helper appends the ops one module runs (its allocations only; a view is a view), and a LoRA-wrapped
linear appends PEFT's `result + B(A(x)) * scaling`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..architecture import LINEAR_KINDS, Architecture, Module
from ..spec import ModelSpec
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
    fused_gate_up: bool = False  # one projection of 2 x the MLP's width (Phi-3): not written yet

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
    def block_dropout(self) -> bool:
        """GPT-2's layout drops after the embeddings and after each block's output projections; the
        Llama shape only inside attention (`attention_dropout`)."""
        return self.layer_norm


def _parent(m: Module | str) -> str:
    path = m if isinstance(m, str) else m.path
    return path.rsplit(".", 1)[0]


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
    return Features(layer_norm=norms[-1].bias is not None,
                    learned_positions=sum(m.kind == "embedding" for m in arch.modules) > 1,
                    fused_qkv=fused, gated=len(linears) - (2 if fused else 4) == 3,
                    qk_norm=len(norms) > 2,
                    fused_gate_up=linears[-2].out_features == 2 * spec.mlp_width(0))


@dataclass
class Writer:
    """Appends a dense model's forward to `tape`: `params` maps each parameter name to its tensor,
    `lora` a wrapped linear's path to its (A, B) tensors."""

    tape: Tape
    spec: ModelSpec
    batch: int
    seq: int
    item: int  # bytes per value of the model's dtype
    params: dict[str, int]
    lora: dict[str, tuple[int, int]]
    eager: bool
    features: Features
    checkpointing: bool = False
    rng_bytes: int = 0
    mask: int | None = None  # eager attention's additive causal mask
    dropout: tuple[float, float, float] = (0.0, 0.0, 0.0)  # attention, residual, embedding

    def block_rate(self, which: int) -> float:
        """The residual (1) or embedding (2) dropout, where the layout has one."""
        return self.dropout[which] if self.features.block_dropout else 0.0

    def drop(self, x: int, p: float) -> int:
        """`native_dropout` when p > 0 (CPU: a mask in the input's dtype, kept for backward); at
        p = 0 torch returns the input itself."""
        if not p:
            return x
        size = self.tape.tensors[x].bytes
        return self.tape.op("dropout", (x,), (size, (size, False)))[0]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def linear(self, m: Module, x: int) -> int:
        """nn.Linear / Conv1D (mm or addmm), then PEFT's adapter when `m` is wrapped."""
        t, n = self.tape, self.tokens
        inputs = (x, self.params[f"{m.path}.weight"])
        if m.bias is not None:
            inputs += (self.params[m.bias.name],)
        y = t.one("linear", inputs, n * m.out_features * self.item, where=m.path)
        if m.path not in self.lora:
            return y
        a, b = self.lora[m.path]
        rank = t.tensors[a].bytes // (m.in_features * self.item)
        low = t.one("linear", (x, a), n * rank * self.item, where=m.path)
        up = t.one("linear", (low, b), n * m.out_features * self.item, where=m.path)
        size = n * m.out_features * self.item
        return t.one("add", (y, t.one("scale", (up,), size)), size)

    def norm(self, m: Module, x: int, rows: int, width: int) -> int:
        """LayerNorm (`native_layer_norm`: y, mean, rstd) or Llama's RMSNorm in Python: x in fp32,
        pow, mean, + eps, rsqrt, x * rsqrt, back to the dtype, weight * x."""
        t, w = self.tape, self.params[f"{m.path}.weight"]
        if m.bias is not None:
            stats = (rows * self.item, False)
            return t.op("layer_norm", (x, w, self.params[m.bias.name]),
                        (rows * width * self.item, stats, stats), where=m.path)[0]
        full = rows * width * FP32
        h = x if self.item == FP32 else t.one("cast", (x,), full, where=m.path)
        var = t.one("mean", (t.one("pow", (h,), full, where=m.path),), rows * FP32, where=m.path)
        r = t.one("rsqrt", (t.one("add", (var,), rows * FP32, where=m.path),), rows * FP32, where=m.path)
        h = t.one("mul", (h, r), full, where=m.path)
        if self.item != FP32:
            h = t.one("cast", (h,), rows * width * self.item, where=m.path)
        return t.one("mul", (w, h), rows * width * self.item, where=m.path)

    def rotate(self, x: int, heads: int, cos: int, sin: int) -> int:
        """q * cos + rotate_half(q) * sin: rotate_half slices the halves, negates one and concatenates."""
        t, size = self.tape, self.tokens * heads * self.spec.head_dim * self.item
        first, second = t.view("slice", x, (size // 2,))[0], t.view("slice", x, (size // 2,))[0]
        turned = t.one("cat", (t.one("neg", (second,), size // 2), first), size)
        return t.one("add", (t.one("mul", (x, cos), size), t.one("mul", (turned, sin), size)), size)

    def attention(self, mods: list[Module], norms: list[Module], x: int, rope: tuple[int, int] | None) -> int:
        """q, k, v (one fused projection split in three, or three), q/k norms, rotary, the attention
        kernel (SDPA's CPU flash kernel, or eager: scores, scale, mask, softmax, values), output."""
        t, spec, n = self.tape, self.spec, self.tokens
        head = n * spec.head_dim * self.item
        q_size, kv_size = spec.num_heads * head, spec.num_kv_heads * head
        if len(mods) == 2:
            q, k, v = t.view("split", self.linear(mods[0], x), (q_size, kv_size, kv_size))
        else:
            q, k, v = (self.linear(m, x) for m in mods[:3])
        if norms:  # per-head RMSNorm of the queries and keys
            q = self.norm(norms[0], q, n * spec.num_heads, spec.head_dim)
            k = self.norm(norms[1], k, n * spec.num_kv_heads, spec.head_dim)
        if rope is not None:
            q, k = self.rotate(q, spec.num_heads, *rope), self.rotate(k, spec.num_kv_heads, *rope)
        if self.eager:
            out = self.eager_core(q, k, v, q_size)
        else:
            lse = (self.batch * spec.num_heads * self.seq * FP32, False)
            out = t.op("sdpa", (q, k, v), (q_size, lse), where=mods[0].path.rsplit(".", 1)[0])[0]
        return self.drop(self.linear(mods[-1], out), self.block_rate(1))

    def eager_core(self, q: int, k: int, v: int, q_size: int) -> int:
        """transformers' `eager_attention_forward`: k and v repeated to every query head (a copy when
        grouped), q @ k^T scaled, the causal mask added, softmax (in fp32 and cast back where the
        Llama shape asks for it), @ v, then made contiguous."""
        t, spec = self.tape, self.spec
        scores = self.batch * spec.num_heads * self.seq * self.seq
        # k and v expanded to every head: reshaped to (b * heads, s, d) for the batched product, a
        # view only where one batch row and one k/v head leave a single stride to merge; else a copy
        if spec.num_kv_heads == 1 < spec.num_heads and self.batch == 1:
            k, v = (t.view("repeat", x, (q_size,))[0] for x in (k, v))
        elif spec.num_kv_heads < spec.num_heads:
            k, v = (t.one("repeat", (x,), q_size) for x in (k, v))
        s = t.one("scale", (t.one("matmul", (q, k), scores * self.item),), scores * self.item)
        s = t.one("add", (s, self.mask), scores * self.item)
        upcast = self.features.fp32_softmax and self.item != FP32
        if upcast:  # softmax(dtype=float32) on CPU casts its input first
            s = t.one("cast", (s,), scores * FP32)
        p = t.one("softmax", (s,), t.tensors[s].bytes)
        if upcast:
            p = t.one("cast", (p,), scores * self.item)
        p = self.drop(p, self.dropout[0])
        return t.one("copy", (t.one("matmul", (p, v), q_size),), q_size)  # made contiguous

    def mlp(self, mods: list[Module], x: int) -> int:
        t = self.tape
        if len(mods) == 3:  # down(silu(gate(x)) * up(x))
            g = self.linear(mods[0], x)
            act = t.one("silu", (g,), t.tensors[g].bytes)
            h = t.one("mul", (act, self.linear(mods[1], x)), t.tensors[g].bytes)
            return self.linear(mods[2], h)  # (the Llama shape drops nothing here)
        h = self.linear(mods[0], x)
        size = t.tensors[h].bytes  # gelu_new: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        half = t.one("scale", (h,), size)
        cube = t.one("scale", (t.one("pow", (h,), size),), size)
        inner = t.one("scale", (t.one("add", (h, cube), size),), size)
        gate = t.one("add", (t.one("tanh", (inner,), size),), size)
        out = self.linear(mods[1], t.one("mul", (half, gate), size))
        return self.drop(out, self.block_rate(1))

    def layer(self, mods: list[Module], x: int, rope: tuple[int, int] | None) -> int:
        """A pre-norm block: x + attention(norm(x)), then + mlp(norm(.))."""
        t, f = self.tape, self.features
        linears = [m for m in mods if m.kind in LINEAR_KINDS]
        norms = [m for m in mods if m.kind == "norm"]
        split = 2 if f.fused_qkv else 4
        h = self.norm(norms[-2], x, self.tokens, self.spec.hidden_size)
        with t.phase(_parent(linears[0])):  # the tape range of the attention, then of the MLP
            a = self.attention(linears[:split], norms[:2] if f.qk_norm else [], h, rope)
        x = t.one("add", (x, a), t.tensors[x].bytes)
        h = self.norm(norms[-1], x, self.tokens, self.spec.hidden_size)
        with t.phase(_parent(linears[split])):
            m = self.mlp(linears[split:], h)
        out = t.one("add", (x, m), t.tensors[x].bytes)
        if f.binds_branches:
            t.hold(a, m)
        return out

    def rotary(self, positions: int) -> tuple[int, int]:
        """cos and sin of (1, T, rotary_dim): inverse frequencies @ positions (fp32), concatenated
        twice, cos / sin, times the attention scaling, cast to the model's dtype."""
        t, d = self.tape, self.spec.rotary_dim
        pos = t.one("cast", (positions,), self.seq * FP32)
        freqs = t.one("matmul", (self.params["inv_freq"], pos), self.seq * d // 2 * FP32)
        both = t.one("cat", (freqs,), self.seq * d * FP32)
        out = []
        for _ in ("cos", "sin"):
            x = t.one("constant", (t.one("constant", (both,), self.seq * d * FP32),), self.seq * d * FP32)
            out.append(x if self.item == FP32 else t.one("cast", (x,), self.seq * d * self.item))
        return out[0], out[1]

    def masks(self) -> dict[bool, int]:
        """Eager attention's additive causal masks, (b, 1, s, s) in the model's dtype: one per kind of
        layer (full, sliding) the model has (`ModelSpec.sliding_type`), made before the layers run.
        SDPA gets none (`check` refuses a sliding window it would be handed as a mask)."""
        if not self.eager:
            return {}
        kinds = {self.spec.sliding_type(i) for i in range(self.spec.num_layers)}
        size = self.batch * self.seq * self.seq * self.item
        return {kind: self.tape.one("constant", (), size) for kind in sorted(kinds)}

    def forward(self, arch: Architecture, ids: int, labels: int) -> int:
        """The causal LM's forward and loss; returns the loss tensor."""
        t, n, spec = self.tape, self.tokens, self.spec
        tables = [m for m in arch.modules if m.kind == "embedding"]
        width = n * spec.hidden_size * self.item
        x = t.one("embedding", (self.params[f"{tables[0].path}.weight"], ids), width)
        if self.checkpointing and self.lora:
            # PEFT readies a checkpointed model with `enable_input_require_grads`: a hook makes the
            # input embedding's output a leaf that needs a gradient, held by its AccumulateGrad node
            t.tensors[x] = replace(t.tensors[x], grad=True)
            t.keep(x)
        positions = t.one("constant", (), self.seq * INT64)  # cache_position / position ids
        rope, kept = None, [positions]
        if self.features.learned_positions:
            pe = t.one("embedding", (self.params[f"{tables[1].path}.weight"], positions),
                       self.seq * spec.hidden_size * self.item)
            x = t.one("add", (x, pe), t.tensors[x].bytes)
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
            return self.loss(head, x, labels)

    def loss(self, head: Module, x: int, labels: int) -> int:
        """transformers' ForCausalLMLoss: logits in fp32, labels padded and shifted, log_softmax,
        nll_loss (mean)."""
        t, n, v = self.tape, self.tokens, self.spec.vocab_size
        logits = self.linear(head, x)
        if self.item != FP32:
            logits = t.one("cast", (logits,), n * v * FP32)
        padded = t.one("constant", (labels,), self.batch * (self.seq + 1) * INT64)
        # labels[..., 1:].contiguous(): a copy, except of one row (already contiguous)
        shifted = t.one("constant", (padded,), n * INT64) if self.batch > 1 else padded
        logp = t.one("log_softmax", (logits,), n * v * FP32)
        return t.op("nll_loss", (logp, shifted), (FP32, (FP32, False)))[0]
