"""--sharding fsdp1: PyTorch FSDP1 (FullyShardedDataParallel), one flat parameter per wrapped unit.

The flat parameters' sizes are held to torch's own FSDP1 code: FSDP1 itself refuses a CPU-only
machine, so each unit's `FlatParamHandle` is built and sharded directly, under a fake process group
of 2 to 8 ranks (its local shard, and the padded unsharded parameter the all-gather fills).
"""

import json

import pytest
from click.testing import CliRunner

from lora_planner.cli import main as cli
from lora_planner.fsdp import flat_param_numels


def _handle_sizes(module, world: int) -> tuple[int, int, int]:
    """torch's FlatParamHandle over `module`'s parameters, sharded for the last of `world` ranks (a
    fake process group: one process plays the rank): (the parameters' numel, its local shard's,
    the padded unsharded flat parameter's that the all-gather fills)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp._flat_param import FlatParamHandle, HandleShardingStrategy
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=world - 1, world_size=world, store=FakeStore())
    try:
        params = [p for p in module.parameters()]
        numel = sum(p.numel() for p in params)
        handle = FlatParamHandle(params, module, torch.device("cpu"), HandleShardingStrategy.FULL_SHARD,
                                 False, None, None, False, dist.group.WORLD, False)
        handle.shard()
        handle.init_flat_param_attributes()
        flat = handle.flat_param
        return numel, flat._local_shard.numel(), flat._full_param_padded.numel()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("seed", range(4))
def test_flat_param_sizes_match_torch_fsdp1(seed):
    """A random small Llama layer (odd widths) on 2 to 8 ranks: the planner's shard and padded
    sizes are FlatParamHandle's, use_orig_params=False (the seeds include units whose numel the rank
    count does not divide: a padded last shard)."""
    pytest.importorskip("transformers")
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(seed)
    heads = rng.randint(1, 3)
    head_dim = 2 * rng.randint(1, 3)  # rotary needs an even head size
    config = LlamaConfig(hidden_size=heads * head_dim + rng.randint(0, 1) * heads, head_dim=head_dim,
                         intermediate_size=rng.randint(3, 17),
                         num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=1,
                         vocab_size=rng.randint(20, 50))
    layer = LlamaForCausalLM(config).model.layers[0]
    world = rng.randint(2, 8)
    numel, shard, padded = _handle_sizes(layer, world)
    assert flat_param_numels(numel, world) == (shard, padded), (numel, world)


def _plan(sharding: str, *extra: str) -> dict:
    out = CliRunner().invoke(cli, ["plan", "--model", "llama-3.2-1b", "--method", "full", "--num-gpus", "4",
                                   "--sharding", sharding, "--format", "json", *extra])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)["plans"][0]


def test_fsdp1_holds_no_all_gather_output_beside_the_flat_parameters():
    """FSDP1 gathers into the flat parameter itself: at the loss the root is whole and no block's
    all-gather output is kept, where FSDP2 keeps the last block's; backward is the same."""
    one, two = _plan("fsdp1"), _plan("fsdp")
    assert one["memory_bytes"]["weights"] == two["memory_bytes"]["weights"]
    assert one["per_gpu_peak_bytes"] <= two["per_gpu_peak_bytes"]


def test_fsdp1_cpu_offload_moves_parameters_too():
    args = ["plan", "--model", "llama-3.2-1b", "--num-gpus", "2", "--sharding", "fsdp1",
            "--offload", "optimizer"]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code != 0 and "optimizer+params" in out.output and "Traceback" not in out.output
