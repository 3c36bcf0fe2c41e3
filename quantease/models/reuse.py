"""Fewer block forwards: the outputs of a block's sub-modules are reused across the calibration passes over one
block when neither their inputs nor their weights changed in between.

True-sequential calibration runs a block once per stage, from its input until the stage's layers have seen their
inputs, and once more for its outputs. A stage changes only its own layers, so a sub-module that ran to the end
in an earlier pass often gets the same input and holds the same weights in a later one: in a Llama block the
attention module runs to the end (with q/k/v/o quantized) in the gate/up stage, and the down stage and the output
pass reuse its output instead of recomputing attention. Nothing else changes: a reused output is the tensor the
module returned before, so every Σ is exactly what recomputing would give.

A sub-module's output is reused for a batch only when (1) none of its parameters was replaced or modified since
(parameter identity and version counters), (2) every tensor argument equals the one it was computed from, and
(3) no module inside it is having its input collected in this pass (its forward pre-hook must run). `work` counts
the multiply-adds of the linears it is given (the pipeline gives the dense ones: a routed expert's token count
changes with the routing) actually computed, so a block's passes can be reported in block forwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PassCache"]


@dataclass
class _Entry:
    state: tuple[tuple[int, int], ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class PassCache:
    """Reuse of the outputs of `block`'s children `names` over its passes (module docstring); a context manager.
    Set `batch` to the index of the calibration batch before each call of the block, and `collecting` to the names
    (relative to the block) of the modules whose inputs the pass collects."""

    def __init__(self, block: torch.nn.Module, names: list[str], linears: list[str]):
        self.block, self.names = block, names
        self.batch = 0
        self.collecting: set[str] = set()
        self.work = 0  # multiply-adds of the block's linear layers computed so far
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._linears = linears
        self._handles: list[Any] = []

    def __enter__(self) -> "PassCache":
        for name in self.names:
            child = self.block.get_submodule(name)
            inner = {f"{name}.{n}" if n else name for n, _ in child.named_modules()}
            child.forward = self._wrap(name, child, type(child).forward.__get__(child), inner)
        for name in self._linears:
            module = self.block.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._count))  # after it ran: a pass may stop before
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.names:
            del self.block.get_submodule(name).forward
        for h in self._handles:
            h.remove()
        self._entries.clear()

    def _count(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x, w = args[0], module.weight
        self.work += x.numel() // x.shape[-1] * w.numel()

    def _wrap(self, name: str, child: torch.nn.Module, forward: Any, inner: set[str]):
        def cached(*args: Any, **kwargs: Any) -> Any:
            state = tuple((p.data_ptr(), p._version) for p in child.parameters())
            key = (name, self.batch)
            entry = self._entries.get(key)
            if entry is not None and not (inner & self.collecting) and entry.state == state and \
                    _same(entry.args, args) and entry.kwargs.keys() == kwargs.keys() and \
                    all(_same(entry.kwargs[k], v) for k, v in kwargs.items()):
                return entry.output
            self._entries.pop(key, None)
            output = forward(*args, **kwargs)  # an interrupted pass (a collecting hook stops it) caches nothing
            self._entries[key] = _Entry(state, args, kwargs, output)
            return output

        return cached
