"""Command line: parse, call the API, print. No logic lives here."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

# Models and data come from local folders and installed packages; never reach for a hub at run time.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from . import __version__
from .config import FORWARD_DTYPES

BOS_CHOICES = ["auto", "every", "first", "never"]  # data/windows.py BOS_MODES (not imported: it would load torch)

EXAMPLES_QUANTIZE = """
\b
Examples:
  quantease quantize smollm2-135m --out out/w4 --bits 4 --compare rtn --ppl ptb,wiki
  quantease quantize ./Llama-3-8B --out out/l3-w3 --bits 3 --group-size 128 --method quantease --device cuda
  quantease quantize smollm2-135m --out out/w4 --calib mytext.txt --nsamples 32 --seqlen 512
"""


class _EchoHandler(logging.Handler):
    """Library log messages go to stderr through click, so every frontend (shell, CliRunner) shows them."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


class _Main(click.Group):
    """Turns user-facing errors into one line and a distinct exit code; --debug keeps the traceback."""

    def invoke(self, ctx: click.Context):
        from .errors import QuantEaseError

        try:
            return super().invoke(ctx)
        except QuantEaseError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="quantease")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Post-training weight quantization of causal LMs: QuantEase, GPTQ and RTN, one decoder block at a time."""
    ctx.obj = {"debug": debug}
    logger = logging.getLogger("quantease")
    logger.handlers[:] = [_EchoHandler()]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)


def _settings_options(f):
    """The options that make a QuantConfig, shared by `quantize` and `plan`."""
    options = [
        click.argument("model", default="smollm2-135m"),
        click.option("--out", default="", type=click.Path(file_okay=False),
                     help="Output folder (required here or in --config)."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="YAML recipe of settings (see configs/); options given on the command line override it."),
        click.option("--method", default="quantease", show_default=True, help="Solver: quantease, gptq, rtn."),
        click.option("--bits", default=4, show_default=True, type=int, help="Bits per weight, 2..8."),
        click.option("--group-size", default=-1, show_default=True, type=int,
                     help="Input columns per grid; -1: per channel."),
        click.option("--sym/--asym", default=False, show_default=True,
                     help="Symmetric grid (no zero point) or asymmetric."),
        click.option("--clip", type=click.Choice(["minmax", "mse"]), default="minmax", show_default=True,
                     help="Grid range: min-max, or searched to minimize the rounding error."),
        click.option("--grid", default="", metavar="gguf:TYPE",
                     help="llama.cpp's grid of a GGUF type (q4_0, q5_0, q8_0, q4_1, q5_1, q2_k, q3_k, q4_k, q5_k, "
                     "q6_k); it sets bits, group size and symmetry. Exports exactly with --format gguf."),
        click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
                     help="Solver option, e.g. -o sweeps=10 -o init=gptq (repeatable)."),
        click.option("--outliers", type=float, default=None,
                     help="quantease only: keep this fraction (< 1) or count of weights as sparse fp16 outliers "
                     "(Ŵ = Q + H)."),
        click.option("--outlier-structure", type=click.Choice(["unstructured", "column"]), default=None,
                     help="quantease only: outliers anywhere, or in whole input columns (--outliers then counts "
                     "columns)."),
        click.option("--ffsplit", default=0.0, show_default=True, type=float,
                     help="FFSplit: heavy-hitter neurons per FFN (fraction < 1, or a count) quantized with "
                     "--heavy-bits."),
        click.option("--heavy-bits", default=8, show_default=True, type=int,
                     help="Bits of the FFSplit heavy neurons' weights, 2..8, or 16 to keep them in fp16."),
        click.option("--calib", default="ptb", show_default=True,
                     help="Calibration text: ptb, wiki, c4=PATH, or a file."),
        click.option("--bos", type=click.Choice(BOS_CHOICES), default="auto", show_default=True,
                     help="BOS in each calibration window (and --ppl window): auto (every when the tokenizer adds a "
                     "BOS itself, else never), every (BOS + seqlen-1 text tokens), first (one BOS before the whole "
                     "text, the GPTQ protocol), never."),
        click.option("--nsamples", default=128, show_default=True, type=int, help="Calibration windows."),
        click.option("--seqlen", default=2048, show_default=True, type=int, help="Tokens per calibration window."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed for choosing calibration windows."),
        click.option("--batch-size", "calib_batch_size", default=4, show_default=True, type=int,
                     help="Calibration windows per forward pass."),
        click.option("--sequential/--no-sequential", default=True, show_default=True,
                     help="Each group of linears sees the already-quantized earlier groups of its block."),
        click.option("--propagate/--no-propagate", default=True, show_default=True,
                     help="The next block sees the quantized block's outputs (else the original's)."),
        click.option("--target", type=click.Choice(["auto", "layer", "propagated"]), default="auto",
                     show_default=True,
                     help="Layer objective ||WX - ŴX||², or the propagated one ||W X_α - Ŵ X||² toward the "
                     "original model's inputs (one more block forward per block); auto: propagated for quantease, "
                     "layer for rtn and gptq."),
        click.option("--alpha", default=0.5, show_default=True, type=float,
                     help="Strength of --target propagated: the target input is X + alpha (X_fp - X)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", type=click.Choice(list(FORWARD_DTYPES)), default="auto", show_default=True,
                     help="Dtype of block forwards and calibration activations: auto = the checkpoint's on CUDA, "
                     "float32 on CPU. Weights given to solvers and Σ stay fp32."),
        click.option("--offload-activations", type=click.Choice(["auto", "on", "off"]), default="auto",
                     show_default=True, help="Keep calibration hidden states in pinned host memory, copying one "
                     "batch at a time to the device: auto = when they do not fit on it. Results are identical."),
        click.option("--resume-every", default=1, show_default=True, type=int,
                     help="Write the resume state after every N-th block only (each is nsamples x seqlen x hidden "
                     "activations); a rerun redoes at most N-1 blocks."),
        click.option("--allow-pickle", is_flag=True, default=False,
                     help="Read PyTorch pickle (*.bin) weights when the model has no safetensors (loaded with "
                     "weights_only)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config_values(ctx: click.Context, config_file, options, outliers, outlier_structure, settings) -> dict:
    """QuantConfig values: the recipe, then what was given on the command line, then the options' defaults."""
    from .config import read_yaml

    given = {k for k in settings if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    recipe = read_yaml(config_file) if config_file else {}
    values = {**recipe, **{k: v for k, v in settings.items() if k in given or k not in recipe}}
    values["method_options"] = {**recipe.get("method_options", {}), **_parse_options(options),
                                **_outlier_options(values["method"], outliers, outlier_structure)}
    _apply_grid(values, given | set(recipe))
    return values


@main.command(epilog=EXAMPLES_QUANTIZE)
@_settings_options
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--restart", is_flag=True, help="Discard a partial earlier run in --out instead of resuming it.")
@click.option("--format", "fmt", default="native", show_default=True,
              help="Also export the finished checkpoint: compressed-tensors, gptq or gguf (the native one stays in --out).")
@click.option("--export-out", default=None, type=click.Path(),
              help="Where --format's export goes (default: OUT-FORMAT, or OUT.gguf).")
@click.option("--compare", default=None, metavar="METHODS",
              help="Also quantize with these methods (e.g. rtn,gptq) at the same settings, into OUT-METHOD, and add "
              "them to the --ppl table.")
@click.option("--ppl", default=None, help="After quantizing, perplexity of the original and quantized model(s) on "
              "these datasets (e.g. ptb,wiki).")
@click.option("--ppl-seqlen", default=2048, show_default=True, type=int, help="Window length for --ppl.")
@click.option("--ppl-limit", default=None, type=int, help="At most this many windows per dataset for --ppl.")
@click.option("--ppl-bos", type=click.Choice(BOS_CHOICES), default=None,
              help="BOS mode of the --ppl windows, if not that of --bos.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def quantize(ctx, config_file, options, outliers, outlier_structure, overwrite, restart, fmt, export_out, compare,
             ppl, ppl_seqlen, ppl_limit, ppl_bos, quiet, **settings) -> None:
    """Quantize MODEL (a built-in name or a local Hugging Face folder) into --out.

    An interrupted run continues from its last finished block when the same command is run again. The memory and
    disk plan (`quantease plan`) is checked first.
    """
    from . import api
    from .errors import UsageError
    from .report import print_layers_summary

    values = _config_values(ctx, config_file, options, outliers, outlier_structure, settings)
    config = api.QuantConfig.from_dict(values)
    # baselines: the same settings but the method (its own options dropped), all checked before any work
    if compare and not config.out:
        raise UsageError("--compare writes its checkpoints beside --out: give --out")
    baselines = [api.QuantConfig.from_dict({**values, "method": m, "method_options": {}, "out": f"{config.out}-{m}"})
                 for m in _csv(compare)]
    if ppl:  # the --ppl BOS mode must fit the tokenizer: found out now, not after quantizing
        api.check_bos(config.model, ppl_bos or config.bos)
    if fmt != "native":
        from .checkpoint.export import export_checkpoint, precheck
        from .models.reader import resolve_model_path

        opts = config.solver_options()  # GPTQ's own, or the GPTQ initialization's of QuantEase
        act_order = getattr(opts, "act_order", getattr(opts, "gptq_act_order", False))
        static = getattr(opts, "static_groups", getattr(opts, "gptq_static_groups", True))
        spec = config.grid_spec()
        precheck(fmt, spec, spec.independent_groups and act_order and not static,
                 resolve_model_path(config.model, config.allow_pickle))
    others = []
    for baseline in baselines:
        others.append(api.quantize(baseline, overwrite=overwrite, restart=restart, progress=not quiet))
        if api.is_main_process():
            print_layers_summary(others[-1])
    folder = api.quantize(config, overwrite=overwrite, restart=restart, progress=not quiet)
    if not api.is_main_process():  # under torchrun the other ranks are done: rank 0 reports, exports, evaluates
        return
    print_layers_summary(folder)
    if fmt != "native":
        from .checkpoint.export import default_destination

        exported = export_checkpoint(folder, export_out or default_destination(folder, fmt), fmt, overwrite=overwrite)
        click.echo(f"exported {exported} ({fmt})")
    if ppl:
        _print_ppl([config.model, *map(str, others), str(folder)], _csv(ppl), ppl_seqlen, ppl_limit, config.device,
                   quiet, bos=ppl_bos or config.bos)


EXAMPLES_PLAN = """
\b
Examples:
  quantease plan ./Llama-3-70B --bits 4 --group-size 128 --device cuda --out out/l3-70b-w4
  quantease plan smollm2-135m --nsamples 128 --seqlen 2048 --dtype bfloat16
"""


@main.command("plan", epilog=EXAMPLES_PLAN)
@_settings_options
@click.pass_context
def plan_cmd(ctx, config_file, options, outliers, outlier_structure, **settings) -> None:
    """Print the memory and disk plan of `quantease quantize MODEL` with the same options: peak device memory,
    host RAM, disk for the checkpoint and the resume state, and block forwards. Reads only config.json and the
    safetensors headers. Exit 8, naming the option that fixes it, when it does not fit."""
    from . import api
    from .errors import ResourceError

    plan = api.plan(api.QuantConfig.from_dict(_config_values(ctx, config_file, options, outliers, outlier_structure,
                                                             settings)))
    click.echo(plan.text())
    if plan.problem:
        raise ResourceError(plan.problem)


def _apply_grid(values: dict, given: set[str]) -> None:
    """--grid gguf:TYPE sets bits, group size and symmetry; the ones also given (flag or recipe) must agree."""
    from .config import grid_conflict, implied_grid

    if not values.get("grid"):
        return
    implied = implied_grid(values["grid"])
    conflicts = {k: values[k] for k in implied if k in given and values[k] != implied[k]}
    if conflicts:
        from .errors import UsageError

        raise UsageError(grid_conflict(values["grid"], conflicts))
    values.update(implied)


def _outlier_options(method: str, outliers: float | None, structure: str | None) -> dict:
    """--outliers/--outlier-structure as quantease method options; other methods have no outliers."""
    from .errors import UsageError

    given = {k: v for k, v in (("outliers", outliers), ("outlier_structure", structure)) if v is not None}
    if given and method.lower() != "quantease":
        raise UsageError(f"--outliers/--outlier-structure need --method quantease (got {method!r})")
    return given


def _parse_options(items: tuple[str, ...]) -> dict:
    from .errors import UsageError

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        parsed[key.strip()] = _parse_value(value)
    return parsed


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


EXAMPLES_EVAL = """
\b
Examples:
  quantease eval smollm2-135m out/w4 --ppl ptb,wiki --limit 16
  quantease eval smollm2-135m out/w4 --tasks piqa,arc_easy,hellaswag,winogrande --task-limit 200 --batch-size 8
  quantease eval out/w4 --tasks mytask --tasks-dir my_tasks/ --ppl wiki
"""
EXAMPLES_COMPARE = """
\b
Examples:
  quantease compare smollm2-135m out/w4 out/w3 --tasks piqa,arc_easy --task-limit 200 --ppl wiki --limit 16
  quantease compare smollm2-135m out/w4 out/w3 --out reports/w4-vs-w3     (results saved by earlier eval runs)
"""


def _eval_options(f):
    """The evaluation options that `eval` and `compare` share."""
    options = [
        click.option("--ppl", default=None, help="Perplexity datasets: ptb, wiki, wikitext2[=PATH], c4[=PATH], FILE. "
                     "Default ptb,wiki when no --tasks are given; '' for none."),
        click.option("--seqlen", default=2048, show_default=True, type=int, help="Perplexity window length."),
        click.option("--limit", default=None, type=int, help="At most this many perplexity windows per dataset."),
        click.option("--bos", type=click.Choice(BOS_CHOICES), default="auto", show_default=True,
                     help="BOS in each perplexity window and lm-eval request: auto (every when the tokenizer adds a "
                     "BOS itself, else never), every (BOS + seqlen-1 text tokens), first (one BOS before the whole "
                     "text, the GPTQ protocol; for lm-eval the same as every), never."),
        click.option("--tasks", default=None, help="lm-eval tasks: piqa, arc_easy, arc_challenge, hellaswag, "
                     "winogrande, lambada_openai, boolq (offline copies), tasks from --tasks-dir, or any lm-eval task "
                     "whose data are in the local Hugging Face cache."),
        click.option("--task-limit", default=None, type=int, help="At most this many documents per task (the first of "
                     "its split)."),
        click.option("--num-fewshot", default=0, show_default=True, type=int, help="Few-shot examples per prompt."),
        click.option("--batch-size", default=1, show_default=True, type=int, help="lm-eval batch size."),
        click.option("--tasks-dir", type=click.Path(file_okay=False), help="Folder of extra lm-eval task YAMLs."),
        click.option("--device", default="auto", show_default=True),
        click.option("--packed", is_flag=True, help="Keep a checkpoint's codes packed in memory and dequantize on every "
                     "forward (slower; for models whose dequantized weights do not fit)."),
        click.option("--quiet", is_flag=True, help="No perplexity progress bars."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _eval_plan(opts: dict):
    """(perplexity datasets, zero-shot settings or None) from the shared options; bad settings fail here."""
    from . import api
    from .errors import UsageError

    tasks = _csv(opts["tasks"])
    datasets = _csv("ptb,wiki" if opts["ppl"] is None and not tasks else opts["ppl"])
    if not datasets and not tasks:
        raise UsageError("nothing to evaluate: give --ppl datasets and/or --tasks")
    settings = api.ZeroShotSettings(tuple(tasks), opts["task_limit"], opts["num_fewshot"], opts["batch_size"],
                                    opts["tasks_dir"], opts["bos"]) if tasks else None
    return datasets, settings


def _evaluate(models, datasets: list[str], settings, opts: dict) -> dict[str, dict]:
    from . import api

    for m in models:  # every model's tokenizer can take the BOS mode: checked before the first one is evaluated
        api.check_bos(m, opts["bos"])
    return {m: api.evaluate(m, datasets, settings, opts["seqlen"], opts["limit"], opts["device"], opts["packed"],
                            progress=not opts["quiet"], bos=opts["bos"]) for m in models}


@main.command("eval", epilog=EXAMPLES_EVAL)
@click.argument("models", nargs=-1, required=True)
@_eval_options
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results to this JSON file.")
def eval_cmd(models, json_out, **opts) -> None:
    """Perplexity and zero-shot accuracy of original models and quantease checkpoints (MODELS: built-in names or
    folders). Results are also saved: in DIR/eval.json for a checkpoint, under $QUANTEASE_CACHE/eval/ otherwise."""
    from .eval.compare import compare, comparison_table

    datasets, settings = _eval_plan(opts)
    if settings is None:  # perplexity only: its own table, and --json as {model: [results]}
        _print_ppl(list(models), datasets, opts["seqlen"], opts["limit"], opts["device"], opts["quiet"], opts["packed"],
                   json_out, opts["bos"])
        return
    results = _evaluate(models, datasets, settings, opts)
    click.echo(comparison_table(compare(results), deltas=False))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))


@main.command("compare", epilog=EXAMPLES_COMPARE)
@click.argument("models", nargs=-1, required=True)
@_eval_options
@click.option("--out", "prefix", default="compare", show_default=True, help="Write PREFIX.json and PREFIX.png.")
def compare_cmd(models, prefix, **opts) -> None:
    """Perplexities and accuracies of several models side by side, with deltas against the first (the baseline):
    a table, PREFIX.json and a bar chart PREFIX.png.

    With --ppl or --tasks every model is evaluated now, with the options of `eval`. Without them, the results saved
    by earlier `eval` runs are compared (DIR/eval.json for a checkpoint, $QUANTEASE_CACHE/eval/ for a built-in name
    or another folder); one row per metric and protocol, '-' where a model lacks it.
    """
    from . import api
    from .errors import DataError
    from .eval.compare import compare, comparison_json, comparison_plot, comparison_table

    if opts["ppl"] is None and not opts["tasks"]:
        results = {m: api.stored_results(m) for m in models}
        missing = [m for m, r in results.items() if not r]
        if missing:
            raise DataError(f"no saved results for {missing[0]}: run `quantease eval {missing[0]} ...` first, or "
                            "pass --ppl/--tasks to evaluate now")
    else:
        results = _evaluate(models, *_eval_plan(opts), opts)
    cmp = compare(results)
    click.echo(comparison_table(cmp))
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(comparison_json(cmp), indent=2))
    comparison_plot(cmp, Path(f"{prefix}.png"))
    click.echo(f"wrote {prefix}.json and {prefix}.png")


