"""Mixture-of-experts blocks: unfused experts compute what transformers' fused ones do, each expert's Σ comes from
the tokens routed to it, and experts that get too few tokens are rounded with RTN and reported."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantease.api import QuantConfig, load, quantize
from quantease.cli import main
from quantease.data.sources import load_text
from quantease.data.windows import calibration_windows, tokenize
from quantease.models.experts import Experts
from quantease.models.registry import get_arch

from conftest import save_tiny_model

E, TOP_K = 4, 2
CAL = dict(nsamples=4, seqlen=64, device="cpu")


def _mixtral(vocab: int) -> T.MixtralConfig:
    return T.MixtralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                           num_experts_per_tok=TOP_K, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_mixtral(tokenizer_dir, tmp_path_factory):
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    return save_tiny_model(_mixtral(vocab), tokenizer_dir, tmp_path_factory.mktemp("mixtral"))


ONE_BLOCK = dict(hidden_size=32, num_hidden_layers=1, vocab_size=16, num_experts_per_tok=TOP_K)


@pytest.mark.parametrize("config", [
    T.MixtralConfig(intermediate_size=48, num_local_experts=E, **ONE_BLOCK),
    T.Qwen2MoeConfig(moe_intermediate_size=48, num_experts=E, **ONE_BLOCK),
    T.Qwen3MoeConfig(moe_intermediate_size=48, num_experts=E, **ONE_BLOCK),
], ids=["mixtral", "qwen2_moe", "qwen3_moe"])
def test_unfused_experts_match_the_fused_module(config):
    """In float64, so the comparison does not depend on the order in which a library version sums the experts.

    Each output is a sum of TOP_K · F products (a few hundred terms); any summation order is exact to within
    n·u·Σ|terms|, u = 2^-53, i.e. about 1e-13 of the output's scale here. A wrong expert, slot or routing weight
    changes an output by a whole term, O(1) of its scale. The tolerance, 1e-9 of the scale, sits between the two,
    and the test checks that it still tells a mis-routed forward apart."""
    model = AutoModelForCausalLM.from_config(config).double()
    model.set_experts_implementation("eager")  # transformers' reference loop; grouped_mm kernels take no float64
    fused = model.model.layers[0].mlp.experts
    torch.manual_seed(0)
    with torch.no_grad():
        fused.gate_up_proj.normal_()
        fused.down_proj.normal_()
    spec = get_arch(config.model_type).experts
    experts = Experts(fused, spec)
    inter = fused.down_proj.shape[2]
    for e, expert in enumerate(experts.children()):  # fused gate_up = [gate; up] by rows
        getattr(expert, spec.gate).weight.data = fused.gate_up_proj[e, :inter].detach().clone()
        getattr(expert, spec.up).weight.data = fused.gate_up_proj[e, inter:].detach().clone()
        getattr(expert, spec.down).weight.data = fused.down_proj[e].detach().clone()
    x = torch.randn(10, 32, dtype=torch.float64)
    index = torch.stack([torch.randperm(E)[:TOP_K] for _ in range(10)])
    weights = torch.rand(10, TOP_K, dtype=torch.float64)
    with torch.no_grad():
        expected = fused(x, index, weights)
        tol = 1e-9 * float(expected.abs().max())
        torch.testing.assert_close(experts(x, index, weights), expected, rtol=0, atol=tol)
        for wrong in (index.flip(-1), (index + 1) % E):  # weights on the wrong slots; tokens to the wrong experts
            assert float((experts(x, wrong, weights) - expected).abs().max()) > 1e6 * tol


def test_each_expert_sigma_comes_from_its_routed_tokens(tiny_mixtral, calib_file, tmp_path):
    """Not sequential: block 0's Σ then come from the original model's activations."""
    seen: dict[str, torch.Tensor] = {}
    quantize(QuantConfig(model=str(tiny_mixtral), out=str(tmp_path / "q"), method="gptq", bits=4,
                         sequential=False, calib=str(calib_file), **CAL),
             progress=False, observe=lambda b, n, s: seen.setdefault(n, s) if b == 0 else None)

    # independently: the original model's block-0 router choices and expert inputs
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral).eval()
    tok = AutoTokenizer.from_pretrained(tiny_mixtral)
    windows = calibration_windows(tokenize(tok, load_text(str(calib_file), "calib")), CAL["nsamples"],
                                  CAL["seqlen"], 0)
    calls = []
    hook = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: calls.append(a))
    with torch.no_grad():
        model(input_ids=windows)
    hook.remove()
    x = torch.cat([a[0] for a in calls]).double()
    index = torch.cat([a[1] for a in calls])
    for e in range(E):
        X = x[(index == e).any(-1)]
        name = f"mlp.experts.{e}.w1"
        assert name in seen and f"mlp.experts.{e}.w3" in seen
        torch.testing.assert_close(seen[name], (X.T @ X / X.shape[0]).float(), rtol=1e-4, atol=1e-6)


def test_starved_expert_falls_back_to_rtn_and_says_so(tokenizer_dir, calib_file, tmp_path):
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = _mixtral(vocab)
    config.num_experts_per_tok = 1
    model_dir = save_tiny_model(config, tokenizer_dir, tmp_path / "model")
    weights = load_file(model_dir / "model.safetensors")
    router = weights["model.layers.0.block_sparse_moe.gate.weight"]
    router[E - 1] = (router[0] + router[1]) / 2  # its logit lies between experts 0's and 1's: never the top one
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["quantize", str(model_dir), "--out", str(out), "--method", "quantease",
                                       "--bits", "4", "--calib", str(calib_file), "--nsamples", "8",
                                       "--seqlen", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "quantease.json").read_text())
    starved = [f"model.layers.0.mlp.experts.{E - 1}.{n}" for n in ("w1", "w3", "w2")]
    for name in starved:
        assert any("0 calibration tokens" in n and "RTN" in n for n in info["layers"][name]["notes"])
        assert f"fallback: {name}: expert got 0 calibration tokens" in result.output
    solved = [n for n, layer in info["layers"].items() if n not in starved]
    assert all(not info["layers"][n]["notes"] for n in solved if ".experts.0." in n)
    model, _, _ = load(out, packed=True)  # the fallback expert is stored and reloads like the others
    assert model.model.layers[0].mlp.experts.get_submodule(f"{E - 1}.w2").meta["bits"] == 4


def test_export_of_moe_is_refused_before_and_after_quantizing(tiny_mixtral, calib_file, tmp_path):
    args = ["--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--quiet"]
    early = CliRunner().invoke(main, ["quantize", str(tiny_mixtral), "--out", str(tmp_path / "a"),
                                      "--format", "compressed-tensors", *args])
    assert early.exit_code == 2 and "mixture-of-experts" in early.output and "Traceback" not in early.output
    assert not (tmp_path / "a").exists()  # refused before any work
    assert CliRunner().invoke(main, ["quantize", str(tiny_mixtral), "--out", str(tmp_path / "b"), *args]).exit_code == 0
    late = CliRunner().invoke(main, ["export", str(tmp_path / "b"), "--format", "gptq", "--out", str(tmp_path / "c")])
    assert late.exit_code == 2 and "mixture-of-experts" in late.output and not (tmp_path / "c").exists()
