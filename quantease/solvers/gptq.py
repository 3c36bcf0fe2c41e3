"""GPTQ: greedy column-by-column quantization with optimal error feedback.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv 2210.17323), Algorithm 1. Objective  f(Ŵ) = tr((W - Ŵ) Σ (W - Ŵ)ᵀ)  over Ŵ on the grid.
With H = Σ + λI (λ = damp · mean diag Σ) and U the upper Cholesky factor of H⁻¹, column j is rounded and its
error moved onto the columns not yet quantized, which is the optimal correction of those columns (OBS):
    Q_j = q_j(W_j),    Err_j = (W_j - Q_j) / U_jj,    W_k ← W_k - Err_j U_jk   (k > j).
Updates are lazy: inside a block of B columns each column collects the feedback of the block's earlier columns
(one matvec), and after the block the later columns get W[:, i2:] -= Err U[i1:i2, i2:] as one matmul.
With a propagated target (base.py; GPTAQ, QEP) f(Ŵ) = tr((Ŵ - W̃) H (Ŵ - W̃)ᵀ) + const, so the same algorithm runs
on W̃ = W + α W Δ H⁻¹ (H⁻¹ = UᵀU from the factor GPTQ computes anyway), with the grids still fitted to W.
The defaults are act-order with static groups, as production GPTQ (llm-compressor's actorder="static") runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NumericalError, UsageError
from .base import (QuantizedWeight, SolveResult, Target, layer_loss, loss_workspace, register_solver, register_stacked,
                   split_stacked)
from .grid import Grid, GridSpec, fit_grid

__all__ = ["GPTQOptions", "check_layer", "quantize", "solve", "solve_stacked", "workspace"]

_FIRST_RETRY_DAMP = 1e-4  # retry damping when the configured one is 0


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # λ = damp · mean(diag Σ) added to Σ's diagonal
    block_size: int = 128  # columns per lazy-update block
    act_order: bool = True  # quantize columns in order of descending diag Σ
    static_groups: bool = True  # fit every group's grid on the original W up front (groups stay contiguous)
    max_damp_retries: int = 5  # Cholesky failures retried with 10x the damping each time

    def __post_init__(self) -> None:
        if self.damp < 0:
            raise UsageError(f"gptq damp must be >= 0, got {self.damp}")
        if self.block_size < 1:
            raise UsageError(f"gptq block_size must be >= 1, got {self.block_size}")
        if self.max_damp_retries < 0:
            raise UsageError(f"gptq max_damp_retries must be >= 0, got {self.max_damp_retries}")


def check_layer(W: torch.Tensor, sigma: torch.Tensor | None) -> None:
    """Reject a layer problem that no solver can work on, naming what is wrong."""
    if sigma is None:
        raise UsageError("this method needs calibration statistics (Σ); use method 'rtn' to quantize without data")
    if W.dim() != 2 or sigma.shape != (W.shape[1], W.shape[1]):
        raise UsageError(f"weight {tuple(W.shape)} and Σ {tuple(sigma.shape)} do not match: Σ must be [in, in]")
    if not (torch.isfinite(W).all() and torch.isfinite(sigma).all()):
        raise NumericalError("NaN or Inf in the weight or its calibration statistics Σ")


def _inverse_cholesky(H: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor | None, str | None]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H), retrying with 10x damping on failure.

    If every try fails, U is None: each column is then rounded with no error feedback (RTN on the same grids).
    At most three [p, p] matrices besides H are alive at once (the damped copy or L, then L⁻ᵀL⁻¹, then U)."""
    mean_diag = float(torch.diagonal(H).mean())
    tried = []
    for _ in range(retries + 1):
        tried.append(damp)
        Hd = H.clone()  # [p, p]
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)  # [p, p] lower
        del Hd
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)  # [p, p]
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)  # [p, p] upper
            del Hinv
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                note = None if len(tried) == 1 else f"gptq: Cholesky failed with damp={tried[0]:g}, used damp={damp:g}"
                return U, note
        damp = max(10 * damp, _FIRST_RETRY_DAMP)
    return None, f"gptq: Cholesky failed for every damp in {tried}; fell back to RTN"


