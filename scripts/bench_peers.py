"""Our quantizers next to llm-compressor's GPTQ on one protocol, scored by the same perplexity code.

    python scripts/bench_peers.py --bits 3,4 [--group-size -1] [--nsamples 16] [--seqlen 2048] [--ppl-limit 16]
                                  [--ours quantease] [--venv build/venv-peers] [--out runs/peers]
    (make bench-peers builds the virtualenv first: llmcompressor==0.14.0.1 beside torch==2.13.0)

Both tools get the same calibration windows (ours: `nsamples` random PTB-train windows of `seqlen` tokens, seed 0,
handed to llm-compressor as a DataLoader, one window per batch), the same asymmetric min-max integer grid (per
channel or `group_size`), and GPTQ's settings as production runs them (static act-order, damping 0.01; the
sequential pipeline, which calibrates each layer on the already-quantized earlier ones). llm-compressor runs in its
own virtualenv (it pins other transformers/compressed-tensors versions) and saves its quantize-dequantized weights as
a plain model; every model, the fp32 original included, is then scored here on the first `ppl-limit`
non-overlapping 2048-token windows of PTB test and of the wiki split. Wall times are whole processes on this machine
(model load included); run it alone on the machine, with OMP_NUM_THREADS set to the cores it may use.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoTokenizer

from quantease.api import evaluate_perplexity
from quantease.checkpoint.native import TOKENIZER_FILES
from quantease.data.sources import load_text
from quantease.data.windows import calibration_windows, tokenize
from quantease.models.reader import resolve_model_path

PEER_DRIVER = Path(__file__).parent / "peers" / "llmcompressor_gptq.py"


def _timed(cmd: list[str], remake: list[str] | None = None) -> float:
    """Wall seconds of `cmd`; when it exits 6 (a checkpoint of other settings is in the way), of `remake`."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 6 and remake:
        start = time.perf_counter()
        proc = subprocess.run(remake, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _content(path: Path) -> str:
    """A digest of what a checkpoint folder holds (its manifest, or llm-compressor's weights' headers); "" for a
    built-in model name."""
    files = [path / "manifest.json"] if (path / "manifest.json").exists() else sorted(path.glob("*.safetensors"))
    return hashlib.sha256(b"".join(f.read_bytes()[:1 << 20] for f in files)).hexdigest()[:16] if files else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--ppl-limit", type=int, default=16)
    ap.add_argument("--ours", default="quantease", help="our methods to run, comma-separated (their defaults)")
    ap.add_argument("--option", action="append", default=[], help="extra `quantease quantize` arguments for our "
                    "runs, e.g. --option=--target --option=propagated")
    ap.add_argument("--venv", default="build/venv-peers")
    ap.add_argument("--out", default="runs/peers")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = calibration_windows(tokenize(tok, load_text("ptb", "calib")), args.nsamples, args.seqlen, 0)
    win_file = out / f"calib-{args.nsamples}x{args.seqlen}.safetensors"
    save_file({"input_ids": windows.contiguous()}, str(win_file))
    grid = f"g{args.group_size}" if args.group_size != -1 else "pc"
    runs: dict[str, dict] = {"fp32": {"path": args.model, "tool": "original"}}
    for bits in (int(b) for b in args.bits.split(",")):
        tag = f"w{bits}{grid}-{args.nsamples}x{args.seqlen}"
        peer = out / f"llmcompressor-{tag}"
        if not (peer / "peer.json").exists():
            wall = _timed([str(Path(args.venv) / "bin" / "python"), str(PEER_DRIVER), "--model", str(model_dir),
                           "--windows", str(win_file), "--bits", str(bits), "--group-size", str(args.group_size),
                           "--out", str(peer)])
            (peer / "wall.json").write_text(json.dumps({"wall_s": round(wall, 1)}))
        for name in TOKENIZER_FILES:  # the driver saves the model only; scoring reads the tokenizer beside it
            if (model_dir / name).is_file() and not (peer / name).exists():
                shutil.copy2(model_dir / name, peer / name)
        runs[f"llm-compressor GPTQ W{bits}"] = {"path": str(peer), "tool": "llm-compressor", "bits": bits,
                                                "wall_s": json.loads((peer / "wall.json").read_text())["wall_s"]}
        suffix = "".join(f"-{a.strip('-')}" for a in args.option)
        for method in args.ours.split(","):
            mine = out / f"quantease-{method}-{tag}{suffix}"
            cmd = [sys.executable, "-m", "quantease.cli", "quantize", args.model, "--out", str(mine), "--method",
                   method, "--bits", str(bits), "--group-size", str(args.group_size), "--nsamples",
                   str(args.nsamples), "--seqlen", str(args.seqlen), "--quiet", *args.option]
            # an earlier checkpoint is kept only when made with today's settings (defaults included): the CLI
            # does nothing for those and refuses (exit 6) a checkpoint made with others, which is then remade
            before = (mine / "manifest.json").stat().st_mtime if (mine / "manifest.json").exists() else None
            wall = _timed(cmd, remake=[*cmd, "--overwrite"])
            if before != (mine / "manifest.json").stat().st_mtime:
                (mine / "wall.json").write_text(json.dumps({"wall_s": round(wall, 1)}))
            name = f"quantease {method}{' ' + ' '.join(args.option) if args.option else ''} W{bits}"
            runs[name] = {"path": str(mine), "tool": "quantease", "bits": bits,
                          "wall_s": json.loads((mine / "wall.json").read_text())["wall_s"]}
    cache_file = out / "ppl-cache.json"  # perplexities measured before, keyed by the checkpoint's content
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    for run in runs.values():
        key = f"{run['path']}|{_content(Path(run['path']))}|{args.ppl_limit}"
        if key not in cache:
            cache[key] = {f"ppl_{r.dataset}": round(r.ppl, 2) for r in evaluate_perplexity(
                run["path"], ["ptb", "wiki"], seqlen=2048, limit=args.ppl_limit, device="cpu", progress=False)}
            cache_file.write_text(json.dumps(cache, indent=1))
        run.update(cache[key])
    fp = runs["fp32"]
    lines = ["| model | PTB | wiki | PTB gap to fp32 | wiki gap to fp32 | wall s |", "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        gaps = [f"{run[f'ppl_{d}'] - fp[f'ppl_{d}']:.2f}" for d in ("ptb", "wiki")]
        lines.append(f"| {name} | {run['ppl_ptb']:.2f} | {run['ppl_wiki']:.2f} | {gaps[0]} | {gaps[1]} | "
                     f"{run.get('wall_s', '-')} |")
    table = "\n".join(lines)
    stem = out / f"peers-{grid}-{args.nsamples}x{args.seqlen}"
    stem.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    stem.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
