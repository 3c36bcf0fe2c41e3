"""GGUF exports of the default model: perplexity of each file read back by transformers' GGUF reader (and by
llama.cpp, through llama-cpp-python, when it is installed), with the file sizes.

Each (type, method) is quantized on llama.cpp's grid of the type (`--grid gguf:TYPE`; an interrupted run resumes),
exported to OUT/TYPE-METHOD.gguf, loaded with AutoModelForCausalLM / AutoTokenizer .from_pretrained(OUT,
gguf_file=...) and scored with the standard protocol (quantease.eval.perplexity). llama.cpp scores the same token
windows (our tokenization, fed as token ids), all logits of each window from one llama_eval, so its numbers differ from
transformers' only by llama.cpp's arithmetic (its CPU matmuls quantize the activations to 8 bits; its extra buffer
types, AMX and repacked weights, are left off); it also checks that
llama.cpp's own C dequantizers (ggml's dequantize_row_<type>) decode every quantized tensor of the file to gguf-py's
values bit for bit. Results are kept
per row in OUT/results/LABEL.json with the protocol; reruns add rows instead of redoing them.

    python scripts/bench_gguf.py --nsamples 16 --seqlen 2048 --ppl-limit 16           # the README protocol
    python scripts/bench_gguf.py --types q4_0,q4_k --methods rtn,quantease --llama-cpp
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any


def _windows(tokenizer, dataset: str, seqlen: int, limit: int | None):
    from quantease.data.sources import load_text
    from quantease.data.windows import eval_windows, tokenize

    return eval_windows(tokenize(tokenizer, load_text(dataset, "eval")), seqlen, limit)


def llama_cpp_ppl(path: Path, windows, threads: int) -> float:
    """exp(mean NLL) of every predicted token of `windows` [n, seqlen] under llama.cpp's evaluation of `path`."""
    import llama_cpp.llama_cpp as lib
    import numpy as np
    from llama_cpp import Llama

    defaults = lib.llama_model_default_params

    def no_extra_buffers():  # AMX / repacked-weight buffers: some VMs advertise AMX but trap its instructions
        params = defaults()
        params.use_extra_bufts = False
        return params

    seqlen = windows.shape[1]
    lib.llama_model_default_params = no_extra_buffers
    try:
        llm = Llama(model_path=str(path), n_ctx=seqlen, n_batch=seqlen, logits_all=True, n_threads=threads,
                    verbose=False)
    finally:
        lib.llama_model_default_params = defaults
    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)  # [seqlen - 1, vocab]
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(seqlen - 1), w[1:]].sum())
        count += seqlen - 1
    return math.exp(nll / count)


def ggml_dequantizer_agrees(path: Path) -> tuple[int, int]:
    """(tensors whose dequantization by llama.cpp's own C code, ggml's dequantize_row_<type> from the libggml-base
    that llama-cpp-python ships, equals gguf-py's bit for bit, quantized tensors in the file)."""
    import ctypes
    import importlib.util

    import gguf
    import numpy as np

    lib_dir = Path(list(importlib.util.find_spec("llama_cpp").submodule_search_locations)[0]) / "lib"
    ggml = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"))))
    same = total = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        name = t.tensor_type.name  # ggml's symbol: dequantize_row_q4_0, dequantize_row_q4_K, ...
        fn = getattr(ggml, f"dequantize_row_{name[0].lower()}{name[1:]}")
        data = np.ascontiguousarray(t.data)
        ref = gguf.quants.dequantize(data, t.tensor_type).ravel()
        out = np.empty_like(ref)
        fn(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(out.size))
        same += int(np.array_equal(out, ref))
        total += 1
    return same, total


