"""QuantLinear: a linear layer that keeps packed codes in memory and dequantizes its weight on every forward."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .native import dequantize_tensors, layer_suffixes, part_weights, split_indices

__all__ = ["QuantLinear"]


class QuantLinear(torch.nn.Module):
    """y = x Ŵᵀ + b with Ŵ = scales[:, g] · (codes - zeros[:, g]) (+ sparse outliers H) rebuilt from the stored
    buffers per call. An FFSplit layer runs its heavy and light parts as two dense products: split rows fill
    disjoint output features, split columns read disjoint input features and add."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.meta = dict(meta)
        self.in_features, self.out_features = meta["in_features"], meta["out_features"]
        self._names = [s for s in layer_suffixes(meta) if s in tensors]
        for suffix in self._names:
            self.register_buffer(suffix.replace(".", "__"), tensors[suffix])  # buffer names cannot hold dots
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def stored(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, s.replace(".", "__")) for s in self._names}

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_tensors(self.stored(), self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if "parts" not in self.meta:
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        stored = self.stored()
        index = split_indices(self.meta, stored["heavy_index"])
        parts = part_weights(stored, self.meta)
        if self.meta["split_axis"] == "rows":  # y[..., rows of part] = x W_partᵀ
            y = x.new_zeros(*x.shape[:-1], self.out_features)
            for name, Wp in parts.items():
                y[..., index[name]] = F.linear(x, Wp.to(x.dtype))
        else:  # y = Σ_part x[..., cols of part] W_partᵀ
            y = sum(F.linear(x[..., index[name]], Wp.to(x.dtype)) for name, Wp in parts.items())
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        m = self.meta
        return f"in={self.in_features}, out={self.out_features}, bits={m['bits']}, group_size={m['group_size']}, sym={m['sym']}"
