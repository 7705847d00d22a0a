"""MSL shared by the generated attention kernels: the program-scope header (types, tile constants, the lane layout,
fragment readers and the block loader), the kernels' parameter lists, and the causal/local key range.

Conventions every kernel follows (they keep the kernels right under fast math and cheap in the hot loop):
- a masked score is MASKED = -FLT_MAX, below every finite score; no value is tested against infinity or NaN, and
  +inf is written only in a final store, as a bit pattern (`as_type<float>(INF_BITS)`);
- offsets inside the loops are 32-bit `index_t` (ulong only for tensors that span 2^32 elements or more, which the
  host detects); 64-bit values appear only in per-sequence and per-head base pointers, computed once;
- every loop over fragments or loader steps has a compile-time trip count and is fully unrolled, so fragment arrays
  stay in registers (MLX's STEEL_PRAGMA_UNROLL; metal-flash-attention's `unroll(full)`).
"""

from __future__ import annotations

from . import dropout
from .decode_combine import FINITE_MIN
from .spec import ForwardSpec
from .tiles import DTYPE_BYTES, ROW_PAD_BYTES

UNROLL = "#pragma clang loop unroll(full)"

# The builtin attributes every attention kernel reads, after its buffers.
THREADGROUP_BUILTINS = """    uint3 group [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]"""

# The declarations of the buffers that only some specs bind, after a kernel's own (spec.side_buffer_names).
SIDE_BUFFERS = {
    "cu_seqlens_q": "device const int* cu_seqlens_q",
    "cu_seqlens_k": "device const int* cu_seqlens_k",
    "cache_seqlens": "device const int* cache_seqlens",
    "cache_leftpad": "device const int* cache_leftpad",
    "cache_batch_idx": "device const int* cache_batch_idx",
    "block_table": "device const int* block_table",
    "alibi_slopes": "device const float* alibi_slopes",
    "sinks": "device const float* sinks",
}
def mask_declaration(spec: ForwardSpec) -> dict[str, str]:
    """The attention mask's buffer, read through its strides (MASK_* ints; stride 0 on broadcast dimensions)."""
    return {"attn_mask": f"device const {spec.mask}* attn_mask"} if spec.mask else {}


def parameter_list(declarations: dict[str, str], names: list[str]) -> str:
    """`declaration [[buffer(i)]]` for each buffer name, in order; a kernel's own declarations win."""
    buffers = {**SIDE_BUFFERS, **declarations}
    return ",\n    ".join(f"{buffers[n]} [[buffer({i})]]" for i, n in enumerate(names))


def kernel_attribute(threads: int) -> str:
    """Every kernel declares its threadgroup size, so the compiler can budget registers for exactly that many."""
    return f"[[kernel, max_total_threads_per_threadgroup({threads})]]"


def header(spec: ForwardSpec, enums: str) -> str:
    """Program-scope MSL every kernel of a spec starts with."""
    t, d = spec.dtype, spec.head_dim
    elem = DTYPE_BYTES[t]
    vec = spec.vec
    load_t = t if vec == 1 else f"{t}{vec}"
    return f"""#include <metal_stdlib>
using namespace metal;

typedef {t} input_t;
typedef {t}2 input2_t;
typedef {load_t} load_t;  // what one block-loader read moves: VEC elements
typedef {"ulong" if spec.wide else "uint"} index_t;  // element offsets below a per-head base pointer
constant constexpr int HEAD_DIM = {d};  // padded to a multiple of 8; the real head dim is ints[HEAD_DIM_REAL]
constant constexpr int D_FRAGS = HEAD_DIM / 8;  // 8x8 fragments across the head dim
constant constexpr int VEC = {vec};  // elements per device read of the block loaders (the host checked alignment)
constant constexpr int ROW_PAD = {ROW_PAD_BYTES // elem};  // threadgroup tile rows are padded by {ROW_PAD_BYTES} bytes (MLX)
constant constexpr bool RAGGED = {"true" if spec.ragged else "false"};  // the real head dim is below HEAD_DIM: columns are checked
constant constexpr float MASKED = {FINITE_MIN};  // a masked score, below every finite score
constant constexpr uint INF_BITS = 0x7f800000u;  // +inf, written only as a final LSE
constant constexpr float LN2 = 0.69314718055994531f;
constant constexpr float LOG2E = 1.44269504088896341f;

{enums}

{_HELPERS}{_PAGED_LOADER if spec.kv_cache == "paged" else ""}{SINK_HELPERS if spec.mask or spec.sinks else ""}{MASK_HELPERS if spec.mask else ""}{dropout.MSL if spec.dropout else ""}"""


