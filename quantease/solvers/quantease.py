"""QuantEase: cyclic coordinate descent on the layer objective, with the grid held fixed.

Behdin, Acharya, Gupta, Keerthi, Mazumder, Zhu, Song, "QuantEase: Optimization-based Quantization for Language
Models" (arXiv 2309.01885), Section 3 (Algorithm 1). Objective  f(Ŵ) = tr((Ŵ - W) Σ (Ŵ - W)ᵀ).  With every other
column fixed, f is a 1-D quadratic in each entry of column j, so its exact minimizer over the grid is the nearest
grid point of the unconstrained minimizer (all rows at once, no matrix inverse):
    Ŵ_j ← q_j(Ŵ_j - G_j / Σ_jj),        G = (Ŵ - W) Σ   [q, p],
and a sweep over all columns never increases f. Blocked like GPTQ: G is recomputed at the start of each sweep
(which also gives f = Σ D ⊙ G); inside a block of B columns G is updated rank-1 by each column's change, and after
the block the later columns get G[:, i2:] += Δ Σ[i1:i2, i2:] in one matmul, so the work is dominated by matmuls.
A relaxed sweep replaces q_j by clamping to the grid's range; the original code interleaves such sweeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from .base import QuantizedWeight, SolveResult, get_solver, layer_loss, register_solver
from .gptq import GPTQOptions, check_layer
from .grid import Grid, GridSpec, fit_grid

__all__ = ["QuantEaseOptions", "solve", "sweep_flops"]

_DEAD = 1e-10  # Σ_jj below this times mean(diag Σ): input treated as never active


@dataclass(frozen=True)
class QuantEaseOptions:
    sweeps: int = 3  # rounded CD sweeps (see scripts/bench_solvers.py for the measurements behind the default)
    init: str = "gptq"  # "gptq": start from GPTQ's Ŵ and grid; "w": Ŵ = W on fit_grid(W), first sweep rounds
    order: str = "natural"  # "natural" | "diag" (descending diag Σ)
    relax_sweeps: int = 0  # unrounded sweeps (clamped to the grid's range) before the rounded ones
    tol: float = 0.0  # stop when a sweep improves f by less than tol · f
    damp: float = 0.0  # ridge λ = damp · mean(diag Σ) used by the solve only; the loss uses the undamped Σ
    block_size: int = 128  # columns per lazy-update block
    gptq_damp: float = 0.01  # options of the GPTQ initialization
    gptq_act_order: bool = False
    gptq_static_groups: bool = False

    def __post_init__(self) -> None:
        if self.init not in ("gptq", "w"):
            raise UsageError(f"quantease init must be 'gptq' or 'w', got {self.init!r}")
        if self.order not in ("natural", "diag"):
            raise UsageError(f"quantease order must be 'natural' or 'diag', got {self.order!r}")
        for name in ("sweeps", "relax_sweeps", "tol", "damp"):
            if getattr(self, name) < 0:
                raise UsageError(f"quantease {name} must be >= 0, got {getattr(self, name)}")
        if self.block_size < 1:
            raise UsageError(f"quantease block_size must be >= 1, got {self.block_size}")


def sweep_flops(q: int, p: int, block_size: int) -> float:
    """Floating-point operations of one sweep: G = DΣ (2qp²), f (2qp), in-block rank-1 and lazy block updates."""
    flops = 2.0 * q * p * p + 2.0 * q * p
    for i1 in range(0, p, block_size):
        b = min(block_size, p - i1)
        flops += q * b * (b - 1) + 2.0 * q * b * (p - i1 - b) + 8.0 * q * b  # rank-1, lazy matmul, per-column
    return flops


def _residual(Q: torch.Tensor, W: torch.Tensor, Sigma: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """G = (Q - W)(Σ + λI) and the undamped f(Q) = Σ D ⊙ DΣ."""
    D = Q - W  # [q, p]
    G = D @ Sigma  # [q, p]
    f = float((D * G).sum())
    return G.add_(D, alpha=lam), f


def _sweep(Q: torch.Tensor, G: torch.Tensor, Sigma: torch.Tensor, dinv: list[float], scale: torch.Tensor,
           zero: torch.Tensor, maxq: int, block_size: int, relaxed: bool) -> None:
    """One cyclic pass over the columns, updating Q in place; G must be (Q - W)(Σ + λI) on entry (it is consumed).

    dinv[j] = 1 / (Σ_jj + λ), or 0 for dead inputs, which are skipped."""
    p = Q.shape[1]
    for i1 in range(0, p, block_size):
        i2 = min(i1 + block_size, p)
        Q1 = Q[:, i1:i2].clone()  # [q, B]
        G1 = G[:, i1:i2].clone()  # [q, B] kept exact for this block's columns
        S1 = Sigma[i1:i2, i1:i2]  # [B, B]
        s1, z1 = scale[:, i1:i2], zero[:, i1:i2]  # [q, B]
        lo1, hi1 = -s1 * z1, s1 * (maxq - z1)  # [q, B] grid range, for relaxed sweeps
        for i in range(i2 - i1):
            if dinv[i1 + i] == 0:
                continue
            u = Q1[:, i] - G1[:, i] * dinv[i1 + i]  # [q] unconstrained minimizer over column i1 + i
            if relaxed:
                new = torch.minimum(torch.maximum(u, lo1[:, i]), hi1[:, i])
            else:  # nearest grid point, same formulas as Grid.quantize / Grid.dequantize
                c = torch.clamp(torch.round(u / s1[:, i]) + z1[:, i], 0, maxq)
                new = s1[:, i] * (c - z1[:, i])  # [q]
            G1[:, i + 1 :].addr_(new - Q1[:, i], S1[i, i + 1 :])
            Q1[:, i] = new
        Delta1 = Q1 - Q[:, i1:i2]  # [q, B] this block's change
        Q[:, i1:i2] = Q1
        G[:, i2:].addmm_(Delta1, Sigma[i1:i2, i2:])


def _initialize(W: torch.Tensor, sigma: torch.Tensor, spec: GridSpec, options: QuantEaseOptions
                ) -> tuple[torch.Tensor, Grid, list[str]]:
    """Starting Ŵ, the grid CD keeps fixed, and notes from the initialization."""
    if options.init == "w":
        return W.clone(), fit_grid(W, spec, torch.diagonal(sigma)), []
    gptq = GPTQOptions(options.gptq_damp, act_order=options.gptq_act_order, static_groups=options.gptq_static_groups)
    res = get_solver("gptq").solve(W, sigma, spec, gptq)
    return res.weight.dequantize(), res.weight.grid, list(res.notes)


@register_solver("quantease", QuantEaseOptions)
@torch.no_grad()
def solve(W: torch.Tensor, sigma: torch.Tensor | None, spec: GridSpec,
          options: QuantEaseOptions = QuantEaseOptions()) -> SolveResult:
    """History: f of the initial quantized Ŵ (RTN for init="w"), then f after each rounded sweep; the best is returned."""
    check_layer(W, sigma)
    W, Sigma = W.float(), sigma.float()
    Q, grid, notes = _initialize(W, Sigma, spec, options)
    d = torch.diagonal(Sigma)  # [p]
    perm = torch.argsort(d, descending=True) if options.order == "diag" else torch.arange(W.shape[1], device=W.device)
    inv = torch.argsort(perm)
    W, Q, Sigma, d = W[:, perm], Q[:, perm], Sigma[perm][:, perm], d[perm]
    scale, zero = grid.columns(perm)  # [q, p] each column's grid travels with it
    live = d > _DEAD * d.mean().clamp(min=0)
    lam = options.damp * float(d.mean())
    dinv = torch.where(live, 1 / (d + lam), torch.zeros_like(d)).tolist()

    def on_grid(X: torch.Tensor) -> torch.Tensor:
        return scale * (torch.clamp(torch.round(X / scale) + zero, 0, grid.maxq) - zero)

    Q[:, ~live] = on_grid(Q)[:, ~live]  # dead inputs: nearest grid point, never updated
    best = on_grid(Q) if options.init == "w" else Q.clone()  # the quantized iterate to beat
    G, f = _residual(Q, W, Sigma, lam)
    history = [f if options.init == "gptq" else _residual(best, W, Sigma, 0.0)[1]]
    # f of the quantized iterate the next sweep starts from (None: it starts from W or a relaxed iterate)
    prev: float | None = history[0] if options.init == "gptq" and not options.relax_sweeps else None
    for _ in range(options.relax_sweeps):
        _sweep(Q, G, Sigma, dinv, scale, zero, grid.maxq, options.block_size, relaxed=True)
        G, _ = _residual(Q, W, Sigma, lam)
    for _ in range(options.sweeps):
        _sweep(Q, G, Sigma, dinv, scale, zero, grid.maxq, options.block_size, relaxed=False)
        G, f = _residual(Q, W, Sigma, lam)
        if f < min(history):
            best = Q.clone()
        history.append(f)
        if prev is not None and prev - f <= options.tol * prev:
            break
        prev = f

    W_hat = best[:, inv]  # [q, p] original column order
    qw = QuantizedWeight.from_codes(grid.quantize(W_hat), grid, spec)
    assert torch.equal(qw.dequantize(), W_hat), "iterate left the grid"
    return SolveResult(qw, layer_loss(W[:, inv], W_hat, sigma), history, notes)
