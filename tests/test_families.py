"""Every supported family: a tiny random model through the whole pipeline with every solver, at 8 and 3 bits."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantease.api import QuantConfig, load, quantize
from quantease.models import reader
from quantease.models.registry import ARCHITECTURES, get_arch
from quantease.solvers import solver_names

from conftest import save_tiny_model

H, F, L, HEADS = 64, 128, 2, 4
SHAPE = dict(hidden_size=H, intermediate_size=F, num_hidden_layers=L, num_attention_heads=HEADS,
             max_position_embeddings=256)
GQA = dict(SHAPE, num_key_value_heads=2)
SLIDING = dict(GQA, head_dim=16, sliding_window=16)  # shorter than the test sequences: masks differ per layer
E = 4  # routed experts, 2 per token
MOE = dict(GQA, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=32)
CONFIGS = {
    "llama": lambda v: T.LlamaConfig(vocab_size=v, **GQA),
    "mistral": lambda v: T.MistralConfig(vocab_size=v, **GQA),
    "qwen2": lambda v: T.Qwen2Config(vocab_size=v, **GQA),
    "qwen3": lambda v: T.Qwen3Config(vocab_size=v, head_dim=16, **GQA),
    "gemma": lambda v: T.GemmaConfig(vocab_size=v, head_dim=16, **GQA),
    "gemma2": lambda v: T.Gemma2Config(vocab_size=v, layer_types=["sliding_attention", "full_attention"], **SLIDING),
    "gemma3_text": lambda v: T.Gemma3TextConfig(vocab_size=v, layer_types=["sliding_attention", "full_attention"],
                                                **SLIDING),
    "phi3": lambda v: T.Phi3Config(vocab_size=v, pad_token_id=0, **GQA),
    "opt": lambda v: T.OPTConfig(vocab_size=v, hidden_size=H, ffn_dim=F, num_hidden_layers=L, num_attention_heads=HEADS,
                                 max_position_embeddings=256, word_embed_proj_dim=H),
    "bloom": lambda v: T.BloomConfig(vocab_size=v, hidden_size=H, n_layer=L, n_head=HEADS),
    "falcon": lambda v: T.FalconConfig(vocab_size=v, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS),
    "gpt_neox": lambda v: T.GPTNeoXConfig(vocab_size=v, **SHAPE),
    "gpt2": lambda v: T.GPT2Config(vocab_size=v, n_embd=H, n_layer=L, n_head=HEADS, n_positions=256),
    "mixtral": lambda v: T.MixtralConfig(vocab_size=v, num_local_experts=E, num_experts_per_tok=2, **GQA),
    # block 0 is a dense MLP (mlp_only_layers), block 1 routed experts plus a shared expert
    "qwen2_moe": lambda v: T.Qwen2MoeConfig(vocab_size=v, shared_expert_intermediate_size=F, mlp_only_layers=[0],
                                            **MOE),
    "qwen3_moe": lambda v: T.Qwen3MoeConfig(vocab_size=v, head_dim=16, **MOE),
}
# Quantized linears per model: attention (4) + FFN (3) per dense block; MoE blocks have 3 per routed expert
LINEARS = {"mixtral": L * (4 + 3 * E), "qwen2_moe": (4 + 3) + (4 + 3 + 3 * E), "qwen3_moe": L * (4 + 3 * E)}


def test_every_registered_family_is_tested():
    assert set(CONFIGS) == set(ARCHITECTURES)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family_model(request, tokenizer_dir, tmp_path_factory):
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    path = save_tiny_model(CONFIGS[request.param](vocab), tokenizer_dir, tmp_path_factory.mktemp(request.param))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return path, model.config.model_type, ids, logits


@pytest.fixture
def resident_blocks(monkeypatch):
    """Tracks how many decoder blocks hold real weights at once, across every LazyModel."""
    state = {"now": 0, "peak": 0}
    load, unload = reader.LazyModel.load_block, reader.LazyModel.unload_block

    def counting_load(self, i, device):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        return load(self, i, device)

    def counting_unload(self, i):
        state["now"] -= 1
        return unload(self, i)

    monkeypatch.setattr(reader.LazyModel, "load_block", counting_load)
    monkeypatch.setattr(reader.LazyModel, "unload_block", counting_unload)
    return state


@pytest.mark.parametrize("method", solver_names())
def test_family_quantizes_and_reloads(family_model, method, calib_file, tmp_path, resident_blocks):
    path, model_type, ids, reference = family_model
    errors = {}
    for bits in (8, 3):
        out = quantize(QuantConfig(model=str(path), out=str(tmp_path / f"w{bits}"), method=method, bits=bits,
                                   group_size=32, calib=str(calib_file), nsamples=4, seqlen=64, device="cpu"),
                       progress=False)
        model, _, info = load(out, packed=True)  # the packed QuantLinear path, for every family
        assert len(info["layers"]) == LINEARS.get(model_type, L * len(get_arch(model_type).linears))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        errors[bits] = float((logits - reference).norm() / (reference - reference.mean(-1, keepdim=True)).norm())
    assert resident_blocks["peak"] == 1 and resident_blocks["now"] == 0
    assert errors[8] < 0.02, errors
    assert errors[3] > errors[8]


def test_reusing_sub_module_outputs_leaves_every_sigma_unchanged(family_model, calib_file, tmp_path, monkeypatch):
    """Every Σ (and the propagated target's statistics, through the codes they give) is the same with the outputs
    of unchanged sub-modules reused between passes as when every pass recomputes them; the passes cost fewer
    block forwards."""
    from quantease import pipeline

    path = family_model[0]
    runs = {}
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(pipeline, "_reusable", lambda block, linears: [])
        for target in ("layer", "propagated"):
            seen: dict[tuple[int, str], torch.Tensor] = {}
            out = quantize(QuantConfig(model=str(path), out=str(tmp_path / f"{reuse}-{target}"), method="gptq",
                                       bits=4, calib=str(calib_file), nsamples=4, seqlen=64, device="cpu",
                                       target=target), progress=False,
                           observe=lambda b, n, s: seen.__setitem__((b, n), s))
            runs[reuse, target] = seen, json.loads((out / "run.json").read_text())["block_forwards"], \
                {k: v for f in sorted(out.glob("model-block-*.safetensors")) for k, v in load_file(f).items()}
    for target in ("layer", "propagated"):
        (s1, f1, t1), (s0, f0, t0) = runs[True, target], runs[False, target]
        assert s1.keys() == s0.keys() and all(torch.equal(s1[k], s0[k]) for k in s1)
        assert t1.keys() == t0.keys() and all(torch.equal(t1[k], t0[k]) for k in t1)
        assert all(a <= b for a, b in zip(f1, f0)) and sum(f1) < sum(f0), (f1, f0)


@pytest.mark.parametrize("reuse", ["layers", "modules", "none"])
def test_block_forwards_count_what_the_passes_compute(tiny_llama, calib_file, tmp_path, monkeypatch, reuse):
    """A Llama block's true-sequential passes, in multiply-adds of its linears: the q/k/v pass stops at q's input,
    the o pass computes q/k/v, the gate/up pass attention (q/k/v/o), the down pass gate/up (attention reused
    when unchanged, else recomputed), and the output pass the whole MLP (and attention when not reused). A pass
    stopped at a layer's input has not computed that layer. Reusing the linears' outputs too, the gate/up pass
    computes only o and the output pass only down: every linear once, one block forward."""
    from quantease import pipeline
    from quantease.models.reuse import PassCache

    if reuse == "none":
        monkeypatch.setattr(pipeline, "_reusable", lambda block, linears: [])
    if reuse == "modules":
        monkeypatch.setattr(pipeline, "PassCache", lambda *args, layers: PassCache(*args, layers=False))
    out = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / "q"), method="rtn", bits=4,
                               calib=str(calib_file), nsamples=4, seqlen=64, device="cpu"), progress=False)
    cfg = T.AutoConfig.from_pretrained(tiny_llama)
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * getattr(cfg, "head_dim", h // cfg.num_attention_heads)
    qkv, o, gate_up, down = h * (h + 2 * kv), h * h, 2 * h * i, i * h
    attention = qkv + o
    work = {"layers": qkv + o + gate_up + down,
            "modules": qkv + attention + gate_up + (gate_up + down),
            "none": qkv + attention + gate_up + (gate_up + down) + 2 * attention}[reuse]
    expected = work / (attention + gate_up + down)
    assert json.loads((out / "run.json").read_text())["block_forwards"] == [round(expected, 3)] * cfg.num_hidden_layers