_HELPERS = """// (column, row) of the first of the two elements this lane holds in an 8x8 simdgroup_matrix (Apple's layout).
inline ushort2 fragment_coord(ushort lane) {
  return ushort2(4 * ((lane / 8) % 2) + 2 * (lane % 2), 4 * (lane / 16) + (lane / 2) % 4);
}

// This lane's two elements of the 8x8 fragment whose element (r, c) is tile[(row0 + r) * LD + col0 + c], in fp32:
// one aligned two-element read.
template <int LD>
inline float2 tile_pair(threadgroup const input_t* tile, int row0, int col0, ushort2 coord) {
  return float2(*reinterpret_cast<threadgroup const input2_t*>(tile + (row0 + coord.y) * LD + col0 + coord.x));
}

// The same for the fragment whose element (r, c) is tile[(col0 + c) * LD + row0 + r] (a transposed read).
template <int LD>
inline float2 tile_pair_t(threadgroup const input_t* tile, int row0, int col0, ushort2 coord) {
  threadgroup const input_t* p = tile + (col0 + coord.x) * LD + row0 + coord.y;
  return float2(float(p[0]), float(p[LD]));
}

// Elements (row, col) and (row, col + 1) of a row-major device matrix, in fp32; zero past the real head dim.
inline float2 device_pair(device const input_t* base, index_t row_offset, int col, int cols) {
  if (VEC >= 2 && !RAGGED) return float2(*reinterpret_cast<device const input2_t*>(base + row_offset + col));
  return float2(col < cols ? float(base[row_offset + col]) : 0.0f, col + 1 < cols ? float(base[row_offset + col + 1]) : 0.0f);
}

// The block loaders' thread layout for a threadgroup of THREADS_ threads (a power of two): LoadLayout<T>::COLS
// threads share a row's HEAD_DIM / VEC vectors (the largest power of two dividing both), ROWS rows per step.
template <int THREADS_>
struct LoadLayout {
  static constexpr int VECTORS = HEAD_DIM / VEC;
  static constexpr int COLS = (VECTORS & -VECTORS) < THREADS_ ? (VECTORS & -VECTORS) : THREADS_;
  static constexpr int ROWS = THREADS_ / COLS;
};

// Cooperative copy of ROWS rows of a row-major device matrix into a threadgroup tile whose rows are LD elements
// apart (TRANSPOSE: element (r, c) goes to tile[c * LD + r]). Row r of the block is at src[first + r * stride].
// Thread t reads the VEC-element vectors of columns (t % LOAD_COLS + j LOAD_COLS) VEC of rows t / LOAD_COLS +
// i LOAD_ROWS, so every offset is a compile-time multiple of `stride` or VEC. CHECKED zero-fills rows >= rows
// and columns >= cols (the last block of a sequence, a padded head dim); interior blocks take the unchecked path.
template <int THREADS_, int ROWS, int LD, bool TRANSPOSE, bool CHECKED>
inline void load_block(threadgroup input_t* tile, device const input_t* src, index_t first, uint stride, int rows,
                       int cols, ushort tid) {
  constexpr int LOAD_COLS = LoadLayout<THREADS_>::COLS, LOAD_ROWS = LoadLayout<THREADS_>::ROWS;
  const int c0 = tid % LOAD_COLS, r0 = tid / LOAD_COLS;
  UNROLL
  for (int i = 0; i < (ROWS + LOAD_ROWS - 1) / LOAD_ROWS; ++i) {
    const int r = r0 + i * LOAD_ROWS;
    if (ROWS % LOAD_ROWS != 0 && r >= ROWS) break;
    UNROLL
    for (int j = 0; j < HEAD_DIM / VEC / LOAD_COLS; ++j) {
      const int c = (c0 + j * LOAD_COLS) * VEC;
      const bool inside = !CHECKED || (r < rows && c < cols);
      const load_t v = inside ? *reinterpret_cast<device const load_t*>(src + first + index_t(r) * stride + c) : load_t(0);
      if (TRANSPOSE) {
        STORE_TRANSPOSED
      } else {
        *reinterpret_cast<threadgroup load_t*>(tile + r * LD + c) = v;
      }
    }
  }
}
""".replace("UNROLL", UNROLL)

