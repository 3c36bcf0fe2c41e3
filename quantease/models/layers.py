"""The weight of a linear layer as the solvers see it, W [out, in], whatever the module stores.

transformers' Conv1D (GPT-2) stores its weight transposed, [in, out]; every solver and checkpoint works on [out, in].
"""
from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

__all__ = ["weight_matrix", "as_matrix", "set_weight_matrix", "matrix_shape"]


def weight_matrix(module: torch.nn.Module) -> torch.Tensor:
    return as_matrix(module, module.weight.data)


def as_matrix(module: torch.nn.Module, stored: torch.Tensor) -> torch.Tensor:
    """A weight tensor in `module`'s storage layout, as [out, in]."""
    return stored.T if isinstance(module, Conv1D) else stored


def set_weight_matrix(module: torch.nn.Module, W: torch.Tensor) -> None:
    W = W.to(module.weight.dtype)
    module.weight.data = W.T.contiguous() if isinstance(module, Conv1D) else W


def matrix_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, also for meta-device skeleton modules."""
    out_features, in_features = module.weight.shape
    return (in_features, out_features) if isinstance(module, Conv1D) else (out_features, in_features)
