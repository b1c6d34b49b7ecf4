"""Training stacks: the defaults each framework runs with, as a preset of the step's choices.

The same model and settings take different memory in different stacks because each stack picks its
own optimizer kernel, loss kernel, checkpointing and offloading. A preset names those defaults; any
option given explicitly overrides it. Each default is read from the stack's source, version stated:

- `torch`: a plain loop, `torch.optim.AdamW(params)` and `model(labels=...)`. With no `foreach`/`fused`
  argument torch 2.13 picks foreach for CUDA tensors (`optimizer._default_to_fused_or_foreach`).
- `hf-trainer`: transformers 5.23 `Trainer`. `TrainingArguments.optim` defaults to `adamw_torch_fused`
  when torch >= 2.8 (`AdamW(fused=True)`); the loss is the model's `ForCausalLMLoss` (fp32 upcast of
  the logits); `gradient_checkpointing` defaults to False.
- `trl`: TRL 1.16 `SFTTrainer`. Read from its source: `SFTConfig` turns `gradient_checkpointing` on
  (`_BaseConfig`), keeps the Trainer's `optim` (fused AdamW), leaves `activation_offloading`,
  `packing` and `padding_free` off, and `SFTTrainer.__init__` patches the model with TRL's
  own LM head (`add_fused_lm_head` -> `kernels.ChunkedLogProbFunction`; Liger's fused linear
  cross-entropy is refused, and `use_liger_kernel` is deprecated). That head never materialises
  the (tokens x vocab) logits: its forward scores tiles of 4,096 tokens x 32,768 vocabulary entries
  and saves the head's input rows, their labels, log Z and the entropy (fp32 per token); its
  backward recomputes each tile and accumulates fp32 gradients for the input and (when it trains)
  the head's weight. No term
  here models that kernel: the preset plans the head with `fused-linear` (Liger 0.8.5's kernel),
  the closest one, which also keeps no logits but computes the input's (and weight's) gradient in
  the forward and keeps it, instead of TRL's fp32 accumulators in the backward. Not in the preset:
  TRL's `bf16=True` default with a model loaded by id in float32 (that is `--precision amp`), and
  `enable_input_require_grads()` for PEFT with checkpointing.
- `torchtune`: torchtune 0.6.1 recipes (`llama3_1/8B_full.yaml`, `8B_lora_single_device.yaml`):
  `torch.optim.AdamW(fused=True)`, `CEWithChunkedOutputLoss` (8 chunks), activation checkpointing
  on, activation offloading off. Its QLoRA (`8B_qlora_single_device.yaml`, `compile: False`)
  quantises with torchao's NF4Tensor (`modules/peft/lora.py`: `to_nf4`, `linear_nf4`), every
  linear layer but the output projection ("quantize_base is not applied to final output_proj").
  The others quantise with bitsandbytes (transformers' `BitsAndBytesConfig`).

Compilation: no preset compiles. torchtune's `compile=True` is `layers+loss` in its LoRA recipes
(`self._loss_fn = training.compile_loss(self._loss_fn)`) and in its full recipes with a chunked loss
(`compile_loss` replaces `compute_cross_entropy` on the module itself), but `layers` in
recipes/full_finetune_single_device.py with an unchunked loss: that recipe drops `compile_loss`'s
return (commits 1814feb, v0.6.1 and bd2a0fc), which for such a loss is a new compiled module, so
the loss runs eager. The Trainer's `torch_compile` defaults to False (transformers 5.23
`TrainingArguments`), TRL's `SFTConfig` keeps it, and torchtune 0.6.1's recipe configs set
`compile: False`; a plain loop compiles only when asked. `--compile` turns it on (`compiled.py`).

Padding and packing: all four default to one sequence per row padded to the batch's longest
(TRL's `packing` and `padding_free`, torchtune's `packed` are off), so tokens per step are
batch x sequence in every preset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import PlanError
from .spec import TrainSetup

OPTIMIZER_IMPLS = {
    "fused": "one kernel per device and dtype updates in place: no temporary",
    "foreach": "multi-tensor ops: AdamW's sqrt(v) for every trainable tensor at once",
    "for-loop": "one tensor at a time: AdamW's sqrt(v) and its quotient for the largest tensor",
}
LOSSES = {
    "standard": "transformers' ForCausalLMLoss: full logits, their fp32 copy, fp32 log-softmax saved",
    "chunked": "torchtune's CEWithChunkedOutputLoss: the head in chunks, one chunk upcast at a time",
    "fused-linear": "Liger's fused linear cross-entropy: head matmul and loss in chunks, no logits kept",
}
COMPILE_MODES = {
    "none": "eager: every op runs as written, autograd saves what each op's derivative needs",
    "layers": "torch.compile on each decoder layer (torchtune's compile=True): inside a layer, "
              "pointwise intermediates are recomputed in backward, not saved",
    "layers+loss": "torchtune's compile=True in its LoRA recipes: each decoder layer as above, and the loss "
                   "compiled apart (training.compile_loss): no fp32 logits nor log-softmax kept, "
                   "its backward writes the 16-bit logits gradient directly",
    "model": "torch.compile on the whole model (the Trainer's torch_compile): layers as above, and "
             "the loss's fp32 logits and log-softmax fused away",
}
DEFAULT_LOSS_CHUNKS = 8  # torchtune CEWithChunkedOutputLoss(num_output_chunks=8)


@dataclass(frozen=True)
class Stack:
    """A training stack's preset kernels: what it uses when the setup leaves a choice open."""

    name: str
    optimizer_impl: str
    loss: str
    grad_checkpointing: bool
    activation_offload: bool
    source: str
    compile: str = "none"  # none | layers | model: what the stack compiles by default
    quant_backend: str = "bnb"  # QLoRA's 4-bit implementation (`quant.QUANT_BACKENDS`)
    # selective layer checkpointing's count (`activations.checkpointed_layers`): 0 = transformers'
    # every_n_layers (layers 0, k, 2k, ...), 1 = torchtune's and torchtitan's wrapper count (k-1, 2k-1, ...)
    checkpoint_offset: int = 0


