"""Human-readable tables of quantization and evaluation results."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .checkpoint.reload import read_info
from .eval.perplexity import PerplexityResult

__all__ = ["print_layers_summary", "perplexity_table", "inspect_text"]


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
    lines.append(f"(perplexity; {first.windows} windows of {first.seqlen} tokens, {first.tokens} predicted tokens)")
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
        f"grid       {c['bits']} bits, {group}, {'symmetric' if c['sym'] else 'asymmetric'}, clip {c['clip']}",
        f"calib      {c['calib']}: {c['nsamples']} x {c['seqlen']} tokens, seed {c['seed']}",
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
