"""What every solver takes and returns, and the registry that names solvers in configs and checkpoints.

A solver is a pure function  solve(W [q, p], Σ [p, p] | None, GridSpec, options, target=None) -> SolveResult.
It never sees files, models or devices other than those of its inputs. Σ = (1/N) Σ_n x_n x_nᵀ is the mean Gram
matrix of the layer's inputs X (the quantized model's), so  f(Ŵ) = tr((W - Ŵ) Σ (W - Ŵ)ᵀ)  is the mean squared
output error per token: the layer objective ||W X - Ŵ X||² / N.

With a propagated `Target` (GPTAQ, QEP) the objective is instead the error against the original model's output,
    f(Ŵ) = ||W X_α - Ŵ X||² / N,   X_α = X + α (X_fp - X),
where X_fp are the same tokens' inputs in the original model: error introduced by earlier layers is corrected
rather than copied. Writing E = Ŵ - W, Δ = (X_fp - X) Xᵀ / N and Σ_d = (X_fp - X)(X_fp - X)ᵀ / N:
    f(Ŵ) = tr(E Σ Eᵀ) - 2α ⟨E, W Δ⟩ + α² tr(W Σ_d Wᵀ),        ∇f / 2 = E Σ - α W Δ,
so only the residual changes (coordinate descent needs no inverse), and f = tr((Ŵ - W̃) Σ (Ŵ - W̃)ᵀ) + const with
W̃ = W + α W Δ Σ⁻¹ (what GPTQ, which inverts Σ anyway, quantizes). α = 0, or X_fp = X, is the layer objective.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Protocol

import torch

from .grid import Grid, GridSpec

__all__ = [
    "Target",
    "Outliers",
    "QuantizedWeight",
    "SolveResult",
    "SolverEntry",
    "register_solver",
    "register_stacked",
    "split_stacked",
    "get_solver",
    "solver_names",
    "layer_loss",
    "output_energy",
    "quadratic",
    "weight_quadratic",
    "loss_workspace",
]

_SLAB = 1024  # columns of Σ converted to fp64 at a time by `quadratic`


OUTLIER_STRUCTURES = ("unstructured", "column")


@dataclass(frozen=True)
class Target:
    """The propagated target's statistics (see the module docstring): Δ and Σ_d [p, p] in fp32, and α."""

    delta: torch.Tensor  # Δ = (X_fp - X) Xᵀ / N
    sigma_d: torch.Tensor  # Σ_d = (X_fp - X)(X_fp - X)ᵀ / N
    alpha: float = 1.0

    def shift(self, W: torch.Tensor) -> torch.Tensor:
        """α W Δ [q, p]: what the target adds to W Σ in the residual  ∇f / 2 = Ŵ Σ - (W Σ + α W Δ)."""
        return self.alpha * (W.float() @ self.delta)

    def constant(self, W: torch.Tensor) -> float:
        """α² tr(W Σ_d Wᵀ): the error left when Ŵ = W."""
        return self.alpha**2 * weight_quadratic(W, self.sigma_d)

    def restrict(self, index: torch.Tensor) -> "Target":
        """The statistics of the inputs `index` only (a layer split by input columns)."""
        return Target(self.delta[index][:, index], self.sigma_d[index][:, index], self.alpha)


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
    def __call__(self, W: torch.Tensor, sigma: torch.Tensor | None, spec: GridSpec, options: Any,
                 target: Target | None = None) -> SolveResult: ...


class StackedSolveFn(Protocol):
    def __call__(self, Ws: list[torch.Tensor], sigma: torch.Tensor, spec: GridSpec, options: Any,
                 target: Target | None = None) -> list[SolveResult]: ...


# (q, p, options, propagated target?) -> peak bytes the solver allocates beyond its inputs W [q, p] and Σ (and Δ, Σ_d)
Workspace = Callable[[int, int, Any, bool], int]


def loss_workspace(q: int, p: int) -> int:
    """Bytes `layer_loss` allocates: E [q, p] fp32 and fp64, then per slab of w = min(p, 1024) columns Σ's slab
    [p, w] and E Σ's [q, w] in fp64."""
    w = min(p, _SLAB)
    return 12 * q * p + 8 * w * (p + q)


def _generic_workspace(q: int, p: int, options: Any, target: bool) -> int:
    """For a solver that declares none: four [p, p] and twelve [q, p] fp32 matrices (QuantEase's order of size)."""
    return 16 * p * p + 48 * q * p


@dataclass
class SolverEntry:
    name: str
    solve: SolveFn
    options: type  # frozen dataclass of the solver's own options
    requires_calibration: bool
    workspace: Workspace = _generic_workspace  # what the memory plan (plan.py) reserves for one solve
    solve_stacked: StackedSolveFn | None = None  # several layers on one Σ at once; same results as one by one

    def solve_group(self, Ws: list[torch.Tensor], sigma: torch.Tensor | None, spec: GridSpec, options: Any,
                    target: Target | None = None) -> list[SolveResult]:
        """Each layer of Ws solved on the Σ (and target) their shared input gives: stacked by rows into one problem
        when the solver can (rows are independent in GPTQ and QuantEase, so the codes are those of one solve per
        layer, and each column's work is as wide as all the layers together), else one by one."""
        if self.solve_stacked is None or sigma is None or len(Ws) == 1:
            return [self.solve(W, sigma, spec, options, target) for W in Ws]
        return self.solve_stacked(Ws, sigma, spec, options, target)

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


