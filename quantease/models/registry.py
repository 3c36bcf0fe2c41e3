"""Architectures as data: where a causal LM keeps its decoder blocks and how their linear layers group.

Each entry names, relative to one decoder block, the linear modules in the order data flows through them. Modules in
one group read the same input, so they share one Gram matrix Σ and are solved together; a group is solved only after
every earlier group is quantized (true-sequential). `ffn` names the feed-forward up/gate/down projections (FFSplit).
Adding a family is adding one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModel

__all__ = ["ArchSpec", "FFNSpec", "ARCHITECTURES", "get_arch"]


@dataclass(frozen=True)
class FFNSpec:
    up: str
    down: str
    gate: str | None = None  # gated FFNs (SwiGLU/GeGLU): φ_i = act(gate_i·x)·(up_i·x)


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]  # linear names inside a block, grouped by shared input, in data-flow order
    ffn: FFNSpec | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


_LLAMA = ArchSpec(
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    ffn=FFNSpec(up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj"),
)

_OPT = ArchSpec(
    blocks="model.decoder.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    ffn=FFNSpec(up="fc1", down="fc2"),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "opt": _OPT,
}


def get_arch(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedModel(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
