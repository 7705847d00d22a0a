"""The vector (decode) kernels, generated as MSL from a `DecodeSpec`: attention for calls of at most a few query
rows per sequence (decode.py plans their launches).

Decoding reads the whole K/V cache for a handful of query rows, so its speed limit is memory bandwidth. The
kernels read each K and V element once per K/V head, straight from device memory into registers:

    one threadgroup of SIMDGROUPS SIMD groups per (row block and key split, K/V head, sequence)
    its rows: the (query row, head) pairs of the K/V head's query heads (GQA: the whole group at once)
    SIMD group = (row group, key group): ROWS of the rows, and a contiguous share of the split's keys
    lanes across the head dim: lane l holds columns c * 32 * VEC + l * VEC .. + VEC - 1 of q, k, v and o (fp32)
    for each key of the SIMD group's share:
        k, v <- the key's row (VEC-wide loads);  s_r = simd_sum(q_r . k) * scale for each row r (log2 units)
        mask (only at keys some row cannot see), softcap, ALiBi;  online softmax and o_r += p_r v per row
    after the loop (no barrier inside it): the key groups merge through threadgroup memory
    no split: O = o / l and LSE;  split: fp32 partials that decode_combine's kernel merges

Offsets inside the key loop are 32-bit `int`s (decode.plan sends calls whose cache spans more elements to the block
forward); only per-sequence and per-head base pointers are 64-bit, computed once. Loops over compile-time counts
are fully unrolled, so the per-row and per-chunk arrays are registers, never indexed at run time.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from . import decode_combine
from .launch import SCORE_FLOAT_ARGS, SEQUENCE_INT_ARGS
from .msl import SIDE_BUFFERS, SINK_HELPERS, locate_sequence, parameter_list
from .spec import KV_CACHES, padded_head_dim, side_buffer_names
from .tiles import SIMD_WIDTH, DecodeTiles

SIMDGROUPS = 8  # per threadgroup; 256 threads keep any register budget within Metal's per-threadgroup limit
THREADS = SIMDGROUPS * SIMD_WIDTH
REDUCE = 4  # rows whose scores one simd_sum reduces (a float4)
ROW_CHOICES = (16, 8, 4)  # rows per SIMD group, the most whose registers stay within REGISTER_BUDGET
REGISTER_BUDGET = 128  # 32-bit registers per thread: ~208 KB per core then keeps 12+ SIMD groups resident
# Scalars live through the key loop: k and v base pointers (2 x 64-bit), key, end, k and v offsets, lane, first
# row, active rows, kv group, head dim and score scale.
BASE_SCALARS = 14
PAGED_SCALARS = 6  # block-table pointer (64-bit), slot, row in page, page size, K and V page strides
MASKED_SCALARS = 5  # rows' common key range (2), window left and right, the diagonal's shift
INT64_TYPES = re.compile(r"\b(long|ulong|int64_t|uint64_t|size_t|ptrdiff_t)\b")

# Run-time integer arguments, in the order decode.plan packs them into the `ints` buffer.
INT_ARGS = SEQUENCE_INT_ARGS + (
    "ROW_GROUPS",  # SIMD groups that split a threadgroup's rows (1, 2, 4 or 8); the others split its keys
    # Key splits per row block (1: none) and the partial outputs' layout (decode_combine.py).
    "NUM_SPLITS", "NHEADS", "MAX_SEQLEN_Q", "SPLIT_STRIDE",
)
FLOAT_ARGS = SCORE_FLOAT_ARGS  # as in the block kernels, so the backward recomputes the same scores from the LSE


def tile_candidates(family: str, dtype: str, head_dim: int) -> list[DecodeTiles]:
    """Every rows-per-SIMD-group choice within the register budget at this padded head dim (a masked dense-cache
    decode, the common case), the budget's own choice first."""
    spec = DecodeSpec.for_call(dtype, head_dim, masked=True, kv_cache="dense")
    fitting = [DecodeTiles(r) for r in ROW_CHOICES if registers_per_thread(spec, r) <= REGISTER_BUDGET]
    return fitting[:1] + sorted(fitting[1:], key=lambda t: -t.rows)


