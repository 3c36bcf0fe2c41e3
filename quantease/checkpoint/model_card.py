"""The model card (README.md with Hugging Face front matter) of a checkpoint or an export, written offline.

Front matter (huggingface_hub.ModelCardData): base_model (the built-in model's hub id, or the source config's
_name_or_path when it names a hub repository), base_model_relation: quantized, quantized_by, license (the built-in
model's, or the source folder's own model card's; "other" when unknown), library_name and tags. Body: how it was made
(method and options, grid, calibration), effective bits per weight and mean relative layer error from quantease.json,
the layers whose grid differs from the run's (GGUF fallbacks), the files, how to load them, and the evaluation table
from the checkpoint's eval.json when one exists. Nothing in it depends on the clock, so identical runs write identical
cards.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .. import __version__
from ..models.builtin import BUILTIN_MODELS

__all__ = ["card_text", "write_card"]

_LIBRARY = {"native": "transformers", "compressed-tensors": "transformers", "gptq": "transformers", "gguf": "gguf"}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _origin(info: dict[str, Any], model_config: dict[str, Any]) -> tuple[str | None, str]:
    """(base model hub id or None, license) of the model the checkpoint was quantized from."""
    builtin = BUILTIN_MODELS.get(info["config"]["model"])
    if builtin is not None:
        return builtin.hub_id, builtin.license
    name = str(model_config.get("_name_or_path", ""))
    base = name if _REPO_ID.match(name) and not Path(name).exists() else None
    readme = Path(info["model"]["source"]) / "README.md"
    license_ = ModelCard.load(readme).data.license if readme.is_file() else None
    return base, license_ or "other"


def _grid_text(config: dict[str, Any]) -> str:
    if config.get("grid"):
        return f"{config['grid']} (llama.cpp's {config['grid'].removeprefix('gguf:').upper()} grid)"
    group = "per channel" if config["group_size"] == -1 else f"group size {config['group_size']}"
    return f"{config['bits']}-bit {'symmetric' if config['sym'] else 'asymmetric'}, {group}, clip {config['clip']}"


def _eval_rows(evals: dict[str, Any]) -> list[str]:
    rows = []
    for key, r in sorted(evals.get("perplexity", {}).items()):
        rows.append(f"| perplexity | {r['dataset']} | {r['windows']} windows × {r['seqlen']} tokens | "
                    f"{r['ppl']:.3f} |")
    for key, r in sorted(evals.get("zeroshot", {}).items()):
        for metric, value in sorted(r.items()):
            if isinstance(value, float) and metric != "seconds" and not metric.endswith("_stderr"):
                rows.append(f"| {key.partition(':')[0]} | {metric} | {key.partition(':')[2]} | {value:.4f} |")
    return rows


def _usage(fmt: str, files: list[str]) -> str:
    if fmt == "gguf":
        name = files[0]
        return (f"```bash\nllama-cli -m {name} -p \"The capital of France is\"\nollama create my-model -f Modelfile   "
                f"# Modelfile: FROM ./{name}\n```\n\n```python\nfrom transformers import AutoModelForCausalLM\n"
                f"model = AutoModelForCausalLM.from_pretrained(\".\", gguf_file=\"{name}\")  # dequantized to fp32\n```")
    if fmt == "native":
        return "```python\nimport quantease\nmodel, tokenizer, info = quantease.load(\"PATH\")\n```"
    return "```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"PATH\")\n```"


def card_text(info: dict[str, Any], model_config: dict[str, Any], fmt: str, files: list[str],
              evals: dict[str, Any] | None = None) -> str:
    """README.md of a checkpoint (fmt "native") or of an export to `fmt` holding `files`."""
    config, summary = info["config"], info["summary"]
    base, license_ = _origin(info, model_config)
    method = config["method"]
    tags = ["quantized", "quantease", method, f"{config['bits']}-bit"] + ([fmt] if fmt != "native" else [])
    data = ModelCardData(base_model=base, base_model_relation="quantized", quantized_by=f"quantease {__version__}",
                         license=license_, library_name=_LIBRARY.get(fmt, "transformers"), tags=tags)
    options = ", ".join(f"{k}={v}" for k, v in sorted(config.get("method_options", {}).items())) or "defaults"
    cal = info["calibration"]
    name = base or config["model"]
    lines = [
        f"# {name}, {method} {config.get('grid') or str(config['bits']) + '-bit'} ({fmt})", "",
        f"Post-training weight quantization of {name} with quantease {__version__}: "
        f"every linear layer of the decoder blocks solved by **{method}** on its calibration statistics.", "",
        "| setting | value |", "|---|---|",
        f"| method | {method} ({options}) |",
        f"| grid | {_grid_text(config)} |",
        f"| calibration | {cal['source']}: {cal['nsamples']} windows × {cal['seqlen']} tokens, seed {cal['seed']} |",
        f"| quantized layers | {summary['quantized_layers']} |",
        f"| effective bits per weight | {summary['bits_per_weight']:.3f} (codes, scales, zeros and indices counted) |",
        f"| mean relative layer error ‖WX − ŴX‖² / ‖WX‖² | {summary['mean_rel_error']:.5f} |",
    ]
    other = sorted({l["gguf"] for l in info["layers"].values() if l.get("gguf")} - {config.get("grid", "")[5:]})
    if other:
        n = sum(1 for l in info["layers"].values() if l.get("gguf") in other)
        lines.append(f"| other GGUF types | {n} layers whose rows do not fit the type's blocks: "
                     f"{', '.join(other)} (llama.cpp's fallback) |")
    lines += ["", "## Files", "", *[f"- `{f}`" for f in files], "", "## Use", "", _usage(fmt, files)]
    rows = _eval_rows(evals or {})
    if rows:
        lines += ["", "## Evaluation", "", "Measured with `quantease eval` on the quantized checkpoint"
                  + (" this export was made from (same weights)" if fmt != "native" else "") + ".", "",
                  "| benchmark | dataset / metric | protocol | value |", "|---|---|---|---|", *rows]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n"))


def write_card(source, path: Path, fmt: str, files: list[str]) -> None:
    """Write the card of an export of `source` (an export.Source) to `path`, atomically."""
    from .native import _atomic_write_bytes

    evals_path = source.folder / "eval.json"
    evals = json.loads(evals_path.read_text()) if evals_path.is_file() else None
    text = card_text(source.info, source.config, fmt, [f for f in files if f != "README.md"], evals)
    _atomic_write_bytes(Path(path), lambda tmp: tmp.write_text(text))
