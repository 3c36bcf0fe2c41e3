"""Round-to-nearest: Ŵ = q(W) on the fitted grid. The baseline every other solver must beat, and the fallback."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import QuantizedWeight, SolveResult, Target, layer_loss, loss_workspace, register_solver
from .grid import GridSpec, fit_grid

__all__ = ["RTNOptions", "solve", "workspace"]


@dataclass(frozen=True)
class RTNOptions:
    pass


def workspace(q: int, p: int, options: RTNOptions, target: bool) -> int:
    """Ŵ [q, p] fp32 and the uint8 codes, then the loss's."""
    return 5 * q * p + loss_workspace(q, p)


@register_solver("rtn", RTNOptions, requires_calibration=False, workspace=workspace)
def solve(W: torch.Tensor, sigma: torch.Tensor | None, spec: GridSpec, options: RTNOptions = RTNOptions(),
          target: Target | None = None) -> SolveResult:
    """W rounded on its own grid whatever the target; the loss is measured against the target."""
    W = W.float()
    grid = fit_grid(W, spec, None if sigma is None else torch.diagonal(sigma))
    qw = QuantizedWeight.from_codes(grid.quantize(W), grid, spec)
    loss = layer_loss(W, qw.dequantize(), sigma, target) if sigma is not None else float("nan")
    return SolveResult(qw, loss, [loss])
