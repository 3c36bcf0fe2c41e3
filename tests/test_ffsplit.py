"""FFSplit: the split is exact, heavy neurons get their bits, checkpoints round-trip, statistics are reported."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from quantease.api import QuantConfig, quantize
from quantease.checkpoint.native import encode_split
from quantease.checkpoint.packing import packed_words
from quantease.checkpoint.quant_linear import QuantLinear
from quantease.checkpoint.reload import load_quantized
from quantease.errors import UsageError
from quantease.eval.heavy_hitters import heavy_hitter_table, plot_heavy_hitters
from quantease.solvers.ffsplit import heavy_count, neuron_scores

CAL = dict(nsamples=8, seqlen=64, calib_batch_size=4, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_ffn_equals_unsplit(tiny_llama):
    """Σ over heavy and light neurons of φ_i(x) v_i is the FFN's output, for any split."""
    mlp = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers[0].mlp
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    heavy = torch.tensor([3, 17, 40, 99])
    light = torch.tensor([i for i in range(128) if i not in heavy.tolist()])

    def part(idx: torch.Tensor) -> torch.Tensor:
        phi = mlp.act_fn(F.linear(x, mlp.gate_proj.weight[idx])) * F.linear(x, mlp.up_proj.weight[idx])
        return F.linear(phi, mlp.down_proj.weight[:, idx])

    with torch.no_grad():
        torch.testing.assert_close(part(heavy) + part(light), mlp(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_two_products_equal_one(axis):
    """QuantLinear's two dense products (parts kept in fp16) equal the unsplit layer's product."""
    W = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    heavy = torch.tensor([2, 5, 7])
    n = 12 if axis == "rows" else 20
    light = torch.tensor([i for i in range(n) if i not in heavy.tolist()])
    take = (lambda idx: W[idx]) if axis == "rows" else (lambda idx: W[:, idx])
    tensors = encode_split({"heavy": take(heavy), "light": take(light)}, heavy)
    meta = {"out_features": 12, "in_features": 20, "bits": 3, "group_size": -1, "sym": False, "split_axis": axis,
            "parts": [{"name": "heavy", "bits": 16}, {"name": "light", "bits": 16}]}
    layer = QuantLinear(meta, tensors, None)
    x = torch.randn(4, 20)
    assert torch.equal(layer.dequantized_weight(), W.half().float())
    torch.testing.assert_close(layer(x), F.linear(x, W.half().float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heavy_bits", [8, 16])
def test_pipeline_heavy_bits_and_reload(tiny_llama, calib_file, tmp_path, heavy_bits):
    seen: dict[str, torch.Tensor] = {}
    cfg = QuantConfig(model=str(tiny_llama), out=str(tmp_path / "f"), method="gptq", bits=3, ffsplit=0.1,
                      heavy_bits=heavy_bits, sequential=False, calib=str(calib_file), **CAL)
    out = quantize(cfg, progress=False, observe=lambda b, n, s: seen.setdefault(f"{b}:{n}", s))
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    packed, info = load_quantized(out)
    dense, _ = load_quantized(out, dense=True)
    k = heavy_count(0.1, 128)
    for b in range(2):
        prefix = f"model.layers.{b}.mlp."
        W_down = original.get_submodule(prefix + "down_proj").weight.data
        expected = torch.topk(neuron_scores(seen[f"{b}:mlp.down_proj"], W_down), k).indices.sort().values
        for name, axis in (("gate_proj", "rows"), ("up_proj", "rows"), ("down_proj", "cols")):
            meta, layer = info["layers"][prefix + name], packed.get_submodule(prefix + name)
            assert meta["split_axis"] == axis and [p["bits"] for p in meta["parts"]] == [heavy_bits, 3]
            assert torch.equal(layer.heavy_index.long(), expected)  # sequential=False: Σ of the original model
            if heavy_bits == 8:
                assert layer.heavy__qweight.shape[1] == packed_words(meta["parts"][0]["in_features"], 8)
            W, W_hat = original.get_submodule(prefix + name).weight.data, layer.dequantized_weight()
            err = (W_hat - W).abs()
            err_h, err_l = (err[expected], err) if axis == "rows" else (err[:, expected], err)
            if heavy_bits == 16:
                assert torch.equal(W_hat[expected] if axis == "rows" else W_hat[:, expected],
                                   (W[expected] if axis == "rows" else W[:, expected]).half().float())
            assert err_h.max() < err_l.max() / 8  # the heavy neurons got their bits
            assert torch.equal(W_hat, dense.get_submodule(prefix + name).weight.data)
        assert "heavy_hitters" in info["layers"][prefix + "down_proj"]
    ids = torch.randint(0, original.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # two dense products per split layer == one dequantized product
        torch.testing.assert_close(packed(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert info["config"]["ffsplit"] == 0.1 and set(info["ffsplit"]["layers"]) == {
        f"model.layers.{b}.mlp.down_proj" for b in range(2)}
    plain = info["summary"]["bits_per_weight"]
    assert 3 < plain < 3 + (heavy_bits + 1) * 0.1  # codes of both parts, scales, zeros and heavy indices counted


def test_statistics_table_and_plot(tiny_llama, calib_file, tmp_path):
    out = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / "s"), bits=4, ffsplit=4, heavy_bits=16,
                               calib=str(calib_file), **CAL), progress=False)
    info = json.loads((out / "quantease.json").read_text())
    table = heavy_hitter_table(info)
    assert table.count("\n") == 3 and "top1% share" in table and "max/median" in table
    stats = info["ffsplit"]["layers"]["model.layers.0.mlp.down_proj"]
    assert stats["heavy"] == 4 and 0 < stats["share"]["top1%"] <= stats["share"]["top10%"] <= 1
    png = plot_heavy_hitters(info, tmp_path / "hh.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_default_leaves_checkpoint_unchanged_and_bad_settings_fail(tiny_llama, calib_file, tmp_path):
    cfg = QuantConfig(model=str(tiny_llama), out=str(tmp_path / "d"), bits=4, calib=str(calib_file), **CAL)
    assert "ffsplit" not in cfg.to_dict() and "heavy_bits" not in cfg.to_dict()
    with pytest.raises(UsageError, match="heavy_bits"):
        QuantConfig(heavy_bits=12)
    with pytest.raises(UsageError, match="ffsplit"):
        QuantConfig(ffsplit=2.5)
