"""AWQ GEMM and GPTQ packing: exact round trips, and hand-computed int32 words for known codes."""
import pytest
import torch

from lowbit.formats import awq_format, gptq_format

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ awq/modules/linear/gemm.py `order_map`


def u32(x: int) -> int:
    return x & 0xFFFFFFFF


def test_awq_word_for_codes_0_to_7():
    # nibble i (bits 4i..4i+3) holds output column AWQ_ORDER[i]; column c has code c
    expected = sum(AWQ_ORDER[i] << (4 * i) for i in range(8))
    assert expected == 0x75316420
    codes = torch.arange(8, dtype=torch.uint8)[:, None].expand(8, 64)  # [out=8, in=64], row o = code o
    t = awq_format.pack(codes, torch.ones(8, 1), torch.full((8, 1), 3, dtype=torch.int32))
    assert t["qweight"].shape == (64, 1) and t["qweight"].dtype == torch.int32
    assert {u32(w) for w in t["qweight"].flatten().tolist()} == {0x75316420}
    assert u32(t["qzeros"].item()) == 0x33333333  # zeros stored as is (no minus one in AWQ)
    assert t["scales"].shape == (1, 8) and t["scales"].dtype == torch.float16


def test_gptq_words_for_known_codes():
    # 4 bits: value j of a word at shift 4j, packed along the input dimension
    codes = (torch.arange(32) % 8).to(torch.uint8)[None].expand(32, 32)  # [out=32, in=32]
    t = gptq_format.pack(codes, torch.ones(32, 1), torch.full((32, 1), 8, dtype=torch.int32), 4, -1)
    assert t["qweight"].shape == (4, 32)
    assert {u32(w) for w in t["qweight"].flatten().tolist()} == {0x76543210}
    assert {u32(w) for w in t["qzeros"].flatten().tolist()} == {0x77777777}  # v1 stores zero - 1 = 7
    assert t["g_idx"].tolist() == [0] * 32
    # 2 bits: 16 values per word; 8 bits: 4 per word
    two = gptq_format.pack_last(torch.tensor([[0, 1, 2, 3] * 8]), 2)
    assert [u32(w) for w in two[0].tolist()] == [0xE4E4E4E4, 0xE4E4E4E4]
    eight = gptq_format.pack_last(torch.tensor([[1, 2, 3, 4] * 8]), 8)
    assert [u32(w) for w in eight[0].tolist()] == [0x04030201] * 8


def test_gptq_3bit_values_straddle_words():
    # AutoGPTQ's 3-bit scheme: 32 values in 3 words; value 10 has its low two bits at 30..31 of
    # word 0 and its high bit at bit 0 of word 1; value 21 has bit 31 of word 1 and bits 0..1 of word 2
    v = torch.zeros(1, 32, dtype=torch.int64)
    v[0, 10] = 0b111
    assert [u32(w) for w in gptq_format.pack_last(v, 3)[0].tolist()] == [0xC0000000, 0x1, 0x0]
    v = torch.zeros(1, 32, dtype=torch.int64)
    v[0, 21] = 0b111
    assert [u32(w) for w in gptq_format.pack_last(v, 3)[0].tolist()] == [0x0, 0x80000000, 0x3]
    v = torch.zeros(1, 32, dtype=torch.int64)
    v[0, 0], v[0, 9], v[0, 11], v[0, 22], v[0, 31] = 1, 5, 3, 6, 7
    expected = [1 | 5 << 27, 3 << 1, 6 << 2 | 7 << 29]
    assert [u32(w) for w in gptq_format.pack_last(v, 3)[0].tolist()] == expected


def _random_qweight(out_f, in_f, bits, group, seed, g_idx=False):
    gen = torch.Generator().manual_seed(seed)
    n_groups = 1 if group == -1 else in_f // group
    codes = torch.randint(0, 2 ** bits, (out_f, in_f), generator=gen).to(torch.uint8)
    zeros = torch.randint(0, 2 ** bits, (out_f, n_groups), generator=gen).to(torch.int32)
    zeros[0, 0] = 0  # the v1 "zero - 1" wrap case
    scales = torch.rand(out_f, n_groups, generator=gen).half().float()  # fp16-exact
    gi = None
    if g_idx:
        gi = (torch.randperm(in_f, generator=gen) // (in_f // n_groups)).to(torch.int32)
    return codes, scales, zeros, gi


@pytest.mark.parametrize("group", [32, -1])
def test_awq_round_trip(group):
    codes, scales, zeros, _ = _random_qweight(64, 128, 4, group, 0)
    t = awq_format.pack(codes, scales, zeros)
    assert {k: tuple(v.shape) for k, v in t.items()} == awq_format.shapes(128, 64, group)
    c, s, z = awq_format.unpack(t["qweight"], t["qzeros"], t["scales"])
    assert torch.equal(c, codes) and torch.equal(z, zeros) and torch.equal(s.float(), scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_round_trip(bits, act_order):
    codes, scales, zeros, g_idx = _random_qweight(96, 256, bits, 64, bits, g_idx=act_order)
    t = gptq_format.pack(codes, scales, zeros, bits, 64, g_idx)
    assert {k: tuple(v.shape) for k, v in t.items()} == gptq_format.shapes(256, 96, bits, 64)
    c, s, z, g = gptq_format.unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert torch.equal(c, codes) and torch.equal(z, zeros) and torch.equal(s.float(), scales)
    assert torch.equal(g, g_idx if act_order else torch.arange(256, dtype=torch.int32) // 64)


def test_gptq_zero_of_zero_is_masked_not_spilled():
    zeros = torch.zeros(32, 1, dtype=torch.int32)
    zeros[1] = 5
    t = gptq_format.pack(torch.zeros(32, 32, dtype=torch.uint8), torch.ones(32, 1), zeros, 4, -1)
    # zero 0 stores (0 - 1) & 0xF = 0xF in its own nibble only; zero 5 stores 4 next to it
    assert u32(t["qzeros"][0, 0].item()) == 0xFFFFFF4F
    _, _, z, _ = gptq_format.unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
    assert torch.equal(z, zeros)


def test_gptq_v2_stores_zeros_as_is():
    zeros = torch.full((32, 1), 3, dtype=torch.int32)
    t = gptq_format.pack(torch.zeros(32, 32, dtype=torch.uint8), torch.ones(32, 1), zeros, 4, -1, zero_offset=0)
    assert {u32(w) for w in t["qzeros"].flatten().tolist()} == {0x33333333}
    _, _, z, _ = gptq_format.unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, zero_offset=0)
    assert torch.equal(z, zeros)


def test_layouts_refuse_what_they_cannot_hold():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="7-bit"):
        gptq_format.pack_last(torch.zeros(1, 32), 7)
    with pytest.raises(LowbitError, match="multiple of 32"):
        gptq_format.pack(torch.zeros(32, 40, dtype=torch.uint8), torch.ones(32, 1), torch.ones(32, 1), 4, -1)
    with pytest.raises(LowbitError, match="multiple of 8"):
        awq_format.pack_cols(torch.zeros(4, 12))
