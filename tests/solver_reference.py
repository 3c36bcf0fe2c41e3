"""Plain float64 reference solvers (no blocking, no laziness) and random layer problems for the solver tests."""
from __future__ import annotations

import torch

from quantease.solvers import Grid

__all__ = ["make_problem", "f64", "on_grid", "cd_column", "cd_reference", "gptq_reference"]


def make_problem(q: int, p: int, seed: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [q, p], Σ = XᵀX/N [p, p] and X [N, p] with correlated inputs and a few large-scale columns."""
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * p
    X = torch.randn(n, p, generator=g) @ (torch.eye(p) + 0.5 * torch.randn(p, p, generator=g) / p**0.5)
    X[:, : p // 16] *= 8  # outlier features, as in LLM activations
    X[:, p // 2] = X[:, p // 2 - 1] + 0.01 * torch.randn(n, generator=g)  # nearly collinear pair
    W = torch.randn(q, p, generator=g) * 0.05
    return W, X.T @ X / n, X


def f64(W: torch.Tensor, Q: torch.Tensor, sigma: torch.Tensor) -> float:
    D = (Q - W).double()
    return float(((D @ sigma.double()) * D).sum())


def on_grid(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    return s * (torch.clamp(torch.round(x / s) + z, 0, maxq) - z)


def cd_column(Q: torch.Tensor, W: torch.Tensor, sigma: torch.Tensor, grid: Grid, j: int) -> torch.Tensor:
    """Q with column j replaced by its exact minimizer over the grid, all else fixed (float64 in and out)."""
    Q = Q.clone()
    s, z = (t[:, j].double() for t in grid.columns())
    g = (Q - W) @ sigma[:, j]  # [q]
    Q[:, j] = on_grid(Q[:, j] - g / sigma[j, j], s, z, grid.maxq)
    return Q


def cd_reference(W: torch.Tensor, sigma: torch.Tensor, grid: Grid, Q0: torch.Tensor, sweeps: int,
                 order: list[int] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Cyclic CD, one column at a time with G recomputed exactly: the definition the blocked solver must match."""
    W, S, Q, history = W.double(), sigma.double(), Q0.double(), []
    for _ in range(sweeps):
        for j in order or range(W.shape[1]):
            Q = cd_column(Q, W, S, grid, j)
        history.append(f64(W, Q, S))
    return Q, history


def gptq_reference(W: torch.Tensor, sigma: torch.Tensor, grid: Grid, damp: float) -> torch.Tensor:
    """Unblocked GPTQ on a fixed grid (float64): round column j, push (W_j - Q_j)/U_jj · U_j,k>j onto the rest."""
    W, H = W.double().clone(), sigma.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    s, z = (t.double() for t in grid.columns())
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = on_grid(W[:, j], s[:, j], z[:, j], grid.maxq)
        W[:, j:] -= torch.outer((W[:, j] - Q[:, j]) / U[j, j], U[j, j:])
    return Q
