"""llm-compressor's GPTQ on exactly the calibration windows quantease uses; runs inside the peers' virtualenv.

Called by scripts/bench_peers.py (which owns the protocol), not by hand:
    VENV/bin/python scripts/peers/llmcompressor_gptq.py --model DIR --windows calib.safetensors --bits 3 \
        --group-size -1 --out OUT
GPTQModifier with an asymmetric integer min-max grid, static activation order, damping 0.01 and the sequential
pipeline (each layer calibrated on the already-quantized earlier layers' outputs). OUT receives the quantized model
as plain fp32 weights (each linear's quantize-dequantized values, checked to lie on the grid llm-compressor
fitted), so any transformers version reads it, and peer.json with the settings and the wall time of `oneshot`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", required=True, help="safetensors file with input_ids [n, seqlen]")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = load_file(args.windows)["input_ids"]  # [n, seqlen]
    batches = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in ids]
    loader = DataLoader(batches, batch_size=None)  # one window per batch, in our order
    weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "observer": "minmax",
               "strategy": "channel" if args.group_size == -1 else "group"}
    if args.group_size != -1:
        weights["group_size"] = args.group_size
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          actorder="static", dampening_frac=0.01, block_size=128)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, pipeline="sequential", num_calibration_samples=len(batches))
    seconds = time.perf_counter() - start

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    quantized = 0
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        W, scale, zero = module.weight.detach(), module.weight_scale.detach().float(), module.weight_zero_point
        gs = W.shape[1] // scale.shape[1]
        s, z = scale.repeat_interleave(gs, 1), zero.float().repeat_interleave(gs, 1)
        codes = torch.clamp(torch.round(W / s) + z, -(2 ** (args.bits - 1)), 2 ** (args.bits - 1) - 1)
        assert torch.allclose((codes - z) * s, W, rtol=0, atol=1e-6 * float(W.abs().max())), f"{name} is off its grid"
        dense.get_submodule(name).weight.data.copy_(W)
        quantized += 1
    out = Path(args.out)
    dense.save_pretrained(out)
    (out / "peer.json").write_text(json.dumps({
        "tool": "llm-compressor", "version": llmcompressor.__version__, "oneshot_s": round(seconds, 1),
        "quantized_layers": quantized, "weights": weights, "actorder": "static", "dampening_frac": 0.01,
        "pipeline": "sequential", "windows": list(ids.shape), "torch_threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
