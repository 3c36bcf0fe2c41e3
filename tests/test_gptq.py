"""GPTQ: agreement with the unblocked reference, grouping variants, damping retries, invariants."""
from __future__ import annotations

import pytest
import torch
from solver_reference import f64, gptq_reference, make_problem

from quantease.errors import NumericalError
from quantease.solvers import GridSpec, fit_grid, get_solver, layer_loss

GPTQ, RTN = get_solver("gptq"), get_solver("rtn")


pytestmark = pytest.mark.usefixtures("one_thread")


def run(W, S, spec, **options):
    return GPTQ.solve(W, S, spec, GPTQ.make_options(options))


def assert_valid(res, W, S, spec) -> torch.Tensor:
    W_hat = res.weight.dequantize()
    assert res.weight.codes.dtype == torch.uint8 and int(res.weight.codes.max()) <= spec.maxq
    assert torch.isfinite(W_hat).all()
    assert torch.equal(res.weight.grid.quantize(W_hat), res.weight.codes.float())  # idempotent on its grid
    assert res.loss == pytest.approx(layer_loss(W, W_hat, S), rel=1e-12)
    return W_hat


@pytest.mark.parametrize("block_size", [1, 7, 32, 128, 500])
@pytest.mark.parametrize("static_groups", [False, True])
def test_matches_unblocked_reference(block_size, static_groups):
    """Per-channel and static groups fix the grid up front, so the unblocked float64 loop is the exact reference."""
    W, S, _ = make_problem(32, 96, seed=1)
    spec = GridSpec(bits=3, group_size=32 if static_groups else -1)
    res = run(W, S, spec, block_size=block_size, act_order=False, static_groups=static_groups)
    Q_ref = gptq_reference(W, S, fit_grid(W, spec, torch.diagonal(S)), damp=0.01)
    agree = (res.weight.dequantize() == Q_ref.float()).float().mean()
    assert agree > 0.99  # a rare near-tie may round the other way in fp32 and change later columns a little
    assert res.loss == pytest.approx(f64(W, Q_ref, S), rel=1e-2)


@pytest.mark.parametrize("block_size", [5, 16, 64, 100])
def test_dynamic_groups_do_not_depend_on_block_size(block_size):
    W, S, _ = make_problem(24, 96, seed=2)
    spec = GridSpec(bits=3, group_size=16)
    base = run(W, S, spec, block_size=128, static_groups=False)
    res = run(W, S, spec, block_size=block_size, static_groups=False)
    assert res.loss == pytest.approx(base.loss, rel=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
def test_group_variants(act_order, static_groups):
    W, S, X = make_problem(32, 128, seed=3)
    spec = GridSpec(bits=3, group_size=32)
    res = run(W, S, spec, act_order=act_order, static_groups=static_groups)
    W_hat = assert_valid(res, W, S, spec)
    grid = res.weight.grid
    assert grid.scale.shape == (32, 4) and grid.g_idx.shape == (128,)
    assert torch.bincount(grid.g_idx, minlength=4).tolist() == [32] * 4
    contiguous = torch.equal(grid.g_idx, torch.arange(128) // 32)
    assert contiguous == (static_groups or not act_order)
    if act_order and not static_groups:  # the first group holds the 32 inputs with the largest Σ_jj
        first = torch.argsort(torch.diagonal(S), descending=True)[:32].sort()[0]
        assert torch.equal(torch.where(grid.g_idx == 0)[0], first)
    direct = float((((W - W_hat).double() @ X.double().T) ** 2).sum()) / X.shape[0]
    assert res.loss == pytest.approx(direct, rel=1e-4)
    assert res.loss < 0.8 * RTN.solve(W, S, spec).loss


def test_beats_rtn():
    for seed in range(6):
        W, S, _ = make_problem(32, 64, seed=10 + seed)
        for spec in (GridSpec(bits=3), GridSpec(bits=4, group_size=16, sym=True), GridSpec(bits=3, clip="mse")):
            assert run(W, S, spec).loss < RTN.solve(W, S, spec).loss


def test_cholesky_failure_retries_with_more_damping():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    S = torch.ones(32, 32)  # rank 1: the second pivot is exactly 0
    res = run(W, S, GridSpec(bits=4), damp=0.0)
    assert_valid(res, W, S, GridSpec(bits=4))
    assert len(res.notes) == 1 and "damp=0.0001" in res.notes[0]
    assert res.loss < RTN.solve(W, S, GridSpec(bits=4)).loss

    res = run(W, S, GridSpec(bits=4), damp=0.0, max_damp_retries=0)  # no retries left: RTN fallback, noted
    assert "fell back to RTN" in res.notes[0]
    assert torch.equal(res.weight.codes, RTN.solve(W, S, GridSpec(bits=4)).weight.codes)


@pytest.mark.parametrize("act_order", [False, True])
def test_adversarial_sigma(act_order):
    p = 64
    g = torch.Generator().manual_seed(0)
    X = torch.randn(p // 4, p, generator=g)
    low_rank = X.T @ X / X.shape[0]
    dead = low_rank + torch.eye(p)
    dead[:, ::5] = dead[::5, :] = 0
    scales = torch.logspace(-4, 4, p)
    wide = (torch.eye(p) + 0.3 * low_rank) * scales[:, None] * scales[None, :]
    W = torch.randn(16, p, generator=g)
    spec = GridSpec(bits=3, group_size=16)
    for S in (low_rank, dead, wide, torch.zeros(p, p), torch.ones(p, p)):
        for damp in (0.0, 0.01):
            assert_valid(run(W, S, spec, damp=damp, act_order=act_order), W, S, spec)
    res = run(W, dead, spec)  # dead inputs are quantized as 0
    zero_code = res.weight.grid.quantize(torch.zeros_like(W))
    assert torch.equal(res.weight.codes[:, ::5].float(), zero_code[:, ::5])


def test_bad_options_and_inputs():
    with pytest.raises(ValueError, match="damp"):
        GPTQ.make_options({"damp": -1})
    with pytest.raises(ValueError, match="block_size"):
        GPTQ.make_options({"block_size": 0})
    with pytest.raises(ValueError, match="calibration"):
        GPTQ.solve(torch.randn(4, 8), None, GridSpec())
    with pytest.raises(ValueError, match="does not divide"):
        GPTQ.solve(torch.randn(4, 8), torch.eye(8), GridSpec(group_size=3))
    with pytest.raises(NumericalError, match="NaN"):
        GPTQ.solve(torch.full((4, 8), float("nan")), torch.eye(8), GridSpec())
