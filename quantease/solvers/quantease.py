"""QuantEase: cyclic coordinate descent on the layer objective, with the grid held fixed.

Behdin, Acharya, Gupta, Keerthi, Mazumder, Zhu, Song, "QuantEase: Optimization-based Quantization for Language
Models" (arXiv 2309.01885), Section 3, Algorithm 1. Objective  f(Ŵ) = tr((Ŵ - W) Σ (Ŵ - W)ᵀ).  With every other
column fixed, f is a 1-D quadratic in each entry of column j, so its exact minimizer over the grid is the nearest
grid point of the unconstrained minimizer, for all rows at once and without any matrix inverse:
    Ŵ_j ← q_j(Ŵ_j - G_j / Σ_jj),        G = (Ŵ - W) Σ   [q, p],
and a sweep over all columns never increases f. Blocked like GPTQ: inside a block of B columns each column adds
the changes of the block's earlier columns (one matvec), and after the block the later columns get
G[:, i2:] += Δ Σ[i1:i2, i2:] as one matmul. After the sweep each block adds the changes of itself and the later
blocks, G[:, i1:i2] += Δ[:, i1:] Σ[i1:, i1:i2], so G is the new iterate's residual (and f = ⟨D, G⟩ up to the
target's terms) without recomputing (Ŵ - W) Σ: a sweep costs q·p² multiply-adds for G, as one [q, p] @ [p, p]
matmul does, plus about q·p·B/2 in the column loops. That is the sweep from an iterate off the grid (the first from
W, relaxed sweeps) and the reference. A sweep from an iterate on the grid changes only 0.1-1.5% of its entries, so
on the CPU it runs `cd_kernel.cd_sweep_rows` instead: row by row, each change δ at column j adds δ Σ_j to the row's
G at once (contiguous), so G stays exact with about p multiply-adds per change instead of q·p² per sweep. G is
computed once, from the start, and kept exact by every sweep and refit after it.
A relaxed sweep replaces q_j by clamping to the grid's range (the original code, linkedin/QuantEase, makes every
third of its sweeps unrounded and unclamped). Damping (ridge λI) changes only the solve; f is always undamped.

Propagated target (base.py): f(Ŵ) = ||W X_α - Ŵ X||² / N changes only the residual, G = (Ŵ - W) Σ - α W Δ; the
sweep is the same, and its GPTQ initialization quantizes toward the same target.

Grid refit (`refit` rounds, beyond the paper): with the codes c fixed, f is a convex quadratic in each group's scale
s and zero z (Ŵ_g = s (c_g - z)). Group by group, with the residual G kept exact,
    s ← s + t,   t = -⟨u, G_g⟩ / (u Σ_gg uᵀ),   u = c_g - z          (then rounded to fp16, as stored)
    z ← clamp(round(z + τ), 0, 2^b - 1),   τ = Σ_j G'_gj / (s 1ᵀ Σ_gg 1)   (G' after the scale step; asymmetric only)
per row at once: z stays an integer (the formats store integer zero points), and for a convex quadratic in one
variable the nearest integer to the minimizer is the best integer. G follows each group's step as a rank-one-per-row
update, so a refit round costs one [q, p] @ [p, p] matmul in all (`_refit`). Each refit is followed by CD sweeps on
the new grid; the iterate of least f over all rounds is returned. GGUF grids (float offsets, K-quant sub-block
scales under one fp16 scale) keep the grid llama.cpp's fit gives them: no refit.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..errors import UsageError
from . import cd_kernel, cd_triton
from .base import QuantizedWeight, SolveResult, Target, get_solver, layer_loss, register_solver, register_stacked
from .gptq import GPTQOptions, check_layer
from .gptq import quantize as gptq_quantize
from .gptq import workspace as gptq_workspace
from .grid import _MIN_SCALE, SCALE_DTYPE, Grid, GridSpec, fit_grid

__all__ = ["QuantEaseOptions", "solve", "solve_stacked", "sweep_flops", "cd_sweep", "refit_grid", "workspace"]

_DEAD = 1e-10  # Σ_jj below this times mean(diag Σ): input treated as never active


@dataclass(frozen=True)
class QuantEaseOptions:
    """Defaults measured on SmolLM2-135M layers (scripts/bench_solvers.py; 3/4 bits, per channel and group 64).
    Mean layer error relative to GPTQ's after 1 / 3 / 10 sweeps: from act-order GPTQ .78 / .77 / .76, from plain
    GPTQ .90 / .86 / .84, from W 1.8 / 1.3 / 1.1. With tol=1e-3 the default stops after 6.5 sweeps on average.
    refit=2 on the whole model (README "Solvers"): W3 per channel PTB/wiki 114.5/173.8 -> 97.3/125.5, W4 55.2/30.6
    -> 54.5/30.0."""

    sweeps: int = 10  # most rounded CD sweeps (tol usually stops earlier)
    init: str = "gptq"  # "gptq": start from GPTQ's Ŵ and grid; "w": Ŵ = W on fit_grid(W), first sweep rounds
    order: str = "natural"  # "natural" | "diag" (descending diag Σ)
    relax_sweeps: int = 0  # unrounded sweeps (clamped to the grid's range) before the rounded ones
    tol: float = 1e-3  # stop when a sweep improves f by less than tol · f
    refit: int = 2  # rounds of (closed-form grid refit for the fixed codes, then CD sweeps) after the first CD
    kernel: str = "auto"  # column loop: "auto" (compiled on CPU, solvers/cd_kernel.py) | "plain" (torch ops)
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
        if self.kernel not in ("auto", "plain"):
            raise UsageError(f"quantease kernel must be 'auto' or 'plain', got {self.kernel!r}")
        if self.order not in ("natural", "diag"):
            raise UsageError(f"quantease order must be 'natural' or 'diag', got {self.order!r}")
        for name in ("sweeps", "relax_sweeps", "tol", "damp", "outliers", "refit"):
            if getattr(self, name) < 0:
                raise UsageError(f"quantease {name} must be >= 0, got {getattr(self, name)}")
        if self.block_size < 1:
            raise UsageError(f"quantease block_size must be >= 1, got {self.block_size}")


def sweep_flops(q: int, p: int, block_size: int) -> float:
    """Floating-point operations of one sweep as implemented: per block the per-column matvecs over the block's
    earlier changes, u and the rounding, and the lazy update of later columns; then the completion of G by each
    block's and the later blocks' changes, G += λΔ, and f."""
    flops = 2.0 * q * p + 5.0 * q * p  # G += λΔ; D and f
    for i1 in range(0, p, block_size):
        b = min(block_size, p - i1)
        flops += q * b * (b - 1) + 9.0 * q * b  # matvecs Δ₁[:i]ᵀ Σ₁[i, :i], u, rounding, Δ
        flops += 2.0 * q * b * (p - i1 - b)  # lazy update of later columns
        flops += 2.0 * q * b * (p - i1)  # completion: this block's and the later blocks' changes
    return flops


def _residual(Q: torch.Tensor, W: torch.Tensor, Sigma: torch.Tensor, lam: float, B: torch.Tensor | None = None
              ) -> torch.Tensor:
    """G = (Q - W)(Σ + λI) - B [q, p], the residual of the (damped) objective; B = α W Δ of a propagated target."""
    D = Q - W  # [q, p]
    G = D @ Sigma
    if B is not None:
        G.sub_(B)
    return G.add_(D, alpha=lam)


def _losses(Q: torch.Tensor, G: torch.Tensor, W: torch.Tensor, lam: float, B: torch.Tensor | None,
            consts: tuple[float, ...], segments: tuple[slice, ...]) -> list[float]:
    """Each segment's (rows of Q: layers stacked on one Σ) undamped f(Q) = ⟨D, DΣ⟩ - 2⟨D, B⟩ + const, D = Q - W,
    from the residual G = (Σ + λI)D - B (`_residual`): with DΣ = G + B - λD, f = ⟨D, G⟩ - λ⟨D, D⟩ - ⟨D, B⟩ + const.
    Each segment's f is summed over its own rows, as a solve of that layer alone would."""
    D = Q - W  # [q, p]
    fs = [float((D[s] * G[s]).sum()) for s in segments]
    if lam:
        fs = [f - lam * float(D[s].square().sum()) for f, s in zip(fs, segments)]
    if B is not None:
        fs = [f + c - float((D[s] * B[s]).sum()) for f, c, s in zip(fs, consts, segments)]
    return fs


