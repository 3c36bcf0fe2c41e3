"""Quantization grids: one affine grid per row (per-channel) or per (row, group of input columns).

A grid maps a real weight w to an integer code c in [0, 2^b - 1] and back:
    c = clamp(round(w / s) + z, 0, 2^b - 1),        ŵ = s · c - o,   o = s · z
Symmetric grids fix z = 2^(b-1) and s = max|w| / (2^(b-1) - 1/2) (the GPTQ / compressed-tensors convention);
asymmetric grids put min(w) and max(w) on the end points with an integer zero point z. With fp16 scales and integer
z every product here is exact in fp32, so s · c - s · z is bit for bit s · (c - z).

GGUF grids (`gguf="q4_1"`, `"q4_k"`, ...; solvers/gguf_grid.py) store a float offset o instead of an integer z
(ŵ = d·q + m, or d·sc·q - dmin·m for the K-quants): `Grid.offset` holds o, `zero` = o / s only picks the nearest
code (c = clamp(round(w / s + z))), and ŵ = s · c - o is then literally the format's own dequantization, evaluated in
fp32 as llama.cpp's and gguf's dequantizers do. Solvers round with (s, z) and form ŵ with (s, o): Grid.columns and
Grid.column_shifts.

Scales are rounded to fp16 *before* any solver uses them, so the grid a solver optimizes over is exactly the grid
the checkpoint stores (reload is bit-exact). `clip="mse"` shrinks each row's (group's) range by a grid search that
minimizes the Σ-diagonal-weighted rounding error  Σ_j Σ_jj (w_j - ŵ_j)^2  (plain squared error without Σ).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["GridSpec", "Grid", "fit_grid"]

SCALE_DTYPE = torch.float16
_MIN_SCALE = 1e-6  # keeps all-zero rows finite; fp16 still represents it (subnormal)


@dataclass(frozen=True)
class GridSpec:
    """What grid to fit: bit width, group size (-1 = one group per row), symmetry, clipping rule, and a GGUF type
    whose grid it is (bits, group size and symmetry are then the type's)."""

    bits: int = 4
    group_size: int = -1
    sym: bool = False
    clip: str = "minmax"  # "minmax" | "mse"
    clip_steps: int = 40  # grid-search resolution for clip="mse"
    clip_min_ratio: float = 0.5  # smallest shrink factor of the range that "mse" tries
    gguf: str = ""  # "" (integer zero points) or a GGUF type of solvers/gguf_grid.py: "q4_0", "q4_1", "q4_k", ...

    def __post_init__(self) -> None:
        if self.gguf:
            gguf_grid.check_spec(self)
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
        if self.gguf:
            gguf_grid.gguf_type(self.gguf).check_columns(columns)
        if self.group_size == -1:
            return 1
        if columns % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the input size {columns}")
        return columns // self.group_size

    def for_columns(self, columns: int) -> tuple["GridSpec", str | None]:
        """The spec a layer with `columns` inputs is quantized with, and why it differs from this one (None when it
        does not): a GGUF K-quant row that is not a multiple of 256 takes llama.cpp's fallback type."""
        return gguf_grid.fallback_spec(self, columns) if self.gguf else (self, None)

    @property
    def float_offset(self) -> bool:
        """Whether fitted grids carry a float offset o (GGUF's minimum) rather than an integer zero point."""
        return bool(self.gguf) and gguf_grid.gguf_type(self.gguf).has_min

    @property
    def independent_groups(self) -> bool:
        """Whether each group's grid can be fitted on its own (GPTQ's dynamic groups); a K-quant's sub-block scales
        share their super-block's fp16 scale, so its grid is fitted on the whole row first and then held fixed."""
        if self.group_size == -1:
            return False
        return not self.gguf or gguf_grid.gguf_type(self.gguf).block == self.group_size


@dataclass
class Grid:
    """A fitted grid: scale [q, G], zero [q, G], g_idx [p]; ŵ = scale · c - offset (see the module docstring).

    scale holds fp16 values (GGUF K-quants: the exact fp32 product d·sc) in fp32; zero is integer-valued unless
    `offset` is given; params are a format's own fields that the checkpoint stores (GGUF K-quants: d, sc, dmin, m)."""

    scale: torch.Tensor  # [q, G]
    zero: torch.Tensor  # [q, G]
    g_idx: torch.Tensor  # [p] int64: group of each input column
    maxq: int
    offset: torch.Tensor | None = None  # [q, G] float offset o of a GGUF grid; None: o = scale · zero
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def shift(self) -> torch.Tensor:
        """o [q, G] in ŵ = s · c - o (exact: s · z for integer zero points)."""
        return self.scale * self.zero if self.offset is None else self.offset

    def rows(self, s: slice) -> "Grid":
        """The grid of rows s (a layer's share of a stacked solve)."""
        return Grid(self.scale[s], self.zero[s], self.g_idx, self.maxq, None if self.offset is None else self.offset[s],
                    {k: v[s] for k, v in self.params.items()})

    @staticmethod
    def stack(grids: list["Grid"]) -> "Grid":
        """The grids of several layers' rows (same columns), one above the other."""
        first = grids[0]
        cat = lambda ts: torch.cat(ts)
        return Grid(cat([g.scale for g in grids]), cat([g.zero for g in grids]), first.g_idx, first.maxq,
                    None if first.offset is None else cat([g.offset for g in grids]),
                    {k: cat([g.params[k] for g in grids]) for k in first.params})

    def columns(self, idx: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column scale and zero, [q, p] (or [q, len(idx)])."""
        g = self.g_idx if idx is None else self.g_idx[idx]
        return self.scale[:, g], self.zero[:, g]

    def column_shifts(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Per-column offset o, [q, p] (or [q, len(idx)])."""
        g = self.g_idx if idx is None else self.g_idx[idx]
        return self.shift[:, g]

    def nearest(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The code nearest to w on the grid (s, z) (integer-valued float tensor)."""
        c = torch.round(w / s) + z if self.offset is None else torch.round(w / s + z)
        return torch.clamp(c, 0, self.maxq)

    def _contiguous(self) -> bool:
        q, G = self.scale.shape
        p = self.g_idx.numel()
        return p % G == 0 and bool((self.g_idx == torch.arange(p, device=self.g_idx.device) // (p // G)).all())

    def _apply(self, W: torch.Tensor, fn) -> torch.Tensor:
        """fn(W_g, s, z, o) per group with broadcasting; a reshape for contiguous groups, a gather otherwise."""
        q, G = self.scale.shape
        if self._contiguous():
            out = fn(W.reshape(q, G, -1), self.scale[..., None], self.zero[..., None], self.shift[..., None])
            return out.reshape(W.shape)
        s, z = self.columns()
        return fn(W, s, z, self.column_shifts())

    def quantize(self, W: torch.Tensor) -> torch.Tensor:
        """Nearest codes of W [q, p] on this grid (integer-valued float tensor)."""
        return self._apply(W, lambda w, s, z, o: self.nearest(w, s, z))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Ŵ = s · c - o [q, p] (fp32)."""
        return self._apply(codes.to(self.scale.dtype), lambda c, s, z, o: c * s - o)


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
    if spec.gguf:
        return gguf_grid.fit_gguf_grid(W, spec, sigma_diag)
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


# GGUF's types build on Grid and GridSpec, so they are imported once both exist.
from . import gguf_grid  # noqa: E402
