"""The `plan`, `models` and `trace` commands: parse, call the planner, render."""

from __future__ import annotations

import click

from ..catalog import CATALOG
from ..counts import BIAS_MODES, PRESET_NAMES
from ..errors import PlanError
from ..gpus import DEFAULT_GPU, GPUS, get_gpu, with_memory
from ..optimizers import OPTIMIZERS
from ..plan import METHODS, check_methods, make_plan
from ..precision import DEFAULT_PRECISION
from ..quant import BNB_MODELLED, COMPUTE_DTYPES, QUANT_BACKENDS
from ..render import FORMATS, render
from ..spec import DEFAULT_SEQ_LEN, DenseSize, ModelSpec, TrainSetup, default_seq_len
from ..units import parse_count
from .common import need_measure_extra, parse_ranks, split_values
from .option_types import MAX_LABELS, MAX_LAYERS, MAX_RANK, MAX_TASKS, check_ranks, check_targets
from .scale_options import scale_options, setup_changes, workload
from .stack_options import stack_changes, stack_options
from .step_options import (
    adapter_dtype_option,
    checkpoint_every_option,
    checkpoint_ops_option,
    dropout_option,
    lora_dropout_option,
    optimizer_in_backward_option,
    packing_option,
    precision_option,
    step_options,
)

# Every choice (--method LoRA, --precision BF16, --format JSON) is read in any case: click folds the
# value and the choices alike before comparing, and passes on the choice as it is spelt here.
ANY_CASE = {"token_normalize_func": str.lower}


