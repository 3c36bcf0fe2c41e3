"""quantease's own checkpoint: a Hugging Face-style folder of safetensors shards plus quantease.json and a manifest.

Layout of DIR:
  config.json, tokenizer files      the source model's, with quantization_config = {"quant_method": "quantease"}
  model-outer.safetensors           tensors outside the decoder blocks (embeddings, final norm, head), unchanged
  model-block-NNNNN.safetensors     one per decoder block: quantized linears (schema below) and the block's other
                                    tensors (norms, biases) unchanged
  model.safetensors.index.json      tensor name -> shard, as transformers writes for sharded models
  quantease.json                    settings, calibration fingerprint, per-layer errors, timings, effective bits
  README.md                         the model card (Hugging Face front matter; checkpoint/model_card.py)
  run.json                          timings of the run that made it (varies run to run; not covered by the manifest)
  manifest.json                     size and sha256 of every file above; written last, so a folder without it is
                                    incomplete and every reader refuses it

Every file is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..solvers.base import Outliers, QuantizedWeight
from ..solvers.gguf_grid import GGUF_TYPES, grid_from_params
from ..solvers.grid import Grid
from .packing import pack, packed_words, unpack
from .resume import fault_point

__all__ = [
    "FORMAT",
    "TOKENIZER_FILES",
    "Dims",
    "TensorSchema",
    "quantized_schema",
    "encode",
    "decode_grid",
    "decode_outliers",
    "dequantize_tensors",
    "effective_bits",
    "split_schema",
    "encode_split",
    "split_indices",
    "part_weights",
    "layer_suffixes",
    "CheckpointWriter",
    "read_manifest",
    "verify_manifest",
]

FORMAT = "quantease-native"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INFO = "quantease.json"
RUN_LOG = "run.json"  # timings of this particular run: not part of the checkpoint, so not in the manifest
CARD = "README.md"  # the model card (checkpoint/model_card.py)
OUTER_SHARD = "model-outer.safetensors"
TOKENIZER_FILES = [  # copied from the model folder when present
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "chat_template.jinja", "generation_config.json",
]


class Dims(NamedTuple):
    """What a layer's stored tensor shapes depend on."""

    q: int
    p: int
    bits: int
    groups: int
    sym: bool
    perm: bool  # non-contiguous groups (act-order GPTQ without static groups)
    outliers: str | None = None  # None | "unstructured" | "column"
    count: int = 0  # outlier nonzeros (unstructured) or columns (column)
    gguf: str = ""  # GGUF type of the grid ("" for integer zero points)

    @property
    def kind(self) -> str:
        """"int" (scales and integer zero points), "min" (GGUF Q4_1/Q5_1) or "k" (GGUF K-quants)."""
        return GGUF_TYPES[self.gguf].kind if self.gguf else "int"

    @property
    def gguf_min(self) -> bool:
        return bool(self.gguf) and GGUF_TYPES[self.gguf].has_min

    @property
    def sub_bits(self) -> int:
        return GGUF_TYPES[self.gguf].sub_bits if self.gguf else 0


@dataclass(frozen=True)
class TensorSchema:
    suffix: str
    dtype: torch.dtype
    shape: Callable[[Dims], tuple[int, ...]]
    when: Callable[[Dims], bool] = lambda d: True


