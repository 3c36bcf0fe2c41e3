"""GGUF grids and the GGUF export.

Exactness is judged by gguf-py's own dequantizers (gguf.quants.dequantize, the Python reference of llama.cpp's
formats that transformers also uses) applied to the blocks we write, never by an inverse of our packer; the scales of
the 32-element types are compared with gguf-py's reference quantizers; the file is read back with gguf's GGUFReader
and with transformers' GGUF loader.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from solver_reference import make_problem

from quantease.api import QuantConfig, evaluate_perplexity, quantize
from quantease.checkpoint import gguf as gguf_export
from quantease.checkpoint.export import export_checkpoint
from quantease.checkpoint.model_card import card_text
from quantease.checkpoint.native import dequantize_tensors, encode
from quantease.checkpoint.reload import load_quantized
from quantease.cli import main
from quantease.errors import CheckpointError, UsageError
from quantease.solvers import get_solver
from quantease.solvers.gguf_grid import GGUF_TYPES

CAL = dict(nsamples=2, seqlen=32, device="cpu")
QTYPE = {name: gguf.GGMLQuantizationType[name.upper()] for name in GGUF_TYPES}


def _meta(qw, spec) -> dict:
    q, p = qw.shape
    return {"out_features": q, "in_features": p, "bits": spec.bits, "group_size": spec.group_size,
            "groups": int(qw.grid.scale.shape[1]), "sym": spec.sym, "gguf": spec.gguf}


# ---- grids: every solver's Ŵ is exactly what gguf decodes -----------------------------------------------------------

@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_every_solver_weight_decodes_exactly(name, one_thread):
    """RTN, GPTQ (dynamic groups where a type's blocks are independent) and QuantEase on each type's grid: the
    native checkpoint's tensors reload to the solver's Ŵ bit for bit, and the GGUF blocks made from them decode, by
    gguf's dequantizer, to the same bits. The solvers still order as they should on these grids."""
    W, S, _ = make_problem(16, 512, seed=3)
    spec = GGUF_TYPES[name].spec()
    losses = {}
    for method in ("rtn", "gptq", "quantease"):
        res = get_solver(method).solve(W, S, spec)
        W_hat = res.weight.dequantize()
        tensors, meta = encode(res.weight), _meta(res.weight, spec)
        assert torch.equal(dequantize_tensors(tensors, meta), W_hat), method
        blocks = gguf_export.layer_blocks(tensors, meta, name)
        t = GGUF_TYPES[name]
        assert blocks.shape == (16, 512 // t.block * gguf.GGML_QUANT_SIZES[QTYPE[name]][1])
        assert np.array_equal(gguf.quants.dequantize(blocks, QTYPE[name]), W_hat.numpy()), method
        losses[method] = res.loss
    assert losses["quantease"] <= losses["gptq"] < losses["rtn"]


@pytest.mark.parametrize("name", ["q4_0", "q3_k", "q6_k"])
def test_relaxed_sweeps_on_signed_scales(name, one_thread):
    """llama.cpp's fits of the symmetric types give about half the blocks a negative scale; QuantEase's relaxed
    sweeps must clamp to the grid's range with its ends swapped there, so the rounded sweeps after them improve on
    the RTN start (a range collapsed to one end would start them far above it)."""
    W, S, _ = make_problem(16, 512, seed=3)
    spec = GGUF_TYPES[name].spec()
    rtn = get_solver("rtn").solve(W, S, spec)
    assert (rtn.weight.grid.scale < 0).any()
    qe = get_solver("quantease")
    res = qe.solve(W, S, spec, qe.make_options({"init": "w", "relax_sweeps": 2}))
    assert res.history[1] < res.history[0] and res.loss < rtn.loss


def test_float_offset_is_not_an_integer_zero_point():
    """Q4_1's grid is d·c + m with m an arbitrary fp16 number: the fitted m are not multiples of d (an integer zero
    point could not hold them), and Ŵ still decodes exactly."""
    W, S, _ = make_problem(8, 256, seed=1)
    res = get_solver("rtn").solve(W, S, GGUF_TYPES["q4_1"].spec())
    z = res.weight.grid.offset / res.weight.grid.scale  # o / d
    assert (z - z.round()).abs().max() > 0.1


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0", "q4_1", "q5_1"])
def test_32_element_fits_are_llama_cpps(name):
    """The block scales (and minimums) are exactly those of gguf-py's reference quantizer (llama.cpp's
    quantize_row_*_ref), and our codes are the nearest points of that grid, so no weight is farther from its
    quantized value than in the reference's file (which picks codes with the unrounded fp32 scale)."""
    W = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 0.05
    res = get_solver("rtn").solve(W, None, GGUF_TYPES[name].spec())
    ref = gguf.quants.quantize(W.numpy(), QTYPE[name])
    ref_blocks = ref.reshape(-1, gguf.GGML_QUANT_SIZES[QTYPE[name]][1])
    d_ref = ref_blocks[:, :2].copy().view(np.float16).ravel()
    assert np.array_equal(res.weight.grid.scale.half().numpy().ravel(), d_ref)
    if GGUF_TYPES[name].has_min:
        m_ref = ref_blocks[:, 2:4].copy().view(np.float16).ravel()
        assert np.array_equal((-res.weight.grid.offset).half().numpy().ravel(), m_ref)
    ours = (res.weight.dequantize().numpy() - W.numpy()).__abs__()
    theirs = np.abs(gguf.quants.dequantize(ref, QTYPE[name]) - W.numpy())
    assert (ours <= theirs).all()


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q4_1", "q5_1", "q4_k", "q6_k"])
def test_mse_clip_fits(name):
    """clip="mse": the 32-element types search shrunk ranges, the unshrunk one among them, so their Σ_jj-weighted
    rounding error is never above min-max's; the K-quants weight their fits by diag Σ. Both stay exact."""
    from dataclasses import replace

    from quantease.solvers.grid import fit_grid

    W, S, _ = make_problem(16, 512, seed=5)
    d = torch.diagonal(S)
    spec = GGUF_TYPES[name].spec()
    errors = {}
    for clip in ("minmax", "mse"):
        grid = fit_grid(W, replace(spec, clip=clip), d)
        W_hat = grid.dequantize(grid.quantize(W))
        errors[clip] = float((((W_hat - W) ** 2) * d).sum())
        res = get_solver("rtn").solve(W, S, replace(spec, clip=clip))
        blocks = gguf_export.layer_blocks(encode(res.weight), _meta(res.weight, spec), name)
        assert np.array_equal(gguf.quants.dequantize(blocks, QTYPE[name]), res.weight.dequantize().numpy())
    if GGUF_TYPES[name].kind != "k":
        assert errors["mse"] <= errors["minmax"]


def test_k_quant_rows_fall_back_as_llama_cpp():
    spec = GGUF_TYPES["q4_k"].spec()
    assert spec.for_columns(1536) == (spec, None)
    fb, note = spec.for_columns(576)
    assert fb.gguf == "q5_0" and "576 inputs take gguf:q5_0" in note
    assert GGUF_TYPES["q6_k"].spec().for_columns(64)[0].gguf == "q8_0"
    assert GGUF_TYPES["q5_k"].spec().for_columns(64)[0].gguf == "q5_1"
    assert GGUF_TYPES["q2_k"].spec().for_columns(64)[0].gguf == "q4_0"  # llama.cpp: IQ4_NL, not an affine grid
    with pytest.raises(ValueError, match="multiple of 32"):
        spec.for_columns(48)


# ---- settings ---------------------------------------------------------------------------------------------------------

def test_grid_setting_implies_bits_and_is_saved_only_when_set():
    assert "grid" not in QuantConfig().to_dict()  # checkpoints made without --grid keep their quantease.json
    c = QuantConfig(grid="gguf:q8_0")
    assert (c.bits, c.group_size, c.sym) == (8, 32, True) and c.to_dict()["grid"] == "gguf:q8_0"
    assert QuantConfig.from_dict(c.to_dict()).grid_spec() == c.grid_spec()
    with pytest.raises(UsageError, match="conflicts with bits=3"):
        QuantConfig(grid="gguf:q4_k", bits=3)
    with pytest.raises(UsageError, match="gguf:TYPE"):
        QuantConfig(grid="gguf:q9_k")
    with pytest.raises(UsageError, match="--ffsplit"):
        QuantConfig(grid="gguf:q4_k", ffsplit=0.02)


def test_cli_refuses_conflicting_bits(tiny_llama, calib_file, tmp_path):
    args = ["quantize", str(tiny_llama), "--calib", str(calib_file), "--out", str(tmp_path / "q"), "--quiet"]
    res = CliRunner().invoke(main, [*args, "--grid", "gguf:q4_k", "--bits", "4", "--group-size", "64"])
    assert res.exit_code == 2 and "conflicts with group_size=64" in res.output
    assert not (tmp_path / "q").exists()


# ---- the GGUF file --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_llama(tokenizer_dir, tmp_path_factory):
    """A tiny Llama whose attention and gate/up rows (64) are shorter than a K-quant super-block and whose down
    projection rows (256) are one; grouped-query attention (4 heads, 2 KV heads), untied head."""
    from conftest import save_tiny_model
    from transformers import AutoTokenizer, LlamaConfig

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False)
    return save_tiny_model(config, tokenizer_dir, tmp_path_factory.mktemp("gguf-llama"))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's converter permute (reshape(heads, 2, r/heads/2).swapaxes(1, 2)), as transformers'
    GGUF loader undoes it."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _gguf_weights(path, config) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of the file dequantized by gguf, q/k rows put back in Hugging Face order, and its type."""
    reader = gguf.GGUFReader(path)
    out, types = {}, {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name:
            w = _unpermute(w, config.num_attention_heads)
        elif ".attn_k." in t.name:
            w = _unpermute(w, config.num_key_value_heads)
        out[t.name], types[t.name] = w, t.tensor_type.name
    return out, types


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("grid,method", [("gguf:q4_0", "quantease"), ("gguf:q4_1", "rtn"), ("gguf:q5_1", "gptq"),
                                         ("gguf:q8_0", "rtn"), ("gguf:q4_k", "quantease"), ("gguf:q6_k", "gptq"),
                                         ("gguf:q2_k", "quantease"), ("gguf:q3_k", "rtn"), ("gguf:q5_k", "gptq"),
                                         ("", "quantease")])
def test_gguf_file_holds_our_weights(gguf_llama, calib_file, tmp_path, grid, method):
    """Every tensor of the file, dequantized by gguf, is our reload's weight (q/k after undoing the permutation);
    K-quant rows of 64 are stored as llama.cpp's fallback type; transformers loads the file (gguf_file=) and gives
    our reload's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"grid": grid} if grid else {"bits": 4, "group_size": 32, "sym": True}
    src = quantize(QuantConfig(model=str(gguf_llama), out=str(tmp_path / "q"), method=method, calib=str(calib_file),
                               **extra, **CAL), progress=False)
    path = export_checkpoint(src, tmp_path / "m.gguf", "gguf")
    config = AutoConfig.from_pretrained(gguf_llama)
    weights, types = _gguf_weights(path, config)
    ours, info = load_quantized(src, dense=True)
    state = {k: v.numpy() for k, v in ours.state_dict().items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    assert len(weights) == len(state)
    for hf_name, value in state.items():
        assert np.array_equal(weights[names.get_name(hf_name, try_suffixes=(".weight",))], value), hf_name
    t = grid.removeprefix("gguf:") or "q4_0"
    kind = GGUF_TYPES[t]
    assert types["blk.0.ffn_down.weight"] == t.upper()
    assert types["blk.0.attn_q.weight"] == (kind.fallback or t).upper()
    assert types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "F32"  # random fp32: no smaller
    if kind.fallback:
        assert any("needs rows of 256" in n for n in info["summary"]["fallbacks"])
        assert info["layers"]["model.layers.0.self_attn.q_proj"]["gguf"] == kind.fallback
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=0, atol=1e-3)


def test_gguf_metadata_and_tokenizer(gguf_llama, tokenizer_dir, calib_file, tmp_path):
    """llama.cpp's keys for a Llama, a byte-level BPE vocabulary that transformers rebuilds into the same
    tokenization, and a model card beside the file."""
    from transformers import AutoTokenizer

    src = quantize(QuantConfig(model=str(gguf_llama), out=str(tmp_path / "q"), grid="gguf:q4_k", method="rtn",
                               calib=str(calib_file), **CAL), progress=False)
    path = export_checkpoint(src, tmp_path / "m.gguf", "gguf")
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_S
    assert _field(reader, "llama.block_count") == 2 and _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.rope.dimension_count") == 16 and _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    ours = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(_field(reader, "tokenizer.ggml.tokens")) == len(ours)
    assert _field(reader, "tokenizer.ggml.eos_token_id") == ours.eos_token_id
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = calib_file.read_text()[:2000]
    assert theirs(text).input_ids == ours(text).input_ids
    card = ModelCard.load(tmp_path / "m.md")
    assert card.data.base_model_relation == "quantized" and "gguf" in card.data.tags
    assert "m.gguf" in card.text and "gguf:q4_k" in card.text


def test_qwen2_tied_embeddings_and_biases(tokenizer_dir, calib_file, tmp_path):
    """qwen2: no q/k permutation, q/k/v biases kept in F32, tied embeddings leave out output.weight."""
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)),
                         max_position_embeddings=256, tie_word_embeddings=True)
    model = save_tiny_model(config, tokenizer_dir, tmp_path / "qwen2")
    src = quantize(QuantConfig(model=str(model), out=str(tmp_path / "q"), grid="gguf:q8_0", calib=str(calib_file),
                               **CAL), progress=False)
    path = export_checkpoint(src, tmp_path / "m.gguf", "gguf")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in names and "blk.0.attn_q.bias" in names
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    torch.testing.assert_close(_logits(theirs), _logits(load_quantized(src)[0]), rtol=0, atol=1e-3)


# ---- refusals and atomicity -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def made(gguf_llama, calib_file, tmp_path_factory):
    cache = {}

    def make(**settings):
        key = json.dumps(settings, sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("src") / "q"
            cache[key] = quantize(QuantConfig(model=str(gguf_llama), out=str(out), calib=str(calib_file), **CAL,
                                              **settings), progress=False)
        return cache[key]
    return make


@pytest.mark.parametrize("settings,match", [
    (dict(bits=4, group_size=32), "integer zero points have no GGUF type.*--grid gguf"),
    (dict(bits=3, group_size=32, sym=True), "4/5/8 bits with groups of 32"),
    (dict(bits=4, group_size=-1, sym=True), "4/5/8 bits with groups of 32"),
    (dict(bits=4, group_size=32, sym=True, method="gptq", method_options={"act_order": True, "static_groups": False}),
     "static_groups"),
])
def test_refuses_grids_without_an_exact_type(made, tmp_path, settings, match):
    with pytest.raises(UsageError, match=match):
        export_checkpoint(made(**settings), tmp_path / "m.gguf", "gguf")
    assert list(tmp_path.iterdir()) == []


def test_refuses_other_architectures_formats_and_names(tokenizer_dir, calib_file, made, tmp_path):
    from conftest import save_tiny_model, tiny_config
    from transformers import AutoTokenizer

    with pytest.raises(UsageError, match="ending in .gguf"):
        export_checkpoint(made(grid="gguf:q4_0"), tmp_path / "m", "gguf")
    with pytest.raises(UsageError, match="use --format gguf"):
        export_checkpoint(made(grid="gguf:q4_0"), tmp_path / "ct", "compressed-tensors")
    opt = save_tiny_model(tiny_config("opt", len(AutoTokenizer.from_pretrained(tokenizer_dir))), tokenizer_dir,
                          tmp_path / "opt")
    src = quantize(QuantConfig(model=str(opt), out=str(tmp_path / "q"), grid="gguf:q4_0", calib=str(calib_file),
                               **CAL), progress=False)
    with pytest.raises(UsageError, match="GGUF export supports llama, mistral, qwen2"):
        export_checkpoint(src, tmp_path / "m.gguf", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt", "q"]


def test_failed_export_leaves_nothing_and_keeps_the_old_file(made, tmp_path, fail_on_third_call):
    src = made(grid="gguf:q4_k")
    dst = export_checkpoint(src, tmp_path / "m.gguf", "gguf")
    old = dst.read_bytes()
    with pytest.raises(CheckpointError, match="--overwrite"):
        export_checkpoint(src, dst, "gguf")
    calls = fail_on_third_call(gguf_export, "layer_blocks")
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(src, dst, "gguf", overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        calls.clear()
        export_checkpoint(src, tmp_path / "new.gguf", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.md"]  # no temporary, no half file or card
    assert dst.read_bytes() == old


def test_quantize_with_format_gguf(tiny_llama, calib_file, tmp_path):
    args = ["quantize", str(tiny_llama), "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32", "--quiet",
            "--format", "gguf"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "asym"), "--bits", "4", "--group-size", "32"])
    assert res.exit_code == 2 and "--grid gguf" in res.output
    assert not (tmp_path / "asym").exists()  # refused before any work
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "q"), "--grid", "gguf:q5_1"])
    assert res.exit_code == 0, res.output
    assert gguf.GGUFReader(tmp_path / "q.gguf").tensors and (tmp_path / "q.md").is_file()
    assert (tmp_path / "q" / "manifest.json").exists()  # the native checkpoint stays


# ---- model cards ----------------------------------------------------------------------------------------------------

def test_model_cards(made, tmp_path):
    """The checkpoint's README.md (in its manifest) has the front matter and settings; an export's card adds the
    evaluation table of the checkpoint's eval.json."""
    src = made(grid="gguf:q4_1")
    manifest = json.loads((src / "manifest.json").read_text())
    assert "README.md" in manifest["files"]
    card = ModelCard.load(src / "README.md")
    info = json.loads((src / "quantease.json").read_text())
    assert card.data.base_model_relation == "quantized" and card.data.quantized_by.startswith("quantease")
    assert f"{info['summary']['bits_per_weight']:.3f}" in card.text and "gguf:q4_1" in card.text
    assert "## Evaluation" not in card.text
    ppl = evaluate_perplexity(src, ["ptb"], seqlen=32, limit=2, device="cpu", progress=False)[0].ppl
    export_checkpoint(src, tmp_path / "m.gguf", "gguf")
    exported = ModelCard.load(tmp_path / "m.md").text
    assert "## Evaluation" in exported and f"{ppl:.3f}" in exported


def test_card_names_the_builtin_base_model():
    info = {"config": {"model": "smollm2-135m", "method": "quantease", "bits": 4, "group_size": 32, "sym": False,
                       "clip": "minmax", "grid": "gguf:q4_k"},
            "model": {"source": "/nowhere"}, "layers": {},
            "calibration": {"source": "ptb", "nsamples": 16, "seqlen": 2048, "seed": 0},
            "summary": {"quantized_layers": 0, "bits_per_weight": 4.5, "mean_rel_error": 0.0}}
    card = ModelCard(card_text(info, {}, "gguf", ["m.gguf"]))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