class PlanCommand(click.Command):
    """`plan`, whose error for a stray word names the option it was likely meant for: `lora-plan 70b`
    is a model given without `--model`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        allowed, ctx.allow_extra_args = ctx.allow_extra_args, True  # leftovers kept, not refused
        try:
            rest = super().parse_args(ctx, args)
        finally:
            ctx.allow_extra_args = allowed
        if rest and not allowed and not ctx.resilient_parsing:
            ctx.fail(f"Got unexpected extra argument{'s' if len(rest) > 1 else ''} ({' '.join(rest)})"
                     + bare_model_hint(rest[0]))
        return rest


def bare_model_hint(word: str) -> str:
    """'; did you mean --model WORD?' when a stray word reads as a model: a catalog name or alias,
    a hub id (org/name) or a config.json; else nothing."""
    import shlex

    from ..catalog import lookup

    if word.startswith("-") or not (lookup(word) is not None or "/" in word or word.endswith(".json")):
        return ""
    return f"; did you mean --model {shlex.quote(word)}?"


@click.command("plan", cls=PlanCommand, context_settings=ANY_CASE)
@click.option("--model", "model_name", metavar="NAME|PATH|HUB-ID",
              help="Catalog name or alias (see `lora-plan models`), a local config.json or its "
                   "folder, or a Hugging Face hub id (needs network). A local config.json of any "
                   "other decoder model_type transformers builds is planned from transformers' own "
                   "code: its tensors built on the meta device, its step recorded under fake tensors "
                   "on 1-3 layers and scaled to its depth (needs the measure extra; cached in "
                   "~/.cache/lora-plan or $LORA_PLAN_CACHE).")
@click.option("--params", "params_text", metavar="N",
              help="Plan a hypothetical dense model from its parameter count alone (70e9, 70B): "
                   "full fine-tuning's model states and checkpoint data.")
@click.option("--method", "methods", multiple=True, metavar="M[,M]",
              help=f"Methods side by side: {', '.join(METHODS)} (default: all; full with --params).")
@click.option("--rank", "ranks", multiple=True, metavar="R[,R]", callback=check_ranks,
              help="LoRA ranks, repeated or comma-separated (default 8).")
@click.option("--targets", "targets", multiple=True, metavar="T[,T]", callback=check_targets,
              help=f"LoRA targets: a preset ({', '.join(PRESET_NAMES)}), module names matched as "
                   "PEFT matches them (exact path or dotted suffix), or re:REGEX. Default: PEFT's "
                   "default for the model's family.")
@precision_option(DEFAULT_PRECISION)
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="adamw", show_default=True,
              help="adamw-8bit: bitsandbytes' 1-byte states. paged-*: the Trainer's paged_adamw_8bit, "
                   "paged_adamw_32bit, paged_lion_8bit, paged_lion_32bit; states of tensors of 100,000+ "
                   "values sit in CUDA unified memory, shown apart and left out of the peak.")
@click.option("--bias", type=click.Choice(BIAS_MODES), default="none", show_default=True,
              help="Which biases LoRA trains (PEFT's `bias`).")
@click.option("--dora", is_flag=True, help="DoRA (PEFT's use_dora): a magnitude vector per wrapped "
              "layer, and the outputs and weight-norm transients its forward adds.")
@click.option("--modules-to-save", "modules_to_save", multiple=True, metavar="NAME[,NAME]",
              help="Modules trained in full beside the adapters (PEFT's modules_to_save).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="QLoRA: quantise the 4-bit base's block constants too.")
@click.option("--quant-backend", type=click.Choice(list(QUANT_BACKENDS)), default=None,
              help="QLoRA's 4-bit layers: bnb = bitsandbytes Linear4bit (transformers, PEFT); torchao = "
                   "torchao NF4Tensor (torchtune's QLoRA). Default: the stack's (torchao for torchtune).")
@click.option("--bnb-version", default=BNB_MODELLED, show_default=True, metavar="X.Y[.Z]",
              help="QLoRA: the bitsandbytes release. Before 0.43.2 each 4-bit layer kept its input "
                   "for backward (more activations); newer than the default plans as the default.")
@click.option("--bnb-compute-dtype", type=click.Choice(list(COMPUTE_DTYPES)), default="bf16",
              show_default=True,
              help="QLoRA (bitsandbytes): bnb_4bit_compute_dtype, the dtype each 4-bit weight is "
                   "dequantised into. transformers' own default is fp32; QLoRA recipes set bf16.")
@click.option("--quantize-experts", is_flag=True,
              help="QLoRA: plan fused 3-D expert weights (Mixtral) as NF4 too. Stock bitsandbytes "
                   "quantises nn.Linear only, so by default they stay 16-bit.")
@click.option("--save-dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="Checkpoint dtype; auto saves weights as they are stored.")
@click.option("--task", type=click.Choice(["causal-lm", "seq-cls"]), default="causal-lm",
              show_default=True, help="seq-cls replaces the LM head with a trained `score` head.")
@click.option("--num-labels", type=click.IntRange(1, MAX_LABELS), default=2, show_default=True,
              help="Outputs of the seq-cls head.")
@click.option("--tasks", "tasks", type=click.IntRange(1, MAX_TASKS), default=1, show_default=True,
              help="Storage for N task-specific fine-tunes: N full copies vs base + N adapters.")
@step_options
@checkpoint_every_option
@checkpoint_ops_option
@stack_options
@dropout_option
@lora_dropout_option
@adapter_dtype_option
@optimizer_in_backward_option
@packing_option
@click.option("--gpu", "gpu_name", default=DEFAULT_GPU, show_default=True,
              help=f"GPU kind: {', '.join(g.name for g in GPUS)}.")
@click.option("--gpu-mem", "gpu_mem", metavar="SIZE",
              help="Override the GPU's memory exactly: 80GB (10^9), 80GiB (2^30), 81559MiB. With "
                   "--gpu, that card keeps its throughput and price; without, it is a card of "
                   "unknown throughput (memory only, unless --tflops).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--units", type=click.Choice(["GB", "GiB"]), default="GB", show_default=True,
              help="Unit of the tables: GB = 10^9 bytes, GiB = 2^30 bytes. JSON is always bytes.")
@click.option("--explain", is_flag=True, help="Print every term's formula with the numbers put in.")
@click.option("--fit", "fit", is_flag=True,
              help="Also find, per method, the largest batch (at --seq-len) and the longest sequence "
                   "(at --batch-size) whose per-GPU peak plus the CUDA allowance fits the GPU "
                   "(under --num-gpus/--sharding when given).")
@scale_options
@click.pass_context
def plan_command(ctx: click.Context, **params) -> None:
    """Trainable parameters, memory by term (model states, activations, the step's peak), GPUs and
    checkpoint sizes, method by method; with --fit, the largest batch and sequence that fit;
    with --tokens, training FLOPs, hours and cost; with --num-gpus, memory per GPU under ZeRO/FSDP.

    \b
        lora-plan --model 8b --tokens 1e9 --num-gpus 8 --gpu h100
        lora-plan --model 70b --method full --num-gpus 16 --sharding zero3
        lora-plan --model 70b --num-gpus 8 --sharding fsdp --offload optimizer --explain
        lora-plan --model 8b --dataset-tokens 50M --epochs 3 --gpu a100 --price 1.5 --mfu 0.35
    """
    text = plan_output(**params, gpu_given=gpu_given(ctx))
    click.echo(text, nl=False)


def gpu_given(ctx: click.Context) -> bool:
    """Whether the user named the GPU (`--gpu`), not left the default: `--gpu-mem` then overrides
    that card's memory only, keeping its throughput and price."""
    from click.core import ParameterSource

    return ctx.get_parameter_source("gpu_name") not in (None, ParameterSource.DEFAULT)


def plan_output(model_name, params_text, methods, ranks, targets, precision, optimizer, bias, dora,
                modules_to_save, double_quant, save_dtype, task, num_labels, tasks, batch_size,
                seq_len, grad_checkpointing, attention, stack, optimizer_impl, loss, loss_chunks,
                activation_offload, gpu_name, gpu_mem, fmt, units, explain, fit, dropout=None,
                quantize_experts=False, lora_dropout=0.0, adapter_dtype="auto",
                optimizer_in_backward=False, packing=False, gpu_given=False, quant_backend=None,
                bnb_version=BNB_MODELLED, bnb_compute_dtype="bf16", compile_mode=None, checkpoint_every=1,
                checkpoint_ops=False, **scale) -> str:
    """What `plan` prints for its parsed options (click's parameter names); a user mistake
    raises PlanError. The command echoes it; the page (`serve`) answers with it directly.
    `gpu_given`: the user named --gpu (see `gpu_given()`), so --gpu-mem keeps that card's kind."""
    if bool(model_name) == bool(params_text):
        raise PlanError("give exactly one of --model NAME or --params N")
    if params_text:
        model = DenseSize(parse_count(params_text))
        default_methods: tuple[str, ...] = ("full",)
    else:
        from ..resolve import resolve_model

        model = resolve_model(model_name, other_types=True)
        default_methods = METHODS
    chosen = check_methods(tuple(m.lower() for m in split_values(methods)) or default_methods)
    context = _other_context(model)
    if seq_len is None:
        seq_len = (default_seq_len(model) if isinstance(model, ModelSpec) else
                   min(DEFAULT_SEQ_LEN, context) if context else DEFAULT_SEQ_LEN)
    gpu = get_gpu(gpu_name)
    if gpu_mem:
        gpu = with_memory(gpu, gpu_mem, keep_kind=gpu_given)
    base = TrainSetup(
        precision=precision, optimizer=optimizer, bias=bias, use_dora=dora,
        targets=split_values(targets) or ("default",), modules_to_save=split_values(modules_to_save),
        double_quant=double_quant, quantize_experts=quantize_experts, quant_backend=quant_backend,
        bnb_version=bnb_version, bnb_compute_dtype=bnb_compute_dtype, save_dtype=save_dtype,
        task=task, num_labels=num_labels, tasks=tasks, batch_size=batch_size, seq_len=seq_len,
        attention=attention, dropout=dropout, lora_dropout=lora_dropout, adapter_dtype=adapter_dtype,
        optimizer_in_backward=optimizer_in_backward, packing=packing,
        **stack_changes(stack, optimizer_impl, loss, loss_chunks, activation_offload,
                        grad_checkpointing, compile_mode, checkpoint_every, checkpoint_ops),
        **setup_changes(**scale),
    )
    rank_list = parse_ranks(ranks)
    setups = []
    for m in dict.fromkeys(chosen):
        if m == "full":
            setups.append(base.with_(method="full"))
        else:
            setups += [base.with_(method=m, rank=r) for r in rank_list]
    if context is not None:
        model = _recorded(model, tuple(setups))
    fewest = None
    if base.num_gpus is None and (base.sharding != "none" or base.offload != "none"):
        setups, fewest = _on_fewest_gpus(model, tuple(setups), gpu)
    plan = make_plan(model, tuple(setups), gpu, workload(gpu, **scale))
    if fewest is not None:
        plan = _with_fewest_note(plan, fewest)
    plan = _with_rank_notes(plan, model)
    from ..advice import advise  # what to change when a method does not fit, each re-planned

    plan = advise(plan, model, tuple(setups), gpu)
    if fit:
        plan = _with_fit(plan, model, tuple(setups), gpu)
    return render(plan, fmt, units, explain)


def _other_context(model) -> int | None:
    """For a config.json of a model_type none of our families lays out (`resolve.OtherConfig`): its
    context, for the default --seq-len; None for any other model."""
    from ..resolve import OtherConfig
    from ..validate import whole_number

    if not isinstance(model, OtherConfig):
        return None
    positions = model.config.get("max_position_embeddings")
    return DEFAULT_SEQ_LEN if positions is None else whole_number(
        "config.json max_position_embeddings", positions, 1, 10**9)


def _recorded(other, setups):
    """The model of another model_type, with each setup's step recorded from transformers (or read
    from the cache; a setup --fit or advice plans later is recorded when asked for): needs the
    measure extra."""
    need_measure_extra(f"planning model_type {other.model_type!r} (recorded from transformers)",
                       ("torch", "transformers", "peft"))
    from ..measure.recorded import recorded_model
    from ..stacks import resolve

    return recorded_model(other.config, other.name, other.source, tuple(resolve(s) for s in setups))


def _on_fewest_gpus(model, setups, gpu):
    """--sharding or --offload without --num-gpus: each setup on the fewest GPUs whose per-GPU peak
    fits under that strategy and offload. The planner finds that count already (`gpus_needed` of a
    plan given the strategy); a setup that fits at no count stays on one GPU, where it does not fit."""
    probe = make_plan(model, tuple(s.with_(num_gpus=1) for s in setups), gpu)
    counts = tuple(p.gpus_needed for p in probe.plans)
    return [s.with_(num_gpus=n or 1) for s, n in zip(setups, counts, strict=True)], counts


def _with_fewest_note(plan, counts):
    """The per-GPU note, naming the GPU count each method was planned on (they may differ)."""
    from dataclasses import replace

    from ..render import plan_label
    from ..sharding import DISPLAY

    s = plan.setup
    each = ", ".join(f"{plan_label(p)} {n if n else 'none (does not fit at any count)'}"
                     for p, n in zip(plan.plans, counts, strict=True))
    note = (f"memory is per GPU: no --num-gpus, so each method is planned on the fewest GPUs that fit "
            f"under {DISPLAY[s.sharding]}, offload {s.offload}: {each}; activations are per GPU "
            "(not sharded)")
    # the planner's own per-GPU note names the first method's count only
    kept = tuple(n for n in plan.notes if not n.startswith("memory is per GPU: one of "))
    return replace(plan, notes=(note, *kept))


def _with_rank_notes(plan, model):
    """The plan with a note for each rank above some wrapped module's size (planned, as PEFT
    allows it, but wasted there)."""
    from dataclasses import replace

    from ..counts import oversized_rank_note

    if not isinstance(model, ModelSpec):
        return plan
    ranks = dict.fromkeys(p.rank for p in plan.plans if p.rank is not None)
    notes = [oversized_rank_note(model, plan.setup.with_(method="lora", rank=r)) for r in ranks]
    return replace(plan, notes=plan.notes + tuple(n for n in notes if n))


def _with_fit(plan, model, setups, gpu):
    """--fit: the largest batch and sequence each method's step fits, by the planner's own verdict."""
    from ..fit import with_fit

    if isinstance(model, DenseSize):
        raise PlanError("--fit needs the model's shape for activations; pass --model")
    # the verdict alone is read: GPU counts are searched only as far as the fewest (`fewest_only`)
    # a recorded model's config may state no context: the sequence asked bounds the search then
    return with_fit(plan, setups, lambda s: make_plan(model, (s,), gpu, fewest_only=True).plans[0].fits,
                    model.max_positions or setups[0].seq_len)


@click.command("models", context_settings=ANY_CASE)
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table",
              show_default=True)
