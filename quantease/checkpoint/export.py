"""Export a finished quantease checkpoint to a format that other tools load (compressed-tensors, GPTQ, GGUF).

`export_checkpoint(src, dst, fmt)` refuses incomplete sources and layers the target cannot hold, has the format's
exporter write a whole folder (or, for a single-file format such as GGUF, the file) under a hidden temporary name
beside `dst`, and renames it into place: `dst` is either absent, the previous export untouched, or a complete export.
Every export gets a model card (model_card.py): README.md in the folder (listed in its export manifest), or NAME.md
beside a single file, written before the file is renamed into place. Exported folder:

  config.json                    the source config, quantization_config replaced by the target format's
  tokenizer, generation files    copied unchanged
  model-*.safetensors            one shard per source shard: quantized linears in the target layout, the rest unchanged
  model.safetensors.index.json   tensor -> shard
  README.md                      the model card
  quantease-export.json          format, source and size/sha256 of every file above; written last. Not called
                                 manifest.json: an export is not a quantease checkpoint, and our readers must not
                                 take it for one (they detect ours by manifest.json)

Each exporter is `fn(src, dst) -> None` registered under the name written to the CLI's --format; a single-file
format registers the suffix its file must have.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import CheckpointError, UsageError
from ..models.registry import get_arch
from ..solvers.grid import GridSpec
from .model_card import write_card
from .native import FORMAT as NATIVE_FORMAT
from .native import (CARD, INFO, MANIFEST, RUN_LOG, CheckpointWriter, _atomic_write_bytes, _sha256, quantized_schema,
                     read_manifest)

__all__ = ["EXPORTERS", "SINGLE_FILE", "EXPORT_MANIFEST", "Exporter", "Source", "register", "get_exporter",
           "export_checkpoint", "default_destination", "precheck",
           "read_source", "require", "uniform", "linear_names", "write_export"]

EXPORT_MANIFEST = "quantease-export.json"
Exporter = Callable[[Path, Path], None]
LayerConverter = Callable[[str, dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]]
EXPORTERS: dict[str, Exporter] = {}
SINGLE_FILE: dict[str, str] = {}  # format -> the suffix of its one output file

_NATIVE_FILES = {INFO, MANIFEST, RUN_LOG, CARD, "eval.json", "config.json", "model.safetensors.index.json"}
_NATIVE_ONLY_KEYS = ("outliers", "parts")  # sparse outliers / FFSplit parts: no exported format stores them


def register(name: str, suffix: str = "") -> Callable[[Exporter], Exporter]:
    """Decorator: file `fn` under `name` (the --format string); `suffix`: the format is one file with that suffix.
    A duplicate name raises."""
    def add(fn: Exporter) -> Exporter:
        if name in EXPORTERS:
            raise ValueError(f"export format {name!r} registered twice")
        EXPORTERS[name] = fn
        if suffix:
            SINGLE_FILE[name] = suffix
        return fn
    return add


def _key(fmt: str) -> str:
    return fmt.strip().lower().replace("_", "-")


def default_destination(folder: str | Path, fmt: str) -> Path:
    """Where `quantize --format` puts the export: OUT-FORMAT, or OUT.SUFFIX for a single-file format."""
    suffix = SINGLE_FILE.get(_key(fmt))
    return Path(f"{folder}{suffix}") if suffix else Path(f"{folder}-{fmt}")


def get_exporter(fmt: str) -> Exporter:
    key = _key(fmt)
    if key not in EXPORTERS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of: {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[key]


def _check_family(model_type: str) -> None:
    if get_arch(model_type).experts is not None:
        raise UsageError(f"exporting mixture-of-experts models ({model_type}) is not supported yet: serving stacks "
                         f"name and fuse experts their own way; keep the native checkpoint (quantease eval/load)")


def precheck(fmt: str, spec: GridSpec, act_order_groups: bool, model: Path) -> None:
    """Refuse, before a long quantization starts, settings that `fmt` cannot hold for the model folder `model` (the
    exporter re-checks each layer)."""
    from . import compressed_tensors, gguf, gptq

    get_exporter(fmt)
    config = json.loads((Path(model) / "config.json").read_text())
    _check_family(config.get("model_type"))
    key = _key(fmt)
    if key == gguf.FORMAT:
        gguf.check_model(config, Path(model))
        why = gguf.check_grid(spec.gguf, spec.bits, spec.group_size, spec.sym)
        if why or act_order_groups:
            raise UsageError(f"cannot export to gguf: {why or 'act-order groups are not contiguous'}; "
                             f"{'quantize with -o static_groups=true' if not why else gguf.EXACT_HINT}")
        return
    if spec.gguf:
        raise UsageError(f"{fmt} cannot hold the GGUF grid gguf:{spec.gguf}; use --format gguf")
    bits = spec.bits
    supported = {compressed_tensors.FORMAT: compressed_tensors.SUPPORTED_BITS, gptq.FORMAT: gptq.SUPPORTED_BITS}
    if bits not in supported[key]:
        raise UsageError(f"{fmt} cannot hold {bits}-bit codes (it takes {', '.join(map(str, supported[key]))}); "
                         f"choose another --bits or --format")
    if act_order_groups and key == compressed_tensors.FORMAT:
        raise UsageError("compressed-tensors cannot hold act-order groups: add -o static_groups=true or use "
                         "--format gptq")


@dataclass(frozen=True)
class Source:
    """A complete quantease checkpoint: its folder, config.json, quantease.json and manifest."""

    folder: Path
    config: dict[str, Any]
    info: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self.info["layers"]

    @cached_property
    def weight_map(self) -> dict[str, str]:
        return json.loads((self.folder / "model.safetensors.index.json").read_text())["weight_map"]

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def act_order(self, layer: str) -> bool:
        """Whether the layer's groups are non-contiguous (GPTQ act-order), i.e. it stores NAME.g_idx."""
        return f"{layer}.g_idx" in self.weight_map

    def extra_files(self) -> list[str]:
        """Tokenizer, generation config and other files of the source model, copied as they are."""
        return sorted(n for n in self.manifest["files"] if n not in _NATIVE_FILES and not n.endswith(".safetensors"))


