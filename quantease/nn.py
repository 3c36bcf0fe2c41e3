"""QuantLinear: a linear layer that keeps packed codes in memory and dequantizes its weight on every forward."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint.native import dequantize_tensors, quantized_schema

__all__ = ["QuantLinear"]


class QuantLinear(torch.nn.Module):
    """y = x Ŵᵀ + b with Ŵ = scales[:, g] · (codes - zeros[:, g]) rebuilt from packed int32 buffers per call."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.meta = dict(meta)
        self.in_features, self.out_features = meta["in_features"], meta["out_features"]
        for suffix in (s.suffix for s in quantized_schema()):
            self.register_buffer(suffix, tensors.get(suffix))
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def stored(self) -> dict[str, torch.Tensor]:
        return {s.suffix: getattr(self, s.suffix) for s in quantized_schema() if getattr(self, s.suffix) is not None}

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_tensors(self.stored(), self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        m = self.meta
        return f"in={self.in_features}, out={self.out_features}, bits={m['bits']}, group_size={m['group_size']}, sym={m['sym']}"
