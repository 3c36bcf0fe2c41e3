"""Bit packing of b-bit codes (2 <= b <= 8) into int32 words, little-endian within and across words.

Row r's codes c_0, c_1, ... form one bit stream: bit k of code j is bit (j·b + k) of the row, and bit t of the row is
bit (t mod 32) of word t // 32. Codes may straddle two words (3, 5, 6, 7 bits); the last word is zero-padded.
Shape: codes [rows, n] -> packed int32 [rows, ceil(n·b / 32)].
"""
from __future__ import annotations

import torch

__all__ = ["pack", "unpack", "packed_words"]

_ROWS_PER_CHUNK = 1024  # bounds the [rows, n, b] bit tensor for large layers


def packed_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def _check(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    _check(bits)
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    rows, n = codes.shape
    words = packed_words(n, bits)
    if 32 % bits == 0:  # whole fields per word: shift each into place and sum
        per_word = 32 // bits
        fields = torch.nn.functional.pad(codes.to(torch.int64), (0, words * per_word - n)).reshape(rows, words, per_word)
        value = (fields << torch.arange(0, 32, bits, device=codes.device)).sum(-1)
        return (value - ((value >> 31) << 32)).to(torch.int32)
    out = torch.empty(rows, words, dtype=torch.int32, device=codes.device)
    shifts = torch.arange(bits, device=codes.device)
    weights = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(32, device=codes.device)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        c = codes[r0 : r0 + _ROWS_PER_CHUNK].to(torch.int64)
        bitstream = ((c[..., None] >> shifts) & 1).reshape(c.shape[0], n * bits)  # [r, n·b]
        bitstream = torch.nn.functional.pad(bitstream, (0, words * 32 - n * bits))
        value = (bitstream.reshape(c.shape[0], words, 32) * weights).sum(-1)  # [r, words], in [0, 2^32)
        out[r0 : r0 + _ROWS_PER_CHUNK] = (value - ((value >> 31) << 32)).to(torch.int32)  # wrap to signed
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes [rows, n]."""
    _check(bits)
    rows, words = packed.shape
    if words != packed_words(n, bits):
        raise ValueError(f"{words} words cannot hold {n} codes of {bits} bits")
    if 32 % bits == 0:  # no code straddles a word: shift and mask whole fields
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        fields = (packed[..., None] >> shifts) & (2**bits - 1)  # [rows, words, 32/b]
        return fields.reshape(rows, words * per_word)[:, :n].to(torch.uint8)
    shifts = torch.arange(32, device=packed.device)
    out = torch.empty(rows, n, dtype=torch.uint8, device=packed.device)
    weights = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(bits, device=packed.device)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        w = packed[r0 : r0 + _ROWS_PER_CHUNK].to(torch.int64) & 0xFFFFFFFF
        bitstream = ((w[..., None] >> shifts) & 1).reshape(w.shape[0], words * 32)[:, : n * bits]
        out[r0 : r0 + _ROWS_PER_CHUNK] = (bitstream.reshape(w.shape[0], n, bits) * weights).sum(-1).to(torch.uint8)
    return out
