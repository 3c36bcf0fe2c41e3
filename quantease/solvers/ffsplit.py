"""FFSplit: the few heavy-hitter neurons of each feed-forward network get more bits (or fp16) than the rest.

Liu, Zhang, Wang, Zha, Hu, Xia, "FFSplit: Split Feed-Forward Network For Optimizing Accuracy-Efficiency Trade-off
in Language Model Inference" (2024). An FFN computes  out = Σ_i φ_i(x) v_i  over intermediate neurons i, with
v_i = W_down[:, i] and φ_i = act(up_i·x) (gated: act(gate_i·x)·(up_i·x)). Neuron i's RMS output norm over the
calibration tokens is  score_i = sqrt(Σ_ii) · ||v_i||,  Σ = Gram matrix of the down projection's input measured with
the original up/gate. The top-k neurons by score are heavy, the rest light. Because φ is elementwise the split is
exact, and the layer problems split as follows:
  up / gate (rows i of W [I, h]): each row is its own problem with the shared Σ, so solving the heavy rows (at
      heavy_bits) and the light rows (at bits) separately with the same solver is exactly the joint problem.
  down (columns i of W [h, I]): the heavy columns are solved with Σ_HH (or kept in fp16), the light columns with
      Σ_LL. The cross term 2 tr(D_L Σ_LH D_Hᵀ) of the joint error is ignored: it is zero for fp16 heavy columns and
      small at 8 bits, where D_H is ~2^(8-bits) times smaller than D_L.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint.native import encode_split
from ..config import QuantConfig
from .base import SolveResult, Target, get_solver, layer_loss
from .grid import GridSpec

__all__ = ["heavy_count", "neuron_scores", "heavy_hitter_stats", "SplitLayer", "solve_split"]

_SHARES = (0.01, 0.02, 0.05, 0.1)  # fractions of the neurons whose score share the statistics report


def heavy_count(amount: float, neurons: int) -> int:
    """k heavy neurons: a fraction (< 1) of `neurons` or a count; at least 1 and at most neurons - 1."""
    k = round(amount * neurons) if amount < 1 else int(amount)
    return max(1, min(neurons - 1, k))


def neuron_scores(sigma_down: torch.Tensor, W_down: torch.Tensor) -> torch.Tensor:
    """score_i = sqrt(Σ_ii) ||W_down[:, i]||, [I], from Σ [I, I] of the down input and W_down [h, I]."""
    return torch.diagonal(sigma_down).clamp(min=0).sqrt() * W_down.float().norm(dim=0)


def heavy_hitter_stats(scores: torch.Tensor, heavy: torch.Tensor) -> dict[str, Any]:
    """How concentrated the scores are: share of the total score mass in the top 1/2/5/10% of neurons, the
    max/median ratio, and the heavy set (count, share)."""
    s = scores.double().sort(descending=True).values
    total = float(s.sum()) or 1.0
    share = {f"top{round(100 * f)}%": float(s[: max(1, round(f * len(s)))].sum()) / total for f in _SHARES}
    return {"neurons": len(s), "heavy": int(heavy.numel()), "heavy_share": float(scores[heavy].sum()) / total,
            "share": share, "max_over_median": float(s[0] / s.median().clamp(min=1e-30))}


@dataclass
class SplitLayer:
    """A solved FFSplit layer: Ŵ [q, p] reassembled, its stored tensors, the light part's solve, the meta entry."""

    W_hat: torch.Tensor
    tensors: dict[str, torch.Tensor]
    light: SolveResult
    extra: dict[str, Any]  # quantease.json entry fields: shape, loss, split axis, parts


def _part_spec(config: QuantConfig, bits: int, width: int, notes: list[str], name: str) -> GridSpec:
    """The part's grid; per channel when the group size does not divide the part's input width."""
    gs = config.group_size
    if gs != -1 and width % gs:
        notes.append(f"ffsplit {name} part: group size {gs} does not divide {width} columns; per channel")
        gs = -1
    return GridSpec(bits=bits, group_size=gs, sym=config.sym, clip=config.clip)


def solve_split(W: torch.Tensor, sigma: torch.Tensor, axis: str, heavy: torch.Tensor, config: QuantConfig,
                target: Target | None = None) -> SplitLayer:
    """Solve the heavy and light parts of W [q, p] split by rows ("rows": up/gate) or columns ("cols": down); a
    propagated target splits as Σ does (its cross-part terms are ignored likewise for columns)."""
    n = W.shape[0] if axis == "rows" else W.shape[1]
    light_mask = torch.ones(n, dtype=torch.bool, device=W.device)
    light_mask[heavy] = False
    index = {"heavy": heavy, "light": torch.nonzero(light_mask).flatten()}
    bits = {"heavy": config.heavy_bits, "light": config.bits}
    solver, options = get_solver(config.method), config.solver_options()
    W_hat, parts, metas, results, notes = torch.zeros_like(W), {}, [], {}, []
    for name, idx in index.items():
        Wp, Sp = (W[idx], sigma) if axis == "rows" else (W[:, idx], sigma[idx][:, idx])  # [., .], [p', p']
        Tp = target if target is None or axis == "rows" else target.restrict(idx)
        meta: dict[str, Any] = {"name": name, "bits": bits[name], "out_features": Wp.shape[0],
                                "in_features": Wp.shape[1]}
        if bits[name] == 16:
            Wq = Wp.half().float()
            parts[name] = Wp
        else:
            spec = _part_spec(config, bits[name], Wp.shape[1], notes, name)
            res = solver.solve(Wp, Sp, spec, options, Tp)
            results[name], parts[name], Wq = res, res.weight, res.weight.dequantize()
            notes += res.notes
            meta.update(group_size=spec.group_size, groups=int(res.weight.grid.scale.shape[1]), sym=spec.sym)
            if res.weight.outliers is not None:
                meta["outliers"] = {"structure": res.weight.outliers.structure, "count": res.weight.outliers.count}
        if axis == "rows":
            W_hat[idx] = Wq
        else:
            W_hat[:, idx] = Wq
        metas.append(meta)
    extra = {"out_features": W.shape[0], "in_features": W.shape[1], "loss": layer_loss(W, W_hat, sigma, target),
             "notes": notes, "split_axis": axis, "parts": metas}
    return SplitLayer(W_hat, encode_split(parts, heavy), results["light"], extra)
