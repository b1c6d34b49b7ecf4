"""A `Plan` rendered: a table (plain or markdown), CSV, JSON, or the derivation of every term.

Units appear only here. The JSON holds integer bytes; the tables print one unit (GB by default,
decimal) and say which.
"""

from __future__ import annotations

from .contract import planned_gpus, step_is_timed, to_dict, trainable_percent
from .counts import PEFT_DEFAULT_TARGETS
from .errors import PlanError
from .gpus import MIB, device_allowance, largest_fitting_peak
from .plan import MEMORY_KEYS, MethodPlan, Plan
from .precision import get_precision
from .sharding import DISPLAY, count_reasons
from .stacks import get_stack
from .units import format_bytes

FORMATS = ("table", "markdown", "json", "csv")


def plan_label(p: MethodPlan) -> str:
    return p.method if p.rank is None else f"{p.method} r={p.rank}"


def to_json(plan: Plan) -> str:
    import json

    return json.dumps(to_dict(plan), indent=2)


def _limit(n: int, ceiling: int | None = None) -> str:
    if n == 0:
        return "does not fit"
    return f"{n:,}" + (" (context)" if ceiling is not None and n == ceiling else "")


def _rows(plan: Plan, unit: str) -> list[list[str]]:
    total = plan.model.total_params
    fmt = lambda n: format_bytes(n, unit)  # noqa: E731
    rows = [
        ["trainable params"] + [f"{p.trainable_params:,}" for p in plan.plans],
        ["trainable %"] + [f"{trainable_percent(p, total):.4g}%" for p in plan.plans],
        ["LoRA targets"] + [", ".join(p.target_modules) or "-" for p in plan.plans],
    ]
    labels = {"weights": "weights", "gradients": "gradients", "master_weights": "fp32 master weights",
              "optimizer_states": "optimizer states", "activations": "activations",
              "peak": "peak per GPU (allocator)" if plan.setup.num_gpus else "peak (allocator)"}
    for key in MEMORY_KEYS:
        rows.append([labels[key]] + [fmt(p.memory[key].bytes) for p in plan.plans])
    if any(p.peak_phase for p in plan.plans):
        rows.append(["peak set in"] + [p.peak_phase or "-" for p in plan.plans])
        rows += _per_gpu_rows(plan, fmt)
    if any(p.activation_cpu_bytes for p in plan.plans):
        rows.append(["CPU memory (activation offload)"] + [fmt(p.activation_cpu_bytes) for p in plan.plans])
    rows += _scale_rows(plan, fmt)
    if any(p.fit for p in plan.plans):
        s, where = plan.setup, _fit_scope(plan)
        rows.append([f"largest batch at {s.seq_len} tokens ({where})"]
                    + [_limit(p.fit.max_batch_size) for p in plan.plans])
        rows.append([f"longest sequence at batch {s.batch_size} ({where})"] + [
            _limit(p.fit.max_seq_len, p.fit.seq_limit) for p in plan.plans])
    rows.append(["checkpoint"] + [fmt(p.checkpoint.bytes) for p in plan.plans])
    if plan.setup.tasks > 1:
        n = plan.setup.tasks
        rows.append([f"storage, {n} tasks"] + [
            fmt(p.storage["full_copies"] if p.method == "full" else p.storage["base_plus_adapters"])
            for p in plan.plans
        ])
    return rows


def _spread(p: MethodPlan) -> bool:
    """Whether the plan shows this method on several GPUs it was not given (`gpus_needed` > 1)."""
    return p.per_gpu_peak != p.memory["peak"].bytes and bool(p.gpus_needed) and p.gpus_needed > 1


