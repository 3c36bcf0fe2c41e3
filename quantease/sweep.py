"""Sweeps: a grid of quantization runs described by one YAML file.

    base:  {nsamples: 128, seqlen: 2048}           settings every run shares (any QuantConfig field)
    grid:  {method: [rtn, gptq], bits: [3, 4]}     the cartesian product of these, in this order
    eval:  {ppl: [ptb, wiki], seqlen: 2048, limit: null, bos: auto}   optional perplexity after each run (bos:
           the BOS mode of its windows, default the run's own calibration mode)

Job k of the expanded grid writes OUT/<name k>; the same index always means the same run, so a scheduler's job
array can run `quantease sweep FILE --out OUT --index $SLURM_ARRAY_TASK_ID` in parallel. Every run is resumable and
skipped when already complete; a failed run does not stop a local sweep.

With --nproc-per-node N (and --nnodes M in the sbatch script) every run is one torch.distributed job of N × M
processes (distributed.py): locally each job is `torchrun --standalone --nproc-per-node N -m quantease sweep FILE
--index k`, and an array task runs `srun torchrun` on its M nodes. Rank 0 evaluates and records the status.
"""
from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import QuantConfig, read_yaml
from .data.windows import BOS_MODES
from .errors import QuantEaseError, UsageError

__all__ = ["Sweep", "Job", "load_sweep", "run_job", "launch_job", "sbatch_script"]

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

    from .api import evaluate_perplexity, is_main_process, quantize, stored_results
    from .data.windows import adds_bos, legacy_bos, resolve_bos

    folder = quantize(job.config, progress=progress)
    if not is_main_process():  # a distributed run: rank 0 evaluates
        return
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


def launch_job(sweep_file: Path, out: Path, job: Job, nproc: int, quiet: bool) -> int:
    """Run one job as a torch.distributed job of `nproc` local processes (torchrun); its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "quantease", "sweep", str(sweep_file), "--out", str(out), "--index", str(job.index)]
    return subprocess.run(command + (["--quiet"] if quiet else [])).returncode


def sbatch_script(sweep_file: Path, out: Path, jobs: list[Job], nproc: int = 1, nnodes: int = 1) -> str:
    """A Slurm job-array script: array task k runs job k of this sweep; with nproc × nnodes > 1 as one
    torch.distributed job of nproc processes (GPUs) on each of nnodes nodes, one torchrun per node."""
    sweep = ["sweep", str(sweep_file.resolve()), "--out", str(out.resolve())]
    lines = ["#!/bin/bash", "#SBATCH --job-name=quantease-sweep", f"#SBATCH --array=0-{len(jobs) - 1}",
             f"#SBATCH --output={shlex.quote(str(out.resolve() / 'logs' / '%A_%a.log'))}"]
    if nproc * nnodes == 1:
        command = " ".join(shlex.quote(c) for c in [sys.executable, "-m", "quantease.cli", *sweep])
    else:
        lines += [f"#SBATCH --nodes={nnodes}", "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={nproc}"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node",
                    str(nproc), "--rdzv-backend", "c10d"]
        command = ('srun ' + " ".join(shlex.quote(c) for c in torchrun)
                   + ' --rdzv-endpoint "$head:${QUANTEASE_RDZV_PORT:-29500}" --rdzv-id "$SLURM_JOB_ID-$SLURM_ARRAY_TASK_ID" -m quantease '
                   + " ".join(shlex.quote(c) for c in sweep))
    lines += ["set -euo pipefail", "# array task k runs job k; `quantease sweep FILE --print-jobs` lists them"]
    if nproc * nnodes > 1:
        lines.append('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the rendezvous host')
    return "\n".join([*lines, command + ' --index "$SLURM_ARRAY_TASK_ID"', ""])
