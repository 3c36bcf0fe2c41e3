"""The memory and disk plan of a quantization run, from config.json and the safetensors headers alone.

No weight is read: the shapes come from the model's skeleton on the meta device, the dtypes and sizes from the
safetensors headers. With e the forward dtype's bytes, T = batch · seqlen tokens per batch, A = nsamples · seqlen ·
hidden · e one set of calibration hidden states and a = T · hidden · e one batch of it, the device holds

  capture   what runs the model up to block 0 (embeddings; an untied head is not loaded) + block 0's inputs (A) + 2a
  Σ pass    one block (and a copy of its original weights with target=propagated)
            + the hidden states it reads (A; 2A with the propagated target's originals, + A with --no-propagate)
            + the stage's Gram accumulators (p² fp64 each, 3p² when paired with the original's inputs)
            + the larger of one batch's forward workspace, T · e · max(3 I + 2 h, 6 h) (I: widest linear output,
              h: hidden), and of what the Gram hook holds: the batch's input T · p · e, its fp32 copy when e < 4
              (three more with the originals' inputs and their difference), the fp32 product p²
  solve     block + hidden states + the layer's Σ (Δ and Σ_d too when paired) in fp32 + W [q, p] fp32 + what the
            solver allocates (its registered `workspace`, solvers/base.py) + the stage's later accumulators; a group
            solved stacked (q/k/v, gate/up) is one problem of the layers' rows together, q their sum, plus the copy
  output    block + hidden states in and out (2A; 4A with the propagated target) + the forward workspace
Reusing outputs between a block's passes (models/reuse.py) holds, for every calibration token, the inputs and
outputs of the block's children that hold linears (attention and MLP: 4 h; OPT's fc1/fc2 more) on the device, in
every block phase, and with reuse="layers" also those of the linears computed in a pass that stops inside their
child (a Llama block's q/k/v, 2 h + 2 kv, until attention has run to the end, then gate/up, h + 2 I, until the MLP
has: the larger of the two more); when that does not fit the plan keeps the children's outputs only ("modules"),
then none ("none": more block forwards, the same results), and an offloaded run never reuses.
Offloaded (`--offload-activations`), the device keeps one batch (a) of each set instead of A, and the host keeps
them all in pinned memory. The host holds the process as it is when planning (Python, torch, the skeleton), the
offloaded hidden states and the largest host-only moment: the outer tensors read for the first shard, a block tensor
while it is read and converted, the hidden states copied off the device for the resume state, or tokenizing the
calibration text (~150 bytes per character). On the CPU, device and host are one memory. Block forwards are passes
of a block over every calibration batch (plan.passes_per_block). Disk: the checkpoint (checkpoint/native.py's
schema for every linear, other tensors as stored, copied and json files) and one resume state (A, 2A with the
propagated target), twice that while a new one replaces the old.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint.native import TOKENIZER_FILES, Dims, quantized_schema
from .config import QuantConfig
from .models.layers import matrix_shape
from .models.reader import LazyModel
from .resources import available_memory, host_available, rss
from .solvers import get_solver
from .solvers.outliers import outlier_count

__all__ = ["Plan", "Peak", "make_plan", "check_disk", "GiB"]

GiB = 2**30
_HEADROOM = 0.92  # plan to use at most this share of what is free: allocator fragmentation, CUDA context, kernels
_TOKENIZE_BYTES_PER_CHAR = 150  # peak of a fast BPE tokenizer over the whole calibration text (SmolLM2's on PTB: 141)
_JSON_PER_LAYER = 700  # quantease.json and the index per quantized linear (settings, errors, history, tensor names)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class _Layer:
    name: str
    q: int
    p: int


@dataclass(frozen=True)
class _Block:
    """What the plan needs of one decoder block (identical blocks share one)."""

    params: int  # parameters of the block
    stages: tuple[tuple[tuple[_Layer, ...], ...], ...]  # stage -> group -> layers (a group shares its input)
    widest: int  # largest output size of any linear
    other_bytes: int  # stored bytes of the tensors that are not quantized (norms, biases)
    largest_tensor: int  # elements of the block's largest tensor
    reused_width: int  # per token, the inputs and outputs the reuse cache holds of the block's reusable children
    reused_layer_width: int  # and of the linears inside them that it keeps across passes (reuse="layers")


@dataclass
class Peak:
    bytes: int
    phase: str
    parts: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    """The plan of one run (see the module docstring); every size in bytes."""

    model: str
    device: str
    dtype: str
    offload: bool
    reuse: str  # outputs reused between a block's passes (fewer forwards, more memory): "layers", "modules", "none"
    blocks: int
    batches: int
    device_peak: Peak
    host_peak: Peak
    device_free: int | None  # None: a CUDA device this machine does not have
    host_free: int
    checkpoint_bytes: int
    resume_bytes: int  # one resume state (the next block's inputs)
    resume_saves: int  # resume states written with inputs over the run
    passes_per_block: int  # block passes, each over every calibration batch
    partial_passes: int  # of those, how many stop at a layer's input
    problem: str | None = None  # why it does not fit, and the option that fixes it
    disk_free: int | None = None  # where the output goes (check_disk)

    @property
    def block_forwards(self) -> int:
        return self.passes_per_block * self.blocks

    @property
    def disk_needed(self) -> int:
        return self.checkpoint_bytes + 2 * self.resume_bytes

    @property
    def disk_written(self) -> int:
        return self.checkpoint_bytes + self.resume_saves * self.resume_bytes

    def _device_fits(self) -> bool:
        return self.device_free is None or self.device == "cpu" or \
            self.device_peak.bytes <= _HEADROOM * self.device_free

    def fits(self) -> bool:
        return self._device_fits() and self.host_peak.bytes <= _HEADROOM * self.host_free

    def shortfall(self) -> str:
        """Where the run does not fit, in one clause."""
        where, peak, free = (self.device, self.device_peak, self.device_free) if not self._device_fits() else \
            ("host RAM", self.host_peak, self.host_free)
        return (f"the run does not fit in {where}: it needs about {_gib(peak.bytes)} at {peak.phase}, "
                f"{_gib(free)} free (a plan keeps {1 - _HEADROOM:.0%} spare)")

    def to_dict(self) -> dict:
        return asdict(self) | {"block_forwards": self.block_forwards, "disk_needed": self.disk_needed,
                               "disk_written": self.disk_written}

    def text(self) -> str:
        placement = "offloaded to host memory" if self.offload else "kept on the device"
        reuse = {"layers": "sub-module and linear outputs reused between passes",
                 "modules": "sub-module outputs reused between passes (the linears' do not fit)",
                 "none": "sub-module outputs recomputed (reusing them does not fit)"}[self.reuse]
        lines = [f"plan: {self.model} ({self.blocks} blocks) on {self.device}, {self.dtype} forwards, "
                 f"calibration hidden states {placement}, {reuse}"]
        rows = [("device", self.device_peak, self.device_free)] if self.device != "cpu" else []
        rows.append(("host" if self.device != "cpu" else "host (= device)", self.host_peak, self.host_free))
        for label, peak, free in rows:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in peak.parts.items() if v)
            room = "(no such device here)" if free is None else f"of {_gib(free)} free"
            lines.append(f"  {label:<15} peak {_gib(peak.bytes)} {room}, at {peak.phase}: {parts}")
        free = "" if self.disk_free is None else f"; {_gib(self.disk_free)} free"
        lines.append(f"  {'disk':<15} checkpoint {_gib(self.checkpoint_bytes)} + resume state "
                     f"{_gib(self.resume_bytes)} (twice that while replaced){free}; written over the run "
                     f"{_gib(self.disk_written)} ({self.resume_saves} resume states)")
        lines.append(f"  {'block forwards':<15} {self.passes_per_block} passes per block ({self.partial_passes} stop at "
                     f"a layer's input) x {self.blocks} blocks = {self.block_forwards}, each over {self.batches} "
                     f"batches")
        return "\n".join(lines)


def _blocks(lazy: LazyModel, sequential: bool) -> list[_Block]:
    out = []
    for i, block in enumerate(lazy.blocks):
        stored = {n.removeprefix(lazy.block_prefix(i)): lazy.index.dtype(k).itemsize
                  for n, k in lazy.block_tensor_names(i).items()}
        stages = tuple(tuple(tuple(_Layer(n, *matrix_shape(block.get_submodule(n))) for n in group) for group in stage)
                       for stage in lazy.arch.stages(block, sequential))
        linears = {f"{l.name}.weight" for st in stages for g in st for l in g}
        params = dict(block.named_parameters())
        other = sum(params[n].numel() * stored[n] for n in stored if n not in linears)
        flow = [l for st in stages for g in st for l in g]  # data-flow order
        children = {l.name.split(".")[0] for l in flow}  # what models/reuse.py caches: the block's direct children
        width = sum(next(l.p for l in flow if l.name.split(".")[0] == c) +
                    next(l.q for l in reversed(flow) if l.name.split(".")[0] == c) for c in children)
        # Pass t collects stage t's inputs (pass len(stages): the output). A group of stage k runs first in pass
        # k + 1 and, when its child has layers in a later stage, its output (and input) is kept until the child runs
        # to the end, in the pass after the child's last stage.
        last = {c: max(k for k, st in enumerate(stages) for g in st for l in g if l.name.split(".")[0] == c)
                for c in children}
        kept = [(k, last[g[0].name.split(".")[0]], g[0].p + sum(l.q for l in g)) for k, st in enumerate(stages)
                for g in st if "." in g[0].name and not lazy.arch.is_expert(g[0].name)]
        held = max(sum(w for k, end, w in kept if k < end and k < t <= end + 1) for t in range(len(stages) + 1))
        out.append(_Block(sum(p.numel() for p in params.values()), stages,
                          max(l.q for st in stages for g in st for l in g), other,
                          max(p.numel() for p in params.values()), width, held))
    return out


def _layer_bytes(layer: _Layer, config: QuantConfig) -> int:
    """Stored bytes of one quantized linear: the native schema's tensors (outliers counted; FFSplit's heavy part
    approximated as its share of the layer at heavy_bits)."""
    spec, opts = config.grid_spec().for_columns(layer.p)[0], config.solver_options()
    act_order = getattr(opts, "act_order", getattr(opts, "gptq_act_order", False))
    static = getattr(opts, "static_groups", getattr(opts, "gptq_static_groups", True))
    structure = getattr(opts, "outlier_structure", "unstructured")
    amount = getattr(opts, "outliers", 0.0)
    count = 0 if not amount else outlier_count(amount, layer.p if structure == "column" else layer.q * layer.p)
    dims = Dims(layer.q, layer.p, spec.bits, spec.groups(layer.p), spec.sym,
                spec.independent_groups and act_order and not static, structure if amount else None, count, spec.gguf)
    size = sum(math.prod(s.shape(dims)) * s.dtype.itemsize for s in quantized_schema() if s.when(dims))
    if config.ffsplit:
        share = config.ffsplit if config.ffsplit < 1 else config.ffsplit / max(layer.q, layer.p)
        size += int(share * layer.q * layer.p * (config.heavy_bits - spec.bits) / 8)
    return size


class _Memory:
    """The device and host peaks of one setting (the module docstring's phases)."""

    def __init__(self, lazy: LazyModel, blocks: list[_Block], config: QuantConfig, cuda: bool, offload: bool,
                 reuse: str):
        self.lazy, self.blocks, self.cuda, self.offload, self.reuse = lazy, blocks, cuda, offload, reuse
        self.e = torch.empty((), dtype=lazy.dtype).element_size()
        self.h = lazy.config.hidden_size
        self.tokens_b = min(config.calib_batch_size, config.nsamples) * config.seqlen
        self.A = config.nsamples * config.seqlen * self.h * self.e
        self.a = self.tokens_b * self.h * self.e
        self.paired = config.target == "propagated"
        self.sets_in = (2 if self.paired else 1) + (0 if config.propagate else 1)
        self.tokens = config.nsamples * config.seqlen
        entry = get_solver(config.method)
        self.solver, self.options = entry, config.solver_options()

    def _acts(self, sets: int) -> int:
        return sets * (self.a if self.offload else self.A)

    def capture(self) -> Peak:
        outer = sum(self.lazy.model.get_parameter(n).numel() for n in self.lazy.capture_params()) * self.e
        return Peak(outer + self._acts(1) + 2 * self.a, "capture", {"embeddings": outer, "hidden states": self._acts(1),
                                                                     "batch": 2 * self.a})

    def block(self, i: int, b: _Block) -> Peak:
        weights = b.params * self.e * (2 if self.paired else 1)
        width = {"layers": b.reused_width + b.reused_layer_width, "modules": b.reused_width, "none": 0}[self.reuse]
        cache = self.tokens * width * self.e * (2 if self.paired else 1)
        acts = self._acts(self.sets_in) + cache
        forward = self.tokens_b * self.e * max(3 * b.widest + 2 * self.h, 6 * self.h)
        gram = 3 if self.paired else 1
        peaks = [Peak(weights + self._acts(4 if self.paired else 2) + cache + forward, f"block {i} output",
                      {"block": weights, "hidden states": self._acts(4 if self.paired else 2),
                       "reused outputs": cache, "forward": forward})]
        for stage in b.stages:
            ps = [g[0].p for g in stage]
            accs = [8 * p * p * gram for p in ps]
            p = max(ps)
            copies = (1 if self.e < 4 else 0) + (3 if self.paired else 0)
            hook = self.tokens_b * p * (self.e * (2 if self.paired else 1) + 4 * copies) + 4 * p * p
            peaks.append(Peak(weights + acts + sum(accs) + max(forward, hook), f"block {i} Σ of {stage[0][0].name}",
                              {"block": weights, "hidden states": acts - cache, "reused outputs": cache,
                               "Σ accumulators": sum(accs),
                               "forward": max(forward, hook)}))
            for k, group in enumerate(stage):
                later = sum(accs[k + 1:])
                sigma = 4 * group[0].p ** 2 * gram
                for layers in ([group] if self._stacked(group) else [[layer] for layer in group]):
                    q, p = sum(layer.q for layer in layers), layers[0].p
                    # the layers' fp32 weights, and their stacked copy when there are several
                    inputs = 4 * q * p * (2 if len(layers) > 1 else 1)
                    work = self.solver.workspace(q, p, self.options, self.paired) + inputs
                    names = "+".join(layer.name for layer in layers)
                    peaks.append(Peak(weights + acts + later + sigma + work, f"block {i} solving {names}",
                                      {"block": weights, "hidden states": acts - cache, "reused outputs": cache,
                                       "Σ": sigma + later, "solver": work}))
        return max(peaks, key=lambda pk: pk.bytes)

    def _stacked(self, group: list) -> bool:
        """Whether the pipeline solves the group's layers as one stacked problem (solvers/base.py, solve_group)."""
        return len(group) > 1 and self.solver.solve_stacked is not None and not getattr(self.options, "outliers", 0)

    def device(self) -> Peak:
        distinct = {b: i for i, b in reversed(list(enumerate(self.blocks)))}  # identical blocks: the first one
        return max([self.capture()] + [self.block(i, b) for b, i in distinct.items()], key=lambda pk: pk.bytes)

    def host(self, device_peak: Peak, baseline: int) -> Peak:
        outer_read = sum(math.prod(self.lazy.index.shape(self.lazy.checkpoint_name(n)))
                         * self.lazy.index.dtype(self.lazy.checkpoint_name(n)).itemsize for n in self.lazy.outer_params())
        load = max(b.largest_tensor for b in self.blocks) * (4 + self.e)
        if not self.cuda:  # one memory: the device phases plus what the host adds at the same moment
            first_shard = self.A + outer_read
            peak = device_peak if device_peak.bytes >= first_shard else \
                Peak(first_shard, "writing the outer shard", {"hidden states": self.A, "outer tensors": outer_read})
            return Peak(baseline + peak.bytes, peak.phase, {"process": baseline, **peak.parts})
        pinned = 2 * self.A * (2 if self.paired else 1) if self.offload else 0
        resume = 0 if self.offload else self.A * (2 if self.paired else 1)
        moments = {"outer tensors read": outer_read, "resume state copied": resume, "block tensors read": load}
        name, extra = max(moments.items(), key=lambda kv: kv[1])
        return Peak(baseline + pinned + extra, name,
                    {"process": baseline, "offloaded hidden states": pinned, name: extra})


def _passes(blocks: list[_Block], config: QuantConfig) -> tuple[int, int]:
    """Block passes per block: one per stage, each stopping at its groups' inputs, and one to the output (without
    propagation that one comes first, computing the original outputs that the next block gets); with the propagated
    target the original block also runs up to each stage's inputs and, when propagating, to its output."""
    stages = max(len(b.stages) for b in blocks)
    passes = stages + 1
    if config.target == "propagated":
        passes += stages + (1 if config.propagate else 0)
    partial = stages * (2 if config.target == "propagated" else 1)
    return passes, partial


def make_plan(lazy: LazyModel, config: QuantConfig, device: torch.device, text_chars: int = 0,
              advise: bool = True) -> Plan:
    """The plan of quantizing `lazy` with `config` on `device`; with offload_activations="auto", the hidden states
    are offloaded exactly when they do not fit on a CUDA device (never on the CPU, where host and device are one).
    A plan that does not fit has `problem`: one line naming the option that makes it fit (`advise`)."""
    blocks = _blocks(lazy, config.sequential)
    cuda = device.type == "cuda"
    device_free, host_free, baseline = available_memory(device), host_available(), rss()

    def plan(offload: bool, reuse: str) -> Plan:
        memory = _Memory(lazy, blocks, config, cuda, offload, reuse)
        dev = memory.device()
        host = memory.host(dev, baseline)
        tokenizing = baseline + _TOKENIZE_BYTES_PER_CHAR * text_chars
        if tokenizing > host.bytes:
            host = Peak(tokenizing, "tokenizing the calibration text",
                        {"process": baseline, "tokenizer": tokenizing - baseline})
        n = len(blocks)
        saves = sum(1 for i in range(n - 1) if (i + 1) % config.resume_every == 0)
        passes, partial = _passes(blocks, config)
        layers = [l for b in blocks for st in b.stages for g in st for l in g]
        checkpoint = sum(_layer_bytes(l, config) for l in layers) + sum(b.other_bytes for b in blocks) + \
            _outer_bytes(lazy) + _copied_bytes(lazy.folder) + _JSON_PER_LAYER * len(layers)
        return Plan(str(lazy.folder), str(device), str(lazy.dtype).removeprefix("torch."), offload, reuse, n,
                    math.ceil(config.nsamples / config.calib_batch_size), dev, host, device_free,
                    host_free, checkpoint, memory.A * (2 if config.target == "propagated" else 1), saves, passes,
                    partial)

    # Reused outputs (models/reuse.py) save block forwards but hold every batch's inputs and outputs of the block's
    # children (and linears) on the device: they are the first thing dropped when a run does not fit, and an
    # offloaded run (whose device cannot hold the hidden states) never keeps them.
    choices = [(False, "layers"), (False, "modules"), (False, "none"), (True, "none")]
    if config.offload_activations != "auto" or not cuda:
        choices = [c for c in choices if c[0] == (config.offload_activations == "on")]
    for offload, reuse in choices:
        result = plan(offload, reuse)
        if result.fits():
            break
    if advise and not result.fits():
        result.problem = f"{result.shortfall()}; {_fix(lazy, config, device, text_chars)}"
    return result


def _copied_bytes(folder: Path) -> int:
    """The files a checkpoint copies from the model folder (config, tokenizer)."""
    return sum((folder / n).stat().st_size for n in ["config.json", *TOKENIZER_FILES] if (folder / n).is_file())


def _outer_bytes(lazy: LazyModel) -> int:
    names = {lazy.checkpoint_name(n) for n in lazy.outer_params()}
    return sum(math.prod(lazy.index.shape(k)) * lazy.index.dtype(k).itemsize for k in names)


def _fix(lazy: LazyModel, config: QuantConfig, device: torch.device, text_chars: int) -> str:
    """The first change that fits: offloading (CUDA), a smaller batch, fewer calibration windows."""
    def fits(**change) -> bool:
        return make_plan(lazy, QuantConfig.from_dict({**config.to_dict(), **change}), device, text_chars,
                         advise=False).fits()

    if device.type == "cuda" and config.offload_activations == "off" and fits(offload_activations="on"):
        return "use --offload-activations on (or auto)"
    b = config.calib_batch_size
    while b > 1:
        b //= 2
        if fits(calib_batch_size=b):
            return f"use --batch-size {b}"
    n = config.nsamples
    while n > 1:
        n //= 2
        if fits(calib_batch_size=1, nsamples=n):
            return f"use --batch-size 1 --nsamples {n}" if config.calib_batch_size > 1 else f"use --nsamples {n}"
    return "not even one calibration window fits: use a device with more memory"


def check_disk(plan: Plan, out: str | Path) -> str | None:
    """Why the checkpoint and the resume state cannot fit where `out` goes (None when they can); records the free
    space in `plan.disk_free`."""
    folder = Path(out)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    plan.disk_free = shutil.disk_usage(folder).free
    if plan.disk_free >= plan.disk_needed:
        return None
    return (f"not enough disk space in {out}: about {_gib(plan.disk_needed)} needed (checkpoint "
            f"{_gib(plan.checkpoint_bytes)}, resume state {_gib(plan.resume_bytes)} twice), "
            f"{_gib(plan.disk_free)} free")
