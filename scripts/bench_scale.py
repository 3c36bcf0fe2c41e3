"""Scale benchmark: a random-weight model with the real shapes of Llama-3-8B, truncated to a few blocks.

Builds (once) a Llama folder with hidden 4096, FFN 14336, 32 query / 8 key-value heads and a 128256-token vocabulary,
`--blocks` decoder blocks, saved as sharded bf16 safetensors (one shard per block plus one for the embeddings and
head; normal(0, 0.02) weights, unit norms) with the default model's tokenizer, whose ids all lie in the vocabulary.
Then quantizes it with QuantEase's defaults at W4 in its own `quantease quantize` process and reports, from run.json,
per block: seconds in block forwards, in Σ accumulation and in each layer's solve, the peak RSS (and on CUDA the peak
of torch.cuda.max_memory_allocated), the bytes written; and the plan's predictions next to what was measured (peak
memory, checkpoint and resume-state bytes, block forwards), with the extrapolation to all 32 blocks, at the run's
calibration and at 128 x 2048 tokens (forward and Σ time grow with the tokens, solve time does not; memory from
the plan at that size). Prints Markdown and writes OUT/bench-scale.json.

    python scripts/bench_scale.py --blocks 2 --nsamples 8 --seqlen 2048 --dtype bfloat16        # CPU
    python scripts/bench_scale.py --blocks 2 --nsamples 128 --device cuda                       # a GPU
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SHAPES = {  # name -> (config fields, blocks of the full model)
    "8b": (dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8), 32),
    "70b": (dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8), 80),
}
GiB = 2**30


def _fill(shape: tuple[int, ...], seed: int, std: float = 0.02):
    """A bf16 tensor of normal(0, std) values, drawn a slab of rows at a time (no full fp32 copy)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(shape, dtype=torch.bfloat16)
    for i in range(0, shape[0], 8192):
        out[i:i + 8192] = torch.randn((min(8192, shape[0] - i), *shape[1:]), generator=gen).mul_(std)
    return out


