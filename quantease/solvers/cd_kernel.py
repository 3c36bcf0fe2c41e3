"""The QuantEase column loop of one block as one compiled CPU kernel (numba), instead of ~6 dispatched torch ops
per column.

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
"""
from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = ["cd_block", "usable"]


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
