"""quantease: post-training weight quantization of causal LMs (QuantEase, GPTQ, RTN), one decoder block at a time.

The Python API lives in `quantease.api`; its names are also reachable here (`quantease.quantize(...)`,
`quantease.load(...)`). They are imported on first use, so `import quantease` (and the CLI's start) stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["QuantConfig", "ZeroShotSettings", "Plan", "quantize", "plan", "load", "load_tokenizer", "check_bos",
           "evaluate", "evaluate_perplexity", "evaluate_zeroshot", "results_path", "stored_results"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
