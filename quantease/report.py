"""Human-readable tables of quantization and evaluation results."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .checkpoint.reload import read_info
from .data.windows import auto_bos
from .eval.perplexity import PerplexityResult, bos_protocol

__all__ = ["print_layers_summary", "perplexity_table", "inspect_text", "gather_runs", "write_report"]


def print_layers_summary(folder: Path) -> None:
    info = read_info(folder)
    run = json.loads((Path(folder) / "run.json").read_text()) if (Path(folder) / "run.json").exists() else {}
    s, c = info["summary"], info["config"]
    group = "per-channel" if c["group_size"] == -1 else f"group {c['group_size']}"
    click.echo(
        f"wrote {folder}: {s['quantized_layers']} layers, {c['method']} W{c['bits']} {group} "
        f"{'sym' if c['sym'] else 'asym'}, {s['bits_per_weight']:.3f} bits/weight, "
        f"mean relative layer error {s['mean_rel_error']:.5f}"
        + (f", {run['total_s']:.0f} s" if "total_s" in run else "")
    )
    for note in s["fallbacks"]:
        click.echo(f"  fallback: {note}")


def perplexity_table(rows: dict[str, list[PerplexityResult]]) -> str:
    datasets = [r.dataset for r in next(iter(rows.values()))]
    width = max(len(m) for m in rows)
    lines = [f"{'model'.ljust(width)}  " + "  ".join(f"{d:>10}" for d in datasets)]
    for model, results in rows.items():
        lines.append(f"{model.ljust(width)}  " + "  ".join(f"{r.ppl:>10.3f}" for r in results))
    first = next(iter(rows.values()))[0]
    modes = {model: results[0].bos for model, results in rows.items()}
    bos = bos_protocol(first.bos, first.seqlen) if len(set(modes.values())) == 1 else "BOS " + ", ".join(
        f"{mode} for {model}" for model, mode in modes.items())
    lines.append(f"(perplexity; {first.windows} windows of {first.seqlen} tokens, {first.tokens} predicted tokens; "
                 f"{bos})")
    return "\n".join(lines)


def inspect_text(folder: Path, problems: list[str], layers: bool = True) -> str:
    """What `quantease inspect` prints: integrity, settings, size, effective bits and per-layer errors."""
    info = read_info(folder)
    c, s = info["config"], info["summary"]
    size = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
    group = "per-channel" if c["group_size"] == -1 else f"group {c['group_size']}"
    lines = [
        f"{folder}: " + ("manifest verified, every file intact" if not problems else "CORRUPT: " + "; ".join(problems)),
        f"model      {info['model']['source']} ({info['model']['model_type']}, {info['model']['blocks']} blocks)",
        f"method     {c['method']} {c['method_options'] or ''}".rstrip(),
        f"grid       {c['bits']} bits, {group}, {'symmetric' if c['sym'] else 'asymmetric'}, clip {c['clip']}"
        + (f", {c['grid']} (llama.cpp's grid)" if c.get("grid") else ""),
        f"calib      {c['calib']}: {c['nsamples']} x {c['seqlen']} tokens, seed {c['seed']}"
        + (f", BOS {info['calibration']['bos']} (--bos {c['bos']})" if "bos" in info["calibration"] else ""),
        f"bits/weight {s['bits_per_weight']:.3f} over {s['quantized_layers']} quantized layers "
        f"(codes, scales, zeros and indices counted)",
        f"size       {size / 2**20:.1f} MiB on disk",
        f"error      mean relative layer error {s['mean_rel_error']:.5f}, fallbacks: {len(s['fallbacks'])}",
    ]
    if layers:
        width = max(len(n) for n in info["layers"])
        lines.append(f"{'layer'.ljust(width)}  {'rel_error':>10}  {'bits/w':>7}")
        lines += [f"{n.ljust(width)}  {l['rel_error']:>10.5f}  {l['bits_per_weight']:>7.3f}" for n, l in info["layers"].items()]
    return "\n".join(lines)


def gather_runs(folder: Path) -> list[dict]:
    """One row per complete checkpoint under `folder` (itself or its subfolders): settings, size, errors, results."""
    import json as _json

    rows = []
    for info_path in sorted(Path(folder).glob("**/quantease.json")):
        run = info_path.parent
        if not (run / "manifest.json").exists():
            continue
        info = _json.loads(info_path.read_text())
        c, s = info["config"], info["summary"]
        row = {"run": str(run.relative_to(folder)) if run != Path(folder) else run.name, "model": Path(c["model"]).name,
               "method": c["method"], "bits": c["bits"], "group_size": c["group_size"], "sym": c["sym"],
               "bits_per_weight": round(s["bits_per_weight"], 4), "mean_rel_error": round(s["mean_rel_error"], 6),
               "fallbacks": len(s["fallbacks"])}
        evals = _json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
        best: dict[str, dict] = {}  # several protocols per dataset: report the one over the most tokens
        for r in evals.get("perplexity", {}).values():
            name = Path(r["dataset"]).name + _bos_suffix(r)  # a file dataset is labelled by its name
            if name not in best or r["tokens"] > best[name]["tokens"]:
                best[name] = r
        row.update({f"ppl_{name}": round(r["ppl"], 3) for name, r in best.items()})
        for key, r in evals.get("zeroshot", {}).items():
            metric = "acc" if "acc" in r else next((k for k, v in r.items() if isinstance(v, float)), None)
            if metric:
                row[f"{key.split(':')[0]}{_bos_suffix(r['protocol'])}_{metric}"] = round(r[metric], 4)
        rows.append(row)
    return rows


def _bos_suffix(result: dict) -> str:
    """'' for a result under what --bos auto gives its tokenizer (or saved before --bos), else '_bos-MODE': other
    BOS modes get columns of their own."""
    bos = result.get("bos")
    return "" if bos is None or bos == auto_bos(result["adds_bos"]) else f"_bos-{bos}"


def write_report(rows: list[dict], folder: Path) -> dict[str, Path]:
    """report.md, report.csv, report.json and report.png (perplexity against bits per weight) in `folder`."""
    import csv
    import json as _json

    columns = list(dict.fromkeys(k for row in rows for k in row))
    paths = {ext: Path(folder) / f"report.{ext}" for ext in ("md", "csv", "json", "png")}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    paths["md"].write_text("\n".join(lines) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(_json.dumps(rows, indent=1))
    _plot(rows, [c for c in columns if c.startswith("ppl_")], paths["png"])
    return paths


def _plot(rows: list[dict], ppl_columns: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(ppl_columns), 1), figsize=(5 * max(len(ppl_columns), 1), 4), squeeze=False)
    for ax, column in zip(axes[0], ppl_columns or [None]):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["bits_per_weight"], r[column]) for r in rows if r["method"] == method and column in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel(f"perplexity ({column.removeprefix('ppl_')})" if column else "no perplexity evaluated")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if column:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