def models_command(fmt: str) -> None:
    """List the model catalog: name, aliases, parameters, family, source config."""
    import json

    from tabulate import tabulate

    from ..counts import total_params

    rows = [
        {"name": s.name, "aliases": list(s.aliases), "params": total_params(s), "family": s.family,
         "source": s.source}
        for s in CATALOG
    ]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    table = [[r["name"], ", ".join(r["aliases"]), f"{r['params']:,}", r["family"], r["source"]]
             for r in rows]
    click.echo(tabulate(table, headers=["name", "aliases", "params", "family", "source"],
                        tablefmt="github" if fmt == "markdown" else "simple",
                        colalign=("left", "left", "right", "left", "left")))


@click.command("trace", context_settings=ANY_CASE)
@click.option("--model", "model_name", required=True, metavar="NAME|PATH",
              help="Catalog name or a local config.json (as for `plan`).")
@click.option("--method", type=click.Choice(["full", "lora", "qlora"]), default="lora", show_default=True,
              help="qlora runs bitsandbytes' Linear4bit on CPU (every linear layer but the output head, "
                   "NF4, double quantised) and plans the installed bitsandbytes release.")
@click.option("--rank", type=click.IntRange(1, MAX_RANK), default=8, show_default=True)
@click.option("--targets", "targets", multiple=True, metavar="T[,T]", callback=check_targets,
              help="LoRA targets, as for `plan`.")
