"""Compiled CPU kernels (numba) of the QuantEase sweep: the dense column loop of one block, and a whole sweep of
an iterate already on the grid, which does work only where an entry changes.

`cd_block`: the column loop of one block as one compiled unit, instead of ~6 dispatched torch ops per column.

Inside a block of B columns (solvers/quantease.py, `_sweep`), column i's new value depends on the new values of the
block's earlier columns, so the loop over i is sequential; but rows never interact, so each thread runs the whole
loop on its own slice of rows. Per column and row r, with Q the block's rows of the iterate (updated in place), G
the residual's at the block's start and D the block's changes so far:
    u = Q[i, r] - dinv_i · (G[i, r] + Σ_{k<i} S[i, k] D[k, r])
    Q[i, r] ← s clamp(round(z + u / s), 0, maxq) - o,   D[i, r] = its change   (relaxed: u clamped to the range
                                                                                  of -o, s maxq - o)
with s, z, o the column's grid for row r (o = s z for integer zero points, where s c - o is bit for bit s (c - z):
both products are exact in fp32). The arithmetic is the plain loop's except the order of the sum over k (the
plain loop's matvec leaves it to BLAS) and whether d · (...) is fused into the subtraction, so a code can differ
from the plain loop's only where z + u/s falls within float rounding of a half-integer; both are exact coordinate
minimizers up to that rounding. The plain torch loop stays the reference (and runs on CUDA tensors, which this
kernel does not take).

`cd_sweep_rows`: a sweep from an iterate on the grid changes only 0.1-1.5% of its entries (measured on the default
model's layers, W3 from act-order GPTQ), so instead of the blocked update's q·p² flops it keeps the residual
G = (Q - W)(Σ + λI) - B exact row by row: row r of Q [q, p] is scanned column by column, and a change δ at column j
adds δ Σ[j, :] (+ λδ at j) to row r of G [q, p], an axpy over contiguous memory. The scan itself is vectorized by
speculation: a chunk of columns is rounded at once from the current G, and only a chunk with a change is cut at its
first change and scanned again from there after the update. Per column the arithmetic is the one above (with a
fused multiply-add where the compiler chooses); G accumulates in another order than the blocked sweep's matmuls,
so the same reasoning about float ties holds. Each row's change of f is summed from its changes in fp64, so the
caller needs no pass over the iterate for f.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = ["cd_block", "cd_sweep_rows", "usable"]

_FASTMATH = {"nnan", "ninf", "nsz", "contract"}  # vectorizes rint and min/max; no reassociation
_CHUNK = 64  # columns rounded at once before the first change is looked for


@numba.njit(cache=True, boundscheck=False)
def _cd_rows(Q: np.ndarray, D: np.ndarray, S: np.ndarray, G: np.ndarray, s: np.ndarray, z: np.ndarray,
             o: np.ndarray, dinv: np.ndarray, maxq: float, relaxed: bool, r0: int, r1: int
             ) -> None:  # pragma: no cover (compiled)
    """The block's column loop for rows r0:r1 of Q and D (rows never interact)."""
    B = Q.shape[0]
    acc = np.empty(r1 - r0, np.float32)
    for i in range(B):
        d = dinv[i]
        if d == 0:  # a dead input keeps its entries
            D[i, r0:r1] = 0
            continue
        acc[:] = 0
        k = 0
        while k + 4 <= i:  # four earlier columns per pass over acc: a quarter of its loads and stores
            a0, a1, a2, a3 = S[i, k], S[i, k + 1], S[i, k + 2], S[i, k + 3]
            D0, D1, D2, D3 = D[k, r0:r1], D[k + 1, r0:r1], D[k + 2, r0:r1], D[k + 3, r0:r1]
            for r in range(r1 - r0):
                acc[r] += (a0 * D0[r] + a1 * D1[r]) + (a2 * D2[r] + a3 * D3[r])
            k += 4
        while k < i:
            a = S[i, k]
            Dk = D[k, r0:r1]
            for r in range(r1 - r0):
                acc[r] += a * Dk[r]
            k += 1
        for r in range(r1 - r0):
            old = Q[i, r0 + r]
            u = old - d * (G[i, r0 + r] + acc[r])
            sr, zr, orr = s[i, r0 + r], z[i, r0 + r], o[i, r0 + r]
            if relaxed:  # the ends swap where s < 0 (GGUF's signed scales)
                lo, hi = -orr, sr * maxq - orr
                new = min(max(u, min(lo, hi)), max(lo, hi))
            else:
                code = min(max(np.rint(zr + u / sr), 0.0), maxq)
                new = code * sr - orr
            Q[i, r0 + r] = new
            D[i, r0 + r] = Q[i, r0 + r] - old  # in fp32, as stored (new may be fp64: maxq is a Python float)