def _print_ppl(models, datasets, seqlen, limit, device, quiet, packed=False, json_out=None, bos="auto") -> None:
    from . import api
    from .report import perplexity_table

    for m in models:  # every model's tokenizer can take the BOS mode: checked before the first one is evaluated
        api.check_bos(m, bos)
    rows = {m: api.evaluate_perplexity(m, datasets, seqlen, limit, device, packed, progress=not quiet, bos=bos)
            for m in models}
    click.echo(perplexity_table(rows))
    if json_out:
        Path(json_out).write_text(json.dumps({m: [r.to_dict() for r in rs] for m, rs in rows.items()}, indent=2))


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--no-layers", is_flag=True, help="Only the summary, not the per-layer error table.")
def inspect(folder, no_layers) -> None:
    """Verify a checkpoint against its manifest and print how it was made. Exit 6 if it is corrupt."""
    from .checkpoint.native import verify_manifest
    from .errors import CheckpointError
    from .report import inspect_text

    problems = verify_manifest(Path(folder))
    click.echo(inspect_text(Path(folder), problems, layers=not no_layers))
    if problems:
        raise CheckpointError(f"{folder} does not match its manifest: {problems[0]}")


@main.command("export")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", required=True,
              help="Target format: compressed-tensors (vLLM, transformers), gptq, or gguf (llama.cpp, ollama).")