@precision_option("fp32", runs="A traced step runs fp32, amp (bf16 autocast) and pure-bf16 (a bf16 "
                                "model): a plain torch step keeps no fp32 master copy; mixed and bf16 with "
                                "--adapter-dtype fp32, whose fp32 adapters need none.")
@step_options
@checkpoint_every_option
@checkpoint_ops_option
@stack_options
@dropout_option
@lora_dropout_option
@adapter_dtype_option
@optimizer_in_backward_option
@packing_option
@click.option("--layers", type=click.IntRange(1, MAX_LAYERS), default=None,
              help="Trace only the first N decoder layers (a slice of a large model).")
@click.option("--fake", is_flag=True,
              help="Run under FakeTensorMode: same byte counts, no memory allocated (70B slices fit).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--force", is_flag=True,
              help="Trace even when the planned peak exceeds the memory available (host RAM, or the "
                   "GPU's free memory with --device cuda).")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "sgd-momentum", "adafactor"]),
              default="adamw", show_default=True,
              help="torch's AdamW or SGD (kernel from --optimizer-impl), or transformers' Adafactor as the "
                   "Trainer makes it.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the step runs. cuda: the first GPU torch sees; the allocator's peak is then "
                   "torch.cuda.max_memory_allocated over the step, and the plan is the GPU's.")
