import pytest
import torch

from quantease.checkpoint.packing import pack, packed_words, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 31, 64, 100, 576])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (7, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits * n))
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, packed_words(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


def _bitstring(packed: torch.Tensor) -> str:
    """Row 0's bits, least significant first, word after word."""
    return "".join(format(int(w) & 0xFFFFFFFF, "032b")[::-1] for w in packed[0])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_golden_bit_layout(bits):
    # Code j occupies bits j*b .. j*b+b-1 of the row's stream, least significant bit first.
    codes = torch.tensor([[1, 2**bits - 1, 0, 2]], dtype=torch.uint8)
    expected = "".join(format(int(c), f"0{bits}b")[::-1] for c in codes[0])
    stream = _bitstring(pack(codes, bits))
    assert stream[: 4 * bits] == expected and set(stream[4 * bits :]) <= {"0"}


def test_three_bit_codes_straddle_words():
    codes = torch.full((1, 11), 5, dtype=torch.uint8)  # 33 bits: code 10 starts at bit 30 of word 0
    packed = pack(codes, 3)
    assert packed.shape == (1, 2)
    assert (int(packed[0, 0]) >> 30) & 3 == 5 & 3 and int(packed[0, 1]) & 1 == 5 >> 2
    assert torch.equal(unpack(packed, 3, 11), codes)


def test_pack_rejects_codes_too_wide():
    with pytest.raises(ValueError, match="does not fit"):
        pack(torch.tensor([[16]], dtype=torch.uint8), 4)
