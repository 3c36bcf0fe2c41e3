"""Whole-model benchmark: quantize the default model with several methods and bit widths, then perplexity.

Each quantization runs as its own `quantease quantize` process, so its wall time and peak RSS are measured cleanly;
perplexity of the original and of every checkpoint follows the standard protocol. Prints a Markdown table and
writes JSON, and the split of each run's wall time from its run.json: capturing block 0's inputs, block forwards,
Σ accumulation, layer solves, the rest of the blocks' time (loading, packing, writing) and the process around them
(imports, plan, tokenizing, the outer shard), with the block forwards the passes cost per block.

    python scripts/bench_pipeline.py --methods rtn,gptq,quantease --bits 3,4 --nsamples 128 --seqlen 2048
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def quantize(model: str, out: Path, method: str, bits: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "quantease.cli", "quantize", model, "--out", str(out), "--method", method,
           "--bits", str(bits), "--group-size", str(args.group_size), "--calib", args.calib, "--bos", args.bos, "--nsamples",
           str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device, "--quiet", "--overwrite"]
    start = time.perf_counter()
    # a fresh parent per run, so that its children's peak RSS is this run's alone
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    info = json.loads((out / "quantease.json").read_text())
    run = json.loads((out / "run.json").read_text())
    split = {k: sum(b[f"{k}_s"] for b in run["blocks"]) for k in ("forward", "sigma", "solve")}
    blocks = sum(run["blocks_s"])
    split = {"capture": run["capture_s"], **split, "other": blocks - sum(split.values()),
             "process": wall - run["capture_s"] - blocks}
    return {"method": method, "bits": bits, "wall_s": round(wall, 1), "peak_rss_mib": round(peak_kib / 1024, 1),
            "bits_per_weight": round(info["summary"]["bits_per_weight"], 3),
            "mean_rel_error": round(info["summary"]["mean_rel_error"], 5),
            "split_s": {k: round(v, 1) for k, v in split.items()},
            "block_forwards": round(sum(run["block_forwards"]) / len(run["block_forwards"]), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="rtn,gptq,quantease")
    p.add_argument("--bits", default="3,4")
    p.add_argument("--group-size", type=int, default=-1)
    p.add_argument("--calib", default="ptb")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--bos", default="auto", help="BOS mode of calibration and perplexity windows (see --bos)")
    p.add_argument("--ppl", default="ptb,wiki")
    p.add_argument("--ppl-limit", type=int, default=None, help="windows per dataset (default: the whole test text)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench-pipeline")
    p.add_argument("--json", default=None, help="write the results here (default: OUT/bench.json)")
    args = p.parse_args()

    from quantease.api import evaluate_perplexity

    out = Path(args.out)
    datasets = [d for d in args.ppl.split(",") if d]
    rows = [{"method": "fp32", "bits": 32, "wall_s": None, "peak_rss_mib": None, "bits_per_weight": 32.0,
             "mean_rel_error": 0.0, "model": args.model}]
    targets = [args.model]
    for method in args.methods.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            folder = out / f"{method}-w{bits}"
            rows.append({**quantize(args.model, folder, method, bits, args), "model": str(folder)})
            targets.append(str(folder))
    for row, target in zip(rows, targets):
        for r in evaluate_perplexity(target, datasets, seqlen=2048, limit=args.ppl_limit, device=args.device,
                                     progress=False, bos=args.bos):
            row[f"ppl_{r.dataset}"] = round(r.ppl, 3)
            row["ppl_tokens"] = r.tokens

    protocol = {k: getattr(args, k) for k in ("model", "group_size", "calib", "bos", "nsamples", "seqlen", "ppl_limit",
                                              "device")}
    path = Path(args.json) if args.json else out / "bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))
    cols = ["method", "bits", "bits_per_weight", "mean_rel_error", *[f"ppl_{d}" for d in datasets], "wall_s", "peak_rss_mib"]
    print(f"protocol: {protocol}")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    parts = ["capture", "forward", "sigma", "solve", "other", "process"]
    print("\n| method | bits | " + " | ".join(f"{k} s" for k in parts) + " | block forwards per block |\n|" +
          "---|" * (len(parts) + 3))
    for row in rows[1:]:
        print(f"| {row['method']} | {row['bits']} | " + " | ".join(str(row["split_s"][k]) for k in parts) +
              f" | {row['block_forwards']} |")


if __name__ == "__main__":
    main()