def trace_command(model_name, method, rank, targets, precision, batch_size, seq_len, grad_checkpointing,
                  attention, stack, optimizer_impl, loss, loss_chunks, activation_offload, layers, fake,
                  fmt, force, dropout=None, optimizer="adamw", lora_dropout=0.0,
                  adapter_dtype="auto", optimizer_in_backward=False, packing=False,
                  compile_mode=None, checkpoint_every=1, checkpoint_ops=False, device="cpu") -> None:
    """Trace one real training step (on CPU, or a GPU with --device cuda) and print it beside the
    prediction, term by term.

    Needs the `measure` extra (torch, transformers; peft for LoRA). Without --fake, a step whose
    planned peak exceeds the memory available is refused before the model is built (--force
    traces it anyway).

    \b
        lora-plan trace --model gpt2 --method full --seq-len 256 --layers 2
        lora-plan trace --model llama-3.1-70b --layers 2 --seq-len 4096 --fake --format json
    """
    import json

    from ..resolve import resolve_model

    spec = resolve_model(model_name, other_types=True)
    context = _other_context(spec)
    # as plan's: 2,048, or the model's context
    seq_len = seq_len or (default_seq_len(spec) if context is None else min(DEFAULT_SEQ_LEN, context))
    setup = TrainSetup(method=method, rank=rank, targets=split_values(targets) or ("default",),
                       precision=precision, batch_size=batch_size, seq_len=seq_len,
                       attention=attention, dropout=dropout, optimizer=optimizer,
                       lora_dropout=lora_dropout, adapter_dtype=adapter_dtype,
                       optimizer_in_backward=optimizer_in_backward, packing=packing,
                       **stack_changes(stack, optimizer_impl, loss, loss_chunks, activation_offload,
                                       grad_checkpointing, compile_mode, checkpoint_every,
                                       checkpoint_ops))
    need_measure_extra("lora-plan trace")
    if context is not None:
        if device != "cpu" or method == "qlora":
            raise PlanError(f"trace {'--method qlora' if method == 'qlora' else f'--device {device}'} is "
                            f"for the families we walk: a model_type recorded from transformers "
                            f"({spec.model_type!r}) is traced on CPU, full or lora")
        return _trace_recorded(spec, setup, layers, fake, force, fmt)
    from ..measure.traced_step import installed_bnb_version, predicted_terms, sliced, trace

    if method == "qlora":  # the plan models the bitsandbytes release the trace runs
        setup = setup.with_(bnb_version=installed_bnb_version())
    spec = sliced(spec, layers)
    from ..measure.traced_step import check_device

    check_device(device, fake)
    if not (fake or force):
        from ..measure.guard import check_fits, cuda_free_bytes, host_available_bytes

        available, where = ((host_available_bytes(), "host RAM") if device == "cpu"
                            else (cuda_free_bytes(), "the GPU's free memory"))
        check_fits(predicted_terms(spec, setup, device)[0]["peak"], available, where,
                   "use --fake, --layers N or a smaller setup")
    from ..measure.step import quiet_libraries

    with quiet_libraries():
        result = trace(spec, setup, fake=fake, allocator=True, device=device)
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    _echo_trace(result, _trace_header(spec.name, spec.family, spec.num_layers, setup), setup)


