"""The settings of one quantization run: one validated dataclass, saved whole into quantease.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .data.windows import BOS_MODES
from .errors import UsageError
from .solvers import GridSpec, get_solver
from .solvers.gguf_grid import GGUF_TYPES, gguf_type

__all__ = ["QuantConfig", "read_yaml", "implied_grid", "grid_conflict", "FORWARD_DTYPES"]

FORWARD_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class QuantConfig:
    model: str = "smollm2-135m"  # built-in name or local Hugging Face folder
    out: str = ""
    method: str = "quantease"
    bits: int = 4
    group_size: int = -1  # -1: one grid per output channel
    sym: bool = False
    clip: str = "minmax"  # grid range: "minmax" or "mse" (error-minimizing search)
    grid: str = ""  # "": integer zero points (bits, group_size, sym); "gguf:TYPE": llama.cpp's grid of that type
    method_options: dict[str, Any] = field(default_factory=dict)  # the solver's own options, by name
    ffsplit: float = 0.0  # FFSplit heavy neurons per FFN: a fraction (< 1) or a count; 0 = off
    heavy_bits: int = 8  # bits of the heavy neurons' weights (2..8), or 16 = kept in fp16
    calib: str = "ptb"  # data source name, name=PATH, or a text file
    bos: str = "auto"  # BOS in the calibration windows: auto, every, first or never (data/windows.py)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calib_batch_size: int = 4
    sequential: bool = True  # each group of linears sees the already-quantized earlier groups of its block
    propagate: bool = True  # the next block sees the quantized block's outputs (False: the original's)
    # "layer": ||W X - Ŵ X||²; "propagated": ||W X_α - Ŵ X||², X_α toward the original's inputs; "auto" (resolved
    # here): propagated for QuantEase, whose default it is (README "Solvers"), layer for the RTN/GPTQ baselines
    target: str = "auto"
    alpha: float = 0.5  # strength of the propagated target: X_α = X + α (X_fp - X)
    device: str = "auto"
    dtype: str = "auto"  # block forwards and stored activations: auto (checkpoint's on CUDA, float32 on CPU) or a name
    offload_activations: str = "auto"  # calibration hidden states in host memory: auto (when they do not fit), on, off
    resume_every: int = 1  # write the resume state after every N-th block (and the last)
    allow_pickle: bool = False  # read PyTorch pickle (*.bin) weights, with weights_only=True, when no safetensors

    def __post_init__(self) -> None:
        if self.target == "auto":
            self.target = "propagated" if self.method == "quantease" else "layer"
        if self.grid and (self.bits, self.group_size, self.sym) == (4, -1, False):  # not set: the type's
            self.bits, self.group_size, self.sym = implied_grid(self.grid).values()
        self.validate()

    def validate(self) -> None:
        if self.grid:
            conflicts = {k: v for k, v in implied_grid(self.grid).items() if getattr(self, k) != v}
            if conflicts:
                raise UsageError(grid_conflict(self.grid, {k: getattr(self, k) for k in conflicts}))
            if self.ffsplit:
                raise UsageError("--ffsplit cannot be combined with --grid gguf:*: GGUF has no place for FFSplit's "
                                 "parts; drop one of them")
            if self.method_options.get("refit"):
                raise UsageError("-o refit cannot be combined with --grid gguf:*: a GGUF grid's scales are "
                                 "llama.cpp's own fit (its sub-block scales share one fp16 scale); drop one of them")
        try:
            self.grid_spec()
            get_solver(self.method).make_options(self.method_options)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if self.ffsplit < 0 or (self.ffsplit >= 1 and self.ffsplit != int(self.ffsplit)):
            raise UsageError(f"ffsplit must be a fraction in [0, 1) or a whole count of neurons, got {self.ffsplit}")
        if not (2 <= self.heavy_bits <= 8 or self.heavy_bits == 16):
            raise UsageError(f"heavy_bits must be in 2..8, or 16 for full precision, got {self.heavy_bits}")
        if self.dtype not in FORWARD_DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(FORWARD_DTYPES)}, got {self.dtype!r}")
        if self.offload_activations not in ("auto", "on", "off"):
            raise UsageError(f"offload_activations must be auto, on or off, got {self.offload_activations!r}")
        for name in ("nsamples", "seqlen", "calib_batch_size", "resume_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        if self.bos not in BOS_MODES:
            raise UsageError(f"bos must be one of {', '.join(BOS_MODES)}, got {self.bos!r}")
        if self.target not in ("layer", "propagated"):
            raise UsageError(f"target must be 'auto', 'layer' or 'propagated', got {self.target!r}")
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise UsageError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def grid_spec(self) -> GridSpec:
        """The grid every layer is fitted on (a GGUF K-quant row that is not a multiple of 256 takes the fallback
        type of GridSpec.for_columns)."""
        gguf = self.grid.removeprefix("gguf:") if self.grid else ""
        return GridSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, clip=self.clip, gguf=gguf)

    def solver_options(self) -> Any:
        return get_solver(self.method).make_options(self.method_options)

    def to_dict(self) -> dict[str, Any]:
        """All settings; the FFSplit and propagated-target ones only when on and the grid only when it is a GGUF one,
        so other runs' checkpoints (and their fingerprints) stay as they were."""
        values = asdict(self)
        if not self.ffsplit:
            del values["ffsplit"], values["heavy_bits"]
        if self.target == "layer":
            del values["target"], values["alpha"]
        if not self.grid:
            del values["grid"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "QuantConfig":
        """Settings from a YAML recipe, then `overrides` (e.g. options given on the command line) on top."""
        values = read_yaml(path)
        values.update(overrides or {})
        return cls.from_dict(values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding one mapping; a clear error for a missing or malformed file."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of settings, not {type(values).__name__}")
    return values


def implied_grid(grid: str) -> dict[str, Any]:
    """bits, group_size, sym of a `--grid gguf:TYPE` setting (one scale per group of the type's sub-block)."""
    name = grid.removeprefix("gguf:")
    if not grid.startswith("gguf:") or name not in GGUF_TYPES:
        raise UsageError(f"grid must be gguf:TYPE with TYPE one of {', '.join(GGUF_TYPES)}, got {grid!r}")
    t = gguf_type(name)
    return {"bits": t.bits, "group_size": t.sub, "sym": not t.has_min}


def grid_conflict(grid: str, given: dict[str, Any]) -> str:
    implied = implied_grid(grid)
    what = ", ".join(f"{k}={v}" for k, v in given.items())
    return (f"--grid {grid} sets bits={implied['bits']}, group_size={implied['group_size']}, sym={implied['sym']}; "
            f"it conflicts with {what}: drop --bits/--group-size/--sym")