@numba.njit(cache=True, parallel=True, boundscheck=False)
def _cd_chunks(Q: np.ndarray, D: np.ndarray, S: np.ndarray, G: np.ndarray, s: np.ndarray, z: np.ndarray,
               o: np.ndarray, dinv: np.ndarray, maxq: float, relaxed: bool, chunks: int
               ) -> None:  # pragma: no cover (compiled)
    """_cd_rows on `chunks` slices of the rows, one per thread."""
    q = Q.shape[1]
    step = (q + chunks - 1) // chunks
    for c in numba.prange(chunks):
        if c * step < q:
            _cd_rows(Q, D, S, G, s, z, o, dinv, maxq, relaxed, c * step, min(q, (c + 1) * step))


def usable(*tensors: torch.Tensor) -> bool:
    """The kernel takes contiguous fp32 CPU tensors."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def cd_block(Q1: torch.Tensor, D1: torch.Tensor, S1: torch.Tensor, G1: torch.Tensor, s1: torch.Tensor,
             z1: torch.Tensor, o1: torch.Tensor, dinv1: torch.Tensor, maxq: int, relaxed: bool) -> None:
    """One block's column loop in place on Q1 [B, q], writing its changes to D1 [B, q] (S1 [B, B], G1/s1/z1/o1
    [B, q], dinv1 [B]; see module docstring), on as many threads as torch uses."""
    assert Q1.is_contiguous() and D1.is_contiguous()
    args = (Q1.numpy(), D1.numpy(), *(t.contiguous().numpy() for t in (S1, G1, s1, z1, o1, dinv1)), float(maxq),
            relaxed)
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    chunks = threads if Q1.shape[1] >= 64 * threads else 1
    if chunks == 1:  # never start numba's OpenMP pool: its workers spin between calls and take a core from others
        _cd_rows(*args, 0, Q1.shape[1])
    else:
        numba.set_num_threads(threads)
        _cd_chunks(*args, chunks)


@numba.njit(cache=True, boundscheck=False, fastmath=_FASTMATH)
def _scan_row(q: np.ndarray, g: np.ndarray, w: np.ndarray, S: np.ndarray, dinv: np.ndarray, runs: np.ndarray,
              groups: np.ndarray, s: np.ndarray, z: np.ndarray, o: np.ndarray, maxq: float, lam: float,
              new: np.ndarray) -> float:  # pragma: no cover (compiled)
    """One row's sweep in place: q, g, w [p] its iterate, residual and W; columns runs[a]:runs[a + 1] lie in group
    groups[a] (s, z, o [G] the row's grid). Returns the change of the row's undamped f, in fp64: a change δ at j
    moves f by δ (2 (g_j - λ D_j) + δ Σ_jj), D = q - w before it (g - λD is the undamped residual). Without damping
    a change that would not lower f (a tie, up to float rounding) is not taken, so f never increases."""
    p = q.shape[0]
    df = 0.0
    for a in range(runs.shape[0] - 1):
        sc, zc, oc = s[groups[a]], z[groups[a]], o[groups[a]]
        j, end = runs[a], runs[a + 1]
        while j < end:
            e = min(j + _CHUNK, end)
            changed = np.int32(0)  # an int32 flag: an int64 count keeps the loop from vectorizing
            qc, gc, dc = q[j:e], g[j:e], dinv[j:e]  # views from 0: measured 3x faster than offset indexing
            for k in range(e - j):
                qk = qc[k]
                v = min(max(np.rint(zc + (qk - dc[k] * gc[k]) / sc), np.float32(0)), maxq) * sc - oc
                v = v if dc[k] != 0 else qk  # a dead input keeps its entry
                new[k] = v
                changed |= np.int32(v != qk)
            if not changed:
                j = e
                continue
            k = j
            while k < e and new[k - j] == q[k]:
                k += 1
            if k == e:  # only where a NaN entered: the flag and the comparison disagree
                j = e
                continue
            v = new[k - j]
            j = k + 1
            d = v - q[k]
            dfk = float(d) * (2.0 * (float(g[k]) - lam * float(q[k] - w[k])) + float(d) * float(S[k, k]))
            if lam == 0 and dfk >= 0:  # a float tie of the rounding: staying is as good, and f never increases
                continue
            df += dfk
            q[k] = v
            for m in range(p):
                g[m] += d * S[k, m]
            g[k] += lam * d
    return df


@numba.njit(cache=True, boundscheck=False)
def _sweep_rows(Q: np.ndarray, G: np.ndarray, W: np.ndarray, S: np.ndarray, dinv: np.ndarray, runs: np.ndarray,
                groups: np.ndarray, s: np.ndarray, z: np.ndarray, o: np.ndarray, maxq: float, lam: float,
                rows: np.ndarray, df: np.ndarray) -> None:  # pragma: no cover (compiled)
    """_scan_row on each of `rows`."""
    new = np.empty(_CHUNK, np.float32)
    for i in range(rows.shape[0]):
        r = rows[i]
        df[r] = _scan_row(Q[r], G[r], W[r], S, dinv, runs, groups, s[r], z[r], o[r], maxq, lam, new)


@numba.njit(cache=True, parallel=True, boundscheck=False)
def _sweep_rows_parallel(Q: np.ndarray, G: np.ndarray, W: np.ndarray, S: np.ndarray, dinv: np.ndarray,
                         runs: np.ndarray, groups: np.ndarray, s: np.ndarray, z: np.ndarray, o: np.ndarray,
                         maxq: float, lam: float, rows: np.ndarray, df: np.ndarray, threads: int
                         ) -> None:  # pragma: no cover (compiled)
    """_sweep_rows with the rows split into `threads` contiguous slices (measured 2x faster on 2 threads than rows
    dealt round-robin, which scaled not at all)."""
    n = rows.shape[0]
    for t in numba.prange(threads):
        mine = rows[t * n // threads:(t + 1) * n // threads]
        _sweep_rows(Q, G, W, S, dinv, runs, groups, s, z, o, maxq, lam, mine, df)


def cd_sweep_rows(Q: torch.Tensor, G: torch.Tensor, W: torch.Tensor, Sigma: torch.Tensor, dinv: torch.Tensor,
                  scale: torch.Tensor, zero: torch.Tensor, shift: torch.Tensor, g_idx: torch.Tensor, maxq: int,
                  lam: float, rows: torch.Tensor) -> torch.Tensor:
    """One rounded sweep, in natural column order, of the given rows of Q [q, p] (on the grid scale · c - shift,
    scale/zero/shift [q, G], column j in group g_idx[j]), in place, with the residual G [q, p] kept exact:
    G = (Q - W)(Σ + λI) - B on entry and on exit (B: a propagated target's, or 0). Returns each row's change of
    the undamped f (fp64 [q], 0 for rows not swept); see the module docstring."""
    assert Q.is_contiguous() and G.is_contiguous()
    gi = g_idx.numpy()
    runs = np.concatenate([[0], np.flatnonzero(gi[1:] != gi[:-1]) + 1, [gi.shape[0]]]).astype(np.int64)
    df = np.zeros(Q.shape[0])
    args = (Q.numpy(), G.numpy(), W.contiguous().numpy(), Sigma.contiguous().numpy(), dinv.contiguous().numpy(),
            runs, gi[runs[:-1]].astype(np.int64), *(t.contiguous().numpy() for t in (scale, zero, shift)),
            np.float32(maxq), np.float32(lam), rows.numpy().astype(np.int64), df)
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if rows.numel() < 64 * threads:  # never start numba's pool for a small problem (see cd_block)
        _sweep_rows(*args)
    else:
        numba.set_num_threads(threads)
        _sweep_rows_parallel(*args, threads)
    return torch.from_numpy(df)