def register_solver(name: str, options: type, requires_calibration: bool = True,
                    workspace: Workspace = _generic_workspace) -> Callable[[SolveFn], SolveFn]:
    """Register `solve` under `name`, the string written to quantease.json; `workspace` estimates its peak memory."""

    def wrap(fn: SolveFn) -> SolveFn:
        if name in _SOLVERS:
            raise RuntimeError(f"solver {name!r} registered twice")
        _SOLVERS[name] = SolverEntry(name, fn, options, requires_calibration, workspace)
        return fn

    return wrap


def register_stacked(name: str) -> Callable[[StackedSolveFn], StackedSolveFn]:
    """Register the stacked form of the already registered solver `name`."""

    def wrap(fn: StackedSolveFn) -> StackedSolveFn:
        _SOLVERS[name].solve_stacked = fn
        return fn

    return wrap


def split_stacked(result: SolveResult, Ws: list[torch.Tensor], sigma: torch.Tensor, spec: GridSpec,
                  target: Target | None) -> list[SolveResult]:
    """One SolveResult per layer from a solve of the stacked rows cat(Ws): each layer's codes and grid rows, its own
    loss, and the stacked solve's notes (they concern the shared Σ)."""
    out, a = [], 0
    for W in Ws:
        s = slice(a, a + W.shape[0])
        a = s.stop
        grid = result.weight.grid.rows(s)
        qw = replace(result.weight, codes=result.weight.codes[s], grid=grid)
        loss = layer_loss(W.float(), qw.dequantize(), sigma, target)
        out.append(SolveResult(qw, loss, [loss], list(result.notes)))
    return out


def get_solver(name: str) -> SolverEntry:
    try:
        return _SOLVERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(solver_names())}") from None


def solver_names() -> list[str]:
    return sorted(_SOLVERS)


def quadratic(A: torch.Tensor, S: torch.Tensor) -> float:
    """tr(A S Aᵀ) for A [q, p] and S [p, p], in fp64, converting a slab of S's columns at a time: an fp64 copy of a
    14336-wide Σ would be 1.6 GB, the largest tensor of the solve."""
    Ad = A.double()  # [q, p]
    return sum(float((Ad @ S[:, j:j + _SLAB].double()).mul_(Ad[:, j:j + _SLAB]).sum())
               for j in range(0, S.shape[1], _SLAB))


def weight_quadratic(W: torch.Tensor, S: torch.Tensor) -> float:
    """tr(W S Wᵀ) for weights W [q, p] (not errors) and a Gram matrix S [p, p]: an fp32 product summed in fp64. W
    does not lie in S's near-null space, so the product's entries do not cancel and fp32 holds them to ~1e-6
    relative, at a fraction of `quadratic`'s fp64 cost (an error E = Ŵ - W does lie there: its f needs fp64)."""
    W = W.float()
    return float((W @ S).mul_(W).sum(dtype=torch.float64))


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, sigma: torch.Tensor, target: Target | None = None,
               shift: torch.Tensor | None = None, constant: float | None = None) -> float:
    """f(Ŵ) = tr(E Σ Eᵀ), E = Ŵ - W, accumulated in fp64 for a faithful report; with a propagated target,
    f(Ŵ) = tr(E Σ Eᵀ) - 2α ⟨E, W Δ⟩ + α² tr(W Σ_d Wᵀ) = ||W X_α - Ŵ X||² / N. shift and constant: the target's
    target.shift(W) and target.constant(W), where the caller already has them (each costs a [q, p] @ [p, p])."""
    E = W_hat - W
    f = quadratic(E, sigma)
    if target is None:
        return f
    shift = target.shift(W) if shift is None else shift
    constant = target.constant(W) if constant is None else constant
    return f - 2 * float((E.double() * shift.double()).sum()) + constant


def output_energy(W: torch.Tensor, sigma: torch.Tensor, target: Target | None = None) -> float:
    """||W X_α||² / N: what a relative error is relative to. X_α = X + α(X_fp - X) has the second moment
    Σ_α = Σ + α(Δ + Δᵀ) + α² Σ_d, so this is one quadratic tr(W Σ_α Wᵀ) (tr(W Σ Wᵀ) for the layer objective) instead
    of tr(W Σ Wᵀ) + 2α tr(W Δ Wᵀ) + α² tr(W Σ_d Wᵀ)."""
    if target is None:
        return weight_quadratic(W, sigma)
    a = target.alpha
    sigma_a = (target.delta + target.delta.T).mul_(a).add_(target.sigma_d, alpha=a * a).add_(sigma)  # [p, p]
    return weight_quadratic(W, sigma_a)
