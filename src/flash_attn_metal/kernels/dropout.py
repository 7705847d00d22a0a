"""Dropout's random bits: a counter-based RNG in MSL for the kernels and its bit-exact PyTorch twin.

Every element (row, col) of the attention matrix of (batch, head) has one keep bit, a pure function of
(seed, offset, batch, head, row, col): any kernel (forward, dq, dkdv) and any test recomputes it without state.
rows and cols are positions within the sequence (varlen: relative to its cu_seqlens start); head is the query
head; batch is the sequence index.

The generator is Philox-4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
SC'11; Random123's reference constants and known-answer vectors):

    key     = the call's 64-bit seed, as (low word, high word)
    counter = (column word, row >> 1, stream low word, stream high word)
    stream  = offset + batch * nheads + head        (64-bit, wrapping)
    column word = (col >> 4) * 4 + (col >> 1) % 4

One evaluation gives 128 bits: eight 16-bit draws for a tile of 2 rows x 4 columns, rows {2i, 2i + 1} x columns
{16t + 2u, 16t + 2u + 1, 16t + 2u + 8, 16t + 2u + 9}. The tile is shaped after Apple's simdgroup_matrix layout
(kernels/msl.py `fragment_coord`): a lane holds (row, c) and (row, c + 1) of every 8x8 fragment, c even, so
a tile covers a lane's pairs in two fragments side by side (the forward and dq kernels: one evaluation per 4
elements) and, in a transposed fragment (dkdv computes S^T), the lane's two rows (one per 2 elements).

Element (row, col) takes 16-bit half (col % 2) of output word (row % 2) * 2 + (col >> 3) % 2, and is kept iff
that draw >= threshold(p) = round(p * 65536): the fraction dropped is threshold / 65536, within 2^-17 of p.
Kept values are scaled by 1 / (1 - p), as flash-attn does.

Seed and offset are drawn once per call (`draw_seed_offset`) and the backward reuses them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Philox-4x32 (Random123): the round multipliers and the Weyl key increments.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
# Random123's default for Philox-4x32, with a safety margin over the 7 rounds that pass BigCrush (flash-attn's
# CUDA kernels use 7).
PHILOX_ROUNDS = 10
DRAW_BITS = 16  # bits per element: 8 elements per evaluation, threshold resolution 2^-16 (8 bits would miss 0.1%)
DRAW_MAX = 1 << DRAW_BITS
WORD = 0xFFFFFFFF
CPU_SLICE = 1 << 14  # counters per slice of the twin on the CPU



def threshold(p: float) -> int:
    """The 16-bit threshold of drop probability p: a draw below it drops the element."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return min(round(p * DRAW_MAX), DRAW_MAX - 1)


def draw_seed_offset(generator: torch.Generator | None = None) -> tuple[int, int]:
    """A call's (seed, offset), two unsigned 64-bit integers, from `generator` (default: torch's default CPU
    generator, which torch.manual_seed seeds). The CPU generator on every device: the values are kernel
    arguments on the host, so drawing them on MPS would wait for the GPU each call, and the same seed then gives
    the same mask on MPS, in the emulator and on the reference."""
    words = torch.randint(0, 1 << 32, (4,), dtype=torch.int64, generator=generator).tolist()
    return words[0] | words[1] << 32, words[2] | words[3] << 32


def as_int64(value: int) -> int:
    """An unsigned 64-bit value as the signed int64 of the same bits (how the kernels' `long` arguments carry the
    seed and the offset; MSL reads them back with ulong(...))."""
    return value - (1 << 64) if value >= 1 << 63 else value


