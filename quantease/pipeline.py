"""The one layer-by-layer driver, for every architecture and solver.

    capture block-0 inputs  ->  for each block i:
        load block i  ->  for each group of linears (data-flow order): Σ of its input -> solve each linear -> Ŵ in place
        ->  run the quantized block to get block i+1's inputs  ->  write block i's shard and the resume state
        ->  unload block i
    ->  index, config, quantease.json, model card (README.md), manifest (last)

The driver knows solvers only through the registry entry (name, options), never by type. A rerun of the same
command continues after the last finished block (see checkpoint/resume.py).

Before anything is loaded, the run's memory and disk plan (plan.py) is checked against the device and the host. Blocks
run in the forward dtype (`--dtype`), and so are the activations passed from block to block and saved for resume;
solvers always get fp32 weights as the checkpoint stores them, and Σ is summed in fp64 from fp32 products. The
activations stay on the device or are offloaded to host memory (models/activations.py), as the plan decides.

With target="propagated" the original model's hidden states travel beside the quantized ones: each block keeps a
copy of its original weights, which runs on the original inputs, so every dense group's Σ is paired with the same
tokens' original inputs (solvers/base.py, Target), and the copy's outputs are the next block's original inputs.

Under torchrun every rank runs this loop on its share of the calibration batches; after each stage's Σ pass the
sums are all-reduced, each layer is solved by one owner rank and shared with the others (distributed.py).
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
from typing import Any, Callable, NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import __version__
from .checkpoint.model_card import card_text
from .checkpoint.native import (CARD, FORMAT, FORMAT_VERSION, INFO, MANIFEST, OUTER_SHARD, RUN_LOG, TOKENIZER_FILES,
                                CheckpointWriter,
                                effective_bits, encode)
from .checkpoint.resume import Fingerprint, ResumeState, fault_point
from .config import QuantConfig
from .data.sources import load_text
from .data.windows import calibration_windows, fingerprint, tokenize
from .distributed import World, assign_owners
from .errors import CheckpointError, NumericalError, ResourceError, UsageError
from .models.activations import Activations
from .models.capture import BlockInputs, Call, capture_block_inputs, clock, collect_grams, reduce_grams, run_block
from .models.reuse import PassCache
from .models.layers import matrix_shape, set_weight_matrix, weight_matrix
from .models.reader import LazyModel, checkpoint_dtype, open_index, read_config, resolve_model_path
from .models.registry import ArchSpec, FFNSpec
from .plan import Plan, check_disk, make_plan
from .resources import device_peak, peak_rss, reset_peaks, resolve_device, resolve_dtype, trim_host_memory
from .solvers import GridSpec, SolveResult, get_solver
from .solvers.base import Target, output_energy

__all__ = ["quantize", "quantize_block", "open_model", "check_model", "LayerRecord", "BlockResult"]

SigmaObserver = Callable[[int, str, torch.Tensor], None]
WeightSource = Callable[[str], torch.Tensor]  # linear name -> its original weight [out, in] in fp32
log = logging.getLogger("quantease")


def open_model(config: QuantConfig, planning: bool = False) -> tuple[Path, torch.device, LazyModel]:
    """The model folder, the compute device and the model's skeleton in the forward dtype; nothing is loaded.
    `planning`: the device may be a GPU this machine lacks."""
    device = resolve_device(config.device, planning)
    path = resolve_model_path(config.model, config.allow_pickle)
    stored = checkpoint_dtype(read_config(path), open_index(path))
    return path, device, LazyModel(path, resolve_dtype(config.dtype, device, stored))


@dataclass
class LayerRecord:
    result: SolveResult
    reference: float  # tr(W Σ Wᵀ): the output energy the error is relative to
    seconds: float
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)  # entry fields that replace or add to the result's (FFSplit)
    objective: str = "layer"  # what loss measures: "layer" ||W X - Ŵ X||², "propagated" ||W X_α - Ŵ X||² (per token)
    spec: GridSpec | None = None  # the layer's own grid when it is not the run's (a GGUF K-quant's fallback type)

    def info(self, spec: GridSpec, method: str) -> dict[str, Any]:
        r = self.result
        q, p = r.weight.shape
        spec = self.spec or spec
        info = {
            "out_features": q, "in_features": p, "bits": spec.bits, "group_size": spec.group_size,
            "groups": int(r.weight.grid.scale.shape[1]), "sym": spec.sym, "method": method, "objective": self.objective,
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


class BlockResult(NamedTuple):
    records: dict[str, LayerRecord]
    outputs: Activations  # the quantized block's output hidden states
    reference: Activations | None  # the original block's (target="propagated"), else None
    seconds: dict[str, float]  # "forward" (block passes), "sigma" (Σ accumulation), "solve" (all layers)
    forwards: float  # what the passes cost: linear multiply-adds computed over those of one forward of the block


def _finite(name: str, W: torch.Tensor) -> None:
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {name} has NaN/Inf weights")


def _solve_group(block: torch.nn.Module, names: tuple[str, ...], Ws: list[torch.Tensor], sigma: torch.Tensor | None,
                 config: QuantConfig, target: Target | None = None, fallback: str | None = None
                 ) -> dict[str, LayerRecord]:
    """Solve the linears `names` of one group (one shared input: one Σ and target), whose original weights are Ws
    [out, in] fp32, and put each Ŵ into the block; stacked into one problem where the solver can (solvers/base.py,
    solve_group). `fallback` (why) rounds them with RTN instead of the configured solver; Σ is None when the group
    saw no calibration token. The group's solve time is shared among its layers by their rows."""
    for name, W in zip(names, Ws):
        _finite(name, W)
    start = time.perf_counter()
    method = config.method if fallback is None and sigma is not None else "rtn"
    entry = get_solver(method)
    options = config.solver_options() if method == config.method else entry.make_options()
    spec, other_grid = config.grid_spec().for_columns(Ws[0].shape[1])  # the group's layers share their inputs
    results = entry.solve_group(Ws, sigma, spec, options, target)
    seconds = time.perf_counter() - start
    rows = sum(W.shape[0] for W in Ws)
    records = {}
    for name, W, result in zip(names, Ws, results):
        if sigma is None:  # no token reached the layer: nothing to measure its error on
            result.loss, result.history = 0.0, [0.0]
        result.notes += [n for n in (other_grid, fallback) if n]
        set_weight_matrix(block.get_submodule(name), result.weight.dequantize())
        reference = 0.0 if sigma is None else output_energy(W, sigma, target)
        records[name] = LayerRecord(result, reference, seconds * W.shape[0] / rows, encode(result.weight),
                                    objective=_objective(target), spec=spec if other_grid else None)
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


