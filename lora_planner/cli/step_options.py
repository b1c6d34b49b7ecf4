"""The options that shape one training step: batch, sequence, checkpointing, attention, precision,
dropout.

Shared by `plan`, `trace`, `measure run` and `report capacity`, so an option means the same in each,
with the same names, defaults and help. Where a command cannot run a value (a plain torch step
keeps no fp32 master copy), it says so in one line and names the values it runs.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from ..precision import PRECISIONS
from .option_types import MAX_BATCH, MAX_LAYERS, MAX_SEQ_LEN, FiniteFloat

PRECISION_HELP = ("fp32: all fp32 (16 B/param with AdamW). amp: autocast, fp32 storage. mixed: "
                  "16-bit weights+grads, fp32 master+Adam (16 B). bf16: no master copy (12 B). "
                  "pure-bf16: Adam states in bf16 too (8 B).")


def step_options(f: Callable) -> Callable:
    """Add --batch-size, --seq-len, --grad-checkpointing and --attention to a click command."""
    options = [
        click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=1, show_default=True,
                     help="Micro-batch size (sequences per step per GPU)."),
        click.option("--seq-len", type=click.IntRange(1, MAX_SEQ_LEN), default=None,
                     help="Tokens per sequence. Default: 2,048, or the model's context when that is "
                          "shorter (GPT-2: 1,024)."),
        click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True,
                     help="Hugging Face per-layer checkpointing: keep layer inputs, recompute in "
                          "backward."),
        click.option("--attention", type=click.Choice(["sdpa", "eager"]), default="sdpa",
                     show_default=True,
                     help="sdpa: flash / memory-efficient kernels (no s x s scores kept); eager: keeps "
                          "them."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def checkpoint_every_option(f: Callable) -> Callable:
    """Add --checkpoint-every K: selective layer checkpointing (every K-th decoder layer)."""
    return click.option(
        "--checkpoint-every", type=click.IntRange(1, MAX_LAYERS), default=1, show_default=True,
        metavar="K",
        help="Selective checkpointing: checkpoint only every K-th decoder layer (torchtune's ac_mode "
             "selective with ac_option K, torchtitan's selective_ac_option K, transformers' "
             "every_n_layers); implies --grad-checkpointing. A checkpointed layer keeps only its "
             "input and is recomputed in backward; the others keep all their saved tensors. Which "
             "layers: hf-trainer and trl count as transformers (0, K, 2K, ...), torchtune and torch "
             "as torchtune and torchtitan (K-1, 2K-1, ...). 1: every layer.")(f)


def checkpoint_ops_option(f: Callable) -> Callable:
    """Add --checkpoint-ops: torchtitan's op-level selective checkpointing."""
    return click.option(
        "--checkpoint-ops", is_flag=True,
        help="torchtitan's op-level selective checkpointing (activation_checkpoint mode selective, "
             "selective_ac_option op): each checkpointed layer keeps its input and the outputs of "
             "every other matmul (the 1st, 3rd, ... of the layer) and of CUDA's fused attention "
             "kernel, and recomputes the rest in backward; implies --grad-checkpointing. Full "
             "fine-tuning only.")(f)


def dropout_option(f: Callable) -> Callable:
    """Add --dropout P: every dropout of the model at P, instead of the rates its config states."""
    return click.option(
        "--dropout", type=FiniteFloat(0, 1, hi_open=True), default=None, metavar="P",
        help="Set every dropout of the model (attention, residual, embedding) to P. Default: the "
             "rates config.json states (GPT-2's class default 0.1 where it states none; others 0). "
             "Each dropout keeps a mask for backward.")(f)


def lora_dropout_option(f: Callable) -> Callable:
    """Add --lora-dropout P: the dropout on each adapter's input (PEFT's `lora_dropout`)."""
    return click.option(
        "--lora-dropout", type=FiniteFloat(0, 1, hi_open=True), default=0.0, show_default=True,
        metavar="P",
        help="PEFT's lora_dropout: dropout on each LoRA adapter's input (recipes use 0.05-0.1), "
             "which keeps a mask and a dropped copy of the input per wrapped layer. --dropout "
             "sets the model's own dropouts.")(f)


def precision_option(default: str, runs: str = "") -> Callable:
    """--precision under the planner's names and meanings (`precision.PRECISIONS`); `runs` says
    which of them the command can run when that is not all of them."""
    return click.option("--precision", type=click.Choice(list(PRECISIONS)), default=default,
                        show_default=True, help=f"{PRECISION_HELP} {runs}".strip())


def adapter_dtype_option(f: Callable) -> Callable:
    """Add --adapter-dtype: the LoRA adapters' dtype over a 16-bit base (`adapter_dtype`)."""
    from ..adapter_dtype import ADAPTER_DTYPES

    return click.option(
        "--adapter-dtype", type=click.Choice(list(ADAPTER_DTYPES)), default="auto", show_default=True,
        help="LoRA adapters' dtype. fp32: PEFT's default on a model loaded in 16 bits (get_peft_model's "
             "autocast_adapter_dtype=True): fp32 adapters, gradients and Adam states, no master copy, "
             "each adapter's input cast to fp32; with --precision mixed or bf16 the step runs under "
             "autocast (the Trainer's bf16=True), with pure-bf16 without. auto: the adapters in the "
             "precision's own dtype (16-bit under mixed, bf16, pure-bf16), as plans before this "
             "option. QLoRA and full fine-tuning are planned as without it.")(f)


def optimizer_in_backward_option(f: Callable) -> Callable:
    """Add --optimizer-in-backward: torchtune's optimizer_in_bwd."""
    return click.option(
        "--optimizer-in-backward", is_flag=True,
        help="torchtune's optimizer_in_bwd: one optimizer per parameter, stepped in its "
             "post-accumulate-grad hook, which frees the gradient; the step holds one tensor's "
             "gradient (and its step's temporary) at a time instead of all of them. One GPU only.")(f)


def packing_option(f: Callable) -> Callable:
    """Add --packing: the batch's sequences packed into one row."""
    return click.option(
        "--packing", is_flag=True,
        help="Pack the micro-batch: its --batch-size documents of --seq-len tokens as one row of "
             "batch x seq tokens, position ids restarting per document (TRL's padding_free). "
             "torchtune's packed datasets are not this: each row is one pack of --seq-len tokens, "
             "planned as --batch-size rows without --packing. transformers then gives attention an explicit "
             "block-diagonal (1, 1, T, T) mask: SDPA keeps it and runs the memory-efficient kernel "
             "on CUDA, eager attention's scores are T x T. flash_attention_2's varlen kernel, "
             "which needs no mask, is not planned.")(f)
