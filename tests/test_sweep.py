"""Recipes and batch jobs: YAML configs with overrides, sweeps run locally or one index per process, reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from quantease.cli import main
from quantease.config import QuantConfig
from quantease.errors import SweepError, UsageError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("w*.yaml")))
def test_shipped_recipes_are_valid(recipe):
    config = QuantConfig.from_yaml(CONFIGS / recipe)
    assert config.method in ("rtn", "gptq", "quantease") and 2 <= config.bits <= 8


def test_config_file_with_command_line_overrides(tiny_llama, calib_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "gptq", "bits": 4, "group_size": 32, "calib": str(calib_file),
                                      "nsamples": 2, "seqlen": 32, "method_options": {"damp": 0.05}}))
    out = tmp_path / "q"
    res = run("quantize", tiny_llama, "--out", out, "--config", recipe, "--bits", "3", "-o", "act_order=true", "--quiet")
    assert res.exit_code == 0, res.output
    config = json.loads((out / "quantease.json").read_text())["config"]
    assert config["bits"] == 3  # the command line wins
    assert config["method"] == "gptq" and config["group_size"] == 32  # the recipe fills the rest
    assert config["method_options"] == {"damp": 0.05, "act_order": True}  # options merge


@pytest.mark.parametrize("content, message", [
    ({"bitz": 3}, "unknown setting(s): bitz"),
    ({"method": "quantease", "method_options": {"swepps": 2}}, "unknown option(s) swepps for method 'quantease'"),
    ({"bits": 12}, "bits must be in 2..8"),
])
def test_config_errors_name_the_bad_key(content, message, tiny_llama, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(content))
    res = run("quantize", tiny_llama, "--out", tmp_path / "q", "--config", recipe)
    assert res.exit_code == UsageError.exit_code and message in res.output, res.output
    assert not (tmp_path / "q").exists()


def write_sweep(tmp_path: Path, model: Path, calib: Path, models: list[str] | None = None) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "base": {"model": str(model), "calib": str(calib), "nsamples": 3, "seqlen": 48, "group_size": 32},
        "grid": {**({"model": models} if models else {}), "method": ["rtn", "gptq"], "bits": [3, 8]},
        "eval": {"ppl": [str(calib)], "seqlen": 48, "limit": 2},
    }))
    return path


def test_sweep_locally_then_by_index_gives_the_same_report(tiny_llama, calib_file, tmp_path):
    sweep = write_sweep(tmp_path, tiny_llama, calib_file)
    local = tmp_path / "local"
    res = run("sweep", sweep, "--out", local, "--quiet")
    assert res.exit_code == 0, res.output
    assert run("report", local).exit_code == 0
    rows = json.loads((local / "report.json").read_text())
    assert len(rows) == 4 and {(r["method"], r["bits"]) for r in rows} == {("rtn", 3), ("rtn", 8), ("gptq", 3), ("gptq", 8)}
    assert all(r["ppl_calib.txt"] > 1 for r in rows)
    ppl = {(r["method"], r["bits"]): r["ppl_calib.txt"] for r in rows}
    assert ppl[("rtn", 3)] > ppl[("rtn", 8)] and ppl[("gptq", 3)] > ppl[("gptq", 8)]
    for ext in ("md", "csv", "png"):
        assert (local / f"report.{ext}").stat().st_size > 0

    # the same sweep as one process per array index, as a scheduler runs it
    split = tmp_path / "split"
    for index in range(4):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index)}
        proc = subprocess.run([sys.executable, "-m", "quantease.cli", "sweep", str(sweep), "--out", str(split),
                               "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert run("report", split).exit_code == 0
    assert json.loads((split / "report.json").read_text()) == rows

    # a finished sweep is skipped: no checkpoint or evaluation is redone
    stamps = {p: p.stat().st_mtime_ns for p in local.glob("0*/*")}  # every checkpoint file and eval.json
    assert run("sweep", sweep, "--out", local, "--quiet").exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in local.glob("0*/*")} == stamps and len(list(local.glob("0*/eval.json"))) == 4


def test_failed_run_does_not_stop_the_sweep(tiny_llama, calib_file, tmp_path):
    sweep = write_sweep(tmp_path, tiny_llama, calib_file, models=[str(tiny_llama), str(tmp_path / "missing")])
    out = tmp_path / "runs"
    res = run("sweep", sweep, "--out", out, "--quiet")
    assert res.exit_code == SweepError.exit_code
    assert "4 of 8 runs failed" in res.output and "neither a local folder" in res.output
    statuses = [json.loads(p.read_text()) for p in sorted((out / "sweep-status").glob("*.json"))]
    assert len(statuses) == 8
    assert all(s["ok"] == ("model-missing" not in s["name"]) for s in statuses)
    assert len(list(out.glob("*/manifest.json"))) == 4


def test_print_jobs_writes_a_valid_sbatch_array(tiny_llama, calib_file, tmp_path):
    sweep = write_sweep(tmp_path, tiny_llama, calib_file)
    out = tmp_path / "runs"
    res = run("sweep", sweep, "--out", out, "--print-jobs")
    assert res.exit_code == 0 and "4 jobs" in res.output
    script = out / "sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --array=0-3" in script.read_text()
    jobs = json.loads((out / "jobs.json").read_text())
    assert [j["index"] for j in jobs] == [0, 1, 2, 3]
    assert not any(out.glob("0*"))  # printing runs nothing

    # array task 2 of the script runs job 2 and nothing else
    proc = subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "2"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    done = {p.parent.name for p in out.glob("*/manifest.json")}
    assert done == {jobs[2]["name"]}
    assert json.loads((out / jobs[2]["name"] / "quantease.json").read_text())["config"]["bits"] == jobs[2]["config"]["bits"]


def test_sweep_file_errors(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump({"grid": {"bits": [3, 4]}, "evaluate": {}}))
    res = run("sweep", bad, "--out", tmp_path / "o")
    assert res.exit_code == UsageError.exit_code and "unknown key(s) evaluate" in res.output
    bad.write_text(yaml.safe_dump({"grid": {"bits": [3, 9]}}))
    res = run("sweep", bad, "--out", tmp_path / "o")
    assert res.exit_code == UsageError.exit_code and "bits must be in 2..8" in res.output and "run 001-bits-9" in res.output
