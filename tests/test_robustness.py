"""Numerical robustness and failure reporting across the whole pipeline (every solver, odd dtypes, bad numbers)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantease import pipeline
from quantease.api import QuantConfig, load, quantize
from quantease.cli import main
from quantease.errors import NumericalError, ResourceError
from quantease.solvers import GridSpec, get_solver, solver_names

CAL = dict(nsamples=2, seqlen=32, device="cpu")


def adversarial_sigmas(p: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4 * p, p, generator=gen)
    low_rank = torch.randn(p, 3, generator=gen)
    dead = X.clone()
    dead[:, ::5] = 0
    scales = torch.logspace(-4, 4, p)  # 1e8 dynamic range on the diagonal
    return {
        "rank-deficient": low_rank @ low_rank.T,
        "zero columns": dead.T @ dead / X.shape[0],
        "1e8 range": (X * scales).T @ (X * scales) / X.shape[0],
        "all zero": torch.zeros(p, p),
    }


@pytest.mark.parametrize("case", list(adversarial_sigmas(8)))
@pytest.mark.parametrize("method", solver_names())
def test_every_solver_survives_adversarial_sigma(method, case):
    sigma = adversarial_sigmas(64)[case]
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    entry = get_solver(method)
    for spec in (GridSpec(3, -1), GridSpec(4, 32, sym=True)):
        res = entry.solve(W, sigma, spec, entry.make_options())
        W_hat = res.weight.dequantize()
        assert torch.isfinite(W_hat).all() and res.loss == res.loss and res.loss < float("inf")
        assert int(res.weight.codes.max()) <= spec.maxq
        assert torch.equal(res.weight.grid.quantize(W_hat), res.weight.codes.float())  # Ŵ lies on its grid
        assert all(b <= a * (1 + 1e-5) + 1e-12 for a, b in zip(res.history[1:], res.history[2:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype, tiny_llama, calib_file, tmp_path):
    half = tmp_path / "half"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype)
    model.save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(half)
    out = quantize(QuantConfig(model=str(half), out=str(tmp_path / "q"), method="quantease", bits=8,
                               calib=str(calib_file), **CAL), progress=False)
    quantized, _, info = load(out)
    assert all(torch.isfinite(torch.tensor(l["loss"])) for l in info["layers"].values())
    ids = torch.arange(20)[None]
    with torch.no_grad():
        ref = model.float()(input_ids=ids).logits
        got = quantized(input_ids=ids).logits
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm()) < 0.02


def test_non_finite_activations_name_the_problem(tiny_llama, calib_file, tmp_path):
    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")  # a norm, not a linear weight
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(broken)
    with pytest.raises(NumericalError, match="non-finite activations"):
        quantize(QuantConfig(model=str(broken), out=str(tmp_path / "q"), calib=str(calib_file), **CAL), progress=False)
    assert not (tmp_path / "q" / "manifest.json").exists()


def test_out_of_memory_names_the_block_and_the_fix(tiny_llama, calib_file, tmp_path, monkeypatch):
    real = pipeline.quantize_block
    calls = {"n": 0}

    def fails_on_second_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_block", fails_on_second_block)
    out = tmp_path / "q"
    res = CliRunner().invoke(main, ["quantize", str(tiny_llama), "--out", str(out), "--calib", str(calib_file),
                                    "--nsamples", "2", "--seqlen", "32", "--quiet"])
    assert res.exit_code == ResourceError.exit_code
    assert "out of memory in block 1" in res.output and "--batch-size" in res.output and "Traceback" not in res.output
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(pipeline, "quantize_block", real)  # the rerun resumes after block 0 and completes
    assert CliRunner().invoke(main, ["quantize", str(tiny_llama), "--out", str(out), "--calib", str(calib_file),
                                     "--nsamples", "2", "--seqlen", "32", "--quiet"]).exit_code == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipeline_on_cuda_matches_cpu(tiny_llama, calib_file, tmp_path):
    infos = {}
    for device in ("cpu", "cuda"):
        out = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / device), method="quantease", bits=4,
                                   calib=str(calib_file), nsamples=4, seqlen=64, device=device), progress=False)
        infos[device] = load(out)[2]
    for name, layer in infos["cpu"]["layers"].items():
        assert infos["cuda"]["layers"][name]["rel_error"] == pytest.approx(layer["rel_error"], rel=0.05, abs=1e-5)
