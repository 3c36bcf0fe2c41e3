"""The propagated target ||W X_α - Ŵ X||² (GPTAQ/QEP) and the grid refit: exact reduction to the layer objective,
losses equal to errors measured from activations, descent, and the pipeline's pairing of original and quantized
inputs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from solver_reference import make_problem
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantease.api import QuantConfig, load, quantize
from quantease.data.sources import load_text
from quantease.data.windows import calibration_windows, tokenize
from quantease.solvers import GridSpec, get_solver, layer_loss
from quantease.solvers.base import Target
from quantease.solvers.quantease import refit_grid

pytestmark = pytest.mark.usefixtures("one_thread")

SOLVERS = {"rtn": {}, "gptq": {}, "quantease": {"refit": 0}, "quantease-refit": {"refit": 2},
           "quantease-outliers": {"outliers": 0.02, "outlier_iters": 3}}


def solve(kind: str, W, S, spec, target=None):
    entry = get_solver(kind.partition("-")[0])
    return entry.solve(W, S, spec, entry.make_options(SOLVERS[kind]), target)


def problem(seed: int, q: int = 24, p: int = 64):
    """W, Σ of the quantized model's inputs X, the original model's inputs X_fp = X + a correlated drift, and both."""
    W, S, X = make_problem(q, p, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    Xf = X + 0.3 * X @ (torch.randn(p, p, generator=g) / p**0.5) + 0.1 * torch.randn(X.shape, generator=g)
    return W, S, X, Xf


def stats(X: torch.Tensor, Xf: torch.Tensor, alpha: float) -> Target:
    D = (Xf - X).double()
    n = X.shape[0]
    return Target((D.T @ X.double() / n).float(), (D.T @ D / n).float(), alpha)


def measured(W, W_hat, X, Xf, alpha: float) -> float:
    """||W X_α - Ŵ X||² / N straight from the activations, in float64."""
    Xa = (X + alpha * (Xf - X)).double()
    return float(((Xa @ W.double().T - X.double() @ W_hat.double().T) ** 2).sum()) / X.shape[0]


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_zero_target_is_the_layer_objective_bit_for_bit(kind):
    W, S, X, Xf = problem(1)
    spec = GridSpec(bits=3, group_size=16)
    plain = solve(kind, W, S, spec)
    for target in (stats(X, X, 1.0), stats(X, Xf, 0.0)):  # X_fp = X, or α = 0
        res = solve(kind, W, S, spec, target)
        assert torch.equal(res.weight.codes, plain.weight.codes) and torch.equal(res.weight.grid.scale,
                                                                               plain.weight.grid.scale)
        assert res.loss == plain.loss and res.history == plain.history


@pytest.mark.parametrize("kind", list(SOLVERS))
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_loss_is_the_propagated_error_measured_from_activations(kind, alpha):
    W, S, X, Xf = problem(2)
    res = solve(kind, W, S, GridSpec(bits=3), stats(X, Xf, alpha))
    assert res.loss == pytest.approx(measured(W, res.weight.dequantize(), X, Xf, alpha), rel=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_output_energy_is_the_targets_energy_measured_from_activations(alpha):
    """The relative errors' denominator, ||W X_α||² / N, against the activations (Ŵ = 0 in `measured`)."""
    from quantease.solvers.base import output_energy

    W, S, X, Xf = problem(4)
    zero = torch.zeros_like(W)
    assert output_energy(W, S, stats(X, Xf, alpha)) == pytest.approx(measured(W, zero, X, Xf, alpha), rel=1e-5)
    assert output_energy(W, S) == pytest.approx(measured(W, zero, X, X, 1.0), rel=1e-5)


@pytest.mark.parametrize("init", ["w", "gptq"])
def test_cd_sweeps_never_increase_the_propagated_objective(init):
    QE = get_solver("quantease")
    for seed in range(4):
        W, S, X, Xf = problem(10 + seed)
        res = QE.solve(W, S, GridSpec(bits=3, group_size=[-1, 16][seed % 2]),
                       QE.make_options({"init": init, "sweeps": 8, "tol": 0.0}), stats(X, Xf, 1.0))
        steps = res.history[1:] if init == "w" else res.history  # init=w: the first sweep starts from W itself
        for a, b in zip(steps, steps[1:]):
            assert b <= a * (1 + 1e-5), res.history