def build_model(folder: Path, blocks: int, shape: str = "8b") -> Path:
    """The truncated Llama-3-shaped model in `folder` (kept between runs when its config matches)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from quantease.models.builtin import resolve_builtin

    config = LlamaConfig(**SHAPES[shape][0], num_hidden_layers=blocks, dtype="bfloat16")
    if (folder / "model.safetensors.index.json").exists() and \
            json.loads((folder / "config.json").read_text())["num_hidden_layers"] == blocks:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    h, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    n = blocks + 1
    weight_map = {}

    def shard(k: int, tensors: dict) -> None:
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})

    for i in range(blocks):
        tensors = {f"model.layers.{i}.{m}.weight": _fill(s, seed=100 * i + j) for j, (m, s) in enumerate(shapes.items())}
        tensors.update({f"model.layers.{i}.{m}.weight": torch.ones(h, dtype=torch.bfloat16)
                        for m in ("input_layernorm", "post_attention_layernorm")})
        shard(i, tensors)
    shard(blocks, {"model.embed_tokens.weight": _fill((config.vocab_size, h), seed=1),
                   "lm_head.weight": _fill((config.vocab_size, h), seed=2),
                   "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    tokenizer = resolve_builtin("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, folder / name)
    return folder


def quantize(model: Path, out: Path, args: argparse.Namespace) -> float:
    """Wall seconds of one `quantease quantize` process (its peaks are in its run.json: the pipeline resets the
    kernel's peak-RSS counter per phase, so the process's lifetime maximum is not the measurement)."""
    cmd = [sys.executable, "-m", "quantease.cli", "quantize", str(model), "--out", str(out), "--method", "quantease",
           "--bits", "4", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size",
           str(args.batch_size), "--dtype", args.dtype, "--device", args.device, "--quiet", "--overwrite"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def block_rows(run: dict) -> list[dict]:
    """Per block: run.json's split, each layer's solve, the rest of the block's time (loading, reading the fp32
    weights, packing, writing) and the bytes written (shard and resume state)."""
    rows = []
    for b, total in zip(run["blocks"], run["blocks_s"]):
        prefix = f"model.layers.{b['block']}."
        layers = {k.removeprefix(prefix): v for k, v in run["layer_s"].items() if k.startswith(prefix)}
        rows.append({**b, "layers_s": layers, "other_s": total - b["forward_s"] - b["sigma_s"] - b["solve_s"],
                     "written": b["shard_bytes"] + b.get("resume_bytes", 0)})
    return rows


def report(rows: list[dict], run: dict, checkpoint: int, cuda: bool, big: dict, args: argparse.Namespace) -> dict:
    plan = run["plan"]
    layers = list(rows[0]["layers_s"])
    short = [n.rpartition(".")[2] for n in layers]
    print(f"| block | forwards s | Σ s | {' | '.join(short)} s | other s | peak RSS GiB |"
          f"{' peak GPU GiB |' if cuda else ''} written GiB |")
    print("|---" * (6 + len(layers) + cuda) + "|")
    for r in rows:
        gpu = f" {_gib(r['peak_device'])} |" if cuda else ""
        solves = " | ".join(f"{r['layers_s'][n]:.1f}" for n in layers)
        print(f"| {r['block']} | {r['forward_s']:.1f} | {r['sigma_s']:.1f} | {solves} | {r['other_s']:.1f} | "
              f"{_gib(r['peak_rss'])} |{gpu} {_gib(r['written'])} |")
    device_measured = max([run["capture_peak_device"]] + [r["peak_device"] for r in rows])
    rss_measured = max([run["startup_peak_rss"], run["capture_peak_rss"]] + [r["peak_rss"] for r in rows])
    pairs = [("peak host RAM (RSS) GiB", plan["host_peak"]["bytes"], rss_measured)]
    if cuda:
        pairs.append(("peak GPU memory GiB", plan["device_peak"]["bytes"], device_measured))
    pairs += [("checkpoint GiB", plan["checkpoint_bytes"], checkpoint),
              ("resume state GiB", plan["resume_bytes"], rows[0].get("resume_bytes", 0))]
    print("\n| quantity | plan | measured | measured / plan |\n|---|---|---|---|")
    for name, p, m in pairs:
        print(f"| {name} | {_gib(p)} | {_gib(m)} | {m / p:.2f} |")
    passes = sum(r["passes"] for r in rows)
    print(f"| block forwards (passes over all batches) | {plan['block_forwards']} | {passes:g} | "
          f"{passes / plan['block_forwards']:.2f} |")
    print(f"\nplan's peak: host at {plan['host_peak']['phase']}; device at {plan['device_peak']['phase']}; "
          f"measured: startup (imports, tokenization) {_gib(run['startup_peak_rss'])} GiB, capture "
          f"{_gib(run['capture_peak_rss'])} GiB, blocks {_gib(max(r['peak_rss'] for r in rows))} GiB")

    full = SHAPES[args.shape][1]
    per_block = {k: sum(r[k] for r in rows) / len(rows) for k in ("forward_s", "sigma_s", "solve_s", "other_s")}
    scale = 128 * 2048 / (args.nsamples * args.seqlen)
    block_s = sum(per_block.values())
    big_block_s = scale * (per_block["forward_s"] + per_block["sigma_s"]) + per_block["solve_s"] + per_block["other_s"]
    per_block_disk = (checkpoint - run["outer_bytes"]) / len(rows)
    extrapolated = {
        "run": {"tokens": args.nsamples * args.seqlen, "seconds": run["capture_s"] + full * block_s,
                "peak_host": plan["host_peak"]["bytes"], "peak_device": plan["device_peak"]["bytes"]},
        "128x2048": {"tokens": 128 * 2048, "seconds": scale * run["capture_s"] + full * big_block_s,
                     "peak_host": big["host_peak"]["bytes"], "peak_device": big["device_peak"]["bytes"],
                     "resume_state": big["resume_bytes"]},
        "checkpoint": run["outer_bytes"] + full * per_block_disk,
        "per_block": per_block,
    }
    print(f"\n{full} blocks: per block {per_block['forward_s']:.1f} s forwards + {per_block['sigma_s']:.1f} s Σ + "
          f"{per_block['solve_s']:.1f} s solves + {per_block['other_s']:.1f} s other; at {args.nsamples} x {args.seqlen} tokens "
          f"{extrapolated['run']['seconds'] / 60:.1f} min; at 128 x 2048 "
          f"{extrapolated['128x2048']['seconds'] / 60:.1f} min (forwards and Σ x{scale:.0f}), plan's peak "
          f"{_gib(big['device_peak']['bytes'])} GiB device / {_gib(big['host_peak']['bytes'])} GiB host, resume "
          f"state {_gib(big['resume_bytes'])} GiB; checkpoint {_gib(extrapolated['checkpoint'])} GiB")
    return {"pairs": [{"quantity": n, "plan": p, "measured": m} for n, p, m in pairs], "extrapolated": extrapolated}


def print_full_plans(model: Path, args: argparse.Namespace) -> None:
    """The plan of the full-depth model: peaks are those of one block (all blocks are alike); disk, resume states and
    forwards scale with the blocks."""
    from quantease.api import QuantConfig, plan

    full = SHAPES[args.shape][1]
    for nsamples, seqlen in ((args.nsamples, args.seqlen), (128, 2048)):
        for every in (1, 8):
            p = plan(QuantConfig(model=str(model), nsamples=nsamples, seqlen=seqlen, calib_batch_size=args.batch_size,
                                 dtype=args.dtype, device=args.device, resume_every=every))
            per_block = (p.checkpoint_bytes - _outer(model)) / p.blocks
            checkpoint = _outer(model) + full * per_block
            saves = sum(1 for i in range(full - 1) if (i + 1) % every == 0)
            print(f"{args.shape} x {full} blocks, {nsamples} x {seqlen}, {p.dtype}, --resume-every {every}: device "
                  f"{_gib(p.device_peak.bytes)} GiB at {p.device_peak.phase}, host {_gib(p.host_peak.bytes)} GiB, "
                  f"checkpoint {_gib(checkpoint)} GiB, resume state {_gib(p.resume_bytes)} GiB x {saves} = "
                  f"{_gib(saves * p.resume_bytes)} GiB written ({_gib(saves * p.resume_bytes / full)} GiB per block), "
                  f"{p.passes_per_block * full} block passes")
        print(p.text())


def _outer(model: Path) -> int:
    """Bytes of the tensors outside the blocks (the embeddings and head shard)."""
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    return (model / index["lm_head.weight"]).stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="auto", help="forward dtype (auto: float32 on CPU, the checkpoint's bf16 on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench-scale")
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="Llama-3-8B or -70B shapes")
    p.add_argument("--plan-only", action="store_true",
                   help="print `quantease plan` for the full model at 128 x 2048 (and at this protocol); quantize nothing")
    args = p.parse_args()

    import torch

    from quantease.api import QuantConfig, plan

    out = Path(args.out)
    t0 = time.perf_counter()
    model = build_model(out / f"llama3-{args.shape}-shapes-{args.blocks}", args.blocks, args.shape)
    print(f"model: {model} ({time.perf_counter() - t0:.0f} s to build or find); threads {torch.get_num_threads()}")
    if args.plan_only:
        print_full_plans(model, args)
        return
    wall = quantize(model, out / "q", args)
    run = json.loads((out / "q" / "run.json").read_text())
    info = json.loads((out / "q" / "quantease.json").read_text())
    run["outer_bytes"] = (out / "q" / "model-outer.safetensors").stat().st_size
    checkpoint = sum(f.stat().st_size for f in (out / "q").iterdir() if f.name not in ("run.json", "manifest.json"))
    big = plan(QuantConfig(model=str(model), nsamples=128, seqlen=2048, calib_batch_size=args.batch_size,
                           dtype=args.dtype, device=args.device)).to_dict()
    print(f"quantize: {wall:.0f} s wall, forward dtype {info['model']['forward_dtype']}, "
          f"{args.nsamples} x {args.seqlen} calibration tokens, batch {args.batch_size}, device {args.device}\n")
    rows = block_rows(run)
    summary = report(rows, run, checkpoint, args.device.startswith("cuda"), big, args)
    result = {"protocol": vars(args), "wall_s": wall, "blocks": rows, "plan": run["plan"],
              "capture_s": run["capture_s"], **summary}
    (out / "bench-scale.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'bench-scale.json'}")


if __name__ == "__main__":
    main()
