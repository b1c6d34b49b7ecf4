"""Our own LoRA layer, as a few verbs over a model: inject, merge, unmerge, save.

The low-rank update is written once (`LoraLayer.delta_weight`); `nn.Linear` and GPT-2's `Conv1D`
differ only in that Conv1D stores its weight transposed, as (in, out). Module and tensor names
follow PEFT's layout (`<path>.base_layer`, `<path>.lora_A.weight`, `<path>.lora_B.weight`), so an
adapter saved here loads with `PeftModel.from_pretrained`, and the planner's checkpoint sizes
describe these files.

Which modules are wrapped is decided by the planner (`counts.lora_trainable`), never here: a
measured LoRA run and its prediction cannot disagree about the targets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..counts import lora_trainable
from ..errors import PlanError
from ..files import default_mode, replacing_folder
from ..spec import TrainSetup, spec_from_hf_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils): y = x @ W + b with W stored as (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """The factor on B @ A: alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA
    (Kalajdzievska 2023), which keeps the update's scale steady as the rank grows."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoraLayer(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + B(A(dropout(x))) * s.

    A is Kaiming-uniform initialised and B is zero, so at initialisation the wrapped layer returns
    exactly what the base layer returns.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base
        self.fan_in_fan_out = is_conv1d(base)
        weight = base.weight
        out_features, in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = lora_scaling(rank, alpha, rslora)
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(in_features, rank, bias=False, **kwargs)  # weight (r, in)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **kwargs)  # weight (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # Same initialisation as loralib and PEFT's default.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling, in the base weight's own layout: (out, in), or (in, out) for Conv1D."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        out = self.base_layer(x)  # (B, T, out)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # (B, T, out)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze everything but the LoRA matrices; return the number of trainable parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def inject(model: nn.Module, targets: tuple[str, ...] = ("default",), rank: int = 8,
           alpha: float = 16.0, dropout: float = 0.0, rslora: bool = False) -> tuple[str, ...]:
    """Wrap the modules the planner selects for `targets` (PEFT's matching rules, see
    `lora_planner.counts`) in `LoraLayer`s, freeze the rest, and return the wrapped paths."""
    spec = spec_from_hf_config(model.config.to_dict(), name=model.config.model_type)
    trainable = lora_trainable(spec, TrainSetup(method="lora", rank=rank, targets=tuple(targets)))
    paths = tuple(a.module.path for a in trainable.adapters)
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, leaf)
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise PlanError(f"{path} is a {type(base).__name__}; this LoRA layer wraps Linear and Conv1D")
        setattr(parent, leaf, LoraLayer(base, rank, alpha, dropout, rslora))
    mark_only_lora_trainable(model)
    return paths


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += delta); the forward then skips the adapter."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            layer.base_layer.weight += layer.delta_weight()
            layer.merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo `merge` (W -= delta), so training can go on."""
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.base_layer.weight -= layer.delta_weight()
            layer.merged = False


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved names: `base_model.model.<path>.lora_A.weight`."""
    return {PEFT_PREFIX + name: p.detach() for name, p in model.named_parameters() if is_lora_param(name)}


def adapter_config(model: nn.Module, base_model: str = "") -> dict:
    """PEFT's `adapter_config.json` for the injected adapters (a LoraConfig's fields)."""
    layers = lora_layers(model)
    if not layers:
        raise PlanError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        # Full paths: PEFT matches a name that equals the path, and a leaf name such as c_proj
        # would also catch layers that were not wrapped here.
        "target_modules": sorted(layers),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "use_rslora": first.rslora,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model: str = "") -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` as PEFT lays them out."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config = adapter_config(model, base_model)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    # Both files go into a temporary folder renamed into place: the pair on disk always matches.
    with replacing_folder(directory, (ADAPTER_WEIGHTS, ADAPTER_CONFIG)) as folder:
        weights = folder / ADAPTER_WEIGHTS
        save_file(tensors, weights, metadata={"format": "pt"})
        weights.chmod(default_mode())  # safetensors writes 0600; a shared adapter should be readable
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path) -> tuple[str, ...]:
    """Wrap the modules an adapter folder names (PEFT's layout) and load its factors; return the paths.

    Each module gets the rank of its stored tensors and its alpha from `lora_alpha` or a matching
    `alpha_pattern` key (PEFT's matching, `adapter_rank.layer_scaling`), so a resized adapter with a
    `rank_pattern` loads layer by layer. The rest of the model is frozen, as after `inject`.
    """
    from safetensors import safe_open

    from ..adapter_rank import layer_scaling, open_adapter

    source = open_adapter(directory)
    config = source.config or {}
    with safe_open(str(source.weights), "pt") as f:
        for m in source.modules:
            if m.embedding or len(m.shape_a) != 2:
                raise PlanError(f"{m.name}: this LoRA layer loads Linear and Conv1D adapters only")
            parent_path, _, leaf = m.name.rpartition(".")
            parent = model.get_submodule(parent_path)
            base = getattr(parent, leaf)
            if isinstance(base, LoraLayer):
                base = base.base_layer
            if not (isinstance(base, nn.Linear) or is_conv1d(base)):
                raise PlanError(f"{m.name} is a {type(base).__name__}; "
                                "this LoRA layer wraps Linear and Conv1D")
            _, alpha, _ = layer_scaling(config, m.name) if config else (m.rank, float(m.rank), 1.0)
            layer = LoraLayer(base, m.rank, alpha, rslora=bool(config.get("use_rslora")))
            layer.lora_A.weight.copy_(f.get_tensor(m.key_a))
            layer.lora_B.weight.copy_(f.get_tensor(m.key_b))
            setattr(parent, leaf, layer)
    mark_only_lora_trainable(model)
    return tuple(m.name for m in source.modules)
