"""Outlier-aware QuantEase: Ŵ = Q + H with Q on the grid and H sparse, kept in fp16.

Behdin, Acharya, Gupta, Keerthi, Mazumder, Zhu, Song, "QuantEase" (arXiv 2309.01885), Section 4. Objective
    min  f(Q, H) = tr((Q + H - W) Σ (Q + H - W)ᵀ)   over Q on the grid and H with ||H||₀ ≤ s ("unstructured")
                                                     or H nonzero in at most s input columns ("column").
Start: H₀ = W on the s most sensitive entries (score W_ij² Σ_jj; columns: Σ_jj ||W_:j||²), rounded to fp16, and
Q₀ = QuantEase(W - H₀): its grid is fitted to W - H₀, which is ~0 at the outliers, so each row's range leaves them
out. Then alternate
    Q ← one QuantEase CD sweep toward the target W - H     (exact coordinate minimizers over the fixed grid)
    H ← P_s(H - η (Q + H - W) Σ),  η = 1/λ_max(Σ)          (one iterative hard-thresholding step; λ_max by power
                                                            iteration; P_s keeps the s largest |entries| or the s
                                                            columns of largest norm; values rounded to fp16)
and return the iterate of least f, with plain QuantEase on W (H = 0) as one more candidate, so the result is never
worse than plain QuantEase at the same bits. A propagated target (base.py) adds α W Δ to both gradients. Unlike the reference code (whose outlier variant writes the CD result
into the wrong buffer and so returns W unquantized), Q is asserted to lie on the grid.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .base import Outliers, QuantizedWeight, SolveResult, Target, get_solver, layer_loss
from .gptq import check_layer
from .grid import GridSpec
from .quantease import cd_sweep

__all__ = ["solve_with_outliers", "outlier_count", "lambda_max"]


def outlier_count(amount: float, total: int) -> int:
    """The budget s: a fraction (< 1) of `total` (q·p entries or p columns), or a count; at least 1, at most total."""
    s = round(amount * total) if amount < 1 else int(amount)
    return max(1, min(total, s))


def lambda_max(sigma: torch.Tensor, iters: int = 100) -> float:
    """Largest eigenvalue of the PSD Σ [p, p] by power iteration from a fixed start (a lower bound, tight here)."""
    v = torch.ones(sigma.shape[0], device=sigma.device) + 0.01 * torch.arange(sigma.shape[0], device=sigma.device)
    lam = 0.0
    for _ in range(iters):
        u = sigma @ v
        lam = float(u.norm())
        if lam == 0:
            return 0.0
        v = u / lam
    return float(v @ (sigma @ v))


def _project(Z: torch.Tensor, s: int, structure: str) -> Outliers:
    """P_s(Z) for Z [q, p]: the s largest entries, or the s columns of largest norm; values in fp16."""
    if structure == "column":
        idx = torch.topk(Z.norm(dim=0), s).indices.sort().values  # [s]
        return Outliers(structure, idx, Z[:, idx].half())  # values [q, s]
    idx = torch.topk(Z.abs().flatten(), s).indices.sort().values  # [s]
    return Outliers(structure, idx, Z.flatten()[idx].half())  # values [s]


def _initial(W: torch.Tensor, sigma: torch.Tensor, s: int, structure: str) -> Outliers:
    """H₀: W on the most sensitive entries (columns), by the output energy they carry."""
    d = torch.diagonal(sigma).clamp(min=0)  # [p]
    score = W**2 * d  # [q, p]
    if structure == "column":
        idx = torch.topk(score.sum(dim=0), s).indices.sort().values
        return Outliers(structure, idx, W[:, idx].half())
    idx = torch.topk(score.flatten(), s).indices.sort().values
    return Outliers(structure, idx, W.flatten()[idx].half())


@torch.no_grad()
def solve_with_outliers(W: torch.Tensor, sigma: torch.Tensor | None, spec: GridSpec, options: Any,
                        target: Target | None = None) -> SolveResult:
    """Q + H of least f (see the module docstring). history: f of plain QuantEase, of (Q₀, H₀), then after each
    alternation (one CD sweep and one IHT step); it stops early when an alternation gains less than tol · f."""
    check_layer(W, sigma)
    W, Sigma = W.float(), sigma.float()
    q, p = W.shape
    qe = get_solver("quantease")
    inner = replace(options, outliers=0.0)
    plain = qe.solve(W, Sigma, spec, inner, target)
    s = outlier_count(options.outliers, p if options.outlier_structure == "column" else q * p)
    H = _initial(W, Sigma, s, options.outlier_structure)
    shift = None if target is None else target.shift(W)  # [q, p]
    # Q₀ only starts the alternation: solved with the target as seen from W - H₀ (its shift differs from the exact
    # α W Δ by α H₀ Δ); every later step and every f uses the exact shift
    start = qe.solve(W - H.dense(q, p), Sigma, spec, inner, target)
    grid, Q = start.weight.grid, start.weight.dequantize()  # [q, p] on the grid
    f = layer_loss(W, Q + H.dense(q, p), Sigma, target)
    history, best = [plain.loss, f], (f, Q, H)
    eta = 1 / max(lambda_max(Sigma), 1e-30)
    for _ in range(options.outlier_iters):
        Hd = H.dense(q, p)
        Q = cd_sweep(Q, W - Hd, Sigma, grid, options.block_size, options.damp, shift)
        grad = (Q + Hd - W) @ Sigma if shift is None else (Q + Hd - W) @ Sigma - shift  # ∇f / 2 in H
        H = _project(Hd - eta * grad, s, options.outlier_structure)  # IHT step
        f_prev, f = f, layer_loss(W, Q + H.dense(q, p), Sigma, target)
        history.append(f)
        if f < best[0]:
            best = (f, Q, H)
        if f_prev - f <= options.tol * f_prev:
            break
    notes = list(plain.notes) + list(start.notes)
    if plain.loss <= best[0]:  # keep the budget's storage layout; H = 0 adds nothing
        notes.append("outliers: plain QuantEase was best; H = 0")
        zero = Outliers(H.structure, H.index, torch.zeros_like(H.values))
        qw = replace(plain.weight, outliers=zero)
    else:
        qw = QuantizedWeight.from_codes(grid.quantize(best[1]), grid, spec)
        assert torch.equal(qw.dequantize(), best[1]), "iterate left the grid"
        qw.outliers = best[2]
    return SolveResult(qw, layer_loss(W, qw.dequantize(), sigma, target), history, notes)