def _solve_split_layer(module: torch.nn.Module, W: torch.Tensor, sigma: torch.Tensor, name: str, config: QuantConfig,
                       split: tuple[str, torch.Tensor], target: Target | None) -> LayerRecord:
    """Solve one linear (original weight W [out, in] fp32) in place as FFSplit parts: split = (axis, heavy neuron
    indices)."""
    from .solvers.ffsplit import solve_split

    _finite(name, W)
    start = time.perf_counter()
    layer = solve_split(W, sigma, split[0], split[1], config, target)
    seconds = time.perf_counter() - start
    set_weight_matrix(module, layer.W_hat)
    reference = output_energy(W, sigma, target)
    return LayerRecord(layer.light, reference, seconds, layer.tensors, layer.extra, _objective(target))


def _heavy_neurons(W_down: torch.Tensor, sigma_down: torch.Tensor, config: QuantConfig
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """FFSplit's heavy set (sorted neuron indices) and the block's heavy-hitter statistics."""
    from .solvers.ffsplit import heavy_count, heavy_hitter_stats, neuron_scores

    scores = neuron_scores(sigma_down, W_down)  # [I]
    k = heavy_count(config.ffsplit, scores.numel())
    heavy = torch.topk(scores, k).indices.sort().values
    return heavy, heavy_hitter_stats(scores, heavy)


class _Seconds:
    """A block's time split: block passes, Σ accumulation (inside those passes, timed apart) and layer solves; with
    several ranks also "comm", the collectives (Σ all-reduce, sharing solved layers), and those collectives."""

    def __init__(self, world: World):
        self.world, self.device = world, world.device
        self.split = {"forward": 0.0, "sigma": 0.0, "solve": 0.0} | ({"comm": 0.0} if world.size > 1 else {})

    def run(self, block: torch.nn.Module, inputs: BlockInputs, cache: PassCache | None) -> Activations:
        t0 = clock(self.device)
        out = run_block(block, inputs, cache)
        self.split["forward"] += clock(self.device) - t0
        return out

    def grams(self, block: torch.nn.Module, groups: list[tuple[str, ...]], inputs: BlockInputs, pairing,
              caches: tuple[PassCache | None, PassCache | None]):
        t0 = clock(self.device)
        grams = collect_grams(block, groups, inputs, pairing, caches)
        sigma = sum(g.seconds for g in grams.values())
        self.split["forward"] += clock(self.device) - t0 - sigma
        self.split["sigma"] += sigma
        if self.world.size == 1:
            return grams
        t0 = clock(self.device)
        grams = reduce_grams(grams, groups, self.world, lambda g: matrix_shape(block.get_submodule(g[0]))[1],
                             pairing[2] if pairing else set(), self.device)
        self.split["comm"] += clock(self.device) - t0
        return grams

    def share(self, block: torch.nn.Module, done: dict[str, "LayerRecord"], order: list[str]
              ) -> dict[str, "LayerRecord"]:
        """The layers every rank solved in this stage, in the one-process order; those another rank solved get
        their Ŵ put into this rank's block (sent as is for an FFSplit layer, dequantized from the codes else)."""
        if self.world.size == 1:
            return done
        t0 = clock(self.device)
        mine = {n: (r, weight_matrix(block.get_submodule(n)) if r.extra else None) for n, r in done.items()}
        merged = dict(done)
        for rank, part in enumerate(self.world.all_gather(mine, "sharing the solved layers")):
            for name, (record, W_hat) in part.items():
                if rank != self.world.rank:
                    set_weight_matrix(block.get_submodule(name),
                                      record.result.weight.dequantize() if W_hat is None else W_hat)
                    merged[name] = record
        self.split["comm"] += clock(self.device) - t0
        return {n: merged[n] for n in order}


def quantize_block(
    block: torch.nn.Module, arch: ArchSpec, inputs: BlockInputs, config: QuantConfig,
    observe: Callable[[str, torch.Tensor], None] | None = None, reference: Activations | None = None,
    weights: WeightSource | None = None, world: World | None = None, reuse: str = "layers",
) -> BlockResult:
    """Quantize every linear of one block in place; return their records, the block's output hidden states, given
    the original model's input hidden states (`reference`, target="propagated") the original's outputs, the time
    split and the block forwards the passes cost. `weights` gives each linear's original fp32 weight (default: the
    block's own, upcast). `world`: this rank's place in a multi-process run (distributed.py); `inputs` are then
    its share of the batches, and each layer is solved by one rank and shared with the others. `reuse`: what keeps
    its outputs between passes, "layers" (sub-modules and the linears in them), "modules" (sub-modules) or "none";
    the plan lowers it when the memory does not fit.

    With config.ffsplit, the heavy neurons are chosen before the FFN's input group is solved, from the Σ of the
    down projection's input measured (in the same pass) with the original up/gate; see ffsplit.py. Routed experts
    see other tokens in the two models, so their Σ is not paired: they keep the layer objective. Sub-module outputs
    are reused between the passes where nothing they depend on changed (models/reuse.py). Each group's fp64
    accumulator is dropped once its Σ is taken, so a block never holds more than one stage's."""
    weights = weights or (lambda name: weight_matrix(block.get_submodule(name)).float())
    world = world or World(inputs.hidden.device)
    original = copy.deepcopy(block) if reference is not None else None  # the original weights, for the reference
    linears = arch.block_linears(block)
    dense = [n for n in linears if not arch.is_expert(n)]  # what block forwards are counted in
    caches = tuple(None if b is None else PassCache(b, _reusable(b, linears) if reuse != "none" else [], dense,
                                                    layers=reuse == "layers")
                   for b in (block, original))
    with caches[0], (caches[1] or contextlib.nullcontext()):
        records, outputs, ref_outputs, seconds = _quantize_block(block, arch, inputs, config, observe, reference,
                                                                 weights, original, caches, world)
        full = outputs.tokens * sum(block.get_submodule(n).weight.numel() for n in dense)  # one forward's multiply-adds
        work = sum(c.work for c in caches if c is not None) / full if full else 0.0
    return BlockResult(records, outputs, ref_outputs, seconds, work)


def _owned(block: torch.nn.Module, arch: ArchSpec, stage: list[tuple[str, ...]],
           grams: dict[tuple[str, ...], Any], config: QuantConfig, world: World) -> set[str]:
    """The layers of `stage` this rank solves. Each layer is a unit of cost q·p² (a layer rounded with RTN, q·p),
    bin-packed over the ranks: the layers of a stacked group may go to different ranks, each solving its share as
    one stacked problem, which gives the same codes (rows never interact; solvers/base.py solve_group)."""
    names = [n for g in stage for n in g]
    if world.size == 1:
        return set(names)
    costs = {}
    for group in stage:
        tokens = grams[group].count if group in grams else None
        for name in group:
            module = block.get_submodule(name)
            q, p = matrix_shape(module)
            solved = tokens is not None and _starved(arch, name, module, tokens, config.method) is None
            costs[name] = float(q * p * p if solved else q * p)
    return {n for n, r in assign_owners(costs, world.size).items() if r == world.rank}


def _reusable(block: torch.nn.Module, linears: list[str]) -> list[str]:
    """The block's direct children that hold quantized linears: what is worth reusing between passes."""
    return [name for name, _ in block.named_children() if any(n == name or n.startswith(name + ".") for n in linears)]


def _quantize_block(block: torch.nn.Module, arch: ArchSpec, inputs: BlockInputs, config: QuantConfig,
                    observe: Callable[[str, torch.Tensor], None] | None, reference: Activations | None,
                    weights: WeightSource, original: torch.nn.Module | None,
                    caches: tuple[PassCache | None, PassCache | None], world: World
                    ) -> tuple[dict[str, LayerRecord], Activations, Activations | None, dict[str, float]]:
    seconds = _Seconds(world)
    original_outputs = None if config.propagate else seconds.run(block, inputs, caches[0])
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
        grams = seconds.grams(block, stage + down, inputs, pairing, caches)
        if scoring:
            heavy, stats = _heavy_neurons(weights(ffn.down), grams[(ffn.down,)].sigma(), config)
        first = {n for g in stage for n in g if n in axis and heavy is not None}  # FFSplit layers: solved first
        mine = _owned(block, arch, stage, grams, config, world)
        done: dict[str, LayerRecord] = {}
        for group in stage:
            gram = grams.pop(group, None)
            sigma = None if gram is None else gram.sigma()
            target = None if gram is None else gram.target(config.alpha)
            count = 0 if gram is None else gram.count
            del gram
            if observe and sigma is not None:
                for name in group:
                    observe(name, sigma)
            for name in (n for n in group if n in first and n in mine):
                done[name] = _solve_split_layer(block.get_submodule(name), weights(name), sigma, name, config,
                                                (axis[name], heavy), target)
            rest = tuple(n for n in group if n not in first and n in mine)
            if rest:  # the layers of a group share their input, so an expert's are starved together
                fallback = _starved(arch, rest[0], block.get_submodule(rest[0]), count, config.method)
                done.update(_solve_group(block, rest, [weights(n) for n in rest], sigma, config, target, fallback))
        seconds.split["solve"] += sum(r.seconds for r in done.values())
        records.update(seconds.share(block, done, [n for g in stage for n in sorted(g, key=lambda n: n not in first)]))
    if split_on and heavy is not None:
        records[ffn.down].extra["heavy_hitters"] = stats
    outputs = original_outputs if original_outputs is not None else seconds.run(block, inputs, caches[0])
    ref_out = None
    if original is not None:  # not propagating, the inputs are the original's already, and so are the outputs
        ref_out = original_outputs if original_outputs is not None else \
            seconds.run(original, BlockInputs(reference, inputs.calls), caches[1])
    return records, outputs, ref_out, seconds.split


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


def check_model(lazy: LazyModel, config: QuantConfig) -> None:
    """Settings the model cannot take, refused before any work: group sizes, FFSplit."""
    _check_shapes(lazy, config.grid_spec())
    _check_ffsplit(lazy, config)


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


def _open_output(out: Path, fp: Fingerprint, settings: dict[str, Any], overwrite: bool, restart: bool,
                 world: World) -> ResumeState | None:
    """The resume state to continue from, a fresh one, or None when the same run already completed. A partial run
    continues only with the number of processes that made it (each holds its own share of the calibration inputs)."""
    state = ResumeState(out, world)
    if (out / MANIFEST).exists() and not overwrite:
        info = json.loads((out / INFO).read_text())
        done = Fingerprint(**info["fingerprint"])
        if done == fp:
            log.info("%s is already complete with the same model, calibration and settings; nothing to do", out)
            return None
        old = _settings(QuantConfig.from_dict({"target": "layer", **info["config"]}),  # no target recorded: layer
                        getattr(torch, info["model"].get("forward_dtype", "float32")))
        raise CheckpointError(f"{out} holds a complete checkpoint made from different "
                              f"{' and '.join(fp.differences(done))}; pass --overwrite to replace it"
                              + _changed_settings(old, settings))
    if state.exists() and not (overwrite or restart):
        diffs = fp.differences(state.fingerprint())
        if diffs:
            raise CheckpointError(f"{out} holds a partial run made from different {' and '.join(diffs)}; "
                                  f"pass --restart to start over" + _changed_settings(state.settings(), settings))
        made = state.world_size()
        if made not in (None, world.size):
            raise CheckpointError(f"{out} holds a partial run made by {made} process(es), this is {world.size}: "
                                  f"resume it with {made} (torchrun --nproc-per-node x nodes) or pass --restart")
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


_RUN_ONLY = ("offload_activations", "resume_every")  # how a run keeps its state, not what it computes: run.json


def _settings(config: QuantConfig, dtype: torch.dtype) -> dict[str, Any]:
    """What determines the result: everything but where it goes, which device computes it and where the activations
    wait (offloading and resume thinning change nothing).

    The forward dtype is recorded as resolved (`auto` differs by device), and only when not float32, which every run
    used before there was a choice; bos is left out at its default (auto): for a tokenizer that adds no BOS auto is
    what runs before --bos did, and for one that adds it auto changes the calibration tokens, which the calibration
    hash covers. So earlier runs keep their fingerprints."""
    skip = ("out", "device", "allow_pickle", "dtype", *_RUN_ONLY)
    settings = {k: v for k, v in config.to_dict().items() if k not in skip}
    if settings["bos"] == "auto":
        del settings["bos"]
    if dtype != torch.float32:
        settings["forward_dtype"] = str(dtype).removeprefix("torch.")
    return settings


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

    def __init__(self, config: QuantConfig, world: World, lazy: LazyModel, out: Path, resume: ResumeState,
                 plan: Plan):
        self.config, self.world, self.lazy, self.out, self.resume = config, world, lazy, out, resume
        self.device = world.device
        self.offload, self.reuse = plan.offload, plan.reuse
        self.writer = CheckpointWriter(out) if world.is_main else None  # rank 0 writes the checkpoint
        self.layers: dict[str, Any] = {}
        self.log: dict[str, Any] = {"capture_s": 0.0, "blocks_s": [], "layer_s": {}, "resumed_at": [],
                                    "blocks": [], "plan": plan.to_dict(), "resume_every": config.resume_every}
        self.calls: list[list[Call]] = []

    def _store(self, batches: list[torch.Tensor] | None) -> Activations | None:
        return None if batches is None else Activations.of(batches, self.device, self.offload)

    def first_inputs(self, windows: torch.Tensor) -> tuple[int, Activations, Activations | None]:
        """The first block to quantize, its input hidden states (block 0's, or those a killed run saved) and, with the
        propagated target, the original model's (at block 0 the same tensors)."""
        t0 = time.perf_counter()
        self.log["startup_peak_rss"] = peak_rss()  # imports, plan, tokenization: before any weight was read
        reset_peaks(self.device)
        self.lazy.load_outer(self.device)
        hidden, self.calls = capture_block_inputs(self.lazy.model, self.lazy.blocks,
                                                  self.world.shard(windows.split(self.config.calib_batch_size)),
                                                  Activations(self.device, self.offload))
        self.lazy.unload_outer()
        saved = self.resume.load()
        if saved is None:
            if self.writer:
                self.writer.write_shard(None, {n: self.lazy.index.get(self.lazy.checkpoint_name(n))
                                               for n in self.lazy.outer_params()})
            self.log.update(capture_s=round(time.perf_counter() - t0, 3), capture_peak_rss=peak_rss(),
                            capture_peak_device=device_peak(self.device))
            return 0, hidden, (hidden if self.config.target == "propagated" else None)
        del hidden
        start, self.layers, log, hidden, reference = saved
        self.log = {**log, "plan": self.log["plan"], "startup_peak_rss": self.log["startup_peak_rss"]}
        self.log["resumed_at"].append(start)
        return start, self._store(hidden), self._store(reference)

    def block(self, i: int, hidden: Activations, reference: Activations | None,
              observe: SigmaObserver | None) -> tuple[Activations, Activations | None]:
        t0 = time.perf_counter()
        reset_peaks(self.device)
        block = self.lazy.load_block(i, self.device)
        obs = (lambda name, s: observe(i, name, s)) if observe else None
        # solvers get the checkpoint's own weights whenever the block runs in a lower precision than fp32
        weights = None if self.lazy.dtype == torch.float32 else \
            (lambda name: self.lazy.original_weight(i, name, self.device))
        calls: list[None] = []  # every call of the block's forward (a copy of the block keeps the hook)
        counter = block.register_forward_pre_hook(lambda module, args: calls.append(None))
        try:
            inputs = BlockInputs(hidden, self.calls[i])
            result = quantize_block(block, self.lazy.arch, inputs, self.config, obs, reference, weights, self.world,
                                    self.reuse)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of memory in block {i} on {self.device}: lower --batch-size "
                                f"(now {self.config.calib_batch_size}) or --nsamples, use --offload-activations on, "
                                f"or use --device cpu") from None
        finally:
            counter.remove()
        written = self.writer.write_shard(i, _block_tensors(self.lazy, i, result.records)) if self.writer else 0
        self.lazy.unload_block(i)
        trim_host_memory()  # the block's freed temporaries, before the next block's peak
        prefix = self.lazy.block_prefix(i)
        for name, rec in result.records.items():
            self.layers[prefix + name] = rec.info(self.config.grid_spec(), self.config.method)
            self.log["layer_s"][prefix + name] = round(rec.seconds, 4)
        self.log["blocks_s"].append(round(time.perf_counter() - t0, 3))
        self.log.setdefault("block_forwards", []).append(round(result.forwards, 3))
        last = i + 1 == len(self.lazy.blocks)
        stats = {"block": i, **{f"{k}_s": round(v, 3) for k, v in result.seconds.items()},
                 "passes": len(calls) / len(hidden), "peak_rss": peak_rss(), "peak_device": device_peak(self.device),
                 "shard_bytes": written}
        if self.world.size > 1:  # each rank's share of the block: its time split and peaks
            mine = {k: v for k, v in stats.items() if k not in ("block", "shard_bytes")}
            stats["ranks"] = self.world.all_gather(mine, f"the timings of block {i}")
        self.log["blocks"].append(stats)
        if last or (i + 1) % self.config.resume_every == 0:  # --resume-every N: a kill redoes at most N - 1 blocks
            outputs = [] if last else result.outputs.host()
            ref = None if last or result.reference is None else result.reference.host()
            stats["resume_bytes"] = self.resume.save(i + 1, self.layers, self.log, outputs, ref)
        fault_point(f"block:{i}")
        return result.outputs, result.reference

    def finish(self, model_path: Path, calibration: dict[str, Any], fp: Fingerprint, started: float) -> None:
        self.log["total_s"] = round(time.perf_counter() - started, 3)
        self.world.barrier("the end of the last block")  # every rank is done with its resume files
        if self.writer is None:  # the other ranks wait until rank 0 wrote the complete checkpoint
            self.world.barrier("the finished checkpoint")
            return
        if self.world.size > 1:
            self.log["world_size"] = self.world.size
        self.writer.copy_files(model_path, TOKENIZER_FILES)
        self.writer.write_json(RUN_LOG, self.log)
        model_config = json.loads((model_path / "config.json").read_text())
        c = self.config
        model_config["quantization_config"] = {"quant_method": "quantease", "bits": c.bits, "group_size": c.group_size}
        info = _info(c, self.lazy, model_path, calibration, fp, self.layers)
        last = self.writer.shard_name(len(self.lazy.blocks) - 1)
        files = ["config.json", OUTER_SHARD, f"{self.writer.shard_name(0)} … {last}", INFO, MANIFEST]
        self.writer.write_text(CARD, card_text(info, model_config, "native", files))
        self.writer.finalize(model_config, info)
        self.resume.clear()
        self.world.barrier("the finished checkpoint")


