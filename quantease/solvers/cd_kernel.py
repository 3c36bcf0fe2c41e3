"""The QuantEase column loop of one block as one compiled CPU kernel (numba), instead of ~6 dispatched torch ops
per column.

Inside a block of B columns (solvers/quantease.py, `_sweep`), column i's new value depends on the new values of the
block's earlier columns, so the loop over i is sequential; but rows never interact, so each thread runs the whole
loop on its own slice of rows. Per column and row r:
    u = V[i, r] - dinv_i · Σ_{k<i} S[i, k] N[k, r]           (N: the block's new rows, V as in `_sweep`)
    N[i, r] = s clamp(round(z + u / s), 0, maxq) - o          (relaxed: u clamped to the range of -o, s maxq - o)
with s, z, o the column's grid for row r (o = s z for integer zero points, where s c - o is bit for bit s (c - z):
both products are exact in fp32). The arithmetic is the plain loop's except the order of the sum over k (the
plain loop's matvec leaves it to BLAS), so a code can differ from the plain loop's only where z + u/s falls within
float rounding of a half-integer; both are exact coordinate minimizers up to that rounding. The plain torch loop
stays the reference (and runs on CUDA tensors, which this kernel does not take).
"""
from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = ["cd_block", "usable"]


@numba.njit(cache=True, parallel=True, boundscheck=False)
def _cd_block(N: np.ndarray, S: np.ndarray, V: np.ndarray, s: np.ndarray, z: np.ndarray, o: np.ndarray,
              dinv: np.ndarray, maxq: float, relaxed: bool, chunks: int) -> None:  # pragma: no cover (compiled)
    B, q = N.shape
    step = (q + chunks - 1) // chunks
    for c in numba.prange(chunks):
        r0, r1 = c * step, min(q, (c + 1) * step)
        if r0 >= r1:
            continue
        acc = np.empty(r1 - r0, np.float32)
        u = np.empty(r1 - r0, np.float32)
        for i in range(B):
            d = dinv[i]
            if d == 0:  # a dead input keeps its entries
                continue
            acc[:] = 0
            for k in range(i):
                a = S[i, k]
                Nk = N[k, r0:r1]
                for r in range(r1 - r0):
                    acc[r] += a * Nk[r]
            for r in range(r1 - r0):
                u[r] = V[i, r0 + r] - d * acc[r]
            for r in range(r1 - r0):
                sr, zr, orr = s[i, r0 + r], z[i, r0 + r], o[i, r0 + r]
                if relaxed:  # the ends swap where s < 0 (GGUF's signed scales)
                    lo, hi = -orr, sr * maxq - orr
                    N[i, r0 + r] = min(max(u[r], min(lo, hi)), max(lo, hi))
                else:
                    code = min(max(np.rint(zr + u[r] / sr), 0.0), maxq)
                    N[i, r0 + r] = code * sr - orr


def usable(*tensors: torch.Tensor) -> bool:
    """The kernel takes contiguous fp32 CPU tensors."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def cd_block(N1: torch.Tensor, S1: torch.Tensor, V1: torch.Tensor, s1: torch.Tensor, z1: torch.Tensor,
             o1: torch.Tensor, dinv1: torch.Tensor, maxq: int, relaxed: bool) -> None:
    """One block's column loop in place on N1 [B, q] (S1 [B, B], V1/s1/z1/o1 [B, q], dinv1 [B]; see module docstring),
    on as many threads as torch uses."""
    c = lambda t: t.contiguous().numpy()
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    chunks = threads if N1.shape[1] >= 64 * threads else 1
    assert N1.is_contiguous()
    _cd_block(N1.numpy(), c(S1), c(V1), c(s1), c(z1), c(o1), c(dinv1), float(maxq), relaxed, chunks)
