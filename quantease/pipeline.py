"""The one layer-by-layer driver, for every architecture and solver.

    capture block-0 inputs  ->  for each block i:
        load block i  ->  for each group of linears (data-flow order): Σ of its input -> solve each linear -> Ŵ in place
        ->  run the quantized block to get block i+1's inputs  ->  write block i's shard and the resume state
        ->  unload block i
    ->  index, config, quantease.json, manifest (last)

The driver knows solvers only through the registry entry (name, options), never by type. A rerun of the same
command continues after the last finished block (see checkpoint/resume.py).

With target="propagated" the original model's hidden states travel beside the quantized ones: each block keeps a
copy of its original weights, which runs on the original inputs, so every dense group's Σ is paired with the same
tokens' original inputs (solvers/base.py, Target), and the copy's outputs are the next block's original inputs.
"""
from __future__ import annotations

import contextlib
import copy
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
from .checkpoint.native import FORMAT, FORMAT_VERSION, INFO, MANIFEST, RUN_LOG, CheckpointWriter, effective_bits, encode
from .checkpoint.resume import Fingerprint, ResumeState, fault_point
from .config import QuantConfig
from .data.sources import load_text
from .data.windows import calibration_windows, fingerprint, tokenize
from .errors import CheckpointError, NumericalError, ResourceError, UsageError
from .models.capture import BlockInputs, Call, capture_block_inputs, collect_grams, run_block
from .models.reuse import PassCache
from .models.layers import matrix_shape, set_weight_matrix, weight_matrix
from .models.reader import LazyModel, resolve_model_path
from .models.registry import ArchSpec, FFNSpec
from .solvers import GridSpec, SolveResult, get_solver
from .solvers.base import Target, output_energy

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
    objective: str = "layer"  # what loss measures: "layer" ||W X - Ŵ X||², "propagated" ||W X_α - Ŵ X||² (per token)

    def info(self, spec: GridSpec, method: str) -> dict[str, Any]:
        r = self.result
        q, p = r.weight.shape
        info = {
            "out_features": q, "in_features": p, "bits": spec.bits, "group_size": spec.group_size,
            "groups": int(r.weight.grid.scale.shape[1]), "sym": spec.sym, "method": method, "objective": self.objective,
            "loss": r.loss, "rel_error": r.loss / self.reference if self.reference > 0 else 0.0,
            "history": r.history, "notes": r.notes, "bits_per_weight": effective_bits(self.tensors, q, p),
        }
        if r.weight.outliers is not None:
            info["outliers"] = {"structure": r.weight.outliers.structure, "count": r.weight.outliers.count}
        if self.extra:  # a split layer: shape and loss of the whole layer, bits counted over all its tensors
            info.update(self.extra, method=method)
            q, p = info["out_features"], info["in_features"]
            info["rel_error"] = info["loss"] / self.reference if self.reference > 0 else 0.0
            info["bits_per_weight"] = effective_bits(self.tensors, q, p)
        return info


def _solve_group(block: torch.nn.Module, names: tuple[str, ...], sigma: torch.Tensor | None, config: QuantConfig,
                 target: Target | None = None, fallback: str | None = None) -> dict[str, LayerRecord]:
    """Solve the linears `names` of one group (one shared input: one Σ and target) in place, stacked into one
    problem where the solver can (solvers/base.py, solve_group). `fallback` (why) rounds them with RTN instead of
    the configured solver; Σ is None when the group saw no calibration token. The group's solve time is shared
    among its layers by their rows."""
    Ws = [weight_matrix(block.get_submodule(n)).float() for n in names]
    for name, W in zip(names, Ws):
        if not torch.isfinite(W).all():
            raise NumericalError(f"layer {name} has NaN/Inf weights")
    start = time.perf_counter()
    method = config.method if fallback is None and sigma is not None else "rtn"
    entry = get_solver(method)
    options = config.solver_options() if method == config.method else entry.make_options()
    results = entry.solve_group(Ws, sigma, config.grid(), options, target)
    seconds = time.perf_counter() - start
    rows = sum(W.shape[0] for W in Ws)
    records = {}
    for name, W, result in zip(names, Ws, results):
        if sigma is None:  # no token reached the layer: nothing to measure its error on
            result.loss, result.history = 0.0, [0.0]
        if fallback:
            result.notes.append(fallback)
        set_weight_matrix(block.get_submodule(name), result.weight.dequantize())
        reference = 0.0 if sigma is None else output_energy(W, sigma, target)
        records[name] = LayerRecord(result, reference, seconds * W.shape[0] / rows, encode(result.weight),
                                    objective=_objective(target))
    return records


