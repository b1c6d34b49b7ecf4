"""QLoRA's 4-bit base: NF4 storage as bitsandbytes and torchao lay it out, and what each one's
4-bit matmul keeps for backward and holds while it dequantises a weight, release by release.

Read from the source: bitsandbytes `bitsandbytes/autograd/_functions.py` (`MatMul4Bit`),
`nn/modules.py` (`Linear4bit`, `Params4bit`) and `backends/*/ops.py` (`gemm_4bit`) at the tags
named in each docstring, 0.39.1 to 0.50.1; torchao 0.18.0
`torchao/quantization/quantize_/workflows/nf4/nf4_tensor.py` (`NF4Tensor`, `LinearNF4`), which
torchtune 0.6.1's QLoRA uses (`torchtune/modules/peft/lora.py`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .architecture import LINEAR_KINDS, Architecture
from .errors import PlanError

if TYPE_CHECKING:
    from .counts import Trainable
    from .spec import ModelSpec, TrainSetup

NF4_BLOCK = 64  # values per quantisation block
DOUBLE_QUANT_BLOCK = 256  # first-level absmax values per second-level block


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one weight quantised to NF4.

    Packed values: ceil(numel / 2) bytes (two 4-bit codes per byte). Without double quantisation,
    one fp32 absmax per 64-value block: 4 x ceil(numel / 64). With it (the QLoRA paper's default),
    the absmax values are themselves quantised to 1 byte each, plus one fp32 absmax per 256 of them
    and one fp32 offset: ceil(numel / 64) + 4 x ceil(blocks / 256) + 4.
    That is 0.5625 B per weight without and about 0.5159 B with double quantisation. The 16-entry
    code tables bitsandbytes keeps per layer (under 100 bytes) are left out.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) + 4


def nf4_state_bytes(numel: int, double_quant: bool) -> int:
    """The quantisation state of one NF4 weight: `nf4_bytes` less its packed codes (ceil(numel / 2)).

    bitsandbytes keeps it in the layer's `quant_state`, a plain attribute rather than a parameter:
    FSDP and ZeRO-3 shard and gather only the packed codes (stored as a 16-bit tensor under
    `bnb_4bit_quant_storage`), so every GPU holds the whole state of every layer.
    """
    return nf4_bytes(numel, double_quant) - math.ceil(numel / 2)


def quantised_params(arch: Architecture, trainable: Trainable, experts: bool = False) -> set[str]:
    """Names of the weights QLoRA stores as NF4.

    bitsandbytes (`replace_with_bnb_linear`) swaps every `nn.Linear` but the output head (and any
    module trained in full) for a 4-bit layer; biases stay 16-bit. Fused 3-D expert weights
    (Mixtral under transformers 5) are parameters of a non-Linear module, so they stay 16-bit
    (bitsandbytes issue #1849); `experts=True` plans a stack that quantises them too.
    """
    saved_paths = {m.path for m in trainable.saved_modules}
    return {
        p.name for m in arch.modules
        if (m.kind in LINEAR_KINDS or (experts and m.kind == "experts"))
        and m.path != arch.head_path and m.path not in saved_paths
        for p in m.params if not p.name.endswith((".bias", "_bias"))  # GPT-OSS's expert biases too
    }


# Families whose fused experts transformers' bitsandbytes loading swaps for one nn.Linear per expert
# and projection (`MODULES_TO_PATCH_FOR_QUANTIZATION`: Llama 4's `SequentialLlama4TextExperts`,
# gate_proj, up_proj and down_proj per expert), which bitsandbytes then quantises like any linear layer
SPLIT_EXPERTS_FOR_BNB = ("llama4",)


def quantises_experts(spec: ModelSpec, setup: TrainSetup) -> bool:
    """Whether QLoRA stores the experts in NF4: `--quantize-experts`, or a bitsandbytes base of a
    family whose experts transformers splits into linear layers for it (`SPLIT_EXPERTS_FOR_BNB`)."""
    split = spec.family in SPLIT_EXPERTS_FOR_BNB and setup.quant_backend != "torchao"
    return setup.quantize_experts or split


def quantised_numels(spec: ModelSpec, arch: Architecture, names: set[str]) -> list[int]:
    """The values of each 4-bit weight one matmul dequantises: a quantised parameter's, but one
    expert's projection where the experts are split (`SPLIT_EXPERTS_FOR_BNB`): gate_up_proj is then
    2 x E linear layers, down_proj E."""
    split = spec.family in SPLIT_EXPERTS_FOR_BNB
    numels = []
    for p in arch.params:
        if p.name not in names:
            continue
        if split and len(p.shape) == 3:
            pieces = p.shape[0] * (2 if p.name.endswith("gate_up_proj") else 1)
            numels += [p.numel // pieces] * pieces
        else:
            numels.append(p.numel)
    return numels


def check_split_expert_targets(spec: ModelSpec, setup: TrainSetup, trainable: Trainable) -> None:
    """QLoRA of a family whose experts are split into linear layers named gate_proj, up_proj and
    down_proj: PEFT's targets of those names would wrap every expert too, which is not planned."""
    if setup.method != "qlora" or setup.quantize_experts or not quantises_experts(spec, setup):
        return
    if any(m.path.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") for m in
           (a.module for a in trainable.adapters)):
        raise PlanError(f"QLoRA of {spec.family}: transformers splits the experts into linear layers named "
                        "gate_proj, up_proj and down_proj for bitsandbytes, so these targets would wrap "
                        "every expert too; that is not planned (target the attention, or plan --method lora)")


# --- which 4-bit implementation, and what its matmul keeps and makes -------------------------------

QUANT_BACKENDS = {
    "bnb": "bitsandbytes Linear4bit (transformers' BitsAndBytesConfig, PEFT): MatMul4Bit",
    "torchao": "torchao NF4Tensor (torchtune's QLoRA recipes): linear_nf4, eager",
}
# the bitsandbytes release whose source the default plan reads; older releases are selectable
BNB_MODELLED = "0.50.1"
# the first release with 4-bit layers (`Linear4bit`, `MatMul4Bit`)
BNB_FIRST_4BIT = (0, 39, 0)
# the first release whose MatMul4Bit keeps no input for backward (see `bnb_saves_input`)
BNB_DROPS_SAVED_INPUT = (0, 43, 2)
COMPUTE_DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}


