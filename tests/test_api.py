"""The top-level package is the API the README shows: `import quantease; quantease.load(...)`."""
from __future__ import annotations

import pytest
import torch

import quantease
from quantease.checkpoint.quant_linear import QuantLinear


def test_top_level_names_are_the_api(tiny_llama, calib_file, tmp_path):
    namespace: dict = {}
    exec("from quantease import *", namespace)  # every name in __all__ must resolve
    assert set(quantease.__all__) <= set(namespace)
    assert quantease.load is quantease.api.load and quantease.QuantConfig is quantease.api.QuantConfig

    config = quantease.QuantConfig(model=str(tiny_llama), out=str(tmp_path / "q"), calib=str(calib_file), nsamples=2,
                                   seqlen=32, device="cpu")
    assert config.method == "quantease"  # the tool's own method is the default
    out = quantease.quantize(config, progress=False)
    dense, tokenizer, info = quantease.load(out)
    packed, _, _ = quantease.load(out, packed=True)
    assert info["config"]["method"] == "quantease" and tokenizer is not None
    name = "model.layers.0.self_attn.q_proj"
    layer, stored = dense.get_submodule(name), packed.get_submodule(name)
    assert type(layer) is torch.nn.Linear and isinstance(stored, QuantLinear)  # dequantized once by default
    assert torch.equal(layer.weight, stored.dequantized_weight())
    ids = torch.arange(16)[None]
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, packed(input_ids=ids).logits)


def test_unknown_top_level_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        quantease.no_such_name