# Float masks and sinks are logits in natural-log units, read as the kernels' log2-unit scores; -inf (by its bits,
# which fast math cannot fold) means "masked" or "no sink". SINK_HELPERS serves every kernel family (the decode
# kernels' too); MASK_HELPERS needs MASKED.
SINK_HELPERS = """
constant constexpr uint NEG_INF_BITS = 0xff800000u;  // -inf, recognised by its bits in a float mask or a sink
constant constexpr float INPUT_LIMIT = 1.0e38f;  // float masks and sinks are clamped here: * log2(e) stays finite

// A sink logit in log2 units, and whether there is one (a -inf sink adds nothing).
inline float sink_log2(float sink) { return clamp(sink, -INPUT_LIMIT, INPUT_LIMIT) * M_LOG2E_F; }
inline bool has_sink(float sink) { return as_type<uint>(sink) != NEG_INF_BITS; }
"""
MASK_HELPERS = """
// A score (log2 units) under an attention mask's element: a float mask is added (a -inf one removes the element),
// a bool mask keeps the element where it is True. `visible` turns false where the mask removes it.
inline float masked_score(float s, float m, thread bool& visible) {
  if (as_type<uint>(m) == NEG_INF_BITS) visible = false;
  return s + clamp(m, -INPUT_LIMIT, INPUT_LIMIT) * M_LOG2E_F;
}
inline float masked_score(float s, bool m, thread bool& visible) {
  visible = visible && m;
  return s;
}
"""

# For paged kv caches: a key block may span pages (any page size works); row r of the sequence sits in block
# pages[r / page_size], at row r % page_size of that block.
_PAGED_LOADER = """
template <int THREADS_, int ROWS, int LD, bool TRANSPOSE, bool CHECKED>
inline void load_paged_block(threadgroup input_t* tile, device const input_t* src, device const int* pages, int first,
                             uint page_size, index_t page_stride, uint stride, int rows, int cols, ushort tid) {
  constexpr int LOAD_COLS = LoadLayout<THREADS_>::COLS, LOAD_ROWS = LoadLayout<THREADS_>::ROWS;
  const int c0 = tid % LOAD_COLS, r0 = tid / LOAD_COLS;
  UNROLL
  for (int i = 0; i < (ROWS + LOAD_ROWS - 1) / LOAD_ROWS; ++i) {
    const int r = r0 + i * LOAD_ROWS;
    if (ROWS % LOAD_ROWS != 0 && r >= ROWS) break;
    const bool row_inside = !CHECKED || r < rows;
    const uint row = uint(first + r);
    const index_t at = row_inside ? index_t(pages[row / page_size]) * page_stride + index_t(row % page_size) * stride : 0;
    UNROLL
    for (int j = 0; j < HEAD_DIM / VEC / LOAD_COLS; ++j) {
      const int c = (c0 + j * LOAD_COLS) * VEC;
      const bool inside = row_inside && (!CHECKED || c < cols);
      const load_t v = inside ? *reinterpret_cast<device const load_t*>(src + at + c) : load_t(0);
      if (TRANSPOSE) {
        STORE_TRANSPOSED
      } else {
        *reinterpret_cast<threadgroup load_t*>(tile + r * LD + c) = v;
      }
    }
  }
}
""".replace("UNROLL", UNROLL)


