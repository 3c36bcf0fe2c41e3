"""The block-by-block pipeline on tiny random Llama and OPT models, end to end through the checkpoint."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantease.api import QuantConfig, load, quantize
from quantease.checkpoint.reload import load_quantized
from quantease.data.sources import load_text
from quantease.data.windows import calibration_windows, tokenize
from quantease.models.registry import get_arch
from quantease.solvers import GridSpec, get_solver

from test_rtn import direct_rtn

CAL = dict(nsamples=8, seqlen=64, calib_batch_size=3, device="cpu")


def _logit_error(original: torch.nn.Module, quantized: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = original(input_ids=ids).logits, quantized(input_ids=ids).logits
    return float((a - b).norm() / (a - a.mean(-1, keepdim=True)).norm())


def test_logits_close_at_8_bits_and_worse_at_2(tiny_model, calib_file, tmp_path):
    original = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    errors = {}
    for bits in (8, 2):
        out = quantize(QuantConfig(model=str(tiny_model), out=str(tmp_path / f"w{bits}"), bits=bits,
                                   calib=str(calib_file), **CAL), progress=False)
        model, _, info = load(out, packed=True)  # the packed QuantLinear path
        assert info["summary"]["quantized_layers"] == 2 * len(get_arch(original.config.model_type).linears)
        errors[bits] = _logit_error(original, model, ids)
    assert errors[8] < 0.02
    assert errors[2] > 10 * errors[8]


def test_reload_gives_the_solver_weights(tiny_llama, calib_file, tmp_path):
    """RTN weights do not depend on calibration, so the reloaded Ŵ must equal RTN of the original weights."""
    out = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / "q"), method="rtn", bits=3, group_size=16,
                               calib=str(calib_file), **CAL), progress=False)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    packed, info = load_quantized(out)
    dense, _ = load_quantized(out, dense=True)
    assert len(info["layers"]) == 14
    for name in info["layers"]:
        W = original.get_submodule(name).weight.data
        codes, scales, zeros = direct_rtn(W, 3, 16, False)
        expected = scales.repeat_interleave(16, 1) * (codes - zeros.repeat_interleave(16, 1))
        assert torch.equal(packed.get_submodule(name).dequantized_weight(), expected), name
        assert torch.equal(dense.get_submodule(name).weight.data, expected), name
    # everything that is not quantized comes back unchanged
    for name, p in original.named_parameters():
        if name.rpartition(".")[0] not in info["layers"]:
            assert torch.equal(dict(packed.named_parameters())[name], p), name


def test_sigma_equals_full_forward_of_original_model(tiny_model, calib_file, tmp_path):
    """Without sequential quantization every Σ of block 0 comes from the original model's activations."""
    seen: dict[str, torch.Tensor] = {}
    quantize(QuantConfig(model=str(tiny_model), out=str(tmp_path / "q"), bits=4, sequential=False,
                         calib=str(calib_file), **CAL),
             progress=False, observe=lambda block, name, s: seen.setdefault(name, s) if block == 0 else None)

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    arch = get_arch(model.config.model_type)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    windows = calibration_windows(tokenize(tok, load_text(str(calib_file), "calib")), CAL["nsamples"], CAL["seqlen"], 0)
    block = model.get_submodule(arch.blocks)[0]
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in arch.linears}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0]))
             for n in arch.linears]
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    assert set(seen) == set(arch.linears)
    for name in arch.linears:
        X = torch.cat(inputs[name]).reshape(-1, inputs[name][0].shape[-1]).double()
        expected = (X.T @ X / X.shape[0]).float()
        torch.testing.assert_close(seen[name], expected, rtol=1e-4, atol=1e-6)


def test_sequential_groups_see_quantized_earlier_groups(tiny_llama, calib_file, tmp_path):
    def sigmas(sequential: bool) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / f"s{sequential}"), bits=2,
                             sequential=sequential, calib=str(calib_file), **CAL),
                 progress=False, observe=lambda b, n, s: seen.setdefault(n, s) if b == 0 else None)
        return seen

    seq, joint = sigmas(True), sigmas(False)
    torch.testing.assert_close(seq["self_attn.q_proj"], joint["self_attn.q_proj"])  # block input: same either way
    assert not torch.allclose(seq["mlp.down_proj"], joint["mlp.down_proj"], rtol=1e-3)  # after 2-bit attention/MLP


def test_solver_registry_options_are_validated():
    entry = get_solver("rtn")
    assert entry.requires_calibration is False
    try:
        entry.make_options({"sweeps": 3})
    except ValueError as e:
        assert "sweeps" in str(e)
    else:
        raise AssertionError("unknown option accepted")
    assert GridSpec(4, 32).groups(64) == 2
