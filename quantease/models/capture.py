"""Calibration capture: what each decoder block is called with, and Gram matrices of linear-layer inputs.

Block arguments are captured generically: every block is swapped for a pass-through recorder and the model runs
once per batch. The model computes embeddings, masks and rotary tables as usual and hands each recorder exactly what
the real block would get, including per-layer differences (sliding-window vs global masks, local vs global rotary
tables), without any block's weights. Block 0's hidden states are kept; later blocks get their hidden states from
the quantized previous block. Hidden states live in an `Activations` store, on the device or offloaded to the host.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..errors import NumericalError
from ..solvers.base import Target
from .activations import Activations
from .reuse import PassCache

__all__ = ["BlockInputs", "capture_block_inputs", "run_block", "GramAccumulator", "collect_grams", "reduce_grams",
           "clock"]

Call = tuple[tuple[Any, ...], dict[str, Any]]  # a block's positional arguments after the hidden states, and keywords
_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


@dataclass
class BlockInputs:
    """Calibration activations entering one block, per batch, with the block's other call arguments per batch."""

    hidden: Activations  # each [batch, seqlen, hidden]
    calls: list[Call]


def clock(device: torch.device) -> float:
    """Seconds, after the device finished its queued work (CUDA runs asynchronously): for timings that split a
    block's time into forwards, Σ accumulation and solves."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Recorder(torch.nn.Module):
    """Stands in for block `index` during capture: records its call and passes the hidden states through."""

    def __init__(self, block: torch.nn.Module, index: int, calls: list[list[Call]], hidden: Activations, last: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its meta weights stay out of the forward
        self.index, self.last = index, last
        object.__setattr__(self, "_calls", calls)
        object.__setattr__(self, "_hidden", hidden)

    def __getattr__(self, name: str) -> Any:  # model code may read block attributes (attention_type, layer_idx)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: (None if k in _CACHE_ARGS else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self._calls[self.index].append((tuple(args[1:]), kwargs))
        if self.index == 0:
            self._hidden.append(hidden)
        if self.last:
            raise _Stop
        return hidden


@torch.no_grad()
def capture_block_inputs(
    model: torch.nn.Module, blocks: torch.nn.ModuleList, batches: Iterable[torch.Tensor], hidden: Activations
) -> tuple[Activations, list[list[Call]]]:
    """Block 0's hidden states per batch (into the empty store `hidden`, on whose device the model runs), and every
    block's call arguments per batch ([block][batch])."""
    calls: list[list[Call]] = [[] for _ in blocks]
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, calls, hidden, last=i == len(originals) - 1)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(hidden.device), use_cache=False)
            except _Stop:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return hidden, calls


def _at(cache: PassCache | None, batch: int, collecting: set[str]) -> None:
    if cache is not None:
        cache.batch, cache.collecting = batch, collecting