def _sweep(Qt: torch.Tensor, Gt: torch.Tensor, Sigma: torch.Tensor, dinv: torch.Tensor, st: torch.Tensor,
           zt: torch.Tensor, ot: torch.Tensor, maxq: int, block_size: int, relaxed: bool, kernel: str = "auto",
           lam: float = 0.0, complete: bool = True) -> None:
    """One cyclic pass over the columns of Q, in place. Tensors are transposed, [p, q]: row j is column j, so
    each update touches contiguous memory. Gt must be (Σ + λI)(Q - W)ᵀ (- Bᵀ) on entry; on exit it is that of the
    new Q, or, with complete=False (a caller that starts its next sweep elsewhere), consumed.
    dinv[j] = 1/(Σ_jj + λ), 0 for dead inputs, which are skipped. Grid points are s·c - o (st, zt, ot [p, q]).
    In block i1:i2, with Σ₁ its diagonal block, G₁ its residual rows at the block's start and Δ its changes so far,
        u_i = Q_i - dinv_i (G_i + Σ_{k<i} Σ₁[i, k] Δ_k)        (one matvec per column)
    and Q_i becomes u_i's nearest grid point. kernel="auto" runs each block's column loop as one compiled kernel:
    numba on CPU (cd_kernel.py), Triton on CUDA (cd_triton.py); "plain" (or neither usable) as torch ops, column by
    column."""
    p = Qt.shape[0]
    compiled = _compiled_block(kernel, Qt, Sigma)
    dinv_list = None if compiled else dinv.tolist()
    Dt = torch.empty_like(Qt)  # [p, q] the sweep's change of Q
    for i1 in range(0, p, block_size):
        i2 = min(i1 + block_size, p)
        # Q₁, Δ₁ [B, q], Σ₁ [B, B], G₁ and the grid's columns [B, q]
        blk = (Qt[i1:i2], Dt[i1:i2], Sigma[i1:i2, i1:i2], Gt[i1:i2], st[i1:i2], zt[i1:i2], ot[i1:i2])
        if compiled:
            compiled(*blk, dinv[i1:i2], maxq, relaxed)
        else:
            _column_loop(*blk, dinv_list[i1:i2], maxq, relaxed)
        Gt[i2:].addmm_(Sigma[i2:, i1:i2], Dt[i1:i2])  # later columns see this block's change
    if not complete:
        return
    for i1 in range(0, p, block_size):  # each block's residual gets its own and the later blocks' changes
        Gt[i1:i1 + block_size].addmm_(Sigma[i1:i1 + block_size, i1:], Dt[i1:])
    if lam:
        Gt.add_(Dt, alpha=lam)


