"""GGUF block bytes from our codes and grid fields, laid out as ggml's block structs (ggml-common.h) store them and as
gguf-py's dequantizers (gguf/quants.py) read them. One row of `p` weights becomes p / block consecutive blocks.

  Q4_0  d f16 | qs[16]: byte j = code j | code j+16 << 4                          ŵ = d·(c - 8)
  Q4_1  d f16, m f16 | qs[16] as Q4_0                                             ŵ = d·c + m
  Q5_0  d f16 | qh u32: bit j = bit 4 of code j | qs[16]: low nibbles as Q4_0    ŵ = d·(c - 16)
  Q5_1  d f16, m f16 | qh | qs                                                    ŵ = d·c + m
  Q8_0  d f16 | qs[32] int8 = c - 128                                             ŵ = d·(c - 128)
  Q2_K  scales[16]: sc | m << 4 | qs[64]: byte 32h + l holds codes 128h + 32k + l at bits 2k | d, dmin f16
  Q3_K  hmask[32]: bit k of byte l = bit 2 of code 32k + l | qs[64] low 2 bits as Q2_K | scales[12] (6-bit sc + 32:
        low nibbles of 0..15 in bytes j % 8 (nibble j // 8), high 2 bits in byte 8 + j % 4 at bit 2·(j // 4)) | d f16
  Q4_K  d, dmin f16 | scales[12]: j < 4: byte j = sc_j | (sc_{j+4} >> 4) << 6, byte j+4 = m_j | (m_{j+4} >> 4) << 6,
        byte j+8 = sc_{j+4} & 15 | (m_{j+4} & 15) << 4 | qs[128]: byte 32g + l = code 64g + l | code 64g+32+l << 4
  Q5_K  as Q4_K, then qh[32]: bit k of byte l = bit 4 of code 32k + l, before qs
  Q6_K  ql[128]: byte 64h + i = low nibble of code 128h + i | of code 128h + 64 + i << 4 | qh[64]: bits 2k of byte
        32h + l = bits 4-5 of code 128h + 32k + l | scales[16] int8 | d f16                  ŵ = d·sc·(c - 32)
"""
from __future__ import annotations

import numpy as np

from ..solvers.gguf_grid import GGUF_TYPES

__all__ = ["pack_blocks"]


def _f16(x: np.ndarray) -> np.ndarray:
    """[n] float -> [n, 2] bytes of its fp16 value (exact: the fields are fp16 values already)."""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(c: np.ndarray, step: int) -> np.ndarray:
    """Bytes holding c[..., i] in the low nibble and c[..., i + step] in the high one, for each chunk of 2·step."""
    c = c.reshape(*c.shape[:-1], -1, 2, step)
    return ((c[..., 0, :] & 15) | ((c[..., 1, :] & 15) << 4)).reshape(*c.shape[:-3], -1).astype(np.uint8)


def _bit_planes(bits: np.ndarray, group: int) -> np.ndarray:
    """[n, k·group] of 0/1 -> [n, group] bytes: bit k of byte l is bits[:, k·group + l]."""
    b = bits.reshape(bits.shape[0], -1, group).astype(np.uint8)
    return (b << np.arange(b.shape[1], dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)


def _crumbs(c: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit values -> [n, 64] bytes: byte 32h + l holds values 128h + 32k + l at bits 2k."""
    c = c.reshape(c.shape[0], 2, 4, 32).astype(np.uint8)
    return (c << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2).astype(np.uint8).reshape(-1, 64)


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """[n, 8] 6-bit scales and mins -> [n, 12] bytes (Q4_K / Q5_K)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _q3_scales(field: np.ndarray) -> np.ndarray:
    """[n, 16] 6-bit fields (sc + 32) -> [n, 12] bytes (Q3_K)."""
    f = field.astype(np.uint8)
    low = (f[:, :8] & 15) | ((f[:, 8:] & 15) << 4)  # [n, 8]
    high = (f >> 4).reshape(-1, 4, 4)  # value j = 4a + b at [a, b]: byte 8 + b, bits 2a
    high = (high << (2 * np.arange(4, dtype=np.uint8))[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([low, high], axis=1)


def pack_blocks(name: str, codes: np.ndarray, fields: dict[str, np.ndarray]) -> np.ndarray:
    """Bytes [q, p / block · type_size] of one quantized weight [q, p] of GGUF type `name`.

    codes: uint8 [q, p] (unsigned: Q8_0's 0..255, Q6_K's 0..63). fields: "d" fp16 values [q, p/sub] for the
    32-element types ("m" too for Q4_1/Q5_1), [q, p/256] for the K-quants with their integer "sc" [q, p/sub]
    (signed for Q3_K/Q6_K) and, for Q2_K/Q4_K/Q5_K, "dmin" [q, p/256] and "m" [q, p/sub]."""
    t = GGUF_TYPES[name]
    q, p = codes.shape
    c = codes.reshape(-1, t.block).astype(np.int64)  # [n, block], n = q·p/block
    f = {k: np.asarray(v).reshape(c.shape[0], -1) for k, v in fields.items()}  # per block
    d = _f16(f["d"])
    if name == "q8_0":
        parts = [d, (c - 128).astype(np.int8).view(np.uint8)]
    elif name in ("q4_0", "q4_1"):
        parts = [d] + ([_f16(f["m"])] if t.has_min else []) + [_nibbles(c, 16)]
    elif name in ("q5_0", "q5_1"):
        qh = np.packbits((c >> 4).astype(np.uint8), axis=1, bitorder="little")  # [n, 4]: a little-endian u32
        parts = [d] + ([_f16(f["m"])] if t.has_min else []) + [qh, _nibbles(c, 16)]
    elif name == "q2_k":
        scales = (f["sc"].astype(np.uint8) & 15) | (f["m"].astype(np.uint8) << 4)
        parts = [scales, _crumbs(c & 3), d, _f16(f["dmin"])]
    elif name == "q3_k":
        parts = [_bit_planes(c >> 2, 32), _crumbs(c & 3), _q3_scales(f["sc"] + 32), d]
    elif name in ("q4_k", "q5_k"):
        parts = [d, _f16(f["dmin"]), _k4_scales(f["sc"], f["m"])]
        if name == "q5_k":
            parts.append(_bit_planes(c >> 4, 32))
        parts.append(_nibbles(c, 32))
    elif name == "q6_k":
        ql = _nibbles(c.reshape(-1, 2, 128), 64).reshape(-1, 128)
        qh = _crumbs(c >> 4)
        parts = [ql, qh, f["sc"].astype(np.int8).view(np.uint8), d]
    else:
        raise ValueError(f"no block layout for {name!r}")
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == _type_size(name), (name, blocks.shape)
    return blocks.reshape(q, -1)


def _type_size(name: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]][1]