def quantized_schema() -> tuple[TensorSchema, ...]:
    """The tensors stored for one quantized linear `NAME` (as NAME.suffix); zero points are packed along the
    output dimension (as GPTQ's qzeros), so that few groups per row do not waste a padded word each. Sparse
    outliers H (Ŵ = Q + H) are stored as flat indices i·p + j and fp16 values, or as column indices and the
    [q, s] fp16 block of those columns. GGUF grids store their format's fields: Q4_1/Q5_1 the fp16 minimum m
    (Ŵ = d·c + m, d in scales); the K-quants per 256 weights d (super_scales) and dmin (super_mins) in fp16 and per
    sub-block the integers sc (sub_scales; signed ones + 2^(sub_bits-1)) and m (sub_mins), packed at sub_bits."""
    return (
        TensorSchema("qweight", torch.int32, lambda d: (d.q, packed_words(d.p, d.bits))),
        TensorSchema("scales", torch.float16, lambda d: (d.q, d.groups), lambda d: d.kind != "k"),
        TensorSchema("qzeros", torch.int32, lambda d: (d.groups, packed_words(d.q, d.bits)),
                     lambda d: not d.sym and d.kind == "int"),
        TensorSchema("mins", torch.float16, lambda d: (d.q, d.groups), lambda d: d.kind == "min"),
        TensorSchema("super_scales", torch.float16, lambda d: (d.q, d.p // 256), lambda d: d.kind == "k"),
        TensorSchema("super_mins", torch.float16, lambda d: (d.q, d.p // 256), lambda d: d.kind == "k" and d.gguf_min),
        TensorSchema("sub_scales", torch.int32, lambda d: (d.q, packed_words(d.groups, d.sub_bits)),
                     lambda d: d.kind == "k"),
        TensorSchema("sub_mins", torch.int32, lambda d: (d.q, packed_words(d.groups, d.sub_bits)),
                     lambda d: d.kind == "k" and d.gguf_min),
        TensorSchema("g_idx", torch.int32, lambda d: (d.p,), lambda d: d.perm),
        TensorSchema("outlier_idx", torch.int32, lambda d: (d.count,), lambda d: d.outliers == "unstructured"),
        TensorSchema("outlier_val", torch.float16, lambda d: (d.count,), lambda d: d.outliers == "unstructured"),
        TensorSchema("outlier_cols", torch.int32, lambda d: (d.count,), lambda d: d.outliers == "column"),
        TensorSchema("outlier_colval", torch.float16, lambda d: (d.q, d.count), lambda d: d.outliers == "column"),
    )


def split_schema() -> tuple[TensorSchema, ...]:
    """The extra tensors of an FFSplit layer (quantease.json entry has "parts"): the heavy neurons' indices, and a
    part kept in full precision as PART.weight. A quantized part PART stores `quantized_schema()` as PART.suffix
    with its own Dims (rows: [k, p] or [q - k, p]; columns: [q, k] or [q, p - k]). `Dims.count` is k here."""
    return (
        TensorSchema("heavy_index", torch.int32, lambda d: (d.count,)),
        TensorSchema("weight", torch.float16, lambda d: (d.q, d.p)),
    )


def encode_split(parts: dict[str, QuantizedWeight | torch.Tensor], heavy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensors of an FFSplit layer: heavy_index [k] int32, then each part encoded under its name (a plain tensor is a
    full-precision part, stored as PART.weight fp16)."""
    out = {"heavy_index": heavy.cpu().to(torch.int32)}
    for name, part in parts.items():
        if isinstance(part, QuantizedWeight):
            out.update({f"{name}.{k}": t for k, t in encode(part).items()})
        else:
            out[f"{name}.weight"] = part.cpu().to(torch.float16).contiguous()
    return out


def split_indices(meta: dict[str, Any], heavy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Part name -> the rows ("rows") or columns ("cols") of the full weight it holds, in order."""
    n = meta["out_features"] if meta["split_axis"] == "rows" else meta["in_features"]
    light = torch.ones(n, dtype=torch.bool, device=heavy.device)
    light[heavy.long()] = False
    return {"heavy": heavy.long(), "light": torch.nonzero(light).flatten()}


def part_weights(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Part name -> its dense weight (fp32), [k, p] / [q - k, p] for rows, [q, k] / [q, p - k] for columns."""
    out = {}
    for part in meta["parts"]:
        name = part["name"]
        own = {k.removeprefix(f"{name}."): t for k, t in tensors.items() if k.startswith(f"{name}.")}
        out[name] = own["weight"].float() if part["bits"] == 16 else dequantize_tensors(own, part)
    return out


def _dequantize_split(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    W = torch.zeros(meta["out_features"], meta["in_features"], device=tensors["heavy_index"].device)  # [q, p]
    index = split_indices(meta, tensors["heavy_index"])
    for name, Wp in part_weights(tensors, meta).items():
        if meta["split_axis"] == "rows":
            W[index[name]] = Wp
        else:
            W[:, index[name]] = Wp
    return W


def layer_suffixes(meta: dict[str, Any]) -> list[str]:
    """Every tensor suffix a layer may store, given its quantease.json entry."""
    base = [s.suffix for s in quantized_schema()]
    if "parts" not in meta:
        return base
    return ["heavy_index"] + [f"{p['name']}.{s}" for p in meta["parts"] for s in base + ["weight"]]


def _contiguous(g_idx: torch.Tensor, groups: int) -> bool:
    p = g_idx.numel()
    return bool((g_idx.cpu() == torch.arange(p) // (p // groups)).all())


def encode(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """suffix -> tensor for one quantized linear, following `quantized_schema`."""
    grid = qw.grid
    G = grid.scale.shape[1]
    out = {
        "qweight": pack(qw.codes.cpu(), qw.bits),
        "g_idx": grid.g_idx.cpu().to(torch.int32),
    }
    if not qw.gguf or GGUF_TYPES[qw.gguf].kind != "k":
        out["scales"] = grid.scale.cpu().to(torch.float16)
    if grid.offset is None:
        out["qzeros"] = pack(grid.zero.cpu().T.to(torch.uint8), qw.bits)  # along q, as GPTQ
    elif not grid.params:
        out["mins"] = (-grid.offset).cpu().to(torch.float16)
    out.update(_encode_gguf_params(qw))
    o = qw.outliers
    if o is not None:
        key = ("outlier_cols", "outlier_colval") if o.structure == "column" else ("outlier_idx", "outlier_val")
        out.update(zip(key, (o.index.cpu().to(torch.int32), o.values.cpu().to(torch.float16))))
    q, p = qw.shape
    dims = Dims(q, p, qw.bits, G, qw.sym, not _contiguous(grid.g_idx, G), o.structure if o else None,
                o.count if o else 0, qw.gguf)
    tensors = {}
    for s in quantized_schema():
        if s.when(dims):
            t = out[s.suffix]
            assert t.dtype == s.dtype and tuple(t.shape) == s.shape(dims), s.suffix
            tensors[s.suffix] = t.contiguous()
    return tensors


def _sub_bias(gguf: str) -> int:
    """What a K-quant's signed sub-scales are stored offset by, so that they pack as unsigned fields."""
    t = GGUF_TYPES[gguf]
    return 2 ** (t.sub_bits - 1) if t.signed_sub else 0


def _encode_gguf_params(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A K-quant's own fields (see `quantized_schema`)."""
    params = qw.grid.params
    if not params:
        return {}
    t = GGUF_TYPES[qw.gguf]
    out = {"super_scales": params["d"].cpu().to(torch.float16),
           "sub_scales": pack((params["sc"].cpu() + _sub_bias(qw.gguf)).to(torch.uint8), t.sub_bits)}
    if t.has_min:
        out["super_mins"] = params["dmin"].cpu().to(torch.float16)
        out["sub_mins"] = pack(params["m"].cpu().to(torch.uint8), t.sub_bits)
    return out


def _decode_gguf_grid(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Grid:
    """The grid of a GGUF "min" or "k" layer, bit for bit the one its solver used."""
    t = GGUF_TYPES[meta["gguf"]]
    p, G = meta["in_features"], meta["groups"]
    if t.kind == "min":
        d, m = tensors["scales"].float(), tensors["mins"].float()
        return Grid(d, -m / d, torch.arange(p, device=d.device) // t.sub, t.maxq, offset=-m)
    params = {"d": tensors["super_scales"].float(),
              "sc": unpack(tensors["sub_scales"], t.sub_bits, G).long() - _sub_bias(t.name)}
    if t.has_min:
        params.update(dmin=tensors["super_mins"].float(), m=unpack(tensors["sub_mins"], t.sub_bits, G).long())
    return grid_from_params(t, params, p)


def decode_outliers(tensors: dict[str, torch.Tensor]) -> Outliers | None:
    """The sparse outliers stored with a layer, or None."""
    if "outlier_idx" in tensors:
        return Outliers("unstructured", tensors["outlier_idx"].long(), tensors["outlier_val"])
    if "outlier_cols" in tensors:
        return Outliers("column", tensors["outlier_cols"].long(), tensors["outlier_colval"])
    return None


def decode_grid(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[torch.Tensor, Grid]:
    """Codes [q, p] and grid from one layer's stored tensors and its quantease.json entry."""
    q, p, bits, G = meta["out_features"], meta["in_features"], meta["bits"], meta["groups"]
    codes = unpack(tensors["qweight"], bits, p)
    if meta.get("gguf") and GGUF_TYPES[meta["gguf"]].kind != "int":
        return codes, _decode_gguf_grid(tensors, meta)
    scale = tensors["scales"].float()
    if "qzeros" in tensors:
        zero = unpack(tensors["qzeros"], bits, q).T.float()
    else:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    g_idx = tensors["g_idx"].long() if "g_idx" in tensors else torch.arange(p, device=scale.device) // (p // G)
    return codes, Grid(scale, zero, g_idx, 2**bits - 1)


def dequantize_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """Ŵ [q, p] fp32 = Q + H, bit-for-bit the solver's QuantizedWeight.dequantize() (FFSplit: parts reassembled)."""
    if "parts" in meta:
        return _dequantize_split(tensors, meta)
    codes, grid = decode_grid(tensors, meta)
    Q = grid.dequantize(codes.float())
    H = decode_outliers(tensors)
    return Q if H is None else Q + H.dense(*Q.shape)


def effective_bits(tensors: dict[str, torch.Tensor], q: int, p: int) -> float:
    """Stored bits per weight of one layer: codes, scales, zeros and group indices all counted."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values()) / (q * p)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.chmod(tmp, 0o644)
    fault_point(f"write:{path.name}")
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; refuses folders that were never finished."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{folder} is not a complete quantease checkpoint (no {MANIFEST}): the run that wrote it "
                              f"did not finish; rerun the quantize command")
    return json.loads(path.read_text())


def verify_manifest(folder: Path) -> list[str]:
    """Problems found by checking every file the manifest lists (size and sha256); empty when intact."""
    manifest = read_manifest(folder)
    problems = []
    for name, entry in manifest["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{name}: checksum differs from the manifest")
    return problems


class CheckpointWriter:
    """Writes shards as the pipeline produces them, then the index, config, info and (last) the manifest."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)

    def shard_name(self, block: int | None) -> str:
        return OUTER_SHARD if block is None else f"model-block-{block:05d}.safetensors"

    def write_shard(self, block: int | None, tensors: dict[str, torch.Tensor]) -> int:
        """Write one shard; returns its size in bytes."""
        name = self.shard_name(block)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_write_bytes(self.out / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        return (self.out / name).stat().st_size

    def write_text(self, name: str, text: str) -> None:
        _atomic_write_bytes(self.out / name, lambda tmp: tmp.write_text(text))

    def write_json(self, name: str, obj: Any) -> None:
        _atomic_write_bytes(self.out / name, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=False)))

    def copy_files(self, src: Path, names: list[str]) -> None:
        for n in names:
            if (src / n).is_file():
                _atomic_write_bytes(self.out / n, lambda tmp, n=n: shutil.copyfile(src / n, tmp))

    def weight_map(self) -> dict[str, str]:
        """Tensor -> shard, read from the shards on disk (a resumed run wrote some of them in an earlier process)."""
        out: dict[str, str] = {}
        for f in sorted(self.out.glob("model-*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f.name for k in h.keys()})
        return dict(sorted(out.items()))

    def finalize(self, config: dict[str, Any], info: dict[str, Any]) -> None:
        self.write_json("model.safetensors.index.json", {"metadata": {}, "weight_map": self.weight_map()})
        self.write_json("config.json", config)
        self.write_json(INFO, info)
        files = sorted(p.name for p in self.out.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.name not in (MANIFEST, RUN_LOG, "eval.json"))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "files": {n: {"bytes": (self.out / n).stat().st_size, "sha256": _sha256(self.out / n)} for n in files},
        }
        self.write_json(MANIFEST, manifest)