def _trace_recorded(other, setup: TrainSetup, layers: int | None, fake: bool, force: bool, fmt: str) -> None:
    """`trace` of a config.json of another model_type: its plan from the recording (of its first
    `layers` layers) beside a step of the real class traced whole; a real step whose planned peak
    exceeds the host RAM available is refused before it runs (unless --force)."""
    import json

    if (setup.compile or "none") != "none":
        raise PlanError("trace --compile is for our own families; trace this model_type without it")
    from ..measure.guard import check_fits, host_available_bytes
    from ..measure.recorded import trace_recorded
    from ..measure.step import quiet_libraries

    def guard(peak: int) -> None:
        if not (fake or force):
            check_fits(peak, host_available_bytes(), "host RAM", "use --fake, --layers N or a smaller setup")
    with quiet_libraries():
        result, model = trace_recorded(other.config, other.name, other.source, setup, layers, fake, guard)
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    _echo_trace(result, _trace_header(model.name, f"{model.model_type}, recorded from transformers",
                                      model.num_layers, setup), setup)


def _echo_trace(result, header: str, setup: TrainSetup) -> None:
    """`trace`'s table: each term predicted beside traced, the allocator's peak, where the peaks are."""
    from tabulate import tabulate

    click.echo(header)
    compiled = (setup.compile or "none") != "none"
    errors = result.errors()
    # a compiled step runs kernels no tracer sees: the allocator's peak is its one reading
    rows = [] if compiled else [[k, f"{result.predicted_seen[k]:,}", f"{result.traced[k]:,}",
                                 "-" if errors[k] is None else f"{errors[k]:+.2%}"] for k in errors]
    rows.append(_allocator_row(result))
    click.echo(tabulate(rows, headers=["bytes", "predicted", "traced", "error"],
                        colalign=("left", "right", "right", "right")))
    click.echo(f"peak set in: predicted {result.predicted_phase}, traced {result.traced_phase}")
    if compiled:
        click.echo(f"compiled ({setup.compile}): inductor's kernels are out of the tracer's sight; the "
                   "allocator's peak is the step's only reading")
        return
    if result.predicted_tracer_peak != result.predicted["peak"]:
        # the plan counts bytes made outside every op (checkpointing's CPU RNG states): the
        # allocator's row holds the whole; say where the plan's whole peak is and what it holds
        click.echo(f"predicted peak with the bytes made outside every op: {result.predicted['peak']:,} B "
                   f"({result.predicted_peak_what})")
    click.echo(_allocator_line(result.allocator, result.traced["peak"]))


