"""Dropout's RNG (kernels/dropout.py): the MSL functions, run in the emulator, against the PyTorch twin bit for
bit; the twin against Random123's known answers; the threshold and the fraction dropped; seed and offset per
call. Each agreement check is paired with a twin that must disagree."""

from __future__ import annotations

import math
import re

import pytest
import torch

from flash_attn_metal.emulator import compile_shader, typecheck
from flash_attn_metal.kernels import dropout

HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"
# Random123's published known-answer vectors for Philox-4x32-10: (counter, key, output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Test kernels over a (batch, head, row, col) grid: args = seed, offset, threshold, nheads, first row, rows, cols.
# Each thread asks one keep function for its elements and writes them where the grid puts them.
TEST_KERNELS = """
kernel void philox_words(device const uint* input, device uint* out, uint i [[thread_position_in_grid]]) {
  device const uint* c = input + 6 * i;  // counter words, then key words
  const uint4 r = philox4x32(uint4(c[0], c[1], c[2], c[3]), uint2(c[4], c[5]));
  out[4 * i] = r.x; out[4 * i + 1] = r.y; out[4 * i + 2] = r.z; out[4 * i + 3] = r.w;
}

inline DropoutStream test_stream(constant long* args, uint bh) {
  return dropout_stream(ulong(args[0]), ulong(args[1]), bh / uint(args[3]), bh % uint(args[3]), uint(args[3]),
                        uint(args[2]));
}

inline device int* element(device int* out, constant long* args, uint bh, uint row, uint col) {
  return out + (long(bh) * args[5] + (row - args[4])) * args[6] + col;
}

// x: a pair of columns of one fragment.
kernel void keep_row_pairs(device int* out, constant long* args, uint3 pos [[thread_position_in_grid]]) {
  const uint row = uint(args[4]) + pos.y, col = 2 * pos.x;
  const bool2 keep = dropout_keep_row_pair(test_stream(args, pos.z), row, col);
  device int* o = element(out, args, pos.z, row, col);
  o[0] = keep[0]; o[1] = keep[1];
}

// x: (16-column tile, lane column pair); the pair and the one 8 columns on.
kernel void keep_row_quads(device int* out, constant long* args, uint3 pos [[thread_position_in_grid]]) {
  const uint row = uint(args[4]) + pos.y, col = 16 * (pos.x / 4) + 2 * (pos.x % 4);
  const bool4 keep = dropout_keep_row_quad(test_stream(args, pos.z), row, col);
  device int* o = element(out, args, pos.z, row, col);
  o[0] = keep[0]; o[1] = keep[1]; o[8] = keep[2]; o[9] = keep[3];
}

// y: a pair of rows (the first row is even).
kernel void keep_column_pairs(device int* out, constant long* args, uint3 pos [[thread_position_in_grid]]) {
  const uint row = uint(args[4]) + 2 * pos.y, col = pos.x;
  const bool2 keep = dropout_keep_column_pair(test_stream(args, pos.z), row, col);
  *element(out, args, pos.z, row, col) = keep[0];
  *element(out, args, pos.z, row + 1, col) = keep[1];
}

kernel void apply_pairs(device const float* p, device const int* keep, device float* out, constant float& scale,
                        uint i [[thread_position_in_grid]]) {
  const float2 kept = dropout_apply(float2(p[2 * i], p[2 * i + 1]), bool2(keep[2 * i], keep[2 * i + 1]), scale);
  out[2 * i] = kept.x; out[2 * i + 1] = kept.y;
}
"""
SOURCE = HEADER + dropout.MSL + TEST_KERNELS

# A grid that exercises the 64-bit parts: seed words with high bits set, an offset whose stream wraps past 2^64
# for the later (batch, head) pairs, rows past 2^20.
SEED, OFFSET = 0xF3C1_59A2_7E04_D8B6, (1 << 64) - 4
BATCHES, HEADS, FIRST_ROW, ROWS, COLS = 2, 3, 1_048_578, 6, 48
P = 0.37


@pytest.fixture(scope="module")
def lib():
    return compile_shader(SOURCE)