def _compiled_block(kernel: str, *tensors: torch.Tensor) -> Callable[..., None] | None:
    """The compiled column loop of one block for these tensors' device (kernel="auto"), or None for the plain loop."""
    if kernel == "auto":
        for module in (cd_kernel, cd_triton):
            if module.usable(*tensors):
                return module.cd_block
    return None


def _column_loop(Q1: torch.Tensor, D1: torch.Tensor, S1: torch.Tensor, G1: torch.Tensor, s1: torch.Tensor,
                 z1: torch.Tensor, o1: torch.Tensor, dinv: list[float], maxq: int, relaxed: bool) -> None:
    """The reference column loop of one block (see `_sweep`), in place on Q1 [B, q], its changes into D1 [B, q]."""
    for i in range(Q1.shape[0]):
        if dinv[i] == 0:
            D1[i] = 0
            continue
        u = torch.addmv(G1[i], D1[:i].t(), S1[i, :i]).mul_(-dinv[i]).add_(Q1[i])  # [q] real minimizer
        if relaxed:  # the grid's range; its ends swap where s < 0 (GGUF's signed scales)
            lo, hi = -o1[i], s1[i] * maxq - o1[i]
            new = torch.clamp(u, torch.minimum(lo, hi), torch.maximum(lo, hi))
        else:  # nearest grid point; Ŵ = s c - o exactly as Grid.dequantize computes it
            c = torch.addcdiv(z1[i], u, s1[i]).round_().clamp_(0, maxq)
            new = c.mul_(s1[i]).sub_(o1[i])
        torch.sub(new, Q1[i], out=D1[i])
        Q1[i] = new



