import pytest
import torch

from quantease.solvers import GridSpec, get_solver


def direct_rtn(W: torch.Tensor, bits: int, group: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN written out from the grid's definition, independently of the package's grid code."""
    q, p = W.shape
    gs = p if group == -1 else group
    codes, scales, zeros = torch.empty(q, p), torch.empty(q, p // gs), torch.empty(q, p // gs)
    maxq = 2**bits - 1
    for g in range(p // gs):
        w = W[:, g * gs : (g + 1) * gs]
        if sym:
            s = w.abs().amax(1) / (maxq / 2)
            z = torch.full_like(s, 2 ** (bits - 1))
        else:
            lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
            s = (hi - lo) / maxq
        s = s.half().float()
        if not sym:
            z = torch.round(-lo / s).clamp(0, maxq)
        codes[:, g * gs : (g + 1) * gs] = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, maxq)
        scales[:, g], zeros[:, g] = s, z
    return codes, scales, zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [-1, 16])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_direct_computation(bits, group, sym):
    W = torch.randn(12, 64, generator=torch.Generator().manual_seed(bits))
    res = get_solver("rtn").solve(W, None, GridSpec(bits, group, sym), None)
    codes, scales, zeros = direct_rtn(W, bits, group, sym)
    assert torch.equal(res.weight.codes.float(), codes)
    assert torch.equal(res.weight.grid.scale, scales)
    assert torch.equal(res.weight.grid.zero, zeros)
    W_hat = res.weight.dequantize()
    assert (W_hat - W).abs().max() <= scales.max() / 2 * 1.001 or sym  # min-max grid: error at most half a step


def test_rtn_loss_is_output_error_and_mse_clip_helps():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=gen)
    W[:, 0] *= 8  # an outlier column stretches the min-max range
    X = torch.randn(2000, 64, generator=gen)
    sigma = X.T @ X / X.shape[0]
    minmax = get_solver("rtn").solve(W, sigma, GridSpec(3, -1), None)
    measured = float(((X @ (W - minmax.weight.dequantize()).T) ** 2).sum()) / X.shape[0]
    assert minmax.loss == pytest.approx(measured, rel=1e-4)
    mse = get_solver("rtn").solve(W, sigma, GridSpec(3, -1, clip="mse"), None)
    assert mse.loss < minmax.loss


def test_grid_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="bits"):
        GridSpec(bits=9)
    with pytest.raises(ValueError, match="does not divide"):
        GridSpec(bits=4, group_size=48).groups(64)
    with pytest.raises(ValueError, match="unknown method"):
        get_solver("awq")
