"""The one layer-by-layer driver, for every architecture and solver.

    capture block-0 inputs  ->  for each block i:
        load block i  ->  for each group of linears (data-flow order): Σ of its input -> solve each linear -> Ŵ in place
        ->  run the quantized block to get block i+1's inputs  ->  write block i's shard  ->  unload block i
    ->  index, config, quantease.json, manifest (last)

The driver knows solvers only through the registry entry (name, options, `requires_calibration`), never by type.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import __version__
from .checkpoint.native import FORMAT, FORMAT_VERSION, MANIFEST, CheckpointWriter, effective_bits, encode
from .config import QuantConfig
from .data.sources import load_text
from .data.windows import calibration_windows, fingerprint, tokenize
from .errors import CheckpointError, NumericalError, UsageError
from .models.capture import BlockInputs, capture_first_block, collect_sigmas, run_block
from .models.reader import LazyModel, resolve_model_path
from .solvers import GridSpec, SolveResult, get_solver

__all__ = ["quantize", "resolve_device", "LayerRecord"]

TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "chat_template.jinja", "generation_config.json",
]
SigmaObserver = Callable[[int, str, torch.Tensor], None]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but no CUDA device is available")
    return torch.device(device)


@dataclass
class LayerRecord:
    result: SolveResult
    reference: float  # tr(W Σ Wᵀ): the output energy the error is relative to
    seconds: float
    tensors: dict[str, torch.Tensor]

    def info(self, q: int, p: int, spec: GridSpec, method: str) -> dict[str, Any]:
        r = self.result
        return {
            "out_features": q, "in_features": p, "bits": spec.bits, "group_size": spec.group_size,
            "groups": int(r.weight.grid.scale.shape[1]), "sym": spec.sym, "method": method,
            "loss": r.loss, "rel_error": r.loss / self.reference if self.reference > 0 else 0.0,
            "history": r.history, "notes": r.notes, "seconds": round(self.seconds, 4),
            "bits_per_weight": effective_bits(self.tensors, q, p),
        }


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "a complete checkpoint" if (out / MANIFEST).exists() else "files"
            raise CheckpointError(f"output folder {out} already holds {what}; pass --overwrite to replace it")
        (out / MANIFEST).unlink(missing_ok=True)  # first, so the folder never looks complete while replaced
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _check_shapes(lazy: LazyModel, spec: GridSpec) -> None:
    """Fail before any work if the group size does not divide some layer's input size."""
    for param, key in lazy.block_tensor_names(0).items():
        module = param.removeprefix(lazy.block_prefix(0)).removesuffix(".weight")
        if module in lazy.arch.linears and param.endswith(".weight"):
            try:
                spec.groups(lazy.index.shape(key)[1])
            except ValueError as e:
                raise UsageError(f"{e} (layer {module})") from None


def _calibration(config: QuantConfig, tokenizer) -> torch.Tensor:
    tokens = tokenize(tokenizer, load_text(config.calib, "calib"))
    return calibration_windows(tokens, config.nsamples, config.seqlen, config.seed)


def _solve_layer(module: torch.nn.Module, sigma: torch.Tensor, name: str, config: QuantConfig) -> LayerRecord:
    W = module.weight.data.float()
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {name} has NaN/Inf weights")
    entry = get_solver(config.method)
    start = time.perf_counter()
    result = entry.solve(W, sigma, config.grid(), config.solver_options())
    seconds = time.perf_counter() - start
    module.weight.data = result.weight.dequantize().to(module.weight.dtype)
    reference = float(((W.double() @ sigma.double()) * W.double()).sum())
    return LayerRecord(result, reference, seconds, encode(result.weight))