def finish_header(text: str, vec: int) -> str:
    """The transposed store of the loader, written out per element (a scalar load_t has no elements)."""
    store = ("tile[c * LD + r] = v;" if vec == 1 else
             " ".join(f"tile[(c + {e}) * LD + r] = v[{e}];" for e in range(vec)))
    return text.replace("STORE_TRANSPOSED", store)


def locate_sequence(kv_cache: str, varlen: bool) -> str:
    """MSL giving sequence `batch`'s lengths (seqlen_q, seqlen_k) and the 64-bit offsets of its first q, k, v, out and
    lse elements (q_start, k_start, v_start, o_start, lse_start), read from the ints buffer (launch.SEQUENCE_INT_ARGS)
    and the side buffers of the layout: padded, varlen, a dense or a paged kv cache (which also gives `pages`)."""
    if kv_cache == "dense":
        return """  // Sequence b attends to rows cache_leftpad[b] .. cache_seqlens[b] - 1 of cache slot cache_batch_idx[b].
  const int seqlen_q = int(ints[SEQLEN_Q]);
  const int k_first = cache_leftpad[batch], seqlen_k = cache_seqlens[batch] - k_first;
  const long slot = cache_batch_idx[batch];
  const long q_start = batch * ints[Q_BATCH], o_start = batch * ints[O_BATCH], lse_start = batch * ints[LSE_BATCH];
  const long k_start = slot * ints[K_BATCH] + k_first * ints[K_ROW];
  const long v_start = slot * ints[V_BATCH] + k_first * ints[V_ROW];"""
    if kv_cache == "paged":
        return """  // Sequence b attends to its rows 0 .. cache_seqlens[b] - 1, found through its row of the block table.
  const int seqlen_q = int(ints[SEQLEN_Q]), seqlen_k = cache_seqlens[batch];
  device const int* pages = block_table + batch * ints[TABLE_STRIDE];
  const long q_start = batch * ints[Q_BATCH], o_start = batch * ints[O_BATCH], lse_start = batch * ints[LSE_BATCH];
  const long k_start = 0, v_start = 0;  // rows are addressed through `pages`"""
    if varlen:
        return """  const int q_first = cu_seqlens_q[batch], k_first = cu_seqlens_k[batch];  // the sequence's first rows
  const int seqlen_q = cu_seqlens_q[batch + 1] - q_first, seqlen_k = cu_seqlens_k[batch + 1] - k_first;
  const long q_start = q_first * ints[Q_ROW], k_start = k_first * ints[K_ROW];
  const long v_start = k_first * ints[V_ROW], o_start = q_first * ints[O_ROW], lse_start = q_first;"""
    return """  const int seqlen_q = int(ints[SEQLEN_Q]), seqlen_k = int(ints[SEQLEN_K]);
  const long q_start = batch * ints[Q_BATCH], k_start = batch * ints[K_BATCH];
  const long v_start = batch * ints[V_BATCH], o_start = batch * ints[O_BATCH], lse_start = batch * ints[LSE_BATCH];"""


def key_range(spec: ForwardSpec) -> str:
    """MSL narrowing [key_begin, key_end) to the keys that rows first_row..last_row can see (causal/local)."""
    if not spec.masked:
        return ""
    return """  // Causal and local masks: skip whole key blocks that no row of this query block can see.
  if (window_left >= 0) key_begin = max(key_begin, first_row + diagonal_offset - window_left);
  if (window_right >= 0) key_end = min(key_end, last_row + diagonal_offset + window_right + 1);
  key_begin = max(key_begin, 0) / BLOCK_K * BLOCK_K;"""
