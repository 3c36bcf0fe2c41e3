"""QuantEase: cyclic coordinate descent on the layer objective, with the grid held fixed.

Behdin, Acharya, Gupta, Keerthi, Mazumder, Zhu, Song, "QuantEase: Optimization-based Quantization for Language
Models" (arXiv 2309.01885), Section 3, Algorithm 1. Objective  f(Ŵ) = tr((Ŵ - W) Σ (Ŵ - W)ᵀ).  With every other
column fixed, f is a 1-D quadratic in each entry of column j, so its exact minimizer over the grid is the nearest
grid point of the unconstrained minimizer, for all rows at once and without any matrix inverse:
    Ŵ_j ← q_j(Ŵ_j - G_j / Σ_jj),        G = (Ŵ - W) Σ   [q, p],
and a sweep over all columns never increases f. Blocked like GPTQ: G is recomputed at the start of each sweep
(which also gives f = Σ D ⊙ G); inside a block of B columns each column adds the changes of the block's earlier
columns (one matvec), and after the block the later columns get G[:, i2:] += Δ Σ[i1:i2, i2:] as one matmul.
A relaxed sweep replaces q_j by clamping to the grid's range (the original code, linkedin/QuantEase, makes every
third of its sweeps unrounded and unclamped). Damping (ridge λI) changes only the solve; f is always undamped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from .base import QuantizedWeight, SolveResult, get_solver, layer_loss, register_solver
from .gptq import GPTQOptions, check_layer
from .grid import Grid, GridSpec, fit_grid

__all__ = ["QuantEaseOptions", "solve", "sweep_flops", "cd_sweep"]

_DEAD = 1e-10  # Σ_jj below this times mean(diag Σ): input treated as never active


@dataclass(frozen=True)
class QuantEaseOptions:
    """Defaults measured on SmolLM2-135M layers (scripts/bench_solvers.py; 3/4 bits, per channel and group 64).
    Mean layer error relative to GPTQ's after 1 / 3 / 10 sweeps: from act-order GPTQ .78 / .77 / .76, from plain
    GPTQ .90 / .86 / .84, from W 1.8 / 1.3 / 1.1. With tol=1e-3 the default stops after 6.5 sweeps on average."""

    sweeps: int = 10  # most rounded CD sweeps (tol usually stops earlier)
    init: str = "gptq"  # "gptq": start from GPTQ's Ŵ and grid; "w": Ŵ = W on fit_grid(W), first sweep rounds
    order: str = "natural"  # "natural" | "diag" (descending diag Σ)
    relax_sweeps: int = 0  # unrounded sweeps (clamped to the grid's range) before the rounded ones
    tol: float = 1e-3  # stop when a sweep improves f by less than tol · f
    damp: float = 0.0  # ridge λ = damp · mean(diag Σ) used by the solve only; the loss uses the undamped Σ
    block_size: int = 128  # columns per lazy-update block
    gptq_damp: float = 0.01  # options of the GPTQ initialization
    gptq_act_order: bool = True
    gptq_static_groups: bool = True  # groups stay contiguous in the checkpoint
    outliers: float = 0.0  # > 0: outlier-aware QuantEase (solvers/outliers.py); < 1 a fraction, else a count
    outlier_structure: str = "unstructured"  # "unstructured" (entries of W) | "column" (whole input columns)
    outlier_iters: int = 10  # alternations of one CD sweep on Q and one IHT step on H

    def __post_init__(self) -> None:
        if self.outlier_structure not in ("unstructured", "column"):
            raise UsageError(f"quantease outlier_structure must be 'unstructured' or 'column', "
                             f"got {self.outlier_structure!r}")
        if self.outliers >= 1 and self.outliers != int(self.outliers):
            raise UsageError(f"quantease outliers must be a fraction < 1 or a whole count, got {self.outliers}")
        if self.outlier_iters < 1:
            raise UsageError(f"quantease outlier_iters must be >= 1, got {self.outlier_iters}")
        if self.init not in ("gptq", "w"):
            raise UsageError(f"quantease init must be 'gptq' or 'w', got {self.init!r}")
        if self.order not in ("natural", "diag"):
            raise UsageError(f"quantease order must be 'natural' or 'diag', got {self.order!r}")
        for name in ("sweeps", "relax_sweeps", "tol", "damp", "outliers"):
            if getattr(self, name) < 0:
                raise UsageError(f"quantease {name} must be >= 0, got {getattr(self, name)}")
        if self.block_size < 1:
            raise UsageError(f"quantease block_size must be >= 1, got {self.block_size}")


def sweep_flops(q: int, p: int, block_size: int) -> float:
    """Floating-point operations of one sweep as implemented: residual G and f, and per block the strictly-lower
    triangular block product, the per-column matvecs, the per-column rounding and the lazy update of later columns."""
    flops = 2.0 * q * p * p + 4.0 * q * p  # Gᵀ = Σ Dᵀ, f, G += λD
    for i1 in range(0, p, block_size):
        b = min(block_size, p - i1)
        flops += 2.0 * q * b * b + 4.0 * q * b  # tril(Σ₁) Q₁ and V₁
        flops += q * b * (b - 1) + 6.0 * q * b  # matvecs N₁[:i]ᵀ Σ₁[i, :i], rounding
        flops += 2.0 * q * b * (p - i1 - b) + q * b  # lazy update of later columns, Δ₁
    return flops


def _residual(Qt: torch.Tensor, Wt: torch.Tensor, Sigma: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Gᵀ = (Σ + λI)(Q - W)ᵀ and the undamped f(Q) = Σ D ⊙ DΣ."""
    Dt = Qt - Wt  # [p, q]
    Gt = Sigma @ Dt  # [p, q]
    f = float((Dt * Gt).sum())
    return Gt.add_(Dt, alpha=lam), f