@click.option("--out", required=True, type=click.Path(), help="Output folder (gguf: the MODEL.gguf file).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def export_cmd(folder, fmt, out, overwrite) -> None:
    """Export the quantease checkpoint FOLDER to a format that other tools load.

    \b
    Examples:
      quantease export out/w4 --format compressed-tensors --out out/w4-ct
      quantease export out/w3 --format gptq --out out/w3-gptq
      quantease export out/q4k --format gguf --out out/q4k.gguf
    """
    from .checkpoint.export import export_checkpoint

    click.echo(f"wrote {export_checkpoint(folder, out, fmt, overwrite=overwrite)} ({fmt})")

EXAMPLES_SWEEP = """
\b
Examples:
  quantease sweep configs/sweep-smollm2.yaml --out runs/smollm2            # every run, one after another
  quantease sweep configs/sweep-smollm2.yaml --out runs/smollm2 --print-jobs   # list runs, write runs/.../sweep.sbatch
  sbatch runs/smollm2/sweep.sbatch                                          # one array task per run
  quantease report runs/smollm2
"""


@main.command(epilog=EXAMPLES_SWEEP)
@click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder holding one subfolder per run.")
@click.option("--index", type=int, default=None, envvar="SLURM_ARRAY_TASK_ID",
              help="Run only job N (default: $SLURM_ARRAY_TASK_ID when set).")
@click.option("--print-jobs", is_flag=True, help="List the runs and write OUT/sweep.sbatch and OUT/jobs.json; run nothing.")
@click.option("--nproc-per-node", default=1, show_default=True, type=click.IntRange(1),
              help="Run each job as torch.distributed processes (GPUs) per node, through torchrun.")
@click.option("--nnodes", default=1, show_default=True, type=click.IntRange(1),
              help="Nodes per job in the sbatch script (srun torchrun on each).")
@click.option("--quiet", is_flag=True)
def sweep(sweep_file, out, index, print_jobs, nproc_per_node, nnodes, quiet) -> None:
    """Run a grid of quantizations (and evaluations) from SWEEP_FILE; failed runs do not stop the others."""
    from .distributed import is_main_process
    from .errors import SweepError, UsageError
    from .sweep import launch_job, load_sweep, record_status, run_job, sbatch_script

    spec, out = load_sweep(sweep_file), Path(out)
    jobs = spec.jobs(out)
    if print_jobs:
        out.mkdir(parents=True, exist_ok=True)
        (out / "jobs.json").write_text(json.dumps([{"index": j.index, "name": j.name, "config": j.config.to_dict()}
                                                   for j in jobs], indent=1))
        (out / "sweep.sbatch").write_text(sbatch_script(Path(sweep_file), out, jobs, nproc_per_node, nnodes))
        for j in jobs:
            click.echo(f"{j.index:>4}  {j.name}")
        click.echo(f"{len(jobs)} jobs; wrote {out / 'jobs.json'} and {out / 'sweep.sbatch'}")
        return
    if index is not None and not 0 <= index < len(jobs):
        raise UsageError(f"--index {index} is outside the sweep's {len(jobs)} jobs (0..{len(jobs) - 1})")
    if nnodes > 1 and not print_jobs:
        raise UsageError("--nnodes is for the sbatch script (--print-jobs); a local sweep runs on this node")
    spawn = nproc_per_node > 1 and "WORLD_SIZE" not in os.environ  # else: already a rank of a torchrun job
    failed = []
    for job in jobs if index is None else [jobs[index]]:
        click.echo(f"[{job.index}/{len(jobs) - 1}] {job.name}", err=True)
        try:
            if spawn:
                code = launch_job(Path(sweep_file), out, job, nproc_per_node, quiet)
                if code:
                    failed.append({"name": job.name, "error": f"torchrun exited with {code}"})
                continue
            run_job(job, spec.eval, progress=not quiet)
            if is_main_process():
                record_status(out, job, None)
        except Exception as e:  # noqa: BLE001 — a failed run is recorded and the sweep goes on
            status = record_status(out, job, e) if is_main_process() else {"name": job.name, "error": str(e)}
            failed.append(status)
            click.echo(f"  failed: {status['error']}", err=True)
    if failed:
        raise SweepError(f"{len(failed)} of {len(jobs) if index is None else 1} runs failed: "
                         + "; ".join(f"{f['name']} ({f['error']})" for f in failed))


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def report(folder) -> None:
    """Gather every complete checkpoint under FOLDER into report.md/.csv/.json and a perplexity plot."""
    from .errors import UsageError
    from .report import gather_runs, write_report

    rows = gather_runs(Path(folder))
    if not rows:
        raise UsageError(f"no complete quantease checkpoint under {folder}")
    paths = write_report(rows, Path(folder))
    click.echo(paths["md"].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
