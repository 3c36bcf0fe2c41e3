"""Sweeps: a grid of quantization runs described by one YAML file.

    base:  {nsamples: 128, seqlen: 2048}           settings every run shares (any QuantConfig field)
    grid:  {method: [rtn, gptq], bits: [3, 4]}     the cartesian product of these, in this order
    eval:  {ppl: [ptb, wiki], seqlen: 2048, limit: null, bos: auto}   optional perplexity after each run (bos:
           the BOS mode of its windows, default the run's own calibration mode)

Job k of the expanded grid writes OUT/<name k>; the same index always means the same run, so a scheduler's job
array can run `quantease sweep FILE --out OUT --index $SLURM_ARRAY_TASK_ID` in parallel. Every run is resumable and
skipped when already complete; a failed run does not stop a local sweep.
"""
from __future__ import annotations

import itertools
import json
import re
import shlex
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import QuantConfig, read_yaml
from .data.windows import BOS_MODES
from .errors import QuantEaseError, UsageError

__all__ = ["Sweep", "Job", "load_sweep", "run_job", "sbatch_script"]

STATUS_DIR = "sweep-status"


@dataclass(frozen=True)
class Job:
    index: int
    name: str
    config: QuantConfig


@dataclass
class Sweep:
    path: Path
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    eval: dict[str, Any] = field(default_factory=dict)

    def jobs(self, out: Path) -> list[Job]:
        keys = list(self.grid)
        jobs = []
        for index, values in enumerate(itertools.product(*(self.grid[k] for k in keys))):
            varying = dict(zip(keys, values))
            name = f"{index:03d}-" + "_".join(f"{k}-{_slug(v)}" for k, v in varying.items())
            settings = {**self.base, **varying, "out": str(out / name)}
            try:
                jobs.append(Job(index, name, QuantConfig.from_dict(settings)))
            except UsageError as e:
                raise UsageError(f"{self.path}, run {name}: {e}") from None
        return jobs


def _slug(value: Any) -> str:
    text = Path(str(value)).name if isinstance(value, str) and "/" in value else json.dumps(value).strip('"')
    return re.sub(r"[^A-Za-z0-9.+=-]+", "", text) or "x"


_EVAL_KEYS = {"ppl", "seqlen", "limit", "bos"}


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every expanded run is validated here, before anything runs."""
    raw = read_yaml(path)
    unknown = sorted(set(raw) - {"base", "grid", "eval"})
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; a sweep has base, grid and eval")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise UsageError(f"{path}: 'grid' must map settings to non-empty lists of values")
    ev = raw.get("eval") or {}
    if set(ev) - _EVAL_KEYS:
        raise UsageError(f"{path}: unknown eval key(s) {', '.join(sorted(set(ev) - _EVAL_KEYS))}; "
                         f"valid: {', '.join(sorted(_EVAL_KEYS))}")
    if ev.get("bos", "auto") not in BOS_MODES:
        raise UsageError(f"{path}: eval bos must be one of {', '.join(BOS_MODES)}, got {ev['bos']!r}")
    sweep = Sweep(Path(path), raw.get("base") or {}, grid, ev)
    sweep.jobs(Path("."))  # validates every run's settings
    return sweep


def run_job(job: Job, ev: dict[str, Any], progress: bool) -> None:
    """Quantize (resuming or skipping as the pipeline does), then evaluate what is not evaluated yet."""
    from transformers import AutoTokenizer

    from .api import evaluate_perplexity, quantize, stored_results
    from .data.windows import adds_bos, legacy_bos, resolve_bos

    folder = quantize(job.config, progress=progress)
    seqlen, limit, bos = ev.get("seqlen", 2048), ev.get("limit"), ev.get("bos", job.config.bos)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    mode = resolve_bos(tokenizer, bos)
    legacy = legacy_bos(adds_bos(tokenizer))  # the mode of results saved before --bos, which do not name it
    done = stored_results(folder).get("perplexity", {}).values()
    todo = [d for d in ev.get("ppl", []) if not any(
        (r["dataset"], r["seqlen"], r.get("limit"), r.get("bos", legacy)) == (d, seqlen, limit, mode) for r in done)]
    if todo:
        evaluate_perplexity(str(folder), todo, seqlen=seqlen, limit=limit, device=job.config.device,
                            progress=progress, bos=bos)


def record_status(out: Path, job: Job, error: BaseException | None) -> dict[str, Any]:
    status = {"index": job.index, "name": job.name, "ok": error is None}
    if error is not None:
        status["error"] = str(error) if isinstance(error, QuantEaseError) else "".join(
            traceback.format_exception_only(type(error), error)).strip()
    folder = out / STATUS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job.name}.json").write_text(json.dumps(status, indent=1))
    return status


def sbatch_script(sweep_file: Path, out: Path, jobs: list[Job]) -> str:
    """A Slurm job-array script: array task k runs job k of this sweep."""
    command = [sys.executable, "-m", "quantease.cli", "sweep", str(sweep_file.resolve()), "--out", str(out.resolve())]
    return "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=quantease-sweep",
        f"#SBATCH --array=0-{len(jobs) - 1}",
        f"#SBATCH --output={shlex.quote(str(out.resolve() / 'logs' / '%A_%a.log'))}",
        "set -euo pipefail",
        "# array task k runs job k; `quantease sweep FILE --print-jobs` lists them",
        " ".join(shlex.quote(c) for c in command) + ' --index "$SLURM_ARRAY_TASK_ID"',
        "",
    ])