def parse_bnb_version(text: str) -> tuple[int, int, int]:
    """A bitsandbytes version as (major, minor, patch): `0.43`, `0.43.1`, `0.45.0.post1`, `v0.44.1`.

    Missing parts read as 0; a suffix after the third part (`.post1`, `rc1`, `.dev0`) is dropped.
    Raises PlanError for text that is not a version or one older than 4-bit layers (0.39.0).
    """
    import re

    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[.+-]?[A-Za-z][\w.]*)?", text.strip())
    if not match:
        raise PlanError(f"--bnb-version must be a version such as 0.43.1 or 0.45, got {text!r}")
    version = (int(match[1]), int(match[2]), int(match[3] or 0))
    if version < BNB_FIRST_4BIT:
        raise PlanError(f"bitsandbytes {text} has no 4-bit layers (Linear4bit came in 0.39.0): QLoRA "
                        "needs 0.39.0 or newer")
    return version


# the first release whose Linear4bit casts its bias to the compute dtype (see `bnb_bias_bytes`)
BNB_BIAS_IN_COMPUTE_DTYPE = (0, 50, 0)


def bnb_bias_bytes(version: tuple[int, int, int], compute_bytes: int, weight_bytes: int) -> int:
    """Bytes per value of a frozen bias of a bitsandbytes `Linear4bit` from its first forward on.

    `Linear4bit.forward` (bitsandbytes/nn/modules.py) casts its bias in place, `bias.data =
    bias.data.to(x.dtype)`. From 0.50.0 (commit 5453368b, "New 4bit GEMM kernels") the cast comes
    after `x = x.to(self.compute_dtype)`: the bias is then held in bnb_4bit_compute_dtype, fp32
    model or not. Tags 0.41.0 to 0.49.2 cast it first, to the layer's input dtype: planned as the
    weights' dtype, which it is without autocast (under autocast a layer fed a 16-bit activation
    holds a 16-bit bias; not modelled, the plan then counts the wider bias).
    """
    return compute_bytes if version >= BNB_BIAS_IN_COMPUTE_DTYPE else weight_bytes


def bnb_saves_input(version: tuple[int, int, int]) -> bool:
    """Whether bitsandbytes' `MatMul4Bit.forward` keeps its input A (the layer's input cast to the
    compute dtype) for backward.

    bitsandbytes `bitsandbytes/autograd/_functions.py`, tags 0.39.1 to 0.43.1: `if
    any(ctx.needs_input_grad[:2]): ctx.tensors = (A, B)`; backward never reads A (the 4-bit weight
    takes no gradient, and the input's gradient needs only the weight). Commit 9e753741 ("fix
    QLoRA mem bug: delete useless buffered activation", #1270, July 2024), first in tag 0.43.2,
    keeps `ctx.tensors = (None, B)`; 0.44.0 to 0.50.1 read the same. B, the packed weight, is the
    frozen parameter itself: no new bytes. So before 0.43.2 every 4-bit layer whose input needs a
    gradient keeps that input alive to backward, as a trained layer would. (`matmul_4bit`'s other
    path, `gemv_4bit`, runs only for one row that needs no gradient: inference, never a training
    step.)
    """
    return version < BNB_DROPS_SAVED_INPUT


