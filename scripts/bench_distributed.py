"""Distributed benchmark: one process with T threads against torchrun with N processes of T/N threads each.

Quantizes the default model (W4 QuantEase, per channel) at 16 × 2048 PTB-train tokens both ways, on the same
machine, and reports wall time, peak RSS per rank, each block's time split (forwards, Σ, solves, collectives) and
whether the two checkpoints hold the same codes. From the one-process run's per-layer solve times it also predicts
the wall time with more ranks: forwards and Σ divide by N, each stage's solves take the longest rank's share under
the pipeline's own owner assignment (distributed.assign_owners on q·p²), the rest stays.

    python scripts/bench_distributed.py --nproc 2 --threads 2 --nsamples 16 --seqlen 2048 --predict 2,8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open


def run(cmd: list[str], threads: int) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def quantize_cmd(args: argparse.Namespace, out: Path) -> list[str]:
    return ["-m", "quantease", "quantize", args.model, "--out", str(out), "--method", "quantease", "--bits",
            str(args.bits), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size",
            str(args.batch_size), "--device", "cpu", "--quiet", "--overwrite",
            *(x for o in args.options for x in ("-o", o))]


def same_codes(a: Path, b: Path) -> tuple[int, int]:
    """(tensors that differ, tensors) over every shard of the two checkpoints."""
    differ = total = 0
    for f in sorted(a.glob("model-*.safetensors")):
        with safe_open(f, "pt") as x, safe_open(b / f.name, "pt") as y:
            for k in x.keys():
                total += 1
                differ += not x.get_tensor(k).equal(y.get_tensor(k))
    return differ, total


def stages(info: dict) -> list[list[str]]:
    """Each block's solve stages (sequential: one per group of linears sharing an input), by layer name."""
    from quantease.models.registry import get_arch

    arch = get_arch(info["model"]["model_type"])
    names = list(info["layers"])
    out = []
    for i in range(info["model"]["blocks"]):
        prefix = next(n for n in names if f".{i}." in n).split(f".{i}.")[0] + f".{i}."
        out += [[prefix + n for n in g] for g in arch.groups if prefix + g[0] in info["layers"]]
    return out


def predict(run_log: dict, info: dict, n: int) -> float:
    """Wall time with n ranks, from a one-process run (see the module docstring)."""
    from quantease.distributed import assign_owners

    layers = info["layers"]
    solve = 0.0
    for stage in stages(info):
        cost = {l: layers[l]["out_features"] * layers[l]["in_features"] ** 2 for l in stage}
        owners = assign_owners(cost, n)
        solve += max(sum(run_log["layer_s"][l] for l in stage if owners[l] == r) for r in range(n))
    blocks = run_log["blocks"]
    parallel = sum(b["forward_s"] + b["sigma_s"] for b in blocks)
    rest = run_log["total_s"] - parallel - sum(b["solve_s"] for b in blocks)
    return rest + parallel / n + solve


def summary(out: Path, wall: float) -> dict:
    log = json.loads((out / "run.json").read_text())
    blocks = log["blocks"]
    ranks = [[b] for b in blocks] if "ranks" not in blocks[0] else [b["ranks"] for b in blocks]
    per_rank = list(zip(*ranks))  # [rank][block]
    split = {k: round(sum(b.get(f"{k}_s", 0.0) for b in blocks), 1) for k in ("forward", "sigma", "solve", "comm")}
    return {"wall_s": round(wall, 1), "total_s": log["total_s"], "split_s (rank 0)": split,
            "peak_rss_mib per rank": [round(max(b["peak_rss"] for b in r) / 2**20) for r in per_rank],
            "solve_s per rank": [round(sum(b["solve_s"] for b in r), 1) for r in per_rank]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("-o", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="QuantEase option, as quantize's -o (repeatable)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the one process; each rank gets threads/nproc")
    p.add_argument("--predict", default="2,8", help="rank counts to predict from the one-process run")
    p.add_argument("--out", default="runs/bench-distributed")
    args = p.parse_args()

    root = Path(args.out)
    one, many = root / "one", root / f"ranks-{args.nproc}"
    wall_one = run([sys.executable, *quantize_cmd(args, one)], args.threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    wall_many = run([*torchrun, *quantize_cmd(args, many)], max(1, args.threads // args.nproc))
    log, info = (json.loads((one / f).read_text()) for f in ("run.json", "quantease.json"))
    differ, total = same_codes(one, many)
    result = {
        "protocol": {k: getattr(args, k) for k in ("model", "bits", "nsamples", "seqlen", "batch_size", "nproc",
                                                    "threads", "options")},
        f"1 process x {args.threads} threads": summary(one, wall_one),
        f"{args.nproc} processes x {max(1, args.threads // args.nproc)} thread(s)": summary(many, wall_many),
        "tensors that differ": f"{differ} of {total}",
        "predicted total_s from the one-process run": {
            n: round(predict(log, info, int(n)), 1) for n in args.predict.split(",") if n},
    }
    (root / "bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
