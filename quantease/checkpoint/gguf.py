"""Export to one GGUF file, the format llama.cpp, ollama and LM Studio run and transformers reads (gguf_file=).

What the file holds, as llama.cpp's convert_hf_to_gguf.py writes a model of the llama family (llama, mistral) or
qwen2, written with gguf-py's GGUFWriter:

  general.*           architecture, name, type, file_type (the run's GGUF type), quantization_version, quantized_by
  ARCH.*              block count, context / embedding / feed-forward length, head counts (and key/value length when
                      the config names head_dim), RoPE dimension count and base, RMS-norm epsilon, vocab size
  tokenizer.ggml.*    model "gpt2" (byte-level BPE from tokenizer.json), pre-tokenizer ("gpt-2", or "smollm" when
                      digits are split one by one first), tokens with their types (special added tokens CONTROL,
                      other added tokens USER_DEFINED, gaps [PADi] UNUSED), merges, special token ids, add_bos/eos,
                      chat template (gguf-py's SpecialVocab)
  tensors             token_embd, output_norm, output (absent when tied), blk.N.{attn_norm, attn_q, attn_k, attn_v,
                      attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down} (gguf-py's tensor name map)

Quantized linears become GGUF blocks of their own codes and grid fields (gguf_blocks.py): exactly their Ŵ, checked
per layer against gguf-py's dequantizer before the file is finished. A layer exports when its grid is a GGUF type
(`--grid gguf:TYPE`), or symmetric 4/5/8 bits with group 32 (Q4_0/Q5_0/Q8_0). For llama and mistral the rows of
attn_q and attn_k are permuted as llama.cpp's converter permutes them (within each head, the first and second half
of the rotary pairs interleaved); a row's blocks move with the row, so the permutation is exact. Every other tensor
is written in the smallest type that holds it exactly: Q8_0 (a model that came from a Q8_0 GGUF), F16, BF16, else
F32; 1-D tensors and norms are always F32, as llama.cpp requires.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__
from ..errors import UsageError
from ..solvers.gguf_grid import GGUF_TYPES
from .export import Source, read_source, register, require
from .gguf_blocks import pack_blocks
from .native import decode_grid, dequantize_tensors

__all__ = ["FORMAT", "ARCHS", "EXACT_HINT", "check_grid", "check_model", "layer_type", "layer_blocks", "export_gguf"]

FORMAT = "gguf"
# config.model_type -> (GGUF architecture, whether llama.cpp's converter permutes the q/k rows)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
_INT_TYPES = {4: "q4_0", 5: "q5_0", 8: "q8_0"}  # symmetric integer grids with group 32 that are GGUF types
_ROPE_TYPES = (None, "default")  # llama3 / yarn / linear scaling would need extra keys or tensors
EXACT_HINT = "quantize with --grid gguf:TYPE (q4_0, q5_0, q8_0, q4_1, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k) or with " \
         "--bits 4/5/8 --group-size 32 --sym"


def check_grid(gguf: str, bits: int, group_size: int, sym: bool) -> str | None:
    """Why a grid has no exact GGUF type (None when it has one)."""
    if gguf:
        return None
    if not sym:
        return "its integer zero points have no GGUF type (Q4_1/Q5_1 store an fp16 minimum, and -scale·zero is " \
               "not an fp16 number in general)"
    if bits not in _INT_TYPES or group_size != 32:
        return f"GGUF's integer types are 4/5/8 bits with groups of 32, not {bits} bits with group size {group_size}"
    return None


def layer_type(name: str, meta: dict[str, Any], act_order: bool) -> str:
    """The GGUF type one quantized layer of the native checkpoint exports as; refuses a layer that has none."""
    why = check_grid(meta.get("gguf", ""), meta["bits"], meta["group_size"], meta["sym"])
    require(why is None, name, FORMAT, why or "", EXACT_HINT)
    require(not act_order, name, FORMAT, "its groups are not contiguous (GPTQ act-order), GGUF blocks are runs of "
            "consecutive weights", "quantize with -o static_groups=true")
    return meta.get("gguf") or _INT_TYPES[meta["bits"]]


def check_model(config: dict[str, Any], folder: Path) -> tuple[str, bool]:
    """(GGUF architecture, whether q/k rows are permuted) of a model GGUF export can write, checked with its
    tokenizer before any work; refuses anything else with the reason."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise UsageError(f"GGUF export supports {', '.join(ARCHS)} models, not {model_type!r}; keep the native "
                         f"checkpoint or export with --format compressed-tensors")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _ROPE_TYPES:
        raise UsageError(f"GGUF export of RoPE scaling {rope_type!r} is not supported yet (only unscaled RoPE)")
    _tokenizer_spec(folder)
    return ARCHS[model_type]


