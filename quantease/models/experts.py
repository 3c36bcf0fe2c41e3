"""Mixture-of-experts layers as ordinary linears: transformers' fused expert parameters split into one nn.Linear per
expert projection.

transformers stores a layer's experts as gate_up_proj [E, 2F, H] and down_proj [E, H, F]. Quantization needs each
expert's projections as separate [out, in] matrices with their own Σ, from the tokens routed to that expert, and
checkpoints (ours and the formats serving stacks load) store them per expert. `Experts` is a drop-in replacement
with the fused module's call signature that runs each expert on its routed tokens only:

    y_t = Σ_{k: e = top_k_index[t, k]}  top_k_weights[t, k] · down_e(act(gate_e(x_t)) ⊙ up_e(x_t))

so a forward pre-hook on `experts.{e}.{gate}` sees exactly expert e's tokens. An expert no token reached is never
called, and its hook never fires.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import ArchSpec, ExpertsSpec

__all__ = ["Experts", "unfuse_experts"]


class Expert(nn.Module):
    """One expert's gated FFN, its linears named as in the checkpoint."""

    def __init__(self, spec: ExpertsSpec, hidden: int, inter: int, act: nn.Module, like: torch.Tensor):
        super().__init__()
        self.spec = spec
        make = lambda i, o: nn.Linear(i, o, bias=False, device=like.device, dtype=like.dtype)
        self.add_module(spec.gate, make(hidden, inter))
        self.add_module(spec.up, make(hidden, inter))
        self.add_module(spec.down, make(inter, hidden))
        object.__setattr__(self, "act", act)  # shared with the other experts; holds no weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in (self.spec.gate, self.spec.up, self.spec.down))
        return down(self.act(gate(x)) * up(x))


class Experts(nn.Module):
    """forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], as the fused module's."""

    def __init__(self, fused: nn.Module, spec: ExpertsSpec):
        super().__init__()
        n, two_inter, hidden = fused.gate_up_proj.shape
        for e in range(n):
            self.add_module(str(e), Expert(spec, hidden, two_inter // 2, fused.act_fn, fused.gate_up_proj))

    def __len__(self) -> int:
        return len(self._modules)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.children()):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, arch: ArchSpec) -> None:
    """Replace every block's fused experts module by per-expert linears (on the fused module's device and dtype)."""
    spec = arch.experts
    if spec is None:
        return
    parent_path, _, child = spec.path.rpartition(".")
    for block in model.get_submodule(arch.blocks):
        parent = block.get_submodule(parent_path) if parent_path else block
        fused = getattr(parent, child, None)
        if fused is not None and hasattr(fused, "gate_up_proj"):
            setattr(parent, child, Experts(fused, spec))