def _block_width(block_size: int, group_size: int | None) -> int:
    """Block width; with per-group grids a multiple of the group size, so a group never straddles two blocks
    and its grid is fitted on fully error-updated columns."""
    if group_size is None:
        return block_size
    return max(group_size, block_size // group_size * group_size)


def _quantize_columns(Wt: torch.Tensor, U: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
                      shift_t: torch.Tensor, gpos: list[int], spec: GridSpec, d: torch.Tensor, dynamic: bool,
                      block_size: int) -> torch.Tensor:
    """Codes [p, q] of Wᵀ [p, q] (consumed), rows in processing order. Row j of every [p, q] tensor is column j.

    Inside a block the error feedback is applied left-looking: column j is read as W_j - Σ_{i1<=k<j} Err_k U_kj
    (one matvec) instead of updating all later block columns after each one; same arithmetic, contiguous rows.
    Dynamic group grids (scale_t, zero_t, shift_t [G, q]) are fitted on the group's current columns when it starts.
    Q_j = s · c - o, the grid's own dequantization (Grid.dequantize)."""
    p = Wt.shape[0]
    codes = torch.empty_like(Wt)  # [p, q]
    rdiag = (1 / torch.diagonal(U)).tolist()
    fp16_span = torch.finfo(torch.float16).max * spec.maxq / 2  # largest |w| an fp16 scale can cover
    for i1 in range(0, p, block_size):
        i2 = min(i1 + block_size, p)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]  # [B, q], [B, B]
        Err1 = torch.zeros_like(W1)  # [B, q]
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % spec.group_size == 0:
                e = i + spec.group_size  # blocks are group-aligned, so the group lies in this block
                Wg = torch.addmm(W1[i:e], U1[:i, i:e].t(), Err1[:i], alpha=-1)  # [gs, q] current columns
                # clamped: with Σ near-singular and no damping the feedback can outgrow any fp16 scale
                g = fit_grid(Wg.t().clamp(-fp16_span, fp16_span), spec, d[j : j + spec.group_size])
                scale_t[gpos[j]], zero_t[gpos[j]], shift_t[gpos[j]] = g.scale[:, 0], g.zero[:, 0], g.shift[:, 0]
            s, z, o = scale_t[gpos[j]], zero_t[gpos[j]], shift_t[gpos[j]]  # [q] each
            w = torch.addmv(W1[i], Err1[:i].t(), U1[:i, i], alpha=-1)  # [q] column j with all feedback
            c = torch.clamp(torch.addcdiv(z, w, s).round_(), 0, spec.maxq, out=codes[j])  # [q]
            torch.sub(w, (c * s).sub_(o), out=Err1[i]).mul_(rdiag[j])  # Err_j = (W_j - Q_j) / U_jj
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    return codes


def workspace(q: int, p: int, options: GPTQOptions, target: bool) -> int:
    """The larger of the factorization (four [p, p] fp32: H, its damped copy, LAPACK's working copy and the factor,
    with four [q, p]: W, its permuted copy, Wᵀ and the codes; measured 3.8 [p, p] on the CPU) and the loss (Ŵ,
    uint8 codes and `loss_workspace`); a propagated target adds W̃'s two [q, p] temporaries."""
    factor = 16 * p * p + 16 * q * p
    loss = 5 * q * p + loss_workspace(q, p)
    return max(factor, loss) + (8 * q * p if target else 0)


@register_solver("gptq", GPTQOptions, workspace=workspace)
@torch.no_grad()
def solve(W: torch.Tensor, sigma: torch.Tensor | None, spec: GridSpec, options: GPTQOptions = GPTQOptions(),
          target: Target | None = None) -> SolveResult:
    """GPTQ codes in original column order; g_idx maps each column to its group (non-contiguous with act_order
    and dynamic groups). loss is f with the undamped Σ (and the target); notes record damping retries and the RTN
    fallback, which rounds W itself."""
    check_layer(W, sigma)
    qw, notes = quantize(W, sigma, spec, options, target)
    loss = layer_loss(W.float(), qw.dequantize(), sigma, target)  # undamped Σ
    return SolveResult(qw, loss, [loss], notes)


