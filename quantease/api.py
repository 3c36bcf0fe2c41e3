"""The Python API that the CLI and batch jobs share: quantize, load, evaluate."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .checkpoint.reload import is_quantized_checkpoint, load_quantized
from .config import QuantConfig
from .eval.perplexity import PerplexityResult, perplexity_on
from .models.reader import resolve_model_path
from .pipeline import quantize, resolve_device

__all__ = ["QuantConfig", "quantize", "load", "evaluate_perplexity"]


def load(model: str | Path, dense: bool = False, device: str = "cpu") -> tuple[torch.nn.Module, Any, dict | None]:
    """(model, tokenizer, quantease info or None) for a quantease checkpoint, a built-in name or an HF folder."""
    if is_quantized_checkpoint(model):
        net, info = load_quantized(Path(model), dense=dense)
        tokenizer = AutoTokenizer.from_pretrained(model)
    else:
        path = resolve_model_path(str(model))
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer, info = AutoTokenizer.from_pretrained(path), None
    return net.to(resolve_device(device)), tokenizer, info


def evaluate_perplexity(
    model: str | Path, datasets: list[str], seqlen: int = 2048, limit: int | None = None, device: str = "auto",
    dense: bool = False, progress: bool = True, save: bool = True,
) -> list[PerplexityResult]:
    """Perplexity of `model` on each dataset; for a quantease checkpoint the results are also saved in eval.json."""
    net, tokenizer, _ = load(model, dense=dense, device=device)
    dev = next(net.parameters()).device
    results = [perplexity_on(net, tokenizer, d, seqlen, limit, dev, progress) for d in datasets]
    if save and is_quantized_checkpoint(model):
        _save_eval(Path(model), results)
    return results


def _save_eval(folder: Path, results: list[PerplexityResult]) -> None:
    path = folder / "eval.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    ppl = data.setdefault("perplexity", {})
    for r in results:
        ppl[f"{r.dataset}:seqlen={r.seqlen}:windows={r.windows}"] = r.to_dict()  # the protocol is in the key
    tmp = path.with_name(".eval.json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
