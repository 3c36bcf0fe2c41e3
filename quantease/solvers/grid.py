"""Quantization grids: one affine grid per row (per-channel) or per (row, group of input columns).

A grid maps a real weight w to an integer code c in [0, 2^b - 1] and back:
    c = clamp(round(w / s) + z, 0, 2^b - 1),        ŵ = s · (c - z)
Symmetric grids fix z = 2^(b-1) and s = max|w| / (2^(b-1) - 1/2) (the GPTQ / compressed-tensors convention);
asymmetric grids put min(w) and max(w) on the end points with an integer zero point z.

Scales are rounded to fp16 *before* any solver uses them, so the grid a solver optimizes over is exactly the grid
the checkpoint stores (reload is bit-exact). `clip="mse"` shrinks each row's (group's) range by a grid search that
minimizes the Σ-diagonal-weighted rounding error  Σ_j Σ_jj (w_j - ŵ_j)^2  (plain squared error without Σ).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GridSpec", "Grid", "fit_grid"]

SCALE_DTYPE = torch.float16
_MIN_SCALE = 1e-6  # keeps all-zero rows finite; fp16 still represents it (subnormal)


@dataclass(frozen=True)
class GridSpec:
    """What grid to fit: bit width, group size (-1 = one group per row), symmetry, clipping rule."""

    bits: int = 4
    group_size: int = -1
    sym: bool = False
    clip: str = "minmax"  # "minmax" | "mse"
    clip_steps: int = 40  # grid-search resolution for clip="mse"
    clip_min_ratio: float = 0.5  # smallest shrink factor of the range that "mse" tries

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group size must be -1 (per channel) or positive, got {self.group_size}")
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"clip must be 'minmax' or 'mse', got {self.clip!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, columns: int) -> int:
        """Number of groups per row for a weight with `columns` input columns."""
        if self.group_size == -1:
            return 1
        if columns % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the input size {columns}")
        return columns // self.group_size


@dataclass
class Grid:
    """A fitted grid: scale [q, G] (fp16 values held in fp32), zero [q, G] (integer-valued fp32), g_idx [p]."""

    scale: torch.Tensor  # [q, G]
    zero: torch.Tensor  # [q, G]
    g_idx: torch.Tensor  # [p] int64: group of each input column
    maxq: int

    def columns(self, idx: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column scale and zero, [q, p] (or [q, len(idx)])."""
        g = self.g_idx if idx is None else self.g_idx[idx]
        return self.scale[:, g], self.zero[:, g]

    def _contiguous(self) -> bool:
        q, G = self.scale.shape
        p = self.g_idx.numel()
        return p % G == 0 and bool((self.g_idx == torch.arange(p, device=self.g_idx.device) // (p // G)).all())

    def _apply(self, W: torch.Tensor, fn) -> torch.Tensor:
        """fn(W_g, s, z) per group with broadcasting; a reshape for contiguous groups, a gather otherwise."""
        q, G = self.scale.shape
        if self._contiguous():
            out = fn(W.reshape(q, G, -1), self.scale[..., None], self.zero[..., None])
            return out.reshape(W.shape)
        s, z = self.columns()
        return fn(W, s, z)

    def quantize(self, W: torch.Tensor) -> torch.Tensor:
        """Nearest codes of W [q, p] on this grid (integer-valued float tensor)."""
        return self._apply(W, lambda w, s, z: torch.clamp(torch.round(w / s) + z, 0, self.maxq))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self._apply(codes.to(self.scale.dtype), lambda c, s, z: s * (c - z))


def _range_to_grid(wmin: torch.Tensor, wmax: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero putting [wmin, wmax] (each [..]) onto the integer range [0, maxq]."""
    maxq = spec.maxq
    if spec.sym:
        amax = torch.maximum(wmin.abs(), wmax.abs())
        scale = amax / (maxq / 2)
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        wmin = torch.minimum(wmin, torch.zeros_like(wmin))
        wmax = torch.maximum(wmax, torch.zeros_like(wmax))
        scale = (wmax - wmin) / maxq
        zero = None
    scale = scale.clamp(_MIN_SCALE, torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE).float()  # finite in fp16
    if zero is None:
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def fit_grid(W: torch.Tensor, spec: GridSpec, sigma_diag: torch.Tensor | None = None) -> Grid:
    """Fit a grid to W [q, p] by min-max or by error-minimizing clipping of each row's (group's) range."""
    q, p = W.shape
    G = spec.groups(p)
    Wg = W.float().reshape(q, G, p // G)  # [q, G, gs]
    wmin, wmax = Wg.amin(dim=2), Wg.amax(dim=2)
    scale, zero = _range_to_grid(wmin, wmax, spec)
    if spec.clip == "mse":
        weight = torch.ones(p, device=W.device) if sigma_diag is None else sigma_diag.float().clamp(min=0)
        weight = weight.reshape(1, G, p // G)
        best = torch.full_like(scale, float("inf"))
        for i in range(spec.clip_steps + 1):
            ratio = 1 - (1 - spec.clip_min_ratio) * i / spec.clip_steps
            s, z = _range_to_grid(wmin * ratio, wmax * ratio, spec)
            codes = torch.clamp(torch.round(Wg / s[..., None]) + z[..., None], 0, spec.maxq)
            err = ((s[..., None] * (codes - z[..., None]) - Wg) ** 2 * weight).sum(dim=2)  # [q, G]
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    g_idx = torch.arange(p, device=W.device) // (p // G)
    return Grid(scale=scale, zero=zero, g_idx=g_idx, maxq=spec.maxq)
