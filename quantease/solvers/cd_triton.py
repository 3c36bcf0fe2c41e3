"""The QuantEase sweep's column loop on CUDA as one Triton kernel per block (the GPU counterpart of cd_kernel.cd_block).

Dispatched as torch ops, a block of B columns costs ~6 kernel launches per column, so a sweep of a 14336-column down
projection pays launch latency ~86 000 times. Here one launch runs a whole block: rows never interact, so each
program takes BLOCK_N rows (entries along q of the [B, q] block) and runs the block's B columns in order, keeping the
feedback of the block's earlier changes in registers:
    acc[j, r] = Σ_{k<i} S[j, k] D[k, r]   (updated by one outer product S[:, i] D[i, :] after column i)
    u = Q[i, r] - dinv_i · (G[i, r] + acc[i, r])
    Q[i, r] ← s clamp(round(z + u / s), 0, maxq) - o,   D[i, r] = its change   (relaxed: u clamped to the range)
The per-entry arithmetic is the plain loop's (IEEE division, round half to even), except the order of the sum over k
and where the compiler fuses a multiply-add, so a code can differ from the plain loop's only where z + u/s falls
within float rounding of a half-integer (the reasoning of cd_kernel.py). Blocks wider than _MAX_B columns run as
consecutive sub-blocks with a matmul between them, as `_sweep` does between blocks.

Triton comes with PyTorch's CUDA builds; without it (or off CUDA) `usable` is False and `_sweep` runs the plain loop.
The tests run this kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; `usable` says so
    triton = None

__all__ = ["cd_block", "usable"]

_MAX_B = 128  # columns one program keeps in registers (acc is [_MAX_B, BLOCK_N])
_BLOCK_N = 32  # rows per program


def usable(*tensors: torch.Tensor) -> bool:
    """True when the kernel can run on these tensors: fp32 on CUDA with Triton importable (or any device under
    Triton's interpreter, which the tests use)."""
    if triton is None:
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return all(t.dtype == torch.float32 and (t.is_cuda or interpreted) for t in tensors)


if triton is not None:
    _ROUND = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + _ROUND - _ROUND is x rounded half to even for |x| < 2**22

    @triton.jit
    def _block_kernel(Q, D, S, G, s, z, o, dinv, n, nb, stride_x, stride_s0, stride_s1, maxq,
                      RELAXED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):  # pragma: no cover
        r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] this program's rows
        live = r < n
        k = tl.arange(0, BLOCK_B)  # [BLOCK_B] the block's columns
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)  # acc[j] = Σ_{k<i} S[j, k] D[k]
        for i in range(nb):
            x = i * stride_x + r
            old = tl.load(Q + x, mask=live, other=0.0)
            feedback = tl.sum(tl.where(k[:, None] == i, acc, 0.0), axis=0)  # [BLOCK_N] acc[i]
            d = tl.load(dinv + i)
            u = old - d * (tl.load(G + x, mask=live, other=0.0) + feedback)
            si = tl.load(s + x, mask=live, other=1.0)
            oi = tl.load(o + x, mask=live, other=0.0)
            if RELAXED:  # the grid's range; its ends swap where s < 0 (GGUF's signed scales)
                lo, hi = -oi, si * maxq - oi
                new = tl.minimum(tl.maximum(u, tl.minimum(lo, hi)), tl.maximum(lo, hi))
            else:  # clamping to [-1, maxq + 1] first keeps the rounding trick in its exact range
                c = tl.load(z + x, mask=live, other=0.0) + tl.math.div_rn(u, si)
                c = tl.minimum(tl.maximum(c, -1.0), maxq + 1.0)
                c = tl.minimum(tl.maximum((c + _ROUND) - _ROUND, 0.0), maxq)
                new = c * si - oi
            new = tl.where(d == 0.0, old, new)  # a dead input keeps its entries
            delta = new - old
            tl.store(Q + x, new, mask=live)
            tl.store(D + x, delta, mask=live)
            column = tl.load(S + k * stride_s0 + i * stride_s1, mask=k < nb, other=0.0)  # [BLOCK_B] S[:, i]
            acc += column[:, None] * delta[None, :]


def cd_block(Q: torch.Tensor, D: torch.Tensor, S: torch.Tensor, G: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
             o: torch.Tensor, dinv: torch.Tensor, maxq: int, relaxed: bool) -> None:
    """One block's column loop (the signature of cd_kernel.cd_block): Q, D, G, s, z, o [B, q] with contiguous rows of
    one stride, S [B, B] the block of Σ, dinv [B]; Q updated in place, its changes written to D."""
    nb, n = Q.shape
    for j1 in range(0, nb, _MAX_B):
        j2 = min(j1 + _MAX_B, nb)
        # the sub-block's residual sees the block's earlier changes
        Gj = G[j1:j2] if j1 == 0 else torch.addmm(G[j1:j2], S[j1:j2, :j1], D[:j1])
        Sj = S[j1:j2, j1:j2].t().contiguous().t()  # column-major: the kernel reads a column per step, contiguously
        args = [X[j1:j2] for X in (Q, D)] + [Sj, Gj] + [X[j1:j2] for X in (s, z, o)]
        assert all(X.stride(1) == 1 and X.stride(0) == args[0].stride(0) for X in args[:2] + args[3:]), \
            "cd_triton: the [B, q] operands must share one row stride"
        _block_kernel[(triton.cdiv(n, _BLOCK_N),)](
            *args, dinv[j1:j2].contiguous(), n, j2 - j1, args[0].stride(0), *Sj.stride(), float(maxq),
            RELAXED=relaxed, BLOCK_N=_BLOCK_N, BLOCK_B=triton.next_power_of_2(j2 - j1))
