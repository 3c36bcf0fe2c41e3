"""Export to compressed-tensors "pack-quantized": the int weight-only format of llm-compressor, loaded by vLLM and
decompressed by transformers (`AutoModelForCausalLM.from_pretrained`).

compressed-tensors stores signed b-bit values q, zp in [-2^(b-1), 2^(b-1) - 1] with ŵ = weight_scale · (q - zp), and
packs them offset by +2^(b-1). Our grid is ŵ = s · (c - z) with unsigned code c and zero z in [0, 2^b - 1], so
q = c - 2^(b-1), zp = z - 2^(b-1), and the packed (offset) fields are exactly c and z. Per quantized linear NAME:

  NAME.weight_packed      int32 [out, in·b/32]       c packed along the INPUT dim, LSB first: code j of a row is bits
                                                     b·(j mod 32/b) .. of word j // (32/b); the last word zero-padded
  NAME.weight_scale       fp32  [out, groups]        our fp16 scales, exact; fp32 for fp32 models (else fp16) since
                                                     loaders dequantize in the scale's dtype (bf16 models round them)
  NAME.weight_zero_point  int32 [out·b/32, groups]   asymmetric only: z packed the same way along the OUTPUT dim
  NAME.weight_shape       int64 [2]                  (out, in)

Bits: 2, 4, 8 (32/b values per word in every version). The 3/5/6/7-bit layout changed: 32//b values per word with the
high bits wasted (compressed-tensors PR #715), then dense with values straddling words (PR #732), with nothing in the
checkpoint to tell them apart, so a loader of the other generation would read wrong weights; those widths are refused.
vLLM's CompressedTensorsWNA16 serves 4 and 8 bits (with zero points: only 4 and 8). Act-order groups (g_idx) are
refused: compressed-tensors removed `actorder: group`. transformers loads symmetric exports as they are; asymmetric
ones, with compressed-tensors 0.20, only with CompressedTensorsConfig(dequantize=True) (llm-compressor#1618).
Spec: compressed_tensors 0.20.0 compressors/pack_quantized/{base,helpers}.py and quantization/quant_args.py.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from .export import Source, linear_names, read_source, register, require, write_export
from .native import decode_grid
from .packing import pack

__all__ = ["FORMAT", "SUPPORTED_BITS", "export_compressed_tensors", "quantization_config", "convert_layer",
           "scale_dtype"]

FORMAT = "compressed-tensors"
SUPPORTED_BITS = (2, 4, 8)
_INSTEAD = "export with --format gptq, or keep the native format"


def _check(source: Source) -> None:
    for name, meta in source.layers.items():
        require(meta["bits"] in SUPPORTED_BITS, name, FORMAT,
                f"{meta['bits']}-bit codes have two incompatible pack-quantized layouts (padded before compressed-"
                f"tensors PR #732, dense after) and loaders cannot tell which was written", _INSTEAD)
        require(not source.act_order(name), name, FORMAT, "its groups are in activation order (g_idx), which "
                "compressed-tensors no longer supports", "export with --format gptq (desc_act), or keep the native "
                "format")


def _scheme(meta: dict[str, Any]) -> dict[str, Any]:
    grouped = meta["group_size"] != -1
    return {"num_bits": meta["bits"], "type": "int", "symmetric": meta["sym"],
            "strategy": "group" if grouped else "channel", "group_size": meta["group_size"] if grouped else None,
            "dynamic": False}


def quantization_config(source: Source) -> dict[str, Any]:
    """config.json's quantization_config: one config group per distinct (bits, group size, symmetry); every
    nn.Linear that is not quantized (lm_head, ...) is listed in `ignore`."""
    schemes: dict[str, list[str]] = {}
    for name, meta in source.layers.items():
        schemes.setdefault(repr(sorted(_scheme(meta).items())), []).append(name)
    groups = {}
    for i, names in enumerate(schemes.values()):
        targets = ["Linear"] if len(schemes) == 1 else sorted(names)  # one scheme: every Linear not ignored
        groups[f"group_{i}"] = {"targets": targets, "weights": _scheme(source.layers[names[0]]),
                                "input_activations": None, "output_activations": None}
    ignore = sorted(n for n in linear_names(source) if n not in source.layers)
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}


def scale_dtype(config: dict[str, Any]) -> torch.dtype:
    """fp32 for fp32 models (a loader's dequantization then matches ours exactly), else fp16 (our scales' own dtype)."""
    return torch.float32 if config.get("dtype", config.get("torch_dtype")) == "float32" else torch.float16


def convert_layer(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One layer's native tensors -> its pack-quantized tensors (module docstring)."""
    assert "g_idx" not in tensors, name  # refused by _check
    codes, grid = decode_grid(tensors, meta)
    bits = meta["bits"]
    out = {
        "weight_packed": pack(codes, bits),  # [out, in·b/32]
        "weight_scale": grid.scale.to(scale_dtype),  # [out, G], fp16 values
        "weight_shape": torch.tensor([meta["out_features"], meta["in_features"]], dtype=torch.int64),
    }
    if not meta["sym"]:
        out["weight_zero_point"] = pack(grid.zero.T.to(torch.uint8), bits).T  # [out·b/32, G]
    return out


@register(FORMAT)
def export_compressed_tensors(src: Path, dst: Path) -> None:
    """Write the checkpoint `src` into the (new or empty) folder `dst` as compressed-tensors pack-quantized."""
    source = read_source(src, FORMAT)
    _check(source)
    convert = partial(convert_layer, scale_dtype=scale_dtype(source.config))
    write_export(source, Path(dst), FORMAT, quantization_config(source), convert)
