"""One training step, the same everywhere a step is measured: forward (causal-LM loss, under
autocast when a 16-bit compute dtype is given), backward (through the grad scaler when there is
one), the optimizer's step and `zero_grad(set_to_none=True)`.

`phase(name)` wraps each part (a reader's or a tracer's phase); by default it does nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

PHASES = ("forward", "backward", "optimizer")
# AdamW's (and SGD's) kernel forced by name (torch picks by itself otherwise: for-loop on CPU, foreach
# on CUDA)
ADAMW_KERNEL = {"fused": {"fused": True}, "foreach": {"foreach": True},
                "for-loop": {"foreach": False, "fused": False}}


def _no_phase(_name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def train_step(model: Any, optimizer: Any, input_ids: Any, labels: Any = None, *, compute_dtype: Any = None,
               scaler: Any = None,
               phase: Callable[[str], contextlib.AbstractContextManager] = _no_phase,
               loss_fn: Callable[[Any, Any, Any], Any] | None = None, position_ids: Any = None) -> Any:
    """Run one step and return its loss (a detached 0-d tensor: reading it is the caller's sync).

    `input_ids` (B, T); `labels` (B, T), the inputs when None (the model shifts them). `loss_fn`
    (model, input_ids, labels) -> loss replaces the model's own loss (a chunked cross-entropy).
    `position_ids` (1, T), restarting per document, for packed sequences (the model's own loss only).
    """
    import torch

    labels = input_ids if labels is None else labels
    with phase("forward"):
        autocast = (torch.autocast(input_ids.device.type, dtype=compute_dtype) if compute_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            if loss_fn is not None:
                loss = loss_fn(model, input_ids, labels)
            else:
                extra = {} if position_ids is None else {"position_ids": position_ids}
                loss = model(input_ids=input_ids, labels=labels, **extra).loss  # () fp32
    with phase("backward"):
        (scaler.scale(loss) if scaler is not None else loss).backward()
    with phase("optimizer"):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def step_loss(loss: str, chunks: int = 8) -> Callable[[Any, Any, Any], Any] | None:
    """The `loss_fn` of `train_step` for a loss kernel: None (the model's own loss) for standard,
    torchtune's chunked cross-entropy, or Liger's fused linear cross-entropy (CUDA only)."""
    if loss == "standard":
        return None
    if loss == "chunked":
        return lambda model, ids, labels: chunked_loss(model, ids, labels, chunks)
    if loss == "fused-linear":
        return fused_linear_loss
    raise ValueError(f"unknown loss {loss!r}")


def chunked_loss(model, ids, labels, chunks: int):
    """torchtune 0.6.1's chunked head and loss, in plain PyTorch over a transformers model.

    `TransformerDecoder.chunked_output`: the LM head applied to `chunks` slices of the sequence, the
    list of logits returned; then `CEWithChunkedOutputLoss`: each chunk upcast to fp32 and its
    cross-entropy summed, divided by the number of labelled tokens. Labels are shifted as
    transformers' `ForCausalLMLoss` shifts them (padded with -100, then [1:]). Gemma-2's final
    soft-capping is applied per chunk.
    """
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)

    def project(h):
        x = head(h)  # (b, s / chunks, V)
        return torch.tanh(x / cap) * cap if cap else x

    def chunked_output():
        # torchtune's model returns the list of logits: the final hidden state is not held past it
        # (Llama4ForCausalLM names a `language_model` prefix it does not have: its decoder is `model`)
        decoder = base.base_model if base.base_model is not base else base.model
        hidden = decoder(input_ids=ids).last_hidden_state  # (b, s, H)
        return [project(h) for h in hidden.chunk(chunks, dim=1)]

    logits = chunked_output()
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (b, s)
    total = (shifted != -100).sum()
    loss = 0.0
    for x, y in zip(logits, shifted.chunk(chunks, dim=1), strict=True):
        loss = loss + F.cross_entropy(x.reshape(-1, x.size(-1)).float(), y.reshape(-1), ignore_index=-100,
                                      reduction="sum")
    return loss / total


def fused_linear_loss(model: Any, ids: Any, labels: Any) -> Any:
    """Liger's fused linear cross-entropy over a transformers model: the decoder's last hidden
    state and the head's weight go to the kernel, which never forms the whole logits. Labels are
    shifted as transformers' loss shifts them (padded with -100, then [1:]); Gemma-2's final
    soft-cap is the kernel's `softcap`."""
    import torch.nn.functional as F

    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise RuntimeError("loss fused-linear needs Liger's kernels: pip install liger-kernel") from None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.base_model(input_ids=ids).last_hidden_state  # (b, s, H)
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (b, s)
    kernel = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, **({"softcap": cap} if cap else {}))
    return kernel(head.weight, hidden.reshape(-1, hidden.size(-1)), shifted.reshape(-1), head.bias)


def torchtitan_op_context():
    """torchtitan's op-level selective checkpointing policy as its `parallelize_llama.py` writes it
    (Jan 2025): inside a checkpointed block, the outputs of the ops on its save list are cached in
    forward (MUST_SAVE) but every second `aten.mm`, counted per block and phase; everything else is
    recomputed in backward. A fresh count per checkpoint call, as its `context_fn` makes one."""
    from collections import defaultdict

    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save_list = {
        torch.ops.aten.mm.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops._c10d_functional.reduce_scatter_tensor.default,
        torch.ops.aten.abs.default,
        torch.ops.aten.max.default,
    }
    meta: dict[str, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        key = f"{'recompute' if ctx.is_recompute else 'forward'}_mm_count"
        if func == torch.ops.aten.mm.default:
            meta[key] += 1
        save = func in save_list and not (func == torch.ops.aten.mm.default and meta[key] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_checkpointing(model: Any, every: int = 1, torchtune_count: bool = False,
                         ops: bool = False) -> None:
    """Hugging Face per-layer checkpointing, non-reentrant, by transformers 5's name for it when the
    installed version has it (the older name warns that it is deprecated).

    `every` > 1: selective, every `every`-th decoder layer, counted by transformers' own
    `every_n_layers` (layers 0, k, 2k, ...), or with `torchtune_count` as torchtune's and torchtitan's
    checkpoint wrappers count the layers they are applied to: from 1, wrapping count % k == 0.
    `ops`: each checkpoint under torchtitan's op policy (`torchtitan_op_context`)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if ops:
        kwargs["context_fn"] = torchtitan_op_context
    if hasattr(model, "activation_checkpointing_enable"):
        extra = {"every_n_layers": every} if every > 1 and not torchtune_count else {}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **extra)
    elif every > 1 and not torchtune_count:
        raise RuntimeError("selective checkpointing needs transformers' activation_checkpointing_enable")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if every > 1 and torchtune_count:
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for count, block in enumerate(blocks, start=1):
            block.gradient_checkpointing = count % every == 0


class DefaultLossNotice(logging.Filter):
    """Drops transformers' "`loss_type=None` was set in the config but it is unrecognized" warning.
    A model built from a config names no loss type, and transformers then uses the causal-LM loss,
    the one a step measures: the notice is printed on every run and asks nothing of the user. Any
    other loss type it does not recognise is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            "`loss_type=None` was set in the config but it is unrecognized")


def quiet_default_loss_notice() -> None:
    """Attach `DefaultLossNotice` to the logger transformers warns on, once per process."""
    logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, DefaultLossNotice) for f in logger.filters):
        logger.addFilter(DefaultLossNotice())


@contextlib.contextmanager
def quiet_libraries():
    """Silence the deprecation notices transformers and PEFT print about each other's names
    (`is_gradient_checkpointing`): they are not the user's to act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6",
                                category=FutureWarning)
        yield


def optimizer_holds_states(optimizer: Any) -> bool:
    """Whether every parameter the optimizer updates has its states (AdamW's step, exp_avg,
    exp_avg_sq). A grad scaler skips the steps whose gradients overflowed; until one step went
    through, the states do not exist and a step is not yet a steady-state one."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return bool(params) and all(optimizer.state.get(p) for p in params)


def attention_backend(ops: set[str]) -> str:
    """Which scaled-dot-product-attention kernel ran, from the aten op names seen in a forward:
    flash, efficient (memory-efficient), cudnn, flash_cpu, or math (no fused kernel) when SDPA
    decomposed into matrix products; `none` when no attention op ran."""
    fused = {"_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
             "_scaled_dot_product_flash_attention": "flash",
             "_scaled_dot_product_efficient_attention": "efficient",
             "_scaled_dot_product_cudnn_attention": "cudnn",
             "_scaled_dot_product_fused_attention_overrideable": "overrideable"}
    for name, backend in fused.items():
        if name in ops:
            return backend
    if ops & {"bmm", "baddbmm", "matmul", "mm"} and ops & {"_softmax", "_safe_softmax"}:
        return "math"
    return "none"


class OpNames:
    """A dispatch mode that collects the names of the aten ops that ran (for `attention_backend`)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Names(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.names: set[str] = set()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.names.add(func._overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        return _Names()