def _sweep(Qt: torch.Tensor, Gt: torch.Tensor, Sigma: torch.Tensor, dinv: torch.Tensor, st: torch.Tensor,
           zt: torch.Tensor, ot: torch.Tensor, maxq: int, block_size: int, relaxed: bool) -> None:
    """One cyclic pass over the columns of Q, in place. Tensors are transposed, [p, q]: row j is column j, so
    each update touches contiguous memory. Gt must be (Σ + λI)(Q - W)ᵀ on entry and is consumed.
    dinv[j] = 1/(Σ_jj + λ), 0 for dead inputs, which are skipped. Grid points are s·c - o (st, zt, ot [p, q]).
    In block i1:i2, new rows N₁, old Q₁, Σ₁:
        u_i = Q_i - dinv_i (G_i + Σ_{k<i} Σ₁[i, k] (N_k - Q_k)) = V_i - dinv_i N₁[:i]ᵀ Σ₁[i, :i],
        V = Q₁ - dinv (G₁ - tril(Σ₁, -1) Q₁)   (one matmul per block, so each column costs one matvec)."""
    p = Qt.shape[0]
    dinv_list = dinv.tolist()
    for i1 in range(0, p, block_size):
        i2 = min(i1 + block_size, p)
        S1 = Sigma[i1:i2, i1:i2]  # [B, B]
        Q1 = Qt[i1:i2]  # [B, q]
        d1 = dinv[i1:i2, None]  # [B, 1]
        V1 = Q1 - d1 * (Gt[i1:i2] - torch.tril(S1, -1) @ Q1)  # [B, q]
        N1 = Q1.clone()  # [B, q] new rows
        s1, z1, o1 = st[i1:i2], zt[i1:i2], ot[i1:i2]  # [B, q]
        for i in range(i2 - i1):
            if dinv_list[i1 + i] == 0:
                continue
            u = torch.addmv(V1[i], N1[:i].t(), S1[i, :i], alpha=-dinv_list[i1 + i])  # [q] real minimizer
            if relaxed:  # the grid's range; its ends swap where s < 0 (GGUF's signed scales)
                lo, hi = -o1[i], s1[i] * maxq - o1[i]
                torch.clamp(u, torch.minimum(lo, hi), torch.maximum(lo, hi), out=N1[i])
            else:  # nearest grid point; Ŵ = s c - o exactly as Grid.dequantize computes it
                c = torch.addcdiv(z1[i], u, s1[i]).round_().clamp_(0, maxq)
                torch.sub(c.mul_(s1[i]), o1[i], out=N1[i])
        Gt[i2:].addmm_(Sigma[i2:, i1:i2], N1 - Q1)  # later columns see this block's change
        Qt[i1:i2] = N1


