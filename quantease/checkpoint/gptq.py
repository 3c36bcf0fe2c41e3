"""Export to the GPTQ checkpoint format (AutoGPTQ / GPTQModel; loaded by vLLM, and by transformers with gptqmodel).

Per quantized linear NAME, with ŵ[o, i] = scales[g, o] · (c[o, i] - z[g, o]), g = g_idx[i]:

  NAME.qweight  int32 [in·b/32, out]   column o is row o's codes packed along the INPUT dim as one little-endian bit
                                       stream: bit k of code i is bit (i·b + k) mod 32 of word (i·b + k) // 32. For
                                       2/4/8 bits word r holds codes r·32/b .. as b-bit fields; for 3 bits every 32
                                       codes fill 3 words and codes 10 and 21 straddle two (AutoGPTQ's pack loop)
  NAME.qzeros   int32 [groups, out·b/32]  zero points packed the same way along the OUTPUT dim:
                                       z itself (checkpoint_format "gptq_v2"), or z - 1 (v1, "gptq")
  NAME.scales   fp16  [groups, out]
  NAME.g_idx    int32 [in]             group of each input column (i // group_size unless act-order; 0 per channel)

v1 stores z - 1 and loaders add the 1 back, so a zero point of 0 wraps to 2^b - 1 and its group dequantizes wrongly:
asymmetric checkpoints are written as gptq_v2 (GPTQModel's `convert_gptq_v1_to_v2_format` adds 1 to every v1 field);
symmetric ones (z = 2^(b-1), never 0) as v1, which every loader reads. Symmetric grids agree with GPTQ's:
s = max|w| / ((2^b - 1) / 2), z = 2^(b-1). Bits: 2, 3, 4, 8; in and out features multiples of 32 (the loaders'
QuantLinear requirement). One quantization_config covers the model, so every layer must share bits, group size and
symmetry, and every linear in the decoder blocks must be quantized.
Spec: AutoGPTQ qlinear pack() (qweight/qzeros loops, `zeros -= 1`), GPTQModel utils/model.py v1<->v2 conversion.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.registry import get_arch
from .export import Source, linear_names, read_source, register, require, uniform, write_export
from .native import decode_grid
from .packing import pack

__all__ = ["FORMAT", "SUPPORTED_BITS", "export_gptq", "quantization_config", "convert_layer"]

FORMAT = "gptq"
SUPPORTED_BITS = (2, 3, 4, 8)


def _check(source: Source) -> None:
    metas = source.layers.values()
    for name, meta in source.layers.items():
        require(meta["bits"] in SUPPORTED_BITS, name, FORMAT, f"GPTQ loaders read only {SUPPORTED_BITS}-bit codes, "
                f"not {meta['bits']}", "keep the native format (compressed-tensors takes 2, 4 and 8 bits)")
        require(meta["in_features"] % 32 == 0 and meta["out_features"] % 32 == 0, name, FORMAT,
                f"its shape {meta['out_features']}x{meta['in_features']} is not a multiple of 32",
                "export with --format compressed-tensors, or keep the native format")
    for key in ("bits", "group_size", "sym"):
        require(uniform(m[key] for m in metas), "the model", FORMAT, f"layers differ in {key} and GPTQ has one "
                "setting per model", "export with --format compressed-tensors, or keep the native format")
    blocks = get_arch(source.config["model_type"]).blocks + "."
    missing = [n for n in linear_names(source) if n.startswith(blocks) and n not in source.layers]
    require(not missing, ", ".join(missing[:3]), FORMAT, "GPTQ loaders expect every linear of the decoder blocks "
            "quantized", "export with --format compressed-tensors, or keep the native format")


def _v2(meta: dict[str, Any]) -> bool:
    return not meta["sym"]


def quantization_config(source: Source) -> dict[str, Any]:
    meta = next(iter(source.layers.values()))
    return {"quant_method": "gptq", "bits": meta["bits"], "group_size": meta["group_size"],
            "desc_act": any(source.act_order(n) for n in source.layers), "sym": meta["sym"],
            "checkpoint_format": "gptq_v2" if _v2(meta) else "gptq", "lm_head": False}


def convert_layer(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One layer's native tensors -> its GPTQ tensors (module docstring)."""
    codes, grid = decode_grid(tensors, meta)
    bits = meta["bits"]
    zeros = grid.zero.T - (0 if _v2(meta) else 1)  # [G, out]; v1 stores z - 1 (>= 0: symmetric z = 2^(b-1))
    return {
        "qweight": pack(codes, bits).T,  # [in·b/32, out]
        "qzeros": pack(zeros.to(torch.uint8), bits),  # [G, out·b/32]
        "scales": grid.scale.T.to(torch.float16),  # [G, out]
        "g_idx": grid.g_idx.to(torch.int32),  # [in]
    }


@register(FORMAT)
def export_gptq(src: Path, dst: Path) -> None:
    """Write the checkpoint `src` into the (new or empty) folder `dst` in the GPTQ format."""
    source = read_source(src, FORMAT)
    _check(source)
    write_export(source, Path(dst), FORMAT, quantization_config(source), convert_layer)
