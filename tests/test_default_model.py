"""The real built-in model end to end: 8-bit RTN keeps its perplexity, 3-bit per-channel RTN clearly loses some."""
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