@dataclass(frozen=True)
class DecodeSpec:
    """Everything that changes a decode kernel's source; lengths, strides, windows and scales are run-time."""

    dtype: str  # MSL scalar type: "half", "bfloat" or "float"
    head_dim: int  # padded to a multiple of 8; the real head dim is a run-time argument
    vec: int  # elements per load (1, 2 or 4): every q, k and v row offset of the call is a multiple of it
    varlen: bool
    masked: bool  # causal or local window
    softcap: bool
    alibi: bool
    kv_cache: str = ""  # one of spec.KV_CACHES
    sinks: bool = False  # per-head sink logits join each row's softmax denominator (the combine's, when split)
    tiles: DecodeTiles | None = None  # a tuned choice (kernels/tuning.py); None: the register budget's

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES or (self.kv_cache and self.varlen):
            raise ValueError(f"kv_cache must be one of {KV_CACHES} and comes without varlen, got {self.kv_cache!r}")
        if self.vec not in (1, 2, 4) or self.vec > widest_vec(self.head_dim):
            raise ValueError(f"vec must be 1, 2 or 4 and at most {widest_vec(self.head_dim)}, got {self.vec}")

    @classmethod
    def for_call(cls, dtype: str, head_dim: int, *, vec: int | None = None, varlen: bool = False,
                 masked: bool = False, softcap: bool = False, alibi: bool = False, kv_cache: str = "",
                 sinks: bool = False) -> "DecodeSpec":
        d = padded_head_dim(head_dim)
        return cls(dtype, d, widest_vec(d) if vec is None else vec, varlen, masked, softcap, alibi, kv_cache, sinks)

    @property
    def chunks(self) -> int:
        """VEC-wide loads per row and lane: lanes cover 32 * VEC columns at a time."""
        return -(-self.head_dim // (SIMD_WIDTH * self.vec))

    @functools.cached_property
    def rows(self) -> int:
        """(query row, head) pairs per SIMD group: the tuned choice, else the most whose registers stay within
        REGISTER_BUDGET."""
        if self.tiles is not None:
            return self.tiles.rows
        return next(r for r in ROW_CHOICES if registers_per_thread(self, r) <= REGISTER_BUDGET)

    @property
    def threadgroup_bytes(self) -> int:
        """Each SIMD group's row maxima and sums, and one row's outputs (fp32) for the merge."""
        return 4 * SIMDGROUPS * (2 * self.rows + SIMD_WIDTH * self.vec * self.chunks)

    @functools.cached_property
    def name(self) -> str:
        features = "".join(f"_{f}" for f, on in (("varlen", self.varlen), ("masked", self.masked),
                                                   ("softcap", self.softcap), ("alibi", self.alibi),
                                                   (f"{self.kv_cache}_cache", self.kv_cache),
                                                   ("sinks", self.sinks)) if on)
        return f"attention_decode_{self.dtype}_d{self.head_dim}_v{self.vec}_r{self.rows}{features}"

    @property
    def side_buffers(self) -> list[str]:
        return side_buffer_names(varlen=self.varlen, kv_cache=self.kv_cache, alibi=self.alibi, mask=False,
                                 sinks=self.sinks)

    @property
    def kernel_names(self) -> tuple[str, str, str]:
        """The library's kernels: unsplit (writes O and LSE), split (writes partials), and the combine."""
        return self.name, f"{self.name}_split", f"{self.name}_combine"


def widest_vec(head_dim: int) -> int:
    """The widest load that keeps the 32 lanes busy at this padded head dim: 4 past 64, 2 past 32, else 1."""
    return 4 if head_dim > 64 else 2 if head_dim > 32 else 1


def registers_per_thread(spec: DecodeSpec, rows: int | None = None) -> int:
    """A static estimate of the 32-bit registers a thread keeps through the key loop (a 64-bit value counts 2):
    per row its q and o elements, maximum and sum (and ALiBi slope and diagonal); the key's k and v elements;
    and the scalars the loop reads."""
    rows = spec.rows if rows is None else rows
    elements = spec.vec * spec.chunks  # fp32 elements per lane and row
    per_row = 2 * elements + 2 + (2 if spec.alibi else 0)
    scalars = (BASE_SCALARS + (PAGED_SCALARS if spec.kv_cache == "paged" else 0)
               + (MASKED_SCALARS if spec.masked else 0) + (1 if spec.softcap else 0))
    return rows * per_row + 2 * elements + scalars


# ---------------------------------------------------------------------------------------------------------------
# MSL


def buffer_names(spec: DecodeSpec, split: bool) -> list[str]:
    """The kernel's buffers in [[buffer(i)]] order: a split kernel (and the combine) binds the fp32 partial
    outputs first and O and LSE last, as launch.ForwardLaunch passes them."""
    if split:
        return ["Q", "K", "V", "O_partial", "LSE_partial", "ints", "floats", *spec.side_buffers, "O", "LSE",
                "STATS"]
    return ["Q", "K", "V", "O", "LSE", "STATS", "ints", "floats", *spec.side_buffers]


def _declarations(spec: DecodeSpec) -> dict[str, str]:
    t = spec.dtype
    return {"Q": f"device const {t}* Q", "K": f"device const {t}* K", "V": f"device const {t}* V",
            "O": f"device {t}* O", "LSE": "device float* LSE", "STATS": "device float2* STATS",
            "ints": "constant long* ints",
            "floats": "constant float* floats", "O_partial": "device float* O_partial",
            "LSE_partial": "device float* LSE_partial"}


def decode_source(spec: DecodeSpec) -> str:
    """One library: the decode kernel unsplit and split (one body, inlined twice) and the combine kernel."""
    unsplit, split, combine = spec.kernel_names
    declarations = _declarations(spec)
    side = spec.side_buffers
    body_params = ",\n    ".join([declarations[n] for n in ("Q", "K", "V", "O", "LSE", "STATS", "O_partial", "LSE_partial",
                                                              "ints", "floats")] + [SIDE_BUFFERS[n] for n in side])
    side_args = "".join(f", {n}" for n in side)
    return f"""#include <metal_stdlib>
using namespace metal;

// {spec.name}: attention for short queries (decoding), generated by flash-attn-metal (kernels/decode.py).
// One threadgroup of SIMDGROUPS SIMD groups per (row block and key split, K/V head, sequence): its rows are the
// (query row, head) pairs of the K/V head's query heads, so K and V are read once per K/V head. A SIMD group
// serves ROWS rows and a contiguous share of the keys, its lanes across the head dim; scores are simd_sum
// reductions, the softmax is online per SIMD group, and the SIMD groups merge once, after the key loop.
typedef {spec.dtype} input_t;
{_vector_types(spec)}
constant int HEAD_DIM = {spec.head_dim};  // padded to a multiple of 8: the partial outputs' row width
constant int VEC = {spec.vec};  // elements per load; every row offset of the call is a multiple of VEC
constant int CHUNKS = {spec.chunks};  // loads per row and lane: lane l holds columns c * LANE_SPAN + l * VEC + 0..VEC-1
constant int LANE_SPAN = {SIMD_WIDTH * spec.vec};  // columns the 32 lanes cover with one load each
constant int ROWS = {spec.rows};  // (query row, head) pairs per SIMD group: {"tuned on this machine" if spec.tiles else f"the most that fit {REGISTER_BUDGET} registers"}
constant int REDUCE = {REDUCE};  // rows reduced by one simd_sum (a float4)
constant int SIMDGROUPS = {SIMDGROUPS};
constant float FINITE_MIN = {decode_combine.FINITE_MIN};  // -FLT_MAX: "no score yet"; exp2 of it minus any score is 0

enum IntArg {{ {", ".join(INT_ARGS)} }};
enum FloatArg {{ {", ".join(FLOAT_ARGS)} }};

{_helpers(spec)}{SINK_HELPERS if spec.sinks else ""}
{_store_row(spec)}
{_body(spec, body_params)}
{_entry(spec, unsplit, False, side_args)}
{_entry(spec, split, True, side_args)}
{decode_combine.combine_kernel(combine, parameter_list(declarations, buffer_names(spec, True)),
                               locate_sequence(spec.kv_cache, spec.varlen), spec.head_dim, spec.sinks)}"""


def _vector_types(spec: DecodeSpec) -> str:
    if spec.vec == 1:
        return "typedef float float_vec;  // VEC elements in fp32"
    return (f"typedef {spec.dtype}{spec.vec} input_vec;  // VEC contiguous elements of a row: one load\n"
            f"typedef float{spec.vec} float_vec;  // the same in fp32")


def _helpers(spec: DecodeSpec) -> str:
    if spec.vec == 1:
        return """// Element `col` of a row in fp32; zero at or past the real head dim.
inline float load_vec(device const input_t* row, int col, int cols) {
  return col < cols ? float(row[col]) : 0.0f;
}

inline void store_vec(device input_t* row, int col, int cols, float x) {
  if (col < cols) row[col] = input_t(x);
}

inline float lane_dot(float a, float b) { return a * b; }
"""
    parts = ", ".join(f"float(x.{c})" for c in "xyzw"[: spec.vec])
    return """// Elements col .. col + VEC - 1 of a row in fp32, one aligned load; zero at or past the real head dim (a
// multiple of VEC, so a load is wholly inside or wholly outside it).
inline float_vec load_vec(device const input_t* row, int col, int cols) {
  if (col >= cols) return float_vec(0.0f);
  const input_vec x = *reinterpret_cast<device const input_vec*>(row + col);
  return float""" + str(spec.vec) + "(" + parts + """);
}

inline void store_vec(device input_t* row, int col, int cols, float_vec x) {
  #pragma clang loop unroll(full)
  for (int i = 0; i < VEC; ++i) {
    if (col + i < cols) row[col + i] = input_t(x[i]);
  }
}

inline float lane_dot(float_vec a, float_vec b) { return dot(a, b); }
"""


def _locate(spec: DecodeSpec) -> str:
    """MSL giving this sequence's lengths, its first q, out and lse offsets, and the K/V head's base pointers."""
    return locate_sequence(spec.kv_cache, spec.varlen) + """
  device const input_t* k_seq = K + k_start + kv_head * ints[K_HEAD];
  device const input_t* v_seq = V + v_start + kv_head * ints[V_HEAD];"""


def _key_range(spec: DecodeSpec) -> str:
    if not spec.masked:
        return ""
    return """  // Causal and local masks: the keys some row of this threadgroup sees, and those that all of them see.
  const int window_left = int(ints[WINDOW_LEFT]), window_right = int(ints[WINDOW_RIGHT]);
  const int shift = seqlen_k - seqlen_q;  // bottom-right aligned: query row i faces key i + shift
  const int first_row = block_first / kv_group;
  const int last_row = (min(block_first + ROWS * row_groups, packed_rows) - 1) / kv_group;
  int all_begin = 0, all_end = seqlen_k;
  if (window_left >= 0) {
    key_begin = max(key_begin, first_row + shift - window_left);
    all_begin = last_row + shift - window_left;
  }
  if (window_right >= 0) {
    key_end = min(key_end, last_row + shift + window_right + 1);
    all_end = first_row + shift + window_right + 1;
  }"""


def key_loop(spec: DecodeSpec) -> str:
    """The MSL of the key loop (the report counts its 64-bit integer types: none)."""
    if spec.kv_cache == "paged":
        setup = """  // Rows of a paged cache: this SIMD group's keys run through the block table one page at a time.
  const int page_size = int(ints[PAGE_SIZE]), k_page = int(ints[K_BATCH]), v_page = int(ints[V_BATCH]);
  int slot = begin / page_size, in_page = begin - slot * page_size;
  int k_offset = 0, v_offset = 0;
  if (begin < end) {
    const int page = pages[slot];
    k_offset = page * k_page + in_page * k_row;
    v_offset = page * v_page + in_page * v_row;
  }"""
        advance_page = """
    if (in_page == page_size) {  // the next page
      in_page = 0;
      const int page = pages[++slot];
      k_offset = page * k_page;
      v_offset = page * v_page;
    }"""
        advance_row = "    ++in_page;\n"
    else:
        setup = "  int k_offset = begin * k_row, v_offset = begin * v_row;"
        advance_page = ""
        advance_row = ""
    if spec.masked:
        edge = ("\n    const bool edge = key < all_begin || key >= all_end;  // some row of the threadgroup cannot "
                "see this key")
        visible = """
        if (edge) {
          const int facing = (first + row) / kv_group + shift;  // the key facing this row's query row
          visible = visible && (window_left < 0 || key >= facing - window_left) &&
                    (window_right < 0 || key <= facing + window_right);
        }"""
    else:
        edge = visible = ""
    transform = "        s = tanh(s) * softcap_log2;  // softcap, in log2 units\n" if spec.softcap else ""
    if spec.alibi:
        transform += "        s -= slope[row] * float(abs(diagonal[row] - key));  // ALiBi\n"
    return f"""{setup}
  for (int key = begin; key < end; ++key) {{{advance_page}
    float_vec k[CHUNKS], v[CHUNKS];
    #pragma clang loop unroll(full)
    for (int c = 0; c < CHUNKS; ++c) {{
      k[c] = load_vec(k_seq + k_offset, c * LANE_SPAN + lane * VEC, head_dim);
      v[c] = load_vec(v_seq + v_offset, c * LANE_SPAN + lane * VEC, head_dim);
    }}{edge}
    #pragma clang loop unroll(full)
    for (int g = 0; g < ROWS; g += REDUCE) {{
      if (g >= active) break;  // the same for every lane
      float4 partial;
      #pragma clang loop unroll(full)
      for (int r = 0; r < REDUCE; ++r) {{
        float d = 0.0f;
        #pragma clang loop unroll(full)
        for (int c = 0; c < CHUNKS; ++c) d += lane_dot(q[g + r][c], k[c]);
        partial[r] = d;
      }}
      const float4 scores = simd_sum(partial);
      #pragma clang loop unroll(full)
      for (int r = 0; r < REDUCE; ++r) {{
        const int row = g + r;
        bool visible = row < active;{visible}
        if (!visible) continue;
        float s = scores[r] * score_scale;  // log2 units
{transform}        if (s > row_max[row]) {{  // a new maximum: rescale what this SIMD group summed so far
          const float correction = exp2(row_max[row] - s);
          row_sum[row] *= correction;
          #pragma clang loop unroll(full)
          for (int c = 0; c < CHUNKS; ++c) o[row][c] *= correction;
          row_max[row] = s;
        }}
        const float p = exp2(s - row_max[row]);
        row_sum[row] += p;
        #pragma clang loop unroll(full)
        for (int c = 0; c < CHUNKS; ++c) o[row][c] += p * v[c];
      }}
    }}
{advance_row}    k_offset += k_row;
    v_offset += v_row;
  }}"""


def _body(spec: DecodeSpec, params: str) -> str:
    alibi_setup = """
    const int head = kv_head * kv_group + packed % kv_group;
    slope[r] = r < active ? alibi_slopes[batch * ints[ALIBI_BATCH] + head] * M_LOG2E_F : 0.0f;
    diagonal[r] = packed / kv_group + seqlen_k - seqlen_q;""" if spec.alibi else ""
    return f"""// The work of one threadgroup. `split`: write fp32 partial outputs for the combine kernel instead of O and LSE.
inline void decode_attention(
    {params},
    threadgroup float* group_max, threadgroup float* group_sum, threadgroup float_vec* group_out,
    uint3 group, ushort sg, ushort lane, bool split) {{
  // This threadgroup's sequence, K/V head, row block and key split; this SIMD group's rows and key share.
  const long batch = group.z;
  const int kv_head = int(group.y), kv_group = int(ints[KV_GROUP]);  // kv_group: query heads per K/V head
  const int num_splits = int(ints[NUM_SPLITS]), split_index = int(group.x) % num_splits;
  const int row_groups = int(ints[ROW_GROUPS]), key_groups = SIMDGROUPS / row_groups;
  const int row_group = sg % row_groups, key_group = sg / row_groups;
{_locate(spec)}
  // Rows are packed (query row, head) pairs: packed = query_row * kv_group + (head - kv_head * kv_group).
  const int packed_rows = seqlen_q * kv_group;
  const int block_first = int(group.x) / num_splits * (ROWS * row_groups);
  if (block_first >= packed_rows) return;  // the whole threadgroup leaves together
  const int first = block_first + row_group * ROWS;
  const int active = clamp(packed_rows - first, 0, ROWS);  // this SIMD group's rows that exist
  const int head_dim = int(ints[HEAD_DIM_REAL]);

  // q, the accumulators, and each row's running maximum and sum (of scores in log2 units).
  float_vec q[ROWS][CHUNKS], o[ROWS][CHUNKS];
  float row_max[ROWS], row_sum[ROWS];{_alibi_declarations(spec)}
  #pragma clang loop unroll(full)
  for (int r = 0; r < ROWS; ++r) {{
    const int packed = first + r;
    device const input_t* q_row = Q + q_start + long(packed / kv_group) * ints[Q_ROW]
                                  + long(kv_head * kv_group + packed % kv_group) * ints[Q_HEAD];
    #pragma clang loop unroll(full)
    for (int c = 0; c < CHUNKS; ++c) {{
      q[r][c] = r < active ? load_vec(q_row, c * LANE_SPAN + lane * VEC, head_dim) : float_vec(0.0f);
      o[r][c] = float_vec(0.0f);
    }}
    row_max[r] = FINITE_MIN;
    row_sum[r] = 0.0f;{alibi_setup}
  }}
  const float score_scale = floats[SCORE_SCALE];{"" if not spec.softcap else chr(10) + "  const float softcap_log2 = floats[SOFTCAP_LOG2];"}

  int key_begin = 0, key_end = seqlen_k;
{_key_range(spec)}
  // This split's share of the keys, then this SIMD group's contiguous share of the split's.
  const int split_keys = (max(key_end - key_begin, 0) + num_splits - 1) / num_splits;
  const int split_begin = min(key_begin + split_index * split_keys, key_end);
  const int split_end = min(key_end, split_begin + split_keys);
  const int group_keys = (max(split_end - split_begin, 0) + key_groups - 1) / key_groups;
  const int begin = min(split_begin + key_group * group_keys, split_end), end = min(split_end, begin + group_keys);
  const int k_row = int(ints[K_ROW]), v_row = int(ints[V_ROW]);
{key_loop(spec)}

  // Merge the key groups (SIMD groups with the same rows): one maximum per row, then each group's sum and
  // output rescaled to it and added up by the row group's first SIMD group, one row at a time.
  if (lane == 0) {{
    #pragma clang loop unroll(full)
    for (int r = 0; r < ROWS; ++r) group_max[sg * ROWS + r] = row_max[r];
  }}
  threadgroup_barrier(mem_flags::mem_threadgroup);
  #pragma clang loop unroll(full)
  for (int r = 0; r < ROWS; ++r) {{
    float top = FINITE_MIN;
    for (int g = 0; g < key_groups; ++g) top = max(top, group_max[(g * row_groups + row_group) * ROWS + r]);
    const float weight = exp2(row_max[r] - top);  // 0 for a group that saw no key when another did
    if (lane == 0) group_sum[sg * ROWS + r] = row_sum[r] * weight;
    #pragma clang loop unroll(full)
    for (int c = 0; c < CHUNKS; ++c) group_out[(sg * CHUNKS + c) * {SIMD_WIDTH} + lane] = o[r][c] * weight;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (key_group == 0 && r < active) {{
      float total = 0.0f;
      float_vec out[CHUNKS];
      #pragma clang loop unroll(full)
      for (int c = 0; c < CHUNKS; ++c) out[c] = float_vec(0.0f);
      for (int g = 0; g < key_groups; ++g) {{
        const int from = g * row_groups + row_group;
        total += group_sum[from * ROWS + r];
        #pragma clang loop unroll(full)
        for (int c = 0; c < CHUNKS; ++c) out[c] += group_out[(from * CHUNKS + c) * {SIMD_WIDTH} + lane];
      }}
      store_row(first + r, top, total, out, O, LSE, STATS, O_partial, LSE_partial, ints,{" sinks," if spec.sinks else ""} batch, kv_head, kv_group,
                o_start, lse_start, split_index, head_dim, lane, split);
    }}
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }}
}}"""


def _alibi_declarations(spec: DecodeSpec) -> str:
    return "\n  float slope[ROWS];  // ALiBi, in log2 units\n  int diagonal[ROWS];  // the key facing each row" \
        if spec.alibi else ""


def _store_row(spec: DecodeSpec) -> str:
    return f"""// Row `packed`'s result: O = out / total in the input dtype and its LSE, or (split) this split's fp32 partial
// output and its LSE in log2 units (decode_combine.py's layout). A row that saw no key: O = 0 and LSE = +inf,
// or LSE_partial = -FLT_MAX.
inline void store_row(int packed, float top, float total, thread float_vec* out, device {spec.dtype}* O,
                      device float* LSE, device float2* STATS, device float* O_partial, device float* LSE_partial,
                      constant long* ints,{" device const float* sinks," if spec.sinks else ""}
                      long batch, int kv_head, int kv_group, long o_start, long lse_start, int split_index,
                      int head_dim, ushort lane, bool split) {{
  const int query_row = packed / kv_group, head = kv_head * kv_group + packed % kv_group;
{_sink(spec)}
  const float inv_total = total > 0.0f ? out_scale / total : 0.0f;
  if (!split) {{
    device input_t* o_row = O + o_start + long(query_row) * ints[O_ROW] + long(head) * ints[O_HEAD];
    #pragma clang loop unroll(full)
    for (int c = 0; c < CHUNKS; ++c) store_vec(o_row, c * LANE_SPAN + lane * VEC, head_dim, out[c] * inv_total);
    if (lane == 0) {{
      const long at = lse_start + head * ints[LSE_HEAD] + query_row;
      LSE[at] = total > 0.0f ? (top + log2(total)) * M_LN2_F : as_type<float>(0x7f800000u);
      STATS[at] = total > 0.0f ? float2(top, log2(total)) : float2(0.0f);  // the backward's (m, log2 l)
    }}
    return;
  }}
  const long part = split_index * ints[SPLIT_STRIDE] + (batch * ints[NHEADS] + head) * ints[MAX_SEQLEN_Q] + query_row;
  device float* partial = O_partial + part * HEAD_DIM;
  #pragma clang loop unroll(full)
  for (int c = 0; c < CHUNKS; ++c) {{
    const int col = c * LANE_SPAN + lane * VEC;
    if (col < HEAD_DIM) *reinterpret_cast<device float_vec*>(partial + col) = out[c] * inv_total;
  }}
  if (lane == 0) LSE_partial[part] = total > 0.0f ? top + log2(total) : FINITE_MIN;
}}
"""


def _sink(spec: DecodeSpec) -> str:
    """MSL adding the head's sink to an unsplit row's denominator (a split's partials leave it to the combine):
    the row's maximum becomes max(top, sink) and out, relative to the old one, is rescaled."""
    if not spec.sinks:
        return "  const float out_scale = 1.0f;"
    return """  float out_scale = 1.0f;
  const float sink = sinks[head];
  if (!split && has_sink(sink)) {
    const float sink2 = sink_log2(sink), new_top = max(top, sink2);
    out_scale = total > 0.0f ? exp2(top - new_top) : 0.0f;  // no key yet: out is 0 and top the sentinel
    total = total * out_scale + exp2(sink2 - new_top);
    top = new_top;
  }"""


def _entry(spec: DecodeSpec, name: str, split: bool, side_args: str) -> str:
    params = parameter_list(_declarations(spec), buffer_names(spec, split))
    partials = "O_partial, LSE_partial" if split else "nullptr, nullptr"
    return f"""
[[max_total_threads_per_threadgroup({THREADS})]]
kernel void {name}(
    {params},
    uint3 group [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {{
  threadgroup float group_max[SIMDGROUPS * ROWS], group_sum[SIMDGROUPS * ROWS];
  threadgroup float_vec group_out[SIMDGROUPS * CHUNKS * {SIMD_WIDTH}];
  decode_attention(Q, K, V, O, LSE, STATS, {partials}, ints, floats{side_args}, group_max, group_sum, group_out, group, sg,
                   lane, {"true" if split else "false"});
}}"""

