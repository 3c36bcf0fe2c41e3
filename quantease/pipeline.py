"""The one layer-by-layer driver, for every architecture and solver.

    capture block-0 inputs  ->  for each block i:
        load block i  ->  for each group of linears (data-flow order): Σ of its input -> solve each linear -> Ŵ in place
        ->  run the quantized block to get block i+1's inputs  ->  write block i's shard and the resume state
        ->  unload block i
    ->  index, config, quantease.json, model card (README.md), manifest (last)

The driver knows solvers only through the registry entry (name, options), never by type. A rerun of the same
command continues after the last finished block (see checkpoint/resume.py).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import __version__
from .checkpoint.model_card import card_text
from .checkpoint.native import (CARD, FORMAT, FORMAT_VERSION, INFO, MANIFEST, OUTER_SHARD, RUN_LOG, CheckpointWriter,
                                effective_bits, encode)
from .checkpoint.resume import Fingerprint, ResumeState, fault_point
from .config import QuantConfig
from .data.sources import load_text
from .data.windows import calibration_windows, fingerprint, tokenize
from .errors import CheckpointError, NumericalError, ResourceError, UsageError
from .models.capture import BlockInputs, Call, capture_block_inputs, collect_grams, run_block
from .models.layers import matrix_shape, set_weight_matrix, weight_matrix
from .models.reader import LazyModel, resolve_model_path
from .models.registry import ArchSpec, FFNSpec
from .solvers import GridSpec, SolveResult, get_solver

__all__ = ["quantize", "quantize_block", "resolve_device", "LayerRecord"]

TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "chat_template.jinja", "generation_config.json",
]
SigmaObserver = Callable[[int, str, torch.Tensor], None]
log = logging.getLogger("quantease")


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
    extra: dict[str, Any] = field(default_factory=dict)  # entry fields that replace or add to the result's (FFSplit)
    spec: GridSpec | None = None  # the layer's own grid when it is not the run's (a GGUF K-quant's fallback type)

    def info(self, spec: GridSpec, method: str) -> dict[str, Any]:
        r = self.result
        q, p = r.weight.shape
        spec = self.spec or spec
        info = {
            "out_features": q, "in_features": p, "bits": spec.bits, "group_size": spec.group_size,
            "groups": int(r.weight.grid.scale.shape[1]), "sym": spec.sym, "method": method,
            "loss": r.loss, "rel_error": r.loss / self.reference if self.reference > 0 else 0.0,
            "history": r.history, "notes": r.notes, "bits_per_weight": effective_bits(self.tensors, q, p),
        }
        if spec.gguf:
            info["gguf"] = spec.gguf
        if r.weight.outliers is not None:
            info["outliers"] = {"structure": r.weight.outliers.structure, "count": r.weight.outliers.count}
        if self.extra:  # a split layer: shape and loss of the whole layer, bits counted over all its tensors
            info.update(self.extra, method=method)
            q, p = info["out_features"], info["in_features"]
            info["rel_error"] = info["loss"] / self.reference if self.reference > 0 else 0.0
            info["bits_per_weight"] = effective_bits(self.tensors, q, p)
        return info


def _output_energy(W: torch.Tensor, sigma: torch.Tensor) -> float:
    """tr(W Σ Wᵀ) in fp64: what each layer's relative error is relative to."""
    return float(((W.double() @ sigma.double()) * W.double()).sum())


def _solve_layer(module: torch.nn.Module, sigma: torch.Tensor | None, name: str, config: QuantConfig,
                 split: tuple[str, torch.Tensor] | None = None, fallback: str | None = None) -> LayerRecord:
    """Solve one linear in place; `split` = (axis, heavy neuron indices) solves it as FFSplit parts; `fallback`
    (why) rounds it with RTN instead of the configured solver. Σ is None when the layer saw no calibration token."""
    W = weight_matrix(module).float()
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {name} has NaN/Inf weights")
    if split is not None:
        return _solve_split_layer(module, W, sigma, config, split)
    start = time.perf_counter()
    method = config.method if fallback is None and sigma is not None else "rtn"
    entry = get_solver(method)
    options = config.solver_options() if method == config.method else entry.make_options()
    spec, other_grid = config.grid_spec().for_columns(W.shape[1])
    result = entry.solve(W, sigma, spec, options)
    if sigma is None:  # no token reached the layer: nothing to measure its error on
        result.loss, result.history = 0.0, [0.0]
    result.notes += [n for n in (other_grid, fallback) if n]
    seconds = time.perf_counter() - start
    set_weight_matrix(module, result.weight.dequantize())
    reference = 0.0 if sigma is None else _output_energy(W, sigma)
    return LayerRecord(result, reference, seconds, encode(result.weight), spec=spec if other_grid else None)


