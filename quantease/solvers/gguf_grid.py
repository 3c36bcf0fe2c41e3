"""GGUF's weight types as grids the solvers optimize over (llama.cpp ggml-quants.c; gguf-py quants.py).

Every type dequantizes each row block by block as  ŵ = S · c - O  with integer codes c and, per group of `sub` weights:

    Q4_0 Q5_0 Q8_0    S = d (fp16 per 32)                      O = S · 2^(b-1)   our symmetric integer grid, group 32
    Q4_1 Q5_1         S = d (fp16 per 32)                      O = -m            ŵ = d·c + m, m an fp16 minimum
    Q2_K Q4_K Q5_K    S = d · sc   (d fp16 per 256,            O = dmin · m      sc, m unsigned 4-bit (Q2_K, per 16)
                                    sc per sub-block)                            or 6-bit (per 32)
    Q3_K Q6_K         S = d · sc   (sc signed 6/8-bit per 16)  O = S · 2^(b-1)

Every product is exact in fp32 (fp16's 11 significant bits × a sub-scale of at most 7 bits × a code of at most
6 bits fit in 24), so ŵ = fl(S·c - O) is one correctly rounded subtraction whatever order a dequantizer multiplies in:
ours (Grid.dequantize), gguf's numpy and llama.cpp's C give the same bits.

Fits (llama.cpp's reference quantizers, vectorized over the rows):
  Q4_0/Q5_0   d = (the signed largest weight) / -2^(b-1) per block of 32; Q8_0 d = max|w| / 127.
  Q4_1/Q5_1   d = (max - min) / maxq, m = min per block of 32.
              With clip="mse" the 32-element types search shrunk scales (ranges, about their middle) for the least
              Σ_jj-weighted error.
  K-quants    each sub-block's scale (and min ≤ 0) by weighted least squares over candidate scales
              (make_qkx2_quants / make_qx_quants), then per super-block d = fp16(max scale / levels) and each
              sub-scale to the nearest multiple of d (levels 63, 15 for Q2_K; signed: -32 and -128 at the largest).
              Weights are llama.cpp's without an importance matrix (|x| + rms(x) for Q4_K/Q5_K, |x| for Q2_K, x² for
              the symmetric types); with clip="mse" they are its importance weights with diag Σ as the importance
              matrix, Σ_jj · sqrt(σ² + x_j²), σ² = 2 · mean x² over the super-block.
A sub-scale of 0 (a sub-block far below the super-block's largest) is raised to 1: S = 0 would leave no grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import Grid, GridSpec

__all__ = ["GGUFType", "GGUF_TYPES", "gguf_type", "check_spec", "fallback_spec", "fit_gguf_grid", "grid_from_params"]

_TINY = 2.0**-24  # smallest positive fp16: the scale of an all-zero block, so w / S stays finite
_FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class GGUFType:
    name: str  # "q4_k": `--grid gguf:q4_k`; upper-cased, the GGML type
    bits: int  # bits per code
    block: int  # weights per stored block (a row must be a multiple)
    sub: int  # weights sharing one scale (and minimum)
    has_min: bool  # a fitted float offset O (else symmetric around code 2^(b-1))
    sub_bits: int = 0  # bits of a quantized sub-block scale/min; 0: the 32-element types' own fp16 d
    fallback: str = ""  # type for rows that are not a multiple of `block` (llama.cpp's llama-quant.cpp rule)
    search: tuple[float, float, int, bool] = (0.0, 0.0, 0, False)  # K with min: rmin, rdelta, nstep, absolute error

    @property
    def kind(self) -> str:
        """"int" (our symmetric integer grid), "min" (fp16 minimum per 32) or "k" (super-blocks of 256)."""
        return "k" if self.block == 256 else "min" if self.has_min else "int"

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def zero(self) -> int:
        """Code of 0 in the symmetric types."""
        return 2 ** (self.bits - 1)

    @property
    def signed_sub(self) -> bool:
        return self.kind == "k" and not self.has_min

    def check_columns(self, columns: int) -> None:
        if columns % self.block:
            raise ValueError(f"gguf:{self.name} needs rows whose length is a multiple of {self.block}, got {columns}")

    def spec(self, clip: str = "minmax") -> GridSpec:
        return GridSpec(bits=self.bits, group_size=self.sub, sym=not self.has_min, clip=clip, gguf=self.name)


GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("q4_0", 4, 32, 32, False),
    GGUFType("q5_0", 5, 32, 32, False),
    GGUFType("q8_0", 8, 32, 32, False),
    GGUFType("q4_1", 4, 32, 32, True),
    GGUFType("q5_1", 5, 32, 32, True),
    # llama.cpp falls back from Q2_K/Q3_K to IQ4_NL, a non-uniform grid no affine grid expresses: we take Q4_0,
    # the same 4.5 bits per weight
    GGUFType("q2_k", 2, 256, 16, True, 4, "q4_0", (-0.5, 0.1, 15, True)),
    GGUFType("q3_k", 3, 256, 16, False, 6, "q4_0"),
    GGUFType("q4_k", 4, 256, 32, True, 6, "q5_0", (-1.0, 0.1, 20, False)),
    GGUFType("q5_k", 5, 256, 32, True, 6, "q5_1", (-0.5, 0.1, 15, False)),
    GGUFType("q6_k", 6, 256, 16, False, 8, "q8_0"),
)}


def gguf_type(name: str) -> GGUFType:
    try:
        return GGUF_TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GGUF type {name!r}; available: {', '.join(GGUF_TYPES)}") from None


def check_spec(spec: GridSpec) -> None:
    """A GGUF spec's bits, group size and symmetry must be its type's."""
    t = gguf_type(spec.gguf)
    if (spec.bits, spec.group_size, spec.sym) != (t.bits, t.sub, not t.has_min):
        raise ValueError(f"gguf:{t.name} is {t.bits}-bit, {t.sub} weights per scale, "
                         f"{'asymmetric' if t.has_min else 'symmetric'}; got bits={spec.bits}, "
                         f"group_size={spec.group_size}, sym={spec.sym}")


def fallback_spec(spec: GridSpec, columns: int) -> tuple[GridSpec, str | None]:
    """The spec for a layer with `columns` inputs, and a note when a K-quant row falls back to a 32-element type."""
    t = gguf_type(spec.gguf)
    if columns % t.block == 0 or not t.fallback:
        return spec, None
    fb = GGUF_TYPES[t.fallback]
    fb.check_columns(columns)
    return fb.spec(spec.clip), (f"gguf:{t.name} needs rows of {t.block}; {columns} inputs take gguf:{fb.name} "
                                f"(llama.cpp's fallback{'' if t.name not in ('q2_k', 'q3_k') else ' is IQ4_NL'})")


def fit_gguf_grid(W: torch.Tensor, spec: GridSpec, sigma_diag: torch.Tensor | None = None) -> Grid:
    """The grid of a GGUF "min" or "k" type fitted to W [q, p] (the module docstring)."""
    t = gguf_type(spec.gguf)
    t.check_columns(W.shape[1])
    W = W.float()
    if t.kind == "int":
        return _fit_sym(W, t, spec, sigma_diag)
    if t.kind == "min":
        return _fit_min(W, t, spec, sigma_diag)
    params = _fit_k_params(W, t, spec.clip == "mse", sigma_diag)
    return grid_from_params(t, params, W.shape[1])


def grid_from_params(t: GGUFType, params: dict[str, torch.Tensor], columns: int) -> Grid:
    """The Grid of a K-quant from its fields: d, dmin [q, p/256] (fp16 values) and sc, m [q, p/sub] (integers).
    The one place S = d·sc and O = dmin·m are computed, for the fit and for the reload alike."""
    d = params["d"].float()
    sc = params["sc"].float()
    q, G = sc.shape
    per = t.block // t.sub
    S = (d[:, :, None] * sc.reshape(q, -1, per)).reshape(q, G)  # exact
    g_idx = torch.arange(columns, device=d.device) // t.sub
    if not t.has_min:
        return Grid(S, torch.full_like(S, t.zero), g_idx, t.maxq, params=params)
    O = (params["dmin"].float()[:, :, None] * params["m"].float().reshape(q, -1, per)).reshape(q, G)  # exact
    return Grid(S, O / S, g_idx, t.maxq, offset=O, params=params)


# ---- 32-element types ------------------------------------------------------------------------------------------------

def _mse_weight(sigma_diag: torch.Tensor | None, p: int, device: torch.device) -> torch.Tensor:
    weight = torch.ones(p, device=device) if sigma_diag is None else sigma_diag.float().clamp(min=0)
    return weight.reshape(1, -1, 32)


def _sym_scale(xmax: torch.Tensor, t: GGUFType) -> torch.Tensor:
    """d (fp16 values, ≠ 0) of Q4_0/Q5_0 (the signed largest weight on code 0, i.e. d = max / -2^(b-1), which uses
    the grid's one extra negative level) and Q8_0 (d = max|w| / 127)."""
    d = xmax.abs() / (t.zero - 1) if t.bits == 8 else xmax / -t.zero
    d = d.clamp(-_FP16_MAX, _FP16_MAX).half().float()
    return torch.where(d != 0, d, torch.full_like(d, _TINY))


def _fit_sym(W: torch.Tensor, t: GGUFType, spec: GridSpec, sigma_diag: torch.Tensor | None) -> Grid:
    """Q4_0 / Q5_0 / Q8_0: llama.cpp's scale per block of 32 (clip="mse": the least Σ_jj-weighted error among
    shrunk scales). An integer grid with zero 2^(b-1); d may be negative."""
    q, p = W.shape
    Wg = W.reshape(q, p // t.block, t.block)  # [q, G, 32]
    xmax = Wg.gather(2, Wg.abs().argmax(dim=2, keepdim=True)).squeeze(2)  # [q, G] signed
    d = _sym_scale(xmax, t)
    if spec.clip == "mse":
        weight, best = _mse_weight(sigma_diag, p, W.device), torch.full_like(d, float("inf"))
        for i in range(spec.clip_steps + 1):
            di = _sym_scale(xmax * (1 - (1 - spec.clip_min_ratio) * i / spec.clip_steps), t)
            codes = torch.clamp(torch.round(Wg / di[..., None]) + t.zero, 0, t.maxq)
            err = (((codes - t.zero) * di[..., None] - Wg) ** 2 * weight).sum(dim=2)  # [q, G]
            better = err < best
            best, d = torch.where(better, err, best), torch.where(better, di, d)
    g_idx = torch.arange(p, device=W.device) // t.block
    return Grid(d, torch.full_like(d, t.zero), g_idx, t.maxq)


def _min_grid(lo: torch.Tensor, hi: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d, m (fp16 values in fp32) putting [lo, hi] on codes 0..maxq."""
    lo, hi = lo.clamp(-_FP16_MAX, _FP16_MAX), hi.clamp(-_FP16_MAX, _FP16_MAX)
    d = ((hi - lo) / maxq).clamp(max=_FP16_MAX).half().float()
    return torch.where(d > 0, d, torch.full_like(d, _TINY)), lo.half().float()


def _fit_min(W: torch.Tensor, t: GGUFType, spec: GridSpec, sigma_diag: torch.Tensor | None) -> Grid:
    q, p = W.shape
    Wg = W.reshape(q, p // t.block, t.block)  # [q, G, 32]
    lo, hi = Wg.amin(dim=2), Wg.amax(dim=2)
    d, m = _min_grid(lo, hi, t.maxq)
    if spec.clip == "mse":
        weight = _mse_weight(sigma_diag, p, W.device)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        best = torch.full_like(d, float("inf"))
        for i in range(spec.clip_steps + 1):
            ratio = 1 - (1 - spec.clip_min_ratio) * i / spec.clip_steps
            di, mi = _min_grid(mid - half * ratio, mid + half * ratio, t.maxq)
            codes = torch.clamp(torch.round((Wg - mi[..., None]) / di[..., None]), 0, t.maxq)
            err = ((codes * di[..., None] + mi[..., None] - Wg) ** 2 * weight).sum(dim=2)  # [q, G]
            better = err < best
            best, d, m = torch.where(better, err, best), torch.where(better, di, d), torch.where(better, mi, m)
    g_idx = torch.arange(p, device=W.device) // t.block
    return Grid(d, -m / d, g_idx, t.maxq, offset=-m)


# ---- K-quants --------------------------------------------------------------------------------------------------------

def _weights(X: torch.Tensor, t: GGUFType, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-weight fitting weights [q, nb, ns, sub] (see the module docstring)."""
    if importance is not None:
        sigma2 = 2 * (X**2).mean(dim=(2, 3), keepdim=True)
        return importance * torch.sqrt(sigma2 + X**2)
    if not t.has_min:
        return X**2
    if t.name == "q2_k":
        return X.abs()
    return torch.sqrt((X**2).mean(dim=3, keepdim=True)) + X.abs()


def _fit_scale_min(X: torch.Tensor, w: torch.Tensor, t: GGUFType) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ≥ 0 and subtracted minimum ≥ 0 of each sub-block of X [.., sub]: min-max, then weighted least squares
    of (scale, min) for the codes of each candidate scale (nmax + rmin + k·rdelta) / range, keeping the best."""
    rmin, rdelta, nstep, mad = t.search
    nmax = t.maxq
    lo, hi = X.amin(dim=-1).clamp(max=0), X.amax(dim=-1)  # [..]
    rng = hi - lo
    live = rng > 0
    safe = torch.where(live, rng, torch.ones_like(rng))
    sw, swx = w.sum(dim=-1), (w * X).sum(dim=-1)

    def error(scale: torch.Tensor, mn: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = scale[..., None] * L + mn[..., None] - X
        return (w * (diff.abs() if mad else diff**2)).sum(dim=-1)

    def codes(iscale: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(iscale[..., None] * (X - lo[..., None])), 0, nmax)

    scale, mn = torch.where(live, rng / nmax, torch.zeros_like(rng)), lo
    best = error(scale, mn, codes(nmax / safe))
    for k in range(nstep + 1):
        L = codes((rmin + rdelta * k + nmax) / safe)
        sl, sl2, sxl = (w * L).sum(dim=-1), (w * L * L).sum(dim=-1), (w * L * X).sum(dim=-1)
        D = sw * sl2 - sl * sl
        ok = live & (D > 0)
        D = torch.where(ok, D, torch.ones_like(D))
        this_scale, this_min = (sw * sxl - swx * sl) / D, (sl2 * swx - sl * sxl) / D
        positive = this_min > 0  # the range must reach 0: refit the scale alone with min = 0
        this_scale = torch.where(positive, sxl / sl2.clamp(min=1e-30), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = error(this_scale, this_min, L)
        better = ok & (err < best) & (this_scale > 0)
        best = torch.where(better, err, best)
        scale, mn = torch.where(better, this_scale, scale), torch.where(better, this_min, mn)
    return scale, -mn


def _fit_scale_sym(X: torch.Tensor, w: torch.Tensor, t: GGUFType) -> torch.Tensor:
    """Signed scale of each sub-block of X [.., sub] on codes -nmax..nmax-1 (nmax = 2^(b-1)): the largest |x| goes
    to -nmax, then the weighted least-squares scale of the best of the candidates (nmax + k/10) / max|x|."""
    nmax = t.zero
    xmax = X.gather(-1, X.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # [..] signed
    live = xmax.abs() > 1e-15
    safe = torch.where(live, xmax, torch.ones_like(xmax))
    scale, best = torch.zeros_like(xmax), torch.full_like(xmax, -1.0)
    for k in range(-9, 10):
        L = torch.clamp(torch.round(-(nmax + 0.1 * k) / safe[..., None] * X), -nmax, nmax - 1)
        slx, sl2 = (w * X * L).sum(dim=-1), (w * L * L).sum(dim=-1)
        score = torch.where(sl2 > 0, slx * slx / sl2.clamp(min=1e-30), torch.full_like(sl2, -1.0))  # Σw x² - error
        better = live & (score > best)
        best = torch.where(better, score, best)
        scale = torch.where(better, slx / sl2.clamp(min=1e-30), scale)
    return scale


def _super_scale(values: torch.Tensor, levels: int, lowest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d [q, nb] (fp16 values) and the integers l ∈ [lowest, levels] with l·d nearest to each values [q, nb, ns] ≥ 0."""
    d = (values.amax(dim=-1) / levels).clamp(max=_FP16_MAX).half().float()
    d = torch.where(d > 0, d, torch.full_like(d, _TINY))
    return d, torch.clamp(torch.round(values / d[..., None]), lowest, levels)


def _super_scale_signed(scale: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d [q, nb] and signed l ∈ [-half, half - 1] \\ {0}: the sub-block scale of largest |.| gets l = -half."""
    smax = scale.gather(-1, scale.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # [q, nb]
    d = (-smax / half).clamp(-_FP16_MAX, _FP16_MAX).half().float()
    d = torch.where(d != 0, d, torch.full_like(d, _TINY))
    l = torch.clamp(torch.round(scale / d[..., None]), -half, half - 1)
    return d, torch.where(l == 0, torch.ones_like(l), l)


def _fit_k_params(W: torch.Tensor, t: GGUFType, mse: bool, sigma_diag: torch.Tensor | None) -> dict[str, torch.Tensor]:
    q, p = W.shape
    nb, ns = p // t.block, t.block // t.sub
    X = W.reshape(q, nb, ns, t.sub)
    importance = None
    if mse and sigma_diag is not None:
        importance = sigma_diag.float().clamp(min=0).reshape(1, nb, ns, t.sub)
    w = _weights(X, t, importance)
    if t.has_min:
        scale, mn = _fit_scale_min(X, w, t)  # [q, nb, ns]
        levels = 2**t.sub_bits - 1
        d, sc = _super_scale(scale, levels, 1)
        dmin, m = _super_scale(mn, levels, 0)
        return {"d": d, "sc": sc.long().reshape(q, -1), "dmin": dmin, "m": m.long().reshape(q, -1)}
    d, sc = _super_scale_signed(_fit_scale_sym(X, w, t), 2 ** (t.sub_bits - 1))
    return {"d": d, "sc": sc.long().reshape(q, -1)}
