"""Layers that share an input are solved as one stacked problem: the same codes, losses and histories as one solve
per layer, for every solver and option that stacks, on random and on captured layers."""
from __future__ import annotations

import pytest
import torch
from solver_reference import make_problem
from transformers import AutoModelForCausalLM

from quantease.api import QuantConfig, load, quantize
from quantease.solvers import GridSpec, get_solver
from quantease.solvers.base import Target

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("gptq", {}), ("gptq", {"act_order": False, "static_groups": False}), ("quantease", {}),
         ("quantease", {"refit": 2}), ("quantease", {"init": "w", "order": "diag", "sweeps": 4})]


def assert_same(stacked, separate):
    for a, b in zip(stacked, separate, strict=True):
        assert torch.equal(a.weight.codes, b.weight.codes)
        assert torch.equal(a.weight.grid.scale, b.weight.grid.scale) and torch.equal(a.weight.grid.zero,
                                                                                   b.weight.grid.zero)
        assert a.loss == b.loss and a.history == b.history and a.notes == b.notes


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("propagated", [False, True])
def test_stacked_equals_one_by_one(name, options, group_size, propagated):
    W, S, X = make_problem(60, 64, seed=3)
    target = None
    if propagated:
        D = 0.2 * torch.randn(X.shape, generator=torch.Generator().manual_seed(4))
        target = Target(D.T @ X / X.shape[0], D.T @ D / X.shape[0], 1.0)
    Ws = [W[:30], W[30:42], W[42:]]  # q, k, v of different heights
    entry, spec = get_solver(name), GridSpec(bits=3, group_size=group_size)
    opts = entry.make_options(options)
    assert entry.solve_stacked is not None
    stacked = entry.solve_group(Ws, S, spec, opts, target)
    assert_same(stacked, [entry.solve(w, S, spec, opts, target) for w in Ws])
    if name == "quantease" and not options and not propagated:
        assert len({len(r.history) for r in stacked}) > 1  # the layers stopped after different sweep counts


def test_pipeline_stacks_captured_groups(tiny_llama, calib_file, tmp_path):
    """Block 0's q/k/v and gate/up as the pipeline solved them (stacked) equal solves of each layer on its captured Σ
    (q/k/v read the original block input; gate/up follow the quantized attention, so only q/k/v are checked against
    the original weights)."""
    seen: dict[str, torch.Tensor] = {}
    out = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / "q"), calib=str(calib_file), nsamples=4,
                               seqlen=64, bits=3, group_size=32, device="cpu"), progress=False,
                   observe=lambda b, n, s: seen.setdefault(n, s) if b == 0 else None)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    quantized, _, info = load(out)
    entry = get_solver("quantease")
    opts, spec = entry.make_options({}), GridSpec(bits=3, group_size=32)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        full = f"model.layers.0.{name}"
        alone = entry.solve(original.get_submodule(full).weight.detach(), seen[name], spec, opts)
        assert torch.equal(quantized.get_submodule(full).weight, alone.weight.dequantize()), name
        assert info["layers"][full]["history"] == alone.history