def cd_sweep(Q: torch.Tensor, T: torch.Tensor, sigma: torch.Tensor, grid: Grid, block_size: int = 128,
             damp: float = 0.0, shift: torch.Tensor | None = None) -> torch.Tensor:
    """One rounded CD sweep (natural order) of Q [q, p], on `grid`, toward the target T [q, p]: the QuantEase update
    for f(Q) = tr((Q - T) Σ (Q - T)ᵀ) - 2⟨Q, shift⟩ (shift = α W Δ of a propagated target, or None). Returns the new
    Q [q, p]; dead inputs keep their entries."""
    st, zt = (x.t().contiguous() for x in grid.columns())  # [p, q]
    ot = grid.column_shifts().t().contiguous()  # [p, q]
    d = torch.diagonal(sigma)
    lam = damp * float(d.mean())
    dinv = torch.where(d > _DEAD * d.mean().clamp(min=0), 1 / (d + lam), torch.zeros_like(d))
    Gt = _residual(Q, T, sigma, lam, shift).t().contiguous()  # [p, q]
    Qt = Q.t().contiguous()  # [p, q]
    _sweep(Qt, Gt, sigma, dinv, st, zt, ot, grid.maxq, block_size, relaxed=False, complete=False)
    return Qt.t()


def refit_grid(W: torch.Tensor, W_hat: torch.Tensor, sigma: torch.Tensor, grid: Grid, sym: bool,
               shift: torch.Tensor | None = None) -> Grid:
    """The grid of least f for the codes of W_hat [q, p] (on `grid`), one group at a time (module docstring)."""
    G = (W_hat - W) @ sigma  # [q, p]
    if shift is not None:
        G -= shift
    return _refit(grid.quantize(W_hat), G, sigma, grid, sym)


def _refit(codes: torch.Tensor, G: torch.Tensor, sigma: torch.Tensor, grid: Grid, sym: bool,
           QS: torch.Tensor | None = None) -> Grid:
    """`refit_grid` for the codes [q, p] given the residual G = (Ŵ - W) Σ - shift [q, p] of their Ŵ, which it
    updates in place to the new Ŵ's. G is kept exact after each group, so each step minimizes f given the others.
    A row's new (s, z) is taken only where its change Δf = 2⟨δ, G_g⟩ + δ Σ_gg δᵀ is negative: the fp16 rounding of
    s can make the step a loss once s is already (nearly) optimal, and then the row keeps its grid, so f never
    increases. With u = c_g - z and c = 1ᵀΣ[g, :], the change δ = (s' - s) u - s' (z' - z) 1 of Ŵ_g moves G by
    (s' - s) u Σ[g, :] - s' (z' - z) c and f by per-row scalars of u, G_g, u Σ_gg and c: the groups' products
    u Σ[g, :] add up to one [q, p] @ [p, p] matmul. With one group per row (per channel) and QS = Ŵ Σ given, it is
    none: u = Ŵ / s row by row, exactly (s (c - z) is exact in fp32), so u Σ = QS / s."""
    scale, zero = grid.scale.clone(), grid.zero.clone()  # [q, G]
    fp16_max = torch.finfo(SCALE_DTYPE).max
    for g in range(scale.shape[1]):
        cols = torch.nonzero(grid.g_idx == g).flatten()  # [k]
        if int(cols[-1] - cols[0]) + 1 == cols.numel():  # contiguous: views, not copies
            cols = slice(int(cols[0]), int(cols[-1]) + 1)
        rows = sigma[cols]  # [k, p] Σ[g, :]
        c = rows.sum(0)  # [p]
        Gg = G[:, cols]  # [q, k]
        s_old, z_old = scale[:, g], zero[:, g]  # [q]
        u = codes[:, cols] - z_old[:, None]  # [q, k]
        one_group = rows.shape[0] == sigma.shape[0]
        if one_group and QS is not None:
            uS = QS / s_old[:, None]  # [q, p] u Σ
        else:
            uS = u @ (rows if one_group else rows[:, cols])  # [q, k] u Σ_gg
        den = torch.einsum("ij,ij->i", uS, u)  # [q]
        uG = torch.einsum("ij,ij->i", u, Gg)  # [q]
        s_new = s_old - uG / den.clamp(min=1e-30)  # [q] exact minimizer in s
        s_new = torch.where((den > 0) & (s_new > 0), s_new, s_old)  # a sign flip is never the least f here
        s_new = s_new.clamp(_MIN_SCALE, fp16_max).to(SCALE_DTYPE).float()
        ds = s_new - s_old  # [q]
        z_new = z_old
        cg = c[cols]  # [k] 1ᵀ Σ_gg
        a = float(cg.sum())  # 1ᵀ Σ_gg 1, the same for every row
        G1, uS1 = Gg.sum(1), uS.sum(1)  # [q]
        if not sym and a > 0:
            z_new = (z_old + (G1 + ds * uS1) / (s_new * a)).round().clamp(0, grid.maxq)  # G' = G after the s step
        sz = s_new * (z_new - z_old)  # [q]
        # Δf = 2⟨δ, G_g⟩ + δ Σ_gg δᵀ with δ = ds u - sz 1, expanded into the per-row scalars
        gain = 2 * (ds * uG - sz * G1) + ds * ds * den - 2 * ds * sz * uS1 + sz * sz * a
        take = gain < 0
        ds, sz = ds * take, sz * take
        if one_group:
            G.addcmul_(uS, ds[:, None])
        else:
            G.addmm_(u * ds[:, None], rows)
        G.addr_(sz, c, alpha=-1)
        scale[:, g], zero[:, g] = torch.where(take, s_new, s_old), torch.where(take, z_new, z_old)
    return Grid(scale, zero, grid.g_idx, grid.maxq)