def quantize_block(
    block: torch.nn.Module, groups: tuple[tuple[str, ...], ...], inputs: BlockInputs, config: QuantConfig,
    observe: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[dict[str, LayerRecord], BlockInputs]:
    """Quantize every linear of one block in place; return their records and the block's outputs."""
    original_outputs = None if config.propagate else run_block(block, inputs)
    stages = [[g] for g in groups] if config.sequential else [list(groups)]
    records: dict[str, LayerRecord] = {}
    for stage in stages:
        sigmas = collect_sigmas(block, stage, inputs)
        for group in stage:
            for name in group:
                if observe:
                    observe(name, sigmas[group])
                records[name] = _solve_layer(block.get_submodule(name), sigmas[group], name, config)
    return records, original_outputs or run_block(block, inputs)


def _block_tensors(lazy: LazyModel, i: int, records: dict[str, LayerRecord]) -> dict[str, torch.Tensor]:
    """What block i's shard holds: encoded quantized linears and the block's other tensors unchanged."""
    prefix = lazy.block_prefix(i)
    tensors: dict[str, torch.Tensor] = {}
    for param, key in lazy.block_tensor_names(i).items():
        module = param.removeprefix(prefix).rpartition(".")[0]
        if module in records and param.endswith(".weight"):
            tensors.update({f"{prefix}{module}.{s}": t for s, t in records[module].tensors.items()})
        else:
            tensors[param] = lazy.index.get(key)
    return tensors


def quantize(
    config: QuantConfig, overwrite: bool = False, progress: bool = True, observe: SigmaObserver | None = None
) -> Path:
    """Quantize config.model into config.out; return the output folder. `observe(block, layer, Σ)` sees each Σ."""
    if not config.out:
        raise UsageError("no output folder given (--out)")
    started = time.perf_counter()
    device = resolve_device(config.device)
    path = resolve_model_path(config.model)
    lazy = LazyModel(path)
    spec = config.grid()
    _check_shapes(lazy, spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = _calibration(config, tokenizer)
    out = Path(config.out)
    _prepare_output(out, overwrite)
    writer = CheckpointWriter(out)
    writer.write_shard(None, {n: lazy.index.get(lazy.checkpoint_name(n)) for n in lazy.outer_params()})

    t0 = time.perf_counter()
    lazy.load_outer(device)
    inputs = capture_first_block(lazy.model, lazy.blocks[0], windows.split(config.calib_batch_size), device)
    lazy.unload_outer()
    timings = {"capture_s": time.perf_counter() - t0, "blocks_s": []}

    layers: dict[str, Any] = {}
    bar = tqdm(range(len(lazy.blocks)), desc="quantize", unit="block", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        block = lazy.load_block(i, device)
        obs = (lambda name, s, i=i: observe(i, name, s)) if observe else None
        records, inputs = quantize_block(block, lazy.arch.groups, inputs, config, obs)
        writer.write_shard(i, _block_tensors(lazy, i, records))
        lazy.unload_block(i)
        for name, rec in records.items():
            q, p = rec.result.weight.shape
            layers[f"{lazy.block_prefix(i)}{name}"] = rec.info(q, p, spec, config.method)
        timings["blocks_s"].append(round(time.perf_counter() - t0, 3))
        errs = [layers[f"{lazy.block_prefix(i)}{n}"]["rel_error"] for n in records]
        bar.set_postfix(sec=f"{timings['blocks_s'][-1]:.1f}", rel_err=f"{sum(errs) / len(errs):.4f}")

    timings["total_s"] = round(time.perf_counter() - started, 3)
    info = _info(config, lazy, path, windows, layers, timings)
    writer.copy_files(path, TOKENIZER_FILES)
    model_config = json.loads((path / "config.json").read_text())
    model_config["quantization_config"] = {"quant_method": "quantease", "bits": config.bits, "group_size": config.group_size}
    writer.finalize(model_config, info)
    return out


def _info(config, lazy, path, windows, layers, timings) -> dict[str, Any]:
    stored = sum(l["bits_per_weight"] * l["in_features"] * l["out_features"] for l in layers.values())
    weights = sum(l["in_features"] * l["out_features"] for l in layers.values())
    notes = [f"{name}: {n}" for name, l in layers.items() for n in l["notes"]]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "config": config.to_dict(),
        "model": {"source": str(path), "model_type": lazy.config.model_type, "blocks": len(lazy.blocks)},
        "calibration": {
            "source": config.calib, "nsamples": config.nsamples, "seqlen": config.seqlen, "seed": config.seed,
            "tokens_sha256": fingerprint(windows),
        },
        "summary": {
            "quantized_layers": len(layers),
            "bits_per_weight": stored / weights,
            "mean_rel_error": sum(l["rel_error"] for l in layers.values()) / len(layers),
            "fallbacks": notes,
        },
        "timings": timings,
        "layers": layers,
    }
