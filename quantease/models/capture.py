"""Calibration capture: the inputs of the first decoder block, and Gram matrices of linear-layer inputs.

The first block's inputs are captured generically: a pre-hook on block 0 records every positional and keyword
argument the model passes it (hidden states, masks, position ids, rotary tables...) and stops the forward pass, so no
later block is ever needed. Later blocks are called with the same keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..errors import NumericalError

__all__ = ["BlockInputs", "capture_first_block", "run_block", "GramAccumulator", "collect_sigmas"]


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


@dataclass
class BlockInputs:
    """Calibration activations entering a block, one entry per batch, with the call's other arguments."""

    hidden: list[torch.Tensor]  # each [batch, seqlen, hidden]
    kwargs: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.hidden)

    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _move(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_first_block(
    model: torch.nn.Module, block: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str
) -> BlockInputs:
    """Run the embedding part of `model` on each batch of token ids and record what reaches `block`."""
    captured = BlockInputs([], [])

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        kwargs["use_cache"] = False
        captured.hidden.append(hidden)
        captured.kwargs.append(kwargs)
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: torch.nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs for every batch: the next block's inputs."""
    out = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        y = block(hidden, **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y
        if not torch.isfinite(y).all():
            raise NumericalError("non-finite activations (NaN/Inf) in a decoder block's output")
        out.append(y)
    return BlockInputs(out, inputs.kwargs)


class GramAccumulator:
    """Σ = (1/N) Σ_n x_n x_nᵀ over every token n seen, summed in fp64 from fp32 batch products."""

    def __init__(self, dim: int, device: torch.device | str):
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, p]
        self.sum += (x.T @ x).double()
        self.count += x.shape[0]

    def sigma(self) -> torch.Tensor:
        if not torch.isfinite(self.sum).all():  # any NaN/Inf input reaches the sum
            raise NumericalError("non-finite activations (NaN/Inf) at a linear layer's input")
        return (self.sum / max(self.count, 1)).float()


@torch.no_grad()
def collect_sigmas(
    block: torch.nn.Module, groups: list[tuple[str, ...]], inputs: BlockInputs
) -> dict[tuple[str, ...], torch.Tensor]:
    """Σ of the shared input of each group of linear modules, from one pass over the calibration batches.

    The pass stops as soon as every group has seen its input, so collecting only the attention projections'
    Σ costs a norm, not a block.
    """
    accs: dict[tuple[str, ...], GramAccumulator] = {}
    pending: set[tuple[str, ...]] = set()
    handles = []

    def make_hook(group: tuple[str, ...]):
        def hook(module, args):
            if group not in pending:  # another module of the group already took this batch's input
                return
            x = args[0]
            if group not in accs:
                accs[group] = GramAccumulator(x.shape[-1], x.device)
            accs[group].add(x)
            pending.discard(group)
            if not pending:
                raise _Stop

        return hook

    for group in groups:
        for name in group:
            handles.append(block.get_submodule(name).register_forward_pre_hook(make_hook(group)))
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            pending = set(groups)
            try:
                block(hidden, **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {g: accs[g].sigma() for g in groups}