def read_source(src: str | Path, fmt: str) -> Source:
    """The checkpoint in `src`; refuses a folder that is not a finished quantease checkpoint, or that has layers
    no exported format can hold."""
    folder = Path(src)
    manifest = read_manifest(folder)
    if manifest.get("format") != NATIVE_FORMAT or not (folder / INFO).is_file():
        raise CheckpointError(f"{folder} is not a quantease checkpoint (manifest format {manifest.get('format')!r}); "
                              f"export reads what `quantease quantize` wrote")
    info = json.loads((folder / INFO).read_text())
    source = Source(folder, json.loads((folder / "config.json").read_text()), info, manifest)
    _check_family(info["model"]["model_type"])
    _check_native_only(source, fmt)
    return source


def require(ok: bool, layer: str, fmt: str, why: str, instead: str) -> None:
    """Refuse (UsageError) unless `ok`, naming the layer, the reason and a format that can hold it."""
    if not ok:
        raise UsageError(f"cannot export {layer} to {fmt}: {why}; {instead}")


def _check_native_only(source: Source, fmt: str) -> None:
    for name, meta in source.layers.items():
        for key in _NATIVE_ONLY_KEYS:
            require(key not in meta, name, fmt, f"it stores {key!r} that {fmt} has no place for",
                    "use the native format (keep the quantease checkpoint as it is)")
        if _key(fmt) != "gguf":
            require("gguf" not in meta, name, fmt, f"its grid is GGUF's {meta.get('gguf')}", "use --format gguf")