def _starved(arch: ArchSpec, name: str, module: torch.nn.Module, tokens: int, method: str) -> str | None:
    """Why a routed expert is rounded with RTN: fewer calibration tokens than inputs leave its Σ singular, and a
    solver fitted to so few tokens overfits them."""
    p = matrix_shape(module)[1]
    if not arch.is_expert(name) or tokens >= p or method == "rtn":
        return None
    return f"expert got {tokens} calibration tokens (fewer than its {p} inputs): RTN instead of {method}"


def _solve_split_layer(module: torch.nn.Module, W: torch.Tensor, sigma: torch.Tensor, config: QuantConfig,
                       split: tuple[str, torch.Tensor]) -> LayerRecord:
    from .ffsplit import solve_split

    start = time.perf_counter()
    layer = solve_split(W, sigma, split[0], split[1], config)
    seconds = time.perf_counter() - start
    set_weight_matrix(module, layer.W_hat)
    reference = _output_energy(W, sigma)
    return LayerRecord(layer.light, reference, seconds, layer.tensors, layer.extra)


def _heavy_neurons(block: torch.nn.Module, ffn: FFNSpec, sigma_down: torch.Tensor, config: QuantConfig
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """FFSplit's heavy set (sorted neuron indices) and the block's heavy-hitter statistics."""
    from .ffsplit import heavy_count, heavy_hitter_stats, neuron_scores

    scores = neuron_scores(sigma_down, weight_matrix(block.get_submodule(ffn.down)))  # [I]
    k = heavy_count(config.ffsplit, scores.numel())
    heavy = torch.topk(scores, k).indices.sort().values
    return heavy, heavy_hitter_stats(scores, heavy)


def quantize_block(
    block: torch.nn.Module, arch: ArchSpec, inputs: BlockInputs, config: QuantConfig,
    observe: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[dict[str, LayerRecord], list[torch.Tensor]]:
    """Quantize every linear of one block in place; return their records and the block's output hidden states.

    With config.ffsplit, the heavy neurons are chosen before the FFN's input group is solved, from the Σ of the
    down projection's input measured (in the same pass) with the original up/gate; see ffsplit.py."""
    original_outputs = None if config.propagate else run_block(block, inputs)
    stages = arch.stages(block, config.sequential)
    records: dict[str, LayerRecord] = {}
    ffn = arch.ffn
    split_on = bool(config.ffsplit) and ffn is not None
    axis = {ffn.up: "rows", ffn.gate: "rows", ffn.down: "cols"} if split_on else {}
    heavy: torch.Tensor | None = None
    for stage in stages:
        scoring = split_on and heavy is None and any(ffn.up in g for g in stage)
        down = [(ffn.down,)] if scoring and (ffn.down,) not in stage else []
        grams = collect_grams(block, stage + down, inputs)
        if scoring:
            heavy, stats = _heavy_neurons(block, ffn, grams[(ffn.down,)].sigma(), config)
        for group in stage:
            gram = grams.get(group)
            sigma = None if gram is None else gram.sigma()
            for name in group:
                module = block.get_submodule(name)
                fallback = _starved(arch, name, module, 0 if gram is None else gram.count, config.method)
                if observe and sigma is not None:
                    observe(name, sigma)
                split = (axis[name], heavy) if name in axis and heavy is not None else None
                records[name] = _solve_layer(module, sigma, name, config, split, fallback)
    if split_on and heavy is not None:
        records[ffn.down].extra["heavy_hitters"] = stats
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


def _check_shapes(lazy: LazyModel, spec: GridSpec) -> None:
    """Fail before any work if the group size does not divide some layer's input size."""
    for block in lazy.blocks:
        for name in lazy.arch.block_linears(block):
            p = matrix_shape(block.get_submodule(name))[1]
            try:
                spec.for_columns(p)[0].groups(p)
            except ValueError as e:
                raise UsageError(f"{e} (layer {name})") from None


def _check_ffsplit(lazy: LazyModel, config: QuantConfig) -> None:
    ffn = lazy.arch.ffn
    if config.ffsplit and (ffn is None or ffn.fused_gate_up):
        what = "no FFN spec" if ffn is None else "a fused [gate; up] projection"
        raise UsageError(f"--ffsplit is not supported for {lazy.config.model_type} ({what}); drop --ffsplit")


def _check_disk(out: Path, lazy: LazyModel, config: QuantConfig) -> None:
    """Refuse to start when the output (and the resume state) cannot fit on the output's file system."""
    weights = sum(lazy.index.shape(k)[0] * lazy.index.shape(k)[1] for i in range(len(lazy.blocks))
                  for p, k in lazy.block_tensor_names(i).items() if p.endswith(".weight") and len(lazy.index.shape(k)) == 2)
    outer = sum(4 * torch.Size(lazy.index.shape(lazy.checkpoint_name(n))).numel() for n in lazy.outer_params())
    resume = 2 * 4 * config.nsamples * config.seqlen * lazy.config.hidden_size
    need = weights * (config.bits + 1) // 8 + outer + resume
    free = shutil.disk_usage(out).free
    if free < need:
        raise ResourceError(f"not enough disk space in {out}: about {need / 2**30:.2f} GiB needed, "
                            f"{free / 2**30:.2f} GiB free")


def _open_output(out: Path, fp: Fingerprint, overwrite: bool, restart: bool) -> ResumeState | None:
    """The resume state to continue from, a fresh one, or None when the same run already completed."""
    state = ResumeState(out)
    if (out / MANIFEST).exists() and not overwrite:
        done = Fingerprint(**json.loads((out / INFO).read_text())["fingerprint"])
        if done == fp:
            log.info("%s is already complete with the same model, calibration and settings; nothing to do", out)
            return None
        raise CheckpointError(f"{out} holds a complete checkpoint made from different "
                              f"{' and '.join(fp.differences(done))}; pass --overwrite to replace it")
    if state.exists() and not (overwrite or restart):
        diffs = fp.differences(state.fingerprint())
        if diffs:
            raise CheckpointError(f"{out} holds a partial run made from different {' and '.join(diffs)}; "
                                  f"pass --restart to start over")
        if state.load() is not None:
            log.info("resuming the partial run in %s", out)
        return state
    if out.exists() and any(out.iterdir()):
        if not (overwrite or state.exists()):
            raise CheckpointError(f"output folder {out} already holds other files; pass --overwrite to replace them")
        (out / MANIFEST).unlink(missing_ok=True)  # first, so the folder never looks complete while replaced
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state.start(fp)
    return state


def _settings(config: QuantConfig) -> dict[str, Any]:
    """What determines the result: everything but where it goes and which device computes it."""
    return {k: v for k, v in config.to_dict().items() if k not in ("out", "device", "allow_pickle")}


class _Run:
    """One quantization run: the state that the block loop carries from block to block."""

    def __init__(self, config: QuantConfig, device: torch.device, lazy: LazyModel, out: Path, resume: ResumeState):
        self.config, self.device, self.lazy, self.out, self.resume = config, device, lazy, out, resume
        self.writer = CheckpointWriter(out)
        self.layers: dict[str, Any] = {}
        self.log: dict[str, Any] = {"capture_s": 0.0, "blocks_s": [], "layer_s": {}, "resumed_at": []}
        self.calls: list[list[Call]] = []

    def first_inputs(self, windows: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
        """The first block to quantize and its input hidden states (block 0's, or those a killed run saved)."""
        t0 = time.perf_counter()
        self.lazy.load_outer(self.device)
        hidden, self.calls = capture_block_inputs(self.lazy.model, self.lazy.blocks,
                                                  windows.split(self.config.calib_batch_size), self.device)
        self.lazy.unload_outer()
        saved = self.resume.load()
        if saved is None:
            self.writer.write_shard(None, {n: self.lazy.index.get(self.lazy.checkpoint_name(n))
                                           for n in self.lazy.outer_params()})
            self.log["capture_s"] = round(time.perf_counter() - t0, 3)
            return 0, hidden
        start, self.layers, self.log, hidden = saved
        self.log["resumed_at"].append(start)
        return start, [h.to(self.device) for h in hidden]

    def block(self, i: int, hidden: list[torch.Tensor], observe: SigmaObserver | None) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        block = self.lazy.load_block(i, self.device)
        obs = (lambda name, s: observe(i, name, s)) if observe else None
        try:
            inputs = BlockInputs(hidden, self.calls[i])
            records, outputs = quantize_block(block, self.lazy.arch, inputs, self.config, obs)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of memory in block {i} on {self.device}: lower --batch-size "
                                f"(now {self.config.calib_batch_size}) or --nsamples, or use --device cpu") from None
        self.writer.write_shard(i, _block_tensors(self.lazy, i, records))
        self.lazy.unload_block(i)
        prefix = self.lazy.block_prefix(i)
        for name, rec in records.items():
            self.layers[prefix + name] = rec.info(self.config.grid_spec(), self.config.method)
            self.log["layer_s"][prefix + name] = round(rec.seconds, 4)
        self.log["blocks_s"].append(round(time.perf_counter() - t0, 3))
        last = i + 1 == len(self.lazy.blocks)
        self.resume.save(i + 1, self.layers, self.log, [] if last else outputs)
        fault_point(f"block:{i}")
        return outputs

    def finish(self, model_path: Path, calib_sha: str, fp: Fingerprint, started: float) -> None:
        self.log["total_s"] = round(time.perf_counter() - started, 3)
        self.writer.copy_files(model_path, TOKENIZER_FILES)
        self.writer.write_json(RUN_LOG, self.log)
        model_config = json.loads((model_path / "config.json").read_text())
        c = self.config
        model_config["quantization_config"] = {"quant_method": "quantease", "bits": c.bits, "group_size": c.group_size}
        info = _info(c, self.lazy, model_path, calib_sha, fp, self.layers)
        last = self.writer.shard_name(len(self.lazy.blocks) - 1)
        files = ["config.json", OUTER_SHARD, f"{self.writer.shard_name(0)} … {last}", INFO, MANIFEST]
        self.writer.write_text(CARD, card_text(info, model_config, "native", files))
        self.writer.finalize(model_config, info)
        self.resume.clear()


def quantize(
    config: QuantConfig, overwrite: bool = False, restart: bool = False, progress: bool = True,
    observe: SigmaObserver | None = None,
) -> Path:
    """Quantize config.model into config.out and return the folder; `observe(block, layer, Σ)` sees each Σ.

    Rerunning after an interruption continues where it stopped; a finished identical run is left as it is.
    """
    if not config.out:
        raise UsageError("no output folder given (--out)")
    started = time.perf_counter()
    device = resolve_device(config.device)
    path = resolve_model_path(config.model, config.allow_pickle)
    lazy = LazyModel(path)
    _check_shapes(lazy, config.grid_spec())
    _check_ffsplit(lazy, config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows(tokenize(tokenizer, load_text(config.calib, "calib")), config.nsamples,
                                  config.seqlen, config.seed)
    calib_sha = fingerprint(windows)
    fp = Fingerprint.of(path, calib_sha, _settings(config))
    out = Path(config.out)
    resume = _open_output(out, fp, overwrite, restart)
    if resume is None:
        return out
    _check_disk(out, lazy, config)
    run = _Run(config, device, lazy, out, resume)
    start, hidden = run.first_inputs(windows)
    bar = tqdm(range(start, len(lazy.blocks)), desc="quantize", unit="block", disable=not progress,
               initial=start, total=len(lazy.blocks))
    for i in bar:
        hidden = run.block(i, hidden, observe)
        bar.set_postfix(sec=f"{run.log['blocks_s'][-1]:.1f}")
    run.finish(path, calib_sha, fp, started)
    return out


def _info(config: QuantConfig, lazy: LazyModel, path: Path, calib_sha: str, fp: Fingerprint,
          layers: dict[str, Any]) -> dict[str, Any]:
    stored = sum(l["bits_per_weight"] * l["in_features"] * l["out_features"] for l in layers.values())
    weights = sum(l["in_features"] * l["out_features"] for l in layers.values())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "config": config.to_dict(),
        "model": {"source": str(path), "model_type": lazy.config.model_type, "blocks": len(lazy.blocks)},
        "calibration": {"source": config.calib, "nsamples": config.nsamples, "seqlen": config.seqlen,
                        "seed": config.seed, "tokens_sha256": calib_sha},
        "fingerprint": asdict(fp),
        "summary": {
            "quantized_layers": len(layers),
            "bits_per_weight": stored / weights,
            "mean_rel_error": sum(l["rel_error"] for l in layers.values()) / len(layers),
            "fallbacks": [f"{name}: {n}" for name, l in layers.items() for n in l["notes"]],
        },
        "layers": layers,
    } | _ffsplit_summary(config, layers)


def _ffsplit_summary(config: QuantConfig, layers: dict[str, Any]) -> dict[str, Any]:
    """quantease.json's "ffsplit" section (only when FFSplit is on): heavy-hitter statistics per FFN."""
    if not config.ffsplit:
        return {}
    stats = {name: l["heavy_hitters"] for name, l in layers.items() if "heavy_hitters" in l}
    return {"ffsplit": {"heavy": config.ffsplit, "heavy_bits": config.heavy_bits, "layers": stats}}