def quantize(W: torch.Tensor, sigma: torch.Tensor, spec: GridSpec, options: GPTQOptions,
             target: Target | None = None, shift: torch.Tensor | None = None) -> tuple[QuantizedWeight, list[str]]:
    """`solve` without the loss (QuantEase starts from it and measures f its own way): the codes and the notes.
    shift: target.shift(W), where the caller already has it."""
    W_orig = W.float()
    q, p = W_orig.shape
    n_groups = spec.groups(p)
    H = sigma.float().clone()  # [p, p]
    dead = torch.diagonal(H) == 0  # inputs never active: any value is free, take 0
    H[dead, dead] = 1
    W = W_orig.clone()  # [q, p]
    W[:, dead] = 0
    d = torch.diagonal(H).clone()  # [p] (clip="mse" weights)

    perm = torch.argsort(d, descending=True) if options.act_order else torch.arange(p, device=W.device)
    dynamic = spec.independent_groups and not options.static_groups
    if dynamic:  # grids fitted while quantizing; group = position in processing order
        scale_t = torch.empty(n_groups, q, device=W.device)  # [G, q]
        zero_t, shift_t = torch.empty_like(scale_t), torch.empty_like(scale_t)  # [G, q]
        gpos = (torch.arange(p, device=W.device) // spec.group_size).tolist()
    else:
        grid = fit_grid(W, spec, d)
        scale_t, zero_t, shift_t = (t.t().contiguous() for t in (grid.scale, grid.zero, grid.shift))  # [G, q]
        gpos = grid.g_idx[perm].tolist()

    H = H[perm][:, perm] if options.act_order else H  # [p, p] processing order
    U, note = _inverse_cholesky(H, options.damp, options.max_damp_retries)  # [p, p]
    del H
    Wp = W[:, perm]  # [q, p] processing order
    del W
    if U is None:
        U = torch.eye(p, device=Wp.device)
    elif target is not None:  # W̃ = W + α W Δ H⁻¹, H⁻¹ = UᵀU
        Wp = Wp + ((target.shift(W_orig) if shift is None else shift)[:, perm] @ U.t()) @ U
    B = _block_width(options.block_size, spec.group_size if dynamic else None)
    Wt = Wp.t().contiguous()  # [p, q]
    del Wp
    codes = _quantize_columns(Wt, U, scale_t, zero_t, shift_t, gpos, spec, d[perm], dynamic, B)
    del Wt, U  # only what the loss needs stays: at most [p, p] Σ and a few [q, p]

    if dynamic:
        g_idx = torch.empty(p, dtype=torch.long, device=codes.device)
        g_idx[perm] = torch.tensor(gpos, device=codes.device)
        offset = shift_t.t().contiguous() if spec.float_offset else None
        grid = Grid(scale_t.t().contiguous(), zero_t.t().contiguous(), g_idx, spec.maxq, offset)
    # static groups: `grid` is the fitted one, unchanged
    return QuantizedWeight.from_codes(codes.t()[:, torch.argsort(perm)], grid, spec), [note] if note else []


@register_stacked("gptq")
def solve_stacked(Ws: list[torch.Tensor], sigma: torch.Tensor, spec: GridSpec, options: GPTQOptions = GPTQOptions(),
                  target: Target | None = None) -> list[SolveResult]:
    """`solve` of each layer of Ws (all reading the input Σ describes) as one solve of their stacked rows: one
    Cholesky, and each column's rounding and feedback one operation over every layer's rows."""
    return split_stacked(solve(torch.cat(Ws), sigma, spec, options, target), Ws, sigma, spec, target)