def _per_gpu_rows(plan: Plan, fmt) -> list[list[str]]:
    """The allowance row, on the per-GPU peak of the GPUs shown: without --num-gpus, a method that
    needs several GPUs gets a row with its peak on one of them, and the allowance is on that."""
    rows = []
    spread = any(_spread(p) for p in plan.plans)
    if spread:
        rows.append(["peak per GPU on GPUs needed"]
                    + [fmt(p.per_gpu_peak) if _spread(p) else "-" for p in plan.plans])
    rows.append(["+ CUDA context/cache" + (" per GPU" if spread or plan.setup.num_gpus else "")] + [
        fmt(p.device_overhead.bytes) if p.device_overhead else "-" for p in plan.plans])
    return rows


def checkpointing_text(s, num_layers: int | None) -> str:
    """on / off, or under --checkpoint-every K which layers are checkpointed, by the stack's count."""
    if not s.grad_checkpointing:
        return "off"
    if s.checkpoint_every == 1:
        return "on"
    if num_layers is None:
        return f"on 1 layer in {s.checkpoint_every}, the others keep their activations"
    offset = get_stack(s.stack).checkpoint_offset
    chosen = [i for i in range(num_layers) if (i + offset) % s.checkpoint_every == 0]
    shown = ", ".join(map(str, chosen[:3])) + (", ..." if len(chosen) > 3 else "")
    count = "torchtune's and torchtitan's count" if offset else "transformers' every_n_layers"
    return (f"on 1 layer in {s.checkpoint_every} ({len(chosen)} of {num_layers}: layers {shown or 'none'}; "
            f"{count}), the others keep their activations")


def _header(plan: Plan, unit: str) -> list[str]:
    m = plan.model
    precision = get_precision(plan.setup.precision)
    lines = [
        f"model: {m.name} ({m.family}, {m.total_params:,} parameters)",
        f"precision: {precision.name} ({precision.summary}); optimizer: {plan.setup.optimizer}",
        f"GPU: {plan.gpu.name} ({format_bytes(plan.gpu.memory_bytes, unit)}, "
        f"{plan.gpu.memory_bytes / MIB:,.0f} MiB); "
        "sizes in " + ("decimal units (1 GB = 10^9 bytes)" if unit == "GB"
                       else "binary units (1 GiB = 2^30 bytes)"),
    ]
    if m.family != "dense":
        s = plan.setup
        lines.append(f"step: batch {s.batch_size:,} x {s.seq_len:,} tokens, {s.attention} attention, "
                     f"gradient checkpointing {checkpointing_text(s, m.spec.num_layers if m.spec else None)}")
        loss = s.loss + (f" ({s.loss_chunks} chunks)" if s.loss == "chunked" else "")
        lines.append(f"stack: {s.stack} (optimizer {s.optimizer_impl}, loss {loss}, activation offload "
                     f"{'on' if s.activation_offload else 'off'}"
                     + (f", compile {s.compile})" if (s.compile or "none") != "none" else ")"))
    lines += _targets_line(plan) + _adapter_dtype_line(plan) + _dora_line(plan) + _qlora_line(plan)
    if plan.setup.packing:
        s = plan.setup
        lines.append(f"packing: {s.batch_size} documents of {s.seq_len:,} tokens as one row of "
                     f"{s.batch_size * s.seq_len:,}, position ids restarting per document; attention "
                     "under a block-diagonal (1, 1, T, T) mask" if s.batch_size > 1 else
                     "packing: one document per step, nothing to pack (attention runs causal)")
    if plan.setup.optimizer_in_backward:
        lines.append("optimizer in backward: one optimizer per parameter, stepped in its gradient's hook "
                     "(torchtune's optimizer_in_bwd); one tensor's gradient and step temporary at a time, "
                     "no optimizer phase")
    return lines


def _adapter_dtype_line(plan: Plan) -> list[str]:
    """What --adapter-dtype changed, when it changed anything (`adapter_dtype.fp32_adapters`)."""
    from .adapter_dtype import adapter_autocast, fp32_adapters

    precision = get_precision(plan.setup.precision)
    if not fp32_adapters("lora", precision, plan.setup.adapter_dtype) or \
            not any(p.method == "lora" for p in plan.plans):
        return []
    how = ("under autocast (16-bit copies for their matmuls)" if adapter_autocast(precision)
           else "in fp32 (no autocast)")
    return [f"adapters: fp32 over the 16-bit base (PEFT's default): fp32 weights, gradients and "
            f"optimizer states, no master copy; each input cast to fp32, the adapters run {how} "
            "(LoRA only; QLoRA as planned without it)"]