MSL = f"""// ---- Dropout (kernels/dropout.py): Philox-4x32-{PHILOX_ROUNDS} keyed by (seed, offset, batch, head, row, col). ----
// One evaluation yields eight 16-bit draws for rows {{2i, 2i + 1}} x columns {{16t + 2u, +1, +8, +9}}; an element
// is kept iff its draw >= threshold = round(p * 65536). Integer-only: safe under fast math.
constant uint PHILOX_M0 = 0x{PHILOX_M0:X}u;  // Philox-4x32 round multipliers (Random123)
constant uint PHILOX_M1 = 0x{PHILOX_M1:X}u;
constant uint PHILOX_W0 = 0x{PHILOX_W0:X}u;  // key increments between rounds
constant uint PHILOX_W1 = 0x{PHILOX_W1:X}u;
constant int PHILOX_ROUNDS = {PHILOX_ROUNDS};

// One call's dropout stream for one (sequence, query head); set up once per thread (and per head).
struct DropoutStream {{
  uint2 key;       // the call's 64-bit seed, (low, high)
  uint2 stream;    // offset + batch * nheads + head, 64-bit, (low, high)
  uint threshold;  // a 16-bit draw below it drops the element
}};

inline DropoutStream dropout_stream(ulong seed, ulong offset, uint batch, uint head, uint nheads, uint threshold) {{
  const ulong stream = offset + ulong(batch) * nheads + head;  // the only 64-bit arithmetic, once per stream
  DropoutStream s;
  s.key = uint2(uint(seed), uint(seed >> 32));
  s.stream = uint2(uint(stream), uint(stream >> 32));
  s.threshold = threshold;
  return s;
}}

inline uint4 philox4x32(uint4 counter, uint2 key) {{
  for (int round = 0; round < PHILOX_ROUNDS; ++round) {{
    // Widening 32 x 32 -> 64-bit products: one 8-cycle multiply each on Apple GPUs, where a separate
    // low multiply and mulhi take 12 (metal-benchmarks).
    const ulong p0 = ulong(PHILOX_M0) * counter.x;
    const ulong p1 = ulong(PHILOX_M1) * counter.z;
    counter = uint4(uint(p1 >> 32) ^ counter.y ^ key.x, uint(p1), uint(p0 >> 32) ^ counter.w ^ key.y, uint(p0));
    key += uint2(PHILOX_W0, PHILOX_W1);
  }}
  return counter;
}}

// The 128 bits of the 2 x 4 tile holding element (row, col).
inline uint4 dropout_tile(DropoutStream s, uint row, uint col) {{
  const uint column_word = ((col >> 4) << 2) | ((col >> 1) & 3u);
  return philox4x32(uint4(column_word, row >> 1, s.stream.x, s.stream.y), s.key);
}}

// Elements (row, col), (row, col + 1), (row, col + 8), (row, col + 9); col even with col % 16 < 8: a lane's pairs in
// two fragments side by side. One Philox evaluation per 4 elements.
inline bool4 dropout_keep_row_quad(DropoutStream s, uint row, uint col) {{
  const uint4 bits = dropout_tile(s, row, col);
  const uint2 words = (row & 1u) ? bits.zw : bits.xy;  // (columns col, col + 1), (col + 8, col + 9)
  const uint2 low = words & 0xFFFFu, high = words >> 16;
  return bool4(low.x >= s.threshold, high.x >= s.threshold, low.y >= s.threshold, high.y >= s.threshold);
}}

// Elements (row, col) and (row, col + 1), col even: a lane's pair in one fragment. One evaluation per 2 elements.
inline bool2 dropout_keep_row_pair(DropoutStream s, uint row, uint col) {{
  const uint4 bits = dropout_tile(s, row, col);
  const uint2 words = (row & 1u) ? bits.zw : bits.xy;
  const uint word = (col & 8u) ? words.y : words.x;
  return bool2((word & 0xFFFFu) >= s.threshold, (word >> 16) >= s.threshold);
}}

// Elements (row, col) and (row + 1, col), row even: a lane's pair in a transposed fragment (S^T, rows are
// queries). One evaluation per 2 elements.
inline bool2 dropout_keep_column_pair(DropoutStream s, uint row, uint col) {{
  const uint4 bits = dropout_tile(s, row, col);
  const uint2 words = (col & 8u) ? bits.yw : bits.xz;  // (row, row + 1)
  const uint2 draws = (col & 1u) ? words >> 16 : words & 0xFFFFu;
  return bool2(draws.x >= s.threshold, draws.y >= s.threshold);
}}

// P after dropout: kept elements times scale = 1 / (1 - p), dropped ones 0.
inline float2 dropout_apply(float2 p, bool2 keep, float scale) {{ return select(float2(0.0f), p * scale, keep); }}
"""


# ---- The PyTorch twin: uint32 words held in int64 tensors, every operation exact. ----