@torch.no_grad()
def run_block(block: torch.nn.Module, inputs: BlockInputs, cache: PassCache | None = None) -> Activations:
    """The block's output hidden states for every batch, placed as its inputs are (reusing what `cache` holds)."""
    out = inputs.hidden.empty()
    for b, (hidden, (args, kwargs)) in enumerate(zip(inputs.hidden, inputs.calls)):
        _at(cache, b, set())
        y = block(hidden, *args, **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y
        if not torch.isfinite(y).all():
            raise NumericalError("non-finite activations (NaN/Inf) in a decoder block's output")
        out.append(y)
    return out


class GramAccumulator:
    """Σ = (1/N) Σ_n x_n x_nᵀ over every token n seen, summed in fp64 from fp32 batch products; with the same tokens'
    inputs in the original model (`ref`), also Δ = (1/N) Σ_n (x_fp - x)_n x_nᵀ and Σ_d = (1/N) Σ_n (x_fp - x)_n (x_fp - x)_nᵀ
    for the propagated target (solvers/base.py). Activations of any forward dtype are upcast to fp32 first; the
    fp32 product is added to the fp64 sum in place, converted element by element (no fp64 copy of the product).
    `seconds` is the time spent accumulating."""

    def __init__(self, dim: int, device: torch.device | str, paired: bool = False):
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.delta = torch.zeros_like(self.sum) if paired else None
        self.dd = torch.zeros_like(self.sum) if paired else None
        self.count = 0
        self.seconds = 0.0

    def add(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        t0 = clock(x.device)
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, p]
        self.sum += x.T @ x
        if self.delta is not None:
            dx = ref.reshape(x.shape).float() - x  # [tokens, p]; exactly 0 where the two models agree
            self.delta += dx.T @ x
            self.dd += dx.T @ dx
        self.count += x.shape[0]
        self.seconds += clock(x.device) - t0

    def sigma(self) -> torch.Tensor:
        if not torch.isfinite(self.sum).all():  # any NaN/Inf input reaches the sum
            raise NumericalError("non-finite activations (NaN/Inf) at a linear layer's input")
        return (self.sum / max(self.count, 1)).float()

    def target(self, alpha: float) -> Target | None:
        """The propagated target's statistics, or None for an unpaired accumulator."""
        if self.delta is None:
            return None
        n = max(self.count, 1)
        return Target((self.delta / n).float(), (self.dd / n).float(), alpha)


def _first_inputs(block: torch.nn.Module, groups: list[tuple[str, ...]], hidden: torch.Tensor, call: Call,
                  cache: PassCache | None = None, batch: int = 0) -> dict[tuple[str, ...], torch.Tensor]:
    """The input each group's modules read in one call of `block` (the pass stops once every group has one)."""
    seen: dict[tuple[str, ...], torch.Tensor] = {}
    _at(cache, batch, {n for g in groups for n in g})

    def make_hook(group: tuple[str, ...]):
        def hook(module, args):
            seen.setdefault(group, args[0])
            if len(seen) == len(groups):
                raise _Stop

        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make_hook(g)) for g in groups for n in g]
    try:
        block(hidden, *call[0], **call[1])
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def collect_grams(
    block: torch.nn.Module, groups: list[tuple[str, ...]], inputs: BlockInputs,
    reference: tuple[torch.nn.Module, Activations, set[tuple[str, ...]]] | None = None,
    caches: tuple[PassCache | None, PassCache | None] = (None, None),
) -> dict[tuple[str, ...], GramAccumulator]:
    """The Gram accumulator of each group's shared input, from one pass over the calibration batches.

    The pass stops as soon as every group has seen its input, so collecting only the attention projections'
    Σ costs a norm, not a block. A group that never ran (an expert no token was routed to) is absent.
    `reference` = (the original block, its input hidden states per batch, the groups to pair): for those groups the
    original block runs first on the same batch, and the accumulators also collect the propagated target's statistics
    on exactly aligned tokens. `caches` (the block's, the original block's) reuse sub-module outputs between passes.
    """
    accs: dict[tuple[str, ...], GramAccumulator] = {}
    pending: set[tuple[str, ...]] = set()
    handles = []
    refs: dict[tuple[str, ...], torch.Tensor] = {}
    paired = reference[2] if reference else set()

    def make_hook(group: tuple[str, ...]):
        def hook(module, args):
            if group not in pending:  # another module of the group already took this batch's input
                return
            x = args[0]
            if group not in accs:
                accs[group] = GramAccumulator(x.shape[-1], x.device, paired=group in paired)
            accs[group].add(x, refs.get(group))
            pending.discard(group)
            if not pending:
                raise _Stop

        return hook

    for group in groups:
        for name in group:
            handles.append(block.get_submodule(name).register_forward_pre_hook(make_hook(group)))
    try:
        for b, (hidden, (args, kwargs)) in enumerate(zip(inputs.hidden, inputs.calls)):
            if paired:
                refs = _first_inputs(reference[0], [g for g in groups if g in paired], reference[1][b], (args, kwargs),
                                     caches[1], b)
            pending = set(groups)
            _at(caches[0], b, {n for g in groups for n in g})
            try:
                block(hidden, *args, **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return accs


def reduce_grams(grams: dict[tuple[str, ...], GramAccumulator], groups: list[tuple[str, ...]], world,
                 dim: Callable[[tuple[str, ...]], int], paired: set[tuple[str, ...]], device: torch.device
                 ) -> dict[tuple[str, ...], GramAccumulator]:
    """Each group's accumulator summed over the ranks of `world` (distributed.World), in place: fp64 sums (Σ, and Δ,
    Σ_d when paired) and token counts, so every rank ends with the global Σ = Σ_ranks sum / Σ_ranks N. A group is
    present when any rank saw it; a rank that routed no token to an expert adds zeros of its input size `dim(g)`
    and count 0, so a starved expert's fallback sees the global count. One rank: `grams` unchanged."""
    if world.size == 1:
        return grams
    seen = torch.tensor([[grams[g].count if g in grams else 0, int(g in grams)] for g in groups],
                        dtype=torch.int64, device=device)  # [groups, (tokens, present)]
    world.all_reduce([seen], "the token counts")
    out = {}
    for g, (count, present) in zip(groups, seen.tolist()):
        if not present:
            continue
        acc = grams.get(g) or GramAccumulator(dim(g), device, paired=g in paired)
        world.all_reduce([t for t in (acc.sum, acc.delta, acc.dd) if t is not None], f"the Σ of {'/'.join(g)}")
        acc.count = count
        out[g] = acc
    return out
