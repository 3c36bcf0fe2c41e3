"""Lazy access to a Hugging Face checkpoint: the model skeleton on the meta device, tensors read on demand.

Only one decoder block's weights (plus the embeddings and head) are ever materialized: `load_block` copies a block's
tensors from the safetensors files into the skeleton, `unload_block` sends them back to the meta device. Tensors are
read with pread(2) into ordinary memory rather than through a memory map, so what a finished block used is freed:
a mapped file's pages would stay resident (and count in the process's RSS) for as long as the file is open, which
for a 70B model is the whole checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from ..errors import ModelNotFound, UnsupportedModel
from .builtin import BUILTIN_MODELS, resolve_builtin
from .experts import unfuse_experts
from .layers import as_matrix
from .registry import ARCHITECTURES, ArchSpec, get_arch

__all__ = ["resolve_model_path", "read_config", "checkpoint_dtype", "open_index", "SafetensorsIndex", "PickleIndex",
           "LazyModel"]


def resolve_model_path(model: str, allow_pickle: bool = False) -> Path:
    """A built-in name or a local Hugging Face folder with config.json and safetensors weights (or, if the user opts
    in, PyTorch pickle weights, read with weights_only=True so that no code in them runs)."""
    if model in BUILTIN_MODELS:
        return resolve_builtin(model)
    path = Path(model)
    if not path.is_dir():
        raise ModelNotFound(
            f"model {model!r} is neither a local folder nor a built-in model ({', '.join(BUILTIN_MODELS)})"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} has no config.json: point MODEL at a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")):
            if allow_pickle:
                return path
            raise ModelNotFound(f"{path} has only PyTorch pickle weights (*.bin); they are read only if you opt in "
                                f"with --allow-pickle, or convert them to safetensors")
        raise ModelNotFound(f"{path} has no .safetensors weights")
    return path


def open_index(folder: Path) -> "SafetensorsIndex | PickleIndex":
    return SafetensorsIndex(folder) if any(folder.glob("*.safetensors")) else PickleIndex(folder)


def read_config(folder: Path) -> PretrainedConfig:
    """The model's config; code shipped in a model folder (trust_remote_code) is never run."""
    supported = ", ".join(sorted(ARCHITECTURES))
    raw = json.loads((folder / "config.json").read_text())
    if "auto_map" in raw:
        raise UnsupportedModel(f"{folder} ships its own modeling code ({raw.get('model_type', '?')}), which quantease "
                               f"does not run; supported: {supported}")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise UnsupportedModel(f"unsupported architecture {raw.get('model_type')!r} "
                               f"({str(e).splitlines()[0][:100]}); supported: {supported}") from None


def checkpoint_dtype(config: PretrainedConfig, index: "SafetensorsIndex | PickleIndex") -> torch.dtype:
    """The dtype the checkpoint's weights are stored in: config.json's `dtype` (`torch_dtype`), else that of its
    first floating-point tensor."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for name in index.names():
        stored = index.dtype(name)
        if stored.is_floating_point:
            return stored
    return torch.float32


class SafetensorsIndex:
    """Tensor name -> file, for single-file and sharded (model.safetensors.index.json) checkpoints."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / fname for name, fname in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(f, "pt") as h:
                    self.files.update({name: f for name in h.keys()})
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = safe_open(f, "pt", backend="pread")  # no mapping: see the module docstring
        return self._handles[f]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return self._handle(self.files[name]).get_slice(name).get_shape()

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._handle(self.files[name]).get_slice(name).get_dtype()]