def _qlora_line(plan: Plan) -> list[str]:
    """Which 4-bit implementation the QLoRA plans model, and what its matmul keeps (`quant`)."""
    if not any(p.method == "qlora" for p in plan.plans):
        return []
    from .quant import describe_quant

    s = plan.setup
    return [describe_quant(s.quant_backend, s.bnb_version, s.bnb_compute_dtype)]


def _dora_line(plan: Plan) -> list[str]:
    """What --dora adds to the step beyond the magnitude vectors (`activations.Graph.dora`)."""
    if not plan.setup.use_dora or not any(p.rank is not None for p in plan.plans):
        return []
    return ["DoRA (PEFT): each wrapped layer's forward forms B·A as lora_B(lora_A(I)) (the in x in "
            "identity kept while it lives), W + s·B·A and its per-output norm n (detached), then adds "
            "(m/n - 1) x base output + (m/n) x s x lora_B output; activations: the base output and "
            "lora_B's output (tokens x out each) and three out-sized vectors per wrapped layer; "
            "transients: the identity, B·A and two W-sized tensors at the norm, and the scaling's "
            "gradients in backward (LoRA only; QLoRA's DoRA counts its magnitude vectors alone)"]


def _targets_line(plan: Plan) -> list[str]:
    """The LoRA targets the plan used: PEFT's default for the family, or the ones given, as
    resolved (a preset becomes module names; `all-linear` is PEFT's own shorthand)."""
    lora = [p for p in plan.plans if p.rank is not None]
    if not lora:
        return []
    family = plan.model.family
    if plan.setup.targets == ("default",) and family in PEFT_DEFAULT_TARGETS:
        # (latent attention's default is its `qv` preset, which depends on the query's bottleneck)
        return [f"default LoRA targets for {family}: {', '.join(lora[0].target_modules)}"]
    used, given = lora[0].target_modules, plan.setup.targets
    text = ", ".join(used) + (f" (--targets {','.join(given)})" if used != given else "")
    if used == ("all-linear",):
        text = "all-linear (every linear layer but the output head)"
    return [f"LoRA targets: {text}"]


def _fit_scope(plan: Plan) -> str:
    """What `--fit` searched on: one GPU, or one of the GPUs the plan was given."""
    counts = {planned_gpus(p) for p in plan.plans}
    if counts == {None}:
        return "one GPU"
    sharding = DISPLAY.get(plan.setup.sharding, plan.setup.sharding)
    if len(counts) == 1:
        return f"one of {counts.pop()} GPUs, {sharding}"
    return f"one of each method's GPUs, {sharding}"