def cd_sweep(Q: torch.Tensor, T: torch.Tensor, sigma: torch.Tensor, grid: Grid, block_size: int = 128,
             damp: float = 0.0) -> torch.Tensor:
    """One rounded CD sweep (natural order) of Q [q, p], on `grid`, toward the target T [q, p]: the QuantEase update
    for f(Q) = tr((Q - T) Σ (Q - T)ᵀ). Returns the new Q [q, p]; dead inputs keep their entries."""
    Qt, Tt = Q.t().contiguous(), T.t().contiguous()  # [p, q]
    st, zt = (x.t().contiguous() for x in grid.columns())  # [p, q]
    ot = grid.column_shifts().t().contiguous()  # [p, q]
    d = torch.diagonal(sigma)
    lam = damp * float(d.mean())
    dinv = torch.where(d > _DEAD * d.mean().clamp(min=0), 1 / (d + lam), torch.zeros_like(d))
    Gt, _ = _residual(Qt, Tt, sigma, lam)
    _sweep(Qt, Gt, sigma, dinv, st, zt, ot, grid.maxq, block_size, relaxed=False)
    return Qt.t()


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
    """Ŵ with the least f among the initial quantized Ŵ and every rounded sweep's iterate.

    history: f of the initial quantized Ŵ (RTN on the grid for init="w", whose sweeps start from W itself), then
    f after each rounded sweep (fp32, undamped Σ). Relaxed iterates are off the grid and are not recorded."""
    if options.outliers > 0:
        from .outliers import solve_with_outliers

        return solve_with_outliers(W, sigma, spec, options)
    check_layer(W, sigma)
    W, Sigma = W.float(), sigma.float()
    Q, grid, notes = _initialize(W, Sigma, spec, options)
    d = torch.diagonal(Sigma)  # [p]
    perm = torch.argsort(d, descending=True) if options.order == "diag" else torch.arange(W.shape[1], device=W.device)
    inv = torch.argsort(perm)
    Wt, Qt, Sigma, d = W[:, perm].t().contiguous(), Q[:, perm].t().contiguous(), Sigma[perm][:, perm], d[perm]
    st, zt = (x.t().contiguous() for x in grid.columns(perm))  # [p, q] each column's grid travels with it
    ot = grid.column_shifts(perm).t().contiguous()  # [p, q]
    live = d > _DEAD * d.mean().clamp(min=0)
    lam = options.damp * float(d.mean())
    dinv = torch.where(live, 1 / (d + lam), torch.zeros_like(d))  # [p]

    def on_grid(Xt: torch.Tensor) -> torch.Tensor:
        return grid.nearest(Xt, st, zt) * st - ot

    Qt[~live] = on_grid(Qt)[~live]  # dead inputs: nearest grid point, never updated
    best = on_grid(Qt) if options.init == "w" else Qt.clone()  # the quantized iterate to beat
    Gt, f = _residual(Qt, Wt, Sigma, lam)
    history = [f if options.init == "gptq" else _residual(best, Wt, Sigma, 0.0)[1]]
    # f of the quantized iterate the next sweep starts from (None: it starts from W or a relaxed iterate)
    prev: float | None = history[0] if options.init == "gptq" and not options.relax_sweeps else None
    for _ in range(options.relax_sweeps):
        _sweep(Qt, Gt, Sigma, dinv, st, zt, ot, grid.maxq, options.block_size, relaxed=True)
        Gt, _ = _residual(Qt, Wt, Sigma, lam)
    for _ in range(options.sweeps):
        _sweep(Qt, Gt, Sigma, dinv, st, zt, ot, grid.maxq, options.block_size, relaxed=False)
        Gt, f = _residual(Qt, Wt, Sigma, lam)
        if f < min(history):
            best = Qt.clone()
        history.append(f)
        if prev is not None and prev - f <= options.tol * prev:
            break
        prev = f

    W_hat = best.t()[:, inv]  # [q, p] original column order
    qw = QuantizedWeight.from_codes(grid.quantize(W_hat), grid, spec)
    assert torch.equal(qw.dequantize(), W_hat), "iterate left the grid"
    return SolveResult(qw, layer_loss(W, W_hat, sigma), history, notes)