def nf4_saved_input_bytes(backend: str, version: tuple[int, int, int], compute_dtype: str) -> int:
    """Bytes per element of the input a 4-bit linear keeps for backward: 0 when it keeps none.

    bitsandbytes before 0.43.2 (`bnb_saves_input`): `Linear4bit.forward` first casts the input to
    `compute_dtype` (`x = x.to(self.compute_dtype)`, a copy when the dtypes differ) and that is what
    MatMul4Bit keeps: the compute dtype's bytes. torchao 0.18.0
    (`torchao/quantization/quantize_/workflows/nf4/nf4_tensor.py`, `LinearNF4.forward`):
    `ctx.save_for_backward(weight)` only, the NF4 weight: 0.
    """
    if backend == "bnb" and bnb_saves_input(version):
        return COMPUTE_DTYPES[compute_dtype]
    return 0


def bnb_dequant_bytes(numel: int, compute_bytes: int, load_bytes: int) -> int:
    """bitsandbytes: the most one 4-bit matmul holds to dequantise its weight.

    Backward, every release 0.39.1 to 0.50.1: `F.dequantize_4bit(B, ctx.state).to(grad_output.dtype)`
    makes the weight in `quant_state.dtype`, the dtype it had when quantised (the dtype the model was
    loaded in), then copies it to the compute dtype when the two differ. Forward holds no more:
    before 0.50 the same `dequantize_4bit(...).to(A.dtype)`; 0.50.1's `gemm_4bit` dequantises
    straight into the compute dtype, or on some GPUs runs a fused kernel for up to 1,536 rows.
    numel x compute bytes, + numel x load bytes when they differ.
    """
    return numel * compute_bytes + (numel * load_bytes if load_bytes != compute_bytes else 0)


def down_backward_bytes(dequant: int, weight: int, input_gradient: int) -> int:
    """The most an MLP's 4-bit down projection holds in its backward beyond the incoming gradient.

    bitsandbytes' `MatMul4Bit.backward` computes `torch.matmul(grad_output, dequantize_4bit(B, state)
    .to(grad_output.dtype))`: the dequantisation holds `dequant` (`dequant_transient`), then only the
    weight in compute dtype (`weight` bytes) is left, beside the input gradient (tokens x the MLP's
    width) the product makes; torchao's `get_original_weight` likewise frees its locals before the
    matmul. This comes before the MLP's activation backward, so it is a moment of its own, not added
    on top of that one. max(dequant, weight + input gradient).
    """
    return max(dequant, weight + input_gradient)


def torchao_dequant_bytes(numel: int, dtype_bytes: int) -> int:
    """torchao 0.18.0 NF4Tensor, eager: the most `get_original_weight` holds while it dequantises a
    weight (`LinearNF4` calls it in forward, `weight.to(input.dtype)`, and again in backward).

    Its locals live until it returns: the high and low 4-bit codes as int64 (`(quantized_data >> 4)
    .to(torch.long)` and `& 0b1111`: numel/2 x 8 B each), the two looked-up halves, the two scaled
    halves (numel/2 x the weight's dtype each) and the per-block scalers (numel/64 x dtype); then
    `torch.stack` makes the whole weight: 8 x numel + 3 x numel x dtype + numel/64 x dtype.
    Under torch.compile the dequantisation fuses and this no longer holds (not modelled).
    """
    return 8 * numel + 3 * numel * dtype_bytes + math.ceil(numel / NF4_BLOCK) * dtype_bytes


TORCHAO_SCALER_BLOCK = 256  # `to_nf4(tensor, block_size=64, scaler_block_size=256)`


