"""Split-KV's combine kernel: merges the partial outputs of a forward whose keys were split across threadgroups.

Any split forward (the decode kernels in decode.py; the block forward's split-KV) writes this partial layout:

    part = split * SPLIT_STRIDE + (sequence * NHEADS + head) * MAX_SEQLEN_Q + query_row
    SPLIT_STRIDE = sequences * NHEADS * MAX_SEQLEN_Q
    O_partial[part * HEAD_DIM + c]   fp32: the split's normalised output, sum_j p_j v_j / l_s, for c < HEAD_DIM
                                     (HEAD_DIM: the padded head dim, a multiple of 8; columns at or past the real
                                     head dim may hold anything)
    LSE_partial[part]                fp32, in log2 units: m_s + log2(l_s) (m_s the split's score maximum, l_s its
                                     sum of exp2(s - m_s)); exactly -FLT_MAX for a split that saw no key, whose
                                     O_partial row is then never read

Every split writes every row of its sequence's query rows; rows past a sequence's query count are neither written
nor read. The combine computes, per (query row, head, sequence):

    top = max_s LSE_s,  w_s = exp2(LSE_s - top),  out = sum_s w_s O_s / sum_s w_s,  lse = (top + log2 sum_s w_s) ln 2

and a row whose splits all saw nothing gets out = 0 and lse = +inf. One SIMD group serves a row: lane s holds
split s's LSE (so at most tiles.MAX_SPLITS splits), the maximum and the weights' sum are SIMD reductions, and the lanes
walk the head dim (lane l accumulates columns l, l + 32, ...) while the splits are read one after the other.
"""

from __future__ import annotations

from .tiles import SIMD_WIDTH

# The sentinel of "no score yet" and of a split that saw no key, below every finite score (every kernel's MASKED).
FINITE_MIN = "-FLT_MAX"
HEADS_PER_GROUP = 4  # SIMD groups (heads of one query row) per threadgroup
THREADS = HEADS_PER_GROUP * SIMD_WIDTH

# What the source around `combine_kernel` defines: `input_t`, `constant int HEAD_DIM`, and these names of the
# kernel's `ints` buffer (an enum), besides the `locate` code's own: HEAD_DIM_REAL, O_ROW, O_HEAD, LSE_HEAD,
# NUM_SPLITS, NHEADS, MAX_SEQLEN_Q and SPLIT_STRIDE.


def combine_kernel(name: str, params: str, locate: str, head_dim: int, sinks: bool = False) -> str:
    """MSL of a combine kernel named `name` with the parameter list `params` (its forward's, so one launch binds
    both the same way: O_partial, LSE_partial, O, LSE, STATS (the backward's (m, log2 l), float2) and `ints`
    among them). `locate` is MSL that, given
    `const long batch`, defines `seqlen_q` (this sequence's query rows), and `o_start` and `lse_start` (long: the
    offsets of its first O and LSE elements). `head_dim` is the padded HEAD_DIM. `sinks`: the splits' partials leave
    out the heads' sinks (a `sinks` buffer, with the `has_sink` / `sink_log2` helpers of kernels/msl.py), which
    join the merged denominator here, once."""
    columns = -(-head_dim // SIMD_WIDTH)
    return f"""
// {name}: split-KV combine (kernels/decode_combine.py's layout), one SIMD group per (query row, head, sequence).
[[max_total_threads_per_threadgroup({THREADS})]]
kernel void {name}(
    {params},
    uint3 position [[thread_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]]) {{
  const long batch = position.z;
  const int head = int(position.y), row = int(position.x) / {SIMD_WIDTH};
{locate}
  if (row >= seqlen_q) return;  // the whole SIMD group leaves together
  const int num_splits = int(ints[NUM_SPLITS]);
  const long split_stride = ints[SPLIT_STRIDE];
  const long part = (batch * ints[NHEADS] + head) * ints[MAX_SEQLEN_Q] + row;  // this row in split 0

  // Lane s holds split s's LSE; lanes past the splits and splits that saw no key weigh 0.
  const float split_lse = lane < num_splits ? LSE_partial[part + lane * split_stride] : {FINITE_MIN};
  float top = simd_max(split_lse);{SINK_TOP if sinks else ""}
  const float weight = split_lse == {FINITE_MIN} ? 0.0f : exp2(split_lse - top);
  float total = simd_sum(weight);{SINK_TOTAL if sinks else ""}

  // Lane l accumulates columns l, l + 32, ... of the weighted outputs, one split after the other.
  constexpr int COLUMNS = {columns};  // ceil(HEAD_DIM / 32)
  float acc[COLUMNS];
  #pragma clang loop unroll(full)
  for (int j = 0; j < COLUMNS; ++j) acc[j] = 0.0f;
  for (int s = 0; s < num_splits; ++s) {{
    const float w = simd_shuffle(weight, ushort(s));
    if (w == 0.0f) continue;  // the same for every lane
    device const float* split_out = O_partial + (part + s * split_stride) * HEAD_DIM;
    #pragma clang loop unroll(full)
    for (int j = 0; j < COLUMNS; ++j) {{
      const int c = j * {SIMD_WIDTH} + lane;
      if (c < HEAD_DIM) acc[j] += w * split_out[c];
    }}
  }}

  // out = sum w_s O_s / sum w_s in the input dtype; lse in natural log, +inf for a row that saw no key.
  const int head_dim = int(ints[HEAD_DIM_REAL]);
  const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
  device input_t* out = O + o_start + head * ints[O_HEAD] + row * ints[O_ROW];
  #pragma clang loop unroll(full)
  for (int j = 0; j < COLUMNS; ++j) {{
    const int c = j * {SIMD_WIDTH} + lane;
    if (c < head_dim) out[c] = input_t(acc[j] * inv_total);
  }}
  if (lane == 0) {{
    const long at = lse_start + head * ints[LSE_HEAD] + row;
    LSE[at] = total > 0.0f ? (top + log2(total)) * M_LN2_F : as_type<float>(0x7f800000u);
    STATS[at] = total > 0.0f ? float2(top, log2(total)) : float2(0.0f);  // the backward's statistics
  }}
}}
"""


SINK_TOP = """
  const float sink = sinks[head];  // the head's sink joins the denominator once, here
  if (has_sink(sink)) top = max(top, sink_log2(sink));"""
SINK_TOTAL = """
  if (has_sink(sink)) total += exp2(sink_log2(sink) - top);"""


def combine_grid(max_seqlen_q: int, nheads: int, batch: int) -> tuple[list[int], list[int]]:
    """(threads, group_size) of a combine launch: a SIMD group per (query row, head, sequence)."""
    return [SIMD_WIDTH * max_seqlen_q, nheads, batch], [SIMD_WIDTH, min(HEADS_PER_GROUP, max(nheads, 1)), 1]