def _mulhilo(multiplier: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of multiplier * x, without overflowing int64: x is split into 16-bit halves."""
    low_part = multiplier * (x & 0xFFFF)  # < 2^48
    high_part = multiplier * (x >> 16)  # < 2^48
    middle = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    return (high_part >> 16) + (middle >> 32), middle & WORD


def philox4x32(counter: Sequence[Tensor], key: Sequence[Tensor | int],
               rounds: int = PHILOX_ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32 on broadcastable int64 tensors holding uint32 words: counter (c0, c1, c2, c3), key (k0, k1)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    return c0, c1, c2, c3


def _column_word(col: Tensor) -> Tensor:
    return ((col >> 4) << 2) | ((col >> 1) & 3)


def _draw_word(row: Tensor, col: Tensor) -> Tensor:
    """Which of its tile's four output words holds element (row, col)'s draw (the half is col % 2)."""
    return (row & 1) * 2 + ((col >> 3) & 1)


def _streams(offset: int, nheads: int, batch: Tensor, head: Tensor) -> tuple[Tensor, Tensor]:
    """(low, high) words of offset + batch * nheads + head mod 2^64 (batch * nheads + head < 2^62)."""
    low = (offset & WORD) + batch * nheads + head
    return low & WORD, ((offset >> 32) + (low >> 32)) & WORD


def _philox_words(counter: Sequence[Tensor], seed: int) -> Tensor:
    """Philox of every counter (broadcastable int64 word tensors) under the seed: (..., 4) words. On the CPU, in
    slices whose temporaries stay in cache (an order of magnitude faster than whole tensors)."""
    counter = torch.broadcast_tensors(*counter)
    shape = counter[0].shape
    counter = [c.reshape(-1) for c in counter]
    words = torch.empty((counter[0].numel(), 4), dtype=torch.int64, device=counter[0].device)
    step = CPU_SLICE if words.device.type == "cpu" else max(1, words.shape[0])
    for start in range(0, words.shape[0], step):
        part = philox4x32([c[start : start + step] for c in counter], (seed & WORD, (seed >> 32) & WORD))
        words[start : start + step] = torch.stack(part, dim=-1)
    return words.view(*shape, 4)


def keep(seed: int, offset: int, p: float, nheads: int, batch: Tensor | int, head: Tensor | int, row: Tensor | int,
         col: Tensor | int) -> Tensor:
    """The keep bit of each element (batch, head, row, col) (broadcastable int tensors): the definition, one Philox
    evaluation per element. `keep_grid` computes whole blocks."""
    batch, head, row, col = torch.broadcast_tensors(*(torch.as_tensor(t, dtype=torch.int64) for t in (batch, head, row, col)))
    words = _philox_words((_column_word(col), row >> 1, *_streams(offset, nheads, batch, head)), seed)
    word = words.gather(-1, _draw_word(row, col).unsqueeze(-1)).squeeze(-1)
    return ((word >> (DRAW_BITS * (col & 1))) & (DRAW_MAX - 1)) >= threshold(p)


def keep_grid(seed: int, offset: int, p: float, nheads: int, batches: Sequence[int], rows: range, seqlen_k: int,
              device: torch.device | str = "cpu") -> Tensor:
    """The keep bits of sequences `batches`, every query head, query rows `rows` (a range of step 1) and keys
    0 .. seqlen_k - 1: bool (len(batches), nheads, len(rows), seqlen_k). Each tile is evaluated once; equal to
    `keep` element by element."""
    if rows.step != 1:
        raise ValueError(f"rows must be consecutive, got {rows}")
    batch = torch.as_tensor(list(batches), dtype=torch.int64, device=device).view(-1, 1, 1, 1)
    head = torch.arange(nheads, device=device).view(1, -1, 1, 1)
    first_pair = rows.start >> 1
    pairs = ((rows.stop - 1) >> 1) - first_pair + 1 if len(rows) else 0
    counter = (torch.arange(-(-seqlen_k // 16) * 4, device=device).view(1, 1, 1, -1),  # column words
               torch.arange(first_pair, first_pair + pairs, device=device).view(1, 1, -1, 1),
               *_streams(offset, nheads, batch, head))
    words = _philox_words(counter, seed)  # (batches, nheads, pairs, column words, 4)
    halves = torch.stack((words & (DRAW_MAX - 1), words >> DRAW_BITS), dim=-1) >= threshold(p)
    row = torch.arange(rows.start, rows.stop, device=device).view(-1, 1)
    col = torch.arange(seqlen_k, device=device).view(1, -1)
    return halves[:, :, (row >> 1) - first_pair, _column_word(col), _draw_word(row, col), col & 1]
