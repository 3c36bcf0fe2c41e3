"""Reload a quantease checkpoint as a runnable transformers model (packed QuantLinear, or dense dequantized)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import CheckpointError
from ..models.experts import unfuse_experts
from ..models.registry import get_arch
from .quant_linear import QuantLinear
from .native import INFO, MANIFEST, dequantize_tensors, layer_suffixes, read_manifest
from .resume import RESUME_DIR

__all__ = ["is_quantized_checkpoint", "load_quantized", "read_info"]


def is_quantized_checkpoint(folder: str | Path) -> bool:
    """A quantease output folder, complete or not (a partial one is refused by `read_info`)."""
    folder = Path(folder)
    return any((folder / name).exists() for name in (INFO, MANIFEST, RESUME_DIR))


def read_info(folder: Path) -> dict[str, Any]:
    read_manifest(folder)
    return json.loads((Path(folder) / INFO).read_text())


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        with safe_open(folder / shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def load_quantized(folder: str | Path, dense: bool = False, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict]:
    """The model in `folder` with each quantized linear as a QuantLinear (or nn.Linear of Ŵ if dense), and its info."""
    folder = Path(folder)
    info = read_info(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        unfuse_experts(model, get_arch(config.model_type))
    tensors = _read_all(folder)
    for name, meta in info["layers"].items():
        parts = {s: tensors.pop(f"{name}.{s}") for s in layer_suffixes(meta) if f"{name}.{s}" in tensors}
        bias = tensors.pop(f"{name}.bias", None)
        if dense:
            layer = torch.nn.Linear(meta["in_features"], meta["out_features"], bias=bias is not None, dtype=dtype)
            layer.weight.data = dequantize_tensors(parts, meta).to(dtype)
            if bias is not None:
                layer.bias.data = bias.to(dtype)
        else:
            layer = QuantLinear(meta, parts, None if bias is None else bias.to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{folder}: tensors missing {missing[:3]} / unexpected {result.unexpected_keys[:3]}")
    return model.eval(), info