def torchao_nf4_bytes(numel: int, dtype_bytes: int) -> int:
    """Bytes of one weight as torchao 0.18.0's NF4Tensor (`to_nf4`, block 64, scaler block 256):
    always double-quantised. Packed codes numel/2 (uint8); one int8 scaler per 64 values; one
    quantisation factor per 256 scalers and the scalers' mean, in the weight's dtype (they come
    from the weight's own absmax); the 16-entry NF4 table, kept in every tensor in that dtype.
    torchao asserts numel divisible by 64 x 256, which real layers are.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    return (math.ceil(numel / 2) + blocks + math.ceil(blocks / TORCHAO_SCALER_BLOCK) * dtype_bytes
            + dtype_bytes + 16 * dtype_bytes)


def check_quant(backend: str, bnb_version: str, compute_dtype: str, load_bytes: int) -> tuple[int, int, int]:
    """A QLoRA setup's 4-bit choices checked: (major, minor, patch) of the bitsandbytes release,
    the compute dtype's bytes, and the bytes per element of the input each 4-bit layer keeps
    (`nf4_saved_input_bytes`). torchao's `linear_nf4` computes in its input's dtype, the model's
    (`load_bytes`): it has no compute dtype of its own to choose."""
    backend = backend or "bnb"  # a setup not yet resolved against its stack (`stacks.resolve`)
    if backend not in QUANT_BACKENDS:
        raise PlanError(f"--quant-backend must be one of {', '.join(QUANT_BACKENDS)}, got {backend!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise PlanError(f"--bnb-compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                        f"got {compute_dtype!r}")
    version = parse_bnb_version(bnb_version)
    compute = COMPUTE_DTYPES[compute_dtype] if backend == "bnb" else load_bytes
    return version, compute, nf4_saved_input_bytes(backend, version, compute_dtype)


def dequant_transient(backend: str, numels: list[int], compute_bytes: int, load_bytes: int) -> int:
    """The most one 4-bit matmul's dequantisation holds, over the quantised weights: the largest
    weight's `bnb_dequant_bytes` or `torchao_dequant_bytes` (0 without quantised weights)."""
    if not numels:
        return 0
    if backend == "torchao":
        return torchao_dequant_bytes(max(numels), load_bytes)
    return bnb_dequant_bytes(max(numels), compute_bytes, load_bytes)


def nf4_gathered_bytes(backend: str, numel: int, dtype_bytes: int) -> int:
    """What FSDP shards and gathers of one 4-bit weight. bitsandbytes: the packed codes only,
    ceil(numel / 2) (the quantisation state is a module attribute, `nf4_state_bytes`). torchao
    0.18.0: the inner tensors `_INNER_TENSOR_NAMES_FOR_SHARDING` names (codes, int8 scalers, their
    quantisation factors), all of `torchao_nf4_bytes` but the scalers' mean and the 16-entry table."""
    if backend == "torchao":
        return torchao_nf4_bytes(numel, dtype_bytes) - torchao_replicated_bytes(dtype_bytes)
    return math.ceil(numel / 2)


def torchao_replicated_bytes(dtype_bytes: int) -> int:
    """The part of one torchao NF4Tensor that FSDP does not shard: the scalers' mean (0-d) and the
    16-entry NF4 table, in the weight's dtype: 17 x dtype bytes."""
    return 17 * dtype_bytes


def describe_quant(backend: str, bnb_version: str, compute_dtype: str) -> str:
    """One line saying what a QLoRA plan models of its 4-bit layers: the implementation, the
    release, what the matmul keeps for backward and what it dequantises into."""
    if backend == "torchao":
        return ("QLoRA base: torchao NF4Tensor (torchtune), eager linear_nf4: keeps only the NF4 weight; "
                "dequantises via int64 codes")
    version = parse_bnb_version(bnb_version)
    read = f" as {BNB_MODELLED}" if version > parse_bnb_version(BNB_MODELLED) else ""
    keeps = f"keeps its {compute_dtype} input" if bnb_saves_input(version) else "keeps no input"
    return f"QLoRA base: bitsandbytes {bnb_version}{read}, compute {compute_dtype}: the 4-bit matmul {keeps}"


def quant_notes(backend: str, bnb_version: str, compute_dtype: str = "bf16",
                load_bytes: int = 2) -> list[str]:
    """What a reader of a QLoRA plan must know about the 4-bit implementation planned. PEFT 0.21
    makes the adapters on a 4-bit layer in that layer's compute dtype
    (`tuners_utils._get_base_layer_device_and_dtype`), so fp32 compute over a 16-bit model gives fp32
    adapters, which the plan does not model (it keeps them at the precision's width)."""
    notes = []
    if backend != "torchao" and COMPUTE_DTYPES.get(compute_dtype, 2) > load_bytes:
        notes.append(f"--bnb-compute-dtype {compute_dtype} over a 16-bit model: PEFT makes the adapters "
                     f"on 4-bit layers {compute_dtype} too; the plan keeps them at the precision's width")
    return notes + _release_notes(backend, bnb_version)


def _release_notes(backend: str, bnb_version: str) -> list[str]:
    if backend == "torchao":
        return ["--quant-backend torchao: dequantisation planned in eager mode (torchao's "
                "get_original_weight, int64 codes); under torch.compile it fuses and the transient "
                "is smaller"]
    version = parse_bnb_version(bnb_version)
    if bnb_saves_input(version):
        return [f"bitsandbytes {bnb_version}: every 4-bit layer whose input needs a gradient keeps that "
                "input until backward (MatMul4Bit's ctx.tensors; dropped in 0.43.2, bitsandbytes#1270): "
                "more activations than with 0.43.2 or newer"]
    if version > parse_bnb_version(BNB_MODELLED):
        return [f"bitsandbytes {bnb_version} is newer than the newest source read ({BNB_MODELLED}): "
                f"planned as {BNB_MODELLED}"]
    return []
