"""The `plan` command's options for GPUs, sharding, tokens, time and cost.

Kept apart from `cli.py` so the plan command takes them as one decorator and one call: parsing
here, formulas in `cost` and `sharding`.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from ..cost import DEFAULT_MFU, Workload, load_prices, training_tokens
from ..errors import PlanError
from ..gpus import PRICES_AS_OF, Gpu
from ..sharding import OFFLOADS, STRATEGIES, STRATEGY_ALIASES, strategy_name
from ..units import parse_count
from .option_types import MAX_GPUS, MAX_PARAMETERS, FiniteFloat

OPTIONS = ("num_gpus", "sharding", "offload", "reshard_after_forward", "zero3_max_live_parameters",
           "zero3_prefetch_bucket_size", "reduce_bucket_size", "zero3_param_persistence_threshold",
           "tokens", "dataset_tokens", "epochs", "mfu", "price",
           "price_file")
# Passes over a dataset and USD per GPU-hour: far above any real value, and finite.
MAX_EPOCHS = 10**6
MAX_PRICE = 10**6
MAX_TFLOPS = 10**6  # a GPU's peak: today's are ~1,000-2,000


def scale_options(f: Callable) -> Callable:
    """Add the options to a click command (applied bottom-up, so listed here in reverse)."""
    options = [
        click.option("--num-gpus", type=click.IntRange(1, MAX_GPUS), metavar="N",
                     help="Data-parallel GPUs. Memory becomes per GPU, and time is on N GPUs."),
        click.option("--sharding", type=click.Choice([*STRATEGIES, *STRATEGY_ALIASES], case_sensitive=False),
                     default="none", show_default=True,
                     help="Across --num-gpus (without it: each method on the fewest GPUs that fit): "
                          "ddp (= none) replicates; DeepSpeed zero1 shards optimizer "
                          "states and fp32 master weights, zero2 also gradients, zero3 also weights "
                          "(the frozen LoRA base too); fsdp is PyTorch FSDP2's full shard, with its "
                          "own buffers; fsdp1 is FSDP1 (FullyShardedDataParallel, accelerate's "
                          "default): one flat parameter per decoder layer and the root, padded to "
                          "the GPU count, use_orig_params=False."),
        click.option("--offload", type=click.Choice(OFFLOADS), default="none", show_default=True,
                     help="To CPU memory: optimizer (ZeRO-Offload: master weights, optimizer states, "
                          "gradient shards) or optimizer+params (zero3; fsdp's CPUOffloadPolicy, fsdp1's "
                          "CPUOffload(offload_params=True))."),
        click.option("--reshard-after-forward/--no-reshard-after-forward", default=True, show_default=True,
                     help="fsdp, fsdp1: free each layer's gathered weights after its forward (on), or "
                          "keep them to backward (off: more memory, one all-gather fewer; fsdp1's "
                          "SHARD_GRAD_OP)."),
        click.option("--zero3-max-live-parameters", type=click.IntRange(0, MAX_PARAMETERS), metavar="N",
                     help="zero3: DeepSpeed's stage3_max_live_parameters (default 1e9)."),
        click.option("--zero3-prefetch-bucket-size", type=click.IntRange(0, MAX_PARAMETERS), metavar="N",
                     help="zero3: stage3_prefetch_bucket_size in parameters (default: HF auto, 0.9 h^2)."),
        click.option("--reduce-bucket-size", type=click.IntRange(0, MAX_PARAMETERS), metavar="N",
                     help="zero3: reduce_bucket_size in elements (default: HF auto, h^2)."),
        click.option("--zero3-param-persistence-threshold", type=click.IntRange(0, MAX_PARAMETERS),
                     metavar="N",
                     help="zero3: stage3_param_persistence_threshold (default: HF auto, 10 h)."),
        click.option("--tokens", "tokens", metavar="N",
                     help="Tokens to train on (1e9, 1B): adds FLOPs, wall hours, GPU-hours and cost."),
        click.option("--dataset-tokens", metavar="N", help="Tokens in the dataset; with --epochs."),
        click.option("--epochs", type=FiniteFloat(0, MAX_EPOCHS, lo_open=True),
                     help="Passes over --dataset-tokens (default 1)."),
        click.option("--mfu", type=float, default=DEFAULT_MFU, show_default=True,
                     help="Model FLOP utilisation: the share of the GPUs' peak dense 16-bit FLOP/s "
                          "that training sustains (an assumption; lower it for QLoRA)."),
        click.option("--price", type=FiniteFloat(None, MAX_PRICE), metavar="USD",  # negative: cost says
                     help=f"USD per GPU-hour (default: the catalog's as of {PRICES_AS_OF}, an assumption)."),
        click.option("--tflops", type=FiniteFloat(0, MAX_TFLOPS, lo_open=True), metavar="TFLOPS",
                     help="The GPU's peak dense 16-bit TFLOP/s, for time: overrides the catalog's; a "
                          "--gpu-mem GPU has none, so time and cost need it (and --price)."),
        click.option("--price-file", type=click.Path(dir_okay=False), metavar="PATH",
                     help='GPU name -> USD per GPU-hour, JSON ({"h100": 2.1}) or TOML (h100 = 2.1).'),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _tokens(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_count(text, what=option)
    except PlanError as exc:
        if "cannot read" not in str(exc):
            raise  # read, but out of range: say so
        raise PlanError(f"cannot read {option} {text!r}: write e.g. 1e9 or 1B") from None


def setup_changes(num_gpus: int | None, sharding: str, offload: str, reshard_after_forward: bool = True,
                  zero3_max_live_parameters: int | None = None, zero3_prefetch_bucket_size: int | None = None,
                  reduce_bucket_size: int | None = None, zero3_param_persistence_threshold: int | None = None,
                  **_) -> dict:
    """The `TrainSetup` fields these options set."""
    if num_gpus is not None and num_gpus < 1:
        raise PlanError(f"--num-gpus must be at least 1, got {num_gpus}")
    return {"num_gpus": num_gpus, "sharding": strategy_name(sharding), "offload": offload,
            "reshard_after_forward": reshard_after_forward,
            "zero3_max_live_parameters": zero3_max_live_parameters,
            "zero3_prefetch_bucket_size": zero3_prefetch_bucket_size,
            "reduce_bucket_size": reduce_bucket_size,
            "zero3_param_persistence_threshold": zero3_param_persistence_threshold}


def workload(gpu: Gpu, tokens: str | None, dataset_tokens: str | None, epochs: float | None,
             mfu: float, price: float | None, price_file: str | None, tflops: float | None = None,
             **_) -> Workload:
    """Tokens, MFU and the price for `gpu`: --price, else the price file's entry, else the catalog."""
    n = training_tokens(_tokens(tokens, "--tokens"), _tokens(dataset_tokens, "--dataset-tokens"), epochs)
    if price is None and price_file is not None:
        price = load_prices(price_file).get(gpu.name)
    return Workload(tokens=n, mfu=mfu, price_per_hour=price, peak_tflops=tflops)