def _objective(target: Target | None) -> str:
    return "layer" if target is None else "propagated"


def _starved(arch: ArchSpec, name: str, module: torch.nn.Module, tokens: int, method: str) -> str | None:
    """Why a routed expert is rounded with RTN: fewer calibration tokens than inputs leave its Σ singular, and a
    solver fitted to so few tokens overfits them."""
    p = matrix_shape(module)[1]
    if not arch.is_expert(name) or tokens >= p or method == "rtn":
        return None
    return f"expert got {tokens} calibration tokens (fewer than its {p} inputs): RTN instead of {method}"


def _solve_split_layer(module: torch.nn.Module, sigma: torch.Tensor, name: str, config: QuantConfig,
                       split: tuple[str, torch.Tensor], target: Target | None) -> LayerRecord:
    """Solve one linear in place as FFSplit parts: split = (axis, heavy neuron indices)."""
    from .ffsplit import solve_split

    W = weight_matrix(module).float()
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {name} has NaN/Inf weights")
    start = time.perf_counter()
    layer = solve_split(W, sigma, split[0], split[1], config, target)
    seconds = time.perf_counter() - start
    set_weight_matrix(module, layer.W_hat)
    reference = output_energy(W, sigma, target)
    return LayerRecord(layer.light, reference, seconds, layer.tensors, layer.extra, _objective(target))


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
    observe: Callable[[str, torch.Tensor], None] | None = None, reference: list[torch.Tensor] | None = None,
) -> tuple[dict[str, LayerRecord], list[torch.Tensor], list[torch.Tensor] | None, float]:
    """Quantize every linear of one block in place; return their records, the block's output hidden states, given
    the original model's input hidden states (`reference`, target="propagated") the original's outputs, and the
    block forwards the passes cost (linear multiply-adds computed over those of one forward of the block).

    With config.ffsplit, the heavy neurons are chosen before the FFN's input group is solved, from the Σ of the
    down projection's input measured (in the same pass) with the original up/gate; see ffsplit.py. Routed experts
    see other tokens in the two models, so their Σ is not paired: they keep the layer objective. Sub-module outputs
    are reused between the passes where nothing they depend on changed (models/reuse.py)."""
    original = copy.deepcopy(block) if reference is not None else None  # the original weights, for the reference
    linears = arch.block_linears(block)
    dense = [n for n in linears if not arch.is_expert(n)]  # what block forwards are counted in
    caches = tuple(None if b is None else PassCache(b, _reusable(b, linears), dense) for b in (block, original))
    with caches[0], (caches[1] or contextlib.nullcontext()):
        records, outputs, ref_outputs = _quantize_block(block, arch, inputs, config, observe, reference, original,
                                                        caches)
        tokens = sum(y.numel() // y.shape[-1] for y in outputs)
        full = tokens * sum(block.get_submodule(n).weight.numel() for n in dense)  # one forward's multiply-adds
        work = sum(c.work for c in caches if c is not None) / full if full else 0.0
    return records, outputs, ref_outputs, work


def _reusable(block: torch.nn.Module, linears: list[str]) -> list[str]:
    """The block's direct children that hold quantized linears: what is worth reusing between passes."""
    return [name for name, _ in block.named_children() if any(n == name or n.startswith(name + ".") for n in linears)]


def _quantize_block(block: torch.nn.Module, arch: ArchSpec, inputs: BlockInputs, config: QuantConfig,
                    observe: Callable[[str, torch.Tensor], None] | None, reference: list[torch.Tensor] | None,
                    original: torch.nn.Module | None, caches: tuple[PassCache | None, PassCache | None]
                    ) -> tuple[dict[str, LayerRecord], list[torch.Tensor], list[torch.Tensor] | None]:
    original_outputs = None if config.propagate else run_block(block, inputs, caches[0])
    stages = arch.stages(block, config.sequential)
    paired = {g for stage in stages for g in stage if not any(arch.is_expert(n) for n in g)}
    pairing = None if original is None else (original, reference, paired)
    records: dict[str, LayerRecord] = {}
    ffn = arch.ffn
    split_on = bool(config.ffsplit) and ffn is not None
    axis = {ffn.up: "rows", ffn.gate: "rows", ffn.down: "cols"} if split_on else {}
    heavy: torch.Tensor | None = None
    for stage in stages:
        scoring = split_on and heavy is None and any(ffn.up in g for g in stage)
        down = [(ffn.down,)] if scoring and (ffn.down,) not in stage else []
        grams = collect_grams(block, stage + down, inputs, pairing, caches)
        if scoring:
            heavy, stats = _heavy_neurons(block, ffn, grams[(ffn.down,)].sigma(), config)
        for group in stage:
            gram = grams.get(group)
            sigma = None if gram is None else gram.sigma()
            target = None if gram is None else gram.target(config.alpha)
            if observe and sigma is not None:
                for name in group:
                    observe(name, sigma)
            split = [n for n in group if n in axis and heavy is not None]
            for name in split:
                records[name] = _solve_split_layer(block.get_submodule(name), sigma, name, config,
                                                   (axis[name], heavy), target)
            rest = tuple(n for n in group if n not in split)
            if rest:  # the layers of a group share their input, so an expert's are starved together
                fallback = _starved(arch, rest[0], block.get_submodule(rest[0]), 0 if gram is None else gram.count,
                                    config.method)
                records.update(_solve_group(block, rest, sigma, config, target, fallback))
    if split_on and heavy is not None:
        records[ffn.down].extra["heavy_hitters"] = stats
    outputs = original_outputs or run_block(block, inputs, caches[0])
    if original is None:
        return records, outputs, None
    # not propagating, the inputs are the original's already, and so are the outputs
    return records, outputs, original_outputs or run_block(original, BlockInputs(reference, inputs.calls), caches[1])


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
            try:
                spec.groups(matrix_shape(block.get_submodule(name))[1])
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


def _open_output(out: Path, fp: Fingerprint, settings: dict[str, Any], overwrite: bool, restart: bool
                 ) -> ResumeState | None:
    """The resume state to continue from, a fresh one, or None when the same run already completed."""
    state = ResumeState(out)
    if (out / MANIFEST).exists() and not overwrite:
        info = json.loads((out / INFO).read_text())
        done = Fingerprint(**info["fingerprint"])
        if done == fp:
            log.info("%s is already complete with the same model, calibration and settings; nothing to do", out)
            return None
        old = _settings(QuantConfig.from_dict(info["config"]))
        raise CheckpointError(f"{out} holds a complete checkpoint made from different "
                              f"{' and '.join(fp.differences(done))}; pass --overwrite to replace it"
                              + _changed_settings(old, settings))
    if state.exists() and not (overwrite or restart):
        diffs = fp.differences(state.fingerprint())
        if diffs:
            raise CheckpointError(f"{out} holds a partial run made from different {' and '.join(diffs)}; "
                                  f"pass --restart to start over" + _changed_settings(state.settings(), settings))
        if state.load() is not None:
            log.info("resuming the partial run in %s", out)
        return state
    if out.exists() and any(out.iterdir()):
        if not (overwrite or state.exists()):
            raise CheckpointError(f"output folder {out} already holds other files; pass --overwrite to replace them")
        (out / MANIFEST).unlink(missing_ok=True)  # first, so the folder never looks complete while replaced
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state.start(fp, settings)
    return state


def _settings(config: QuantConfig) -> dict[str, Any]:
    """What determines the result: everything but where it goes and which device computes it.

    bos is left out at its default (auto) so that runs made before --bos existed keep their fingerprint: for a
    tokenizer that adds no BOS auto is what those runs did, and for one that adds it auto changes the calibration
    tokens, which the calibration hash covers."""
    values = {k: v for k, v in config.to_dict().items() if k not in ("out", "device", "allow_pickle")}
    if values["bos"] == "auto":
        del values["bos"]
    return values


def _changed_settings(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """' (changed settings: bos auto -> first, ...)', naming what differs; '' when the old settings are unknown (a
    partial run from before they were saved) or only the model or calibration text differ."""
    if old is None:
        return ""
    defaults = asdict(QuantConfig())
    changed = [f"{k} {old.get(k, defaults.get(k))} -> {new.get(k, defaults.get(k))}" for k in sorted({*old, *new})
               if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))]
    return f" (changed settings: {', '.join(changed)})" if changed else ""


