"""Forward dtype on the default model: perplexity of QuantEase checkpoints made with bf16 vs fp32 block forwards.

Each (bits, dtype) is quantized with `quantease.api.quantize` (solvers, Σ and the evaluation stay fp32; only the
block forwards and the activations they pass on change) and evaluated on PTB and wiki. Prints a Markdown table with
the relative perplexity difference of each bf16 checkpoint from its fp32 twin, and the quantize wall times.

    python scripts/bench_dtype.py --bits 3,4 --nsamples 16 --seqlen 512 --ppl-limit 8
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", default="3,4")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ppl", default="ptb,wiki")
    p.add_argument("--ppl-limit", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench-dtype")
    args = p.parse_args()

    from quantease.api import QuantConfig, evaluate_perplexity, quantize

    datasets = [d for d in args.ppl.split(",") if d]
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for dtype in args.dtypes.split(","):
            out = Path(args.out) / f"w{bits}-{dtype}"
            start = time.perf_counter()
            quantize(QuantConfig(model=args.model, out=str(out), method="quantease", bits=bits, dtype=dtype,
                                 nsamples=args.nsamples, seqlen=args.seqlen, device=args.device), progress=False)
            wall = time.perf_counter() - start
            info = json.loads((out / "quantease.json").read_text())
            ppl = {r.dataset: r.ppl for r in evaluate_perplexity(out, datasets, limit=args.ppl_limit,
                                                                 device=args.device, progress=False)}
            rows.append({"bits": bits, "dtype": dtype, "ppl": ppl, "quantize_s": round(wall, 1),
                         "mean_rel_error": info["summary"]["mean_rel_error"]})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nprotocol: {vars(args)}\n")
    print("| bits | forwards | " + " | ".join(f"{d} ppl" for d in datasets) + " | mean rel. layer error | quantize s |")
    print("|---" * (4 + len(datasets)) + "|")
    base = {r["bits"]: r for r in rows if r["dtype"] == "float32"}
    for r in rows:
        ref = base.get(r["bits"])
        cells = [f"{r['ppl'][d]:.3f}" + ("" if ref is None or ref is r else f" ({100 * (r['ppl'][d] / ref['ppl'][d] - 1):+.2f}%)")
                 for d in datasets]
        print(f"| W{r['bits']} | {r['dtype']} | " + " | ".join(cells) + f" | {r['mean_rel_error']:.5f} | {r['quantize_s']} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench-dtype.json").write_text(json.dumps({"protocol": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