def linear_names(source: Source) -> list[str]:
    """Names of every nn.Linear in the source's model (built on the meta device from config.json, no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _convert_shard(tensors: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]],
                   convert: LayerConverter) -> dict[str, torch.Tensor]:
    """Replace each quantized layer's native tensors (NAME.qweight, ...) in one shard by the converter's."""
    suffixes = [s.suffix for s in quantized_schema()]
    out = dict(tensors)
    for name in sorted({k.rpartition(".")[0] for k in tensors} & layers.keys()):
        parts = {s: out.pop(f"{name}.{s}") for s in suffixes if f"{name}.{s}" in out}
        out.update({f"{name}.{s}": t.contiguous() for s, t in convert(name, parts, layers[name]).items()})
    return out


class _ExportWriter(CheckpointWriter):
    """CheckpointWriter (atomic files) that keeps the source's shard names and ends with the export manifest."""

    def write_named_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        _atomic_write_bytes(self.out / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))

    def finalize_export(self, config: dict[str, Any], record: dict[str, Any]) -> None:
        self.write_json("model.safetensors.index.json", {"metadata": {}, "weight_map": self.weight_map()})
        self.write_json("config.json", config)
        files = sorted(p.name for p in self.out.iterdir() if p.is_file() and not p.name.startswith("."))
        record["files"] = {n: {"bytes": (self.out / n).stat().st_size, "sha256": _sha256(self.out / n)} for n in files}
        self.write_json(EXPORT_MANIFEST, record)


def write_export(source: Source, dst: Path, fmt: str, quantization_config: dict[str, Any],
                 convert: LayerConverter) -> None:
    """Write the whole exported folder into `dst`: shards (converted), extra files, config, index, export manifest."""
    writer = _ExportWriter(dst)
    for shard in source.shards():
        writer.write_named_shard(shard, _convert_shard(load_file(source.folder / shard), source.layers, convert))
    writer.copy_files(source.folder, source.extra_files())
    files = sorted({p.name for p in Path(dst).iterdir()} | {"config.json", "model.safetensors.index.json",
                                                            EXPORT_MANIFEST})
    write_card(source, Path(dst) / CARD, fmt, files)
    config = {**source.config, "quantization_config": quantization_config}
    record = {"format": fmt, "tool_version": __version__,
              "source": {"folder": str(source.folder.resolve()), "quantease.json": source.manifest["files"][INFO]}}
    writer.finalize_export(config, record)


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished `tmp` folder to `dst`; an existing `dst` is moved aside first and deleted after."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(tmp, dst)
    shutil.rmtree(old)


def export_checkpoint(src: str | Path, dst: str | Path, fmt: str, overwrite: bool = False) -> Path:
    """Export the quantease checkpoint `src` to `dst` in format `fmt` (a key of EXPORTERS); returns `dst`."""
    exporter = get_exporter(fmt)
    src, dst = Path(src), Path(dst)
    source = read_source(src, fmt)  # fail before touching dst
    if dst.resolve() == src.resolve():
        raise UsageError(f"--out {dst} is the source checkpoint; export to a new folder")
    suffix = SINGLE_FILE.get(_key(fmt))
    if suffix:
        return _export_file(exporter, source, dst, _key(fmt), suffix, overwrite)
    if dst.exists() and not (overwrite and dst.is_dir()):
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it, or choose another --out")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        exporter(src, tmp)
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _export_file(exporter: Exporter, source: Source, dst: Path, fmt: str, suffix: str, overwrite: bool) -> Path:
    """A single-file export: the file under a temporary name, its card NAME.md beside it, then the rename."""
    if dst.suffix != suffix:
        raise UsageError(f"a {fmt} export is one file: give --out a name ending in {suffix} (e.g. {dst}{suffix})")
    if dst.exists() and not (overwrite and dst.is_file()):
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it, or choose another --out")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        exporter(source.folder, tmp)
        os.chmod(tmp, 0o644)
        write_card(source, dst.with_suffix(".md"), fmt, [dst.name])
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def uniform(values: Iterable[Any]) -> bool:
    return len(set(values)) <= 1


# The exporters register themselves on import (they import the helpers above, so they are imported last).
from . import compressed_tensors as _compressed_tensors  # noqa: E402,F401
from . import gguf as _gguf  # noqa: E402,F401
from . import gptq as _gptq  # noqa: E402,F401
