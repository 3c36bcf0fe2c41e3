"""FFSplit heavy-hitter statistics of a checkpoint: a Markdown table and a PNG plot, per FFN layer.

The statistics are measured during quantization (quantease.json "ffsplit" section, see ffsplit.py): for each FFN,
the share of the total neuron score mass  Σ_i sqrt(Σ_ii)·||v_i||  held by the top 1/2/5/10% of neurons and the
max/median score ratio.

    python -m quantease.eval.heavy_hitters CHECKPOINT [--png FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["heavy_hitter_table", "plot_heavy_hitters"]


def _layers(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if "ffsplit" not in info:
        raise ValueError("this checkpoint was made without --ffsplit: it holds no heavy-hitter statistics")
    return info["ffsplit"]["layers"]


def heavy_hitter_table(info: dict[str, Any]) -> str:
    """Markdown: one row per FFN with the top-share columns, the heavy set's share and max/median."""
    layers = _layers(info)
    keys = list(next(iter(layers.values()))["share"])
    lines = ["| layer | neurons | heavy | heavy share | " + " | ".join(f"{k} share" for k in keys) + " | max/median |",
             "|" + "---|" * (5 + len(keys))]
    for name, s in layers.items():
        lines.append(f"| {name} | {s['neurons']} | {s['heavy']} | {s['heavy_share']:.3f} | "
                     + " | ".join(f"{s['share'][k]:.3f}" for k in keys) + f" | {s['max_over_median']:.1f} |")
    return "\n".join(lines)


def plot_heavy_hitters(info: dict[str, Any], path: str | Path) -> Path:
    """PNG: score share of the top neurons per FFN layer (left) and max/median score ratio (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = _layers(info)
    x = list(range(len(layers)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in next(iter(layers.values()))["share"]:
        a.plot(x, [s["share"][key] for s in layers.values()], marker="o", ms=3, label=f"{key} of neurons")
    a.set(xlabel="FFN layer (block)", ylabel="share of total score", title="Heavy-hitter concentration", ylim=(0, 1))
    a.legend(fontsize=8)
    b.semilogy(x, [s["max_over_median"] for s in layers.values()], marker="o", ms=3)
    b.set(xlabel="FFN layer (block)", ylabel="max / median score", title="Largest neuron vs typical")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--png", default=None, help="write the plot here (default: CHECKPOINT/heavy_hitters.png)")
    args = p.parse_args()
    info = json.loads((Path(args.checkpoint) / "quantease.json").read_text())
    print(heavy_hitter_table(info))
    print(f"plot: {plot_heavy_hitters(info, args.png or Path(args.checkpoint) / 'heavy_hitters.png')}")


if __name__ == "__main__":
    main()