def _initialize(W: torch.Tensor, sigma: torch.Tensor, spec: GridSpec, options: QuantEaseOptions,
                target: Target | None, shift: torch.Tensor | None) -> tuple[torch.Tensor, Grid, list[str]]:
    """Starting Ŵ, the grid CD keeps fixed, and notes from the initialization (shift: the target's α W Δ)."""
    if options.init == "w":
        return W.clone(), fit_grid(W, spec, torch.diagonal(sigma)), []
    gptq = GPTQOptions(options.gptq_damp, act_order=options.gptq_act_order, static_groups=options.gptq_static_groups)
    qw, notes = gptq_quantize(W, sigma, spec, gptq, target, shift)
    return qw.dequantize(), qw.grid, notes


@dataclass
class _Best:
    """A segment's least-f iterate so far: f, the stacked grid it lies on and, unless `current` (the segment's rows of
    the iterate are it), its rows [q_s, p] in the working layout."""

    f: float
    Q: torch.Tensor | None
    grid: Grid
    current: bool = False


class _Problem:
    """The CD problem of one layer, or of several layers stacked by rows on their shared Σ (`segments`: each layer's
    rows), with the columns permuted by `perm` (order="diag"; the grid's g_idx travels with them). Rows never
    interact, so every segment follows exactly the path it would alone: a segment whose sweeps have stopped gaining
    is frozen while the others go on, and the bookkeeping (f, tol, keep-the-best) is per segment.

    Sweeps from an iterate on the grid run `cd_kernel.cd_sweep_rows` (CPU, kernel="auto"), which keeps G exact and
    returns the change of f; others (the first sweep from W, relaxed sweeps, kernel="plain", CUDA) run the blocked `_sweep` on
    the transposed layout. G is computed once from the start and then kept exact by the sweeps and the refits."""

    def __init__(self, W: torch.Tensor, Sigma: torch.Tensor, options: QuantEaseOptions, shift: torch.Tensor | None,
                 consts: list[float], segments: list[slice]):
        d = torch.diagonal(Sigma)  # [p]
        self.perm = torch.argsort(d, descending=True) if options.order == "diag" else None
        self.inv = None if self.perm is None else torch.argsort(self.perm)
        self.W = self.layout(W)  # [q, p]
        self.Sigma, d = (Sigma, d) if self.perm is None else (Sigma[self.perm][:, self.perm], d[self.perm])
        self.live = d > _DEAD * d.mean().clamp(min=0)  # [p]
        self.lam = options.damp * float(d.mean())
        self.dinv = torch.where(self.live, 1 / (d + self.lam), torch.zeros_like(d))  # [p]
        self.B = None if shift is None else self.layout(shift)  # [q, p]
        self.segments = tuple(segments)
        self.consts = tuple(consts)
        self.options = options
        self.WS: torch.Tensor | None = None  # W Σ [q, p], made by the first per-channel refit

    def layout(self, X: torch.Tensor) -> torch.Tensor:
        """[q, p] original column order -> working order."""
        return X.contiguous() if self.perm is None else X[:, self.perm].contiguous()

    def original(self, X: torch.Tensor) -> torch.Tensor:
        return X if self.inv is None else X[:, self.inv]

    def use_grid(self, grid: Grid) -> None:
        """Sweep on `grid` (original column order) from now on."""
        self.grid = grid
        self.work_grid = self.working(grid)
        self.columns: tuple[torch.Tensor, ...] | None = None  # the dense loop's [p, q] grid, made when needed

    def working(self, grid: Grid) -> Grid:
        """`grid` with its g_idx in the working column order."""
        return grid if self.perm is None else replace(grid, g_idx=grid.g_idx[self.perm])

    def on_grid(self, X: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The nearest grid points of the columns `cols` of X [q, p]."""
        s, z = self.work_grid.columns(cols)  # [q, k]
        return self.work_grid.nearest(X[:, cols], s, z) * s - self.work_grid.column_shifts(cols)

    def residual(self, Q: torch.Tensor) -> torch.Tensor:
        return _residual(Q, self.W, self.Sigma, self.lam, self.B)

    def losses(self, Q: torch.Tensor, G: torch.Tensor) -> list[float]:
        return _losses(Q, G, self.W, self.lam, self.B, self.consts, self.segments)

    def sweep(self, Q: torch.Tensor, G: torch.Tensor, active: list[bool], fs: list[float] | None,
              bests: list[_Best], relaxed: bool = False) -> list[float]:
        """One sweep of the active segments' rows of Q in place (G kept the residual); each segment's new f (the
        inactive ones' unchanged). fs: each segment's f on entry, None where Q is off the grid. A sweep from the grid
        without damping never increases f (cd_kernel takes no change that does not lower it), so only the others
        first save the best rows they may leave."""
        sparse = fs is not None and not relaxed and self.options.kernel == "auto" and cd_kernel.usable(Q, self.Sigma)
        if not (sparse and self.lam == 0):
            self.save(Q, bests)
        if sparse:
            rows = torch.cat([torch.arange(s.start, s.stop) for s, a in zip(self.segments, active) if a])
            g = self.work_grid
            df = cd_kernel.cd_sweep_rows(Q, G, self.W, self.Sigma, self.dinv, g.scale, g.zero, g.shift, g.g_idx,
                                         g.maxq, self.lam, rows)
            return [f + math.fsum(df[s].tolist()) for f, s in zip(fs, self.segments)]  # any row offset
        frozen = [(s, Q[s].clone(), G[s].clone()) for s, a in zip(self.segments, active) if not a]
        if self.columns is None:
            s, z = self.work_grid.columns()  # [q, p]
            self.columns = (s.t().contiguous(), z.t().contiguous(), self.work_grid.column_shifts().t().contiguous())
        Qt, Gt = Q.t().contiguous(), G.t().contiguous()  # [p, q]
        _sweep(Qt, Gt, self.Sigma, self.dinv, *self.columns, self.grid.maxq, self.options.block_size, relaxed,
               self.options.kernel, self.lam)
        Q.copy_(Qt.t())
        G.copy_(Gt.t())
        for s, Qs, Gs in frozen:
            Q[s], G[s] = Qs, Gs
        return self.losses(Q, G)

    def keep(self, fs: list[float], bests: list[_Best], histories: list[list[float]], active: list[bool]) -> None:
        """Record each active segment's f; where it is the segment's best so far, its current rows become the best."""
        for k, best in enumerate(bests):
            if active[k]:
                histories[k].append(fs[k])
                if fs[k] < best.f:
                    best.f, best.grid, best.current = fs[k], self.grid, True

    def save(self, Q: torch.Tensor, bests: list[_Best]) -> None:
        """Copy out the best rows that are the current ones, before Q leaves them."""
        for best, s in zip(bests, self.segments):
            if best.current:
                if best.Q is not None and best.Q.shape == Q[s].shape:
                    best.Q.copy_(Q[s])
                else:
                    best.Q = Q[s].clone()
                best.current = False

    def descend(self, Q: torch.Tensor, G: torch.Tensor, fs: list[float], bests: list[_Best],
                histories: list[list[float]], first_from_w: bool = False) -> None:
        """Rounded sweeps from Q (whose residual is G, and f per segment fs; off the grid when first_from_w) until
        every segment has had a sweep that gains less than tol · its f; each segment stops there."""
        prev: list[float | None] = [None if first_from_w else f for f in fs]
        active = [True] * len(self.segments)
        for i in range(self.options.sweeps):
            fs = self.sweep(Q, G, active, None if i == 0 and first_from_w else fs, bests)
            self.keep(fs, bests, histories, active)
            for k, f in enumerate(fs):
                if active[k] and prev[k] is not None and prev[k] - f <= self.options.tol * prev[k]:
                    active[k] = False
                prev[k] = f
            if not any(active):
                break

    def refit(self, Q: torch.Tensor, G: torch.Tensor, bests: list[_Best], sym: bool,
              histories: list[list[float]]) -> None:
        """One refit round from every segment's best iterate, then CD sweeps on the new grid. Q, G: the current
        iterate and its residual, kept for the segments whose best is their current rows."""
        for best, s in zip(bests, self.segments):
            if not best.current:  # a segment's rows moved past its best: back to it, and its residual recomputed
                Q[s] = best.Q
                G[s] = _residual(Q[s], self.W[s], self.Sigma, self.lam, None if self.B is None else self.B[s])
        grid = Grid.stack([b.grid.rows(s) for b, s in zip(bests, self.segments)])
        work = self.working(grid)
        codes = work.quantize(Q)  # exact: Q lies on the grid; the refit keeps these codes
        QS = None
        if grid.scale.shape[1] == 1:  # per channel: Q Σ = G + B + W Σ - λ(Q - W), with W Σ once for all rounds
            if self.WS is None:
                self.WS = self.W @ self.Sigma  # [q, p]
            QS = G + self.WS
            if self.lam:
                QS.sub_(Q - self.W, alpha=self.lam)
            if self.B is not None:
                QS += self.B
        new = _refit(codes, G, self.Sigma, work, sym, QS)  # G becomes the residual of the codes on the new grid
        del QS
        self.use_grid(replace(new, g_idx=grid.g_idx))
        self.save(Q, bests)
        Q.copy_(self.work_grid.dequantize(codes))  # f no larger than the best's (_refit's guard)
        fs = self.losses(Q, G)
        self.keep(fs, bests, histories, [True] * len(self.segments))
        self.descend(Q, G, fs, bests, histories)


def workspace(q: int, p: int, options: QuantEaseOptions, target: bool) -> int:
    """The larger of the GPTQ initialization's and the CD sweeps' working set: twelve [q, p] fp32 where a sweep runs
    the blocked loop (W, the iterate, its residual G and the best one; the iterate's and G's [p, q] copies, the
    sweep's change and the grid's three [p, q] columns; D and a product for f), counted; sweeps from the grid and
    the refits need about eight. A propagated target adds its shift [q, p], outliers the dense H and gradient."""
    init = gptq_workspace(q, p, GPTQOptions(), target) if options.init == "gptq" else 0
    cd = 48 * q * p + (4 * q * p if target else 0)
    return max(init, cd) + (8 * q * p if options.outliers > 0 else 0)


@register_solver("quantease", QuantEaseOptions, workspace=workspace)
@torch.no_grad()
def solve(W: torch.Tensor, sigma: torch.Tensor | None, spec: GridSpec,
          options: QuantEaseOptions = QuantEaseOptions(), target: Target | None = None) -> SolveResult:
    """Ŵ with the least f among the initial quantized Ŵ and every rounded sweep's (and refit's) iterate.

    history: f of the initial quantized Ŵ (RTN on the grid for init="w", whose sweeps start from W itself), then
    f after each rounded sweep, and after each refit followed by its sweeps (fp32, undamped Σ). Relaxed iterates
    are off the grid and are not recorded."""
    if options.outliers > 0:
        from .outliers import solve_with_outliers

        return solve_with_outliers(W, sigma, spec, options, target)
    check_layer(W, sigma)
    return _solve([W], sigma, spec, options, target)[0]


@register_stacked("quantease")
@torch.no_grad()
def solve_stacked(Ws: list[torch.Tensor], sigma: torch.Tensor, spec: GridSpec, options: QuantEaseOptions,
                  target: Target | None = None) -> list[SolveResult]:
    """`solve` of each layer of Ws (all reading the input Σ describes), as one problem with the rows stacked, so
    each column update is one operation over every layer's rows. Same results as one solve per layer. Outlier-aware
    QuantEase has a per-layer budget and runs one layer at a time."""
    if options.outliers > 0:
        return [solve(W, sigma, spec, options, target) for W in Ws]
    for W in Ws:
        check_layer(W, sigma)
    return _solve(Ws, sigma, spec, options, target)


def _solve(Ws: list[torch.Tensor], sigma: torch.Tensor, spec: GridSpec, options: QuantEaseOptions,
           target: Target | None) -> list[SolveResult]:
    W, Sigma = torch.cat([w.float() for w in Ws]), sigma.float()  # [q, p] every layer's rows
    ends = torch.tensor([w.shape[0] for w in Ws]).cumsum(0).tolist()
    segments = [slice(a, b) for a, b in zip([0] + ends[:-1], ends)]
    shift = None if target is None else target.shift(W)  # [q, p] α W Δ, once for the start, the sweeps and f
    consts = [0.0 if target is None else target.constant(W[s]) for s in segments]
    Q, grid, notes = _initialize(W, Sigma, spec, options, target, shift)
    prob = _Problem(W, Sigma, options, shift, consts, segments)
    prob.use_grid(grid)
    Q = prob.layout(Q)  # [q, p] working order
    dead = torch.nonzero(~prob.live).flatten()
    Q[:, dead] = prob.on_grid(Q, dead)  # dead inputs: nearest grid point, never updated
    from_w = options.init == "w" or options.relax_sweeps > 0  # the first rounded sweep starts off the grid
    if options.init == "w":  # the quantized iterate to beat is W's nearest grid point
        start = prob.on_grid(Q, torch.arange(Q.shape[1]))
        fs = prob.losses(start, prob.residual(start))
    else:
        start = Q
    G = prob.residual(Q)  # [q, p], kept exact from here on
    if options.init != "w":
        fs = prob.losses(Q, G)
    histories = [[f] for f in fs]
    bests = [_Best(f, None, grid, current=True) if start is Q else _Best(f, start[s].clone(), grid)
             for f, s in zip(fs, segments)]
    del start
    for _ in range(options.relax_sweeps):
        prob.sweep(Q, G, [True] * len(segments), None, bests, relaxed=True)
    prob.descend(Q, G, fs, bests, histories, first_from_w=from_w)
    for _ in range(0 if spec.gguf else options.refit):  # a GGUF grid keeps llama.cpp's own scale fit
        prob.refit(Q, G, bests, spec.sym, histories)

    finals = [(prob.original(Q[s] if b.current else b.Q), b.grid.rows(s))  # [q_s, p] original order
              for b, s in zip(bests, segments)]
    del prob, Q, G, bests  # the working set (W, iterates, residual, grid columns) before the losses are measured
    results = []
    for w, s, c, (W_hat, grid), history in zip(Ws, segments, consts, finals, histories):
        qw = QuantizedWeight.from_codes(grid.quantize(W_hat), grid, spec)
        assert torch.equal(qw.dequantize(), W_hat), "iterate left the grid"
        loss = layer_loss(w.float(), W_hat, sigma, target, None if shift is None else shift[s], c)
        results.append(SolveResult(qw, loss, history, list(notes)))
    return results
