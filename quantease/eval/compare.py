"""Side-by-side comparison of evaluation results: a text table, a JSON document and a bar chart.

Input per model is eval.json's layout, {"perplexity": {key: result}, "zeroshot": {key: result}}. Each metric under
one protocol (dataset, window length and count; or task, few-shot count and documents; and the BOS mode, where it is
not what --bos auto gives the model's tokenizer) becomes one row, so numbers are only ever set side by side when
they were measured the same way. Deltas are against the first model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.windows import auto_bos

__all__ = ["Comparison", "compare", "comparison_table", "comparison_json", "comparison_plot"]


@dataclass
class Row:
    higher_is_better: bool
    protocol: dict  # the protocol of the first model that has this row
    values: dict[str, float] = field(default_factory=dict)  # model -> value


@dataclass
class Comparison:
    models: list[str]  # the first is the baseline
    rows: dict[str, Row]  # label -> row, perplexities first, then tasks in the order they were run

    def delta(self, label: str, model: str) -> float | None:
        values = self.rows[label].values
        base = values.get(self.models[0])
        return None if base is None or model not in values else values[model] - base


def compare(results: dict[str, dict]) -> Comparison:
    """Comparison of {model: eval.json-like results}; the first model is the baseline."""
    rows: dict[str, Row] = {}
    for model, res in results.items():
        for label, (value, better, protocol) in _flatten(res).items():
            rows.setdefault(label, Row(better, protocol)).values[model] = value
    order = sorted(rows, key=lambda label: not label.startswith("ppl "))  # stable: keeps run order within each kind
    return Comparison(list(results), {label: rows[label] for label in order})


def _flatten(res: dict) -> dict[str, tuple[float, bool, dict]]:
    out = {}
    for r in res.get("perplexity", {}).values():
        protocol = {k: r[k] for k in ("dataset", "seqlen", "windows", "tokens", "bos") if k in r}
        label = f"ppl {r['dataset']} (seqlen {r['seqlen']}, {r['windows']} windows{_bos_label(r)})"
        out[label] = (r["ppl"], False, protocol)
    for r in res.get("zeroshot", {}).values():
        p = r["protocol"]
        for metric, better in r["higher_is_better"].items():
            label = f"{p['task']} {metric} ({p['num_fewshot']}-shot, {p['documents']} docs{_bos_label(p)})"
            out[label] = (r[metric], better, p)
    return out


def _bos_label(result: dict) -> str:
    """Results under what --bos auto gives each model's tokenizer share rows (so do results saved before --bos);
    other BOS modes get rows of their own."""
    bos = result.get("bos")
    return "" if bos is None or bos == auto_bos(result["adds_bos"]) else f", BOS {bos}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _cell(cmp: Comparison, label: str, model: str, with_delta: bool) -> str:
    text = _fmt(cmp.rows[label].values.get(model))
    delta = cmp.delta(label, model) if with_delta else None
    return text if delta is None else f"{text} ({'+' if delta >= 0 else '-'}{_fmt(abs(delta))})"


def comparison_table(cmp: Comparison, deltas: bool = True) -> str:
    """One row per metric, one column per model; later models show their delta against the first."""
    cells = {label: [_cell(cmp, label, m, deltas and i > 0) for i, m in enumerate(cmp.models)] for label in cmp.rows}
    width = max([len("metric"), *map(len, cmp.rows)])
    cols = [max(len(m), *(len(c[i]) for c in cells.values())) for i, m in enumerate(cmp.models)]
    lines = ["metric".ljust(width) + "".join(f"  {m:>{w}}" for m, w in zip(cmp.models, cols))]
    lines += [label.ljust(width) + "".join(f"  {c:>{w}}" for c, w in zip(cells[label], cols)) for label in cells]
    if deltas and len(cmp.models) > 1:
        lines.append(f"(deltas against {cmp.models[0]})")
    return "\n".join(lines)


def comparison_json(cmp: Comparison) -> dict:
    return {"baseline": cmp.models[0], "models": cmp.models, "rows": {
        label: {"higher_is_better": row.higher_is_better, "protocol": row.protocol,
                "values": {m: row.values.get(m) for m in cmp.models},
                "deltas": {m: cmp.delta(label, m) for m in cmp.models[1:]}}
        for label, row in cmp.rows.items()}}


def comparison_plot(cmp: Comparison, path: Path) -> None:
    """Grouped bars, one colour per model: perplexities (lower is better) and scores (higher is better) apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [label for label, row in cmp.rows.items() if row.higher_is_better is better])
              for title, better in (("lower is better", False), ("higher is better", True))]
    panels = [(title, labels) for title, labels in panels if labels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.2 * len(cmp.rows)), 4.5 * len(panels)),
                             squeeze=False)
    width = 0.8 / len(cmp.models)
    for ax, (title, labels) in zip(axes[:, 0], panels):
        for i, model in enumerate(cmp.models):
            heights = [cmp.rows[label].values.get(model, float("nan")) for label in labels]
            ax.bar([x + (i - (len(cmp.models) - 1) / 2) * width for x in range(len(labels))], heights, width,
                   label=model)
        ax.set_xticks(range(len(labels)), [label.replace(" (", "\n(") for label in labels], fontsize=8, rotation=20,
                      ha="right")
        ax.set_title(title)
        if title == "lower is better":
            ax.set_yscale("log")  # perplexities of different datasets differ by orders of magnitude
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
