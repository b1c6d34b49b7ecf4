"""The options that pick the training stack and its kernels (--stack, --optimizer-impl, --loss, ...).

Shared by `plan` and `trace`. A preset (`--stack`) sets every choice left unsaid, checkpointing
included; an option given explicitly wins over it.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from ..stacks import COMPILE_MODES, DEFAULT_STACK, LOSSES, OPTIMIZER_IMPLS, STACKS, get_stack
from .option_types import MAX_SEQ_LEN


def stack_options(f: Callable) -> Callable:
    """Add --stack, --optimizer-impl, --loss, --loss-chunks, --activation-offload and --compile."""
    options = [
        click.option("--stack", type=click.Choice(list(STACKS)), default=DEFAULT_STACK,
                     show_default=True,
                     help="Preset of the framework's defaults (optimizer kernel, loss, checkpointing, "
                          "offload): torch = plain loop with AdamW() (foreach); hf-trainer = "
                          "transformers Trainer (fused AdamW); trl = SFTTrainer (fused AdamW, "
                          "checkpointing; TRL's chunked log-prob head planned as fused-linear, the "
                          "closest modelled kernel); torchtune = recipes (chunked CE, checkpointing)."),
        click.option("--optimizer-impl", type=click.Choice(list(OPTIMIZER_IMPLS)), default=None,
                     help="torch optimizer kernel: fused (in place), foreach (AdamW: sqrt(v) of every "
                          "tensor at once), for-loop (one tensor at a time). Default: the stack's."),
        click.option("--loss", type=click.Choice(list(LOSSES)), default=None,
                     help="standard: full logits + fp32 copy; chunked: torchtune's chunked CE; "
                          "fused-linear: Liger's fused linear CE (no logits). Default: the stack's."),
        click.option("--loss-chunks", type=click.IntRange(1, MAX_SEQ_LEN), default=None,
                     help="Chunks of the chunked cross-entropy (default 8, torchtune's)."),
        click.option("--activation-offload/--no-activation-offload", default=None,
                     help="With checkpointing, keep the checkpointed layer inputs in CPU memory. "
                          "Default: the stack's (off in every preset)."),
        click.option("--compile", "compile_mode", type=click.Choice(list(COMPILE_MODES)), default=None,
                     help="torch.compile: layers = each decoder layer, layers+loss = each layer and "
                          "the loss apart (torchtune's compile=True: no fp32 logits kept), "
                          "model = the whole model (the Trainer's torch_compile). Inside a compiled "
                          "graph, backward recomputes pointwise results (the norms' normalised "
                          "tensors, silu(gate), GELU) from tensors it keeps anyway instead of saving "
                          "them; matmul and attention inputs stay saved, dropout masks become bool. "
                          "Default: the stack's (none in every preset)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def stack_changes(stack: str, optimizer_impl: str | None, loss: str | None, loss_chunks: int | None,
                  activation_offload: bool | None, grad_checkpointing: bool,
                  compile_mode: str | None = None, checkpoint_every: int = 1,
                  checkpoint_ops: bool = False) -> dict:
    """TrainSetup fields for the chosen stack. Checkpointing takes the preset's value unless the user
    gave --grad-checkpointing or --no-grad-checkpointing; --checkpoint-every K above 1 and
    --checkpoint-ops turn it on unless the user turned it off (which the plan then refuses)."""
    ctx = click.get_current_context()
    source = ctx.get_parameter_source("grad_checkpointing")
    if source in (None, click.core.ParameterSource.DEFAULT):
        grad_checkpointing = get_stack(stack).grad_checkpointing or checkpoint_every > 1 or checkpoint_ops
    return {"stack": stack, "optimizer_impl": optimizer_impl, "loss": loss, "loss_chunks": loss_chunks,
            "activation_offload": activation_offload, "grad_checkpointing": grad_checkpointing,
            "compile": compile_mode, "checkpoint_every": checkpoint_every, "checkpoint_ops": checkpoint_ops}