class _Run:
    """One quantization run: the state that the block loop carries from block to block."""

    def __init__(self, config: QuantConfig, device: torch.device, lazy: LazyModel, out: Path, resume: ResumeState):
        self.config, self.device, self.lazy, self.out, self.resume = config, device, lazy, out, resume
        self.writer = CheckpointWriter(out)
        self.layers: dict[str, Any] = {}
        self.log: dict[str, Any] = {"capture_s": 0.0, "blocks_s": [], "layer_s": {}, "resumed_at": []}
        self.calls: list[list[Call]] = []

    def first_inputs(self, windows: torch.Tensor) -> tuple[int, list[torch.Tensor], list[torch.Tensor] | None]:
        """The first block to quantize, its input hidden states (block 0's, or those a killed run saved) and, with the
        propagated target, the original model's (at block 0 the same tensors)."""
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
            return 0, hidden, (hidden if self.config.target == "propagated" else None)
        start, self.layers, self.log, hidden, reference = saved
        self.log["resumed_at"].append(start)
        on_device = lambda xs: None if xs is None else [x.to(self.device) for x in xs]
        return start, on_device(hidden), on_device(reference)

    def block(self, i: int, hidden: list[torch.Tensor], reference: list[torch.Tensor] | None,
              observe: SigmaObserver | None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        t0 = time.perf_counter()
        block = self.lazy.load_block(i, self.device)
        obs = (lambda name, s: observe(i, name, s)) if observe else None
        try:
            inputs = BlockInputs(hidden, self.calls[i])
            records, outputs, reference, work = quantize_block(block, self.lazy.arch, inputs, self.config, obs,
                                                               reference)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of memory in block {i} on {self.device}: lower --batch-size "
                                f"(now {self.config.calib_batch_size}) or --nsamples, or use --device cpu") from None
        self.writer.write_shard(i, _block_tensors(self.lazy, i, records))
        self.lazy.unload_block(i)
        prefix = self.lazy.block_prefix(i)
        for name, rec in records.items():
            self.layers[prefix + name] = rec.info(self.config.grid(), self.config.method)
            self.log["layer_s"][prefix + name] = round(rec.seconds, 4)
        self.log["blocks_s"].append(round(time.perf_counter() - t0, 3))
        self.log.setdefault("block_forwards", []).append(round(work, 3))
        last = i + 1 == len(self.lazy.blocks)
        self.resume.save(i + 1, self.layers, self.log, [] if last else outputs, None if last else reference)
        fault_point(f"block:{i}")
        return outputs, reference

    def finish(self, model_path: Path, calibration: dict[str, Any], fp: Fingerprint, started: float) -> None:
        self.log["total_s"] = round(time.perf_counter() - started, 3)
        self.writer.copy_files(model_path, TOKENIZER_FILES)
        self.writer.write_json(RUN_LOG, self.log)
        model_config = json.loads((model_path / "config.json").read_text())
        c = self.config
        model_config["quantization_config"] = {"quant_method": "quantease", "bits": c.bits, "group_size": c.group_size}
        self.writer.finalize(model_config, _info(c, self.lazy, model_path, calibration, fp, self.layers))
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
    _check_shapes(lazy, config.grid())
    _check_ffsplit(lazy, config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stream = tokenize(tokenizer, load_text(config.calib, "calib"), config.bos)
    windows = calibration_windows(stream, config.nsamples, config.seqlen, config.seed)
    calibration = {"source": config.calib, "nsamples": config.nsamples, "seqlen": config.seqlen, "seed": config.seed,
                   "tokens_sha256": fingerprint(windows), "bos": stream.bos, "tokenizer_adds_bos": stream.adds_bos}
    settings = _settings(config)
    fp = Fingerprint.of(path, calibration["tokens_sha256"], settings)
    out = Path(config.out)
    resume = _open_output(out, fp, settings, overwrite, restart)
    if resume is None:
        return out
    _check_disk(out, lazy, config)
    run = _Run(config, device, lazy, out, resume)
    start, hidden, reference = run.first_inputs(windows)
    bar = tqdm(range(start, len(lazy.blocks)), desc="quantize", unit="block", disable=not progress,
               initial=start, total=len(lazy.blocks))
    for i in bar:
        hidden, reference = run.block(i, hidden, reference, observe)
        bar.set_postfix(sec=f"{run.log['blocks_s'][-1]:.1f}")
    run.finish(path, calibration, fp, started)
    return out


def _info(config: QuantConfig, lazy: LazyModel, path: Path, calibration: dict[str, Any], fp: Fingerprint,
          layers: dict[str, Any]) -> dict[str, Any]:
    stored = sum(l["bits_per_weight"] * l["in_features"] * l["out_features"] for l in layers.values())
    weights = sum(l["in_features"] * l["out_features"] for l in layers.values())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "config": config.to_dict(),
        "model": {"source": str(path), "model_type": lazy.config.model_type, "blocks": len(lazy.blocks)},
        "calibration": calibration,
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
