"""Compute, time and money: training FLOPs per token, wall hours on the chosen GPUs, GPU-hours, cost.

Every formula is per token of training data and counts matrix multiplies only (2 FLOPs per
multiply-add); element-wise work (norms, activations, softmax, the optimizer step) is left out, as
in the 6N rule it extends. Time comes from FLOPs through one explicit assumption, the model FLOP
utilisation (MFU): the fraction of the GPUs' peak dense throughput that training sustains,
communication and idle time included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .architecture import LINEAR_KINDS, Architecture
from .errors import PlanError
from .gpus import PRICES_AS_OF, Gpu, get_gpu
from .spec import ModelSpec

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_MFU = 0.4
# NF4 dequantisation: look up the 4-bit code (1), scale by the block constant (1), and with double
# quantisation first rebuild that constant from its 8-bit code (2). An assumption, not a measurement.
DEQUANT_FLOPS_PER_WEIGHT = 4


@dataclass(frozen=True)
class Quantity:
    """A number that is not bytes (FLOPs, hours, dollars) and the formula with its numbers put in."""

    name: str
    value: float
    formula: str


@dataclass(frozen=True)
class Workload:
    """How much training, and the assumptions that turn FLOPs into hours and dollars.

    `tokens` is the number of tokens trained on (dataset tokens x epochs); None plans no time.
    `price_per_hour` overrides the GPU catalog's price (USD per GPU-hour), `peak_tflops` its dense
    16-bit throughput (`--tflops`; the only one a GPU given by its memory alone has).
    """

    tokens: int | None = None
    mfu: float = DEFAULT_MFU
    price_per_hour: float | None = None
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        if self.tokens is not None and self.tokens <= 0:
            raise PlanError(f"tokens must be positive, got {self.tokens}")
        if not 0 < self.mfu <= 1:
            raise PlanError(f"--mfu must be in (0, 1], got {self.mfu}")
        if self.price_per_hour is not None and self.price_per_hour < 0:
            raise PlanError(f"--price must not be negative, got {self.price_per_hour}")
        if self.peak_tflops is not None and not (0 < self.peak_tflops < math.inf):
            raise PlanError(f"--tflops must be a positive number, got {self.peak_tflops}")


@dataclass(frozen=True)
class Compute:
    """One method's training compute and what it costs on `num_gpus` GPUs."""

    flops_per_token: Quantity
    flops: int
    num_gpus: int
    wall_hours: float | None  # None when the GPU's peak throughput is unknown
    gpu_hours: float | None
    cost_usd: float | None  # None when no price is known


def training_tokens(tokens: int | None, dataset_tokens: int | None, epochs: float | None) -> int | None:
    """Tokens trained on: `tokens`, or dataset tokens x epochs. At most one way may be given."""
    if tokens is not None and (dataset_tokens is not None or epochs is not None):
        raise PlanError("give --tokens, or --dataset-tokens with --epochs, not both")
    if epochs is not None and dataset_tokens is None:
        raise PlanError("--epochs needs --dataset-tokens")
    if dataset_tokens is None:
        return tokens
    if epochs is not None and epochs <= 0:
        raise PlanError(f"--epochs must be positive, got {epochs}")
    return round(dataset_tokens * (1 if epochs is None else epochs))


def matmul_params(spec: ModelSpec, arch: Architecture) -> int:
    """Weights that take part in a matrix multiply for each token (the N of 6N).

    Linear weights (GPT-2's Conv1D included), the router, and the output head (a tied head
    multiplies by the embedding matrix, so it counts though it owns no parameter). Embedding
    lookups and norms do no matmul; biases are additions. A mixture of experts runs
    `expert_rows_per_token` of its `num_experts` experts per token (its top k; all of them where
    every expert takes every token, as transformers runs Llama 4), so expert weights count in that
    proportion.
    """
    n = 0
    for m in arch.modules:
        if m.kind in LINEAR_KINDS or m.kind == "router":
            n += m.in_features * m.out_features if not m.params else sum(
                p.numel for p in m.params if not p.name.endswith(".bias"))
        elif m.kind == "experts":
            n += m.numel * spec.expert_rows_per_token // spec.num_experts
    return n


def head_matmul_params(arch: Architecture) -> int:
    """Weights of the output head (tied or not): the one matmul that gradient checkpointing does not
    recompute, since it sits outside the checkpointed decoder layers."""
    head = next(m for m in arch.modules if m.path == arch.head_path)
    return head.in_features * head.out_features


def attention_forward_flops(spec: ModelSpec, seq_len: int) -> Quantity:
    """Forward FLOPs per token of the attention scores and the weighted sum (no weights involved):
    QK^T and AV each cost 2 x seq x (heads x head_dim) per token per layer, so
    4 x layers x seq x heads x head_dim.

    Assumption: the whole seq x seq score matrix is counted, as PaLM's MFU accounting counts it;
    causal masking lets fused kernels skip about half, and that saving is left to the MFU.
    """
    d = spec.num_heads * spec.head_dim
    value = 4 * spec.num_layers * seq_len * d
    return Quantity("attention_forward", value,
                    f"4 x {spec.num_layers} layers x {seq_len} seq x {d} (heads x head_dim) = {value:,}")


