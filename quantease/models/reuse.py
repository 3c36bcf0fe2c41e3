"""Fewer block forwards: the outputs of a block's sub-modules, and of the linear layers inside them, are reused across
the calibration passes over one block when neither their inputs nor their weights changed in between.

True-sequential calibration runs a block once per stage, from its input until the stage's layers have seen their
inputs, and once more for its outputs. A stage changes only its own layers, so a module that ran in an earlier pass
often gets the same input and holds the same weights in a later one. In a Llama block the o pass computes q/k/v,
and the gate/up pass reuses them and computes only o; attention then ran to the end, and the down pass and the
output pass reuse its output; the down pass computes gate/up, and the output pass reuses them and computes only
down. Every linear is computed once: one block forward per block (the original block's passes with the propagated
target, whose weights never change, likewise). Nothing else changes: a reused output is the tensor the module
returned before, so every Σ is exactly what recomputing would give.

An output is reused for a batch only when (1) none of the module's parameters was replaced or modified since
(parameter identity and version counters), (2) every tensor argument equals the one it was computed from, and
(3) the module is not, and holds no module that is, having its input collected in this pass (its forward pre-hook
must run). A linear's output is dropped once the sub-module holding it has run to the end (its own output is kept
then), so the linears' outputs held at any time are those of sub-modules still in progress. `work` counts the
multiply-adds of the linears it is given (the pipeline gives the dense ones: a routed expert's token count changes
with the routing) actually computed, so a block's passes can be reported in block forwards.
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
    With `layers`, also of the linears among `linears` inside those children. Set `batch` to the index of the
    calibration batch before each call of the block, and `collecting` to the names (relative to the block) of the
    modules whose inputs the pass collects."""

    def __init__(self, block: torch.nn.Module, names: list[str], linears: list[str], layers: bool = True):
        self.block, self.names = block, names
        self.batch = 0
        self.collecting: set[str] = set()
        self.work = 0  # multiply-adds of the block's linear layers computed so far
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._linears = linears
        # linear -> the child holding it, for the linears whose outputs are reused
        self._inside = {n: c for n in linears for c in names if layers and n.startswith(c + ".")}
        self._handles: list[Any] = []

    def __enter__(self) -> "PassCache":
        for name in [*self.names, *self._inside]:
            module = self.block.get_submodule(name)
            inner = {f"{name}.{n}" if n else name for n, _ in module.named_modules()}
            module.forward = self._wrap(name, module, type(module).forward.__get__(module), inner)
        for name in self._linears:
            if name not in self.names and name not in self._inside:  # a wrapped linear counts when it computes
                self._handles.append(self.block.get_submodule(name).register_forward_hook(
                    lambda module, args, output: self._count(module, args)))  # after it ran: a pass may stop before
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in [*self.names, *self._inside]:
            del self.block.get_submodule(name).forward
        for h in self._handles:
            h.remove()
        self._entries.clear()

    def _count(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x, w = args[0], module.weight
        self.work += x.numel() // x.shape[-1] * w.numel()

    def _wrap(self, name: str, module: torch.nn.Module, forward: Any, inner: set[str]):
        held = [n for n, c in self._inside.items() if c == name]  # the linears whose outputs `module` supersedes

        def cached(*args: Any, **kwargs: Any) -> Any:
            state = tuple((p.data_ptr(), p._version) for p in module.parameters())
            key = (name, self.batch)
            entry = self._entries.get(key)
            if entry is not None and not (inner & self.collecting) and entry.state == state and \
                    _same(entry.args, args) and entry.kwargs.keys() == kwargs.keys() and \
                    all(_same(entry.kwargs[k], v) for k, v in kwargs.items()):
                return entry.output
            self._entries.pop(key, None)
            output = forward(*args, **kwargs)  # an interrupted pass (a collecting hook stops it) caches nothing
            if name in self._linears:
                self._count(module, args)
            for n in held:
                self._entries.pop((n, self.batch), None)
            self._entries[key] = _Entry(state, args, kwargs, output)
            return output

        return cached
