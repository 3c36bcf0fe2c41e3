"""What every solver takes and returns, and the registry that names solvers in configs and checkpoints.

A solver is a pure function  solve(W [q, p], Σ [p, p] | None, GridSpec, options) -> SolveResult.
It never sees files, models or devices other than those of its inputs. Σ = (1/N) Σ_n x_n x_nᵀ is the mean Gram
matrix of the layer's inputs, so  f(Ŵ) = tr((W - Ŵ) Σ (W - Ŵ)ᵀ)  is the mean squared output error per token.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Protocol

import torch

from .grid import Grid, GridSpec

__all__ = [
    "Outliers",
    "QuantizedWeight",
    "SolveResult",
    "SolverEntry",
    "register_solver",
    "get_solver",
    "solver_names",
    "layer_loss",
]


OUTLIER_STRUCTURES = ("unstructured", "column")


@dataclass
class Outliers:
    """A sparse full-precision (fp16) correction H added to the quantized weight.

    unstructured: index [nnz] int64 flat positions i·p + j, values [nnz] fp16.
    column:       index [s] int64 input columns (sorted), values [q, s] fp16 (H[:, index] = values)."""

    structure: str  # "unstructured" | "column"
    index: torch.Tensor
    values: torch.Tensor

    @property
    def count(self) -> int:
        """Nonzeros allowed (unstructured) or columns (column)."""
        return int(self.index.numel())

    def dense(self, q: int, p: int) -> torch.Tensor:
        """H [q, p] in fp32."""
        H = torch.zeros(q, p, device=self.values.device)
        if self.structure == "column":
            H[:, self.index] = self.values.float()
        else:
            H.view(-1)[self.index] = self.values.float()
        return H


@dataclass
class QuantizedWeight:
    """Integer codes on a per-row/per-group grid: Ŵ[i, j] = scale[i, g(j)] · codes[i, j] - offset[i, g(j)]
    (offset = scale · zero for integer zero points), plus the sparse fp16 outliers H when present (Ŵ = Q + H)."""

    codes: torch.Tensor  # [q, p] uint8
    grid: Grid
    bits: int
    group_size: int  # -1: per channel
    sym: bool
    outliers: Outliers | None = None
    gguf: str = ""  # the GGUF type whose grid it is (GridSpec.gguf), "" for integer zero points

    @classmethod
    def from_codes(cls, codes: torch.Tensor, grid: Grid, spec: GridSpec) -> "QuantizedWeight":
        return cls(codes.to(torch.uint8), grid, spec.bits, spec.group_size, spec.sym, gguf=spec.gguf)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """Ŵ [q, p] in fp32."""
        Q = self.grid.dequantize(self.codes.float())
        return Q if self.outliers is None else Q + self.outliers.dense(*Q.shape)


@dataclass
class SolveResult:
    weight: QuantizedWeight
    loss: float  # f(Ŵ) with the returned Ŵ; nan when no Σ was given
    history: list[float] = field(default_factory=list)  # f after initialization and after every sweep
    notes: list[str] = field(default_factory=list)  # numerical fallbacks taken (logged and counted by the pipeline)


class SolveFn(Protocol):
    def __call__(self, W: torch.Tensor, sigma: torch.Tensor | None, spec: GridSpec, options: Any) -> SolveResult: ...


@dataclass(frozen=True)
class SolverEntry:
    name: str
    solve: SolveFn
    options: type  # frozen dataclass of the solver's own options
    requires_calibration: bool

    def make_options(self, values: dict[str, Any] | None = None) -> Any:
        """Build the options dataclass, rejecting keys it does not have."""
        values = dict(values or {})
        known = {f.name for f in fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for method {self.name!r}; "
                f"valid: {', '.join(sorted(known)) or '(none)'}"
            )
        return self.options(**values)


_SOLVERS: dict[str, SolverEntry] = {}


def register_solver(name: str, options: type, requires_calibration: bool = True) -> Callable[[SolveFn], SolveFn]:
    """Register `solve` under `name`, the string written to quantease.json."""

    def wrap(fn: SolveFn) -> SolveFn:
        if name in _SOLVERS:
            raise RuntimeError(f"solver {name!r} registered twice")
        _SOLVERS[name] = SolverEntry(name, fn, options, requires_calibration)
        return fn

    return wrap


def get_solver(name: str) -> SolverEntry:
    try:
        return _SOLVERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(solver_names())}") from None


def solver_names() -> list[str]:
    return sorted(_SOLVERS)


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, sigma: torch.Tensor) -> float:
    """f(Ŵ) = tr(D Σ Dᵀ), D = Ŵ - W, accumulated in fp64 for a faithful report."""
    D = (W_hat - W).double()
    return float(((D @ sigma.double()) * D).sum())