def recompute_flops(n: int, head: int, adapter_params: int, attention: Quantity,
                    share: tuple[int, int] = (1, 1)) -> int:
    """Gradient checkpointing runs each checkpointed decoder layer's forward again in backward:
    every matmul but the output head's (H params), the adapters', and attention:
    (2(N - H) + 2A + attention) x c / L for c of the L layers checkpointed (`share`; selective
    checkpointing, `activations.checkpointed_layers`). Assumption: the layers cost the same (a
    model whose first layers are dense and the rest experts is counted at its average)."""
    checkpointed, layers = share
    return (2 * (n - head) + 2 * adapter_params + int(attention.value)) * checkpointed // layers


def full_flops_per_token(n: int, head: int, attention: Quantity, grad_checkpointing: bool,
                         share: tuple[int, int] = (1, 1)) -> Quantity:
    """Full fine-tuning: forward 2N + attention; backward twice the forward (gradients for inputs
    and for weights): 6N + 3 x attention, the 6N rule plus PaLM's 12 x layers x seq x d attention
    term. Gradient checkpointing adds `recompute_flops`."""
    a = int(attention.value)
    value = 3 * (2 * n + a)
    formula = f"3 x (2 x {n:,} matmul params + {a:,} attention)"
    if grad_checkpointing:
        extra = recompute_flops(n, head, 0, attention, share)
        value += extra
        formula += f" + {extra:,} recomputed forward (head excluded{_share_text(share)})"
    return Quantity("flops_per_token", value, f"{formula} = {value:,}")


def lora_flops_per_token(n: int, head: int, adapter_params: int, saved_params: int,
                         attention: Quantity, grad_checkpointing: bool, no_input_grad_params: int = 0,
                         attention_without_grad: int = 0, layers: int = 1,
                         share: tuple[int, int] = (1, 1)) -> Quantity:
    """LoRA: the frozen base runs forward (2N) and passes input gradients back (2N), but computes no
    weight gradients; the adapters (A params in total) cost 2A forward and 4A backward; modules
    trained in full beside them (S params, e.g. a classifier head) add their weight gradients, 2S;
    attention costs its forward and twice that backward:
    4N + 6A + 2S + 3 x attention. Checkpointing adds `recompute_flops`.

    Input gradients flow down to the embedding output only when it requires grad (what PEFT sets up
    for gradient checkpointing). Otherwise they stop below the first adapted layer: the F weights
    whose input needs no gradient (`no_input_grad_params`, from the activation walk) skip their
    input-gradient product, -2F, and an attention layer with no gradient to its q, k and v (L' of
    `layers`) skips its backward, -2 x attention x L' / layers.
    """
    a = int(attention.value)
    value = 4 * n + 6 * adapter_params + 2 * saved_params + 3 * a
    formula = (f"4 x {n:,} base + 6 x {adapter_params:,} adapter + 2 x {saved_params:,} fully trained"
               f" + 3 x {a:,} attention")
    if no_input_grad_params or attention_without_grad:
        skipped = 2 * no_input_grad_params + 2 * a * attention_without_grad // layers
        value -= skipped
        formula += f" - {skipped:,} input gradients not needed below the first adapter"
    if grad_checkpointing:
        extra = recompute_flops(n, head, adapter_params, attention, share)
        value += extra
        formula += f" + {extra:,} recomputed forward (head excluded{_share_text(share)})"
    return Quantity("flops_per_token", value, f"{formula} = {value:,}")


def _share_text(share: tuple[int, int]) -> str:
    return "" if share[0] == share[1] else f"; {share[0]} of {share[1]} layers checkpointed"