@pytest.mark.parametrize("kind", ["gptq", "quantease"])
def test_solving_for_the_target_lowers_the_propagated_error(kind):
    for seed in range(4):
        W, S, X, Xf = problem(20 + seed)
        spec, target = GridSpec(bits=3, group_size=[-1, 16][seed % 2]), stats(X, Xf, 1.0)
        blind = layer_loss(W, solve(kind, W, S, spec).weight.dequantize(), S, target)
        assert solve(kind, W, S, spec, target).loss < 0.9 * blind


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("with_target", [False, True])
def test_refit_never_increases_f_and_keeps_the_codes(sym, group_size, with_target):
    W, S, X, Xf = problem(30)
    spec = GridSpec(bits=3, group_size=group_size, sym=sym)
    target = stats(X, Xf, 1.0) if with_target else None
    res = solve("quantease", W, S, spec, target)
    W_hat, grid = res.weight.dequantize(), res.weight.grid
    new = refit_grid(W.float(), W_hat, S, grid, sym, None if target is None else target.shift(W))
    W_new = new.dequantize(res.weight.codes.float())
    assert torch.equal(new.quantize(W_new), res.weight.codes.float())  # same codes, on the new grid
    assert torch.equal(new.zero, new.zero.round()) and new.zero.min() >= 0 and new.zero.max() <= spec.maxq
    assert torch.equal(new.scale, new.scale.half().float())  # storable as the checkpoint's fp16 scales
    if sym:
        assert torch.equal(new.zero, grid.zero)
    before, after = layer_loss(W, W_hat, S, target), layer_loss(W, W_new, S, target)
    assert after <= before * (1 + 1e-6)
    assert after < 0.999 * before  # a CD fixed point's grid is not the best one for its codes


def test_quantease_with_refit_is_never_worse():
    for seed in range(4):
        W, S, X, Xf = problem(40 + seed)
        spec = GridSpec(bits=3, group_size=[-1, 16][seed % 2])
        for target in (None, stats(X, Xf, 1.0)):
            plain, refit = solve("quantease", W, S, spec, target), solve("quantease-refit", W, S, spec, target)
            assert refit.loss <= plain.loss


# ---- the pipeline ---------------------------------------------------------------------------------------------------

CAL = dict(nsamples=6, seqlen=48, device="cpu", bits=3, group_size=32)


def _shard_tensors(out) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("model-block-*.safetensors")) for k, v in load_file(f).items()}


def test_alpha_zero_gives_the_layer_objective_checkpoint(tiny_llama, calib_file, tmp_path):
    layer = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / "l"), calib=str(calib_file),
                                 target="layer", **CAL), progress=False)
    zero = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / "z"), calib=str(calib_file),
                                target="propagated", alpha=0.0, **CAL), progress=False)
    a, b = _shard_tensors(layer), _shard_tensors(zero)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((zero / "quantease.json").read_text())
    assert info["config"]["target"] == "propagated" and info["config"]["alpha"] == 0.0
    assert {l["objective"] for l in info["layers"].values()} == {"propagated"}


def _inputs(model, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0]))
             for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {n: x.reshape(-1, x.shape[-1]) for n, x in seen.items()}


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_pipeline_loss_is_the_error_against_the_original_model(tiny_llama, calib_file, tmp_path, alpha):
    """Block 1's q_proj reads the fully quantized block 0's output, and the last down_proj the quantized gate/up:
    in both the reloaded quantized model and the original one the inputs are what the pipeline paired."""
    out = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / "q"), calib=str(calib_file),
                               target="propagated", alpha=alpha, **CAL), progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = calibration_windows(tokenize(tok, load_text(str(calib_file), "calib")), CAL["nsamples"], CAL["seqlen"], 0)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    quantized, _, info = load(out)
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj"]
    Xf, Xq = _inputs(original, names, ids), _inputs(quantized, names[:2], ids)
    Xq[names[2]] = _inputs(_block0_only_quantized(original, quantized), names[2:], ids)[names[2]]
    for name in names:
        W, W_hat = original.get_submodule(name).weight.detach(), quantized.get_submodule(name).weight.detach()
        expected = measured(W, W_hat, Xq[name], Xf[name], alpha)
        assert info["layers"][name]["loss"] == pytest.approx(expected, rel=1e-3), name


def _block0_only_quantized(original, quantized):
    """The original model with only block 0 quantized: block 0's down_proj input as the pipeline saw it."""
    import copy

    model = copy.deepcopy(original)
    model.model.layers[0] = quantized.model.layers[0]
    return model


def test_auto_target_is_propagated_for_quantease_and_layer_for_the_baselines():
    """The default target (README "Solvers"): QuantEase solves toward the original model at α = 0.5; RTN and GPTQ,
    the baselines, keep their usual layer objective; an explicit target is kept; a record made before `auto` holds
    no target and was the layer objective."""
    assert (QuantConfig().target, QuantConfig().alpha) == ("propagated", 0.5)
    assert QuantConfig(method="rtn").target == QuantConfig(method="gptq").target == "layer"
    assert QuantConfig(method="gptq", target="propagated").target == "propagated"
    assert QuantConfig(target="layer").target == "layer"
    assert "target" not in QuantConfig(target="layer").to_dict()  # layer runs' settings stay as they were
    assert QuantConfig.from_dict(QuantConfig().to_dict()).target == "propagated"