def run_one(gtype: str, method: str, args: argparse.Namespace, datasets: list[str],
            old: dict[str, Any]) -> dict[str, Any]:
    """One row; values already in `old` (same protocol) are kept, so adding llama.cpp's numbers redoes nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantease.api import QuantConfig, quantize
    from quantease.checkpoint.export import export_checkpoint
    from quantease.eval.perplexity import perplexity_on

    out = Path(args.out)
    native = out / f"{gtype}-{method}"
    config = QuantConfig(model=args.model, out=str(native), grid=f"gguf:{gtype}", method=method, calib=args.calib,
                         nsamples=args.nsamples, seqlen=args.seqlen, device="cpu")
    start = time.perf_counter()
    quantize(config, progress=False)
    wall = time.perf_counter() - start
    path = export_checkpoint(native, out / f"{gtype}-{method}.gguf", "gguf", overwrite=True)
    info = json.loads((native / "quantease.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
    row = {"label": f"{gtype}-{method}", "type": gtype, "method": method, "file_mib": round(path.stat().st_size / 2**20, 2),
           "bits_per_weight": round(info["summary"]["bits_per_weight"], 3),
           "mean_rel_error": round(info["summary"]["mean_rel_error"], 5), "quantize_s": round(wall, 1),
           "protocol": _protocol(args)}
    for d in datasets:
        row[d] = old.get(d) or round(perplexity_on(model, tokenizer, d, args.ppl_seqlen, args.ppl_limit,
                                                   torch.device("cpu")).ppl, 3)
        if args.llama_cpp:
            windows = _windows(tokenizer, d, args.ppl_seqlen, args.ppl_limit)
            row[f"llama.cpp {d}"] = round(llama_cpp_ppl(path, windows, torch.get_num_threads()), 3)
    if args.llama_cpp:
        row["ggml_dequantize_equal"] = "{} of {}".format(*ggml_dequantizer_agrees(path))
    return row


def _protocol(args: argparse.Namespace) -> dict[str, Any]:
    return {"calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "ppl_seqlen": args.ppl_seqlen,
            "ppl_limit": args.ppl_limit}


def table(rows: list[dict[str, Any]], datasets: list[str], llama_cpp: bool) -> str:
    cols = [f"{d} ppl" for d in datasets] + ([f"llama.cpp {d} ppl" for d in datasets] if llama_cpp else [])
    keys = datasets + ([f"llama.cpp {d}" for d in datasets] if llama_cpp else [])
    lines = ["| type | method | file MiB | bits/weight (linears) | rel. layer error | " + " | ".join(cols) + " |",
             "|" + "---|" * (5 + len(cols))]
    for r in rows:
        lines.append(f"| {r['type']} | {r['method']} | {r['file_mib']:.1f} | {r['bits_per_weight']:.3f} | "
                     f"{r['mean_rel_error']} | " + " | ".join(f"{r.get(k, float('nan')):.2f}" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--types", default="q4_0,q4_k")
    p.add_argument("--methods", default="rtn,quantease")
    p.add_argument("--calib", default="ptb")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--ppl", default="ptb,wiki")
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--ppl-limit", type=int, default=16, help="windows per dataset")
    p.add_argument("--llama-cpp", action="store_true", help="also score each file with llama-cpp-python")
    p.add_argument("--out", default="runs/bench-gguf")
    args = p.parse_args()

    datasets = [d for d in args.ppl.split(",") if d]
    store = Path(args.out) / "results"
    store.mkdir(parents=True, exist_ok=True)
    for gtype in args.types.split(","):
        for method in args.methods.split(","):
            f = store / f"{gtype}-{method}.json"
            old = json.loads(f.read_text()) if f.exists() else {}
            if old.get("protocol") == _protocol(args) and all(d in old for d in datasets) and (
                    not args.llama_cpp or all(f"llama.cpp {d}" in old for d in datasets)):
                continue
            row = run_one(gtype, method, args, datasets, old if old.get("protocol") == _protocol(args) else {})
            f.write_text(json.dumps(row, indent=1))
            print(json.dumps(row), flush=True)
    rows = [json.loads(f.read_text()) for f in sorted(store.glob("*.json"))]
    rows = [r for r in rows if r.get("protocol") == _protocol(args)]
    print(table(rows, datasets, any("llama.cpp ptb" in r for r in rows)))


if __name__ == "__main__":
    main()