def dequant_flops_per_token(nf4_weights: int, tokens_per_micro_batch: int,
                            grad_checkpointing: bool, share: tuple[int, int] = (1, 1)) -> Quantity:
    """QLoRA's extra work: every NF4 weight is dequantised to 16 bits once per pass over a
    micro-batch (forward, backward, and the recomputed forward under checkpointing), at
    DEQUANT_FLOPS_PER_WEIGHT operations each, shared by the micro-batch's tokens.

    Assumption: dequantisation is counted as FLOPs only. In practice it is memory-bound and slows
    QLoRA more than these FLOPs say; lower `--mfu` for QLoRA to model that.
    """
    checkpointed, layers = share if grad_checkpointing else (0, 1)
    value = (DEQUANT_FLOPS_PER_WEIGHT * nf4_weights * (2 * layers + checkpointed)
             // (layers * tokens_per_micro_batch))
    passes = "3" if checkpointed == layers else f"(2 + {checkpointed}/{layers})" if checkpointed else "2"
    return Quantity("dequant", value,
                    f"{DEQUANT_FLOPS_PER_WEIGHT} x {nf4_weights:,} NF4 weights x {passes} passes / "
                    f"{tokens_per_micro_batch:,} tokens per micro-batch = {value:,}")


def training_time(flops_per_token: Quantity, tokens: int, gpu: Gpu, num_gpus: int,
                  workload: Workload) -> Compute:
    """Hours and dollars for `tokens` tokens on `num_gpus` GPUs:
    wall hours = FLOPs / (GPUs x peak FLOP/s x MFU) / 3600; GPU-hours = wall hours x GPUs;
    cost = GPU-hours x price per GPU-hour.

    Assumption: data parallelism scales perfectly; communication is inside the MFU.
    """
    flops = int(flops_per_token.value) * tokens
    wall = gpu_hours = cost = None
    if gpu.peak_tflops:
        wall = flops / (num_gpus * gpu.peak_tflops * 1e12 * workload.mfu) / 3600
        gpu_hours = wall * num_gpus
        price = workload.price_per_hour if workload.price_per_hour is not None else gpu.price_per_hour
        cost = None if price is None else gpu_hours * price
    return Compute(flops_per_token, flops, num_gpus, wall, gpu_hours, cost)


def load_prices(path: str | Path) -> dict[str, float]:
    """A price file: GPU name or alias -> USD per GPU-hour, as JSON (`{"h100": 2.1}`) or TOML
    (`h100 = 2.1`). Names are checked against the catalog so a typo is an error, not a silent miss.
    """
    from pathlib import Path

    from .validate import parse_json, printable, read_small_file

    path = Path(path)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        found = False
    if not found:
        raise PlanError(f"no price file at {printable(str(path))}")
    data = read_small_file(path, "price")
    if path.suffix.lower() != ".toml":
        data = parse_json(data, f"{printable(str(path))}: cannot read prices;")
    else:
        try:
            import tomllib

            data = tomllib.loads(data.decode("utf-8"))
        except ImportError:
            raise PlanError("TOML price files need Python 3.11 or later; write the file as JSON") from None
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            raise PlanError(f"{printable(str(path))}: cannot read prices ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a price file maps GPU names to USD per hour")
    prices = {}
    for name, price in data.items():
        if isinstance(price, bool) or not isinstance(price, int | float) or not math.isfinite(price) \
                or price < 0:
            raise PlanError(f"{path}: price for {name!r} must be a non-negative number, got {price!r}")
        prices[get_gpu(name).name] = float(price)
    return prices


def dense_flops_per_token(n: int, grad_checkpointing: bool) -> Quantity:
    """A model known only by its parameter count: 6N (8N with checkpointing), every parameter
    counted as a matmul weight and no attention term (the layer shapes are unknown)."""
    passes = 4 if grad_checkpointing else 3
    value = 2 * passes * n
    return Quantity("flops_per_token", value, f"{2 * passes} x {n:,} params (no attention term) = {value:,}")


def plus(a: Quantity, b: Quantity) -> Quantity:
    """The sum of two per-token FLOP counts, both formulas kept."""
    value = a.value + b.value
    return Quantity(a.name, value, f"{a.formula}; + {b.name}: {b.formula}; total {value:,}")


def _unused_without_tokens(workload: Workload) -> list[str]:
    """Time and cost are planned per token: --price, --mfu or --tflops given without a token count
    would otherwise change nothing, silently."""
    given = [flag for flag, set_ in (("--price", workload.price_per_hour is not None),
                                     ("--mfu", workload.mfu != DEFAULT_MFU),
                                     ("--tflops", workload.peak_tflops is not None)) if set_]
    if not given:
        return []
    return [f"{', '.join(given)} given but time and cost need --tokens N (or --dataset-tokens N); "
            "without it they are not planned"]


def notes(workload: Workload | None, gpu: Gpu, dense: bool) -> list[str]:
    """The assumptions behind the time and cost rows, printed beside them; for a GPU of unknown
    throughput (one given by --gpu-mem), that time and cost are not planned without --tflops."""
    unknown = [] if gpu.peak_tflops else [
        f"{gpu.name}: no known throughput or price, so memory only; give --tflops (and --price) "
        "to plan time and cost"]
    if workload is None:
        return unknown
    if workload.tokens is None:
        return unknown + _unused_without_tokens(workload)
    price = workload.price_per_hour if workload.price_per_hour is not None else gpu.price_per_hour
    peak = f"{gpu.peak_tflops:g} TFLOP/s dense 16-bit peak" if gpu.peak_tflops else "unknown peak"
    source = ("given" if workload.price_per_hour is not None
              else f"catalog default as of {PRICES_AS_OF}, an assumption")
    lines = [
        f"time: {workload.tokens:,} tokens; wall hours = FLOPs / (GPUs x {peak} x MFU {workload.mfu:g}) "
        "/ 3600, perfect data-parallel scaling; FLOPs count matmuls only",
        "cost: GPU-hours x " + (f"${price:g} per GPU-hour ({source})" if price is not None
                                 else "unknown price (give --price)"),
        "GPUs for time: --num-gpus, else gpus_needed (the fewest that fit, over the strategies)",
    ]
    if dense:
        lines.append("--params: FLOPs are 6N with no attention term (layer shapes unknown)")
    return unknown + lines