def quantize(
    config: QuantConfig, overwrite: bool = False, restart: bool = False, progress: bool = True,
    observe: SigmaObserver | None = None,
) -> Path:
    """Quantize config.model into config.out and return the folder; `observe(block, layer, Σ)` sees each Σ.

    The memory plan is checked before anything is loaded. Rerunning after an interruption continues where it
    stopped; a finished identical run is left as it is. Launched by torchrun (WORLD_SIZE > 1), every rank runs
    this on its share of the calibration batches (distributed.py) and rank 0 writes the checkpoint.
    """
    if not config.out:
        raise UsageError("no output folder given (--out)")
    started = time.perf_counter()
    path, device, lazy = open_model(config)
    world = World.from_env(device)
    try:
        return _quantize(config, world, path, lazy, overwrite, restart, progress and world.is_main, observe, started)
    except BaseException as e:  # the other ranks name this one when their next collective fails
        world.report_failure(e)
        raise


def _quantize(config: QuantConfig, world: World, path: Path, lazy: LazyModel, overwrite: bool, restart: bool,
              progress: bool, observe: SigmaObserver | None, started: float) -> Path:
    device = world.device
    check_model(lazy, config)
    batches = -(-config.nsamples // config.calib_batch_size)
    if batches < world.size:
        raise UsageError(f"{batches} calibration batches (--nsamples {config.nsamples} / --batch-size "
                         f"{config.calib_batch_size}) for {world.size} processes: each needs at least one; lower "
                         f"--batch-size or run fewer processes")
    text = load_text(config.calib, "calib")
    plan = make_plan(lazy, config, device, len(text))
    if plan.problem:
        raise ResourceError(plan.problem)
    stream = tokenize(AutoTokenizer.from_pretrained(path), text, config.bos)
    windows = calibration_windows(stream, config.nsamples, config.seqlen, config.seed)
    del text
    trim_host_memory()  # the tokenizer's freed buffers
    calibration = {"source": config.calib, "nsamples": config.nsamples, "seqlen": config.seqlen, "seed": config.seed,
                   "tokens_sha256": fingerprint(windows), "bos": stream.bos, "tokenizer_adds_bos": stream.adds_bos}
    settings = _settings(config, lazy.dtype)
    fp = Fingerprint.of(path, calibration["tokens_sha256"], settings)
    out = Path(config.out)

    def open_output() -> bool:  # on rank 0 only: it alone creates, clears and checks the output folder
        if _open_output(out, fp, settings, overwrite, restart, world) is None:
            return False
        short = check_disk(plan, out)
        if short:
            raise ResourceError(short)
        return True

    if not world.decide("opening the output folder", open_output):
        return out
    run = _Run(config, world, lazy, out, ResumeState(out, world), plan)
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
        "config": {k: v for k, v in config.to_dict().items() if k not in _RUN_ONLY},
        "model": {"source": str(path), "model_type": lazy.config.model_type, "blocks": len(lazy.blocks),
                  "forward_dtype": str(lazy.dtype).removeprefix("torch.")},
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