def aligned_table(rows: list[list[str]], headers: list[str], markdown: bool = False) -> str:
    """The plan's table: first column left, the others right, each as wide as its widest cell or its
    header plus two. It is the layout of tabulate's "simple" (or, for markdown, "github") format for
    text cells, written here so that the plain plan needs click alone; tests/test_render.py holds
    it to tabulate's own output."""
    widths = [max([len(h) + 2, *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> list[str]:
        pairs = enumerate(zip(cells, widths, strict=True))
        return [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]

    if markdown:
        lines = ["| " + " | ".join(line(headers)) + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(line(r)) + " |" for r in rows]
    else:
        lines = ["  ".join(line(headers)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(line(r)) for r in rows]
    return "\n".join(lines)


def to_table(plan: Plan, unit: str = "GB", markdown: bool = False) -> str:
    headers = [""] + [plan_label(p) for p in plan.plans]
    table = aligned_table(_rows(plan, unit), headers, markdown)
    head = _header(plan, unit)
    notes = [f"note: {n}" for n in plan.notes]
    advice = advice_lines(plan, unit, markdown)
    if markdown:
        return "\n".join([*(f"- {h}" for h in head), "", table, "", *advice,
                          *(f"- {n}" for n in notes)]) + "\n"
    return "\n".join([*head, "", table, "", *advice, *notes]) + "\n"


def _on(n: int | None, strategy: str | None) -> str:
    if n is None:
        return "does not fit"
    return "1 GPU" if n == 1 else f"{n} GPUs ({strategy})"


def advice_lines(plan: Plan, unit: str = "GB", markdown: bool = False) -> list[str]:
    """What gradient checkpointing gives (when it is off and a method does not fit) and the changes
    that make each method fit (`advice`), each with the plan's numbers after it; a blank line after."""
    advice = plan.advice
    if advice is None:
        return []
    fmt = lambda n: format_bytes(n, unit)  # noqa: E731
    code = (lambda t: f"`{t}`") if markdown else (lambda t: t)  # noqa: E731
    lines = []
    if advice.checkpointed:
        on = ", ".join(f"{plan_label(q)} {_on(q.gpus_needed, q.gpus_needed_strategy)}"
                       for q in advice.checkpointed)
        acts = " / ".join(fmt(q.memory["activations"].bytes) for q in advice.checkpointed)
        lines.append(f"with {code('--grad-checkpointing')}: {on} (activations {acts}, "
                     f"against {' / '.join(fmt(p.memory['activations'].bytes) for p in plan.plans)} without)")
    if advice.suggestions:
        lines.append("to make it fit (each change planned again):")
        for s in advice.suggestions:
            label = s.method if s.rank is None else f"{s.method} r={s.rank}"
            lines.append(f"  {label}: {code(s.change)} -> {_on(s.gpus, s.strategy)}, "
                         f"peak {fmt(s.peak)} per GPU")
    if markdown:
        lines = [f"- {line.strip()}" if not line.startswith("  ") else f"  - {line.strip()}"
                 for line in lines]
    return [*lines, ""] if lines else []


def to_csv(plan: Plan) -> str:
    """One row per method and rank, sizes in bytes."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fit = any(p.fit for p in plan.plans)  # --fit adds its two limits (0: nothing fits)
    writer.writerow(["model", "method", "rank", "trainable_params", *MEMORY_KEYS,
                     "checkpoint_bytes", "gpus_needed",
                     *(["max_batch_size", "max_seq_len"] if fit else [])])
    for p in plan.plans:
        writer.writerow([plan.model.name, p.method, "" if p.rank is None else p.rank,
                         p.trainable_params, *(p.memory[k].bytes for k in MEMORY_KEYS),
                         p.checkpoint.bytes, p.gpus_needed,
                         *([p.fit.max_batch_size, p.fit.max_seq_len] if fit else [])])
    return out.getvalue()


def explained_terms(plan: Plan, p: MethodPlan) -> list[str]:
    """One method's terms, each `name: formula with the numbers put in`."""
    lines = []
    if p.rank is not None:
        lines.append(f"trainable: {p.trainable_params:,} in {p.wrapped_modules} wrapped "
                     f"modules ({p.adapter_formula}) for targets {', '.join(p.target_modules)}")
    for t in p.weight_terms:
        lines.append(f"{t.name}: {t.formula}")
    for key in MEMORY_KEYS[1:]:
        lines.append(f"{key}: {p.memory[key].formula}")
    if p.optimizer_temporary:
        lines.append(f"optimizer_temporary: {p.optimizer_temporary.formula}")
    if p.dequant_transient:
        lines.append(f"dequant_transient: {p.dequant_transient.formula}")
    if p.paged_optimizer_states:
        lines.append(f"paged_optimizer_states: {p.paged_optimizer_states.formula}")
    if p.device_overhead:
        lines.append(f"device_overhead: {p.device_overhead.formula}")
    lines += [line.removeprefix("  ") for line in _scale_explanation(plan, p)]
    lines.append(f"checkpoint: {p.checkpoint.formula} = {p.checkpoint.bytes:,} B")
    return lines


def to_explanation(plan: Plan) -> str:
    """Every term's formula with the numbers put in."""
    lines = _header(plan, "GB")
    for p in plan.plans:
        lines += ["", f"[{plan_label(p)}]", *(f"  {line}" for line in explained_terms(plan, p))]
    lines += ["", *(f"note: {n}" for n in plan.notes)]
    return "\n".join(lines) + "\n"


def _markdown_explanation(plan: Plan) -> str:
    """--explain under the markdown table: each method's terms in a text block (formulas hold `*`
    and `_`, which markdown would read as emphasis)."""
    parts = ["## How each term is computed", ""]
    for p in plan.plans:
        parts += [f"### {plan_label(p)}", "", "```text", *explained_terms(plan, p), "```", ""]
    return "\n".join(parts)


def render(plan: Plan, fmt: str, unit: str = "GB", explain: bool = False) -> str:
    """The plan in `fmt`. With `explain`, JSON carries every method's terms under `explain`,
    markdown adds a section after the table, the table becomes the derivation itself; CSV has no
    place for it and refuses."""
    import json

    if fmt == "json":
        data = to_dict(plan)
        if explain:
            data["explain"] = [{"method": p.method, "rank": p.rank, "terms": explained_terms(plan, p)}
                               for p in plan.plans]
        return json.dumps(data, indent=2) + "\n"
    if fmt == "csv":
        if explain:
            raise PlanError("--explain has no CSV form: use --format json (an `explain` key) or markdown")
        return to_csv(plan)
    if explain and fmt == "table":
        return to_explanation(plan)
    text = to_table(plan, unit, markdown=fmt == "markdown")
    return text + "\n" + _markdown_explanation(plan) if explain else text


# --- GPUs, sharding, time and cost ------------------------------------------------------------

def _count(n: int | None) -> str:
    return "does not fit" if n is None else str(n)


def _needed(p: MethodPlan) -> str:
    """`5 (fsdp)`: the fewest GPUs and the strategy that achieves it."""
    if p.gpus_needed is None:
        return "does not fit"
    return f"{p.gpus_needed} ({p.gpus_needed_strategy})" if p.gpus_needed_strategy else str(p.gpus_needed)


def _hours(h: float | None) -> str:
    return "-" if h is None else f"{h:,.1f} h" if h >= 10 else f"{h:,.2f} h"


def _scale_rows(plan: Plan, fmt) -> list[list[str]]:
    s = plan.setup
    where = f"{plan.gpu.name}" + (f", {DISPLAY.get(s.sharding, s.sharding)}" if s.num_gpus else "")
    rows = [[f"GPUs needed ({where})"] + [_needed(p) for p in plan.plans]]
    counts = {planned_gpus(p) for p in plan.plans}
    if len(counts) > 1:  # each method on its own fewest GPUs (--sharding without --num-gpus)
        rows.append(["GPUs planned"] + [str(planned_gpus(p)) for p in plan.plans])
        rows.append(["fits on them (peak + allowance)"] + ["yes" if p.fits else "no" for p in plan.plans])
    elif s.num_gpus:
        rows.append([f"fits on {counts.pop()} (peak + allowance)"]
                    + ["yes" if p.fits else "no" for p in plan.plans])
    if s.offload != "none":
        rows.append(["CPU memory per GPU (offload)"] + [fmt(p.data_parallel.cpu_bytes) for p in plan.plans])
    rows.append(["min GPUs ddp/zero1/zero2/zero3/fsdp (no offload)"] + [
        "/".join("-" if n is None else str(n) for n in p.data_parallel.min_gpus.values())
        for p in plan.plans])
    if all(p.compute is not None for p in plan.plans) and plan.plans:
        rows += [
            ["training FLOPs"] + [f"{p.compute.flops:.3g}" for p in plan.plans],
            ["wall time"] + [_wall_time(p) for p in plan.plans],
            ["GPU-hours"] + [_hours(p.compute.gpu_hours) if step_is_timed(p) else "-" for p in plan.plans],
            ["cost (USD)"] + ["-" if p.compute.cost_usd is None or not step_is_timed(p)
                              else f"${p.compute.cost_usd:,.0f}" for p in plan.plans],
        ]
    return rows


def _wall_time(p: MethodPlan) -> str:
    """`12.9 h on 16`, or why there is no time: a step that does not fit is not priced."""
    n = p.compute.num_gpus
    if not step_is_timed(p):
        return f"does not fit on {n}" if planned_gpus(p) is not None else "does not fit"
    on = f"{n} ({p.gpus_needed_strategy})" if planned_gpus(p) is None and n > 1 else str(n)
    return f"{_hours(p.compute.wall_hours)} on {on}"


def _scale_explanation(plan: Plan, p: MethodPlan) -> list[str]:
    dp = p.data_parallel
    peak, cap = p.memory["peak"].bytes, plan.gpu.memory_bytes
    # the verdict's allowance is on this peak; the one shown (device_overhead) is on one of the GPUs
    # the plan shows, which differ when the step needs several
    allowance = device_allowance(peak, plan.gpu) if p.device_overhead else 0
    rule = (f"  fits: peak {peak:,} + allowance {allowance:,} = {peak + allowance:,} B "
            f"{'<=' if p.fits else '>'} {cap:,} B")
    if dp is None or dp.sharding is None:
        lines = [rule + " (one GPU)",
                 f"  gpus_needed: fewest N over ddp/zero1/zero2/zero3/fsdp whose per-GPU peak + allowance "
                 f"<= {cap:,} B = {_needed(p)}"]
        if p.device_overhead and p.per_gpu_peak != peak:
            shown, extra = p.per_gpu_peak, p.device_overhead.bytes
            lines.append(f"  on {_needed(p)}: per-GPU peak {shown:,} + allowance {extra:,} = "
                         f"{shown + extra:,} B <= {cap:,} B (the allowance shown)")
    else:
        sh = dp.sharding
        lines = [f"  weights per GPU: {p.memory['weights'].formula}",
                 rule + f" (one of {sh.num_gpus})",
                 f"  gpus_needed: fewest N with per-GPU peak + allowance <= {cap:,} B under {sh.strategy}, "
                 f"offload {sh.offload} = {_needed(p)}"]
        if dp.cpu_bytes:
            lines.append(f"  cpu_offload per GPU: {dp.cpu_bytes:,} B")
        for t in dp.buffers.values():
            lines.append(f"  {t.name}: {t.formula} = {t.bytes:,} B")
    lines.append("  min_gpus (no offload): "
                 + ", ".join(f"{DISPLAY[k]} {_count(v)}" for k, v in dp.min_gpus.items()))
    lines += [f"    {line}" for line in count_reasons(dp, largest_fitting_peak(plan.gpu))]
    if p.flops_per_token is not None:
        lines.append(f"  flops_per_token: {p.flops_per_token.formula}")
    c = p.compute
    if c is not None and c.wall_hours is not None and not step_is_timed(p):
        lines.append(f"  wall_hours: none: the step does not fit on {c.num_gpus} GPU(s)")
    elif c is not None and c.wall_hours is not None:
        lines.append(f"  wall_hours: {c.flops:.4g} FLOPs / ({c.num_gpus} x {plan.gpu.peak_tflops:g}e12 "
                     f"x {plan.workload.mfu:g} MFU) / 3600 = {c.wall_hours:,.2f} h; "
                     f"gpu_hours {c.gpu_hours:,.2f}; cost_usd "
                     + ("unknown" if c.cost_usd is None else f"{c.cost_usd:,.2f}"))
    return lines
