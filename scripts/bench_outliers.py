"""Outlier-aware QuantEase and FFSplit on the default model: PTB and wiki perplexity against effective bits.

Each configuration is quantized with `quantease.api.quantize` (an interrupted one resumes) and evaluated with
`evaluate_perplexity`; results are kept per label in OUT/results/LABEL.json with the protocol, so reruns, or several
processes with different --only lists, add rows instead of redoing them. Prints a Markdown table of every stored
result of the same protocol, with the effective bits per weight (codes, scales, zeros, outlier values and indices).

    python scripts/bench_outliers.py --nsamples 128 --seqlen 2048            # the full protocol
    python scripts/bench_outliers.py --nsamples 16 --seqlen 512 --ppl-limit 8 --only qe-w3,qe-w3-o1
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

QE = {"method": "quantease", "bits": 3}
CONFIGS: dict[str, dict[str, Any]] = {
    "qe-w3": QE,
    "qe-w3-o0.5": {**QE, "method_options": {"outliers": 0.005}},
    "qe-w3-o1": {**QE, "method_options": {"outliers": 0.01}},
    "qe-w3-o2": {**QE, "method_options": {"outliers": 0.02}},
    "qe-w3-o1col": {**QE, "method_options": {"outliers": 0.01, "outlier_structure": "column"}},
    "qe-w3-ffs2-h8": {**QE, "ffsplit": 0.02, "heavy_bits": 8},
    "qe-w3-ffs2-h16": {**QE, "ffsplit": 0.02, "heavy_bits": 16},
    "qe-w3-ffs5-h8": {**QE, "ffsplit": 0.05, "heavy_bits": 8},
    "qe-w3-ffs5-h16": {**QE, "ffsplit": 0.05, "heavy_bits": 16},
    "qe-w3-g192": {**QE, "group_size": 192},  # uniform, ~ FFSplit 2% at 8 bits
    "qe-w3-g48": {**QE, "group_size": 48},  # uniform, ~ 0.5-1% outliers
    "qe-w3-g32": {**QE, "group_size": 32},  # uniform, ~ 1% outliers / FFSplit 5% at 16 bits
    "qe-w4": {**QE, "bits": 4},  # uniform, ~ 2% outliers
}


def run_one(label: str, settings: dict[str, Any], args: argparse.Namespace, datasets: list[str]) -> dict[str, Any]:
    from quantease.api import QuantConfig, evaluate_perplexity, quantize

    out = Path(args.out) / label
    config = QuantConfig(model=args.model, out=str(out), calib=args.calib, nsamples=args.nsamples,
                         seqlen=args.seqlen, device=args.device, bos=args.bos, **settings)
    start = time.perf_counter()
    quantize(config, restart=False, progress=False)
    wall = time.perf_counter() - start
    info = json.loads((out / "quantease.json").read_text())
    ppl = evaluate_perplexity(out, datasets, args.ppl_seqlen, args.ppl_limit, args.device, progress=False,
                              bos=args.bos)
    return {"label": label, "bits_per_weight": round(info["summary"]["bits_per_weight"], 3),
            "mean_rel_error": round(info["summary"]["mean_rel_error"], 5), "quantize_s": round(wall, 1),
            **{r.dataset: round(r.ppl, 3) for r in ppl}}


def table(rows: list[dict[str, Any]], datasets: list[str]) -> str:
    head = "| configuration | bits/weight | " + " | ".join(f"{d} ppl" for d in datasets) + " | rel. layer error |"
    lines = [head, "|" + "---|" * (3 + len(datasets))]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | "
                     + " | ".join(f"{r.get(d, float('nan')):.2f}" for d in datasets) + f" | {r['mean_rel_error']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--only", default=",".join(["fp32", *CONFIGS]),
                   help=f"comma-separated labels of: fp32, {', '.join(CONFIGS)}")
    p.add_argument("--calib", default="ptb")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--bos", default="auto", help="BOS mode of calibration and perplexity windows (see --bos)")
    p.add_argument("--ppl", default="ptb,wiki")
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--ppl-limit", type=int, default=None, help="windows per dataset (default: the whole test text)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench-outliers")
    args = p.parse_args()

    from quantease.api import evaluate_perplexity

    datasets = [d for d in args.ppl.split(",") if d]
    store = Path(args.out) / "results"
    store.mkdir(parents=True, exist_ok=True)
    protocol = {k: getattr(args, k) for k in ("model", "calib", "nsamples", "seqlen", "ppl_seqlen", "ppl_limit")}
    if args.bos != "auto":  # named only when asked for, so results stored before --bos still match
        protocol["bos"] = args.bos
    labels = args.only.split(",")
    unknown = [l for l in labels if l not in CONFIGS and l != "fp32"]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: fp32, {', '.join(CONFIGS)}")
    for label in labels:
        path = store / f"{label}.json"
        if path.exists() and json.loads(path.read_text())["protocol"] == protocol:
            continue
        if label == "fp32":
            ppl = evaluate_perplexity(args.model, datasets, args.ppl_seqlen, args.ppl_limit, args.device,
                                      progress=False, bos=args.bos)
            row = {"label": "fp32", "bits_per_weight": 32.0, "mean_rel_error": 0.0,
                   **{r.dataset: round(r.ppl, 3) for r in ppl}}
        else:
            row = run_one(label, CONFIGS[label], args, datasets)
        path.write_text(json.dumps({"protocol": protocol, "row": row}, indent=2))
        print(json.dumps(row), flush=True)
    stored = {p.stem: json.loads(p.read_text()) for p in store.glob("*.json")}
    rows = [stored[k]["row"] for k in ["fp32", *CONFIGS] if k in stored and stored[k]["protocol"] == protocol]
    print(f"protocol: {json.dumps(protocol)}")
    print(table(rows, datasets))

if __name__ == "__main__":
    main()