class PickleIndex(SafetensorsIndex):
    """The same interface over pytorch_model*.bin files, memory-mapped and loaded with weights_only=True."""

    def __init__(self, folder: Path):
        index = folder / "pytorch_model.bin.index.json"
        self._files: dict[Path, dict[str, torch.Tensor]] = {}
        if index.exists():
            self.files = {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {n: f for f in sorted(folder.glob("*.bin")) for n in self._tensors(f)}

    def _tensors(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._files:
            self._files[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        return self._files[f]

    def get(self, name: str) -> torch.Tensor:
        return self._tensors(self.files[name])[name]

    def shape(self, name: str) -> list[int]:
        return list(self.get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class LazyModel:
    """A causal LM whose parameters live on the meta device until asked for."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32):
        self.folder = folder
        self.config: PretrainedConfig = read_config(folder)
        self.arch: ArchSpec = get_arch(self.config.model_type)
        self.dtype = dtype
        self.index = open_index(folder)
        self.config.use_cache = False
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not stored
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
            unfuse_experts(self.model, self.arch)
        self.model.eval()
        self.prefix = self.model.base_model_prefix
        self.blocks: torch.nn.ModuleList = self.model.get_submodule(self.arch.blocks)
        self.keys = self._checkpoint_keys()
        self.tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})

    def _checkpoint_keys(self) -> dict[str, str]:
        """Model parameter -> checkpoint key, through the renamings transformers applies when it loads the model
        (legacy names such as GPT-NeoX's embed_out, checkpoints without the base-model prefix). Per-expert tensors,
        which transformers would merge into fused parameters, map one to one onto our unfused experts."""
        transforms = get_model_conversion_mapping(self.model)
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        keys: dict[str, str] = {}
        for key in self.index.names():
            name = key
            for t in transforms:
                renamed, matched = t.rename_source_key(name)
                if matched is None:
                    continue
                if not isinstance(t, WeightRenaming):
                    if self.arch.experts is not None:
                        continue
                    raise UnsupportedModel(f"{self.config.model_type}: checkpoint tensor {key} needs a conversion "
                                           f"(e.g. fused mixture-of-experts weights), which is not supported yet")
                name = renamed
            if name not in params and f"{self.prefix}.{name}" in params:
                name = f"{self.prefix}.{name}"
            keys[name] = key
        return keys

    def checkpoint_name(self, param: str) -> str:
        try:
            return self.keys[param]
        except KeyError:
            raise ModelNotFound(f"tensor {param} is missing from the checkpoint in {self.folder}") from None

    def block_prefix(self, i: int) -> str:
        return f"{self.arch.blocks}.{i}."

    def _params(self, prefix: str | None, inside: bool) -> list[str]:
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        return [n for n in names if (prefix is not None and n.startswith(prefix)) == inside]

    def _load(self, names: list[str], device: torch.device | str) -> None:
        for n in names:
            value = self.index.get(self.checkpoint_name(n)).to(self.dtype)
            set_module_tensor_to_device(self.model, n, device, value=value)

    def _unload(self, names: list[str]) -> None:
        for n in names:
            set_module_tensor_to_device(self.model, n, "meta")

    def outer_params(self) -> list[str]:
        """Parameters outside the decoder blocks; a head tied to the embeddings is not stored, anything else must be."""
        names = [n for n in self._params(self.arch.blocks + ".", inside=False) if n not in self.tied or n in self.keys]
        for n in names:
            self.checkpoint_name(n)  # fails on a missing tensor instead of silently dropping it
        return names

    def capture_params(self) -> list[str]:
        """The parameters outside the blocks that running the model up to block 0 needs: all but an untied head
        (for Llama-3-8B in fp32 that is 2.1 GB not loaded)."""
        head = self.model.get_output_embeddings()
        skip = set() if head is None or head.weight is self.model.get_input_embeddings().weight else \
            {n for n, p in self.model.named_parameters(remove_duplicate=False) if p is head.weight}
        return [n for n in self.outer_params() if n not in skip]

    def load_outer(self, device: torch.device | str) -> None:
        """Materialize what runs the model up to block 0 (`capture_params`), and move every buffer (rotary
        tables, computed at construction on the CPU) to the device."""
        self._load(self.capture_params(), device)
        for module in self.model.modules():
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(device)

    def unload_outer(self) -> None:
        self._unload(self.capture_params())

    def load_block(self, i: int, device: torch.device | str) -> torch.nn.Module:
        self._load(self._params(self.block_prefix(i), inside=True), device)
        return self.blocks[i]

    def unload_block(self, i: int) -> None:
        self._unload(self._params(self.block_prefix(i), inside=True))

    def original_weight(self, i: int, name: str, device: torch.device | str) -> torch.Tensor:
        """Linear `name` of block i as the checkpoint stores it, as [out, in] fp32 on `device`: what solvers get
        when the block itself runs in a lower precision than the checkpoint's."""
        W = self.index.get(self.checkpoint_name(f"{self.block_prefix(i)}{name}.weight")).to(device, torch.float32)
        return as_matrix(self.blocks[i].get_submodule(name), W)

    def block_tensor_names(self, i: int) -> dict[str, str]:
        """Model parameter name -> checkpoint key, for block i."""
        return {n: self.checkpoint_name(n) for n in self._params(self.block_prefix(i), inside=True)}
