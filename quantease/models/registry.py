"""Architectures as data: where a causal LM keeps its decoder blocks and how their linear layers group.

Each entry names, relative to one decoder block, the linear modules in the order data flows through them. Modules in
one group read the same input, so they share one Gram matrix Σ and are solved together; a group is solved only after
every earlier group is quantized (true-sequential). `ffn` names the feed-forward up/gate/down projections (FFSplit).
Mixture-of-experts blocks add an `ExpertsSpec`: transformers fuses a layer's experts into 3-D parameters, and
models/experts.py splits them back into one linear per expert projection, so every expert is solved on the tokens
routed to it. Adding a family is adding one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedModel

__all__ = ["ArchSpec", "ExpertsSpec", "FFNSpec", "ARCHITECTURES", "get_arch"]

Group = tuple[str, ...]


@dataclass(frozen=True)
class FFNSpec:
    up: str
    down: str
    gate: str | None = None  # gated FFNs (SwiGLU/GeGLU): φ_i = act(gate_i·x)·(up_i·x)
    fused_gate_up: bool = False  # `up` holds [gate; up] stacked by rows (Phi-3)


@dataclass(frozen=True)
class ExpertsSpec:
    """Routed experts, fused by transformers into gate_up_proj [E, 2F, H] and down_proj [E, H, F] under `path`; each
    expert's projections are named as in the checkpoint: `{path}.{e}.{gate|up|down}`."""

    path: str
    gate: str
    up: str
    down: str


def _has(block: torch.nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    groups: tuple[Group, ...]  # linear names inside a block, grouped by shared input, in data-flow order
    ffn: FFNSpec | None = None
    experts: ExpertsSpec | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        """The dense (non-expert) linears a block may have."""
        return tuple(name for group in self.groups for name in group)

    def stages(self, block: torch.nn.Module, sequential: bool = True) -> list[list[Group]]:
        """The groups of this block's linears in solve order: a stage's Σ come from one calibration pass made after
        every earlier stage is quantized (one stage in all when not sequential). Groups the block lacks (the dense
        layers of a MoE model) are skipped; routed experts add two stages: every expert's gate/up (one Σ per expert,
        from its routed tokens), then every expert's down."""
        stages = [[g] for g in self.groups if all(_has(block, n) for n in g)]
        e = self.experts
        if e is not None and _has(block, e.path):
            n = len(block.get_submodule(e.path))
            stages += [[(f"{e.path}.{i}.{e.gate}", f"{e.path}.{i}.{e.up}") for i in range(n)],
                       [(f"{e.path}.{i}.{e.down}",) for i in range(n)]]
        return stages if sequential else [[g for stage in stages for g in stage]]

    def block_linears(self, block: torch.nn.Module) -> list[str]:
        return [name for stage in self.stages(block) for group in stage for name in group]

    def is_expert(self, name: str) -> bool:
        return self.experts is not None and name.startswith(self.experts.path + ".")


def _family(blocks: str, attn: tuple[str, ...], out: str, up: tuple[str, ...], down: str,
            ffn: FFNSpec | None) -> ArchSpec:
    """The common decoder-block shape: attention projections, output projection, FFN input(s), FFN output."""
    return ArchSpec(blocks=blocks, groups=(attn, (out,), up, (down,)), ffn=ffn)


# Llama and every family that copied its block: separate q/k/v, o, gated FFN.
_LLAMA = _family("model.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                 ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                 FFNSpec(up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj"))
# Fused projections: one qkv matrix and one [gate; up] matrix.
_PHI3 = _family("model.layers", ("self_attn.qkv_proj",), "self_attn.o_proj", ("mlp.gate_up_proj",), "mlp.down_proj",
                FFNSpec(up="mlp.gate_up_proj", down="mlp.down_proj", fused_gate_up=True))
_OPT = _family("model.decoder.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "self_attn.out_proj", ("fc1",), "fc2", FFNSpec(up="fc1", down="fc2"))
# BLOOM and Falcon name their layers alike (Falcon's MLP may read the attention's input: still a separate group).
_BLOOM = _family("transformer.h", ("self_attention.query_key_value",), "self_attention.dense",
                 ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", FFNSpec(up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h"))
_NEOX = _family("gpt_neox.layers", ("attention.query_key_value",), "attention.dense", ("mlp.dense_h_to_4h",),
                "mlp.dense_4h_to_h", FFNSpec(up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h"))
# GPT-2's Conv1D layers store weights transposed; models/layers.py hands solvers [out, in].
_GPT2 = _family("transformer.h", ("attn.c_attn",), "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj",
                FFNSpec(up="mlp.c_fc", down="mlp.c_proj"))

# Mixture of experts: attention as Llama's, a router kept in full precision, routed experts (Mixtral names them
# w1/w3/w2); Qwen-MoE adds an always-on shared expert, and its dense layers (mlp_only_layers) keep a Llama MLP.
_ATTN = _LLAMA.groups[:2]
_MIXTRAL = ArchSpec("model.layers", _ATTN, experts=ExpertsSpec("mlp.experts", gate="w1", up="w3", down="w2"))
_QWEN_MOE = ArchSpec("model.layers", _LLAMA.groups + (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                                                      ("mlp.shared_expert.down_proj",)),
                     experts=ExpertsSpec("mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"))

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "phi3": _PHI3,
    "opt": _OPT,
    "bloom": _BLOOM,
    "falcon": _BLOOM,
    "gpt_neox": _NEOX,
    "gpt2": _GPT2,
    "mixtral": _MIXTRAL,
    "qwen2_moe": _QWEN_MOE,
    "qwen3_moe": _QWEN_MOE,
}


def get_arch(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedModel(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