def msl_keep(lib, kernel: str, seed: int = SEED, offset: int = OFFSET) -> torch.Tensor:
    out = torch.full((BATCHES * HEADS, ROWS, COLS), -1, dtype=torch.int32)
    args = [dropout.as_int64(seed), dropout.as_int64(offset), dropout.threshold(P), HEADS, FIRST_ROW, ROWS, COLS]
    threads = {"keep_row_pairs": [COLS // 2, ROWS, BATCHES * HEADS], "keep_row_quads": [COLS // 4, ROWS, BATCHES * HEADS],
               "keep_column_pairs": [COLS, ROWS // 2, BATCHES * HEADS]}[kernel]
    getattr(lib, kernel)(out, args, threads=threads, group_size=[8, 1, 1])
    assert (out >= 0).all(), "every element written"
    return out.view(BATCHES, HEADS, ROWS, COLS).bool()


def twin_keep(seed: int = SEED, offset: int = OFFSET, nheads: int = HEADS) -> torch.Tensor:
    return dropout.keep_grid(seed, offset, P, nheads, range(BATCHES), range(FIRST_ROW, FIRST_ROW + ROWS), COLS)


def words(values) -> torch.Tensor:
    """uint32 values as the int32 tensor of the same bits."""
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


def test_msl_is_valid_metal():
    typecheck(SOURCE)


def test_msl_is_integer_only_and_safe_under_fast_math():
    assert not re.search(r"isnan|isinf|isfinite|INFINITY|NAN", dropout.MSL)
    assert re.search(r"isnan|isinf", dropout.MSL + "if (isnan(x)) return;")  # the check can fail


def test_twin_philox_gives_random123_known_answers():
    for counter, key, expected in KNOWN_ANSWERS:
        out = dropout.philox4x32([torch.tensor(c) for c in counter], key)
        assert [int(w) for w in out] == list(expected)
        fewer = dropout.philox4x32([torch.tensor(c) for c in counter], key, rounds=dropout.PHILOX_ROUNDS - 1)
        assert [int(w) for w in fewer] != list(expected)


def test_msl_philox_matches_the_twin_and_the_known_answers(lib):
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(0, 1 << 32, (64, 6), dtype=torch.int64, generator=generator)
    rows = [list(c) + list(k) for c, k, _ in KNOWN_ANSWERS] + random.tolist()
    out = torch.zeros(4 * len(rows), dtype=torch.int32)
    lib.philox_words(words([w for row in rows for w in row]), out, threads=[len(rows)], group_size=[8])
    got = (out.to(torch.int64) & dropout.WORD).view(-1, 4)
    assert got[:3].tolist() == [list(expected) for *_, expected in KNOWN_ANSWERS]
    table = torch.tensor(rows)
    twin = torch.stack(dropout.philox4x32(table[:, :4].unbind(1), table[:, 4:].unbind(1)), dim=1)
    assert torch.equal(got, twin)
    assert not torch.equal(got[3:], twin[3:].roll(1, 0))


@pytest.mark.parametrize("kernel", ["keep_row_pairs", "keep_row_quads", "keep_column_pairs"])
def test_msl_keep_bits_match_the_twin_bit_for_bit(lib, kernel):
    keep = msl_keep(lib, kernel)
    assert torch.equal(keep, twin_keep())
    # Twins keyed differently must disagree: the next offset, a changed seed high word, another head count.
    for other in (twin_keep(offset=(OFFSET + 1) % (1 << 64)), twin_keep(seed=SEED ^ 1 << 40), twin_keep(nheads=4)[:, :3]):
        assert not torch.equal(keep, other)


def test_msl_keep_bits_follow_seed_and_offset(lib):
    keep = msl_keep(lib, "keep_row_pairs")
    assert torch.equal(msl_keep(lib, "keep_row_pairs"), keep)
    assert not torch.equal(msl_keep(lib, "keep_row_pairs", offset=OFFSET - 1), keep)
    assert not torch.equal(msl_keep(lib, "keep_row_pairs", seed=SEED + 1), keep)


def test_msl_apply_scales_kept_and_zeroes_dropped(lib):
    p = torch.rand(64)
    keep = (torch.arange(64) % 3 != 0).to(torch.int32)
    out = torch.zeros(64)
    lib.apply_pairs(p, keep, out, 1.25, threads=[32], group_size=[8])
    assert torch.equal(out, torch.where(keep.bool(), p * 1.25, 0.0))


def test_grid_equals_the_element_definition():
    b = torch.arange(BATCHES).view(-1, 1, 1, 1)
    h = torch.arange(HEADS).view(1, -1, 1, 1)
    r = torch.arange(FIRST_ROW, FIRST_ROW + ROWS).view(1, 1, -1, 1)
    c = torch.arange(COLS).view(1, 1, 1, -1)
    assert torch.equal(dropout.keep(SEED, OFFSET, P, HEADS, b, h, r, c), twin_keep())
    assert not torch.equal(dropout.keep(SEED, OFFSET, P, HEADS, b, h, r + 2, c), twin_keep())
    # odd first rows and column counts that end inside a tile
    grid = dropout.keep_grid(SEED, 0, P, 2, [1], range(3, 10), 21)
    assert torch.equal(grid, dropout.keep(SEED, 0, P, 2, 1, h[:, :2], torch.arange(3, 10).view(-1, 1), torch.arange(21)))


@pytest.mark.parametrize("p", [0.0, 0.01, 0.1, 0.17, 0.3, 1 / 3, 0.5, 0.9, 0.999, 0.99999])
def test_the_fraction_the_threshold_drops_is_within_2_to_the_minus_17_of_p(p):
    assert abs(dropout.threshold(p) / dropout.DRAW_MAX - p) <= 2**-17


def test_eight_bit_draws_would_miss_p_by_more_than_a_thousandth():
    """Why the draws are 16 bits: flash-attn's CUDA kernels keep an element iff its byte <= floor(255 (1 - p)),
    which drops 0.1719 of the elements for p = 0.17."""
    p = 0.17
    assert abs(1 - (math.floor(255 * (1 - p)) + 1) / 256 - p) > 1e-3
    assert abs(dropout.threshold(p) / dropout.DRAW_MAX - p) < 1e-5


def test_threshold_rejects_p_outside_the_unit_interval():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            dropout.threshold(p)


@pytest.mark.parametrize("p", [0.1, 0.17, 0.5, 0.9])
def test_dropped_fraction_is_within_one_percent_of_p(p):
    keep = dropout.keep_grid(*dropout.draw_seed_offset(torch.Generator().manual_seed(1)), p, 4, range(2), range(0, 256), 512)
    dropped = 1.0 - keep.float().mean().item()  # over 2^20 elements
    assert abs(dropped - p) <= 0.01
    assert all(abs(dropped - other) > 0.01 for other in (0.1, 0.17, 0.5, 0.9) if other != p)


def test_neighbouring_bits_are_independent():
    """P(both kept) is (1 - p)^2 for the elements one draw apart in every direction the tiles pack them:
    the next column, 8 columns on, the next row, another head, another sequence."""
    p = 0.5
    keep = dropout.keep_grid(*dropout.draw_seed_offset(torch.Generator().manual_seed(2)), p, 2, range(2), range(256), 512).float()
    pairs = {"column": (keep[..., :-1], keep[..., 1:]), "8 columns": (keep[..., :-8], keep[..., 8:]),
             "row": (keep[:, :, :-1], keep[:, :, 1:]), "head": (keep[:, 0], keep[:, 1]), "batch": (keep[0], keep[1])}
    for name, (a, b) in pairs.items():
        assert abs((a * b).mean().item() - (1 - p) ** 2) < 0.01, name
    assert abs((keep * keep).mean().item() - (1 - p) ** 2) > 0.1  # an element with itself: not independent


def test_seed_and_offset_come_from_the_default_generator():
    torch.manual_seed(123)
    first = [dropout.draw_seed_offset() for _ in range(2)]
    torch.manual_seed(123)
    again = [dropout.draw_seed_offset() for _ in range(2)]
    assert first == again and first[0] != first[1]
    assert all(0 <= v < 1 << 64 for pair in first for v in pair)
    assert max(v for pair in first for v in pair) >= 1 << 32  # both words drawn
    assert [dropout.as_int64(v) % (1 << 64) for v in first[0]] == list(first[0])
    assert all(-(1 << 63) <= dropout.as_int64(v) < 1 << 63 for v in first[0])
