"""MSL shared by the generated kernels: Apple's fragment layout and the loaders (HELPERS, which need `input_t`,
HEAD_DIM and THREADS defined first), the kernels' parameter lists, and the causal/local key range."""

from __future__ import annotations

from .spec import ForwardSpec

# The builtin attributes every attention kernel reads, after its buffers.
THREADGROUP_BUILTINS = """    uint3 group [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]"""

# Buffers that only some specs bind, after a kernel's own: sequence offsets (varlen), the kv cache's per-sequence
# rows (kv_cache; see problem.KVCache) and ALiBi slopes.
SIDE_BUFFERS = {
    "cu_seqlens_q": "device const int* cu_seqlens_q",
    "cu_seqlens_k": "device const int* cu_seqlens_k",
    "cache_seqlens": "device const int* cache_seqlens",
    "cache_leftpad": "device const int* cache_leftpad",
    "cache_batch_idx": "device const int* cache_batch_idx",
    "block_table": "device const int* block_table",
    "alibi_slopes": "device const float* alibi_slopes",
}
KV_CACHE_BUFFERS = {
    "": [],
    "dense": ["cache_seqlens", "cache_leftpad", "cache_batch_idx"],
    "paged": ["cache_seqlens", "block_table"],
}


def side_buffer_names(spec: ForwardSpec) -> list[str]:
    return ((["cu_seqlens_q", "cu_seqlens_k"] if spec.varlen else []) + KV_CACHE_BUFFERS[spec.kv_cache]
            + (["alibi_slopes"] if spec.alibi else []))


def parameter_list(declarations: dict[str, str], names: list[str]) -> str:
    """`declaration [[buffer(i)]]` for each buffer name, in order."""
    buffers = {**declarations, **SIDE_BUFFERS}
    return ",\n    ".join(f"{buffers[n]} [[buffer({i})]]" for i, n in enumerate(names))


def key_range(spec: ForwardSpec) -> str:
    """MSL narrowing [key_begin, key_end) to the keys that rows first_row..last_row can see (causal/local)."""
    if not spec.masked:
        return ""
    return """  // Causal and local masks: skip whole key blocks that no row of this query block can see.
  const long window_left = ints[WINDOW_LEFT], window_right = ints[WINDOW_RIGHT];
  if (window_left >= 0) key_begin = max(key_begin, first_row + seqlen_k - seqlen_q - window_left);
  if (window_right >= 0) key_end = min(key_end, last_row + seqlen_k - seqlen_q + window_right + 1);
  key_begin = key_begin / BLOCK_K * BLOCK_K;"""

HELPERS = """// (column, row) of the first of the two elements this lane holds in an 8x8 simdgroup_matrix (Apple's layout).
inline ushort2 fragment_coord(ushort lane) {
  return ushort2(4 * ((lane / 8) % 2) + 2 * (lane % 2), 4 * (lane / 16) + (lane / 2) % 4);
}

// Elements (row, col) and (row, col + 1) of a row-major matrix in fp32; zero outside the real head dim.
inline float2 load_pair(device const input_t* base, long row, long row_stride, int col, int cols) {
  float2 v = float2(0.0f);
  if (col < cols) v.x = float(base[row * row_stride + col]);
  if (col + 1 < cols) v.y = float(base[row * row_stride + col + 1]);
  return v;
}

// Fragment (block, d) of a (rows x HEAD_DIM) threadgroup tile, in fp32: element (r, c) is tile[block*8 + r][d*8 + c].
inline float2 tile_fragment(threadgroup const input_t* tile, int block, int d, ushort2 coord) {
  threadgroup const input_t* p = tile + (block * 8 + coord.y) * HEAD_DIM + d * 8 + coord.x;
  return float2(float(p[0]), float(p[1]));
}

// The same fragment transposed: element (r, c) is tile[block*8 + c][d*8 + r].
inline float2 tile_fragment_transposed(threadgroup const input_t* tile, int block, int d, ushort2 coord) {
  threadgroup const input_t* p = tile + (block * 8 + coord.x) * HEAD_DIM + d * 8 + coord.y;
  return float2(float(p[0]), float(p[HEAD_DIM]));
}

// Rows [first, first + tile_rows) of a (rows x cols) matrix into a (tile_rows x HEAD_DIM) tile, zero past
// its edges; all THREADS threads of the threadgroup take part.
inline void load_tile(threadgroup input_t* tile, int tile_rows, device const input_t* src, long row_stride,
                      long first, long rows, int cols, ushort tid) {
  for (int i = tid; i < tile_rows * HEAD_DIM; i += THREADS) {
    const int r = i / HEAD_DIM, c = i % HEAD_DIM;
    tile[i] = (first + r < rows && c < cols) ? src[(first + r) * row_stride + c] : input_t(0);
  }
}
"""

# For paged kv caches only: a key block may span pages (any page size works).
PAGED_HELPERS = """
// load_tile over a paged matrix: row r sits in block pages[r / page_size], at row r % page_size of the block.
inline void load_paged_tile(threadgroup input_t* tile, int tile_rows, device const input_t* src, long block_stride,
                            long row_stride, device const int* pages, long page_size, long first, long rows,
                            int cols, ushort tid) {
  for (int i = tid; i < tile_rows * HEAD_DIM; i += THREADS) {
    const int r = i / HEAD_DIM, c = i % HEAD_DIM;
    const long row = first + r;
    tile[i] = (row < rows && c < cols)
        ? src[pages[row / page_size] * block_stride + (row % page_size) * row_stride + c] : input_t(0);
  }
}
"""
