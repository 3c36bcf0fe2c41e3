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

EXAMPLES_QUANTIZE = """
\b
Examples:
  quantease quantize smollm2-135m --out out/w4 --bits 4 --method rtn --ppl ptb,wiki
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


@main.command(epilog=EXAMPLES_QUANTIZE)
@click.argument("model", default="smollm2-135m")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--method", default="rtn", show_default=True, help="Solver: rtn, gptq, quantease.")
@click.option("--bits", default=4, show_default=True, type=int, help="Bits per weight, 2..8.")
@click.option("--group-size", default=-1, show_default=True, type=int, help="Input columns per grid; -1: per channel.")
@click.option("--sym/--asym", default=False, show_default=True, help="Symmetric grid (no zero point) or asymmetric.")
@click.option("--clip", type=click.Choice(["minmax", "mse"]), default="minmax", show_default=True,
              help="Grid range: min-max, or searched to minimize the rounding error.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Solver option, e.g. -o sweeps=10 -o init=gptq (repeatable).")
@click.option("--calib", default="ptb", show_default=True, help="Calibration text: ptb, wiki, c4=PATH, or a file.")
@click.option("--nsamples", default=128, show_default=True, type=int, help="Calibration windows.")
@click.option("--seqlen", default=2048, show_default=True, type=int, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for choosing calibration windows.")
@click.option("--batch-size", "calib_batch_size", default=4, show_default=True, type=int,
              help="Calibration windows per forward pass.")
@click.option("--sequential/--no-sequential", default=True, show_default=True,
              help="Each group of linears sees the already-quantized earlier groups of its block.")
@click.option("--propagate/--no-propagate", default=True, show_default=True,
              help="The next block sees the quantized block's outputs (else the original's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--restart", is_flag=True, help="Discard a partial earlier run in --out instead of resuming it.")
@click.option("--ppl", default=None, help="After quantizing, perplexity of the original and quantized model on these "
              "datasets (e.g. ptb,wiki).")
@click.option("--ppl-seqlen", default=2048, show_default=True, type=int, help="Window length for --ppl.")
@click.option("--ppl-limit", default=None, type=int, help="At most this many windows per dataset for --ppl.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def quantize(model, out, options, overwrite, restart, ppl, ppl_seqlen, ppl_limit, quiet, **settings) -> None:
    """Quantize MODEL (a built-in name or a local Hugging Face folder) into --out.

    An interrupted run continues from its last finished block when the same command is run again.
    """
    from . import api
    from .errors import UsageError
    from .report import print_layers_summary

    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        parsed[key.strip()] = _parse_value(value)
    config = api.QuantConfig(model=model, out=out, method_options=parsed, **settings)
    folder = api.quantize(config, overwrite=overwrite, restart=restart, progress=not quiet)
    print_layers_summary(folder)
    if ppl:
        _print_ppl([model, str(folder)], _csv(ppl), ppl_seqlen, ppl_limit, settings["device"], quiet)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@main.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--ppl", default="ptb,wiki", show_default=True, help="Datasets: ptb, wiki, wikitext2[=PATH], c4[=PATH], FILE.")
@click.option("--seqlen", default=2048, show_default=True, type=int, help="Window length.")
@click.option("--limit", default=None, type=int, help="At most this many windows per dataset.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dense", is_flag=True, help="Dequantize once at load instead of on every forward (faster, more memory).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results to this JSON file.")
@click.option("--quiet", is_flag=True)
def eval_cmd(models, ppl, seqlen, limit, device, dense, json_out, quiet) -> None:
    """Perplexity of original models and quantease checkpoints (MODELS: built-in names or folders)."""
    _print_ppl(list(models), _csv(ppl), seqlen, limit, device, quiet, dense, json_out)


def _print_ppl(models, datasets, seqlen, limit, device, quiet, dense=False, json_out=None) -> None:
    from . import api
    from .report import perplexity_table

    rows = {m: api.evaluate_perplexity(m, datasets, seqlen, limit, device, dense, progress=not quiet) for m in models}
    click.echo(perplexity_table(rows))
    if json_out:
        Path(json_out).write_text(json.dumps({m: [r.to_dict() for r in rs] for m, rs in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