def _rope_theta(config: dict[str, Any]) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0)))


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _write_metadata(writer, source: Source, file_type: str) -> None:
    c = source.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(source.info["model"]["source"]).name)
    writer.add_quantized_by(f"quantease {__version__}")
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c.get("num_key_value_heads") or c["num_attention_heads"])
    if c.get("head_dim"):
        writer.add_key_length(c["head_dim"])
        writer.add_value_length(c["head_dim"])
    writer.add_rope_dimension_count(_head_dim(c))
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_vocab_size(c["vocab_size"])
    writer.add_file_type(_FILE_TYPES[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer(pre: dict[str, Any] | None, folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of tokenizer.json, read from its structure."""
    def byte_level(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    pre = pre or {}
    if byte_level(pre):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and byte_level(steps[1]):
        return "smollm"
    raise UsageError(f"{folder / 'tokenizer.json'}: GGUF export knows byte-level BPE tokenizers (GPT-2's split, "
                     f"optionally digits one by one first), not this pre_tokenizer: {json.dumps(pre)[:120]}")


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and GGUF token types for ids 0..vocab_size-1."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            special = added[i].special or (reverse[i].startswith("<|") and reverse[i].endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tokenizer_spec(folder: Path) -> tuple[dict[str, Any], str]:
    """tokenizer.json and llama.cpp's pre-tokenizer name for it; refuses tokenizers the export cannot describe."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{folder} has no tokenizer.json; GGUF export needs a byte-level BPE tokenizer.json")
    spec = json.loads(path.read_text())
    if spec.get("model", {}).get("type") != "BPE":
        raise UsageError(f"{path}: GGUF export knows byte-level BPE tokenizers, not {spec.get('model', {}).get('type')}")
    return spec, _pre_tokenizer(spec.get("pre_tokenizer"), folder)


def _write_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    _, pre = _tokenizer_spec(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    ids = tokenizer("a").input_ids  # what the tokenizer adds on its own, as our evaluation tokenizes
    special.add_special_token.setdefault("bos", bool(ids) and ids[0] == tokenizer.bos_token_id)
    special.add_special_token.setdefault("eos", bool(ids) and ids[-1] == tokenizer.eos_token_id and len(ids) > 1)
    special.add_to_gguf(writer, quiet=True)


def _qk_permutation(rows: int, heads: int) -> np.ndarray:
    """Row order of llama.cpp's q/k permute: new row (h, i, t) is old row (h, t, i), t < 2, i < rows / heads / 2."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _permutation(hf_name: str, rows: int, config: dict[str, Any], permute: bool) -> np.ndarray | None:
    if not permute:
        return None
    if ".q_proj." in hf_name:
        return _qk_permutation(rows, config["num_attention_heads"])
    if ".k_proj." in hf_name:
        return _qk_permutation(rows, config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def layer_blocks(parts: dict[str, torch.Tensor], meta: dict[str, Any], gtype: str) -> np.ndarray:
    """GGUF block bytes [out, in / block · type size] of one layer; their dequantization is checked to be Ŵ."""
    codes, grid = decode_grid(parts, meta)
    t = GGUF_TYPES[gtype]
    if t.kind == "k":
        fields = {k: v.numpy() for k, v in grid.params.items()}
    else:
        fields = {"d": grid.scale.numpy()} | ({"m": (-grid.offset).numpy()} if t.kind == "min" else {})
    rows = pack_blocks(gtype, codes.numpy().astype(np.uint8), fields)
    W_hat = dequantize_tensors(parts, meta).numpy()
    assert np.array_equal(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[gtype.upper()]), W_hat), gtype
    return rows


def _float(name: str, t: torch.Tensor) -> tuple[np.ndarray, Any]:
    """(data, raw type or None) of an unquantized tensor in the smallest GGUF type that holds it exactly."""
    x = t.float().numpy()
    if x.ndim < 2 or name.endswith("_norm.weight"):
        return x, None
    if x.shape[-1] % 32 == 0:
        q8 = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
        if np.array_equal(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0), x):
            return q8, gguf.GGMLQuantizationType.Q8_0
    if np.array_equal(x.astype(np.float16).astype(np.float32), x):
        return x.astype(np.float16), None
    if torch.equal(t.float().bfloat16().float(), t.float()):
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return x, None


class _Tensors:
    """GGUF names for the checkpoint's tensors, and which to leave out."""

    def __init__(self, source: Source, arch: str):
        self.map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], source.config["num_hidden_layers"])
        self.tied = source.config.get("tie_word_embeddings", False)

    def name(self, hf_name: str) -> str | None:
        if hf_name.endswith("rotary_emb.inv_freq") or (self.tied and hf_name.startswith("lm_head.")):
            return None
        gguf_name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UsageError(f"no GGUF tensor name for {hf_name}; GGUF export supports {', '.join(ARCHS)} models")
        return gguf_name


def _add_shard(writer, tensors: dict[str, torch.Tensor], source: Source, names: _Tensors, types: dict[str, str],
               permute: bool) -> None:
    """Add one native shard's tensors: its quantized layers as GGUF blocks, everything else as floats."""
    for layer in sorted({k.rpartition(".")[0] for k in tensors} & types.keys()):
        own = [k for k in tensors if k.rpartition(".")[0] == layer and not k.endswith(".bias")]  # NAME.qweight, ...
        parts = {k.rpartition(".")[2]: tensors.pop(k) for k in own}
        rows = layer_blocks(parts, source.layers[layer], types[layer])
        perm = _permutation(f"{layer}.weight", rows.shape[0], source.config, permute)
        writer.add_tensor(names.name(f"{layer}.weight"), rows if perm is None else rows[perm],
                          raw_dtype=gguf.GGMLQuantizationType[types[layer].upper()])
    for hf_name in sorted(tensors):
        gguf_name = names.name(hf_name)
        if gguf_name is None:
            continue
        t = tensors[hf_name]
        perm = _permutation(hf_name, t.shape[0], source.config, permute)
        data, raw = _float(gguf_name, t if perm is None else t[torch.from_numpy(perm)])
        writer.add_tensor(gguf_name, data, raw_dtype=raw)


@register(FORMAT, suffix=".gguf")
def export_gguf(src: Path, dst: Path) -> None:
    """Write the checkpoint `src` as the GGUF file `dst` (the module docstring)."""
    source = read_source(src, FORMAT)
    arch, permute = check_model(source.config, source.folder)
    types = {name: layer_type(name, meta, source.act_order(name)) for name, meta in source.layers.items()}
    grid = source.info["config"].get("grid", "")
    file_type = grid.removeprefix("gguf:") if grid else max(set(types.values()), key=list(types.values()).count)
    writer = gguf.GGUFWriter(str(dst), arch)
    _write_metadata(writer, source, file_type)
    _write_tokenizer(writer, source.folder, source.config["vocab_size"])
    names = _Tensors(source, arch)
    for shard in source.shards():
        _add_shard(writer, load_file(source.folder / shard), source, names, types, permute)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _file_types() -> dict[str, Any]:
    t = gguf.LlamaFileType
    return {"q4_0": t.MOSTLY_Q4_0, "q4_1": t.MOSTLY_Q4_1, "q5_0": t.MOSTLY_Q5_0, "q5_1": t.MOSTLY_Q5_1,
            "q8_0": t.MOSTLY_Q8_0, "q2_k": t.MOSTLY_Q2_K, "q3_k": t.MOSTLY_Q3_K_S, "q4_k": t.MOSTLY_Q4_K_S,
            "q5_k": t.MOSTLY_Q5_K_S, "q6_k": t.MOSTLY_Q6_K}


_FILE_TYPES = _file_types()