STACKS = {
    "torch": Stack("torch", "foreach", "standard", False, False,
                   "torch 2.13 AdamW() default on CUDA (foreach); selective checkpointing counted as "
                   "torchtitan's apply_ac", checkpoint_offset=1),
    "hf-trainer": Stack("hf-trainer", "fused", "standard", False, False,
                        "transformers 5.23 Trainer: optim adamw_torch_fused"),
    "trl": Stack("trl", "fused", "fused-linear", True, False,
                 "TRL 1.16 SFTTrainer: fused AdamW, gradient checkpointing on; its chunked log-prob "
                 "LM head planned as fused-linear (no logits kept), the closest modelled kernel"),
    "torchtune": Stack("torchtune", "fused", "chunked", True, False,
                       "torchtune 0.6.1 recipes: AdamW(fused=True), CEWithChunkedOutputLoss(8), "
                       "activation checkpointing on; QLoRA with torchao NF4", quant_backend="torchao",
                       checkpoint_offset=1),
}
DEFAULT_STACK = "hf-trainer"


def get_stack(name: str) -> Stack:
    if name not in STACKS:
        raise PlanError(f"unknown stack {name!r}; choose one of {', '.join(STACKS)}")
    return STACKS[name]


def resolve(setup: TrainSetup) -> TrainSetup:
    """The setup with every stack choice left open (None) set from its stack's preset.

    Checkpointing is a plain `TrainSetup` flag: the CLI fills it from the preset when the user gives
    neither --grad-checkpointing nor --no-grad-checkpointing (`Stack.grad_checkpointing`).
    """
    stack = get_stack(setup.stack)
    impl = setup.optimizer_impl or stack.optimizer_impl
    # a preset's loss kernel replaces the LM head's loss; a classifier keeps its own
    loss = setup.loss or (stack.loss if setup.task == "causal-lm" else "standard")
    if impl not in OPTIMIZER_IMPLS:
        raise PlanError(f"unknown optimizer implementation {impl!r}; choose one of "
                        f"{', '.join(OPTIMIZER_IMPLS)}")
    if loss not in LOSSES:
        raise PlanError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    chunks = setup.loss_chunks if setup.loss_chunks is not None else DEFAULT_LOSS_CHUNKS
    if chunks < 1:
        raise PlanError(f"--loss-chunks must be at least 1, got {chunks}")
    offload = stack.activation_offload if setup.activation_offload is None else setup.activation_offload
    compiled = setup.compile or stack.compile
    if compiled not in COMPILE_MODES:
        raise PlanError(f"unknown compile mode {compiled!r}; choose one of {', '.join(COMPILE_MODES)}")
    return replace(setup, optimizer_impl=impl, loss=loss, loss_chunks=chunks, activation_offload=offload,
                   quant_backend=setup.quant_backend or stack.quant_backend, compile=compiled)