def _allocator_row(result) -> list[str]:
    """The allocator's peak as a row: the predicted peak beside it, and the prediction's error."""
    peak = result.allocator.peak_bytes
    if peak is None:
        return ["peak (allocator)", f"{result.predicted['peak']:,}", "-", "-"]
    return ["peak (allocator)", f"{result.predicted['peak']:,}", f"{peak:,}",
            f"{(result.predicted['peak'] - peak) / peak:+.2%}"]


def _allocator_line(reading, tracer_peak: int) -> str:
    """Why there is no allocator peak, or its bytes over the tracer's and the ops they were made in."""
    if reading.peak_bytes is None:
        return f"allocator peak: none ({reading.reason})"
    where = "; ".join(f"{e.op}{f' in {e.module}' if e.module else ''} ({e.phase}) {e.bytes:,}"
                      for e in reading.extra_by_op)
    return (f"allocator peak: {reading.peak_bytes - tracer_peak:+,} bytes beside the tracer's"
            + (f"; not seen by it at that moment: {where}" if where else ""))


def _trace_header(name: str, family: str, num_layers: int, setup: TrainSetup) -> str:
    """What was traced, in one line above the table: model and layers, method, precision, step."""
    targets = ",".join(setup.targets)
    method = "full" if setup.method == "full" else f"{setup.method} r={setup.rank} ({targets})"
    if setup.method == "qlora":
        method += f" on bitsandbytes {setup.bnb_version} Linear4bit (NF4)"
    dropout = f", lora dropout {setup.lora_dropout:g}" if setup.lora_dropout else ""
    if setup.adapter_dtype != "auto":
        dropout += f", {setup.adapter_dtype} adapters"
    if setup.optimizer_in_backward:
        dropout += ", optimizer stepped in backward"
    if setup.packing:
        dropout += ", packed into one row"
    return (f"traced: {name} ({family}, {num_layers} layers); method {method}{dropout}; "
            f"precision {setup.precision}; batch {setup.batch_size} x {setup.seq_len} tokens; "
            f"checkpointing {'on' if setup.grad_checkpointing else 'off'}"
            + (f"; compile {setup.compile}" if (setup.compile or "none") != "none" else ""))
