"""Human-readable tables of quantization and evaluation results."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .checkpoint.reload import read_info
from .eval.perplexity import PerplexityResult

__all__ = ["print_layers_summary", "perplexity_table"]


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
